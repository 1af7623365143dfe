"""Train a physics-informed network (PINN) with three recipes and plot solution and error.

The problem and the network are those of the PINN benchmark
(``examples/benchmarks/pinn.py``): by default the 1-D convection equation
u_t + 20 u_x = 0 with u(x, 0) = sin x on [0, 2 pi] x [0, 1], periodic in x, whose exact
solution is sin(x - 20 t); an MLP of 4 tanh layers of width 50; 500 collocation points per
gradient. Recipes, each with the same budget of gradient evaluations (every line-search
evaluation counted) and its learning rate tuned in the benchmark:

* Adam;
* Adam -> L-BFGS: Adam, then full-batch ``optax.lbfgs()`` (zoom line search) from the
  switch point on, the field's default recipe;
* mL-BFGS: ``mlbfgs_optax.mlbfgs(lr)`` (library defaults) on the same fixed points.

The figure shows the exact solution, each recipe's solution and error field, and the
relative L2 error against seconds (compilation excluded)::

    python examples/pinn_train.py                     # about a minute on one CPU core
    python examples/pinn_train.py --problem reaction --out /tmp/reaction.png
    python examples/pinn_train.py --quick             # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.benchmarks import pinn  # noqa: E402

DEFAULT_OUT = os.path.join("examples", "figures", "pinn_convection.png")

#: Learning rates (log10) and the Adam -> L-BFGS switch point that the benchmark's tuning
#: chose per problem (examples/benchmarks/results/pinn/pinn.md), for the three recipes.
TUNED = {
    "convection": {"adam": -1.5, "adam_lbfgs": (-1.5, 0.3), "mlbfgs": -2.5},
    "reaction": {"adam": -2.5, "adam_lbfgs": (-2.0, 0.1), "mlbfgs": -1.5},
    "wave": {"adam": -3.0, "adam_lbfgs": (-3.5, 0.1), "mlbfgs": -3.0},
    "poisson": {"adam": -3.0, "adam_lbfgs": (-3.0, 0.1), "mlbfgs": -2.5},
}


def train(problem_name: str, settings: pinn.Settings, seed: int = 0,
          mlbfgs_kwargs: dict | None = None) -> dict:
    """The three recipes on one problem: ``{recipe: {"trace", "params"}}`` and the runner."""
    runner = pinn.Runner(pinn.make_problem(problem_name), settings)
    tuned = TUNED[problem_name]
    methods = pinn.all_methods()
    runs = {}
    runs["Adam"] = runner.run_first(methods["adam"], 10.0 ** tuned["adam"], seed)
    lr, switch = tuned["adam_lbfgs"]
    runs["Adam -> L-BFGS"] = runner.run_hybrid(10.0 ** lr, switch, seed)
    mlbfgs = methods["mlbfgs"]
    if mlbfgs_kwargs:
        import mlbfgs_optax

        mlbfgs = dataclasses.replace(
            mlbfgs, make=lambda s: mlbfgs_optax.mlbfgs(s, **mlbfgs_kwargs))
    runs["mL-BFGS"] = runner.run_first(mlbfgs, 10.0 ** tuned["mlbfgs"], seed)
    return {"runs": runs, "runner": runner}


def plot(result: dict, path: str | None = None):
    """Exact solution, each recipe's solution and |error|, and error against seconds."""
    import matplotlib

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runner, runs = result["runner"], result["runs"]
    problem = runner.problem
    pts = runner.eval_pts
    nx = len(runner.edges[0])
    shape = (nx, pts.shape[0] // nx)
    extent = (problem.lo[1], problem.hi[1], problem.lo[0], problem.hi[0])
    exact = np.asarray(runner.u_exact).reshape(shape)
    fig, axes = plt.subplots(2, len(runs) + 1, figsize=(4 * (len(runs) + 1), 7))
    kw = dict(aspect="auto", origin="lower", extent=extent)
    im = axes[0, 0].imshow(exact, cmap="RdBu_r", **kw)
    axes[0, 0].set(title="exact solution", xlabel="t (or y)", ylabel="x")
    fig.colorbar(im, ax=axes[0, 0])
    for j, (name, run) in enumerate(runs.items(), start=1):
        u = np.asarray(pinn.network(run["params"], problem)(pts)).reshape(shape)
        err = pinn.final(run["trace"])[1]
        im = axes[0, j].imshow(u, cmap="RdBu_r", vmin=exact.min(), vmax=exact.max(), **kw)
        axes[0, j].set(title=f"{name}: rel. L2 error {err:.2g}", xlabel="t (or y)")
        fig.colorbar(im, ax=axes[0, j])
        im = axes[1, j].imshow(np.abs(u - exact), cmap="magma", **kw)
        axes[1, j].set(title=f"{name}: |u - u*|", xlabel="t (or y)")
        fig.colorbar(im, ax=axes[1, j])
        trace = np.array(run["trace"])
        axes[1, 0].plot(trace[:, 1], trace[:, 3], marker=".", label=name)
    axes[1, 0].set(xlabel="seconds (training only)", ylabel="relative L2 error", yscale="log",
                   title=problem.name)
    axes[1, 0].grid(alpha=0.3)
    axes[1, 0].legend()
    fig.tight_layout()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="convection", choices=pinn.PROBLEMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=pinn.BUDGET,
                        help="gradient evaluations per recipe")
    parser.add_argument("--out", default=None, help=f"figure path (default {DEFAULT_OUT}; "
                        "--quick saves none unless given)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    settings = (pinn.QUICK if args.quick
                else dataclasses.replace(pinn.Settings(), budget=args.budget))
    result = train(args.problem, settings, args.seed)
    print(f"{args.problem}: {settings.budget} gradient evaluations per recipe, "
          f"jax {jax.__version__}")
    print(f"{'recipe':16s} {'rel. L2 error':>14s} {'loss':>10s} {'grads':>6s} {'seconds':>8s}")
    for name, run in result["runs"].items():
        g, s, loss, err = run["trace"][-1]
        print(f"{name:16s} {err:14.3e} {loss:10.3e} {g:6d} {s:8.2f}")
    out = args.out or (None if args.quick else DEFAULT_OUT.replace("convection", args.problem))
    if out:
        plot(result, out)
        print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
