"""mlbfgs_optax: mL-BFGS, a momentum-based stochastic L-BFGS, for optax.

Niu et al., `mL-BFGS: A Momentum-based L-BFGS for Distributed Large-scale
Neural Network Optimization <https://arxiv.org/abs/2307.13744>`_, TMLR 2023.
"""

from mlbfgs_optax._layout import BlockLayout as BlockLayout
from mlbfgs_optax._layout import EqualSlices as EqualSlices
from mlbfgs_optax._layout import make_layout as make_layout
from mlbfgs_optax._diagnostics import curvature_stats as curvature_stats
from mlbfgs_optax._diagnostics import find_mlbfgs_state as find_mlbfgs_state
from mlbfgs_optax._damping import along_s_curvature as along_s_curvature
from mlbfgs_optax._damping import damping_weight as damping_weight
from mlbfgs_optax._damping import yy_bound_weight as yy_bound_weight
from mlbfgs_optax._distributed import state_partition_specs as state_partition_specs
from mlbfgs_optax._memory import state_bytes_per_param as state_bytes_per_param
from mlbfgs_optax._memory import state_nbytes as state_nbytes
from mlbfgs_optax._state import ScaleByMLBFGSState as ScaleByMLBFGSState
from mlbfgs_optax._mlbfgs import mlbfgs as mlbfgs
from mlbfgs_optax._mlbfgs import scale_by_mlbfgs as scale_by_mlbfgs
from mlbfgs_optax._recipes import authors_recipe as authors_recipe
from mlbfgs_optax._recipes import paper_defaults as paper_defaults
from mlbfgs_optax._two_loop import two_loop_recursion as two_loop_recursion

__version__ = "0.1.0"

__all__ = (
    "BlockLayout",
    "EqualSlices",
    "ScaleByMLBFGSState",
    "authors_recipe",
    "curvature_stats",
    "along_s_curvature",
    "damping_weight",
    "find_mlbfgs_state",
    "make_layout",
    "mlbfgs",
    "paper_defaults",
    "scale_by_mlbfgs",
    "state_bytes_per_param",
    "state_nbytes",
    "state_partition_specs",
    "two_loop_recursion",
    "yy_bound_weight",
)
