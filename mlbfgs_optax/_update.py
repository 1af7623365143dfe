r"""Init and update of mL-BFGS as pure functions of (options, hyperparameters, arrays).

One update, per block :math:`b` (Niu et al., 2023, https://arxiv.org/abs/2307.13744):

1. averages :math:`M^\theta \leftarrow \beta M^\theta + (1-\beta)\theta_t`,
   :math:`M^g \leftarrow \beta M^g + (1-\beta) g_t`, and with the metric the
   second moment :math:`\nu` and :math:`D^{1/2}` (:mod:`mlbfgs_optax._metric`);
2. every :math:`T`-th call, a curvature pair (:func:`mlbfgs_optax._pairs.pair_step`)
   in a loop of zero or one trip (:func:`at_most_once`: XLA updates the history in
   place), then its Gram rows (:func:`mlbfgs_optax._pairs.gram_rows`);
3. the direction :math:`d_b = D^{1/2} \tilde H_b D^{1/2} g_b` by the two-loop
   recursion (:math:`D = I` without the metric), with the optional step bound: in
   two passes over the history from the cached Gram matrices
   (:func:`fused_direction`), else by the scan or Gram two-loop;
4. optionally, :math:`d` divided by its global norm once any pair exists;
5. optionally, the debiased EMA of the direction, :math:`m \leftarrow \mu m + (1-\mu) d`,
   :math:`d \leftarrow m / (1-\mu^t)` (:func:`with_momentum`), on the packed arrays.

A step whose incoming updates are not all finite leaves the state untouched and
passes the updates through.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mlbfgs_optax import _direction
from mlbfgs_optax import _layout
from mlbfgs_optax import _metric
from mlbfgs_optax import _numerics
from mlbfgs_optax import _pairs
from mlbfgs_optax import _state
from mlbfgs_optax import _two_loop
from mlbfgs_optax import _xla_hints
from mlbfgs_optax._distributed import Collectives
from mlbfgs_optax._options import Hyperparams, Options, is_number
from mlbfgs_optax._state import ScaleByMLBFGSState


def state_dtypes(opts: Options, layout) -> _state.Dtypes:
    return _state.dtypes(layout, opts.history_dtype, opts.averages_dtype)


@functools.cache
def _params_placeholder_type() -> type:
    """The type of the stand-in for params that :func:`optax.tree.map_params` inits with."""
    seen = []
    optax.tree.map_params(lambda p: seen.append(type(p)) or p, lambda x: x, ())
    return seen[0]


class _NotParams:
    """A leaf marking a state field that is not params-shaped (see :func:`init`)."""


def init(opts: Options, params: Any) -> ScaleByMLBFGSState:
    """The initial state for ``params`` (arrays or ``jax.ShapeDtypeStruct``).

    On optax's params placeholder (:func:`optax.tree.map_params` inits with it
    to find the params-shaped parts of a state) every field is a
    :class:`_NotParams` leaf: the state holds packed arrays, none shaped like
    params (:func:`~mlbfgs_optax.state_partition_specs` gives their specs).
    """
    if isinstance(params, _params_placeholder_type()):
        state = ScaleByMLBFGSState(**{f: _NotParams() for f in _state.FIELDS})
        if opts.metric != "adam":
            state = state._replace(nu=None)
        return state if opts.momentum else state._replace(direction_avg=None)
    layout = _layout.make_layout(params, opts.blocks, opts.packing)
    zeros = lambda lay, make: _state.zeros_state(lay, opts.memory_size, opts.cache_gram,
                                                 state_dtypes(opts, lay), make,
                                                 metric=opts.metric == "adam",
                                                 momentum=opts.momentum)
    return opts.placement.init(layout, zeros, params)._replace(layout=layout)


def averages(layout, state: ScaleByMLBFGSState, g, theta, beta, finite, dt) -> ScaleByMLBFGSState:
    """Step 1: the EMAs of the params and updates, their weights and the count."""

    def ema(avg, xs):
        return [
            jnp.where(finite, beta * a.astype(dt.acc) + (1 - beta) * x.astype(dt.acc), a).astype(d)
            for a, x, d in zip(avg, xs, dt.averages)
        ]

    w = state.avg_weights
    return state._replace(
        avg_weights=w.at[:2].set(jnp.where(finite, beta * w[:2] + (1 - beta), w[:2])),
        count=jnp.where(finite, optax.safe_increment(state.count), state.count),
        params_avg=ema(state.params_avg, theta),
        grads_avg=ema(state.grads_avg, g),
    )


def direction(layout, g, st: ScaleByMLBFGSState, cache_gram: bool) -> list:
    """Step 3: :math:`d_b = H_b g_b` for every block (packed, accumulation dtype)."""
    history = (layout, g, st.s_history, st.y_history, st.rho, st.gamma, st.newest)
    if cache_gram:
        return _two_loop.blockwise_two_loop_gram(*history, st.sy_gram, st.yy_gram)
    return _two_loop.blockwise_two_loop(*history)


def metric_direction(layout, opts: Options, h: Hyperparams, g, st: ScaleByMLBFGSState,
                     root_d, acc) -> list:
    r"""Step 3 in the metric: :math:`d = D^{1/2} \tilde H D^{1/2} g`, with the step bound.

    ``root_d`` None means :math:`D = I`. With ``step_bound`` :math:`\kappa`,
    :math:`\tilde d` is shortened per block to
    :math:`\|\tilde d_b\| \le \kappa \|D^{1/2} g_b\|`
    (:func:`mlbfgs_optax._metric.bounded`).
    """
    if root_d is not None:
        g = [x.astype(acc) * r for x, r in zip(g, root_d)]
    d = direction(layout, g, st, opts.cache_gram)
    if not opts.step_bound_off:
        d = _metric.bounded(layout, d, g, h.step_bound, acc)
    if root_d is not None:
        d = [x * r for x, r in zip(d, root_d)]
    return d


def learning_rate_at(opts: Options, h: Hyperparams, count, acc) -> jax.Array:
    """:math:`\\eta_t` at call ``count`` (1 when no learning rate was given)."""
    if opts.lr_schedule is not None:
        return jnp.asarray(opts.lr_schedule(count), acc)
    return jnp.asarray(1.0 if h.learning_rate is None else h.learning_rate, acc)


def normalized(d: list, any_pair: jax.Array, coll: Collectives) -> list:
    r"""Step 4: :math:`d / \sqrt{\sum_b \|d_b\|^2}` once ``any_pair`` (over every device).

    The norm is taken of :math:`d / \max|d|`, so it cannot overflow.
    """
    big = coll.pmax(functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), initial=0.0) for x in d]))
    any_pair = coll.any(any_pair)
    big = jnp.where(jnp.isfinite(big) & (big > 0), big, 1.0)
    norm = big * jnp.sqrt(coll.psum(sum(jnp.sum(jnp.square(x / big)) for x in d)))
    scale = jnp.where(any_pair & (norm > 0), 1.0 / jnp.where(norm > 0, norm, 1.0), 1.0)
    return [x * scale for x in d]


def with_momentum(d: list, state: ScaleByMLBFGSState, new: ScaleByMLBFGSState, mu, finite,
                  dtypes) -> tuple[list, ScaleByMLBFGSState]:
    r"""Step 5: :math:`m \leftarrow \mu m + (1-\mu) d`, returns :math:`m / (1-\mu^t)`.

    As ``optax.ema(mu, debias=True)`` after the direction, but on the packed
    arrays (a few kernels whatever the number of leaves), with :math:`t` the
    number of finite updates (``new.count``); where not ``finite``, :math:`m`
    stays as it was.

    Returns:
      ``(debiased m, new state with direction_avg)``.
    """
    acc = d[0].dtype
    mu = jnp.asarray(mu, acc)
    m = [jnp.where(finite, (1 - mu) * x + mu * a.astype(acc), a.astype(acc))
         for x, a in zip(d, state.direction_avg)]
    weight = 1 - mu ** new.count
    weight = jnp.where(weight > 0, weight, 1)  # count 0: a step that is not finite
    return [x / weight for x in m], new._replace(
        direction_avg=[x.astype(t) for x, t in zip(m, dtypes)])


def at_most_once(pred, fn, state: ScaleByMLBFGSState, fields, extra=()):
    """``fn(state) if pred else (state, extra)``, carrying only the ``fields`` ``fn`` writes.

    ``fn`` returns ``(new_state, new_extra)``. See
    :func:`mlbfgs_optax._numerics.at_most_once` (a loop of zero or one trip,
    which XLA updates in place; a ``lax.cond`` copies the state). The fields
    ``fn`` only reads are closed over, not carried.

    Returns:
      ``(state, extra)``.
    """
    def body(c):
        out, ex = fn(state._replace(**c[0]))
        return {f: getattr(out, f) for f in fields}, ex

    carried, extra = _numerics.at_most_once(
        pred, body, ({f: getattr(state, f) for f in fields}, extra))
    return state._replace(**carried), extra


def fused_direction(layout, opts: Options, h: Hyperparams, g, whiten, products_of, products,
                    st: ScaleByMLBFGSState, acc) -> list:
    r"""Step 3 in two passes over the history (:mod:`mlbfgs_optax._direction`).

    The same direction as :func:`metric_direction` with cached Gram
    matrices: :math:`d = D^{1/2} \kappa_b \tilde H_b q`, :math:`q = D^{1/2} g`,
    from ``products`` :math:`= (S^\top q, \hat Y^\top q, q^\top q)` of the
    current history, with the step bound's norm taken from inner products
    instead of a pass over the direction. ``g`` is the packed update (a bucket
    of one leaf is combined from it in the leaf's shape, so that its update is
    written in place: :func:`_direction.combine`). ``whiten()`` returns ``(q, root_d)``;
    every pass that needs :math:`q` calls it, so that XLA computes :math:`q`
    inside that pass instead of storing it. ``products_of(scale)``: the
    products of :math:`q` scaled per block (:func:`_direction.scaled_products`).
    """
    s_hist = st.s_history
    y_hist = st.y_history
    sg, yg, gg, c = _direction.safe_products(layout, products_of, lambda: whiten()[0], products,
                                             acc)
    coef_s, coef_y = _two_loop.gram_coefficients(sg, yg, st.rho, st.gamma, st.newest,
                                                 st.sy_gram, st.yy_gram, acc)
    gam = st.gamma.astype(acc)
    kappa = jnp.ones_like(gam)
    if not opts.step_bound_off:
        dd, err = _direction.norm_sq(gam, coef_s, coef_y, gg, sg, yg, st.ss_gram, st.sy_gram,
                                     st.yy_gram)
        # The norm's upper bound: the bound then holds however the sum cancelled.
        kappa = _direction.bound_factor(gg, dd + err, h.step_bound)
    w = (kappa * c)[:, None]
    q, root_d = whiten()
    return _direction.combine(layout, q, kappa * gam, w * coef_s, s_hist, w * coef_y, y_hist,
                              acc, root_d, g)


def local_step(opts: Options, h: Hyperparams, layout, g, theta, state, finite,
               coll: Collectives, hvp=None):
    """Steps 1-4 on the blocks of ``layout`` (this device's share, when sharded).

    ``g`` and ``theta`` are packed like ``layout``; ``coll`` reduces over the
    devices that share the blocks (identities on one device). ``hvp``: packed
    Hessian-vector product for ``curvature="hessian_vector"``, else None.
    """
    # ``count`` never falls below 0 (it saturates), but XLA cannot know it.
    with _xla_hints.opaque_block_indices(layout.whole_bucket_blocks, state.count >= 0):
        return _local_step(opts, h, layout, g, theta, state, finite, coll, hvp)


def _local_step(opts: Options, h: Hyperparams, layout, g, theta, state, finite,
                coll: Collectives, hvp=None):
    dt = state_dtypes(opts, layout)
    new = averages(layout, state, g, theta, h.beta, finite, dt)
    inv_lr = None
    if opts.metric == "adam":
        nu = _metric.second_moment(state.nu, g, h.metric_decay,
                                   finite, dt.averages)
        new = new._replace(nu=nu)
        eta = learning_rate_at(opts, h, state.count, dt.acc)
        inv_lr = jnp.where(eta > 0, 1.0 / jnp.where(eta > 0, eta, 1.0), 0.0)

    def whiten():
        """``(q, D^{1/2})`` of this call (``(g, None)`` without the metric).

        Called by every pass that needs them, inside its own branch: XLA then
        computes them in that pass from ``g`` and ``nu`` instead of keeping
        parameter-sized temporaries (on XLA:CPU every temporary costs page faults).
        """
        if opts.metric != "adam":
            return g, None
        root_d = _metric.root_diagonal(nu, h.metric_decay, new.count, h.metric_eps, dt.acc)
        return [x.astype(dt.acc) * r for x, r in zip(g, root_d)], root_d

    is_pair_step = finite & ((state.count + 1) % h.update_period == 0)
    with jax.named_scope("pair_step"):
        new, stored = at_most_once(
            is_pair_step,
            lambda st: _pairs.pair_step(layout, opts, h, dt, g, state.count, st, whiten()[1],
                                        inv_lr, hvp),
            new, _pairs.written_fields(opts.refresh_grad_average),
            jnp.zeros_like(state.newest, dtype=bool))
    fused = opts.cache_gram and not opts.normalize
    if opts.cache_gram:
        # After the loop (XLA copies a history that a loop body both reads in a matrix
        # product and updates in place), one matrix product per history: on a pair step
        # against [s_new, y_new, q] (the new Gram rows and the direction's products), on
        # an ordinary step against q alone.
        s_hist = new.s_history
        y_hist = new.y_history
        zeros = jnp.zeros_like(state.rho, dtype=dt.acc)

        def products_of(scale):
            return _direction.scaled_products(layout, whiten()[0], scale, s_hist, y_hist, dt.acc)

        @jax.named_scope("pair_products")
        def with_pair():
            q = whiten()[0] if fused else None
            rows, qs = _pairs.gram_rows(layout, s_hist, y_hist, new.newest, q, dt.acc)
            return rows, ((*qs, layout.block_dot(q, q, dt.acc)) if fused else None)

        @jax.named_scope("ordinary_products")
        def without_pair():
            return (zeros,) * 4, (products_of(None) if fused else None)

        rows, products = jax.lax.cond(is_pair_step, with_pair, without_pair)
        new = _pairs.store_gram_rows(layout, new, rows, new.newest, stored)
    if fused:
        d = fused_direction(layout, opts, h, g, whiten, products_of, products, new, dt.acc)
    else:
        d = metric_direction(layout, opts, h, g, new, whiten()[1], dt.acc)
    if opts.normalize:
        d = normalized(d, jnp.any(new.num_pairs > 0), coll)
    if opts.momentum:
        d, new = with_momentum(d, state, new, h.momentum, finite, dt.averages)
    return d, new


def hessian_vector(layout, grad_fn, params):
    r"""Packed :math:`v \mapsto \nabla^2 f(\theta)\, v` at ``params``, by forward-over-reverse.

    ``grad_fn`` maps params to the gradient of the caller's loss on its
    current batch; the product is :func:`jax.jvp` of it along the unpacked
    ``v`` (about the cost of two gradients).
    """

    def hvp(v):
        tangent = layout.unpack(v)  # in the params' dtypes, as jax.jvp requires
        return layout.pack(jax.jvp(grad_fn, (params,), (tangent,))[1])

    return hvp


def _step(opts: Options, h: Hyperparams, updates, state, params, grad_fn=None):
    """A validated update: pack, run the placement's step, unpack.

    Everything between the packing and the unpacking works on the layout's
    few packed arrays, so the program's size does not grow with the number
    of parameter leaves.
    """
    layout = state.layout.for_tree(params)
    g_dtypes = [x.dtype for x in layout.treedef.flatten_up_to(updates)]
    # Finite on the packed updates: one reduction per bucket (XLA reads the leaves
    # in place), not one per leaf. An update that the packing's cast overflows
    # counts as not finite. The buckets that stack several leaves are then made
    # once, behind an optimization barrier, instead of copied into every kernel
    # that reads them; the barrier also hands back ``finite`` as a buffer of its
    # own, so that no later kernel recomputes it. (A loop of zero or one trip did
    # the same at the price of a buffer of zeros and a copy per packed array.) A
    # bucket of one leaf is that leaf reshaped: it is read in place.
    multi = [len(b.leaves) > 1 for b in layout.buckets]
    pick = lambda xs: [x for x, m in zip(xs, multi) if m]

    def merge(xs, picked):
        it = iter(picked)
        return [next(it) if m else x for x, m in zip(xs, multi)]

    g, theta = layout.pack(updates), layout.pack(params)
    finite = _numerics.all_finite(g)
    if any(multi):
        g_multi, theta_multi, finite = _xla_hints.hold(
            "stacked_inputs", (pick(g), pick(theta), finite))
        g, theta = merge(g, g_multi), merge(theta, theta_multi)
    hvp = None if grad_fn is None else hessian_vector(layout, grad_fn, params)
    step = functools.partial(local_step, opts, h, hvp=hvp)
    d, new = opts.placement.run(step, layout, g, theta, state, finite)
    # Likewise the direction of such a bucket is computed once into its packed
    # buffer (as a loop of zero or one trip) and only then split per leaf: else XLA
    # would copy its whole computation into the fusion of every leaf it is split
    # into. The loop also hands back every leaf's offset in its bucket, which XLA
    # then cannot fold into a constant: the kernels that read the leaves of one
    # shape are one kernel, compiled once, instead of one per leaf. Where the step
    # is not finite, the updates pass through as they came (offsets 0 serve them).
    offsets = None
    if any(multi):
        where = pick([[jnp.int32(o) for o in offs] for offs in layout.leaf_offsets()])
        # The loop starts from the packed updates (dead by then, so XLA writes the
        # direction into their buffer) rather than from a fresh array of zeros.
        init = [x if (x.shape, x.dtype) == (y.shape, y.dtype) else jnp.zeros_like(y)
                for x, y in zip(pick(g), pick(d))]
        d_multi, where = _xla_hints.once(
            "direction_split", finite, lambda _: (pick(d), where),
            (init, jax.tree.map(jnp.zeros_like, where)))
        d, offsets = merge(d, d_multi), merge([None] * len(d), where)
    out = layout.unpack(d, dtypes=g_dtypes, offsets=offsets)
    return jax.tree.map(lambda o, u: jnp.where(finite, o, u), out, updates), new


# Called eagerly, the step compiles once per (options, layout, hyperparameters)
# instead of re-tracing its scans and cond on every call, as jnp's own functions
# do; under the caller's jit it is inlined. Concrete hyperparameters are
# compile-time constants; traced ones (inject_hyperparams) are arguments.
_step_static_hyper = jax.jit(_step, static_argnums=(0, 1))
_step_traced_hyper = jax.jit(_step, static_argnums=(0,))


def update(opts: Options, h: Hyperparams, updates, state, params, grad_fn=None):
    """Checks that updates, state and params fit together, then runs the step.

    With ``grad_fn`` (``curvature="hessian_vector"``) the step is traced in
    the caller's trace: ``grad_fn`` closes over the caller's batch.
    """
    check_structure(opts, updates, state, params)
    if grad_fn is not None:
        return _step(opts, h, updates, state, params, grad_fn)
    concrete = all(x is None or is_number(x) for x in h)
    step = _step_static_hyper if concrete else _step_traced_hyper
    return step(opts, h, updates, state, params)


def check_structure(opts: Options, updates, state: ScaleByMLBFGSState, params) -> None:
    """Raises a ValueError when updates, state and params do not fit together."""
    if not isinstance(state.layout, _layout.BlockLayout):
        raise ValueError(
            "scale_by_mlbfgs: the state holds no block layout; was it made by this "
            "optimizer's init?")
    layout = state.layout.for_tree(params)
    try:
        g_leaves = layout.treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "scale_by_mlbfgs: updates and params have different tree structures.\n"
            f"  params:  {layout.treedef}\n  updates: {jax.tree.structure(updates)}"
        ) from e
    for path, x, shape in zip(layout.paths, g_leaves, layout.shapes):
        if tuple(x.shape) != shape:
            raise ValueError(
                f"scale_by_mlbfgs: updates leaf {path} has shape {tuple(x.shape)}, "
                f"params has {shape}.")
    rows = opts.placement.rows(layout)
    expected = [shape for shape, _ in layout.packed_shapes()]
    if rows != layout.num_blocks:
        expected = [(rows,) + expected[0][1:]]
    got = [tuple(x.shape) for x in state.params_avg]
    if got != expected or state.rho.shape != (rows, opts.memory_size):
        raise ValueError(
            f"scale_by_mlbfgs: the state holds packed arrays {got} and {state.rho.shape[0]} "
            f"blocks of memory {state.rho.shape[1]}, but this optimizer expects {expected} "
            f"and {rows} blocks of memory {opts.memory_size}; was the state made by init "
            "of this optimizer?"
        )
