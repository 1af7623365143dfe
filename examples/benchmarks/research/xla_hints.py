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

import jax.numpy as jnp

import mlbfgs_optax
from examples.benchmarks import update_cost
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
        return mlbfgs_optax.scale_by_mlbfgs(update_period=update_cost.PERIOD, **kw)
    return make


def specs(tree: str) -> list[dict]:
    out = []
    for config, kw, sites, trees in CONFIGS:
        if tree not in trees:
            continue
        for removed in [()] + [(s,) for s in sites]:
            name = "as is" if not removed else f"without {removed[0]}"
            out.append(dict(name=f"{config} | {name}", period=update_cost.PERIOD,
                            kind="mlbfgs", memory=2, tx=_maker(kw, removed)))
    return out


def table(rows: list[dict]) -> str:
    base = {r["name"].split(" | ")[0] + r["pytree"]: r for r in rows
            if r["name"].endswith("| as is")}
    lines = ["| pytree | configuration | variant | compile s | ordinary ms | pair ms | "
             "compile / as is | ordinary / as is | pair / as is |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config, variant = r["name"].split(" | ")
        b = base[config + r["pytree"]]
        cells = [r["pytree"], config, variant, f"{r['compile_s']:.2f}",
                 f"{r['ordinary_ms']:.1f}", f"{r['pair_ms']:.1f}"]
        if r is b:
            cells += ["", "", ""]
        elif r["program"] == b["program"]:
            cells += ["same program", "", ""]
        else:
            cells += [f"{r[k] / b[k]:.2f}" for k in ("compile_s", "ordinary_ms", "pair_ms")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pytree", choices=("mlp", "gpt2", "resnet50"), required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    _patch()
    trees = {args.pytree: update_cost.pytrees(False)[args.pytree]}
    rows, _, _ = update_cost.run_cases(specs(args.pytree), trees, args.rounds, args.calls)
    path = os.path.join(HERE, "xla_hints.json")
    old = json.load(open(path)) if os.path.exists(path) else []
    rows = [r for r in old if r["pytree"] != args.pytree] + rows
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    order = {t: i for i, t in enumerate(("mlp", "gpt2", "resnet50"))}
    rows.sort(key=lambda r: order[r["pytree"]])
    text = ("# XLA hints against their removal\n\nThe update of `scale_by_mlbfgs` (M = 2, "
            f"T = 10), measured on CPU only ({os.cpu_count()} cores), {args.rounds} "
            "interleaved rounds per pytree, least round median; ratios below 1: the "
            "update is cheaper without the site.\n\n" + table(rows) + "\n")
    with open(os.path.join(HERE, "xla_hints.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
