"""scale_by_mlbfgs / mlbfgs: references, blocks, the optax contract, convergence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlbfgs_optax
from mlbfgs_optax import _packing
from tests.authors_reference import AuthorsBlockSlimQN

# The paper's H_0 = gamma I without the library's step bound and round-off test
# (the reference checks below are about the paper's math).
PAPER_METRIC = dict(metric="identity", step_bound=None, roundoff_rejection=None, pair_form="full")
NO_DAMPING = dict(PAPER_METRIC, sigma_low=-jnp.inf, sigma_high=jnp.inf, tau_max=1.0)


def _quadratic_trajectory(n=20, steps=12, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    a = a @ a.T / n + np.diag(np.logspace(-2, 1, n))
    w = [rng.normal(size=n)]
    for _ in range(steps):
        w.append(w[-1] - 0.05 * a @ w[-1])
    return w, [a @ x for x in w]


# References ----------------------------------------------------------------


# Memory 1 and 10 in CI (no history, and a full ring); 2 and 5 in the slow tier.
@pytest.mark.parametrize("memory", [1, pytest.param(2, marks=pytest.mark.slow),
                                    pytest.param(5, marks=pytest.mark.slow), 10])
def test_reduces_to_optax_lbfgs(memory):
    """beta=0, T=1, damping off, one block: optax.scale_by_lbfgs's directions."""
    with jax.enable_x64(True):
        ws, gs = _quadratic_trajectory()
        ref = optax.scale_by_lbfgs(memory_size=memory)
        ml = mlbfgs_optax.scale_by_mlbfgs(
            memory_size=memory, update_period=1, beta=0.0, blocks="all", **NO_DAMPING)
        sr, sm = ref.init(jnp.asarray(ws[0])), ml.init(jnp.asarray(ws[0]))
        ref_update, ml_update = jax.jit(ref.update), jax.jit(ml.update)
        for k, (w, g) in enumerate(zip(ws, gs)):
            dr, sr = ref_update(jnp.asarray(g), sr, jnp.asarray(w))
            dm, sm = ml_update(jnp.asarray(g), sm, jnp.asarray(w))
            if k == 0:  # optax scales its first step by min(1, 1/|g|); we return g.
                np.testing.assert_allclose(dm, g, rtol=1e-12)
            else:
                np.testing.assert_allclose(dm, dr, rtol=1e-10, atol=1e-12)
        assert int(sm.num_pairs[0]) == min(memory, len(ws) - 1)


