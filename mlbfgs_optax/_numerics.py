"""Numerical helpers shared by the pair formation and the two-loop recursion."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """The dtype dot products accumulate in: at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._numerics import accumulation_dtype
      >>> accumulation_dtype(jnp.bfloat16)
      dtype('float32')
    """
    return jnp.dtype(jnp.result_type(jnp.float32, *dtypes))


def safe_div(num: jax.Array, den: jax.Array, default: float = 0.0) -> jax.Array:
    """``num / den`` where ``den != 0``, else ``default`` (no NaN, no inf).

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._numerics import safe_div
      >>> safe_div(jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0]))
      Array([0.5, 0. ], dtype=float32)
    """
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), default)


def all_finite(xs: list[jax.Array]) -> jax.Array:
    r"""Whether every element of every array in ``xs`` is finite (a boolean scalar).

    Taken as whether :math:`\sum_i (x_i - x_i)` is 0 rather than NaN
    (:math:`\infty - \infty` and :math:`{\rm NaN} - {\rm NaN}` are NaN, which every
    sum propagates; it cannot overflow): XLA:CPU reads each array once in a
    library reduction, with no intermediate array. (A maximum of :math:`|x|`
    would not do: vectorised maxima drop NaNs; :math:`0 \cdot x` makes XLA
    materialise an array of zeros.)

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._numerics import all_finite
      >>> all_finite([jnp.ones(3), jnp.array([1.0, jnp.nan])])
      Array(False, dtype=bool)
    """
    zeros = [jnp.sum(x - x).astype(jnp.float32) for x in xs if x.size]
    return functools.reduce(jnp.add, zeros) == 0 if zeros else jnp.asarray(True)


def power_of_two_near(x: jax.Array) -> jax.Array:
    r"""The power of two nearest to ``x > 0`` (in :math:`\log_2`), elementwise; 1 where ``x`` is 0 or not finite.

    Dividing a vector by this before dot products (and multiplying back after)
    keeps them finite for huge but finite inputs. Exact: read off the bits of
    ``x`` (its exponent, and whether its mantissa is at least
    :math:`\sqrt 2`), no logarithm. Below the smallest normal number it is
    that number, so that its inverse stays finite.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._numerics import power_of_two_near
      >>> power_of_two_near(jnp.array([3.0, 0.0, jnp.inf, 0.2]))
      Array([4.  , 1.  , 1.  , 0.25], dtype=float32)
    """
    x = jnp.asarray(x)
    fi = jnp.finfo(x.dtype)
    as_uint = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[fi.bits]
    exponent_bits = ((1 << fi.nexp) - 1) << fi.nmant
    bits = jax.lax.bitcast_convert_type(x, as_uint)
    # 2^floor(log2 x) for a normal x > 0: x with its mantissa bits cleared.
    low = jax.lax.bitcast_convert_type(bits & jnp.asarray(exponent_bits, as_uint), x.dtype)
    up = (x >= low * np.sqrt(2.0).astype(x.dtype)) & (low < fi.max / 2)
    p = jnp.where(up, 2 * low, low)
    p = jnp.where(x < fi.tiny, jnp.asarray(fi.tiny, x.dtype), p)
    return jnp.where(jnp.isfinite(x) & (x > 0), p, jnp.ones_like(x))


def at_most_once(pred, fn, carry):
    """``fn(carry) if pred else carry``, as a ``jax.lax.while_loop`` of zero or one trip.

    XLA updates a loop's carried buffers in place, while a ``lax.cond`` whose
    false branch passes large arrays through gets a copy of every one of them
    on every call (measured on XLA:CPU: 8 copies of the averages and snapshots
    per mL-BFGS step; ``examples/benchmarks/hlo_passes.py`` lists them). Carry
    only what ``fn`` writes and close over what it reads. Unlike ``lax.cond``,
    the loop is not reverse-mode differentiable.

    Args:
      pred: a boolean scalar.
      fn: ``carry -> carry``, same structure, shapes and dtypes.
      carry: any pytree of arrays.

    Returns:
      ``fn(carry)`` where ``pred``, else ``carry``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mlbfgs_optax._numerics import at_most_once
      >>> at_most_once(jnp.array(True), lambda c: c + 1, jnp.zeros(2))
      Array([1., 1.], dtype=float32)
    """
    _, out = jax.lax.while_loop(
        lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn(c[1])), (jnp.asarray(pred), carry))
    return out
