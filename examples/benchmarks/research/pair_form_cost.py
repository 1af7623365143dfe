"""Cost of the pair forms: compile and step time of the update, same run, real widths.

The library's defaults before and after the curvature-pairs study (``pair_form="full",
sigma_low=0.1`` against ``pair_form="along_s", sigma_low=1``), every other argument at its
default (M = 2, T = 10), on the three real-width pytrees of ``update_cost.py``, timed in
interleaved rounds in one process (``update_cost.run_cases``). Writes
``pair_form_cost.md`` beside this file. Run from the repository root::

    python -m examples.benchmarks.research.pair_form_cost [--rounds 3]
"""

from __future__ import annotations

import argparse
import os

import mlbfgs_optax
from examples.benchmarks import update_cost

VARIANTS = {
    "full, sigma_low 0.1 (previous defaults)": dict(pair_form="full", sigma_low=0.1),
    "along_s, sigma_low 1 (defaults)": dict(pair_form="along_s", sigma_low=1.0),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    specs = [dict(name=n, period=update_cost.PERIOD, kind="mlbfgs", memory=2,
                  tx=(lambda kw=kw: mlbfgs_optax.scale_by_mlbfgs(
                      update_period=update_cost.PERIOD, **kw)))
             for n, kw in VARIANTS.items()]
    rows, _, _ = update_cost.run_cases(specs, update_cost.pytrees(False), args.rounds,
                                       args.calls)
    lines = ["| pytree | variant | compile s | ordinary step ms | pair step ms |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pytree']} | {r['name']} | {r['compile_s']:.2f} | "
                     f"{r['ordinary_ms']:.1f} | {r['pair_ms']:.1f} |")
    text = ("Update of `scale_by_mlbfgs` (M = 2, T = 10), measured on CPU only, "
            f"{args.rounds} interleaved rounds, least round median:\n\n" + "\n".join(lines)
            + "\n")
    with open(os.path.join(os.path.dirname(__file__), "pair_form_cost.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