@pytest.mark.parametrize("blocks", ["all", "leaf"])
def test_follows_authors_update_loop(blocks):
    """Authors' settings: step for step the NumPy transcription of their loop."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        n_w, n_b = 12, 4
        n = n_w + n_b
        a = rng.normal(size=(n, n))
        a = a @ a.T / n + 0.1 * np.eye(n)
        target = rng.normal(size=n)
        lr, wd, T = 0.05, 2e-4, 5
        hp = dict(beta=0.999, update_period=T)
        ref_blocks = [np.arange(n)] if blocks == "all" else [np.arange(n_w, n), np.arange(n_w)]
        ref = AuthorsBlockSlimQN(ref_blocks, lr=lr, momentum=0.9, weight_decay=wd,
                                 beta=hp["beta"], pair_momentum=0.9, update_period=T,
                                 memory=10, tau_max=0.99)
        opt = mlbfgs_optax.authors_recipe(lr, blocks=blocks, weight_decay=wd, update_period=T)
        theta = rng.normal(size=n)
        params = {"w": jnp.asarray(theta[:n_w]), "b": jnp.asarray(theta[n_w:])}
        state = opt.init(params)

        @jax.jit
        def step(params, state, noise):
            flat = jnp.concatenate([params["w"], params["b"]])
            g = a @ (flat - target) + noise
            grads = {"w": g[:n_w], "b": g[n_w:]}
            u, state = opt.update(grads, state, params)
            return optax.apply_updates(params, u), state

        for t in range(200):
            noise = 0.1 * rng.normal(size=n)
            theta = ref.step(theta, a @ (theta - target) + noise)
            params, state = step(params, state, jnp.asarray(noise))
            mine = np.concatenate([params["w"], params["b"]])
            np.testing.assert_allclose(mine, theta, rtol=1e-7, atol=1e-9, err_msg=f"step {t}")
        assert ref.start and int(mlbfgs_optax.find_mlbfgs_state(state).num_pairs.min()) == 10


def test_blockwise_equals_each_block_alone():
    rng = np.random.default_rng(1)
    params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
    kw = dict(update_period=3, beta=0.5, memory_size=4)
    joint = mlbfgs_optax.scale_by_mlbfgs(blocks="leaf", **kw)
    alone = mlbfgs_optax.scale_by_mlbfgs(blocks="all", **kw)
    sj = joint.init(params)
    sa, sb = alone.init(params["a"]), alone.init(params["b"])
    for t in range(40):
        g = jax.tree.map(lambda p: jnp.tanh(p) + 0.1 * jnp.sin(t * p), params)
        dj, sj = joint.update(g, sj, params)
        da, sa = alone.update(g["a"], sa, params["a"])
        db, sb = alone.update(g["b"], sb, params["b"])
        np.testing.assert_allclose(dj["a"], da, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dj["b"], db, rtol=1e-5, atol=1e-6)
        params = jax.tree.map(lambda p, d: p - 0.1 * d, params, dj)
    assert int(sj.num_pairs.min()) > 0


def test_row_and_stacked_packings_give_the_same_steps(monkeypatch):
    """The packing only stores the state: float64 directions agree to round-off (with
    leaves of their own: every one with "leaves", the largest with the others; "auto"
    stacks the other large leaf)."""
    monkeypatch.setattr(mlbfgs_optax._layout, "OWN_BUCKET_SIZE", 15)
    monkeypatch.setattr(mlbfgs_optax._layout, "MAX_OWN_BUCKETS", 1)
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        params = {"a": jnp.asarray(rng.normal(size=(3, 5))), "b": jnp.asarray(rng.normal(size=5)),
                  "c": jnp.asarray(rng.normal(size=(3, 5)))}
        kw = dict(update_period=2, beta=0.5, memory_size=3, pair_warmup=0)
        out = {}
        for packing in ("rows", "stacked", "leaves", "auto"):
            opt = mlbfgs_optax.scale_by_mlbfgs(packing=packing, **kw)
            p, st = params, opt.init(params)
            for t in range(12):
                g = jax.tree.map(lambda x: jnp.tanh(x) + 0.1 * jnp.sin(t * x), p)
                d, st = opt.update(g, st, p)
                p = jax.tree.map(lambda x, u: x - 0.1 * u, p, d)
            assert int(st.num_pairs.min()) > 0
            out[packing] = p
        for k in params:
            # atol: entries driven to ~1e-7 agree to ~1e-18 (round-off of the sums)
            for other in ("stacked", "leaves", "auto"):
                np.testing.assert_allclose(out["rows"][k], out[other][k], rtol=1e-12,
                                           atol=1e-15)


def test_label_blocks_and_callable_labels_agree():
    params = {"enc": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "dec": {"w": jnp.ones(3)}}
    labels = {"enc": {"w": "enc", "b": "enc"}, "dec": {"w": "dec"}}
    by_tree = mlbfgs_optax.scale_by_mlbfgs(memory_size=10, blocks=labels)
    by_fn = mlbfgs_optax.scale_by_mlbfgs(
        memory_size=10,
        blocks=lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[0].key, p))
    s1, s2 = by_tree.init(params), by_fn.init(params)
    assert s1.rho.shape == s2.rho.shape == (2, 10)
    g = jax.tree.map(lambda x: x + 1.0, params)
    for _ in range(25):
        d1, s1 = by_tree.update(g, s1, params)
        d2, s2 = by_fn.update(g, s2, params)
        params = jax.tree.map(lambda p, d: p - 0.1 * d, params, d1)
        g = jax.tree.map(lambda x: 2.0 * x + 1.0, params)
    for x, y in zip(jax.tree.leaves(d1), jax.tree.leaves(d2)):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_equal_slices_converge_like_leaf_blocks():
    """EqualSlices runs end to end; with 1 slice it is the one-block optimizer."""
    params = {"w": jnp.linspace(-1.0, 1.0, 10).reshape(2, 5), "b": jnp.ones(3)}
    loss = lambda p: jnp.sum(p["w"] ** 2 * jnp.arange(1.0, 6.0)[None, :]) + jnp.sum((p["b"] - 2.0) ** 2)
    results = {}
    for name, blocks in [("slices1", mlbfgs_optax.EqualSlices(1)), ("all", "all"),
                         ("slices4", mlbfgs_optax.EqualSlices(4))]:
        opt = mlbfgs_optax.mlbfgs(0.1, memory_size=10, update_period=2, beta=0.5,
                                  blocks=blocks)
        p, s = params, opt.init(params)
        step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
            opt.update(jax.grad(loss)(p), s, p)))
        for _ in range(60):
            p, s = step(p, s)
        results[name] = p
        assert float(loss(p)) < 1e-3 * float(loss(params)), name
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 results["slices1"], results["all"])


# Damping and the guard in the transformation --------------------------------


def test_stored_pairs_respect_damping_bounds():
    rng = np.random.default_rng(3)
    lo, hi = 0.05, 1.5
    tx = mlbfgs_optax.scale_by_mlbfgs(update_period=2, beta=0.3, memory_size=4,
                                      sigma_low=lo, sigma_high=hi, sigma_yy=jnp.inf, blocks="leaf")
    params = {"x": jnp.asarray(rng.normal(size=6), jnp.float32),
              "y": jnp.asarray(rng.normal(size=3), jnp.float32)}
    hess = {"x": jnp.asarray(np.linspace(0.2, 8.0, 6), jnp.float32), "y": jnp.full(3, 0.001)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(60):
        g = jax.tree.map(lambda h, p: h * p + 0.05 * rng.normal(size=p.shape), hess, params)
        d, state = update(g, state, params)
        assert float(optax.tree.vdot(g, d)) > 0  # descent direction
        params = jax.tree.map(lambda p, u: p - 0.05 * u, params, d)
    assert int(state.num_pairs.min()) == 4
    for leaf, b in (("x", 0), ("y", 1)):
        s = np.asarray(state.unpacked("s_history")[leaf])
        y = np.asarray(state.unpacked("y_history")[leaf])
        curv = np.einsum("mi,mi->m", s, y) / np.einsum("mi,mi->m", s, s)
        assert np.all(curv >= lo * (1 - 1e-4)) and np.all(curv <= hi * (1 + 1e-4)), curv
        np.testing.assert_allclose(np.asarray(state.rho[b]), 1 / np.einsum("mi,mi->m", s, y),
                                   rtol=1e-4)
    # The 'y' leaf has curvature 0.001 < sigma_low: it was damped to sigma_low.
    assert float(state.mu[1]) < lo and abs(float(state.mu_damped[1]) - lo) < 1e-4


def test_guard_skips_frozen_block_and_damping_off_keeps_guard():
    tx = mlbfgs_optax.scale_by_mlbfgs(memory_size=10, update_period=1, beta=0.0, **NO_DAMPING)
    params = {"moving": jnp.ones(3), "frozen": jnp.ones(2)}
    state = tx.init(params)
    for t in range(6):
        g = {"moving": 2.0 * params["moving"], "frozen": jnp.full(2, -1.0 * t)}
        d, state = tx.update(g, state, params)
        params = {"moving": params["moving"] - 0.1 * d["moving"], "frozen": params["frozen"]}
    frozen_block = 0  # blocks are ordered by first appearance: 'frozen' sorts first
    assert int(state.num_pairs[frozen_block]) == 0
    assert int(state.num_skipped[frozen_block]) == 5
    assert int(state.num_pairs[1]) == 5
    np.testing.assert_array_equal(d["frozen"], g["frozen"])  # no pair: plain gradient


def test_negative_curvature_pairs_rejected_without_damping():
    tx = mlbfgs_optax.scale_by_mlbfgs(update_period=1, beta=0.0, blocks="all", **NO_DAMPING)
    x = jnp.array([1.0, 2.0])
    state = tx.init(x)
    for _ in range(5):  # concave: f = -|x|^2, g = -2x, s^T y < 0 always
        d, state = tx.update(-2.0 * x, state, x)
        x = x - 0.1 * d
    assert int(state.num_pairs[0]) == 0 and int(state.num_skipped[0]) == 4


# The optax contract -----------------------------------------------------------


def _count_compiles(fn):
    return fn._cache_size()


def test_jit_does_not_recompile_across_pair_steps():
    tx = mlbfgs_optax.mlbfgs(0.1, update_period=3)
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(10):
        g = jax.tree.map(lambda p: p * (1 + 0.1 * t), params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    assert _count_compiles(update) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_updates_keep_gradient_dtype(dtype):
    tx = mlbfgs_optax.scale_by_mlbfgs(update_period=1)
    params = jnp.ones(5, dtype)
    state = tx.init(params)
    for _ in range(3):
        u, state = tx.update(params * 2, state, params)
        assert u.dtype == dtype
        params = (params - 0.1 * u).astype(dtype)
    assert state.rho.dtype == jnp.float32


def test_float64():
    with jax.enable_x64(True):
        tx = mlbfgs_optax.scale_by_mlbfgs(update_period=1)
        params = jnp.ones(5, jnp.float64)
        state = tx.init(params)
        u, state = tx.update(params, state, params)
        assert u.dtype == jnp.float64 and state.rho.dtype == jnp.float64


def test_chain_multisteps_and_extra_args():
    params = {"w": jnp.ones(4)}
    loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
    inner = optax.chain(optax.clip_by_global_norm(10.0), mlbfgs_optax.mlbfgs(0.3, update_period=2))
    tx = optax.MultiSteps(inner, every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(functools.partial(tx.update, unknown_extra=1.0))
    for _ in range(200):
        u, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, u)
    assert float(loss(params)) < 1e-3


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(mlbfgs_optax.mlbfgs, static_args=("memory_size",))(
        learning_rate=0.1, memory_size=5, beta=0.9, update_period=2)
    params = jnp.ones(3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(30):
        u, state = update(2.0 * params, state, params)
        params = optax.apply_updates(params, u)
    state.hyperparams["learning_rate"] = state.hyperparams["learning_rate"] * 0.5
    u, state = update(2.0 * params, state, params)
    assert float(jnp.abs(params).max()) < 0.05
    assert _count_compiles(update) == 1


def test_schedule_learning_rate():
    sched = optax.warmup_cosine_decay_schedule(0.0, 0.2, 5, 50)
    tx = mlbfgs_optax.mlbfgs(sched, update_period=2)
    params = jnp.ones(3)
    state = tx.init(params)
    u, state = tx.update(params, state, params)
    np.testing.assert_allclose(u, 0.0)  # lr is 0 at step 0


def test_init_on_shape_dtype_struct_and_donation():
    params = {"w": jnp.ones((5, 3)), "b": jnp.zeros(3)}
    tx = mlbfgs_optax.mlbfgs(0.1, update_period=2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    state = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    # No buffer is aliased twice: donating a fresh state works.
    ids = [id(x) for x in jax.tree.leaves(state)]
    assert len(ids) == len(set(ids))
    update = jax.jit(tx.update, donate_argnums=(1,))
    for _ in range(5):
        u, state = update(params, state, params)
    assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), state))


def test_state_size_bound():
    """(2M + 5) n numbers for n parameters (2M + 4 without the metric), plus 2M^2 + M + 7
    scalars per block; n counts the packing's padding, at most MAX_PADDING of the buffer."""
    params = {"a": jnp.zeros((100, 30)), "b": jnp.zeros(30)}
    for m in (1, 5, 10):
        st = mlbfgs_optax.scale_by_mlbfgs(memory_size=m).init(params)
        n = sum(x.size for x in st.params_avg)
        assert 3030 <= n <= 3030 / (1 - _packing.MAX_PADDING)
        big = sum(x.size for x in jax.tree.leaves(
            (st.params_avg, st.grads_avg, st.params_snapshot, st.grads_snapshot,
             st.s_history, st.y_history)))
        small = sum(x.size for x in jax.tree.leaves(st)) - big - n
        assert big == (2 * m + 4) * n
        assert mlbfgs_optax.scale_by_mlbfgs(memory_size=m, metric="identity").init(
            params).nu is None
        # Per block: the Gram matrices (3 M^2), rho (M) and 7 scalars; count, 4 weights.
        assert small == 2 * (3 * m * m + m + 7) + 1 + 4
        # Without the cached Gram matrices: O(M) numbers per block.
        st = mlbfgs_optax.scale_by_mlbfgs(memory_size=m, cache_gram=False,
                                          metric="identity").init(params)
        assert sum(x.size for x in jax.tree.leaves(st)) - big == 2 * (m + 7) + 1 + 4
    st16 = mlbfgs_optax.scale_by_mlbfgs(history_dtype=jnp.bfloat16).init(params)
    assert st16.unpacked("s_history")["a"].dtype == jnp.bfloat16


