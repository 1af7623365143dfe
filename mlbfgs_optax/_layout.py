"""Block layout: how a parameter pytree is cut into curvature blocks and packed.

mL-BFGS approximates the inverse Hessian block-diagonally (Niu et al., 2023,
https://arxiv.org/abs/2307.13744): every block keeps its own history of
curvature pairs and its own two-loop recursion, and no dot product ever crosses
a block. This module turns a user's ``blocks`` argument into a static
:class:`BlockLayout`: which parameter leaves form which of a few large arrays,
*buckets*, and the block of every part of them. The layout *packs* a
parameter-shaped pytree into its buckets and *unpacks* them again
(:class:`~mlbfgs_optax._packing.Packing`), and runs the per-block algebra on
them (:class:`~mlbfgs_optax._block_ops.BlockOps`).

Every bucket is an array of shape ``(U, ...)`` whose leading index runs over
*units*, and every unit belongs to one block
(:attr:`~mlbfgs_optax._packing.Bucket.unit_block`, a static table). The
optimizer's per-block algebra works on whole buckets: a per-block dot product
is one product and reduction per bucket, then a segment sum of the ``U`` unit
sums into the ``B`` blocks. So the traced and compiled program has a size set
by the number of buckets, not by the number of parameter leaves or blocks:

* a *row-packed* bucket (``"leaf"``, ``"all"`` and label blocks, by default)
  holds every leaf of one dtype: each leaf raveled, zero-padded to whole rows
  of a common length (:func:`~mlbfgs_optax._packing.row_length`) and the rows
  concatenated, ``(rows, row_length)``; a unit is a row, and every row lies in
  one leaf, so in one block. A model has one bucket per dtype, however many
  leaves and shapes it has;
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

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mlbfgs_optax import _block_ops
from mlbfgs_optax import _packing


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
class BlockLayout(_packing.Packing, _block_ops.BlockOps):
    """Static description of how params map onto curvature blocks and packed buckets.

    A layout is static data (a pytree with no leaves): the optimizer state
    holds the layout it was made with. It packs and unpacks pytrees
    (:class:`~mlbfgs_optax._packing.Packing`) and runs the per-block algebra
    on the packed arrays (:class:`~mlbfgs_optax._block_ops.BlockOps`).

    Attributes:
      treedef: tree structure of the parameters.
      paths: the key path of every parameter leaf (:func:`~mlbfgs_optax._packing._key_path`).
      shapes: shape of every parameter leaf.
      dtypes: dtype of every parameter leaf.
      buckets: the packed arrays (:class:`~mlbfgs_optax._packing.Bucket`).
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
    buckets: tuple[_packing.Bucket, ...]
    num_blocks: int
    block_names: tuple[str, ...]
    block_sizes: tuple[int, ...]
    slice_size: int | None = None


jax.tree_util.register_static(BlockLayout)


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


def _label_name(label: Hashable) -> str:
    return label if isinstance(label, str) else repr(label)


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
    _check_leaves(paths, leaves)
    shapes = tuple(tuple(int(d) for d in x.shape) for x in leaves)
    dtypes = tuple(jnp.dtype(x.dtype) for x in leaves)
    sizes = [math.prod(s) for s in shapes]
    structure = dict(treedef=treedef, paths=tuple(_packing._key_path(p) for p in paths),
                     shapes=shapes, dtypes=dtypes)
    if isinstance(blocks, EqualSlices):
        return _equal_slices_layout(blocks, structure, sizes)

    labels = _labels(params, blocks, treedef, paths)
    groups = _member_groups(leaves, _stacked(leaves, packing),
                            None if packing == "leaves" else MAX_OWN_BUCKETS,
                            MAX_LARGE_STACKS if packing == "auto" else 0)
    order = _block_order(labels, groups, isinstance(blocks, str) and blocks == "leaf")
    leaf_block = [order[lab] for lab in labels]
    block_sizes = [0] * len(order)
    for blk, size in zip(leaf_block, sizes):
        block_sizes[blk] += size
    return BlockLayout(
        **structure,
        buckets=_packing._buckets(leaves, groups, leaf_block),
        num_blocks=len(order),
        block_names=tuple(_label_name(lab) for lab in order),
        block_sizes=tuple(block_sizes),
    )


def _check_leaves(paths: list, leaves: list) -> None:
    """Raises a ValueError unless every leaf is a real floating-point array."""
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


def _equal_slices_layout(blocks: EqualSlices, structure: dict, sizes: list[int]) -> BlockLayout:
    """The :class:`EqualSlices` layout: one flat bucket of ``K`` rows, one block each.

    ``structure``: the :class:`BlockLayout` fields that describe the leaves.
    """
    total = sum(sizes)
    k = int(blocks.num_blocks)
    n_b = max(1, -(-total // k))
    block_sizes = tuple(max(0, min(n_b, total - r * n_b)) for r in range(k))
    starts = tuple(int(s) for s in np.cumsum([0] + sizes[:-1]))
    bucket = _packing.Bucket(tuple(range(len(sizes))), starts, (k, n_b),
                             jnp.result_type(*structure["dtypes"]), tuple(range(k)))
    return BlockLayout(
        **structure,
        buckets=(bucket,),
        num_blocks=k,
        block_names=tuple(f"slice{r}" for r in range(k)),
        block_sizes=block_sizes,
        slice_size=n_b,
    )


def _labels(params: Any, blocks: BlockSpec, treedef: Any, paths: list) -> list:
    """The block label of every leaf, for a ``"leaf"``, ``"all"``, label pytree or callable spec."""
    if isinstance(blocks, str):
        if blocks == "leaf":
            return [_path_name(p) for p in paths]
        if blocks == "all":
            return ["all"] * len(paths)
        raise ValueError(
            f"scale_by_mlbfgs: blocks={blocks!r} is not one of 'leaf', 'all', an "
            "EqualSlices, a label pytree or a callable params -> labels."
        )
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
    return labels


def _stacked(leaves: list, packing: str) -> list[bool]:
    """Which leaves ``packing`` stacks by shape, before :func:`_member_groups` places the
    large ones: for ``"auto"`` and ``"leaves"``, those split over a mesh axis (all of them
    under a mesh with Auto axes set in context).

    Raises:
      ValueError: for an unknown ``packing``.
    """
    if packing not in ("auto", "rows", "stacked", "leaves"):
        raise ValueError(f"scale_by_mlbfgs: packing={packing!r} is invalid; expected 'auto', "
                         "'rows', 'stacked' or 'leaves'.")
    auto_mesh = _auto_mesh_in_context()
    by_mesh = lambda x: auto_mesh or _packing._partitioned(x) is not None
    stacked = {"rows": lambda x: False, "stacked": lambda x: True, "auto": by_mesh,
               "leaves": by_mesh}[packing]
    return [stacked(x) for x in leaves]


def _block_order(labels: list, groups: list[tuple[bool, list[int]]],
                 by_bucket: bool) -> dict[Hashable, int]:
    """The index of every block label: in order of first leaf, or bucket by bucket."""
    order: dict[Hashable, int] = {}
    if by_bucket:
        # Bucket by bucket: the blocks of every bucket are then consecutive, and the
        # per-block algebra slices and concatenates instead of gathering and scattering.
        for _, members in groups:
            for i in members:
                order.setdefault(labels[i], len(order))
    for lab in labels:
        order.setdefault(lab, len(order))
    return order
