"""mL-BFGS in a flax.linen training loop built on ``flax.training.train_state``.

``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)``,
so :func:`mlbfgs_optax.mlbfgs` (whose ``update`` needs the params) drops in
like any optax optimizer. The train step is jitted with the state donated
(``donate_argnums=0``), so the mL-BFGS history is updated in place::

    python examples/linen_train.py
    python examples/linen_train.py --epochs 20 --lr 0.01
    python examples/linen_train.py --quick

The model is an MLP on MNIST-1D (generated locally, no download). With the
defaults it reaches about 59% test accuracy: MNIST-1D is built to be hard for
MLPs; the 1-D CNN of ``examples/train_mnist1d.py`` reaches about 94%.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlbfgs_optax  # noqa: E402
from examples import common  # noqa: E402


def create_train_state(model, x_example, tx, seed=0):
    """A ``TrainState`` holding the params, ``model.apply`` and the optimizer state."""
    params = model.init(jax.random.key(seed), x_example)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def loss_fn(params, apply_fn, x, y):
    logits = apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state, x, y):
    """One step; ``state`` is donated, so do not use it after the call."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=grads), loss


@jax.jit
def accuracy(state, x, y):
    return jnp.mean(jnp.argmax(state.apply_fn({"params": state.params}, x), -1) == y)


def parse_args(argv=None):
    p = common.make_parser(__doc__, lr=1e-2,
                           quick="tiny run for tests (4 epochs, 2000 samples)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    return common.parse_args(p, argv, epochs=4, num_samples=2000)


def main(argv=None):
    """Trains the MLP; returns initial/final loss, test accuracy and the final state."""
    args = parse_args(argv)
    xtr, ytr, xte, yte = common.load_mnist1d(args)
    tx = mlbfgs_optax.mlbfgs(
        learning_rate=args.lr, memory_size=10, update_period=10, beta=0.9,
        sigma_low=args.sigma_low,
    )
    state = create_train_state(common.MLP(), xtr[:1], tx, args.seed)

    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(xtr) // args.batch_size
    losses = []
    for epoch in range(args.epochs):
        perm = rng.permutation(len(xtr))
        epoch_losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            state, loss = train_step(state, xtr[idx], ytr[idx])
            epoch_losses.append(loss)
        losses.append(float(jnp.mean(jnp.stack(epoch_losses))))
        if epoch == 0:
            first_loss = float(epoch_losses[0])
        print(f"epoch {epoch + 1:3d}  train loss {losses[-1]:.4f}  "
              f"test acc {float(accuracy(state, xte, yte)):.3f}")

    stats = mlbfgs_optax.curvature_stats(state.opt_state, state.params)
    pairs = {name: int(n) for name, n in zip(stats["names"], stats["num_pairs"])}
    print(f"mL-BFGS pairs stored per block: {pairs}")
    return {
        "initial_loss": first_loss,
        "final_loss": losses[-1],
        "epoch_losses": losses,
        "test_acc": float(accuracy(state, xte, yte)),
        "state": state,
    }


if __name__ == "__main__":
    main()
