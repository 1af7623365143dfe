"""Compile time and step time of the optimizer's update, side by side, on real-width pytrees.

Run from the repository root::

    python -m examples.benchmarks.update_cost [--out DIR] [--rounds N] [--quick]

Three pytrees of realistic width (float32):

* ``mlp``: 4 dense layers of 1024 x 1024 plus biases (4,198,400 parameters, 8 leaves);
* ``gpt2``: GPT-2 small's 148 leaves at d_model 256 (vocabulary 256, context 1024, MLP 4x;
  9.8M parameters);
* ``resnet50``: ResNet-50's 161 leaves at base width 16 (stage outputs 64 to 512; 2.0M
  parameters).

For each, in one run: ``optax.adam``, ``optax.scale_by_lbfgs(10)`` and
``mlbfgs_optax.scale_by_mlbfgs`` (M = 10, T = 10) with the other defaults and with
``packing="stacked"``, ``packing="leaves"``, ``blocks="all"``, ``EqualSlices(8)``, a bfloat16 history, a pair on
every call (T = 1) for the defaults and for the paper's algorithm
(``paper_defaults``), the library's defaults as they are (their shorter history, T = 10),
and (``--placements``) the FSDP and ZeRO placements on 8 fake CPU
devices against ``optax.adam`` in the same placement (a subprocess). Every case is one
jitted ``update(grads, state, params)`` with the grads and the state donated
(:class:`examples.benchmarks.optimizer_overhead.StepTimer`): its compile time
(``jax.jit(update).lower(...).compile()``, first compile in the process), the median
ordinary step and pair step (every T-th call) in interleaved rounds (the least round
median is kept: the machine is shared), the bytes a step must move
(:func:`~examples.benchmarks.optimizer_overhead.floor_bytes`) against the bandwidth of a
jitted ``y = a*x + y`` measured in the same rounds, and the compiled step's temporary
buffers (``memory_analysis()``) in parameter vectors. ``--quick``: the small MLP, Adam,
M = 10 and the defaults, one round (a CI smoke run; no timing is checked).
Writes ``update_cost.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import mlbfgs_optax
from examples.benchmarks import compile_cost, harness
from examples.benchmarks.optimizer_overhead import StepTimer, floor_bytes

MEMORY = 10
PERIOD = 10
#: The library's default memory size: the case "mlbfgs defaults" runs with it.
DEFAULT_MEMORY = inspect.signature(mlbfgs_optax.scale_by_mlbfgs).parameters["memory_size"].default
DEFAULTS_CASE = f"mlbfgs defaults (M={DEFAULT_MEMORY})"
NUM_DEVICES = 8


def pytrees(quick: bool) -> dict:
    """name -> (params, description)."""
    if quick:
        return {"mlp": (harness.dense_params(((64, 64),) * 4), "4 x (64 x 64) + biases")}
    return {
        "mlp": (harness.dense_params(((1024, 1024),) * 4), "4 x (1024 x 1024) + biases"),
        "gpt2": (compile_cost.gpt2(d_model=256, vocab=256, context=1024).params,
                 "GPT-2 small's 148 leaves, d_model 256, vocabulary 256, context 1024"),
        "resnet50": (compile_cost.resnet50(base=16).params,
                     "ResNet-50's 161 leaves, base width 16"),
    }


def _mlbfgs(**kw):
    return lambda: mlbfgs_optax.scale_by_mlbfgs(memory_size=MEMORY, update_period=PERIOD, **kw)


def cases(quick: bool) -> list[dict]:
    """Every single-device case: name, transformation, period and floor kind."""
    out = [
        dict(name="adam", tx=lambda: optax.adam(1e-3), period=None, kind="adam"),
        dict(name="optax.scale_by_lbfgs(10)", tx=lambda: optax.scale_by_lbfgs(memory_size=10),
             period=None, kind="lbfgs"),
        dict(name="mlbfgs", tx=_mlbfgs(), period=PERIOD, kind="mlbfgs"),
        dict(name=DEFAULTS_CASE, period=PERIOD, kind="mlbfgs", memory=DEFAULT_MEMORY,
             tx=lambda: mlbfgs_optax.scale_by_mlbfgs(update_period=PERIOD)),
        dict(name="mlbfgs packing=stacked", tx=_mlbfgs(packing="stacked"), period=PERIOD,
             kind="mlbfgs"),
        dict(name="mlbfgs packing=leaves", tx=_mlbfgs(packing="leaves"), period=PERIOD,
             kind="mlbfgs"),
        dict(name="mlbfgs bfloat16 history", tx=_mlbfgs(history_dtype=jnp.bfloat16),
             period=PERIOD, kind="mlbfgs", history_bytes=2),
        dict(name="mlbfgs T=1", period=1, kind="mlbfgs",
             tx=lambda: mlbfgs_optax.scale_by_mlbfgs(memory_size=MEMORY, update_period=1)),
        dict(name="paper T=1", period=1, kind="paper",
             tx=lambda: mlbfgs_optax.scale_by_mlbfgs(**{**mlbfgs_optax.paper_defaults,
                                                       "memory_size": MEMORY}, update_period=1)),
    ]
    if DEFAULT_MEMORY == MEMORY:  # the defaults are the "mlbfgs" case
        out = [c for c in out if c["name"] != DEFAULTS_CASE]
    if quick:  # Adam, M = 10 and the defaults
        return [c for c in out if c["name"] in ("adam", "mlbfgs", DEFAULTS_CASE)]
    if not quick:
        at = [c["name"] for c in out].index("mlbfgs packing=stacked") + 1
        out[at:at] = [
            dict(name='mlbfgs blocks="all"', tx=_mlbfgs(blocks="all"), period=PERIOD,
                 kind="mlbfgs"),
            dict(name="mlbfgs EqualSlices(8)", tx=_mlbfgs(blocks=mlbfgs_optax.EqualSlices(8)),
                 period=PERIOD, kind="mlbfgs"),
        ]
    return out


def placement_cases(mesh) -> list[dict]:
    """FSDP (params sharded, state follows them) and ZeRO (EqualSlices state over devices)."""
    zero = lambda: mlbfgs_optax.scale_by_mlbfgs(
        memory_size=MEMORY, update_period=PERIOD, blocks=mlbfgs_optax.EqualSlices(NUM_DEVICES),
        axis_name="x", mesh=mesh)
    return [
        dict(name="adam FSDP", tx=lambda: optax.adam(1e-3), period=None, kind="adam",
             placement="fsdp"),
        dict(name="mlbfgs FSDP", tx=_mlbfgs(), period=PERIOD, kind="mlbfgs", placement="fsdp"),
        dict(name="adam ZeRO", tx=lambda: optax.adam(1e-3), period=None, kind="adam",
             placement="zero"),
        dict(name="mlbfgs ZeRO", tx=zero, period=PERIOD, kind="mlbfgs", placement="zero"),
    ]


def _floor(kind: str, history_bytes: int, memory: int = MEMORY) -> dict:
    if kind == "paper":  # identity metric: no second moment (2 words fewer)
        fl = floor_bytes("mlbfgs", memory, history_bytes)
        return {k: v - 8 for k, v in fl.items()}
    return floor_bytes(kind, memory, history_bytes)


def _place(params, placement: Optional[str], mesh):
    if placement is None:
        return params
    from jax.sharding import NamedSharding, PartitionSpec as P
    if placement == "zero":
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), params)
    spec = lambda x: compile_cost._fsdp_spec(x, NUM_DEVICES)
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)


def build(case: dict, params, mesh=None) -> dict:
    """A timer for ``case`` on ``params``, with its compile time and temporaries."""
    placed = _place(params, case.get("placement"), mesh)
    with _on(mesh):
        tx = case["tx"]()
        # The compile time of the update alone, on this process's first compile of it.
        probe = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(0, 1))
        state = tx.init(placed)
        t0 = time.perf_counter()
        lowered = probe.lower(placed, state, placed)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        program = hashlib.sha1(lowered.as_text().encode()).hexdigest()[:12]
        mem = compiled.memory_analysis()
        del compiled, state
        timer = StepTimer(tx, placed, case["period"])
    n = sum(x.size for x in jax.tree.leaves(params))
    return {"timer": timer, "compile_s": compile_s, "program": program,
            "temp_vectors": (mem.temp_size_in_bytes / (4 * n)) if mem is not None else None}


def _on(mesh):
    """``jax.set_mesh(mesh)``, or no context without a mesh."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def run_cases(specs: list[dict], trees: dict, rounds: int, calls: int, mesh=None) -> tuple:
    """Builds every (pytree, case) timer, times them in interleaved rounds.

    Returns:
      ``(rows, best bandwidth, every round's bandwidth)``.
    """
    built = []
    for tree_name, (params, _) in trees.items():
        for c in specs:
            b = build(c, params, mesh)
            built.append((tree_name, c, b))
            print(f"ready {tree_name:9s} {c['name']:28s} compile {b['compile_s']:6.2f} s",
                  flush=True)
    bandwidth = []
    for r in range(rounds):
        bandwidth.append(harness.measure_bandwidth())
        for _, c, b in built:
            with _on(mesh):
                b["timer"].round(calls)
        print(f"round {r + 1}/{rounds} done", flush=True)
    bw = max(bandwidth)
    rows = []
    for tree_name, c, b in built:
        t = b["timer"]
        n = int(sum(x.size for x in jax.tree.leaves(t.params)))
        fl = _floor(c["kind"], c.get("history_bytes", 4), c.get("memory", MEMORY))
        ordinary = t.best("ordinary")
        pair = t.best("pair") if c["period"] not in (None, 1) else None
        floor_ord = (fl["pair"] if c["period"] == 1 else fl["ordinary"]) * n / bw
        rows.append({
            "pytree": tree_name, "name": c["name"], "placement": c.get("placement"),
            "num_params": n, "leaves": len(jax.tree.leaves(t.params)),
            "period": c["period"], "compile_s": b["compile_s"], "program": b["program"],
            "ordinary_ms": ordinary * 1e3, "pair_ms": pair * 1e3 if pair else None,
            "floor_ms": floor_ord * 1e3,
            "floor_pair_ms": fl["pair"] * n / bw * 1e3 if fl["pair"] else None,
            "words_per_param": (fl["pair"] if c["period"] == 1 else fl["ordinary"]) / 4,
            "temp_vectors": b["temp_vectors"],
            "state_bytes_per_param": t.state_bytes / n,
        })
    return rows, bw, bandwidth


