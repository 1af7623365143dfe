"""Batch-size scaling: steps to a target against batch size, per optimizer.

After Shallue et al. 2018 ("Measuring the effects of data parallelism on neural network
training", arXiv 1811.03600): how the number of steps needed to reach a target falls as the
batch grows, and where each optimizer's *critical batch size* lies (the batch past which
doubling the batch no longer saves at least a third of the steps). The question for
mL-BFGS: do its curvature pairs help most at large batch, where the gradient noise is small?

Protocol, the same for every task, batch size and optimizer:

1. Budget: ``steps(B) = clip(examples / B, min_steps, max_steps)`` training steps with a
   linear warm-up (5%) and cosine decay to 0 (``scale.warmup_cosine``); the training loss
   is evaluated on a fixed subset of the training set (not the noisy mini-batch) and the
   held-out accuracy on the held-out split, every ``steps(B) / EVALS`` steps.
2. Learning rate: 4 peak learning rates half a decade apart, one seed (0). At the smallest
   batch the grid is the middle of the optimizer's grid in ``optimizers.py`` (its usual
   range); at each larger batch it is centred on the previous batch's best (one point below,
   two above), and extended by half a decade at an edge (at most twice). The best lr reaches
   the training-loss target in the fewest steps (none reached, or a tie: the lowest final
   training loss). The peak lr is a traced argument: one compiled step serves the grid.
3. Seeds: the best lr with seeds 0 (the tuning run), 1 and 2 (initialisation and data order).
   Per optimizer and batch: the median steps to the training-loss target and to the held-out
   target (a seed that never gets there counts as infinite), and the training seconds to
   target (compilation and evaluation excluded).
4. Critical batch size: from the median steps to the training-loss target over the batch
   sizes (see :func:`critical_batch`).

``--devices 8`` also trains ``mlbfgs_default`` at the largest batch of ``mnist1d_mlp`` (its
best lr from this run) on 8 fake CPU devices in a subprocess
(``--xla_force_host_platform_device_count=8``), mesh axis ``"x"``, batch sharded: ZeRO
(params replicated, ``mlbfgs(lr, blocks=EqualSlices(8), axis_name="x", mesh=mesh)``) against
the same optimizer on one device, and FSDP (every leaf sharded on an axis that divides; the
defaults follow the params' sharding) against the defaults on one device. Run::

    python -m examples.benchmarks.batch_scaling               # full run (~45 min, 2 CPU cores)
    python -m examples.benchmarks.batch_scaling --devices 8   # + the 8-device check
    python -m examples.benchmarks.batch_scaling --quick       # smoke run (< 1 minute), no files
    python -m examples.benchmarks.batch_scaling --quick --out /tmp/bs
    python -m examples.benchmarks.batch_scaling --report DIR/batch_scaling.json  # re-render
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples import datasets
from examples.benchmarks import harness, scale, tasks
from examples.benchmarks.compile_cost import _fsdp_spec
from examples.benchmarks.optimizers import LIB_DEFAULTS, SPEC_BY_NAME

OPTIMIZERS = ("sgd", "adamw", "muon", "mlbfgs_default", "mlbfgs_no_pairs_grid",
              "mlbfgs_paper", "mlbfgs_hvp")
BATCH_SIZES = (64, 256, 1024, 4096, 8192)
TASKS = ("mnist1d_mlp", "fmnist_mlp", "mnist1d_cnn")
GRID_POINTS = 4
MAX_EXTENSIONS = 1
SEEDS = (0, 1, 2)
EVALS = 30  # evaluations per run (the steps-to-target resolution)
SAVING = 1 / 3  # a doubling of the batch must save at least this share of the steps
DEVICES_TASK = "mnist1d_mlp"
DEFAULT_OUT = os.path.join(harness.DEFAULT_OUT, "batch_scaling")
# Steps before mlbfgs_default stores its first curvature pair.
PAIR_WARMUP = (LIB_DEFAULTS["pair_warmup"] if LIB_DEFAULTS["pair_warmup"] is not None
               else 1 / (1 - LIB_DEFAULTS["beta"]))
_PROGRESS = 10_000  # schedule resolution: the count is rescaled to 0.._PROGRESS
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class ScalingTask:
    """A task of ``tasks.py`` with this benchmark's targets and step budget.

    Attributes:
      task: data, model and loss.
      train_target: training loss (on ``train_eval`` examples of the training set) to reach.
      heldout_target: held-out accuracy to reach.
      examples: examples per run before clipping: ``steps(B) = examples / B``.
      min_steps, max_steps: the clip of ``steps(B)``.
      train_eval: size of the fixed training subset the training loss is measured on.
      skip: optimizers not run on this task, with the reason.
    """

    task: tasks.Task
    train_target: float
    heldout_target: float
    examples: int
    min_steps: int
    max_steps: int
    train_eval: int = 4096
    skip: tuple = ()

    def _clipped(self, batch: int) -> int:
        return min(self.max_steps, max(self.min_steps, self.examples // batch))

    def steps(self, batch: int) -> int:
        """The step budget at batch size ``batch``, a multiple of its evaluation period."""
        every = self.eval_every(batch)
        return every * max(1, self._clipped(batch) // every)

    def eval_every(self, batch: int) -> int:
        """Steps between evaluations: about ``EVALS`` per run."""
        return max(1, self._clipped(batch) // EVALS)


@functools.lru_cache(maxsize=2)
def _mnist1d(num_samples: int):
    return datasets.load_mnist1d(num_samples=num_samples)


def make_task(name: str, quick: bool = False) -> ScalingTask:
    """The benchmark's tasks (``quick``: tiny data and budgets for the smoke run)."""
    if name.startswith("mnist1d"):
        xtr, ytr, xte, yte = _mnist1d(2000 if quick else 40000)
        sub = f"MNIST-1D ({len(xtr)} train / {len(xte)} held out)"
        if name == "mnist1d_mlp":
            sizes = [40, 32, 10] if quick else [40, 100, 100, 10]
            task = _task(name, f"{sub}, MLP {'-'.join(map(str, sizes))}", (xtr, ytr, xte, yte),
                         tasks.mlp(sizes), muon=True)
            return _budget(task, quick, train_target=0.75, heldout_target=0.68,
                           examples=300_000, min_steps=200, max_steps=1500)
        if name == "mnist1d_cnn":
            task = _task(name, f"{sub}, 1-D CNN 3x[conv5 16ch stride 2]+dense",
                         (xtr[..., None], ytr, xte[..., None], yte),
                         tasks.cnn((40, 1), (16, 16, 16), 5))
            return _budget(task, quick, train_target=0.9, heldout_target=0.62,
                           examples=300_000, min_steps=120, max_steps=1500,
                           skip=(("mlbfgs_hvp", _TIME),))
    if name == "fmnist_mlp":
        base = tasks.make_task("fmnist_mlp", fmnist_train_subset=60000)
        data = (base.x_train, base.y_train, base.x_test, base.y_test)
        task = _task(name, f"Fashion-MNIST ({len(base.x_train)} train / {len(base.x_test)} "
                     "held out), MLP 784-64-10", data, tasks.mlp([784, 64, 10]), muon=True)
        return _budget(task, quick, train_target=0.45, heldout_target=0.83,
                       examples=300_000, min_steps=120, max_steps=1200,
                       skip=(("mlbfgs_hvp", _TIME),))
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")


