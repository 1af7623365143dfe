import sys, jax, jax.numpy as jnp, optax, numpy as np
sys.path.insert(0, "/tmp/research"); sys.path.insert(0, "/tmp/research/experiments")
import bench
from examples.benchmarks import tasks as T
jax.config.update("jax_numpy_rank_promotion", "allow")
task = T.make_task(sys.argv[1]); name = sys.argv[2]; lr = float(sys.argv[3]); steps=int(sys.argv[4])
xtr, ytr = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
p = task.init(jax.random.key(0)); opt = bench.make_opt(name, optax.cosine_decay_schedule(lr, task.steps)); s = opt.init(p)
@jax.jit
def step(p, s, k):
    idx = jax.random.randint(k, (task.batch_size,), 0, xtr.shape[0])
    l, g = jax.value_and_grad(task.loss)(p, xtr[idx], ytr[idx]); u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, l, optax.global_norm(u)
keys = jax.random.split(jax.random.key(1), steps)
for i in range(steps):
    p, s, l, un = step(p, s, keys[i])
    if i % 10 == 9:
        st = [x for x in jax.tree.leaves(s, is_leaf=lambda x: hasattr(x, "gamma")) if hasattr(x, "gamma")][0]
        print(i, f"loss {float(l):.3f} |u| {float(un):.3g} gamma", np.array2string(np.asarray(st.gamma), precision=2), "mu", np.array2string(np.asarray(st.mu), precision=2), "tau", np.array2string(np.asarray(st.tau), precision=2))
