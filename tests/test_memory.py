"""_memory: the state's bytes, against a count from the field table."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlbfgs_optax
from examples.common import make_mlbfgs

PARAMS = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32), "v": jnp.zeros((48,))}
NUM = 64 * 32 + 32 + 48


@pytest.mark.parametrize("memory_size", [1, 3, 10])
@pytest.mark.parametrize("history_dtype, averages_dtype",
                         [(None, None), (jnp.bfloat16, None), (None, jnp.bfloat16)])
def test_counts_every_parameter_sized_field(memory_size, history_dtype, averages_dtype):
    opt = make_mlbfgs(1e-3, memory_size=memory_size, history_dtype=history_dtype,
                      averages_dtype=averages_dtype)
    state = opt.init(PARAMS)
    # The packed buffers pad each leaf to whole rows: count the numbers they hold.
    layout = mlbfgs_optax.find_mlbfgs_state(state).layout
    packed = sum(int(np.prod(shape)) for shape, _ in layout.packed_shapes())
    assert NUM <= packed < 1.1 * NUM
    hist = jnp.dtype(history_dtype or jnp.float32).itemsize
    avg = jnp.dtype(averages_dtype or jnp.float32).itemsize
    # 2M history vectors; two averages, two snapshots, the metric's nu, the momentum.
    per_param = 2 * memory_size * hist + 6 * avg
    b, m = 3, memory_size
    # Per block: rho (M), gamma, mu, mu_damped, tau (4), three (M, M) Grams, in float32;
    # newest, num_pairs, num_skipped in int32; count and the 4 averaging weights.
    small = 4 * (b * (m + 4 + 3 * m * m) + 3 * b + 1 + 4)
    assert mlbfgs_optax.state_nbytes(state) == per_param * packed + small
    assert mlbfgs_optax.state_bytes_per_param(state, PARAMS) == pytest.approx(
        (per_param * packed + small) / NUM)


def test_shape_structs_give_the_same_count_without_allocating():
    opt = mlbfgs_optax.mlbfgs(1e-3)
    abstract = jax.eval_shape(opt.init, PARAMS)
    assert mlbfgs_optax.state_nbytes(abstract) == mlbfgs_optax.state_nbytes(opt.init(PARAMS))
    assert mlbfgs_optax.state_bytes_per_param(
        abstract, jax.eval_shape(lambda: PARAMS)) == pytest.approx(
        mlbfgs_optax.state_bytes_per_param(opt.init(PARAMS), PARAMS))


def test_any_optax_state():
    state = optax.adamw(1e-3).init(PARAMS)
    assert mlbfgs_optax.state_nbytes(state) == 8 * NUM + 4  # mu, nu and the int32 count
    assert mlbfgs_optax.state_nbytes(optax.sgd(0.1).init(PARAMS)) == 0


def test_per_device_counts_the_fullest_device():
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    n = len(devices)
    x = jax.device_put(jnp.zeros((8 * n, 4)),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    r = jax.device_put(jnp.zeros(5), jax.sharding.NamedSharding(mesh,
                                                                 jax.sharding.PartitionSpec()))
    assert mlbfgs_optax.state_nbytes((x, r)) == 4 * (32 * n + 5)
    assert mlbfgs_optax.state_nbytes((x, r), per_device=True) == 4 * (32 + 5)
    with pytest.raises(TypeError, match="concrete arrays"):
        mlbfgs_optax.state_nbytes(jax.eval_shape(lambda: x), per_device=True)


def test_no_parameters_is_an_error():
    with pytest.raises(ValueError, match="at least one number"):
        mlbfgs_optax.state_bytes_per_param((), {})
