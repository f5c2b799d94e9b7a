"""Studies: metrics with noise floors for solver accuracy / NFE comparisons."""

from .metrics import energy_distance, mmd, noise_floor
from .tune import TunedGrid, grid_error, resample_grid, tune_grid  # noqa: F401

__all__ = ["energy_distance", "mmd", "noise_floor"]
