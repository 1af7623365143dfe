r"""The direction in two streaming passes over the history, from cached Gram matrices.

With the inner products of the stored pairs cached in the state
(:math:`S^\top \hat Y`, :math:`\hat Y^\top \hat Y`, :math:`S^\top S`), the
direction of every block,

.. math::
  \tilde d_b = \kappa_b\,(\gamma_b q_b + S_b c_{s,b} + \hat Y_b c_{y,b}), \qquad
  d = D^{1/2} \tilde d, \qquad q = D^{1/2} g,

needs only two passes over the parameter-sized arrays:

1. :func:`history_products`: :math:`S^\top q`, :math:`\hat Y^\top q` (two
   matrix-vector products; on a pair step they come with the new pair's Gram
   rows from the same pass, :func:`mlbfgs_optax._pairs.gram_rows`), and
   :math:`q^\top q` (:func:`scaled_products`, :func:`safe_products`);
2. :func:`combine`: one elementwise pass that reads the history once and
   writes :math:`d`.

Between them everything is ``(B, M)``-sized: the two-loop coefficients
(:func:`mlbfgs_optax._two_loop.gram_coefficients`) and the step bound
:math:`\kappa_b = \min(1, \kappa \|q_b\| / \|\tilde d_b\|)`, whose norm
:math:`\|\tilde d_b\|^2 = w^\top G w` comes from the Gram matrix :math:`G` of
:math:`[q, S, \hat Y]` (:func:`norm_sq`), not from a pass over :math:`\tilde d`.
The scan two-loop (:func:`mlbfgs_optax._two_loop.blockwise_two_loop`) is the
reference the tests compare this against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlbfgs_optax import _numerics

#: Unroll the combining pass over the M slots up to this memory size (one
#: elementwise fusion that reads each history row once); beyond it, one
#: contraction per history.
MAX_UNROLLED_MEMORY = 32


def _in_range(x: jax.Array, acc) -> jax.Array:
    """``x`` is 0 or its magnitude lies in ``[sqrt(tiny), sqrt(max)]`` of ``acc``."""
    fi = jnp.finfo(acc)
    ax = jnp.abs(x)
    return (ax == 0) | ((ax >= jnp.sqrt(fi.tiny)) & (ax <= jnp.sqrt(fi.max)))


def history_products(layout, q: list, s_hist: list, y_hist: list, acc) -> tuple:
    r""":math:`S^\top q` and :math:`\hat Y^\top q`, ``(B, M)`` each: one matrix-vector product per history."""
    return layout.block_dot_history(s_hist, q, acc), layout.block_dot_history(y_hist, q, acc)


def scaled_products(layout, q: list, scale, s_hist: list, y_hist: list, acc) -> tuple:
    r"""The history products of :math:`q_b \cdot \text{scale}_b`: :math:`(S^\top q, \hat Y^\top q, q^\top q)`.

    ``scale`` is ``(B,)``, or None for :math:`q` as it is.
    """
    qc = [x.astype(acc) for x in q]
    if scale is not None:
        qc = [x * layout.broadcast(scale.astype(acc), j, x.ndim) for j, x in enumerate(qc)]
    return (*history_products(layout, qc, s_hist, y_hist, acc), layout.block_dot(qc, qc, acc))


def safe_products(layout, products_of, q_of, products: tuple, acc) -> tuple:
    r"""The history products, retaken of a rescaled :math:`q` if needed.

    ``products`` are :math:`(S^\top q, \hat Y^\top q, q^\top q)` as taken of
    :math:`q` as it is (:func:`scaled_products`, or on a pair step
    :func:`mlbfgs_optax._pairs.gram_rows`). Only when one of them is not
    finite, or :math:`q^\top q` lies outside
    :math:`[\sqrt{\rm tiny}, \sqrt{\rm max}]` of ``acc`` (so that a product
    may have overflowed or lost its digits), are they taken again of
    :math:`q_b / c_b`, with :math:`c_b` the power of two nearest
    :math:`\max|q_b|`, inside a ``lax.cond`` branch that costs nothing on
    every other step (its large operands are only read, so XLA copies none).
    The direction is linear in :math:`q`: coefficients computed from rescaled
    products are multiplied by :math:`c` before :func:`combine`.

    Args:
      layout: the block layout.
      products_of: ``scale -> (S^T q', Y^T q', q'^T q')`` of :math:`q' = q \cdot
        \text{scale}` per block (:func:`scaled_products`).
      q_of: ``() -> q``, packed.
      products: the products of :math:`q` itself.
      acc: the accumulation dtype.

    Returns:
      ``(sg, yg, gg, c)``: the (possibly rescaled) products and ``c`` per
      block (ones when not rescaled).
    """
    sg, yg, gg = products
    ok = (jnp.all(jnp.isfinite(sg)) & jnp.all(jnp.isfinite(yg)) & jnp.all(jnp.isfinite(gg))
          & jnp.all(_in_range(gg, acc)))

    def rescaled():
        c = _numerics.power_of_two_near(layout.block_max_abs(q_of(), acc))
        return (*products_of(1.0 / c), c)

    with jax.named_scope("rescaled_products"):
        return jax.lax.cond(ok, lambda: (sg, yg, gg, jnp.ones_like(gg)), rescaled)


def norm_sq(gamma, coef_s, coef_y, gg, sg, yg, ss_gram, sy_gram, yy_gram) -> tuple:
    r""":math:`\|\gamma q + S c_s + \hat Y c_y\|^2` per block, from inner products alone, and its error.

    .. math::
      \|\tilde d\|^2 = w^\top G w, \qquad w = (\gamma, c_s, c_y), \qquad
      G = \begin{pmatrix} q^\top q & q^\top S & q^\top \hat Y \\
      S^\top q & S^\top S & S^\top \hat Y \\
      \hat Y^\top q & \hat Y^\top S & \hat Y^\top \hat Y \end{pmatrix}.

    When :math:`\tilde d` is much shorter than its terms the sum cancels, and
    its rounding error, bounded by :math:`(2M+1)\,\epsilon\,|w|^\top |G|\,|w|`,
    can exceed it: the step bound then uses ``dd + err``, an upper bound of
    the norm, so that the bounded step is never longer than the bound however
    the sum cancelled (in float64 ``err`` is of the order of :math:`10^{-15}`
    ``dd``; it only matters where the direction is much shorter than its
    terms, where the bound rarely binds). The weights are divided by their
    largest magnitude first (a power of two) and the result multiplied back; a
    negative sum is returned as 0.

    Args:
      gamma: ``(B,)``; coef_s, coef_y: ``(B, M)`` in slot order; gg: ``(B,)``;
      sg, yg: ``(B, M)``; ss_gram, sy_gram, yy_gram: ``(B, M, M)`` by slot.

    Returns:
      ``(dd, err)``, each ``(B,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._direction import norm_sq
      >>> one = jnp.ones((1, 1, 1))                # s = y = e_1, q = e_2 (orthogonal)
      >>> dd, err = norm_sq(jnp.ones(1), jnp.full((1, 1), 2.0), jnp.full((1, 1), 1.0),
      ...                   jnp.ones(1), jnp.zeros((1, 1)), jnp.zeros((1, 1)), one, one, one)
      >>> dd                                       # |e_2 + 3 e_1|^2
      Array([10.], dtype=float32)
    """
    # Term by term (no concatenated Gram matrix): the concatenation, inlined into
    # the reductions, would compile to large kernels.
    big = _numerics.power_of_two_near(
        jnp.maximum(jnp.abs(gamma), jnp.maximum(jnp.max(jnp.abs(coef_s), axis=1),
                                                jnp.max(jnp.abs(coef_y), axis=1))))
    g0, cs, cy = gamma / big, coef_s / big[:, None], coef_y / big[:, None]
    scale = jnp.square(big)

    def quadratic_form(f):
        """:math:`w^\top G w` with ``f`` applied to every factor (identity, or abs)."""
        vec = lambda a, b: jnp.sum(f(a) * f(b), axis=1)
        mat = lambda u, m, v: jnp.sum(f(u)[:, :, None] * f(m) * f(v)[:, None, :], axis=(1, 2))
        return (jnp.square(f(g0)) * f(gg) + 2 * f(g0) * (vec(cs, sg) + vec(cy, yg))
                + mat(cs, ss_gram, cs) + 2 * mat(cs, sy_gram, cy) + mat(cy, yy_gram, cy))

    dd = jnp.maximum(quadratic_form(lambda x: x), 0.0) * scale
    bound = quadratic_form(jnp.abs) * scale
    return dd, (2 * coef_s.shape[1] + 1) * jnp.finfo(cs.dtype).eps * bound


def bound_factor(gg, dd, bound) -> jax.Array:
    r""":math:`\kappa_b = \min(1, \kappa \sqrt{q^\top q / \|\tilde d\|^2})` per block (1 where undefined)."""
    ratio = jnp.sqrt(_numerics.safe_div(gg, dd, 1.0))
    return jnp.where(jnp.isfinite(ratio), jnp.minimum(1.0, bound * ratio), 1.0)


def combine(layout, q: list, base, coef_s, s_hist: list, coef_y, y_hist: list, acc,
            root_d=None, g=None) -> list:
    r"""The second pass: :math:`D^{1/2}(\text{base}\, q + S c_s + \hat Y c_y)` per block.

    For ``M <=`` :data:`MAX_UNROLLED_MEMORY` the sum over slots is unrolled
    into one elementwise expression, which XLA compiles to one fused loop that
    reads every history row once (upcasting a low-precision history inside
    the loop); beyond it, one contraction per history.

    Args:
      layout: the block layout.
      q: packed :math:`q`.
      base: ``(B,)`` weight of :math:`q`.
      coef_s, coef_y: ``(B, M)`` weights of the history rows, by slot.
      s_hist, y_hist: packed histories.
      acc: the accumulation dtype.
      root_d: packed :math:`D^{1/2}`, or None for :math:`D = I`.
      g: packed :math:`g` with :math:`q = D^{1/2} g`, or None: then a bucket of
        one leaf reads :math:`q` as it is.

    Returns:
      The packed direction, in ``acc``.
    """
    bc = layout.broadcast
    num_slots = coef_s.shape[1]
    if num_slots > MAX_UNROLLED_MEMORY:
        ds = layout.combine_history(coef_s, s_hist, acc)
        dy = layout.combine_history(coef_y, y_hist, acc)
        d = [bc(base, j, x.ndim) * x.astype(acc) + a + b
             for j, (x, a, b) in enumerate(zip(q, ds, dy))]
        return d if root_d is None else [x * r for x, r in zip(d, root_d)]
    d = []
    for j, (x, s, y) in enumerate(zip(q, s_hist, y_hist)):
        # A bucket that is one leaf as one unit is combined in the leaf's own shape,
        # every operand reshaped to it (the packed updates fold back to the leaf): XLA
        # then writes the update into the leaf's buffer in place, where a reshape
        # between the leaf and the update made it write a temporary and copy it over.
        b = layout.buckets[j]
        own = layout._is_reshape(b) and len(b.unit_block) == 1
        view = (lambda a: a.reshape(layout.shapes[b.leaves[0]])) if own else (lambda a: a)
        nd = view(x).ndim
        # Every unit's weights gathered once, (U, M) (or (M,) for one block).
        cs, cy = layout.per_unit(coef_s, j), layout.per_unit(coef_y, j)
        if own:  # one unit: (M,)
            cs, cy = cs.reshape(-1), cy.reshape(-1)
        col = lambda c, m: c[m] if c.ndim == 1 else c[:, m].reshape((-1,) + (1,) * (nd - 1))
        # q of a one-leaf bucket from the leaf itself (the reshapes fold away).
        qj = view(x).astype(acc)
        if own and g is not None:
            qj = view(g[j]).astype(acc) * (1 if root_d is None else view(root_d[j]))
        dj = bc(base, j, nd) * qj
        for m in range(num_slots):
            dj = dj + col(cs, m) * view(s[:, m]).astype(acc)
            dj = dj + col(cy, m) * view(y[:, m]).astype(acc)
        if root_d is not None:
            dj = dj * view(root_d[j])
        d.append(dj.reshape(x.shape))
    return d
