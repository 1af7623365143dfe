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

import optax

import mlbfgs_optax

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


# The library's current defaults, read from its signature for the labels and the memory
# model only: ``mlbfgs_default`` passes nothing but the learning rate, so it always runs
# whatever the installed library defaults to.
_SIG_DEFAULTS = {k: v.default for k, v in inspect.signature(mlbfgs_optax.mlbfgs).parameters.items()
                 if v.default is not inspect.Parameter.empty}
LIB_DEFAULTS = {k: _SIG_DEFAULTS[k] for k in (
    "memory_size", "update_period", "beta", "sigma_low", "sigma_high", "tau_max",
    "pair_momentum", "refresh_grad_average", "normalize", "blocks", "sigma_yy",
    "bias_correction")}
MLBFGS_DEFAULTS: dict = {}  # overrides of the library defaults for mlbfgs_default: none
# The defaults at commit e50f853 (the previous committed results): sigma_low 0.1.
MLBFGS_E50F853_DEFAULTS = dict(sigma_low=0.1)
# The authors' recipe (their code has no bias correction and no y^T y bound).
MLBFGS_AUTHORS = dict(memory_size=M, update_period=50, beta=0.999, sigma_low=0.01,
                      sigma_high=1.5, tau_max=0.99, pair_momentum=0.9,
                      refresh_grad_average=True, normalize=True, blocks="leaf",
                      weight_decay=2e-4, momentum=0.9, sigma_yy=math.inf,
                      bias_correction=False)
# The authors' recipe with the library's fixes: bias-corrected averages and the default
# y^T y bound (sigma_yy=None, i.e. 10 * sigma_high).
MLBFGS_AUTHORS_FIXES = {**MLBFGS_AUTHORS, "bias_correction": True, "sigma_yy": None}
# The defaults of the library's first version (before sigma_yy and bias correction).
MLBFGS_FIRST_DEFAULTS = dict(memory_size=M, update_period=10, beta=0.9, sigma_low=0.01,
                             sigma_high=1.5, tau_max=1.0, pair_momentum=0.0,
                             refresh_grad_average=False, normalize=False, blocks="leaf",
                             sigma_yy=math.inf, bias_correction=False)
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
    return lambda lr: mlbfgs_optax.mlbfgs(learning_rate=lr, **kw)


def _adamw(lr):
    return optax.adamw(learning_rate=lr, b1=0.9, b2=0.999, weight_decay=1e-4)


SGD_GRID = (0.01, 0.03, 0.1)
ADAM_GRID = (1e-3, 3e-3, 1e-2)
LBFGS_GRID = (0.001, 0.01, 0.1, 1.0)
MLBFGS_GRID = (0.003, 0.01, 0.03, 0.1)
MUON_GRID = (0.003, 0.01, 0.03)


def _words_default():
    d = LIB_DEFAULTS
    return mlbfgs_words(d["memory_size"], d["update_period"])


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
    return (f"beta {d['beta']:g}, T {d['update_period']}, M {d['memory_size']}, sigma "
            f"{d['sigma_low']:g}/{d['sigma_high']:g}, sigma_yy {yy}, bias correction "
            f"{d['bias_correction']}, {d['blocks']} blocks")


