"""Benchmark suite: mL-BFGS against SGD, AdamW, optax L-BFGS and Muon.

Run from the repository root::

    python -m examples.benchmarks.run            # full suite, 3 seeds (~23 min on 2 cores)
    python -m examples.benchmarks.run --quick    # end-to-end smoke run (< 90 s)
    python -m examples.benchmarks.run --tasks mnist1d_mlp logreg --out /tmp/bench

Writes ``results.md`` (tables), ``results.json`` (every run with its history) and
``<task>.png`` / ``<task>_ablation.png`` (loss and test accuracy vs steps and vs
seconds) into ``--out`` (default ``examples/benchmarks/results``).

Protocol: every optimizer runs each learning rate of its grid with seed 0; while the
best lr is at an edge of what was tried, the grid grows by half a decade on that side
(at most ``EDGE_EXTENSIONS`` points a side); the lr with the lowest final training loss
(mean mini-batch loss of the last chunk) is then run with the remaining seeds. Ablations
of mlbfgs's defaults reuse the defaults' best lr. All runs use cosine decay from the peak
lr to 0. See README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from examples.benchmarks import harness
from examples.benchmarks.optimizers import SPECS, OptSpec
from examples.benchmarks.tasks import TASK_NAMES, Task, default_tasks, make_task


QUICK_SPECS = ("sgd", "muon", "mlbfgs_default", "mlbfgs_authors", "nsgdm", "abl_no_pairs")
QUICK_TASKS = ("mnist1d_mlp", "fmnist_mlp", "logreg")
EDGE_EXTENSIONS = 3  # half-decade points a grid may grow by on each side (full runs)


def _specs_for(task: Task, quick: bool, names: Optional[Sequence[str]] = None) -> list[OptSpec]:
    """The optimizers to run on ``task``: those ``names`` (``--opts``), else every
    optimizer that is not a research variant (fewer in ``quick`` mode)."""
    out = []
    for s in SPECS:
        chosen = s.name in names if names is not None else not s.research
        if not chosen:
            continue
        if s.only and not getattr(task, s.only):
            continue
        if s.ablation_of and not task.ablations and names is None:
            continue  # ablations run on the cheap tasks, or wherever --opts names them
        if quick and names is None and s.name not in QUICK_SPECS:
            continue  # quick mode: fewer compilations, every code path still runs
        out.append(s)
    return out


def _grid(task: Task, spec: OptSpec, quick: bool) -> list[float]:
    scale = task.lr_scale.get(spec.name, 1.0)
    return [float(f"{lr * scale:.3g}") for lr in (spec.quick_grid if quick else spec.grid)]


def _plan(task: Task, specs, seeds: int, quick: bool) -> int:
    n = 0
    for s in specs:
        n += seeds if s.ablation_of else len(_grid(task, s, quick)) + seeds - 1
    return n


def next_edge_lr(scores: dict[float, float], added: dict[str, int],
                 limit: int = EDGE_EXTENSIONS) -> Optional[float]:
    """The lr to try next so the best is not at an edge of the grid, or None.

    Args:
      scores: lr -> selection key (lower is better, +inf for a diverged run).
      added: points added so far on each side (``{"low": i, "high": j}``), updated.
      limit: the most points added on one side.

    Returns:
      Half a decade beyond the best lr when it is the lowest or highest lr tried (and
      that side has room left), else None.
    """
    lrs = sorted(scores)
    best = min(lrs, key=lambda lr: scores[lr])
    side = "high" if best == lrs[-1] else "low" if best == lrs[0] else None
    if side is None or added[side] >= limit:
        return None
    added[side] += 1
    exponent = round(2 * math.log10(best)) / 2 + (0.5 if side == "high" else -0.5)
    return float(f"{10 ** exponent:.3g}")


def _select_key(run: dict) -> float:
    """Lower is better: final training loss, +inf when the run diverged."""
    loss = run["train_loss"][-1]
    return math.inf if run["diverged"] or not np.isfinite(loss) else loss


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [math.inf if v is None else v for v in values]
    m = float(np.median(vals)) if vals else math.inf
    return None if not np.isfinite(m) else m


def _aggregate(task: Task, runs: list[dict]) -> dict[str, Any]:
    """Median and min/max over the seeds of one optimizer at its chosen lr."""
    key = "final_gap" if task.fstar is not None else "final_test_acc"
    finals = [r[key] for r in runs]
    return {
        "lr": runs[0]["lr"],
        "seeds": [r["seed"] for r in runs],
        "final_median": float(np.median(finals)),
        "final_min": float(np.min(finals)),
        "final_max": float(np.max(finals)),
        "final_test_acc_median": float(np.median([r["final_test_acc"] for r in runs])),
        "steps_to_target_median": _median([r["steps_to_target"] for r in runs]),
        "seconds_to_target_median": _median([r["seconds_to_target"] for r in runs]),
        "reached": sum(r["steps_to_target"] is not None for r in runs),
        "step_seconds_median": float(np.median([r["step_seconds"] for r in runs])),
        "diverged": sum(r["diverged"] for r in runs),
    }


def _grid_summary(grid: Optional[list[dict]]) -> dict[str, Any]:
    """How the grid went: its size, whether the chosen lr is at an edge, and how many
    lrs diverged, in all and in the upper half (lrs at or above the median lr)."""
    if not grid:
        return {"grid_lrs": None, "lr_at_grid_edge": None, "grid_diverged": None,
                "upper_half_diverged": None}
    lrs = [g["lr"] for g in grid]
    best = min(grid, key=lambda g: g["final_train_loss"])["lr"]
    mid = float(np.median(lrs))
    return {"grid_lrs": len(lrs), "lr_at_grid_edge": best in (lrs[0], lrs[-1]),
            "grid_diverged": sum(g["diverged"] for g in grid),
            "upper_half_diverged": sum(g["diverged"] for g in grid if g["lr"] >= mid)}


def run_task(task: Task, specs, args, bar, bandwidth) -> dict[str, Any]:
    steps = task.quick_steps if args.quick else task.steps
    eval_every = max(1, steps // (5 if args.quick else task.evals))
    steps = (steps // eval_every) * eval_every
    result = {"description": task.description, "num_params": task.num_params, "steps": steps,
              "eval_every": eval_every, "metric": task.metric, "target": task.target,
              "fstar": task.fstar, "runs": [], "best_lr": {}, "grid": {}, "summary": {},
              "update": {}, "compile_seconds": {}}
    by_spec: dict[str, list[dict]] = {}
    ordered = [s for s in specs if not s.ablation_of] + [s for s in specs if s.ablation_of]
    for spec in ordered:
        bar.set_description(f"{task.name}: {spec.name}")
        trainer = harness.Trainer(task, spec.make, steps, eval_every, spec.uses_grad_fn)
        result["compile_seconds"][spec.name] = trainer.compile_seconds
        runs = []

        def go(lr, seed, phase):
            r = trainer.run(lr, seed)
            r.update(optimizer=spec.name, lr=lr, seed=seed, phase=phase)
            result["runs"].append(r)
            bar.update(1)
            return r

        if spec.ablation_of:
            best = result["best_lr"][spec.ablation_of]
            runs = [go(best, seed, "ablation") for seed in range(args.seeds)]
        else:
            trials = [go(lr, 0, "grid") for lr in _grid(task, spec, args.quick)]
            added = {"low": 0, "high": 0}
            while not args.quick:
                lr = next_edge_lr({r["lr"]: _select_key(r) for r in trials}, added)
                if lr is None:
                    break
                trials.append(go(lr, 0, "grid"))
            trials.sort(key=lambda r: r["lr"])
            best_run = min(trials, key=_select_key)
            result["grid"][spec.name] = [
                {"lr": r["lr"], "final_train_loss": _select_key(r), "diverged": r["diverged"]}
                for r in trials]
            best = best_run["lr"]
            runs = [best_run] + [go(best, seed, "seeds") for seed in range(1, args.seeds)]
        result["best_lr"][spec.name] = best
        by_spec[spec.name] = runs
        # Optimizer-only update time on this task's parameters.
        params = jax.jit(task.init)(jax.random.key(0))
        tx = spec.make(harness.cosine(0.01, steps))
        grad_fn = None
        if spec.uses_grad_fn:
            grad_fn = harness.batch_grad_fn(task, jnp.asarray(task.x_train[:task.batch_size]),
                                            jnp.asarray(task.y_train[:task.batch_size]))
        upd = harness.time_update(tx, params, repeats=5 if args.quick else 30, grad_fn=grad_fn)
        floor = spec.floor_words * 4 * task.num_params / bandwidth
        result["update"][spec.name] = {
            "update_seconds": upd["seconds"],
            "state_bytes_per_param": upd["state_bytes"] / task.num_params,
            "floor_words_per_param": spec.floor_words,
            "floor_seconds": floor,
            "update_over_floor": upd["seconds"] / floor,
        }
    for name, runs in by_spec.items():
        result["summary"][name] = _aggregate(task, runs)
        result["summary"][name].update(_grid_summary(result["grid"].get(name)))
    sgd = result["summary"].get("sgd")
    for name, s in result["summary"].items():
        s["step_time_ratio_to_sgd"] = (s["step_seconds_median"] / sgd["step_seconds_median"]
                                       if sgd else None)
    return result


# ----------------------------------------------------------------------------- report


def _fmt(v, spec="{:.3g}", none="–"):
    return none if v is None else spec.format(v)


LABELS = {s.name: s.label for s in SPECS}


def markdown(results: dict) -> str:
    lines = [
        "# mL-BFGS benchmark results",
        "",
        f"- Mode: {'quick' if results['config']['quick'] else 'full'}; seeds per optimizer: "
        f"{results['config']['seeds']}; {results['config']['library']}; jax "
        f"{results['config']['jax']}, optax {results['config']['optax']}, "
        f"{results['config']['machine']}.",
        f"- Memory bandwidth (jitted y = a*x + y on 64 MiB float32 arrays, same process): "
        f"**{results['bandwidth_GBps']:.2f} GB/s**.",
        f"- Total wall time: {results['wall_seconds']:.0f} s.",
        "",
    ]
    for name, t in results["tasks"].items():
        if "skipped" in t:
            lines += [f"## {name}", "", f"Skipped: {t['skipped']}", ""]
            continue
        gap = t["fstar"] is not None
        tgt = (f"objective gap f - f* <= {t['target']:g} (f* = {t['fstar']})" if gap
               else f"test accuracy >= {t['target']:g}")
        lines += [
            f"## {name}",
            "",
            f"{t['description']}; {t['num_params']} parameters; {t['steps']} steps, evaluated "
            f"every {t['eval_every']}. Target: {tgt}.",
            "",
            "| optimizer | lr | grid: lrs, diverged | final " +
            ("gap f - f*" if gap else "test acc") +
            " median [min, max] | steps to target | s to target | step time / SGD | "
            "update-only ms | state B/param | update / floor |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for opt, s in t["summary"].items():
            u = t["update"].get(opt)
            fin = ("{:.2e} [{:.2e}, {:.2e}]" if gap else "{:.3f} [{:.3f}, {:.3f}]").format(
                s["final_median"], s["final_min"], s["final_max"])
            n = len(s["seeds"])
            reached = "" if s["reached"] == n else f" ({s['reached']}/{n} reached)"
            edge = " (edge)" if s.get("lr_at_grid_edge") else ""
            grid = ("ablation" if s.get("grid_lrs") is None
                    else f"{s['grid_lrs']}, {s['grid_diverged']}")
            lines.append(
                f"| {opt} | {_fmt(s['lr'], '{:g}')}{edge} | {grid} | {fin}"
                f"{' (' + str(s['diverged']) + ' diverged)' if s['diverged'] else ''} | "
                f"{_fmt(s['steps_to_target_median'], '{:.0f}')}{reached} | "
                f"{_fmt(s['seconds_to_target_median'], '{:.2f}')} | "
                f"{_fmt(s['step_time_ratio_to_sgd'], '{:.2f}')} | "
                f"{_fmt(u and u['update_seconds'] * 1e3, '{:.3f}')} | "
                f"{_fmt(u and u['state_bytes_per_param'], '{:.1f}')} | "
                f"{_fmt(u and u['update_over_floor'], '{:.1f}')} |")
        lines.append("")
    lines += [
        "## Notes",
        "",
        "- Optimizers: " + "; ".join(f"`{k}` = {v}" for k, v in LABELS.items()) + ".",
        "- lr: the peak of a cosine decay to 0, chosen from the grid by the lowest final "
        "training loss with seed 0; ablations (`abl_*`) reuse `mlbfgs_default`'s lr. Every "
        "grid starts with 7 lrs half a decade apart; in full runs, while the best is the "
        f"lowest or highest lr tried, it grows by half a decade on that side (at most "
        f"{EDGE_EXTENSIONS} a side); '(edge)' marks a best lr still at an edge. 'grid: lrs, "
        "diverged' counts the lrs tried and those whose seed-0 run diverged.",
        "- steps/s to target: median over seeds, counting a seed that never reached the "
        "target as infinite ('–' when the median did not reach it); seconds exclude "
        "compilation and evaluation.",
        "- step time / SGD: median per-step time of a whole training step (forward, "
        "backward, update, in a jitted lax.scan chunk) divided by SGD's in the same run.",
        "- update-only ms: the jitted optimizer update alone on the task's parameters, state "
        "donated, median of repeats. state B/param: optimizer-state bytes per parameter.",
        "- update / floor: update-only time divided by (words moved x 4 bytes x parameters) "
        "/ measured bandwidth. Words per parameter per step: "
        + "; ".join(f"`{s.name}` {s.floor_formula} = {s.floor_words:.4g}" for s in SPECS)
        + ". mL-BFGS (spec): the two-loop recursion reads the 2M history vectors twice (4M);"
        " reading theta and g, updating the two averages and writing d costs 7; pair "
        "formation every T steps moves 8 (+2 with pair momentum, +1 with refresh). Small "
        "models are far from the floor: per-call dispatch and the 2M sequential dot "
        "products dominate.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, t in results["tasks"].items():
        if "skipped" in t:
            continue
        chosen = {}  # optimizer -> seed -> run, at the chosen lr
        for r in t["runs"]:
            s = t["summary"][r["optimizer"]]
            if r["lr"] == s["lr"] and r["seed"] in s["seeds"]:
                chosen.setdefault(r["optimizer"], {})[r["seed"]] = r
        groups = {
            name: [o for o in chosen if not o.startswith("abl_")],
            f"{name}_ablation": ["mlbfgs_default", "mlbfgs_paper"]
            + [o for o in chosen if o.startswith("abl_")],
        }
        ykey = "gap" if t["fstar"] is not None else "test_acc"
        for fname, opts in groups.items():
            opts = [o for o in opts if o in chosen]
            if not opts:
                continue
            fig, axes = plt.subplots(2, 2, figsize=(10, 7))
            for o in opts:
                rs = list(chosen[o].values())
                n = min(len(r["step"]) for r in rs)
                for row, key in enumerate(("train_loss", ykey)):
                    ys = np.array([r[key][:n] for r in rs], dtype=float)
                    med = np.median(ys, axis=0)
                    for col, xkey in enumerate(("step", "seconds")):
                        xs = np.median(np.array([r[xkey][:n] for r in rs], float), axis=0)
                        ax = axes[row, col]
                        line, = ax.plot(xs, med, label=o, lw=1.4,
                                        ls="--" if o.startswith("abl_") else "-")
                        if len(rs) > 1:
                            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15,
                                            color=line.get_color(), lw=0)
            # Diverged values are stored as None (NaN in JSON terms): np.array(float) -> nan.
            first = [np.nanmedian(np.array([r["train_loss"][1] for r in chosen[o].values()
                                            if len(r["train_loss"]) > 1] or [np.nan], float))
                     for o in opts]
            first = [f for f in first if np.isfinite(f)]
            for col, xl in enumerate(("step", "seconds (training only)")):
                axes[1, col].set_xlabel(xl)
                axes[0, col].set_ylabel("train loss (chunk mean)")
                axes[0, col].set_yscale("log")
                if first:  # diverging runs would otherwise squash every other curve
                    axes[0, col].set_ylim(None, 3 * max(first))
                axes[1, col].set_ylabel("f - f* (full batch)" if ykey == "gap" else "test accuracy")
                if ykey == "gap":
                    axes[1, col].set_yscale("log")
                else:
                    finals = [np.nanmedian(np.array([r["test_acc"][-1]
                                                     for r in chosen[o].values()], float))
                              for o in opts]
                    finals = [f for f in finals if np.isfinite(f)] or [0.0]
                    axes[1, col].set_ylim(max(0.0, min(finals) - 0.15), None)
            axes[0, 0].legend(fontsize=7)
            fig.suptitle(f"{name}: median over seeds (band: min-max)", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{fname}.png")
            fig.savefig(path, dpi=72)
            plt.close(fig)
            paths.append(path)
    return paths


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a few hundred steps, one seed, 2-point grids, one ablation")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASK_NAMES,
                   help=f"default: all ({', '.join(TASK_NAMES)}); with --quick: "
                        f"{', '.join(QUICK_TASKS)}")
    p.add_argument("--out", default=harness.DEFAULT_OUT)
    p.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--opts", nargs="+", default=None, choices=[s.name for s in SPECS],
                   help="run only these optimizers (an ablation also needs the one whose "
                        "lr it reuses)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.tasks is None:
        args.tasks = list(QUICK_TASKS if args.quick else default_tasks())
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    bandwidth = harness.measure_bandwidth()
    tasks = {}
    for name in args.tasks:
        try:
            tasks[name] = make_task(name)
        except FileNotFoundError as e:
            if not args.quick:
                raise
            print(f"note: skipping {name} in --quick mode: {e}", file=sys.stderr)
    specs = {name: _specs_for(t, args.quick, args.opts) for name, t in tasks.items()}
    total = sum(_plan(tasks[name], s, args.seeds, args.quick) for name, s in specs.items())
    results = {
        "config": {"quick": args.quick, "seeds": args.seeds, "tasks": args.tasks,
                   "jax": jax.__version__, "optax": optax.__version__,
                   "library": harness.library_version(),
                   "machine": harness.machine(),
                   "grids": {s.name: list(s.quick_grid if args.quick else s.grid)
                             for s in SPECS if not s.ablation_of}},
        "bandwidth_GBps": bandwidth / 1e9,
        "tasks": {},
    }
    with tqdm(total=total, desc="benchmarks", file=sys.stderr) as bar:
        for name in args.tasks:
            if name not in tasks:
                results["tasks"][name] = {"skipped": "Fashion-MNIST files not found "
                                          "(see examples/datasets.py)"}
                continue
            task = tasks[name]
            results["tasks"][name] = run_task(task, specs[name], args, bar, bandwidth)
    results["wall_seconds"] = time.perf_counter() - t_start
    results = _jsonable(results)
    md = markdown(results)
    harness.write_report(args.out, "results", results, md)
    results["plots"] = plot(results, args.out)
    print(md)
    return results


if __name__ == "__main__":
    main()
