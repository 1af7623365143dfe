"""_pairs: every step of pair formation against a NumPy transcription (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlbfgs_optax import _layout, _options, _pairs, _state
from tests.helpers import damp as np_damp

M = 3


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _setup(blocks="leaf", seed=0, **kw):
    """Two leaves, a state with random averages/snapshots/history, and hyperparameters."""
    rng = np.random.default_rng(seed)
    params = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    layout = _layout.make_layout(params, blocks)
    args = dict(memory_size=M, update_period=2, beta=0.9, sigma_low=0.5, sigma_high=1.5,
                tau_max=1.0, pair_momentum=0.0, refresh_grad_average=False, normalize=False,
                blocks=blocks, sigma_yy=None, cache_gram=True, bias_correction=True,
                history_dtype=None, averages_dtype=None, curvature_eps=None, axis_name=None,
                mesh=None, metric="identity", metric_decay=0.999, metric_eps=1e-8,
                step_bound=None, roundoff_rejection=None, learning_rate=None, pair_warmup=0,
                curvature="gradient_difference", packing="auto", momentum=None,
                pair_form="full")
    args.update(kw)
    opts, h = _options.make_options(**args)
    dt = _state.dtypes(layout)
    st = _state.zeros_state(layout, M, opts.cache_gram, dt)
    rand = lambda packed: _random(layout, rng, packed)
    st = st._replace(params_avg=rand(st.params_avg), grads_avg=rand(st.grads_avg),
                     params_snapshot=rand(st.params_snapshot),
                     grads_snapshot=rand(st.grads_snapshot),
                     avg_weights=jnp.asarray([0.9, 0.8, 0.6, 0.5]))
    return layout, opts, h, dt, st, rng


def _random(layout, rng, packed, history=False):
    """Random values in the shape of a packed list, zero in the padding (as packing makes it).

    ``history``: ``packed`` are unit-major histories.
    """
    values = [jnp.asarray(rng.normal(size=x.shape)) for x in packed]
    if history:
        return layout.pack_history(layout.unpack_history(values))
    return layout.pack(layout.unpack(values))


def _flat(layout, packed, block):
    """Block ``block`` of a packed list as one NumPy vector (its leaves raveled, no padding)."""
    leaves = layout.treedef.flatten_up_to(layout.unpack(list(packed)))
    parts = []
    for bucket in layout.buckets:
        for k, i in enumerate(bucket.leaves):
            unit = k if bucket.starts is None else bucket.starts[k] // bucket.shape[1]
            if bucket.unit_block[unit] == block:
                parts.append(np.ravel(leaves[i]))
    return np.concatenate(parts)


def _field(layout, tree, block):
    return _flat(layout, tree, block)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_candidate_is_difference_of_corrected_averages(bias_correction):
    layout, _, _, dt, st, _ = _setup()
    s, y = _pairs.candidate(layout, st, bias_correction, dt.acc)
    w = np.asarray(st.avg_weights) if bias_correction else np.ones(4)
    for b in range(layout.num_blocks):
        f = lambda tree: _field(layout, tree, b)
        np.testing.assert_allclose(_flat(layout, s, b),
                                   f(st.params_avg) / w[0] - f(st.params_snapshot) / w[2])
        np.testing.assert_allclose(_flat(layout, y, b),
                                   f(st.grads_avg) / w[1] - f(st.grads_snapshot) / w[3])


def test_pair_momentum_mixes_newest_pair_only_where_history_exists():
    layout, _, _, dt, st, rng = _setup()
    s, y = _pairs.candidate(layout, st, True, dt.acc)
    hist = lambda packed: _random(layout, rng, packed, history=True)
    s_hist = hist(st.s_history)
    y_hist = hist(st.y_history)
    newest = jnp.asarray([2, 0])
    num_pairs = jnp.asarray([1, 0])  # block 1 has no pair yet
    s2, y2 = _pairs.with_pair_momentum(layout, s, y, s_hist, y_hist, newest, num_pairs, 0.9,
                                       dt.acc)
    prev_s = [np.asarray(h)[:, 2] for h in s_hist]
    b0 = lambda v: _flat(layout, v, 0)
    np.testing.assert_allclose(b0(s2), 0.1 * b0(s) + 0.9 * _flat(layout, prev_s, 0))
    np.testing.assert_allclose(_flat(layout, s2, 1), _flat(layout, s, 1))
    np.testing.assert_allclose(_flat(layout, y2, 1), _flat(layout, y, 1))


@pytest.mark.parametrize("scale", [1.0, 1e200, 1e-200])
def test_damp_matches_spec_and_is_scale_invariant(scale):
    layout, _, h, dt, st, _ = _setup(sigma_yy=float("inf"), tau_max=0.99)
    s, y = _pairs.candidate(layout, st, True, dt.acc)
    s = [x * scale for x in s]
    y = [x * scale for x in y]
    out = _pairs.damp(layout, s, y, h, False, dt.acc)
    for b in range(layout.num_blocks):
        sb, yb = _flat(layout, s, b) / scale, _flat(layout, y, b) / scale
        tau, y_hat, mu = np_damp(sb, yb, 0.5, 1.5, 0.99)
        np.testing.assert_allclose(float(out.mu[b]), mu, rtol=1e-12)
        np.testing.assert_allclose(float(out.tau[b]), tau, rtol=1e-12)
        np.testing.assert_allclose(_flat(layout, out.y_hat, b) / scale, y_hat, rtol=1e-10)


def test_damp_along_s_keeps_the_damped_curvature_along_s():
    layout, _, h, dt, st, _ = _setup(sigma_yy=2.0)
    s, y = _pairs.candidate(layout, st, True, dt.acc)
    full = _pairs.damp(layout, s, y, h, False, dt.acc)
    along = _pairs.damp(layout, s, y, h, True, dt.acc, along_s=True)
    np.testing.assert_array_equal(np.asarray(along.tau), np.asarray(full.tau))
    for b in range(layout.num_blocks):
        sb, yh = _flat(layout, s, b), _flat(layout, full.y_hat, b)
        mu_hat = (sb @ yh) / (sb @ sb)  # the paper's pair's curvature along s (no yy bound)
        np.testing.assert_allclose(_flat(layout, along.y_hat, b), mu_hat * sb, rtol=1e-12)
        assert 0.5 - 1e-12 <= mu_hat <= 1.5 + 1e-12


def test_damp_yy_bound_lowers_tau():
    layout, _, h, dt, st, _ = _setup(sigma_yy=2.0)
    s, y = _pairs.candidate(layout, st, True, dt.acc)
    out = _pairs.damp(layout, s, y, h, True, dt.acc)
    for b in range(layout.num_blocks):
        sb, yh = _flat(layout, s, b), _flat(layout, out.y_hat, b)
        assert yh @ yh <= 2.0 * (sb @ yh) * (1 + 1e-12)


def test_products_and_gram_rows_against_numpy():
    layout, _, _, dt, st, rng = _setup()
    s, y = _pairs.candidate(layout, st, True, dt.acc)
    hist = lambda packed: _random(layout, rng, packed, history=True)
    s_hist, y_hist = hist(st.s_history), hist(st.y_history)
    q = _random(layout, rng, s)
    slot = jnp.asarray([1, 2])
    p = _pairs.products(layout, s, y, dt.acc)
    # The rows are taken of the history the pair was stored in.
    write = jnp.asarray([True, True])
    s_hist = [layout.scatter_slot(h, v, slot, write, j) for j, (h, v) in enumerate(zip(s_hist, s))]
    y_hist = [layout.scatter_slot(h, v, slot, write, j) for j, (h, v) in enumerate(zip(y_hist, y))]
    (row_ss, col_sy_, row_sy_, row_yy), (sq, yq) = _pairs.gram_rows(layout, s_hist, y_hist,
                                                                     slot, q, dt.acc)
    for b in range(layout.num_blocks):
        sb, yb, qb = _flat(layout, s, b), _flat(layout, y, b), _flat(layout, q, b)
        sh = [_flat(layout, [h[:, m] for h in s_hist], b) for m in range(M)]
        yh = [_flat(layout, [h[:, m] for h in y_hist], b) for m in range(M)]
        np.testing.assert_allclose(float(p.sy[b]), sb @ yb)
        row_sy = [sb @ yh[m] for m in range(M)]
        col_sy = [sh[m] @ yb for m in range(M)]
        assert np.isclose(row_sy[int(slot[b])], sb @ yb) and np.isclose(col_sy[int(slot[b])],
                                                                           sb @ yb)
        np.testing.assert_allclose(np.asarray(row_sy_[b]), row_sy)
        np.testing.assert_allclose(np.asarray(col_sy_[b]), col_sy)
        np.testing.assert_allclose(np.asarray(row_yy[b]), [yh[m] @ yb for m in range(M)])
        np.testing.assert_allclose(np.asarray(row_ss[b]), [sh[m] @ sb for m in range(M)])
        np.testing.assert_allclose(np.asarray(sq[b]), [sh[m] @ qb for m in range(M)])
        np.testing.assert_allclose(np.asarray(yq[b]), [yh[m] @ qb for m in range(M)])
    assert bool(jnp.all(p.finite))


def test_accept_guard():
    p = _pairs.Products(ss=jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0]),
                        sy=jnp.asarray([0.5, -0.5, 1e-20, 0.0, jnp.nan]),
                        yy=jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0]),
                        finite=jnp.asarray([True, True, True, True, False]))
    ok = _pairs.accept(p, jnp.asarray(True), None, jnp.float64)
    assert ok.tolist() == [True, False, False, False, False]
    assert not bool(jnp.any(_pairs.accept(p, jnp.asarray(False), None, jnp.float64)))


def test_store_writes_ring_slot_rho_gamma_and_gram_only_where_accepted():
    layout, opts, _, dt, st, _ = _setup()
    s, y = _pairs.candidate(layout, st, True, dt.acc)
    slot = jnp.asarray([0, 0])
    p = _pairs.products(layout, s, y, dt.acc)
    ok = jnp.asarray([True, False])
    new = _pairs.store(layout, st, s, y, p, slot, ok)
    rows, _ = _pairs.gram_rows(layout, new.s_history, new.y_history, slot, None, dt.acc)
    new = _pairs.store_gram_rows(layout, new, rows, slot, ok)
    s_hist = new.unpacked("s_history")
    np.testing.assert_allclose(np.asarray(s_hist["a"][0]), np.asarray(layout.unpack(s)["a"]))
    assert float(jnp.abs(s_hist["b"]).max()) == 0.0  # rejected: untouched
    np.testing.assert_allclose(float(new.rho[0, 0]), 1.0 / float(p.sy[0]))
    np.testing.assert_allclose(float(new.gamma[0]), float(p.sy[0] / p.yy[0]))
    assert float(new.rho[1, 0]) == 0.0 and float(new.gamma[1]) == 1.0
    np.testing.assert_allclose(float(new.sy_gram[0, 0, 0]), float(p.sy[0]))
    np.testing.assert_allclose(float(new.yy_gram[0, 0, 0]), float(p.yy[0]))
    np.testing.assert_allclose(float(new.ss_gram[0, 0, 0]), float(p.ss[0]))
    assert float(jnp.abs(new.sy_gram[1]).max()) == 0.0  # rejected: untouched
    assert new.newest.tolist() == [0, M - 1] and new.num_pairs.tolist() == [1, 0]


def test_form_pair_takes_snapshot_counts_skips_and_refreshes():
    layout, opts, h, dt, st, _ = _setup(refresh_grad_average=True)
    g = layout.pack({"a": jnp.ones((2, 3)), "b": jnp.ones(4)})
    first = _pairs.form_pair(layout, opts, h, dt, g, jnp.asarray(1), st)  # t < T: no pair
    assert first.num_pairs.tolist() == [0, 0] and first.num_skipped.tolist() == [0, 0]
    np.testing.assert_allclose(np.asarray(layout.unpack(first.params_snapshot)["a"]),
                               np.asarray(layout.unpack(st.params_avg)["a"]))
    np.testing.assert_allclose(np.asarray(layout.unpack(first.grads_avg)["b"]), 0.1)  # (1-beta) g
    np.testing.assert_allclose(np.asarray(first.avg_weights), [0.9, 0.1, 0.9, 0.8])
    later = _pairs.form_pair(layout, opts, h, dt, g, jnp.asarray(3), st)
    assert (later.num_pairs + later.num_skipped).tolist() == [1, 1]


def test_above_roundoff_compares_s_with_the_rounding_of_the_parameter_average():
    layout, opts, h, dt, st, _ = _setup()
    theta_bar = [_flat(layout, st.params_avg, b) / 0.9 for b in range(2)]
    floor = [100 * np.finfo(np.float64).eps * np.abs(x).max() for x in theta_bar]
    s = layout.pack({"a": jnp.full((2, 3), 0.5 * floor[0]), "b": jnp.full(4, 2.0 * floor[1])})
    ok = _pairs.above_roundoff(layout, s, st, True, 100.0, dt.acc)
    assert ok.tolist() == [False, True]
    # In form_pair, the rejected block stores nothing and counts a skip.
    opts, h = _setup(roundoff_rejection=1e20)[1:3]
    new = _pairs.form_pair(layout, opts, h, dt, st.grads_avg, 5, st)
    assert new.num_pairs.tolist() == [0, 0] and new.num_skipped.tolist() == [1, 1]


def test_pair_step_with_hvp_stores_the_hessian_times_s():
    """``curvature="hessian_vector"``: y is the product of the given Hessian with s."""
    layout, opts, h, dt, st, rng = _setup(sigma_low=-np.inf, sigma_high=np.inf)
    mats = [rng.normal(size=(6, 6)), rng.normal(size=(4, 4))]
    mats = [a @ a.T + 6 * np.eye(len(a)) for a in mats]  # SPD: every pair is accepted
    hvp = lambda v: layout.pack({k: jnp.asarray(a @ np.ravel(x)).reshape(x.shape)
                                 for a, (k, x) in zip(mats, sorted(layout.unpack(v).items()))})
    g = st.grads_avg
    new, stored = _pairs.pair_step(layout, opts, h, dt, g, jnp.asarray(5), st, hvp=hvp)
    assert stored.tolist() == [True, True]
    s, _ = _pairs.candidate(layout, st, True, dt.acc)
    for b, a in enumerate(mats):
        s_b = _flat(layout, s, b)
        np.testing.assert_allclose(_flat(layout, [x[:, 0] for x in new.s_history], b), s_b,
                                   rtol=1e-12)
        np.testing.assert_allclose(_flat(layout, [x[:, 0] for x in new.y_history], b), a @ s_b,
                                   rtol=1e-12)
