"""Optimizer-state bytes per device for the three ways to shard a model.

On N (fake) devices, for a stand-in MLP (about 2.4M float32 parameters):

* ``fsdp``: every weight sharded on its first axis, ``mlbfgs(lr)`` with its
  default ``"leaf"`` blocks; the state follows the params;
* ``tensor_parallel``: every weight sharded on its last axis, same optimizer;
* ``zero``: params replicated, ``mlbfgs(lr, blocks=EqualSlices(2N), mesh=mesh,
  axis_name="data")``: the state is sharded over the data axis.

Writes ``layouts.{md,json}``; the README's distributed section quotes it::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m examples.benchmarks.layouts
"""

from __future__ import annotations

import argparse

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mlbfgs_optax
from examples.benchmarks import harness

LAYERS = [(1024, 1024), (1024, 1024), (1024, 256)]
LR = 1e-2


def measure(n: int) -> dict:
    """Bytes per device of each layout on the first ``n`` devices."""
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    params = harness.dense_params(LAYERS)
    whole = jax.eval_shape(mlbfgs_optax.mlbfgs(LR).init, params)
    single = mlbfgs_optax.state_nbytes(whole)
    single_ml = mlbfgs_optax.state_nbytes(mlbfgs_optax.find_mlbfgs_state(whole))
    specs = {
        "fsdp": lambda x: P("data") if x.shape[0] % n == 0 else P(),
        "tensor_parallel": lambda x: P(*(None,) * (x.ndim - 1), "data")
        if x.shape[-1] % n == 0 else P(),
        "zero": lambda x: P(),
    }
    out = {"n": n, "single_device_bytes": single, "single_device_mlbfgs_bytes": single_ml}
    for name, spec in specs.items():
        placed = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
        opt = (mlbfgs_optax.mlbfgs(LR, blocks=mlbfgs_optax.EqualSlices(2 * n), mesh=mesh,
                                   axis_name="data") if name == "zero"
               else mlbfgs_optax.mlbfgs(LR))
        state = opt.init(placed)
        out[name] = mlbfgs_optax.state_nbytes(state, per_device=True)
        out[name + "_mlbfgs"] = mlbfgs_optax.state_nbytes(
            mlbfgs_optax.find_mlbfgs_state(state), per_device=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=harness.DEFAULT_OUT)
    args = p.parse_args(argv)
    counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
    rows = [measure(n) for n in counts]
    n_params = sum(x.size for x in jax.tree.leaves(harness.dense_params(LAYERS)))
    md = [f"# Optimizer state bytes per device ({harness.library_version()}; "
          f"{harness.machine()})", "",
          f"MLP {LAYERS}, {n_params:,} float32 parameters, `mlbfgs` defaults (M = 10). "
          "Each cell: the whole optimizer state, then the mL-BFGS element's state alone "
          "(`find_mlbfgs_state`, which holds the momentum too, packed like the averages; "
          "the rest is the chain's scalar counters).", "",
          "| devices | one device | fsdp (leaf blocks) | tensor parallel (leaf blocks) | "
          "ZeRO (EqualSlices + mesh) |", "|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    for r in rows:
        cells = [f"{mib(r[k])} ({r['single_device_bytes'] / r[k]:.2f}x less); mL-BFGS "
                 f"{mib(r[k + '_mlbfgs'])} "
                 f"({r['single_device_mlbfgs_bytes'] / r[k + '_mlbfgs']:.2f}x less)"
                 for k in ("fsdp", "tensor_parallel", "zero")]
        md.append(f"| {r['n']} | {mib(r['single_device_bytes'])}; mL-BFGS "
                  f"{mib(r['single_device_mlbfgs_bytes'])} | " + " | ".join(cells) + " |")
    text = "\n".join(md) + "\n"
    print(text)
    harness.write_report(args.out, "layouts", {"rows": rows, "library": harness.library_version()},
                         text)


if __name__ == "__main__":
    main()
