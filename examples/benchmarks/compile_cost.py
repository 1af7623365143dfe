"""Compile cost of one training step against the model's structure (number of parameter leaves).

Run from the repository root::

    python -m examples.benchmarks.compile_cost                  # full run (see below)
    python -m examples.benchmarks.compile_cost --quick          # CI smoke run, writes nothing
    python -m examples.benchmarks.compile_cost --quick --out /tmp/cc
    python -m examples.benchmarks.compile_cost --mlp-leaves 8 32 --models mlp gpt2 \\
        --opts adam mlbfgs --no-placements                      # a subset

Models (plain JAX functions, float32, all CPU-sized; the leaf *structure* is the point,
the widths are small):

* ``mlp<L>``: a deep tanh MLP of width 64 (every layer a 64x64 weight and a 64 bias,
  input and output width 64), L = 8, 32, 128, 256 parameter leaves (4 to 128 layers),
  mean squared error on a random regression batch of 32;
* ``gpt2``: GPT-2 small's leaf structure, 148 leaves (``wte``, ``wpe``, 12 blocks of
  ``ln_1`` scale/bias, ``attn.c_attn`` and ``attn.c_proj`` kernel/bias, ``ln_2``,
  ``mlp.c_fc`` and ``mlp.c_proj`` kernel/bias, then ``ln_f``) at d_model 32, 4 heads,
  vocabulary 64, context 16, MLP 4x; causal self-attention, layer norm, GELU, tied
  output embedding, next-token cross-entropy on 8 random sequences;
* ``resnet50``: ResNet-50's leaf structure, 161 leaves (stem conv + BN, bottleneck stages
  [3, 4, 6, 3] of 1x1/3x3/1x1 convs each followed by BN scale/bias, a projection conv + BN
  in the first block of each stage, dense kernel/bias) at base width 8 (stage widths 8,
  16, 32, 64, outputs 4x), a 3x3 stride-1 stem (CIFAR-style, no max-pool) on 8 random
  8x8x3 images, strides 1, 2, 2, 2 on the 3x3 convs (v1.5), batch-statistics
  normalisation (no running averages), global average pool, softmax cross-entropy.

Optimizers (learning rate 1e-3 everywhere; only the program matters here):
``adam`` = ``optax.adam``; ``lbfgs`` = ``optax.lbfgs(linesearch=None)``; ``mlbfgs`` =
``mlbfgs_optax.mlbfgs`` defaults (one block per leaf; the state of every leaf in one
row-packed buffer); ``mlbfgs_stacked`` (the defaults with ``packing="stacked"``: the leaves
of one shape stacked, as a state that follows sharded params is stored);
``mlbfgs_all`` (``blocks="all"``);
``mlbfgs_labels`` (a labels pytree, one block per top-level layer: each MLP layer; GPT-2's
``wte``, ``wpe``, each of the 12 blocks and ``ln_f`` = 15 blocks; ResNet's stem, 4 stages
and head = 6 blocks, the authors' choice for ResNets); ``mlbfgs_slices8``
(``EqualSlices(8)``); ``mlbfgs_paper`` = ``mlbfgs(lr, **paper_defaults)`` (the paper's
algorithm: identity metric, every extension off; leaf blocks).

Placements on 8 fake CPU devices (``--xla_force_host_platform_device_count=8``; the script
runs them in a subprocess that sets the flag unless this process already has 8 devices),
mesh axis ``"x"`` with Auto axis types, batch sharded over ``"x"``; each mL-BFGS variant is
compared with ``adam`` in the same placement:

* ``fsdp``: every leaf sharded (``NamedSharding``) on its first axis whose size is a multiple
  of 8 (replicated if none), ``mlbfgs`` defaults: the state follows the params' sharding;
* ``zero``: params replicated, ``mlbfgs(lr, blocks=EqualSlices(8), axis_name="x",
  mesh=mesh)``: the state is sharded over the blocks (GSPMD);
* ``shard_map``: data parallel inside ``jax.shard_map`` (gradient ``pmean``),
  ``mlbfgs(lr, blocks=EqualSlices(8), axis_name="x")``, state placed by
  ``state_partition_specs``.

Measured for ONE jitted training step ``(params, state, batch) -> (params', state', loss)``
(loss gradient + ``opt.update`` + ``optax.apply_updates``), each measurement after
``jax.clear_caches()`` on a freshly built optimizer and step function:

* ``compile_s``: wall time of ``jax.jit(step).lower(...).compile()``, the least of
  ``--compile-tries`` tries (default 3; 1 with ``--quick``), each after
  ``jax.clear_caches()`` on a fresh ``jax.jit`` (the least is the try the shared machine
  disturbed least), split into
  ``trace_s`` (``jit(step).trace``), ``lower_s`` (to StableHLO) and ``xla_s``
  (``.compile()``);
* ``update_eqns``: equations of ``jax.make_jaxpr(opt.update)(grads, state, params)``, counted
  recursively through every sub-jaxpr (scan/while/cond bodies, pjit, custom_jvp/vjp,
  shard_map; a sub-jaxpr counts once per occurrence), and per parameter leaf
  (``update_eqns_per_leaf``); ``update_eqns_unique`` counts each distinct sub-jaxpr once.
  For ``shard_map`` the update is traced inside the same ``shard_map`` (one extra
  equation). ``step_eqns`` counts the whole step's jaxpr the same way;
* ``hlo_lines``: lines of ``compiled.as_text()`` (the optimised HLO module);
* ``step_ms``: median of ``--repeats`` calls of the compiled step after 2 warm-up calls,
  each blocked with ``block_until_ready``; params and state are donated and each call takes
  the previous call's outputs, as in a training loop (an mL-BFGS pair step happens every
  10th call; the median is an ordinary step). ``loss`` is the first call's.

Ratios (``*_x_adam``) divide by ``adam`` on the same model and placement in the same run:
the machine is shared and noisy, compare those rather than seconds. Writes
``compile_cost.json``, ``compile_cost.md`` and the log-log plot ``compile_cost.png``
(compile seconds against MLP leaf count) to ``--out`` (default
``examples/benchmarks/results/``).

``--quick``: MLP at 8 and 32 leaves, ``adam`` and ``mlbfgs``, 5 timed calls, no placements,
no plot; writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.extend  # jax.extend.core: the jaxpr types count_eqns walks
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))

import mlbfgs_optax
from examples.benchmarks import harness
from examples.common import make_mlbfgs


def _library_loaded() -> str:
    """The library this process runs: its git state when imported and a hash of the sources
    of the imported modules (edits made to the working tree later do not reach a running
    process, so a row's code is the code of its process's import)."""
    files = sorted({m.__file__ for name, m in sys.modules.items()
                    if name.split(".")[0] == "mlbfgs_optax" and getattr(m, "__file__", None)})
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return f"{harness.library_version()}, sources {digest.hexdigest()[:10]}"


#: The library as imported by this process (see :func:`_library_loaded`).
LIBRARY = _library_loaded()
LR = 1e-3
MLP_WIDTH = 64
MLP_BATCH = 32
MLP_LEAVES = (8, 32, 128, 256)
QUICK_MLP_LEAVES = (8, 32)
GPT2 = dict(vocab=64, context=16, d_model=32, heads=4, layers=12, mlp_ratio=4, batch=8)
RESNET50 = dict(base=8, stages=(3, 4, 6, 3), image=8, classes=10, batch=8)
#: Leaves of the ResNet-50-shaped pytree: stem (3) + 16 blocks x 9 + 4 projections x 3
#: + head (2).
RESNET50_LEAVES = 3 + 9 * sum(RESNET50["stages"]) + 3 * len(RESNET50["stages"]) + 2
GPT2_LEAVES = 2 + 12 * GPT2["layers"] + 2
NUM_DEVICES = 8
OPTIMIZERS = ("adam", "lbfgs", "mlbfgs", "mlbfgs_stacked", "mlbfgs_all", "mlbfgs_labels",
              "mlbfgs_slices8", "mlbfgs_paper")
QUICK_OPTIMIZERS = ("adam", "mlbfgs")
PLACEMENTS = ("fsdp", "zero", "shard_map")
#: Models measured under the placements in the full run.
PLACEMENT_MODELS = ("mlp128", "gpt2", "resnet50")


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Model:
    """A parameter pytree, a batch and ``loss(params, batch) -> scalar``.

    ``labels`` gives the labels pytree of ``mlbfgs_labels`` (one label per top-level layer).
    """

    name: str
    params: Any
    batch: Any
    loss: Callable
    labels: Callable
    note: str

    @property
    def num_leaves(self) -> int:
        return len(jax.tree.leaves(self.params))

    @property
    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.params)))


def _normal(rng, shape, scale=1.0):
    """Float32 normal numbers from NumPy (building a model must not compile anything)."""
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _row(v):
    """``v`` of shape (n,) as (1, n), for explicit broadcasting against (batch, n)."""
    return v.reshape(1, -1)


def _last(v, ndim):
    """A (c,) vector shaped to broadcast along the last axis of an ``ndim`` array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def mlp(num_leaves: int, seed: int = 0) -> Model:
    """A deep tanh MLP of width 64 with ``num_leaves // 2`` layers."""
    if num_leaves < 2 or num_leaves % 2:
        raise ValueError(f"an MLP has 2 leaves per layer, got {num_leaves}")
    layers = num_leaves // 2
    rng = np.random.default_rng(seed)
    w = MLP_WIDTH
    params = {f"layer_{i:03d}": {"w": _normal(rng, (w, w), 1 / math.sqrt(w)),
                                 "b": jnp.zeros((w,))} for i in range(layers)}
    x = _normal(rng, (MLP_BATCH, w))
    y = _normal(rng, (MLP_BATCH, w))

    def loss(params, batch):
        h, target = batch
        names = sorted(params)
        for i, name in enumerate(names):
            h = h @ params[name]["w"] + _row(params[name]["b"])
            if i + 1 < len(names):
                h = jnp.tanh(h)
        return jnp.mean((h - target) ** 2)

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}

    return Model(f"mlp{num_leaves}", params, (x, y), loss, labels,
                 f"tanh MLP, {layers} layers of 64x64 + 64, batch {MLP_BATCH}")


