"""Block layout: how a parameter pytree is cut into curvature blocks and packed.

mL-BFGS approximates the inverse Hessian block-diagonally (Niu et al., 2023,
https://arxiv.org/abs/2307.13744): every block keeps its own history of
curvature pairs and its own two-loop recursion, and no dot product ever crosses
a block. This module turns a user's ``blocks`` argument into a static
:class:`BlockLayout`, which *packs* a parameter-shaped pytree into a few large
arrays, *buckets*, and *unpacks* them again.

Every bucket is an array of shape ``(U, ...)`` whose leading index runs over
*units*, and every unit belongs to one block (:attr:`Bucket.unit_block`, a
static table). The optimizer's per-block algebra works on whole buckets: a
per-block dot product is one product and reduction per bucket, then a segment
sum of the ``U`` unit sums into the ``B`` blocks. So the traced and compiled
program has a size set by the number of buckets, not by the number of
parameter leaves or blocks:

* a *row-packed* bucket (``"leaf"``, ``"all"`` and label blocks, by default)
  holds every leaf of one dtype: each leaf raveled, zero-padded to whole rows
  of a common length (:func:`row_length`) and the rows concatenated,
  ``(rows, row_length)``; a unit is a row, and every row lies in one leaf, so
  in one block. A model has one bucket per dtype, however many leaves and
  shapes it has;
* the largest leaves (:data:`MAX_OWN_BUCKETS` of at least :data:`OWN_BUCKET_SIZE`
  numbers; all of them with ``packing="leaves"``) are buckets of their own,
  ``(1, *shape)``: packing them is a reshape; with ``packing="auto"`` the other
  large leaves are stacked by shape (at most :data:`MAX_LARGE_STACKS` stacks);
* a *stacked* bucket holds the leaves of one shape and dtype, ``(k, *shape)``,
  one unit per leaf, sharded like them (``P(None, *spec)``) under every kind
  of mesh axis, so that nothing is resharded: the leaves that a mesh axis
  splits (FSDP, tensor parallelism) are stacked (``packing``);
* :class:`EqualSlices` is one *flat* bucket: every leaf raveled and
  concatenated, zero-padded and cut into ``K`` rows, one per block.

Padding carries zero parameters and zero gradients, so it never changes a dot
product.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mlbfgs_optax import _numerics

@dataclasses.dataclass(frozen=True)
class EqualSlices:
    """Cut the flattened parameter vector into ``num_blocks`` equal slices.

    The parameters are concatenated leaf by leaf (in ``jax.tree.leaves``
    order), zero-padded to a multiple of ``num_blocks`` and reshaped to
    ``(num_blocks, block_size)``. Padding carries zero parameters and zero
    gradients, so it never changes a dot product.

    Equal slices balance memory and compute exactly across devices (choose
    ``num_blocks`` as a multiple of the device count), at the price of blocks
    that ignore layer boundaries: one block may mix the tail of one layer with
    the head of the next. Layer-aligned blocks (``"leaf"`` or labels) follow
    the model's structure but can be very unbalanced.

    Attributes:
      num_blocks: number of slices, at least 1.

    Example:
      >>> import jax.numpy as jnp
      >>> import mlbfgs_optax
      >>> tx = mlbfgs_optax.scale_by_mlbfgs(blocks=mlbfgs_optax.EqualSlices(4))
      >>> state = tx.init({'w': jnp.zeros((3, 5)), 'b': jnp.zeros(5)})
      >>> state.params_avg[0].shape
      (4, 5)
    """

    num_blocks: int

    def __post_init__(self):
        if not isinstance(self.num_blocks, (int, np.integer)) or self.num_blocks < 1:
            raise ValueError(
                f"EqualSlices: num_blocks must be an integer >= 1, got {self.num_blocks!r}."
            )


BlockSpec = Union[str, EqualSlices, Any, Callable[[Any], Any]]

class Bucket(NamedTuple):
    """One packed array: the parameter leaves it holds and the block of every unit.

    Attributes:
      leaves: indices (``jax.tree.leaves`` order) of the parameter leaves it
        holds, in packing order.
      starts: for a row-packed or flat (:class:`EqualSlices`) bucket, the
        offset of every leaf in the raveled array; None for a stacked bucket
        (unit ``u`` is leaf ``leaves[u]``).
      shape: the packed array's shape ``(U, ...)``.
      dtype: the packed array's dtype.
      unit_block: the block of every unit (leading index), length ``U``.
    """

    leaves: tuple[int, ...]
    starts: Optional[tuple[int, ...]]
    shape: tuple[int, ...]
    dtype: Any
    unit_block: tuple[int, ...]


def param_sharding(x) -> Optional[jax.sharding.Sharding]:
    """The sharding a parameter leaf carries, when there is one to follow.

    A concrete array's (or ``ShapeDtypeStruct``'s) ``NamedSharding``; under
    ``jax.jit`` the sharding in the leaf's type, which only Explicit mesh axes
    put there. None otherwise: one device (the state stays uncommitted, as
    ``jnp.zeros`` makes it, so jit may place it), or GSPMD placing an Auto
    program.
    """
    if isinstance(x, jax.core.Tracer):
        s = jax.typeof(x).sharding
        explicit = isinstance(s, NamedSharding) and any(
            s.mesh._name_to_type[n] == jax.sharding.AxisType.Explicit
            for n in jax.tree.leaves(tuple(s.spec)))
        return s if explicit else None
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


def _cast(x: jax.Array, dtype) -> jax.Array:
    """``x`` in ``dtype`` (no conversion where it has it already)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _partitioned(x) -> Optional[NamedSharding]:
    """``param_sharding(x)`` when it splits ``x`` over some mesh axis, else None."""
    s = param_sharding(x)
    return s if s is not None and jax.tree.leaves(tuple(s.spec)) else None


