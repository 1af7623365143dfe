"""Sharded blocks on 8 fake CPU devices (tests/conftest.py): GSPMD, shard_map, pmap.

Every sharded run is compared with the same optimizer on one device, in
float64 on a well-conditioned quadratic with a moving target. The only
difference is the order of floating-point operations inside XLA's fusions;
each curvature pair is a difference of two nearly equal averages, which turns
those 1e-16 differences into ~1e-9 relative differences of s and y, and 120
steps of the recursion carry them to at most ~4e-8 absolute on parameters of
size 0.01-1 (measured). The tests assert atol 1e-6 (rtol 1e-5): a wrong block
assignment or a lost pair changes the parameters by more than 1e-3
(test_tolerance_detects_wrong_blocks).
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mlbfgs_optax
from examples.common import make_mlbfgs

N_DEV = 8
K = 16  # two blocks per device
STEPS = 120
PAIRS_KW = dict(update_period=3, beta=0.9, memory_size=4, pair_warmup=0)  # pairs from call 5
KW = dict(PAIRS_KW, blocks=mlbfgs_optax.EqualSlices(K))

pytestmark = pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 8 (fake) devices")


def _problem(dtype=jnp.float64):
    params = {"w": jnp.asarray(np.linspace(-1.0, 1.0, 300).reshape(20, 15), dtype),
              "b": jnp.zeros(15, dtype)}
    curv = jnp.asarray(np.linspace(0.5, 3.0, 15)[None, :], dtype)

    def grad(p, t):
        return {"w": 2 * curv * (p["w"] - t), "b": 2 * (p["b"] - 1.0)}

    return params, grad


def _run(opt, params, grad, step_wrapper=lambda f: jax.jit(f), state=None):
    state = opt.init(params) if state is None else state

    def step(p, st, t):
        u, st = opt.update(grad(p, t), st, p)
        return optax.apply_updates(p, u), st

    step = step_wrapper(step)
    for i in range(STEPS):
        params, state = step(params, state, 0.1 * np.sin(i))
        # XLA:CPU runs the 8 fake devices on a small thread pool; letting many
        # collective programs queue up asynchronously can starve one device's
        # rendezvous (seen on 2 cores after ~100 queued steps). Real
        # accelerators do not need this.
        jax.block_until_ready(state)
    return params, state


def _assert_same(p, q, rtol=1e-5, atol=1e-6):
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_tolerance_detects_wrong_blocks():
    with jax.enable_x64(True):
        params, grad = _problem()
        other = dict(KW, blocks=mlbfgs_optax.EqualSlices(K // 2))
        p, _ = _run(make_mlbfgs(0.1, **other), params, grad)
        diff = max(float(np.max(np.abs(np.asarray(a) - b)))
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(_reference(False))))
        assert diff > 1e-3


@functools.lru_cache(maxsize=None)
def _reference(normalize):
    with jax.enable_x64(True):
        params, grad = _problem()
        opt = make_mlbfgs(0.1, normalize=normalize, **KW)
        p, st = _run(opt, params, grad)
        assert int(jnp.min(st[0].num_pairs)) == 4
        return jax.tree.map(np.asarray, p)


def _bytes_per_device(tree):
    per_dev = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_dev[shard.device] = per_dev.get(shard.device, 0) + shard.data.nbytes
    return per_dev


_SLOW = pytest.mark.slow


# Every (normalize, set_mesh, jit_init) case runs under one axis type or the other
# (~10 s each): the axis type changes how the state is placed, which every case
# checks; the case changes the step. CI runs two cases that take every value of
# axis type, normalize and set_mesh (init outside jit is what the followed-sharding
# tests below do); the rest run in the slow tier.
@pytest.mark.parametrize("axis_type,normalize,set_mesh,jit_init", [
    pytest.param("Explicit", False, True, False, marks=_SLOW), ("Auto", True, True, True),
    ("Explicit", False, False, True), pytest.param("Auto", True, False, False, marks=_SLOW),
    pytest.param("Auto", False, True, False, marks=_SLOW),
    pytest.param("Explicit", True, True, True, marks=_SLOW),
    pytest.param("Auto", False, False, True, marks=_SLOW),
    pytest.param("Explicit", True, False, False, marks=_SLOW)])
def test_gspmd_matches_single_device(axis_type, normalize, set_mesh, jit_init):
    """ZeRO: replicated params, EqualSlices state sharded over the data axis."""
    with jax.enable_x64(True):
        mesh = jax.make_mesh((N_DEV,), ("data",),
                             axis_types=(getattr(jax.sharding.AxisType, axis_type),))
        params, grad = _problem()
        opt = make_mlbfgs(0.1, normalize=normalize, mesh=mesh, axis_name="data", **KW)
        with (jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()):
            state0 = jax.jit(opt.init)(params) if jit_init else opt.init(params)
            assert _spec(state0[0].s_history[0]) == P("data")
            p, state = _run(opt, params, grad, state=state0)
        _assert_same(p, _reference(normalize))
        # No resharding between steps: same shardings and dtypes as after init (of the
        # mL-BFGS state, which holds the momentum too; the chain's other parts are empty).
        assert _spec(state0[0].direction_avg[0]) == P("data")
        state, state0 = state[0], state0[0]
        same = jax.tree.map(lambda x, y: x.sharding.is_equivalent_to(y.sharding, x.ndim),
                            state, state0)
        assert all(jax.tree.leaves(same))
        assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, state0)


def test_state_memory_falls_as_one_over_n():
    params, _ = _problem(jnp.float32)
    single = mlbfgs_optax.scale_by_mlbfgs(momentum=0.9, **KW).init(params)  # momentum too
    total = sum(x.nbytes for x in jax.tree.leaves(single))
    per_block_const = 0
    for n in (2, 4, 8):
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        st = mlbfgs_optax.scale_by_mlbfgs(mesh=mesh, axis_name="data", momentum=0.9,
                                          **KW).init(params)
        per_dev = _bytes_per_device(st)
        assert len(per_dev) == n
        # Block-axis fields split exactly; replicated: count and the 4 weights.
        per_block_const = 4 + 4 * 8
        assert max(per_dev.values()) <= total / n + per_block_const, (n, per_dev, total)
        # Created sharded: the history never sat whole on one device.
        assert st.s_history[0].sharding.spec == P("data")


def test_compiled_step_has_one_all_gather_and_no_all_reduce():
    mesh = jax.make_mesh((N_DEV,), ("data",))
    params, grad = _problem(jnp.float32)
    opt = mlbfgs_optax.scale_by_mlbfgs(mesh=mesh, axis_name="data", **KW)
    with jax.set_mesh(mesh):
        state = opt.init(params)
        g = jax.tree.map(jnp.ones_like, params)
        hlo = jax.jit(opt.update).lower(g, state, params).compile().as_text()
    assert "all-reduce" not in hlo  # no cross-device dot product anywhere
    assert hlo.count("all-gather-start") + hlo.count(" all-gather(") >= 1
    assert "all-to-all" not in hlo and "collective-permute" not in hlo


def test_shard_map_with_axis_name_matches_single_device():
    with jax.enable_x64(True):
        mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
        params, grad = _problem()
        opt = make_mlbfgs(0.1, axis_name="data", **KW)
        state = opt.init(params)  # global state; shard_map hands each device its rows
        specs = mlbfgs_optax.state_partition_specs(state, "data")

        def wrap(step):
            return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P()),
                                         out_specs=(P(), specs)))

        with jax.set_mesh(mesh):
            state = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
            p, state = _run(opt, params, grad, step_wrapper=wrap, state=state)
        _assert_same(p, _reference(False))
        assert state[0].s_history[0].addressable_shards[0].data.shape == (K // N_DEV, 4, 20)


def test_pmap_with_axis_name_matches_single_device():
    with jax.enable_x64(True):
        params, grad = _problem()
        opt = make_mlbfgs(0.1, axis_name="data", **KW)
        replicated = jax.tree.map(lambda x: jnp.stack([x] * N_DEV), params)
        state = jax.pmap(opt.init, axis_name="data")(replicated)
        # Each device holds only its K / N blocks.
        assert state[0].s_history[0].shape == (N_DEV, K // N_DEV, 4, 20)

        def step(p, st, t):
            u, st = opt.update(grad(p, t), st, p)
            return optax.apply_updates(p, u), st

        pstep = jax.pmap(step, axis_name="data", in_axes=(0, 0, None))
        p = replicated
        for i in range(STEPS):
            p, state = pstep(p, state, 0.1 * np.sin(i))
            jax.block_until_ready(state)
        _assert_same(jax.tree.map(lambda x: x[3], p), _reference(False))


def test_other_blocks_replicate_under_axis_name():
    """'leaf' blocks cannot be split: every device computes all (no collective)."""
    mesh = jax.make_mesh((N_DEV,), ("data",))
    params = {"a": jnp.ones(4), "b": jnp.ones(3)}
    opt = mlbfgs_optax.scale_by_mlbfgs(axis_name="data", update_period=2)
    state = opt.init(params)
    specs = mlbfgs_optax.state_partition_specs(state, "data")
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
    step = jax.jit(jax.shard_map(lambda g, s, p: opt.update(g, s, p), mesh=mesh,
                                 in_specs=(P(), specs, P()), out_specs=(P(), specs)))
    with jax.set_mesh(mesh):
        u, state = step(params, state, params)
    np.testing.assert_allclose(u["a"], 1.0, rtol=1e-5)  # D g = g / (|g| + eps) at step 1


def test_mesh_configuration_errors():
    mesh = jax.make_mesh((N_DEV,), ("data",))
    with pytest.raises(ValueError, match="axis_name"):
        mlbfgs_optax.scale_by_mlbfgs(mesh=mesh, blocks=mlbfgs_optax.EqualSlices(8))
    with pytest.raises(ValueError, match="blocks"):
        mlbfgs_optax.scale_by_mlbfgs(mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="divisible"):
        mlbfgs_optax.scale_by_mlbfgs(mesh=mesh, axis_name="data",
                                     blocks=mlbfgs_optax.EqualSlices(12))


def test_fsdp_style_params_need_no_collective():
    """Params stored as one (K, n_b) array sharded like the blocks: no all-gather."""
    mesh = jax.make_mesh((N_DEV,), ("data",))
    with jax.enable_x64(True):
        params, grad = _problem()
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])
        n_b = -(-flat.size // K)
        flat = jnp.pad(flat, (0, K * n_b - flat.size)).reshape(K, n_b)
        opt = make_mlbfgs(0.1, mesh=mesh, axis_name="data", **KW)
        single = make_mlbfgs(0.1, **KW)
        target = jnp.asarray(np.linspace(-1.0, 2.0, flat.size).reshape(flat.shape))
        grad_fn = lambda p, t: 2.0 * (p - target) * (1.0 + t)
        p_ref, _ = _run(single, flat, grad_fn)
        with jax.set_mesh(mesh):
            sharded = jax.device_put(flat, NamedSharding(mesh, P("data", None)))
            state = opt.init(sharded)
            hlo = jax.jit(opt.update).lower(grad_fn(sharded, 0.0), state, sharded).compile()
            hlo = hlo.as_text()
            p, _ = _run(opt, sharded, grad_fn, state=state)
        collectives = [line.strip() for line in hlo.splitlines()
                       if "all-gather" in line or "all-reduce(" in line or "all-to-all" in line]
        # The only collective: one scalar all-reduce, "is every gradient finite" (max |g|).
        assert len(collectives) == 1 and re.search(r"(pred|f32|f64)\[\] all-reduce\(",
                                                   collectives[0]), collectives
        assert p.sharding.spec == P("data", None) or p.sharding.spec == P("data")
        _assert_same(p, p_ref)


def test_partition_specs_of_single_leaf_list_params_are_replicated():
    """Regression: blocks='leaf' with params=[w] once sharded rho, and device_put failed."""
    mesh = jax.make_mesh((N_DEV,), ("data",))
    params = [jnp.ones((N_DEV, 5))]
    opt = mlbfgs_optax.mlbfgs(0.1, memory_size=10, axis_name="data")
    state = opt.init(params)
    specs = mlbfgs_optax.state_partition_specs(state, "data")
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
    placed = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    assert placed[0].rho.shape == (1, 10)


# Sharding that follows the params ----------------------------------------------------
#
# Params sharded the ordinary way (a NamedSharding per leaf) with the default
# "leaf" blocks, label blocks or "all": every params-shaped state field takes its
# parameter's sharding from init on, every history adds an unsharded memory axis,
# per-block scalars stay replicated, and a step's only collectives are
# all-reduces of per-block scalars and M-vectors.

_LAYOUTS = {
    # name: (mesh shape, axis names, specs of w (16, 24), b (24,), tiny (3,))
    "fsdp": ((8,), ("x",), {"w": P("x"), "b": P("x"), "tiny": P()}),
    "tensor_parallel": ((8,), ("x",), {"w": P(None, "x"), "b": P("x"), "tiny": P()}),
    "data_model_2d": ((2, 4), ("data", "model"),
                      {"w": P("data", "model"), "b": P("model"), "tiny": P()}),
}
_FOLLOW_STEPS = 18
_FOLLOW_BLOCKS = {"fsdp": "leaf", "tensor_parallel": {"w": "a", "b": "a", "tiny": "c"},
                  "data_model_2d": "all"}


def _follow_problem(dtype):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 24)), dtype),
              "b": jnp.asarray(rng.normal(size=24), dtype), "tiny": jnp.ones(3, dtype)}
    curv = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 3.0, size=x.shape), dtype), params)

    def grad(p, t):
        return jax.tree.map(lambda c, x: c * (x - t), curv, p)

    return params, grad


def _follow_run(opt, params, grad, init=None):
    state = opt.init(params) if init is None else init(params)
    state0 = state

    @jax.jit
    def step(p, st, t):
        u, st = opt.update(grad(p, t), st, p)
        return optax.apply_updates(p, u), st

    for i in range(_FOLLOW_STEPS):
        params, state = step(params, state, 0.1 * np.sin(i))
        jax.block_until_ready(state)
    return params, state, state0


def _spec(x):
    """``x``'s PartitionSpec without trailing Nones (P(None,) and P() are the same layout)."""
    spec = list(x.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _check_state_follows(st, specs):
    """Every bucket of the state is sharded like the params leaves it stacks."""
    leaf_specs = st.layout.treedef.flatten_up_to(specs)
    for j, bucket in enumerate(st.layout.buckets):
        spec = leaf_specs[bucket.leaves[0]]
        for name in ("params_avg", "grads_avg", "params_snapshot", "grads_snapshot"):
            assert _spec(getattr(st, name)[j]) == (P(None, *spec) if len(spec) else P()), name
        for name in ("s_history", "y_history"):
            assert _spec(getattr(st, name)[j]) == (P(None, None, *spec) if len(spec) else P())
    for name in ("rho", "gamma", "sy_gram", "count"):
        assert getattr(st, name).sharding.is_fully_replicated, name


@functools.lru_cache(maxsize=None)
def _follow_reference(layout):
    """The single-device run of test_state_follows_param_sharding_and_matches_one_device."""
    blocks = _FOLLOW_BLOCKS[layout]
    with jax.enable_x64(True):
        params, grad = _follow_problem(jnp.float64)
        opt = make_mlbfgs(0.05, blocks=blocks, **PAIRS_KW)
        return _follow_run(opt, params, grad)[0]


def _follow_init(opt, params, mesh, specs, axis_type, set_mesh):
    """How a user inits with sharded params: jitted where JAX can, eager where it cannot."""
    if axis_type == "Explicit" and set_mesh:
        return jax.jit(opt.init)  # the sharding is in the params' types
    elif axis_type == "Auto":
        # Auto axes: no sharding in the types, so a jitted init is told where
        # the state goes, with the specs mlbfgs_optax derives from the params'.
        abstract = jax.eval_shape(opt.init, params)
        specs_tree = mlbfgs_optax.state_partition_specs(abstract, params_specs=specs)
        return jax.jit(opt.init, out_shardings=jax.tree.map(
            lambda s: NamedSharding(mesh, s), specs_tree, is_leaf=lambda x: isinstance(x, P)))
    else:
        # Explicit axes without a mesh in context: JAX itself cannot run a jitted
        # init whose inputs are only read for their types (optax.adam alike), so
        # init eagerly.
        return None


def _follow_cases():
    """Every layout under a mesh in context, with one axis type in CI and the other in
    the slow tier; without a mesh in context (~18 s each), all slow. The axis type
    changes how init places the state (both kinds run in CI, on different layouts);
    the layout changes which axes the state follows."""
    ci = {("data_model_2d", "Explicit"), ("fsdp", "Auto"), ("tensor_parallel", "Explicit")}
    for layout in sorted(_LAYOUTS):
        for axis_type in ("Explicit", "Auto"):
            for set_mesh in (False, True):
                slow = not set_mesh or (layout, axis_type) not in ci
                yield pytest.param(layout, axis_type, set_mesh, marks=[_SLOW] if slow else [],
                                   id=f"{'set_mesh' if set_mesh else 'no_set_mesh'}-"
                                      f"{axis_type}-{layout}")


@pytest.mark.parametrize("layout,axis_type,set_mesh", list(_follow_cases()))
def test_state_follows_param_sharding_and_matches_one_device(layout, axis_type, set_mesh):
    shape, names, specs = _LAYOUTS[layout]
    mesh = jax.make_mesh(shape, names,
                         axis_types=(getattr(jax.sharding.AxisType, axis_type),) * len(names))
    blocks = _FOLLOW_BLOCKS[layout]
    with jax.enable_x64(True):
        params, grad = _follow_problem(jnp.float64)
        # Auto axes: the abstract state is made without a mesh in context, where init
        # cannot see the params' sharding; the state is to follow it: packing="stacked".
        packing = "stacked" if axis_type == "Auto" else "auto"
        opt = make_mlbfgs(0.05, blocks=blocks, packing=packing, **PAIRS_KW)
        ref = _follow_reference(layout)
        init = _follow_init(opt, params, mesh, specs, axis_type, set_mesh)
        sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                               params, specs)
        with (jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()):
            p, st, st0 = _follow_run(opt, sharded, grad, init)
    _check_state_follows(st0[0], specs)
    _check_state_follows(st[0], specs)  # no resharding across steps
    assert int(jnp.min(st[0].num_pairs)) == 4
    _assert_same(p, ref)


