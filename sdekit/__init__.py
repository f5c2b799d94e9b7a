"""sdekit — diffusion models as stochastic and ordinary differential equations.

The chain a reader follows: processes → kernels → dynamics (reverse SDE, PF ODE) → solvers →
likelihood → studies; ``oracles`` (exact Gaussian mixtures) and ``fokker_planck`` support tests.
"""

from .processes import (
    NOISE_KINDS,
    SDE,
    CosineVPSDE,
    LinearSDE,
    OrnsteinUhlenbeck,
    SubVPSDE,
    VESDE,
    VPSDE,
)
from .dynamics import ProbabilityFlowODE, ReverseSDE
from .parameterization import (
    denoiser_from_score,
    eps_from_score,
    score_from_denoiser,
    score_from_eps,
    score_from_v,
    tweedie_covariance,
    tweedie_denoise,
)
from . import kernels
from . import oracles
from .oracles import GaussianMixture
from .fokker_planck import fokker_planck_residual
from .solvers import Solution, SolverError, SolverStats, solve

__version__ = "0.1.0"

__all__ = [
    "SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "OrnsteinUhlenbeck",
    "NOISE_KINDS", "ReverseSDE", "ProbabilityFlowODE", "score_from_eps", "score_from_denoiser",
    "score_from_v", "eps_from_score", "denoiser_from_score", "tweedie_denoise",
    "tweedie_covariance", "kernels", "solve", "Solution", "SolverStats", "SolverError",
    "oracles", "GaussianMixture", "fokker_planck_residual",
]
