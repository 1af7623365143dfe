"""The two-loop recursion against a dense BFGS inverse (tests/helpers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from mlbfgs_optax import _layout, _two_loop
from tests.helpers import damp, dense_bfgs_inverse


def _random_pairs(rng, n, k):
    pairs = []
    for _ in range(k):
        s = rng.normal(size=n)
        y = rng.normal(size=n)
        _, y_hat, _ = damp(s, y, 0.1, 1.5, 1.0)
        pairs.append((s, y_hat))
    return pairs


def _ring(pairs, memory, newest):
    """Places pairs (oldest -> newest) in a ring buffer whose newest slot is `newest`."""
    n = pairs[0][0].shape[0]
    s_hist = np.zeros((memory, n))
    y_hist = np.zeros((memory, n))
    rho = np.zeros(memory)
    for age, (s, y) in enumerate(reversed(pairs)):
        slot = (newest - age) % memory
        s_hist[slot], y_hist[slot], rho[slot] = s, y, 1.0 / (s @ y)
    return s_hist, y_hist, rho


# memory 3 already wraps the ring at every position; memory 5 (7 s) runs in the slow tier.
@pytest.mark.parametrize("memory", [1, 3, pytest.param(5, marks=pytest.mark.slow)])
def test_matches_dense_bfgs_for_every_ring_position(memory):
    rng = np.random.default_rng(memory)
    n = 7
    g = rng.normal(size=n)
    with jax.enable_x64(True):
        for num_pairs in range(memory + 1):
            pairs = _random_pairs(rng, n, num_pairs)
            gamma = 0.7
            h = dense_bfgs_inverse(pairs, gamma, n)
            for newest in range(memory):
                if num_pairs == 0:
                    s_hist = y_hist = np.zeros((memory, n))
                    rho = np.zeros(memory)
                else:
                    s_hist, y_hist, rho = _ring(pairs, memory, newest)
                d = mlbfgs_optax.two_loop_recursion(
                    jnp.asarray(g), jnp.asarray(s_hist), jnp.asarray(y_hist),
                    jnp.asarray(rho), jnp.asarray(gamma), jnp.asarray(newest))
                np.testing.assert_allclose(np.asarray(d), h @ g, rtol=1e-10, atol=1e-12)


def test_pytree_equals_flat_vector():
    rng = np.random.default_rng(0)
    shapes = {"a": (2, 3), "b": (4,), "c": ()}
    n = 11
    pairs = _random_pairs(rng, n, 4)
    s_hist, y_hist, rho = _ring(pairs, 4, 2)
    g = rng.normal(size=n)

    def split(v, lead=()):
        out, start = {}, 0
        for k in sorted(shapes):
            size = int(np.prod(shapes[k]))
            out[k] = jnp.asarray(v[..., start:start + size].reshape(lead + shapes[k]))
            start += size
        return out

    with jax.enable_x64(True):
        d_tree = mlbfgs_optax.two_loop_recursion(
            split(g), split(s_hist, (4,)), split(y_hist, (4,)), jnp.asarray(rho),
            jnp.asarray(0.5), jnp.asarray(2))
        d_flat = dense_bfgs_inverse(pairs, 0.5, n) @ g
    np.testing.assert_allclose(
        np.concatenate([np.ravel(d_tree[k]) for k in sorted(shapes)]), d_flat, rtol=1e-10)
    assert jax.tree.structure(d_tree) == jax.tree.structure(split(g))


def test_positive_definite_with_damped_pairs():
    rng = np.random.default_rng(1)
    n = 6
    pairs = _random_pairs(rng, n, 5)
    s_hist, y_hist, rho = _ring(pairs, 5, 4)
    for _ in range(20):
        g = rng.normal(size=n).astype(np.float32)
        d = mlbfgs_optax.two_loop_recursion(
            jnp.asarray(g), jnp.asarray(s_hist, jnp.float32), jnp.asarray(y_hist, jnp.float32),
            jnp.asarray(rho, jnp.float32), jnp.asarray(1.0), jnp.asarray(4))
        assert float(g @ np.asarray(d)) > 0


def test_blockwise_equals_each_block_alone():
    """Two blocks with their own histories = two independent two-loops."""
    rng = np.random.default_rng(2)
    params = {"u": np.zeros(4), "v": np.zeros(3)}  # float64 leaves
    layout = _layout.make_layout(params, "leaf")
    memory = 3
    pairs_u, pairs_v = _random_pairs(rng, 4, 2), _random_pairs(rng, 3, 3)
    su, yu, ru = _ring(pairs_u, memory, 0)
    sv, yv, rv = _ring(pairs_v, memory, 2)
    g = {"u": rng.normal(size=4), "v": rng.normal(size=3)}
    with jax.enable_x64(True):
        pk = lambda t: layout.pack(jax.tree.map(jnp.asarray, t))
        hist = lambda t: layout.pack_history(jax.tree.map(jnp.asarray, t))
        d = _two_loop.blockwise_two_loop(
            layout, pk(g), hist({"u": su, "v": sv}), hist({"u": yu, "v": yv}),
            jnp.asarray(np.stack([ru, rv])), jnp.asarray([0.5, 2.0]), jnp.asarray([0, 2]))
        d = layout.unpack(d)
    np.testing.assert_allclose(d["u"], dense_bfgs_inverse(pairs_u, 0.5, 4) @ g["u"], rtol=1e-10)
    np.testing.assert_allclose(d["v"], dense_bfgs_inverse(pairs_v, 2.0, 3) @ g["v"], rtol=1e-10)


def test_equal_slices_rows_are_blocks():
    """Row segments (EqualSlices) run one recursion per row, with per-row slots."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.zeros((2, 5)), "b": jnp.zeros(2)}  # 12 numbers -> 3 rows of 4
    layout = _layout.make_layout(params, mlbfgs_optax.EqualSlices(3))
    memory = 2
    rows = [_random_pairs(rng, 4, k) for k in (1, 2, 2)]
    rings = [_ring(p, memory, nw) for p, nw in zip(rows, (1, 0, 1))]
    s_hist = np.stack([r[0] for r in rings])  # unit-major: (3, M, 4)
    y_hist = np.stack([r[1] for r in rings])
    rho = np.stack([r[2] for r in rings])  # (3, M)
    g = rng.normal(size=(3, 4))
    gammas = np.array([1.0, 0.3, 3.0])
    with jax.enable_x64(True):
        d = _two_loop.blockwise_two_loop(
            layout, [jnp.asarray(g)], [jnp.asarray(s_hist)], [jnp.asarray(y_hist)],
            jnp.asarray(rho), jnp.asarray(gammas), jnp.asarray([1, 0, 1]))
    for r in range(3):
        ref = dense_bfgs_inverse(rows[r], gammas[r], 4) @ g[r]
        np.testing.assert_allclose(np.asarray(d[0][r]), ref, rtol=1e-10)


