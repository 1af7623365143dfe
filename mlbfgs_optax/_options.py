"""The hyperparameters of mL-BFGS: validated once, split into static and numeric.

One rule decides what is static. A hyperparameter is **static** when it fixes a
shape, a dtype, the tree structure or a code path: ``memory_size``, ``blocks``,
the flags, the dtypes and the device placement. Those live in the frozen,
hashable :class:`Options`. Every **numeric** hyperparameter (``beta``, the
damping bounds, ``update_period``, ...) lives in :class:`Hyperparams`, a pytree
whose leaves may be traced, e.g. under :func:`optax.inject_hyperparams`. A
numeric value that switches work off (``pair_momentum=0``, ``sigma_yy=inf``)
does so only when it is a concrete number (:func:`is_number`); a traced value
always takes the general path, which computes the same thing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from mlbfgs_optax import _distributed


def is_number(x) -> bool:
    """A concrete real scalar (Python or NumPy), not a bool and not a jax value."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check(name: str, value: Any, ok, expected: str, where: str = "scale_by_mlbfgs") -> None:
    """Raises a ValueError naming the argument when a concrete ``value`` fails ``ok``."""
    if is_number(value) and (math.isnan(value) or not ok(float(value))):
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected {expected}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...],
                 where: str = "scale_by_mlbfgs") -> None:
    """Raises a ValueError naming the argument when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected "
                         + " or ".join(repr(c) for c in choices) + ".")


def _dtype(name: str, dtype) -> Optional[jnp.dtype]:
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(
            f"scale_by_mlbfgs: {name}={dtype!r} is invalid; expected a floating dtype."
        ) from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"scale_by_mlbfgs: {name}={dtype!r} is invalid; expected a floating dtype "
            "(e.g. jnp.float32 or jnp.bfloat16)."
        )
    return dt


class Hyperparams(NamedTuple):
    r"""The numeric hyperparameters: a pytree, any leaf may be traced.

    Attributes:
      update_period: :math:`T`.
      beta: :math:`\beta`.
      sigma_low: :math:`\sigma_L`.
      sigma_high: :math:`\sigma_H`.
      tau_max: :math:`\tau_0`.
      pair_momentum: :math:`m_2`.
      sigma_yy: :math:`\sigma_{yy}` (resolved: never None).
      curvature_eps: :math:`\epsilon` of the guard, or None for the machine
        epsilon of the accumulation dtype.
      metric_decay: :math:`\beta_2` of the metric's second moment.
      metric_eps: :math:`\epsilon` of the metric :math:`D`.
      step_bound: :math:`\kappa`, or None (off).
      roundoff_rejection: :math:`c` of the round-off test, or None (off).
      learning_rate: :math:`\eta` when a number (pairs in direction units), or
        None (a schedule lives in :attr:`Options.lr_schedule`, or no rate).
      pair_warmup: calls before the first pair may be stored, or None for
        one averaging horizon, :math:`1/(1-\beta)` (0: from the first pair
        step on, as in the paper).
      momentum: :math:`\mu` of the debiased EMA of the direction, or None
        (no momentum).
    """

    update_period: Any
    beta: Any
    sigma_low: Any
    sigma_high: Any
    tau_max: Any
    pair_momentum: Any
    sigma_yy: Any
    curvature_eps: Any
    metric_decay: Any
    metric_eps: Any
    step_bound: Any
    roundoff_rejection: Any
    learning_rate: Any
    pair_warmup: Any = None
    momentum: Any = None


@dataclasses.dataclass(frozen=True)
class Options:
    r"""The static hyperparameters (hashable: a static argument of ``jax.jit``).

    Attributes:
      memory_size: :math:`M`, pairs kept per block.
      blocks: the user's block spec. Not part of the hash or equality: its whole
        effect is the :class:`~mlbfgs_optax.BlockLayout` built from it, which is a
        static argument of its own.
      packing: ``"auto"``, ``"rows"``, ``"stacked"`` or ``"leaves"`` (how the layout stores
        the params-shaped state; likewise only through the layout).
      refresh_grad_average: reset the gradient average after each pair step.
      normalize: divide the direction by its global norm once a pair exists.
      cache_gram: keep the Gram matrices and run the Gram-form two-loop.
      bias_correction: form pairs from bias-corrected averages.
      history_dtype: dtype of the stored pairs, or None (parameter dtype, at
        least float32).
      averages_dtype: dtype of the averages and snapshots, or None.
      pair_momentum_off: ``pair_momentum`` is a concrete 0 (skip its work).
      yy_bound_off: ``sigma_yy`` is a concrete inf (skip its work).
      metric: ``"adam"`` (pairs whitened by Adam's diagonal, :math:`H_0 = D`)
        or ``"identity"`` (the paper's :math:`H_0 = \gamma I`).
      step_bound_off: ``step_bound`` is None.
      roundoff_off: ``roundoff_rejection`` is None.
      lr_schedule: the learning-rate schedule (a callable of the step), or
        None when the rate is a number (in :class:`Hyperparams`) or not given.
      placement: where the blocks live (:mod:`mlbfgs_optax._distributed`).
      curvature: ``"gradient_difference"`` (the paper's :math:`y`, the change
        of the gradient average) or ``"hessian_vector"`` (:math:`y = \nabla^2 f\, s`
        on the current batch, from the ``grad_fn`` passed to ``update``).
      momentum: the state holds the direction's EMA (``momentum`` is not None).
      pair_form: ``"along_s"`` (a pair keeps only its damped curvature along
        :math:`s`, :math:`\hat y = \hat\mu s`) or ``"full"`` (the paper's
        :math:`\hat y = \tau y + (1-\tau) s`).
    """

    memory_size: int
    blocks: Any = dataclasses.field(compare=False, hash=False)
    packing: str = dataclasses.field(compare=False, hash=False)
    refresh_grad_average: bool
    normalize: bool
    cache_gram: bool
    bias_correction: bool
    history_dtype: Optional[jnp.dtype]
    averages_dtype: Optional[jnp.dtype]
    pair_momentum_off: bool
    yy_bound_off: bool
    metric: str
    step_bound_off: bool
    roundoff_off: bool
    lr_schedule: Optional[Callable]
    placement: _distributed.Placement
    curvature: str
    momentum: bool
    pair_form: str


def _finite_int_at_least_one(t) -> bool:
    return math.isfinite(t) and t == int(t) and t >= 1


#: (name, accepted, what is expected) of every numeric hyperparameter; ``None`` is
#: accepted wherever the argument has a None meaning (it is not checked).
_RULES = (
    ("update_period", _finite_int_at_least_one, "an int >= 1"),
    ("beta", lambda b: 0.0 <= b < 1.0, "a float in [0, 1)"),
    ("sigma_low", lambda v: v <= 1.0,
     "sigma_low <= 1 (1: pairs never lengthen the step; -inf: no lower bound)"),
    ("sigma_high", lambda v: v > 1.0, "sigma_high > 1 (or inf: no upper bound)"),
    ("sigma_yy", lambda v: v >= 1.0, "sigma_yy >= 1 (or inf: no bound on y^T y / s^T y)"),
    ("tau_max", lambda v: 0.0 < v <= 1.0, "a float in (0, 1]"),
    ("pair_momentum", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)"),
    ("curvature_eps", lambda e: e >= 0.0 and math.isfinite(e), "a finite float >= 0"),
    ("metric_decay", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)"),
    ("metric_eps", lambda e: 0.0 < e < math.inf, "a finite float > 0"),
    ("step_bound", lambda v: 0.0 < v < math.inf, "a finite float > 0, or None (no bound)"),
    ("roundoff_rejection", lambda v: 0.0 <= v < math.inf,
     "a finite float >= 0, or None (off)"),
    ("pair_warmup", lambda v: v >= 0 and math.isfinite(v),
     "a finite number >= 0, or None (1 / (1 - beta))"),
    ("momentum", lambda v: 0.0 <= v < 1.0, "a float in [0, 1), or None (no momentum)"),
)

#: (name, accepted values) of every string option.
_CHOICES = (
    ("metric", ("adam", "identity")),
    ("packing", ("auto", "rows", "stacked", "leaves")),
    ("curvature", ("gradient_difference", "hessian_vector")),
    ("pair_form", ("along_s", "full")),
)


def _check_memory_size(memory_size) -> None:
    if not isinstance(memory_size, (int, np.integer)) or isinstance(memory_size, bool) or (
        memory_size < 1
    ):
        raise ValueError(
            f"scale_by_mlbfgs: memory_size={memory_size!r} is invalid; expected an int >= 1 "
            "(pass it in static_args of optax.inject_hyperparams)."
        )


def _check_structure(blocks, curvature, axis_name, mesh) -> None:
    """The checks that involve more than one number: block specs and placements."""
    if isinstance(blocks, str) and blocks not in ("leaf", "all"):
        raise ValueError(
            f"scale_by_mlbfgs: blocks={blocks!r} is invalid; expected 'leaf', 'all', an "
            "EqualSlices, a label pytree or a callable params -> labels."
        )
    if curvature == "hessian_vector" and (axis_name is not None or mesh is not None):
        raise ValueError(
            "scale_by_mlbfgs: curvature='hessian_vector' runs on one device or under GSPMD "
            "only; it cannot be combined with axis_name or mesh."
        )


def make_options(
    *,
    memory_size,
    update_period,
    beta,
    sigma_low,
    sigma_high,
    tau_max,
    pair_momentum,
    refresh_grad_average,
    normalize,
    blocks,
    sigma_yy,
    cache_gram,
    bias_correction,
    history_dtype,
    averages_dtype,
    curvature_eps,
    axis_name,
    mesh,
    metric,
    metric_decay,
    metric_eps,
    step_bound,
    roundoff_rejection,
    learning_rate,
    curvature,
    pair_warmup,
    packing,
    momentum,
    pair_form,
) -> tuple[Options, Hyperparams]:
    """Validates every argument of ``scale_by_mlbfgs`` and splits them.

    Every argument is required: the defaults live in ``scale_by_mlbfgs`` alone.

    Returns:
      ``(options, hyperparams)``.

    Raises:
      ValueError: naming the first invalid argument, its value and what is
        accepted.
    """
    args = dict(locals())
    _check_memory_size(memory_size)
    for name, ok, expected in _RULES:
        if args[name] is not None:
            check(name, args[name], ok, expected)
    if learning_rate is not None and not callable(learning_rate):
        check("learning_rate", learning_rate, lambda v: 0.0 <= v < math.inf,
              "a finite float >= 0, a schedule, or None")
    for name, choices in _CHOICES:
        check_choice(name, args[name], choices)
    _check_structure(blocks, curvature, axis_name, mesh)
    return _split(**args)


def _split(*, memory_size, update_period, beta, sigma_low, sigma_high, tau_max, pair_momentum,
           refresh_grad_average, normalize, blocks, sigma_yy, cache_gram, bias_correction,
           history_dtype, averages_dtype, curvature_eps, axis_name, mesh, metric, metric_decay,
           metric_eps, step_bound, roundoff_rejection, learning_rate, curvature, pair_warmup,
           packing, momentum, pair_form) -> tuple[Options, Hyperparams]:
    """The validated arguments as ``(Options, Hyperparams)``: static and numeric."""
    placement = _distributed.make_placement(axis_name, mesh, blocks)
    if sigma_yy is None:
        sigma_yy = 10.0 * sigma_high if is_number(sigma_high) else math.inf
    options = Options(
        memory_size=int(memory_size),
        blocks=blocks,
        packing=packing,
        refresh_grad_average=bool(refresh_grad_average),
        normalize=bool(normalize),
        cache_gram=bool(cache_gram),
        bias_correction=bool(bias_correction),
        history_dtype=_dtype("history_dtype", history_dtype),
        averages_dtype=_dtype("averages_dtype", averages_dtype),
        pair_momentum_off=is_number(pair_momentum) and pair_momentum == 0,
        yy_bound_off=is_number(sigma_yy) and math.isinf(sigma_yy),
        metric=metric,
        step_bound_off=step_bound is None,
        roundoff_off=roundoff_rejection is None,
        lr_schedule=learning_rate if callable(learning_rate) else None,
        placement=placement,
        curvature=curvature,
        momentum=momentum is not None,
        pair_form=pair_form,
    )
    hyper = Hyperparams(
        update_period=update_period,
        beta=beta,
        sigma_low=sigma_low,
        sigma_high=sigma_high,
        tau_max=tau_max,
        pair_momentum=pair_momentum,
        sigma_yy=sigma_yy,
        curvature_eps=curvature_eps,
        metric_decay=metric_decay,
        metric_eps=metric_eps,
        step_bound=step_bound,
        roundoff_rejection=roundoff_rejection,
        learning_rate=None if callable(learning_rate) else learning_rate,
        pair_warmup=pair_warmup,
        momentum=momentum,
    )
    return options, hyper
