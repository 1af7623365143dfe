"""Property-based tests (hypothesis) of the two-loop recursion, the damping rule and the
optimizer's invariants under random gradient sequences.

References are plain NumPy in float64: the dense BFGS inverse update
H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T from H0 = gamma I, pairs oldest ->
newest. Shapes are drawn from small fixed sets so the jitted functions compile a bounded
number of times; ``derandomize=True`` keeps CI deterministic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlbfgs_optax

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

_two_loop = jax.jit(mlbfgs_optax.two_loop_recursion)


def _dense_h(pairs, gamma, n):
    h = gamma * np.eye(n)
    for s, y in pairs:  # oldest -> newest
        rho = 1.0 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


def _damped_history(rng, n, memory, num_pairs, newest, sigma_low, sigma_high, tau_max):
    """Ring buffers with ``num_pairs`` damped pairs ending at slot ``newest``; empty slots
    hold random junk with rho = 0 (they must be ignored)."""
    s_hist = rng.standard_normal((memory, n)) * 10.0 ** rng.uniform(-2, 2, (memory, 1))
    y_hist = rng.standard_normal((memory, n)) * 10.0 ** rng.uniform(-2, 2, (memory, 1))
    rho = np.zeros(memory)
    pairs = []
    for age in reversed(range(num_pairs)):  # oldest first
        slot = (newest - age) % memory
        s = rng.standard_normal(n) * 10.0 ** rng.uniform(-1, 1)
        y = rng.standard_normal(n) * 10.0 ** rng.uniform(-1, 1)
        mu = (s @ y) / (s @ s)
        tau = float(mlbfgs_optax.damping_weight(jnp.asarray(mu, jnp.float32), sigma_low,
                                                sigma_high, tau_max))
        y_hat = tau * y + (1 - tau) * s
        if s @ y_hat <= 1e-6 * (s @ s):  # capped tau can leave curvature <= 0: the guard
            continue  # of the optimizer would reject such a pair, so it is not stored
        s_hist[slot], y_hist[slot] = s, y_hat
        rho[slot] = 1.0 / (s @ y_hat)
        pairs.append((s, y_hat))
    if pairs:
        s, y = pairs[-1]
        gamma = (s @ y) / (y @ y)
    else:
        gamma = 1.0
    return s_hist, y_hist, rho, gamma, pairs


history_args = dict(
    n=st.sampled_from([1, 5]),
    memory=st.sampled_from([1, 4]),
    fill=st.floats(0.0, 1.0),
    newest=st.integers(0, 4),
    seed=st.integers(0, 2**32 - 1),
    sigma_low=st.sampled_from([0.01, 0.1, 0.5]),
    sigma_high=st.sampled_from([1.5, 10.0, math.inf]),
    tau_max=st.sampled_from([1.0, 0.99, 0.5]),
)


def _draw_history(n, memory, fill, newest, seed, sigma_low, sigma_high, tau_max):
    rng = np.random.default_rng(seed)
    newest = newest % memory
    num_pairs = int(round(fill * memory))
    # build with a ring that has no holes: drop rejected pairs by regenerating
    for _ in range(20):
        s_hist, y_hist, rho, gamma, pairs = _damped_history(
            rng, n, memory, num_pairs, newest, sigma_low, sigma_high, tau_max)
        if len(pairs) == num_pairs:
            break
    else:
        num_pairs = 0
        s_hist, y_hist, rho, gamma, pairs = _damped_history(
            rng, n, memory, 0, newest, sigma_low, sigma_high, tau_max)
    g = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    return s_hist, y_hist, rho, gamma, pairs, newest, g


@SETTINGS
@given(**history_args)
def test_two_loop_matches_dense_bfgs_float64(**kw):
    s_hist, y_hist, rho, gamma, pairs, newest, g = _draw_history(**kw)
    n = g.shape[0]
    h = _dense_h(pairs, gamma, n)
    with jax.enable_x64(True):
        d = np.asarray(_two_loop(jnp.asarray(g), jnp.asarray(s_hist), jnp.asarray(y_hist),
                                 jnp.asarray(rho), jnp.asarray(gamma), jnp.asarray(newest)))
    assert d.dtype == np.float64
    expect = h @ g
    scale = np.linalg.norm(h, 2) * np.linalg.norm(g)
    np.testing.assert_allclose(d, expect, rtol=1e-9, atol=1e-9 * scale)
    # positive definiteness: g^T H g > 0 for g != 0
    assert float(g @ d) > 0
    assert np.all(np.linalg.eigvalsh((h + h.T) / 2) > 0)


@SETTINGS
@given(**history_args)
def test_two_loop_matches_dense_bfgs_float32(**kw):
    s_hist, y_hist, rho, gamma, pairs, newest, g = _draw_history(**kw)
    n = g.shape[0]
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    # the reference uses the float32-rounded inputs, in float64
    r32 = lambda x: np.asarray(np.asarray(x, np.float32), np.float64)  # noqa: E731
    pairs32 = [(r32(s), r32(y)) for s, y in pairs]
    h = _dense_h(pairs32, float(r32(gamma)), n)
    d = _two_loop(f32(g), f32(s_hist), f32(y_hist), f32(rho), f32(gamma), jnp.asarray(newest))
    assert d.dtype == jnp.float32
    d = np.asarray(d, np.float64)
    expect = h @ r32(g)
    # float32 rounding, amplified by the conditioning of the recursion
    cond = 1.0
    for s, y in pairs32:
        cond *= 1.0 + np.linalg.norm(s) * np.linalg.norm(y) / abs(s @ y)
    scale = np.linalg.norm(h, 2) * np.linalg.norm(r32(g))
    np.testing.assert_allclose(d, expect, rtol=0, atol=1e-6 * cond * scale)
    assert float(r32(g) @ d) > 0


@SETTINGS
@given(
    mu=st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
        st.floats(-3.0, 3.0),
        st.sampled_from([0.0, 1.0, 0.01, 0.1, 1.5, 10.0, -1.0]),
    ),
    sigma_low=st.one_of(st.floats(-5.0, 0.99), st.just(-math.inf)),
    sigma_high=st.one_of(st.floats(1.01, 50.0), st.just(math.inf)),
    tau_max=st.one_of(st.floats(0.01, 1.0), st.just(1.0)),
)
def test_damping_weight_keeps_curvature_in_bounds(mu, sigma_low, sigma_high, tau_max):
    tau = float(mlbfgs_optax.damping_weight(jnp.asarray(mu, jnp.float32), sigma_low,
                                            sigma_high, tau_max))
    mu32 = float(np.float32(mu))
    assert 0.0 < tau <= tau_max * (1 + 1e-7)
    if mu32 < sigma_low:
        phi = (1 - sigma_low) / (1 - mu32)
    elif mu32 > sigma_high:
        phi = (sigma_high - 1) / (mu32 - 1)
    else:
        phi = 1.0
    mu_damped = tau * mu32 + 1 - tau  # s^T y_hat / s^T s for y_hat = tau y + (1 - tau) s
    # rounding: tau is float32, |tau * mu| stays O(|1 - sigma|) when damping is active
    tol = 1e-5 * (1 + abs(tau * mu32))
    if phi <= tau_max * (1 - 1e-6):  # not capped by tau_max
        np.testing.assert_allclose(tau, phi, rtol=1e-5)
        assert sigma_low - tol <= mu_damped <= sigma_high + tol, (mu_damped, tau)
    else:  # capped: curvature moves towards 1 and never crosses it
        np.testing.assert_allclose(tau, tau_max, rtol=1e-6)
        assert abs(mu_damped - 1) <= abs(mu32 - 1) + tol
        assert (mu_damped - 1) * (mu32 - 1) >= -tol
    if sigma_low <= mu32 <= sigma_high:
        assert tau == float(np.float32(min(1.0, tau_max)))


@SETTINGS
@given(
    n=st.sampled_from([2, 6]),
    seed=st.integers(0, 2**32 - 1),
    log_scale_s=st.floats(-3, 3),
    log_scale_y=st.floats(-3, 3),
    sigma_low=st.sampled_from([0.01, 0.1, 0.5]),
    sigma_high=st.sampled_from([1.2, 1.5, 10.0]),
)
def test_damped_pair_rayleigh_quotient_in_bounds(n, seed, log_scale_s, log_scale_y, sigma_low,
                                                 sigma_high):
    """Vector level: y_hat = tau y + (1 - tau) s has s^T y_hat / s^T s in [sigma_L, sigma_H]
    (tau_max = 1, never capped), whatever the relative scale of s and y."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(n) * 10.0**log_scale_s
    y = rng.standard_normal(n) * 10.0**log_scale_y
    mu = (s @ y) / (s @ s)
    with jax.enable_x64(True):
        tau = float(mlbfgs_optax.damping_weight(jnp.asarray(mu), sigma_low, sigma_high, 1.0))
    y_hat = tau * y + (1 - tau) * s
    mu_damped = (s @ y_hat) / (s @ s)
    tol = 1e-9 * (1 + abs(mu))
    assert sigma_low - tol <= mu_damped <= sigma_high + tol
    if sigma_low <= mu <= sigma_high:
        assert tau == 1.0