_TIME = ("left out to fit the CPU time budget (a Hessian-vector product every T steps and "
         "one compilation per batch size)")


def _task(name: str, description: str, data: tuple, model: tuple, **kw) -> tasks.Task:
    """A :class:`tasks.Task` from ``data`` = (x_train, y_train, x_test, y_test) and
    ``model`` = (init, apply); its own budget and target fields are not used here."""
    return tasks.Task(name, description, *data, *model, batch_size=0, steps=0, quick_steps=0,
                      metric="acc", target=math.nan, **kw)


def _budget(task: tasks.Task, quick: bool, **kw) -> ScalingTask:
    if quick:
        kw.update(examples=2000, min_steps=8, max_steps=16, train_target=2.2,
                  heldout_target=0.2)
        return ScalingTask(task, train_eval=512, **kw)
    return ScalingTask(task, **kw)


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where params, optimizer state and batches live.

    ``place``: params -> placed params; ``init``: (tx, params) -> state; ``batch``: an
    array of the batch -> the same sharded; ``put``: a host array -> its replicated device
    array; ``context``: a context manager for tracing and running; ``pinned``: the step
    returns params and state with the shardings they came in with.
    """

    name: str
    place: Callable = lambda p: p
    init: Callable = lambda tx, p: tx.init(p)
    batch: Callable = lambda x: x
    put: Callable = jnp.asarray
    context: Callable = contextlib.nullcontext
    pinned: bool = False


SINGLE = Layout("single")


def mesh_layouts(mesh) -> dict[str, Layout]:
    """The ``zero`` and ``fsdp`` layouts on a one-axis mesh named ``"x"`` (Auto axes), as
    ``compile_cost.py`` places them."""
    n = mesh.size
    replicated = NamedSharding(mesh, P())
    put = functools.partial(jax.device_put, device=replicated)

    def on_mesh(state):  # optax's counters start uncommitted, on one device
        return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else put(x),
                            state)

    def zero_init(tx, params):
        with jax.set_mesh(mesh):
            return on_mesh(tx.init(params))

    batch = lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P("x", *(None,) * (x.ndim - 1))))
    ctx = lambda: jax.set_mesh(mesh)
    return {
        "zero": Layout("zero", place=put, init=zero_init, batch=batch, put=put, context=ctx,
                       pinned=True),
        "fsdp": Layout("fsdp", place=lambda p: jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, _fsdp_spec(x, n))), p),
            init=lambda tx, p: on_mesh(tx.init(p)), batch=batch, put=put, context=ctx,
            pinned=True),
    }


# ----------------------------------------------------------------------------- training


def steps_to_target(steps: Sequence[int], values: Sequence[float], target: float,
                    below: bool = True) -> int | None:
    """The first evaluated step whose value is at or below ``target`` (at or above with
    ``below=False``); None if never."""
    for s, v in zip(steps, values):
        if math.isfinite(v) and (v <= target if below else v >= target):
            return s
    return None


def progress_schedule(lr, total):
    """``scale.warmup_cosine(lr, total)`` with ``total`` (like ``lr``) traced: one compiled
    update serves every batch size's budget."""
    base = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, int(scale.WARMUP_FRACTION * _PROGRESS), _PROGRESS, 0.0)
    return lambda count: lr * base(count * _PROGRESS / total)


