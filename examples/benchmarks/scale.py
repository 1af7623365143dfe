"""Paper-scale benchmark: a ResNet with BatchNorm and a transformer LM.

Protocol, for every task and optimizer (SGD+momentum, AdamW, the library's default
mL-BFGS, the authors' recipe and normalized SGD+momentum as its control):

1. Learning-rate grid: 5 peak learning rates half a decade apart (the middle five of
   the 7-point grids of ``optimizers.py``), one seed each, on a short budget
   (``--grid-fraction`` of the full steps, with its own warm-up + cosine schedule).
   The best is the one with the best held-out metric at the end; where it is at an edge
   of the grid, the grid is extended by half a decade on that side (at most twice).
2. Full budget: the best learning rate, 3 seeds, warm-up (5% of the steps) + cosine
   decay to 0; held-out metric every ``eval_every`` steps. The final training loss is
   the mean mini-batch loss over the last ``eval_every`` steps (median over the seeds).
3. ``mlbfgs_default`` again at its best lr with ``history_dtype=jnp.bfloat16``.

Seconds count training only (``eval_every`` calls of one training step compiled
ahead of time, ``block_until_ready`` after each chunk), never compilation or evaluation.
Peak memory is XLA's memory analysis of one compiled training step (arguments +
outputs + temporaries - aliased), the same on every backend. Run::

    python -m examples.benchmarks.scale            # full CPU-sized run (~1 hour on 2 CPU cores)
    python -m examples.benchmarks.scale --quick    # CI smoke run (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import mlbfgs_optax
from examples.benchmarks import harness, scale_tasks
from examples.benchmarks.optimizers import SPEC_BY_NAME
from examples.common import make_mlbfgs

OPTIMIZERS = ("sgd", "adamw", "mlbfgs_default", "mlbfgs_authors", "nsgdm")
WARMUP_FRACTION = 0.05


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the model's mutable collections (BatchNorm statistics)."""

    model_state: Any = flax.struct.field(default_factory=dict)


def warmup_cosine(lr, total_steps: int):
    """Linear warm-up over 5% of the steps to ``lr`` (may be traced), then cosine to 0."""
    base = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, max(1, int(WARMUP_FRACTION * total_steps)), total_steps, 0.0)
    return lambda count: lr * base(count)


def _make_tx(opt: str, lr, steps: int, bf16: bool = False):
    sched = warmup_cosine(lr, steps)
    if bf16:
        return make_mlbfgs(learning_rate=sched, history_dtype=jnp.bfloat16)
    return SPEC_BY_NAME[opt].make(sched)


def _grid(opt: str, quick: bool) -> tuple:
    spec = SPEC_BY_NAME[opt]
    return tuple(spec.quick_grid) if quick else tuple(spec.grid[1:6])


