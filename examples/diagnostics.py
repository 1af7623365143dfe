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

import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlbfgs_optax  # noqa: E402
from examples import common  # noqa: E402

STATS = ("mu", "mu_damped", "tau", "gamma", "num_pairs")


def parse_args(argv=None):
    p = common.make_parser(
        __doc__, steps=1500, lr=1e-2, out="mlbfgs_diagnostics.png",
        mlbfgs=("--update-period", "--beta", "--sigma-low", "--sigma-high"),
        quick="tiny run for tests: 130 steps (past the pair warm-up), no plot unless --out")
    return common.parse_args(p, argv, steps=130, num_samples=2000)


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
    xtr, ytr, _, _ = common.load_mnist1d(args)
    model = common.CNN1D()
    params = model.init(jax.random.key(args.seed), xtr[:1])["params"]
    tx = mlbfgs_optax.mlbfgs(
        learning_rate=args.lr, memory_size=10, update_period=args.update_period,
        beta=args.beta, sigma_low=args.sigma_low, sigma_high=args.sigma_high, blocks="leaf",
    )
    opt_state = tx.init(params)

    loss_fn = common.classification_loss(model)

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
    return {
        "initial_loss": float(log["loss"][0]),
        "final_loss": common.tail_mean(log["loss"], args.steps),
        "names": names,
        "log": log,
    }


if __name__ == "__main__":
    main()
