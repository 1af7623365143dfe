"""K-FAC (kfac-jax) on the same tasks, data order and evaluation as the optax runs.

kfac-jax is not an optax transformation: ``kfac_jax.Optimizer`` stages (jits) its own
step, registers layers by tracing the loss, and picks learning rate, momentum and
damping itself (``use_adaptive_*=True``, its recommended mode), so it has no lr grid.
Its step is driven from Python once per step (it cannot go inside our ``lax.scan``
chunk), so its seconds include one Python dispatch per step.

Compatibility: kfac-jax 0.0.8 calls ``primitive.get_bind_params(params)`` expecting a
``(subfuns, params)`` tuple; in jax 0.10 it returns only the params dict, and K-FAC's
graph tracer fails with "ValueError: too many values to unpack (expected 2)".
:func:`_patch_kfac` replaces kfac-jax's one-line helper ``eval_jaxpr_eqn`` with one that
accepts both forms (the same thing ``jax.core.eval_jaxpr`` does in jax 0.10).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from examples.benchmarks.harness import new_history, record_eval, summarize
from examples.benchmarks.tasks import Task


def available() -> str | None:
    """None when kfac-jax imports, else the reason it does not."""
    try:
        import kfac_jax  # noqa: F401
    except Exception as e:  # ImportError or an incompatibility at import time
        return f"{type(e).__name__}: {e}"
    return None


def version() -> str:
    import kfac_jax

    return kfac_jax.__version__


def _patch_kfac():
    import jax.extend as jex
    from kfac_jax._src import tag_graph_matcher as tgm

    if getattr(tgm.eval_jaxpr_eqn, "_mlbfgs_patched", False):
        return

    def eval_jaxpr_eqn(eqn, in_values):
        bind = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
        with jex.source_info_util.user_context(eqn.source_info.traceback):
            out = eqn.primitive.bind(*subfuns, *in_values, **params)
        return out if isinstance(out, list) else [out]

    eval_jaxpr_eqn._mlbfgs_patched = True
    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn


class KfacTrainer:
    """Trains ``task`` with kfac_jax.Optimizer in adaptive mode."""

    def __init__(self, task: Task, steps: int, eval_every: int):
        import kfac_jax

        _patch_kfac()
        self.task, self.steps, self.eval_every = task, steps, eval_every

        def loss_fn(params, batch):
            x, y = batch
            logits = task.apply(params, x)
            kfac_jax.register_softmax_cross_entropy_loss(logits, y)
            return task.loss(params, x, y)

        self.optimizer = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn),
            l2_reg=0.0,
            use_adaptive_learning_rate=True,
            use_adaptive_momentum=True,
            use_adaptive_damping=True,
            initial_damping=1.0,
            num_burnin_steps=0,
            multi_device=False,
        )
        self.x_train = jnp.asarray(task.x_train)
        self.y_train = jnp.asarray(task.y_train)
        self.x_test = jnp.asarray(task.x_test)
        self.y_test = jnp.asarray(task.y_test)

        def evaluate(params, x, y):
            logits = task.apply(params, x)
            acc = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
            return task.loss(params, x, y), acc

        self._eval = jax.jit(evaluate)
        self._gather = jax.jit(lambda x, y, i: (x[i], y[i]))
        self.compile_seconds = None

    def run(self, seed: int):
        task, n = self.task, len(self.task.x_train)
        params = jax.jit(task.init)(jax.random.key(seed))
        rng = np.random.default_rng(seed)
        num_chunks = self.steps // self.eval_every
        total = num_chunks * self.eval_every
        order = np.concatenate([rng.permutation(n) for _ in range(
            -(-total * task.batch_size // n))])[: total * task.batch_size]
        order = order.astype(np.int32).reshape(total, task.batch_size)
        key = jax.random.key(seed + 1000)
        t0 = time.perf_counter()
        state = self.optimizer.init(params, key, self._gather(self.x_train, self.y_train,
                                                              jnp.asarray(order[0])))
        hist = new_history()

        def record(step, seconds, train_loss):
            record_eval(hist, self._eval(params, self.x_test, self.y_test), step, seconds,
                        train_loss)

        record(0, 0.0, float("nan"))
        seconds, chunk_times, diverged, step = 0.0, [], False, 0
        for c in range(num_chunks):
            losses = []
            t0 = time.perf_counter()
            for _ in range(self.eval_every):
                key, sub = jax.random.split(key)
                batch = self._gather(self.x_train, self.y_train, jnp.asarray(order[step]))
                params, state, stats = self.optimizer.step(
                    params, state, sub, batch=batch, global_step_int=step)
                losses.append(stats["loss"])
                step += 1
                if step == 1:  # the first step compiles: leave it out of the clock
                    jax.block_until_ready(params)
                    t0 = time.perf_counter()
            jax.block_until_ready((params, losses))
            dt = time.perf_counter() - t0
            seconds += dt
            chunk_times.append(dt / (self.eval_every - (c == 0)) * self.eval_every)
            record(step, seconds, float(np.mean([float(v) for v in losses])))
            if not np.isfinite(hist["test_loss"][-1]):
                diverged = True
                break
        return summarize(task, hist, chunk_times, self.eval_every, diverged)