def make_update(task: tasks.Task, make: Callable, uses_grad_fn: bool = False,
                out_shardings: Any = None) -> Callable:
    """The jitted ``(g, state, params, lr, total, batch) -> (params, state)`` of optimizer
    ``make`` (``lr_schedule -> optax transformation``); ``batch`` (the mini-batch, for the
    gradient function of Hessian-vector pairs) is None unless ``uses_grad_fn``. Its
    compilation does not depend on the batch size unless ``uses_grad_fn``."""

    def update(g, state, params, lr, total, batch):
        extra = {"grad_fn": harness.batch_grad_fn(task, *batch)} if uses_grad_fn else {}
        u, state = make(progress_schedule(lr, total)).update(g, state, params, **extra)
        return optax.apply_updates(params, u), state

    return jax.jit(update, out_shardings=out_shardings)


class Runner:
    """One optimizer on one task at one batch size, peak lr traced.

    Two programs per step: the mini-batch gradient (compiled per batch size) and the
    optimizer update (``make_update``; pass one to share it across batch sizes).
    """

    def __init__(self, st: ScalingTask, make: Callable, batch: int,
                 uses_grad_fn: bool = False, layout: Layout = SINGLE,
                 update: Callable | None = None):
        """``make``: ``lr_schedule -> optax transformation``; ``update``: its
        ``make_update`` (built here when None, pinned to the layout's shardings)."""
        task = st.task
        self.st, self.batch, self.layout = st, batch, layout
        self.steps, self.eval_every = st.steps(batch), st.eval_every(batch)
        self._total = jnp.float32(self.steps)
        self._tx0 = make(progress_schedule(0.0, 1.0))
        with layout.context():
            self.x, self.y = layout.put(task.x_train), layout.put(task.y_train)
            self.x_tr, self.y_tr = (layout.put(a[: st.train_eval])
                                    for a in (task.x_train, task.y_train))
            self.x_te, self.y_te = layout.put(task.x_test), layout.put(task.y_test)

        def grad(params, x, y, idx):
            xb, yb = layout.batch(x[idx]), layout.batch(y[idx])
            return jax.grad(task.loss)(params, xb, yb), ((xb, yb) if uses_grad_fn else None)

        def evaluate(params, x, y):
            acc = jnp.mean((jnp.argmax(task.apply(params, x), -1) == y).astype(jnp.float32))
            return task.loss(params, x, y), acc

        self._init_params = jax.jit(task.init)
        self._grad, self._eval = jax.jit(grad), jax.jit(evaluate)
        with layout.context():
            p0, s0 = self._init(0)
            if update is None:
                pinned = jax.tree.map(lambda a: a.sharding, (p0, s0)) if layout.pinned else None
                update = make_update(task, make, uses_grad_fn, pinned)
            self._update = update
            t0 = time.perf_counter()
            self._step(p0, s0, jnp.float32(0.0), self._index(np.zeros(batch, np.int32)))
            self.compile_seconds = time.perf_counter() - t0

    def _step(self, params, state, lr, idx):
        g, batch = self._grad(params, self.x, self.y, idx)
        return self._update(g, state, params, lr, self._total, batch)

    def _init(self, seed: int):
        params = self.layout.place(self._init_params(jax.random.key(seed)))
        return params, self.layout.init(self._tx0, params)

    def _index(self, idx: np.ndarray):
        return self.layout.put(np.asarray(idx, np.int32))

    def _order(self, seed: int) -> np.ndarray:
        """``(steps, batch)`` example indices: epochs of seeded permutations."""
        n = len(self.st.task.x_train)
        rng = np.random.default_rng(10_000 + seed)
        need = self.steps * self.batch
        order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
        return order[:need].reshape(self.steps, self.batch)

    def run(self, lr: float, seed: int) -> dict[str, Any]:
        """Trains from ``seed`` at peak ``lr``; the evaluated curves and summary numbers."""
        st = self.st
        with self.layout.context():
            params, state = self._init(seed)
            order = self._order(seed)
            hist: dict = {"step": [], "seconds": [], "train_loss": [], "test_loss": [],
                          "test_acc": []}

            def record(step, seconds):
                tl, _ = self._eval(params, self.x_tr, self.y_tr)
                hl, ha = self._eval(params, self.x_te, self.y_te)
                for k, v in zip(hist, (step, seconds, float(tl), float(hl), float(ha))):
                    hist[k].append(v)

            record(0, 0.0)
            seconds, lr32, diverged = 0.0, jnp.float32(lr), False
            for c in range(self.steps // self.eval_every):
                idxs = [self._index(i) for i in order[c * self.eval_every:
                                                      (c + 1) * self.eval_every]]
                jax.block_until_ready(idxs)
                t0 = time.perf_counter()
                for idx in idxs:
                    params, state = self._step(params, state, lr32, idx)
                jax.block_until_ready((params, state))
                seconds += time.perf_counter() - t0
                record((c + 1) * self.eval_every, seconds)
                if not math.isfinite(hist["train_loss"][-1]):
                    diverged = True
                    break
        return summarize_run(hist, st, lr, seed, diverged, self.steps)


def summarize_run(hist: dict, st: ScalingTask, lr: float, seed: int, diverged: bool,
                  steps: int) -> dict[str, Any]:
    """Steps and seconds to both targets, final values, per-step seconds."""
    tr = steps_to_target(hist["step"], hist["train_loss"], st.train_target)
    he = steps_to_target(hist["step"], hist["test_acc"], st.heldout_target, below=False)
    at = lambda s: None if s is None else hist["seconds"][hist["step"].index(s)]
    last = hist["step"][-1]
    return {"lr": lr, "seed": seed, "diverged": diverged, "curve": hist,
            "steps_to_train_target": tr, "steps_to_heldout_target": he,
            "seconds_to_train_target": at(tr), "seconds_to_heldout_target": at(he),
            "final_train_loss": hist["train_loss"][-1], "final_test_acc": hist["test_acc"][-1],
            "step_ms": 1e3 * hist["seconds"][-1] / last if last else None,
            "steps_run": last, "steps_budget": steps}


# ----------------------------------------------------------------------------- tuning


def _rank(run: dict) -> tuple:
    """Sort key of a grid run: fewest steps to the training target, then final loss."""
    steps = run["steps_to_train_target"]
    loss = run["final_train_loss"]
    return (math.inf if steps is None else steps, loss if math.isfinite(loss) else math.inf)


def _half_decade(lr: float, k: float) -> float:
    return float(f"{10 ** (round(2 * math.log10(lr)) / 2 + k / 2):.3g}")


def initial_grid(opt: str, previous_best: float | None) -> list[float]:
    """The grid at a batch size: the middle of the optimizer's grid at the smallest batch,
    else one point below and two above the previous batch's best."""
    if previous_best is None:
        spec = SPEC_BY_NAME[opt]  # an ablation is tuned on its base optimizer's grid
        g = spec.grid or SPEC_BY_NAME[spec.ablation_of].grid
        start = (len(g) - GRID_POINTS) // 2
        return list(g[start:start + GRID_POINTS])
    return [_half_decade(previous_best, k) for k in range(-1, GRID_POINTS - 1)]


def tune(runner: Runner, opt: str, previous_best: float | None, log: Callable) -> dict:
    """The grid runs (seed 0), extended at an edge; returns {lr: run} sorted by lr."""
    runs: dict[float, dict] = {}

    def try_lr(lr):
        r = runs[lr] = runner.run(lr, seed=SEEDS[0])
        log(f"    grid {opt} B={runner.batch} lr={lr:g}: steps {r['steps_to_train_target']} "
            f"final loss {r['final_train_loss']:.4f}")

    for lr in initial_grid(opt, previous_best):
        try_lr(lr)
    for _ in range(MAX_EXTENSIONS):
        lrs = sorted(runs)
        best = min(lrs, key=lambda k: _rank(runs[k]))
        if best not in (lrs[0], lrs[-1]):
            break
        try_lr(_half_decade(best, 1 if best == lrs[-1] else -1))
    return dict(sorted(runs.items()))


def summarize(runs: list[dict], grid: dict, runner: Runner) -> dict:
    """Per (task, batch, optimizer): medians and ranges over the seeds."""
    out: dict[str, Any] = {"lr": runs[0]["lr"], "seeds": len(runs),
                           "lr_at_grid_edge": runs[0]["lr"] in (min(grid), max(grid)),
                           "grid": {str(k): {"steps_to_train_target": v["steps_to_train_target"],
                                             "final_train_loss": v["final_train_loss"]}
                                    for k, v in grid.items()},
                           "steps_budget": runner.steps, "eval_every": runner.eval_every,
                           "compile_s": runner.compile_seconds,
                           "diverged": sum(r["diverged"] for r in runs),
                           "step_ms": float(np.median([r["step_ms"] for r in runs]))}
    for k in ("steps_to_train_target", "steps_to_heldout_target", "seconds_to_train_target",
              "seconds_to_heldout_target"):
        vals = [r[k] for r in runs]
        hit = [v for v in vals if v is not None]
        out[k] = scale._median_inf(vals)  # None (never reached) counts as +inf
        out[k + "_min"] = min(hit) if hit else None
        out[k + "_max"] = max(hit) if len(hit) == len(vals) else None  # None: a seed missed
        out[k + "_reached"] = len(hit)
    out["final_train_loss"] = float(np.median([r["final_train_loss"] for r in runs]))
    out["final_test_acc"] = float(np.median([r["final_test_acc"] for r in runs]))
    return out


def critical_batch(steps_by_batch: dict[int, float | None]) -> dict[str, Any]:
    """The critical batch size from ``{batch: steps to target}`` (None: not reached).

    Walking up the batch sizes, a step from ``B`` to ``B' = 2^k B`` pays when the steps
    fall to at most ``(1 - SAVING)^k`` of ``B``'s (at least a third saved per doubling).
    The critical batch is the first ``B`` whose step up does not pay (``bounded``); when
    every step pays it is at least the largest batch (``bounded`` False). A batch that
    does not reach the target cannot be critical; a step up to one that does not reach it
    does not pay. None when no batch reaches the target.
    """
    batches = sorted(steps_by_batch)
    reached = [b for b in batches if steps_by_batch[b] is not None]
    if not reached:
        return {"batch": None, "bounded": False}
    for lo, hi in itertools.pairwise(batches):
        s_lo, s_hi = steps_by_batch[lo], steps_by_batch[hi]
        if s_lo is None:
            continue
        doublings = math.log2(hi / lo)
        if s_hi is None or s_hi > s_lo * (1 - SAVING) ** doublings:
            return {"batch": lo, "bounded": True}
    return {"batch": reached[-1], "bounded": reached[-1] != batches[-1]}


def bench_task(st: ScalingTask, optimizers: Sequence[str], batches: Sequence[int],
               log: Callable, progress: Callable = lambda t: None) -> dict:
    """Every optimizer at every batch size: tuning, seeds, summaries, critical batches;
    ``progress(task result so far)`` after each optimizer."""
    task = st.task
    out: dict[str, Any] = {"name": task.name, "description": task.description,
                           "num_params": task.num_params, "train_target": st.train_target,
                           "heldout_target": st.heldout_target,
                           "train_eval": st.train_eval, "budget": {}, "results": {},
                           "critical_batch": {}, "critical_batch_heldout": {}, "left_out": {}}
    for opt in optimizers:
        spec = SPEC_BY_NAME[opt]
        if spec.only and not getattr(task, spec.only):
            out["left_out"][opt] = f"not applicable (needs {spec.only})"
            continue
        if opt in dict(st.skip):
            out["left_out"][opt] = dict(st.skip)[opt]
            continue
        previous, res = None, {}
        update = make_update(task, spec.make, spec.uses_grad_fn)
        for b in batches:
            t0 = time.perf_counter()
            runner = Runner(st, spec.make, b, spec.uses_grad_fn, update=update)
            grid = tune(runner, opt, previous, log)
            previous = min(grid, key=lambda k: _rank(grid[k]))
            runs = [grid[previous]] + [runner.run(previous, s) for s in SEEDS[1:]]
            res[str(b)] = {**summarize(runs, grid, runner), "runs": runs}
            out["budget"][str(b)] = {"steps": runner.steps, "eval_every": runner.eval_every}
            s = res[str(b)]
            log(f"  [{task.name}] {opt} B={b} lr={previous:g}: steps to train target "
                f"{s['steps_to_train_target']} ({s['steps_to_train_target_reached']}/"
                f"{len(runs)}), held-out {s['steps_to_heldout_target']}; "
                f"{time.perf_counter() - t0:.0f} s")
        out["results"][opt] = res
        for key, crit in (("steps_to_train_target", "critical_batch"),
                          ("steps_to_heldout_target", "critical_batch_heldout")):
            out[crit][opt] = critical_batch({int(b): r[key] for b, r in res.items()})
        progress(out)
    return out


# ----------------------------------------------------------------------------- devices


def devices_check(st: ScalingTask, batch: int, lr: float, n: int, log: Callable) -> dict:
    """ZeRO and FSDP on ``n`` devices against the same optimizer on one device (seed 0)."""
    import mlbfgs_optax

    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])
    layouts = mesh_layouts(mesh)
    slices = {"blocks": mlbfgs_optax.EqualSlices(n)}
    cases = {
        "single_slices": (SINGLE, lambda s: mlbfgs_optax.mlbfgs(s, **slices)),
        "zero": (layouts["zero"],
                 lambda s: mlbfgs_optax.mlbfgs(s, axis_name="x", mesh=mesh, **slices)),
        "single_default": (SINGLE, lambda s: mlbfgs_optax.mlbfgs(s)),
        "fsdp": (layouts["fsdp"], lambda s: mlbfgs_optax.mlbfgs(s)),
    }
    out = {"devices": n, "batch": batch, "lr": lr, "task": st.task.name, "runs": {}}
    for name, (layout, make) in cases.items():
        r = Runner(st, make, batch, layout=layout).run(lr, seed=SEEDS[0])
        out["runs"][name] = r
        log(f"  [devices] {name}: steps to train target {r['steps_to_train_target']}, "
            f"held-out {r['steps_to_heldout_target']}, final loss {r['final_train_loss']:.5f}")
    for sharded, ref in (("zero", "single_slices"), ("fsdp", "single_default")):
        a, b = (np.asarray(out["runs"][k]["curve"]["train_loss"]) for k in (sharded, ref))
        out[f"{sharded}_max_rel_diff"] = float(np.max(np.abs(a - b) / np.abs(b)))
    return out


