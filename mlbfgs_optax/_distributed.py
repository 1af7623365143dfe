"""Where the blocks live: one placement abstraction for every device layout.

Every call of the optimizer goes through a :class:`Placement`:

* :class:`Local` -- one device, or a ``jax.jit`` program whose arrays GSPMD
  places (the default);
* :class:`OverAxis` -- inside the user's :func:`jax.shard_map` or
  :func:`jax.pmap`: with :class:`~mlbfgs_optax.EqualSlices` blocks every device
  keeps the state of, and runs the two-loop recursion for, only its
  ``K / N`` slices, and one all-gather assembles the direction;
* :class:`OverMesh` -- a ``jax.jit`` program with a mesh: the state is created
  sharded over one mesh axis and the blocks run in an internal ``shard_map``.

A placement tells how many blocks this call holds (:meth:`Placement.rows`),
builds the initial state (:meth:`Placement.init`) and runs the per-block step
(:meth:`Placement.run`), handing it a :class:`Collectives` whose reductions are
no-ops where there is no device axis. State partition specs derive from the
field table in :mod:`mlbfgs_optax._state`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mlbfgs_optax import _layout
from mlbfgs_optax import _packing
from mlbfgs_optax import _state
from mlbfgs_optax._state import ScaleByMLBFGSState


@dataclasses.dataclass(frozen=True)
class Collectives:
    """Reductions over a device axis; identities when ``axis_name`` is None."""

    axis_name: Optional[str] = None

    def psum(self, x: jax.Array) -> jax.Array:
        return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

    def pmax(self, x: jax.Array) -> jax.Array:
        return x if self.axis_name is None else jax.lax.pmax(x, self.axis_name)

    def any(self, x: jax.Array) -> jax.Array:
        """Logical or of a boolean over the axis."""
        return self.psum(x.astype(jnp.int32)) > 0


# step(layout, g, theta, state, finite, collectives) -> (direction, new_state),
# on packed arrays.
Step = Callable[..., tuple[list, ScaleByMLBFGSState]]


def zeros_like_bucket(x, shape: tuple, dtype) -> jax.Array:
    """Zeros of ``shape`` for a stacked bucket whose first parameter leaf is ``x``:
    placed like ``x`` behind the unsharded leading axes (``P(None, ..., *spec)``)."""
    s = _packing.param_sharding(x)
    if s is None:
        return jnp.zeros(shape, dtype)
    if isinstance(x, jax.core.Tracer):
        # Inside jit the sharding is part of the leaf's type: zeros_like keeps
        # it and broadcasting adds the unsharded leading axes, with no need for
        # a concrete mesh in context.
        return jnp.broadcast_to(jnp.zeros_like(x, dtype=dtype), shape)
    spec = (None,) * (len(shape) - len(x.shape)) + tuple(s.spec)
    return jnp.zeros(shape, dtype, device=NamedSharding(s.mesh, PartitionSpec(*spec)))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Base class: the state lives whole on every device (single device, GSPMD).

    Params-shaped and history fields follow the sharding of the parameter
    leaves they pack (``"leaf"``, ``"all"`` and label blocks): stacked buckets
    (the leaves of one shape and dtype, the packing of leaves split over a
    mesh axis) are sharded ``P(None, *spec)`` of their first leaf (histories
    ``P(None, None, *spec)``), so params sharded FSDP- or tensor-parallel-style
    keep their optimizer state sharded the same way; row-packed buckets hold
    unsplit leaves and are replicated.
    """

    def rows(self, layout: _layout.BlockLayout) -> int:
        """The number of blocks whose state this call holds."""
        return layout.num_blocks

    def init(self, layout: _layout.BlockLayout, zeros: Callable, params=None) -> ScaleByMLBFGSState:
        """The initial state; ``zeros(layout, make)`` builds it for a layout.

        ``make(j, shape, dtype)`` creates packed array ``j`` of a params-shaped
        field; here it follows the sharding of the params leaves of bucket ``j``.
        """
        if params is None or layout.slice_size is not None:
            return zeros(layout, None)
        leaves = layout.treedef.flatten_up_to(params)
        meshes = [s.mesh for s in map(_packing.param_sharding, leaves)
                  if isinstance(s, NamedSharding) and not isinstance(leaves[0], jax.core.Tracer)]
        # The scalars, the per-block fields and the row-packed buckets (which hold
        # no partitioned leaf) live replicated on the params' mesh (not on one
        # default device: with several processes that device set would not even be
        # compatible with the params').
        whole = NamedSharding(meshes[0], PartitionSpec()) if meshes else None

        def make(j, shape, dtype):
            b = layout.buckets[j]
            if b.starts is None:
                return zeros_like_bucket(leaves[b.leaves[0]], shape, dtype)
            return jnp.zeros(shape, dtype, device=whole)

        state = zeros(layout, make)
        if whole is None:
            return state
        small = {f: jax.device_put(getattr(state, f), whole) for f, k in _state.FIELDS.items()
                 if k in (_state.Kind.SCALAR, _state.Kind.BLOCK)}
        return state._replace(**small)

    def run(self, step: Step, layout, g, theta, state, finite):
        """Runs ``step`` on this call's blocks; returns the packed direction and new state."""
        return step(layout, g, theta, state, finite, Collectives())