# Convergence ------------------------------------------------------------------


def _run_linesearch(f, x0, steps):
    tx = optax.chain(
        # Deterministic L-BFGS wants the long history (the default is 2 pairs).
        mlbfgs_optax.scale_by_mlbfgs(memory_size=10, update_period=1, beta=0.0, blocks="all",
                                     **NO_DAMPING),
        optax.scale(-1.0),
        optax.scale_by_zoom_linesearch(max_linesearch_steps=30, initial_guess_strategy="one"))
    value_and_grad = optax.value_and_grad_from_state(f)

    def body(carry, _):
        x, st = carry
        v, g = value_and_grad(x, state=st)
        u, st = tx.update(g, st, x, value=v, grad=g, value_fn=f)
        return (optax.apply_updates(x, u), st), v

    (x, _), _ = jax.jit(lambda x, st: jax.lax.scan(body, (x, st), None, length=steps))(
        x0, tx.init(x0))
    return x


def test_converges_on_rosenbrock_with_linesearch():
    """Deterministic regime: beta=0, T=1, damping off, optax's zoom line search."""
    with jax.enable_x64(True):
        rosen = lambda x: jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
        x = _run_linesearch(rosen, jnp.tile(jnp.array([-1.2, 1.0]), 5), 200)
        np.testing.assert_allclose(x, 1.0, atol=1e-8)


