"""Studies: metrics with noise floors for solver accuracy / NFE comparisons."""

from .metrics import energy_distance, mmd, noise_floor

__all__ = ["energy_distance", "mmd", "noise_floor"]
