import mlbfgs_optax, jax.numpy as jnp, optax, jax, sys
jax.config.update("jax_numpy_rank_promotion","allow")
f=lambda x: (1-x[0])**2+100*(x[1]-x[0]**2)**2
kw=eval(sys.argv[1]); lr=float(sys.argv[2])
tx=mlbfgs_optax.mlbfgs(lr,**kw); x=jnp.zeros(2); s=tx.init(x)
for i in range(int(sys.argv[3])):
  u,s=tx.update(jax.grad(f)(x),s,x); x=optax.apply_updates(x,u)
  st=s[0]
  if i%int(sys.argv[4])==0 or not jnp.isfinite(f(x)): print(i, x, f(x), st.gamma, st.num_pairs, st.mu, st.tau, u)
  if not jnp.isfinite(f(x)): break