def _worker(argv: Sequence[str]) -> None:
    """The placements, in a process with 8 CPU devices: prints the rows as JSON."""
    args = json.loads(argv[0])
    mesh = jax.make_mesh((NUM_DEVICES,), ("x",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    trees = pytrees(args["quick"])
    rows, bw, _ = run_cases(placement_cases(mesh), trees, args["rounds"], args["calls"], mesh)
    print("ROWS" + json.dumps({"rows": rows, "bandwidth": bw}))


def run_placements(quick: bool, rounds: int, calls: int) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    arg = json.dumps({"quick": quick, "rounds": rounds, "calls": calls})
    out = subprocess.run([sys.executable, "-m", "examples.benchmarks.update_cost",
                          "--placements-worker", arg], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    for line in out.stdout.splitlines():
        if line.startswith("ROWS"):
            return json.loads(line[4:])["rows"]
    raise RuntimeError("placements worker failed:\n" + out.stdout[-3000:] + out.stderr[-3000:])


def checks(rows: list[dict]) -> list[tuple[str, str, Optional[float], float, bool]]:
    """The project's targets, per pytree: (pytree, what, measured, limit, met)."""
    out = []
    for tree in dict.fromkeys(r["pytree"] for r in rows):
        by = {r["name"]: r for r in rows if r["pytree"] == tree and r["placement"] is None}
        adam, m = by["adam"], by["mlbfgs"]
        limit = (4 * MEMORY + 7) / 6
        ms = lambda name: by[name]["ordinary_ms"] if name in by else None
        lb = {"ordinary_ms": ms("optax.scale_by_lbfgs(10)")}
        ratio = lambda a, b: None if a is None or b is None else a / b
        items = [
            ("ordinary step / adam's update", ratio(m["ordinary_ms"], adam["ordinary_ms"]),
             limit),
            ("pair step / ordinary step", ratio(m["pair_ms"], m["ordinary_ms"]), 1.5),
            ("paper T=1 / optax.scale_by_lbfgs(10)", ratio(ms("paper T=1"), lb["ordinary_ms"]),
             1.0),
            ("defaults T=1 / optax.scale_by_lbfgs(10)",
             ratio(ms("mlbfgs T=1"), lb["ordinary_ms"]), 1.3),
            ("bfloat16 history / float32 (ordinary step)",
             ratio(ms("mlbfgs bfloat16 history"), m["ordinary_ms"]), 1.0),
            ('packing="auto" / "stacked" (ordinary step)',
             ratio(m["ordinary_ms"], ms("mlbfgs packing=stacked")), 1.1),
            (f"defaults (M = {DEFAULT_MEMORY}) / M = {MEMORY} (ordinary step)",
             ratio(ms(DEFAULTS_CASE), m["ordinary_ms"]), 1 / 1.5),
            ('packing="leaves": ordinary step / adam\'s update',
             ratio(ms("mlbfgs packing=leaves"), adam["ordinary_ms"]), limit),
            ('packing="leaves": pair step / ordinary step',
             ratio((by.get("mlbfgs packing=leaves") or {}).get("pair_ms"),
                   ms("mlbfgs packing=leaves")), 1.5),
        ]
        out += [(tree, w, v, lim, v is not None and v <= lim) for w, v, lim in items
                if v is not None]
    return out


def _fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def markdown(r: dict) -> str:
    lines = [
        "# Update cost: compile time and step time at real widths",
        "",
        f"{r['library']}; {r['machine']}; jax {r['jax']}, optax {r['optax']}; measured on CPU "
        f"only. M = {MEMORY} (the defaults: {DEFAULT_MEMORY}), T = {PERIOD}. Smallest of {r['rounds']} interleaved rounds of the "
        f"median of {r['calls']} calls; grads and state donated. Bandwidth (jitted "
        f"y = a*x + y): **{r['bandwidth_GBps']:.1f} GB/s**. **floor** = the words per "
        "parameter a step must move at that bandwidth; **temp** = the compiled step's "
        "temporary buffers in parameter vectors.",
        "",
        "Pytrees: " + "; ".join(f"`{k}`: {v}" for k, v in r["pytrees"].items()) + ".",
        "",
        "## Targets",
        "",
        "| pytree | target | measured | limit | met |",
        "|---|---|---|---|---|",
    ]
    for tree, what, v, lim, ok in checks(r["rows"]):
        lines.append(f"| {tree} | {what} | {_fmt(v)} | {lim:.2f} | {'yes' if ok else '**no**'} |")
    lines += [
        "",
        "## Every case",
        "",
        "| pytree | case | compile s | x adam | ordinary ms | x adam | x floor | pair ms "
        "| pair / ordinary | words/param | temp | state B/param |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = r["rows"]
    for x in rows:
        adam = next(a for a in rows if a["pytree"] == x["pytree"]
                    and a["name"].startswith("adam") and a["placement"] == x["placement"])
        po = x["pair_ms"] / x["ordinary_ms"] if x["pair_ms"] else None
        lines.append(
            f"| {x['pytree']} | {x['name']} | {x['compile_s']:.2f} | "
            f"{x['compile_s'] / adam['compile_s']:.1f} | {x['ordinary_ms']:.2f} | "
            f"{x['ordinary_ms'] / adam['ordinary_ms']:.1f} | "
            f"{x['ordinary_ms'] / x['floor_ms']:.2f} | {_fmt(x['pair_ms'])} | {_fmt(po)} | "
            f"{x['words_per_param']:.1f} | {_fmt(x['temp_vectors'])} | "
            f"{x['state_bytes_per_param']:.1f} |")
    lines += ["", "FSDP and ZeRO rows ran on 8 fake CPU devices of the same 2 cores: their "
              "ratios to adam in the same placement are what they show, not a speed-up."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=harness.DEFAULT_OUT)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--calls", type=int, default=None, help="calls per case and round")
    p.add_argument("--quick", action="store_true", help="small widths, for CI")
    p.add_argument("--placements", action="store_true",
                   help="also FSDP and ZeRO on 8 fake devices (a subprocess)")
    p.add_argument("--placements-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.placements_worker:
        _worker([args.placements_worker])
        return {}
    rounds = args.rounds or (1 if args.quick else 3)
    calls = args.calls or (PERIOD if args.quick else 20)
    trees = pytrees(args.quick)
    rows, bw, bandwidth = run_cases(cases(args.quick), trees, rounds, calls)
    if args.placements:
        rows += run_placements(args.quick, rounds, calls)
    result = {"library": harness.library_version(), "machine": harness.machine(),
              "jax": jax.__version__, "optax": optax.__version__, "rounds": rounds,
              "calls": calls, "bandwidth_GBps": bw / 1e9,
              "bandwidth_all_GBps": [b / 1e9 for b in bandwidth], "rows": rows,
              "pytrees": {k: v for k, (_, v) in trees.items()}, "quick": args.quick}
    md = markdown(result)
    harness.write_report(args.out, "update_cost", result, md)
    print(md)
    return result


if __name__ == "__main__":
    main()
