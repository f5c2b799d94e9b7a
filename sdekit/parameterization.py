r"""Score parameterisations — the one place where ε-, denoiser- and v-predictions become scores.

With $x_t = m(t)x_0 + \sigma(t)\varepsilon$ (``m``, ``σ`` from the SDE's kernel):

* ε-prediction: $\nabla\log p_t(x) = -\hat\varepsilon/\sigma$;
* denoiser (Tweedie): $\nabla\log p_t(x) = (m\hat D - x)/\sigma^2$, $\hat D \approx E[x_0|x_t]$;
* v-prediction $v = m\varepsilon - \sigma x_0$ (Salimans & Ho 2022, with $\alpha = m$):
  $x_0 = (m x - \sigma v)/(m^2+\sigma^2)$, $\varepsilon = (\sigma x + m v)/(m^2+\sigma^2)$.

And back: `tweedie_denoise` gives $E[x_0|x_t] = (x + \sigma^2\nabla\log p_t)/m$ and
`tweedie_covariance` the second-order Tweedie
$\mathrm{Cov}[x_0|x_t] = \frac{\sigma^2}{m^2}(I + \sigma^2\nabla^2\log p_t)$.
All callables take ``(x, t)`` with ``t`` a ``(B,)`` tensor (as the solvers pass it).
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from ._validation import TimeLike, broadcast_to_data, check_positive, check_state, check_time_range, time_for
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
    "PREDICTIONS",
    "convert_prediction",
    "score_from_prediction",
    "prediction_target",
    "prediction_score_scale",
    "edm_preconditioning",
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
    """``eps(x, t) = -sigma(t) score(x, t)`` (inverse of `score_from_eps`)."""
    _linear(sde)

    def eps(x, t):
        _, s = _ms(sde, x, t)
        return -s * score(x, t)

    return eps


def denoiser_from_score(score: Callable, sde) -> Callable:
    """``D(x, t) = (x + sigma^2 score) / m`` (inverse of `score_from_denoiser`)."""
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
    r"""$E[x_0 | x_t] = (x_t + \sigma^2\nabla\log p_t(x_t))/m$ (first-order Tweedie)."""
    _linear(sde)
    x_t = check_state(x_t, "x_t")
    t64 = time_for(t, x_t)
    check_time_range(t64, sde.T)
    m, s = _ms(sde, x_t, t64)
    return tweedie_mean(x_t, evaluate_score(score, x_t, t64), m, s * s)


def tweedie_covariance(score: Callable, sde, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
    r"""$\mathrm{Cov}[x_0|x_t] = \frac{\sigma^2}{m^2}(I + \sigma^2\nabla^2\log p_t(x_t))$, shape ``(B, d, d)``.

    The Hessian of $\log p_t$ is the Jacobian of the score, by autograd (one backward pass
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


# ---------------------------------------------------------------------------------------------
# Tensor-level conversions for trained networks (diffusion.ScoreModel, diffusion.losses)
# ---------------------------------------------------------------------------------------------
#
# A network predicts, at (x_t, t), one of four equivalent quantities; with x_t = m x0 + σ ε
# (m, σ from the kernel) and the score s = -ε/σ of the Gaussian kernel:
#   "eps":   ε̂;   "x0": x̂0 = E[x0|x_t];   "v": v̂ = m ε̂ - σ x̂0;   "score": ŝ = -ε̂/σ.
# Each is an affine function of each other at fixed (x_t, t); the slope d s / d(prediction) is
# `prediction_score_scale`, which turns a squared error in any space into one in score space.

PREDICTIONS = ("eps", "x0", "v", "score")


def _check_prediction(name: str, arg: str) -> str:
    if not isinstance(name, str) or name not in PREDICTIONS:
        raise ValueError(f"{arg} must be one of {PREDICTIONS}, got {name!r}")
    return name


def _t64_for(t: TimeLike, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device, dtype=torch.float64) if isinstance(t, torch.Tensor) else \
        torch.tensor(float(t), dtype=torch.float64, device=x.device)


def convert_prediction(pred: torch.Tensor, x: torch.Tensor, sde, t: TimeLike, *, source: str,
                       target: str) -> torch.Tensor:
    r"""Convert a prediction at $(x_t, t)$ between the spaces ``"eps"``, ``"x0"``, ``"v"``, ``"score"``.

    With $x_t = m x_0 + \sigma\varepsilon$: $\hat x_0 = (x_t - \sigma\hat\varepsilon)/m$,
    $\hat\varepsilon = (x_t - m\hat x_0)/\sigma$, $\hat v = m\hat\varepsilon - \sigma\hat x_0$,
    $\hat x_0 = (m x_t - \sigma\hat v)/(m^2 + \sigma^2)$, $\hat\varepsilon = (\sigma x_t + m\hat v)/(m^2 + \sigma^2)$,
    $\hat s = -\hat\varepsilon/\sigma$ (and $\hat s = (m\hat x_0 - x_t)/\sigma^2$ for x0, Tweedie).

    Parameters
    ----------
    pred:
        The prediction, shaped like ``x``.
    x:
        The noisy state $x_t$, ``(B, ...)``.
    sde:
        A linear SDE (its kernel gives $m$, $\sigma$).
    t:
        A float or a ``(B,)`` tensor of times in $(0, T]$.
    source, target:
        Names from ``PREDICTIONS``.

    Returns
    -------
    torch.Tensor
        The prediction in ``target`` space, shaped like ``x``, in x's dtype.
    """
    _linear(sde)
    source = _check_prediction(source, "source")
    target = _check_prediction(target, "target")
    if not isinstance(pred, torch.Tensor) or pred.shape != x.shape:
        raise ValueError(f"pred must be a tensor shaped like x {tuple(x.shape)}, got "
                         f"{getattr(pred, 'shape', type(pred).__name__)}")
    if source == target:
        return pred
    m, s = _ms(sde, x, _t64_for(t, x))
    # to (eps, x0) first: every conversion passes through the pair, written once here
    if source == "eps":
        eps, x0 = pred, None
    elif source == "score":
        eps, x0 = -s * pred, None
    elif source == "x0":
        eps, x0 = None, pred
    else:  # v
        r = m * m + s * s
        eps, x0 = (s * x + m * pred) / r, (m * x - s * pred) / r
    if target == "eps":
        return eps if eps is not None else (x - m * x0) / s
    if target == "score":
        return -eps / s if eps is not None else (m * x0 - x) / (s * s)
    if target == "x0":
        return x0 if x0 is not None else (x - s * eps) / m
    # v
    if eps is None:
        eps = (x - m * x0) / s
    if x0 is None:
        x0 = (x - s * eps) / m
    return m * eps - s * x0


def score_from_prediction(pred: torch.Tensor, x: torch.Tensor, sde, t: TimeLike, predict: str) -> torch.Tensor:
    r"""The score $\hat s(x_t, t)$ from a prediction in ``predict`` space (`convert_prediction` to ``"score"``)."""
    return convert_prediction(pred, x, sde, t, source=predict, target="score")


def prediction_target(x0: torch.Tensor, eps: torch.Tensor, sde, t: TimeLike, predict: str) -> torch.Tensor:
    r"""The denoising regression target in ``predict`` space for $x_t = m x_0 + \sigma\varepsilon$.

    It is the conversion of the kernel's score $\nabla\log p(x_t|x_0) = -\varepsilon/\sigma$:
    ``"eps"``: $\varepsilon$; ``"x0"``: $x_0$; ``"v"``: $m\varepsilon - \sigma x_0$;
    ``"score"``: $-\varepsilon/\sigma$.
    """
    _linear(sde)
    predict = _check_prediction(predict, "predict")
    if predict == "eps":
        return eps
    if predict == "x0":
        return x0
    if predict == "v":
        return v_from_eps_x0(eps, x0, sde, t)
    _, s = _ms(sde, x0, _t64_for(t, x0))
    return -eps / s


def prediction_score_scale(sde, t: torch.Tensor, predict: str) -> torch.Tensor:
    r"""The slope $a(t) = \partial\hat s/\partial\,\mathrm{prediction}$ of the score in a prediction (float64).

    The conversions are affine with a scalar slope at each $t$, so a squared error in
    ``predict`` space times $a^2$ is the squared error in score space:
    ``"eps"``: $-1/\sigma$; ``"x0"``: $m/\sigma^2$; ``"v"``: $-m/(\sigma(m^2+\sigma^2))$;
    ``"score"``: $1$.

    Parameters
    ----------
    sde:
        A linear SDE.
    t:
        float64 tensor of times (any shape).
    predict:
        A name from ``PREDICTIONS``.
    """
    _linear(sde)
    predict = _check_prediction(predict, "predict")
    t = t.to(torch.float64)
    ker = sde.kernel
    if predict == "score":
        return torch.ones_like(t)
    s = ker.sigma(t)
    if predict == "eps":
        return -1.0 / s
    m = ker.m(t)
    if predict == "x0":
        return m / (s * s)
    return -m / (s * (m * m + s * s))


def edm_preconditioning(sde, t: torch.Tensor, sigma_data: float):
    r"""EDM's preconditioning (Karras et al. 2022) for any linear SDE, from the kernel; float64.

    In the scaled variable $\tilde x = x_t/m = x_0 + \bar\sigma\varepsilon$ with
    $\bar\sigma = \sigma/m = e^{-\lambda/2}$, EDM's denoiser is
    $D = c_{skip}\tilde x + c_{out}F(c_{in}^{EDM}\tilde x)$ with
    $c_{skip} = \sigma_d^2/(\bar\sigma^2+\sigma_d^2)$, $c_{out} = \bar\sigma\sigma_d/\sqrt{\bar\sigma^2+\sigma_d^2}$,
    $c_{in}^{EDM} = 1/\sqrt{\bar\sigma^2+\sigma_d^2}$. Written on $x_t$:

    $$D(x_t) = c_{skip}\,\frac{x_t}{m} + c_{out}\,F(c_{in}x_t,\ \log\bar\sigma),\qquad
      c_{in} = \frac{1}{m\sqrt{\bar\sigma^2+\sigma_d^2}} = \frac{1}{\sqrt{\sigma^2 + m^2\sigma_d^2}},$$

    so $c_{in}x_t$ has unit variance for data of variance $\sigma_d^2$ and $F$'s regression target
    $(x_0 - c_{skip}x_t/m)/c_{out}$ has unit variance too. For VE ($m = 1$) these are EDM's own.

    Parameters
    ----------
    sde:
        A linear SDE.
    t:
        float64 tensor of times in $(0, T]$.
    sigma_data:
        $\sigma_d > 0$, the data's standard deviation per coordinate.

    Returns
    -------
    tuple of torch.Tensor
        ``(c_in, c_skip, c_out, m)``: float64 tensors shaped like ``t`` ($m$ for the $x_t/m$ of
        the skip connection).
    """
    _linear(sde)
    sd = check_positive(sigma_data, "sigma_data")
    t = t.to(torch.float64)
    ker = sde.kernel
    m = ker.m(t)
    sbar2 = torch.exp(-ker.log_snr(t))  # σ̄² = σ²/m²
    r = sbar2 + sd * sd
    c_skip = sd * sd / r
    c_out = torch.sqrt(sbar2) * sd / torch.sqrt(r)
    c_in = 1.0 / (m * torch.sqrt(r))
    return c_in, c_skip, c_out, m
