"""Physics-informed training (PINNs): mL-BFGS against Adam, L-BFGS and Adam -> L-BFGS.

Four PDE problems with exact solutions and no data, in plain JAX. The network is an MLP of
tanh layers (inputs mapped affinely to [-1, 1]); the loss is the mean squared PDE residual at
collocation points plus the mean squared initial- and boundary-condition misfits (weight 1
each); the derivatives of the network are forward-mode (``jax.jvp`` along each input
direction, nested for second derivatives). Problems, after Rathore et al. (ICML 2024,
arXiv 2402.01868) for the three 1-D ones:

* ``convection``: u_t + beta u_x = 0 on [0, 2 pi] x [0, 1], periodic in x, u(x, 0) = sin x;
  exact u = sin(x - beta t); beta = 20.
* ``reaction``: u_t - rho u (1 - u) = 0, same domain, periodic, u(x, 0) = h(x) =
  exp(-(x - pi)^2 / (2 (pi/4)^2)); exact u = h e^{rho t} / (h e^{rho t} + 1 - h); rho = 5.
* ``wave``: u_tt - 4 u_xx = 0 on [0, 1] x [0, 1], u(0, t) = u(1, t) = 0,
  u(x, 0) = sin(pi x) + 0.5 sin(beta pi x), u_t(x, 0) = 0; exact
  u = sin(pi x) cos(2 pi t) + 0.5 sin(beta pi x) cos(2 beta pi t); beta = 5.
* ``poisson``: -(u_xx + u_yy) = f on the unit square, u = 0 on its boundary, with the
  manufactured solution u = sin(pi x) sin(pi y) + 0.5 sin(2 pi x) sin(2 pi y) (two scales).

Protocol (``python -m examples.benchmarks.pinn``):

1. Collocation points: the 1-D problems' grid is 257 (x) by 101 (t) points, the Poisson
   grid 101 by 101. *Full batch*: a fixed random subset of ``N_RES`` grid points per seed
   (Rathore et al. use 10,000; fewer here for CPU cost). *Mini-batch*: ``N_RES`` grid points
   drawn afresh every step (same cost per gradient, more points seen). The initial- and
   boundary-condition points are the grid's edges, the same in both modes.
2. Cost: every gradient evaluation counts, including every line-search evaluation of
   L-BFGS and (counted as 2 gradients) every Hessian-vector product of
   ``curvature="hessian_vector"``. Budget ``BUDGET`` gradient evaluations per run. Seconds
   count only the jitted training chunks (compilation ahead of time, evaluations excluded).
3. Tuning: each optimizer with a learning rate gets a half-decade grid (``GRIDS``), one
   seed (0); the best lr has the lowest final full-batch training loss (the relative error
   is never used for tuning); a best lr on the grid's edge extends the grid by one point on
   that side (at most twice). Adam -> L-BFGS: Adam at its two best learning rates, switched
   to full-batch ``optax.lbfgs()`` (zoom line search) after 10%, 30% or 50% of the budget.
   Then seeds 1 and 2 (network initialisation and collocation points) at the best setting.
4. Metric: relative L2 error ``||u - u*|| / ||u*||`` on the whole grid, and the loss,
   against gradient evaluations and seconds; medians over the 3 seeds.

Run::

    python -m examples.benchmarks.pinn                      # full run
    python -m examples.benchmarks.pinn --quick --out /tmp/p # smoke run (seconds)
    python -m examples.benchmarks.pinn --problems convection --methods adam mlbfgs
    python -m examples.benchmarks.pinn --report DIR/pinn.json   # re-render table and plot
    python -m examples.benchmarks.pinn --ablation --problems convection reaction
        # one change at a time against mlbfgs(lr) (ABLATION), each on a 3-point grid around
        # the defaults' best lr of results/pinn/pinn.json (--main), 3 seeds: ablation.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlbfgs_optax
from examples.benchmarks import harness
from examples.common import make_mlbfgs

DEFAULT_OUT = os.path.join(harness.DEFAULT_OUT, "pinn")
WIDTH, DEPTH = 50, 4  # tanh hidden layers
N_RES = 500  # collocation points per gradient
BUDGET = 2000  # gradient evaluations per run
EVALS = 20  # evaluations per run: the cost axes' resolution is BUDGET / EVALS
SWITCHES = (0.1, 0.3, 0.5)  # Adam -> L-BFGS switch points, fractions of the budget
SEEDS = (0, 1, 2)
HVP_COST = 2  # gradient evaluations charged per Hessian-vector product
MAX_EXTENSIONS = 2
PROBLEMS = ("convection", "reaction", "wave", "poisson")

# ----------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """A PDE on a 2-D domain (x, t) or (x, y) with its exact solution.

    Attributes:
      name, description: for the reports.
      lo, hi: the domain's corners, (2,) each.
      grid: points per axis of the evaluation / collocation grid.
      exact: (N, 2) -> (N,), the exact solution.
      residual: (u, X) -> (N,), the PDE residual of a function u: (N, 2) -> (N,) at X.
      conditions: (u, edges) -> list of (N_i,) misfits of the initial / boundary conditions.
    """

    name: str
    description: str
    lo: tuple
    hi: tuple
    grid: tuple
    exact: Callable
    residual: Callable
    conditions: Callable


def derivative(u: Callable, axis: int) -> Callable:
    """``X -> du/dX[:, axis]`` at every row of X, by one forward-mode product (u is
    applied row by row, so a tangent of ones along ``axis`` gives each row's partial)."""

    def du(x):
        tangent = jnp.zeros_like(x).at[:, axis].set(1.0)
        return jax.jvp(u, (x,), (tangent,))[1]

    return du


CONVECTION_BETA, REACTION_RHO, WAVE_BETA = 20.0, 5.0, 5.0
POISSON_K = 2  # second scale of the manufactured solution: 0.5 sin(K pi x) sin(K pi y)


def _h(x):
    return jnp.exp(-((x - jnp.pi) ** 2) / (2 * (jnp.pi / 4) ** 2))


def _convection_exact(X):
    return jnp.sin(X[:, 0] - CONVECTION_BETA * X[:, 1])


def _convection_residual(u, X):
    return derivative(u, 1)(X) + CONVECTION_BETA * derivative(u, 0)(X)


def _periodic_and_initial(u0: Callable):
    def conditions(u, edges):
        xs, ts = edges
        ic = u(jnp.stack([xs, jnp.zeros_like(xs)], 1)) - u0(xs)
        left = u(jnp.stack([jnp.zeros_like(ts), ts], 1))
        right = u(jnp.stack([jnp.full_like(ts, 2 * jnp.pi), ts], 1))
        return [ic, left - right]

    return conditions


def _reaction_exact(X):
    h = _h(X[:, 0])
    e = jnp.exp(REACTION_RHO * X[:, 1])
    return h * e / (h * e + 1 - h)


def _reaction_residual(u, X):
    v = u(X)
    return derivative(u, 1)(X) - REACTION_RHO * v * (1 - v)


def _wave_exact(X):
    x, t = X[:, 0], X[:, 1]
    b = WAVE_BETA
    return (jnp.sin(jnp.pi * x) * jnp.cos(2 * jnp.pi * t)
            + 0.5 * jnp.sin(b * jnp.pi * x) * jnp.cos(2 * b * jnp.pi * t))


def _wave_residual(u, X):
    u_tt = derivative(derivative(u, 1), 1)(X)
    u_xx = derivative(derivative(u, 0), 0)(X)
    return u_tt - 4.0 * u_xx


def _wave_conditions(u, edges):
    xs, ts = edges
    x0 = jnp.stack([xs, jnp.zeros_like(xs)], 1)
    ic = u(x0) - _wave_exact(x0)
    ic_t = derivative(u, 1)(x0)
    left = u(jnp.stack([jnp.zeros_like(ts), ts], 1))
    right = u(jnp.stack([jnp.ones_like(ts), ts], 1))
    return [ic, ic_t, left, right]


def _poisson_exact(X):
    x, y = X[:, 0], X[:, 1]
    k = POISSON_K
    return (jnp.sin(jnp.pi * x) * jnp.sin(jnp.pi * y)
            + 0.5 * jnp.sin(k * jnp.pi * x) * jnp.sin(k * jnp.pi * y))


def _poisson_source(X):
    x, y = X[:, 0], X[:, 1]
    k = POISSON_K
    return (2 * jnp.pi ** 2 * jnp.sin(jnp.pi * x) * jnp.sin(jnp.pi * y)
            + 0.5 * 2 * (k * jnp.pi) ** 2 * jnp.sin(k * jnp.pi * x) * jnp.sin(k * jnp.pi * y))


def _poisson_residual(u, X):
    lap = derivative(derivative(u, 0), 0)(X) + derivative(derivative(u, 1), 1)(X)
    return -lap - _poisson_source(X)


def _poisson_conditions(u, edges):
    xs, ys = edges
    zeros, ones = jnp.zeros_like(xs), jnp.ones_like(xs)
    sides = [jnp.stack([xs, zeros], 1), jnp.stack([xs, ones], 1),
             jnp.stack([zeros, ys], 1), jnp.stack([ones, ys], 1)]
    return [jnp.concatenate([u(s) for s in sides])]


def make_problem(name: str) -> Problem:
    """One of :data:`PROBLEMS`."""
    two_pi = 2 * math.pi
    if name == "convection":
        return Problem(name, f"u_t + {CONVECTION_BETA:g} u_x = 0, periodic, u(x,0) = sin x",
                       (0.0, 0.0), (two_pi, 1.0), (257, 101), _convection_exact,
                       _convection_residual, _periodic_and_initial(jnp.sin))
    if name == "reaction":
        return Problem(name, f"u_t - {REACTION_RHO:g} u (1 - u) = 0, periodic, Gaussian u(x,0)",
                       (0.0, 0.0), (two_pi, 1.0), (257, 101), _reaction_exact,
                       _reaction_residual, _periodic_and_initial(_h))
    if name == "wave":
        return Problem(name, f"u_tt - 4 u_xx = 0, beta = {WAVE_BETA:g}, Dirichlet",
                       (0.0, 0.0), (1.0, 1.0), (257, 101), _wave_exact, _wave_residual,
                       _wave_conditions)
    if name == "poisson":
        return Problem(name, "-Δu = f on the unit square, u = sin(πx)sin(πy) + "
                       f"0.5 sin({POISSON_K}πx)sin({POISSON_K}πy)", (0.0, 0.0), (1.0, 1.0),
                       (101, 101), _poisson_exact, _poisson_residual, _poisson_conditions)
    raise ValueError(f"unknown problem {name!r}; expected one of {PROBLEMS}")


def grid_points(problem: Problem) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The whole grid, (nx * nt, 2), and its two axes (the edges' coordinates)."""
    xs = jnp.linspace(problem.lo[0], problem.hi[0], problem.grid[0])
    ts = jnp.linspace(problem.lo[1], problem.hi[1], problem.grid[1])
    xx, tt = jnp.meshgrid(xs, ts, indexing="ij")
    return jnp.stack([xx.ravel(), tt.ravel()], 1), (xs, ts)


def relative_l2(u, u_exact) -> jax.Array:
    """``||u - u*||_2 / ||u*||_2`` over the grid."""
    return jnp.linalg.norm(u - u_exact) / jnp.linalg.norm(u_exact)


# ----------------------------------------------------------------------------- network


def init_mlp(key, width: int = WIDTH, depth: int = DEPTH, in_dim: int = 2) -> list:
    """Glorot-normal weights, zero biases: ``depth`` tanh layers of ``width``, linear out."""
    sizes = [in_dim] + [width] * depth + [1]
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append({"w": jax.random.normal(k, (m, n)) * math.sqrt(2.0 / (m + n)),
                       "b": jnp.zeros(n)})
    return params


def network(params, problem: Problem) -> Callable:
    """``X (N, 2) -> u (N,)``: the MLP applied row by row, inputs mapped to [-1, 1]."""
    lo, hi = jnp.asarray(problem.lo)[None, :], jnp.asarray(problem.hi)[None, :]

    def u(X):
        h = 2.0 * (X - lo) / (hi - lo) - 1.0
        for layer in params[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"][None, :])
        return (h @ params[-1]["w"] + params[-1]["b"][None, :])[:, 0]

    return u


def pinn_loss(params, problem: Problem, X, edges) -> jax.Array:
    """Mean squared residual at X plus the mean squared condition misfits."""
    u = network(params, problem)
    terms = [problem.residual(u, X)] + problem.conditions(u, edges)
    return sum(jnp.mean(r ** 2) for r in terms)


# ----------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Method:
    """An optimizer of the benchmark.

    Attributes:
      name, label: key and description.
      kind: ``"first"`` (one gradient per step, a learning rate), ``"lbfgs"`` (full-batch
        ``optax.lbfgs``) or ``"hybrid"`` (Adam, then ``optax.lbfgs``).
      make: ``schedule -> optax transformation`` for ``"first"``.
      grid: log10 of the learning-rate grid.
      minibatch: resample the collocation points every step.
      grad_fn: pass ``grad_fn`` to ``update`` (Hessian-vector pairs).
      hvp_period: steps between Hessian-vector products (for the cost count).
      cosine: cosine decay of the learning rate over the run (else constant).
    """

    name: str
    label: str
    kind: str = "first"
    make: Callable | None = None
    grid: tuple = ()
    minibatch: bool = False
    grad_fn: bool = False
    hvp_period: int = 0
    cosine: bool = False


ADAM_GRID = (-3.5, -3.0, -2.5, -2.0, -1.5)
PAPER_GRID = (-3.0, -2.5, -2.0, -1.5, -1.0)


def _paper(schedule):
    return optax.chain(mlbfgs_optax.scale_by_mlbfgs(**mlbfgs_optax.paper_defaults),
                       optax.scale_by_learning_rate(schedule))


MLBFGS_VARIANTS = {
    # name: (label, make, grid, grad_fn, hvp_period)
    "mlbfgs": ("mL-BFGS defaults, mlbfgs(lr)", lambda s: mlbfgs_optax.mlbfgs(s), ADAM_GRID,
               False, 0),
    "mlbfgs_paper": ("scale_by_mlbfgs(**paper_defaults) + lr", _paper, PAPER_GRID, False, 0),
    "mlbfgs_det": ("mlbfgs(lr, beta=0, update_period=1)",
                   lambda s: mlbfgs_optax.mlbfgs(s, beta=0.0, update_period=1), ADAM_GRID,
                   False, 0),
    "mlbfgs_hvp": ("mlbfgs(lr, beta=0, curvature='hessian_vector')",
                   lambda s: make_mlbfgs(s, beta=0.0, curvature="hessian_vector"),
                   ADAM_GRID, True, 10),
}


def all_methods() -> dict[str, Method]:
    """Every optimizer of the benchmark, by name (``_mb``: mini-batch)."""
    methods = {
        "adam": Method("adam", "Adam", make=lambda s: optax.adam(s), grid=ADAM_GRID),
        "adam_mb": Method("adam_mb", "Adam, mini-batch", make=lambda s: optax.adam(s),
                          grid=ADAM_GRID, minibatch=True),
        "adam_lbfgs": Method("adam_lbfgs", "Adam -> L-BFGS", kind="hybrid"),
        "lbfgs": Method("lbfgs", "L-BFGS (optax.lbfgs, zoom line search)", kind="lbfgs"),
    }
    for name, (label, make, grid, gf, period) in MLBFGS_VARIANTS.items():
        methods[name] = Method(name, label, make=make, grid=grid, grad_fn=gf, hvp_period=period)
        methods[name + "_mb"] = Method(name + "_mb", label + ", mini-batch", make=make,
                                       grid=grid, grad_fn=gf, hvp_period=period,
                                       minibatch=True)
    return methods


METHODS = tuple(all_methods())

# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Settings:
    """Sizes of a run (the full benchmark's or the smoke run's)."""

    width: int = WIDTH
    depth: int = DEPTH
    n_res: int = N_RES
    budget: int = BUDGET
    evals: int = EVALS
    seeds: tuple = SEEDS
    switches: tuple = SWITCHES
    grid_scale: int = 1  # take every grid_scale-th point of the evaluation grid per axis
    max_extensions: int = MAX_EXTENSIONS
    grid_points: int = 0  # > 0: only this many middle points of each learning-rate grid


QUICK = Settings(width=8, depth=2, n_res=64, budget=40, evals=4, seeds=(0, 1),
                 switches=(0.5,), grid_scale=8, max_extensions=0, grid_points=2)


class Runner:
    """Compiles and runs the optimizers on one problem."""

    def __init__(self, problem: Problem, settings: Settings):
        self.problem, self.s = problem, settings
        pts, (xs, ts) = grid_points(problem)
        self.pool = pts  # candidate collocation points (the whole grid)
        g = settings.grid_scale
        self.edges = (xs[::g] if g > 1 else xs, ts[::g] if g > 1 else ts)
        if g > 1:
            xx, tt = jnp.meshgrid(xs[::g], ts[::g], indexing="ij")
            self.eval_pts = jnp.stack([xx.ravel(), tt.ravel()], 1)
        else:
            self.eval_pts = pts
        self.u_exact = problem.exact(self.eval_pts)
        self.chunk = settings.budget // settings.evals
        self._compiled: dict = {}
        self._prefix: dict = {}  # (lr, seed) -> Adam params at the switch points

        def evaluate(params, X):
            u = network(params, problem)(self.eval_pts)
            return pinn_loss(params, problem, X, self.edges), relative_l2(u, self.u_exact)

        self._evaluate = jax.jit(evaluate)

    # -- data
    def fixed_points(self, seed: int) -> jax.Array:
        idx = jax.random.choice(jax.random.key(1000 + seed), self.pool.shape[0],
                                (self.s.n_res,), replace=False)
        return self.pool[idx]

    def loss(self, params, X):
        return pinn_loss(params, self.problem, X, self.edges)

    def init_params(self, seed: int):
        return init_mlp(jax.random.key(seed), self.s.width, self.s.depth)

    # -- first-order chunks (Adam, mL-BFGS)
    def _first_chunk(self, method: Method):
        if method.name in self._compiled:
            return self._compiled[method.name]
        total = self.s.budget  # steps: one gradient per step (hvp steps charged on top)
        shape = optax.cosine_decay_schedule(1.0, total) if method.cosine else (lambda c: 1.0)

        def opt(lr):
            return method.make(lambda count: lr * shape(count))

        def chunk(params, state, lr, key, step0, X):
            tx = opt(lr)

            def body(carry, i):
                p, st = carry
                if method.minibatch:
                    idx = jax.random.randint(jax.random.fold_in(key, step0 + i),
                                             (self.s.n_res,), 0, self.pool.shape[0])
                    xb = self.pool[idx]
                else:
                    xb = X
                loss, g = jax.value_and_grad(self.loss)(p, xb)
                extra = ({"grad_fn": lambda q: jax.grad(self.loss)(q, xb)}
                         if method.grad_fn else {})
                u, st = tx.update(g, st, p, **extra)
                return (optax.apply_updates(p, u), st), loss

            (params, state), _ = jax.lax.scan(body, (params, state), jnp.arange(self.chunk))
            return params, state

        params = self.init_params(0)
        state = opt(jnp.float32(0)).init(params)
        args = (params, state, jnp.float32(1e-3), jax.random.key(0), jnp.int32(0),
                self.fixed_points(0))
        compiled = (jax.jit(chunk).lower(*args).compile(), jax.jit(lambda p: opt(0.0).init(p)))
        self._compiled[method.name] = compiled
        return compiled

    def _cost(self, method: Method, steps: int) -> int:
        if method.hvp_period:
            return steps + HVP_COST * (steps // method.hvp_period)
        return steps

    def run_first(self, method: Method, lr: float, seed: int, snapshots=()) -> dict:
        """One run of a first-order method; ``snapshots``: steps at which to keep params."""
        chunk, init = self._first_chunk(method)
        params = self.init_params(seed)
        state = init(params)
        X = self.fixed_points(seed)
        key = jax.random.key(2000 + seed)
        trace = [self._record(params, X, 0, 0.0)]
        seconds, steps, kept = 0.0, 0, {}
        if 0 in snapshots:
            kept[0] = (params, 0.0)
        while self._cost(method, steps) < self.s.budget:
            t0 = time.perf_counter()
            params, state = chunk(params, state, jnp.float32(lr), key, jnp.int32(steps), X)
            jax.block_until_ready(params)
            seconds += time.perf_counter() - t0
            steps += self.chunk
            rec = self._record(params, X, self._cost(method, steps), seconds)
            trace.append(rec)
            if steps in snapshots:
                kept[steps] = (params, seconds)
            if not math.isfinite(rec[2]):
                break
        return {"trace": trace, "snapshots": kept, "params": params}

    def _record(self, params, X, grads, seconds):
        loss, err = self._evaluate(params, X)
        return [int(grads), float(seconds), float(loss), float(err)]

    # -- L-BFGS
    def _lbfgs_chunk(self):
        if "lbfgs" in self._compiled:
            return self._compiled["lbfgs"]
        opt = optax.lbfgs()

        def chunk(params, state, evals, target, X):
            f = lambda p: self.loss(p, X)  # noqa: E731
            value_and_grad = optax.value_and_grad_from_state(f)

            def cond(c):
                p, st, ev, it, ok = c
                return (ev < target) & ok

            def body(c):
                p, st, ev, it, ok = c
                stored = optax.tree_utils.tree_get(st, "value")
                fresh = jnp.where(jnp.isfinite(stored), 0, 1)  # recomputed, not reused
                value, g = value_and_grad(p, state=st)
                u, st = opt.update(g, st, p, value=value, grad=g, value_fn=f)
                p = optax.apply_updates(p, u)
                n = optax.tree_utils.tree_get(st, "num_linesearch_steps")
                new_value = optax.tree_utils.tree_get(st, "value")
                return p, st, ev + jnp.maximum(fresh + n, 1), it + 1, jnp.isfinite(new_value)

            p, st, ev, _, _ = jax.lax.while_loop(
                cond, body, (params, state, evals, jnp.int32(0), jnp.asarray(True)))
            return p, st, ev

        params = self.init_params(0)
        state = opt.init(params)
        args = (params, state, jnp.int32(0), jnp.int32(1), self.fixed_points(0))
        compiled = (jax.jit(chunk).lower(*args).compile(), jax.jit(opt.init))
        self._compiled["lbfgs"] = compiled
        return compiled

    def run_lbfgs(self, seed: int, params=None, grads0: int = 0, seconds0: float = 0.0,
                  trace=None) -> dict:
        """Full-batch ``optax.lbfgs`` from ``params`` (default: a fresh init) until the
        budget; ``grads0``, ``seconds0``: cost already spent (the Adam phase)."""
        chunk, init = self._lbfgs_chunk()
        X = self.fixed_points(seed)
        if params is None:
            params = self.init_params(seed)
        state = init(params)
        trace = list(trace) if trace else [self._record(params, X, 0, 0.0)]
        evals, seconds = grads0, seconds0
        target = grads0
        while evals < self.s.budget:
            target = min(self.s.budget, target + self.chunk)
            t0 = time.perf_counter()
            params, state, ev = chunk(params, state, jnp.int32(evals), jnp.int32(target), X)
            jax.block_until_ready(params)
            seconds += time.perf_counter() - t0
            evals = int(ev)
            rec = self._record(params, X, evals, seconds)
            trace.append(rec)
            if not math.isfinite(rec[2]):
                break
            target = max(target, evals)
        return {"trace": trace, "params": params}

    def run_hybrid(self, lr: float, switch: float, seed: int) -> dict:
        """Adam at ``lr`` for ``switch`` of the budget, then full-batch L-BFGS."""
        at = int(round(switch * self.s.budget / self.chunk)) * self.chunk
        key = (lr, seed)
        if key not in self._prefix or at not in self._prefix[key]["snapshots"]:
            adam = all_methods()["adam"]
            points = {int(round(w * self.s.budget / self.chunk)) * self.chunk
                      for w in self.s.switches} | {at}
            self._prefix[key] = self.run_first(adam, lr, seed, snapshots=tuple(points))
        pre = self._prefix[key]
        params, seconds = pre["snapshots"][at]
        head = [r for r in pre["trace"] if r[0] <= at]
        return self.run_lbfgs(seed, params, at, seconds, head)


def final(trace) -> tuple[float, float]:
    """(final loss, final relative error); nan when the run diverged."""
    loss, err = trace[-1][2], trace[-1][3]
    if not (math.isfinite(loss) and math.isfinite(err)):
        return math.nan, math.nan
    return loss, err


def _score(run) -> float:
    loss = final(run["trace"])[0]
    return loss if math.isfinite(loss) else math.inf


def tune(runner: Runner, method: Method, log=print) -> dict:
    """Seed-0 learning-rate search on ``method.grid`` (extended at an edge), then the seeds.

    Returns ``{"grid": {log10 lr: (final loss, final err)}, "best": log10 lr, "edge": bool,
    "runs": [seed runs at the best lr]}``.
    """
    grid = list(method.grid)
    step = grid[1] - grid[0] if len(grid) > 1 else 0.5
    if runner.s.grid_points:
        mid = (len(grid) - runner.s.grid_points) // 2
        grid = grid[mid:mid + runner.s.grid_points]
    results = {}

    def run(p):
        t0 = time.perf_counter()
        results[p] = runner.run_first(method, 10.0 ** p, runner.s.seeds[0])
        loss, err = final(results[p]["trace"])
        log(f"  {runner.problem.name:10s} {method.name:16s} lr 1e{p:+.1f}  loss {loss:.3e}  "
            f"err {err:.3e}  ({time.perf_counter() - t0:.1f} s)")

    for p in grid:
        run(p)
    for _ in range(runner.s.max_extensions):
        best = min(results, key=lambda p: _score(results[p]))
        if best == min(results) and math.isfinite(_score(results[best])):
            run(round(best - step, 2))
        elif best == max(results):
            run(round(best + step, 2))
        else:
            break
    best = min(results, key=lambda p: _score(results[p]))
    edge = best in (min(results), max(results))
    runs = [results[best]] + [runner.run_first(method, 10.0 ** best, s)
                              for s in runner.s.seeds[1:]]
    return {"grid": {f"{p:+.1f}": final(r["trace"]) for p, r in sorted(results.items())},
            "best": best, "edge": edge, "runs": [r["trace"] for r in runs]}


def tune_hybrid(runner: Runner, adam_grid: dict, log=print) -> dict:
    """Adam -> L-BFGS at Adam's two best learning rates x the switch points (seed 0)."""
    ranked = sorted(adam_grid, key=lambda p: (adam_grid[p][0] if math.isfinite(adam_grid[p][0])
                                              else math.inf))
    results = {}
    for p in ranked[:2]:
        for w in runner.s.switches:
            t0 = time.perf_counter()
            r = runner.run_hybrid(10.0 ** float(p), w, runner.s.seeds[0])
            results[(p, w)] = r
            loss, err = final(r["trace"])
            log(f"  {runner.problem.name:10s} adam_lbfgs       lr 1e{float(p):+.1f} switch {w:.0%}"
                f"  loss {loss:.3e}  err {err:.3e}  ({time.perf_counter() - t0:.1f} s)")
    best = min(results, key=lambda k: _score(results[k]))
    runs = [results[best]] + [runner.run_hybrid(10.0 ** float(best[0]), best[1], s)
                              for s in runner.s.seeds[1:]]
    return {"grid": {f"{p} @ {w:.0%}": final(r["trace"]) for (p, w), r in results.items()},
            "best": [float(best[0]), best[1]], "edge": False,
            "runs": [r["trace"] for r in runs]}


def run_problem(name: str, methods: Sequence[str], settings: Settings, log=print) -> dict:
    """Every method of ``methods`` on problem ``name``: tuning, seeds, traces."""
    problem = make_problem(name)
    runner = Runner(problem, settings)
    table = all_methods()
    out = {"description": problem.description, "methods": {}}
    for m in methods:
        method = table[m]
        t0 = time.perf_counter()
        if method.kind == "first":
            res = tune(runner, method, log)
        elif method.kind == "lbfgs":
            res = {"grid": {}, "best": None, "edge": False,
                   "runs": [runner.run_lbfgs(s)["trace"] for s in settings.seeds]}
        else:
            adam = out["methods"].get("adam")
            if adam is None:
                adam = tune(runner, table["adam"], log)
            res = tune_hybrid(runner, adam["grid"], log)
        res["label"] = method.label
        res["wall_s"] = time.perf_counter() - t0
        out["methods"][m] = res
        log(f"{name} {m}: best {res['best']}, final err "
            f"{[f'{final(t)[1]:.2e}' for t in res['runs']]} ({res['wall_s']:.0f} s)")
    return out


# ----------------------------------------------------------------------------- ablation

#: One change each against the defaults (full batch): name -> (label, mlbfgs kwargs,
#: cosine schedule, metric "identity" learning-rate scale).
ABLATION = {
    "base": ("mlbfgs(lr) (defaults)", {}, False),
    "memory_30": ("memory_size=30", {"memory_size": 30}, False),
    "sigma_low_0.01": ("sigma_low=0.01", {"sigma_low": 0.01}, False),
    "sigma_high_100": ("sigma_high=100", {"sigma_high": 100.0}, False),
    "identity": ("metric='identity'", {"metric": "identity"}, False),
    "cosine": ("cosine decay of lr", {}, True),
    "adam_phase_20pc": ("pair_warmup=400 (Adam-like phase: 20% of the budget)",
                        {"pair_warmup": 400}, False),
    "beta_0.9": ("beta=0.9", {"beta": 0.9}, False),
}
ABLATION_GRID_POINTS = 3


def ablation_method(name: str, centre: float, minibatch: bool = False,
                    kwargs: dict | None = None, cosine: bool | None = None) -> Method:
    """An ablation variant with a 3-point half-decade grid centred at ``centre`` (log10)."""
    label, kw, cos = ABLATION.get(name, (name, {}, False))
    kw = dict(kw, **(kwargs or {}))
    cos = cos if cosine is None else cosine
    grid = tuple(round(centre + 0.5 * (i - ABLATION_GRID_POINTS // 2), 2)
                 for i in range(ABLATION_GRID_POINTS))
    return Method("abl_" + name + ("_mb" if minibatch else ""), label, grid=grid,
                  make=lambda s: make_mlbfgs(s, **kw), minibatch=minibatch,
                  cosine=cos)


def run_ablation(problems: Sequence[str], variants: Sequence[str], centres: dict,
                 settings: Settings, minibatch: bool = False, extra: dict | None = None,
                 log=print) -> dict:
    """Each variant on each problem: the same 3-point grid around ``centres[problem]``
    (``centres[problem, "identity"]`` for the identity metric), extended at an edge, seeds."""
    out = {"settings": dataclasses.asdict(settings), "problems": {}}
    extra = extra or {}
    for pname in problems:
        runner = Runner(make_problem(pname), settings)
        res = {}
        for v in variants:
            centre = centres.get((pname, v), centres[pname])
            kw, cos = extra.get(v, ({}, None))
            method = ablation_method(v, centre, minibatch, kw, cos)
            t0 = time.perf_counter()
            r = tune(runner, method, log)
            r["label"] = ABLATION.get(v, (v,))[0] if not kw else f"{v}: {kw}"
            r["wall_s"] = time.perf_counter() - t0
            res[v] = r
            log(f"{pname} ablation {v}: best {r['best']}, final err "
                f"{[f'{final(t)[1]:.2e}' for t in r['runs']]}")
        out["problems"][pname] = {"description": runner.problem.description, "methods": res}
    return out


# ----------------------------------------------------------------------------- summaries


def cost_to_reach(trace, target: float) -> tuple[float, float]:
    """(gradient evaluations, seconds) at the first evaluation with error <= target."""
    for g, s, _, err in trace:
        if math.isfinite(err) and err <= target:
            return g, s
    return math.inf, math.inf


def _median(values) -> float:
    vals = [v if math.isfinite(v) else math.inf for v in values]
    return float(np.median(vals)) if vals else math.nan


def summarize(result: dict, refs: dict | None = None) -> dict:
    """Per problem and method: median final error and loss, cost to reach the median final
    error of Adam -> L-BFGS (median over seeds, a seed that never reaches it counts inf);
    ``refs``: that error per problem, when the result has no Adam -> L-BFGS runs."""
    summary = {}
    for pname, pres in result["problems"].items():
        ms = pres["methods"]
        ref = (refs or {}).get(pname)
        if "adam_lbfgs" in ms:
            ref = _median([final(t)[1] for t in ms["adam_lbfgs"]["runs"]])
        rows = {}
        for m, r in ms.items():
            finals = [final(t) for t in r["runs"]]
            errs = [e for _, e in finals]
            row = {"err": _median(errs), "err_min": float(np.nanmin(errs)) if
                   any(map(math.isfinite, errs)) else math.nan,
                   "err_max": float(np.max([e if math.isfinite(e) else math.inf
                                            for e in errs])),
                   "loss": _median([loss for loss, _ in finals]),
                   "seconds": _median([t[-1][1] for t in r["runs"]]),
                   "grads": _median([t[-1][0] for t in r["runs"]])}
            if ref is not None and math.isfinite(ref):
                costs = [cost_to_reach(t, ref) for t in r["runs"]]
                row["grads_to_ref"] = _median([c[0] for c in costs])
                row["seconds_to_ref"] = _median([c[1] for c in costs])
            rows[m] = row
        summary[pname] = {"reference_err": ref, "rows": rows}
    return summary


def _fmt(v, spec=".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def _setting(r) -> str:
    b = r["best"]
    if b is None:
        return "–"
    if isinstance(b, list):
        return f"1e{b[0]:+.1f}, switch {b[1]:.0%}"
    return f"1e{b:+.1f}" + (" (EDGE)" if r.get("edge") else "")


def markdown(result: dict) -> str:
    """The results table."""
    s = result["settings"]
    lines = [
        "# PINN benchmark: mL-BFGS against Adam, L-BFGS and Adam -> L-BFGS", "",
        f"Measured on CPU only ({result['machine']}; one core), jax {result['jax']}, "
        f"optax {result['optax']}, {result['library']}. MLP {s['depth']} tanh layers of width "
        f"{s['width']}; {s['n_res']} collocation points per gradient; budget {s['budget']} "
        f"gradient evaluations (line-search evaluations counted; a Hessian-vector product "
        f"counts {HVP_COST}); {len(s['seeds'])} seeds. Learning rates: half-decade grids, best "
        "by seed 0's final training loss. Errors: relative L2 on the grid, median [min, max] "
        "over seeds. *to Adam->L-BFGS*: median gradient evaluations and seconds until the "
        "error first reaches Adam -> L-BFGS's median final error (– : a majority of seeds "
        "never did; resolution: one evaluation every "
        f"{s['budget'] // s['evals']} gradients).", ""]
    summary = summarize(result)
    for pname, pres in result["problems"].items():
        sm = summary[pname]
        lines += [f"## {pname}: {pres['description']}", "",
                  f"Adam -> L-BFGS's median final error: {_fmt(sm['reference_err'])}", "",
                  "| optimizer | lr | final rel. L2 error | final loss | grads to Adam->L-BFGS "
                  "| seconds to Adam->L-BFGS | seconds (whole run) |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in pres["methods"].items():
            row = sm["rows"][m]
            lines.append(f"| {r['label']} | {_setting(r)} | {_cells(row)} | "
                         f"{_fmt(row['seconds'], '.2f')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _cells(row: dict) -> str:
    """Error [min, max], loss, gradients and seconds to Adam -> L-BFGS's error: table cells."""
    return (f"{_fmt(row['err'])} [{_fmt(row['err_min'])}, {_fmt(row['err_max'])}] | "
            f"{_fmt(row['loss'])} | {_fmt(row.get('grads_to_ref'), '.0f')} | "
            f"{_fmt(row.get('seconds_to_ref'), '.2f')}")


def ablation_markdown(result: dict, main_result: dict | None) -> str:
    """The ablation table, with the benchmark's Adam, Adam -> L-BFGS and defaults rows."""
    refs, base = {}, {}
    if main_result:
        msum = summarize(main_result)
        for pname in result["problems"]:
            if pname in msum:
                refs[pname] = msum[pname]["reference_err"]
                base[pname] = msum[pname]["rows"]
    summary = summarize(result, refs)
    s = result["settings"]
    lines = [f"Budget {s['budget']} gradient evaluations, {len(s['seeds'])} seeds, "
             f"{ABLATION_GRID_POINTS}-point half-decade grid per variant around the defaults' "
             "best lr (extended at an edge); errors: median [min, max] over seeds.", ""]
    for pname, pres in result["problems"].items():
        sm = summary[pname]
        lines += [f"### {pname}", "",
                  f"Adam -> L-BFGS's median final error: {_fmt(refs.get(pname))}", "",
                  "| variant | lr | final rel. L2 error | final loss | grads to Adam->L-BFGS "
                  "| seconds to Adam->L-BFGS |", "|---|---|---|---|---|---|"]
        for ref_name in ("adam", "adam_lbfgs"):
            row = base.get(pname, {}).get(ref_name)
            if row:
                lines.append(f"| ({ref_name}, from the benchmark) | | {_cells(row)} |")
        for m, r in pres["methods"].items():
            lines.append(f"| {m}: {r['label']} | {_setting(r)} | {_cells(sm['rows'][m])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _median_curve(traces, col: int, grid):
    """Median over seeds of the error, as a step function of cost column ``col``."""
    curves = []
    for t in traces:
        xs = np.array([r[col] for r in t])
        ys = np.array([r[3] if math.isfinite(r[3]) else np.nan for r in t])
        idx = np.searchsorted(xs, grid, side="right") - 1
        curves.append(np.where(idx >= 0, ys[np.clip(idx, 0, None)], np.nan))
    return np.nanmedian(np.array(curves), axis=0)


def plot(result: dict, path: str) -> None:
    """Relative error against gradient evaluations and seconds, per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = list(result["problems"])
    fig, axes = plt.subplots(2, len(probs), figsize=(4.2 * len(probs), 7.8), squeeze=False)
    bases = list(dict.fromkeys(m.removesuffix("_mb") for m in METHODS))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    labels = {}
    for j, pname in enumerate(probs):
        ms = result["problems"][pname]["methods"]
        for m, r in ms.items():
            style = "--" if m.endswith("_mb") else "-"
            color = colors.get(m.removesuffix("_mb"), "black")
            for i, col in enumerate((0, 1)):
                top = max(t[-1][col] for t in r["runs"])
                grid = np.linspace(0, top, 200)
                with warnings.catch_warnings():  # all-nan columns: a diverged majority
                    warnings.simplefilter("ignore", RuntimeWarning)
                    y = _median_curve(r["runs"], col, grid)
                (line,) = axes[i, j].plot(grid, y, style, color=color, lw=1.3)
                labels.setdefault(m, line)
        axes[0, j].set(title=pname, xlabel="gradient evaluations", yscale="log")
        axes[1, j].set(xlabel="seconds (one CPU core)", yscale="log")
        axes[0, j].set_ylabel("relative L2 error (median of seeds)")
        axes[1, j].set_ylabel("relative L2 error (median of seeds)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=6, fontsize=8,
               title="dashed: mini-batch (resampled collocation points)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ablation_main(args) -> dict:
    settings = QUICK if args.quick else Settings()
    main_result = None
    if os.path.exists(args.main):
        with open(args.main) as f:
            main_result = json.load(f)
    centres = {}
    for pname in args.problems:
        ms = (main_result or {}).get("problems", {}).get(pname, {}).get("methods", {})
        key = "mlbfgs_mb" if args.minibatch else "mlbfgs"
        centres[pname] = ms[key]["best"] if key in ms else -2.5
        if "mlbfgs_paper" in ms:
            centres[(pname, "identity")] = ms["mlbfgs_paper"]["best"]
    variants = args.ablation or list(ABLATION)
    result = run_ablation(args.problems, variants, centres, settings, args.minibatch,
                          log=lambda *a: print(*a, flush=True))
    result.update(machine=harness.machine(), jax=jax.__version__, optax=optax.__version__,
                  library=harness.library_version(), minibatch=args.minibatch)
    md = ablation_markdown(result, main_result)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        stem = args.stem or ("ablation_mb" if args.minibatch else "ablation")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{stem}.json"), "w") as f:
            json.dump(result, f)
        with open(os.path.join(out, f"{stem}.md"), "w") as f:
            f.write(md)
    print(md)
    return result


def write(result: dict, out: str, stem: str = "pinn") -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(out, f"{stem}.png"))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}; "
                        "--quick writes nothing unless given)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--report", default=None, help="re-render from a results JSON")
    parser.add_argument("--ablation", nargs="*", default=None, choices=tuple(ABLATION),
                        help="run these ablation variants of mlbfgs(lr) (all if none given) "
                        "on --problems, centred at the benchmark's best lrs (--main)")
    parser.add_argument("--main", default=os.path.join(DEFAULT_OUT, "pinn.json"),
                        help="the benchmark's results JSON (ablation grids and references)")
    parser.add_argument("--minibatch", action="store_true", help="ablation on mini-batches")
    parser.add_argument("--stem", default=None, help="output file stem (default pinn / "
                        "ablation)")
    args = parser.parse_args(argv)
    if args.ablation is not None:
        return _ablation_main(args)
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        write(result, args.out or os.path.dirname(args.report))
        return result
    settings = QUICK if args.quick else Settings()
    methods = list(args.methods)
    if "adam_lbfgs" in methods and "adam" in methods:  # Adam first: its grid feeds the hybrid
        methods.remove("adam")
        methods.insert(0, "adam")
    result = {"machine": harness.machine(), "jax": jax.__version__, "optax": optax.__version__,
              "library": harness.library_version(), "settings": dataclasses.asdict(settings),
              "problems": {}}
    out = args.out or (None if args.quick else DEFAULT_OUT)
    t0 = time.perf_counter()
    for name in args.problems:
        result["problems"][name] = run_problem(name, methods, settings,
                                               log=lambda *a: print(*a, flush=True))
        result["wall_s"] = time.perf_counter() - t0
        if out:  # after every problem, so that a long run can be inspected
            write(result, out)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
