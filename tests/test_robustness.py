"""Robustness of mL-BFGS: non-finite and extreme inputs, precision, bad configuration.

Every step here runs jitted and on small problems so the file takes a few seconds.
Invariants checked after every step (see ``_check_invariants``):

* every floating field of the state is finite;
* every stored pair has positive curvature: ``rho >= 0`` everywhere, ``rho > 0``
  exactly on the ``num_pairs`` occupied slots, and ``s^T y_hat > 0`` recomputed in
  float64 from the stored history, with ``rho ~ 1 / s^T y_hat``;
* the returned direction is finite, has the gradient's dtype and is a descent
  direction, ``g^T d > 0`` (in float64, so that 1e30-sized numbers do not overflow).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlbfgs_optax
from examples.common import make_mlbfgs

# ----------------------------------------------------------------------------- helpers


def _params(dtype=jnp.float32):
    return {
        "a": jnp.asarray([0.5, -1.0, 2.0, 0.25], dtype),
        "b": jnp.asarray([[1.0, -0.5, 0.3], [0.7, -2.0, 1.2]], dtype),
    }


_DIAG = {
    "a": np.asarray([1.0, 3.0, 10.0, 30.0]),
    "b": np.asarray([[2.0, 5.0, 20.0], [50.0, 100.0, 1.5]]),
}


def _quad_grad(params, noise=None, scale=1.0):
    """Gradient of 0.5 * sum(diag * p^2), optionally noisy and scaled; params dtype."""
    out = {}
    for k, p in params.items():
        g = _DIAG[k] * np.asarray(p, np.float64)
        if noise is not None:
            g = g + noise[k]
        out[k] = jnp.asarray(scale * g, p.dtype)
    return out


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _assert_finite(tree, what):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(x))), f"{what}{jax.tree_util.keystr(path)} not finite: {x}"


def _assert_trees_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _vdot64(a, b):
    return sum(
        float(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _check_pairs(st: mlbfgs_optax.ScaleByMLBFGSState):
    """Stored pairs have positive curvature (blocks='leaf': block j is leaf j)."""
    rho = np.asarray(st.rho, np.float64)
    assert np.all(np.isfinite(rho)) and np.all(rho >= 0), rho
    np.testing.assert_array_equal((rho > 0).sum(axis=1), np.asarray(st.num_pairs))
    s_leaves = jax.tree.leaves(st.unpacked("s_history"))
    y_leaves = jax.tree.leaves(st.unpacked("y_history"))
    assert len(s_leaves) == rho.shape[0]
    for b, (s, y) in enumerate(zip(s_leaves, y_leaves)):
        s = np.asarray(s, np.float64).reshape(s.shape[0], -1)
        y = np.asarray(y, np.float64).reshape(y.shape[0], -1)
        for slot in range(rho.shape[1]):
            if rho[b, slot] != 0:
                sy = float(s[slot] @ y[slot])
                assert sy > 0, (b, slot, sy)
                np.testing.assert_allclose(rho[b, slot], 1.0 / sy, rtol=1e-3)
    assert np.all(np.asarray(st.gamma) > 0)


def _check_invariants(st, g, d, descent=True):
    _assert_finite(st, "state")
    _assert_finite(d, "update")
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(d)):
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
    _check_pairs(st)
    if descent:
        gd = _vdot64(g, d)
        assert gd > 0, gd


@functools.lru_cache(maxsize=None)
def _cached(kind, **kw):
    """(tx, jitted update) per configuration, shared between tests (compiles once)."""
    make = mlbfgs_optax.scale_by_mlbfgs if kind == "scale" else mlbfgs_optax.mlbfgs
    tx = make(**kw)
    return tx, jax.jit(tx.update)


def _tx_step(**kw):
    return _cached("scale", **kw)


# ----------------------------------------------------------------------------- non-finite gradients

T = 3  # update period used by the non-finite tests; pair steps are count = 2, 5, 8, ...


def _nonfinite_tx():
    return _tx_step(memory_size=3, update_period=T, beta=0.5)


def _noise_seq(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {k: 0.1 * rng.standard_normal(v.shape) for k, v in _DIAG.items()} for _ in range(n)
    ]


@functools.lru_cache(maxsize=None)
def _run_clean(num_steps, lr=0.02):
    """Reference run: states and params after every step."""
    tx, step = _nonfinite_tx()
    p = _params()
    st = tx.init(p)
    states, params = [st], [p]
    for noise in _noise_seq(num_steps):
        g = _quad_grad(p, noise)
        u, st = step(g, st, p)
        p = jax.tree.map(lambda a, b: a - lr * b, p, u)
        states.append(st)
        params.append(p)
    return states, params


_POSITIONS = {1: "plain", 2: "first-pair-step(snapshot)", 4: "plain-after-snapshot",
              5: "pair-forming-step", 8: "second-pair-step"}
_NONFINITE_CASES = [
    pytest.param(bad, leaf, pos, id=f"{_POSITIONS[pos]}-{leaf}-{name}")
    for i, (pos, (name, bad)) in enumerate(
        (pos, v) for pos in _POSITIONS for v in [("nan", np.nan), ("+inf", np.inf), ("-inf", -np.inf)]
    )
    for leaf in [["a", "b", "both"][i % 3]]
]


@pytest.mark.parametrize("bad,leaf,bad_count", _NONFINITE_CASES)
def test_nonfinite_gradient_leaves_state_untouched(bad, leaf, bad_count):
    """A bad step is invisible: the state is bitwise unchanged (count included), the
    updates pass through unchanged, and the run then continues exactly like a run that
    never saw the bad step (so nothing bad entered averages, snapshots or history)."""
    tx, step = _nonfinite_tx()
    num_steps = 12
    ref_states, ref_params = _run_clean(num_steps)
    noise = _noise_seq(num_steps)
    p, st = _params(), tx.init(_params())
    for k in range(num_steps):
        if k == bad_count:
            assert int(st.count) == bad_count
            for _ in range(2):  # two consecutive bad steps
                g = _quad_grad(p, noise[k])
                for name in (["a", "b"] if leaf == "both" else [leaf]):
                    g[name] = g[name].at[(0,) * g[name].ndim].set(bad)
                u, st_after = step(g, st, p)
                _assert_trees_bitwise_equal(st_after, st)
                _assert_trees_bitwise_equal(u, g)  # passed through unchanged (NaN == NaN here)
                st = st_after
        g = _quad_grad(p, noise[k])
        u, st = step(g, st, p)
        _check_invariants(st, g, u)
        p = jax.tree.map(lambda a, b: a - 0.02 * b, p, u)
        _assert_trees_bitwise_equal(st, ref_states[k + 1])
        _assert_trees_bitwise_equal(p, ref_params[k + 1])
    assert int(st.count) == num_steps
    assert int(np.min(st.num_pairs)) > 0


def test_nonfinite_gradient_all_leaves_every_step_for_a_while():
    """A long stretch of NaN gradients (across several would-be pair steps) changes nothing."""
    tx, step = _nonfinite_tx()
    ref_states, _ = _run_clean(12)
    p = _params()
    st = tx.init(p)
    noise = _noise_seq(7)
    for k in range(7):
        g = _quad_grad(p, noise[k])
        u, st = step(g, st, p)
        p = jax.tree.map(lambda a, b: a - 0.02 * b, p, u)
    for _ in range(3 * T + 1):
        nan_g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
        u, st_after = step(nan_g, st, p)
        _assert_trees_bitwise_equal(st_after, st)
        st = st_after
    _assert_trees_bitwise_equal(st, ref_states[7])


def test_apply_if_finite_skips_bad_steps():
    """mlbfgs inside optax.apply_if_finite: bad steps (NaN/Inf, some at pair steps) are
    skipped, params stay finite, and the trajectory equals the run without those steps."""
    opt = optax.apply_if_finite(
        mlbfgs_optax.mlbfgs(0.02, memory_size=3, update_period=T, beta=0.5, momentum=0.5,
                            weight_decay=1e-3),
        max_consecutive_errors=3,
    )
    step = jax.jit(opt.update)
    num_good = 20
    noise = _noise_seq(num_good)
    # bad steps inserted before good step k: k=2 and k=5 are pair steps of the inner state.
    bad_before = {2: [np.nan], 5: [np.inf, -np.inf, np.nan], 9: [np.inf]}

    def run(with_bad):
        p = _params()
        st = opt.init(p)
        for k in range(num_good):
            for v in bad_before.get(k, []) if with_bad else []:
                g = _quad_grad(p, noise[k])
                g["b"] = g["b"].at[1, 2].set(v)
                u, st = step(g, st, p)
                p = optax.apply_updates(p, u)
                _assert_finite(p, "params")
            g = _quad_grad(p, noise[k])
            u, st = step(g, st, p)
            p = optax.apply_updates(p, u)
            _assert_finite(p, "params")
            _assert_finite(st.inner_state, "inner_state")
        return p, st

    p_bad, st_bad = run(True)
    p_ref, st_ref = run(False)
    _assert_trees_bitwise_equal(p_bad, p_ref)
    _assert_trees_bitwise_equal(st_bad.inner_state, st_ref.inner_state)
    assert int(st_bad.total_notfinite) == 5
    assert int(st_bad.notfinite_count) == 0
    inner = mlbfgs_optax.find_mlbfgs_state(st_bad.inner_state)
    assert int(inner.count) == num_good
    assert int(np.min(inner.num_pairs)) > 0


# ----------------------------------------------------------------------------- finite extremes


def _run_tx(tx_step, params_seq, grads_seq, descent=True):
    """Feeds the given params/gradients (not the optimizer's own trajectory)."""
    tx, step = tx_step
    st = tx.init(params_seq[0])
    for p, g in zip(params_seq, grads_seq):
        u, st = step(g, st, p)
        _check_invariants(st, g, u, descent=descent)
    return st, u


def _trajectory(num_steps, seed=0, contraction=0.97, jitter=1e-3):
    """A synthetic, bounded parameter trajectory that drifts towards a minimiser."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(v, np.float64) for k, v in _params().items()}
    star = {k: rng.standard_normal(v.shape) for k, v in _DIAG.items()}
    seq = []
    for t in range(num_steps):
        seq.append({
            k: star[k] + contraction**t * (p0[k] - star[k]) + jitter * rng.standard_normal(p0[k].shape)
            for k in p0
        })
    return seq, star


_EXTREME_CONFIGS = {
    "default": dict(),
    "authors": dict(tau_max=0.99, pair_momentum=0.9, refresh_grad_average=True),
    "beta0-T1": dict(beta=0.0, update_period=1),
    "all-block": dict(blocks="all"),
}


def _crossed(first, second, ci):
    """``pytest.param(a, b)`` for every ``a`` of ``first`` and ``b`` of ``second`` (each a
    sequence of ``(id, value)``), id ``"{id_a}-{id_b}"``: the ``ci`` pairs of ids in CI,
    the others in the slow tier."""
    return [pytest.param(a, b, id=f"{ia}-{ib}",
                         marks=[] if (ia, ib) in ci else [pytest.mark.slow])
            for ia, a in first for ib, b in second]


# In CI each config and each scale at least once, and the largest scale with the
# defaults and the authors' settings.
@pytest.mark.parametrize("config,scale", _crossed(
    [(c, c) for c in ("default", "beta0-T1", "authors")],
    [("1e30", 1e30), ("1e-30", 1e-30), ("1", 1.0)],
    ci={("default", "1e30"), ("authors", "1e30"), ("beta0-T1", "1e-30"), ("authors", "1")}))
def test_extreme_gradient_magnitudes(scale, config):
    """float32 gradients of size ~1e30 or ~1e-30 (params O(1)): everything stays finite,
    stored pairs have positive curvature, d is a descent direction."""
    kw = dict(memory_size=4, update_period=2, beta=0.5)
    kw.update(_EXTREME_CONFIGS[config])
    tx, step = _tx_step(**kw)
    seq, star = _trajectory(40)
    rng = np.random.default_rng(1)
    params_seq, grads_seq = [], []
    for x in seq:
        params_seq.append({k: jnp.asarray(v, jnp.float32) for k, v in x.items()})
        grads_seq.append({
            k: jnp.asarray(scale * (_DIAG[k] * (v - star[k]) + 0.01 * rng.standard_normal(v.shape)),
                           jnp.float32)
            for k, v in x.items()
        })
    st, _ = _run_tx((tx, step), params_seq, grads_seq)
    assert int(np.min(st.num_pairs)) > 0


def test_gradient_spike_1e30_between_normal_steps():
    """A single 1e30 gradient (e.g. on a pair step) among normal ones."""
    tx_step = _tx_step(memory_size=4, update_period=3, beta=0.9)
    seq, star = _trajectory(40, seed=3)
    params_seq = [{k: jnp.asarray(v, jnp.float32) for k, v in x.items()} for x in seq]
    grads_seq = []
    for t, x in enumerate(seq):
        c = 1e30 if t in (8, 14, 20) else 1.0  # 8 and 14, 20 are pair steps ((t+1) % 3 == 0)
        grads_seq.append({k: jnp.asarray(c * _DIAG[k] * (v - star[k]), jnp.float32)
                          for k, v in x.items()})
    _run_tx(tx_step, params_seq, grads_seq)


def test_zero_gradients_for_many_steps():
    """g = 0 from the start and again after training: d = 0 exactly, state finite."""
    tx, step = _tx_step(memory_size=3, update_period=2, beta=0.9)
    p = _params()
    st = tx.init(p)
    zeros = jax.tree.map(jnp.zeros_like, p)
    for _ in range(20):
        u, st = step(zeros, st, p)
        _check_invariants(st, zeros, u, descent=False)
        _assert_trees_bitwise_equal(u, zeros)
    # (with beta > 0 the params average still moves, s != 0, so damped pairs may be stored)
    for noise in _noise_seq(20):
        g = _quad_grad(p, noise)
        u, st = step(g, st, p)
        _check_invariants(st, g, u)
        p = jax.tree.map(lambda a, b: a - 0.02 * b, p, u)
    assert int(np.min(st.num_pairs)) > 0
    for _ in range(40):  # params frozen, gradients zero: s = 0 and y -> 0
        u, st = step(zeros, st, p)
        _check_invariants(st, zeros, u, descent=False)
        for x in jax.tree.leaves(u):
            np.testing.assert_array_equal(np.asarray(x), 0.0)


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_frozen_block(beta):
    """Leaf 'b' never moves (s = 0 there, up to the EMA's start-up bias when beta > 0)
    while its gradient is noisy: 'b' stores no pair with beta = 0, 'a' trains normally."""
    tx, step = _tx_step(memory_size=3, update_period=2, beta=beta)
    p = _params()
    st = tx.init(p)
    for noise in _noise_seq(40, seed=5):
        g = _quad_grad(p, noise)
        u, st = step(g, st, p)
        _check_invariants(st, g, u)
        p = {"a": p["a"] - 0.02 * u["a"], "b": p["b"]}
    blocks = dict(zip(["a", "b"], range(2)))  # leaf order is sorted dict order
    assert int(st.num_pairs[blocks["a"]]) > 0
    if beta == 0.0:
        assert int(st.num_pairs[blocks["b"]]) == 0
        assert int(st.num_skipped[blocks["b"]]) > 0
        np.testing.assert_array_equal(np.asarray(st.rho[blocks["b"]]), 0.0)
        # No pair: d_b = D g_b, RMSprop's step in the default metric.
        nu_hat = np.asarray(st.unpacked("nu")["b"]) / (1 - 0.999 ** int(st.count))
        np.testing.assert_allclose(np.asarray(u["b"]),
                                   np.asarray(g["b"]) / (np.sqrt(nu_hat) + 1e-8), rtol=1e-5)


def test_repeated_batches_y_zero():
    """Exactly the same gradient at every step (y = 0 with beta = 0): damping turns the
    pair into y_hat = (1 - tau) s with curvature exactly sigma_low; without damping the
    guard rejects every pair."""
    g_const = _quad_grad(_params(), _noise_seq(1)[0])
    for damped in (True, False):
        kw = (dict(sigma_low=0.01, sigma_high=1.5) if damped
              else dict(sigma_low=-math.inf, sigma_high=math.inf))
        tx, step = _tx_step(memory_size=3, update_period=1, beta=0.0, tau_max=1.0,
                            metric="identity", **kw)  # d = g exactly before any pair
        p = _params()
        st = tx.init(p)
        for _ in range(15):
            u, st = step(g_const, st, p)
            _check_invariants(st, g_const, u)
            p = jax.tree.map(lambda a, b: a - 0.01 * b, p, u)
        if damped:
            assert int(np.min(st.num_pairs)) == 3
            np.testing.assert_allclose(np.asarray(st.mu), 0.0, atol=0)
            np.testing.assert_allclose(np.asarray(st.mu_damped), 0.01, rtol=1e-5)
        else:
            assert int(np.max(st.num_pairs)) == 0
            assert int(np.min(st.num_skipped)) == 14
            _assert_trees_bitwise_equal(u, g_const)


@pytest.mark.parametrize("objective", ["concave", "nonconvex"])
@pytest.mark.parametrize("damped", [True, False], ids=["damped", "undamped"])
def test_negative_curvature(objective, damped):
    """f = -||x||^2 (concave) or a sum of cosines (indefinite): damping keeps every stored
    pair's curvature >= sigma_low; without damping the guard rejects the negative pairs."""
    if objective == "concave":
        f = lambda p: -sum(jnp.sum(x**2) for x in jax.tree.leaves(p))  # noqa: E731
    else:
        f = lambda p: sum(jnp.sum(jnp.cos(3.0 * x) + 0.05 * x**2)  # noqa: E731
                          for x in jax.tree.leaves(p))
    kw = (dict(sigma_low=0.01, sigma_high=1.5) if damped
          else dict(sigma_low=-math.inf, sigma_high=math.inf))
    tx, step = _tx_step(memory_size=4, update_period=2, beta=0.5, tau_max=1.0, **kw)
    grad = jax.jit(jax.grad(f))
    p = _params()
    st = tx.init(p)
    skipped_before = 0
    for _ in range(40):
        g = grad(p)
        u, st = step(g, st, p)
        _check_invariants(st, g, u)
        if damped and int(st.count) % 2 == 0 and int(st.count) > 2:
            # a candidate pair was formed at this step: its damped curvature is in range
            assert np.all(np.asarray(st.mu_damped) >= 0.01 * (1 - 1e-4)), st.mu_damped
            assert np.all(np.asarray(st.mu_damped) <= 1.5 * (1 + 1e-4)), st.mu_damped
        p = jax.tree.map(lambda a, b: a - 0.01 * b, p, u)
        skipped_before = int(np.sum(st.num_skipped))
    if objective == "concave":
        assert float(np.min(st.mu)) < 0  # there really was negative curvature
        if damped:
            assert int(np.min(st.num_pairs)) > 0
        else:
            assert int(np.max(st.num_pairs)) == 0 and skipped_before > 0


def test_normalize_with_huge_gradients():
    tx_step = _tx_step(memory_size=4, update_period=2, beta=0.5, normalize=True)
    seq, star = _trajectory(12)
    params_seq = [{k: jnp.asarray(v, jnp.float32) for k, v in x.items()} for x in seq]
    grads_seq = [{k: jnp.asarray(1e30 * _DIAG[k] * (v - star[k]), jnp.float32)
                  for k, v in x.items()} for x in seq]
    _, d = _run_tx(tx_step, params_seq, grads_seq)
    norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                         for x in jax.tree.leaves(d)))
    np.testing.assert_allclose(norm, 1.0, rtol=1e-5)


