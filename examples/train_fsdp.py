"""FSDP-style training with mL-BFGS: the optimizer state follows the params' sharding.

A Flax MLP learns MNIST-1D (generated locally, nothing is downloaded) on all
visible devices. Every weight matrix is sharded on its first axis over an
``'fsdp'`` mesh axis (JAX's default Explicit axes), the batch is sharded over
the same axis, and the optimizer is plain ``mlbfgs_optax.mlbfgs(lr)`` with its
default ``"leaf"`` blocks: no ``EqualSlices``, no ``mesh=``. ``init`` gives
every average and snapshot its parameter's sharding and every history an
unsharded memory axis in front of it, so each device holds ~1/N of the
optimizer state; a step's only optimizer collectives are all-reduces of
per-block scalars. The script prints the state bytes per device against one
device, and the final test accuracy. On a CPU-only machine::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_fsdp.py
    python examples/train_fsdp.py --quick     # smoke test, a few seconds

Fake CPU devices share the machine's cores: they show the memory split and the
communication pattern, not a speed-up.
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
        __doc__, steps=1500, batch_size=256,
        batch_help="global batch size (a multiple of the device count)", num_samples=10000,
        lr=1e-2, mlbfgs=("--sigma-low", "--update-period", "--memory-size", "--beta"),
        quick="tiny run for tests: 60 steps on 2000 samples, hidden width 64")
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    p.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    return common.parse_args(p, argv, steps=60, num_samples=2000, hidden=64, eval_every=30)


def fsdp_specs(params, n_dev: int):
    """Shard every leaf on its first axis when it divides evenly; replicate the rest."""
    return jax.tree.map(lambda x: P("fsdp") if x.shape[0] % n_dev == 0 else P(), params)


def main(argv=None):
    """Trains FSDP-style; returns a dict of results."""
    args = parse_args(argv)
    n_dev = jax.device_count()
    if args.batch_size % n_dev:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of the "
                         f"{n_dev} devices.")
    mesh = jax.make_mesh((n_dev,), ("fsdp",))  # Explicit axes: JAX's default
    xtr, ytr, xte, yte = common.load_mnist1d(args)
    model = common.MLP(hidden=(args.hidden, args.hidden))
    params = model.init(jax.random.key(args.seed), xtr[:1])["params"]
    specs = fsdp_specs(params, n_dev)
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    tx = mlbfgs_optax.mlbfgs(args.lr, memory_size=args.memory_size,
                             update_period=args.update_period, beta=args.beta,
                             sigma_low=args.sigma_low)
    opt_state = tx.init(params)  # follows the params' sharding
    per_device = mlbfgs_optax.state_nbytes(opt_state, per_device=True)
    single = mlbfgs_optax.state_nbytes(jax.eval_shape(tx.init, params))
    print(f"{n_dev} device(s) on an 'fsdp' mesh; MLP with {common.num_params(params)} "
          f"parameters, weights sharded on their first axis")
    print(f"optimizer state: {per_device:,} bytes per device vs {single:,} bytes "
          f"on one device ({single / per_device:.2f}x less)")

    batch = NamedSharding(mesh, P("fsdp"))
    classification_loss = common.classification_loss(model)

    def loss_fn(p, x, y):
        # FSDP: gather each weight for the forward pass; the gradient comes back
        # reduce-scattered to the weight's own sharding.
        whole = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), p)
        return classification_loss(whole, x, y)

    @jax.jit
    def train_step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    @jax.jit
    def accuracy(p, x, y):
        whole = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), p)
        return jnp.mean(jnp.argmax(model.apply({"params": whole}, x), -1) == y)

    n_test = (len(xte) // n_dev) * n_dev
    xte_d, yte_d = (jax.device_put(a[:n_test], batch) for a in (xte, yte))
    rng = np.random.default_rng(args.seed)
    losses, acc = [], float("nan")
    after_compile = time.perf_counter()
    with jax.set_mesh(mesh):
        for step in range(args.steps):
            idx = rng.choice(len(xtr), args.batch_size, replace=False)
            x, y = jax.device_put(xtr[idx], batch), jax.device_put(ytr[idx], batch)
            params, opt_state, loss = train_step(params, opt_state, x, y)
            jax.block_until_ready(opt_state)  # fake CPU devices: no queued collectives
            losses.append(float(loss))
            if step == 0:
                after_compile = time.perf_counter()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                acc = float(accuracy(params, xte_d, yte_d))
                print(f"step {step + 1:>5}: train loss {np.mean(losses[-50:]):.4f}  "
                      f"test acc {acc:.3f}")
    end = time.perf_counter()
    w_hist = mlbfgs_optax.find_mlbfgs_state(opt_state).unpacked("s_history")["Dense_0"]["kernel"]
    result = {
        "n_devices": n_dev,
        "state_bytes_per_device": per_device,
        "state_bytes_single_device": int(single),
        "history_spec": w_hist.sharding.spec,
        "initial_loss": losses[0],
        "final_loss": common.tail_mean(losses, args.steps),
        "test_acc": acc,
        "ms_per_step": 1e3 * (end - after_compile) / max(args.steps - 1, 1),
    }
    print(f"final test accuracy {acc:.3f}; {result['ms_per_step']:.1f} ms/step")
    return result


if __name__ == "__main__":
    main()
