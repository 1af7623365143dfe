"""Train a small 1-D CNN on MNIST-1D with mL-BFGS and with AdamW, and compare.

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package, so
nothing is downloaded. Both optimizers see the same data, the same batches and
the same initial parameters, and follow the schedule every benchmark of the
project uses: a linear warm-up over the first 5% of the steps to the peak
learning rate, then a cosine decay to 0. The script prints a summary table (test
accuracy, losses, optimizer-state bytes per parameter, wall time, milliseconds
per step) and saves a plot of the training loss and the test accuracy against
the step::

    python examples/train_mnist1d.py                 # about 15 s on 2 CPU cores
    python examples/train_mnist1d.py --tune          # tune both peak lrs first (~2 min)
    python examples/train_mnist1d.py --steps 5000 --out curves.png
    python examples/train_mnist1d.py --quick         # smoke test, a few seconds

The default peak learning rates (3.16e-2 for both) are the ones ``--tune`` picks:
for each optimizer, 7 peak learning rates half a decade apart (1e-4 to 1e-1), one
run each with seed 0 and the default settings, the lowest final training loss (the
mean of the last 50 minibatch losses). mL-BFGS runs
with the library's defaults (Adam's diagonal metric, so its learning rate has
Adam's meaning); ``--sigma-low``, ``--update-period``, ``--memory-size`` and
``--beta`` override them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlbfgs_optax  # noqa: E402
from examples import common  # noqa: E402


#: The peak learning rates ``--tune`` tries: 1e-4 to 1e-1, half a decade apart.
TUNE_GRID = tuple(float(f"{10 ** (-4 + k / 2):.3g}") for k in range(7))


def parse_args(argv=None):
    p = common.make_parser(
        __doc__, steps=3000, steps_help="training steps per optimizer", num_samples=10000,
        lr=3.16e-2, lr_help="mL-BFGS peak learning rate", out="mnist1d_mlbfgs_vs_adamw.png",
        mlbfgs=("--sigma-low", "--update-period", "--memory-size", "--beta"),
        quick="tiny run for tests: 60 steps on 2000 samples, no plot unless --out")
    p.add_argument("--adamw-lr", type=float, default=3.16e-2, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="AdamW decoupled weight decay")
    p.add_argument("--warmup", type=float, default=0.05,
                   help="fraction of the steps of linear warm-up before the cosine decay")
    p.add_argument("--tune", action="store_true",
                   help="first pick each optimizer's peak lr from a half-decade grid "
                        "(seed 0, lowest final training loss)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    p.add_argument("--report", default=None,
                   help="also write the summary table as a Markdown file at this path")
    return common.parse_args(p, argv, steps=60, num_samples=2000, eval_every=20)


def schedule(peak_lr, args):
    """Linear warm-up over ``args.warmup`` of the steps, then cosine decay to 0."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak_lr, warmup_steps=max(1, int(args.warmup * args.steps)),
        decay_steps=args.steps, end_value=0.0)


def make_optimizers(args, lrs=None):
    """The two optimizers compared, by name; ``lrs``: peak lr by name (default: the flags)."""
    lrs = lrs or {"mL-BFGS": args.lr, "AdamW": args.adamw_lr}
    return {
        "mL-BFGS": mlbfgs_optax.mlbfgs(
            learning_rate=schedule(lrs["mL-BFGS"], args),
            memory_size=args.memory_size,
            update_period=args.update_period,
            beta=args.beta,
            sigma_low=args.sigma_low,
        ),
        "AdamW": optax.adamw(schedule(lrs["AdamW"], args), weight_decay=args.weight_decay),
    }


def tune(model, params, data, args):
    """Each optimizer's peak lr from :data:`TUNE_GRID`: the lowest final training loss."""
    best = {}
    for name in ("mL-BFGS", "AdamW"):
        losses = {}
        for lr in TUNE_GRID:
            tx = make_optimizers(args, {"mL-BFGS": lr, "AdamW": lr})[name]
            r = train(model, tx, params, data, args, f"{name} lr={lr:g}")
            final = common.tail_mean(r["train_loss"], args.steps)
            losses[lr] = final if np.isfinite(final) else np.inf
        best[name] = min(losses, key=losses.get)
        print(f"{name}: final training loss by peak lr: "
              + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in losses.items())
              + f" -> best {best[name]:g}")
    return best


def largest_rise(losses, width=50) -> float:
    """The largest ratio of the ``width``-step mean training loss to its lowest value so far
    (1.0: it never rose; a loss spike shows as a ratio well above 1)."""
    s = smooth(np.asarray(losses), width)
    return float(np.max(s / np.minimum.accumulate(s)))


