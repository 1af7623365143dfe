"""optax contrib battery (optax 0.2.8 optax/contrib/_common_test.py::test_optimizers):
30,000 steps at ONE constant lr from the targets' initial params, float32; pass when
params are within rtol=atol=3e-2 of the optimum. Usage: battery.py OPT [OPT...]
Prints pass/fail per (opt, lr, target), plus whether the params stay finite."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, "/tmp/research")
sys.path.insert(0, "/tmp/research/experiments")
import bench  # noqa: E402


def targets():
    f32 = jnp.float32
    fin = jnp.array([1.0, -1.0, 1.0], f32)
    yield "parabola", jnp.array([-1.0, 10.0, 1.0], f32), fin, lambda p: jnp.sum((p - fin) ** 2)
    yield ("rosenbrock", jnp.zeros(2, f32), jnp.array([1.0, 1.0], f32),
           lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2)
    m = jnp.array([[3.0, -2.0], [1.0, 4.0]], f32)
    yield "matrix", jnp.zeros((2, 2), f32), m, lambda p: jnp.sum((p - m) ** 2)
    a1, a2 = jnp.array([1.0, -1.0, 2.0], f32), jnp.array([[1.0, 0.0], [-1.0, 1.0]], f32)
    yield ("mixed", (jnp.zeros(3, f32), jnp.zeros((2, 2), f32)), (a1, a2),
           lambda p: jnp.sum((p[0] - a1) ** 2) + jnp.sum((p[1] - a2) ** 2))


def run(opt_name, lr):
    out = []
    for name, x0, xf, f in targets():
        opt = bench.make_opt(opt_name, lr)

        def step(c, _):
            x, s = c
            u, s = opt.update(jax.grad(f)(x), s, x)
            return (optax.apply_updates(x, u), s), None
        (x, _), _ = jax.jit(lambda x, s: jax.lax.scan(step, (x, s), None, length=30000))(
            x0, opt.init(x0))
        ok = all(np.allclose(np.asarray(a), np.asarray(b), rtol=3e-2, atol=3e-2)
                 for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(xf)))
        fin = all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(x))
        out.append(f"{name}:{'PASS' if ok else ('fail' if fin else 'NaN')}")
    return out


if __name__ == "__main__":
    for o in sys.argv[1:]:
        for lr in (1e-3, 1e-2, 1e-1, 1.0):
            print(o, lr, " ".join(run(o, lr)), flush=True)
