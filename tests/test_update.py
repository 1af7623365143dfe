"""_update: the step's pieces, and directions pinned from the pre-redesign code."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from tests import pinned_problems


@pytest.mark.parametrize("name", sorted(pinned_problems.CONFIGS))
def test_directions_equal_pre_redesign_code(name):
    """Six configurations, 40 steps each: the directions of commit 2c89a5a to 1e-12."""
    pinned = np.load("tests/data/pinned_directions.npz")[name]
    with jax.enable_x64(True):
        got = pinned_problems.directions(dict(pinned_problems.CONFIGS[name]))
    np.testing.assert_allclose(got, pinned, rtol=1e-12, atol=1e-12 * np.abs(pinned).max())


# The checks of update: updates, state and params must fit together ---------------


def _params(dtype=jnp.float32):
    return {
        "a": jnp.asarray([0.5, -1.0, 2.0, 0.25], dtype),
        "b": jnp.asarray([[1.0, -0.5, 0.3], [0.7, -2.0, 1.2]], dtype),
    }


def test_params_required():
    tx = mlbfgs_optax.scale_by_mlbfgs()
    state = tx.init(jnp.ones(3))
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(jnp.ones(3), state)


def _mismatch_setup(blocks="leaf"):
    tx = mlbfgs_optax.scale_by_mlbfgs(memory_size=3, update_period=2, blocks=blocks)
    p = _params()
    return tx, tx.init(p), p


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_updates_structure_mismatch_raises(jit):
    tx, st, p = _mismatch_setup()
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match="tree structure"):
        update({"a": p["a"]}, st, p)
    with pytest.raises(ValueError, match="tree structure"):
        update([p["a"], p["b"]], st, p)
    with pytest.raises(ValueError, match="shape"):
        update({"a": jnp.ones(5), "b": p["b"]}, st, p)
    with pytest.raises(ValueError, match="params"):
        tx.update(p, st)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_params_structure_mismatch_raises(jit):
    tx, st, p = _mismatch_setup()
    update = jax.jit(tx.update) if jit else tx.update
    extra = dict(p, c=jnp.ones(2))
    with pytest.raises(ValueError, match="state"):
        update(extra, st, extra)
    renamed = {"x": p["a"], "y": p["b"]}
    with pytest.raises(ValueError, match="state"):
        update(renamed, st, renamed)
    with pytest.raises(ValueError, match="memory"):
        mlbfgs_optax.scale_by_mlbfgs(memory_size=4).update(p, st, p)


def test_params_renamed_message_shows_state_structure():
    tx, st, p = _mismatch_setup()
    renamed = {"x": p["a"], "y": p["b"]}
    with pytest.raises(ValueError) as info:
        tx.update(renamed, st, renamed)
    assert "'a'" in str(info.value) and "'x'" in str(info.value), str(info.value)


@pytest.mark.parametrize("blocks", ["leaf", mlbfgs_optax.EqualSlices(2)], ids=["leaf", "slices"])
def test_params_shape_mismatch_raises_value_error(blocks):
    tx, st, p = _mismatch_setup(blocks)
    bigger = {"a": jnp.ones(9), "b": p["b"]}
    with pytest.raises(ValueError, match="shape"):
        tx.update(bigger, st, bigger)


# The compiled step reads the history in place ---------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\w+)\[([0-9,]*)\]\S*\s+([\w\-]+)\(")
#: Ops that may produce a history-sized value: the in-place writes of a pair, and
#: the values that only pass buffers through (loops, branches, tuples, views).
_PASS_THROUGH = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
                 "scatter", "dynamic-update-slice", "opt-barrier", "call"}
#: Fusions XLA names after an in-place write at their root.
_IN_PLACE_FUSION = re.compile(r"(dynamic-update-slice|scatter)")


def _compiled_update(tx, params):
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(0, 1))
    return update.lower(grads, state, params).compile(), state


# packing="stacked" (the sharded leaves' packing) in the slow tier: the same check.
@pytest.mark.parametrize("packing", ["auto", pytest.param("stacked", marks=pytest.mark.slow)])
def test_compiled_step_moves_no_history_sized_copy(packing):
    """No instruction of the compiled update (ordinary and pair step: one program) makes a
    history-sized array other than the in-place write of a pair (no transpose, copy,
    concatenate or upcast of a history), and its temporary buffers stay within 4.5
    parameter vectors (measured: 4.0, the pair step's; the history alone is 20 vectors).
    Large leaves are buckets of their own."""
    m = 10
    params = {"w1": jnp.zeros((512, 512)), "w2": jnp.zeros((512, 256)), "b": jnp.zeros(256)}
    tx = mlbfgs_optax.scale_by_mlbfgs(memory_size=m, packing=packing)
    compiled, state = _compiled_update(tx, params)
    history = min(x.size for x in state.s_history if x.size >= m * 512 * 256)
    big = []
    for line in compiled.as_text().splitlines():
        found = _INSTR.match(line)
        if not found:
            continue
        dims = [int(d) for d in found.group(2).split(",") if d]
        if dims and np.prod(dims) >= history and found.group(3) not in _PASS_THROUGH:
            if not _IN_PLACE_FUSION.search(line.split("=", 1)[0]):
                big.append(line.strip()[:160])
    assert not big, "history-sized arrays made by:\n" + "\n".join(big)
    param_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 4.5 * param_bytes, f"temporaries: {temp / param_bytes:.2f} parameter vectors"
    # Packing a large leaf is a reshape: its state is in a bucket of its own.
    assert sum(len(b.leaves) == 1 for b in state.layout.buckets) >= 2


# The momentum chain in the slow tier: its update had no such copy before either.
@pytest.mark.parametrize("make", [
    lambda: mlbfgs_optax.scale_by_mlbfgs(),
    pytest.param(lambda: mlbfgs_optax.mlbfgs(0.1), marks=pytest.mark.slow),
    lambda: mlbfgs_optax.scale_by_mlbfgs(**mlbfgs_optax.paper_defaults),
], ids=["scale_by_mlbfgs", "mlbfgs", "paper_defaults"])
def test_large_leaves_are_updated_in_place(make):
    """The update of a leaf in a bucket of its own is written into the donated updates'
    buffer: the compiled update copies no array of a large leaf's size (a reshape between
    the leaf and its update made XLA compute it into a temporary and copy it over)."""
    params = {"w1": jnp.zeros((512, 512)), "w2": jnp.zeros((512, 256)), "b": jnp.zeros(256)}
    compiled, _ = _compiled_update(make(), params)
    entry = compiled.as_text().split("\nENTRY")[1]
    copies = [line.strip()[:160] for line in entry.splitlines()
              if re.search(r"= f32\[(512,512|512,256|1,512,512|1,512,256)\]\S* copy\(", line)]
    assert not copies, "copies of large leaves:\n" + "\n".join(copies)