def _layer_norm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return ((x - mean) * lax.rsqrt(var + eps) * _last(p["scale"], x.ndim)
            + _last(p["bias"], x.ndim))


def _dense(x, p):
    return x @ p["kernel"] + _last(p["bias"], x.ndim)


def gpt2(seed: int = 0, **sizes) -> Model:
    """GPT-2 small's 148-leaf structure at small widths, with a real forward pass.

    ``sizes``: entries of :data:`GPT2` to replace (e.g. ``d_model=256``).
    """
    c = {**GPT2, **sizes}
    d, v, t, nl = c["d_model"], c["vocab"], c["context"], c["layers"]
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out):
        return {"kernel": _normal(rng, (n_in, n_out), 0.02),
                "bias": jnp.zeros((n_out,))}

    def ln():
        return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}

    blocks = [{"ln_1": ln(),
               "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
               "ln_2": ln(),
               "mlp": {"c_fc": dense(d, c["mlp_ratio"] * d),
                       "c_proj": dense(c["mlp_ratio"] * d, d)}} for _ in range(nl)]
    params = {"wte": _normal(rng, (v, d), 0.02), "wpe": _normal(rng, (t, d), 0.01),
              "h": blocks, "ln_f": ln()}
    tokens = jnp.asarray(rng.integers(0, v, (c["batch"], t)), jnp.int32)
    heads = c["heads"]
    mask = jnp.tril(jnp.ones((t, t), bool)).reshape(1, 1, t, t)

    def attention(x, p):
        b, n, _ = x.shape
        q, k, val = jnp.split(_dense(x, p["c_attn"]), 3, axis=-1)
        split = lambda z: z.reshape(b, n, heads, d // heads)
        q, k, val = split(q), split(k), split(val)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
        att = jnp.where(mask[:, :, :n, :n], att, jnp.finfo(att.dtype).min)
        att = jax.nn.softmax(att, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, val).reshape(b, n, d)
        return _dense(y, p["c_proj"])

    def loss(params, tokens):
        n = tokens.shape[1]
        x = params["wte"][tokens] + params["wpe"][:n].reshape(1, n, d)
        for blk in params["h"]:
            x = x + attention(_layer_norm(x, blk["ln_1"]), blk["attn"])
            h = jax.nn.gelu(_dense(_layer_norm(x, blk["ln_2"]), blk["mlp"]["c_fc"]))
            x = x + _dense(h, blk["mlp"]["c_proj"])
        x = _layer_norm(x, params["ln_f"])
        logits = jnp.einsum("bnd,vd->bnv", x, params["wte"])  # tied output embedding
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll)

    def labels(params):
        out = {k: jax.tree.map(lambda _, k=k: k, params[k]) for k in ("wte", "wpe", "ln_f")}
        out["h"] = [jax.tree.map(lambda _, i=i: f"h{i}", b) for i, b in enumerate(params["h"])]
        return out

    return Model("gpt2", params, tokens, loss, labels,
                 f"GPT-2-small structure, d_model {d}, {heads} heads, vocab {v}, context {t}, "
                 f"MLP {c['mlp_ratio']}x, batch {c['batch']}")