class ScaleTrainer:
    """Compiles one (task, optimizer, budget) and trains it from any seed and lr."""

    def __init__(self, task: scale_tasks.ScaleTask, opt: str, steps: int, eval_every: int,
                 bf16: bool = False):
        self.task, self.steps, self.eval_every = task, steps, eval_every
        make = lambda lr: _make_tx(opt, lr, steps, bf16)  # noqa: E731

        def init(key):
            params, model_state = task.init(key)
            return TrainState(step=0, apply_fn=None, params=params, tx=None,
                              opt_state=make(jnp.float32(0.0)).init(params),
                              model_state=model_state)

        def train_step(state, key, lr):
            x, y = task.sample(key, task.data)
            (loss, new_ms), g = jax.value_and_grad(
                lambda p: task.loss(p, state.model_state, x, y), has_aux=True)(state.params)
            state = state.replace(tx=make(lr)).apply_gradients(grads=g, model_state=new_ms)
            return state.replace(tx=None), loss

        # One jitted step per call, not a lax.scan over steps: on XLA:CPU (jax 0.10.2) the
        # convolutions inside a while loop run ~30x slower than the same step unrolled.
        self._init = jax.jit(init)
        s0 = jax.eval_shape(init, jax.random.key(0))
        key_shape = jax.eval_shape(lambda: jax.random.key(0))
        lr_shape = jax.ShapeDtypeStruct((), jnp.float32)
        t0 = time.perf_counter()
        self._step = jax.jit(train_step, donate_argnums=0).lower(s0, key_shape,
                                                                 lr_shape).compile()
        self.compile_seconds = time.perf_counter() - t0
        eval_fn, batches = jax.jit(task.eval_batch), task.eval_batches(task.data)
        self._eval = lambda p, ms: task.evaluate(eval_fn, batches, p, ms)
        self.peak_bytes = _peak_bytes(self._step)
        self.state_bytes = mlbfgs_optax.state_nbytes(s0.opt_state)

    def run(self, lr: float, seed: int) -> dict:
        """Trains from seed ``seed``; the history and summary numbers."""
        state = self._init(jax.random.key(seed))
        key = jax.random.key(10_000 + seed)
        hist = {"step": [], "seconds": [], "train_loss": [], "test_loss": [], "metric": []}

        def record(step, seconds, train_loss):
            loss, metric = self._eval(state.params, state.model_state)
            hist["step"].append(step)
            hist["seconds"].append(seconds)
            hist["train_loss"].append(train_loss)
            hist["test_loss"].append(float(loss))
            hist["metric"].append(float(metric))

        record(0, 0.0, float("nan"))
        seconds, chunk_times, diverged = 0.0, [], False
        lr32 = jnp.float32(lr)
        for c in range(self.steps // self.eval_every):
            keys = jax.random.split(jax.random.fold_in(key, c), self.eval_every)
            keys = [keys[i] for i in range(self.eval_every)]
            jax.block_until_ready((keys, lr32))
            losses = []
            t0 = time.perf_counter()
            for i in range(self.eval_every):
                state, loss = self._step(state, keys[i], lr32)
                losses.append(loss)
            jax.block_until_ready((state, losses))
            dt = time.perf_counter() - t0
            seconds += dt
            chunk_times.append(dt)
            record((c + 1) * self.eval_every, seconds, float(jnp.mean(jnp.stack(losses))))
            if not np.isfinite(hist["test_loss"][-1]):
                diverged = True
                break
        hist.update(
            lr=lr, seed=seed, diverged=diverged, final_metric=hist["metric"][-1],
            step_seconds=float(np.median(chunk_times)) / self.eval_every)
        return hist


def _peak_bytes(compiled) -> Optional[int]:
    """Arguments + outputs + temporaries - aliased bytes of a compiled program."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def _score(task, final: float, diverged: bool) -> float:
    """Larger is better: the final metric (negated for bits/byte); -inf if diverged."""
    if diverged or not math.isfinite(final):
        return -math.inf
    return final if task.metric == "acc" else -final


def _best_lr(task, grid: dict):
    """The lr of ``grid`` (lr -> (final metric, diverged)) with the best score."""
    return max(grid, key=lambda k: _score(task, *grid[k]))


def bench_task(task, optimizers: Sequence[str], grid_steps: int, quick: bool,
               seeds: int, log, bf16: bool = True, ablations: Sequence[str] = (),
               ablation_lr: Optional[float] = None) -> dict:
    """Grid search, full runs, (``bf16``) the bfloat16-history run, and the ``ablations``
    (names from ``optimizers.py``) at ``mlbfgs_default``'s best lr, or at ``ablation_lr``
    when ``mlbfgs_default`` is not run."""
    out: dict = {"description": task.description, "info": task.info,
                 "num_params": task.num_params, "steps": task.steps,
                 "grid_steps": grid_steps, "preset_target": task.target, "metric": task.metric,
                 "grid": {}, "runs": {}, "summary": {}}
    trainers: dict = {}

    def trainer(opt, steps, eval_every, bf16=False):  # compiled once per budget
        key = (opt, steps, eval_every, bf16)
        if key not in trainers:
            trainers[key] = ScaleTrainer(task, opt, steps, eval_every, bf16)
        return trainers[key]

    # The grid looks only at the final metric (in quick mode the grid budget is the full one).
    geval = task.eval_every if grid_steps == task.steps else grid_steps
    for opt in optimizers:
        tr = trainer(opt, grid_steps, geval)
        scores = {}

        def try_lr(lr):
            r = tr.run(lr, seed=0)
            scores[lr] = (r["final_metric"], r["diverged"])
            log(f"  [{task.name}] grid {opt} lr={lr:g}: {r['final_metric']:.4f}"
                f"{' (diverged)' if r['diverged'] else ''}")

        for lr in _grid(opt, quick):
            try_lr(lr)
        # Never leave the best at an edge: extend by half a decade (at most twice per side).
        for _ in range(0 if quick else 2):
            lrs, best = sorted(scores), _best_lr(task, scores)
            if best not in (lrs[0], lrs[-1]):
                break
            e = round(2 * math.log10(best)) / 2 + (0.5 if best == lrs[-1] else -0.5)
            try_lr(float(f"{10 ** e:.3g}"))
        scores = dict(sorted(scores.items()))
        out["grid"][opt] = {str(k): v for k, v in scores.items()}
    extra = ["mlbfgs_bf16"] if bf16 and "mlbfgs_default" in optimizers else []
    for opt in list(optimizers) + extra + list(ablations):
        base = "mlbfgs_default" if opt == "mlbfgs_bf16" else opt
        if opt in ablations and "mlbfgs_default" not in out["grid"]:
            best, grid = str(ablation_lr), [str(ablation_lr)]  # the lr given on the command line
        else:
            grid = out["grid"]["mlbfgs_default" if opt in ablations else base]
            best, grid = _best_lr(task, grid), list(grid)
        tr = trainer(base, task.steps, task.eval_every, opt == "mlbfgs_bf16")
        runs = [tr.run(float(best), seed) for seed in range(seeds)]
        out["runs"][opt] = runs
        out["summary"][opt] = _summary(task, runs, tr, best, grid)
        s = out["summary"][opt]
        log(f"  [{task.name}] {opt} lr={best}: final {s['final_median']:.4f} "
            f"step {s['step_ms']:.1f} ms")
    apply_target(out)
    sgd_ms = out["summary"].get("sgd", {}).get("step_ms")
    for s in out["summary"].values():
        s["step_time_ratio_to_sgd"] = s["step_ms"] / sgd_ms if sgd_ms else None
    return out


def _summary(task, runs, tr: ScaleTrainer, best: str, grid: list) -> dict:
    finals = [r["final_metric"] for r in runs]
    # Training loss at the end of the schedule: the mean mini-batch loss of the last
    # evaluation period (a diverged run counts as +inf).
    train = [r["train_loss"][-1] if not r["diverged"] else math.inf for r in runs]
    edge = best in (grid[0], grid[-1])
    return {
        "lr": float(best), "lr_at_grid_edge": edge, "seeds": len(runs),
        "final_median": float(np.median(finals)), "final_min": float(np.min(finals)),
        "final_max": float(np.max(finals)),
        "final_train_loss_median": float(np.median(train)),
        "diverged": sum(r["diverged"] for r in runs),
        "step_ms": 1e3 * float(np.median([r["step_seconds"] for r in runs])),
        "compile_s": tr.compile_seconds,
        "state_bytes_per_param": tr.state_bytes / task.num_params,
        "peak_step_bytes": tr.peak_bytes,
    }


def _median_inf(values):
    """Median where None (never reached) counts as +inf; None if the median is inf."""
    v = float(np.median([math.inf if x is None else x for x in values]))
    return None if math.isinf(v) else v


def apply_target(t: dict, baselines: Sequence[str] = ("sgd", "adamw")) -> None:
    """Sets the target and the steps/seconds to it, in place, for one task's results.

    The target is the best median final metric of the tuned baselines (SGD+momentum and
    AdamW), as AlgoPerf sets its targets from tuned baselines; the task's own preset
    target is used when no baseline ran. For each run: the first evaluation at or past the
    target; per optimizer: the median over seeds, a seed that never gets there counting as
    infinite (so a median is reported when most seeds get there).
    """
    better = max if t["metric"] == "acc" else min
    finals = [t["summary"][b]["final_median"] for b in baselines if b in t["summary"]]
    t["target"] = better(finals) if finals else t["preset_target"]
    t["target_rule"] = ("best baseline" if finals else "preset")
    ok = (lambda v: v >= t["target"]) if t["metric"] == "acc" else (lambda v: v <= t["target"])
    for opt, runs in t["runs"].items():
        for r in runs:
            first = next((i for i, v in enumerate(r["metric"]) if ok(v)), None)
            r["steps_to_target"] = r["step"][first] if first is not None else None
            r["seconds_to_target"] = r["seconds"][first] if first is not None else None
        s = t["summary"][opt]
        s["reached"] = sum(r["steps_to_target"] is not None for r in runs)
        s["steps_to_target"] = _median_inf([r["steps_to_target"] for r in runs])
        s["seconds_to_target"] = _median_inf([r["seconds_to_target"] for r in runs])


# ----------------------------------------------------------------------------- report


_RULES = {"best baseline": "the best median final value of SGD+momentum and AdamW",
          "preset": "preset"}


def markdown(result: dict) -> str:
    """The results as markdown: one table per task."""
    cfg = result["config"]
    lines = ["# Paper-scale benchmark: ResNet and transformer LM", "",
             f"- Mode: {'quick' if cfg['quick'] else 'full'}; {cfg['seeds']} seeds at the best "
             f"lr of a {cfg['grid_points']}-point grid (1 seed, {cfg['grid_fraction']:.0%} of the "
             "budget); warm-up 5% + cosine.",
             f"- {cfg['library']}; jax {jax.__version__}, optax {optax.__version__}, "
             f"{cfg['machine']}.", f"- Total wall time: {result['total_seconds']:.0f} s.", ""]
    for t in result["tasks"].values():
        unit = "test accuracy" if t["metric"] == "acc" else "held-out bits/byte"
        cmp = ">=" if t["metric"] == "acc" else "<="
        lines += [f"## {t['name']}", "", f"{t['description']}; {t['num_params']} parameters; "
                  f"{t['steps']} steps, evaluated every {t['eval_every']}. Target: {unit} "
                  f"{cmp} {t['target']:.4f} ({_RULES[t['target_rule']]}).", "",
                  f"| optimizer | lr | final {unit} median [min, max] | final training loss "
                  "| steps to target | s to target | step ms | step time / SGD | state B/param "
                  "| peak step MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for opt, s in t["summary"].items():
            lr = f"{s['lr']:g}" + (" (grid edge)" if s["lr_at_grid_edge"] else "")
            reach = (f"{s['steps_to_target']:.0f}" if s["steps_to_target"] is not None
                     else "–") + f" ({s['reached']}/{s['seeds']})"
            sec = f"{s['seconds_to_target']:.1f}" if s["seconds_to_target"] is not None else "–"
            div = f" ({s['diverged']} diverged)" if s["diverged"] else ""
            ratio = s.get("step_time_ratio_to_sgd")
            peak = s["peak_step_bytes"]
            lines.append(
                f"| {opt} | {lr} | {s['final_median']:.4f} [{s['final_min']:.4f}, "
                f"{s['final_max']:.4f}]{div} | {_train_loss(s)} | {reach} | {sec} | "
                f"{s['step_ms']:.1f} | "
                f"{'–' if ratio is None else f'{ratio:.2f}'} | "
                f"{s['state_bytes_per_param']:.1f} | "
                f"{peak / 2**20 if peak else float('nan'):.1f} |")
        lines += [f"\n{opt}: {s['note']}" for opt, s in t["summary"].items() if s.get("note")]
        lines += ["", "Grid (seed 0, short budget): " + "; ".join(
            f"{o}: " + ", ".join(f"{lr}→{v[0]:.3f}{'(div)' if v[1] else ''}"
                                 for lr, v in g.items()) for o, g in t["grid"].items()), ""]
    return "\n".join(lines) + "\n"


def _train_loss(s: dict) -> str:
    """The median final training loss, or "–" (results written before it was recorded)."""
    v = s.get("final_train_loss_median")
    return "–" if v is None else f"{v:.4f}"


def plot(task_result: dict, path: str) -> None:
    """Held-out metric and train loss against steps and seconds (median seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for opt, runs in task_result["runs"].items():
        finals = [r["final_metric"] for r in runs]
        r = runs[int(np.argsort(finals)[len(finals) // 2])]
        for col, xkey in enumerate(("step", "seconds")):
            axes[0, col].plot(r[xkey][1:], r["metric"][1:], label=opt)  # skip the init
            axes[1, col].plot(r[xkey][1:], r["train_loss"][1:], label=opt)
    ylab = "test accuracy" if task_result["metric"] == "acc" else "held-out bits/byte"
    for col, xl in enumerate(("steps", "seconds (training only)")):
        axes[0, col].set(xlabel=xl, ylabel=ylab)
        axes[1, col].set(xlabel=xl, ylabel="train loss (chunk mean)", yscale="log")
        axes[0, col].axhline(task_result["target"], color="k", lw=0.5, ls="--")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(task_result["description"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _write(out: str, result: dict) -> None:
    os.makedirs(out, exist_ok=True)
    harness.write_report(out, "scale", result, markdown(result))
    for name, tr in result["tasks"].items():
        plot(tr, os.path.join(out, f"scale_{name}.png"))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny budgets, 1 seed")
    p.add_argument("--tasks", nargs="+", default=list(scale_tasks.TASKS))
    p.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    p.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--ablations", nargs="*", default=[],
                   help="mL-BFGS ablations of optimizers.py (e.g. abl_no_pairs), 3 seeds at "
                        "mlbfgs_default's best lr")
    p.add_argument("--ablation-lr", type=float, default=None,
                   help="the ablations' lr when mlbfgs_default is not among --optimizers")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="skip the mlbfgs run with history_dtype=bfloat16")
    p.add_argument("--grid-fraction", type=float, default=0.2)
    p.add_argument("--out", default=os.path.join(harness.DEFAULT_OUT, "scale"))
    p.add_argument("--report", metavar="JSON",
                   help="re-render scale.md and the plots from a scale.json, without training")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        for t in result["tasks"].values():
            t.setdefault("preset_target", t["target"])
            apply_target(t)
        _write(args.out, result)
        return result
    if args.ablations and "mlbfgs_default" not in args.optimizers and args.ablation_lr is None:
        p.error("--ablations without mlbfgs_default in --optimizers needs --ablation-lr")
    seeds = args.seeds or (1 if args.quick else 3)
    t_start = time.perf_counter()
    result = {"config": {"quick": args.quick, "seeds": seeds, "grid_fraction": args.grid_fraction,
                         "grid_points": 2 if args.quick else 5,
                         "library": harness.library_version(), "machine": harness.machine()},
              "tasks": {}}
    for name in args.tasks:
        kw = dict(steps=8, eval_every=4) if args.quick else {}
        if args.quick and name == "resnet":
            kw.update(width=4, batch_size=16)
        if args.quick and name == "lm":
            kw.update(dim=32, layers=1, batch_size=8)
        task = scale_tasks.TASKS[name](quick=args.quick, **kw)
        grid_steps = (task.steps if args.quick
                      else max(task.eval_every, int(args.grid_fraction * task.steps)))
        print(f"[{name}] {task.description}; {task.num_params} params", flush=True)
        tr = bench_task(task, args.optimizers, grid_steps, args.quick, seeds,
                        lambda s: print(s, flush=True), bf16=args.bf16,
                        ablations=args.ablations, ablation_lr=args.ablation_lr)
        tr.update(name=name, eval_every=task.eval_every)
        result["tasks"][name] = tr
    result["total_seconds"] = time.perf_counter() - t_start
    _write(args.out, result)
    print(json.dumps({n: {o: s["final_median"] for o, s in t["summary"].items()}
                      for n, t in result["tasks"].items()}))
    return result


if __name__ == "__main__":
    main()