def test_converges_on_ill_conditioned_logistic_regression():
    """breast_cancer raw features (Hessian condition ~3e7): f* to 1e-7."""
    from sklearn.datasets import load_breast_cancer

    with jax.enable_x64(True):
        x, y = load_breast_cancer(return_X_y=True)
        x = jnp.asarray(np.hstack([x, np.ones((len(x), 1))]))
        y = jnp.asarray(y, jnp.float64)
        lam = 1e-3

        def f(w):
            z = x @ w
            return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + lam / 2 * jnp.sum(w ** 2)

        w = _run_linesearch(f, jnp.zeros(31), 2500)
        assert float(f(w)) - 0.0972542266 < 1e-7  # scipy L-BFGS-B's optimum


def _naive_lbfgs(lr):
    return optax.lbfgs(learning_rate=lr, linesearch=None)


def test_stochastic_stable_where_naive_lbfgs_is_not():
    """Mini-batch logistic regression: optax.lbfgs without line search stalls far from
    the optimum or blows up at every lr tried; mL-BFGS with its defaults, at Adam's
    usual learning rates, stays finite and near the mini-batch noise floor."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    x = jnp.asarray(np.hstack([x, np.ones((len(x), 1))]), jnp.float32)
    y = jnp.asarray(y, jnp.float32)

    def loss(w, xb, yb):
        z = xb @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - yb * z) + 5e-4 * jnp.sum(w ** 2)

    @functools.partial(jax.jit, static_argnums=0)
    def run(make, lr, idx):  # one compilation per optimizer, lr traced
        tx = make(lr)

        def body(carry, i):
            w, st = carry
            u, st = tx.update(jax.grad(loss)(w, x[i], y[i]), st, w)
            return (optax.apply_updates(w, u), st), loss(w, x, y)
        w0 = jnp.zeros(31)
        return jax.lax.scan(body, (w0, tx.init(w0)), idx)[1]

    for seed in range(2):
        idx = jnp.asarray(np.random.default_rng(seed).integers(0, len(y), size=(1000, 32)))
        for lr in (0.01, 0.03, 0.3):
            naive_loss = np.asarray(run(_naive_lbfgs, lr, idx))
            assert not np.all(np.isfinite(naive_loss)) or np.median(naive_loss[-100:]) > 0.2
        for lr in (0.01, 0.03):
            our_loss = np.asarray(run(mlbfgs_optax.mlbfgs, lr, idx))
            assert np.all(np.isfinite(our_loss)) and our_loss[500:].max() < 0.2
            assert np.median(our_loss[-100:]) < 0.08  # optimum of the full loss is ~0.05


@pytest.mark.parametrize("bias_correction", [True, False])
def test_bias_correction_makes_pairs_exact_on_quadratics(bias_correction):
    """g = A theta + b: bias-corrected averages give y = A s for every pair; the
    uncorrected zero-started averages do not while their weights still grow."""
    a = jnp.array([0.5, 1.0, 4.0])
    b = jnp.array([1.0, -2.0, 3.0])
    tx = mlbfgs_optax.scale_by_mlbfgs(update_period=3, beta=0.9, memory_size=3,
                                      bias_correction=bias_correction, pair_warmup=0,
                                      **NO_DAMPING)
    theta = jnp.array([1.0, 1.0, 1.0])
    state = tx.init(theta)
    for _ in range(12):
        d, state = tx.update(a * theta + b, state, theta)
        theta = theta - 0.1 * d
    s, y = np.asarray(state.unpacked("s_history")), np.asarray(state.unpacked("y_history"))
    stored = np.asarray(state.rho[0]) != 0
    if bias_correction:
        assert stored.sum() == 3
        np.testing.assert_allclose(y[stored], np.asarray(a) * s[stored], rtol=1e-3, atol=1e-6)
    else:
        assert not np.allclose(y[stored], np.asarray(a) * s[stored], rtol=1e-2)


def test_cache_gram_off_gives_the_same_directions():
    """cache_gram=False (scan two-loop, O(M) state per block) = the Gram form."""
    with jax.enable_x64(True):
        ws, gs = _quadratic_trajectory(steps=40)
        kw = dict(update_period=2, beta=0.5, memory_size=4, blocks="all")
        on = mlbfgs_optax.scale_by_mlbfgs(**kw)
        off = mlbfgs_optax.scale_by_mlbfgs(cache_gram=False, **kw)
        s_on, s_off = on.init(jnp.asarray(ws[0])), off.init(jnp.asarray(ws[0]))
        for w, g in zip(ws, gs):
            d_on, s_on = on.update(jnp.asarray(g), s_on, jnp.asarray(w))
            d_off, s_off = off.update(jnp.asarray(g), s_off, jnp.asarray(w))
            np.testing.assert_allclose(d_on, d_off, rtol=1e-9, atol=1e-12)
        assert int(s_on.num_pairs[0]) == 4 and s_off.sy_gram.shape == (1, 0, 0)


def test_hessian_vector_pairs_are_exact_under_gradient_noise():
    """``curvature="hessian_vector"``: with noisy gradients (where gradient-difference
    pairs are noise) every stored y is exactly A s of a quadratic, through the ``mlbfgs``
    chain (weight decay and momentum pass ``grad_fn`` on) and a jitted step."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 5))
    a = jnp.asarray(q @ q.T + np.eye(5), jnp.float32)
    lam = 1e-2
    f = lambda p: 0.5 * p["w"] @ a @ p["w"] + jnp.sum(p["w"])
    inner = lambda **kw: mlbfgs_optax.scale_by_mlbfgs(
        learning_rate=0.05, momentum=0.9, memory_size=10, update_period=2, beta=0.5,
        **NO_DAMPING, **kw)
    tx = optax.chain(optax.add_decayed_weights(lam), inner(curvature="hessian_vector"),
                     optax.scale_by_learning_rate(0.05))
    p = {"w": jnp.ones(5)}
    state = tx.init(p)

    @jax.jit
    def step(p, state, noise):
        g = jax.tree.map(lambda x, n: x + n, jax.grad(f)(p), noise)
        u, state = tx.update(g, state, p, grad_fn=jax.grad(f))
        return optax.apply_updates(p, u), state

    for _ in range(12):
        p, state = step(p, state, {"w": jnp.asarray(rng.normal(size=5), jnp.float32)})
    st = state[1]
    s, y = np.asarray(st.unpacked("s_history")["w"]), np.asarray(st.unpacked("y_history")["w"])
    stored = np.asarray(st.rho[0]) != 0
    assert stored.sum() == 5
    # grad_fn is the caller's gradient; the weight decay is not in it.
    np.testing.assert_allclose(y[stored], s[stored] @ np.asarray(a).T, rtol=1e-4, atol=1e-6)
    plain = optax.chain(optax.add_decayed_weights(lam), inner(),
                        optax.scale_by_learning_rate(0.05))
    pstate = plain.init({"w": jnp.ones(5)})
    assert jax.tree.structure(pstate) == jax.tree.structure(state)  # same state


