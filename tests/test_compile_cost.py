"""The compile-cost benchmark (examples/benchmarks/compile_cost.py) produces well-formed numbers.

Structure only: the equation counter on functions whose counts are known, the leaf
structure of the GPT-2- and ResNet-50-shaped pytrees, finite losses, and a --quick run's
outputs. No assertion on a time or a ratio.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from examples.benchmarks import compile_cost as cc


def test_count_eqns_counts_sub_jaxprs():
    def scan3(x):  # scan + its body's mul and add: 3
        return lax.scan(lambda c, _: (c * 2.0 + 1.0, None), x, None, length=3)[0]

    def nested(x):  # scan + (scan + mul + add): 4
        return lax.scan(lambda c, _: (scan3(c), None), x, None, length=2)[0]

    twice = jax.jit(lambda a: jnp.sin(a) * 3.0)

    def calls(x):  # 2 x (pjit + sin + mul) = 6; one distinct body: 2 + 2 = 4
        return twice(twice(x))

    def loop(x):  # while + body add + cond (slice, squeeze, lt): 5
        return lax.while_loop(lambda c: c[0] < 10.0, lambda c: c + 1.0, x)

    x = jnp.ones(3)
    assert cc.count_eqns(jax.make_jaxpr(scan3)(x)) == 3
    assert cc.count_eqns(jax.make_jaxpr(scan3)(x).jaxpr) == 3  # open jaxpr too
    assert cc.count_eqns(jax.make_jaxpr(nested)(x)) == 4
    assert cc.count_eqns(jax.make_jaxpr(calls)(x)) == 6
    assert cc.count_eqns(jax.make_jaxpr(calls)(x), unique=True) == 4
    assert cc.count_eqns(jax.make_jaxpr(loop)(x)) == 5


def test_structured_models_have_the_designed_leaves_and_finite_losses():
    gpt2, resnet = cc.make_model("gpt2"), cc.make_model("resnet50")
    assert gpt2.num_leaves == cc.GPT2_LEAVES == 148
    assert resnet.num_leaves == cc.RESNET50_LEAVES == 161
    # GPT-2 small's names: 2 embeddings, 12 blocks of 12 leaves, ln_f.
    assert len(gpt2.params["h"]) == 12
    assert all(len(jax.tree.leaves(b)) == 12 for b in gpt2.params["h"])
    # ResNet-50: stages [3, 4, 6, 3], a projection in each stage's first block only.
    stages = [resnet.params[f"stage{s}"] for s in range(1, 5)]
    assert [len(s) for s in stages] == [3, 4, 6, 3]
    assert all(("proj_conv" in b) == (i == 0) for s in stages for i, b in enumerate(s))
    # One label per top-level layer: wte, wpe, 12 blocks, ln_f; stem, 4 stages, head.
    assert cc.num_blocks("mlbfgs_labels", gpt2) == 15
    assert cc.num_blocks("mlbfgs_labels", resnet) == 6
    for model in (gpt2, resnet, cc.make_model("mlp8")):
        loss = jax.jit(model.loss)(model.params, model.batch)
        assert loss.shape == () and math.isfinite(float(loss)), model.name


def test_quick_run_is_well_formed(tmp_path):
    # One MLP of 2 leaves keeps this well under 20 s on 2 cores (--quick's default is 8 and
    # 32 leaves); the slope table over several sizes is checked on synthetic rows below.
    with jax.numpy_rank_promotion("allow"):  # optax's internals are not written for "raise"
        result = cc.main(["--quick", "--mlp-leaves", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "compile_cost.json").read_text())
    assert data["mode"] == "quick" and data["config"]["placements"] == []
    assert not (tmp_path / "compile_cost.png").exists()  # --quick draws no plot
    rows = data["rows"]
    assert [(r["model"], r["optimizer"]) for r in rows] == [("mlp2", "adam"), ("mlp2", "mlbfgs")]
    for r in rows:
        assert "error" not in r, r
        assert r["placement"] == "single" and r["leaves"] == 2 and r["params"] == 64 * 65
        for k in ("trace_s", "lower_s", "xla_s", "compile_s", "step_ms"):
            assert r[k] > 0 and math.isfinite(r[k]), (k, r)
        assert np.isclose(r["compile_s"], r["trace_s"] + r["lower_s"] + r["xla_s"])
        assert 0 < r["update_eqns_unique"] <= r["update_eqns"] <= r["step_eqns"]
        assert r["update_eqns_per_leaf"] == r["update_eqns"] / r["leaves"]
        assert r["hlo_lines"] > 0 and math.isfinite(r["loss"])
        for k in ("compile_s", "trace_s", "xla_s", "update_eqns", "hlo_lines", "step_ms"):
            ratio = r[f"{k}_x_adam"]
            assert ratio == 1.0 if r["optimizer"] == "adam" else ratio > 0, (k, r)
    assert result["rows"] == rows
    md = (tmp_path / "compile_cost.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    body = [line for line in md.splitlines() if line.startswith("| mlp2")]
    assert len(body) == 2 and all(line.count("|") == header.count("|") for line in body)


def test_scaling_slopes_and_ratios_on_synthetic_rows():
    def row(opt, leaves, c):
        return {"model": f"mlp{leaves}", "placement": "single", "optimizer": opt,
                "leaves": leaves, "compile_s": c, "trace_s": c / 4, "xla_s": c / 2,
                "update_eqns": 10 * leaves, "hlo_lines": 100 * leaves ** 2, "step_ms": c}

    rows = [row("adam", n, n / 8) for n in (8, 32, 128)]
    rows += [row("mlbfgs", n, 3 * (n / 8) ** 2) for n in (8, 32, 128)]
    rows.append(dict(row("mlbfgs", 256, 1.0), error="RuntimeError: skipped"))
    sc = cc.scaling(rows)
    assert sc["adam"]["leaves"] == sc["mlbfgs"]["leaves"] == [8, 32, 128]
    assert np.isclose(sc["adam"]["compile_s_slope"], 1.0)
    assert np.isclose(sc["mlbfgs"]["compile_s_slope"], 2.0)
    assert np.isclose(sc["mlbfgs"]["update_eqns_slope"], 1.0)
    assert np.isclose(sc["adam"]["hlo_lines_slope"], 2.0)
    cc.add_ratios(rows)
    assert np.isclose(rows[4]["compile_s_x_adam"], 3 * 4 ** 2 / 4)
    assert "compile_s_x_adam" not in rows[-1]  # an errored row gets no ratios
