"""Studies: which solver, at how many NFE, on which grid — work-precision sweeps against exact or
tight references, metrics with noise floors, observed orders (``docs/studies.md``), and time grids
tuned on a calibration batch (``docs/studies_tuning.md``)."""

from .metrics import (energy_distance, mmd, mode_occupancy, nll_error, noise_floor, sliced_wasserstein,
                      strong_error, weak_error)
from .reference import Reference, StudyProblem
from .work_precision import METRICS, MethodSpec, StudyTable, work_precision
from .order import OrderRow, observed_order, orders_markdown
from .named import NAMED_STUDIES, StudySpec, get_study, steps_for_nfe
from .tune import TunedGrid, grid_error, resample_grid, tune_grid

__all__ = ["energy_distance", "mmd", "noise_floor", "strong_error", "weak_error", "sliced_wasserstein",
           "nll_error", "mode_occupancy", "Reference", "StudyProblem", "METRICS", "MethodSpec", "StudyTable",
           "work_precision", "OrderRow", "observed_order", "orders_markdown", "NAMED_STUDIES", "StudySpec", "get_study",
           "steps_for_nfe", "TunedGrid", "grid_error", "resample_grid", "tune_grid"]
