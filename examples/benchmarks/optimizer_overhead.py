"""Optimizer-only cost on a ~4M-parameter pytree: mL-BFGS vs optax L-BFGS, SGD, Adam.

Run from the repository root::

    python -m examples.benchmarks.optimizer_overhead [--out DIR] [--repeats N]

Times the jitted ``update(grads, state, params)`` alone (median of ``--repeats`` calls
after 3 warm-up calls), with and without donating the state, for:

* ``scale_by_mlbfgs`` (library defaults, memory 10) and ``optax.scale_by_lbfgs(10)``:
  both return the preconditioned direction only;
* ``optax.sgd(momentum=0.9)`` and ``optax.adam``;
* ``scale_by_mlbfgs`` with memory M = 1, 2, 5, 10, 20 (state donated): the two-loop
  cost should grow linearly in M;
* state bytes with float32 and bfloat16 history (``history_dtype=jnp.bfloat16``).

Every case keeps its own state and all are timed in interleaved rounds (the smallest
round median is kept), because the machine is shared. Every time is also divided by its
memory floor: words per parameter the update must move (see README) x 4 bytes x
parameters / bandwidth, the bandwidth being measured in the same process by a jitted
``y = a*x + y``. Prints a Markdown table and writes
``optimizer_overhead.json`` and ``optimizer_overhead.md`` to ``--out``.

Note: with update_period T = 10, one call in ten also forms a curvature pair; the median
over repeats is the cost of an ordinary step. The pair step is timed separately.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import mlbfgs_optax
from examples.benchmarks import harness
from examples.benchmarks.optimizers import LIB_DEFAULTS, MLBFGS_DEFAULTS, mlbfgs_words

LAYERS = ((1024, 1024), (1024, 1024), (1024, 1024), (1024, 1024))


def make_params():
    """Four 1024x1024 dense layers with biases: 4,198,400 float32 parameters."""
    return harness.dense_params(LAYERS)


def _direction_kwargs(memory_size):
    kw = {k: v for k, v in MLBFGS_DEFAULTS.items()}
    kw["memory_size"] = memory_size
    return kw


def time_pair_step(tx, params, repeats):
    """Median seconds of the update on calls that form a curvature pair (T-th calls)."""
    import time

    import numpy as np

    state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    upd = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
    period = LIB_DEFAULTS["update_period"]
    times = []
    for call in range(period * (repeats + 1)):
        t0 = time.perf_counter()
        u, state = upd(grads, state, params)
        jax.block_until_ready((u, state))
        if (call + 1) % period == 0 and call >= period:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=harness.DEFAULT_OUT)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    params = make_params()
    n = sum(x.size for x in jax.tree.leaves(params))
    bandwidth = harness.measure_bandwidth()
    T = LIB_DEFAULTS["update_period"]
    cases = [
        ("sgd (momentum 0.9)", optax.sgd(0.01, momentum=0.9), 4),
        ("adam", optax.adam(1e-3), 7),
        ("optax.scale_by_lbfgs(10)", optax.scale_by_lbfgs(memory_size=10), 4 * 10 + 9),
        ("scale_by_mlbfgs(M=10)", mlbfgs_optax.scale_by_mlbfgs(**_direction_kwargs(10)),
         mlbfgs_words(10, T)),
    ]
    # Every case keeps its own state; all are timed in interleaved rounds (smallest
    # round median), so that background load on a shared machine hits them alike.
    specs = []  # (kind, key, words, timer)
    for name, tx, words in cases:
        for donate in (True, False):
            specs.append(("main", (name, donate), words,
                          harness.UpdateTimer(tx, params, donate=donate)))
    for m in (1, 2, 5, 10, 20):
        tx = mlbfgs_optax.scale_by_mlbfgs(**_direction_kwargs(m))
        specs.append(("memory", m, mlbfgs_words(m, T), harness.UpdateTimer(tx, params)))
    for label, dt in (("float32", None), ("bfloat16", jnp.bfloat16)):
        tx = mlbfgs_optax.scale_by_mlbfgs(**_direction_kwargs(10), history_dtype=dt)
        specs.append(("dtype", label, mlbfgs_words(10, T), harness.UpdateTimer(tx, params)))
    secs = harness.time_interleaved([x[3] for x in specs], args.repeats, args.rounds)
    rows, scaling, dtypes = [], [], []
    for (kind, key, words, timer), sec in zip(specs, secs):
        floor = words * 4 * n / bandwidth
        print(f"{kind:6s} {key!s:40s} {sec * 1e3:8.2f} ms", flush=True)
        if kind == "main":
            rows.append({"optimizer": key[0], "memory_size": None, "donated": key[1],
                         "update_ms": sec * 1e3, "state_bytes": timer.state_bytes,
                         "state_bytes_per_param": timer.state_bytes / n,
                         "floor_words_per_param": words, "floor_ms": floor * 1e3,
                         "update_over_floor": sec / floor})
        elif kind == "memory":
            scaling.append({"memory_size": key, "update_ms": sec * 1e3,
                            "state_bytes_per_param": timer.state_bytes / n,
                            "floor_words_per_param": words, "floor_ms": floor * 1e3,
                            "update_over_floor": sec / floor})
        else:
            dtypes.append({"history_dtype": key, "update_ms": sec * 1e3,
                           "state_bytes": timer.state_bytes,
                           "state_bytes_per_param": timer.state_bytes / n})
    del specs
    pair_ms = time_pair_step(mlbfgs_optax.scale_by_mlbfgs(**_direction_kwargs(10)), params,
                             repeats=5) * 1e3
    result = {"num_params": int(n), "leaves": [list(s) for s in LAYERS],
              "bandwidth_GBps": bandwidth / 1e9, "jax": jax.__version__,
              "optax": optax.__version__,
              "machine": harness.machine(),
              "repeats": args.repeats, "rounds": args.rounds, "update_period": T, "rows": rows,
              "memory_scaling": scaling, "pair_step_ms_M10": pair_ms,
              "history_dtype": dtypes}
    md = markdown(result)
    harness.write_report(args.out, "optimizer_overhead", result, md)
    print(md)
    return result


def markdown(r: dict) -> str:
    sgd = next(x for x in r["rows"] if x["optimizer"].startswith("sgd") and x["donated"])
    adam = next(x for x in r["rows"] if x["optimizer"] == "adam" and x["donated"])
    lines = [
        "# Optimizer-only update cost",
        "",
        f"{r['num_params']:,} float32 parameters ({len(r['leaves'])} leaves of "
        f"{r['leaves'][0][0]}x{r['leaves'][0][1]} plus biases); jitted update alone; smallest of "
        f"{r.get('rounds', 1)} interleaved rounds of the median of {r['repeats']} calls; "
        f"{r['machine']}; jax {r['jax']}, optax {r['optax']}. "
        f"Bandwidth (jitted y = a*x + y, same process): **{r['bandwidth_GBps']:.2f} GB/s**.",
        "",
        "| optimizer | state donated | update ms | / SGD | / Adam | state B/param | "
        "floor words/param | floor ms | update / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['optimizer']} | {'yes' if x['donated'] else 'no'} | {x['update_ms']:.2f} | "
            f"{x['update_ms'] / sgd['update_ms']:.1f} | {x['update_ms'] / adam['update_ms']:.1f} | "
            f"{x['state_bytes_per_param']:.1f} | {x['floor_words_per_param']:.4g} | "
            f"{x['floor_ms']:.2f} | {x['update_over_floor']:.1f} |")
    lines += [
        "",
        f"mL-BFGS pair step (every T = {r['update_period']} calls, M = 10, donated): "
        f"{r['pair_step_ms_M10']:.2f} ms.",
        "",
        "## scale_by_mlbfgs vs memory size M (state donated)",
        "",
        "| M | update ms | ms per extra pair vs M=1 | state B/param | floor ms | update / floor |",
        "|---|---|---|---|---|---|",
    ]
    base = r["memory_scaling"][0]
    for x in r["memory_scaling"]:
        per = ("–" if x["memory_size"] == 1 else
               f"{(x['update_ms'] - base['update_ms']) / (x['memory_size'] - 1):.2f}")
        lines.append(f"| {x['memory_size']} | {x['update_ms']:.2f} | {per} | "
                     f"{x['state_bytes_per_param']:.1f} | {x['floor_ms']:.2f} | "
                     f"{x['update_over_floor']:.1f} |")
    lines += [
        "",
        "## History dtype (M = 10, state donated)",
        "",
        "| history dtype | state bytes | B/param | update ms |",
        "|---|---|---|---|",
    ]
    for x in r["history_dtype"]:
        lines.append(f"| {x['history_dtype']} | {x['state_bytes']:,} | "
                     f"{x['state_bytes_per_param']:.1f} | {x['update_ms']:.2f} |")
    lines += [
        "",
        "Floor words per parameter: SGD 4, Adam 7, optax L-BFGS 4M + 9, mL-BFGS 4M + 7 + 8/T "
        "(two-loop reads the 2M history vectors twice; read theta and g, read+write both "
        "averages, write d; pair formation every T steps moves 8).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
