"""Training harness shared by every optimizer: one jitted chunk of steps, timing helpers.

A run is a sequence of *chunks*: ``lax.scan`` over ``eval_every`` training steps, all
compiled once per (task, optimizer) ahead of time, with the peak learning rate as a
traced argument. Seconds count only the training chunks (``block_until_ready`` after
each), never compilation or evaluation.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.benchmarks.tasks import Task

DEFAULT_OUT = os.path.join("examples", "benchmarks", "results")


def cosine(lr, total_steps):
    """Cosine decay from ``lr`` to 0 over ``total_steps`` (``lr`` may be traced)."""
    base = optax.cosine_decay_schedule(1.0, total_steps)
    return lambda count: lr * base(count)


def batch_grad_fn(task: Task, x, y) -> Callable:
    """``params -> gradient of task.loss on (x, y)``: the ``grad_fn`` that optimizers with
    Hessian-vector pairs (``OptSpec.uses_grad_fn``) take in ``update``."""
    return lambda params: jax.grad(task.loss)(params, x, y)


class Trainer:
    """Compiles and runs one optimizer on one task."""

    def __init__(self, task: Task, make: Callable, steps: int, eval_every: int,
                 uses_grad_fn: bool = False):
        """``uses_grad_fn``: pass ``grad_fn`` (the batch's gradient function) to ``update``."""
        self.task, self.make, self.steps, self.eval_every = task, make, steps, eval_every
        self.x_train = jnp.asarray(task.x_train)
        self.y_train = jnp.asarray(task.y_train)
        self.x_test = jnp.asarray(task.x_test)
        self.y_test = jnp.asarray(task.y_test)
        steps_total = steps

        def opt(lr):
            return make(cosine(lr, steps_total))

        def init(key):
            params = task.init(key)
            return params, opt(jnp.float32(0.0)).init(params)

        def chunk(params, opt_state, lr, x, y, idx):
            tx = opt(lr)

            def step(carry, batch_idx):
                p, s = carry
                xb, yb = x[batch_idx], y[batch_idx]
                loss, g = jax.value_and_grad(task.loss)(p, xb, yb)
                extra = {"grad_fn": batch_grad_fn(task, xb, yb)} if uses_grad_fn else {}
                u, s = tx.update(g, s, p, **extra)
                return (optax.apply_updates(p, u), s), loss

            (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx)
            return params, opt_state, losses

        def evaluate(params, x, y):
            logits = task.apply(params, x)
            loss = task.loss(params, x, y)
            acc = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
            return loss, acc

        self._init = jax.jit(init)
        key = jax.random.key(0)
        p0, s0 = jax.eval_shape(init, key)
        idx_shape = jax.ShapeDtypeStruct((eval_every, task.batch_size), jnp.int32)
        lr_shape = jax.ShapeDtypeStruct((), jnp.float32)
        t0 = time.perf_counter()
        self._chunk = jax.jit(chunk).lower(p0, s0, lr_shape, self.x_train, self.y_train,
                                           idx_shape).compile()
        self.compile_seconds = time.perf_counter() - t0
        self._eval = jax.jit(evaluate)

    def run(self, lr: float, seed: int) -> dict[str, Any]:
        """Trains from seed ``seed``; returns the history (lists) and summary numbers."""
        task, n = self.task, len(self.task.x_train)
        params, opt_state = self._init(jax.random.key(seed))
        rng = np.random.default_rng(seed)
        num_chunks = self.steps // self.eval_every
        order = np.concatenate([rng.permutation(n) for _ in range(
            -(-num_chunks * self.eval_every * task.batch_size // n))])
        order = order[: num_chunks * self.eval_every * task.batch_size].astype(np.int32)
        order = order.reshape(num_chunks, self.eval_every, task.batch_size)
        hist = new_history()

        def record(step, seconds, train_loss):
            record_eval(hist, self._eval(params, self.x_test, self.y_test), step, seconds,
                        train_loss)

        record(0, 0.0, float("nan"))
        seconds, chunk_times, diverged = 0.0, [], False
        for c in range(num_chunks):
            idx = jnp.asarray(order[c])
            t0 = time.perf_counter()
            params, opt_state, losses = self._chunk(params, opt_state, jnp.float32(lr),
                                                    self.x_train, self.y_train, idx)
            jax.block_until_ready((params, opt_state, losses))
            dt = time.perf_counter() - t0
            seconds += dt
            chunk_times.append(dt)
            record((c + 1) * self.eval_every, seconds, float(jnp.mean(losses)))
            if not np.isfinite(hist["test_loss"][-1]):
                diverged = True
                break
        return summarize(task, hist, chunk_times, self.eval_every, diverged)


def new_history() -> dict:
    """An empty training history: one list per logged quantity."""
    return {"step": [], "seconds": [], "train_loss": [], "test_loss": [], "test_acc": []}


def record_eval(hist: dict, test_loss_acc, step, seconds, train_loss) -> None:
    """Appends one evaluation (``test_loss_acc`` = (loss, accuracy)) to ``hist``."""
    loss, acc = test_loss_acc
    hist["step"].append(step)
    hist["seconds"].append(seconds)
    hist["train_loss"].append(train_loss)
    hist["test_loss"].append(float(loss))
    hist["test_acc"].append(float(acc))


def summarize(task: Task, hist, chunk_times, steps_per_chunk, diverged):
    """Adds the objective gap (logistic task), time/steps to target and final metrics."""
    out = dict(hist)
    if task.fstar is not None:
        out["gap"] = [v - task.fstar for v in hist["test_loss"]]
    if task.metric == "acc":
        hit = [i for i, a in enumerate(hist["test_acc"]) if a >= task.target]
    else:
        hit = [i for i, g in enumerate(out["gap"]) if g <= task.target]
    first = hit[0] if hit else None
    out["steps_to_target"] = hist["step"][first] if first is not None else None
    out["seconds_to_target"] = hist["seconds"][first] if first is not None else None
    out["final_test_acc"] = hist["test_acc"][-1]
    out["final_test_loss"] = hist["test_loss"][-1]
    if task.fstar is not None:
        out["final_gap"] = out["gap"][-1]
    # Per-step time: median over chunks (the first chunk included; it is compiled already).
    out["step_seconds"] = float(np.median(chunk_times)) / steps_per_chunk if chunk_times else None
    out["diverged"] = diverged
    return out


# ----------------------------------------------------------------------------- update-only


def time_update(tx: optax.GradientTransformation, params, repeats: int = 20,
                donate: bool = True, grad_fn: Callable | None = None) -> dict[str, float]:
    """Median seconds of the jitted ``tx.update(g, state, params)`` alone.

    With ``grad_fn`` it is passed to ``update`` (Hessian-vector-product pairs: their
    cost, one forward-over-reverse pass every T calls, is then part of the update).
    The state is donated (``donate_argnums=1``) unless ``donate=False``. The state is
    copied once after ``init`` because optax.scale_by_lbfgs aliases two zero buffers in
    its initial state, which donation rejects.
    """
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    extra = {} if grad_fn is None else {"grad_fn": grad_fn}
    upd = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra),
                  donate_argnums=(1,) if donate else ())
    state_bytes = mlbfgs_optax.state_nbytes(state)
    for _ in range(3):  # compile and warm up
        u, state = upd(grads, state, params)
        jax.block_until_ready((u, state))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        u, state = upd(grads, state, params)
        jax.block_until_ready((u, state))
        times.append(time.perf_counter() - t0)
    return {"seconds": float(np.median(times)), "state_bytes": state_bytes}


def measure_bandwidth(num_floats: int = 1 << 24, repeats: int = 10) -> float:
    """Bytes/s of a jitted y = a*x + y on float32 arrays (12 bytes moved per element)."""
    x = jnp.ones((num_floats,), jnp.float32)
    y = jnp.ones((num_floats,), jnp.float32)
    axpy = jax.jit(lambda a, x, y: a * x + y, donate_argnums=(2,))
    for _ in range(3):
        y = axpy(jnp.float32(1e-6), x, y)
    y.block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = axpy(jnp.float32(1e-6), x, y)
        y.block_until_ready()
        times.append(time.perf_counter() - t0)
    return 12.0 * num_floats / float(np.median(times))


# ----------------------------------------------------------------------------- reporting


def library_version() -> str:
    """``mlbfgs_optax <version> @ <commit>``, `` (modified)`` when ``mlbfgs_optax/`` has
    uncommitted changes; ``mlbfgs_optax <version>`` where git cannot tell."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(mlbfgs_optax.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "mlbfgs_optax"],
                               capture_output=True, text=True, check=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"mlbfgs_optax {mlbfgs_optax.__version__}"
    return f"mlbfgs_optax {mlbfgs_optax.__version__} @ {head}" + (" (modified)" if dirty else "")


def machine() -> str:
    """The machine, for the reports: architecture, CPU cores and jax's platform."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}"


def dense_params(layers) -> dict:
    """Float32 dense layers ``{"dense<i>": {"w": (n_in, n_out), "b": (n_out,)}}``.

    ``w`` is normal with standard deviation 0.02 (from ``jax.random.key(0)``), ``b`` zero:
    a stand-in pytree for timing optimizer updates.
    """
    keys = jax.random.split(jax.random.key(0), len(layers))
    return {f"dense{i}": {"w": jax.random.normal(k, s, jnp.float32) * 0.02,
                          "b": jnp.zeros((s[1],), jnp.float32)}
            for i, (k, s) in enumerate(zip(keys, layers))}


def write_report(out_dir: str, stem: str, result: dict, md: str) -> None:
    """Writes ``<stem>.json`` (``result``) and ``<stem>.md`` (``md``) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(md)
