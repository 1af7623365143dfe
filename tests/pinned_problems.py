"""The problems whose directions are pinned from the pre-redesign code (2c89a5a).

``python -m tests.pinned_problems`` rewrote ``tests/data/pinned_directions.npz``
once, at commit 2c89a5a; ``tests/test_update.py`` checks that the current code
gives the same directions to 1e-12 relative (float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import mlbfgs_optax

#: The paper's algorithm with bias correction and the sigma_yy bound; the pinned
#: configurations build on it.
PAPER_WITH_CORRECTIONS = dict(mlbfgs_optax.paper_defaults, bias_correction=True, sigma_yy=None)

CONFIGS = {
    "defaults_leaf": dict(),
    "slices3": dict(blocks=mlbfgs_optax.EqualSlices(3)),
    "labels": dict(blocks={"w": "a", "b": "a", "v": "b"}),
    "all_no_gram": dict(blocks="all", cache_gram=False),
    "authors": dict(beta=0.9, update_period=3, sigma_low=0.01, tau_max=0.99, pair_momentum=0.9,
                    refresh_grad_average=True, normalize=True, bias_correction=False,
                    sigma_yy=float("inf")),
    "bf16_history": dict(history_dtype=jnp.bfloat16, memory_size=3),
}


def trajectory(steps=40, seed=0):
    """A fixed noisy-quadratic trajectory (params, grads), float64 NumPy."""
    rng = np.random.default_rng(seed)
    n = 13
    a = rng.normal(size=(n, n))
    a = a @ a.T / n + np.diag(np.logspace(-2, 1, n))
    x = rng.normal(size=n)
    params, grads = [], []
    for _ in range(steps):
        g = a @ x + 0.05 * rng.normal(size=n)
        params.append(x.copy())
        grads.append(g)
        x = x - 0.05 * g
    return params, grads


def as_tree(v):
    return {"w": jnp.asarray(v[:8].reshape(2, 4)), "b": jnp.asarray(v[8:10]),
            "v": jnp.asarray(v[10:])}


def directions(config: dict) -> np.ndarray:
    """Every step's direction of ``scale_by_mlbfgs(**config)``, stacked, float64."""
    config = {**PAPER_WITH_CORRECTIONS, **config}
    opt = mlbfgs_optax.scale_by_mlbfgs(update_period=config.pop("update_period", 2),
                                       beta=config.pop("beta", 0.5), **config)
    params, grads = trajectory()
    state = opt.init(as_tree(params[0]))
    update = jax.jit(opt.update)
    out = []
    for p, g in zip(params, grads):
        d, state = update(as_tree(g), state, as_tree(p))
        out.append(np.concatenate([np.ravel(np.asarray(x, np.float64))
                                   for x in jax.tree.leaves(d)]))
    return np.stack(out)


if __name__ == "__main__":
    with jax.enable_x64(True):
        np.savez("tests/data/pinned_directions.npz",
                 **{k: directions(dict(v)) for k, v in CONFIGS.items()})
