"""Solvers: ``solve`` and its methods, the plan and method protocol, grids, statistics, backends.

Importing this package registers every method in ``METHODS``.
"""

from .registry import METHODS, MethodInfo, MethodRow, MethodTable, Option, get_method, method_table
from .stats import CountingFunction, Solution, SolverError, SolverStats
from .grids import GRID_KINDS, make_grid
from .brownian import BrownianPath
# importing these modules registers their methods in METHODS
from . import native, exponential, adaptive, backend_torchdiffeq, backend_torchsde  # noqa: F401
from .plan import Plan, make_plan
from .integrate import integrate_ode
from .solve import solve

__all__ = ["solve", "integrate_ode", "make_plan", "Plan", "Solution", "SolverStats", "SolverError", "METHODS",
           "MethodInfo", "MethodRow", "MethodTable", "Option", "get_method", "method_table", "make_grid",
           "GRID_KINDS", "CountingFunction", "BrownianPath"]
