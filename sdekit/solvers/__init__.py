"""Solvers: ``solve`` and its methods, grids, statistics and backends.

Importing this package registers every method in :data:`METHODS`.
"""

from .registry import METHODS, MethodInfo, get_method, method_table
from .stats import CountingFunction, Solution, SolverError, SolverStats
from .grids import GRID_KINDS, make_grid
from .brownian import BrownianPath
from . import native  # noqa: F401  (registers the native methods)
from .solve import solve

try:  # registered by their own modules
    from . import exponential  # noqa: F401
except ImportError:  # pragma: no cover - during development
    pass
try:
    from . import backend_torchdiffeq, backend_torchsde  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["solve", "Solution", "SolverStats", "SolverError", "METHODS", "MethodInfo", "get_method",
           "method_table", "make_grid", "GRID_KINDS", "CountingFunction", "BrownianPath"]
