"""Damping of curvature pairs (spec, step 2)."""

import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from tests.helpers import damp


@pytest.mark.parametrize("sigma_low,sigma_high", [(0.01, 1.5), (0.1, 1.5), (0.5, 4.0)])
def test_damped_curvature_in_bounds(sigma_low, sigma_high):
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = rng.normal(size=10)
        y = rng.normal(size=10) * rng.uniform(0.01, 10) + rng.uniform(-3, 3) * s
        mu = s @ y / (s @ s)
        tau = float(mlbfgs_optax.damping_weight(jnp.asarray(mu), sigma_low, sigma_high, 1.0))
        ref_tau, y_hat, _ = damp(s, y, sigma_low, sigma_high, 1.0)
        np.testing.assert_allclose(tau, ref_tau, rtol=1e-5)
        mu_after = s @ (tau * y + (1 - tau) * s) / (s @ s)
        assert sigma_low - 1e-5 <= mu_after <= sigma_high + 1e-5
        if not sigma_low <= mu <= sigma_high:  # lands exactly on the bound it crossed
            bound = sigma_low if mu < sigma_low else sigma_high
            np.testing.assert_allclose(mu_after, bound, rtol=1e-4)


def test_tau_max_caps_weight_and_keeps_curvature_positive():
    mu = jnp.linspace(-5.0, 5.0, 101)
    tau = mlbfgs_optax.damping_weight(mu, 0.01, 1.5, 0.99)
    assert float(tau.max()) <= np.float32(0.99)
    assert bool(jnp.all(tau * mu + 1 - tau > 0))  # s^T y_hat / s^T s > 0 always


def test_damping_off_is_identity():
    mu = jnp.array([-100.0, -1.0, 0.0, 0.5, 1.0, 7.0, 1e6])
    tau = mlbfgs_optax.damping_weight(mu, -jnp.inf, jnp.inf, 1.0)
    np.testing.assert_array_equal(np.asarray(tau), 1.0)


@pytest.mark.parametrize("sigma_yy", [1.0, 2.0, 10.0, 100.0])
def test_yy_bound_weight_is_the_largest_feasible_tau(sigma_yy):
    rng = np.random.default_rng(int(sigma_yy))
    for _ in range(200):
        s = rng.normal(size=8)
        y = rng.normal(size=8) * rng.uniform(0.01, 30) + rng.uniform(-2, 2) * s
        ss, sy, yy = s @ s, s @ y, y @ y
        tau = float(mlbfgs_optax.yy_bound_weight(
            jnp.asarray(ss), jnp.asarray(sy), jnp.asarray(yy), sigma_yy))
        assert 0.0 <= tau <= 1.0
        def excess(t):  # y_hat^T y_hat - sigma_yy s^T y_hat, relative to s^T s
            y_hat = t * y + (1 - t) * s
            return (y_hat @ y_hat - sigma_yy * (s @ y_hat)) / ss

        if tau < 1.0:  # the bound is active: tau sits on it, a larger tau breaks it
            assert abs(excess(tau)) < 1e-3 * max(1.0, sigma_yy)
            if tau + 1e-2 < 1.0:
                assert excess(tau + 1e-2) > 0
        else:
            assert yy <= sigma_yy * sy * (1 + 1e-6)


def test_along_s_curvature_is_the_damped_quotient_in_bounds():
    rng = np.random.default_rng(1)
    for sigma_low, sigma_high in [(0.1, 10.0), (1.0, 10.0), (0.5, 1.5)]:
        for _ in range(100):
            s = rng.normal(size=8)
            y = rng.normal(size=8) * rng.uniform(0.01, 10) + rng.uniform(-3, 3) * s
            mu = jnp.asarray(s @ y / (s @ s))
            tau = mlbfgs_optax.damping_weight(mu, sigma_low, sigma_high, 1.0)
            mu_hat = float(mlbfgs_optax.along_s_curvature(mu, tau))
            # s^T y_hat / s^T s of the paper's damped pair, in the bounds
            np.testing.assert_allclose(mu_hat, s @ (tau * y + (1 - tau) * s) / (s @ s),
                                       rtol=1e-5, atol=1e-6)
            assert sigma_low - 1e-5 <= mu_hat <= sigma_high + 1e-5


def _bfgs_inverse(pairs, n):
    """Dense inverse BFGS matrix from H0 = I and the pairs, oldest first."""
    h = np.eye(n)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


@pytest.mark.parametrize("sigma_low", [0.1, 1.0])
def test_along_s_pairs_bound_the_spectrum_where_full_pairs_do_not(sigma_low):
    """Noisy pairs (y mostly orthogonal to s, low curvature along s): along-s pairs keep
    H's eigenvalues in [1/sigma_high, 1/sigma_low]; the paper's damped pairs do not."""
    rng = np.random.default_rng(2)
    n, sigma_high = 20, 10.0
    worst_full, worst_along = 0.0, 0.0
    for _ in range(20):
        full, along = [], []
        for _ in range(4):
            s = rng.normal(size=n)
            y = 0.02 * s + rng.normal(size=n)  # curvature 0.02 along s, noise elsewhere
            mu = jnp.asarray(s @ y / (s @ s))
            tau = float(mlbfgs_optax.damping_weight(mu, sigma_low, sigma_high, 1.0))
            full.append((s, tau * y + (1 - tau) * s))
            along.append((s, float(mlbfgs_optax.along_s_curvature(mu, tau)) * s))
        eig_full = np.linalg.eigvalsh(_bfgs_inverse(full, n))
        eig_along = np.linalg.eigvalsh(_bfgs_inverse(along, n))
        assert eig_along.min() >= (1 / sigma_high) * (1 - 1e-5)
        assert eig_along.max() <= (1 / sigma_low) * (1 + 1e-5)
        worst_full = max(worst_full, eig_full.max())
        worst_along = max(worst_along, eig_along.max())
    assert worst_full > 3 / sigma_low  # the orthogonal noise of y enlarges H far beyond
