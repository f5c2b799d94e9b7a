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

__all__ = ["log_likelihood", "LikelihoodResult", "GaussianDataPrior", "exact_divergence",
           "hutchinson_divergence", "draw_probes", "NotDifferentiableError", "PROBES", "DIVERGENCES"]

try:  # written alongside this module (data transforms, dequantization, bits per dimension)
    from .transforms import DataTransform, UniformDequantization, bits_per_dim  # noqa: F401

    __all__ += ["DataTransform", "UniformDequantization", "bits_per_dim"]
except ImportError:  # pragma: no cover - until transforms.py lands
    pass
try:
    from .elbo import elbo  # noqa: F401

    __all__ += ["elbo"]
except ImportError:  # pragma: no cover - until elbo.py lands
    pass
