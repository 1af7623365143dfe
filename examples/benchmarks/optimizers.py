"""The optimizers compared, their learning-rate grids and their memory-traffic models.

Every optimizer is an :class:`OptSpec` whose ``make(lr_schedule)`` returns an optax
transformation. The learning rate enters as a schedule so that one compiled training
step serves every value of the grid (the peak learning rate is a traced argument).
All runs use the same cosine decay from the peak ``lr`` to 0 over the run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import optax

import mlbfgs_optax
from examples.common import make_mlbfgs

M = 10  # L-BFGS memory for every quasi-Newton optimizer here


@dataclasses.dataclass(frozen=True)
class OptSpec:
    """An optimizer in the benchmark.

    Attributes:
      name: id used in the outputs.
      label: human-readable settings.
      make: ``lr_schedule -> optax transformation`` (update takes params).
      grid: peak learning rates tried (full run); ``quick_grid`` in ``--quick``.
      floor_words: model of the parameter-sized arrays (words) the update must read
        or write per step, as a function of nothing (per parameter); see README.
      floor_formula: the same, as text for the table notes.
      ablation_of: for ablations, the optimizer whose best lr they reuse.
      only: restrict to tasks with this attribute true (e.g. ``"muon"``).
      uses_grad_fn: ``update`` takes ``grad_fn``, the gradient function of the batch
        (``curvature="hessian_vector"``).
      research: a one-off variant of a research round (``research/hessian_vector_pairs.md``):
        run only when named with ``--opts``.
    """

    name: str
    label: str
    make: Callable[[Callable], optax.GradientTransformation]
    grid: Sequence[float]
    quick_grid: Sequence[float]
    floor_words: float
    floor_formula: str
    ablation_of: Optional[str] = None
    only: Optional[str] = None
    uses_grad_fn: bool = False
    research: bool = False


# The library's current defaults, read from its signature for the labels and the memory
# model only: ``mlbfgs_default`` passes nothing but the learning rate, so it always runs
# whatever the installed library defaults to.
_SIG_DEFAULTS = {k: v.default for f in (mlbfgs_optax.scale_by_mlbfgs, mlbfgs_optax.mlbfgs)
                 for k, v in inspect.signature(f).parameters.items()
                 if v.default is not inspect.Parameter.empty}
LIB_DEFAULTS = {k: _SIG_DEFAULTS[k] for k in (
    "memory_size", "update_period", "beta", "sigma_low", "sigma_high", "tau_max",
    "pair_momentum", "refresh_grad_average", "normalize", "blocks", "sigma_yy",
    "bias_correction", "metric", "step_bound", "roundoff_rejection", "momentum",
    "pair_warmup")}
MLBFGS_DEFAULTS: dict = {}  # overrides of the library defaults for mlbfgs_default: none
# The library's defaults before Adam's metric became the default: the paper's algorithm (H0 = gamma I, pairs in
# parameter units) with bias correction and the sigma_yy bound, sigma 0.5/1.5, no momentum.
MLBFGS_PAPER = dict(mlbfgs_optax.paper_defaults, bias_correction=True, sigma_yy=None,
                    momentum=None)
# The authors' recipe: mlbfgs_optax.authors_recipe (their code has no bias correction and
# no y^T y bound; heavy-ball momentum 0.9, weight decay 2e-4, normalised directions).
MLBFGS_AUTHORS = dict(weight_decay=2e-4, momentum=0.9)
NO_DAMPING = dict(sigma_low=-math.inf, sigma_high=math.inf, tau_max=1.0, sigma_yy=math.inf)


def mlbfgs_words(memory_size, update_period, momentum=False, weight_decay=False,
                 pair_momentum=False, refresh=False):
    """Words per parameter one mL-BFGS step must move (see README, "memory floor").

    Two-loop recursion: the 2M history vectors are read twice (4M). Every step: read
    theta and g, read+write the two averages, write the direction (7). Every T steps
    (pair step): read both averages and both snapshots, write both snapshots and the
    new s and y_hat (8), read s_prev and y_prev with pair momentum (+2), rewrite the
    gradient average when it is refreshed (+1). Chain: momentum trace reads and writes
    its buffer (+2, the direction write becomes the trace write), weight decay reads
    theta once more (+1).
    """
    pair = 8 + 2 * pair_momentum + refresh
    return 4 * memory_size + 7 + pair / update_period + 2 * momentum + weight_decay


def _mlbfgs(**kw):
    return lambda lr: make_mlbfgs(learning_rate=lr, **kw)


def _adamw(lr):
    return optax.adamw(learning_rate=lr, b1=0.9, b2=0.999, weight_decay=1e-4)


def _half_decades(lo: float, n: int = 7) -> tuple:
    """``n`` learning rates half a decade apart from ``10**lo``."""
    return tuple(float(f"{10 ** (lo + k / 2):.3g}") for k in range(n))


# Every grid has 7 points half a decade apart (the same density for every optimizer);
# each is centred on the optimizer's usual range.
SGD_GRID = _half_decades(-3)        # 1e-3 ... 1
ADAM_GRID = _half_decades(-4)       # 1e-4 ... 0.1 (AdamW and the mL-BFGS defaults)
LBFGS_GRID = _half_decades(-3)      # 1e-3 ... 1
MUON_GRID = _half_decades(-3.5)     # 3.16e-4 ... 0.316
PAPER_GRID = _half_decades(-3)      # 1e-3 ... 1 (paper units: SGD-like)


def _words_default(memory_size=None):
    """The defaults' floor (with ``memory_size`` pairs when given): T's pair-step share is
    counted at the default T for every variant, pairless ones included."""
    d = LIB_DEFAULTS
    m = d["memory_size"] if memory_size is None else memory_size
    return mlbfgs_words(m, d["update_period"], momentum=True) + 3


def _normalized_sgdm(lr):
    """The control for the authors' recipe: the same weight decay, global normalisation of
    the direction, momentum 0.9 and schedule, with the identity instead of H."""
    return optax.chain(optax.add_decayed_weights(MLBFGS_AUTHORS["weight_decay"]),
                       optax.normalize_by_update_norm(scale_factor=1.0),
                       optax.trace(decay=MLBFGS_AUTHORS["momentum"]),
                       optax.scale_by_learning_rate(lr))


def _fmt_defaults():
    d = LIB_DEFAULTS
    yy = ("10*sigma_high" if d["sigma_yy"] is None else f"{d['sigma_yy']:g}")
    return (f"metric {d['metric']}, beta {d['beta']:g}, T {d['update_period']}, "
            f"M {d['memory_size']}, sigma {d['sigma_low']:g}/{d['sigma_high']:g}, sigma_yy "
            f"{yy}, step bound {d['step_bound']}, round-off rejection "
            f"{d['roundoff_rejection']}, momentum {d['momentum']} (EMA), {d['blocks']} blocks, "
            f"pair warm-up {'1/(1-beta)' if d['pair_warmup'] is None else d['pair_warmup']})")


AUTHORS_WORDS = mlbfgs_words(M, 50, momentum=True, weight_decay=True, pair_momentum=True,
                             refresh=True)
# The metric adds nu (read + write) and reads it once more for D: +3 words per step.
DEFAULT_FORMULA = "4M + 7 + 8/T + 2 (momentum) + 3 (metric)"


def _ablation(name, label, research=False, **kw):
    return OptSpec(name, f"ablation: defaults with {label}", _mlbfgs(**{**MLBFGS_DEFAULTS, **kw}),
                   (), (), _words_default(kw.get("memory_size")), DEFAULT_FORMULA,
                   ablation_of="mlbfgs_default", research=research)


SPECS = (
    OptSpec("sgd", "SGD, momentum 0.9", lambda lr: optax.sgd(lr, momentum=0.9),
            SGD_GRID, (0.03, 0.1), 4, "4 (read g, read+write trace, write update)"),
    OptSpec("adamw", "AdamW, b=(0.9, 0.999), wd 1e-4", _adamw, ADAM_GRID, (1e-3, 1e-2), 7,
            "7 (read g, theta; read+write mu, nu; write update)"),
    OptSpec("lbfgs", f"optax.lbfgs(memory {M}, linesearch=None)",
            lambda lr: optax.lbfgs(learning_rate=lr, memory_size=M, linesearch=None),
            LBFGS_GRID, (0.01, 0.1), 4 * M + 9,
            "4M + 9 (history read twice; theta, g, previous theta/g read+write, new pair, update)"),
    OptSpec("muon", "optax.contrib.muon (Adam on biases)",
            lambda lr: optax.contrib.muon(learning_rate=lr), MUON_GRID, (0.003, 0.03), 4,
            "4 (like SGD; Newton-Schulz is compute-bound)", only="muon"),
    OptSpec("mlbfgs_default", f"mlbfgs library defaults, only lr passed ({_fmt_defaults()})",
            _mlbfgs(**MLBFGS_DEFAULTS), ADAM_GRID, (1e-3, 1e-2), _words_default(),
            DEFAULT_FORMULA),
    OptSpec("mlbfgs_hvp", "mlbfgs defaults with curvature='hessian_vector': y = (Hessian of "
            "the batch loss at theta_t) s, by forward-over-reverse every T steps (Byrd et al. "
            "2016, arXiv 1401.7020), instead of the change of the gradient average",
            _mlbfgs(**MLBFGS_DEFAULTS, curvature="hessian_vector"), ADAM_GRID, (1e-3, 1e-2),
            _words_default(), DEFAULT_FORMULA, uses_grad_fn=True),
    OptSpec("mlbfgs_hvp_beta0", "mlbfgs_hvp with beta=0: s is the raw displacement over T "
            "steps (Hessian-vector pairs need no gradient averaging)",
            _mlbfgs(**MLBFGS_DEFAULTS, curvature="hessian_vector", beta=0.0), ADAM_GRID,
            (1e-3, 1e-2), _words_default(), DEFAULT_FORMULA, uses_grad_fn=True, research=True),
    OptSpec("mlbfgs_sigma_low_0.01", "mlbfgs defaults with sigma_low=0.01 (every pair's raw "
            "curvature is below 0.1 of the metric's on the networks: the bound clamps them all)",
            _mlbfgs(**MLBFGS_DEFAULTS, sigma_low=0.01), ADAM_GRID, (1e-3, 1e-2),
            _words_default(), DEFAULT_FORMULA, research=True),
    OptSpec("mlbfgs_no_pairs_grid", "defaults without pairs (update_period 10^9) on their own "
            "lr grid (the ablation abl_no_pairs reuses the defaults' lr and runs on the cheap "
            "tasks only)", _mlbfgs(**MLBFGS_DEFAULTS, update_period=10 ** 9), ADAM_GRID,
            (1e-3, 1e-2), _words_default(), DEFAULT_FORMULA, research=True),
    # Large-batch research (batch_scaling.py): pairs earlier in a short run, one change each.
    OptSpec("mlbfgs_warmup_T", "mlbfgs defaults with pair_warmup=10 (a pair from the second "
            "pair step on, instead of after 1/(1-beta) = 100 calls)",
            _mlbfgs(**MLBFGS_DEFAULTS, pair_warmup=10), ADAM_GRID, (1e-3, 1e-2),
            _words_default(), DEFAULT_FORMULA, research=True),
    OptSpec("mlbfgs_beta_0.9", "mlbfgs defaults with beta=0.9 (averages over ~10 calls; the "
            "pair warm-up 1/(1-beta) falls to 10 with it)",
            _mlbfgs(**MLBFGS_DEFAULTS, beta=0.9), ADAM_GRID, (1e-3, 1e-2),
            _words_default(), DEFAULT_FORMULA, research=True),
    # Weight-decay research (batch_scaling.py): the decay added to the step after the
    # momentum (decoupled, as AdamW) against added to the gradient before the direction
    # (L2, through the metric and the pairs), each on a grid of three decades around its
    # usual values (the L2 decay is multiplied by the metric D ~ 1/sqrt(nu), ~1e2 here),
    # extended by half a decade and a decade where the best was at the top.
    *(OptSpec(f"mlbfgs_wd_{mode}_{lam:g}", f"mlbfgs defaults with weight_decay={lam:g}, "
              f"weight_decay_mode='{mode}'",
              _mlbfgs(**MLBFGS_DEFAULTS, weight_decay=lam, weight_decay_mode=mode), ADAM_GRID,
              (1e-3, 1e-2), _words_default(), DEFAULT_FORMULA, research=True)
      for mode, grid in (("decoupled", (1e-3, 1e-2, 1e-1, 0.3, 1.0)),
                         ("l2", (1e-5, 1e-4, 1e-3, 3e-3, 1e-2)))
      for lam in grid),
    OptSpec("adamw_wd_0.1", "AdamW, b=(0.9, 0.999), wd 0.1", lambda lr: optax.adamw(
        learning_rate=lr, b1=0.9, b2=0.999, weight_decay=0.1), ADAM_GRID, (1e-3, 1e-2), 7,
        "7 (read g, theta; read+write mu, nu; write update)", research=True),
    OptSpec("mlbfgs_paper", "mlbfgs, the paper's algorithm (the old defaults): paper_defaults + bias "
            "correction + sigma_yy 10*sigma_high, no momentum (H0 = gamma I, lr in SGD units)",
            _mlbfgs(**MLBFGS_PAPER), PAPER_GRID, (0.01, 0.1), mlbfgs_words(M, 10),
            "4M + 7 + 8/T"),
    OptSpec("mlbfgs_authors", "mlbfgs_optax.authors_recipe (beta .999, T 50, sigma 0.01/1.5, "
            "tau_max .99, m2 .9, refresh, normalize, heavy-ball momentum .9, wd 2e-4)",
            lambda lr: mlbfgs_optax.authors_recipe(lr), PAPER_GRID, (0.01, 0.1), AUTHORS_WORDS,
            "4M + 7 + 11/T + 2 (momentum) + 1 (weight decay)"),
    OptSpec("nsgdm", "normalized SGD + momentum, the control for the authors' recipe: "
            "chain(add_decayed_weights(2e-4), normalize_by_update_norm(1.0), trace(0.9), "
            "scale_by_learning_rate)", _normalized_sgdm, PAPER_GRID, (0.01, 0.1), 5,
            "5 (read g, theta; read+write trace; write update)"),
    # Ablations of the defaults, one change each, run at mlbfgs_default's best lr.
    _ablation("abl_no_pairs", "no curvature pairs (update_period 10^9): the same chain with "
              "H = D, i.e. bias-corrected RMSprop + debiased EMA momentum 0.9 (an Adam "
              "variant)", update_period=10 ** 9),
    _ablation("abl_no_pair_warmup", "pair_warmup=0 (pairs from the first pair step on, the "
              "defaults before this change)", pair_warmup=0),
    _ablation("abl_no_step_bound", "step_bound=None", step_bound=None),
    _ablation("abl_sigma_0.5_1.5", "sigma_low, sigma_high = 0.5, 1.5 (the old bounds)",
              sigma_low=0.5, sigma_high=1.5),
    _ablation("abl_no_momentum", "momentum=None", momentum=None),
    _ablation("abl_no_roundoff", "roundoff_rejection=None", roundoff_rejection=None),
    _ablation("abl_blocks_all", "blocks='all' (one block)", blocks="all"),
    # Research ablations (run only when named with --opts): a shorter history moves fewer
    # bytes per step (4M words of the 4M + 15.8 the defaults move).
    _ablation("abl_memory_10", "memory_size=10", research=True, memory_size=10),
    _ablation("abl_memory_5", "memory_size=5", research=True, memory_size=5),
    _ablation("abl_memory_3", "memory_size=3", research=True, memory_size=3),
    _ablation("abl_memory_2", "memory_size=2", research=True, memory_size=2),
    # Lean-state research: bfloat16 storage, one field group at a time (products and
    # per-block scalars still accumulate in float32).
    _ablation("abl_history_bf16", "history_dtype=bfloat16 (the s, y history)", research=True,
              history_dtype=jnp.bfloat16),
    _ablation("abl_averages_bf16", "averages_dtype=bfloat16 (the averages, snapshots, the "
              "metric's second moment and the momentum)", research=True,
              averages_dtype=jnp.bfloat16),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}