@pytest.mark.slow  # 17 s; float32 sharded state is covered by tests/test_optax_contract.py
def test_state_follows_param_sharding_in_float32():
    shape, names, specs = _LAYOUTS["fsdp"]
    mesh = jax.make_mesh(shape, names)
    params, grad = _follow_problem(jnp.float32)
    opt = make_mlbfgs(0.05, **PAIRS_KW)
    ref, _, _ = _follow_run(opt, params, grad)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    p, st, _ = _follow_run(opt, sharded, grad)
    _check_state_follows(st[0], specs)
    _assert_same(p, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axis_type", ["Explicit", pytest.param("Auto", marks=_SLOW)])
def test_followed_sharding_step_only_all_reduces_scalars(axis_type):
    """No all-gather of history or averages: only per-block scalars, M-vectors and, on the pair
    step, the (M, 3) products of the history with the new pair and the step's vector cross."""
    shape, names, specs = _LAYOUTS["tensor_parallel"]
    mesh = jax.make_mesh(shape, names, axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    params, _ = _follow_problem(jnp.float32)
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    opt = mlbfgs_optax.mlbfgs(0.1, memory_size=6)
    with jax.set_mesh(mesh):
        st = opt.init(params)
        hlo = jax.jit(opt.update).lower(params, st, params).compile().as_text()
    ops = [line for line in hlo.splitlines()
           if re.search(r"= .*\b(all-gather|all-reduce|all-to-all|collective-permute|"
                        r"reduce-scatter)(-start)?\(", line)]
    assert ops and all(" all-reduce(" in line or "all-reduce-start(" in line for line in ops)
    for line in ops:
        result_types = line.split("=", 1)[1].split("all-reduce")[0]
        for dims in re.findall(r"\[([0-9,]*)\]", result_types):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            assert size <= 3 * 6, line


def test_followed_state_bytes_per_device_fall_as_one_over_n():
    params = {"w": jnp.zeros((64, 48)), "b": jnp.zeros(48)}
    opt = mlbfgs_optax.mlbfgs(0.1)
    single = sum(x.nbytes for x in jax.tree.leaves(opt.init(params)))
    for n in (2, 4, 8):
        mesh = jax.make_mesh((n,), ("x",), devices=jax.devices()[:n])
        sharded = {"w": jax.device_put(params["w"], NamedSharding(mesh, P("x"))),
                   "b": jax.device_put(params["b"], NamedSharding(mesh, P("x")))}
        per_dev = _bytes_per_device(opt.init(sharded))
        # Per-block scalars (rho, gamma, Gram matrices, ...) stay whole: 2 blocks.
        small = 4 + 4 * 4 + 2 * 4 * (10 + 3 * 100 + 5) + 2 * 4 * 3
        assert max(per_dev.values()) <= single / n + small, (n, per_dev, single)


@pytest.mark.parametrize("blocks", ["leaf", "all", {"w": "a", "b": "a"}])
def test_map_params_and_state_partition_specs_agree(blocks):
    params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
    pspecs = {"w": P("x"), "b": P(None)}
    # Unsharded params: "stacked" packing asked for, as for params sharded later.
    for opt in (make_mlbfgs(0.1, blocks=blocks, packing="stacked"),
                make_mlbfgs(0.1, blocks=blocks, momentum=0.9, weight_decay=1e-4,
                            packing="stacked")):
        state = opt.init(params)
        mapped = optax.tree.map_params(opt, lambda _, s: s, state, pspecs,
                                       transform_non_params=lambda _: None)
        ours = mlbfgs_optax.state_partition_specs(state, params_specs=pspecs)
        found = mlbfgs_optax.find_mlbfgs_state(mapped)
        mine = mlbfgs_optax.find_mlbfgs_state(ours)
        # The state holds packed buckets, none params-shaped: map_params maps no field,
        # and state_partition_specs gives each stacked bucket its leaves' spec.
        for name in mlbfgs_optax.ScaleByMLBFGSState._fields:
            assert getattr(found, name) is None, name
        layout = mlbfgs_optax.find_mlbfgs_state(state).layout
        w_bucket = [j for j, b in enumerate(layout.buckets)
                    if layout.paths[b.leaves[0]] == "['w']"][0]
        assert mine.grads_avg[w_bucket] == P(None, "x")
        assert mine.s_history[w_bucket] == P(None, None, "x")
        assert mine.s_history[1 - w_bucket] == P(None, None, None)
        # The specs place a real state.
        mesh = jax.make_mesh((N_DEV,), ("x",))
        placed = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), ours,
                                                    is_leaf=lambda x: isinstance(x, P)))
        placed_hist = mlbfgs_optax.find_mlbfgs_state(placed).s_history[w_bucket]
        assert placed_hist.sharding.spec == P(None, None, "x")


def test_row_packed_state_is_replicated_and_refuses_sharded_specs():
    """Default packing of unsharded params: one replicated row-packed buffer; specs that shard
    one of its leaves are refused with the way out (packing="stacked")."""
    params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
    state = mlbfgs_optax.mlbfgs(0.1).init(params)
    (bucket,) = state[0].layout.buckets
    assert bucket.starts is not None and state[0].s_history[0].ndim == 3
    specs = mlbfgs_optax.state_partition_specs(state, params_specs={"w": P(), "b": P(None)})
    assert mlbfgs_optax.find_mlbfgs_state(specs).s_history == [P()]
    with pytest.raises(ValueError, match="packing='stacked'"):
        mlbfgs_optax.state_partition_specs(state, params_specs={"w": P("x"), "b": P()})
