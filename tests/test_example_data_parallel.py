"""Smoke test of examples/train_data_parallel.py on the 8 fake CPU devices of conftest.py.

The script blocks after every step (see its comment on XLA:CPU rendezvous).
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples import train_data_parallel  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def test_train_data_parallel_quick(capsys):
    r = train_data_parallel.main(["--quick"])
    out = capsys.readouterr().out
    assert "bytes per device" in out and "final test accuracy" in out
    assert r["n_devices"] == 8 and r["num_blocks"] == 16
    # Every device holds 1/8 of the mL-BFGS state, up to the few replicated scalars
    # (count and the 4 average weights: 4 + 4 * 4 bytes).
    assert len(r["state_bytes_by_device"]) == 8
    assert r["state_bytes_per_device"] <= r["state_bytes_single_device"] / 8 + 20
    assert r["state_bytes_per_device"] < r["state_bytes_single_device"] / 7
    assert np.isfinite(r["final_loss"])
    assert r["final_loss"] < 0.9 * r["initial_loss"]
    assert r["min_pairs_per_block"] >= 1  # the curvature pairs were used
    assert 0.15 < r["test_acc"] <= 1.0  # above chance (0.1) after 60 steps


def test_train_data_parallel_help(capsys):
    with pytest.raises(SystemExit) as e:
        train_data_parallel.main(["--help"])
    assert e.value.code == 0
    assert "--blocks-per-device" in capsys.readouterr().out


def test_batch_must_divide_over_devices():
    with pytest.raises(SystemExit, match="multiple of the 8 devices"):
        train_data_parallel.main(["--quick", "--batch-size", "100"])


@pytest.mark.slow  # 45 s; the layouts it times are tested in tests/test_distributed.py
def test_distributed_benchmark_quick():
    """examples/benchmarks/distributed.py: memory 1/N, one all-gather = half the grad all-reduce."""
    from examples.benchmarks import distributed

    r = distributed.main(["--quick", "--devices", "1,8"])
    rows = {row["devices"]: row for row in r["rows"]}
    base = rows[1]["state_bytes_per_device_max"]
    for n in (8,):
        row = rows[n]
        # 1/N of the state, plus the replicated count (4 B) and average weights (16 B).
        assert row["state_bytes_per_device_max"] == (base - 20) // n + 20
        assert [c["op"] for c in row["collectives"]] == ["all-gather"]
        assert row["collectives"][0]["group_size"] == n
        # The direction all-gather is (N-1)/N of the float32 parameters, the gradient
        # ring all-reduce 2(N-1)/N: exactly half (16 blocks divide 131,584 evenly).
        assert row["comm_bytes_per_device"] == r["num_params"] * 4 * (n - 1) / n
        assert row["comm_bytes_per_device"] == row["grad_allreduce_bytes_per_device"] / 2
        assert [c["op"] for c in row["collectives_normalize"]].count("all-reduce") == 3
    assert rows[1]["collectives"] == []