def test_hessian_vector_pairs_need_grad_fn_and_one_device():
    tx = mlbfgs_optax.scale_by_mlbfgs(curvature="hessian_vector")
    p = jnp.ones(3)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(ValueError, match="axis_name or mesh"):
        mlbfgs_optax.scale_by_mlbfgs(curvature="hessian_vector", axis_name="x",
                                     blocks=mlbfgs_optax.EqualSlices(2))
    # Gradient-difference pairs ignore a grad_fn passed by a shared training loop.
    plain = mlbfgs_optax.scale_by_mlbfgs()
    d1, _ = plain.update(p, plain.init(p), p, grad_fn=lambda x: 1e9 * x)
    d2, _ = plain.update(p, plain.init(p), p)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))


def test_hessian_vector_pairs_through_inject_hyperparams_and_multisteps():
    """optax's wrappers pass ``grad_fn`` on; pairs get stored through each."""
    f = lambda p: jnp.sum(jnp.array([1.0, 10.0]) * p ** 2)
    p = jnp.ones(2)

    def chain(learning_rate):
        return optax.chain(mlbfgs_optax.scale_by_mlbfgs(
            learning_rate=learning_rate, curvature="hessian_vector", update_period=2,
            pair_warmup=0, momentum=0.9), optax.scale_by_learning_rate(learning_rate))

    inject = optax.inject_hyperparams(chain)(learning_rate=0.01)
    multi = optax.MultiSteps(chain(0.01), 2)
    for tx, inner in ((inject, lambda s: s.inner_state[0]),
                      (multi, lambda s: s.inner_opt_state[0])):
        step = jax.jit(lambda g, s, q, tx=tx: tx.update(g, s, q, grad_fn=jax.grad(f)))
        q, state = p, tx.init(p)
        for _ in range(8):
            u, state = step(jax.grad(f)(q), state, q)
            q = optax.apply_updates(q, u)
        assert int(inner(state).num_pairs[0]) >= 1
        assert float(f(q)) < float(f(p))


