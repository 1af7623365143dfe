"""The PINN benchmark (examples/benchmarks/pinn.py): exact solutions, metric, smoke run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.benchmarks import pinn


@pytest.mark.parametrize("name", pinn.PROBLEMS)
def test_exact_solution_satisfies_pde(name):
    """The residual and condition code applied to the exact solution give ~0 (float32)."""
    problem = pinn.make_problem(name)
    pts, edges = pinn.grid_points(problem)
    X = pts[jax.random.choice(jax.random.key(0), pts.shape[0], (2000,), replace=False)]
    residual = problem.residual(problem.exact, X)
    # the residual's terms are O(scale): e.g. u_tt ~ (2 beta pi)^2 for the wave
    scale = {"convection": pinn.CONVECTION_BETA, "reaction": pinn.REACTION_RHO,
             "wave": 4 * (2 * math.pi * pinn.WAVE_BETA) ** 2,
             "poisson": 2 * (pinn.POISSON_K * math.pi) ** 2}[name]
    assert float(jnp.max(jnp.abs(residual))) < 1e-5 * scale
    for misfit in problem.conditions(problem.exact, edges):
        assert float(jnp.max(jnp.abs(misfit))) < 1e-5


@pytest.mark.parametrize("name", pinn.PROBLEMS)
def test_residual_detects_a_wrong_function(name):
    """A perturbed solution leaves a clear residual: the residual code is not trivially 0."""
    problem = pinn.make_problem(name)
    pts, _ = pinn.grid_points(problem)

    def wrong(X):
        return problem.exact(X) + 0.1 * jnp.sin(X[:, 0] + 3.0 * X[:, 1])  # not a wave of speed 2

    assert float(jnp.sqrt(jnp.mean(problem.residual(wrong, pts[::7]) ** 2))) > 1e-2


def test_derivative_matches_analytic():
    u = lambda X: jnp.sin(X[:, 0]) * X[:, 1] ** 3  # noqa: E731
    X = jax.random.uniform(jax.random.key(1), (50, 2))
    d = pinn.derivative
    np.testing.assert_allclose(d(u, 0)(X), jnp.cos(X[:, 0]) * X[:, 1] ** 3, rtol=1e-5)
    np.testing.assert_allclose(d(u, 1)(X), 3 * jnp.sin(X[:, 0]) * X[:, 1] ** 2, rtol=1e-5)
    np.testing.assert_allclose(d(d(u, 1), 1)(X), 6 * jnp.sin(X[:, 0]) * X[:, 1], rtol=1e-5)
    np.testing.assert_allclose(d(d(u, 0), 1)(X), 3 * jnp.cos(X[:, 0]) * X[:, 1] ** 2,
                               rtol=1e-5)


def test_relative_l2():
    exact = jnp.array([3.0, 4.0])
    assert float(pinn.relative_l2(exact, exact)) == 0.0
    assert float(pinn.relative_l2(jnp.zeros(2), exact)) == pytest.approx(1.0)
    assert float(pinn.relative_l2(2 * exact, exact)) == pytest.approx(1.0)
    assert float(pinn.relative_l2(jnp.array([3.0, 5.0]), exact)) == pytest.approx(0.2)


def test_loss_and_gradient_are_finite():
    problem = pinn.make_problem("wave")
    params = pinn.init_mlp(jax.random.key(0), width=8, depth=2)
    pts, edges = pinn.grid_points(problem)
    # Jitted: eagerly, the second derivatives run op by op (20 s).
    loss, grads = jax.jit(jax.value_and_grad(pinn.pinn_loss), static_argnums=1)(
        params, problem, pts[:64], edges)
    assert math.isfinite(float(loss)) and float(loss) > 0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _check_traces(methods, budget):
    for r in methods.values():
        assert len(r["runs"]) == len(pinn.QUICK.seeds)
        for trace in r["runs"]:
            grads = [row[0] for row in trace]
            seconds = [row[1] for row in trace]
            assert grads[0] == 0 and grads == sorted(grads) and grads[-1] >= budget
            assert seconds == sorted(seconds)
            assert math.isfinite(trace[-1][3])


def test_quick_run_writes_results(tmp_path):
    """The smoke run: tuning, seeds, JSON, table and plot, for Adam and mL-BFGS."""
    result = pinn.main(["--quick", "--out", str(tmp_path), "--problems", "reaction",
                        "--methods", "adam", "mlbfgs"])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"pinn.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "pinn.json").read_text())
    methods = saved["problems"]["reaction"]["methods"]
    assert set(methods) == {"adam", "mlbfgs"}
    _check_traces(methods, pinn.QUICK.budget)
    assert "reaction" in (tmp_path / "pinn.md").read_text()
    assert result["problems"]["reaction"]["methods"]["mlbfgs"]["best"] is not None


@pytest.mark.slow
def test_quick_run_lbfgs_and_hybrid(tmp_path):
    """The smoke run of the L-BFGS methods: line-search evaluations are counted."""
    pinn.main(["--quick", "--out", str(tmp_path), "--problems", "convection",
               "--methods", "adam_lbfgs", "lbfgs"])
    methods = json.loads((tmp_path / "pinn.json").read_text())["problems"]["convection"][
        "methods"]
    _check_traces(methods, pinn.QUICK.budget)
    best_lr, switch = methods["adam_lbfgs"]["best"]
    assert switch in pinn.QUICK.switches
    # the hybrid's trace starts with Adam's evaluations, one gradient per step
    trace = methods["adam_lbfgs"]["runs"][0]
    at = int(switch * pinn.QUICK.budget)
    assert any(row[0] == at for row in trace)


def test_ablation_quick(tmp_path):
    """One ablation variant in the smoke settings, with its 3-point grid."""
    result = pinn.main(["--quick", "--ablation", "beta_0.9", "--problems", "reaction",
                        "--main", str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    r = result["problems"]["reaction"]["methods"]["beta_0.9"]
    assert len(r["grid"]) == 2 and len(r["runs"]) == len(pinn.QUICK.seeds)
    assert (tmp_path / "ablation.md").exists()


def test_pinn_train_quick(tmp_path):
    """examples/pinn_train.py: the three recipes and the figure, at the smoke sizes."""
    from examples import pinn_train

    out = tmp_path / "pinn.png"
    result = pinn_train.main(["--quick", "--out", str(out)])
    assert out.stat().st_size > 0
    assert set(result["runs"]) == {"Adam", "Adam -> L-BFGS", "mL-BFGS"}
    for run in result["runs"].values():
        assert run["trace"][-1][0] >= pinn.QUICK.budget