def test_large_magnitude_pairs_give_finite_direction():
    tx, step = _tx_step(memory_size=3, update_period=1, beta=0.0, metric="identity")
    x = jnp.ones(1) * 1e19
    st = tx.init(x)
    for k in range(6):
        x = jnp.asarray([1e19 * (k + 1)], jnp.float32)
        g = x  # f = 0.5 x^2: s = y, H = I, so d = g exactly
        u, st = step(g, st, x)
        _assert_finite(u, "update")
        np.testing.assert_allclose(np.asarray(u), np.asarray(g), rtol=1e-4)
        _check_pairs(st)


# ----------------------------------------------------------------------------- precision


# In CI each params dtype once and each history dtype at least once.
@pytest.mark.parametrize("history_dtype,dtype", _crossed(
    [("hist-default", None), ("hist-bf16", jnp.bfloat16)],
    [("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float16", jnp.float16)],
    ci={("hist-default", "bfloat16"), ("hist-default", "float16"), ("hist-bf16", "float32")}))
def test_low_precision_params(dtype, history_dtype):
    # sigma_low=0.1: the pairs lengthen the step on this deterministic quadratic, so the
    # low-precision history is exercised by every direction
    tx = make_mlbfgs(0.01, memory_size=3, update_period=2, beta=0.5, sigma_low=0.1,
                     history_dtype=history_dtype)
    step = jax.jit(tx.update)
    p = _params(dtype)
    st = tx.init(p)
    loss = lambda p: sum(0.5 * float(np.sum(_DIAG[k] * np.asarray(v, np.float64) ** 2))  # noqa: E731
                         for k, v in p.items())
    l0 = loss(p)
    for _ in range(30):
        g = _quad_grad(p)
        u, st = step(g, st, p)
        inner = mlbfgs_optax.find_mlbfgs_state(st)
        # the mL-BFGS direction itself: u = -lr * d
        d = jax.tree.map(lambda x: -x, u)
        _check_invariants(inner, g, d)
        p = optax.apply_updates(p, u)
        for x in jax.tree.leaves(p):
            assert x.dtype == dtype
    inner = mlbfgs_optax.find_mlbfgs_state(st)
    for field in (inner.rho, inner.gamma, inner.mu, inner.mu_damped, inner.tau):
        assert field.dtype == jnp.float32
    for x in jax.tree.leaves(inner.params_avg):
        assert x.dtype == jnp.float32
    expect_hist = jnp.float32 if history_dtype is None else history_dtype
    for x in jax.tree.leaves((inner.s_history, inner.y_history)):
        assert x.dtype == expect_hist
    assert int(np.min(inner.num_pairs)) > 0
    assert loss(p) < 0.5 * l0


