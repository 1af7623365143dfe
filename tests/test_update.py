"""_update: the step's pieces, and directions pinned from the pre-redesign code."""

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