def _conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _batch_norm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=(0, 1, 2), keepdims=True)
    return ((x - mean) * lax.rsqrt(var + eps) * _last(p["scale"], 4)
            + _last(p["bias"], 4))


def resnet50(seed: int = 0, **sizes) -> Model:
    """ResNet-50's leaf structure (161 leaves) at base width 8, with a real forward pass.

    ``sizes``: entries of :data:`RESNET50` to replace (e.g. ``base=16``).
    """
    c = {**RESNET50, **sizes}
    base = c["base"]
    rng = np.random.default_rng(seed)

    def conv(kh, cin, cout):
        return _normal(rng, (kh, kh, cin, cout), math.sqrt(2.0 / (kh * kh * cin)))

    def bn(ch):
        return {"scale": jnp.ones((ch,)), "bias": jnp.zeros((ch,))}

    params = {"stem": {"conv": conv(3, 3, base), "bn": bn(base)}}
    cin = base
    for s, depth in enumerate(c["stages"]):
        width = base * 2 ** s
        blocks = []
        for i in range(depth):
            blk = {"conv1": conv(1, cin, width), "bn1": bn(width),
                   "conv2": conv(3, width, width), "bn2": bn(width),
                   "conv3": conv(1, width, 4 * width), "bn3": bn(4 * width)}
            if i == 0:
                blk["proj_conv"] = conv(1, cin, 4 * width)
                blk["proj_bn"] = bn(4 * width)
            blocks.append(blk)
            cin = 4 * width
        params[f"stage{s + 1}"] = blocks
    params["head"] = {"kernel": _normal(rng, (cin, c["classes"]), 1 / math.sqrt(cin)),
                      "bias": jnp.zeros((c["classes"],))}
    images = _normal(rng, (c["batch"], c["image"], c["image"], 3))
    labels_y = jnp.asarray(rng.integers(0, c["classes"], (c["batch"],)), jnp.int32)
    num_stages = len(c["stages"])

    def loss(params, batch):
        x, y = batch
        x = jax.nn.relu(_batch_norm(_conv(x, params["stem"]["conv"]), params["stem"]["bn"]))
        for s in range(num_stages):
            for i, blk in enumerate(params[f"stage{s + 1}"]):
                stride = 2 if (i == 0 and s > 0) else 1
                h = jax.nn.relu(_batch_norm(_conv(x, blk["conv1"]), blk["bn1"]))
                h = jax.nn.relu(_batch_norm(_conv(h, blk["conv2"], stride), blk["bn2"]))
                h = _batch_norm(_conv(h, blk["conv3"]), blk["bn3"])
                if "proj_conv" in blk:
                    x = _batch_norm(_conv(x, blk["proj_conv"], stride), blk["proj_bn"])
                x = jax.nn.relu(x + h)
        logits = _dense(jnp.mean(x, axis=(1, 2)), params["head"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}

    return Model("resnet50", params, (images, labels_y), loss, labels,
                 f"ResNet-50 structure, base width {base} (stage outputs "
                 f"{', '.join(str(4 * base * 2 ** s) for s in range(num_stages))}), "
                 f"{c['image']}x{c['image']}x3 images, batch {c['batch']}")


def make_model(name: str) -> Model:
    """``mlp<L>``, ``gpt2`` or ``resnet50``."""
    if name.startswith("mlp"):
        return mlp(int(name[3:]))
    if name == "gpt2":
        return gpt2()
    if name == "resnet50":
        return resnet50()
    raise ValueError(f"unknown model {name!r}")


# ----------------------------------------------------------------------------- optimizers


def make_optimizer(name: str, model: Model, **kw) -> optax.GradientTransformation:
    """The optimizer ``name`` of :data:`OPTIMIZERS` (``kw`` go to ``mlbfgs``)."""
    if name == "adam":
        return optax.adam(LR)
    if name == "lbfgs":
        return optax.lbfgs(LR, linesearch=None)
    blocks = {"mlbfgs": "leaf", "mlbfgs_paper": "leaf", "mlbfgs_all": "all",
              "mlbfgs_slices8": mlbfgs_optax.EqualSlices(8)}
    if name == "mlbfgs_labels":
        return make_mlbfgs(LR, blocks=model.labels(model.params), **kw)
    if name == "mlbfgs_paper":
        return make_mlbfgs(LR, **dict(mlbfgs_optax.paper_defaults, **kw))
    if name == "mlbfgs_stacked":
        return make_mlbfgs(LR, packing="stacked", **kw)
    if name in blocks:
        return make_mlbfgs(LR, blocks=blocks[name], **kw)
    raise ValueError(f"unknown optimizer {name!r}")


def num_blocks(name: str, model: Model) -> int:
    """Curvature blocks of the optimizer (0 for adam and lbfgs)."""
    return {"adam": 0, "lbfgs": 0, "mlbfgs": model.num_leaves,
            "mlbfgs_stacked": model.num_leaves,
            "mlbfgs_paper": model.num_leaves, "mlbfgs_all": 1, "mlbfgs_slices8": 8,
            "mlbfgs_labels": len(set(jax.tree.leaves(model.labels(model.params))))}[name]


# ----------------------------------------------------------------------------- counting


def _sub_jaxprs(value):
    """The jaxprs inside an equation parameter (a jaxpr, a closed one, or a tuple of them)."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def count_eqns(jaxpr, unique: bool = False) -> int:
    """Equations of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``), counted recursively.

    Every equation counts 1, plus the equations of the jaxprs in its parameters (the
    bodies of ``scan``/``while``/``cond``, ``pjit``, ``custom_jvp_call``/``custom_vjp_call``,
    ``shard_map``, ...). With ``unique=False`` a sub-jaxpr counts once per occurrence
    (what a fully inlined program would hold); with ``unique=True`` each distinct jaxpr
    object counts once (the outer one included).
    """
    seen: set[int] = set()

    def walk(jp) -> int:
        if unique:
            if id(jp) in seen:
                return 0
            seen.add(id(jp))
        total = 0
        for eqn in jp.eqns:
            total += 1
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += walk(sub)
        return total

    return walk(jaxpr.jaxpr if isinstance(jaxpr, jax.extend.core.ClosedJaxpr) else jaxpr)


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Setup:
    """What one measurement compiles: ``step(*args)`` and the optimizer update to count."""

    step: Callable
    args: tuple
    update: Callable  # (grads, state, params) -> (updates, state), traced for the count
    update_args: tuple
    context: Callable = lambda: _NullContext()
    state: Any = None
    out_shardings: Any = None  # for placements: the inputs' shardings, so outputs feed back


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _train_step(model: Model, opt, constrain: Callable = lambda p, s: (p, s)) -> Callable:
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(model.loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        params, state = constrain(optax.apply_updates(params, updates), state)
        return params, state, loss

    return step


def single_device_setup(model: Model, opt_name: str) -> Setup:
    opt = make_optimizer(opt_name, model)
    state = opt.init(model.params)
    args = (model.params, state, model.batch)
    return Setup(_train_step(model, opt), args, opt.update, (model.params, state, model.params),
                 state=state)


def _copy(tree):
    """Fresh buffers with the same shardings (donation consumes them; optax.lbfgs's initial
    state also aliases one zero buffer twice, which donation rejects)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


