"""Final training loss at each optimizer's tuned learning rate: the pairs study.

Every optimizer (AdamW, the mL-BFGS chain without pairs, and variants of the mL-BFGS
defaults, one change each) runs every peak learning rate of the same half-decade grid
with 3 seeds, under the same schedule: linear warm-up over 5% of the steps, then cosine
decay to 0. All (lr, seed) runs of one optimizer on one task are one compiled program
(``jax.vmap`` over the peak lr and the seed, ``lax.scan`` over the steps), so every run
sees the same code; mini-batches are drawn with replacement from the seed's key.

Scores, per task and optimizer:

- the **final training loss**: the full training set's loss (or its first 4,096
  examples) with the parameters at the end of the schedule, median over the seeds;
- the **tuned lr**: the grid point with the lowest median final training loss;
- **steps to target**: the first evaluation at which the training loss (on a fixed
  subset of 1,024 training examples) is at or below the target, the tuned AdamW's
  median final training loss times ``TARGET_SLACK`` (chosen after AdamW's runs, not
  to suit mL-BFGS), median over the seeds (``None``: not reached);
- **trains at**: the lrs of the grid at which the median final loss is below the loss
  at initialisation (a run that diverges or ends at the initial loss does not train);
- the **paired check** (``--paired``): the chain without pairs and the defaults at the
  chain's tuned lr with 10 seeds, their final losses compared seed by seed.

Run from the repository root (writes ``final_loss/<task>.json`` and ``final_loss.md``)::

    python -m examples.benchmarks.research.final_loss --tasks mnist1d_mlp logreg
    python -m examples.benchmarks.research.final_loss --table   # the table only
    python -m examples.benchmarks.research.final_loss --paired --tasks digits_mlp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.benchmarks import tasks as tasks_mod
from examples.common import make_mlbfgs

ROOT = os.path.join(os.path.dirname(__file__), "final_loss")
GRID = tuple(float(f"{10 ** (-3.5 + k / 2):.3g}") for k in range(6))  # 3.16e-4 ... 0.1
#: optimizers on another grid of the same density (SGD's usual range is 10x higher)
GRIDS = {"sgd": tuple(float(f"{10 ** (-2.5 + k / 2):.3g}") for k in range(6))}
SEEDS = (0, 1, 2)
WARMUP = 0.05
TARGET_SLACK = 1.5
EVAL_SUBSET = 1024
FINAL_SUBSET = 4096


def _mlbfgs(**kw):
    return lambda sched: make_mlbfgs(learning_rate=sched, **kw)


#: name -> (label, factory of an optax transformation from a schedule)
OPTIMIZERS = {
    "sgd": ("SGD, momentum 0.9", lambda sched: optax.sgd(sched, momentum=0.9)),
    "adamw": ("AdamW (b 0.9/0.999, wd 1e-4)",
              lambda sched: optax.adamw(sched, weight_decay=1e-4)),
    "no_pairs": ("mL-BFGS chain without pairs (update_period 10^9)",
                 _mlbfgs(update_period=10 ** 9)),
    "defaults": ("mL-BFGS defaults before this study (pair_form='full', sigma_low=0.1)",
                 _mlbfgs(pair_form="full", sigma_low=0.1)),
    "lib_defaults": ("mL-BFGS library defaults, only the lr passed", _mlbfgs()),
    "lib_enlarging": ("mL-BFGS defaults with sigma_low=0.1 (pairs may lengthen the step "
                      "along s up to 10x, step bound 3)", _mlbfgs(sigma_low=0.1)),
}


PROTOTYPES: dict = {}  # name -> prototype kind (see :func:`prototype`)


#: the defaults before this study, which the one-change variants below start from
PREVIOUS = dict(pair_form="full", sigma_low=0.1)


def register(name: str, label: str, proto=None, **kw) -> None:
    """Adds a variant of the previous defaults (one change: ``kw``, or a prototype ``proto``)."""
    OPTIMIZERS[name] = (label, _mlbfgs(**{**PREVIOUS, **kw}))
    if proto:
        PROTOTYPES[name] = proto


register("sigma_low_0.3", "sigma_low=0.3", sigma_low=0.3)
register("sigma_low_0.5", "sigma_low=0.5", sigma_low=0.5)
register("sigma_low_0.9", "sigma_low=0.9", sigma_low=0.9)
register("step_bound_1", "step_bound=1", step_bound=1.0)
register("step_bound_none", "step_bound=None", step_bound=None)
register("along_s", "pairs keep only the curvature along s (y_hat = mu_damped s)",
         proto="along_s")
register("snr", "y divided by the block's gradient signal-to-noise ratio", proto="snr")
register("schedule", "sigma_low follows the schedule: 1 - 0.9 eta_t / eta_peak",
         proto="schedule")
register("schedule_along_s", "schedule and along_s together", proto="schedule+along_s")
register("noise_along_s", "along_s, and no enlargement beyond the noise: sigma_low per block "
         "raised to min(1, mu / SNR_s), SNR_s the signal-to-noise ratio of the gradient "
         "along s", proto="noise+along_s")
register("along_s_all", "along_s with blocks='all' (one block: M directions of the whole "
         "model are corrected, not M per leaf)", proto="along_s", blocks="all")
register("blocks_all", "blocks='all'", blocks="all")
register("along_s_0.9", "pair_form='along_s', sigma_low=0.9 (pairs lengthen the step along s "
         "by at most 1.11x)", pair_form="along_s", sigma_low=0.9)
register("along_s_0.5", "pair_form='along_s', sigma_low=0.5", pair_form="along_s", sigma_low=0.5)
register("along_s_beta_0.9", "along_s with beta=0.9 (averages over ~10 calls: fresher pairs)",
         proto="along_s", beta=0.9)
register("shrink_along_s", "along_s with sigma_low = 1: pairs only shrink the step "
         "(H <= H0)", proto="shrink+along_s")


def _holdout(name):
    from examples.benchmarks.research import holdout_tasks
    return holdout_tasks.make(name)


def teacher_student():
    """Teacher-student regression: a random 2-layer tanh teacher, a wider student, MSE."""
    rng = np.random.default_rng(0)
    n, d, h = 4096, 32, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    w1 = rng.standard_normal((d, h)).astype(np.float32) / np.sqrt(d)
    w2 = rng.standard_normal((h, 1)).astype(np.float32) / np.sqrt(h)
    y = (np.tanh(x @ w1) @ w2).astype(np.float32)[:, 0]
    y = y + 0.05 * rng.standard_normal(n).astype(np.float32)
    init, apply = tasks_mod.mlp([d, 64, 64, 1])
    task = tasks_mod.Task("teacher_mlp", "teacher-student regression (4096 x 32, tanh "
                          "teacher 32-16-1, noise 0.05), MLP 32-64-64-1, MSE, batch 64",
                          x, y, x[:512], y[:512], init, apply, batch_size=64, steps=2000,
                          quick_steps=100, metric="acc", target=1.0, num_classes=1)
    task.loss = lambda params, xb, yb: jnp.mean(jnp.square(apply(params, xb)[:, 0] - yb))
    return task


def pinn(problem_name: str):
    """A physics-informed task of ``pinn.py`` (tanh MLP 4 x 50), full batch: a fixed set of
    500 collocation points (seed 0 of ``pinn.py``'s full-batch protocol) plus the grid's
    edges; the loss is ``pinn.pinn_loss``."""
    from examples.benchmarks import pinn as pinn_mod
    problem = pinn_mod.make_problem(problem_name)
    grid, edges = pinn_mod.grid_points(problem)
    pts = np.asarray(grid)[np.random.default_rng(0).choice(len(grid), pinn_mod.N_RES,
                                                           replace=False)]
    task = tasks_mod.Task(f"pinn_{problem_name}", f"PINN {problem.description}, tanh MLP "
                          f"4x50, {pinn_mod.N_RES} fixed collocation points (full batch)",
                          pts, np.zeros(len(pts), np.float32), pts, np.zeros(len(pts)),
                          lambda key: pinn_mod.init_mlp(key), None, batch_size=len(pts),
                          steps=2000, quick_steps=100, metric="acc", target=1.0)
    task.loss = lambda params, xb, yb: pinn_mod.pinn_loss(params, problem, xb, edges)
    return task


def main_example():
    """The main example's task (``examples/train_mnist1d.py``): MNIST-1D, 10,000 samples,
    the Flax 1-D CNN of ``examples/common.py``, batch 128."""
    from examples import common, datasets
    xtr, ytr, xte, yte = datasets.load_mnist1d(num_samples=10000, seed=0)
    model = common.CNN1D()
    init = lambda key: model.init(key, jnp.asarray(xtr[:1]))["params"]
    apply = lambda params, x: model.apply({"params": params}, x)
    return tasks_mod.Task("main_cnn", f"the main example: MNIST-1D ({len(xtr)}/{len(xte)}), "
                          "Flax 1-D CNN of examples/common.py, batch 128", xtr, ytr, xte, yte,
                          init, apply, batch_size=128, steps=3000, quick_steps=60,
                          metric="acc", target=1.0)


#: tasks run on fewer lrs (CPU time): the main example's three around the peak lr its own
#: half-decade tuning picked for both optimizers (3.16e-2), SGD shifted likewise
TASK_GRIDS = {"main_cnn": (0.01, 0.0316, 0.1)}

#: tasks whose runs are made one after the other in the program (``lax.map``), not vmapped
SEQUENTIAL = {"main_cnn": True, "mnist1d_cnn": True, "fmnist_cnn": True}

#: task name -> (builder, steps)
TASKS = {
    "mnist1d_mlp": (lambda: tasks_mod.make_task("mnist1d_mlp"), 2000),
    "mnist1d_cnn": (lambda: tasks_mod.make_task("mnist1d_cnn"), 3000),
    "main_cnn": (main_example, 3000),
    "fmnist_mlp": (lambda: tasks_mod.make_task("fmnist_mlp"), 1000),
    "fmnist_cnn": (lambda: tasks_mod.make_task("fmnist_cnn"), 1000),
    "fmnist_deep_mlp": (lambda: _holdout("fmnist_deep_mlp"), 1000),
    "digits_mlp": (lambda: _holdout("digits_mlp"), 1000),
    "wine_raw_mlp": (lambda: _holdout("wine_raw_mlp"), 1000),
    "teacher_mlp": (teacher_student, 2000),
    "logreg": (lambda: tasks_mod.make_task("logreg"), 2000),
    "pinn_convection": (lambda: pinn("convection"), 2000),
    "pinn_reaction": (lambda: pinn("reaction"), 2000),
}


def run_task(task, make, steps: int, grid=GRID, seeds=SEEDS, eval_every: int = 0,
             proto=None):
    """Every (lr, seed) of one optimizer on one task, in one program.

    Returns:
      ``(curves, final, init_loss, seconds)``: ``curves`` ``(lr, seed, evals)`` training
      loss on the eval subset every ``eval_every`` steps, ``final`` ``(lr, seed)``.
    """
    eval_every = eval_every or max(steps // 50, 1)
    x = jnp.asarray(task.x_train)
    y = jnp.asarray(task.y_train)
    xe, ye = x[:EVAL_SUBSET], y[:EVAL_SUBSET]
    xf, yf = x[:FINAL_SUBSET], y[:FINAL_SUBSET]
    n, bs = x.shape[0], task.batch_size
    base = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, int(WARMUP * steps)), steps, 0.0)

    def one(lr, seed):
        tx = make(lambda c: lr * base(c))
        key = jax.random.key(seed)
        params = task.init(jax.random.fold_in(key, 1))
        state = tx.init(params)

        def step(carry, k):
            p, s = carry
            idx = (jnp.arange(n) if bs >= n  # full batch
                   else jax.random.randint(jax.random.fold_in(key, k), (bs,), 0, n))
            g = jax.grad(task.loss)(p, x[idx], y[idx])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        def chunk(carry, c):
            carry, _ = jax.lax.scan(step, carry, c * eval_every + 2 + jnp.arange(eval_every))
            return carry, task.loss(carry[0], xe, ye)

        (p, _), curve = jax.lax.scan(chunk, (params, state), jnp.arange(steps // eval_every))
        return curve, task.loss(p, xf, yf)

    lrs = jnp.repeat(jnp.asarray(grid, jnp.float32), len(seeds))
    sds = jnp.tile(jnp.asarray(seeds, jnp.uint32), len(grid))
    t0 = time.perf_counter()
    with (prototype(proto, base) if proto else contextlib.nullcontext()):
        if SEQUENTIAL.get(task.name):  # convolutions: slow inside lax.scan on XLA:CPU
            curve, final = _python_loop(task, make, steps, eval_every, base, lrs, sds,
                                        (x, y, xe, ye, xf, yf))
        else:
            curve, final = jax.jit(jax.vmap(one))(lrs, sds)
    curve, final = np.asarray(curve), np.asarray(final)
    secs = time.perf_counter() - t0
    init_loss = float(task.loss(task.init(jax.random.fold_in(jax.random.key(0), 1)), xf, yf))
    shape = (len(grid), len(seeds))
    return curve.reshape(shape + curve.shape[1:]), final.reshape(shape), init_loss, secs


def _python_loop(task, make, steps, eval_every, base, lrs, sds, data):
    """The runs one after the other, one jitted step called from Python (the main
    example's loop): XLA:CPU runs convolutions inside ``lax.scan`` several times slower."""
    x, y, xe, ye, xf, yf = data
    n, bs = x.shape[0], task.batch_size

    @jax.jit
    def step(p, s, k, lr, seed):
        tx = make(lambda c: lr * base(c))
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(seed), k), (bs,), 0, n)
        g = jax.grad(task.loss)(p, x[idx], y[idx])
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    loss = jax.jit(task.loss)
    curves, finals = [], []
    for lr, seed in zip(np.asarray(lrs), np.asarray(sds)):
        p = task.init(jax.random.fold_in(jax.random.key(int(seed)), 1))
        s = make(lambda c: 0.0 * base(c)).init(p)
        curve = []
        for k in range(steps):
            p, s = step(p, s, k + 2, jnp.float32(lr), jnp.uint32(seed))
            if (k + 1) % eval_every == 0:
                curve.append(float(loss(p, xe, ye)))
        curves.append(curve)
        finals.append(float(loss(p, xf, yf)))
    return np.asarray(curves), np.asarray(finals)


