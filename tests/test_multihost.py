"""Multi-process (multi-host) data parallelism: 2 processes on localhost.

Two worker processes (tests/multihost_worker.py) join one ``jax.distributed``
cluster over TCP on 127.0.0.1, each with 2 fake CPU devices; JAX's CPU
collectives run over gloo. They train a float64 least-squares model with the
batch sharded over a 4-device ``'data'`` mesh spanning both processes and
``mlbfgs(blocks=EqualSlices(8), mesh=mesh, axis_name='data')``, so both the
gradient all-reduce and the optimizer's all-gather of the direction cross the
process boundary, and every device stores 2 of the 8 blocks. The final
parameters must equal the same optimizer run on one device in this process.

Tolerance: atol 1e-8, rtol 1e-7 in float64. The two runs differ only in the
order of floating-point additions (the gradient is summed per shard, then
across processes); each curvature pair is a difference of nearly equal
averages, which amplifies those 1e-16 differences to ~1e-10 relative in
(s, y). The measured difference after 60 steps is ~1e-13 on parameters of
size ~1; a wrong block assignment (tested below with ``EqualSlices(4)``) moves
them by more than 1e-3.

Every subprocess call has a 120 s timeout and the workers' own
``jax.distributed`` timeouts are 30-60 s, so a lost peer fails the test
instead of hanging it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from tests import multihost_worker as worker

WORKER = Path(__file__).with_name("multihost_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 120
ATOL, RTOL = 1e-8, 1e-7

pytestmark = pytest.mark.skipif(
    "jax_cpu_collectives_implementation" not in jax.config.values,
    reason="this jax build has no CPU collectives option (jax_cpu_collectives_implementation),"
    " so CPU devices of different processes cannot communicate",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cluster(out: Path, mode: str = "slices") -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port), str(out), mode],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"multi-process run did not finish within {TIMEOUT_S} s")
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log[-4000:]}"
    with np.load(out) as d:
        return {k: d[k] for k in d.files}


def _single_device(num_blocks=worker.K):
    """The same optimizer, data and steps on one device, no mesh."""
    with jax.enable_x64(True):
        x, y, params = worker.problem()
        opt = worker.make_optimizer(num_blocks)
        params = jax.tree.map(jax.numpy.asarray, params)
        state = opt.init(params)

        @jax.jit
        def step(p, st, xb, yb):
            u, st = opt.update(jax.grad(worker.loss_fn)(p, xb, yb), st, p)
            return optax.apply_updates(p, u), st

        for i in range(worker.STEPS):
            params, state = step(params, state, *worker.batch(x, y, i))
        return jax.tree.map(np.asarray, params), np.asarray(state[0].num_pairs)


def test_two_processes_match_single_device(tmp_path):
    result = _run_cluster(tmp_path / "params.npz")
    n_dev = NUM_PROCESSES * DEVICES_PER_PROCESS
    assert int(result["n_dev"]) == n_dev
    # Each of process 0's devices stored only its K / n_dev blocks.
    assert result["local_blocks"].tolist() == [worker.K // n_dev] * DEVICES_PER_PROCESS
    # Every block holds a full history: the comparison covers the recursion.
    assert result["num_pairs"].tolist() == [worker.OPT_KW["memory_size"]] * worker.K

    ref, ref_pairs = _single_device()
    assert ref_pairs.tolist() == result["num_pairs"].tolist()
    for name in ("w", "b"):
        np.testing.assert_allclose(result[name], ref[name], rtol=RTOL, atol=ATOL)

    # The tolerance is far below what a wrong block structure changes.
    other, _ = _single_device(num_blocks=worker.K // 2)
    assert max(np.max(np.abs(other[n] - ref[n])) for n in ("w", "b")) > 1e-3


# ~22 s: slow. CI runs the cluster once (above); the single-process tests of
# tests/test_distributed.py cover FSDP params with leaf blocks on 8 devices.
@pytest.mark.slow
def test_two_processes_fsdp_params_with_leaf_blocks_match_single_device(tmp_path):
    """Params sharded on their first axis across processes; the state follows them."""
    result = _run_cluster(tmp_path / "params.npz", mode="fsdp")
    n_dev = NUM_PROCESSES * DEVICES_PER_PROCESS
    assert bool(result["history_spec_ok"])
    m = worker.OPT_KW["memory_size"]
    assert result["history_local_shape"].tolist() == [m, worker.IN // n_dev, worker.OUT]
    assert result["num_pairs"].tolist() == [m, m]
    ref, ref_pairs = _single_device(num_blocks=None)
    assert ref_pairs.tolist() == result["num_pairs"].tolist()
    for name in ("w", "b"):
        np.testing.assert_allclose(result[name], ref[name], rtol=RTOL, atol=ATOL)
