"""mL-BFGS in a flax.nnx training loop with ``nnx.Optimizer``.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` keeps the optimizer state next to
the model, and ``optimizer.update(model, grads)`` calls
``tx.update(grads, opt_state, params)`` with the current ``nnx.Param`` values,
which is what :func:`mlbfgs_optax.mlbfgs` needs. The train step is an
``nnx.jit`` function that updates model and optimizer in place, with their
buffers donated (``donate_argnums``) so that XLA can reuse them::

    python examples/nnx_train.py
    python examples/nnx_train.py --steps 3000 --lr 0.01
    python examples/nnx_train.py --quick

The model is a small 1-D CNN on MNIST-1D (generated locally, no download).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlbfgs_optax  # noqa: E402
from examples import common  # noqa: E402


class CNN1D(nnx.Module):
    """Two strided 1-D convolutions and a linear classifier."""

    def __init__(self, channels: int = 32, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, channels, kernel_size=(5,), strides=(2,), rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, kernel_size=(3,), strides=(2,), rngs=rngs)
        self.head = nnx.Linear(10 * channels, num_classes, rngs=rngs)  # 40 -> 20 -> 10 positions

    def __call__(self, x):
        x = nnx.relu(self.conv1(x[..., None]))
        x = nnx.relu(self.conv2(x))
        return self.head(x.reshape(x.shape[0], -1))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)  # passes the current params to tx.update
    return loss


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def make_optimizer(model, lr, sigma_low=0.5):
    tx = mlbfgs_optax.mlbfgs(
        learning_rate=lr, memory_size=10, update_period=10, beta=0.9, sigma_low=sigma_low
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def parse_args(argv=None):
    p = common.make_parser(__doc__, steps=2000, lr=1e-2,
                           quick="tiny run for tests (60 steps)")
    p.add_argument("--log-every", type=int, default=200, help="steps between log lines")
    return common.parse_args(p, argv, steps=60, num_samples=2000, log_every=20)


def main(argv=None):
    """Trains the CNN; returns initial/final loss, test accuracy, model and optimizer."""
    args = parse_args(argv)
    xtr, ytr, xte, yte = common.load_mnist1d(args)
    model = CNN1D(rngs=nnx.Rngs(args.seed))
    optimizer = make_optimizer(model, args.lr, args.sigma_low)

    rng = np.random.default_rng(args.seed)
    losses = []
    for step in range(args.steps):
        idx = rng.choice(len(xtr), args.batch_size, replace=False)
        losses.append(train_step(model, optimizer, xtr[idx], ytr[idx]))
        if (step + 1) % args.log_every == 0:
            recent = float(jnp.mean(jnp.stack(losses[-args.log_every:])))
            print(f"step {step + 1:5d}  train loss {recent:.4f}  "
                  f"test acc {float(accuracy(model, xte, yte)):.3f}")

    losses = np.asarray(jax.device_get(losses))
    stats = mlbfgs_optax.curvature_stats(optimizer.opt_state)
    print(f"mL-BFGS pairs stored per block: {stats['num_pairs'].tolist()}")
    return {
        "initial_loss": float(losses[0]),
        "final_loss": common.tail_mean(losses, args.steps),
        "test_acc": float(accuracy(model, xte, yte)),
        "model": model,
        "optimizer": optimizer,
    }


if __name__ == "__main__":
    main()