def _clean(v):
    return [None if not np.isfinite(a) else float(a) for a in np.ravel(v)]


def _restore(values) -> np.ndarray:
    """Values of a results file as an array, a non-finite one (None there, see
    :func:`_clean`) as +inf."""
    a = np.array(values, dtype=float)  # None -> nan
    return np.where(np.isnan(a), np.inf, a)


def study(task_name: str, names, out_dir: str = ROOT) -> dict:
    """Runs ``names`` on one task, adding to (or creating) its results file."""
    build, steps = TASKS[task_name]
    task = build()
    path = os.path.join(out_dir, f"{task_name}.json")
    res = {"task": task_name, "description": task.description, "steps": steps,
           "grid": list(GRID), "seeds": list(SEEDS), "warmup": WARMUP, "runs": {}}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    eval_every = max(steps // 50, 1)
    for name in names:
        label, make = OPTIMIZERS[name]
        grid = TASK_GRIDS.get(task_name, GRIDS.get(name, GRID))
        curve, final, init_loss, secs = run_task(task, make, steps, grid=grid,
                                                 eval_every=eval_every,
                                                 proto=PROTOTYPES.get(name))
        res["init_loss"] = init_loss
        res["eval_every"] = eval_every
        res["runs"][name] = {"label": label, "grid": list(grid),
                             "final": [_clean(r) for r in final],
                             "curve": [[_clean(c) for c in r] for r in curve],
                             "seconds": secs}
        med = np.median(np.where(np.isfinite(final), final, np.inf), axis=1)
        print(f"{task_name:14s} {name:24s} {secs:6.1f}s  "
              + "  ".join(f"{lr:g}:{m:.3g}" for lr, m in zip(grid, med)), flush=True)
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f)
    return res


