"""The constructs that steer XLA's kernel choices, gathered in one place.

None of them changes a number the optimizer computes: each changes only which
kernels XLA compiles, how often a kernel reads a buffer, or which product runs
on which platform. Every use names its *site*, and
``examples/benchmarks/research/xla_hints.py`` measures the update's compile and
step time with each site replaced by its plain equivalent (the barrier by its
operand, the loop by its body, the platform choice by the default product), at
real widths (its results: ``xla_hints.md`` and, one compile per process,
``xla_hints_fresh.md``; measured on CPU only). What each kept site buys there:

* ``direction_split`` (:func:`once`): the update compiles in 1.6-1.7x less time
  on the many-leaf pytrees (GPT-2's and ResNet-50's structures).
* ``block_indices`` (:func:`opaque_block_indices`): 1.2x less compile time on
  GPT-2's structure, with the default packing and with ``packing="leaves"``.
* ``pair_candidate``, ``packed_leaves``, ``block_values``, ``stacked_inputs``
  (:func:`hold`): together, 1.2x less compile time on GPT-2's structure; their
  effect on the step is within the measurement's noise.
* ``bf16_history`` (:func:`per_platform`): with a bfloat16 history, an ordinary
  step 1.2-1.7x faster on CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mlbfgs_optax import _numerics


def hold(site: str, x):
    """``x`` made once into buffers of its own, behind an optimization barrier.

    Without it XLA fuses the producer of ``x`` into every kernel that reads
    it, so the producer runs once per reader (and, fused into an elementwise
    pass, once per element of a gather).

    Args:
      site: the name of the use (for the measurement).
      x: any pytree of arrays.

    Returns:
      ``x``, the same values.
    """
    del site
    return jax.lax.optimization_barrier(x)


def once(site: str, pred: jax.Array, fn: Callable, carry):
    """``fn(carry)`` where ``pred`` is True (always, at run time), in a loop XLA cannot fold.

    Values handed out of a loop of zero or one trip are opaque to XLA: it
    neither folds them into constants nor fuses the loop's work into the
    kernels that read them. ``pred`` must be True whenever the values are used.

    Args:
      site: the name of the use (for the measurement).
      pred: a traced boolean scalar.
      fn: ``carry -> carry``.
      carry: the values where ``pred`` is False.

    Returns:
      ``fn(carry)`` where ``pred``, else ``carry``.
    """
    del site
    return _numerics.at_most_once(pred, fn, carry)


def per_platform(site: str, args: tuple, cpu: Callable, default: Callable):
    """``cpu(*args)`` on CPU, ``default(*args)`` elsewhere, chosen at lowering.

    Args:
      site: the name of the use (for the measurement).
      args: the arrays both callables take.
      cpu: the CPU form.
      default: the form for every other platform (the same values).

    Returns:
      The chosen form's result.
    """
    del site
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


#: Block -> traced int32 index, set by :func:`opaque_block_indices`.
_BLOCK_INDEX: contextvars.ContextVar[dict] = contextvars.ContextVar("block_index", default={})


def block_index(block: int) -> Optional[jax.Array]:
    """The traced index of ``block`` inside :func:`opaque_block_indices`, else None."""
    return _BLOCK_INDEX.get().get(block)


@contextlib.contextmanager
def opaque_block_indices(blocks: list[int], pred: jax.Array):
    """Within: :func:`block_index` gives each of ``blocks`` as a traced index.

    XLA:CPU compiles each distinct kernel once and reuses it for identical
    ones. Read at a constant index, a per-block value is folded into every
    kernel that uses it, so the kernels of two same-shaped buckets of one
    leaf each differ in that constant and are all compiled; at an index XLA
    cannot fold, they are the same kernels.

    Args:
      blocks: the blocks that own a whole bucket each.
      pred: a traced boolean scalar, True at run time, that XLA cannot
        evaluate (the indices come out of :func:`once` on it).
    """
    if len(blocks) < 2:
        yield
        return
    idx = once("block_indices", pred, lambda _: [jnp.asarray(k, jnp.int32) for k in blocks],
               [jnp.zeros((), jnp.int32) for _ in blocks])
    token = _BLOCK_INDEX.set(dict(zip(blocks, idx)))
    try:
        yield
    finally:
        _BLOCK_INDEX.reset(token)
