"""One process of the multi-process test (tests/test_multihost.py).

Run as ``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=D``: the process joins
a ``jax.distributed`` cluster on ``127.0.0.1:PORT`` (CPU collectives over
gloo), builds one ``'data'`` mesh over the devices of *all* processes, and
trains a least-squares model data-parallel: every step's batch is sharded over
``'data'`` (so the gradient is an all-reduce across processes) and mL-BFGS
keeps its ``EqualSlices`` blocks sharded over the same axis (each device holds
``K / (NUM_PROCESSES * D)`` blocks; the direction is one all-gather across
processes). Process 0 writes the final parameters and the pair counts to
``OUT`` (``.npz``).

Importing this module does nothing distributed: the test imports
:func:`problem`, :func:`make_optimizer` and :func:`batch` to run the same
optimizer on one device.
"""

from __future__ import annotations

import sys

import numpy as np

K = 8  # EqualSlices blocks: 2 per device with 2 processes x 2 devices
STEPS = 60
BATCH = 32  # global batch; divisible by every device count used
IN, OUT = 12, 5
# sigma_low=0.1: pairs that may lengthen the step, so that the block structure shows
OPT_KW = dict(update_period=3, beta=0.9, memory_size=4, sigma_low=0.1)
LR = 0.05


def problem():
    """A fixed float64 linear-regression data set and initial parameters."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, IN)) * np.linspace(0.3, 2.0, IN)  # uneven curvature
    w_true = rng.normal(size=(IN, OUT))
    y = x @ w_true + 0.1 * rng.normal(size=(256, OUT))
    params = {"w": np.zeros((IN, OUT)), "b": np.zeros(OUT)}
    return x, y, params


def batch(x, y, step):
    """The global minibatch of ``step`` (the same in every process)."""
    idx = np.random.default_rng(1000 + step).choice(x.shape[0], BATCH, replace=False)
    return x[idx], y[idx]


def loss_fn(p, xb, yb):
    import jax.numpy as jnp

    return jnp.mean(jnp.sum((xb @ p["w"] + p["b"][None, :] - yb) ** 2, axis=-1))


def make_optimizer(num_blocks=K, **kw):
    import mlbfgs_optax

    if num_blocks is None:  # default "leaf" blocks
        return mlbfgs_optax.mlbfgs(LR, **OPT_KW, **kw)
    return mlbfgs_optax.mlbfgs(LR, blocks=mlbfgs_optax.EqualSlices(num_blocks), **OPT_KW, **kw)


def main(argv):
    process_id, num_processes, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    # "slices": replicated params, EqualSlices state sharded over the mesh (ZeRO);
    # "fsdp": params sharded on their first axis, default "leaf" blocks, the state
    # following the params.
    mode = argv[4] if len(argv) > 4 else "slices"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.process_count() == num_processes
    n_dev = jax.device_count()
    assert n_dev == num_processes * jax.local_device_count()
    mesh = jax.make_mesh((n_dev,), ("data",))
    if mode == "slices":
        opt = make_optimizer(mesh=mesh, axis_name="data")
    else:
        opt = make_optimizer(None)

    x, y, params0 = problem()
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))
    param_shardings = ({"w": replicated, "b": replicated} if mode == "slices"
                       else {"w": rows, "b": replicated})

    def global_array(a, sharding):
        # Every process knows the whole array; each fills its own devices.
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    params = jax.tree.map(global_array, params0, param_shardings)
    state = opt.init(params)

    def step(p, st, xb, yb):
        grads = jax.grad(loss_fn)(p, xb, yb)  # batch sharded: all-reduce over processes
        u, st = opt.update(grads, st, p)
        return optax.apply_updates(p, u), st

    # Scalars that optax creates uncommitted (optax.ema's count) live on one local
    # device; a multi-process program places them replicated, as for optax.adam.
    state_shardings = jax.tree.map(
        lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else replicated, state)
    step = jax.jit(step, out_shardings=(param_shardings, state_shardings))
    for i in range(STEPS):
        xb, yb = batch(x, y, i)
        params, state = step(params, state, global_array(xb, rows), global_array(yb, rows))
        # XLA:CPU fake devices: do not let collective programs queue up.
        jax.block_until_ready((params, state))

    mstate = state[0]
    local_blocks = {d.id: s.data.shape[0] for d, s in
                    ((s.device, s) for s in mstate.num_pairs.addressable_shards)}
    # num_pairs is sharded: gather it to every process to report the minimum.
    num_pairs = jax.jit(lambda a: a, out_shardings=replicated)(mstate.num_pairs)
    params = jax.jit(lambda a: a, out_shardings=replicated)(params)
    result = {k: np.asarray(v.addressable_shards[0].data) for k, v in params.items()}
    if mode == "fsdp":
        hist = mstate.unpacked("s_history")["w"]
        result["history_spec_ok"] = np.asarray(tuple(hist.sharding.spec)[:2] == (None, "data"))
        result["history_local_shape"] = np.asarray(hist.addressable_shards[0].data.shape)
    result["num_pairs"] = np.asarray(num_pairs.addressable_shards[0].data)
    result["local_blocks"] = np.asarray(sorted(local_blocks.values()))
    result["n_dev"] = np.asarray(n_dev)
    if process_id == 0:
        np.savez(out, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
