"""Solvers: ``solve`` and its methods, grids, statistics and backends.

Importing this package registers every method in :data:`METHODS`.
"""

from .registry import METHODS, MethodInfo, get_method, method_table
from .stats import CountingFunction, Solution, SolverError, SolverStats
from .grids import GRID_KINDS, make_grid
from .brownian import BrownianPath
# importing these modules registers their methods in METHODS
from . import native, exponential, adaptive, backend_torchdiffeq, backend_torchsde  # noqa: F401
from .solve import solve

__all__ = ["solve", "Solution", "SolverStats", "SolverError", "METHODS", "MethodInfo", "get_method",
           "method_table", "make_grid", "GRID_KINDS", "CountingFunction", "BrownianPath"]
