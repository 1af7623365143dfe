"""Diagnostic: how much do the curvature pairs change the direction?

Trains a suite task with ``mlbfgs(lr)`` (the defaults, or Hessian-vector pairs) and, at
every ordinary step, computes the direction twice from the same state: with the stored
pairs (d) and with the history emptied (rho = 0: d0 = D g, what the chain does without
pairs). Reports, over the run, the median and 90th percentile of ||d - d0|| / ||d0||
(all blocks together) and of the cosine between d and d0, the mean damping weight tau
and the fraction of stored pairs whose raw curvature mu was clamped at sigma_low.

    python -m examples.benchmarks.research.pair_effect --task mnist1d_mlp --lr 0.01

``--scaling-task`` takes a task of ``batch_scaling.py`` instead (its larger data set),
trained at ``--batch`` for ``--steps`` with that benchmark's warm-up + cosine schedule:

    python -m examples.benchmarks.research.pair_effect --scaling-task mnist1d_mlp \
        --batch 8192 --steps 496 --lr 0.1
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.benchmarks import batch_scaling, scale
from examples.benchmarks.harness import batch_grad_fn, cosine
from examples.benchmarks.tasks import make_task
from examples.common import make_mlbfgs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="mnist1d_mlp")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--curvature", default="gradient_difference")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma_low", type=float, default=0.1)
    p.add_argument("--step_bound", type=float, default=3.0)
    p.add_argument("--scaling-task", default=None, help="a task of batch_scaling.py")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the task's)")
    args = p.parse_args()
    if args.scaling_task:
        scaling = batch_scaling.make_task(args.scaling_task)
        task = scaling.task
        batch = args.batch or 1024
        steps = args.steps or scaling.steps(batch)
        sched = scale.warmup_cosine(args.lr, steps)
        name = f"{args.scaling_task} (batch_scaling) batch {batch}"
    else:
        task = make_task(args.task)
        batch = args.batch or task.batch_size
        steps = args.steps or task.steps
        sched = cosine(args.lr, steps)
        name = f"{args.task} batch {batch}"
    kw = dict(curvature=args.curvature, sigma_low=args.sigma_low, step_bound=args.step_bound)
    tx = make_mlbfgs(sched, **kw)
    inner = mlbfgs_optax.scale_by_mlbfgs(learning_rate=sched, **kw)
    hvp = args.curvature != "gradient_difference"
    x, y = jnp.asarray(task.x_train), jnp.asarray(task.y_train)

    @jax.jit
    def step(params, state, idx):
        xb, yb = x[idx], y[idx]
        g = jax.grad(task.loss)(params, xb, yb)
        extra = {"grad_fn": batch_grad_fn(task, xb, yb)} if hvp else {}
        st = state[0]
        d, _ = inner.update(g, st, params, **extra)
        empty = st._replace(rho=jnp.zeros_like(st.rho), num_pairs=jnp.zeros_like(st.num_pairs))
        d0, _ = inner.update(g, empty, params, **extra)
        flat = lambda t: jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)])
        d, d0 = flat(d), flat(d0)
        rel = jnp.linalg.norm(d - d0) / jnp.linalg.norm(d0)
        cos = d @ d0 / (jnp.linalg.norm(d) * jnp.linalg.norm(d0))
        u, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, u), state, rel, cos

    params = task.init(jax.random.key(args.seed))
    state = tx.init(params)
    rng = np.random.default_rng(args.seed)
    rels, coss, taus, clamped = [], [], [], []  # clamped: raw mu of every pair step
    for t in range(steps):
        idx = jnp.asarray(rng.integers(0, len(task.x_train), batch))
        params, state, rel, cos = step(params, state, idx)
        st = state[0]
        if (t + 1) % 10 == 0 and t > 20:
            taus.append(np.asarray(st.tau))
            clamped.append(np.asarray(st.mu))
        elif t > 20:
            rels.append(float(rel))
            coss.append(float(cos))
    rels, coss, mus = np.asarray(rels), np.asarray(coss), np.concatenate(clamped)
    print(f"{name} lr {args.lr} {args.curvature}: ||d - d0||/||d0|| median "
          f"{np.median(rels):.3f}, p90 {np.percentile(rels, 90):.3f}; cos(d, d0) median "
          f"{np.median(coss):.3f}, p10 {np.percentile(coss, 10):.3f}; mean tau "
          f"{np.mean(taus):.3f}; raw mu <= sigma_low in {np.mean(mus <= args.sigma_low):.0%} "
          f"of pairs, its quantiles 10/50/90%: "
          f"{' / '.join(f'{v:.2g}' for v in np.percentile(mus, [10, 50, 90]))}; "
          f"pairs stored per block {np.asarray(state[0].num_pairs).tolist()}")


if __name__ == "__main__":
    main()
