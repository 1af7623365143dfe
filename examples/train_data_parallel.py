"""Data-parallel training with mL-BFGS whose state is sharded over the devices.

A small MLP learns MNIST-1D (generated locally, nothing is downloaded) on all
visible devices at once: every batch is split over a ``'data'`` mesh axis, the
parameters are replicated, and ``jax.jit`` (GSPMD) turns the gradient into an
all-reduce. The optimizer is::

    mlbfgs_optax.mlbfgs(lr, blocks=mlbfgs_optax.EqualSlices(k * n_devices),
                        mesh=mesh, axis_name="data", ...)

so the flattened parameters are cut into ``k * n_devices`` equal blocks and
each device stores the averages, snapshots and curvature history of only its
``k`` blocks and runs their two-loop recursions; one all-gather per step
assembles the direction. The script prints the optimizer-state bytes each
device holds against what one device would hold unsharded, and the final test
accuracy. On a CPU-only machine, fake devices show the layout::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_data_parallel.py
    python examples/train_data_parallel.py --quick     # smoke test, a few seconds
    python examples/train_data_parallel.py --help

Fake CPU devices share the machine's cores, so they show the memory split and
the communication pattern, not a speed-up.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlbfgs_optax  # noqa: E402
from examples import common  # noqa: E402


def parse_args(argv=None):
    p = common.make_parser(
        __doc__, steps=2000, batch_size=256,
        batch_help="global batch size (a multiple of the device count)", num_samples=10000,
        lr=1e-2, mlbfgs=("--sigma-low", "--update-period", "--memory-size", "--beta"),
        quick="tiny run for tests: 130 steps (past the pair warm-up) on 2000 samples, "
              "hidden width 64")
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    p.add_argument("--blocks-per-device", type=int, default=2,
                   help="k: EqualSlices(k * n_devices) curvature blocks")
    p.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    return common.parse_args(p, argv, steps=130, num_samples=2000, hidden=64, eval_every=65)


def main(argv=None):
    """Trains data-parallel; returns a dict of results (see the end of the function)."""
    args = parse_args(argv)
    devices = jax.devices()
    n_dev = len(devices)
    if args.batch_size % n_dev:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of the "
                         f"{n_dev} devices.")
    mesh = jax.make_mesh((n_dev,), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    xtr, ytr, xte, yte = common.load_mnist1d(args)
    model = common.MLP(hidden=(args.hidden, args.hidden))
    params = model.init(jax.random.key(args.seed), xtr[:1])["params"]
    num_params = common.num_params(params)
    num_blocks = args.blocks_per_device * n_dev
    hyper = dict(memory_size=args.memory_size, update_period=args.update_period,
                 beta=args.beta, sigma_low=args.sigma_low)
    tx = mlbfgs_optax.mlbfgs(args.lr, blocks=mlbfgs_optax.EqualSlices(num_blocks),
                             mesh=mesh, axis_name="data", **hyper)
    print(f"{n_dev} device(s) on a 'data' mesh; MLP with {num_params} parameters; "
          f"EqualSlices({num_blocks}) = {args.blocks_per_device} blocks per device; "
          f"{args.steps} steps of global batch {args.batch_size} "
          f"({args.batch_size // n_dev} per device)")

    params = jax.device_put(params, replicated)
    with jax.set_mesh(mesh):
        opt_state = tx.init(params)  # created sharded: no device holds all blocks
    # The mL-BFGS state, the momentum included, is sharded over the blocks.
    per_dev = common.bytes_per_device(mlbfgs_optax.find_mlbfgs_state(opt_state))
    unsharded = mlbfgs_optax.mlbfgs(args.lr, blocks=mlbfgs_optax.EqualSlices(num_blocks),
                                    **hyper)
    single = mlbfgs_optax.state_nbytes(
        mlbfgs_optax.find_mlbfgs_state(jax.eval_shape(unsharded.init, params)))
    print(f"mL-BFGS state (momentum included): {max(per_dev.values()):,} bytes per device on "
          f"{len(per_dev)} device(s) vs {single:,} bytes on one device "
          f"({single / max(per_dev.values()):.2f}x less)")

    loss_fn = common.classification_loss(model)
    state_shardings = jax.tree.map(lambda x: x.sharding, opt_state)

    @jax.jit
    def train_step(p, opt_state, x, y):
        # x, y are sharded over 'data': GSPMD all-reduces the gradient.
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)  # mL-BFGS needs params
        p = optax.apply_updates(p, updates)
        p = jax.lax.with_sharding_constraint(p, replicated)
        opt_state = jax.lax.with_sharding_constraint(opt_state, state_shardings)
        return p, opt_state, loss

    @jax.jit
    def evaluate(p, x, y):
        logits = model.apply({"params": p}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    n_test = (len(xte) // n_dev) * n_dev  # the test set, sharded like a batch
    xte_d = jax.device_put(xte[:n_test], batch_sharding)
    yte_d = jax.device_put(yte[:n_test], batch_sharding)

    rng = np.random.default_rng(args.seed)
    losses, evals = [], []
    start = time.perf_counter()
    after_compile = start
    with jax.set_mesh(mesh):
        for step in range(args.steps):
            idx = rng.choice(len(xtr), args.batch_size, replace=False)
            x = jax.device_put(xtr[idx], batch_sharding)
            y = jax.device_put(ytr[idx], batch_sharding)
            params, opt_state, loss = train_step(params, opt_state, x, y)
            # XLA:CPU runs fake devices on a small thread pool; many queued
            # collective programs can starve a rendezvous. Real accelerators
            # do not need this wait.
            jax.block_until_ready(opt_state)
            losses.append(float(loss))
            if step == 0:
                after_compile = time.perf_counter()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                tl, ta = evaluate(params, xte_d, yte_d)
                evals.append((step + 1, float(tl), float(ta)))
                print(f"step {step + 1:>5}: train loss {np.mean(losses[-50:]):.4f}  "
                      f"test loss {float(tl):.4f}  test acc {float(ta):.3f}")
    end = time.perf_counter()

    mstate = mlbfgs_optax.find_mlbfgs_state(opt_state)
    result = {
        "n_devices": n_dev,
        "num_params": int(num_params),
        "num_blocks": num_blocks,
        "state_bytes_per_device": max(per_dev.values()),
        "state_bytes_single_device": int(single),
        "state_bytes_by_device": per_dev,
        "initial_loss": losses[0],
        "final_loss": common.tail_mean(losses, args.steps),
        "train_loss": np.asarray(losses),
        "eval_steps": [e[0] for e in evals],
        "test_loss": evals[-1][1],
        "test_acc": evals[-1][2],
        "min_pairs_per_block": int(jnp.min(mstate.num_pairs)),
        "wall_time_s": end - start,
        "ms_per_step": 1e3 * (end - after_compile) / max(args.steps - 1, 1),
    }
    print(f"final test accuracy {result['test_acc']:.3f} (test loss {result['test_loss']:.4f}); "
          f"{result['ms_per_step']:.1f} ms/step, {result['wall_time_s']:.1f} s in all")
    return result


if __name__ == "__main__":
    main()
