"""Optimizer-only cost of one update: mL-BFGS against its memory floor and against optax.

Run from the repository root::

    python -m examples.benchmarks.optimizer_overhead [--out DIR] [--rounds N] [--quick]

Every case is one jitted ``update(grads, state, params)`` with the grads and the state
donated, as inside a training step (which never returns its gradients: donating only
the state makes JAX hand the returned updates the buffers of the state's first
params-shaped field, a rotation that costs XLA a copy of every state field). The
parameters follow a fixed quadratic, ``g = h * theta``, ``theta <- theta - 1e-3 u``
(both untimed), so that curvature pairs are accepted and the history fills. Calls are
timed one by one and split into ordinary calls and pair steps (every T-th call); each
case keeps its own state, all are timed in interleaved rounds and the smallest round
median is kept (the machine is shared).

Reported, in one run:

* ``scale_by_mlbfgs`` (library defaults) at M = 1, 2, 5, 10, 20 (4.2M float32
  parameters): ordinary and pair step against their memory floors;
* n = 0.26M, 1M, 4.2M and 16.8M parameters at M = 10 (linear in n?);
* bfloat16 against float32 history;
* T = 1 (a pair every step) against ``optax.scale_by_lbfgs(10)``, and SGD and Adam;
* the passes over parameter-sized arrays in the compiled ordinary and pair steps
  (:mod:`examples.benchmarks.hlo_passes`), in words per parameter.

The memory floor of a case is the bytes it must move (``FLOOR`` below) over the bandwidth of
a jitted ``y = a*x + y`` measured in the same rounds. Writes
``optimizer_overhead.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.benchmarks import harness, hlo_passes

WIDTH = 1024
ROWS = 1024  # 4 leaves of ROWS x WIDTH plus biases: 4,198,400 parameters
SCOPES = ("pair_step", "pair_products", "ordinary_products", "rescaled_products",
          "direct_norm")
# Passes that run only on one kind of step, or only when rounding calls for them.
ORDINARY_SKIP = ("pair_step", "pair_products", "rescaled_products", "direct_norm")
PAIR_SKIP = ("ordinary_products", "rescaled_products", "direct_norm")


def floor_bytes(kind: str, memory_size: int = 10, history_bytes: int = 4) -> dict:
    """Bytes per parameter an update must move: ``{"ordinary": ..., "pair": ...}``.

    * SGD with momentum: read g, read+write the trace, write u (4 words).
    * Adam: read g, read+write mu and nu, write u (7 words).
    * ``optax.scale_by_lbfgs(M)``: the history read twice (4M), theta and g, previous
      theta and g read and written, the new pair written, u written (4M + 9).
    * ``scale_by_mlbfgs`` defaults (metric "adam"), ordinary step: the two-loop
      recursion reads the 2M history vectors twice (any method must: the weights of the
      second pass depend on every inner product of the first), read g and theta,
      read+write the two averages and nu, write d: 4M history rows + 9 words. Pair step:
      also read both snapshots, write both snapshots and the new pair (+6 words, the
      pair at the history's width).
    """
    w = 4
    if kind == "sgd":
        return {"ordinary": 4 * w, "pair": None}
    if kind == "adam":
        return {"ordinary": 7 * w, "pair": None}
    if kind == "lbfgs":
        return {"ordinary": (4 * memory_size + 9) * w, "pair": None}
    hist = 4 * memory_size * history_bytes
    return {"ordinary": hist + 9 * w, "pair": hist + 13 * w + 2 * history_bytes}


def make_params(rows: int = ROWS) -> dict:
    """Four ``rows x 1024`` dense layers with biases."""
    return harness.dense_params(((rows, WIDTH),) * 4)


class StepTimer:
    """One jitted update with its own state on ``g = h * theta``, timed call by call."""

    def __init__(self, tx, params, period: Optional[int] = None, lr: float = 1e-3):
        self.period = period
        leaves = jax.tree.leaves(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        self.h = jax.tree.unflatten(jax.tree.structure(params), [
            jnp.exp(jax.random.uniform(k, x.shape, jnp.float32, -2.0, 2.0))
            for k, x in zip(keys, leaves)])
        self.params = jax.tree.map(lambda x: jnp.array(x, copy=True) + 1.0, params)
        self.state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))
        self.state_bytes = mlbfgs_optax.state_nbytes(self.state)
        self.grad = jax.jit(lambda h, p: jax.tree.map(jnp.multiply, h, p))
        self.apply = jax.jit(lambda p, u: jax.tree.map(lambda x, v: x - lr * v, p, u),
                             donate_argnums=(0,))
        self.upd = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(0, 1))
        self.calls = 0
        self.ordinary: list[list[float]] = []
        self.pair: list[list[float]] = []
        self.run(2 * (period or 1))

    def lowered(self):
        """The update, lowered for this timer's arguments (for its HLO)."""
        g = self.grad(self.h, self.params)
        return self.upd.lower(g, self.state, self.params)

    def run(self, calls: int) -> tuple[list[float], list[float]]:
        ordinary, pair = [], []
        for _ in range(calls):
            g = jax.block_until_ready(self.grad(self.h, self.params))
            t0 = time.perf_counter()
            u, self.state = self.upd(g, self.state, self.params)
            jax.block_until_ready((u, self.state))
            dt = time.perf_counter() - t0
            self.calls += 1
            # With T = 1 every call is a pair step: all of them count as the step's time.
            is_pair = (self.period or 1) > 1 and self.calls % self.period == 0
            (pair if is_pair else ordinary).append(dt)
            self.params = self.apply(self.params, u)
        return ordinary, pair

    def round(self, calls: int) -> None:
        """``calls`` calls, rounded up to whole periods (so that a round has pair steps)."""
        period = self.period or 1
        ordinary, pair = self.run(-(-calls // period) * period)
        self.ordinary.append(ordinary)
        self.pair.append(pair)

    def best(self, which: str) -> Optional[float]:
        """The smallest over rounds of the median seconds of ``which`` calls."""
        rounds = [r for r in getattr(self, which) if r]
        return min(float(np.median(r)) for r in rounds) if rounds else None


def _mlbfgs(**kw):
    return mlbfgs_optax.scale_by_mlbfgs(**kw)


def cases(quick: bool) -> list[dict]:
    """Every timed case: name, group, transformation, period, rows, floor kind and args."""
    mem = (1, 10) if quick else (1, 2, 5, 10, 20)
    out = [
        dict(name="sgd (momentum 0.9)", group="peers", tx=lambda: optax.sgd(1e-3, momentum=0.9),
             kind="sgd"),
        dict(name="adam", group="peers", tx=lambda: optax.adam(1e-3), kind="adam"),
        dict(name="optax.scale_by_lbfgs(10)", group="peers",
             tx=lambda: optax.scale_by_lbfgs(memory_size=10), kind="lbfgs", memory_size=10),
        dict(name="scale_by_mlbfgs T=1", group="peers", period=1, kind="mlbfgs", memory_size=10,
             tx=lambda: _mlbfgs(update_period=1)),
    ]
    for m in mem:
        out.append(dict(name=f"scale_by_mlbfgs M={m}", group="memory", period=10, kind="mlbfgs",
                        memory_size=m, tx=lambda m=m: _mlbfgs(memory_size=m)))
    out.append(dict(name="scale_by_mlbfgs bfloat16 history", group="dtype", period=10,
                    kind="mlbfgs", memory_size=10, history_bytes=2,
                    tx=lambda: _mlbfgs(history_dtype=jnp.bfloat16)))
    for rows in ((64,) if quick else (64, 256, 4096)):
        out.append(dict(name=f"scale_by_mlbfgs n={4 * (rows + 1) * WIDTH:,}",
                        group="size", period=10, kind="mlbfgs", memory_size=10, rows=rows,
                        tx=lambda: _mlbfgs()))
    return out


def hlo_rows(timer: StepTimer, n: int) -> dict:
    """The compiled step's passes (aggregated) and its words per parameter, by step kind."""
    rows = hlo_passes.passes(timer.lowered().compile().as_text(), min_elements=1 << 16,
                             scopes=SCOPES)
    agg: dict = {}
    for p in rows:
        source = p.detail.rsplit("(", 1)[-1].rstrip(")") if "(" in p.detail else ""
        key = (p.scope or "-", p.op, source)
        a = agg.setdefault(key, {"scope": key[0], "op": key[1], "source": key[2], "count": 0,
                                 "read_words": 0.0, "write_words": 0.0})
        a["count"] += p.times
        a["read_words"] += p.times * p.read_bytes / (4 * n)
        a["write_words"] += p.times * p.write_bytes / (4 * n)
    return {"passes": sorted(agg.values(), key=lambda a: (a["scope"], -a["read_words"])),
            "ordinary_words": hlo_passes.words(rows, 4 * n, ORDINARY_SKIP),
            "pair_words": hlo_passes.words(rows, 4 * n, PAIR_SKIP)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=harness.DEFAULT_OUT)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=20, help="calls per case and round")
    p.add_argument("--quick", action="store_true", help="small sizes, for CI")
    args = p.parse_args(argv)
    rows_main = 64 if args.quick else ROWS
    specs = cases(args.quick)
    timers = []
    for c in specs:
        params = make_params(c.get("rows", rows_main))
        t0 = time.perf_counter()
        timers.append(StepTimer(c["tx"](), params, c.get("period")))
        print(f"ready {c['name']} ({time.perf_counter() - t0:.1f} s)", flush=True)
    bandwidth = []
    for r in range(args.rounds):
        bandwidth.append(harness.measure_bandwidth())
        for c, t in zip(specs, timers):
            t.round(args.calls)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    bw = max(bandwidth)
    results = []
    for c, t in zip(specs, timers):
        n = sum(x.size for x in jax.tree.leaves(t.params))
        fl = floor_bytes(c["kind"], c.get("memory_size", 10), c.get("history_bytes", 4))
        row = {"name": c["name"], "group": c["group"], "num_params": int(n),
               "memory_size": c.get("memory_size"), "period": c.get("period"),
               "state_bytes_per_param": t.state_bytes / n,
               "ordinary_ms": t.best("ordinary") * 1e3}
        pair = t.best("pair") if c.get("period") not in (None, 1) else None
        row["pair_ms"] = pair * 1e3 if pair is not None else None
        row["floor_ordinary_ms"] = fl["ordinary"] * n / bw * 1e3
        row["floor_pair_ms"] = fl["pair"] * n / bw * 1e3 if fl["pair"] else None
        if c.get("period") == 1:  # every call is a pair step
            row["floor_ordinary_ms"] = row["floor_pair_ms"]
        results.append(row)
        print(f"{c['name']:40s} ordinary {row['ordinary_ms']:8.2f} ms  pair "
              f"{row['pair_ms'] or float('nan'):8.2f} ms", flush=True)
    main_timer = next(t for c, t in zip(specs, timers) if c["name"] == "scale_by_mlbfgs M=10")
    n_main = sum(x.size for x in jax.tree.leaves(main_timer.params))
    hlo = hlo_rows(main_timer, n_main)
    result = {"library": harness.library_version(), "machine": harness.machine(),
              "jax": jax.__version__, "optax": optax.__version__, "rounds": args.rounds,
              "calls": args.calls, "bandwidth_GBps": bw / 1e9,
              "bandwidth_all_GBps": [b / 1e9 for b in bandwidth], "rows": results, "hlo": hlo,
              "quick": args.quick}
    md = markdown(result)
    harness.write_report(args.out, "optimizer_overhead", result, md)
    print(md)
    return result


def _fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def checks(r: dict) -> list[tuple[str, float, float, bool]]:
    """The project's targets for the update's cost: (what, measured, limit, met)."""
    by = {x["name"]: x for x in r["rows"]}
    m10, m1 = by["scale_by_mlbfgs M=10"], by["scale_by_mlbfgs M=1"]
    bf16, t1 = by["scale_by_mlbfgs bfloat16 history"], by["scale_by_mlbfgs T=1"]
    lb = by["optax.scale_by_lbfgs(10)"]
    out = [
        ("ordinary step / floor (M = 10)", m10["ordinary_ms"] / m10["floor_ordinary_ms"], 1.5),
        ("ordinary step / floor (M = 1)", m1["ordinary_ms"] / m1["floor_ordinary_ms"], 2.0),
        ("pair step / ordinary step (M = 10)", _ratio(m10["pair_ms"], m10["ordinary_ms"]), 1.3),
        ("bfloat16 history / float32 history (ordinary step)",
         bf16["ordinary_ms"] / m10["ordinary_ms"], 1.0),
        ("T = 1 / optax.scale_by_lbfgs(10)", t1["ordinary_ms"] / lb["ordinary_ms"], 1.0),
    ]
    return [(w, v, lim, v is not None and v <= lim) for w, v, lim in out]


def _ratio(a, b):
    return None if a is None or b is None else a / b


def markdown(r: dict) -> str:
    rows = r["rows"]
    sgd = next(x for x in rows if x["name"].startswith("sgd"))
    adam = next(x for x in rows if x["name"] == "adam")
    main = next(x for x in rows if x["name"] == "scale_by_mlbfgs M=10")
    lines = [
        "# Optimizer-only update cost",
        "",
        f"{r['library']}; {r['machine']}; jax {r['jax']}, optax {r['optax']}. "
        f"{main['num_params']:,} float32 parameters (4 leaves of rows x 1024 plus biases) "
        f"unless noted; grads and state donated; smallest of {r['rounds']} interleaved "
        f"rounds of the median of {r['calls']} calls per case. Bandwidth (jitted "
        f"y = a*x + y, best of the rounds): **{r['bandwidth_GBps']:.1f} GB/s** (rounds: "
        + ", ".join(f"{b:.1f}" for b in r["bandwidth_all_GBps"]) + ").",
        "",
        "## Targets",
        "",
        "| target | measured | limit | met |",
        "|---|---|---|---|",
    ]
    for what, v, lim, ok in checks(r):
        lines.append(f"| {what} | {_fmt(v)} | {lim:g} | {'yes' if ok else '**no**'} |")
    lines += [
        "",
        "## Every case",
        "",
        "| case | params | ordinary ms | pair ms | pair / ordinary | floor ms (ordinary / pair) "
        "| ordinary / floor | pair / floor | ordinary / SGD | ordinary / Adam | state B/param |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        po = x["pair_ms"] / x["ordinary_ms"] if x["pair_ms"] else None
        fo = x["ordinary_ms"] / x["floor_ordinary_ms"]
        fp = x["pair_ms"] / x["floor_pair_ms"] if x["pair_ms"] else None
        same_n = x["num_params"] == sgd["num_params"]
        lines.append(
            f"| {x['name']} | {x['num_params']:,} | {x['ordinary_ms']:.2f} | "
            f"{_fmt(x['pair_ms'])} | {_fmt(po)} | {x['floor_ordinary_ms']:.2f} / "
            f"{_fmt(x['floor_pair_ms'])} | {fo:.2f} | {_fmt(fp)} | "
            f"{_fmt(x['ordinary_ms'] / sgd['ordinary_ms'] if same_n else None, '.1f')} | "
            f"{_fmt(x['ordinary_ms'] / adam['ordinary_ms'] if same_n else None, '.1f')} | "
            f"{x['state_bytes_per_param']:.1f} |")
    mem = sorted((x for x in rows if x["group"] == "memory"), key=lambda x: x["memory_size"])
    if len(mem) >= 2:
        slope = np.polyfit([x["memory_size"] for x in mem], [x["ordinary_ms"] for x in mem], 1)
        floor_slope = (mem[-1]["floor_ordinary_ms"] - mem[0]["floor_ordinary_ms"]) / (
            mem[-1]["memory_size"] - mem[0]["memory_size"])
        lines += ["", f"Ordinary step against M: {slope[0]:.2f} ms per extra pair (least "
                  f"squares), floor {floor_slope:.2f} ms per pair; intercept {slope[1]:.2f} ms."]
    size = sorted([x for x in rows if x["group"] == "size"] + [main],
                  key=lambda x: x["num_params"])
    if len(size) >= 2:
        lines += ["", "Against n (M = 10): " + ", ".join(
            f"{x['num_params'] / 1e6:.2f}M: {x['ordinary_ms'] / x['num_params'] * 1e6:.2f} ms "
            f"per million ({x['ordinary_ms'] / x['floor_ordinary_ms']:.2f}x floor)"
            for x in size) + "."]
    h = r["hlo"]
    lines += [
        "",
        "## Passes over parameter-sized arrays (compiled M = 10 step, HLO)",
        "",
        f"Words per parameter read and written by the compiled step: ordinary "
        f"**{h['ordinary_words']:.1f}**, pair step **{h['pair_words']:.1f}** (floors "
        f"{floor_bytes('mlbfgs')['ordinary'] / 4:.0f} and {floor_bytes('mlbfgs')['pair'] / 4:.0f}"
        "). Scope: `pair_step` and `pair_products` run on pair steps only, `ordinary_products` "
        "on ordinary steps only, `rescaled_products` and `direct_norm` only when rounding calls "
        "for them; `-` is every step. Source op: the JAX operation XLA named the fusion after. "
        "A fusion that slices a large operand is counted as reading all of it (an upper bound).",
        "",
        "| scope | XLA op | source op | count | reads (words/param) | writes (words/param) |",
        "|---|---|---|---|---|---|",
    ]
    for a in h["passes"]:
        lines.append(f"| {a['scope']} | {a['op']} | {a['source']} | {a['count']} | "
                     f"{a['read_words']:.2f} | {a['write_words']:.2f} |")
    lines += ["", "Floors: " + floor_bytes.__doc__.split("\n\n", 1)[1].strip().replace(
        "\n      ", " ").replace("\n    ", "\n")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