def test_gradient_dtype_differs_from_params():
    """bfloat16 gradients on float32 params: the update keeps the gradient's dtype."""
    tx, step = _tx_step(memory_size=3, update_period=2, beta=0.5)
    p = _params()
    st = tx.init(p)
    for _ in range(8):
        g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _quad_grad(p))
        u, st = step(g, st, p)
        _check_invariants(st, g, u)
        p = jax.tree.map(lambda a, b: a - 0.02 * b.astype(a.dtype), p, u)
    assert int(np.min(st.num_pairs)) > 0


def test_bfloat16_history_rho_matches_stored_pairs():
    """With a bfloat16 history, rho is 1/(s^T y_hat) of the pair as stored (rounded),
    accumulated in float32."""
    tx, step = _tx_step(memory_size=3, update_period=1, beta=0.0,
                                      history_dtype=jnp.bfloat16)
    p = _params()
    st = tx.init(p)
    for noise in _noise_seq(10):
        g = _quad_grad(p, noise)
        u, st = step(g, st, p)
        _check_invariants(st, g, u)
        p = jax.tree.map(lambda a, b: a - 0.02 * b, p, u)
    assert st.rho.dtype == jnp.float32
    for b, (s, y) in enumerate(zip(jax.tree.leaves(st.unpacked("s_history")),
                                   jax.tree.leaves(st.unpacked("y_history")))):
        assert s.dtype == jnp.bfloat16
        s = np.asarray(s, np.float64).reshape(3, -1)
        y = np.asarray(y, np.float64).reshape(3, -1)
        for slot in range(3):
            np.testing.assert_allclose(float(st.rho[b, slot]), 1 / (s[slot] @ y[slot]), rtol=1e-5)


