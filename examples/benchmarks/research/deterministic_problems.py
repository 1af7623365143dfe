"""Hessian-vector-product pairs (and other variants) on the deterministic problems.

Rosenbrock from (0, 0) and a condition-1e4 quadratic (n = 100), float32, 50,000 steps of
a cosine decay from the peak lr, the same half-decade grids as the ablation that chose the defaults
(``defaults_ablation.md``: Rosenbrock 10^-7 .. 10^0.5, quadratic 10^-6 .. 10^1.5), one run
per lr (the problems are deterministic). Reports, per optimizer, the best lr (lowest final
f; ties go to the lr that reached the target first), its steps to target, the fastest lr
of the grid and the number of lrs that end non-finite or reach the target.

    python -m examples.benchmarks.research.deterministic_problems [--out DIR] [--opts ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.common import make_mlbfgs


def grid(lo, hi):
    """Half-decade grid 10^lo .. 10^hi (inclusive)."""
    n = int(round((hi - lo) * 2)) + 1
    return [10.0 ** (lo + 0.5 * i) for i in range(n)]


def quadratic(n=100, cond=1e4, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = jnp.asarray((q * np.logspace(0, np.log10(cond), n)) @ q.T, jnp.float32)
    xs = jnp.asarray(rng.standard_normal(n), jnp.float32)
    f = lambda x: 0.5 * (x - xs) @ (a @ (x - xs))
    f0 = float(f(jnp.zeros(n, jnp.float32)))
    return lambda x: f(x) / f0


TASKS = {
    "rosenbrock": dict(f=lambda x: (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2,
                       x0=jnp.zeros(2, jnp.float32), grid=grid(-7, 0.5)),
    "quadratic": dict(f=quadratic(), x0=jnp.zeros(100, jnp.float32), grid=grid(-6, 1.5)),
}
OPTS = {
    "sgd": (lambda s: optax.sgd(s, momentum=0.9), False),
    "adamw": (lambda s: optax.adamw(s, weight_decay=1e-4), False),
    "mlbfgs_default": (lambda s: mlbfgs_optax.mlbfgs(s), False),
    "mlbfgs_hvp": (lambda s: make_mlbfgs(s, curvature="hessian_vector"), True),
    "mlbfgs_hvp_beta0": (lambda s: make_mlbfgs(s, curvature="hessian_vector",
                                               beta=0.0), True),
    "mlbfgs_sigma_low_0.01": (lambda s: mlbfgs_optax.mlbfgs(s, sigma_low=0.01), False),
    "abl_no_pairs": (lambda s: mlbfgs_optax.mlbfgs(s, update_period=10 ** 9), False),
    "mlbfgs_previous": (lambda s: mlbfgs_optax.mlbfgs(s, pair_form="full", sigma_low=0.1),
                        False),
    "mlbfgs_previous_m10": (lambda s: mlbfgs_optax.mlbfgs(s, pair_form="full", sigma_low=0.1,
                                                          memory_size=10), False),
    "mlbfgs_enlarging": (lambda s: mlbfgs_optax.mlbfgs(s, sigma_low=0.1), False),
    "mlbfgs_m10": (lambda s: mlbfgs_optax.mlbfgs(s, memory_size=10), False),
    "abl_memory_5": (lambda s: mlbfgs_optax.mlbfgs(s, memory_size=5), False),
    "abl_memory_3": (lambda s: mlbfgs_optax.mlbfgs(s, memory_size=3), False),
    "abl_memory_10": (lambda s: mlbfgs_optax.mlbfgs(s, memory_size=10), False),
    "abl_memory_2": (lambda s: mlbfgs_optax.mlbfgs(s, memory_size=2), False),
    "abl_history_bf16": (lambda s: make_mlbfgs(s, history_dtype=jnp.bfloat16), False),
    "abl_averages_bf16": (lambda s: make_mlbfgs(s, averages_dtype=jnp.bfloat16), False),
}
STEPS, EVERY, TARGET = 50_000, 5_000, 1e-8


def run(task, name):
    f, x0, lrs = task["f"], task["x0"], task["grid"]
    make, uses_grad_fn = OPTS[name]
    fg = jax.value_and_grad(f)

    def one(lr):
        opt = make(optax.cosine_decay_schedule(lr, STEPS))

        def step(carry, _):
            x, s = carry
            v, g = fg(x)
            u, s = opt.update(g, s, x, **({"grad_fn": jax.grad(f)} if uses_grad_fn else {}))
            return (optax.apply_updates(x, u), s), v

        def block(carry, i):
            x, s, first = carry
            (x, s), vs = jax.lax.scan(step, (x, s), None, length=EVERY)
            hit = vs <= TARGET
            first = jnp.where((first < 0) & jnp.any(hit), i * EVERY + jnp.argmax(hit), first)
            return (x, s, first), (f(x), jnp.all(jnp.isfinite(x)))

        (_, _, first), (fs, fin) = jax.lax.scan(block, (x0, opt.init(x0), jnp.int32(-1)),
                                                jnp.arange(STEPS // EVERY))
        return fs[-1], first, fin[-1]

    t0 = time.time()
    out = [jax.jit(one)(jnp.float32(lr)) for lr in lrs]
    final = [float(o[0]) for o in out]
    first = [int(o[1]) for o in out]
    finite = [bool(o[2]) for o in out]
    key = lambda i: ((final[i] if np.isfinite(final[i]) else np.inf) if final[i] > 1e-12
                     else 0.0, first[i] if first[i] >= 0 else 10 ** 9)
    best = min(range(len(lrs)), key=key)
    reach = [i for i in range(len(lrs)) if first[i] >= 0]
    fastest = min(reach, key=lambda i: first[i]) if reach else None
    return dict(lrs=lrs, final=final, first=first, finite=finite, best_lr=lrs[best],
                best_steps=first[best] if first[best] >= 0 else None, best_final=final[best],
                fastest_lr=None if fastest is None else lrs[fastest],
                fastest_steps=None if fastest is None else first[fastest],
                nonfinite=sum(not x for x in finite), reached=len(reach),
                seconds=time.time() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/deterministic_problems")
    p.add_argument("--opts", nargs="+", default=list(OPTS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = {}
    lines = ["| task | optimizer | best lr | steps to target | final f | fastest lr: steps | "
             "non-finite lrs | lrs reaching target |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for t in args.tasks:
        for o in args.opts:
            r = run(TASKS[t], o)
            res[f"{t}/{o}"] = r
            fast = "–" if r["fastest_lr"] is None else f"{r['fastest_lr']:.3g}: {r['fastest_steps']}"
            lines.append(f"| {t} | {o} | {r['best_lr']:.3g} | {r['best_steps'] or '–'} | "
                         f"{r['best_final']:.3g} | {fast} | {r['nonfinite']}/{len(r['lrs'])} | "
                         f"{r['reached']}/{len(r['lrs'])} |")
            print(lines[-1], flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write("Deterministic problems, float32, 50,000 steps of cosine decay from the peak "
                 "lr, one run per lr of a half-decade grid; measured on CPU only.\n\n"
                 + "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
