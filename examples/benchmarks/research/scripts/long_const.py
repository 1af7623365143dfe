"""50,000 float32 steps at a CONSTANT lr on Rosenbrock (0,0) and the cond-1e4 quadratic:
final f, finiteness, and pairs rejected by the round-off rule. Usage: long_const.py OPT..."""
import sys
import jax, jax.numpy as jnp, numpy as np, optax
sys.path.insert(0, "/tmp/research"); sys.path.insert(0, "/tmp/research/experiments")
import bench
jax.config.update("jax_numpy_rank_promotion", "allow")
for name in sys.argv[1:]:
    for task in ("rosenbrock", "quadratic"):
        d = bench.det_task(task)
        def run(lr):
            opt = bench.make_opt(name, lr); s = opt.init(d["x0"])
            def step(c, _):
                x, s = c; u, s = opt.update(jax.grad(d["f"])(d["x0"] * 0 + x), s, x)
                return (optax.apply_updates(x, u), s), None
            (x, s), _ = jax.lax.scan(step, (d["x0"], s), None, length=50000)
            st = [v for v in jax.tree.leaves(s, is_leaf=lambda v: hasattr(v, "num_skipped")) if hasattr(v, "num_skipped")][0]
            return d["f"](x), jnp.all(jnp.isfinite(x)), st.num_skipped[0]
        lrs = jnp.array([1e-3, 1e-2, 1e-1], jnp.float32)
        f, fin, sk = jax.jit(jax.vmap(run))(lrs)
        print(name, task, " ".join(f"lr {l:.0e}: f {a:.2e} finite {bool(b)} skipped {int(c)}" for l, a, b, c in zip(np.asarray(lrs), np.asarray(f), np.asarray(fin), np.asarray(sk))), flush=True)
