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


@pytest.mark.parametrize("blocks", ["leaf", "all", mlbfgs_optax.EqualSlices(4)])
def test_pack_unpack_round_trip(blocks):
    layout = _blocks.make_layout(PARAMS, blocks)
    packed = layout.pack(jax.tree.map(jnp.asarray, PARAMS))
    assert [tuple(x.shape) for x in packed] == [s for s, _ in layout.packed_shapes()]
    back = layout.unpack(packed)
    for k in PARAMS:
        np.testing.assert_array_equal(np.asarray(back[k]), PARAMS[k].astype(np.float32))


@pytest.mark.parametrize("blocks", ["leaf", {"a": "x", "b": "y", "c": "x"},
                                    mlbfgs_optax.EqualSlices(4)])
def test_block_dot_and_max_against_numpy(blocks):
    rng = np.random.default_rng(0)
    layout = _blocks.make_layout(PARAMS, blocks)
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
    hist = jnp.zeros((3, 4, 4))
    value = jnp.ones((4, 4))
    slots = jnp.asarray([0, 1, 2, 0])
    write = jnp.asarray([True, True, False, True])
    out = layout.scatter_slot(hist, value, slots, write, 0)
    np.testing.assert_array_equal(np.asarray(layout.gather_slot(out, slots, 0)).sum(1),
                                  [4, 4, 0, 4])
    assert float(out.sum()) == 12


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
