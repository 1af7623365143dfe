"""Two XLA:CPU facts behind the optimizer-only cost results, measured: temporaries page-fault, and no
formulation of a bfloat16-history product is as fast as float32.

Run from the repository root::

    python -m examples.benchmarks.research.xla_cpu_costs

Prints Markdown (committed as ``xla_cpu_costs.md`` next to this file).

1. Minor page faults per call (``getrusage``) of a jitted function whose only
   temporaries are ``k`` float32 vectors of n elements, against their total size: XLA:CPU
   allocates a call's temporaries afresh, and above glibc's largest mmap threshold (32 MB)
   the allocation is a fresh ``mmap`` whose pages fault on first touch.
2. ``S^T q`` for a history ``S`` of 10 x 1M (4 leaves) in float32 and in bfloat16, in every
   formulation tried, and the elementwise combining pass ``sum_m c_m S_m``; median ms of 10
   calls with the floor (bytes / bandwidth of a jitted ``y = a*x + y``).
3. The two passes an ordinary step cannot avoid (the products ``S^T q``, ``Y^T q`` and the
   combining pass over both histories), float32, in the fastest forms XLA:CPU offers: as
   the library computes them (one matrix-vector product per history), as one product of a
   stacked ``(2M, n)`` history (a state layout the library does not have), and as matrix
   products of reshaped histories. Their time against their floor bounds what any ordinary
   step built from XLA:CPU's kernels can reach.
"""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from examples.benchmarks import harness

F32 = jnp.float32
M, LEAVES, SHAPE = 10, 4, (1024, 1024)


def _median_ms(f, args, repeats=10):
    for _ in range(3):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def faults_table() -> list[str]:
    lines = ["## 1. Page faults against the size of a call's temporaries", "",
             "| temporaries (MB) | minor faults per call |", "|---|---|"]
    for n in (1 << 20, 3 << 20, 7 << 20, 9 << 20):
        S = jnp.ones((4, n))
        g = jnp.ones(n)

        @jax.jit
        def f(S, g):
            # Two vectors that the products need whole (XLA does not fuse an rsqrt into them).
            a, b = g * jax.lax.rsqrt(g + 1.0), g * jax.lax.rsqrt(g + 2.0)
            return S @ a + S @ b

        temp = f.lower(S, g).compile().memory_analysis().temp_size_in_bytes / 1e6
        for _ in range(3):
            jax.block_until_ready(f(S, g))
        counts = []
        for _ in range(10):
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            jax.block_until_ready(f(S, g))
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
        lines.append(f"| {temp:.1f} | {np.median(counts):.0f} |")
    return lines


def _chunked(hist, q, chunk=65536):
    out = []
    for s, x in zip(hist, q):
        k = x.size // chunk
        sk, xk = s.reshape(M, k, chunk), x.reshape(k, chunk)

        def body(acc, i):
            xs = jax.lax.dynamic_index_in_dim(xk, i, 0, keepdims=False)
            sl = jax.lax.dynamic_index_in_dim(sk, i, 1, keepdims=False).astype(F32)
            return acc + sl @ xs, None

        out.append(jax.lax.scan(body, jnp.zeros(M), jnp.arange(k))[0])
    return out


def _uint32_trick(hist, q):
    out = []
    for s, x in zip(hist, q):
        u = jax.lax.bitcast_convert_type(s.reshape(M, -1, 2), jnp.uint32)
        lo = jax.lax.bitcast_convert_type(u << 16, F32)
        hi = jax.lax.bitcast_convert_type(u & jnp.uint32(0xFFFF0000), F32)
        xe = x.reshape(-1, 2)
        out.append(lo @ xe[:, 0] + hi @ xe[:, 1])
    return out


VARIANTS = {
    "einsum (the library's)": lambda h, q: [
        jnp.einsum("mij,ij->m", s, x, preferred_element_type=F32) for s, x in zip(h, q)],
    "both operands bf16": lambda h, q: [
        jnp.einsum("mij,ij->m", s, x.astype(s.dtype), preferred_element_type=F32)
        for s, x in zip(h, q)],
    "convert, barrier, einsum": lambda h, q: [
        jnp.einsum("mij,ij->m", jax.lax.optimization_barrier(s.astype(F32)), x)
        for s, x in zip(h, q)],
    "chunked conversion in lax.scan": _chunked,
    "uint32 bit trick": _uint32_trick,
    "sum(S * q) reduction": lambda h, q: [
        jnp.sum(s.astype(F32) * x, axis=(1, 2)) for s, x in zip(h, q)],
}


