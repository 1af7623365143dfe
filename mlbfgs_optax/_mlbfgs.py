r"""mL-BFGS: momentum-based L-BFGS as an optax gradient transformation.

Niu, Fabian, Lee, Soltanolkotabi, Avestimehr, `mL-BFGS: A Momentum-based
L-BFGS for Distributed Large-scale Neural Network Optimization
<https://arxiv.org/abs/2307.13744>`_, TMLR 2023. The authors' PyTorch code
(GitHub yuehniu/mL-BFGS, ``opt/slimblock.py``) fixed the details the paper
leaves open; the differences are listed in the documentation (docs/algorithm.md).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import optax

from mlbfgs_optax import _layout
from mlbfgs_optax import _options
from mlbfgs_optax import _update


def scale_by_mlbfgs(
    memory_size: int = 2,
    update_period: int = 10,
    beta: float = 0.99,
    sigma_low: float = 1.0,
    sigma_high: float = 10.0,
    tau_max: float = 1.0,
    pair_momentum: float = 0.0,
    refresh_grad_average: bool = False,
    normalize: bool = False,
    blocks: _layout.BlockSpec = "leaf",
    *,
    sigma_yy: Optional[float] = None,
    cache_gram: bool = True,
    bias_correction: bool = True,
    history_dtype: Optional[jax.typing.DTypeLike] = None,
    averages_dtype: Optional[jax.typing.DTypeLike] = None,
    curvature_eps: Optional[float] = None,
    axis_name: Optional[str] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    metric: str = "adam",
    metric_decay: float = 0.999,
    metric_eps: float = 1e-8,
    step_bound: Optional[float] = 3.0,
    roundoff_rejection: Optional[float] = 100.0,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    curvature: str = "gradient_difference",
    pair_warmup: Optional[float] = None,
    packing: str = "auto",
    momentum: Optional[float] = None,
    pair_form: str = "along_s",
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions updates by a block-wise, momentum-based L-BFGS (mL-BFGS).

    Every step, per block :math:`b` and with :math:`t` counting calls from 0:

    .. math::
      M^\theta &\leftarrow \beta M^\theta + (1-\beta)\theta_t, \qquad
      M^g \leftarrow \beta M^g + (1-\beta) g_t, \qquad
      \nu \leftarrow \beta_2 \nu + (1-\beta_2)\, g_t \odot g_t, \\
      D &= 1/\big(\sqrt{\nu/(1-\beta_2^{t+1})} + \epsilon\big), \qquad
      d_b = D^{1/2} \tilde H_b\, D^{1/2} g_{t,b}
      \quad \text{(two-loop recursion; } d_b = D g_b \text{ before the first pair).}

    Every ``update_period`` (:math:`T`) calls, :math:`(t+1) \bmod T = 0`, a
    curvature pair is formed from the change of the averages since the last
    such call, :math:`s = M^\theta - M^\theta_{\rm snap}`,
    :math:`y = M^g - M^g_{\rm snap}`, measured in whitened direction units,
    :math:`\tilde s = D^{-1/2} s / \eta_t`, :math:`\tilde y = D^{1/2} y`,
    optionally mixed with the previous pair (``pair_momentum``), damped so
    that :math:`\tilde s^\top\hat y / \tilde s^\top \tilde s \in [\sigma_L, \sigma_H]`
    (:func:`~mlbfgs_optax.damping_weight`), and pushed into the block's ring
    buffer of ``memory_size`` (:math:`M`) pairs unless
    :math:`\tilde s^\top \hat y \le \epsilon\, \tilde s^\top \tilde s`, a number
    is not finite, :math:`s` is at the round-off level of the parameters, or
    fewer than ``pair_warmup`` calls (default :math:`1/(1-\beta)`) have passed.
    :math:`\tilde H_0 = I`, so the step before any pair is RMSprop's
    :math:`D g` and each pair corrects it along its direction; the learning
    rate keeps Adam's meaning throughout. The step bound keeps
    :math:`\|D^{-1/2} d_b\| \le \kappa \|D^{1/2} g_b\|`.

    With ``metric="identity"`` (:data:`~mlbfgs_optax.paper_defaults`) this is
    the paper's algorithm: :math:`D = I`, pairs in parameter units,
    :math:`H_0 = \gamma I` with :math:`\gamma = s^\top\hat y/\hat y^\top\hat y`
    of the newest pair, :math:`d_b = g_b` before the first pair.

    The output is the direction :math:`d` (no learning rate, no sign flip):
    chain :func:`optax.scale_by_learning_rate` after it and pass the same
    ``learning_rate`` here, or use :func:`~mlbfgs_optax.mlbfgs`, which does both.

    A step whose incoming updates contain a NaN or an infinity leaves the state
    untouched (the averages, snapshots and history never see it) and passes
    the updates through unchanged; wrap the optimizer in
    :func:`optax.apply_if_finite` to also skip the parameter update.

    Args:
      memory_size: :math:`M`, pairs kept per block (int >= 1; static under
        :func:`optax.inject_hyperparams`). The state holds :math:`2M + 5`
        parameter-sized arrays (:math:`2M + 6` with ``momentum``; 40 bytes per
        float32 parameter at the default 2, see
        :func:`~mlbfgs_optax.state_bytes_per_param`) and an ordinary step
        streams the history twice, :math:`4M` of its :math:`4M + 9` words per
        parameter. Ill-conditioned deterministic problems want a longer history
        than networks do (``examples/benchmarks/research/lean_state.md``);
        :data:`~mlbfgs_optax.paper_defaults` keeps the paper's 10.
      update_period: :math:`T`, calls between curvature pairs (int >= 1).
      beta: :math:`\beta \in [0, 1)`, EMA coefficient of the parameter and
        gradient averages. ``beta=0, update_period=1`` is plain (damped)
        stochastic L-BFGS.
      sigma_low: :math:`\sigma_L \le 1`, lower bound on the damped curvature
        :math:`s^\top \hat y / s^\top s` (a pair lengthens the step along
        :math:`s` by at most :math:`1/\sigma_L`); ``-inf`` disables it.
      sigma_high: :math:`\sigma_H > 1`, upper bound; ``inf`` disables it.
      tau_max: :math:`\tau_0 \in (0, 1]`, largest weight on :math:`y` (the
        authors use 0.99: every pair gets at least 1% of :math:`s`). Damping is
        off with ``sigma_low=-inf, sigma_high=inf, tau_max=1``; the curvature
        guard stays on.
      pair_momentum: :math:`m_2 \in [0, 1)`, mixes the new pair with the newest
        stored one: :math:`s \leftarrow (1-m_2)s + m_2 s_{\rm prev}`, same for
        :math:`y` (with the damped :math:`\hat y_{\rm prev}`).
      refresh_grad_average: after each pair step reset
        :math:`M^g \leftarrow (1-\beta) g_t` (the authors' code does this).
      normalize: once any block holds a pair, divide the whole direction by
        its global norm :math:`\sqrt{\sum_b \|d_b\|^2}` (the authors' code).
      blocks: the block-diagonal structure: ``"leaf"`` (default, one block per
        parameter leaf), ``"all"`` (one block: classic momentum L-BFGS), an
        :class:`~mlbfgs_optax.EqualSlices`, a pytree of labels shaped like
        params (equal labels form one block), or a callable params -> labels.
        The blocks set the algorithm; ``packing`` only how the state is stored.
      sigma_yy: :math:`\sigma_{yy} \ge 1`, upper bound on
        :math:`\hat y^\top\hat y / s^\top\hat y`; ``inf`` disables it; the
        default ``None`` means :math:`10\,\sigma_H` (so ``inf`` when
        ``sigma_high=inf``: damping is then fully off, as the spec asks). The
        spec's damping bounds the curvature along :math:`s` only; a noisy
        :math:`y` nearly orthogonal to :math:`s` passes it, yet makes the BFGS
        update :math:`I - \rho \hat y s^\top` huge (its norm is
        :math:`1/\cos\angle(s, \hat y)`). This bound lowers :math:`\tau` further
        (:func:`~mlbfgs_optax.yy_bound_weight`) so that, with :math:`\sigma_L`,
        every stored pair has a bounded spectrum, the condition under which
        stochastic damped L-BFGS has bounded :math:`H` (Wang et al., 2017,
        https://arxiv.org/abs/1607.01231). It is not in the authors' code.
      cache_gram: keep the Gram matrices :math:`S^\top Y` and :math:`Y^\top Y`
        of every block in the state (:math:`2M^2` numbers per block, updated
        when a pair is stored) and evaluate the two-loop recursion from them,
        reading the history in two streaming passes. ``False`` runs the plain ``lax.scan``
        two-loop over the history (:math:`2M` dependent passes) and keeps only
        :math:`O(M)` numbers per block.
      bias_correction: form pairs from the bias-corrected averages
        :math:`M / (1 - \beta^k)` (as Adam does). The averages start at zero, so
        without it their change over the first :math:`\sim 1/(1-\beta)` steps
        is dominated by the growth of the weights :math:`1-\beta^k` rather
        than by the movement of the parameters, and the first pairs carry no
        curvature information (for :math:`g = A\theta + b` they give
        :math:`y \ne A s`; with it, :math:`y = A s` exactly). The authors' code
        has no correction: set ``False`` to reproduce it.
      history_dtype: dtype of the stored pairs, e.g. ``jnp.bfloat16`` to halve
        their memory; dot products always accumulate in float32 or wider.
        Default: the parameter dtype promoted to at least float32 (for
        :class:`~mlbfgs_optax.EqualSlices`, the promoted common dtype).
      averages_dtype: dtype of the averages and snapshots; default as above.
      curvature_eps: :math:`\epsilon` of the guard; default the machine epsilon
        of the accumulation dtype.
      axis_name: the device axis that shares the blocks, for use inside
        :func:`jax.shard_map` or :func:`jax.pmap` (with ``mesh=None``), or the
        axis of ``mesh`` to shard them over. Needs
        :class:`~mlbfgs_optax.EqualSlices` blocks whose number is a multiple of
        the axis size: each device then keeps the state of, and runs the
        two-loop recursion for, only its ``num_blocks / N`` slices, and one
        all-gather assembles the direction. Inside ``shard_map``/``pmap`` the
        incoming updates must be the same on every device (all-reduce them
        first, as data parallelism does). With other blocks every device
        computes every block. None: single device.
      mesh: a :class:`jax.sharding.Mesh` for ``jax.jit`` (GSPMD) programs:
        ``init`` places the state sharded over ``axis_name`` from the start
        and ``update`` runs the blocks in a :func:`jax.shard_map` over it.
        Works with Explicit and Auto axes. When params are a single
        ``(num_blocks, block_size)`` array sharded over ``axis_name`` (FSDP
        style), the direction stays sharded and the step has no collective.
      metric: ``"adam"`` (default): the quasi-Newton matrix lives in the
        coordinates whitened by Adam's diagonal :math:`D` (:math:`H_0 = D`,
        pairs whitened when formed); ``"identity"``: the paper's
        :math:`H_0 = \gamma I`, pairs in parameter units.
      metric_decay: :math:`\beta_2 \in [0, 1)`, EMA coefficient of the second
        moment :math:`\nu` (Adam's ``b2``).
      metric_eps: :math:`\epsilon > 0` of :math:`D` (Adam's ``eps``).
      step_bound: :math:`\kappa > 0`: no block's step is longer than
        :math:`\kappa` times the step of :math:`H_0`, measured in the metric
        (:math:`\|D^{-1/2} d_b\| \le \kappa \|D^{1/2} g_b\|`); None: no bound.
      roundoff_rejection: :math:`c \ge 0`: a pair whose
        :math:`\max|s_b| \le c\,\epsilon_{\rm mach} \max|\bar\theta_b|`
        (:math:`\bar\theta` the parameter average) is rounding noise of the
        averages, not curvature, and is rejected; None: off.
      learning_rate: the learning rate :math:`\eta_t` (float or schedule)
        applied after this transformation. With ``metric="adam"`` the pairs
        are measured in direction units :math:`s / \eta_t`, so that
        :math:`H_0 = D` is the step the chain takes before scaling; without it
        :math:`\eta = 1`. Ignored with ``metric="identity"``.
        :func:`~mlbfgs_optax.mlbfgs` passes its own.
      pair_warmup: no pair is stored before this many calls; None (default):
        one averaging horizon, :math:`1/(1-\beta)` calls (100 at
        :math:`\beta = 0.99`), so that the first pairs are not chords of the
        initial transient that the averages still span; until then the step
        is :math:`D g` (RMSprop's). 0: pairs from the first pair step on (the
        paper). Measured in ``examples/benchmarks/research/hessian_vector_pairs.md``.
      curvature: how a pair's :math:`y` is measured. ``"gradient_difference"``
        (default, the paper): the change of the gradient average,
        :math:`y = M^g - M^g_{\rm snap}`. ``"hessian_vector"``:
        :math:`y = \nabla^2 f_{\rm batch}(\theta_t)\, s`, the exact curvature of
        the current batch's loss along :math:`s` (as in SQN, Byrd et al., 2016,
        https://arxiv.org/abs/1401.7020), computed only on pair steps by
        forward-over-reverse differentiation of the ``grad_fn`` that ``update``
        then requires: ``update(updates, state, params, grad_fn=...)`` with
        ``grad_fn(params)`` the gradient of the loss on the batch that gave
        ``updates`` (about two gradients' cost every :math:`T` calls). Pairs
        are then free of gradient noise; the rest of the method is unchanged.
        One device or GSPMD only (not with ``axis_name`` or ``mesh``).
      packing: how the params-shaped state is stored (the directions do not
        depend on it). ``"rows"``: the leaves of one dtype raveled into one
        buffer of rows, each row in one block, so the update compiles to the
        same few kernels however many leaves the model has; a sharded leaf is
        gathered into it. ``"stacked"``: the leaves of one shape and dtype
        stacked, ``(k, *shape)``, sharded like the leaves (FSDP, tensor
        parallel); one set of kernels per distinct leaf shape. ``"auto"``
        (default): ``"stacked"`` for the leaves that ``init`` sees split over
        a mesh axis (concrete sharded arrays, or Explicit mesh axes under
        ``jax.jit``) and for every leaf under a mesh with Auto axes set by
        ``jax.set_mesh``; ``"rows"`` for the rest. Without a mesh in context,
        ``init`` under ``jax.jit`` or ``jax.eval_shape`` cannot see a leaf's
        Auto-axis sharding: pass ``"stacked"`` for a state sharded like the
        params there. In these modes the 8 largest leaves of 65,536 or more
        numbers are each a ``(1, *shape)`` buffer of their own, read and
        written in place; with ``"auto"`` the other leaves of that size are
        stacked by shape (at most 8 stacks) rather than row-packed.
        ``"leaves"``: as ``"auto"``, but every leaf of 65,536 or more numbers
        a buffer of its own: for models with many such leaves, a faster step
        for a longer compile (the update-cost study has the trade).
        Ignored with :class:`~mlbfgs_optax.EqualSlices` (one flat buffer).
      momentum: :math:`\mu \in [0, 1)`: the output is the debiased EMA of
        the direction, :math:`m \leftarrow \mu m + (1-\mu) d`,
        :math:`m / (1-\mu^{t+1})`, as ``optax.ema(momentum, debias=True)``
        chained after it would give, but held packed in the state
        (``direction_avg``), so it adds no work per parameter leaf; a step
        that is not finite leaves :math:`m` as it was. None (default): the
        direction itself. :func:`~mlbfgs_optax.mlbfgs` passes its own (0.9).
      pair_form: ``"along_s"``: every pair keeps only its damped curvature
        along :math:`s`, :math:`\hat y = \hat\mu\, s`
        (:func:`~mlbfgs_optax.along_s_curvature`), so :math:`\tilde H` changes
        only along the stored :math:`s` and its eigenvalues stay in
        :math:`[1/\sigma_H, 1/\sigma_L]`; with ``sigma_low=1`` a pair can only
        shorten the step (:math:`\tilde H \preceq \tilde H_0`). ``"full"``:
        the paper's :math:`\hat y = \tau y + (1-\tau) s`, whose part
        orthogonal to :math:`s` (on mini-batches mostly noise) turns the
        gradient's component along :math:`\hat y` into a step along :math:`s`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs
      ``params`` (and ``grad_fn`` with ``curvature="hessian_vector"``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import mlbfgs_optax
      >>> f = lambda x: jnp.sum(jnp.array([1.0, 10.0]) * x ** 2)
      >>> tx = optax.chain(
      ...     mlbfgs_optax.scale_by_mlbfgs(update_period=1, beta=0.0, learning_rate=0.1,
      ...                                  sigma_low=0.1),  # deterministic: may lengthen
      ...     optax.scale_by_learning_rate(0.1))
      >>> x = jnp.array([1.0, 1.0])
      >>> state = tx.init(x)
      >>> for _ in range(30):
      ...   u, state = tx.update(jax.grad(f)(x), state, x)
      ...   x = optax.apply_updates(x, u)
      >>> print(bool(f(x) < 1e-6))
      True

    References:
      Niu et al., `mL-BFGS: A Momentum-based L-BFGS for Distributed
      Large-scale Neural Network Optimization
      <https://arxiv.org/abs/2307.13744>`_, TMLR 2023.
    """
    options, hyper = _options.make_options(**locals())

    def init_fn(params):
        return _update.init(options, params)

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "scale_by_mlbfgs needs the current params: call "
                "update(updates, state, params)."
            )
        if options.curvature == "hessian_vector":
            if grad_fn is None:
                raise ValueError(
                    "scale_by_mlbfgs(curvature='hessian_vector') needs the gradient function "
                    "of the current batch: call update(updates, state, params, "
                    "grad_fn=lambda p: jax.grad(loss)(p, batch))."
                )
        else:
            grad_fn = None
        return _update.update(options, hyper, updates, state, params, grad_fn)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mlbfgs(
    learning_rate: optax.ScalarOrSchedule,
    memory_size: int = 2,
    update_period: int = 10,
    beta: float = 0.99,
    sigma_low: float = 1.0,
    sigma_high: float = 10.0,
    blocks: _layout.BlockSpec = "leaf",
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    momentum: Optional[float] = 0.9,
    *,
    weight_decay_mode: str = "l2",
    pair_form: str = "along_s",
    axis_name: Optional[str] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    history_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The mL-BFGS optimizer: weight decay, mL-BFGS direction, momentum, step.

    .. math::
      g_t &\leftarrow g_t + \lambda \theta_t
        \quad (\text{L2 decay, the default mode}), \\
      d_t &= D^{1/2} \tilde H_t D^{1/2} g_t
        \quad (:func:`~mlbfgs_optax.scale_by_mlbfgs`), \\
      m_t &= \mu\, m_{t-1} + (1-\mu)\, d_t, \qquad
      \hat m_t = m_t / (1 - \mu^{t+1}) \quad (\text{if momentum } \mu), \\
      \theta_{t+1} &= \theta_t - \eta_t\, \hat m_t .

    With ``weight_decay_mode="decoupled"`` the decay is added to the step
    instead, :math:`\theta_{t+1} = \theta_t - \eta_t (\hat m_t + \lambda\theta_t)`,
    as ``optax.adamw`` does (Loshchilov and Hutter,
    https://arxiv.org/abs/1711.05101).

    The chain is :func:`scale_by_mlbfgs` (fed the decayed gradient; it holds
    the momentum packed in its state) -> ``optax.scale_by_learning_rate``; the
    state's structure never depends on ``weight_decay``. The learning rate has
    Adam's meaning (before the first pair the step is RMSprop's :math:`D g`
    averaged by the momentum): a good first try is Adam's (1e-3 to 1e-2).
    For the paper's algorithm and the authors' training recipe see
    :data:`~mlbfgs_optax.paper_defaults` and :func:`~mlbfgs_optax.authors_recipe`.

    Args:
      learning_rate: :math:`\eta_t`, a float or an optax schedule.
      memory_size: :math:`M`, pairs kept per block.
      update_period: :math:`T`, calls between curvature pairs.
      beta: :math:`\beta`, EMA coefficient of the parameter and gradient averages.
      sigma_low: :math:`\sigma_L \le 1`, lower bound of a pair's damped
        curvature along :math:`s` (1: pairs never lengthen the step).
      sigma_high: :math:`\sigma_H > 1`, upper bound (a pair shortens the step
        along :math:`s` by at most :math:`\sigma_H`).
      blocks: the block-diagonal structure (``"leaf"``, ``"all"``,
        :class:`~mlbfgs_optax.EqualSlices`, labels or a callable).
      weight_decay: :math:`\lambda \ge 0`, the weight decay (its mode:
        ``weight_decay_mode``).
      weight_decay_mask: optional mask (tree or callable) for the decay, as in
        :func:`optax.add_decayed_weights`.
      momentum: :math:`\mu \in [0, 1)`, the debiased EMA of the direction
        (Adam's ``b1``), or None (no momentum).
      weight_decay_mode: ``"l2"`` (default): :math:`\lambda\theta` added to
        the gradient before the direction (good values are about 100x smaller
        than AdamW's); ``"decoupled"``: :math:`\eta\lambda\theta`
        subtracted from the parameters beside the step, as ``optax.adamw``
        (AdamW's values).
      pair_form: ``"along_s"`` (default) or ``"full"`` (the paper's pairs).
      axis_name: the device axis that shares the blocks (``shard_map``,
        ``pmap``, or an axis of ``mesh``).
      mesh: a :class:`jax.sharding.Mesh` for ``jax.jit`` programs.
      history_dtype: dtype of the stored pairs (``jnp.bfloat16`` halves their
        memory); default: the parameters' dtype, at least float32.

    Every argument above has the meaning and the default it has in
    :func:`scale_by_mlbfgs`, which documents it in full and takes the rest
    (damping details, packing, the metric, the paper's switches of
    :data:`~mlbfgs_optax.paper_defaults`): chain it as
    ``optax.chain(scale_by_mlbfgs(..., learning_rate=lr, momentum=0.9),
    optax.scale_by_learning_rate(lr))`` to set them.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs
      ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import mlbfgs_optax
      >>> f = lambda p: jnp.sum((p['w'] - 3.0) ** 2)
      >>> opt = mlbfgs_optax.mlbfgs(learning_rate=0.3, update_period=2, beta=0.5)
      >>> params = {'w': jnp.zeros(3)}
      >>> state = opt.init(params)
      >>> for _ in range(50):
      ...   grads = jax.grad(f)(params)
      ...   updates, state = opt.update(grads, state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(bool(f(params) < 1e-3))
      True

    References:
      Niu et al., `mL-BFGS: A Momentum-based L-BFGS for Distributed
      Large-scale Neural Network Optimization
      <https://arxiv.org/abs/2307.13744>`_, TMLR 2023.
    """
    _options.check("weight_decay", weight_decay, lambda v: 0.0 <= v < math.inf,
                   "a finite float >= 0", "mlbfgs")
    _options.check("learning_rate", learning_rate, math.isfinite,
                   "a finite float or a schedule", "mlbfgs")
    _options.check_choice("weight_decay_mode", weight_decay_mode, ("l2", "decoupled"), "mlbfgs")
    inner = scale_by_mlbfgs(  # momentum is checked by scale_by_mlbfgs, which holds it
        memory_size=memory_size, update_period=update_period, beta=beta, sigma_low=sigma_low,
        sigma_high=sigma_high, blocks=blocks, pair_form=pair_form, axis_name=axis_name,
        mesh=mesh, history_dtype=history_dtype, learning_rate=learning_rate, momentum=momentum)
    inner = _with_weight_decay(inner, weight_decay, weight_decay_mask,
                               decoupled=weight_decay_mode == "decoupled")
    return optax.chain(inner, optax.scale_by_learning_rate(learning_rate))


def _with_weight_decay(inner: optax.GradientTransformationExtraArgs, weight_decay,
                       mask, decoupled: bool = False) -> optax.GradientTransformationExtraArgs:
    r"""``inner`` with weight decay :math:`\lambda\theta`, and ``inner``'s state alone.

    L2 (default): ``inner`` applied to :math:`g + \lambda\theta`. ``decoupled``:
    :math:`\lambda\theta` added to ``inner``'s output, which chained before
    ``optax.scale_by_learning_rate`` is AdamW's decay,
    :math:`\theta \leftarrow \theta - \eta(\hat m + \lambda\theta)`.
    :func:`optax.add_decayed_weights` is stateless, so folding it into the
    mL-BFGS element keeps the state's structure the same whatever
    ``weight_decay`` is (a concrete 0, a number, or a traced value under
    :func:`optax.inject_hyperparams`); a concrete 0 skips the arithmetic.
    """
    if _options.is_number(weight_decay) and weight_decay == 0:
        return inner
    decay = optax.add_decayed_weights(weight_decay, mask=mask)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("mlbfgs needs the current params: call update(updates, state, params).")
        if not decoupled:
            updates, _ = decay.update(updates, decay.init(params), params)
        updates, state = inner.update(updates, state, params, **extra_args)
        if decoupled:
            updates, _ = decay.update(updates, decay.init(params), params)
        return updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)

