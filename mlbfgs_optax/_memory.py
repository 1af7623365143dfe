"""How much memory an optimizer state holds."""

from __future__ import annotations

from typing import Any

import jax


def state_nbytes(opt_state: Any, *, per_device: bool = False) -> int:
    r"""The bytes held by the arrays of an optimizer state.

    .. math::
      \text{bytes} = \sum_{\text{leaves } x} \text{size}(x)\cdot\text{itemsize}(x)

    Counts every array leaf of ``opt_state``: any optax state (a chain's tuple,
    :class:`~mlbfgs_optax.ScaleByMLBFGSState`, ``optax.adamw``'s, ...), so that
    optimizers can be compared on the same footing. Leaves may be
    :class:`jax.ShapeDtypeStruct`: ``jax.eval_shape(opt.init, params)`` gives
    the bytes a state will take without allocating it. The mL-BFGS defaults
    hold :math:`2M + 6` parameter-sized arrays (the :math:`s` and :math:`y`
    histories, the two averages and their snapshots, the metric's second moment
    and the momentum), plus :math:`O(M^2)` numbers per block.

    Args:
      opt_state: an optimizer state (a pytree of arrays or shape structs).
      per_device: count the bytes stored on the device that holds the most
        (from each array's addressable shards; a replicated array counts on
        every device): what one accelerator must fit. Needs concrete arrays.

    Returns:
      The number of bytes, an ``int``.

    Example:
      >>> import jax, jax.numpy as jnp, mlbfgs_optax
      >>> params = {'w': jnp.zeros((256, 256))}
      >>> state = jax.eval_shape(mlbfgs_optax.mlbfgs(1e-3).init, params)
      >>> round(mlbfgs_optax.state_nbytes(state) / params['w'].size)
      40
    """
    leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")]
    if not per_device:
        return int(sum(x.size * x.dtype.itemsize for x in leaves))
    per_dev: dict = {}
    for x in leaves:
        if not hasattr(x, "addressable_shards"):
            raise TypeError("state_nbytes(per_device=True) needs concrete arrays, got "
                            f"{type(x).__name__}.")
        for shard in x.addressable_shards:
            per_dev[shard.device] = per_dev.get(shard.device, 0) + shard.data.nbytes
    return int(max(per_dev.values(), default=0))


def state_bytes_per_param(opt_state: Any, params: Any) -> float:
    r"""Optimizer-state bytes per parameter: :func:`state_nbytes` / the number of parameters.

    .. math::
      \text{state\_nbytes}(\text{opt\_state}) \,/\, \textstyle\sum_{\text{leaves } p} \text{size}(p)

    The figure to compare with other optimizers: ``optax.adamw`` holds 8
    bytes per float32 parameter, the mL-BFGS defaults :math:`4(2M + 6)` (40
    at the default :math:`M = 2`) plus a few bytes per block.

    Args:
      opt_state: an optimizer state (arrays or :class:`jax.ShapeDtypeStruct`).
      params: the parameters it was initialised with (arrays or shape structs).

    Returns:
      Bytes per parameter, a ``float``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, mlbfgs_optax
      >>> params = {'w': jnp.zeros((256, 256))}
      >>> state = optax.adamw(1e-3).init(params)
      >>> print(f"{mlbfgs_optax.state_bytes_per_param(state, params):.1f}")
      8.0
    """
    num = sum(x.size for x in jax.tree.leaves(params) if hasattr(x, "dtype"))
    if num == 0:
        raise ValueError("state_bytes_per_param needs params with at least one number.")
    return state_nbytes(opt_state) / num