@pytest.mark.parametrize("pair_warmup,beta,first", [
    (None, 0.9, 14), pytest.param(None, 0.5, 9, marks=pytest.mark.slow),  # same rule as above
    (0, 0.9, 9), (25, 0.5, 29)])
def test_pair_warmup_delays_the_first_stored_pair(pair_warmup, beta, first):
    """No pair before call ``pair_warmup`` (None: 1 / (1 - beta)); T = 5, so pair steps
    are calls 4, 9, 14, ... and the first is only a snapshot."""
    f = lambda x: jnp.sum(jnp.array([1.0, 3.0]) * (x - 1.0) ** 2)
    tx = mlbfgs_optax.scale_by_mlbfgs(update_period=5, beta=beta, pair_warmup=pair_warmup,
                                      learning_rate=0.1)
    x = jnp.zeros(2)
    state = tx.init(x)
    stored_at = None
    for t in range(35):
        d, state = tx.update(jax.grad(f)(x), state, x)
        x = x - 0.1 * d
        if stored_at is None and int(state.num_pairs[0]) > 0:
            stored_at = t
    assert stored_at == first


# Momentum and weight decay ---------------------------------------------------


def _run(tx, params, grad, steps):
    state, out = tx.init(params), []
    for _ in range(steps):
        u, state = tx.update(grad(params), state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out, state


# "leaf" in CI; the other block kinds share the momentum code (slow tier).
@pytest.mark.parametrize("blocks", ["leaf", pytest.param("all", marks=pytest.mark.slow),
                                    pytest.param(mlbfgs_optax.EqualSlices(2),
                                                 marks=pytest.mark.slow)])
def test_packed_momentum_equals_optax_ema_after_the_direction(blocks):
    """``scale_by_mlbfgs(momentum=mu)`` holds the direction's debiased EMA in its packed
    state: the same steps as ``optax.ema(mu, debias=True)`` chained after it (float64,
    past several pairs), and a step that is not finite leaves the average as it was."""
    with jax.enable_x64(True):
        f = lambda p: (jnp.sum(jnp.arange(1.0, 8.0) * (p["w"] - 1.0) ** 2 + 0.1 * p["w"] ** 4)
                       + jnp.sum(jnp.arange(1.0, 4.0) * (p["b"] - 2.0) ** 2))
        params = {"w": jnp.linspace(-1.0, 2.0, 7), "b": jnp.ones(3)}
        kw = dict(update_period=2, beta=0.5, pair_warmup=0, learning_rate=0.05, blocks=blocks)
        packed = mlbfgs_optax.scale_by_mlbfgs(momentum=0.8, **kw)
        ref = optax.chain(mlbfgs_optax.scale_by_mlbfgs(**kw), optax.ema(0.8, debias=True))
        out, state = _run(packed, params, jax.grad(f), 30)
        want, _ = _run(ref, params, jax.grad(f), 30)
        assert int(state.num_pairs.sum()) > 0
        for u, v in zip(out, want):
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)  # 30 steps apart
        bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
        u, after = packed.update(bad, state, params)
        assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(u))  # passed through
        for a, b in zip(after.direction_avg, state.direction_avg):
            np.testing.assert_array_equal(a, b)
        assert mlbfgs_optax.scale_by_mlbfgs().init(params).direction_avg is None
    with pytest.raises(ValueError, match="momentum"):
        mlbfgs_optax.scale_by_mlbfgs(momentum=1.0)


