"""The state of :func:`~mlbfgs_optax.scale_by_mlbfgs`."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlbfgs_optax import _numerics


class ScaleByMLBFGSState(NamedTuple):
    r"""State of :func:`scale_by_mlbfgs`.

    Parameter-shaped fields are *packed* by the block layout (``layout``): a
    list with one array per bucket of :class:`~mlbfgs_optax.BlockLayout`
    (for ``"leaf"``, ``"all"`` and label blocks, by default the 8 largest
    leaves of 65,536 or more numbers each in a ``(1, *shape)`` array of its own,
    every other leaf of one dtype raveled into one ``(rows, row_length)`` array,
    and the leaves that a mesh axis splits stacked by shape, ``(k, *shape)``,
    with their sharding: the ``packing`` argument; :class:`~mlbfgs_optax.EqualSlices` gives one
    ``(num_blocks, block_size)`` array). ``state.unpacked(name)`` turns such a field back into a
    params-shaped pytree (with a leading memory axis for a
    history). ``B`` is the number of blocks and ``M`` the memory size.

    Attributes:
      count: :math:`t`, the number of updates so far (int32 scalar).
      params_avg: :math:`M^\theta`, EMA of the parameters,
        :math:`M^\theta \leftarrow \beta M^\theta + (1-\beta)\theta_t`.
      grads_avg: :math:`M^g`, EMA of the incoming updates (gradients).
      params_snapshot: :math:`M^\theta` at the last pair step.
      grads_snapshot: :math:`M^g` at the last pair step.
      s_history: ring buffers of :math:`s_k`, unit-major: ``(U, M, ...)`` for
        a packed array ``(U, ...)``, so that every product with the history
        reads it once, in place.
      y_history: ring buffers of the damped :math:`\hat y_k`, like ``s_history``.
      rho: :math:`\rho_k = 1 / s_k^\top \hat y_k` per block and slot,
        ``(B, M)``; 0 marks an empty slot.
      gamma: :math:`\gamma = s^\top \hat y / \hat y^\top \hat y` of every
        block's newest pair (:math:`H_0 = \gamma I`), ``(B,)``; 1 before the
        first pair.
      newest: ring-buffer slot of every block's newest pair, ``(B,)`` int32.
      num_pairs: number of stored pairs per block, ``(B,)`` int32, at most ``M``.
      num_skipped: pairs rejected by the curvature guard per block, ``(B,)``.
      mu: :math:`s^\top y / s^\top s` of the last candidate pair before
        damping, ``(B,)`` (diagnostics).
      mu_damped: :math:`s^\top \hat y / s^\top s` after damping, ``(B,)``.
      tau: the damping weight :math:`\tau` of the last candidate pair, ``(B,)``.
      sy_gram: :math:`s_p^\top \hat y_q` for every pair of ring-buffer slots,
        ``(B, M, M)``: with ``yy_gram`` it lets the two-loop recursion read the
        history in two streaming passes
        (``cache_gram``); ``(B, 0, 0)`` with ``cache_gram=False``.
      yy_gram: :math:`\hat y_p^\top \hat y_q`, ``(B, M, M)`` (or ``(B, 0, 0)``).
      ss_gram: :math:`s_p^\top s_q`, ``(B, M, M)`` (or ``(B, 0, 0)``): with the
        other two it gives the norm of the direction without a pass over it
        (the step bound).
      avg_weights: total EMA weight :math:`1 - \beta^k` held by ``params_avg``,
        ``grads_avg``, ``params_snapshot`` and ``grads_snapshot``, shape
        ``(4,)``; with ``bias_correction`` the pairs are formed from the
        averages divided by these weights.
      nu: :math:`\nu`, EMA of the squared incoming updates,
        :math:`\nu \leftarrow \beta_2 \nu + (1-\beta_2) g \odot g`, packed like
        ``params_avg``; the metric :math:`D = 1/(\sqrt{\hat\nu} + \epsilon)`
        (``metric="adam"``). None with ``metric="identity"``.
      layout: the :class:`~mlbfgs_optax.BlockLayout` of the packed fields
        (static data: a pytree node without leaves).
    """

    count: jax.Array
    params_avg: Any
    grads_avg: Any
    params_snapshot: Any
    grads_snapshot: Any
    s_history: Any
    y_history: Any
    rho: jax.Array
    gamma: jax.Array
    newest: jax.Array
    num_pairs: jax.Array
    num_skipped: jax.Array
    mu: jax.Array
    mu_damped: jax.Array
    tau: jax.Array
    sy_gram: jax.Array
    yy_gram: jax.Array
    ss_gram: jax.Array
    avg_weights: jax.Array
    nu: Any
    direction_avg: Any
    layout: Any

    def unpacked(self, name: str) -> Any:
        """The packed field ``name`` as a params-shaped pytree, in the field's dtypes.

        A history has a leading memory axis ``M`` on every leaf. For a state
        whose blocks are shared over devices, this device's rows only.

        Example:
          >>> import jax, jax.numpy as jnp, mlbfgs_optax
          >>> tx = mlbfgs_optax.scale_by_mlbfgs(memory_size=3)
          >>> state = tx.init({'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)})
          >>> jax.tree.map(jnp.shape, state.unpacked('s_history'))
          {'b': (3, 3), 'w': (3, 2, 3)}
        """
        packed = getattr(self, name)
        dtype_of = {i: x.dtype for b, x in zip(self.layout.buckets, packed) for i in b.leaves}
        dtypes = [dtype_of[i] for i in range(len(self.layout.shapes))]
        if FIELDS[name] is Kind.HISTORY:
            return self.layout.unpack_history(packed, dtypes=dtypes)
        return self.layout.unpack(packed, dtypes=dtypes)


class Kind(enum.Enum):
    """How a state field is laid out; the one table below says it per field."""

    SCALAR = "scalar"  # one value for the whole optimizer (replicated)
    PARAMS = "params"  # mirrors the params, packed by the block layout
    HISTORY = "history"  # mirrors the params, unit-major: (U, M, ...) per packed array
    BLOCK = "block"  # a leading block axis (B, ...)
    LAYOUT = "layout"  # static data, no arrays


#: Every field of :class:`ScaleByMLBFGSState`, in order, with its :class:`Kind`.
#: ``zeros_state``, the partition specs and the structure checks all read it.
FIELDS: dict[str, Kind] = {
    "count": Kind.SCALAR,
    "params_avg": Kind.PARAMS,
    "grads_avg": Kind.PARAMS,
    "params_snapshot": Kind.PARAMS,
    "grads_snapshot": Kind.PARAMS,
    "s_history": Kind.HISTORY,
    "y_history": Kind.HISTORY,
    "rho": Kind.BLOCK,
    "gamma": Kind.BLOCK,
    "newest": Kind.BLOCK,
    "num_pairs": Kind.BLOCK,
    "num_skipped": Kind.BLOCK,
    "mu": Kind.BLOCK,
    "mu_damped": Kind.BLOCK,
    "tau": Kind.BLOCK,
    "sy_gram": Kind.BLOCK,
    "yy_gram": Kind.BLOCK,
    "ss_gram": Kind.BLOCK,
    "avg_weights": Kind.SCALAR,
    "nu": Kind.PARAMS,
    "direction_avg": Kind.PARAMS,
    "layout": Kind.LAYOUT,
}
assert tuple(FIELDS) == ScaleByMLBFGSState._fields


def fields_of(kind: Kind) -> tuple[str, ...]:
    """The names of the fields of one :class:`Kind`, in state order."""
    return tuple(name for name, k in FIELDS.items() if k is kind)


class Dtypes(NamedTuple):
    """The dtypes of a state, per packed array.

    Attributes:
      averages: dtype of every packed average and snapshot array.
      history: dtype of every packed history array.
      acc: the accumulation dtype of dot products and per-block scalars.
    """

    averages: tuple
    history: tuple
    acc: Any


def dtypes(layout, history_dtype=None, averages_dtype=None) -> Dtypes:
    """The state's dtypes for ``layout``: the parameter dtype promoted to >= float32 by default."""
    packed = [d for _, d in layout.packed_shapes()]
    return Dtypes(
        averages=tuple(averages_dtype or _numerics.accumulation_dtype(d) for d in packed),
        history=tuple(history_dtype or _numerics.accumulation_dtype(d) for d in packed),
        acc=_numerics.accumulation_dtype(*packed),
    )


def zeros_state(layout, memory_size: int, cache_gram: bool, dt: Dtypes,
                zeros=None, metric: bool = False,
                momentum: bool = False) -> ScaleByMLBFGSState:
    """The initial state of the blocks of ``layout`` (all arrays distinct buffers).

    ``zeros(j, shape, dtype)`` creates packed array ``j`` of a params-shaped or
    history field (a history's ``shape`` has the memory axis ``M`` second); the default
    is ``jnp.zeros``. Placements pass one that follows the params' sharding.
    ``metric``: hold the metric's second moment ``nu`` (else None);
    ``momentum``: hold the direction's EMA ``direction_avg`` (else None).
    """
    packed = [s for s, _ in layout.packed_shapes()]
    b, m = layout.num_blocks, memory_size
    gram = (b, m, m) if cache_gram else (b, 0, 0)
    zeros = zeros or (lambda j, shape, dtype: jnp.zeros(shape, dtype))

    def params(dts, memory=None):
        # A history is unit-major, (U, M, ...): every unit's M vectors side by side.
        shape = (lambda s: s) if memory is None else (lambda s: s[:1] + (memory,) + s[1:])
        return [zeros(j, shape(s), d) for j, (s, d) in enumerate(zip(packed, dts))]

    return ScaleByMLBFGSState(
        count=jnp.zeros([], jnp.int32),
        params_avg=params(dt.averages),
        grads_avg=params(dt.averages),
        params_snapshot=params(dt.averages),
        grads_snapshot=params(dt.averages),
        s_history=params(dt.history, m),
        y_history=params(dt.history, m),
        rho=jnp.zeros((b, m), dt.acc),
        gamma=jnp.ones((b,), dt.acc),
        newest=jnp.full((b,), m - 1, jnp.int32),
        num_pairs=jnp.zeros((b,), jnp.int32),
        num_skipped=jnp.zeros((b,), jnp.int32),
        mu=jnp.zeros((b,), dt.acc),
        mu_damped=jnp.zeros((b,), dt.acc),
        tau=jnp.ones((b,), dt.acc),
        sy_gram=jnp.zeros(gram, dt.acc),
        yy_gram=jnp.zeros(gram, dt.acc),
        ss_gram=jnp.zeros(gram, dt.acc),
        avg_weights=jnp.zeros((4,), dt.acc),
        nu=params(dt.averages) if metric else None,
        direction_avg=params(dt.averages) if momentum else None,
        layout=layout,
    )


def is_sliced(state: ScaleByMLBFGSState) -> bool:
    """Whether ``state`` belongs to an :class:`~mlbfgs_optax.EqualSlices` layout with >1 block.

    ``EqualSlices(1)`` has a single block, which no device axis of size > 1 can
    split, so it is treated like the other layouts.
    """
    return state.layout.slice_size is not None and state.layout.num_blocks > 1