def devices_subprocess(n: int, batch: int, lr: float, quick: bool) -> dict:
    """:func:`devices_check` in a child process with ``n`` fake CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={n}")
    env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "devices.json")
        cmd = [sys.executable, "-m", "examples.benchmarks.batch_scaling", "--devices-worker",
               path, "--devices", str(n), "--devices-batch", str(batch), "--devices-lr",
               str(lr)] + (["--quick"] if quick else [])
        subprocess.run(cmd, env=env, cwd=_ROOT, check=True)
        with open(path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- report


def _fmt(v, digits=0) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _range(s: dict, key: str) -> str:
    lo, hi = s[key + "_min"], s[key + "_max"]
    if s[key] is None:
        return f"not reached ({s[key + '_reached']}/{s['seeds']})"
    spread = f"{lo:.0f}–{hi:.0f}" if hi is not None else f"{lo:.0f}–∞"
    return f"{s[key]:.0f} ({spread})"


def _crit(c: dict) -> str:
    if c["batch"] is None:
        return "– (target not reached)"
    return f"{c['batch']}" if c["bounded"] else f"≥ {c['batch']}"


def _ratio(res: dict, a: str, b: str, batch: int) -> str:
    """Median steps to the training-loss target of ``a`` over ``b``'s at ``batch``."""
    sa, sb = (res.get(o, {}).get(str(batch)) for o in (a, b))
    if sa is None or sb is None:
        return "– (not run)"
    x, y = sa["steps_to_train_target"], sb["steps_to_train_target"]
    if x is None or y is None:
        return "– (neither reached)" if x is None and y is None else (
            f"∞ (only {b} reached)" if x is None else f"0 (only {a} reached)")
    return f"{x / y:.2f}"


