"""sdekit — diffusion models as stochastic and ordinary differential equations.

The chain a reader follows: processes → kernels → dynamics (reverse SDE, PF ODE) → solvers →
likelihood → studies; ``oracles`` (exact Gaussian mixtures) and ``fokker_planck`` support tests.
``import sdekit`` loads every documented submodule: ``sdekit.kernels``, ``sdekit.parameterization``,
``sdekit.solvers``, ``sdekit.likelihood``, ``sdekit.oracles``, ``sdekit.studies``,
``sdekit.guidance`` (guided scores), ``sdekit.inverse`` (inpainting).

Default ``t_eps`` (the data-side end of every time interval; stated once in
``docs/concepts.md``, "Where time stops: t_eps"): sampling (``SDE.reverse``,
``SDE.probability_flow``) stops at ``SAMPLING_T_EPS = 1e-3``, likelihoods
(``log_likelihood``, ``elbo``) at ``LIKELIHOOD_T_EPS = 1e-5``.
"""

from ._defaults import LIKELIHOOD_T_EPS, SAMPLING_T_EPS
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
    tweedie_mean,
)
from . import kernels
from . import parameterization
from . import oracles
from .oracles import GaussianMixture
from .fokker_planck import fokker_planck_residual
from . import solvers
from .solvers import Solution, SolverError, SolverStats, solve
from . import likelihood
from .likelihood import (
    DataTransform,
    ElboResult,
    LikelihoodResult,
    UniformDequantization,
    bits_per_dim,
    elbo,
    log_likelihood,
)
from . import studies
from .studies import work_precision
from . import guidance
from .guidance import classifier_free_guidance, classifier_guidance
from . import inverse
from .oracles import LabelledMixture
from . import time_sampling
from .time_sampling import sample_times
from .config import process_config, process_from_config
from .solvers import method_table

__version__ = "0.1.0"

__all__ = [
    "SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "OrnsteinUhlenbeck",
    "NOISE_KINDS", "ReverseSDE", "ProbabilityFlowODE", "score_from_eps", "score_from_denoiser",
    "score_from_v", "eps_from_score", "denoiser_from_score", "tweedie_mean", "tweedie_denoise",
    "tweedie_covariance", "kernels", "parameterization", "solve", "Solution", "SolverStats",
    "SolverError", "solvers", "oracles", "GaussianMixture", "fokker_planck_residual", "likelihood",
    "log_likelihood", "LikelihoodResult", "elbo", "ElboResult", "bits_per_dim", "DataTransform",
    "UniformDequantization", "studies", "SAMPLING_T_EPS", "LIKELIHOOD_T_EPS", "time_sampling", "sample_times",
    "process_config", "process_from_config", "method_table", "work_precision", "guidance",
    "classifier_free_guidance", "classifier_guidance", "inverse", "LabelledMixture",
]
