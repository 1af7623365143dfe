r"""Pair formation, step by step: candidate, damping, acceptance, storage.

Every :math:`T`-th call mL-BFGS forms one curvature pair per block from the
change of the momentum averages since the last such call (Niu et al., 2023,
https://arxiv.org/abs/2307.13744):

.. math::
  s = M^\theta - M^\theta_{\rm snap}, \quad y = M^g - M^g_{\rm snap}
  \;\xrightarrow{\text{pair momentum}}\;
  \hat y = \tau y + (1-\tau) s
  \;\xrightarrow{\text{guard}}\; \text{ring buffer}.

Each step is a pure function of packed arrays (lists with one array per
segment of a :class:`~mlbfgs_optax.BlockLayout`) and per-block vectors of
length ``B``; :func:`form_pair` composes them on a state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mlbfgs_optax import _damping
from mlbfgs_optax import _metric
from mlbfgs_optax import _numerics
from mlbfgs_optax import _state
from mlbfgs_optax import _xla_hints
from mlbfgs_optax._options import Hyperparams, Options
from mlbfgs_optax._state import ScaleByMLBFGSState


def _corrections(st: ScaleByMLBFGSState, bias_correction: bool, acc) -> tuple:
    r"""The factors :math:`1/(1-\beta^k)` of the four averages (all 1 without correction)."""
    if not bias_correction:
        return (1.0,) * 4
    c = _numerics.safe_div(1.0, st.avg_weights.astype(acc))  # one (4,) vector, one kernel
    return tuple(c[i] for i in range(4))


def candidate(layout, st: ScaleByMLBFGSState, bias_correction: bool, acc):
    r"""The raw pair :math:`s = M^\theta - M^\theta_{\rm snap}`, :math:`y = M^g - M^g_{\rm snap}`.

    With ``bias_correction`` every average is first divided by its EMA weight
    :math:`1 - \beta^k` (``st.avg_weights``).

    Returns:
      ``(s, y)``, packed, in ``acc``.
    """
    c_theta, c_grad, c_snap_theta, c_snap_grad = _corrections(st, bias_correction, acc)
    s = [c_theta * a.astype(acc) - c_snap_theta * b.astype(acc)
         for a, b in zip(st.params_avg, st.params_snapshot)]
    y = [c_grad * a.astype(acc) - c_snap_grad * b.astype(acc)
         for a, b in zip(st.grads_avg, st.grads_snapshot)]
    return s, y


def above_roundoff(layout, s, st: ScaleByMLBFGSState, bias_correction: bool, factor,
                   acc) -> jax.Array:
    r"""Per block: :math:`\max|s| > c\,\epsilon \max|\bar\theta|` (the pair is not round-off).

    :math:`\bar\theta` is the (bias-corrected) parameter average and
    :math:`\epsilon` the machine epsilon of ``acc``. Next to an optimum the
    averages stop moving and :math:`s` is the rounding error of
    :math:`M^\theta`: such a pair carries no curvature, only noise that can
    pass the positivity guard (float32 Rosenbrock turned to NaN this way).

    Returns:
      A boolean ``(B,)`` vector, False where the pair must be rejected.
    """
    c_theta = _corrections(st, bias_correction, acc)[0]
    theta = [c_theta * a.astype(acc) for a in st.params_avg]
    max_s, max_theta = layout.block_max_abs_many([s, theta], acc)
    return max_s > factor * jnp.finfo(acc).eps * max_theta


def with_pair_momentum(layout, s, y, s_hist, y_hist, newest, num_pairs, pair_momentum, acc):
    r""":math:`s \leftarrow (1-m_2)s + m_2 s_{\rm prev}`, same for :math:`y`, per block.

    :math:`(s_{\rm prev}, \hat y_{\rm prev})` is the newest stored pair; a block
    with an empty history keeps its raw pair.
    """
    m2 = jnp.where(num_pairs > 0, jnp.asarray(pair_momentum, acc), 0.0).astype(acc)
    bc = layout.broadcast

    def mix(vs, hist):
        prev = [layout.gather_slot(h, newest, j) for j, h in enumerate(hist)]
        return [(1 - bc(m2, j, x.ndim)) * x + bc(m2, j, x.ndim) * p.astype(acc)
                for j, (x, p) in enumerate(zip(vs, prev))]

    return mix(s, s_hist), mix(y, y_hist)


class Damped(NamedTuple):
    r"""A damped candidate.

    Attributes:
      y_hat: :math:`\hat y = \tau y + (1-\tau) s`, packed.
      mu: :math:`s^\top y / s^\top s` before damping, ``(B,)``.
      tau: the weight :math:`\tau` on :math:`y`, ``(B,)``.
    """

    y_hat: list
    mu: jax.Array
    tau: jax.Array


def damp(layout, s, y, h: Hyperparams, yy_bound: bool, acc, along_s: bool = False) -> Damped:
    r"""Powell-style damping: :math:`s^\top\hat y / s^\top s \in [\sigma_L, \sigma_H]`.

    :math:`\tau` is :func:`~mlbfgs_optax.damping_weight` of
    :math:`\mu = s^\top y / s^\top s`, lowered by
    :func:`~mlbfgs_optax.yy_bound_weight` when ``yy_bound``. The weights are
    invariant to a common scale of :math:`(s, y)`, so the dot products are
    taken of :math:`(s, y)/c` with :math:`c` a power of two near
    :math:`\max(|s|, |y|)`: they cannot overflow.

    With ``along_s`` (``pair_form="along_s"``) the pair keeps only its damped
    curvature along :math:`s`: :math:`\hat y = \hat\mu\, s` with
    :math:`\hat\mu = \tau\mu + 1 - \tau`
    (:func:`~mlbfgs_optax.along_s_curvature`).
    """
    bc = layout.broadcast
    c = jnp.max(layout.block_max_abs_many([s, y], acc), axis=0)
    c = 1.0 / _numerics.power_of_two_near(c)
    s_c = [x * bc(c, j, x.ndim) for j, x in enumerate(s)]
    y_c = [x * bc(c, j, x.ndim) for j, x in enumerate(y)]
    ss, sy, yy = layout.block_dots([(s_c, s_c), (s_c, y_c), (y_c, y_c)], acc)
    mu = _numerics.safe_div(sy, ss)
    tau = _damping.damping_weight(mu, h.sigma_low, h.sigma_high, h.tau_max).astype(acc)
    if along_s:  # y_hat parallel to s: the y^T y bound holds by construction
        mu_hat = _damping.along_s_curvature(mu, tau)
        return Damped([bc(mu_hat, j, x.ndim) * x for j, x in enumerate(s)], mu, tau)
    if yy_bound:
        tau = jnp.minimum(tau, _damping.yy_bound_weight(ss, sy, yy, h.sigma_yy).astype(acc))
    y_hat = [bc(tau, j, x.ndim) * x + (1 - bc(tau, j, x.ndim)) * z
             for j, (x, z) in enumerate(zip(y, s))]
    return Damped(y_hat, mu, tau)


class Products(NamedTuple):
    r"""Inner products of the pair as it will be stored (history dtype).

    Attributes:
      ss: :math:`s^\top s`, ``(B,)``.
      sy: :math:`s^\top \hat y`, ``(B,)``.
      yy: :math:`\hat y^\top \hat y`, ``(B,)``.
      finite: every product is finite, ``(B,)``.
    """

    ss: jax.Array
    sy: jax.Array
    yy: jax.Array
    finite: jax.Array


def products(layout, s, y_hat, acc) -> Products:
    r"""The pair's inner products :math:`s^\top s`, :math:`s^\top\hat y`, :math:`\hat y^\top\hat y`.

    The Gram rows are taken after the pair is stored (:func:`gram_rows`).
    Where ``finite``, every row is finite too: by
    Cauchy-Schwarz, :math:`|a^\top b| \le \|a\| \|b\|`, and every stored
    pair passed this test.
    """
    ss, sy, yy = layout.block_dots([(s, s), (s, y_hat), (y_hat, y_hat)], acc)
    finite = jnp.isfinite(ss) & jnp.isfinite(sy) & jnp.isfinite(yy)
    return Products(ss, sy, yy, finite)


def gram_rows(layout, s_hist, y_hist, slot, q, acc) -> tuple:
    r"""The products of the pair stored in ``slot`` with every slot of the history, one pass each.

    One matrix product per history, :math:`S^\top [s, \hat y, q]` and
    :math:`\hat Y^\top [s, \hat y, q]`, gives the rows of all three Gram
    matrices and :math:`S^\top q`, :math:`\hat Y^\top q` for the step's
    direction (:mod:`mlbfgs_optax._direction`), so that a pair step reads the
    history as often as an ordinary one. The update takes them of the history
    the pair was just stored in (its slot then holds the pair's own products),
    after the pair step's loop: XLA copies a history that one loop body both
    reads in a matrix product and updates in place.

    Args:
      layout: the block layout.
      s_hist, y_hist: packed histories.
      slot: ``(B,)`` ring-buffer slot of the pair in the histories.
      q: the packed vector of the step's direction, or None.
      acc: the accumulation dtype.

    Returns:
      ``(rows, qs)``: ``rows = (row_ss, col_sy, row_sy, row_yy)``, each ``(B, M)``
      (:math:`S^\top s`, :math:`S^\top \hat y`, :math:`\hat Y^\top s`,
      :math:`\hat Y^\top \hat y`), and ``(S^T q, Y^T q)``, or None without ``q``.
    """
    pair = lambda hist: [layout.gather_slot(x, slot, j) for j, x in enumerate(hist)]
    vs = [pair(s_hist), pair(y_hist)] + ([q] if q is not None else [])
    on_s, on_y = layout.block_dot_history_many([s_hist, y_hist], vs, acc)  # (B, M, K) each
    rows = (on_s[..., 0], on_s[..., 1], on_y[..., 0], on_y[..., 1])
    return rows, ((on_s[..., 2], on_y[..., 2]) if q is not None else None)


def accept(p: Products, may_store, curvature_eps, acc) -> jax.Array:
    r"""The guard: store a pair only if finite with :math:`s^\top\hat y > \epsilon s^\top s`.

    Also :math:`\hat y \ne 0`, and :math:`\rho = 1/s^\top\hat y` must be a
    normal number (a flushed :math:`\rho` would read as an empty slot while the
    pair is counted). ``may_store``: the call is past the first snapshot and
    the pair warm-up. ``curvature_eps`` None means the machine epsilon of
    ``acc``.
    """
    eps = jnp.finfo(acc).eps if curvature_eps is None else curvature_eps
    rho_ok = p.sy < 1.0 / jnp.finfo(acc).tiny
    return may_store & p.finite & (p.sy > eps * p.ss) & (p.yy > 0) & rho_ok


def store(layout, st: ScaleByMLBFGSState, s, y_hat, p: Products, slot, ok,
          update_gamma: bool = True) -> ScaleByMLBFGSState:
    r"""Writes the pair into ring-buffer ``slot`` of every block where ``ok``.

    Updates the histories, :math:`\rho`, :math:`\gamma = s^\top\hat y/\hat y^\top\hat y`
    (unless not ``update_gamma``: then :math:`\gamma` stays 1, :math:`H_0 = I` in
    the metric's coordinates), the newest slot and the pair count (the Gram
    matrices are written by :func:`store_gram_rows`).
    """
    s_hist = st.s_history
    y_hist = st.y_history
    s_hist = [layout.scatter_slot(h, v, slot, ok, j) for j, (h, v) in enumerate(zip(s_hist, s))]
    y_hist = [layout.scatter_slot(h, v, slot, ok, j)
              for j, (h, v) in enumerate(zip(y_hist, y_hat))]
    at_slot = _slot_mask(slot, st.rho.shape[1]) & ok[:, None]
    rho = jnp.where(at_slot, _numerics.safe_div(1.0, p.sy)[:, None], st.rho)

    return st._replace(
        s_history=s_hist,
        y_history=y_hist,
        rho=rho,
        gamma=(jnp.where(ok, _numerics.safe_div(p.sy, p.yy, 1.0), st.gamma) if update_gamma
               else st.gamma),
        newest=jnp.where(ok, slot, st.newest),
        num_pairs=jnp.where(ok, jnp.minimum(st.num_pairs + 1, st.rho.shape[1]), st.num_pairs),
    )


def _slot_mask(slot, num_slots: int) -> jax.Array:
    """``(B, M)``: True at ``slot[b]`` of every block (elementwise writes, no scatter)."""
    return jnp.arange(num_slots)[None, :] == slot[:, None]


def written_fields(refresh_grad_average: bool) -> tuple[str, ...]:
    """The state fields :func:`form_pair` writes; it only reads the others."""
    return (("s_history", "y_history", "rho", "gamma", "sy_gram", "yy_gram", "ss_gram", "newest",
             "num_pairs", "num_skipped", "mu", "mu_damped", "tau", "avg_weights",
             "params_snapshot", "grads_snapshot")
            + (("grads_avg",) if refresh_grad_average else ()))


def store_gram_rows(layout, st: ScaleByMLBFGSState, rows, slot, ok) -> ScaleByMLBFGSState:
    """Writes the pair's Gram rows and columns (:func:`gram_rows`) at ``slot`` where ``ok``."""
    row_ss, col_sy, row_sy, row_yy = rows
    at_slot = _slot_mask(slot, st.rho.shape[1]) & ok[:, None]

    def set_cross(gram, row, col):  # row ``slot``, then column ``slot``
        new = jnp.where(at_slot[:, :, None], row[:, None, :].astype(gram.dtype), gram)
        return jnp.where(at_slot[:, None, :], col[:, :, None].astype(gram.dtype), new)

    return st._replace(sy_gram=set_cross(st.sy_gram, row_sy, col_sy),
                       yy_gram=set_cross(st.yy_gram, row_yy, row_yy),
                       ss_gram=set_cross(st.ss_gram, row_ss, row_ss))


def form_pair(layout, opts: Options, h: Hyperparams, dt: _state.Dtypes, g, t,
              st: ScaleByMLBFGSState, root_d=None, inv_lr=None) -> ScaleByMLBFGSState:
    """:func:`pair_step`, Gram rows included: the new state."""
    new, stored = pair_step(layout, opts, h, dt, g, t, st, root_d, inv_lr)
    if opts.cache_gram:
        rows, _ = gram_rows(layout, new.s_history, new.y_history, new.newest, None, dt.acc)
        new = store_gram_rows(layout, new, rows, new.newest, stored)
    return new


def pair_step(layout, opts: Options, h: Hyperparams, dt: _state.Dtypes, g, t,
              st: ScaleByMLBFGSState, root_d=None, inv_lr=None, hvp=None) -> tuple:
    r"""One damped, guarded pair per block, then the snapshot (``t``: the call index).

    ``st`` already holds this call's averages; ``g`` is the packed incoming
    update (for the gradient-average refresh). With the metric, ``root_d`` is
    this call's packed :math:`D^{1/2}` and ``inv_lr`` is :math:`1/\eta_t`: the
    pair is whitened (:func:`mlbfgs_optax._metric.whiten_pair`) before the pair
    momentum, the damping and the guard, which then work in the whitened
    coordinates. A pair at round-off level (:func:`above_roundoff`) is rejected,
    and so is every pair before call ``h.pair_warmup`` (None: :math:`1/(1-\beta)`).
    With ``hvp`` (packed :math:`v \mapsto \nabla^2 f\, v` on the caller's batch)
    the pair's :math:`y` is :math:`\nabla^2 f\, s` instead of the change of
    the gradient average (``curvature="hessian_vector"``).
    The Gram rows of a stored pair are left to the caller (:func:`gram_rows`,
    :func:`store_gram_rows`; :func:`form_pair` does both).

    Returns:
      ``(state, stored)``: the new state and, per block, whether the pair was
      stored (in slot ``state.newest``).
    """
    acc = dt.acc
    s_hist = st.s_history
    y_hist = st.y_history
    s, y = candidate(layout, st, opts.bias_correction, acc)
    if hvp is not None:
        y = [x.astype(acc) for x in hvp(s)]
    not_roundoff = True
    if not opts.roundoff_off:
        not_roundoff = above_roundoff(layout, s, st, opts.bias_correction,
                                      h.roundoff_rejection, acc)
    if root_d is not None:
        s, y = _metric.whiten_pair(s, y, root_d, inv_lr)
    if not opts.pair_momentum_off:
        s, y = with_pair_momentum(layout, s, y, s_hist, y_hist, st.newest, st.num_pairs,
                                  h.pair_momentum, acc)
    # The candidate is read by several reductions (damping scale, damping products, the
    # stored pair's products) and by the store: made once, behind a barrier, each pass
    # reads two arrays instead of recomputing the pair from the four averages and the
    # metric's second moment (on XLA:CPU every such reduction was its own slow pass).
    s, y = _xla_hints.hold("pair_candidate", (s, y))
    damped = damp(layout, s, y, h, not opts.yy_bound_off, acc, opts.pair_form == "along_s")
    # The pair as it will be stored, in the history dtype.
    s_st = [x.astype(d) for x, d in zip(s, dt.history)]
    y_st = [x.astype(d) for x, d in zip(damped.y_hat, dt.history)]
    slot = jax.lax.rem(st.newest + 1, jnp.asarray(opts.memory_size, st.newest.dtype))
    prod = products(layout, s_st, y_st, acc)
    warmup = 1.0 / (1.0 - h.beta) if h.pair_warmup is None else h.pair_warmup
    may_store = (t >= h.update_period) & (t >= warmup)  # a snapshot exists, warm-up over
    ok = accept(prod, may_store, h.curvature_eps, acc) & not_roundoff
    new = store(layout, st, s_st, y_st, prod, slot, ok, update_gamma=root_d is None)

    weights = st.avg_weights.at[2:].set(st.avg_weights[:2])  # snapshot weights
    grads_avg = st.grads_avg
    if opts.refresh_grad_average:
        weights = weights.at[1].set(1 - h.beta)
        grads_avg = [
            ((1 - h.beta) * x.astype(acc)).astype(d) for x, d in zip(g, dt.averages)]
    # Diagnostics describe the last candidate whose numbers were finite.
    stats_ok = may_store & prod.finite & jnp.isfinite(damped.mu) & jnp.isfinite(damped.tau)
    keep = lambda new_value, old: jnp.where(stats_ok, new_value, old)
    return new._replace(
        grads_avg=grads_avg,
        avg_weights=weights,
        params_snapshot=st.params_avg,
        grads_snapshot=st.grads_avg,
        num_skipped=st.num_skipped + (may_store & ~ok).astype(jnp.int32),
        mu=keep(damped.mu, st.mu),
        mu_damped=keep(_numerics.safe_div(prod.sy, prod.ss), st.mu_damped),
        tau=keep(damped.tau, st.tau),
    ), ok
