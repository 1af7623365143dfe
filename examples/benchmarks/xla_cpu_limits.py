"""Where XLA:CPU, not the algorithm, sets the cost of the update: each limit with its HLO.

Run from the repository root::

    python -m examples.benchmarks.xla_cpu_limits [--out DIR] [--calls N]

Six probes on one 1024 x 1024 float32 leaf with a history of M = 10 rows (the size of
a leaf of the ``mlp`` pytree of :mod:`examples.benchmarks.update_cost`), each timed as
the least of ``--calls`` calls and shown with the lines of the compiled HLO that cause it:

1. **copy of a reshaped vector**: :math:`q = g / \\sqrt{\\nu}` read by the two history
   products alone is written once, in the products' shape. Read also by the reduction
   :math:`q^\\top q` (a YNNPACK fusion that reads it in the leaf's shape), it is written
   in the leaf's shape and then copied by a fusion of bitcasts alone (a reshape that
   should cost nothing): one parameter vector written and read more per step. Computing
   :math:`q^\\top q` of a :math:`q` recomputed apart avoids the copy, at the price of the
   square roots again in the reduction; an input vector (``q = g``, no metric) is copied
   the same way.
2. **one pass for several vectors**: :math:`S^\\top [v_1, v_2, v_3]` as one skinny
   product against three matrix-vector products and one. A pair step that read the
   history once for the direction's products and the new Gram rows needs the skinny
   product at the speed of one matrix-vector product.
3. **bfloat16 products**: the matrix-vector product of a bfloat16 history against a
   float32 one: XLA:CPU converts the history to float32 first (a history-sized
   temporary), so the narrower history moves more bytes, not fewer. The library reads
   a bfloat16 history on CPU by a multiply-reduce instead (no temporary), which is
   faster than that but slower than the float32 product.
4. **bandwidth of the products**: the matrix-vector product against ``y = a * x + y``
   in GB/s (medians).
5. **the ordinary step's passes alone**: the history products, the combining pass and
   the averages, each timed alone on the leaf, their sum against Adam's update of it.
6. **fresh temporaries**: minor page faults per call of the compiled update of
   :func:`mlbfgs_optax.scale_by_mlbfgs` (M = 10) and of ``optax.adam`` on the ``mlp``
   pytree, with the update's temporary bytes: XLA:CPU allocates the temporaries anew on
   every call (above 32 MiB, fresh pages from the kernel), Adam has none; and one small
   program at 16.8 and 67.1 MB of temporaries, on either side of that size.

Writes ``xla_cpu_limits.{json,md}`` to ``--out`` (default ``examples/benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.benchmarks import harness
from mlbfgs_optax import _block_ops

M = 10
SIDE = 1024
N = SIDE * SIDE


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _time_ms(fn, make_args, calls: int, stat=min) -> float:
    """``stat`` of ``calls`` timed calls ``fn(*make_args())`` in ms, after one untimed call.

    The arguments are made anew, untimed, before every call (so a function that
    donates them gets fresh ones).
    """
    jax.block_until_ready(fn(*make_args()))
    times = []
    for _ in range(calls):
        args = jax.block_until_ready(make_args())
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(stat(times)) * 1e3


def _entry_ops(text: str) -> list[str]:
    """The operations of the entry computation, parameters, tuples and bitcasts left out."""
    entry = text.split("\nENTRY")[1]
    ops = re.findall(r"= \S+ ([\w\-]+)\(", entry)
    return [o for o in ops if o not in ("parameter", "tuple", "get-tuple-element", "bitcast",
                                        "constant")]


def _bitcast_only_fusions(text: str) -> list[str]:
    """The fusions whose every instruction is a parameter or a bitcast: copies."""
    out = []
    for name, body in re.findall(r"\n(%[\w.\-]+) \([^\n]*\) -> [^\n]*\{\n((?:  [^\n]*\n)*)\}",
                                 text):
        kinds = re.findall(r"= \S+ ([\w\-]+)\(", body)
        if kinds and set(kinds) <= {"parameter", "bitcast"}:
            users = re.findall(r"\n  ((?:ROOT )?%[\w.\-]+ = [^\n]*calls=" + re.escape(name)
                               + r"(?![\w.\-])[^\n]*)", text)
            out += [re.sub(r", metadata=\{.*", "", u) for u in users]
    return out


def probe_copy(calls: int) -> dict:
    """Who reads ``q`` decides whether XLA:CPU copies it: four programs, same products."""
    key = jax.random.key(0)
    s, y = (jax.random.normal(k, (M, SIDE, SIDE)) for k in jax.random.split(key, 2))
    g = jax.random.normal(key, (SIDE, SIDE))
    nu = jnp.abs(g) + 1.0
    whiten = lambda g, nu: g * jax.lax.rsqrt(nu + 1e-8)
    products = lambda s, y, q: (jnp.einsum("mij,ij->m", s, q), jnp.einsum("mij,ij->m", y, q))

    def with_norm(s, y, g, nu):
        q = whiten(g, nu)
        return (*products(s, y, q), jnp.sum(q * q))

    def norm_apart(s, y, g, nu):
        # q^T q of a q recomputed from g and a barrier's nu: the same arithmetic, but a
        # value of its own, so that the products' q has the products alone as readers.
        q = whiten(g, jax.lax.optimization_barrier(nu))
        return (*products(s, y, whiten(g, nu)), jnp.sum(q * q))

    variants = {
        "the two products": lambda s, y, g, nu: products(s, y, whiten(g, nu)),
        "the two products and q^T q (as in the update)": with_norm,
        "the two products; q^T q of q recomputed apart": norm_apart,
        "the two products, q = g an input (no metric)": lambda s, y, g, nu: products(s, y, g),
    }
    out = {}
    for name, fn in variants.items():
        c = _compiled(fn, s, y, g, nu)
        text = c.as_text()
        out[name] = {"ms": _time_ms(c, lambda: (s, y, g, nu), calls), "ops": _entry_ops(text),
                     "temp_MB": c.memory_analysis().temp_size_in_bytes / 1e6,
                     "copies": _bitcast_only_fusions(text)}
    return out


def probe_single_pass(calls: int) -> dict:
    key = jax.random.key(1)
    h = jax.random.normal(key, (M, N))
    v = jax.random.normal(key, (3, N))
    variants = {
        "one matrix-vector product, S^T v_1": lambda h, v: h @ v[0],
        "three matrix-vector products": lambda h, v: [h @ v[i] for i in range(3)],
        "one skinny product, S^T [v_1 v_2 v_3]": lambda h, v: jnp.einsum("mn,kn->mk", h, v),
    }
    out = {}
    for name, fn in variants.items():
        c = _compiled(fn, h, v)
        out[name] = {"ms": _time_ms(c, lambda: (h, v), calls), "ops": _entry_ops(c.as_text())}
    return out


def probe_bf16(calls: int) -> dict:
    """The history products in float32; of a bfloat16 history, XLA's and the library's."""
    key = jax.random.key(2)
    q = jax.random.normal(key, (N,))
    product = lambda h, q: jnp.einsum("mn,n->m", h, q, preferred_element_type=jnp.float32)
    # The library's products of a bfloat16 history stored for a leaf of its own,
    # (units, M, *shape): given in that shape (reshaped inside the program, the same
    # reduction compiled to a kernel several times slower).
    library = lambda h, q: _block_ops._history_matvec(h, q, jnp.float32)
    out = {}
    for name, dtype, fn, shape in (
            ("float32", jnp.float32, product, (M, N)),
            ("bfloat16, mixed-precision product", jnp.bfloat16, product, (M, N)),
            ("bfloat16, the library's multiply-reduce", jnp.bfloat16, library,
             (1, M, SIDE, SIDE))):
        h = jax.random.normal(key, (M, N)).astype(dtype).reshape(shape)
        q = q.reshape((N,) if len(shape) == 2 else (1, SIDE, SIDE))
        c = _compiled(fn, h, q)
        text = c.as_text()
        converts = [re.sub(r", metadata=\{.*", "", line.strip())
                    for line in text.split("\nENTRY")[1].split("\n")
                    if re.search(rf"f32\[{M},{N}\]", line) and "fusion(" in line]
        mem = c.memory_analysis()
        out[name] = {
            "ms": _time_ms(c, lambda: (h, q), calls), "ops": _entry_ops(text),
            "history_sized_f32": converts,
            "temp_MB": None if mem is None else mem.temp_size_in_bytes / 1e6}
    return out


def probe_bandwidth(calls: int) -> dict:
    """Median GB/s of the matrix-vector product and of ``y = a * x + y`` (the floor's)."""
    key = jax.random.key(3)
    h = jax.random.normal(key, (M, N))
    q = jax.random.normal(key, (N,))
    gemv = _compiled(lambda h, q: h @ q, h, q)
    ms = _time_ms(gemv, lambda: (h, q), calls, np.median)
    return {"gemv_GBps": 4 * M * N / ms / 1e6,
            "axpy_GBps": harness.measure_bandwidth(repeats=calls) / 1e9}


def probe_passes(calls: int) -> dict:
    """The passes an ordinary step (M = 10) must make over one leaf, each timed alone.

    The history products (two matrix-vector products), the combining pass (reads the
    2M history rows, q and D, writes d in place) and the elementwise rest (the two
    averages and the second moment read and written in place, g and theta read): the
    least time XLA:CPU's own kernels give a step of 4M + 9 words per parameter, against
    Adam's update on the same leaf.
    """
    key = jax.random.key(4)
    ks = jax.random.split(key, 8)
    s, y = (jax.random.normal(k, (M, SIDE, SIDE)) for k in ks[:2])
    g, theta, a1, a2, nu, r = (jax.random.normal(k, (SIDE, SIDE)) for k in ks[2:])
    c = jnp.linspace(0.1, 1.0, 2 * M)
    products = _compiled(lambda s, y, q: (jnp.einsum("mij,ij->m", s, q),
                                          jnp.einsum("mij,ij->m", y, q)), s, y, g)

    def combine(d, s, y, r, c):
        out = 0.5 * d * r
        for m in range(M):
            out = out + c[m] * s[m] + c[M + m] * y[m]
        return out * r

    comb = jax.jit(combine, donate_argnums=0)
    rest = jax.jit(lambda a1, a2, nu, g, theta: (0.9 * a1 + 0.1 * theta, 0.9 * a2 + 0.1 * g,
                                                 0.99 * nu + 0.01 * g * g),
                   donate_argnums=(0, 1, 2))
    adam = jax.jit(lambda g, m, v: (0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g,
                                    (0.9 * m + 0.1 * g) / (jnp.sqrt(0.99 * v + 0.01 * g * g)
                                                          + 1e-8)), donate_argnums=(0, 1, 2))

    fresh = lambda x: x + 0.0
    out = {
        "history products": _time_ms(products, lambda: (s, y, g), calls),
        "combining pass": _time_ms(comb, lambda: (fresh(g), s, y, r, c), calls),
        "averages and second moment": _time_ms(
            rest, lambda: (fresh(a1), fresh(a2), fresh(nu), g, theta), calls),
    }
    out["sum"] = sum(out.values())
    out["adam"] = _time_ms(adam, lambda: (fresh(g), fresh(a1), fresh(nu)), calls)
    return out


def probe_faults(calls: int) -> dict:
    params = harness.dense_params(((SIDE, SIDE),) * 4)
    grads = jax.jit(lambda k: jax.tree.map(
        lambda x: 0.01 * jax.random.normal(k, x.shape, x.dtype), params))
    out = {}
    for name, tx in (("adam", optax.adam(1e-3)),
                     ("mlbfgs M=10", mlbfgs_optax.scale_by_mlbfgs(memory_size=M,
                                                                 update_period=10))):
        step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p), donate_argnums=(0, 1))
        state = tx.init(params)
        mem = step.lower(params, state, params).compile().memory_analysis()
        for i in range(3 * 10):  # past the first pairs
            _, state = step(grads(jax.random.key(i)), state, params)
        faults, ms = [], []
        for i in range(calls):
            g = jax.block_until_ready(grads(jax.random.key(100 + i)))
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            u, state = step(g, state, params)
            jax.block_until_ready((u, state))
            ms.append((time.perf_counter() - t) * 1e3)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            del u
        ordinary = [f for i, f in enumerate(faults) if name == "adam" or (i + 31) % 10]
        out[name] = {"faults_per_ordinary_call": sorted(ordinary)[len(ordinary) // 2],
                     "temp_MB": None if mem is None else mem.temp_size_in_bytes / 1e6}
    return out


def probe_temp_sizes(calls: int) -> list[dict]:
    """Minor page faults per call of one small program at two sizes of its temporaries."""
    out = []
    for n in (1 << 21, 1 << 23):  # 16.8 and 67.1 MB of temporaries
        h, x = jnp.ones((2, n)), jnp.ones((n,))
        c = _compiled(lambda h, x: (h @ jnp.sin(x), jnp.sum(jnp.sin(x) ** 2)), h, x)
        for _ in range(3):
            jax.block_until_ready(c(h, x))
        faults = []
        for _ in range(calls):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            jax.block_until_ready(c(h, x))
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        out.append({"temp_MB": c.memory_analysis().temp_size_in_bytes / 1e6,
                    "faults_per_call": sorted(faults)[len(faults) // 2]})
    return out


def markdown(r: dict) -> str:
    copy, single, bf16, bw, faults = (r[k] for k in ("copy", "single_pass", "bf16",
                                                      "bandwidth", "faults"))
    lines = [
        "# Where XLA:CPU sets the cost of the update",
        "",
        f"{r['library']}; jax {r['jax']}; {r['machine']}; measured on CPU only. "
        f"One 1024 x 1024 float32 leaf, history M = {M}; least of {r['calls']} calls.",
        "",
        "## 1. A copy of the reshaped vector q",
        "",
        "`q = g / sqrt(nu)` read by the two history products; what else reads it decides "
        "whether XLA:CPU copies it (copies: fusions made of bitcasts alone, each writes a "
        "copy of its operand):",
        "",
        "| q read by | ms | temporaries MB | copies | compiled operations |",
        "|---|---|---|---|---|",
        *[f"| {k} | {v['ms']:.2f} | {v['temp_MB']:.1f} | {len(v['copies'])} | "
          f"{', '.join(v['ops'])} |" for k, v in copy.items()],
        "",
        *[f"    {c}" for c in dict.fromkeys(c for v in copy.values() for c in v["copies"])],
        "",
        "## 2. One pass over the history for several vectors",
        "",
        "| product | ms | compiled operations |",
        "|---|---|---|",
        *[f"| {k} | {v['ms']:.2f} | {', '.join(v['ops'])} |" for k, v in single.items()],
        "",
        "## 3. bfloat16 history",
        "",
        "| history and its products | ms | temporaries MB | history-sized float32 buffers |",
        "|---|---|---|---|",
        *[f"| {k} | {v['ms']:.2f} | {v['temp_MB']:.1f} | {'; '.join(v['history_sized_f32']) or '-'} |"
          for k, v in bf16.items()],
        "",
        "## 4. Bandwidth",
        "",
        f"Median of {r['calls']} calls: matrix-vector product {bw['gemv_GBps']:.1f} GB/s; "
        f"y = a * x + y {bw['axpy_GBps']:.1f} GB/s (16M numbers, as in `update_cost.py`).",
        "",
        "## 5. The ordinary step's passes, each alone (one 1024 x 1024 leaf, M = 10)",
        "",
        "| pass | ms |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in r["passes"].items()],
        "",
        f"Their sum is {r['passes']['sum'] / r['passes']['adam']:.1f}x Adam's update of the "
        f"same leaf (the project's limit: (4M + 7)/6 = {(4 * M + 7) / 6:.1f}x).",
        "",
        "## 6. Fresh temporaries on every call",
        "",
        "| update (4 x 1024² + biases) | minor page faults per ordinary call | temporaries MB |",
        "|---|---|---|",
        *[f"| {k} | {v['faults_per_ordinary_call']} | {v['temp_MB']:.1f} |"
          for k, v in faults.items()],
        "",
        "One small program (a matrix-vector product and a reduction of `sin(x)`) at two "
        "sizes: " + "; ".join(f"{t['temp_MB']:.1f} MB of temporaries, {t['faults_per_call']} "
                               "minor page faults per call" for t in r["temp_sizes"]) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)
    r = {"library": harness.library_version(), "jax": jax.__version__,
         "machine": harness.machine(), "calls": args.calls,
         "copy": probe_copy(args.calls), "single_pass": probe_single_pass(args.calls),
         "bf16": probe_bf16(args.calls), "bandwidth": probe_bandwidth(args.calls),
         "passes": probe_passes(args.calls), "faults": probe_faults(args.calls),
         "temp_sizes": probe_temp_sizes(args.calls)}
    text = markdown(r)
    harness.write_report(args.out, "xla_cpu_limits", r, text)
    print(text)


if __name__ == "__main__":
    main()
