"""Block layout: how a parameter pytree is cut into curvature blocks.

mL-BFGS approximates the inverse Hessian block-diagonally (Niu et al., 2023,
https://arxiv.org/abs/2307.13744): every block keeps its own history of
curvature pairs and its own two-loop recursion, and no dot product ever crosses
a block. This module turns a user's ``blocks`` argument into a static
:class:`BlockLayout`, which knows how to *pack* a parameter-shaped pytree into
the arrays the optimizer works on and how to *unpack* them again.

A packed tree is a list of arrays, each described by a :class:`Segment`:

* a *whole-leaf* segment (``rows is None``) is one parameter leaf, kept in its
  own shape, that belongs entirely to block ``offset``;
* a *row* segment (``rows = k``) is a ``(k, n_b)`` array whose row ``r`` is
  block ``offset + r``. :class:`EqualSlices` packs the flattened parameters into
  one such array, so blocks have equal sizes and balance exactly over devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np


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


class Segment(NamedTuple):
    """One packed array: which blocks it holds.

    Attributes:
      offset: index of the (first) block this array belongs to.
      rows: ``None`` when the whole array is one block; else the array has a
        leading axis of this size and row ``r`` is block ``offset + r``.
    """

    offset: int
    rows: int | None


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Static description of how params map onto curvature blocks.

    Attributes:
      treedef: tree structure of the parameters.
      shapes: shape of every parameter leaf.
      dtypes: dtype of every parameter leaf.
      segments: one :class:`Segment` per packed array.
      num_blocks: number of curvature blocks ``B``.
      block_names: a readable name for every block (labels, leaf paths or
        slice indices).
      block_sizes: number of parameters in every block (padding excluded).
      slice_size: for :class:`EqualSlices`, the row length ``n_b``; else None.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    segments: tuple[Segment, ...]
    num_blocks: int
    block_names: tuple[str, ...]
    block_sizes: tuple[int, ...]
    slice_size: int | None = None

    # Packing ------------------------------------------------------------------

    def pack(self, tree: Any) -> list[jax.Array]:
        """Params-shaped pytree -> list of packed arrays."""
        leaves = self.treedef.flatten_up_to(tree)
        if self.slice_size is None:
            return list(leaves)
        dtype = jnp.result_type(*self.dtypes)
        flat = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
        total = self.num_blocks * self.slice_size
        flat = jnp.pad(flat, (0, total - flat.shape[0]))
        return [flat.reshape(self.num_blocks, self.slice_size)]

    def unpack(self, packed: list[jax.Array], dtypes=None) -> Any:
        """List of packed arrays -> params-shaped pytree (cast to ``dtypes``)."""
        dtypes = self.dtypes if dtypes is None else dtypes
        if self.slice_size is None:
            leaves = [x.astype(d) for x, d in zip(packed, dtypes)]
            return self.treedef.unflatten(leaves)
        flat = packed[0].reshape(-1)
        leaves, start = [], 0
        for shape, dtype in zip(self.shapes, dtypes):
            size = math.prod(shape)
            leaves.append(flat[start : start + size].reshape(shape).astype(dtype))
            start += size
        return self.treedef.unflatten(leaves)

    def packed_shapes(self) -> list[tuple[tuple[int, ...], Any]]:
        """(shape, dtype) of every packed array."""
        if self.slice_size is None:
            return list(zip(self.shapes, self.dtypes))
        return [((self.num_blocks, self.slice_size), jnp.result_type(*self.dtypes))]

    def local(self, rows: int) -> "BlockLayout":
        """The layout of ``rows`` consecutive slices: one device's share of them."""
        if self.slice_size is None:
            raise ValueError("only EqualSlices layouts can be split across devices.")
        return dataclasses.replace(
            self,
            segments=(Segment(0, rows),),
            num_blocks=rows,
            block_names=tuple(f"slice{r}" for r in range(rows)),
            block_sizes=(self.slice_size,) * rows,
        )

    # Per-block algebra ------------------------------------------------------

    def block_dot(self, a: list[jax.Array], b: list[jax.Array], dtype) -> jax.Array:
        """Per-block inner products ``<a_b, b_b>``, shape ``(B,)``, in ``dtype``."""
        whole: dict[int, list[jax.Array]] = {}
        rows: list[tuple[int, jax.Array]] = []
        for x, y, seg in zip(a, b, self.segments):
            prod = x.astype(dtype) * y.astype(dtype)
            if seg.rows is None:
                whole.setdefault(seg.offset, []).append(jnp.sum(prod))
            else:
                rows.append((seg.offset, jnp.sum(prod, axis=tuple(range(1, x.ndim)))))
        return self._combine(whole, rows, jnp.add, dtype)

    def block_dot_history(self, history: list[jax.Array], v: list[jax.Array], dtype) -> jax.Array:
        """``<h_m, v>`` per block for every slot ``m`` of ``(M, ...)`` histories: ``(B, M)``."""
        return self._contract_history(history, [x.astype(dtype) for x in v],
                                      "m...,...->m", "mr...,r...->rm", dtype)

    def block_dot_history_many(self, history: list[jax.Array], vs: list[list[jax.Array]],
                               dtype) -> jax.Array:
        """``<h_m, v_k>`` per block for every slot ``m`` and packed vector ``v_k``: ``(B, M, K)``.

        One matrix product per packed array against the stacked vectors, so
        the history is read once for all ``K`` vectors.
        """
        stacked = [jnp.stack([v[j].astype(dtype) for v in vs]) for j in range(len(history))]
        return self._contract_history(history, stacked, "m...,k...->mk", "mr...,kr...->rmk",
                                      dtype)

    def _contract_history(self, history, xs, whole_spec: str, rows_spec: str, dtype):
        """Per-block contractions of each history array with ``xs`` (einsum specs for a
        whole-leaf and a row segment), summed over the arrays of a block."""
        whole: dict[int, list[jax.Array]] = {}
        rows: list[tuple[int, jax.Array]] = []
        for h, x, seg in zip(history, xs, self.segments):
            if seg.rows is None:
                dot = jnp.einsum(whole_spec, h, x, preferred_element_type=dtype,
                                 out_sharding=_replicated_like(x))
                whole.setdefault(seg.offset, []).append(dot.astype(dtype))
            else:
                dot = jnp.einsum(rows_spec, h, x, preferred_element_type=dtype)
                rows.append((seg.offset, dot.astype(dtype)))
        return self._combine(whole, rows, jnp.add, dtype)

    def combine_history(self, coef: jax.Array, history: list[jax.Array], dtype) -> list[jax.Array]:
        """``sum_m coef[b, m] h_m`` for every packed array (``coef``: ``(B, M)``)."""
        out = []
        for j, (h, seg) in enumerate(zip(history, self.segments)):
            if seg.rows is None:
                c = coef[seg.offset]
                out.append(jnp.tensordot(c.astype(dtype), h, axes=1,
                                         preferred_element_type=dtype).astype(dtype))
            else:
                c = coef[seg.offset : seg.offset + seg.rows]
                out.append(jnp.einsum("rm,mr...->r...", c.astype(dtype), h,
                                      preferred_element_type=dtype).astype(dtype))
        return out

    def block_max_abs(self, a: list[jax.Array], dtype) -> jax.Array:
        """Per-block ``max |a_b|``, shape ``(B,)``, in ``dtype``."""
        whole: dict[int, list[jax.Array]] = {}
        rows: list[tuple[int, jax.Array]] = []
        for x, seg in zip(a, self.segments):
            m = jnp.abs(x).astype(dtype)
            if seg.rows is None:
                whole.setdefault(seg.offset, []).append(jnp.max(m, initial=0.0))
            else:
                rows.append((seg.offset, jnp.max(m, axis=tuple(range(1, x.ndim)), initial=0.0)))
        return self._combine(whole, rows, jnp.maximum, dtype)

    def _combine(self, whole, rows, op, dtype) -> jax.Array:
        """Per-block reduction of whole-leaf scalars and row vectors with ``op``."""
        if not whole and len(rows) == 1 and rows[0][1].shape[0] == self.num_blocks:
            return rows[0][1]
        out = [jnp.zeros((), dtype)] * self.num_blocks
        for off, parts in whole.items():
            out[off] = functools.reduce(op, parts)
        for off, vec in rows:
            for r in range(vec.shape[0]):
                out[off + r] = op(out[off + r], vec[r])
        return jnp.stack(out)

    def broadcast(self, c: jax.Array, i: int, ndim: int) -> jax.Array:
        """Per-block values ``c`` (shape ``(B,)`` or ``(B, ...)``) for array ``i``."""
        seg = self.segments[i]
        if seg.rows is None:
            return c[seg.offset]
        return c[seg.offset : seg.offset + seg.rows].reshape((seg.rows,) + (1,) * (ndim - 1))

    def gather_slot(self, history: jax.Array, slots: jax.Array, i: int) -> jax.Array:
        """Row ``slots[block]`` of a ``(M, ...)`` history array, per block."""
        seg = self.segments[i]
        if seg.rows is None:
            return jax.lax.dynamic_index_in_dim(history, slots[seg.offset], 0, keepdims=False)
        idx = slots[seg.offset : seg.offset + seg.rows]
        idx = idx.reshape((1, seg.rows) + (1,) * (history.ndim - 2))
        return jnp.take_along_axis(history, idx, axis=0, mode="clip")[0]

    def scatter_slot(
        self, history: jax.Array, value: jax.Array, slots: jax.Array, write: jax.Array, i: int
    ) -> jax.Array:
        """Write ``value`` at row ``slots[block]`` of ``history`` where ``write[block]``."""
        seg = self.segments[i]
        old = self.gather_slot(history, slots, i)
        new = jnp.where(self.broadcast(write, i, value.ndim), value.astype(history.dtype), old)
        if seg.rows is None:
            return jax.lax.dynamic_update_index_in_dim(history, new, slots[seg.offset], 0)
        idx = slots[seg.offset : seg.offset + seg.rows]
        return history.at[idx, jnp.arange(seg.rows)].set(new, mode="drop")