def markdown(result: dict) -> str:
    """The report: protocol, one table per task, critical batches, what the pairs add."""
    cfg = result["config"]
    lines = [
        "# Batch-size scaling: steps to target against batch size", "",
        "After Shallue et al. 2018 (arXiv 1811.03600). Measured on CPU only: "
        f"{cfg['machine']}; jax {cfg['jax']}, optax {cfg['optax']}; {cfg['library']}.",
        f"Mode: {'quick' if cfg['quick'] else 'full'}; total wall time "
        f"{result.get('total_seconds', 0):.0f} s.", "",
        "## Protocol", "",
        *([f"- Research variant: at least {cfg['min_steps']} steps at every batch size."]
          if cfg.get("min_steps") else []),
        *([f"- Research variant: training-loss targets {', '.join(f'{k} {v:g}' for k, v in cfg['train_targets'].items())}."]
          if cfg.get("train_targets") else []),
        f"- Batch sizes {', '.join(map(str, cfg['batches']))}; budget steps(B) = "
        "clip(examples / B, min, max) per task, warm-up 5% + cosine decay to 0.",
        f"- Per batch and optimizer: {GRID_POINTS} peak learning rates half a decade apart "
        "(smallest batch: the middle of the optimizer's usual grid; larger batches: one point "
        "below and two above the previous batch's best), extended at an edge (at most "
        f"{MAX_EXTENSIONS}x), seed 0; best = fewest steps to the training-loss target (none or "
        f"tie: lowest final training loss). Then seeds {', '.join(map(str, SEEDS))} at the best "
        "lr (seed 0 is the tuning run).",
        "- Training loss measured on a fixed subset of the training set, held-out accuracy on "
        f"the held-out split, {EVALS} evaluations per run; seconds count training only.",
        "- Steps to target: median over seeds (a seed that never gets there counts as "
        "infinite), (min–max over seeds; ∞ when a seed missed). Critical batch: the first "
        "batch past which the next (2^k times larger) batch does not cut the steps to the "
        "training-loss target to at most (2/3)^k; ≥ B when every step up pays.",
        "- Steps are read at the evaluations (every budget/30 steps, see each task's budget), "
        "so a ratio between neighbouring batch sizes carries that resolution: where a small "
        "batch reaches the target early in a long budget, its critical batch can read low.",
        "- The schedule decays over each batch size's budget, so steps to target are tied to "
        "that budget: where the budget is the floor (min steps), the step count a batch needs "
        "can be lower than measured here.",
        "- One compiled optimizer update per task and optimizer serves every lr and batch size "
        "(peak lr and budget are traced); compilation is never timed.",
        f"- Optimizers: {', '.join(cfg['optimizers'])}."
        + (f" Left out: {cfg['left_out']}" if cfg.get("left_out") else ""), "",
        "## Summary", ""] + [_summary_line(t) for t in result["tasks"].values()] + [""]
    for t in result["tasks"].values():
        lines += _task_md(t)
    if result.get("devices"):
        lines += _devices_md(result["devices"])
    return "\n".join(lines) + "\n"


