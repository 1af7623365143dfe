"""v9 (whitened pairs): the Gram two-loop equals the scan two-loop (same pairs, H0~ = I)."""
import sys
import jax, jax.numpy as jnp, numpy as np, optax
sys.path.insert(0, "/tmp/research"); sys.path.insert(0, "/tmp/research/experiments")
import bench, mlbfgs_optax
jax.config.update("jax_numpy_rank_promotion", "allow")
a, xs = bench.quad_problem()
f = lambda p: 0.5 * (p["x"] - xs) @ (a @ (p["x"] - xs)) + jnp.sum(p["w"] ** 4) + jnp.sum((p["w"] - 1) ** 2)
kw = dict(bench.EXTRA["v9_whitened"]); [kw.pop(k) for k in ("adam_units", "ema_momentum")]
out = []
for cg in (True, False):
    tx = optax.chain(mlbfgs_optax.scale_by_mlbfgs(pair_lr=1e-2, cache_gram=cg, **kw), optax.scale_by_learning_rate(1e-2))
    p = {"x": jnp.zeros(100), "w": jnp.zeros((3, 4))}; s = tx.init(p)
    def step(c, _):
        p, s = c; u, s = tx.update(jax.grad(f)(p), s, p); return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(step, (p, s), None, length=2000)
    out.append(np.concatenate([np.ravel(v) for v in jax.tree.leaves(p)]))
    print("cache_gram", cg, "f", float(f(p)), "pairs", np.asarray(s[0].num_pairs))
print("max |diff| / max |x|:", np.max(np.abs(out[0] - out[1])) / np.max(np.abs(out[1])))

# Same state, one direction, both two-loop forms.
txs = [mlbfgs_optax.scale_by_mlbfgs(pair_lr=1e-2, cache_gram=cg, **kw) for cg in (True, False)]
p = {"x": jnp.zeros(100), "w": jnp.zeros((3, 4))}; s = txs[0].init(p)
for i in range(400):
    g = jax.grad(f)(p); u, s = txs[0].update(g, s, p); p = optax.apply_updates(p, jax.tree.map(lambda v: -1e-2 * v, u))
g = jax.grad(f)(p)
s2 = s._replace(sy_gram=jnp.zeros(s.sy_gram.shape[:1] + (0, 0)), yy_gram=jnp.zeros(s.yy_gram.shape[:1] + (0, 0)))
d1, _ = txs[0].update(g, s, p); d2, _ = txs[1].update(g, s2, p)
d1 = np.concatenate([np.ravel(v) for v in jax.tree.leaves(d1)]); d2 = np.concatenate([np.ravel(v) for v in jax.tree.leaves(d2)])
print("one-step direction, gram vs scan: max rel diff", np.max(np.abs(d1 - d2)) / np.max(np.abs(d2)), "pairs", np.asarray(s.num_pairs))
