"""_metric: Adam's diagonal metric, whitened pairs and the step bound.

The pure functions against NumPy, and the whole default step of
``scale_by_mlbfgs`` (metric, whitened pairs, damping, round-off test, step
bound) against a plain NumPy transcription of its math, step for step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlbfgs_optax
from mlbfgs_optax import _metric
from tests.helpers import damp as np_damp
from tests.helpers import dense_bfgs_inverse
from tests.pinned_problems import trajectory as _trajectory


def test_second_moment_and_root_diagonal_match_numpy():
    rng = np.random.default_rng(0)
    nu, g = rng.random(5), rng.normal(size=5)
    with jax.enable_x64(True):
        new = _metric.second_moment([jnp.asarray(nu)], [jnp.asarray(g)], 0.9, True,
                                    [jnp.float64])[0]
        np.testing.assert_allclose(new, 0.9 * nu + 0.1 * g**2, rtol=1e-15)
        same = _metric.second_moment([jnp.asarray(nu)], [jnp.asarray(g)], 0.9, False,
                                     [jnp.float64])[0]
        np.testing.assert_array_equal(same, nu)  # a non-finite step changes nothing
        root = _metric.root_diagonal([jnp.asarray(nu)], 0.9, 3, 1e-8, jnp.float64)[0]
        d = 1 / (np.sqrt(nu / (1 - 0.9**3)) + 1e-8)
        np.testing.assert_allclose(root**2, d, rtol=1e-14)


def test_huge_gradients_keep_the_metric_finite():
    """|g| = 1e30 in float32: g * g overflows; nu and D stay finite, D > 0."""
    nu = _metric.second_moment([jnp.zeros(3)], [jnp.full(3, 1e30)], 0.999, True,
                               [jnp.float32])[0]
    root = _metric.root_diagonal([nu], 0.999, 1, 1e-8, jnp.float32)[0]
    assert np.all(np.isfinite(nu)) and np.all(np.isfinite(root)) and np.all(root > 0)


def test_whiten_pair_keeps_curvature_in_direction_units():
    rng = np.random.default_rng(1)
    s, y, r = rng.normal(size=6), rng.normal(size=6), rng.random(6) + 0.5
    with jax.enable_x64(True):
        st, yt = _metric.whiten_pair([jnp.asarray(s)], [jnp.asarray(y)], [jnp.asarray(r)], 4.0)
    np.testing.assert_allclose(np.dot(st[0], yt[0]), 4.0 * s @ y, rtol=1e-12)
    np.testing.assert_allclose(st[0], 4.0 * s / r, rtol=1e-15)


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_bounded_shortens_only_long_blocks(scale):
    layout = mlbfgs_optax.make_layout({"a": jnp.zeros(2), "b": jnp.zeros(3)}, "leaf")
    d = {"a": jnp.asarray([3.0, 4.0]) * scale, "b": jnp.asarray([1.0, 0.0, 0.0]) * scale}
    g = {"a": jnp.asarray([1.0, 0.0]) * scale, "b": jnp.asarray([0.0, 1.0, 0.0]) * scale}
    out = layout.unpack(_metric.bounded(layout, layout.pack(d), layout.pack(g), 2.0,
                                        jnp.float32))
    np.testing.assert_allclose(out["a"], np.asarray([1.2, 1.6]) * scale, rtol=1e-6)
    np.testing.assert_array_equal(out["b"], d["b"])  # within the bound: untouched


# The whole default step against NumPy ------------------------------------------------


def _reference(params, grads, lr, memory, period, beta, kappa, c_roundoff, b2=0.999,
               eps=1e-8, sigma_low=1.0, sigma_high=10.0, pair_form="along_s"):
    """The default algorithm for one block, written out in NumPy (float64)."""
    n = params[0].size
    m_t, m_g, snap_t, snap_g = (np.zeros(n) for _ in range(4))
    w = np.zeros(4)
    nu = np.zeros(n)
    pairs, out = [], []
    mach = np.finfo(np.float64).eps
    for t, (theta, g) in enumerate(zip(params, grads)):
        m_t, m_g = beta * m_t + (1 - beta) * theta, beta * m_g + (1 - beta) * g
        w[:2] = beta * w[:2] + (1 - beta)
        nu = b2 * nu + (1 - b2) * g * g
        root = np.sqrt(1 / (np.sqrt(nu / (1 - b2 ** (t + 1))) + eps))
        if (t + 1) % period == 0:
            if t >= period:
                s = m_t / w[0] - snap_t / w[2]
                y = m_g / w[1] - snap_g / w[3]
                not_roundoff = np.abs(s).max() > c_roundoff * mach * np.abs(m_t / w[0]).max()
                s, y = s / lr(t) / root, y * root
                tau, y_hat, _ = np_damp(s, y, sigma_low, sigma_high, 1.0)
                ss, sy, yy = s @ s, s @ y, y @ y
                tau_yy = float(mlbfgs_optax.yy_bound_weight(ss, sy, yy, 10 * sigma_high))
                if pair_form == "along_s":  # the damped curvature along s alone
                    y_hat = (s @ y_hat) / (s @ s) * s
                elif tau_yy < tau:
                    tau, y_hat = tau_yy, tau_yy * y + (1 - tau_yy) * s
                if s @ y_hat > mach * (s @ s) and not_roundoff:
                    pairs = (pairs + [(s, y_hat)])[-memory:]
            snap_t, snap_g, w[2:] = m_t.copy(), m_g.copy(), w[:2]
        g_w = root * g
        d_w = dense_bfgs_inverse(pairs, 1.0, n) @ g_w
        norm_d, norm_g = np.linalg.norm(d_w), np.linalg.norm(g_w)
        if norm_d > kappa * norm_g:
            d_w = d_w * kappa * norm_g / norm_d
        out.append(root * d_w)
    return np.stack(out)


# The defaults (pairs along s, sigma_low 1), the paper's pair form and pairs along s that
# may lengthen the step, each schedule (constant, decaying) and bound (3.0, 1.5): three
# crossings in CI, the others in the slow tier.
@pytest.mark.parametrize("schedule,kappa,form", [
    (False, 3.0, ("along_s", 1.0)), (True, 1.5, ("full", 0.1)),
    (False, 1.5, ("along_s", 0.1)),
    pytest.param(True, 3.0, ("along_s", 1.0), marks=pytest.mark.slow),
    pytest.param(False, 3.0, ("full", 0.1), marks=pytest.mark.slow),
    pytest.param(True, 3.0, ("along_s", 0.1), marks=pytest.mark.slow)])
def test_default_step_matches_numpy_transcription(schedule, kappa, form):
    lr = (lambda t: 0.05 * 0.98**t) if schedule else (lambda t: 0.05)
    params, grads = _trajectory()
    pair_form, sigma_low = form
    kw = dict(memory_size=3, update_period=2, beta=0.5, blocks="all", step_bound=kappa,
              pair_form=pair_form, sigma_low=sigma_low)
    ref = _reference(params, grads, lr, 3, 2, 0.5, kappa, 100.0, sigma_low=sigma_low,
                     pair_form=pair_form)
    with jax.enable_x64(True):
        tx = mlbfgs_optax.scale_by_mlbfgs(
            learning_rate=(lambda t: 0.05 * 0.98**t) if schedule else 0.05, **kw)
        state = tx.init(jnp.asarray(params[0]))
        update = jax.jit(tx.update)
        got = []
        for p, g in zip(params, grads):
            d, state = update(jnp.asarray(g), state, jnp.asarray(p))
            got.append(np.asarray(d))
    assert int(state.num_pairs[0]) == 3 and int(state.num_skipped[0]) == 0
    np.testing.assert_allclose(np.stack(got), ref, rtol=1e-9, atol=1e-12)


def test_without_pairs_the_chain_is_rmsprop_with_momentum():
    """Before any pair d = D g: mlbfgs(lr) is bias-corrected RMSprop (b2, eps outside the
    root) followed by a debiased EMA of its steps (b1 = momentum), exactly."""
    # With the default pair warm-up no pair is stored before call 1 / (1 - 0.99) = 100,
    # although pair steps (snapshots) come every 10 calls from call 9 on.
    params, grads = _trajectory(steps=60)
    ours = mlbfgs_optax.mlbfgs(1e-2, update_period=10)
    ref = optax.chain(optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False,
                                         bias_correction=True),
                      optax.ema(0.9, debias=True), optax.scale_by_learning_rate(1e-2))
    so, sr = ours.init(jnp.asarray(params[0])), ref.init(jnp.asarray(params[0]))
    for p, g in zip(params, grads):
        uo, so = ours.update(jnp.asarray(g), so, jnp.asarray(p))
        ur, sr = ref.update(jnp.asarray(g), sr, jnp.asarray(p))
        np.testing.assert_allclose(uo, ur, rtol=2e-5, atol=1e-8)


def test_learning_rate_is_invariant_for_the_whitened_pairs():
    """Pairs in direction units: the stored curvature does not depend on the lr.

    The same trajectory of params and gradients with ``learning_rate`` 0.01 vs
    0.1: the stored whitened s differ by exactly a factor 10, y_hat equal only
    up to the damping (here inactive), i.e. s^T y_hat scales by 1/lr."""
    params, grads = _trajectory(steps=20)
    states = []
    with jax.enable_x64(True):
        for lr in (0.01, 0.1):
            tx = mlbfgs_optax.scale_by_mlbfgs(learning_rate=lr, update_period=2, beta=0.5,
                                              blocks="all", memory_size=3,
                                              sigma_low=-math.inf, sigma_high=math.inf)
            st = tx.init(jnp.asarray(params[0]))
            for p, g in zip(params, grads):
                _, st = tx.update(jnp.asarray(g), st, jnp.asarray(p))
            states.append(st)
    (s0, y0), (s1, y1) = [(np.asarray(st.unpacked("s_history")),
                           np.asarray(st.unpacked("y_history"))) for st in states]
    assert np.abs(s0).max() > 0
    np.testing.assert_allclose(s0, 10 * s1, rtol=1e-12)
    np.testing.assert_allclose(y0, y1, rtol=1e-12)


# Long float32 runs next to the optimum ------------------------------------------


def _long_run(objective, x0, lr, steps, window=1000):
    """``steps`` updates of the defaults at a constant lr; the final x and state, and the
    objective over the last ``window`` steps."""
    tx = mlbfgs_optax.mlbfgs(lr)

    @jax.jit
    def run(x):
        def body(carry, _):
            x, st = carry
            u, st = tx.update(jax.grad(objective)(x), st, x)
            x = optax.apply_updates(x, u)
            return (x, st), objective(x)

        (x, st), _ = jax.lax.scan(body, (x, tx.init(x)), length=steps - window)
        (x, st), fs = jax.lax.scan(body, (x, st), length=window)
        return x, st, fs

    return run(x0)


def _quadratic(n=100, cond=1e4, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = jnp.asarray((q * np.logspace(0, math.log10(cond), n)) @ q.T, jnp.float32)
    x_star = jnp.asarray(rng.normal(size=n), jnp.float32)
    f0 = 0.5 * float(x_star @ (a @ x_star))
    return (lambda x: 0.5 * (x - x_star) @ (a @ (x - x_star)) / f0), x_star


@pytest.mark.parametrize("lr", [pytest.param(1e-3, marks=pytest.mark.slow), 1e-2,
                                pytest.param(1e-1, marks=pytest.mark.slow)])
def test_50k_float32_steps_rosenbrock_and_quadratic_stay_converged(lr):
    """The defaults, constant lr, 50,000 float32 steps from (0, 0) / from 0 on a
    condition-1e4 quadratic: converged and finite at the end (round-off pairs next to
    the optimum are rejected, never stored)."""
    rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
    x, st, _ = _long_run(rosen, jnp.zeros(2, jnp.float32), lr, 50_000)
    state = mlbfgs_optax.find_mlbfgs_state(st)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(st))
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-3)
    assert int(state.num_skipped.sum()) > 0  # round-off pairs were met, and rejected
    quad, x_star = _quadratic()
    x, st, fs = _long_run(quad, jnp.zeros(100, jnp.float32), lr, 50_000)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(st))
    if lr <= 1e-2:
        # f relative to f(0) = 1. The float32 iterates near the optimum spike now and
        # then; where the spikes fall is decided by round-off (a 1-ulp change in the
        # momentum's arithmetic moved the highest of this window from 9e-6 to 7e-5;
        # on three other quadratics the highest were 3e-6 to 8e-6 either way).
        assert float(jnp.median(fs)) < 1e-6, float(jnp.median(fs))
        assert float(jnp.max(fs)) < 1e-4, float(jnp.max(fs))
    else:
        # A known limit, pinned: at lr 0.1 (the top of the grid) the Adam-like metric
        # does not settle at a constant lr. f swings between ~1e-10 and ~1e-2 within any
        # 1,000 steps, with window medians from 1e-8 to 2e-5, before the two-pass
        # direction as after it (whose last values were 7e-6 and 5e-5: round-off decides).
        assert float(jnp.median(fs)) < 1e-4, float(jnp.median(fs))


def test_without_momentum_rosenbrock_gets_close_but_does_not_settle():
    """A known limit, pinned: momentum=None at a constant lr of 1e-2 reaches f < 1e-6 on
    Rosenbrock from (0, 0) with pairs that may lengthen the step (sigma_low=0.1, as for
    deterministic problems) but then wanders (RMSprop-like steps that do not shrink); the
    defaults (momentum 0.9) converge (tests/test_optax_contract.py)."""
    rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
    tx = mlbfgs_optax.mlbfgs(1e-2, momentum=None, sigma_low=0.1)

    @jax.jit
    def run(x):
        def body(carry, _):
            x, st = carry
            u, st = tx.update(jax.grad(rosen)(x), st, x)
            return (optax.apply_updates(x, u), st), rosen(x)

        return jax.lax.scan(body, (x, tx.init(x)), length=30_000)[1]

    f = np.asarray(run(jnp.zeros(2, jnp.float32)))
    assert np.all(np.isfinite(f)) and f.min() < 1e-6