def _median_final(run) -> np.ndarray:
    return np.median(_restore(run["final"]), axis=1)


def summarise(res: dict) -> dict:
    """Per optimizer: tuned lr, median final loss there, steps to target, lrs it trains at."""
    out = {}
    runs = res["runs"]
    if "adamw" not in runs:
        return out
    med_adam = _median_final(runs["adamw"])
    target = TARGET_SLACK * float(np.min(med_adam))
    for name, run in runs.items():
        med = _median_final(run)
        i = int(np.argmin(med))
        curves = _restore(run["curve"])[i]  # (seed, evals)
        hits = []
        for c in curves:
            w = np.nonzero(c <= target)[0]
            hits.append((w[0] + 1) * res["eval_every"] if len(w) else math.inf)
        stt = float(np.median(hits))
        finals = _restore(run["final"][i])
        grid = run.get("grid", res["grid"])
        out[name] = {"lr": grid[i], "final": float(med[i]),
                     "final_min": float(np.min(finals)), "final_max": float(np.max(finals)),
                     "steps": stt, "trains": [lr for lr, m in zip(grid, med)
                                              if m < 0.9 * res["init_loss"]],
                     "by_lr": [float(m) for m in med]}
    out["_target"] = target
    return out


def table(names=None, out_dir: str = ROOT) -> str:
    """The markdown table of every task's results under ``out_dir``."""
    results = _load_all(out_dir)
    names = names or [n for n in OPTIMIZERS if any(n in r["runs"] for r in results.values())]
    summ = {t: summarise(r) for t, r in results.items()}
    lines = ["Median final training loss at each optimizer's tuned peak lr (3 seeds), as a "
             "ratio to the chain without pairs (its own tuned lr); in brackets the steps to "
             f"target ({TARGET_SLACK}x tuned AdamW's final loss) as a ratio to the defaults'. "
             "Grid " + ", ".join(f"{g:g}" for g in GRID) + "; warm-up 5% + cosine to 0.", "",
             "| variant | " + " | ".join(results) + " | geo. mean | worst |",
             "|---|" + "---|" * (len(results) + 2)]
    for n in names:
        cells, ratios = [], []
        for t in results:
            s = summ[t]
            if n not in s or "no_pairs" not in s:
                cells.append("–")
                continue
            r = s[n]["final"] / s["no_pairs"]["final"]
            ratios.append(r)
            st = s[n]["steps"]
            base = s.get("defaults", {}).get("steps", math.inf)
            sr = "never" if not np.isfinite(st) else (
                f"{st / base:.2f}" if np.isfinite(base) else f"{st:.0f}")
            miss = [g for g in s["no_pairs"]["trains"] if g not in s[n]["trains"]]
            flag = " †" if miss else ""
            cells.append(f"{r:.2f} ({sr}){flag}")
        gm = float(np.exp(np.mean(np.log(ratios)))) if ratios else math.nan
        worst = max(ratios) if ratios else math.nan
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {gm:.2f} | {worst:.2f} |")
    lines += ["", "† an lr of the grid where the chain without pairs trains and this variant "
              "does not.", "", "Absolute numbers (median final training loss at the tuned "
              "lr, tuned lr, steps to target):", ""]
    for t, s in summ.items():
        lines.append(f"- **{t}** ({results[t]['description']}; {results[t]['steps']} steps; "
                     f"target {s.get('_target', math.nan):.4g}): " + "; ".join(
                         f"{n} {s[n]['final']:.4g} @ {s[n]['lr']:g}, "
                         f"{'never' if not np.isfinite(s[n]['steps']) else int(s[n]['steps'])}"
                         for n in names if n in s))
    return "\n".join(lines) + "\n"


