"""The state of :func:`~mlbfgs_optax.scale_by_mlbfgs`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class ScaleByMLBFGSState(NamedTuple):
    r"""State of :func:`scale_by_mlbfgs`.

    Parameter-shaped fields are *packed* by the block layout: for ``"leaf"``,
    ``"all"`` and label blocks they have the structure of params; for
    :class:`~mlbfgs_optax.EqualSlices` they are a one-element list holding a
    ``(num_blocks, block_size)`` array. ``B`` is the number of blocks and ``M``
    the memory size.

    Attributes:
      count: :math:`t`, the number of updates so far (int32 scalar).
      params_avg: :math:`M^\theta`, EMA of the parameters,
        :math:`M^\theta \leftarrow \beta M^\theta + (1-\beta)\theta_t`.
      grads_avg: :math:`M^g`, EMA of the incoming updates (gradients).
      params_snapshot: :math:`M^\theta` at the last pair step.
      grads_snapshot: :math:`M^g` at the last pair step.
      s_history: ring buffers of :math:`s_k`, leading axis ``M``.
      y_history: ring buffers of the damped :math:`\hat y_k`, leading axis ``M``.
      rho: :math:`\rho_k = 1 / s_k^\top \hat y_k` per block and slot,
        ``(B, M)``; 0 marks an empty slot.
      gamma: :math:`\gamma = s^\top \hat y / \hat y^\top \hat y` of every
        block's newest pair (:math:`H_0 = \gamma I`), ``(B,)``; 1 before the
        first pair.
      newest: ring-buffer slot of every block's newest pair, ``(B,)`` int32.
      num_pairs: number of stored pairs per block, ``(B,)`` int32, at most ``M``.
      num_skipped: pairs rejected by the curvature guard per block, ``(B,)``.
      mu: :math:`s^\top y / s^\top s` of the last candidate pair before
        damping, ``(B,)`` (diagnostics).
      mu_damped: :math:`s^\top \hat y / s^\top s` after damping, ``(B,)``.
      tau: the damping weight :math:`\tau` of the last candidate pair, ``(B,)``.
      sy_gram: :math:`s_p^\top \hat y_q` for every pair of ring-buffer slots,
        ``(B, M, M)``: with ``yy_gram`` it lets the two-loop recursion read the
        history in two streaming passes
        (``cache_gram``); ``(B, 0, 0)`` with ``cache_gram=False``.
      yy_gram: :math:`\hat y_p^\top \hat y_q`, ``(B, M, M)`` (or ``(B, 0, 0)``).
      avg_weights: total EMA weight :math:`1 - \beta^k` held by ``params_avg``,
        ``grads_avg``, ``params_snapshot`` and ``grads_snapshot``, shape
        ``(4,)``; with ``bias_correction`` the pairs are formed from the
        averages divided by these weights.
    """

    count: jax.Array
    params_avg: Any
    grads_avg: Any
    params_snapshot: Any
    grads_snapshot: Any
    s_history: Any
    y_history: Any
    rho: jax.Array
    gamma: jax.Array
    newest: jax.Array
    num_pairs: jax.Array
    num_skipped: jax.Array
    mu: jax.Array
    mu_damped: jax.Array
    tau: jax.Array
    sy_gram: jax.Array
    yy_gram: jax.Array
    avg_weights: jax.Array