#: Compile tries per row; the least time counts (set by ``--compile-tries``).
COMPILE_TRIES = 3


def _compile(setup: Setup, tries: int):
    """``(traced, lowered, compiled, (trace_s, lower_s, xla_s))`` of the try with the least total.

    Every try compiles afresh: the in-memory caches are cleared and a
    persistent compilation cache, if one is configured, is off meanwhile.
    """
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _least_of(setup, tries)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)


def _least_of(setup: Setup, tries: int):
    best = None
    for _ in range(max(1, tries)):
        jax.clear_caches()
        kw = {} if setup.out_shardings is None else {"out_shardings": setup.out_shardings}
        jitted = jax.jit(setup.step, donate_argnums=(0, 1), **kw)
        t0 = time.perf_counter()
        traced = jitted.trace(*setup.args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        if best is None or t3 - t0 < sum(best[3]):
            best = (traced, lowered, compiled, (t1 - t0, t2 - t1, t3 - t2))
    return best


def measure(setup: Setup, repeats: int, tries: int | None = None) -> dict:
    """Trace/lower/compile seconds, equation counts, HLO lines and the step time.

    The step donates params and state (``donate_argnums=(0, 1)``), as a training loop
    does; each timed call takes the previous call's outputs.
    """
    with setup.context():
        traced, lowered, compiled, (trace_s, lower_s, xla_s) = _compile(
            setup, COMPILE_TRIES if tries is None else tries)
        step_eqns = count_eqns(traced.jaxpr)
        hlo_lines = len(compiled.as_text().splitlines())
        update_jaxpr = jax.make_jaxpr(setup.update)(*setup.update_args)
        params, state, batch = _copy(setup.args[0]), _copy(setup.args[1]), setup.args[2]
        times, loss = [], None
        for i in range(2 + repeats):
            s = time.perf_counter()
            params, state, value = compiled(params, state, batch)
            jax.block_until_ready((params, state, value))
            if i == 0:
                loss = float(value)
            elif i >= 2:
                times.append(time.perf_counter() - s)
        del params, state, value, compiled, lowered, traced
    return {
        "trace_s": trace_s, "lower_s": lower_s, "xla_s": xla_s,
        "compile_s": trace_s + lower_s + xla_s,
        "update_eqns": count_eqns(update_jaxpr),
        "update_eqns_unique": count_eqns(update_jaxpr, unique=True),
        "step_eqns": step_eqns, "hlo_lines": hlo_lines,
        "step_ms": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
        "loss": loss,
    }


def _guarded(fn: Callable, row: dict, repeats: int) -> dict:
    """Runs ``measure(fn(), repeats)`` into ``row``; an exception is recorded, not raised."""
    jax.clear_caches()
    row["library"] = LIBRARY  # placement rows carry their own process's
    t0 = time.perf_counter()
    try:
        setup = fn()
        row.update(measure(setup, repeats))
        if row.get("placement") not in (None, "single"):
            row["state_bytes_per_device_max"] = mlbfgs_optax.state_nbytes(setup.state,
                                                                        per_device=True)
        row["update_eqns_per_leaf"] = row["update_eqns"] / row["leaves"]
    except Exception as e:  # noqa: BLE001 -- a benchmark row records its failure
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    row["wall_s"] = time.perf_counter() - t0
    return row


def _log(row: dict) -> None:
    if "error" in row:
        print(f"  {row['model']:>9} {row['placement']:>9} {row['optimizer']:<15} ERROR "
              f"{row['error'][:300]}", flush=True)
        return
    print(f"  {row['model']:>9} {row['placement']:>9} {row['optimizer']:<15} compile "
          f"{row['compile_s']:7.2f} s (trace {row['trace_s']:.2f}, lower {row['lower_s']:.2f}, "
          f"XLA {row['xla_s']:.2f}); update eqns {row['update_eqns']:>7,} "
          f"({row['update_eqns_per_leaf']:.0f}/leaf); HLO {row['hlo_lines']:>8,} lines; "
          f"step {row['step_ms']:.2f} ms", flush=True)


def warm_up() -> None:
    """Pays the process's one-time costs (first compile, first dispatch) before measuring."""
    model = mlp(2)
    measure(single_device_setup(model, "adam"), 1, tries=1)


def run_single(models: Sequence[str], opts: Sequence[str], repeats: int) -> list[dict]:
    rows = []
    for name in models:
        model = make_model(name)
        for opt_name in opts:
            row = {"model": name, "leaves": model.num_leaves, "params": model.num_params,
                   "optimizer": opt_name, "placement": "single",
                   "blocks": num_blocks(opt_name, model)}
            rows.append(_guarded(functools.partial(single_device_setup, model, opt_name), row,
                                 repeats))
            _log(rows[-1])
    return rows


# ----------------------------------------------------------------------------- placements


def _fsdp_spec(x, n):
    """P with "x" on the first axis of ``x`` whose size is a multiple of ``n`` (else P())."""
    for axis, size in enumerate(x.shape):
        if size % n == 0:
            return P(*(None,) * axis, "x")
    return P()


def _batch_spec(batch):
    return jax.tree.map(lambda _: P("x"), batch)


def placement_setup(model: Model, opt_name: str, placement: str, mesh) -> Setup:
    """``opt_name`` is ``adam`` or ``mlbfgs`` (the mL-BFGS variant of the placement)."""
    n = mesh.size
    replicated = NamedSharding(mesh, P())
    put = lambda tree, specs: jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
    batch = put(model.batch, _batch_spec(model.batch))
    in_mesh = lambda: jax.set_mesh(mesh)

    def on_mesh(state):
        # optax creates its step counters uncommitted, on one device: replicate them.
        return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                            else jax.device_put(x, replicated), state)

    def setup(step, params, state, update, update_args):
        shardings = lambda t: jax.tree.map(lambda x: x.sharding, t)
        return Setup(step, (params, state, batch), update, update_args, in_mesh, state,
                     (shardings(params), shardings(state), replicated))

    if placement == "fsdp":
        params = put(model.params, jax.tree.map(lambda x: _fsdp_spec(x, n), model.params))
        opt = optax.adam(LR) if opt_name == "adam" else mlbfgs_optax.mlbfgs(LR)
        state = on_mesh(opt.init(params))
        return setup(_train_step(model, opt), params, state, opt.update, (params, state, params))
    params = put(model.params, jax.tree.map(lambda _: P(), model.params))
    if placement == "zero":
        opt = (optax.adam(LR) if opt_name == "adam" else mlbfgs_optax.mlbfgs(
            LR, blocks=mlbfgs_optax.EqualSlices(n), axis_name="x", mesh=mesh))
        with jax.set_mesh(mesh):
            state = on_mesh(opt.init(params))
        state_shardings = jax.tree.map(lambda x: x.sharding, state)

        def constrain(p, s):
            return (lax.with_sharding_constraint(p, replicated),
                    lax.with_sharding_constraint(s, state_shardings))

        return setup(_train_step(model, opt, constrain), params, state, opt.update,
                     (params, state, params))
    if placement == "shard_map":
        if opt_name == "adam":
            opt = optax.adam(LR)
            state = opt.init(params)
            specs = jax.tree.map(lambda _: P(), state)
        else:
            opt = mlbfgs_optax.mlbfgs(LR, blocks=mlbfgs_optax.EqualSlices(n), axis_name="x")
            state = opt.init(params)
            specs = mlbfgs_optax.state_partition_specs(state, "x")
        state = put(state, specs)
        batch_specs = _batch_spec(model.batch)

        def local(p, s, b):
            loss, g = jax.value_and_grad(model.loss)(p, b)
            g, loss = lax.pmean((g, loss), "x")
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        step = jax.shard_map(local, mesh=mesh, in_specs=(P(), specs, batch_specs),
                             out_specs=(P(), specs, P()))
        update = jax.shard_map(lambda g, s, p: opt.update(g, s, p), mesh=mesh,
                               in_specs=(P(), specs, P()), out_specs=(P(), specs))
        return setup(step, params, state, update, (params, state, params))
    raise ValueError(f"unknown placement {placement!r}")