MLBFGS_DEFAULT_GRID = MLBFGS_GRID + (0.3,)  # 0.1 was the best lr at the old grid edge
AUTHORS_WORDS = mlbfgs_words(M, 50, momentum=True, weight_decay=True, pair_momentum=True,
                             refresh=True)


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
    OptSpec("mlbfgs_naive", "mlbfgs beta=0, T=1 (naive stochastic L-BFGS + damping)",
            _mlbfgs(**{**MLBFGS_DEFAULTS, "beta": 0.0, "update_period": 1}), MLBFGS_GRID,
            (0.01, 0.1), mlbfgs_words(M, 1), "4M + 7 + 8/T with T=1"),
    OptSpec("mlbfgs_default", f"mlbfgs library defaults, only lr passed ({_fmt_defaults()})",
            _mlbfgs(**MLBFGS_DEFAULTS), MLBFGS_DEFAULT_GRID, (0.01, 0.1), _words_default(),
            "4M + 7 + 8/T"),
    OptSpec("mlbfgs_authors", "mlbfgs authors' recipe (beta .999, T 50, sigma 0.01/1.5, "
            "tau_max .99, m2 .9, refresh, normalize, momentum .9, wd 2e-4, no bias correction, "
            "no sigma_yy)", _mlbfgs(**MLBFGS_AUTHORS), MLBFGS_GRID,
            (0.01, 0.1), AUTHORS_WORDS, "4M + 7 + 11/T + 2 (momentum) + 1 (weight decay)"),
    OptSpec("mlbfgs_authors_fixes", "authors' recipe + the library's fixes (bias_correction="
            "True, sigma_yy=None = 10*sigma_high)", _mlbfgs(**MLBFGS_AUTHORS_FIXES), MLBFGS_GRID,
            (0.01, 0.1), AUTHORS_WORDS, "4M + 7 + 11/T + 2 (momentum) + 1 (weight decay)"),
    OptSpec("nsgdm", "normalized SGD + momentum, the control for the authors' recipe: "
            "chain(add_decayed_weights(2e-4), normalize_by_update_norm(1.0), trace(0.9), "
            "scale_by_learning_rate)", _normalized_sgdm, MLBFGS_GRID, (0.01, 0.1), 5,
            "5 (read g, theta; read+write trace; write update)"),
    # Ablations of the defaults: run at mlbfgs_default's best lr.
    OptSpec("abl_beta0", "ablation: defaults with beta=0",
            _mlbfgs(**{**MLBFGS_DEFAULTS, "beta": 0.0}), (), (), _words_default(),
            "4M + 7 + 8/T", ablation_of="mlbfgs_default"),
    OptSpec("abl_beta0.9", "ablation: defaults with beta=0.9",
            _mlbfgs(**{**MLBFGS_DEFAULTS, "beta": 0.9}), (), (), _words_default(),
            "4M + 7 + 8/T", ablation_of="mlbfgs_default"),
    OptSpec("abl_T1", "ablation: defaults with T=1",
            _mlbfgs(**{**MLBFGS_DEFAULTS, "update_period": 1}), (), (), mlbfgs_words(M, 1),
            "4M + 7 + 8/T with T=1", ablation_of="mlbfgs_default"),
    OptSpec("abl_T50", "ablation: defaults with T=50",
            _mlbfgs(**{**MLBFGS_DEFAULTS, "update_period": 50}), (), (), mlbfgs_words(M, 50),
            "4M + 7 + 8/T with T=50", ablation_of="mlbfgs_default"),
    OptSpec("abl_nodamp", "ablation: defaults without damping (sigma_low=-inf, sigma_high=inf, "
            "tau_max=1, sigma_yy=inf)", _mlbfgs(**{**MLBFGS_DEFAULTS, **NO_DAMPING}), (), (),
            _words_default(), "4M + 7 + 8/T", ablation_of="mlbfgs_default"),
    OptSpec("abl_no_yy", "ablation: defaults with sigma_yy=inf (the spec's damping only)",
            _mlbfgs(**{**MLBFGS_DEFAULTS, "sigma_yy": math.inf}), (), (), _words_default(),
            "4M + 7 + 8/T", ablation_of="mlbfgs_default"),
    OptSpec("abl_blocks_all", "ablation: defaults with blocks='all' (one block)",
            _mlbfgs(**{**MLBFGS_DEFAULTS, "blocks": "all"}), (), (), _words_default(),
            "4M + 7 + 8/T", ablation_of="mlbfgs_default"),
    OptSpec("abl_sigma_low0.1", "ablation: defaults with sigma_low=0.1 (the defaults at "
            "e50f853)", _mlbfgs(**{**MLBFGS_DEFAULTS, **MLBFGS_E50F853_DEFAULTS}), (), (),
            _words_default(), "4M + 7 + 8/T", ablation_of="mlbfgs_default"),
    OptSpec("abl_first_defaults", "ablation: the library's first defaults (beta 0.9, "
            "sigma_low 0.01, no sigma_yy, no bias correction)", _mlbfgs(**MLBFGS_FIRST_DEFAULTS),
            (), (), _words_default(), "4M + 7 + 8/T", ablation_of="mlbfgs_default"),
)

SPEC_BY_NAME = {s.name: s for s in SPECS}
