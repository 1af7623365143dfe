"""Per-block algebra on packed buckets: dot products, maxima and history products.

mL-BFGS keeps one history of curvature pairs and one two-loop recursion per
block, and no dot product ever crosses a block. Every bucket is an array of
shape ``(U, ...)`` whose leading index runs over *units*, and every unit
belongs to one block (:attr:`~mlbfgs_optax._layout.Bucket.unit_block`, a
static table). :class:`BlockOps`, which :class:`~mlbfgs_optax.BlockLayout`
inherits, works on whole buckets: a per-block dot product is one product and
reduction per bucket, then a segment sum of the ``U`` unit sums into the ``B``
blocks. So the traced and compiled program has a size set by the number of
buckets, not by the number of parameter leaves or blocks.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mlbfgs_optax import _packing
from mlbfgs_optax import _xla_hints


class BlockOps:
    """The per-block algebra of :class:`~mlbfgs_optax.BlockLayout` (a mixin).

    It reads the layout's ``buckets`` and ``num_blocks``.
    """

    # Units and blocks -----------------------------------------------------------

    @functools.cached_property
    def _unit_ids(self) -> Optional[np.ndarray]:
        """The block of every unit of every bucket, concatenated; None when it is ``arange(B)``."""
        ids = np.concatenate([np.asarray(b.unit_block, np.int32) for b in self.buckets])
        return None if np.array_equal(ids, np.arange(self.num_blocks)) else ids

    def _to_blocks(self, parts: list[jax.Array], op: str) -> jax.Array:
        """Per-unit values (one ``(U_j, ...)`` array per bucket) reduced per block: ``(B, ...)``.

        ``op``: ``"sum"`` or ``"max"`` (of non-negative values; 0 for a block
        without units).
        """
        data = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        ids = self._unit_ids
        if ids is None:
            return data
        if op == "sum":
            return jax.ops.segment_sum(data, ids, num_segments=self.num_blocks)
        out = jax.ops.segment_max(data, ids, num_segments=self.num_blocks)
        return jnp.maximum(out, jnp.zeros((), data.dtype))

    @functools.cached_property
    def whole_bucket_blocks(self) -> list[int]:
        """The blocks that own every unit of some bucket, sorted (:meth:`per_unit` reads
        their values at one index)."""
        return sorted({b.unit_block[0] for b in self.buckets if _one_block(b.unit_block)})

    def per_unit(self, c: jax.Array, j: int) -> jax.Array:
        """Per-block values ``c`` (``(B, ...)``) for every unit of bucket ``j``: ``(U_j, ...)``.

        A scalar-indexed ``(...)`` value when all units of the bucket belong to
        one block.
        """
        ub = self.buckets[j].unit_block
        if _one_block(ub) and c.shape[0] > 1:
            # One block: its value, a scalar (or ``(...)``) broadcast over the units;
            # at a traced index inside :func:`~mlbfgs_optax._xla_hints.opaque_block_indices`.
            at = _xla_hints.block_index(ub[0])
            if at is None:
                v = c[ub[0] : ub[0] + 1]
            else:
                v = jax.lax.dynamic_slice_in_dim(c, at, 1, axis=0)
            return v[0] if len(ub) > 1 else v
        if ub and ub == tuple(range(ub[0], ub[0] + len(ub))):
            return c if len(ub) == c.shape[0] else c[ub[0] : ub[0] + len(ub)]
        # Materialised once (the barrier): fused into an elementwise pass over the
        # bucket, the gather would run once per element.
        return _xla_hints.hold("block_values", jnp.take(c, np.asarray(ub, np.int32), axis=0))

    def broadcast(self, c: jax.Array, j: int, ndim: int) -> jax.Array:
        """Per-block values ``c`` (shape ``(B,)``) broadcastable against packed array ``j``."""
        v = self.per_unit(c, j)
        return v if v.ndim == 0 else v.reshape(v.shape + (1,) * (ndim - 1))

    # Per-block algebra ------------------------------------------------------

    def block_dot(self, a: list[jax.Array], b: list[jax.Array], dtype) -> jax.Array:
        """Per-block inner products ``<a_b, b_b>``, shape ``(B,)``, in ``dtype``."""
        return self.block_dots([(a, b)], dtype)[0]

    def block_dots(self, pairs: list[tuple[list[jax.Array], list[jax.Array]]],
                   dtype) -> jax.Array:
        """Per-block inner products of several pairs of packed vectors at once: ``(K, B)``.

        One reduction per packed array over the ``K`` products stacked (one
        kernel where :meth:`block_dot` ``K`` times would make ``K``).
        """
        parts = [_reduce_units([a[j].astype(dtype) * b[j].astype(dtype) for a, b in pairs],
                               "sum")
                 for j in range(len(self.buckets))]
        return self._to_blocks(parts, "sum").T

    def block_max_abs_many(self, vectors: list[list[jax.Array]], dtype) -> jax.Array:
        """Per-block ``max |v_b|`` of several packed vectors at once: ``(K, B)``."""
        parts = [_reduce_units([jnp.abs(v[j]).astype(dtype) for v in vectors], "max")
                 for j in range(len(self.buckets))]
        return self._to_blocks(parts, "max").T

    def block_dot_history(self, history: list[jax.Array], v: list[jax.Array], dtype) -> jax.Array:
        """``<h_m, v>`` per block for every slot ``m`` of unit-major histories: ``(B, M)``."""
        return self._to_blocks([self._unit_products(h, x, dtype) for h, x in zip(history, v)],
                               "sum")

    def _unit_products(self, h: jax.Array, x: jax.Array, dtype) -> jax.Array:
        """``<h[u, m], x[u]>`` for every unit ``u`` and slot ``m``: ``(U, M)``.

        The history is unit-major, ``(U, M, ...)``: a batched matrix-vector
        product over the leading unit axis reads it once, in place (no
        transpose); a bfloat16 history as :func:`_history_matvec` says. With a
        sharded unit shape, a multiply-reduce, whose result is replicated
        without asking.
        """
        if _packing._partitioned(x) is None:
            return _history_matvec(h, x.astype(dtype), dtype)
        return _multiply_reduce(h, x.astype(dtype)[:, None], dtype)

    def block_dot_history_many(self, histories: list[list[jax.Array]],
                               vs: list[list[jax.Array]], dtype) -> list[jax.Array]:
        """``<h_m, v_k>`` per block for every history, slot ``m`` and packed vector ``v_k``.

        One matrix-vector product per history and vector. (A product against the
        ``K`` vectors stacked reads the history once, but XLA:CPU then transposes
        the stack and runs a skinny matrix product at a tenth of the bandwidth
        of its matrix-vector products.)

        Returns:
          One ``(B, M, K)`` array per history.
        """
        parts = [[] for _ in histories]
        for j in range(len(histories[0])):
            vj = [vk[j].astype(dtype) for vk in vs]
            plain = all(_packing._partitioned(v) is None for v in vj)
            for out, history in zip(parts, histories):
                h = history[j]
                if plain:
                    out.append(jnp.stack([_batched_matvec(h, v, dtype) for v in vj], axis=-1))
                else:
                    out.append(jnp.stack([_multiply_reduce(h, v[:, None], dtype)
                                          for v in vj], axis=-1))
        return [self._to_blocks(p, "sum") for p in parts]

    def combine_history(self, coef: jax.Array, history: list[jax.Array], dtype) -> list[jax.Array]:
        """``sum_m coef[b, m] h_m`` for every packed array (``coef``: ``(B, M)``)."""
        out = []
        for j, h in enumerate(history):
            c = self.per_unit(coef.astype(dtype), j)  # (U, M) or (M,)
            c = c if c.ndim == 2 else jnp.broadcast_to(c, h.shape[:2])
            out.append(jnp.einsum("um,um...->u...", c, h.astype(dtype),
                                  preferred_element_type=dtype))
        return out

    def block_max_abs(self, a: list[jax.Array], dtype) -> jax.Array:
        """Per-block ``max |a_b|``, shape ``(B,)``, in ``dtype``."""
        return self.block_max_abs_many([a], dtype)[0]

    def gather_slot(self, history: jax.Array, slots: jax.Array, i: int) -> jax.Array:
        """Slot ``slots[block]`` of a unit-major ``(U, M, ...)`` history array, per unit."""
        idx = self.per_unit(slots, i)
        if idx.ndim == 0:
            return jax.lax.dynamic_index_in_dim(history, idx, 1, keepdims=False)
        idx = idx.reshape((idx.shape[0], 1) + (1,) * (history.ndim - 2))
        return jnp.take_along_axis(history, idx, axis=1, mode="clip")[:, 0]

    def scatter_slot(
        self, history: jax.Array, value: jax.Array, slots: jax.Array, write: jax.Array, i: int
    ) -> jax.Array:
        """Writes ``value`` at slot ``slots[block]`` of ``history`` where ``write[block]``.

        Only the written rows are touched: the units whose block does not
        write are sent out of range and dropped (no read of the old rows).
        """
        idx = self.per_unit(slots, i)
        w = self.per_unit(write, i)
        num_slots = history.shape[1]
        value = value.astype(history.dtype)
        if idx.ndim == 0:
            idx = jnp.broadcast_to(idx, history.shape[:1])
            w = jnp.broadcast_to(w, history.shape[:1])
        idx = jnp.where(w, idx, num_slots)
        return history.at[jnp.arange(history.shape[0]), idx].set(value, mode="drop")


def _one_block(unit_block: tuple[int, ...]) -> bool:
    """Every unit of a bucket belongs to the same block."""
    return bool(unit_block) and len(set(unit_block)) == 1


def _history_matvec(h: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """``<h[u, m], v[u]>`` for every unit ``u`` and slot ``m`` of a unit-major history: ``(U, M)``.

    A batched matrix-vector product in ``dtype``. A bfloat16 history is read
    as it is on CPU, by a multiply-reduce that upcasts inside its loop:
    XLA:CPU runs the mixed-precision product by first converting the whole
    history into a float32 temporary (measured on CPU only: 3.3 against 19.6
    ms for a 10 x 1024² history, and the ordinary step with a bfloat16 history
    took 0.65-0.85x its previous time on the three pytrees of the update-cost
    benchmark; a float16 history gains nothing, XLA:CPU converts it either
    way). Other platforms keep the product (chosen at lowering by
    :func:`jax.lax.platform_dependent`). The pair step's products of one
    history against several vectors stay products: as multiply-reduces XLA:CPU
    wrote each vector broadcast to the history's full shape.
    """
    if h.dtype != jnp.bfloat16:
        return _batched_matvec(h, v, dtype)
    return _xla_hints.per_platform(
        "bf16_history", (h, v), cpu=lambda h, v: _multiply_reduce(h, v[:, None], dtype),
        default=lambda h, v: _batched_matvec(h, v, dtype))


def _batched_matvec(h: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """``<h[u, m], v[u]>``, ``(U, M)``: one batched matrix-vector product in ``dtype``."""
    return jnp.einsum("um...,u...->um", h.astype(dtype), v, preferred_element_type=dtype)


def _multiply_reduce(h: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """``sum(h * v)`` over all but the two leading axes, in ``dtype``: ``(U, M)``.

    ``h`` is ``(U, M, ...)`` and ``v`` broadcasts against it: a plain sum,
    whose partial sums the SPMD partitioner all-reduces where the unit shape
    is sharded.
    """
    return jnp.sum(h.astype(dtype) * v.astype(dtype), axis=tuple(range(2, h.ndim)))


def _reduce_units(xs: list[jax.Array], op: str) -> jax.Array:
    """``op`` (``"sum"`` or ``"max"``) of each of the same-shaped ``(U, ...)`` arrays ``xs``
    over all but the unit axis: ``(U, K)``.

    One reduction over the ``K`` arrays stacked on a last axis. (A variadic
    reduction would make one kernel without the stack, but the SPMD partitioner
    gathers its partial results over the devices instead of all-reducing them.)
    """
    axes = tuple(range(1, xs[0].ndim))
    if op == "sum":
        return jnp.stack([jnp.sum(x, axis=axes) for x in xs], -1)
    return jnp.stack([jnp.max(x, axis=axes, initial=0.0) for x in xs], -1)