def train(model, tx, params, data, args, name):
    """Trains ``params`` with ``tx``; returns the logged curves and timings."""
    xtr, ytr, xte, yte = data
    loss_fn = common.classification_loss(model)

    @jax.jit
    def train_step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)  # mL-BFGS needs params
        return optax.apply_updates(p, updates), opt_state, loss

    @jax.jit
    def evaluate(p):
        logits = model.apply({"params": p}, xte)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yte).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == yte)

    # Same batches for every optimizer: the order depends only on the seed.
    rng = np.random.default_rng(args.seed)
    n = xtr.shape[0]
    opt_state = tx.init(params)
    losses, eval_steps, test_loss, test_acc = [], [], [], []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc=name, leave=False):
        idx = rng.choice(n, args.batch_size, replace=False)
        params, opt_state, loss = train_step(params, opt_state, xtr[idx], ytr[idx])
        losses.append(loss)
        if step == 0:  # the first step compiles: keep it out of the per-step time
            jax.block_until_ready(params)
            after_compile = time.perf_counter()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            tl, ta = evaluate(params)
            eval_steps.append(step + 1)
            test_loss.append(float(tl))
            test_acc.append(float(ta))
    jax.block_until_ready(params)
    end = time.perf_counter()
    return {
        "train_loss": np.asarray(jax.device_get(losses)),
        "eval_steps": np.asarray(eval_steps),
        "test_loss": np.asarray(test_loss),
        "test_acc": np.asarray(test_acc),
        "wall_time_s": end - start,
        "ms_per_step": 1e3 * (end - after_compile) / max(args.steps - 1, 1),
    }


def smooth(x, width):
    """Running mean over ``width`` steps (for plotting noisy minibatch losses)."""
    width = max(1, min(width, len(x)))
    return np.convolve(x, np.ones(width) / width, mode="valid")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        width = max(1, len(r["train_loss"]) // 50)
        s = smooth(r["train_loss"], width)
        ax_loss.plot(np.arange(len(s)) + width, s, label=f"{name} (train, mean of {width})")
        ax_loss.plot(r["eval_steps"], r["test_loss"], "--", color=ax_loss.lines[-1].get_color(),
                     label=f"{name} (test)")
        ax_acc.plot(r["eval_steps"], r["test_acc"], label=name)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="Loss")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="Test accuracy")
    ax_loss.legend()
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    fig.suptitle("MNIST-1D, 1-D CNN: mL-BFGS vs AdamW (warm-up + cosine decay, tuned peak lr)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    """Runs the comparison; returns ``{optimizer name: results dict}``."""
    args = parse_args(argv)
    data = common.load_mnist1d(args)
    model = common.CNN1D()
    params = model.init(jax.random.key(args.seed), data[0][:1])["params"]
    num_params = common.num_params(params)
    print(f"MNIST-1D: {len(data[0])} train / {len(data[2])} test samples; "
          f"CNN with {num_params} parameters; {args.steps} steps of batch {args.batch_size}")

    lrs = tune(model, params, data, args) if args.tune else None
    results = {}
    for name, tx in make_optimizers(args, lrs).items():
        r = train(model, tx, params, data, args, name)
        r["initial_loss"] = float(r["train_loss"][0])
        r["final_loss"] = common.tail_mean(r["train_loss"], args.steps)
        r["state_bytes_per_param"] = mlbfgs_optax.state_bytes_per_param(
            jax.eval_shape(tx.init, params), params)
        r["largest_rise"] = largest_rise(r["train_loss"])
        results[name] = r

    print(f"\n{'optimizer':<10} {'test acc':>9} {'test loss':>10} {'train loss':>11} "
          f"{'rise':>6} {'state B/param':>14} {'wall s':>7} {'ms/step':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['test_acc'][-1]:>9.3f} {r['test_loss'][-1]:>10.4f} "
              f"{r['final_loss']:>11.4f} {r['largest_rise']:>6.2f} "
              f"{r['state_bytes_per_param']:>14.1f} {r['wall_time_s']:>7.1f} "
              f"{r['ms_per_step']:>8.2f}")
    print("(train loss: mean over the last minibatches; rise: the largest ratio of the 50-step "
          "mean training loss to its lowest value before, 1.00 = never rose; wall s includes "
          "compilation)")
    if args.out:
        plot(results, args.out)
        print(f"plot saved to {args.out}")
    if args.report:
        write_report(results, args, lrs, args.report)
    return results


def write_report(results, args, lrs, path):
    """The summary table as Markdown, with the settings that produced it."""
    lrs = lrs or {"mL-BFGS": args.lr, "AdamW": args.adamw_lr}
    lines = [f"`python examples/train_mnist1d.py` ({args.steps} steps of batch "
             f"{args.batch_size}, seed {args.seed}; mlbfgs_optax {mlbfgs_optax.__version__}, "
             f"jax {jax.__version__}; measured on CPU only). Final train loss: mean of the "
             "last minibatch losses; rise: the largest ratio of the 50-step mean training "
             "loss to its lowest value before.", "",
             "| optimizer | peak lr | test acc | test loss | final train loss | rise | "
             "state B/param | ms/step |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {lrs[name]:g} | {r['test_acc'][-1]:.3f} | "
                     f"{r['test_loss'][-1]:.4f} | {r['final_loss']:.5f} | "
                     f"{r['largest_rise']:.2f} | {r['state_bytes_per_param']:.1f} | "
                     f"{r['ms_per_step']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"report saved to {path}")


if __name__ == "__main__":
    main()
