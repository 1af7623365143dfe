"""The weight-decay study's table, read from a ``batch_scaling.py`` results file.

Per task, batch and optimizer (its best lr, 3 seeds): median steps to the training-loss
target, median final training loss, and on the held-out split the median final loss, the
median lowest loss over the run and the median final accuracy (min-max over seeds).

    python -m examples.benchmarks.research.weight_decay_table \\
        examples/benchmarks/results/batch_scaling_weight_decay/batch_scaling.json
"""

from __future__ import annotations

import json
import sys

import numpy as np


def _cell(values, fmt):
    v = np.asarray(values, float)
    return f"{fmt(np.median(v))} ({fmt(v.min())}-{fmt(v.max())})"


def rows(path: str) -> list[str]:
    data = json.load(open(path))
    out = ["| task | batch | optimizer | lr | steps to train target | final train loss | "
           "final held-out loss | lowest held-out loss | final held-out acc |",
           "|---|---|---|---|---|---|---|---|---|"]
    for task, t in data["tasks"].items():
        for name, per_batch in t["results"].items():
            for batch, r in per_batch.items():
                runs = r["runs"]
                steps = [x["steps_to_train_target"] or np.inf for x in runs]
                med = np.median(steps)
                out.append("| " + " | ".join([
                    task, batch, name, f"{r['lr']:g}",
                    ("∞" if np.isinf(med) else f"{med:.0f}") + f" ({sum(np.isfinite(steps))}/3)",
                    _cell([x["final_train_loss"] for x in runs], lambda v: f"{v:.3f}"),
                    _cell([x["curve"]["test_loss"][-1] for x in runs], lambda v: f"{v:.2f}"),
                    _cell([min(x["curve"]["test_loss"]) for x in runs], lambda v: f"{v:.3f}"),
                    _cell([x["final_test_acc"] for x in runs], lambda v: f"{v:.3f}"),
                ]) + " |")
    return out


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1])))