def run_placements(models: Sequence[str], placements: Sequence[str],
                   repeats: int) -> list[dict]:
    """Every placement x {adam, mlbfgs} on ``models``; needs :data:`NUM_DEVICES` devices."""
    if jax.device_count() < NUM_DEVICES:
        raise RuntimeError(f"placements need {NUM_DEVICES} devices, have {jax.device_count()}")
    mesh = jax.make_mesh((NUM_DEVICES,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:NUM_DEVICES])
    variant = {"fsdp": "mlbfgs (leaf blocks, follows params)",
               "zero": "mlbfgs (EqualSlices(8), axis_name, mesh)",
               "shard_map": "mlbfgs (EqualSlices(8), axis_name)"}
    rows = []
    for name in models:
        model = make_model(name)
        for placement in placements:
            for opt_name in ("adam", "mlbfgs"):
                row = {"model": name, "leaves": model.num_leaves, "params": model.num_params,
                       "optimizer": opt_name, "placement": placement,
                       "optimizer_detail": "optax.adam" if opt_name == "adam" else variant[placement],
                       "blocks": 0 if opt_name == "adam" else (
                           model.num_leaves if placement == "fsdp" else NUM_DEVICES)}
                rows.append(_guarded(functools.partial(placement_setup, model, opt_name,
                                                       placement, mesh), row, repeats))
                _log(rows[-1])
    return rows


