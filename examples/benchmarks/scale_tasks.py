"""The two paper-scale tasks: a CIFAR-style ResNet with BatchNorm and a byte-level LM.

Each task is a :class:`ScaleTask`: a flax.linen model, its data (numpy, held on the
device during training), a jittable batch sampler with the usual augmentation, a
training loss that returns the model's new mutable state (BatchNorm's ``batch_stats``)
and an evaluation over the whole held-out set.

* ``resnet``: ResNet-(6n+2) as in He et al. 2016 (CIFAR variant: three stages of
  ``n`` basic blocks, widths w/2w/4w, BatchNorm, 1x1 projection shortcuts) on
  Fashion-MNIST padded to 32x32 (or on CIFAR-10 when ``$CIFAR10_DIR`` is set), with
  random 32x32 crops of the 4-pixel zero-padded image and horizontal flips.
* ``lm``: a decoder-only pre-LayerNorm transformer over bytes (vocabulary 256), trained
  on next-byte prediction over the Python standard library's own top-level ``*.py``
  sources (see :func:`load_stdlib_corpus`); the metric is held-out loss in bits/byte.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import sysconfig
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from examples import datasets

# ----------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    width: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        h = nn.Conv(self.width, (3, 3), (self.stride, self.stride), use_bias=False)(x)
        h = nn.relu(bn()(h))
        h = nn.Conv(self.width, (3, 3), use_bias=False)(h)
        h = bn()(h)
        if x.shape[-1] != self.width or self.stride != 1:
            x = nn.Conv(self.width, (1, 1), (self.stride, self.stride), use_bias=False)(x)
            x = bn()(x)
        return nn.relu(h + x)


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2): conv3x3, three stages of ``n`` blocks, pool, dense."""

    blocks_per_stage: int = 1
    width: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage in range(3):
            for b in range(self.blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                x = BasicBlock(self.width * 2 ** stage, stride)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block: causal multi-head self-attention, then a GELU MLP (4x)."""

    dim: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(
            h, h, mask=mask)
        x = x + h
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))
        return x + h


class ByteLM(nn.Module):
    """Decoder-only transformer over bytes: learned token and position embeddings."""

    context: int = 64
    dim: int = 128
    layers: int = 2
    heads: int = 4

    @nn.compact
    def __call__(self, tokens, train: bool = True):
        del train  # no dropout: the benchmark compares optimizers, not regularisers
        t = tokens.shape[-1]
        x = nn.Embed(256, self.dim)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.context, self.dim))[None, :t]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            x = DecoderBlock(self.dim, self.heads)(x, mask)
        return nn.Dense(256)(nn.LayerNorm()(x))


# ----------------------------------------------------------------------------- data


def load_stdlib_corpus(max_bytes: Optional[int] = None):
    """The Python standard library's top-level ``*.py`` files as a byte corpus.

    Files are read in sorted order; every tenth file (sorted index 0, 10, 20, ...) is
    held out, so no file is split between training and validation. The corpus is the
    running interpreter's own (on CPython 3.11.7: 168 files, 4.70 MB).

    Args:
      max_bytes: keep at most this many bytes of each split (quick runs).

    Returns:
      ``(train, valid, info)``: uint8 arrays and a dict with the sizes and a sha256.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise FileNotFoundError(f"no *.py files in {root}")
    train, valid = [], []
    for i, f in enumerate(files):
        with open(f, "rb") as fh:
            (valid if i % 10 == 0 else train).append(fh.read())
    tr, va = b"".join(train), b"".join(valid)
    if max_bytes:
        tr, va = tr[:max_bytes], va[:max_bytes]
    info = {"root": root, "files": len(files), "train_bytes": len(tr), "valid_bytes": len(va),
            "sha256": hashlib.sha256(tr + va).hexdigest()[:16]}
    return np.frombuffer(tr, np.uint8), np.frombuffer(va, np.uint8), info


def _images(use_cifar: bool, max_train: Optional[int], max_test: Optional[int]):
    """uint8 NHWC images at 32x32 and int32 labels: CIFAR-10, or F-MNIST zero-padded."""
    if use_cifar:
        xtr, ytr, xte, yte = datasets.load_cifar10()
        name = "CIFAR-10"
    else:
        xtr, ytr, xte, yte = datasets.load_fashion_mnist()
        pad = ((0, 0), (2, 2), (2, 2), (0, 0))
        xtr, xte = np.pad(xtr, pad), np.pad(xte, pad)
        name = "Fashion-MNIST (padded to 32x32)"
    to_u8 = lambda x: np.rint(x * 255).astype(np.uint8)  # noqa: E731
    xtr, xte = to_u8(xtr[:max_train]), to_u8(xte[:max_test])
    return name, xtr, ytr[:max_train].astype(np.int32), xte, yte[:max_test].astype(np.int32)


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class ScaleTask:
    """One paper-scale task.

    Attributes:
      name, description: ids for the outputs.
      model: the flax.linen module; ``model.apply(variables, x, train=...)``.
      data: device-ready arrays ``x_train, y_train, x_test, y_test`` (y is None for LM).
      sample: ``(key, data) -> (x, y)``, one augmented training batch (jittable).
      eval_batches: ``data -> (xs, ys)``, lists of evaluation batches.
      batch_size, steps, eval_every: the training budget of the full run.
      metric, target: ``"acc"`` (test accuracy, higher is better) or ``"bits"``
        (held-out bits per byte, lower is better); ``target`` is a preset used only when
        no baseline ran (``scale.apply_target`` sets targets from the baselines).
      info: what to report about the data.
    """

    name: str
    description: str
    model: nn.Module
    data: dict
    sample: Callable
    eval_batches: Callable
    batch_size: int
    steps: int
    eval_every: int
    metric: str
    target: float
    info: dict = dataclasses.field(default_factory=dict)

    def init(self, key):
        """``(params, model_state)``; ``model_state`` holds BatchNorm's statistics."""
        x, _ = self.sample(jax.random.key(0), self.data)
        variables = self.model.init(key, x[:, :-1] if self.metric == "bits" else x,
                                    train=False)
        params = variables["params"]
        return params, {k: v for k, v in variables.items() if k != "params"}

    def logits_and_labels(self, params, model_state, x, y, train):
        """Logits, labels (next bytes for the LM) and the new model state."""
        variables = {"params": params, **model_state}
        if self.metric == "bits":
            inputs, y = x[:, :-1], x[:, 1:]
        else:
            inputs = x
        if train and model_state:
            logits, new = self.model.apply(variables, inputs, train=True,
                                           mutable=list(model_state))
            return logits, y, new
        return self.model.apply(variables, inputs, train=train), y, model_state

    def loss(self, params, model_state, x, y, train=True):
        """Mean cross-entropy (nats) and the new model state."""
        logits, labels, new = self.logits_and_labels(params, model_state, x, y, train)
        return jnp.mean(_nll(logits, labels)), new

    def eval_batch(self, params, model_state, x, y):
        """Summed held-out NLL (nats) and correct predictions of one evaluation batch."""
        logits, labels, _ = self.logits_and_labels(params, model_state, x, y, False)
        return (jnp.sum(_nll(logits, labels)),
                jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32)))

    def evaluate(self, eval_fn, batches, params, model_state):
        """Held-out ``(loss, metric)``: accuracy, or bits/byte for the LM.

        ``eval_fn`` is :meth:`eval_batch`, jitted by the caller, and ``batches`` is
        :attr:`eval_batches` of the data, built once by the caller; batches run in a Python
        loop (a ``lax.map`` would put the convolutions in a while loop: slow on XLA:CPU).
        """
        xs, ys = batches
        nll, correct, count = 0.0, 0.0, 0
        for x, y in zip(xs, ys):
            a, b = eval_fn(params, model_state, x, y)
            nll, correct = nll + float(a), correct + float(b)
            count += int(np.prod(y.shape if self.metric == "acc" else (x.shape[0],
                                                                        x.shape[1] - 1)))
        loss = nll / count
        return loss, (loss / math.log(2.0) if self.metric == "bits" else correct / count)

    @property
    def num_params(self) -> int:
        p, _ = jax.eval_shape(self.init, jax.random.key(0))
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(p)))