def products_table() -> list[str]:
    bw = harness.measure_bandwidth()
    n = LEAVES * SHAPE[0] * SHAPE[1]
    key = jax.random.key(0)
    h32 = [jax.random.normal(jax.random.fold_in(key, i), (M,) + SHAPE) for i in range(LEAVES)]
    h16 = [x.astype(jnp.bfloat16) for x in h32]
    q = [jnp.ones(SHAPE) for _ in range(LEAVES)]
    c = jnp.linspace(0.5, 1.5, M)
    lines = ["", f"## 2. S^T q and the combining pass, history 10 x {n:,} (4 leaves)", "",
             f"Bandwidth (jitted y = a*x + y): {bw / 1e9:.1f} GB/s.", "",
             "| pass | history | ms | floor ms | / floor |", "|---|---|---|---|---|"]
    for name, f in VARIANTS.items():
        for label, h, hb in (("float32", h32, 4), ("bfloat16", h16, 2)):
            if name in ("both operands bf16", "uint32 bit trick") and label == "float32":
                continue  # bfloat16-only formulations
            ms = _median_ms(jax.jit(f), (h, q))
            floor = (M * hb + 4) * n / bw * 1e3
            lines.append(f"| S^T q: {name} | {label} | {ms:.1f} | {floor:.1f} | {ms / floor:.1f} |")
    comb = jax.jit(lambda h, q, c: [x + sum(c[m] * s[m].astype(F32) for m in range(M))
                                    for s, x in zip(h, q)])
    for label, h, hb in (("float32", h32, 4), ("bfloat16", h16, 2)):
        ms = _median_ms(comb, (h, q, c))
        floor = (M * hb + 8) * n / bw * 1e3
        lines.append(f"| combining pass (elementwise, unrolled) | {label} | {ms:.1f} | "
                     f"{floor:.1f} | {ms / floor:.1f} |")
    return lines


def _stacked_gemm(h, q, c=4):
    """``S^T q`` as a matrix product of ``S`` reshaped to ``(M c, n / c)`` (c-fold FLOPs)."""
    out = 0.0
    for s, x in zip(h, q):
        k = x.size // c
        r = s.reshape(M * c, k) @ x.reshape(c, k).T
        out = out + jnp.trace(r.reshape(M, c, c), axis1=1, axis2=2)
    return out


def bound_table() -> list[str]:
    bw = harness.measure_bandwidth()
    n = LEAVES * SHAPE[0] * SHAPE[1]
    key = jax.random.key(1)
    hs = [jax.random.normal(jax.random.fold_in(key, i), (M,) + SHAPE) for i in range(LEAVES)]
    hy = [jax.random.normal(jax.random.fold_in(key, 9 + i), (M,) + SHAPE) for i in range(LEAVES)]
    both = [jnp.concatenate([a, b]) for a, b in zip(hs, hy)]
    q = [jnp.ones(SHAPE) for _ in range(LEAVES)]
    c = jnp.linspace(0.5, 1.5, 2 * M)
    dot = lambda h, q: sum(jnp.einsum("mij,ij->m", s, x) for s, x in zip(h, q))
    prod_floor = 2 * M * 4 * n / bw * 1e3
    comb_floor = (2 * M + 2) * 4 * n / bw * 1e3
    rows = [
        ("products: one matrix-vector product per history (the library)",
         _median_ms(jax.jit(lambda a, b, q: (dot(a, q), dot(b, q))), (hs, hy, q)), prod_floor),
        ("products: one matrix-vector product of the stacked (2M, n) history",
         _median_ms(jax.jit(dot), (both, q)), prod_floor),
        ("products: matrix products of the histories reshaped to (4M, n/4)",
         _median_ms(jax.jit(lambda a, b, q: (_stacked_gemm(a, q), _stacked_gemm(b, q))),
                    (hs, hy, q)), prod_floor),
        ("combining pass over both histories (elementwise, unrolled)",
         _median_ms(jax.jit(lambda h, q, c: [x + sum(c[m] * s[m] for m in range(2 * M))
                                             for s, x in zip(h, q)]), (both, q, c)),
         comb_floor),
    ]
    lines = ["", f"## 3. The two unavoidable passes of an ordinary step, float32, M = {M}, "
             f"n = {n:,}", "", f"Bandwidth (jitted y = a*x + y): {bw / 1e9:.1f} GB/s.", "",
             "| pass | ms | floor ms | / floor |", "|---|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {fl:.1f} | {ms / fl:.1f} |" for name, ms, fl in rows]
    best = min(r[1] for r in rows[:3]) + rows[3][1]
    lines += ["", f"Fastest products + combining pass: {best:.1f} ms against their floor "
              f"{prod_floor + comb_floor:.1f} ms ({best / (prod_floor + comb_floor):.1f}x)."]
    return lines


def main() -> str:
    md = "\n".join(["# XLA:CPU measurements behind the optimizer-only cost", "",
                    f"{harness.machine()}; jax {jax.__version__}.", ""]
                   + faults_table() + products_table() + bound_table()) + "\n"
    print(md)
    return md


if __name__ == "__main__":
    main()
