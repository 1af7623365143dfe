"""_options: validation at construction, and the static/numeric split."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlbfgs_optax
from mlbfgs_optax import _options

_NAN, _INF = float("nan"), float("inf")


_BAD_SCALE = [
    ("memory_size", 0), ("memory_size", -3), ("memory_size", 2.5), ("memory_size", True),
    ("update_period", 0), ("update_period", -1), ("update_period", 2.5),
    ("update_period", _INF),
    ("update_period", _NAN),
    ("beta", 1.0), ("beta", -0.1), ("beta", _NAN), ("beta", 1.5),
    ("beta", np.float32(1.5)),
    ("sigma_low", 1.5), ("sigma_low", 2.0), ("sigma_low", _NAN), ("sigma_low", _INF),
    ("sigma_high", 1.0), ("sigma_high", 0.5), ("sigma_high", _NAN), ("sigma_high", -_INF),
    ("tau_max", 0.0), ("tau_max", -0.5), ("tau_max", 1.01), ("tau_max", _NAN),
    ("pair_momentum", 1.0), ("pair_momentum", -0.1), ("pair_momentum", _NAN),
    ("curvature_eps", -1e-3), ("curvature_eps", _INF), ("curvature_eps", _NAN),
    ("blocks", "leaves"),
    ("history_dtype", jnp.int32),
    ("history_dtype", "not-a-dtype"),
    ("averages_dtype", jnp.int8),
    ("metric", "diag"), ("metric", None),
    ("metric_decay", 1.0), ("metric_decay", -0.5), ("metric_decay", _NAN),
    ("metric_eps", 0.0), ("metric_eps", -1e-8), ("metric_eps", _INF),
    ("step_bound", 0.0), ("step_bound", -1.0), ("step_bound", _INF), ("step_bound", _NAN),
    ("roundoff_rejection", -1.0), ("roundoff_rejection", _INF),
    ("curvature", "hessian"), ("curvature", None),
    ("pair_warmup", -1.0), ("pair_warmup", _INF), ("pair_warmup", _NAN),
    ("pair_form", "projected"), ("pair_form", None),
]


def _value_in_message(value, msg):
    return repr(value) in msg or str(value) in msg


@pytest.mark.parametrize("name,value", _BAD_SCALE)
def test_invalid_argument_raises_value_error(name, value):
    makers = [mlbfgs_optax.scale_by_mlbfgs, lambda **kw: mlbfgs_optax.authors_recipe(0.1, **kw)]
    if name in inspect.signature(mlbfgs_optax.mlbfgs).parameters:
        makers.append(lambda **kw: mlbfgs_optax.mlbfgs(0.1, **kw))
    for make in makers:
        with pytest.raises(ValueError) as info:
            make(**{name: value})
        msg = str(info.value)
        assert f"{name}=" in msg, msg
        assert _value_in_message(value, msg), msg
        assert "expected" in msg, msg  # the accepted range follows "expected"


@pytest.mark.parametrize("name,value", [
    ("weight_decay", -1e-4),
    ("weight_decay", _NAN),
    ("weight_decay", _INF),
    ("momentum", 1.0), ("momentum", -0.1), ("momentum", _NAN),
    ("learning_rate", _NAN),
    ("learning_rate", _INF),
])
def test_invalid_mlbfgs_argument_raises_value_error(name, value):
    kw = dict(learning_rate=0.1)
    kw[name] = value
    with pytest.raises(ValueError) as info:
        mlbfgs_optax.mlbfgs(**kw)
    msg = str(info.value)
    assert f"{name}=" in msg and _value_in_message(value, msg) and "expected" in msg, msg


@pytest.mark.parametrize("value", [-0.1, _NAN, _INF])
def test_invalid_scale_by_mlbfgs_learning_rate_raises_value_error(value):
    with pytest.raises(ValueError, match="learning_rate="):
        mlbfgs_optax.scale_by_mlbfgs(learning_rate=value)


def test_paper_defaults_is_read_only_and_switches_every_extension_off():
    with pytest.raises(TypeError):
        mlbfgs_optax.paper_defaults["metric"] = "adam"  # type: ignore[index]
    opts, _ = _options.make_options(**{
        **{k: p.default for k, p in inspect.signature(
            mlbfgs_optax.scale_by_mlbfgs).parameters.items()},
        **mlbfgs_optax.paper_defaults})
    assert opts.metric == "identity" and opts.step_bound_off and opts.roundoff_off
    assert opts.yy_bound_off and not opts.bias_correction
    assert mlbfgs_optax.paper_defaults["pair_warmup"] == 0


def test_presets_keep_the_papers_history_while_the_default_is_short():
    params = {"w": jnp.zeros((3, 4))}
    default = inspect.signature(mlbfgs_optax.scale_by_mlbfgs).parameters["memory_size"].default
    assert default == 2
    assert mlbfgs_optax.scale_by_mlbfgs().init(params).rho.shape == (1, 2)
    paper = mlbfgs_optax.scale_by_mlbfgs(**mlbfgs_optax.paper_defaults).init(params)
    assert paper.rho.shape == (1, 10)
    authors = mlbfgs_optax.find_mlbfgs_state(mlbfgs_optax.authors_recipe(0.1).init(params))
    assert authors.rho.shape == (1, 10)
    # Another size merges into the mapping (passing it beside ** would repeat the keyword).
    five = mlbfgs_optax.scale_by_mlbfgs(**{**mlbfgs_optax.paper_defaults, "memory_size": 5})
    assert five.init(params).rho.shape == (1, 5)


def test_valid_edge_arguments_are_accepted():
    mlbfgs_optax.scale_by_mlbfgs(memory_size=1, update_period=1, beta=0.0, sigma_low=-_INF,
                                 sigma_high=_INF, tau_max=1.0, pair_momentum=0.0,
                                 curvature_eps=0.0)
    mlbfgs_optax.mlbfgs(0.1, weight_decay=0.0, momentum=0.0, update_period=2.0)


_METRIC = dict(metric="adam", metric_decay=0.999, metric_eps=1e-8, step_bound=3.0,
               roundoff_rejection=100.0, learning_rate=None, curvature="gradient_difference",
               pair_warmup=None, packing="auto", momentum=None, pair_form="along_s")


def test_options_are_hashable_and_blocks_do_not_enter_the_hash():
    kw = dict(memory_size=3, update_period=2, beta=0.9, sigma_low=0.5, sigma_high=1.5,
              tau_max=1.0, pair_momentum=0.0, refresh_grad_average=False, normalize=False,
              sigma_yy=None, cache_gram=True, bias_correction=True, history_dtype=None,
              averages_dtype=None, curvature_eps=None, axis_name=None, mesh=None, **_METRIC)
    a, ha = _options.make_options(blocks={"w": "x"}, **kw)
    b, _ = _options.make_options(blocks="leaf", **kw)
    assert hash(a) == hash(b) and a == b  # the layout, a static argument too, tells them apart
    assert dataclasses.is_dataclass(a) and ha.sigma_yy == 15.0  # None resolved to 10 sigma_H
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.memory_size = 4


def test_concrete_neutral_values_switch_work_off_traced_values_do_not():
    kw = dict(memory_size=3, update_period=2, beta=0.9, sigma_low=0.5, sigma_high=1.5,
              tau_max=1.0, refresh_grad_average=False, normalize=False, blocks="leaf",
              cache_gram=True, bias_correction=True, history_dtype=None,
              averages_dtype=None, curvature_eps=None, axis_name=None, mesh=None, **_METRIC)
    off, _ = _options.make_options(pair_momentum=0.0, sigma_yy=float("inf"), **kw)
    assert off.pair_momentum_off and off.yy_bound_off
    on, _ = _options.make_options(pair_momentum=jnp.asarray(0.0), sigma_yy=jnp.asarray(1e9),
                                  **kw)
    assert not on.pair_momentum_off and not on.yy_bound_off


def test_mlbfgs_names_the_tuned_arguments_and_scale_by_mlbfgs_takes_the_rest():
    """At most 15 arguments; each one shared with scale_by_mlbfgs has its default there."""
    inner = inspect.signature(mlbfgs_optax.scale_by_mlbfgs).parameters
    outer = inspect.signature(mlbfgs_optax.mlbfgs).parameters
    assert len(outer) <= 15 and list(outer)[0] == "learning_rate"
    assert outer["momentum"].default == 0.9  # mlbfgs's own; scale_by_mlbfgs's is None
    for name, p in outer.items():
        if name in inner and name not in ("learning_rate", "momentum"):
            assert p.default == inner[name].default or p.default is inner[name].default, name
    for name in outer:  # documented in mlbfgs's own Args
        assert f"  {name}: " in mlbfgs_optax.mlbfgs.__doc__, name
    with pytest.raises(TypeError, match="tau_max"):
        mlbfgs_optax.mlbfgs(0.1, tau_max=0.5)  # pylint: disable=unexpected-keyword-arg
    # And the values really arrive: a non-default of every kind changes the state.
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    st = mlbfgs_optax.mlbfgs(0.1, memory_size=3, update_period=4, beta=0.5, sigma_low=0.5,
                             sigma_high=2.0, blocks=mlbfgs_optax.EqualSlices(2),
                             weight_decay=1e-3, momentum=None, weight_decay_mode="decoupled",
                             pair_form="full", axis_name="x", mesh=mesh,
                             history_dtype=jnp.bfloat16).init(jnp.ones(4))
    assert st[0].rho.shape == (2, 3) and st[0].direction_avg is None
    assert st[0].s_history[0].dtype == jnp.bfloat16
