r"""Damping of a curvature pair, as in mL-BFGS.

For a pair :math:`(s, y)` the Rayleigh quotient :math:`\mu = s^\top y / s^\top s`
is the curvature along :math:`s`. mL-BFGS keeps it inside
:math:`[\sigma_L, \sigma_H]` by mixing :math:`s` into :math:`y`
(Niu et al., 2023, https://arxiv.org/abs/2307.13744):

.. math::
  \phi = \begin{cases}
    (1 - \sigma_L) / (1 - \mu) & \mu < \sigma_L \\
    (\sigma_H - 1) / (\mu - 1) & \mu > \sigma_H \\
    1 & \text{otherwise}
  \end{cases}, \qquad
  \tau = \min(\phi, \tau_0), \qquad \hat y = \tau y + (1 - \tau) s.

Then :math:`s^\top \hat y / s^\top s = \tau \mu + 1 - \tau`, which equals
:math:`\sigma_L` (or :math:`\sigma_H`) whenever :math:`\tau` was not capped by
:math:`\tau_0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlbfgs_optax._numerics import safe_div


def damping_weight(
    mu: jax.Array, sigma_low: float, sigma_high: float, tau_max: float
) -> jax.Array:
    r"""The weight :math:`\tau` on :math:`y` that keeps :math:`\mu` in bounds.

    Args:
      mu: Rayleigh quotients :math:`s^\top y / s^\top s`, any shape.
      sigma_low: :math:`\sigma_L < 1`, or ``-inf`` for no lower bound.
      sigma_high: :math:`\sigma_H > 1`, or ``+inf`` for no upper bound.
      tau_max: :math:`\tau_0 \in (0, 1]`.

    Returns:
      :math:`\tau`, same shape as ``mu``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax import damping_weight
      >>> damping_weight(jnp.array([-1.0, 0.5, 3.0]), 0.01, 1.5, 1.0)
      Array([0.495, 1.   , 0.25 ], dtype=float32)
    """
    one = jnp.ones_like(mu)
    low = mu < sigma_low
    high = mu > sigma_high
    # Double-where: the untaken branches never divide by zero.
    safe_low = jnp.where(low, 1.0 - mu, one)
    safe_high = jnp.where(high, mu - 1.0, one)
    phi = jnp.where(low, (1.0 - sigma_low) / safe_low, one)
    phi = jnp.where(high, (sigma_high - 1.0) / safe_high, phi)
    return jnp.minimum(phi, tau_max)


def along_s_curvature(mu: jax.Array, tau: jax.Array) -> jax.Array:
    r"""The damped pair's curvature along :math:`s`: :math:`\hat\mu = \tau\mu + 1 - \tau`.

    With ``pair_form="along_s"`` the stored pair is :math:`(s, \hat\mu s)`: the
    BFGS update then changes :math:`H` along :math:`s` alone, to
    :math:`1/\hat\mu` there, so every eigenvalue of :math:`H` (with
    :math:`H_0 = I`) stays in :math:`[1/\sigma_H, 1/\sigma_L]`, whatever the
    noise in :math:`y`. A pair whose :math:`\hat y` keeps the part of :math:`y`
    orthogonal to :math:`s` has no such bound: that part maps the component of
    the gradient along :math:`\hat y` onto :math:`s` with the factor
    :math:`\|s\|\|\hat y\| / s^\top\hat y`.

    Args:
      mu: :math:`\mu = s^\top y / s^\top s`.
      tau: the damping weight (:func:`damping_weight`).

    Returns:
      :math:`\hat\mu`, same shape, inside :math:`[\sigma_L, \sigma_H]` when
      :math:`\tau` was not capped by :math:`\tau_0`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax import along_s_curvature, damping_weight
      >>> mu = jnp.array([-1.0, 0.5, 3.0])
      >>> along_s_curvature(mu, damping_weight(mu, 0.1, 1.5, 1.0))
      Array([0.10000002, 0.5       , 1.5       ], dtype=float32)
    """
    return tau * mu + 1.0 - tau


def yy_bound_weight(ss: jax.Array, sy: jax.Array, yy: jax.Array, sigma_yy: float) -> jax.Array:
    r"""The largest :math:`\tau \in [0, 1]` with :math:`\hat y^\top\hat y \le \sigma_{yy}\, s^\top\hat y`.

    With :math:`\hat y = \tau y + (1-\tau) s` the condition is the quadratic
    :math:`A\tau^2 + B\tau + C \le 0`, :math:`A = \|y - s\|^2`,
    :math:`B = (2 - \sigma_{yy})(s^\top y - s^\top s)`,
    :math:`C = (1 - \sigma_{yy})\, s^\top s \le 0`; it holds at
    :math:`\tau = 0` (:math:`\hat y = s`), so the answer is its larger root,
    clipped to :math:`[0, 1]`. Lowering :math:`\tau` only moves
    :math:`s^\top\hat y / s^\top s` towards 1, so the bounds of
    :func:`damping_weight` still hold.

    Args:
      ss: :math:`s^\top s`.
      sy: :math:`s^\top y`.
      yy: :math:`y^\top y`.
      sigma_yy: :math:`\sigma_{yy} \ge 1`.

    Returns:
      :math:`\tau_{yy}`, same shape as ``ss``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax import yy_bound_weight
      >>> # s = e1, y = e1 + 3 e2: y_hat = e1 + 3 tau e2, y_hat^T y_hat = 1 + 9 tau^2
      >>> # and s^T y_hat = 1, so the bound 5 gives tau = 2/3.
      >>> yy_bound_weight(jnp.array(1.0), jnp.array(1.0), jnp.array(10.0), 5.0)
      Array(0.6666667, dtype=float32)
    """
    a = jnp.maximum(yy - 2.0 * sy + ss, 0.0)
    b = (2.0 - sigma_yy) * (sy - ss)
    c = (1.0 - sigma_yy) * ss
    disc = jnp.sqrt(jnp.maximum(b * b - 4.0 * a * c, 0.0))
    # Larger root of a t^2 + b t + c, in the form that avoids cancellation.
    root_neg_b = safe_div(-b + disc, 2.0 * a, 1.0)  # stable when b < 0
    root_pos_b = safe_div(-2.0 * c, b + disc, 1.0)  # stable when b >= 0
    tau = jnp.where(b < 0, root_neg_b, root_pos_b)
    holds_at_one = yy <= sigma_yy * sy
    return jnp.where(holds_at_one, 1.0, jnp.clip(tau, 0.0, 1.0)).astype(jnp.result_type(ss))