def _auto_mesh_in_context() -> bool:
    """Whether a mesh set in context (``jax.set_mesh``) has an Auto axis of size > 1.

    Under such a mesh GSPMD may shard any leaf, and a leaf's sharding is not in
    its type under ``jax.jit``: ``packing="auto"`` then stacks every leaf, so
    that an eager and a jitted ``init`` make the same state.
    """
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(
        t == jax.sharding.AxisType.Auto and mesh.shape[n] > 1
        for n, t in zip(mesh.axis_names, mesh.axis_types))


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Static description of how params map onto curvature blocks and packed buckets.

    A layout is static data (a pytree with no leaves): the optimizer state
    holds the layout it was made with.

    Attributes:
      treedef: tree structure of the parameters.
      paths: the key path of every parameter leaf (:func:`_key_path`).
      shapes: shape of every parameter leaf.
      dtypes: dtype of every parameter leaf.
      buckets: the packed arrays (:class:`Bucket`).
      num_blocks: number of curvature blocks ``B``.
      block_names: a readable name for every block (labels, leaf paths or
        slice indices).
      block_sizes: number of parameters in every block (padding excluded).
      slice_size: for :class:`EqualSlices`, the row length ``n_b``; else None.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    buckets: tuple[Bucket, ...]
    num_blocks: int
    block_names: tuple[str, ...]
    block_sizes: tuple[int, ...]
    slice_size: int | None = None

    # Packing ------------------------------------------------------------------

    def pack(self, tree: Any, lead: int = 0) -> list[jax.Array]:
        """Params-shaped pytree -> list of packed arrays, one per bucket.

        ``lead``: number of leading axes every leaf has in front of its
        parameter shape (1 for a history), kept in front of every bucket.
        """
        leaves = self.treedef.flatten_up_to(tree)
        out = []
        for b in self.buckets:
            if b.starts is None:
                out.append(jnp.stack([leaves[i].astype(b.dtype) for i in b.leaves], axis=lead))
                continue
            front = tuple(leaves[b.leaves[0]].shape[:lead])
            if self._is_reshape(b):  # no copy
                out.append(leaves[b.leaves[0]].astype(b.dtype).reshape(front + b.shape))
                continue
            parts, pos = [], 0
            # The leaves are materialised first (a barrier): XLA would otherwise fuse
            # their producers into the concatenation, whose every element then selects
            # among all of them.
            held = dict(zip(b.leaves, jax.lax.optimization_barrier([leaves[i] for i in b.leaves])))
            for i, start in zip(b.leaves, b.starts):
                if start > pos:
                    parts.append(jnp.zeros(front + (start - pos,), b.dtype))
                x = held[i]
                parts.append(x.reshape(front + (-1,)).astype(b.dtype))
                pos = start + math.prod(self.shapes[i])
            total = math.prod(b.shape)
            if total > pos:
                parts.append(jnp.zeros(front + (total - pos,), b.dtype))
            flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=lead)
            out.append(flat.reshape(front + b.shape))
        return out

    def unpack(self, packed: list[jax.Array], dtypes=None, lead: int = 0,
               offsets: Optional[list[list[jax.Array]]] = None) -> Any:
        """List of packed arrays -> params-shaped pytree (cast to ``dtypes``).

        ``lead`` as in :meth:`pack`. ``offsets``: :meth:`leaf_offsets` as traced
        scalars that XLA cannot see through (e.g. outputs of a loop), or None
        for a bucket; every leaf of a bucket with offsets is then read with a
        dynamic slice at its offset instead of a static one.
        XLA:CPU compiles every distinct kernel once: static slices make one
        distinct kernel per leaf (their offsets differ), dynamic ones the same
        kernel for every leaf of one shape.
        """
        dtypes = self.dtypes if dtypes is None else dtypes
        leaves: list[Any] = [None] * len(self.shapes)
        for j, (b, x) in enumerate(zip(self.buckets, packed)):
            front = tuple(x.shape[:lead])
            offs = None if offsets is None else offsets[j]
            if self._is_reshape(b):
                i = b.leaves[0]
                leaves[i] = _cast(x.reshape(front + self.shapes[i]), dtypes[i])
                continue
            if b.starts is None:
                if offs is not None:
                    parts = [jax.lax.dynamic_index_in_dim(x, o, axis=lead, keepdims=False,
                                                          allow_negative_indices=False)
                             for o in offs]
                else:
                    parts = jax.lax.split(x, (1,) * len(b.leaves), axis=lead)
                for i, part in zip(b.leaves, parts):
                    leaves[i] = _cast(part.reshape(front + self.shapes[i]), dtypes[i])
                continue
            flat = x.reshape(front + (-1,))
            if offs is not None:
                parts = [jax.lax.dynamic_slice_in_dim(flat, o, math.prod(self.shapes[i]), axis=lead,
                                                      allow_negative_indices=False)
                         for i, o in zip(b.leaves, offs)]
            else:
                sizes, pos = [], 0
                for i, start in zip(b.leaves, b.starts):
                    sizes += [start - pos, math.prod(self.shapes[i])]
                    pos = start + sizes[-1]
                sizes.append(flat.shape[-1] - pos)
                parts = jax.lax.split(flat, sizes, axis=lead)[1::2]
            for i, part in zip(b.leaves, parts):
                leaves[i] = _cast(part.reshape(front + self.shapes[i]), dtypes[i])
        return self.treedef.unflatten(leaves)

    def _is_reshape(self, b: Bucket) -> bool:
        """Whether bucket ``b`` is one leaf without padding: packing it is a reshape."""
        return len(b.leaves) == 1 and math.prod(b.shape) == math.prod(self.shapes[b.leaves[0]])

    def leaf_offsets(self) -> list[list[int]]:
        """Where every leaf sits in its bucket: its unit (stacked) or its start (flat)."""
        return [list(range(len(b.leaves))) if b.starts is None else list(b.starts)
                for b in self.buckets]

    def for_tree(self, tree: Any, name: str = "params") -> "BlockLayout":
        """This layout for ``tree``, whose leaves must have this layout's paths and shapes.

        ``tree``'s own structure may differ from :attr:`treedef` only by
        wrapper nodes that add attribute steps to a path (e.g. ``flax.nnx``
        variables' ``.value``, which ``nnx.Optimizer`` strips between ``init``
        and ``update``); the layout returned packs and unpacks with ``tree``'s
        structure.

        Raises:
          ValueError: when the paths or shapes differ.
        """
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if treedef == self.treedef:
            paths = self.paths
        else:
            paths = tuple(_key_path(p) for p, _ in flat)
            if paths != self.paths:
                raise ValueError(
                    f"scale_by_mlbfgs: {name} and the optimizer state have different tree "
                    f"structures; was the state made by init on these params?\n"
                    f"  state:  {self.treedef}\n  {name}: {treedef}")
        for path, (_, x), shape in zip(paths, flat, self.shapes):
            if tuple(x.shape) != shape:
                raise ValueError(
                    f"scale_by_mlbfgs: {name} leaf {path} has shape {tuple(x.shape)}, but the "
                    f"optimizer state was made for {shape}; was the state made by init on "
                    "these params?")
        return self if treedef == self.treedef else dataclasses.replace(self, treedef=treedef)

    def packed_shapes(self) -> list[tuple[tuple[int, ...], Any]]:
        """(shape, dtype) of every packed array."""
        return [(b.shape, b.dtype) for b in self.buckets]

    def local(self, rows: int) -> "BlockLayout":
        """The layout of ``rows`` consecutive slices: one device's share of them."""
        if self.slice_size is None:
            raise ValueError("only EqualSlices layouts can be split across devices.")
        (b,) = self.buckets
        return dataclasses.replace(
            self,
            buckets=(b._replace(shape=(rows, self.slice_size), unit_block=tuple(range(rows))),),
            num_blocks=rows,
            block_names=tuple(f"slice{r}" for r in range(rows)),
            block_sizes=(self.slice_size,) * rows,
        )

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

    def per_unit(self, c: jax.Array, j: int) -> jax.Array:
        """Per-block values ``c`` (``(B, ...)``) for every unit of bucket ``j``: ``(U_j, ...)``.

        A scalar-indexed ``(...)`` value when all units of the bucket belong to
        one block.
        """
        ub = self.buckets[j].unit_block
        if ub and len(set(ub)) == 1 and c.shape[0] > 1:
            # One block: its value, a scalar (or ``(...)``) broadcast over the units;
            # at a traced index inside :func:`opaque_block_indices`.
            at = _OPAQUE_INDEX.get().get(ub[0])
            if at is None:
                v = c[ub[0] : ub[0] + 1]
            else:
                v = jax.lax.dynamic_slice_in_dim(c, at, 1, axis=0)
            return v[0] if len(ub) > 1 else v
        if ub and ub == tuple(range(ub[0], ub[0] + len(ub))):
            return c if len(ub) == c.shape[0] else c[ub[0] : ub[0] + len(ub)]
        # Materialised once (the barrier): fused into an elementwise pass over the
        # bucket, the gather would run once per element.
        return jax.lax.optimization_barrier(jnp.take(c, np.asarray(ub, np.int32), axis=0))

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
        if _partitioned(x) is None:
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
            plain = all(_partitioned(v) is None for v in vj)
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

    # Histories in the user's layout ------------------------------------------

    def pack_history(self, tree: Any) -> list[jax.Array]:
        """A pytree of ``(M, *shape)`` leaves -> unit-major packed histories ``(U, M, ...)``."""
        return [jnp.moveaxis(x, 0, 1) for x in self.pack(tree, lead=1)]

    def unpack_history(self, packed: list[jax.Array], dtypes=None) -> Any:
        """Unit-major packed histories -> a pytree of ``(M, *shape)`` leaves."""
        return self.unpack([jnp.moveaxis(x, 1, 0) for x in packed], dtypes=dtypes, lead=1)


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
    return jax.lax.platform_dependent(
        h, v, cpu=lambda h, v: _multiply_reduce(h, v[:, None], dtype),
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


jax.tree_util.register_static(BlockLayout)


#: Block -> traced int32 index, set by :func:`opaque_block_indices`.
_OPAQUE_INDEX: contextvars.ContextVar[dict] = contextvars.ContextVar("opaque_index", default={})


@contextlib.contextmanager
def opaque_block_indices(layout: BlockLayout, pred: jax.Array):
    """Within: :meth:`BlockLayout.per_unit` reads a one-block bucket's value at a traced index.

    XLA:CPU compiles each distinct kernel once and reuses it for identical
    ones. Read at a constant index, a per-block value is folded into every
    kernel that uses it, so the kernels of two same-shaped buckets of one
    leaf each (the large leaves) differ in that constant and are all compiled.
    At an index XLA cannot fold, they are the same kernels (measured: the
    update of GPT-2 small's structure with its 50 large leaves in buckets of
    their own, ``packing="leaves"``, compiled in 16.0 s instead of 19.3 s at
    M = 2, 18.7 s instead of 22.0 s at M = 10; the default packing's
    unchanged).

    Args:
      layout: the layout whose one-block buckets get traced indices.
      pred: a traced boolean scalar that is True at run time and that XLA
        cannot evaluate: the indices are the outputs of a loop of zero or one
        trip on it (0 where it is False). A loop that gave the same values
        either way would be folded away.
    """
    blocks = sorted({b.unit_block[0] for b in layout.buckets
                     if b.unit_block and len(set(b.unit_block)) == 1})
    if len(blocks) < 2:
        yield
        return
    idx = _numerics.at_most_once(pred, lambda _: [jnp.asarray(k, jnp.int32) for k in blocks],
                                 [jnp.zeros((), jnp.int32) for _ in blocks])
    token = _OPAQUE_INDEX.set(dict(zip(blocks, idx)))
    try:
        yield
    finally:
        _OPAQUE_INDEX.reset(token)


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


#: The row lengths a row-packed bucket may take.
ROW_LENGTHS = tuple(2 ** k for k in range(3, 13))  # 8 ... 4096
#: The largest share of a row-packed bucket that padding may take.
MAX_PADDING = 1 / 64


def row_length(sizes: list[int]) -> int:
    """The longest of :data:`ROW_LENGTHS` whose padding of every leaf to whole rows
    takes at most :data:`MAX_PADDING` of the bucket (else the shortest).

    Example:
      >>> from mlbfgs_optax._blocks import row_length
      >>> row_length([4096, 64] * 64)   # 64x64 weights, 64 biases padded to 128: 1.5%
      128
      >>> row_length([3000, 30])        # 3008 + 64: 42 of 3072 numbers are padding
      64
    """
    best = ROW_LENGTHS[0]
    for r in ROW_LENGTHS:
        padded = sum(-(-n // r) * r for n in sizes)
        if padded - sum(sizes) <= MAX_PADDING * padded:
            best = r
    return best


#: Leaves of at least this many numbers may be a bucket of their own (:func:`_member_groups`).
OWN_BUCKET_SIZE = 1 << 16
#: At most this many leaves (the largest) are buckets of their own.
MAX_OWN_BUCKETS = 8
#: With ``packing="auto"``, the other leaves of at least :data:`OWN_BUCKET_SIZE` numbers
#: are stacked by shape in at most this many buckets (the largest), not row-packed.
MAX_LARGE_STACKS = 8


def _member_groups(leaves: list, stacked: list[bool], max_own: Optional[int],
                   large_stacks: int) -> list[tuple[bool, list[int]]]:
    """The leaves of every bucket, ``(row_packed, members)``, in order of first leaf.

    The ``max_own`` (None: all) largest leaves of at least
    :data:`OWN_BUCKET_SIZE` numbers are buckets of their own, ``(1, *shape)``
    (a stacked bucket of one leaf, sharded like it): packing and unpacking them
    are reshapes (their own buffers, read in place) instead of copies, which at
    such sizes cost as much as an elementwise pass over them (and a fresh buffer
    per call), and as one unit their history products are one matrix-vector
    product each. Every bucket adds its own kernels to the compiled step (about
    1 s of XLA:CPU compile time each), hence the bound (:data:`MAX_OWN_BUCKETS`;
    ``packing="leaves"`` lifts it). The other large leaves are stacked by
    (shape, dtype) in at most ``large_stacks`` buckets, the groups of most
    numbers first: a stack of a few large units runs its products and its
    combining pass faster than the same numbers as thousands of rows, which
    made the row-packed step 1.2-1.3x the stacked one's on GPT-2 small's 50
    large leaves. The other stacked leaves form one bucket per (shape, dtype),
    the other row-packed leaves one bucket per dtype: the program's size is set
    by the number of large leaves, dtypes and shapes, not by the number of
    small leaves.
    """
    sizes = [math.prod(x.shape) for x in leaves]
    candidates = [i for i in range(len(leaves)) if sizes[i] >= OWN_BUCKET_SIZE]
    own = set(sorted(candidates, key=lambda i: -sizes[i])[:max_own])
    if large_stacks:
        by_shape: dict[Any, list[int]] = {}
        for i in candidates:
            if i not in own and not stacked[i]:
                by_shape.setdefault((tuple(leaves[i].shape), jnp.dtype(leaves[i].dtype)),
                                    []).append(i)
        chosen = sorted(by_shape.values(), key=lambda m: -sum(sizes[i] for i in m))
        stacked = list(stacked)
        for members in chosen[:large_stacks]:
            for i in members:
                stacked[i] = True
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        key = ((tuple(x.shape),) if stacked[i] else ()) + (jnp.dtype(x.dtype),)
        groups.setdefault(key + (("own", i),) if i in own else key, []).append(i)
    return [(not (stacked[m[0]] or m[0] in own), m) for m in groups.values()]


def _buckets(leaves: list, groups: list[tuple[bool, list[int]]],
             leaf_block: list[int]) -> tuple[Bucket, ...]:
    """The buckets of :func:`_member_groups`'s groups (see :class:`Bucket`)."""
    out = []
    for row_packed, members in groups:
        dtype = jnp.dtype(leaves[members[0]].dtype)
        if not row_packed:
            shape = tuple(leaves[members[0]].shape)
            out.append(Bucket(tuple(members), None, (len(members),) + shape, dtype,
                              tuple(leaf_block[i] for i in members)))
            continue
        sizes = [math.prod(leaves[i].shape) for i in members]
        r = row_length(sizes)
        starts, unit_block, rows = [], [], 0
        for i, n in zip(members, sizes):
            starts.append(rows * r)
            unit_block += [leaf_block[i]] * -(-n // r)
            rows += -(-n // r)
        out.append(Bucket(tuple(members), tuple(starts), (rows, r), dtype, tuple(unit_block)))
    return tuple(out)


def _label_name(label: Hashable) -> str:
    return label if isinstance(label, str) else repr(label)


def _key_path(path) -> str:
    """A leaf's path by its dict keys and sequence indices (attribute steps dropped)."""
    return jax.tree_util.keystr(tuple(
        k for k in path if not isinstance(k, jax.tree_util.GetAttrKey))) or "<root>"


def _path_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def make_layout(params: Any, blocks: BlockSpec, packing: str = "auto") -> BlockLayout:
    """Builds the static :class:`BlockLayout` of ``params`` for a ``blocks`` spec.

    Args:
      params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (shapes, dtypes,
        structure, and the sharding where one is visible, are read).
      blocks: ``"leaf"`` (one block per parameter leaf; numbered bucket by
        bucket, in order of their first leaf), ``"all"`` (one block for
        everything: classic L-BFGS), an :class:`EqualSlices`, a pytree of
        hashable labels with the structure of ``params`` (leaves with the same
        label form one block), or a callable ``params -> labels``.
      packing: ``"rows"`` (every leaf of one dtype in one row-packed bucket),
        ``"stacked"`` (the leaves of one shape and dtype stacked),
        ``"auto"`` (stacked for the leaves split over a mesh axis, as far as
        ``params`` show it, for every leaf under a mesh with Auto axes set
        in context, and for the leaves of :data:`OWN_BUCKET_SIZE` or more
        numbers beyond the buckets of their own, in at most
        :data:`MAX_LARGE_STACKS` stacks; rows for the rest) or ``"leaves"``
        (as ``"auto"``, but
        every leaf of :data:`OWN_BUCKET_SIZE` or more numbers a bucket of its
        own, not only the :data:`MAX_OWN_BUCKETS` largest); see
        :func:`~mlbfgs_optax.scale_by_mlbfgs`. Ignored for :class:`EqualSlices`.

    Returns:
      The layout.

    Raises:
      ValueError: when the labels do not match ``params`` or the spec is
        unknown.

    Example:
      >>> import jax.numpy as jnp, mlbfgs_optax
      >>> params = {'enc': {'w': jnp.ones((2, 3)), 'b': jnp.ones(3)}, 'head': jnp.ones(4)}
      >>> layout = mlbfgs_optax.make_layout(
      ...     params, {'enc': {'w': 'enc', 'b': 'enc'}, 'head': 'head'})
      >>> layout.block_names, layout.block_sizes
      (('enc', 'head'), (9, 4))
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not paths_leaves:
        raise ValueError("scale_by_mlbfgs: params has no array leaves.")
    paths = [p for p, _ in paths_leaves]
    leaves = [x for _, x in paths_leaves]
    for p, x in zip(paths, leaves):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(
                f"scale_by_mlbfgs: params leaf {_path_name(p)} is {type(x).__name__}, "
                "not an array."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"scale_by_mlbfgs: params leaf {_path_name(p)} has dtype {x.dtype}; "
                "only real floating-point parameters are supported."
            )
    shapes = tuple(tuple(int(d) for d in x.shape) for x in leaves)
    dtypes = tuple(jnp.dtype(x.dtype) for x in leaves)
    sizes = [math.prod(s) for s in shapes]

    if isinstance(blocks, EqualSlices):
        total = sum(sizes)
        k = int(blocks.num_blocks)
        n_b = max(1, -(-total // k))
        block_sizes = tuple(max(0, min(n_b, total - r * n_b)) for r in range(k))
        starts = tuple(int(s) for s in np.cumsum([0] + sizes[:-1]))
        bucket = Bucket(tuple(range(len(leaves))), starts, (k, n_b), jnp.result_type(*dtypes),
                        tuple(range(k)))
        return BlockLayout(
            treedef=treedef,
            paths=tuple(_key_path(p) for p in paths),
            shapes=shapes,
            dtypes=dtypes,
            buckets=(bucket,),
            num_blocks=k,
            block_names=tuple(f"slice{r}" for r in range(k)),
            block_sizes=block_sizes,
            slice_size=n_b,
        )

    if isinstance(blocks, str):
        if blocks == "leaf":
            labels = [_path_name(p) for p in paths]
        elif blocks == "all":
            labels = ["all"] * len(leaves)
        else:
            raise ValueError(
                f"scale_by_mlbfgs: blocks={blocks!r} is not one of 'leaf', 'all', an "
                "EqualSlices, a label pytree or a callable params -> labels."
            )
    else:
        label_tree = blocks(params) if callable(blocks) else blocks
        try:
            labels = treedef.flatten_up_to(label_tree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "scale_by_mlbfgs: blocks must be a pytree of labels with the same "
                f"structure as params.\n  params: {treedef}\n  blocks: "
                f"{jax.tree.structure(label_tree)}"
            ) from e
        for p, lab in zip(paths, labels):
            if not isinstance(lab, Hashable) or isinstance(lab, (jax.Array, np.ndarray)):
                raise ValueError(
                    f"scale_by_mlbfgs: the block label of {_path_name(p)} is "
                    f"{lab!r}, which is not a hashable label."
                )

    if packing not in ("auto", "rows", "stacked", "leaves"):
        raise ValueError(f"scale_by_mlbfgs: packing={packing!r} is invalid; expected 'auto', "
                         "'rows', 'stacked' or 'leaves'.")
    auto_mesh = _auto_mesh_in_context()
    by_mesh = lambda x: auto_mesh or _partitioned(x) is not None
    stacked = {"rows": lambda x: False, "stacked": lambda x: True, "auto": by_mesh,
               "leaves": by_mesh}[packing]
    groups = _member_groups(leaves, [stacked(x) for x in leaves],
                            None if packing == "leaves" else MAX_OWN_BUCKETS,
                            MAX_LARGE_STACKS if packing == "auto" else 0)
    order: dict[Hashable, int] = {}
    if isinstance(blocks, str) and blocks == "leaf":
        # Bucket by bucket: the blocks of every bucket are then consecutive, and the
        # per-block algebra slices and concatenates instead of gathering and scattering.
        for _, members in groups:
            for i in members:
                order.setdefault(labels[i], len(order))
    for lab in labels:
        order.setdefault(lab, len(order))
    leaf_block = [order[lab] for lab in labels]
    block_sizes = [0] * len(order)
    for blk, size in zip(leaf_block, sizes):
        block_sizes[blk] += size
    return BlockLayout(
        treedef=treedef,
        paths=tuple(_key_path(p) for p in paths),
        shapes=shapes,
        dtypes=dtypes,
        buckets=_buckets(leaves, groups, leaf_block),
        num_blocks=len(order),
        block_names=tuple(_label_name(lab) for lab in order),
        block_sizes=tuple(block_sizes),
    )
