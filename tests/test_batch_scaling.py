"""The batch-scaling benchmark (examples/benchmarks/batch_scaling.py) produces well-formed numbers.

Structure only: the steps-to-target and critical-batch computations on hand-made inputs,
the traced schedule against optax's, and a --quick run's outputs (keys, finite numbers,
files). No assertion on a measured time or ratio.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from examples.benchmarks import batch_scaling as bs
from examples.benchmarks import scale


def test_steps_to_target_hand_made_curve():
    steps = [0, 10, 20, 30, 40]
    loss = [2.3, 1.0, float("nan"), 0.4, 0.3]
    assert bs.steps_to_target(steps, loss, 0.5) == 30
    assert bs.steps_to_target(steps, loss, 1.0) == 10  # at the target counts
    assert bs.steps_to_target(steps, loss, 0.1) is None
    acc = [0.1, 0.5, 0.7, 0.69, 0.8]
    assert bs.steps_to_target(steps, acc, 0.7, below=False) == 20


@pytest.mark.parametrize("steps, expected", [
    # Perfect scaling up to 1024, then 1024 -> 4096 (2 doublings) saves only 20%: critical 1024.
    ({64: 1600, 256: 400, 1024: 100, 4096: 80, 8192: 70}, {"batch": 1024, "bounded": True}),
    # Every step up saves at least a third per doubling (4096 -> 8192: 90 -> 60).
    ({64: 1600, 256: 700, 1024: 300, 4096: 90, 8192: 60}, {"batch": 8192, "bounded": False}),
    # The smallest batch never reaches the target: the walk starts at the next one.
    ({64: None, 256: 400, 1024: 100, 4096: 90, 8192: 80}, {"batch": 1024, "bounded": True}),
    # A larger batch that does not reach the target does not pay.
    ({64: 1600, 256: 400, 1024: None}, {"batch": 256, "bounded": True}),
    # 1/3 saved exactly pays: 300 -> 200.
    ({512: 300, 1024: 200}, {"batch": 1024, "bounded": False}),
    ({64: None, 256: None}, {"batch": None, "bounded": False}),
])
def test_critical_batch_hand_made(steps, expected):
    assert bs.critical_batch(steps) == expected


def test_progress_schedule_matches_warmup_cosine():
    ref = scale.warmup_cosine(0.3, 200)
    ours = bs.progress_schedule(jnp.float32(0.3), jnp.float32(200))
    for count in (0, 3, 10, 57, 150, 199, 200):
        np.testing.assert_allclose(float(ours(count)), float(ref(count)), atol=1e-6)


def test_quick_run_structure(tmp_path):
    result = bs.main(["--quick", "--out", str(tmp_path)])
    for name in ("batch_scaling.json", "batch_scaling.md", "batch_scaling.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "batch_scaling.json") as f:
        saved = json.load(f)
    assert set(saved["tasks"]) == set(result["tasks"]) == {"mnist1d_mlp"}
    t = saved["tasks"]["mnist1d_mlp"]
    batches = [str(b) for b in saved["config"]["batches"]]
    assert set(t["results"]) == set(saved["config"]["optimizers"])
    for opt, res in t["results"].items():
        assert set(res) == set(batches)
        assert set(t["critical_batch"][opt]) == {"batch", "bounded"}
        for s in res.values():
            assert len(s["runs"]) == len(bs.SEEDS)
            assert len(s["grid"]) >= bs.GRID_POINTS
            assert s["lr"] > 0 and math.isfinite(s["final_train_loss"])
            for r in s["runs"]:
                assert r["lr"] == s["lr"]
                curve = r["curve"]
                assert curve["step"][0] == 0 and curve["step"][-1] == r["steps_budget"]
                assert all(math.isfinite(v) for v in curve["train_loss"] + curve["test_acc"])
                assert curve["seconds"] == sorted(curve["seconds"])
                if r["steps_to_train_target"] is not None:
                    assert r["seconds_to_train_target"] >= 0
    md = (tmp_path / "batch_scaling.md").read_text()
    assert "Measured on CPU only" in md and "Critical batch size" in md
