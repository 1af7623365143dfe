"""What the curvature pairs do, phase by phase of a warm-up + cosine schedule.

One run of the mL-BFGS defaults on a task of ``final_loss.py`` at a given peak lr. At
every step the optimizer's direction is compared with the direction the same state gives
without its pairs (every slot marked empty, ``rho = 0``: the chain's step, ``D g``):
the ratio of their norms (how much the pairs lengthen the step), their cosine, and whether
the step bound cut the direction. At every pair step the library's curvature statistics
(:func:`mlbfgs_optax.curvature_stats`) give the raw Rayleigh quotient ``mu`` of every
block's candidate and its damping weight ``tau``; the pair's own angle is
``cos(s, y_hat)`` of the newest stored pair. Reported per tenth of the schedule, medians
over the steps and blocks. Run from the repository root::

    python -m examples.benchmarks.research.pairs_diagnostics --task teacher_mlp --lr 0.0316 \
        --pair-form full --sigma-low 0.1 --out DIR

writes ``DIR/diagnostics_<task>_<pair form>_<sigma_low>.md``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.benchmarks.research import final_loss


def run(task_name: str, lr: float, seed: int = 0, phases: int = 10, **kw) -> list[dict]:
    build, steps = final_loss.TASKS[task_name]
    task = build()
    base = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, int(final_loss.WARMUP * steps)),
                                              steps, 0.0)
    sched = lambda c: lr * base(c)
    inner = mlbfgs_optax.scale_by_mlbfgs(learning_rate=sched, **kw)
    x, y = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
    n, bs = x.shape[0], task.batch_size
    key = jax.random.key(seed)
    params = task.init(jax.random.fold_in(key, 1))
    state = inner.init(params)
    mom = optax.ema(0.9, debias=True)  # the defaults' momentum; direction stats are
    mstate = mom.init(params)  # taken before it

    def norms(a):
        return jnp.sqrt(sum(jnp.vdot(v, v) for v in jax.tree.leaves(a)))

    @jax.jit
    def step(params, state, mstate, k):
        idx = (jnp.arange(n) if bs >= n
               else jax.random.randint(jax.random.fold_in(key, k), (bs,), 0, n))
        loss, g = jax.value_and_grad(task.loss)(params, x[idx], y[idx])
        d, new = inner.update(g, state, params)
        st = mlbfgs_optax.find_mlbfgs_state(new)
        d0, _ = inner.update(g, state._replace(rho=jnp.zeros_like(state.rho)), params)
        dots = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(d0)))
        nd, nd0 = norms(d), norms(d0)
        u, mstate = mom.update(d, mstate)
        u = jax.tree.map(lambda v: -sched(state.count) * v, u)
        # cos(s, y_hat) of every block's newest pair
        lay = new.layout
        s = [lay.gather_slot(h, st.newest, j) for j, h in enumerate(st.s_history)]
        yh = [lay.gather_slot(h, st.newest, j) for j, h in enumerate(st.y_history)]
        ss, sy, yy = lay.block_dots([(s, s), (s, yh), (yh, yh)], jnp.float32)
        cos_sy = sy / jnp.sqrt(ss * yy + 1e-30)
        return (optax.apply_updates(params, u), new, mstate, loss,
                nd / nd0, dots / (nd * nd0 + 1e-30), cos_sy)

    rows, per = [], steps // phases
    rec = {k: [] for k in ("ratio", "cos", "mu", "tau", "cos_sy", "loss", "pairs")}
    for k in range(steps):
        params, state, mstate, loss, ratio, cos, cos_sy = step(params, state, mstate, k + 2)
        rec["ratio"].append(float(ratio))
        rec["cos"].append(float(cos))
        rec["loss"].append(float(loss))
        if (k + 1) % 10 == 0:
            stats = mlbfgs_optax.curvature_stats(state)
            if stats["num_pairs"].max() > 0:
                rec["mu"].extend(stats["mu"].tolist())
                rec["tau"].extend(stats["tau"].tolist())
                rec["cos_sy"].extend(np.asarray(cos_sy).tolist())
            rec["pairs"].append(float(stats["num_pairs"].mean()))
        if (k + 1) % per == 0:
            med = lambda v: float(np.median(v)) if len(v) else float("nan")
            rows.append({"phase": f"{k + 1 - per}-{k + 1}", "lr": float(sched(k)),
                         "loss": med(rec["loss"]), "norm_ratio": med(rec["ratio"]),
                         "norm_ratio_max": float(np.max(rec["ratio"])),
                         "cos_chain": med(rec["cos"]), "mu": med(rec["mu"]),
                         "clamped": (float(np.mean(np.asarray(rec["mu"]) < kw.get(
                             "sigma_low", 0.1))) if rec["mu"] else float("nan")),
                         "tau": med(rec["tau"]), "cos_s_yhat": med(rec["cos_sy"])})
            rec = {k2: [] for k2 in rec}
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="mnist1d_mlp")
    p.add_argument("--lr", type=float, default=0.0316)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pair-form", default="full")
    p.add_argument("--sigma-low", type=float, default=0.1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = run(args.task, args.lr, args.seed, pair_form=args.pair_form,
               sigma_low=args.sigma_low)
    cols = list(rows[0])
    lines = [f"{args.task}, peak lr {args.lr:g}, seed {args.seed}, pair_form="
             f"'{args.pair_form}', sigma_low={args.sigma_low:g}, the other defaults. Per tenth "
             "of the schedule: lr at its end, median minibatch loss, median and largest "
             "norm ratio of the direction to the chain's (same state, pairs marked empty), "
             "median cosine to it; median raw mu of the candidates, the share below "
             "sigma_low, median tau, median cos(s, y_hat) of the newest stored pairs.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.3g}"
                                       for v in r.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        name = f"diagnostics_{args.task}_{args.pair_form}_{args.sigma_low:g}.md"
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
