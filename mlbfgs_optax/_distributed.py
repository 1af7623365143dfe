"""Placing mL-BFGS state across devices: partition specs and resharding.

With :class:`~mlbfgs_optax.EqualSlices` blocks the packed arrays have a leading
block axis (``(K, n_b)``, history ``(M, K, n_b)``, per-block scalars ``(K,)``).
Sharding that axis over a device axis gives every device ``K / N`` whole
blocks: it stores only their averages, snapshots and history, and runs their
two-loop recursions without any cross-device reduction. The direction is then
assembled by one all-gather (or by none, when the consumer keeps it sharded).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from mlbfgs_optax._state import ScaleByMLBFGSState

_ROW_FIELDS = ("params_avg", "grads_avg", "params_snapshot", "grads_snapshot")
_HISTORY_FIELDS = ("s_history", "y_history")
_BLOCK_FIELDS = ("rho", "gamma", "newest", "num_pairs", "num_skipped", "mu", "mu_damped", "tau",
                 "sy_gram", "yy_gram")


def state_specs(state: ScaleByMLBFGSState, axis_name: str | None) -> ScaleByMLBFGSState:
    """PartitionSpecs of a :class:`ScaleByMLBFGSState`, block axis on ``axis_name``.

    Only states of :class:`~mlbfgs_optax.EqualSlices` layouts have a block axis;
    for the other layouts (and ``axis_name=None``) every field is replicated.
    """
    replicated = jax.tree.map(lambda _: PartitionSpec(), state)
    sliced = isinstance(state.params_avg, list) and len(state.params_avg) == 1
    if axis_name is None or not sliced:
        return replicated
    rows = PartitionSpec(axis_name)
    fields = {f: [rows] for f in _ROW_FIELDS}
    fields.update({f: [PartitionSpec(None, axis_name)] for f in _HISTORY_FIELDS})
    fields.update({f: rows for f in _BLOCK_FIELDS})
    return replicated._replace(**fields)


def state_partition_specs(opt_state: Any, axis_name: str | None) -> Any:
    """PartitionSpecs for a whole optax state: mL-BFGS block axes on ``axis_name``.

    Every :class:`ScaleByMLBFGSState` inside ``opt_state`` (e.g. the state of
    :func:`~mlbfgs_optax.mlbfgs`) gets :func:`state_specs`; every other leaf
    is replicated. Use it as ``in_specs``/``out_specs`` of :func:`jax.shard_map`
    or to build ``NamedSharding`` for ``jax.device_put``/``out_shardings``.

    Args:
      opt_state: an optax state, or its ``jax.eval_shape``.
      axis_name: the mesh axis that shards the blocks.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``opt_state``.

    Example:
      >>> import jax, jax.numpy as jnp, mlbfgs_optax
      >>> opt = mlbfgs_optax.mlbfgs(0.1, blocks=mlbfgs_optax.EqualSlices(8))
      >>> specs = mlbfgs_optax.state_partition_specs(
      ...     jax.eval_shape(opt.init, jnp.zeros(64)), "data")
      >>> specs[0].s_history == [jax.sharding.PartitionSpec(None, "data")]
      True
    """
    is_state = lambda x: isinstance(x, ScaleByMLBFGSState)

    def spec(x):
        return state_specs(x, axis_name) if is_state(x) else PartitionSpec()

    return jax.tree.map(spec, opt_state, is_leaf=is_state)


def _explicit(mesh, axis_name=None) -> bool:
    names = mesh.axis_names if axis_name is None else (axis_name,)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return any(types[n] == jax.sharding.AxisType.Explicit for n in names)


def constrain(tree: Any, specs: Any, mesh) -> Any:
    """``tree`` laid out as ``specs`` on ``mesh`` (free when it already is).

    Explicit axes need ``jax.sharding.reshard``; Auto axes take a sharding
    constraint.
    """
    to = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    if _explicit(mesh):
        return jax.sharding.reshard(tree, to)
    return jax.lax.with_sharding_constraint(tree, to)


def replicate(x: jax.Array, mesh) -> jax.Array:
    """``x`` replicated over ``mesh`` (an all-gather when it was sharded)."""
    return constrain(x, PartitionSpec(), mesh)
