r"""The diagonal metric mL-BFGS runs in: Adam's second moment, whitening, a step bound.

With ``metric="adam"`` the quasi-Newton matrix of every block is built in the
coordinates whitened by Adam's diagonal preconditioner

.. math::
  \nu \leftarrow \beta_2 \nu + (1-\beta_2)\, g \odot g, \qquad
  D = 1 / \big(\sqrt{\nu / (1-\beta_2^k)} + \epsilon\big),

so that :math:`H_0 = D` (the first steps are RMSprop's :math:`D g`) and every
pair corrects that step along its direction (in the spirit of adaQN, Keskar and
Berahas 2016, https://arxiv.org/abs/1511.01169). A pair is stored whitened
with the :math:`D` of the call that forms it,
:math:`\tilde s = D^{-1/2} s / \eta`, :math:`\tilde y = D^{1/2} y`, and the
direction is :math:`d = D^{1/2} \tilde H D^{1/2} g` with
:math:`\tilde H_0 = I`. For a constant :math:`D` this is BFGS with
:math:`H_0 = D` (BFGS is covariant under :math:`\tilde\theta = D^{-1/2}\theta`),
and the spec's damping, guard and Gram-cached two-loop apply unchanged to the
whitened pairs. ``metric="identity"`` is the paper's :math:`D = I`.

Each function is pure, on packed arrays (lists, one array per segment of a
:class:`~mlbfgs_optax.BlockLayout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlbfgs_optax import _numerics


def second_moment(nu: list, g: list, decay, finite, dtypes) -> list:
    r""":math:`\nu \leftarrow \beta_2 \nu + (1-\beta_2)\, g \odot g` where ``finite``.

    Args:
      nu: the packed second moments.
      g: the packed incoming updates.
      decay: :math:`\beta_2`.
      finite: a boolean scalar; where False ``nu`` is returned unchanged.
      dtypes: the dtype to store each packed array in.

    Returns:
      The new packed second moments.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._metric import second_moment
      >>> second_moment([jnp.zeros(2)], [jnp.array([1.0, 2.0])], 0.9, True, [jnp.float32])
      [Array([0.1, 0.4], dtype=float32)]
    """
    out = []
    for a, x, d in zip(nu, g, dtypes):
        # Clamped to the largest finite number of the stored dtype: a finite but
        # huge gradient (|g| > 1.8e19 in float32) must not make nu infinite for
        # ever (D would be 0 and every later step 0).
        big = jnp.finfo(d).max
        acc = jnp.result_type(a.dtype, jnp.float32)
        sq = jnp.minimum(jnp.square(x.astype(acc)), big)
        new = jnp.minimum(decay * a.astype(acc) + (1 - decay) * sq, big)
        out.append(jnp.where(finite, new, a).astype(d))
    return out


def root_diagonal(nu: list, decay, count, eps, acc) -> list:
    r""":math:`D^{1/2}` with :math:`D = 1/(\sqrt{\nu/(1-\beta_2^k)} + \epsilon)`.

    Args:
      nu: the packed second moments.
      decay: :math:`\beta_2`.
      count: :math:`k \ge 1`, the number of updates :math:`\nu` has seen.
      eps: :math:`\epsilon > 0`.
      acc: the accumulation dtype.

    Returns:
      The packed :math:`D^{1/2}`, in ``acc``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._metric import root_diagonal
      >>> root_diagonal([jnp.array([0.04])], 0.0, 1, 0.0, jnp.float32)
      [Array([2.236068], dtype=float32)]
    """
    weight = 1 - jnp.asarray(decay, acc) ** jnp.asarray(count, acc)
    # sqrt(nu) / sqrt(weight), not sqrt(nu / weight): nu may be near the largest
    # finite number (see second_moment).
    inv_root_weight = jnp.where(weight > 0, jax.lax.rsqrt(jnp.where(weight > 0, weight, 1.0)), 1.0)
    return [jax.lax.rsqrt(jnp.sqrt(a.astype(acc)) * inv_root_weight + eps) for a in nu]


def whiten_pair(s: list, y: list, root_d: list, inv_lr) -> tuple[list, list]:
    r"""The pair in whitened direction units: :math:`\tilde s = D^{-1/2} s/\eta`, :math:`\tilde y = D^{1/2} y`.

    Args:
      s: the packed parameter change.
      y: the packed gradient change.
      root_d: the packed :math:`D^{1/2}`.
      inv_lr: :math:`1/\eta` (0 when :math:`\eta = 0`: the pair is then
        rejected by the guard, :math:`s = 0`).

    Returns:
      ``(s_tilde, y_tilde)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._metric import whiten_pair
      >>> whiten_pair([jnp.array([1.0])], [jnp.array([1.0])], [jnp.array([2.0])], 10.0)
      ([Array([5.], dtype=float32)], [Array([2.], dtype=float32)])
    """
    return ([x * inv_lr / r for x, r in zip(s, root_d)],
            [x * r for x, r in zip(y, root_d)])


def bounded(layout, d: list, g: list, bound, acc) -> list:
    r"""``d`` shortened per block so that :math:`\|d_b\| \le \kappa \|g_b\|`.

    In whitened coordinates this is :math:`\|d_b\|_{D^{-1}} \le \kappa \|g_b\|_D`:
    no pair can lengthen a block's step beyond :math:`\kappa` times the
    step of :math:`H_0` (a trust-region-style bound). The norms are taken of
    the vectors divided by a common power of two, so they cannot overflow.

    Args:
      layout: the :class:`~mlbfgs_optax.BlockLayout`.
      d: the packed direction.
      g: the packed (whitened) gradient.
      bound: :math:`\kappa > 0`.
      acc: the accumulation dtype.

    Returns:
      The packed, bounded direction.

    Example:
      >>> import jax.numpy as jnp, mlbfgs_optax
      >>> from mlbfgs_optax._metric import bounded
      >>> layout = mlbfgs_optax.make_layout(jnp.zeros(2), "all")
      >>> pack = lambda v: layout.pack(jnp.array(v))
      >>> d = bounded(layout, pack([30.0, 40.0]), pack([1.0, 0.0]), 3.0, jnp.float32)
      >>> print([round(float(x), 4) for x in layout.unpack(d)])
      [1.8, 2.4]
    """
    bc = layout.broadcast
    c = jnp.maximum(layout.block_max_abs(d, acc), layout.block_max_abs(g, acc))
    c = 1.0 / _numerics.power_of_two_near(c)
    dd = layout.block_dot(*([[x * bc(c, j, x.ndim) for j, x in enumerate(d)]] * 2), acc)
    gg = layout.block_dot(*([[x * bc(c, j, x.ndim) for j, x in enumerate(g)]] * 2), acc)
    ratio = jnp.sqrt(_numerics.safe_div(gg, dd, 1.0))
    scale = jnp.where(jnp.isfinite(ratio), jnp.minimum(1.0, bound * ratio), 1.0)
    return [x * bc(scale, j, x.ndim) for j, x in enumerate(d)]
