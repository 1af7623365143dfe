"""_blocks: layouts, packing and the per-block algebra against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from mlbfgs_optax import _blocks

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
    layout = _blocks.make_layout(PARAMS, blocks)
    assert layout.block_names == names and layout.block_sizes == sizes
    assert layout.num_blocks == len(names)


@pytest.mark.parametrize("blocks,packing", [("leaf", "rows"), ("all", "rows"),
                                            ("leaf", "stacked"),
                                            (mlbfgs_optax.EqualSlices(4), "auto")])
def test_pack_unpack_round_trip(blocks, packing):
    layout = _blocks.make_layout(PARAMS, blocks, packing)
    packed = layout.pack(jax.tree.map(jnp.asarray, PARAMS))
    assert [tuple(x.shape) for x in packed] == [s for s, _ in layout.packed_shapes()]
    back = layout.unpack(packed)
    for k in PARAMS:
        np.testing.assert_array_equal(np.asarray(back[k]), PARAMS[k].astype(np.float32))


@pytest.mark.parametrize("blocks,packing", [
    ("leaf", "rows"), ({"a": "x", "b": "y", "c": "x"}, "rows"), ("leaf", "stacked"),
    ({"a": "x", "b": "y", "c": "x"}, "stacked"), (mlbfgs_optax.EqualSlices(4), "auto")])
def test_block_dot_and_max_against_numpy(blocks, packing):
    rng = np.random.default_rng(0)
    layout = _blocks.make_layout(PARAMS, blocks, packing)
    u = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), PARAMS)
    v = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), PARAMS)
    pu, pv = layout.pack(u), layout.pack(v)
    dots = np.asarray(layout.block_dot(pu, pv, jnp.float32))
    maxes = np.asarray(layout.block_max_abs(pu, jnp.float32))
    if isinstance(blocks, mlbfgs_optax.EqualSlices):
        fu = np.concatenate([np.ravel(u[k]) for k in sorted(u)] + [np.zeros(1)])
        fv = np.concatenate([np.ravel(v[k]) for k in sorted(v)] + [np.zeros(1)])
        ref = [(fu[r * 4:(r + 1) * 4], fv[r * 4:(r + 1) * 4]) for r in range(4)]
    else:
        labels = ({k: k for k in PARAMS} if blocks == "leaf" else blocks)
        order = list(dict.fromkeys(labels[k] for k in sorted(PARAMS)))
        ref = [(np.concatenate([np.ravel(u[k]) for k in sorted(u) if labels[k] == lab]),
                np.concatenate([np.ravel(v[k]) for k in sorted(v) if labels[k] == lab]))
               for lab in order]
    np.testing.assert_allclose(dots, [a @ b for a, b in ref], rtol=1e-5)
    np.testing.assert_allclose(maxes, [np.abs(a).max() for a, _ in ref], rtol=1e-6)


def test_scatter_and_gather_slot_per_block():
    layout = _blocks.make_layout(PARAMS, mlbfgs_optax.EqualSlices(4))
    hist = jnp.zeros((4, 3, 4))  # unit-major: (units, M, row)
    value = jnp.ones((4, 4))
    slots = jnp.asarray([0, 1, 2, 0])
    write = jnp.asarray([True, True, False, True])
    out = layout.scatter_slot(hist, value, slots, write, 0)
    np.testing.assert_array_equal(np.asarray(layout.gather_slot(out, slots, 0)).sum(1),
                                  [4, 4, 0, 4])
    assert float(out.sum()) == 12


def test_row_packing_pads_every_leaf_to_whole_rows():
    """One bucket per dtype, every leaf from a row boundary, zero padding, every row in the
    block of its leaf; the row length keeps the padding within MAX_PADDING."""
    params = {"w": np.ones((3, 7), np.float32), "b": np.ones(5, np.float32),
              "h": np.ones(4, np.float16), "e": np.ones((0, 3), np.float32)}
    layout = _blocks.make_layout(params, "leaf")
    assert [b.dtype for b in layout.buckets] == [jnp.float32, jnp.float16]
    full, half = layout.buckets  # blocks numbered bucket by bucket: b, e, w, then h
    assert full.shape == (4, 8) and full.starts == (0, 8, 8)  # b, e (empty), w
    assert full.unit_block == (0, 2, 2, 2) and layout.block_sizes == (5, 0, 21, 4)
    assert half.shape == (1, 8) and half.unit_block == (3,)
    packed = layout.pack(jax.tree.map(jnp.asarray, params))
    np.testing.assert_array_equal(np.asarray(packed[0]).ravel(),
                                  [1] * 5 + [0] * 3 + [1] * 21 + [0] * 3)
    assert _blocks.row_length([100]) == 8 and _blocks.row_length([1 << 20]) == 4096
    for sizes in ([4096, 64] * 3, [3000, 30], [1, 2, 3], [7]):
        r = _blocks.row_length(sizes)
        padded = sum(-(-n // r) * r for n in sizes)
        assert r == _blocks.ROW_LENGTHS[0] or padded - sum(sizes) <= _blocks.MAX_PADDING * padded


def test_auto_packing_stacks_sharded_leaves_and_leaves_under_an_auto_mesh():
    mesh = jax.make_mesh((8,), ("x",))  # Explicit axes: the sharding is in the types
    w = jax.device_put(jnp.zeros((16, 4)), jax.NamedSharding(mesh, jax.P("x")))
    params = {"w": w, "b": jnp.zeros(4)}
    kinds = lambda lay: [b.starts is None for b in lay.buckets]
    assert kinds(_blocks.make_layout(params, "leaf")) == [False, True]  # b rows, w stacked
    assert kinds(jax.jit(lambda p: _blocks.make_layout(p, "leaf"))(params)) == [False, True]
    assert kinds(_blocks.make_layout(params, "leaf", "rows")) == [False]
    auto = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(auto):
        assert kinds(_blocks.make_layout({"b": jnp.zeros(4)}, "leaf")) == [True]
    with pytest.raises(ValueError, match="packing"):
        mlbfgs_optax.scale_by_mlbfgs(packing="flat")


def test_large_leaves_are_buckets_of_their_own(monkeypatch):
    """The largest leaves of OWN_BUCKET_SIZE+ numbers are (1, *shape) buckets: at most
    MAX_OWN_BUCKETS of them, all of them with packing="leaves"; with "auto" the other large
    leaves are stacked by shape (at most MAX_LARGE_STACKS stacks), the small ones row-packed."""
    monkeypatch.setattr(_blocks, "OWN_BUCKET_SIZE", 6)
    monkeypatch.setattr(_blocks, "MAX_OWN_BUCKETS", 2)
    one = lambda *shape: np.ones(shape, np.float32)
    params = {"w0": one(2, 3), "w1": one(3, 3), "w2": one(2, 4), "b": one(5)}
    own = lambda lay: sorted(lay.shapes[b.leaves[0]] for b in lay.buckets
                             if b.starts is None and len(b.leaves) == 1)
    rows = lambda lay: [sorted(lay.shapes[i] for i in b.leaves) for b in lay.buckets
                        if b.starts is not None]
    auto = _blocks.make_layout(params, "leaf")
    # The two largest on their own; the other large leaf stacked by shape, not row-packed.
    assert own(auto) == [(2, 3), (2, 4), (3, 3)] and rows(auto) == [[(5,)]]
    monkeypatch.setattr(_blocks, "MAX_LARGE_STACKS", 0)
    auto = _blocks.make_layout(params, "leaf")
    assert own(auto) == [(2, 4), (3, 3)] and rows(auto) == [[(2, 3), (5,)]]
    monkeypatch.setattr(_blocks, "MAX_LARGE_STACKS", 8)
    params["w3"] = one(2, 3)  # two leaves of one shape: one stack of two
    auto = _blocks.make_layout(params, "leaf")
    assert sorted(len(b.leaves) for b in auto.buckets if b.starts is None) == [1, 1, 2]
    del params["w3"]
    leaves = _blocks.make_layout(params, "leaf", "leaves")
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
        _blocks.make_layout(PARAMS, {"a": [1], "b": 0, "c": 0})
    with pytest.raises(ValueError, match="no array leaves"):
        _blocks.make_layout({}, "leaf")
    with pytest.raises(ValueError, match="floating"):
        _blocks.make_layout({"i": jnp.zeros(3, jnp.int32)}, "leaf")


@pytest.mark.parametrize("shape", [(1, 4, 64, 32), (4, 4, 1024), (2, 4, 3, 3, 8)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_history_products_of_narrow_histories(shape, dtype):
    """A history's products equal those of its float64 upcast. A bfloat16 history is
    read as it is on CPU (no float32 copy of it in the compiled program, which the
    mixed-precision product makes) and lowers to the product on GPU and TPU; other
    dtypes are products everywhere."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=shape), dtype)
    v = jnp.asarray(rng.normal(size=shape[:1] + shape[2:]), jnp.float32)
    fn = lambda h, v: _blocks._history_matvec(h, v, jnp.float32)  # noqa: E731
    h64, v64 = np.asarray(h, np.float64), np.asarray(v, np.float64)
    expect = np.einsum("umn,un->um", h64.reshape(shape[:2] + (-1,)), v64.reshape(shape[0], -1))
    np.testing.assert_allclose(jax.jit(fn)(h, v), expect, rtol=1e-5, atol=1e-4)
    traced = jax.jit(fn).trace(h, v)
    for platform in ("cuda", "tpu"):
        assert "dot_general" in traced.lower(lowering_platforms=(platform,)).as_text()
    on_cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert ("dot_general" in on_cpu) == (dtype != jnp.bfloat16)
    if dtype == jnp.bfloat16:
        compiled = jax.jit(fn).lower(h, v).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < h.size * 4