def _summary_line(t: dict) -> str:
    """Critical batches and, at the largest batch, what the pairs add, for one task."""
    crit = ", ".join(f"{o} {_crit(c)}" for o, c in t["critical_batch"].items())
    res = t["results"]
    big = max((int(b) for r in res.values() for b in r), default=None)
    pairs = (f" At batch {big}, steps of mlbfgs_default over mlbfgs_no_pairs_grid: "
             f"{_ratio(res, 'mlbfgs_default', 'mlbfgs_no_pairs_grid', big)}; over adamw: "
             f"{_ratio(res, 'mlbfgs_default', 'adamw', big)}.") if big else ""
    return f"- {t['name']}: critical batch (training-loss target): {crit}.{pairs}"


def _task_md(t: dict) -> list[str]:
    budget = ", ".join(f"B={b}: {v['steps']} steps (eval every {v['eval_every']})"
                       for b, v in t["budget"].items())
    lines = [f"## {t['name']}", "", f"{t['description']}; {t['num_params']} parameters. "
             f"Targets: training loss ≤ {t['train_target']} (on {t['train_eval']} training "
             f"examples), held-out accuracy ≥ {t['heldout_target']}. Budget: {budget}."
             + "".join(f" Left out: {o}, {why}." for o, why in t.get("left_out", {}).items()),
             "",
             "| batch | optimizer | steps to train target | steps to held-out target | "
             "s to train target | best lr | final train loss |",
             "|---|---|---|---|---|---|---|"]
    batches = sorted({int(b) for r in t["results"].values() for b in r})
    for b in batches:
        for opt, res in t["results"].items():
            s = res.get(str(b))
            if s is None:
                continue
            edge = " (edge)" if s["lr_at_grid_edge"] else ""
            div = f", {s['diverged']} diverged" if s["diverged"] else ""
            lines.append(f"| {b} | {opt} | {_range(s, 'steps_to_train_target')} | "
                         f"{_range(s, 'steps_to_heldout_target')} | "
                         f"{_fmt(s['seconds_to_train_target'], 2)} | {s['lr']:g}{edge} | "
                         f"{s['final_train_loss']:.4f}{div} |")
    lines += ["", "Critical batch size (training-loss target; held-out target):", "",
              "| optimizer | critical batch (train) | critical batch (held-out) |",
              "|---|---|---|"]
    for opt in t["results"]:
        lines.append(f"| {opt} | {_crit(t['critical_batch'][opt])} | "
                     f"{_crit(t['critical_batch_heldout'][opt])} |")
    lines += ["", "What the pairs add (median steps to the training-loss target, and median "
              "final training loss at the end of the budget; < 1: mlbfgs_default is ahead). "
              f"mlbfgs_default stores its first pair after {PAIR_WARMUP:.0f} steps (pair_warmup "
              "= 1/(1-beta)); until then it runs the same chain as mlbfgs_no_pairs_grid, so "
              "where both reach the target sooner at the same lr their steps are equal.", "",
              "| batch | steps: mlbfgs_default / mlbfgs_no_pairs_grid | steps: mlbfgs_default / "
              "adamw | final loss: mlbfgs_default / mlbfgs_no_pairs_grid |",
              "|---|---|---|---|"]
    res = t["results"]
    for b in batches:
        lines.append(f"| {b} | {_ratio(res, 'mlbfgs_default', 'mlbfgs_no_pairs_grid', b)} | "
                     f"{_ratio(res, 'mlbfgs_default', 'adamw', b)} | "
                     f"{_loss_ratio(res, 'mlbfgs_default', 'mlbfgs_no_pairs_grid', b)} |")
    return lines + [""]