def test_float64_gradient_beyond_float32_range_is_a_finite_step():
    """A float64 gradient of 1e300 is finite: the step counts and updates the averages (the
    finiteness test must not round through float32)."""
    with jax.enable_x64(True):
        tx = mlbfgs_optax.scale_by_mlbfgs()
        p = {"w": jnp.ones(3, jnp.float64)}
        st = tx.init(p)
        u, st = jax.jit(tx.update)({"w": jnp.full(3, 1e300, jnp.float64)}, st, p)
        assert int(st.count) == 1
        assert (bool(jnp.all(st.unpacked("grads_avg")["w"] > 0))
                and bool(jnp.all(jnp.isfinite(u["w"]))))


def test_float64_params_under_x64():
    """Inside jax.enable_x64: float64 params give float64 state scalars and updates and
    agree with the float32 run to float32 accuracy."""
    def run(dtype):
        tx, step = _tx_step(memory_size=3, update_period=2, beta=0.5)
        p = _params(dtype)
        st = tx.init(p)
        for noise in _noise_seq(12):
            g = _quad_grad(p, noise)
            u, st = step(g, st, p)
            _check_invariants(st, g, u)
            p = jax.tree.map(lambda a, b: a - 0.02 * b, p, u)
        return p, st

    with jax.enable_x64(True):
        p64, st64 = run(jnp.float64)
        for x in jax.tree.leaves(p64):
            assert x.dtype == jnp.float64
        for field in (st64.rho, st64.gamma, st64.mu):
            assert field.dtype == jnp.float64
        for x in jax.tree.leaves((st64.s_history, st64.params_avg)):
            assert x.dtype == jnp.float64
        p64 = jax.tree.map(np.asarray, p64)
    p32, _ = run(jnp.float32)
    assert jnp.zeros(1).dtype == jnp.float32  # the global flag is untouched
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p64)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------------------- long run


