r"""The paper's algorithm and the authors' training recipe, reproducible exactly.

The library's defaults extend mL-BFGS (Adam's diagonal metric, a step bound,
round-off rejection, bias correction, the ``sigma_yy`` bound); the two names
here switch every extension off (Niu et al., 2023,
https://arxiv.org/abs/2307.13744; the authors' code is GitHub
yuehniu/mL-BFGS, ``opt/slimblock.py``).
"""

from __future__ import annotations

import math
import types
from typing import Any

import optax

from mlbfgs_optax import _layout
from mlbfgs_optax import _mlbfgs

#: The keyword arguments of :func:`~mlbfgs_optax.scale_by_mlbfgs` that switch
#: every extension of the library off, so that
#: ``scale_by_mlbfgs(**paper_defaults, update_period=..., ...)``
#: is the spec's algorithm: :math:`H_0 = \gamma I`, pairs in parameter units,
#: no bias correction, no step bound, no round-off rejection, no pair warm-up, damping of the
#: curvature along :math:`s` only; :math:`\sigma_L, \sigma_H = 0.5, 1.5` (the
#: library's earlier defaults for this algorithm; the authors use 0.01, 1.5); the paper's
#: history of :math:`M = 10` pairs (the library's default is shorter). A read-only
#: mapping: to change one of its values, merge, e.g.
#: ``scale_by_mlbfgs(**{**paper_defaults, "memory_size": 5})``.
paper_defaults = types.MappingProxyType({
    "memory_size": 10,
    "metric": "identity",
    "step_bound": None,
    "roundoff_rejection": None,
    "bias_correction": False,
    "sigma_yy": math.inf,
    "pair_form": "full",
    "sigma_low": 0.5,
    "sigma_high": 1.5,
    "pair_warmup": 0,
})


def authors_recipe(
    learning_rate: optax.ScalarOrSchedule,
    blocks: _layout.BlockSpec = "leaf",
    weight_decay: float = 2e-4,
    momentum: float = 0.9,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""The optimizer of the authors' training scripts (L2 decay, mL-BFGS, heavy ball).

    .. math::
      g_t &\leftarrow g_t + \lambda \theta_t, \qquad
      d_t = H_t\, g_t \ \text{(the paper's mL-BFGS, normalised)}, \\
      b_t &= \mu\, b_{t-1} + d_t, \qquad \theta_{t+1} = \theta_t - \eta_t\, b_t,

    with :data:`paper_defaults` and the authors' settings ``beta=0.999,
    update_period=50, memory_size=10, sigma_low=0.01, sigma_high=1.5,
    tau_max=0.99, pair_momentum=0.9, refresh_grad_average=True,
    normalize=True``. They train ResNets with a cosine schedule from 0.1 and
    one block per ResNet stage (pass labels as ``blocks``).

    Args:
      learning_rate: :math:`\eta_t`, a float or an optax schedule.
      blocks: the block spec of :func:`~mlbfgs_optax.scale_by_mlbfgs`.
      weight_decay: :math:`\lambda`, L2 decay added to the gradient.
      momentum: :math:`\mu`, heavy-ball momentum on the direction.
      **kwargs: arguments of :func:`~mlbfgs_optax.scale_by_mlbfgs` that
        replace the recipe's (e.g. ``memory_size``, ``axis_name``, ``mesh``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs
      ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, mlbfgs_optax
      >>> f = lambda p: jnp.sum((p['w'] - 3.0) ** 2)
      >>> opt = mlbfgs_optax.authors_recipe(0.1, update_period=5, beta=0.9)
      >>> params = {'w': jnp.zeros(3)}
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...   updates, state = opt.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(bool(f(params) < 1e-2))
      True

    References:
      Niu et al., `mL-BFGS: A Momentum-based L-BFGS for Distributed
      Large-scale Neural Network Optimization
      <https://arxiv.org/abs/2307.13744>`_, TMLR 2023.
    """
    settings = dict(paper_defaults, beta=0.999, update_period=50, memory_size=10,
                    sigma_low=0.01, sigma_high=1.5, tau_max=0.99, pair_momentum=0.9,
                    refresh_grad_average=True, normalize=True, blocks=blocks)
    settings.update(kwargs)
    parts = [_mlbfgs._with_weight_decay(_mlbfgs.scale_by_mlbfgs(**settings), weight_decay, None)]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
