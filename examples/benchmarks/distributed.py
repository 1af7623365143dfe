"""Sharded mL-BFGS state: per-device memory, communication and step time vs device count.

Run from the repository root (the script asks XLA for 8 fake CPU devices itself
unless ``XLA_FLAGS`` already sets a device count)::

    python -m examples.benchmarks.distributed [--out DIR] [--repeats R]

For N = 1, 2, 4, 8 it builds a mesh of the first N devices of one process
(sub-meshes of the 8 fake devices; one process, so every N runs on the same
machine state) and the same optimizer,
``scale_by_mlbfgs(blocks=EqualSlices(16), mesh=mesh, axis_name="data")`` with
the library defaults (memory 10), on a ~10M-parameter float32 pytree. The
number of blocks is fixed at 16 for every N, so the mathematics is the same and
only the placement changes. Measured:

* **state bytes per device**: the sum of ``shard.data.nbytes`` over
  ``addressable_shards`` of the state returned by ``init`` (largest device);
* **communication per step**: the collectives of the compiled update
  (``jax.jit(update).lower(...).compile().as_text()``): every ``all-gather``,
  ``all-reduce``, ``reduce-scatter``, ``all-to-all`` and ``collective-permute``
  (and their ``-start`` forms), operand shapes and dtypes looked up from the
  instructions that define the operands, group size from ``replica_groups``.
  Bytes one device sends per step under ring algorithms: all-gather
  ``(n-1) * operand``, all-reduce ``2 (n-1)/n * operand``, reduce-scatter and
  all-to-all ``(n-1)/n * operand``, collective-permute ``operand``. This is
  compared with the gradient all-reduce that data parallelism already pays
  every step: ``n_params * 4 bytes * 2 (N-1)/N`` (ring all-reduce of a float32
  gradient). Also reported for ``normalize=True`` (three extra scalar
  all-reduces for the global norm);
* **optimizer-only step time**: the jitted ``update(grads, state, params)``
  with the state donated, replicated grads and params (as after the gradient
  all-reduce), blocked after every call; the median of ``--repeats`` calls
  after 3 warm-up calls. With ``update_period=10`` one call in ten also forms a
  curvature pair; the median is an ordinary step.

Fake CPU devices share the machine's cores (here 2), so the step time cannot
fall with N on this machine: the memory column is the claim this benchmark
checks. Writes ``distributed.json`` and ``distributed.md`` to ``--out``.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlbfgs_optax  # noqa: E402
from examples.benchmarks import harness  # noqa: E402
from examples.common import bytes_per_device  # noqa: E402

NUM_BLOCKS = 16
# Three dense layers with biases: 2048x2048, 2048x2048, 2048x768 -> 9,966,336 parameters.
LAYERS = ((2048, 2048), (2048, 2048), (2048, 768))

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>\([^=]*?\)|\S+)\s+"
                    r"(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _type_bytes(type_str: str) -> int:
    """Bytes of an HLO type: ``f32[8,376]{1,0}`` or a tuple of such."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_str):
        if dtype not in _DTYPE_BYTES:
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _group_size(rest: str, default: int) -> int:
    """Participants per replica group, from any of XLA's printed formats."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)  # {{0,1,2,3},...}
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)  # iota: [groups,size]<=[n]
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)  # mesh[...] {axes}
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in
                     (kv.split("=") for kv in m.group(1).split(",")))
        axes = [a.strip("' ") for a in m.group(2).split(",") if a.strip("' ")]
        return math.prod(sizes[a] for a in axes)
    return default


def hlo_communication(hlo: str, num_devices: int) -> dict:
    """Collectives in compiled HLO text and the bytes one device sends for them."""
    shapes, found = {}, []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        shapes[m["name"]] = m["type"]
        op = m["op"]
        base = op[:-len("-start")] if op.endswith("-start") else op
        if base not in _COLLECTIVES:
            continue
        operands = [a.strip().lstrip("%") for a in m["args"].split(",") if a.strip()]
        operand_bytes = sum(_type_bytes(shapes.get(a, "")) for a in operands)
        n = _group_size(m["rest"], num_devices)
        if base == "all-gather":
            sent = (n - 1) * operand_bytes
        elif base == "all-reduce":
            sent = 2 * (n - 1) / n * operand_bytes
        elif base == "collective-permute":
            sent = operand_bytes
        else:
            sent = (n - 1) / n * operand_bytes
        found.append({"op": base, "name": m["name"], "operand_bytes": operand_bytes,
                      "group_size": n, "bytes_sent_per_device": sent})
    return {"collectives": found,
            "bytes_sent_per_device": sum(c["bytes_sent_per_device"] for c in found)}


def measure(n: int, params, repeats: int, memory_size: int) -> dict:
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    kw = dict(memory_size=memory_size, blocks=mlbfgs_optax.EqualSlices(NUM_BLOCKS),
              mesh=mesh, axis_name="data")
    tx = mlbfgs_optax.scale_by_mlbfgs(**kw)
    replicated = NamedSharding(mesh, P())
    p = jax.device_put(params, replicated)
    g = jax.device_put(jax.tree.map(lambda x: 1e-3 * jnp.cos(x), params), replicated)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    with jax.set_mesh(mesh):
        state = tx.init(p)
        per_dev = bytes_per_device(state)
        comm = {}
        for normalize in (False, True):
            t = mlbfgs_optax.scale_by_mlbfgs(normalize=normalize, **kw)
            hlo = jax.jit(t.update).lower(g, state, p).compile().as_text()
            comm[normalize] = hlo_communication(hlo, n)
        update = jax.jit(tx.update, donate_argnums=1)
        times = []
        for i in range(3 + repeats):
            start = time.perf_counter()
            d, state = update(g, state, p)
            jax.block_until_ready((d, state))
            if i >= 3:
                times.append(time.perf_counter() - start)
        del d, state
    grad_allreduce = num_params * 4 * 2 * (n - 1) / n
    return {
        "devices": n,
        "state_bytes_per_device_max": max(per_dev.values()),
        "state_bytes_per_device": per_dev,
        "state_bytes_total": sum(per_dev.values()),
        "comm_bytes_per_device": comm[False]["bytes_sent_per_device"],
        "comm_bytes_per_device_normalize": comm[True]["bytes_sent_per_device"],
        "collectives": comm[False]["collectives"],
        "collectives_normalize": comm[True]["collectives"],
        "grad_allreduce_bytes_per_device": grad_allreduce,
        "update_ms_median": 1e3 * statistics.median(times),
        "update_ms_min": 1e3 * min(times),
        "update_ms_all": [1e3 * t for t in times],
    }


def markdown(r: dict) -> str:
    base = r["rows"][0]["state_bytes_per_device_max"]
    lines = [
        "# Sharded mL-BFGS state vs device count",
        "",
        f"{r['num_params']:,} float32 parameters ({r['leaves_desc']}); "
        f"`scale_by_mlbfgs(blocks=EqualSlices({r['num_blocks']}), mesh=mesh, "
        f"axis_name='data')`, library defaults (memory {r['memory_size']}, update period "
        f"{r['update_period']}). One process, {r['machine']}; N = sub-mesh of the first N "
        f"fake CPU devices. Library: {r['library']}, jax {r['jax']}, "
        f"optax {r['optax']}. 1-minute load average "
        f"before / after: {r['load_average_1min_before_after'][0]:.1f} / "
        f"{r['load_average_1min_before_after'][1]:.1f} (shared machine: times are noisy).",
        "",
        "| N | state bytes per device | N=1 bytes / this | optimizer comm per device per step "
        "(normalize=True) | gradient ring all-reduce per device | optimizer / gradient "
        "| update ms (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        n = row["devices"]
        ratio = (f"{row['comm_bytes_per_device'] / row['grad_allreduce_bytes_per_device']:.3f}"
                 if n > 1 else "–")
        lines.append(
            f"| {n} | {row['state_bytes_per_device_max']:,} "
            f"| {base / row['state_bytes_per_device_max']:.4f} "
            f"| {row['comm_bytes_per_device']:,.0f} "
            f"({row['comm_bytes_per_device_normalize']:,.0f}) "
            f"| {row['grad_allreduce_bytes_per_device']:,.0f} | {ratio} "
            f"| {row['update_ms_median']:.1f} |")
    ops = sorted({c["op"] for row in r["rows"] for c in row["collectives"]})
    lines += [
        "",
        "* **State bytes per device**: sum of `shard.data.nbytes` over the state's "
        "`addressable_shards`, largest device. `N=1 bytes / this` = N means exactly 1/N of "
        "the single-device state (the few replicated scalars, `count` and 4 average weights, "
        "are the only excess).",
        "* **Communication**: parsed from the compiled update's HLO; collectives found: "
        f"{', '.join(ops) or 'none'}. Bytes one device sends (ring): all-gather (n-1) x "
        "operand, all-reduce 2(n-1)/n x operand. `normalize=True` adds three scalar "
        "all-reduces (global norm), shown in parentheses. The data-parallel gradient all-reduce every step already pays is "
        "n_params x 4 B x 2(N-1)/N; the optimizer's one all-gather of the float32 "
        "direction is n_params x 4 B x (N-1)/N (plus block padding), i.e. half of it.",
        f"* **Update ms**: jitted `update` alone, state donated, median of {r['repeats']} "
        "calls after 3 warm-ups, blocked after each call. The fake CPU devices share the "
        f"same {os.cpu_count()} cores, so the time cannot fall with N here (every device "
        "does 1/N of the two-loop work, but all devices run on the same cores, plus the "
        "all-gather and per-device launch overhead); on real accelerators each device "
        "would do 1/N of it in parallel. The memory column is the claim this benchmark "
        "checks.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=harness.DEFAULT_OUT)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--memory-size", type=int, default=10)
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--quick", action="store_true",
                   help="small pytree (2 x 256x256) and 2 repeats, for a smoke test; "
                   "writes nothing unless --out is given")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    if max(counts) > jax.device_count():
        raise SystemExit(f"needs {max(counts)} devices, have {jax.device_count()}; set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8")
    layers = LAYERS
    if args.quick:
        layers, args.repeats = ((256, 256), (256, 256)), 2
    params = harness.dense_params(layers)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    load_before = os.getloadavg()[0]
    for n in counts:
        row = measure(n, params, args.repeats, args.memory_size)
        print(f"N={n}: state {row['state_bytes_per_device_max']:,} B/device, comm "
              f"{row['comm_bytes_per_device']:,.0f} B/device/step (gradient all-reduce "
              f"{row['grad_allreduce_bytes_per_device']:,.0f}), update "
              f"{row['update_ms_median']:.1f} ms", flush=True)
        rows.append(row)
    result = {
        "num_params": int(num_params),
        "leaves": [list(s) for s in layers],
        "leaves_desc": " + ".join(f"{a}x{b}" for a, b in layers) + " dense layers with biases",
        "num_blocks": NUM_BLOCKS,
        "memory_size": args.memory_size,
        "update_period": 10,
        "repeats": args.repeats,
        "library": harness.library_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "machine": harness.machine(),
        "mode": "one process, 8 fake CPU devices, sub-mesh of the first N",
        "grad_allreduce_formula": "n_params * 4 bytes * 2 (N-1) / N",
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "rows": rows,
    }
    md = markdown(result)
    if not args.quick or "--out" in (argv if argv is not None else sys.argv[1:]):
        harness.write_report(args.out, "distributed", result, md)
    print(md)
    return result


if __name__ == "__main__":
    main()
