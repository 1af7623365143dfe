"""_layout: block specs, which leaves form which buckets, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from mlbfgs_optax import _layout

PARAMS = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3),
          "b": np.arange(4.0, dtype=np.float32) - 2, "c": np.ones(5, np.float32)}


@pytest.mark.parametrize("blocks,names,sizes", [
    ("leaf", ("['a']", "['b']", "['c']"), (6, 4, 5)),
    ("all", ("all",), (15,)),
    ({"a": "x", "b": "y", "c": "x"}, ("x", "y"), (11, 4)),
    (lambda p: {"a": 0, "b": 0, "c": 1}, ("0", "1"), (10, 5)),
    (mlbfgs_optax.EqualSlices(4), ("slice0", "slice1", "slice2", "slice3"), (4, 4, 4, 3)),
])
def test_layout_names_and_sizes(blocks, names, sizes):
    layout = _layout.make_layout(PARAMS, blocks)
    assert layout.block_names == names and layout.block_sizes == sizes
    assert layout.num_blocks == len(names)


def test_auto_packing_stacks_sharded_leaves_and_leaves_under_an_auto_mesh():
    mesh = jax.make_mesh((8,), ("x",))  # Explicit axes: the sharding is in the types
    w = jax.device_put(jnp.zeros((16, 4)), jax.NamedSharding(mesh, jax.P("x")))
    params = {"w": w, "b": jnp.zeros(4)}
    kinds = lambda lay: [b.starts is None for b in lay.buckets]
    assert kinds(_layout.make_layout(params, "leaf")) == [False, True]  # b rows, w stacked
    assert kinds(jax.jit(lambda p: _layout.make_layout(p, "leaf"))(params)) == [False, True]
    assert kinds(_layout.make_layout(params, "leaf", "rows")) == [False]
    auto = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(auto):
        assert kinds(_layout.make_layout({"b": jnp.zeros(4)}, "leaf")) == [True]
    with pytest.raises(ValueError, match="packing"):
        mlbfgs_optax.scale_by_mlbfgs(packing="flat")


def test_large_leaves_are_buckets_of_their_own(monkeypatch):
    """The largest leaves of OWN_BUCKET_SIZE+ numbers are (1, *shape) buckets: at most
    MAX_OWN_BUCKETS of them, all of them with packing="leaves"; with "auto" the other large
    leaves are stacked by shape (at most MAX_LARGE_STACKS stacks), the small ones row-packed."""
    monkeypatch.setattr(_layout, "OWN_BUCKET_SIZE", 6)
    monkeypatch.setattr(_layout, "MAX_OWN_BUCKETS", 2)
    one = lambda *shape: np.ones(shape, np.float32)
    params = {"w0": one(2, 3), "w1": one(3, 3), "w2": one(2, 4), "b": one(5)}
    own = lambda lay: sorted(lay.shapes[b.leaves[0]] for b in lay.buckets
                             if b.starts is None and len(b.leaves) == 1)
    rows = lambda lay: [sorted(lay.shapes[i] for i in b.leaves) for b in lay.buckets
                        if b.starts is not None]
    auto = _layout.make_layout(params, "leaf")
    # The two largest on their own; the other large leaf stacked by shape, not row-packed.
    assert own(auto) == [(2, 3), (2, 4), (3, 3)] and rows(auto) == [[(5,)]]
    monkeypatch.setattr(_layout, "MAX_LARGE_STACKS", 0)
    auto = _layout.make_layout(params, "leaf")
    assert own(auto) == [(2, 4), (3, 3)] and rows(auto) == [[(2, 3), (5,)]]
    monkeypatch.setattr(_layout, "MAX_LARGE_STACKS", 8)
    params["w3"] = one(2, 3)  # two leaves of one shape: one stack of two
    auto = _layout.make_layout(params, "leaf")
    assert sorted(len(b.leaves) for b in auto.buckets if b.starts is None) == [1, 1, 2]
    del params["w3"]
    leaves = _layout.make_layout(params, "leaf", "leaves")
    assert own(leaves) == [(2, 3), (2, 4), (3, 3)]
    assert [len(b.leaves) for b in leaves.buckets if b.starts is not None] == [1]  # b
    x = jax.tree.map(lambda a: jnp.asarray(a) * 2, params)
    back = leaves.unpack(leaves.pack(x))
    jax.tree.map(np.testing.assert_array_equal, back, x)
    mlbfgs_optax.scale_by_mlbfgs(packing="leaves")  # accepted


def test_bad_block_specs():
    with pytest.raises(ValueError, match="same structure as params"):
        mlbfgs_optax.scale_by_mlbfgs(blocks={"a": 0}).init(PARAMS)
    with pytest.raises(ValueError, match="EqualSlices"):
        mlbfgs_optax.EqualSlices(0)
    with pytest.raises(ValueError, match="hashable label"):
        _layout.make_layout(PARAMS, {"a": [1], "b": 0, "c": 0})
    with pytest.raises(ValueError, match="no array leaves"):
        _layout.make_layout({}, "leaf")
    with pytest.raises(ValueError, match="floating"):
        _layout.make_layout({"i": jnp.zeros(3, jnp.int32)}, "leaf")
