"""The two-pass direction (mlbfgs_optax/_direction.py) against the scan two-loop and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from mlbfgs_optax import _direction, _layout, _two_loop
from tests.helpers import damp


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _history(rng, layout, memory, num_pairs, newest):
    """A ring buffer of damped random pairs in ``layout``'s packing, with rho and grams."""
    n = sum(layout.block_sizes)
    s_hist, y_hist = np.zeros((memory, n)), np.zeros((memory, n))
    rho = np.zeros(memory)
    for age in range(num_pairs):
        s, y = rng.normal(size=n), rng.normal(size=n)
        _, y_hat, _ = damp(s, y, 0.1, 1.5, 1.0)
        slot = (newest - age) % memory
        s_hist[slot], y_hist[slot], rho[slot] = s, y_hat, 1.0 / (s @ y_hat)
    return s_hist, y_hist, rho


# Both memory sizes (unrolled and contracted combine) and both bucket kinds run in CI,
# crossed; the other two crossings in the slow tier.
@pytest.mark.parametrize("blocks,memory", [
    ("all", 3), (mlbfgs_optax.EqualSlices(1), _direction.MAX_UNROLLED_MEMORY + 2),
    pytest.param("all", _direction.MAX_UNROLLED_MEMORY + 2, marks=pytest.mark.slow),
    pytest.param(mlbfgs_optax.EqualSlices(1), 3, marks=pytest.mark.slow)],
    ids=["all-3", f"slices-{_direction.MAX_UNROLLED_MEMORY + 2}",
         f"all-{_direction.MAX_UNROLLED_MEMORY + 2}", "slices-3"])
def test_coefficients_and_combine_equal_scan_two_loop(memory, blocks):
    """d = gamma q + S c_s + Y c_y from the Gram coefficients and the combining pass (unrolled
    and, beyond MAX_UNROLLED_MEMORY, contracted) equals the scan two-loop."""
    rng = np.random.default_rng(memory)
    n = 17
    layout = _layout.make_layout(np.zeros(n), blocks)
    newest, num_pairs = 1, min(memory, 5)
    s, y, rho = _history(rng, layout, memory, num_pairs, newest)
    s_hist = layout.pack_history(jnp.asarray(s))
    y_hist = layout.pack_history(jnp.asarray(y))
    g = rng.normal(size=n)
    q = layout.pack(jnp.asarray(g))
    rho_b, gamma, newest_b = jnp.asarray(rho)[None], jnp.asarray([0.7]), jnp.asarray([newest])
    ref = _two_loop.blockwise_two_loop(layout, q, s_hist, y_hist, rho_b, gamma, newest_b)
    sg, yg = _direction.history_products(layout, q, s_hist, y_hist, jnp.float64)
    sy_gram, yy_gram = jnp.asarray(s @ y.T)[None], jnp.asarray(y @ y.T)[None]
    cs, cy = _two_loop.gram_coefficients(sg, yg, rho_b, gamma, newest_b, sy_gram, yy_gram,
                                         jnp.float64)
    d = _direction.combine(layout, q, gamma, cs, s_hist, cy, y_hist, jnp.float64)
    np.testing.assert_allclose(np.asarray(layout.unpack(d)), np.asarray(layout.unpack(ref)),
                               rtol=1e-10, atol=1e-12)
    # The norm from the Gram matrices is the norm of d, and its error bound holds.
    gg = jnp.asarray([g @ g])
    dd, err = _direction.norm_sq(gamma, cs, cy, gg, sg, yg, jnp.asarray(s @ s.T)[None],
                                 sy_gram, yy_gram)
    direct = float(np.sum(np.asarray(layout.unpack(d)) ** 2))
    np.testing.assert_allclose(float(dd[0]), direct, rtol=1e-10)
    assert abs(float(dd[0]) - direct) <= float(err[0]) + 1e-12


def test_safe_products_rescale_only_out_of_range():
    """q^T q in range: the products as taken and c = 1; q of 1e200 (q^T q overflows): retaken
    of q / c with c a power of two near max|q|, and the direction's coefficients scale back."""
    layout = _layout.make_layout(jnp.zeros(4), "all")
    s_hist = layout.pack_history(jnp.asarray([[1.0, 2.0, 0.0, 1.0]]))
    y_hist = layout.pack_history(jnp.asarray([[2.0, 1.0, 1.0, 0.0]]))
    one = jnp.ones(1, jnp.float64)

    def safe(q):
        products_of = lambda scale: _direction.scaled_products(layout, layout.pack(q), scale,
                                                               s_hist, y_hist, jnp.float64)
        products = products_of(one)
        return products, _direction.safe_products(layout, products_of, lambda: layout.pack(q),
                                                  products, jnp.float64)

    q = jnp.asarray([1.0, -1.0, 0.5, 2.0])
    products, (sg, yg, gg, c) = safe(q)
    assert float(c[0]) == 1.0 and float(gg[0]) == float(q @ q)
    np.testing.assert_allclose(
        np.asarray(products[0]),
        np.asarray(_direction.history_products(layout, layout.pack(q), s_hist, y_hist,
                                               jnp.float64)[0]))
    big = q * 1e200
    products, (sg2, yg2, gg2, c2) = safe(big)
    assert not np.isfinite(float(products[2][0]))
    r = 1e200 / float(c2[0])  # q / c = r * q, with c a power of two near max|q|
    assert 0.25 <= r <= 1.0 and np.log2(float(c2[0])) == round(np.log2(float(c2[0])))
    np.testing.assert_allclose(float(gg2[0]), float(q @ q) * r * r, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(sg2), np.asarray(sg) * r, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(yg2), np.asarray(yg) * r, rtol=1e-12)


def test_bound_factor():
    f = _direction.bound_factor(jnp.asarray([1.0, 1.0, 0.0]), jnp.asarray([100.0, 1.0, 0.0]), 3.0)
    np.testing.assert_allclose(np.asarray(f), [0.3, 1.0, 1.0])


def test_bound_from_the_norms_upper_bound_holds_when_the_gram_sum_cancels():
    """float32, terms 1000x |q| that cancel to d = 6 q: from dd alone, rounded down, the step
    would be 0.1% too long; the factor from dd + err keeps |kappa d| <= bound |q|."""
    rng = np.random.default_rng(0)
    n = 64
    q = np.ones(n)
    v = rng.normal(size=n)
    v -= (v @ q) / (q @ q) * q
    v *= 1000 * np.linalg.norm(q) / np.linalg.norm(v)
    s, y = v[None, :], (-v + 5 * q)[None, :]  # S c_s + Y c_y = 5 q with c_s = c_y = 1
    d_true = q + s[0] + y[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    gram = lambda a, b: f32(a.astype(np.float32) @ b.astype(np.float32).T)[None]
    ones = f32([[1.0]])
    sg, yg = gram(s, q[None])[0], gram(y, q[None])[0]  # (1, 1): one block, one slot
    dd, err = _direction.norm_sq(f32([1.0]), ones, ones, f32([q @ q]), sg, yg, gram(s, s),
                                 gram(s, y), gram(y, y))
    kappa = float(_direction.bound_factor(f32([q @ q]), dd + err, 3.0)[0])
    too_long = float(_direction.bound_factor(f32([q @ q]), dd, 3.0)[0])
    assert too_long * np.linalg.norm(d_true) > 3.0 * np.linalg.norm(q) * (1 + 1e-6)
    assert kappa * np.linalg.norm(d_true) <= 3.0 * np.linalg.norm(q) * (1 + 1e-6)
    assert kappa >= 0.9 * 3.0 * np.linalg.norm(q) / np.linalg.norm(d_true)  # not far shorter
