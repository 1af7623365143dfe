"""Packing: the buckets' format, and moving numbers between a pytree and them.

A :class:`~mlbfgs_optax.BlockLayout` (:mod:`mlbfgs_optax._layout`) says
which parameter leaves share a bucket and which block every one belongs to.
This module says where in its bucket every leaf's numbers go
(:class:`Bucket`; a row-packed bucket pads every leaf to whole rows of a
common length, :func:`row_length`) and moves them: :meth:`Packing.pack`, which
the layout inherits, ravels, pads and concatenates (or stacks, or reshapes)
the leaves of a pytree into one array per bucket, :meth:`Packing.unpack` cuts
them out again, and the ``_history`` variants do the same for pytrees of
``(M, *shape)`` histories, packed unit-major. The leaves' shardings
(:func:`param_sharding`) carry over: a stacked bucket is sharded like its
leaves, ``P(None, *spec)``.

Padding carries zero parameters and zero gradients, so it never changes a dot
product.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from mlbfgs_optax import _xla_hints

if TYPE_CHECKING:
    from mlbfgs_optax._layout import BlockLayout


class Bucket(NamedTuple):
    """One packed array: the parameter leaves it holds and the block of every unit.

    Attributes:
      leaves: indices (``jax.tree.leaves`` order) of the parameter leaves it
        holds, in packing order.
      starts: for a row-packed or flat (:class:`~mlbfgs_optax.EqualSlices`)
        bucket, the offset of every leaf in the raveled array; None for a
        stacked bucket (unit ``u`` is leaf ``leaves[u]``).
      shape: the packed array's shape ``(U, ...)``.
      dtype: the packed array's dtype.
      unit_block: the block of every unit (leading index), length ``U``.
    """

    leaves: tuple[int, ...]
    starts: Optional[tuple[int, ...]]
    shape: tuple[int, ...]
    dtype: Any
    unit_block: tuple[int, ...]


#: The row lengths a row-packed bucket may take.
ROW_LENGTHS = tuple(2 ** k for k in range(3, 13))  # 8 ... 4096
#: The largest share of a row-packed bucket that padding may take.
MAX_PADDING = 1 / 64


def row_length(sizes: list[int]) -> int:
    """The longest of :data:`ROW_LENGTHS` whose padding of every leaf to whole rows
    takes at most :data:`MAX_PADDING` of the bucket (else the shortest).

    Example:
      >>> from mlbfgs_optax._packing import row_length
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


def _buckets(leaves: list, groups: list[tuple[bool, list[int]]],
             leaf_block: list[int]) -> tuple[Bucket, ...]:
    """The buckets of :func:`~mlbfgs_optax._layout._member_groups`'s groups (see
    :class:`Bucket`): where every leaf goes in its bucket, and the block of every unit."""
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


def _key_path(path) -> str:
    """A leaf's path by its dict keys and sequence indices (attribute steps dropped)."""
    return jax.tree_util.keystr(tuple(
        k for k in path if not isinstance(k, jax.tree_util.GetAttrKey))) or "<root>"


class Packing:
    """The packing methods of :class:`~mlbfgs_optax.BlockLayout` (a mixin).

    They read (and :meth:`for_tree` and :meth:`local` replace) the layout's
    fields: ``treedef``, ``paths``, ``shapes``, ``dtypes``, ``buckets`` and,
    for :class:`~mlbfgs_optax.EqualSlices`, ``slice_size`` and the block fields.
    """

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
            held = dict(zip(b.leaves, _xla_hints.hold("packed_leaves",
                                                      [leaves[i] for i in b.leaves])))
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

    # Histories in the user's layout ------------------------------------------

    def pack_history(self, tree: Any) -> list[jax.Array]:
        """A pytree of ``(M, *shape)`` leaves -> unit-major packed histories ``(U, M, ...)``."""
        return [jnp.moveaxis(x, 0, 1) for x in self.pack(tree, lead=1)]

    def unpack_history(self, packed: list[jax.Array], dtypes=None) -> Any:
        """Unit-major packed histories -> a pytree of ``(M, *shape)`` leaves."""
        return self.unpack([jnp.moveaxis(x, 1, 0) for x in packed], dtypes=dtypes, lead=1)