#: seeds of the paired check (the study's three and seven more)
PAIRED_SEEDS = tuple(range(10))


def paired(task_name: str, names=("no_pairs", "lib_defaults"), seeds=PAIRED_SEEDS,
           out_dir: str = ROOT) -> dict:
    """Two optimizers at the first one's tuned lr, ``seeds`` each: final losses per seed.

    One seed gives both the same initialisation and mini-batches, so the ratio of their
    final losses seed by seed separates the optimizers' difference from the seeds'.
    Stored under ``"paired"`` in the task's results file.
    """
    build, steps = TASKS[task_name]
    task = build()
    path = os.path.join(out_dir, f"{task_name}.json")
    with open(path) as f:
        res = json.load(f)
    lr = summarise(res)[names[0]]["lr"]
    finals = {}
    for name in names:
        _, final, _, secs = run_task(task, OPTIMIZERS[name][1], steps, grid=(lr,), seeds=seeds,
                                     proto=PROTOTYPES.get(name))
        finals[name] = _clean(final[0])
        print(f"{task_name:14s} paired {name:16s} {secs:6.1f}s", flush=True)
    res["paired"] = {"lr": lr, "seeds": list(seeds), "names": list(names), "final": finals}
    with open(path, "w") as f:
        json.dump(res, f)
    return res


