"""_packing: packing params into buckets and back, and the row format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from mlbfgs_optax import _layout, _packing

PARAMS = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3),
          "b": np.arange(4.0, dtype=np.float32) - 2, "c": np.ones(5, np.float32)}


@pytest.mark.parametrize("blocks,packing", [("leaf", "rows"), ("all", "rows"),
                                            ("leaf", "stacked"),
                                            (mlbfgs_optax.EqualSlices(4), "auto")])
def test_pack_unpack_round_trip(blocks, packing):
    layout = _layout.make_layout(PARAMS, blocks, packing)
    packed = layout.pack(jax.tree.map(jnp.asarray, PARAMS))
    assert [tuple(x.shape) for x in packed] == [s for s, _ in layout.packed_shapes()]
    back = layout.unpack(packed)
    for k in PARAMS:
        np.testing.assert_array_equal(np.asarray(back[k]), PARAMS[k].astype(np.float32))


def test_row_packing_pads_every_leaf_to_whole_rows():
    """One bucket per dtype, every leaf from a row boundary, zero padding, every row in the
    block of its leaf; the row length keeps the padding within MAX_PADDING."""
    params = {"w": np.ones((3, 7), np.float32), "b": np.ones(5, np.float32),
              "h": np.ones(4, np.float16), "e": np.ones((0, 3), np.float32)}
    layout = _layout.make_layout(params, "leaf")
    assert [b.dtype for b in layout.buckets] == [jnp.float32, jnp.float16]
    full, half = layout.buckets  # blocks numbered bucket by bucket: b, e, w, then h
    assert full.shape == (4, 8) and full.starts == (0, 8, 8)  # b, e (empty), w
    assert full.unit_block == (0, 2, 2, 2) and layout.block_sizes == (5, 0, 21, 4)
    assert half.shape == (1, 8) and half.unit_block == (3,)
    packed = layout.pack(jax.tree.map(jnp.asarray, params))
    np.testing.assert_array_equal(np.asarray(packed[0]).ravel(),
                                  [1] * 5 + [0] * 3 + [1] * 21 + [0] * 3)
    assert _packing.row_length([100]) == 8 and _packing.row_length([1 << 20]) == 4096
    for sizes in ([4096, 64] * 3, [3000, 30], [1, 2, 3], [7]):
        r = _packing.row_length(sizes)
        padded = sum(-(-n // r) * r for n in sizes)
        assert r == _packing.ROW_LENGTHS[0] or padded - sum(sizes) <= _packing.MAX_PADDING * padded