def test_bfloat16_history_accumulates_in_float32():
    rng = np.random.default_rng(4)
    pairs = _random_pairs(rng, 8, 3)
    s_hist, y_hist, rho = _ring(pairs, 3, 2)
    g = jnp.asarray(rng.normal(size=8), jnp.bfloat16)
    d = mlbfgs_optax.two_loop_recursion(
        g, jnp.asarray(s_hist, jnp.bfloat16), jnp.asarray(y_hist, jnp.bfloat16),
        jnp.asarray(rho, jnp.float32), jnp.asarray(1.0), jnp.asarray(2))
    assert d.dtype == jnp.bfloat16
    ref = dense_bfgs_inverse(pairs, 1.0, 8) @ np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(d, np.float64), ref, rtol=0.05, atol=0.05)
    assert _two_loop.accumulation_dtype(jnp.bfloat16) == jnp.float32


@pytest.mark.parametrize("blocks", ["leaf", mlbfgs_optax.EqualSlices(3)], ids=["leaf", "slices"])
def test_gram_form_equals_two_loops(blocks):
    """blockwise_two_loop_gram (used by the optimizer) = the scan two-loop, with
    partly empty ring buffers and per-block newest slots."""
    rng = np.random.default_rng(5)
    memory = 4
    with jax.enable_x64(True):
        layout = _layout.make_layout({"a": np.zeros((3, 4)), "b": np.zeros(5)}, blocks)
        packed = [np.zeros(s) for s, _ in layout.packed_shapes()]
        b = layout.num_blocks
        s_hist = [rng.normal(size=(memory,) + x.shape) for x in packed]
        y_hist = [s + 0.3 * rng.normal(size=s.shape) for s in s_hist]
        as_j = lambda xs: [jnp.asarray(x) for x in xs]
        unit_major = lambda xs: [jnp.asarray(np.moveaxis(x, 0, 1)) for x in xs]
        slot = lambda xs, p: [jnp.asarray(x[p]) for x in xs]
        dot = lambda u, v: np.asarray(layout.block_dot(u, v, jnp.float64))
        sy = np.stack([[dot(slot(s_hist, p), slot(y_hist, q)) for q in range(memory)]
                       for p in range(memory)])  # (M, M, B)
        yy = np.stack([[dot(slot(y_hist, p), slot(y_hist, q)) for q in range(memory)]
                       for p in range(memory)])
        rho = 1.0 / np.stack([sy[p, p] for p in range(memory)], axis=1)  # (B, M)
        newest = rng.integers(0, memory, size=b)
        rho[np.arange(b), (newest + 1) % memory] = 0.0  # one empty slot per block
        args = (as_j(rng.normal(size=x.shape) for x in packed), unit_major(s_hist),
                unit_major(y_hist),
                jnp.asarray(rho), jnp.asarray(rng.uniform(0.5, 2.0, size=b)),
                jnp.asarray(newest, jnp.int32))
        d_scan = _two_loop.blockwise_two_loop(layout, *args)
        d_gram = _two_loop.blockwise_two_loop_gram(
            layout, *args, jnp.asarray(np.moveaxis(sy, 2, 0)), jnp.asarray(np.moveaxis(yy, 2, 0)))
    for x, y in zip(d_scan, d_gram):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-10, atol=1e-12)