def paired_table(out_dir: str = ROOT) -> str:
    """The paired check of every task that has one, as markdown."""
    lines = ["Final training loss of the second optimizer over the first's, seed by seed, "
             "both at the first one's tuned lr (the same seed: the same initialisation and "
             "mini-batches).", "",
             "| task | optimizers | lr | seeds | median ratio | ratio min–max | seeds lower |",
             "|---|---|---|---|---|---|---|"]
    for t, r in _load_all(out_dir).items():
        pr = r.get("paired")
        if not pr:
            continue
        a, b = (_restore(pr["final"][n]) for n in pr["names"])
        ratio = b / a
        lines.append(f"| {t} | {pr['names'][1]} / {pr['names'][0]} | {pr['lr']:g} | "
                     f"{len(ratio)} | {np.median(ratio):.2f} | {ratio.min():.2f}–"
                     f"{ratio.max():.2f} | {int(np.sum(b < a))} of {len(ratio)} |")
    return "\n".join(lines) + "\n"


#: the columns of the headline table and plot: (name, heading)
HEADLINE = (("sgd", "SGD + momentum"), ("adamw", "AdamW"), ("no_pairs", "chain, no pairs"),
            ("lib_defaults", "**mL-BFGS defaults**"),
            ("lib_enlarging", "`sigma_low=0.1`"),
            ("defaults", "previous defaults"))


