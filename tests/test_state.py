"""_state: the field table, the initial state and the layout-kind invariant."""

import jax
import jax.numpy as jnp
import pytest

import mlbfgs_optax
from mlbfgs_optax import _layout, _state

PARAMS = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}


def test_table_lists_every_field_in_order():
    assert tuple(_state.FIELDS) == mlbfgs_optax.ScaleByMLBFGSState._fields
    kinds = {k: _state.fields_of(k) for k in _state.Kind}
    assert kinds[_state.Kind.HISTORY] == ("s_history", "y_history")
    assert kinds[_state.Kind.PARAMS] == (
        "params_avg", "grads_avg", "params_snapshot", "grads_snapshot", "nu", "direction_avg")


@pytest.mark.parametrize("blocks", ["leaf", "all", mlbfgs_optax.EqualSlices(4)])
def test_zeros_state_shapes_follow_the_table(blocks):
    layout = _layout.make_layout(PARAMS, blocks)
    m = 3
    st = _state.zeros_state(layout, m, True, _state.dtypes(layout), metric=True,
                            momentum=True)
    packed = [s for s, _ in layout.packed_shapes()]
    b = layout.num_blocks
    for name, kind in _state.FIELDS.items():
        value = getattr(st, name)
        shapes = [tuple(x.shape) for x in jax.tree.leaves(value)]
        if kind is _state.Kind.PARAMS:
            assert shapes == packed, name
        elif kind is _state.Kind.HISTORY:
            assert shapes == [s[:1] + (m,) + s[1:] for s in packed], name  # unit-major
        elif kind is _state.Kind.BLOCK:
            assert shapes[0][0] == b, name
    assert len({id(x) for x in jax.tree.leaves(st)}) == len(jax.tree.leaves(st))
    # Without the metric its second moment is absent (None), without momentum the
    # direction's average; nothing else changes.
    plain = _state.zeros_state(layout, m, True, _state.dtypes(layout))
    assert plain.nu is None and plain.direction_avg is None
    full = plain._replace(nu=st.nu, direction_avg=st.direction_avg)
    assert jax.tree.structure(full) == jax.tree.structure(st)


@pytest.mark.parametrize("params,blocks,sliced", [
    (PARAMS, "leaf", False),
    ([jnp.zeros((8, 3))], "leaf", False),  # one leaf shaped like a sliced array
    ([jnp.zeros((1, 3))], "leaf", False),
    (PARAMS, mlbfgs_optax.EqualSlices(4), True),
    (PARAMS, mlbfgs_optax.EqualSlices(1), False),
    ({"a": jnp.zeros(3), "b": jnp.zeros(3)}, "all", False),
])
def test_is_sliced_from_the_layout_invariant(params, blocks, sliced):
    st = mlbfgs_optax.scale_by_mlbfgs(blocks=blocks).init(params)
    assert _state.is_sliced(st) == sliced