def run_placements_subprocess(models, placements, repeats) -> list[dict]:
    """:func:`run_placements` in a child process that has 8 fake CPU devices."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "placements.json")
        cmd = [sys.executable, "-m", "examples.benchmarks.compile_cost",
               "--placements-worker", path, "--repeats", str(repeats),
               "--compile-tries", str(COMPILE_TRIES),
               "--placement-models", *models, "--placements", *placements]
        subprocess.run(cmd, env=env, cwd=str(_ROOT), check=True)
        with open(path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- reporting


def add_ratios(rows: list[dict]) -> None:
    """``*_x_adam``: each number over adam's on the same model and placement."""
    keys = ("compile_s", "trace_s", "xla_s", "update_eqns", "hlo_lines", "step_ms")
    base = {(r["model"], r["placement"]): r for r in rows
            if r["optimizer"] == "adam" and "error" not in r}
    for r in rows:
        b = base.get((r["model"], r["placement"]))
        if b is None or "error" in r:
            continue
        for k in keys:
            r[f"{k}_x_adam"] = r[k] / b[k] if b[k] else None


def scaling(rows: list[dict]) -> dict:
    """Per optimizer, the log-log slope of compile seconds, equations and HLO lines against
    MLP leaf count (least squares over the measured sizes; 1 = linear)."""
    out = {}
    mlp_rows = [r for r in rows if r["model"].startswith("mlp") and r["placement"] == "single"
                and "error" not in r]
    for opt in sorted({r["optimizer"] for r in mlp_rows}):
        rs = sorted((r for r in mlp_rows if r["optimizer"] == opt), key=lambda r: r["leaves"])
        if len(rs) < 2:
            continue
        x = np.log([r["leaves"] for r in rs])
        out[opt] = {"leaves": [r["leaves"] for r in rs]}
        for k in ("compile_s", "xla_s", "update_eqns", "hlo_lines"):
            out[opt][f"{k}_slope"] = float(np.polyfit(x, np.log([r[k] for r in rs]), 1)[0])
    return out


