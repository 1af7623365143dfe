"""_block_ops: the per-block algebra against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from mlbfgs_optax import _block_ops, _layout

PARAMS = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3),
          "b": np.arange(4.0, dtype=np.float32) - 2, "c": np.ones(5, np.float32)}


@pytest.mark.parametrize("blocks,packing", [
    ("leaf", "rows"), ({"a": "x", "b": "y", "c": "x"}, "rows"), ("leaf", "stacked"),
    ({"a": "x", "b": "y", "c": "x"}, "stacked"), (mlbfgs_optax.EqualSlices(4), "auto")])
def test_block_dot_and_max_against_numpy(blocks, packing):
    rng = np.random.default_rng(0)
    layout = _layout.make_layout(PARAMS, blocks, packing)
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
    layout = _layout.make_layout(PARAMS, mlbfgs_optax.EqualSlices(4))
    hist = jnp.zeros((4, 3, 4))  # unit-major: (units, M, row)
    value = jnp.ones((4, 4))
    slots = jnp.asarray([0, 1, 2, 0])
    write = jnp.asarray([True, True, False, True])
    out = layout.scatter_slot(hist, value, slots, write, 0)
    np.testing.assert_array_equal(np.asarray(layout.gather_slot(out, slots, 0)).sum(1),
                                  [4, 4, 0, 4])
    assert float(out.sum()) == 12


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
    fn = lambda h, v: _block_ops._history_matvec(h, v, jnp.float32)  # noqa: E731
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
