"""The suite's logistic regression with a budget in which its target is reached.

In the suite (2,000 steps) no optimizer gets the breast-cancer logistic regression to a gap of
1e-2, so its "steps to target" cannot compare them. This runs the same task, grids, schedule
and protocol (``examples.benchmarks.run.run_task``) for 20,000 steps, evaluated every 500.

    python -m examples.benchmarks.research.logreg_long [--opts sgd adamw mlbfgs_default]
"""

from __future__ import annotations

import argparse
import sys

from tqdm.auto import tqdm

from examples.benchmarks import harness, run
from examples.benchmarks.optimizers import SPEC_BY_NAME
from examples.benchmarks.tasks import make_task


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--opts", nargs="+", default=["sgd", "adamw", "mlbfgs_default"])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    task = make_task("logreg")
    task.steps, task.evals = args.steps, args.steps // 500
    specs = [SPEC_BY_NAME[o] for o in args.opts]
    ns = argparse.Namespace(quick=False, seeds=args.seeds)
    with tqdm(total=run._plan(task, specs, args.seeds, False), file=sys.stderr) as bar:
        res = run.run_task(task, specs, ns, bar, harness.measure_bandwidth())
    print(f"logreg, {res['steps']} steps, evaluated every {res['eval_every']}; target gap "
          f"{task.target}")
    print("| optimizer | lr | steps to target (median; seeds reaching) | final gap median "
          "[min, max] |")
    print("|---|---|---|---|")
    for name, s in res["summary"].items():
        steps = s["steps_to_target_median"]
        print(f"| {name} | {s['lr']:.3g} | {'–' if steps is None else int(steps)} "
              f"({s['reached']}/{len(s['seeds'])}) | {s['final_median']:.3g} "
              f"[{s['final_min']:.3g}, {s['final_max']:.3g}] |")


if __name__ == "__main__":
    main()
