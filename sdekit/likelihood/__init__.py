"""Likelihoods: exact log p through the probability-flow ODE, divergence estimators, adjoint
gradients; data transforms / bits per dimension and the ELBO (see ``docs/likelihood.md`` and
``docs/likelihood_data.md``).
"""

from .divergence import (
    PROBES,
    NotDifferentiableError,
    draw_probes,
    exact_divergence,
    hutchinson_divergence,
)
from .ode import DIVERGENCES, GaussianDataPrior, LikelihoodResult, log_likelihood
from .targeted import targeted_log_likelihood
from .transforms import DataTransform, UniformDequantization, bits_per_dim
from .elbo import ElboResult, elbo

__all__ = ["log_likelihood", "targeted_log_likelihood", "LikelihoodResult", "GaussianDataPrior", "exact_divergence",
           "hutchinson_divergence", "draw_probes", "NotDifferentiableError", "PROBES", "DIVERGENCES",
           "DataTransform", "UniformDequantization", "bits_per_dim", "elbo", "ElboResult"]

