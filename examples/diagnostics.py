"""Watching mL-BFGS's curvature estimates during training.

Every ``update_period`` steps mL-BFGS forms one curvature pair per block and
damps it. :func:`mlbfgs_optax.curvature_stats` reads, per block, from the
optimizer state:

* ``mu``: ``s'y / s's`` of the newest candidate pair, before damping (can be
  negative: the loss is not convex and the gradients are noisy);
* ``mu_damped``: the same after damping, inside [``sigma_low``, ``sigma_high``];
* ``tau``: the weight on ``y`` in the damped ``y_hat = tau y + (1 - tau) s``;
* ``gamma``: the initial inverse-Hessian scale ``s'y_hat / y_hat'y_hat``;
* ``num_pairs``: pairs stored (at most ``memory_size``).

This script logs them after every pair step while training a 1-D CNN on
MNIST-1D, and plots them against the step, one line per block (parameter
leaf)::

    python examples/diagnostics.py
    python examples/diagnostics.py --sigma-low 0.01 --out low_sigma.png
    python examples/diagnostics.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlbfgs_optax  # noqa: E402
from examples import datasets  # noqa: E402

STATS = ("mu", "mu_damped", "tau", "gamma", "num_pairs")


class CNN1D(nn.Module):
    """Two strided 1-D convolutions and a linear classifier."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, kernel_size=(5,), strides=(2,))(x[..., None]))
        x = nn.relu(nn.Conv(32, kernel_size=(3,), strides=(2,))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=5000,
                   help="MNIST-1D samples to generate (80%% train, 20%% test)")
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--update-period", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.9)
    p.add_argument("--sigma-low", type=float, default=0.5)
    p.add_argument("--sigma-high", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="mlbfgs_diagnostics.png", help="plot file ('' for none)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: 60 steps, no plot unless --out")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.num_samples = 60, 2000
        if "--out" not in (argv if argv is not None else sys.argv[1:]):
            args.out = ""
    return args


def plot(log, names, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
    steps = log["step"]
    for ax, key in zip(axes.flat, STATS):
        for b, name in enumerate(names):
            ax.plot(steps, log[key][:, b], label=name, lw=1)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(0.0, color="k", lw=0.5)
    for ax in axes[0, :2]:
        ax.axhline(args.sigma_low, color="gray", ls=":", lw=1)
        ax.axhline(args.sigma_high, color="gray", ls=":", lw=1)
    axes[1, 0].set_yscale("log")  # gamma
    ax = axes[1, 2]
    ax.plot(log["loss_step"], log["loss"], color="k", lw=1)
    ax.set(title="training loss (minibatch)", xlabel="step", yscale="log")
    ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"mL-BFGS curvature statistics per block (sigma in "
                 f"[{args.sigma_low}, {args.sigma_high}], dotted)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Trains and logs the statistics; returns them with initial/final loss."""
    args = parse_args(argv)
    xtr, ytr, _, _ = datasets.load_mnist1d(args.num_samples, args.seed)
    model = CNN1D()
    params = model.init(jax.random.key(args.seed), xtr[:1])["params"]
    tx = mlbfgs_optax.mlbfgs(
        learning_rate=args.lr, memory_size=10, update_period=args.update_period,
        beta=args.beta, sigma_low=args.sigma_low, sigma_high=args.sigma_high, blocks="leaf",
    )
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    rng = np.random.default_rng(args.seed)
    log = {key: [] for key in ("step", *STATS)}
    losses = []
    for step in range(args.steps):
        idx = rng.choice(len(xtr), args.batch_size, replace=False)
        params, opt_state, loss = train_step(params, opt_state, xtr[idx], ytr[idx])
        losses.append(loss)
        if (step + 1) % args.update_period == 0:  # this step formed a pair
            stats = mlbfgs_optax.curvature_stats(opt_state, params, blocks="leaf")
            log["step"].append(step + 1)
            for key in STATS:
                log[key].append(stats[key])
    names = stats["names"]
    log = {key: np.asarray(v) for key, v in log.items()}
    log["loss"] = np.asarray(jax.device_get(losses))
    log["loss_step"] = np.arange(1, args.steps + 1)

    print(f"{'block':<28} {'mu':>8} {'mu_damped':>10} {'tau':>6} {'gamma':>8} "
          f"{'pairs':>5} {'skipped':>7}")
    for b, name in enumerate(names):
        print(f"{name:<28} {stats['mu'][b]:>8.3f} {stats['mu_damped'][b]:>10.3f} "
              f"{stats['tau'][b]:>6.3f} {stats['gamma'][b]:>8.3f} "
              f"{stats['num_pairs'][b]:>5d} {stats['num_skipped'][b]:>7d}")
    print("fraction of pair steps (after the first) damped, per block:",
          np.round(np.mean(log["tau"][1:] < 1.0, axis=0), 2).tolist())
    if args.out:
        plot(log, names, args)
        print(f"plot saved to {args.out}")
    window = max(1, min(50, args.steps // 10))
    return {
        "initial_loss": float(log["loss"][0]),
        "final_loss": float(log["loss"][-window:].mean()),
        "names": names,
        "log": log,
    }


if __name__ == "__main__":
    main()
