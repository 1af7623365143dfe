"""Test configuration: 8 fake CPU devices, and one XLA compilation cache per test run.

Many tests compile the same programs (the same optimizer on the same problem,
checked for different properties). A persistent compilation cache, empty at
the start of every run and shared by the run's pytest-xdist workers, compiles
each of them once per run. A cache the user configured
(``JAX_COMPILATION_CACHE_DIR``) is used instead and kept.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Set by the first process that loads this file (pytest-xdist's controller, or
# pytest alone), before it starts the workers, which inherit it.
_OWN_CACHE = "MLBFGS_OPTAX_TEST_XLA_CACHE"
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    if _OWN_CACHE not in os.environ:
        os.environ[_OWN_CACHE] = tempfile.mkdtemp(prefix="mlbfgs-optax-xla-cache-")
    jax.config.update("jax_compilation_cache_dir", os.environ[_OWN_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def pytest_sessionfinish(session):
    """The controller (or pytest alone) removes the run's own cache."""
    if not hasattr(session.config, "workerinput") and _OWN_CACHE in os.environ:
        shutil.rmtree(os.environ[_OWN_CACHE], ignore_errors=True)


#: Modules whose tests run for 10-25 s each (examples, benchmark harnesses, other
#: processes): started first, so that pytest-xdist's workers finish together
#: instead of one waiting on the other's long test at the end.
_LONG_MODULES = ("test_wheel", "test_multihost", "test_notebooks", "test_examples",
                 "test_example_data_parallel", "test_benchmarks", "test_batch_scaling",
                 "test_compile_cost")


def pytest_collection_modifyitems(items):
    long = lambda item: getattr(item, "module", None) is not None and (
        item.module.__name__.rsplit(".", 1)[-1] in _LONG_MODULES)
    items.sort(key=lambda item: not long(item))  # stable: the rest keep their order