def _load_all(out_dir: str) -> dict:
    """task -> its results file's contents, for every task with one under ``out_dir``."""
    results = {}
    for t in TASKS:
        path = os.path.join(out_dir, f"{t}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[t] = json.load(f)
    return results


def headline(out_dir: str = ROOT) -> str:
    """Absolute median final training loss at each optimizer's tuned lr, one row a task."""
    results = _load_all(out_dir)
    cols = [(n, h) for n, h in HEADLINE if any(n in r["runs"] for r in results.values())]
    lines = ["| task | " + " | ".join(h for _, h in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for t, r in results.items():
        s = summarise(r)
        cells = []
        for n, _ in cols:
            if n not in s:
                cells.append("–")
                continue
            if not s[n]["trains"]:
                cells.append("no lr trains")
                continue
            lost = [g for g in s.get("no_pairs", {}).get("trains", []) if g not in s[n]["trains"]]
            cells.append(f"{s[n]['final']:.2g}" + (" †" if lost and n != "sgd" else ""))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(out_dir: str = ROOT, path: str = None) -> str:
    """Median final training loss against the peak lr, one panel a task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = _load_all(out_dir)
    n = len(results)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, (t, r) in zip(axes.ravel(), results.items()):
        for k, (name, head) in enumerate(HEADLINE):
            if name not in r["runs"]:
                continue
            run = r["runs"][name]
            med = _median_final(run)
            med = np.where(np.isfinite(med), med, np.nan)
            ax.plot(run.get("grid", r["grid"]), med, marker="o", ms=3, color=f"C{k}",
                    label=head.replace("*", "").replace("`", ""))
        ax.axhline(r["init_loss"], color="0.7", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", title=t, xlabel="peak lr")
        ax.set_ylim(top=2 * r["init_loss"])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0, 0].set_ylabel("final training loss")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Final training loss (median of 3 seeds) against the peak lr; warm-up + "
                 "cosine", fontsize=10)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "final_loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--opts", nargs="*", default=list(OPTIMIZERS))
    p.add_argument("--out", default=ROOT)
    p.add_argument("--table", action="store_true", help="only write the table")
    p.add_argument("--paired", action="store_true",
                   help="the paired check of the chain and the defaults on --tasks, "
                        f"{len(PAIRED_SEEDS)} seeds (writes paired.md)")
    args = p.parse_args(argv)
    if args.paired:
        for t in args.tasks:
            paired(t, out_dir=args.out)
        text = paired_table(args.out)
        with open(os.path.join(args.out, "paired.md"), "w") as f:
            f.write(text)
        print(text)
        return
    if not args.table:
        for t in args.tasks:
            study(t, args.opts, args.out)
    text = headline(args.out) + "\n" + table(out_dir=args.out)
    with open(os.path.join(args.out, "final_loss.md"), "w") as f:
        f.write(text)
    plot(args.out)
    print(text)



# ----------------------------------------------------------------------------- prototypes
# Research variants that need a change inside the pair step are prototyped here by
# wrapping the library's pure pair functions while one optimizer is traced (each
# optimizer is traced alone, in ``run_task``); a variant that is adopted becomes a
# library option, tested there.

from mlbfgs_optax import _pairs  # noqa: E402

_STASH: dict = {}


@contextlib.contextmanager
def prototype(kind: str, base_schedule=None):
    """Patches the pair step for one research variant while an optimizer is traced.

    kinds: ``"along_s"`` (y_hat = mu_damped s: the pair keeps only the curvature along
    s, so H's spectrum stays in [1/sigma_high, 1/sigma_low]); ``"snr"`` (y divided by the
    block's signal-to-noise ratio of the whitened gradient, sum D (M^g)^2 / sum D nu_hat,
    before the damping: the curvature a step must respect when the gradient is noisy);
    ``"schedule"`` (sigma_low follows the schedule: 1 - (1 - sigma_low) eta_t / eta_peak,
    no enlargement at the end of the schedule).
    """
    orig_damp, orig_step = _pairs.damp, _pairs.pair_step
    kinds = kind.split("+")

    def damp(layout, s, y, h, yy_bound, acc, along_s=False):
        bc = layout.broadcast
        if "snr" in kinds:
            inv = 1.0 / jnp.maximum(_STASH["snr"], 1e-12)
            y = [x * bc(inv, j, x.ndim) for j, x in enumerate(y)]
        if "schedule" in kinds:
            frac = _STASH["frac"]
            h = h._replace(sigma_low=1.0 - (1.0 - h.sigma_low) * frac)
        if "shrink" in kinds:
            h = h._replace(sigma_low=1.0)
        if "noise" in kinds:
            m, v = _STASH["mean"], _STASH["var"]
            sm, ss, sy = layout.block_dots([(s, m), (s, s), (s, y)], acc)
            svs = layout.block_dot([x * x for x in s], v, acc)
            snr = sm * sm / jnp.maximum(sm * sm + svs, 1e-30)
            mu = _pairs._numerics.safe_div(sy, ss)
            low = jnp.clip(_pairs._numerics.safe_div(mu, snr, 1.0), h.sigma_low, 1.0)
            h = h._replace(sigma_low=low)
        out = orig_damp(layout, s, y, h, yy_bound, acc, along_s)
        if "along_s" in kinds:
            ss, sy = layout.block_dots([(s, s), (s, out.y_hat)], acc)
            mu_d = _pairs._numerics.safe_div(sy, ss, 1.0)
            out = out._replace(y_hat=[x * bc(mu_d, j, x.ndim) for j, x in enumerate(s)])
        return out

    def pair_step(layout, opts, h, dt, g, t, st, root_d=None, inv_lr=None, hvp=None):
        if "snr" in kinds:
            c = _pairs._corrections(st, opts.bias_correction, dt.acc)[1]
            m = [c * a.astype(dt.acc) * r for a, r in zip(st.grads_avg, root_d)]
            # D nu_hat = (1/D - eps)^2 D with D = r^2
            v = [jnp.square(1.0 / jnp.square(r) - h.metric_eps) * jnp.square(r) for r in root_d]
            mm = layout.block_dot(m, m, dt.acc)
            vv = layout.block_dots([(v, [jnp.ones_like(x) for x in v])], dt.acc)[0]
            _STASH["snr"] = jnp.clip(_pairs._numerics.safe_div(mm, vv, 1.0), 0.0, 1.0)
        if "schedule" in kinds:
            _STASH["frac"] = base_schedule(t)
        if "noise" in kinds:
            c = _pairs._corrections(st, opts.bias_correction, dt.acc)[1]
            mg = [c * a.astype(dt.acc) for a in st.grads_avg]
            d = [jnp.square(r) for r in root_d]
            # nu_hat = (1/D - eps)^2
            nu = [jnp.square(1.0 / x - h.metric_eps) for x in d]
            _STASH["mean"] = [a * r for a, r in zip(mg, root_d)]
            _STASH["var"] = [x * jnp.maximum(n - a * a, 0.0) for x, n, a in zip(d, nu, mg)]
        return orig_step(layout, opts, h, dt, g, t, st, root_d, inv_lr, hvp)

    _pairs.damp, _pairs.pair_step = damp, pair_step
    try:
        yield
    finally:
        _pairs.damp, _pairs.pair_step = orig_damp, orig_step


if __name__ == "__main__":
    main()