def _loss_ratio(res: dict, a: str, b: str, batch: int) -> str:
    """Median final training loss of ``a`` over ``b``'s at ``batch``."""
    sa, sb = (res.get(o, {}).get(str(batch)) for o in (a, b))
    if sa is None or sb is None:
        return "– (not run)"
    return f"{sa['final_train_loss'] / sb['final_train_loss']:.3f}"


def _devices_md(d: dict) -> list[str]:
    lines = [f"## Data-parallel layouts on {d['devices']} fake CPU devices", "",
             f"{d['task']}, batch {d['batch']}, mlbfgs at lr {d['lr']:g}, seed 0. Fake devices "
             "share the CPU cores: this checks the numbers, not a speed-up.", "",
             "| run | steps to train target | steps to held-out target | final train loss |",
             "|---|---|---|---|"]
    for name, r in d["runs"].items():
        lines.append(f"| {name} | {_fmt(r['steps_to_train_target'])} | "
                     f"{_fmt(r['steps_to_heldout_target'])} | {r['final_train_loss']:.5f} |")
    lines += ["", f"Largest relative difference of the training-loss curves: ZeRO against "
              f"one device with the same EqualSlices({d['devices']}) blocks "
              f"{d['zero_max_rel_diff']:.2e}; FSDP against the defaults on one device "
              f"{d['fsdp_max_rel_diff']:.2e}.", ""]
    return lines