# ----------------------------------------------------------------------------- optimizer


@functools.lru_cache(maxsize=None)
def _opt_step():
    tx = mlbfgs_optax.scale_by_mlbfgs(memory_size=3, update_period=2, beta=0.5,
                                      sigma_low=0.01, sigma_high=1.5, tau_max=0.99,
                                      pair_momentum=0.5, metric="identity", step_bound=None)
    return tx, jax.jit(tx.update)


def _state_block_h(state, b, name):
    s = np.asarray(state.unpacked("s_history")[name], np.float64)
    y = np.asarray(state.unpacked("y_history")[name], np.float64)
    rho = np.asarray(state.rho[b])
    newest, memory = int(state.newest[b]), s.shape[0]
    slots = [(newest - age) % memory for age in reversed(range(memory))]
    pairs = [(s[k], y[k]) for k in slots if rho[k] > 0]
    return _dense_h(pairs, float(state.gamma[b]), s.shape[1])


_SPECIAL = st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-30, 1e-38])


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scales=st.lists(st.floats(-30, 30), min_size=12, max_size=12),
    specials=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 9), _SPECIAL), max_size=6),
)
def test_optimizer_invariants_under_random_gradients(seed, log_scales, specials):
    """Random gradient sequences (random magnitudes 1e-30..1e30, injected zeros, NaN, Inf,
    huge and tiny entries) on an O(1) parameter trajectory: a non-finite step changes
    nothing, the state stays finite, stored pairs have positive curvature, the direction
    keeps the dtype and equals H g of the stored history (so it is finite whenever H g is
    representable, and a descent direction where rounding cannot flip the sign).

    Note: damped pairs bound s^T y_hat / s^T s but not |y_hat| / |s|, so H can get very
    ill-conditioned (||H|| ~ 1e9 for O(1) problems here): H g for a 1e30 gradient may
    genuinely overflow float32; such steps are only checked for a finite state."""
    tx, step = _opt_step()
    rng = np.random.default_rng(seed)
    p = {"w": jnp.asarray(rng.standard_normal(6), jnp.float32),
         "v": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    state = tx.init(p)
    for t, log_scale in enumerate(log_scales):
        g = np.concatenate([np.asarray(p["v"]), np.asarray(p["w"])]) * 10.0**log_scale
        g = g + 0.1 * 10.0**log_scale * rng.standard_normal(10)
        for tt, i, v in specials:
            if tt == t:
                g[i] = v
        g = g.astype(np.float32)
        grads = {"v": jnp.asarray(g[:4]), "w": jnp.asarray(g[4:])}
        d, new_state = step(grads, state, p)
        if not np.all(np.isfinite(g)):
            for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            state = new_state
            continue
        state = new_state
        for x in jax.tree.leaves(state):
            if jnp.issubdtype(x.dtype, jnp.floating):
                assert np.all(np.isfinite(np.asarray(x)))
        rho = np.asarray(state.rho, np.float64)
        assert np.all(rho >= 0)
        np.testing.assert_array_equal((rho > 0).sum(axis=1), np.asarray(state.num_pairs))
        for b, (s, y) in enumerate(zip(jax.tree.leaves(state.unpacked("s_history")),
                                       jax.tree.leaves(state.unpacked("y_history")))):
            s = np.asarray(s, np.float64)
            y = np.asarray(y, np.float64)
            for slot in range(3):
                if rho[b, slot] > 0:
                    assert s[slot] @ y[slot] > 0
        # direction, block by block, against the dense float64 H of the stored history
        for b, name in enumerate(["v", "w"]):  # blocks are the leaves, in tree order
            assert d[name].dtype == jnp.float32
            gb = np.asarray(grads[name], np.float64)
            db = np.asarray(d[name], np.float64)
            h = _state_block_h(state, b, name)
            exact = h @ gb
            if not np.max(np.abs(exact), initial=0) < 1e36:
                continue  # H g itself is (nearly) not representable in float32
            assert np.all(np.isfinite(db)), (t, name, db, exact)
            h_norm = np.linalg.norm(h, 2)
            np.testing.assert_allclose(db, exact, rtol=0,
                                       atol=1e-3 * h_norm * np.linalg.norm(gb) + 1e-37)
            # descent: exact g^T H g > 0; asserted where float32 rounding cannot flip it
            if gb @ exact > 1e-2 * h_norm * (gb @ gb):
                assert gb @ db > 0, (t, name)
        # the parameter trajectory is O(1) whatever the gradient scale
        p = jax.tree.map(lambda x: x * 0.95 + 0.01, p)