def _fmt(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Compile cost of one training step against the model's structure",
        "",
        f"{result['library']}, jax {result['jax']}, optax {result['optax']}; {result['machine']}. "
        f"Mode: {result['mode']}; {result['repeats']} timed step calls per row. "
        f"1-minute load average before / after: {result['load_average_1min_before_after'][0]:.1f}"
        f" / {result['load_average_1min_before_after'][1]:.1f} (a shared machine: compare the "
        f"x adam ratios, measured in the same run, rather than seconds). Wall time "
        f"{result['wall_seconds']:.0f} s.",
        "",
        "One jitted step = loss gradient + `opt.update` + `optax.apply_updates`. "
        "**compile s** = `jax.jit(step).lower(...).compile()` (trace + lower + XLA), the least of "
        f"{result.get('compile_tries', 1)} tries; "
        "**update eqns** = equations of `make_jaxpr(opt.update)`, recursively through every "
        "sub-jaxpr (per occurrence), and per parameter leaf; **HLO lines** = "
        "`compiled.as_text()`; **step ms** = median of the compiled step (params and state "
        "donated and fed back, as in a training loop).",
        "",
    ]
    header = ("| model | leaves | optimizer | blocks | compile s (trace / lower / XLA) | x adam "
              "| update eqns | eqns / leaf | x adam | HLO lines | x adam | step ms | x adam |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|---|"

    def line(r, extra=""):
        if "error" in r:
            return (f"| {r['model']} | {r['leaves']} | {r['optimizer']} | {r['blocks']} | "
                    f"error: {r['error'][:120].replace('|', '/')} |" + " |" * 8 + extra)
        return (f"| {r['model']} | {r['leaves']} | {r['optimizer']} | {r['blocks']} "
                f"| {r['compile_s']:.2f} ({r['trace_s']:.2f} / {r['lower_s']:.2f} / "
                f"{r['xla_s']:.2f}) | {_fmt(r.get('compile_s_x_adam'), '.1f')} "
                f"| {r['update_eqns']:,} | {r['update_eqns_per_leaf']:.0f} "
                f"| {_fmt(r.get('update_eqns_x_adam'), '.1f')} | {r['hlo_lines']:,} "
                f"| {_fmt(r.get('hlo_lines_x_adam'), '.1f')} | {r['step_ms']:.2f} "
                f"| {_fmt(r.get('step_ms_x_adam'), '.1f')} |" + extra)

    single = [r for r in rows if r["placement"] == "single"]
    if single:
        lines += ["## One device", "", header, sep]
        lines += [line(r) for r in single]
        lines.append("")
    sc = result.get("scaling") or {}
    if sc:
        lines += ["## Growth with MLP depth (log-log slope against leaf count; 1 = linear)", "",
                  "| optimizer | leaves | compile s | XLA s | update eqns | HLO lines |",
                  "|---|---|---|---|---|---|"]
        for opt, s in sc.items():
            lines.append(f"| {opt} | {', '.join(map(str, s['leaves']))} "
                         f"| {s['compile_s_slope']:.2f} | {s['xla_s_slope']:.2f} "
                         f"| {s['update_eqns_slope']:.2f} | {s['hlo_lines_slope']:.2f} |")
        lines.append("")
    placed = [r for r in rows if r["placement"] != "single"]
    if placed:
        other = [lib for lib in result.get("library_placements", []) if lib != result["library"]]
        lines += [f"## Placements on {NUM_DEVICES} fake CPU devices (x adam: adam in the same "
                  "placement)", ""]
        if other:
            lines += [f"Measured in a separate process that imported a different library: "
                      f"{'; '.join(other)}.", ""]
        lines += [header + " placement | state bytes / device (max) |", sep + "---|---|"]
        for r in placed:
            extra = (f" {r['placement']} ({r.get('optimizer_detail', '')}) "
                     f"| {r.get('state_bytes_per_device_max', 0):,} |")
            lines.append(line(r, extra))
        lines.append("")
    lines += ["Models: " + "; ".join(f"`{k}`: {v}" for k, v in result["models"].items()) + ".",
              ""]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Log-log compile seconds against MLP leaf count, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["model"].startswith("mlp")
            and r["placement"] == "single" and "error" not in r]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    main_style = {"adam": "tab:blue", "lbfgs": "tab:orange", "mlbfgs": "tab:red"}
    thin = {"mlbfgs_stacked": "tab:olive", "mlbfgs_all": "tab:purple", "mlbfgs_labels": "tab:brown",
            "mlbfgs_slices8": "tab:green", "mlbfgs_paper": "tab:pink"}
    for opt in [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in rows)]:
        rs = sorted((r for r in rows if r["optimizer"] == opt), key=lambda r: r["leaves"])
        x = [r["leaves"] for r in rs]
        y = [r["compile_s"] for r in rs]
        if opt in main_style:
            ax.plot(x, y, "o-", lw=2.2, color=main_style[opt], label=opt)
        else:
            ax.plot(x, y, ".-", lw=0.9, alpha=0.8, color=thin.get(opt), label=opt)
    if rows:
        xs = sorted({r["leaves"] for r in rows})
        y0 = min(r["compile_s"] for r in rows if r["leaves"] == xs[0])
        ax.plot(xs, [y0 * x / xs[0] for x in xs], ":", color="gray", lw=1,
                label="∝ leaves (slope 1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("parameter leaves (tanh MLP of width 64)")
    ax.set_ylabel("compile seconds of one train step")
    ax.set_title(f"Compile cost vs leaves ({result['library'].split(',')[0]})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None,
                   help=f"output directory (default {harness.DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="MLP at 8 and 32 leaves, adam and mlbfgs, 5 calls, no placements, no "
                   "plot; writes nothing unless --out is given")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed step calls per row (default 20, 5 with --quick)")
    p.add_argument("--compile-tries", type=int, default=None,
                   help="compile tries per row, the least time counts (default 3, 1 with "
                   "--quick)")
    p.add_argument("--mlp-leaves", type=int, nargs="*", default=None,
                   help=f"MLP leaf counts (default {' '.join(map(str, MLP_LEAVES))})")
    p.add_argument("--models", nargs="*", default=None,
                   help="mlp, gpt2, resnet50 (default all; --quick: mlp)")
    p.add_argument("--opts", nargs="*", default=None, choices=OPTIMIZERS,
                   help="optimizers (default all; --quick: adam mlbfgs)")
    p.add_argument("--placements", nargs="*", default=None, choices=PLACEMENTS,
                   help="placements on 8 fake devices (default all; none with --quick)")
    p.add_argument("--placement-models", nargs="*", default=None,
                   help=f"models for the placements (default {' '.join(PLACEMENT_MODELS)})")
    p.add_argument("--no-placements", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--placements-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    global COMPILE_TRIES
    COMPILE_TRIES = args.compile_tries or (1 if args.quick else 3)

    if args.placements_worker:  # child process of run_placements_subprocess
        warm_up()
        rows = run_placements(args.placement_models or PLACEMENT_MODELS,
                              args.placements or PLACEMENTS, repeats)
        with open(args.placements_worker, "w") as f:
            json.dump(rows, f)
        return {"rows": rows}

    leaves = args.mlp_leaves or (QUICK_MLP_LEAVES if args.quick else MLP_LEAVES)
    families = args.models or (["mlp"] if args.quick else ["mlp", "gpt2", "resnet50"])
    models = [m for f in families for m in ([f"mlp{n}" for n in leaves] if f == "mlp" else [f])]
    opts = args.opts or (QUICK_OPTIMIZERS if args.quick else OPTIMIZERS)
    placements = ([] if args.no_placements or (args.quick and args.placements is None)
                  else (args.placements or PLACEMENTS))
    placement_models = args.placement_models or PLACEMENT_MODELS

    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    print(f"compile_cost: {LIBRARY}, jax {jax.__version__}; models {models}; optimizers "
          f"{list(opts)}; placements {list(placements)} on {list(placement_models)}",
          flush=True)
    warm_up()
    rows = run_single(models, opts, repeats)
    if placements:
        if jax.device_count() >= NUM_DEVICES:
            rows += run_placements(placement_models, placements, repeats)
        else:
            rows += run_placements_subprocess(placement_models, placements, repeats)
    add_ratios(rows)
    described = {m: make_model(m) for m in dict.fromkeys(
        models + (list(placement_models) if placements else []))}
    result = {
        "library": LIBRARY,
        "library_placements": sorted({r["library"] for r in rows if r["placement"] != "single"}),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "machine": harness.machine(),
        "mode": "quick" if args.quick else "full",
        "config": {"mlp_leaves": list(leaves), "models": models, "optimizers": list(opts),
                   "placements": list(placements),
                   "placement_models": list(placement_models) if placements else [],
                   "learning_rate": LR, "gpt2": GPT2, "resnet50": RESNET50,
                   "mlp_width": MLP_WIDTH, "mlp_batch": MLP_BATCH},
        "models": {m: f"{mod.note}; {mod.num_leaves} leaves, {mod.num_params:,} parameters"
                   for m, mod in described.items()},
        "repeats": repeats,
        "compile_tries": COMPILE_TRIES,
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "wall_seconds": time.perf_counter() - start,
        "scaling": scaling(rows),
        "rows": rows,
    }
    md = markdown(result)
    if not args.quick or args.out is not None:
        out = args.out or harness.DEFAULT_OUT
        harness.write_report(out, "compile_cost", result, md)
        if not args.quick and not args.no_plot:
            plot(result, os.path.join(out, "compile_cost.png"))
    print(md)
    return result


if __name__ == "__main__":
    main()
