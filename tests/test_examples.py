"""Smoke tests of the example scripts (``--quick`` sizes, run in-process).

Also checks that the mL-BFGS state survives ``jax.jit`` with buffer donation
inside a flax ``TrainState`` and inside an ``nnx.Optimizer``.
"""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlbfgs_optax  # noqa: E402
from examples import (  # noqa: E402
    common,
    diagnostics,
    linen_train,
    nnx_train,
    optax_chain,
    train_mnist1d,
)


def _assert_decreased(result):
    assert np.isfinite(result["final_loss"])
    assert result["final_loss"] < 0.9 * result["initial_loss"], result


def _batches(n, batch_size=32, seed=0):
    """``n`` random MNIST-1D-shaped batches."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, batch_size, 40)).astype(np.float32)
    y = rng.integers(0, 10, size=(n, batch_size)).astype(np.int32)
    return x, y


def test_train_mnist1d_quick(tmp_path):
    out = tmp_path / "curves.png"
    results = train_mnist1d.main(["--quick", "--out", str(out)])
    assert set(results) == {"mL-BFGS", "AdamW"}
    for r in results.values():
        _assert_decreased(r)
        assert 0.0 <= r["test_acc"][-1] <= 1.0
        assert r["ms_per_step"] > 0
        assert r["largest_rise"] >= 1.0
    assert out.stat().st_size > 10_000
    # The state's bytes per parameter: (2M + 6) float32 numbers at the default M = 2, and
    # the per-block scalars of the CNN's 6 leaves; AdamW's mu and nu.
    assert 40.0 < results["mL-BFGS"]["state_bytes_per_param"] < 41.0
    assert 8.0 < results["AdamW"]["state_bytes_per_param"] < 8.01


def test_train_mnist1d_tune_picks_the_lowest_final_loss(monkeypatch, capsys):
    monkeypatch.setattr(train_mnist1d, "TUNE_GRID", (1e-4, 1e-2))
    args = train_mnist1d.parse_args(["--quick"])
    data = train_mnist1d.common.load_mnist1d(args)
    model = train_mnist1d.common.CNN1D()
    params = model.init(jax.random.key(0), data[0][:1])["params"]
    best = train_mnist1d.tune(model, params, data, args)
    assert best == {"mL-BFGS": 1e-2, "AdamW": 1e-2}  # 1e-4 barely moves in 60 steps
    assert "-> best 0.01" in capsys.readouterr().out


def test_largest_rise():
    assert train_mnist1d.largest_rise(np.linspace(2.0, 1.0, 200), width=10) == 1.0
    bump = np.concatenate([np.ones(100), 3.0 * np.ones(50), np.ones(100)])
    assert train_mnist1d.largest_rise(bump, width=10) == pytest.approx(3.0)


def test_linen_train_quick_and_trainstate_donation():
    r = linen_train.main(["--quick"])
    _assert_decreased(r)
    # Keep training the returned TrainState with the donating train step.
    state = r["state"]
    xs, ys = _batches(3, batch_size=128)
    for x, y in zip(xs, ys):
        old = state
        state, loss = linen_train.train_step(state, x, y)  # donate_argnums=0
        assert np.isfinite(float(loss))
        assert all(a.is_deleted() for a in jax.tree.leaves(old.opt_state))
    mstate = mlbfgs_optax.find_mlbfgs_state(state.opt_state)
    assert int(mstate.count) == int(state.step)
    assert int(mstate.num_pairs.min()) >= 1
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state))


def test_nnx_train_quick():
    # nnx_train.train_step is an nnx.jit with the model and optimizer donated.
    r = nnx_train.main(["--quick"])
    _assert_decreased(r)
    mstate = mlbfgs_optax.find_mlbfgs_state(r["optimizer"].opt_state)
    assert int(mstate.count[...]) == int(r["optimizer"].step[...]) == 60
    assert int(np.min(mstate.num_pairs[...])) >= 1


def test_optax_chain_quick():
    r = optax_chain.main(["--quick"])
    _assert_decreased(r)
    assert r["skipped_steps"] == 1  # the poisoned mini-batch, and only it
    assert r["params_finite"]
    assert r["mlbfgs_count"] == r["optimizer_steps"] > 0


def test_diagnostics_quick(tmp_path):
    out = tmp_path / "diag.png"
    r = diagnostics.main(["--quick", "--out", str(out)])
    _assert_decreased(r)
    log = r["log"]
    num_blocks = len(r["names"])
    assert log["mu"].shape == (len(log["step"]), num_blocks)
    assert log["num_pairs"][-1].min() >= 1
    lo, hi = 0.1, 10.0  # the script's default sigma bounds (the library's)
    stored = log["num_pairs"][-1] > 0
    assert np.all((log["mu_damped"][-1][stored] >= lo - 1e-4)
                  & (log["mu_damped"][-1][stored] <= hi + 1e-4))
    assert out.stat().st_size > 10_000


def test_nnx_optimizer_jit_donation():
    from flax import nnx

    model = nnx_train.CNN1D(channels=4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model,
        mlbfgs_optax.mlbfgs(learning_rate=0.05, update_period=2, beta=0.5, sigma_low=0.5),
        wrt=nnx.Param,
    )
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(nnx_train.loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    xs, ys = _batches(7)
    for x, y in zip(xs, ys):
        old_leaves = jax.tree.leaves(state)
        state, loss = step(state, x, y)
        assert np.isfinite(float(loss))
        assert all(a.is_deleted() for a in old_leaves)
    model, optimizer = nnx.merge(graphdef, state)
    mstate = mlbfgs_optax.find_mlbfgs_state(optimizer.opt_state)
    assert int(optimizer.step[...]) == 7
    assert int(mstate.count[...]) == 7
    # pair steps at counts 2, 4, 6; the first only takes the snapshot
    assert np.asarray(mstate.num_pairs[...]).tolist() == [2] * 6


def test_common_options_quick_and_out():
    p = common.make_parser("An example.\n\nMore.", lr=0.1, steps=100, out="x.png", quick="q",
                           mlbfgs=("--sigma-low", "--beta"))
    p.add_argument("--eval-every", type=int, default=10)
    a = common.parse_args(p, [], steps=5, eval_every=1)
    assert (a.steps, a.eval_every, a.out, a.lr, a.sigma_low, a.beta) == (
        100, 10, "x.png", 0.1, 1.0, 0.99)  # the library's defaults
    a = common.parse_args(p, ["--quick"], steps=5, eval_every=1)
    assert (a.steps, a.eval_every, a.out) == (5, 1, "")  # no plot unless --out is given
    assert common.parse_args(p, ["--quick", "--out", "y.png"], steps=5).out == "y.png"
    assert common.parse_args(p, ["--quick", "--out=y.png"], steps=5).out == "y.png"
    assert p.description == "An example."


@pytest.mark.slow  # 60 s; the state following FSDP params is tested in tests/test_distributed.py
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_train_fsdp_quick_state_follows_the_params():
    from examples import train_fsdp

    r = train_fsdp.main(["--quick"])
    assert r["n_devices"] == 8
    assert tuple(r["history_spec"])[:2] == (None, "fsdp")
    # Weights and biases of width 64/40 split 8 ways; the 10-wide head stays whole.
    assert r["state_bytes_per_device"] < r["state_bytes_single_device"] / 5
    assert r["final_loss"] < r["initial_loss"]