@dataclasses.dataclass(frozen=True)
class Local(Placement):
    """One device, or GSPMD placing the arrays of a ``jax.jit`` program."""


def _bound_axis_size(axis_name: str) -> Optional[int]:
    """The size of ``axis_name`` inside ``shard_map``/``pmap``; None outside them."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        return None


@dataclasses.dataclass(frozen=True)
class OverAxis(Placement):
    """Inside the user's ``shard_map``/``pmap`` over ``axis_name``.

    Only :class:`~mlbfgs_optax.EqualSlices` blocks are shared; with other
    blocks every device computes every block, with no collective. Outside
    any ``shard_map``/``pmap`` (e.g. building the global state to shard it) it
    behaves like :class:`Local`.
    """

    axis_name: str

    def rows(self, layout):
        if layout.slice_size is None:
            return layout.num_blocks
        n_dev = _bound_axis_size(self.axis_name)
        if n_dev is None:
            return layout.num_blocks
        if layout.num_blocks % n_dev:
            raise ValueError(
                f"scale_by_mlbfgs: EqualSlices({layout.num_blocks}) cannot be shared by the "
                f"{n_dev} devices of axis {self.axis_name!r}; use a multiple of {n_dev} blocks."
            )
        return layout.num_blocks // n_dev

    def init(self, layout, zeros, params=None):
        rows = self.rows(layout)
        if rows == layout.num_blocks:
            return super().init(layout, zeros, params)
        return zeros(layout.local(rows), None)

    def run(self, step, layout, g, theta, state, finite):
        rows = state.rho.shape[0]
        if rows == layout.num_blocks:
            return step(layout, g, theta, state, finite, Collectives())
        start = jax.lax.axis_index(self.axis_name) * rows
        own = lambda x: [jax.lax.dynamic_slice_in_dim(x[0], start, rows, 0)]
        d, new = step(layout.local(rows), own(g), own(theta), state, finite,
                      Collectives(self.axis_name))
        d = [jax.lax.all_gather(d[0], self.axis_name, axis=0, tiled=True, to="invarying")]
        return d, new


@dataclasses.dataclass(frozen=True)
class OverMesh(Placement):
    """A ``jax.jit`` program: blocks sharded over ``axis_name`` of ``mesh``."""

    mesh: jax.sharding.Mesh
    axis_name: str

    def init(self, layout, zeros, params=None):
        specs = state_specs(jax.eval_shape(lambda: zeros(layout, None)), self.axis_name)
        shardings = jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                                 is_leaf=lambda x: isinstance(x, PartitionSpec))
        # Every array is created already sharded: no device ever holds the whole
        # history. Under Explicit axes the sharding is part of the type, which a
        # nested jit's out_shardings alone does not set inside an outer trace.
        make = lambda: constrain(zeros(layout, None), specs, self.mesh)
        return jax.jit(make, out_shardings=shardings)()

    def run(self, step, layout, g, theta, state, finite):
        k_local = layout.num_blocks // self.mesh.shape[self.axis_name]
        local = layout.local(k_local)
        specs = state_specs(state, self.axis_name)
        rows, whole = PartitionSpec(self.axis_name), PartitionSpec()
        coll = Collectives(self.axis_name)

        def body(g0, t0, st, fin):
            d, st = step(local, [g0], [t0], st, fin, coll)
            return [d[0]], st

        in_specs = (rows, rows, specs, whole)
        sharded = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=([rows], specs))
        d, new = sharded(*constrain((g[0], theta[0], state, finite), in_specs, self.mesh))
        if layout.shapes != ((layout.num_blocks, layout.slice_size),):
            # Params are laid out differently: one all-gather of the direction.
            d = [replicate(d[0], self.mesh)]
        # Else params are one (num_blocks, block_size) array, sharded like the
        # blocks (FSDP style): the direction stays sharded, no collective.
        return d, new


def make_placement(axis_name: Optional[str], mesh, blocks) -> Placement:
    """The placement for ``scale_by_mlbfgs``'s ``axis_name`` and ``mesh`` arguments.

    Raises:
      ValueError: for a mesh without a valid axis name, or blocks that cannot
        be sharded over it.
    """
    if mesh is None:
        return Local() if axis_name is None else OverAxis(axis_name)
    if axis_name is None or axis_name not in mesh.axis_names:
        raise ValueError(
            f"scale_by_mlbfgs: axis_name={axis_name!r} is invalid; expected one of the "
            f"mesh's axes {mesh.axis_names} when mesh is given."
        )
    if not isinstance(blocks, _layout.EqualSlices):
        raise ValueError(
            f"scale_by_mlbfgs: blocks={blocks!r} is invalid with mesh; expected "
            "EqualSlices(num_blocks), whose blocks can be sharded."
        )
    n_dev = mesh.shape[axis_name]
    if blocks.num_blocks % n_dev:
        raise ValueError(
            f"scale_by_mlbfgs: blocks=EqualSlices({blocks.num_blocks}) is invalid; expected "
            f"a number of blocks divisible by the {n_dev} devices of axis {axis_name!r}."
        )
    return OverMesh(mesh, axis_name)


# Partition specs -----------------------------------------------------------------


def state_specs(state: ScaleByMLBFGSState, axis_name: Optional[str] = None,
                params_specs: Any = None) -> ScaleByMLBFGSState:
    """PartitionSpecs of a :class:`ScaleByMLBFGSState`, read off the field table.

    For a sliced state (:func:`mlbfgs_optax._state.is_sliced`) and an
    ``axis_name``, the params-shaped fields and the (unit-major) histories
    shard their block rows, the per-block fields their first axis. For the
    other layouts with ``params_specs`` (the params' own specs, a pytree like
    params), every stacked bucket of a params-shaped field takes
    ``P(None, *spec)`` of its leaves and of a history ``P(None, None, *spec)``,
    as ``init`` places them. Every other array is replicated; a row-packed
    bucket holding a leaf that ``params_specs`` shards is an error (its init
    did not see the sharding).
    """
    # Optional fields (None: e.g. ``nu`` without the metric) stay None.
    table = {f: k for f, k in _state.FIELDS.items()
             if getattr(state, f) is not None and k is not _state.Kind.LAYOUT}
    replicated = jax.tree.map(lambda _: PartitionSpec(), state)
    if _state.is_sliced(state):
        if axis_name is None:
            return replicated
        by_kind = {
            _state.Kind.SCALAR: PartitionSpec(),
            _state.Kind.PARAMS: [PartitionSpec(axis_name)],
            _state.Kind.HISTORY: [PartitionSpec(axis_name)],
            _state.Kind.BLOCK: PartitionSpec(axis_name),
        }
        return replicated._replace(**{f: by_kind[k] for f, k in table.items()})
    if params_specs is None:
        return replicated
    layout = state.layout
    leaf_specs = layout.treedef.flatten_up_to(params_specs)
    for b in layout.buckets:
        split = [layout.paths[i] for i in b.leaves
                 if b.starts is not None and jax.tree.leaves(tuple(leaf_specs[i]))]
        if split:
            raise ValueError(
                f"state_partition_specs: params_specs shard {', '.join(split[:3])}, but the "
                "optimizer state holds them in a replicated row-packed buffer: its init did "
                "not see them sharded (under jax.jit or jax.eval_shape with Auto mesh axes) "
                "or packing='rows' was asked for. For a state sharded like the params, build "
                "the optimizer with packing='stacked' (or init on the sharded params).")

    def packed(lead):
        return [PartitionSpec(*(None,) * (lead + 1), *leaf_specs[b.leaves[0]])
                if b.starts is None else PartitionSpec() for b in layout.buckets]

    by_kind = {_state.Kind.PARAMS: packed(0), _state.Kind.HISTORY: packed(1)}
    return replicated._replace(**{f: by_kind[k] for f, k in table.items() if k in by_kind})


def state_partition_specs(opt_state: Any, axis_name: Optional[str] = None,
                          params_specs: Any = None) -> Any:
    """PartitionSpecs for a whole optax state holding mL-BFGS states.

    Every :class:`ScaleByMLBFGSState` inside ``opt_state`` (e.g. the state of
    :func:`~mlbfgs_optax.mlbfgs`) gets the specs its ``init`` gives it: with
    :class:`~mlbfgs_optax.EqualSlices` blocks the block axis on ``axis_name``;
    with ``"leaf"``, ``"all"`` or label blocks and ``params_specs``, the
    stacked buckets (``init`` stacks the leaves of one shape and dtype that a
    mesh axis splits, see ``packing``) take ``P(None, *spec)`` of their first
    leaf, and ``P(None, None, *spec)`` in the histories. Every other leaf is
    replicated. Use it as ``in_specs``/``out_specs`` of :func:`jax.shard_map`
    or to build ``NamedSharding`` for ``jax.device_put``, ``out_shardings`` or
    a checkpoint restore target.

    Args:
      opt_state: an optax state, or its ``jax.eval_shape``.
      axis_name: the mesh axis that shards :class:`~mlbfgs_optax.EqualSlices`
        blocks.
      params_specs: the ``PartitionSpec`` of every parameter (a pytree like
        params), for the other layouts.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``opt_state``.

    Raises:
      ValueError: when ``params_specs`` shard a leaf that the state holds in a
        replicated row-packed buffer (build the optimizer with
        ``packing="stacked"`` for a state sharded like the params).

    Example:
      >>> import jax, jax.numpy as jnp, mlbfgs_optax
      >>> from jax.sharding import PartitionSpec as P
      >>> opt = mlbfgs_optax.mlbfgs(0.1, blocks=mlbfgs_optax.EqualSlices(8))
      >>> specs = mlbfgs_optax.state_partition_specs(
      ...     jax.eval_shape(opt.init, jnp.zeros(64)), "data")
      >>> specs[0].s_history == [P("data")]
      True
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> w = jax.ShapeDtypeStruct((8, 4), jnp.float32,
      ...                          sharding=jax.NamedSharding(mesh, P("x")))
      >>> state = jax.eval_shape(mlbfgs_optax.mlbfgs(0.1).init, {"w": w})
      >>> specs = mlbfgs_optax.state_partition_specs(state, params_specs={"w": P("x")})
      >>> specs[0].grads_avg, specs[0].s_history
      ([P(None, 'x')], [P(None, None, 'x')])
    """
    is_state = lambda x: isinstance(x, ScaleByMLBFGSState)

    def spec(x):
        return state_specs(x, axis_name, params_specs) if is_state(x) else PartitionSpec()

    return jax.tree.map(spec, opt_state, is_leaf=is_state)


def _explicit(mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def constrain(tree: Any, specs: Any, mesh) -> Any:
    """``tree`` laid out as ``specs`` on ``mesh`` (free when it already is).

    Explicit axes need ``jax.sharding.reshard``; Auto axes take a sharding
    constraint.
    """
    to = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    if _explicit(mesh):
        return jax.sharding.reshard(tree, to)
    return jax.lax.with_sharding_constraint(tree, to)


def replicate(x: jax.Array, mesh) -> jax.Array:
    """``x`` replicated over ``mesh`` (an all-gather when it was sharded)."""
    return constrain(x, PartitionSpec(), mesh)