@pytest.mark.parametrize("mode", ["decoupled", "l2"])
def test_weight_decay_modes(mode):
    """``weight_decay_mode="l2"`` (default) adds the decay to the gradient before the
    direction; ``"decoupled"`` is AdamW's decay, added to the step after the momentum. Both
    equal the optax chains that say so; the state's structure does not depend on the
    decay, which may be traced (``inject_hyperparams``)."""
    f = lambda p: jnp.sum((p["w"] - 3.0) ** 2 * jnp.arange(1.0, 5.0))
    params = {"w": jnp.ones(4), "b": jnp.zeros(2)}
    lr, lam = 0.05, 0.1
    kw = dict(update_period=2, beta=0.5)
    grad = lambda p: {"w": jax.grad(f)(p)["w"], "b": jnp.ones(2)}
    inner = mlbfgs_optax.scale_by_mlbfgs(learning_rate=lr, momentum=0.9, **kw)
    decay = optax.add_decayed_weights(lam)
    ref = (optax.chain(inner, decay, optax.scale_by_learning_rate(lr)) if mode == "decoupled"
           else optax.chain(decay, inner, optax.scale_by_learning_rate(lr)))
    tx = mlbfgs_optax.mlbfgs(lr, weight_decay=lam, **kw,
                             **({} if mode == "l2" else {"weight_decay_mode": mode}))
    traced = optax.inject_hyperparams(mlbfgs_optax.mlbfgs, static_args=("memory_size",))(
        learning_rate=lr, weight_decay=lam, weight_decay_mode=mode, **kw)
    want, _ = _run(ref, params, grad, 20)
    for opt in (tx, traced):
        out, _ = _run(opt, params, grad, 20)
        for u, v in zip(out, want):
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    no_decay = mlbfgs_optax.mlbfgs(lr, **kw)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(no_decay.init(params))
    with pytest.raises(ValueError, match="weight_decay_mode"):
        mlbfgs_optax.mlbfgs(lr, weight_decay_mode="adamw")


