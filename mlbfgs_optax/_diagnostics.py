"""Reading per-block curvature statistics out of an optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mlbfgs_optax import _layout
from mlbfgs_optax._state import ScaleByMLBFGSState


def find_mlbfgs_state(opt_state: Any) -> ScaleByMLBFGSState:
    """The (single) :class:`ScaleByMLBFGSState` inside a chained optax state.

    Raises:
      ValueError: when there is none, or more than one.

    Example:
      >>> import jax.numpy as jnp, mlbfgs_optax
      >>> opt = mlbfgs_optax.mlbfgs(0.1, momentum=0.9)
      >>> state = opt.init({'w': jnp.ones(3)})
      >>> mlbfgs_optax.find_mlbfgs_state(state).num_pairs
      Array([0], dtype=int32)
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByMLBFGSState))
        if isinstance(s, ScaleByMLBFGSState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByMLBFGSState in opt_state, found {len(found)}.")
    return found[0]


def curvature_stats(opt_state: Any, params: Any = None, blocks: Any = "leaf") -> dict:
    r"""Per-block curvature statistics of an mL-BFGS state, as host NumPy arrays.

    For the newest candidate pair of every block: the Rayleigh quotient
    :math:`\mu = s^\top y / s^\top s` before damping, :math:`s^\top\hat y /
    s^\top s` after it, the damping weight :math:`\tau`; and :math:`\gamma`,
    the number of stored pairs and of pairs the guard rejected so far.

    Args:
      opt_state: a :class:`ScaleByMLBFGSState` or any optax state holding one
        (e.g. the state of :func:`~mlbfgs_optax.mlbfgs`).
      params: optional params, with ``blocks``, to name the blocks.
      blocks: the ``blocks`` argument the optimizer was built with.

    Returns:
      A dict with keys ``step``, ``names``, ``mu``, ``mu_damped``, ``tau``,
      ``gamma``, ``num_pairs``, ``num_skipped`` (arrays of length ``B``).

    Example:
      >>> import jax.numpy as jnp, mlbfgs_optax
      >>> opt = mlbfgs_optax.mlbfgs(0.1)
      >>> params = {'w': jnp.ones(3), 'b': jnp.zeros(1)}
      >>> stats = mlbfgs_optax.curvature_stats(opt.init(params), params)
      >>> stats['names'], stats['num_pairs']
      (["['b']", "['w']"], array([0, 0], dtype=int32))
    """
    st = find_mlbfgs_state(opt_state)
    b = int(st.gamma.shape[0])
    if params is not None:
        names = list(_layout.make_layout(params, blocks).block_names)
    else:
        names = [f"block{i}" for i in range(b)]
    get = lambda x: np.asarray(jax.device_get(x))
    return {
        "step": int(get(st.count)),
        "names": names,
        "mu": get(st.mu),
        "mu_damped": get(st.mu_damped),
        "tau": get(st.tau),
        "gamma": get(st.gamma),
        "num_pairs": get(st.num_pairs),
        "num_skipped": get(st.num_skipped),
    }
