r"""The L-BFGS two-loop recursion over stacked (s, ŷ) histories, per block.

Given stored curvature pairs :math:`(s_i, \hat y_i)` with
:math:`\rho_i = 1 / s_i^\top \hat y_i` and an initial inverse Hessian
:math:`H_0 = \gamma I`, the recursion computes :math:`d = H g` for

.. math::
  H \leftarrow (I - \rho_i s_i \hat y_i^\top) H (I - \rho_i \hat y_i s_i^\top)
  + \rho_i s_i s_i^\top, \qquad i = \text{oldest} \ldots \text{newest},

without ever forming :math:`H` (Nocedal & Wright, *Numerical Optimization*,
Algorithm 7.4). The history is a ring buffer: every block ``b`` keeps its
``M`` pairs stacked on a leading axis and remembers the slot of its newest
pair; an empty slot has :math:`\rho = 0` and is a no-op, so a block with no
pair returns :math:`\gamma g`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mlbfgs_optax import _layout
from mlbfgs_optax._numerics import accumulation_dtype, power_of_two_near


def _rescaled(layout, updates, acc):
    """``g_b / c_b`` with ``c_b`` the power of two nearest ``max|g_b|``, and ``c``.

    H g is linear in g: running the recursion on the rescaled vector and
    multiplying back by ``c`` (exact: a power of two) keeps every dot product
    finite for huge but finite gradients.
    """
    scale = power_of_two_near(layout.block_max_abs(updates, acc))
    inv = 1.0 / scale
    return [u.astype(acc) * layout.broadcast(inv, j, u.ndim) for j, u in enumerate(updates)], scale


def blockwise_two_loop(
    layout: _layout.BlockLayout,
    updates: list[jax.Array],
    s_history: list[jax.Array],
    y_history: list[jax.Array],
    rho: jax.Array,
    gamma: jax.Array,
    newest: jax.Array,
) -> list[jax.Array]:
    r"""Computes :math:`d_b = H_b g_b` for every block ``b`` of a packed tree.

    Args:
      layout: the static block layout of the packed arrays.
      updates: packed vector :math:`g`, one array per segment of ``layout``.
      s_history: packed :math:`s` history, each array unit-major, ``(U, M, ...)``.
      y_history: packed :math:`\hat y` history, same shapes as ``s_history``.
      rho: :math:`\rho` per block and slot, shape ``(B, M)``; 0 marks an empty
        slot.
      gamma: :math:`\gamma` per block, shape ``(B,)``.
      newest: ring-buffer slot of every block's newest pair, shape ``(B,)``.

    Returns:
      The packed direction, in the accumulation dtype (at least float32).
    """
    num_slots = rho.shape[-1]
    acc = accumulation_dtype(rho.dtype, *(u.dtype for u in updates))
    block_index = jnp.arange(layout.num_blocks)
    q0, scale = _rescaled(layout, updates, acc)

    def pair_at(i):
        slots = (newest - i) % num_slots
        s = [layout.gather_slot(h, slots, j) for j, h in enumerate(s_history)]
        y = [layout.gather_slot(h, slots, j) for j, h in enumerate(y_history)]
        return s, y, rho[block_index, slots].astype(acc)

    def axpy(q, coef, v):
        return [
            x + layout.broadcast(coef, j, x.ndim) * vj.astype(acc)
            for j, (x, vj) in enumerate(zip(q, v))
        ]

    # First loop, newest -> oldest: alpha_i = rho_i s_i^T q ; q -= alpha_i y_i.
    def first(q, i):
        s, y, r = pair_at(i)
        alpha = r * layout.block_dot(s, q, acc)
        return axpy(q, -alpha, y), alpha

    q, alphas = jax.lax.scan(first, q0, jnp.arange(num_slots))
    # Initial inverse Hessian H0 = gamma I.
    g = gamma.astype(acc)
    q = [x * layout.broadcast(g, j, x.ndim) for j, x in enumerate(q)]

    # Second loop, oldest -> newest: b_i = rho_i y_i^T q ; q += (alpha_i - b_i) s_i.
    def second(q, xs):
        i, alpha = xs
        s, y, r = pair_at(i)
        beta = r * layout.block_dot(y, q, acc)
        return axpy(q, alpha - beta, s), None

    q, _ = jax.lax.scan(second, q, (jnp.arange(num_slots), alphas), reverse=True)
    return [x * layout.broadcast(scale, j, x.ndim) for j, x in enumerate(q)]


def two_loop_recursion(
    updates: Any,
    s_history: Any,
    y_history: Any,
    rho: jax.Array,
    gamma: jax.Array,
    newest: jax.Array,
) -> Any:
    r"""Applies the L-BFGS inverse Hessian of one block to a pytree.

    .. math::
      d = H g, \qquad H_0 = \gamma I, \qquad
      H \leftarrow V_i^\top H V_i + \rho_i s_i s_i^\top, \quad
      V_i = I - \rho_i \hat y_i s_i^\top,

    with the pairs applied oldest to newest. The recursion runs as two
    ``jax.lax.scan`` over the ``M`` ring-buffer slots; slots with
    :math:`\rho_i = 0` are skipped.

    Args:
      updates: the vector :math:`g`, any pytree of arrays.
      s_history: pytree like ``updates`` whose leaves have a leading axis of
        size ``M``: the :math:`s` vectors.
      y_history: same for the :math:`\hat y` vectors.
      rho: shape ``(M,)``, :math:`1 / s_i^\top \hat y_i`; 0 for empty slots.
      gamma: scalar :math:`\gamma`.
      newest: scalar int, slot of the newest pair (the slot before it holds
        the next newest, cyclically).

    Returns:
      :math:`H g`, a pytree like ``updates`` with its dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax import two_loop_recursion
      >>> s = jnp.array([[1.0, 0.0]])          # one pair, M = 1
      >>> y = jnp.array([[2.0, 0.0]])          # curvature 2 along e_1
      >>> two_loop_recursion(jnp.array([1.0, 1.0]), s, y, jnp.array([0.5]),
      ...                    jnp.array(0.5), jnp.array(0))
      Array([0.5, 0.5], dtype=float32)

    References:
      Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 7.4.
    """
    layout = _layout.make_layout(updates, "all")
    d = blockwise_two_loop(
        layout,
        layout.pack(updates),
        layout.pack_history(s_history),
        layout.pack_history(y_history),
        jnp.asarray(rho)[None],
        jnp.asarray(gamma).reshape(1),
        jnp.asarray(newest, jnp.int32).reshape(1),
    )
    return layout.unpack(d)


def blockwise_two_loop_gram(
    layout: _layout.BlockLayout,
    updates: list[jax.Array],
    s_history: list[jax.Array],
    y_history: list[jax.Array],
    rho: jax.Array,
    gamma: jax.Array,
    newest: jax.Array,
    sy_gram: jax.Array,
    yy_gram: jax.Array,
) -> list[jax.Array]:
    r"""The two-loop recursion of :func:`blockwise_two_loop`, from cached inner products.

    The scalars of the recursion only need :math:`S^\top g`, :math:`Y^\top g`
    and the Gram matrices :math:`C_{pq} = s_p^\top \hat y_q`,
    :math:`D_{pq} = \hat y_p^\top \hat y_q` (kept in the optimizer state and
    updated when a pair is stored):

    .. math::
      \alpha_i &= \rho_i \big(s_i^\top g - \textstyle\sum_{k \text{ newer}} \alpha_k C_{ik}\big),
      \\
      \beta_i &= \rho_i \big(\gamma (\hat y_i^\top g - \textstyle\sum_k \alpha_k D_{ik})
      + \textstyle\sum_{k \text{ older}} (\alpha_k - \beta_k) C_{ki}\big), \\
      d &= \gamma g - \gamma \textstyle\sum_k \alpha_k \hat y_k
      + \textstyle\sum_k (\alpha_k - \beta_k) s_k ,

    the same :math:`\alpha, \beta` and :math:`d` as the two loops, but the
    history is read twice in two streaming passes (:math:`4Mn` numbers)
    instead of :math:`2M` dependent vector passes. The :math:`O(M)` scalar
    recursions run as ``jax.lax.scan`` over the ring buffer's age order.

    Args:
      layout: the static block layout of the packed arrays.
      updates: packed :math:`g`.
      s_history: packed :math:`s` history (unit-major, ``(U, M, ...)``).
      y_history: packed :math:`\hat y` history.
      rho: ``(B, M)``, 0 for empty slots.
      gamma: ``(B,)``.
      newest: ``(B,)`` slot of the newest pair.
      sy_gram: ``(B, M, M)``, :math:`s_p^\top \hat y_q` by slot.
      yy_gram: ``(B, M, M)``, :math:`\hat y_p^\top \hat y_q` by slot.

    Returns:
      The packed direction, in the accumulation dtype.
    """
    acc = accumulation_dtype(rho.dtype, *(u.dtype for u in updates))
    g, scale = _rescaled(layout, updates, acc)
    # One streaming pass over each history: S^T g and Y^T g for every slot.
    sg = layout.block_dot_history(s_history, g, acc)
    yg = layout.block_dot_history(y_history, g, acc)
    coef_s, coef_y = gram_coefficients(sg, yg, rho, gamma, newest, sy_gram, yy_gram, acc)
    gam = gamma.astype(acc)
    # One more streaming pass over each history.
    ds = layout.combine_history(coef_s, s_history, acc)
    dy = layout.combine_history(coef_y, y_history, acc)
    return [
        (layout.broadcast(gam, j, x.ndim) * x + a + b) * layout.broadcast(scale, j, x.ndim)
        for j, (x, a, b) in enumerate(zip(g, ds, dy))
    ]


def gram_coefficients(sg, yg, rho, gamma, newest, sy_gram, yy_gram, acc):
    r"""The two-loop recursion's direction as :math:`d = \gamma g + S c_s + Y c_y`, per block.

    From the inner products alone (:func:`blockwise_two_loop_gram` gives the
    formulas): :math:`c_s = \alpha - \beta` and :math:`c_y = -\gamma\alpha`, by
    slot. The :math:`O(M)` scalar recursions run as ``jax.lax.scan`` over the
    ring buffer's age order (age 0: the newest pair).

    Args:
      sg: ``(B, M)``, :math:`s_m^\top g` by slot.
      yg: ``(B, M)``, :math:`\hat y_m^\top g` by slot.
      rho: ``(B, M)``, 0 for empty slots.
      gamma: ``(B,)``.
      newest: ``(B,)`` slot of the newest pair.
      sy_gram: ``(B, M, M)``, :math:`s_p^\top \hat y_q` by slot.
      yy_gram: ``(B, M, M)``, :math:`\hat y_p^\top \hat y_q` by slot.
      acc: the accumulation dtype.

    Returns:
      ``(coef_s, coef_y)``, each ``(B, M)`` in slot order (0 for empty slots).
    """
    num_slots = rho.shape[-1]
    sg, yg, r = sg.astype(acc), yg.astype(acc), rho.astype(acc)
    c_mat, d_mat = sy_gram.astype(acc), yy_gram.astype(acc)
    slot_ids = jnp.arange(num_slots, dtype=newest.dtype)
    zeros = jnp.zeros_like(rho, dtype=acc)  # inherits a shard_map varying type

    # Everything stays in slot order; step ``a`` of a scan visits the pair of age
    # ``a`` (age 0: the newest) through a one-hot mask over the slots, (B, M). The
    # masked sums add exact zeros, so the recursion is the two loops' own.
    def one_hot(age):
        slot = jax.lax.rem(newest + (num_slots - age).astype(newest.dtype),
                           jnp.asarray(num_slots, newest.dtype))
        return slot[:, None] == slot_ids[None, :]

    pick = lambda mask, x: jnp.sum(jnp.where(mask, x, 0.0), axis=1)

    def first(alpha, age):  # newest -> oldest; alpha is 0 at the older pairs
        hot = one_hot(age)
        c_row = pick(hot[:, :, None], c_mat)  # C[b, i, :]
        a_i = pick(hot, r) * (pick(hot, sg) - jnp.sum(alpha * c_row, axis=1))
        return jnp.where(hot, a_i[:, None], alpha), None

    ages = jnp.arange(num_slots)
    alpha, _ = jax.lax.scan(first, zeros, ages)
    gam = gamma.astype(acc)
    yq = yg - jnp.einsum("bik,bk->bi", d_mat, alpha)

    def second(c, age):  # oldest -> newest; c_k = alpha_k - beta_k, 0 at the newer pairs
        hot = one_hot(age)
        c_col = jnp.sum(jnp.where(hot[:, None, :], c_mat, 0.0), axis=2)  # C[b, :, i]
        beta_i = pick(hot, r) * (gam * pick(hot, yq) + jnp.sum(c * c_col, axis=1))
        return jnp.where(hot, (pick(hot, alpha) - beta_i)[:, None], c), None

    c, _ = jax.lax.scan(second, zeros, ages, reverse=True)
    return c, -gam[:, None] * alpha