def test_along_s_pairs_with_sigma_low_one_never_lengthen_a_block_step():
    """pair_form='along_s', sigma_low=1: H <= H0, so in the metric every block's direction
    is at most as long as the chain's D g (the same state with its pairs marked empty)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 60)) / 8
    params = {"w": jnp.zeros(30), "v": jnp.zeros((5, 6))}
    opt = mlbfgs_optax.scale_by_mlbfgs(learning_rate=0.05, pair_form="along_s", sigma_low=1.0,
                                       step_bound=None, update_period=2, beta=0.9)
    state = opt.init(params)
    update = jax.jit(opt.update)
    stored = 0
    for t in range(120):
        flat = jnp.concatenate([params["w"], params["v"].ravel()])
        g = a.T @ (a @ flat - 1.0) + 0.3 * rng.normal(size=60)  # noisy gradient
        grads = {"w": jnp.asarray(g[:30]), "v": jnp.asarray(g[30:]).reshape(5, 6)}
        d, new = update(grads, state, params)
        d0, _ = update(grads, state._replace(rho=jnp.zeros_like(state.rho)), params)
        for k in params:
            dk, d0k, gk = (np.asarray(x[k], np.float64).ravel() for x in (d, d0, grads))
            metric = d0k / gk  # D, from the chain's direction D g
            assert np.sum(dk ** 2 / metric) <= np.sum(d0k ** 2 / metric) * (1 + 1e-4)
        stored = max(stored, int(jnp.max(new.num_pairs)))
        state = new
        params = jax.tree.map(lambda p, u: p - 0.05 * u, params, d)
    assert stored > 0  # pairs were stored and used