def _nll(logits, labels):
    """Per-example (per-token) cross-entropy in nats, computed in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _augment(key, x_u8):
    """Random 32x32 crop of the 4-pixel zero-padded image, random horizontal flip."""
    b = x_u8.shape[0]
    x = jnp.pad(x_u8.astype(jnp.float32) / 255.0, ((0, 0), (4, 4), (4, 4), (0, 0)))
    k1, k2 = jax.random.split(key)
    offs = jax.random.randint(k1, (b, 2), 0, 9)
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(
        im, (o[0], o[1], 0), (32, 32, im.shape[-1])))(x, offs)
    flip = jax.random.bernoulli(k2, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def resnet_task(quick: bool = False, blocks_per_stage: int = 1, width: int = 16,
                batch_size: int = 128, steps: int = 300, eval_every: int = 50,
                target: float = 0.85, test_images: int = 5000) -> ScaleTask:
    """ResNet-(6n+2) with BatchNorm on Fashion-MNIST at 32x32 (CIFAR-10 if ``$CIFAR10_DIR``).

    Inputs are standardised with the training set's pixel mean and standard deviation.
    Evaluation uses BatchNorm's running averages on the first ``test_images`` images of
    the test set (5,000 of 10,000 by default, to keep evaluation cheap on a CPU; 1,000 in
    quick mode).
    """
    use_cifar = bool(os.environ.get("CIFAR10_DIR"))
    name, xtr, ytr, xte, yte = _images(use_cifar, 2048 if quick else None,
                                       1000 if quick else test_images)
    mean = float(xtr.mean() / 255.0)
    std = float(xtr.std() / 255.0)
    eval_bs = 500

    def sample(key, data):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch_size,), 0, data["x_train"].shape[0])
        x = _augment(k2, data["x_train"][idx])
        return (x - mean) / std, data["y_train"][idx]

    def eval_batches(data):
        x = (data["x_test"].astype(jnp.float32) / 255.0 - mean) / std
        n = x.shape[0] // eval_bs
        return ([x[i * eval_bs:(i + 1) * eval_bs] for i in range(n)],
                [data["y_test"][i * eval_bs:(i + 1) * eval_bs] for i in range(n)])

    depth = 6 * blocks_per_stage + 2
    data = {"x_train": jnp.asarray(xtr), "y_train": jnp.asarray(ytr),
            "x_test": jnp.asarray(xte), "y_test": jnp.asarray(yte)}
    return ScaleTask(
        name="resnet",
        description=(f"ResNet-{depth} (widths {width}/{2 * width}/{4 * width}, BatchNorm) on "
                     f"{name}, {len(xtr)} train / {len(xte)} test, random crop + flip, batch "
                     f"{batch_size}"),
        model=ResNet(blocks_per_stage, width), data=data, sample=sample,
        eval_batches=eval_batches, batch_size=batch_size, steps=steps, eval_every=eval_every,
        metric="acc", target=target,
        info={"dataset": name, "train": len(xtr), "test": len(xte), "depth": depth})


def lm_task(quick: bool = False, context: int = 64, dim: int = 128, layers: int = 2,
            heads: int = 4, batch_size: int = 32, steps: int = 500, eval_every: int = 50,
            target: float = 3.0, eval_windows: int = 256) -> ScaleTask:
    """Byte-level decoder-only transformer on the Python standard library's sources.

    Training windows of ``context + 1`` bytes start at uniformly random offsets of the
    training split; the held-out metric is the mean over ``eval_windows`` fixed,
    evenly spaced windows of the validation split, in bits per byte.
    """
    train, valid, info = load_stdlib_corpus(max_bytes=200_000 if quick else None)
    span = context + 1
    starts = np.linspace(0, len(valid) - span - 1, eval_windows).astype(np.int64)
    x_test = np.stack([valid[s:s + span] for s in starts]).astype(np.int32)

    def sample(key, data):
        offs = jax.random.randint(key, (batch_size,), 0, data["x_train"].shape[0] - span)
        x = jax.vmap(lambda o: jax.lax.dynamic_slice(data["x_train"], (o,), (span,)))(offs)
        return x.astype(jnp.int32), None

    def eval_batches(data):
        x = data["x_test"]
        xs = x.reshape(-1, 64, span)
        return list(xs), [None] * xs.shape[0]

    data = {"x_train": jnp.asarray(train), "x_test": jnp.asarray(x_test)}
    return ScaleTask(
        name="lm",
        description=(f"byte-level transformer LM ({layers} layers, d {dim}, {heads} heads, "
                     f"context {context}) on the Python {info['files']}-file stdlib corpus "
                     f"({info['train_bytes'] / 1e6:.2f} MB train / {info['valid_bytes'] / 1e6:.2f}"
                     f" MB held-out files), batch {batch_size}"),
        model=ByteLM(context, dim, layers, heads), data=data, sample=sample,
        eval_batches=eval_batches, batch_size=batch_size, steps=steps, eval_every=eval_every,
        metric="bits", target=target, info=info)


TASKS: dict[str, Callable[..., ScaleTask]] = {"resnet": resnet_task, "lm": lm_task}
