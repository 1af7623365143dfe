"""Each XLA hint of the update against its removal: compile and step time, real widths.

The update steers XLA's kernel choices at a few named sites
(:mod:`mlbfgs_optax._xla_hints`): optimization barriers (``hold``), loops of zero or
one trip (``once``) and one platform-dependent product (``per_platform``). This study
replaces one site at a time by its plain equivalent (the barrier by its operand, the
loop by its body, the platform choice by the default product), and all of them at once,
and times the update as ``update_cost.py`` does (compile, then ordinary and pair steps
in interleaved rounds, least round median), against the update as it is, in the same
process. The library's defaults (M = 2, T = 10) on the three real-width pytrees; a
bfloat16 history for the platform-dependent product; ``packing="leaves"`` on GPT-2's
structure for the block-index loop. A row whose program is the same as the update's
as it is (same lowered text) says so: the site is not on that path. Measured on CPU only.

Run from the repository root (one pytree per process keeps the memory low; each run
appends its rows to ``xla_hints.json`` and rewrites ``xla_hints.md`` beside this file)::

    python -m examples.benchmarks.research.xla_hints --pytree mlp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import mlbfgs_optax
from examples.benchmarks import harness, update_cost
from mlbfgs_optax import _update
from mlbfgs_optax import _xla_hints

HERE = os.path.dirname(os.path.abspath(__file__))
SITES = ("pair_candidate", "packed_leaves", "block_values", "stacked_inputs",
         "block_indices", "direction_split")
#: (configuration, its arguments, the sites whose removal it measures, its pytrees).
CONFIGS = (
    ("defaults", {}, SITES + ("all",), ("mlp", "gpt2", "resnet50")),
    ("bfloat16 history", {"history_dtype": jnp.bfloat16}, ("bf16_history",),
     ("mlp", "gpt2", "resnet50")),
    ('packing="leaves"', {"packing": "leaves"}, ("block_indices",), ("gpt2",)),
)

_REMOVED: set = set()
_hold, _once, _per_platform = _xla_hints.hold, _xla_hints.once, _xla_hints.per_platform


def _patch() -> None:
    """Every site consults ``_REMOVED`` at trace time; the update is traced per timer."""
    _xla_hints.hold = lambda site, x: x if site in _REMOVED else _hold(site, x)
    _xla_hints.once = lambda site, pred, fn, carry: (
        fn(carry) if site in _REMOVED else _once(site, pred, fn, carry))
    _xla_hints.per_platform = lambda site, args, cpu, default: (
        default(*args) if site in _REMOVED else _per_platform(site, args, cpu, default))
    # No inner jit: its trace cache would hand every variant the first variant's program.
    _update._step_static_hyper = _update._step


def _maker(kw: dict, removed: tuple):
    def make():
        _REMOVED.clear()
        _REMOVED.update(SITES if removed == ("all",) else removed)
        _REMOVED.discard("all")
        return mlbfgs_optax.scale_by_mlbfgs(update_period=update_cost.PERIOD, **kw)
    return make


def specs(tree: str, together: tuple = ()) -> list[dict]:
    """Every variant of the configurations on ``tree``; with ``together``, the defaults
    as they are and without those sites at once (an A/B of removing them)."""
    configs = CONFIGS if not together else (("defaults", {}, ("+".join(together),), (tree,)),)
    out = []
    for config, kw, sites, trees in configs:
        if tree not in trees:
            continue
        for removed in [()] + [tuple(s.split("+")) for s in sites] + [None]:
            # None: the update as it is once more, built and timed last (a control of
            # the order: its ratio is the noise of a row against the first).
            name = ("as is" if removed == () else "as is, again (control)" if removed is None
                    else "without " + " + ".join(removed))
            out.append(dict(name=f"{config} | {name}", period=update_cost.PERIOD,
                            kind="mlbfgs", memory=2, tx=_maker(kw, removed or ())))
    return out


def table(rows: list[dict]) -> str:
    key = lambda r: (r["name"].split(" | ")[0], r["pytree"], r.get("run", 1))
    base = {key(r): r for r in rows if r["name"].endswith("| as is")}
    lines = ["| pytree | run | configuration | variant | compile s | ordinary ms | pair ms | "
             "compile / as is | ordinary / as is | pair / as is |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config, variant = r["name"].split(" | ")
        b = base[key(r)]
        cells = [r["pytree"], str(r.get("run", 1)), config, variant, f"{r['compile_s']:.2f}",
                 f"{r['ordinary_ms']:.1f}", f"{r['pair_ms']:.1f}"]
        if r is b:
            cells += ["", "", ""]
        elif r["program"] == b["program"] and "control" not in variant:
            cells += ["same program", "", ""]
        else:
            cells += [f"{r[k] / b[k]:.2f}" for k in ("compile_s", "ordinary_ms", "pair_ms")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compile_once(tree: str, name: str) -> float:
    """The compile time of one variant's update, this process's second compile."""
    _patch()
    params = update_cost.pytrees(False)[tree][0]
    removed = name.split("without ")[-1].split(" + ") if " + " in name else ()
    by_name = {s["name"]: s for s in specs(tree, tuple(removed))}
    update_cost.build(by_name["defaults | as is"], harness.dense_params(((64, 64),)))
    return update_cost.build(by_name[name], params)["compile_s"]


def fresh_compiles(trees: tuple, variants: tuple, repeats: int) -> list[dict]:
    """Each variant's compile in a process of its own, the variants' order reversed on
    every other repeat (a process's compiles slow down as it builds more timers)."""
    rows = []
    for rep in range(repeats):
        for tree in trees:
            for name in (variants if rep % 2 == 0 else variants[::-1]):
                out = subprocess.run(
                    [sys.executable, "-m", "examples.benchmarks.research.xla_hints",
                     "--pytree", tree, "--compile-one", name],
                    capture_output=True, text=True, check=True).stdout
                rows.append(dict(pytree=tree, name=name, repeat=rep,
                                 compile_s=float(out.split("COMPILE")[1])))
                print(rows[-1], flush=True)
    return rows


def fresh_table(rows: list[dict]) -> str:
    lines = ["| pytree | variant | compile s, each repeat | median / as is |", "|---|---|---|---|"]
    med = lambda t, n: float(np.median([r["compile_s"] for r in rows
                                        if (r["pytree"], r["name"]) == (t, n)]))
    for t in dict.fromkeys(r["pytree"] for r in rows):
        for n in dict.fromkeys(r["name"] for r in rows if r["pytree"] == t):
            each = ", ".join(f"{r['compile_s']:.2f}" for r in rows
                             if (r["pytree"], r["name"]) == (t, n))
            lines.append(f"| {t} | {n.replace(' | ', ': ')} | {each} | {med(t, n) / med(t, 'defaults | as is'):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pytree", choices=("mlp", "gpt2", "resnet50"))
    p.add_argument("--compile-one", default="", help=argparse.SUPPRESS)
    p.add_argument("--fresh", default="",
                   help="comma-separated variants ('defaults | without block_indices', ...): "
                        "their compile times, each in a process of its own")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--run", type=int, default=1, help="which run of this pytree (kept apart)")
    p.add_argument("--together", default="", help="comma-separated sites removed at once")
    args = p.parse_args(argv)
    if args.compile_one:
        print(f"COMPILE{_compile_once(args.pytree, args.compile_one)}")
        return
    if args.fresh:
        trees = (args.pytree,) if args.pytree else ("gpt2", "resnet50")
        rows = fresh_compiles(trees, tuple(args.fresh.split(",")), args.repeats)
        with open(os.path.join(HERE, "xla_hints_fresh.json"), "w") as f:
            json.dump(rows, f, indent=1)
        text = ("# Compile time of the update, each variant in a process of its own\n\n"
                f"Measured on CPU only ({os.cpu_count()} cores); the variants' order reversed "
                "on every other repeat.\n\n" + fresh_table(rows) + "\n")
        with open(os.path.join(HERE, "xla_hints_fresh.md"), "w") as f:
            f.write(text)
        print(text)
        return
    _patch()
    trees = {args.pytree: update_cost.pytrees(False)[args.pytree]}
    # A throwaway compile first: the process's first compile pays one-time costs.
    together = tuple(t for t in args.together.split(",") if t)
    update_cost.build(specs(args.pytree)[0], trees[args.pytree][0])
    rows, _, _ = update_cost.run_cases(specs(args.pytree, together), trees, args.rounds,
                                       args.calls)
    for r in rows:
        r["run"] = args.run
    path = os.path.join(HERE, "xla_hints.json")
    old = json.load(open(path)) if os.path.exists(path) else []
    rows = [r for r in old if (r["pytree"], r.get("run", 1)) != (args.pytree, args.run)] + rows
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    order = {t: i for i, t in enumerate(("mlp", "gpt2", "resnet50"))}
    rows.sort(key=lambda r: (order[r["pytree"]], r.get("run", 1)))
    text = ("# XLA hints against their removal\n\nThe update of `scale_by_mlbfgs` (M = 2, "
            f"T = 10), measured on CPU only ({os.cpu_count()} cores), {args.rounds} "
            "interleaved rounds per pytree and run (each run its own process, after one "
            "throwaway compile, except in run 1), least round median; "
            "ratios below 1: the update is cheaper without the site.\n\n" + table(rows) + "\n")
    with open(os.path.join(HERE, "xla_hints.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