def _replicated_like(x: jax.Array):
    """A replicated output sharding for a contraction over ``x``'s dimensions.

    Where ``x`` is sharded over Explicit mesh axes (params sharded the ordinary
    way), JAX needs to be told how a contraction over those axes is laid out:
    a per-block dot product is a replicated scalar (an all-reduce of partial
    sums). None elsewhere, which leaves the default.
    """
    s = jax.typeof(x).sharding
    if not any(s.mesh._name_to_type[n] == jax.sharding.AxisType.Explicit
               for n in jax.tree.leaves(tuple(s.spec))):
        return None
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())


def _label_name(label: Hashable) -> str:
    return label if isinstance(label, str) else repr(label)


def _path_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def make_layout(params: Any, blocks: BlockSpec) -> BlockLayout:
    """Builds the static :class:`BlockLayout` of ``params`` for a ``blocks`` spec.

    Args:
      params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes,
        dtypes and structure are read).
      blocks: ``"leaf"`` (one block per parameter leaf), ``"all"`` (one block
        for everything: classic L-BFGS), an :class:`EqualSlices`, a pytree of
        hashable labels with the structure of ``params`` (leaves with the same
        label form one block), or a callable ``params -> labels``.

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
        return BlockLayout(
            treedef=treedef,
            shapes=shapes,
            dtypes=dtypes,
            segments=(Segment(0, k),),
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

    order: dict[Hashable, int] = {}
    for lab in labels:
        order.setdefault(lab, len(order))
    segments = tuple(Segment(order[lab], None) for lab in labels)
    block_sizes = [0] * len(order)
    for seg, size in zip(segments, sizes):
        block_sizes[seg.offset] += size
    return BlockLayout(
        treedef=treedef,
        shapes=shapes,
        dtypes=dtypes,
        segments=segments,
        num_blocks=len(order),
        block_names=tuple(_label_name(lab) for lab in order),
        block_sizes=tuple(block_sizes),
    )