def _noisy_quadratic_run(num_steps, dim=20, cond=100.0, noise=0.1, seed=0):
    """0.5 (x - x*)^T A (x - x*), eigenvalues of A log-spaced in [1/cond, 1], gradient
    noise N(0, noise^2), cosine learning rate, the authors' recipe (normalised direction,
    heavy-ball momentum 0.9); the whole run is one jitted lax.scan."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a = jnp.asarray((q * np.logspace(-np.log10(cond), 0, dim)) @ q.T, jnp.float32)
    x_star = jnp.asarray(rng.standard_normal(dim), jnp.float32)
    loss = lambda x: 0.5 * (x - x_star) @ a @ (x - x_star)  # noqa: E731
    sched = optax.cosine_decay_schedule(0.1, num_steps, alpha=0.001)
    opt = make_mlbfgs(sched, memory_size=10, update_period=10, beta=0.99, momentum=0.9,
                      sigma_low=0.1, sigma_high=1.5, tau_max=0.99, normalize=True)
    x0 = jnp.zeros(dim, jnp.float32)

    @jax.jit
    def run(key):
        def body(carry, k):
            x, st = carry
            g = a @ (x - x_star) + noise * jax.random.normal(k, (dim,))
            u, st = opt.update(g, st, x)
            x = optax.apply_updates(x, u)
            return (x, st), loss(x)

        (x, st), losses = jax.lax.scan(body, (x0, opt.init(x0)), jax.random.split(key, num_steps))
        return x, st, losses

    x, st, losses = run(jax.random.key(seed))
    return float(loss(x0)), x, st, np.asarray(losses)


def _check_long_run(num_steps):
    l0, x, st, losses = _noisy_quadratic_run(num_steps)
    _assert_finite((x, st), "long run")
    assert np.all(np.isfinite(losses))
    inner = mlbfgs_optax.find_mlbfgs_state(st)
    assert int(inner.count) == num_steps
    assert int(inner.num_pairs[0]) == 10
    _check_pairs(inner)
    final = float(np.mean(losses[-100:]))
    # start: loss ~1.3; measured final ~3e-3 (the noise floor of this schedule).
    assert final < 1e-2 * l0, (final, l0)


def test_long_run_2k_steps():
    _check_long_run(2_000)


def test_long_run_20k_steps():
    t0 = time.perf_counter()
    _check_long_run(20_000)
    assert time.perf_counter() - t0 < 60
