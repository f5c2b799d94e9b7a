r"""Score parameterisations — the one place where ε-, denoiser- and v-predictions become scores.

With :math:`x_t = m(t)x_0 + \sigma(t)\varepsilon` (``m``, ``σ`` from the SDE's kernel):

* ε-prediction: :math:`\nabla\log p_t(x) = -\hat\varepsilon/\sigma`;
* denoiser (Tweedie): :math:`\nabla\log p_t(x) = (m\hat D - x)/\sigma^2`, :math:`\hat D \approx E[x_0|x_t]`;
* v-prediction :math:`v = m\varepsilon - \sigma x_0` (Salimans & Ho 2022, with :math:`\alpha = m`):
  :math:`x_0 = (m x - \sigma v)/(m^2+\sigma^2)`, :math:`\varepsilon = (\sigma x + m v)/(m^2+\sigma^2)`.

And back: :func:`tweedie_denoise` gives :math:`E[x_0|x_t] = (x + \sigma^2\nabla\log p_t)/m` and
:func:`tweedie_covariance` the second-order Tweedie
:math:`\mathrm{Cov}[x_0|x_t] = \frac{\sigma^2}{m^2}(I + \sigma^2\nabla^2\log p_t)`.
All callables take ``(x, t)`` with ``t`` a ``(B,)`` tensor (as the solvers pass it).
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from ._validation import TimeLike, broadcast_to_data, check_state, check_time_range, time_for
from .dynamics import evaluate_score

__all__ = [
    "score_from_eps",
    "score_from_denoiser",
    "score_from_v",
    "eps_from_score",
    "denoiser_from_score",
    "v_from_eps_x0",
    "tweedie_mean",
    "tweedie_denoise",
    "tweedie_covariance",
]


def tweedie_mean(x: torch.Tensor, score_value: torch.Tensor, m: Union[float, torch.Tensor],
                 sigma2: Union[float, torch.Tensor]) -> torch.Tensor:
    r"""Tweedie's posterior mean $E[x_0 \mid x_t = x] = (x + \sigma^2\,\nabla\log p_t(x))/m$.

    The one place the formula is written: a pure function of an already evaluated score, with
    ``m`` and ``sigma2`` $= \sigma^2$ given as numbers or tensors broadcastable to ``x`` (the
    native solvers pass their cached Python floats; ``tweedie_denoise`` and
    ``denoiser_from_score`` pass the kernel's values at t). It lives here, not on the kernel,
    because it involves the score, which the kernel knows nothing about. No validation.
    """
    return (x + sigma2 * score_value) / m


def _linear(sde):
    if not getattr(sde, "is_linear", False):
        raise TypeError(f"sde must be a linear SDE with a Gaussian kernel, got {type(sde).__name__}")
    return sde


def _ms(sde, x, t):
    """(m, σ) at the batch times ``t`` broadcast to ``x`` (float64 coefficients cast to x's dtype)."""
    t64 = t.to(device=x.device, dtype=torch.float64) if isinstance(t, torch.Tensor) else \
        torch.tensor(float(t), dtype=torch.float64, device=x.device)
    return broadcast_to_data(sde.kernel.m(t64), x), broadcast_to_data(sde.kernel.sigma(t64), x)


def score_from_eps(eps_model: Callable, sde) -> Callable:
    """``score(x, t) = -eps_model(x, t) / sigma(t)``."""
    _linear(sde)

    def score(x, t):
        _, s = _ms(sde, x, t)
        return -eps_model(x, t) / s

    return score


def score_from_denoiser(denoiser: Callable, sde) -> Callable:
    """``score(x, t) = (m(t) D(x, t) - x) / sigma(t)^2`` (Tweedie)."""
    _linear(sde)

    def score(x, t):
        m, s = _ms(sde, x, t)
        return (m * denoiser(x, t) - x) / (s * s)

    return score


def score_from_v(v_model: Callable, sde) -> Callable:
    """``score(x, t) = -(sigma x + m v) / (sigma (m^2 + sigma^2))`` for v = m eps - sigma x0."""
    _linear(sde)

    def score(x, t):
        m, s = _ms(sde, x, t)
        return -(s * x + m * v_model(x, t)) / (s * (m * m + s * s))

    return score


def eps_from_score(score: Callable, sde) -> Callable:
    """``eps(x, t) = -sigma(t) score(x, t)`` (inverse of :func:`score_from_eps`)."""
    _linear(sde)

    def eps(x, t):
        _, s = _ms(sde, x, t)
        return -s * score(x, t)

    return eps


def denoiser_from_score(score: Callable, sde) -> Callable:
    """``D(x, t) = (x + sigma^2 score) / m`` (inverse of :func:`score_from_denoiser`)."""
    _linear(sde)

    def denoiser(x, t):
        m, s = _ms(sde, x, t)
        return tweedie_mean(x, score(x, t), m, s * s)

    return denoiser


def v_from_eps_x0(eps: torch.Tensor, x0: torch.Tensor, sde, t: TimeLike) -> torch.Tensor:
    """The v-prediction target ``m(t) eps - sigma(t) x0`` (for training v-models)."""
    _linear(sde)
    x0 = check_state(x0, "x0")
    m, s = _ms(sde, x0, time_for(t, x0))
    return m * eps - s * x0


def tweedie_denoise(score: Callable, sde, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
    r""":math:`E[x_0 | x_t] = (x_t + \sigma^2\nabla\log p_t(x_t))/m` (first-order Tweedie)."""
    _linear(sde)
    x_t = check_state(x_t, "x_t")
    t64 = time_for(t, x_t)
    check_time_range(t64, sde.T)
    m, s = _ms(sde, x_t, t64)
    return tweedie_mean(x_t, evaluate_score(score, x_t, t64), m, s * s)


def tweedie_covariance(score: Callable, sde, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
    r""":math:`\mathrm{Cov}[x_0|x_t] = \frac{\sigma^2}{m^2}(I + \sigma^2\nabla^2\log p_t(x_t))`, shape ``(B, d, d)``.

    The Hessian of :math:`\log p_t` is the Jacobian of the score, by autograd (one backward pass
    per dimension: meant for small d). ``x_t`` must have shape ``(B, d)``.
    """
    _linear(sde)
    x_t = check_state(x_t, "x_t")
    if x_t.dim() != 2:
        raise ValueError(f"x_t must have shape (B, d) for tweedie_covariance, got {tuple(x_t.shape)}")
    t64 = time_for(t, x_t)
    check_time_range(t64, sde.T)
    B, d = x_t.shape
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        s = evaluate_score(score, x, t64)
        H = torch.stack([torch.autograd.grad(s[:, i].sum(), x, retain_graph=i < d - 1)[0] for i in range(d)], 1)
    m, sig = _ms(sde, x_t, t64)
    m, sig = m.reshape(-1, 1, 1) if m.dim() else m, sig.reshape(-1, 1, 1) if sig.dim() else sig
    eye = torch.eye(d, dtype=x_t.dtype, device=x_t.device)
    return (sig * sig / (m * m)) * (eye + sig * sig * 0.5 * (H + H.transpose(1, 2)))