def plot(result: dict, path: str) -> None:
    """Log-log steps to the training-loss target against batch size, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = list(result["tasks"].values())
    fig, axes = plt.subplots(1, len(ts), figsize=(5 * len(ts), 4.2), squeeze=False)
    for ax, t in zip(axes[0], ts):
        firsts = []
        for opt, res in t["results"].items():
            pts = [(int(b), s["steps_to_train_target"]) for b, s in res.items()
                   if s["steps_to_train_target"] is not None]
            if pts:
                color = f"C{OPTIMIZERS.index(opt)}" if opt in OPTIMIZERS else None
                ax.plot(*zip(*pts), marker="o", label=opt, color=color)
                firsts.append(pts[0])
        if firsts:
            b0, s0 = min(firsts, key=lambda p: (p[0], p[1]))
            bs = np.array(sorted({int(b) for r in t["results"].values() for b in r}))
            ax.plot(bs, s0 * b0 / bs, "k--", lw=0.8, label="perfect scaling (slope -1)")
        ax.set(xscale="log", yscale="log", xlabel="batch size",
               ylabel=f"steps to train loss ≤ {t['train_target']}", title=t["name"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(out: str, result: dict) -> None:
    harness.write_report(out, "batch_scaling", result, markdown(result))
    plot(result, os.path.join(out, "batch_scaling.png"))


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny data, 2 batch sizes, 2 optimizers; no files unless --out")
    p.add_argument("--out", default=None, help=f"output folder (full run: {DEFAULT_OUT})")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--optimizers", nargs="+", default=None)
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--devices", type=int, default=0,
                   help="also run the data-parallel layouts check on this many fake devices")
    p.add_argument("--devices-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--devices-lr", type=float, default=None,
                   help="the check's lr (default: mlbfgs_default's best at that batch)")
    p.add_argument("--devices-worker", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--report", metavar="JSON", help="re-render the md and plot from a json")
    p.add_argument("--min-steps", type=int, default=None,
                   help="research variant: at least this many steps at every batch size")
    p.add_argument("--train-target", nargs="+", default=(), metavar="TASK=LOSS",
                   help="research variant: another training-loss target for a task")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"research variant: seeds 0 .. N-1 at the best lr (default {len(SEEDS)})")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    global SEEDS
    args = _parser().parse_args(argv)
    if args.seeds:
        SEEDS = tuple(range(args.seeds))
    log = lambda s: print(s, flush=True)
    if args.devices_worker:  # child process of devices_subprocess
        d = devices_check(make_task(DEVICES_TASK, args.quick), args.devices_batch,
                          args.devices_lr, args.devices, log)
        with open(args.devices_worker, "w") as f:
            json.dump(d, f)
        return d
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        write(args.out or os.path.dirname(args.report), result)
        return result
    out = args.out or (None if args.quick else DEFAULT_OUT)
    names = args.tasks or (["mnist1d_mlp"] if args.quick else list(TASKS))
    opts = args.optimizers or (["adamw", "mlbfgs_default"] if args.quick else list(OPTIMIZERS))
    batches = args.batches or ([32, 128] if args.quick else list(BATCH_SIZES))
    targets = {k: float(v) for k, v in (t.split("=", 1) for t in args.train_target)}
    t_start = time.perf_counter()
    result: dict[str, Any] = {"config": {
        "quick": args.quick, "batches": batches, "optimizers": opts, "seeds": list(SEEDS),
        "min_steps": args.min_steps, "train_targets": targets,
        "grid_points": GRID_POINTS, "evals": EVALS, "library": harness.library_version(),
        "machine": harness.machine(), "jax": jax.__version__, "optax": optax.__version__,
        "left_out": ", ".join(o for o in OPTIMIZERS if o not in opts)}, "tasks": {}}
    for name in names:
        st = make_task(name, args.quick)
        if args.min_steps:
            st = dataclasses.replace(st, min_steps=max(st.min_steps, args.min_steps),
                                     max_steps=max(st.max_steps, args.min_steps))
        if name in targets:
            st = dataclasses.replace(st, train_target=targets[name])
        log(f"[{name}] {st.task.description}; {st.task.num_params} params")

        def progress(task_result, name=name):  # a run cut short still leaves its results
            result["tasks"][name] = task_result
            result["total_seconds"] = time.perf_counter() - t_start
            if out:
                write(out, result)

        bench_task(st, opts, batches, log, progress)
    if args.devices:
        batch = args.devices_batch or batches[-1]
        lr = args.devices_lr or result["tasks"][DEVICES_TASK]["results"]["mlbfgs_default"][
            str(batch)]["lr"]
        result["devices"] = devices_subprocess(args.devices, batch, lr, args.quick)
    result["total_seconds"] = time.perf_counter() - t_start
    if out:
        write(out, result)
    return result


if __name__ == "__main__":
    main()
