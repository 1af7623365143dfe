"""What the example scripts share: the flax models, the MNIST-1D glue, the options.

* :class:`CNN1D` and :class:`MLP`: the flax.linen models of the examples (the nnx
  example keeps its own ``nnx`` CNN next to its training loop);
* :func:`load_mnist1d`, :func:`classification_loss`, :func:`tail_mean`,
  :func:`num_params`: data and loss glue;
* :func:`make_parser` / :func:`parse_args`: the command-line options every example
  has (``--steps``, ``--batch-size``, ``--num-samples``, ``--seed``, ``--lr``,
  ``--quick``, optionally ``--out`` and the mL-BFGS hyperparameters); each example
  adds its own few;
* :func:`bytes_per_device`: the bytes of a pytree of arrays on each device, used
  by ``train_data_parallel.py`` and the benchmarks (the total and the fullest device's
  share: :func:`mlbfgs_optax.state_nbytes`).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

import mlbfgs_optax
from examples import datasets

_MLBFGS_ARGS = frozenset(inspect.signature(mlbfgs_optax.mlbfgs).parameters)


def make_mlbfgs(learning_rate, **kwargs) -> optax.GradientTransformationExtraArgs:
    """``mlbfgs_optax.mlbfgs(learning_rate, **kwargs)``; given arguments that only
    ``scale_by_mlbfgs`` takes, the same chain built from it (L2 decay, momentum 0.9)."""
    if set(kwargs) <= _MLBFGS_ARGS:
        return mlbfgs_optax.mlbfgs(learning_rate, **kwargs)
    if kwargs.pop("weight_decay_mode", "l2") != "l2":
        raise ValueError("make_mlbfgs: decoupled decay with scale_by_mlbfgs's arguments")
    decay = kwargs.pop("weight_decay", 0.0), kwargs.pop("weight_decay_mask", None)
    inner = mlbfgs_optax.scale_by_mlbfgs(learning_rate=learning_rate,
                                         momentum=kwargs.pop("momentum", 0.9), **kwargs)
    return optax.chain(*([optax.add_decayed_weights(*decay)] if decay[0] else []), inner,
                       optax.scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------- models


class CNN1D(nn.Module):
    """Two strided 1-D convolutions and a linear classifier (6506 parameters)."""

    channels: int = 32
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x[..., None]  # (batch, 40) -> (batch, 40, 1): one input channel
        x = nn.relu(nn.Conv(self.channels, kernel_size=(5,), strides=(2,))(x))
        x = nn.relu(nn.Conv(self.channels, kernel_size=(3,), strides=(2,))(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """Fully connected ReLU network: one hidden layer per entry of ``hidden``."""

    hidden: tuple[int, ...] = (128, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


# ----------------------------------------------------------------------------- data, loss


def load_mnist1d(args):
    """MNIST-1D with ``args.num_samples`` samples from seed ``args.seed``.

    Returns ``(x_train, y_train, x_test, y_test)`` (see :func:`datasets.load_mnist1d`).
    """
    return datasets.load_mnist1d(num_samples=args.num_samples, seed=args.seed)


def classification_loss(model):
    """``loss(params, x, y)``: mean softmax cross-entropy of a flax.linen ``model``."""

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def tail_mean(losses, steps: int) -> float:
    """Mean of the last ``max(1, min(50, steps // 10))`` minibatch losses."""
    window = max(1, min(50, steps // 10))
    return float(np.mean(np.asarray(jax.device_get(losses))[-window:]))


def num_params(params) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(x.size for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- memory


def bytes_per_device(tree) -> dict[int, int]:
    """``{device id: bytes}`` of ``tree``'s arrays stored on each device (from the shards)."""
    per_dev: dict[int, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_dev[shard.device.id] = per_dev.get(shard.device.id, 0) + shard.data.nbytes
    return per_dev


# ----------------------------------------------------------------------------- options

# mL-BFGS hyperparameters an example may expose: flag -> (type, default, help).
_DEFAULTS = {k: v.default for k, v in inspect.signature(mlbfgs_optax.mlbfgs).parameters.items()}
#: The mL-BFGS flags an example may take, with the library's defaults.
MLBFGS_OPTIONS = {
    "--update-period": (int, _DEFAULTS["update_period"], "mL-BFGS steps per curvature pair"),
    "--memory-size": (int, _DEFAULTS["memory_size"], "mL-BFGS pairs kept per block"),
    "--beta": (float, _DEFAULTS["beta"], "mL-BFGS averaging coefficient"),
    "--sigma-low": (float, _DEFAULTS["sigma_low"],
                    "mL-BFGS lower bound on the damped curvature of a pair"),
    "--sigma-high": (float, _DEFAULTS["sigma_high"],
                     "mL-BFGS upper bound on the damped curvature of a pair"),
}


def make_parser(doc: str, *, lr: float, quick: str, steps: int | None = None,
                steps_help: str = "training steps", batch_size: int = 128,
                batch_help: str = "minibatch size", num_samples: int = 5000,
                lr_help: str = "mL-BFGS learning rate", out: str | None = None,
                mlbfgs: Sequence[str] = ("--sigma-low",)) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the options the examples share.

    Args:
      doc: the example's module docstring; its first paragraph is the description.
      lr: default ``--lr``.
      quick: help of ``--quick`` (what the tiny test run does).
      steps: default ``--steps``; ``None`` for no ``--steps`` option.
      batch_size, num_samples: defaults of ``--batch-size`` and ``--num-samples``.
      out: default ``--out`` (a plot file, ``''`` for none); ``None`` for no ``--out``.
        With ``--quick`` the plot is not written unless ``--out`` is given.
      mlbfgs: the flags of :data:`MLBFGS_OPTIONS` to add, with their defaults.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--num-samples", type=int, default=num_samples,
                   help="MNIST-1D samples to generate (80%% train, 20%% test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and of the batches")
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    for flag in mlbfgs:
        kind, default, help_ = MLBFGS_OPTIONS[flag]
        p.add_argument(flag, type=kind, default=default, help=help_)
    if out is not None:
        p.add_argument("--out", default=out, help="plot file ('' for none)")
    p.add_argument("--quick", action="store_true", help=quick)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               **quick) -> argparse.Namespace:
    """Parses ``argv``; with ``--quick``, sets the attributes given as ``quick``.

    With ``--quick``, an ``--out`` option not given on the command line is set to
    ``''`` (no plot).
    """
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
        given = argv if argv is not None else sys.argv[1:]
        if hasattr(args, "out") and not any(a == "--out" or a.startswith("--out=")
                                            for a in given):
            args.out = ""
    return args
