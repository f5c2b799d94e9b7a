r"""Perturbation kernels of linear SDEs — the one source of $m(t)$, $\sigma(t)$ and log-SNR.

For the linear Itô SDE $dx = f(t)\,x\,dt + g(t)\,dW$ started at $x_0$ (time 0 = data),

$$
    x_t \mid x_0 \sim \mathcal N\big(m(t)\,x_0,\ \sigma(t)^2 I\big),\qquad
    m(t) = \exp\!\int_0^t f,\qquad
    \sigma(t)^2 = m(t)^2 \int_0^t \frac{g(u)^2}{m(u)^2}\,du,
$$

with $m' = f m$, $(\sigma^2)' = 2 f \sigma^2 + g^2$, log-SNR
$\lambda = \log(m^2/\sigma^2)$ and $\lambda'(t) = -g(t)^2/\sigma(t)^2 < 0$, so
$\lambda$ is strictly decreasing and invertible whenever $g > 0$.

Every kernel works on float64 tensors of any shape (no validation: the public process layer
validates) and provides ``f``, ``g2``, ``log_m``, ``sigma2``, ``log_snr`` and
``t_from_log_snr``. Closed forms use ``expm1``/``log1p`` so that they stay accurate as
$t \to 0$. `NumericKernel` integrates arbitrary ``f``, ``g`` by Gauss–Legendre
quadrature on a uniform grid and interpolates with quintic Hermite polynomials whose slopes are
the *exact* derivatives ($(\log m)' = f$, $(\sigma^2)' = 2f\sigma^2 + g^2$); the grid
is refined until the interpolation error at interval midpoints is below ``tol``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch


__all__ = [
    "Kernel",
    "NumericKernel",
    "VPKernel",
    "SubVPKernel",
    "VEKernel",
    "CosineKernel",
    "OUKernel",
    "UserKernel",
    "DiscreteVPKernel",
    "wrap_time_function",
]

F64 = torch.float64
CoefFn = Callable[[torch.Tensor], torch.Tensor]


def wrap_time_function(fn: Callable, name: str) -> CoefFn:
    """Wrap a user coefficient of time so it maps a float64 tensor to a float64 tensor of the same shape.

    ``fn`` is a callable of ``t`` or a constant (a real number or a 0-d real tensor, e.g.
    ``f=-0.5``). A callable may also return a constant (a number or a 0-d tensor), which is
    broadcast. Anything else of the wrong shape raises ``ValueError`` naming ``name``; a value
    that is neither callable nor a real number raises ``TypeError``.
    """
    if isinstance(fn, torch.Tensor) and fn.dim() == 0 and fn.dtype.is_floating_point:
        fn = float(fn)
    if isinstance(fn, (int, float)) and not isinstance(fn, bool):
        value = float(fn)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {fn!r}")
        return lambda t: torch.full_like(t, value, dtype=F64)
    if not callable(fn):
        raise TypeError(f"{name} must be a callable of t or a real number, got {type(fn).__name__}: {fn!r}")

    def wrapped(t: torch.Tensor) -> torch.Tensor:
        try:
            out = fn(t)
        except Exception as exc:  # give the user the context of the failing call
            raise TypeError(
                f"{name}(t) failed on a float64 tensor of shape {tuple(t.shape)}: {exc}. "
                f"{name} must accept torch tensors (use torch.sin, not math.sin)"
            ) from exc
        if isinstance(out, (int, float)):
            return torch.full_like(t, float(out))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{name}(t) must return a tensor or a number, got {type(out).__name__}")
        if out.shape != t.shape:
            if out.dim() == 0:
                return out.to(F64).expand_as(t)
            raise ValueError(
                f"{name}(t) returned shape {tuple(out.shape)} for t of shape {tuple(t.shape)}; "
                f"{name} must act elementwise on t"
            )
        return out.to(F64)

    return wrapped


def _autograd_derivative(fn: CoefFn, t: torch.Tensor) -> torch.Tensor:
    """d fn / dt for an elementwise function of ``t``, by autograd (zeros if ``fn`` ignores t)."""
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        y = fn(tt)
        if not y.requires_grad:
            return torch.zeros_like(t)
        (d,) = torch.autograd.grad(y.sum(), tt, allow_unused=True)
    return torch.zeros_like(t) if d is None else d.detach()


class Kernel:
    """Base class. Subclasses implement ``f``, ``g2``, ``log_m`` and ``sigma2`` on float64 tensors.

    ``T`` is the end of the process's time interval; ``log_snr`` and ``t_from_log_snr`` have
    generic implementations that closed forms override.
    """

    T: float

    # -- required ----------------------------------------------------------------------------
    def f(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def g2(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_m(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- derived -----------------------------------------------------------------------------
    def m(self, t: torch.Tensor) -> torch.Tensor:
        """Mean coefficient $m(t) = \\exp\\int_0^t f$."""
        return torch.exp(self.log_m(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total standard deviation $\\sigma(t)$ of the kernel."""
        return torch.sqrt(self.sigma2(t))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """$\\lambda(t) = 2\\log m(t) - \\log\\sigma(t)^2$ (``+inf`` at t = 0)."""
        return 2.0 * self.log_m(t) - torch.log(self.sigma2(t))

    def dlog_snr(self, t: torch.Tensor) -> torch.Tensor:
        """$\\lambda'(t) = -g(t)^2 / \\sigma(t)^2$."""
        return -self.g2(t) / self.sigma2(t)

    @property
    def log_snr_T(self) -> float:
        """$\\lambda(T)$, the smallest log-SNR of the process, as a Python float."""
        return float(self.log_snr(torch.tensor(self.T, dtype=F64)))

    def transition(self, s: torch.Tensor, t: torch.Tensor):
        r"""``(a, b2)`` of the forward transition from time ``s`` to a later time ``t``.

        $x_t \mid x_s \sim \mathcal N(a\,x_s,\ b^2 I)$ with $a = m(t)/m(s)$ and
        $b^2 = m(t)^2\big(e^{-\lambda(t)} - e^{-\lambda(s)}\big) = m(t)^2\int_s^t g^2/m^2$,
        evaluated as $b^2 = -\sigma(t)^2\,\mathrm{expm1}(\lambda(t) - \lambda(s))$, which keeps
        its relative accuracy as $t \to s$ (no difference of two nearly equal variances) and is
        exact at $s = 0$ ($\lambda(0) = +\infty$, $b^2 = \sigma(t)^2$). ``s`` and ``t`` are float64
        tensors that broadcast together; ``b2`` is 0 where ``t <= s`` (never negative, never NaN).
        The transitions compose: $a_{su} = a_{st}a_{tu}$, $b^2_{su} = a_{tu}^2 b^2_{st} + b^2_{tu}$.
        """
        a = torch.exp(self.log_m(t) - self.log_m(s))
        s2_t = self.sigma2(t)
        b2 = -s2_t * torch.expm1(self.log_snr(t) - self.log_snr(s))
        keep = (t > s) & (s2_t > 0)  # sigma(t) = 0 (lambda(t) = inf, inf - inf = nan): b^2 <= sigma^2 = 0
        return a, torch.where(keep, b2.clamp_min(0.0), torch.zeros_like(b2))

    def t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """Invert the (strictly decreasing) log-SNR numerically: bisection, then Newton polish.

        ``lam`` values above $\\lambda$ near 0 map to (almost) 0; below $\\lambda(T)$
        to ``T``. The public layer validates the range.
        """
        lam = lam.to(F64)
        lo = torch.zeros_like(lam)
        hi = torch.full_like(lam, self.T)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # still too early (too little noise)
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        t = 0.5 * (lo + hi)
        for _ in range(3):
            step = (self.log_snr(t) - lam) / self.dlog_snr(t)
            t_new = (t - step).clamp(0.0, self.T)
            t = torch.where(torch.isfinite(t_new), t_new, t)
        return t


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


class VPKernel(Kernel):
    r"""Variance-preserving kernel, $\beta(t) = \beta_{min} + t(\beta_{max}-\beta_{min})$.

    $f = -\beta/2$, $g^2 = \beta$, $B(t) = \int_0^t\beta$,
    $m = e^{-B/2}$, $\sigma^2 = -\mathrm{expm1}(-B)$, $\lambda = -\log\mathrm{expm1}(B)$.
    """

    def __init__(self, beta_min: float, beta_max: float, T: float):
        self.beta_min, self.beta_max, self.T = float(beta_min), float(beta_max), float(T)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def B(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)

    def log_m(self, t):
        return -0.5 * self.B(t)

    def sigma2(self, t):
        return -torch.expm1(-self.B(t))

    def log_snr(self, t):
        return -torch.log(torch.expm1(self.B(t)))

    def _dB(self, s, t):
        """$B(t) - B(s)$ without cancellation: $(t - s)(\\beta_{min} + \\tfrac12(\\beta_{max}-\\beta_{min})(t + s))$."""
        return (t - s) * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * (t + s))

    def transition(self, s, t):
        r"""Closed form: $a = e^{-\Delta B/2}$, $b^2 = -\mathrm{expm1}(-\Delta B)$, $\Delta B = B(t) - B(s)$."""
        dB = self._dB(s, t)
        return torch.exp(-0.5 * dB), torch.where(t > s, -torch.expm1(-dB), torch.zeros_like(dB))

    def _t_from_B(self, B):
        d = self.beta_max - self.beta_min
        return 2.0 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * B))

    def t_from_log_snr(self, lam):
        lam = lam.to(F64)
        B = torch.logaddexp(torch.zeros_like(lam), -lam)  # log1p(e^{-λ}) without overflow
        return self._t_from_B(B)


class SubVPKernel(VPKernel):
    r"""Sub-VP kernel (Song et al. 2021): $g^2 = \beta(1 - e^{-2B})$, $\sigma = 1 - e^{-B}$.

    $\lambda = -2\log(2\sinh(B/2))$, inverted as $B = 2\,\mathrm{asinh}(e^{-\lambda/2}/2)$.
    """

    def g2(self, t):
        return -self.beta(t) * torch.expm1(-2.0 * self.B(t))

    def sigma2(self, t):
        return torch.expm1(-self.B(t)) ** 2

    def log_snr(self, t):
        return -2.0 * torch.log(2.0 * torch.sinh(0.5 * self.B(t)))

    def transition(self, s, t):
        r"""Closed form: $\int_s^t g^2/m^2 = 2\cosh B(t) - 2\cosh B(s)$, so
        $b^2 = 4e^{-B(t)}\sinh\frac{B(t)+B(s)}2\sinh\frac{\Delta B}2$ with $\Delta B = B(t) - B(s)$."""
        dB, Bt = self._dB(s, t), self.B(t)
        b2 = 4.0 * torch.exp(-Bt) * torch.sinh(Bt - 0.5 * dB) * torch.sinh(0.5 * dB)
        return torch.exp(-0.5 * dB), torch.where(t > s, b2, torch.zeros_like(b2))

    def t_from_log_snr(self, lam):
        lam = lam.to(F64)
        B = 2.0 * torch.asinh(0.5 * torch.exp(-0.5 * lam))
        return self._t_from_B(B)


class VEKernel(Kernel):
    r"""Variance-exploding kernel, $\sigma_{ve}(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t$.

    $f = 0$, $g^2 = d\sigma_{ve}^2/dt = 2 r\,\sigma_{ve}(t)^2$ with
    $r = \log(\sigma_{max}/\sigma_{min})$; exact kernel from t = 0:
    $\sigma(t)^2 = \sigma_{ve}(t)^2 - \sigma_{min}^2 = \sigma_{min}^2\,\mathrm{expm1}(2rt)$.
    (score_sde's ``VESDE.marginal_prob`` uses std $\sigma_{ve}(t)$ instead.)
    """

    def __init__(self, sigma_min: float, sigma_max: float, T: float):
        self.sigma_min, self.sigma_max, self.T = float(sigma_min), float(sigma_max), float(T)
        self.r = math.log(self.sigma_max / self.sigma_min) / self.T

    def f(self, t):
        return torch.zeros_like(t)

    def g2(self, t):
        return 2.0 * self.r * self.sigma_min**2 * torch.exp(2.0 * self.r * t)

    def log_m(self, t):
        return torch.zeros_like(t)

    def sigma2(self, t):
        return self.sigma_min**2 * torch.expm1(2.0 * self.r * t)

    def transition(self, s, t):
        r"""Closed form: $a = 1$, $b^2 = \sigma_{min}^2 e^{2rs}\,\mathrm{expm1}(2r(t - s))$."""
        b2 = self.sigma_min**2 * torch.exp(2.0 * self.r * s) * torch.expm1(2.0 * self.r * (t - s))
        return torch.ones_like(b2), torch.where(t > s, b2, torch.zeros_like(b2))

    def t_from_log_snr(self, lam):
        lam = lam.to(F64)
        return torch.log1p(torch.exp(-lam) / self.sigma_min**2) / (2.0 * self.r)


class CosineKernel(Kernel):
    r"""Cosine schedule (Nichol & Dhariwal 2021) as a continuous VP process.

    $\bar\alpha(t) = \cos^2\phi(t)/\cos^2\phi(0)$, $\phi(t) = \frac{\pi}{2}\frac{t+s}{1+s}$,
    $m = \sqrt{\bar\alpha}$, $\sigma^2 = 1-\bar\alpha
    = \sin(\phi-\phi_0)\sin(\phi+\phi_0)/\cos^2\phi_0$, $f = -c\tan\phi$,
    $g^2 = 2c\tan\phi$ with $c = \pi/(2(1+s))$. The drift is singular at t = 1, so
    ``T`` must be below 1.
    """

    def __init__(self, s: float, T: float):
        self.s, self.T = float(s), float(T)
        self.c = math.pi / (2.0 * (1.0 + self.s))
        self.phi0 = self.c * self.s

    def _phi(self, t):
        return self.c * (t + self.s)

    def f(self, t):
        return -self.c * torch.tan(self._phi(t))

    def g2(self, t):
        return 2.0 * self.c * torch.tan(self._phi(t))

    def log_m(self, t):
        return torch.log(torch.cos(self._phi(t))) - math.log(math.cos(self.phi0))

    def sigma2(self, t):
        phi = self._phi(t)
        return torch.sin(phi - self.phi0) * torch.sin(phi + self.phi0) / math.cos(self.phi0) ** 2

    def t_from_log_snr(self, lam):
        lam = lam.to(F64)
        c0 = math.cos(self.phi0)
        cos_phi = torch.sqrt(torch.sigmoid(lam)) * c0
        sin_phi = torch.sqrt(math.sin(self.phi0) ** 2 + c0**2 * torch.sigmoid(-lam))
        phi = torch.atan2(sin_phi, cos_phi)
        return (phi - self.phi0) / self.c


class OUKernel(Kernel):
    r"""Ornstein–Uhlenbeck $dx = -\theta x\,dt + s\,dW$: $m = e^{-\theta t}$,
    $\sigma^2 = \frac{s^2}{2\theta}(1 - e^{-2\theta t})$."""

    def __init__(self, theta: float, sigma: float, T: float):
        self.theta, self.s, self.T = float(theta), float(sigma), float(T)
        self.c = self.s**2 / (2.0 * self.theta)

    def f(self, t):
        return torch.full_like(t, -self.theta)

    def g2(self, t):
        return torch.full_like(t, self.s**2)

    def log_m(self, t):
        return -self.theta * t

    def sigma2(self, t):
        return -self.c * torch.expm1(-2.0 * self.theta * t)

    def log_snr(self, t):
        return -torch.log(self.c * torch.expm1(2.0 * self.theta * t))

    def transition(self, s, t):
        r"""Closed form: $a = e^{-\theta(t-s)}$, $b^2 = -\frac{s^2}{2\theta}\mathrm{expm1}(-2\theta(t - s))$."""
        dt = t - s
        b2 = -self.c * torch.expm1(-2.0 * self.theta * dt)
        return torch.exp(-self.theta * dt), torch.where(t > s, b2, torch.zeros_like(b2))

    def t_from_log_snr(self, lam):
        lam = lam.to(F64)
        return torch.log1p(torch.exp(-lam) / self.c) / (2.0 * self.theta)


class UserKernel(Kernel):
    r"""A kernel given by the user as callables $m(t)$, $\sigma(t)$.

    The process is derived from it: $f = m'/m$, $g^2 = (\sigma^2)' - 2f\sigma^2$
    (derivatives by autograd unless ``dm``/``dsigma`` are supplied).
    """

    def __init__(self, m: Callable, sigma: Callable, T: float, dm: Optional[Callable] = None,
                 dsigma: Optional[Callable] = None):
        self.T = float(T)
        self._m = wrap_time_function(m, "m")
        self._s = wrap_time_function(sigma, "sigma")
        self._dm = wrap_time_function(dm, "dm") if dm is not None else None
        self._ds = wrap_time_function(dsigma, "dsigma") if dsigma is not None else None

    def _derivs(self, t):
        dm = self._dm(t) if self._dm is not None else _autograd_derivative(self._m, t)
        ds = self._ds(t) if self._ds is not None else _autograd_derivative(self._s, t)
        return dm, ds

    def f(self, t):
        dm, _ = self._derivs(t)
        return dm / self._m(t)

    def g2(self, t):
        dm, ds = self._derivs(t)
        s = self._s(t)
        out = 2.0 * s * ds - 2.0 * (dm / self._m(t)) * s * s
        bad = ~torch.isfinite(out) & (s == 0)
        if bool(bad.any()):
            # where sigma = 0 and sigma ~ sqrt(t - t0) (t = 0 for every VP-type kernel), sigma' is
            # infinite and 2 sigma sigma' = 0 * inf, but (sigma^2)' is finite: take a second-order
            # one-sided difference of sigma^2 there (the -2 f sigma^2 term vanishes with sigma).
            tb = t[bad]
            d = 1e-6 * self.T
            sgn = torch.where(tb + 2 * d <= self.T, 1.0, -1.0).to(tb)
            s2 = lambda u: self._s(u) ** 2  # noqa: E731
            deriv = (-3.0 * s2(tb) + 4.0 * s2(tb + sgn * d) - s2(tb + 2 * sgn * d)) / (2.0 * d * sgn)
            out = out.clone()
            out[bad] = deriv
        return out

    def log_m(self, t):
        return torch.log(self._m(t))

    def sigma2(self, t):
        return self._s(t) ** 2

    def m(self, t):
        return self._m(t)

    def sigma(self, t):
        return self._s(t)


class DiscreteVPKernel(Kernel):
    r"""A discrete DDPM schedule $\bar\alpha_n$ (n = 1..N) as a continuous VP process.

    Knots $t_n = nT/N$ carry $\log m(t_n) = \tfrac12\log\bar\alpha_n$, with
    $\log m(0) = 0$; $\log m$ is interpolated linearly in between (as DPM-Solver's
    'discrete' schedule does, except that we anchor $m(0) = 1$ so that
    $\sigma(0) = 0$ holds exactly). Then $\sigma^2 = 1 - m^2$, $f$ is piecewise
    constant and $g^2 = -2f$.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, T: float):
        a = torch.as_tensor(alphas_cumprod, dtype=F64).flatten()
        self.alphas_cumprod = a.clone()  # the table itself, so a config can record it exactly
        self.T = float(T)
        self.N = a.numel()
        self.log_m_knots = torch.cat([torch.zeros(1, dtype=F64), 0.5 * torch.log(a)])
        self.h = self.T / self.N
        self._slopes = torch.diff(self.log_m_knots) / self.h
        self._cache: Dict[torch.device, tuple] = {}

    def _tables(self, device):
        if device not in self._cache:
            self._cache[device] = (self.log_m_knots.to(device), self._slopes.to(device))
        return self._cache[device]

    def _index(self, t):
        return torch.clamp(torch.floor(t / self.h), 0, self.N - 1).long()

    def f(self, t):
        _, slopes = self._tables(t.device)
        return slopes[self._index(t)]

    def g2(self, t):
        return -2.0 * self.f(t)

    def log_m(self, t):
        knots, slopes = self._tables(t.device)
        i = self._index(t)
        return knots[i] + slopes[i] * (t - i.to(F64) * self.h)

    def sigma2(self, t):
        return -torch.expm1(2.0 * self.log_m(t))


# ---------------------------------------------------------------------------------------------
# Numeric kernel
# ---------------------------------------------------------------------------------------------

_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)
_GL_C = torch.tensor((_GL_X + 1.0) / 2.0, dtype=F64)  # nodes on [0, 1]
_GL_WT = torch.tensor(_GL_W / 2.0, dtype=F64)  # weights on [0, 1]


def _hermite(y0, y1, d0, d1, a0, a1, s, h):
    """Quintic Hermite interpolation on ``[x_i, x_i + h]`` at ``x_i + s h`` (``s`` in [0, 1]).

    ``y`` are values, ``d`` first and ``a`` second derivatives at the two ends. The error is
    $O(h^6)$, and relative accuracy holds down to t -> 0 where sigma^2 vanishes.
    """
    s2 = s * s
    s3 = s2 * s
    s4 = s3 * s
    s5 = s4 * s
    h0 = 1 - 10 * s3 + 15 * s4 - 6 * s5
    h1 = s - 6 * s3 + 8 * s4 - 3 * s5
    h2 = 0.5 * s2 - 1.5 * s3 + 1.5 * s4 - 0.5 * s5
    h3 = 0.5 * s3 - s4 + 0.5 * s5
    h4 = -4 * s3 + 7 * s4 - 3 * s5
    h5 = 10 * s3 - 15 * s4 + 6 * s5
    hh = h * h
    return h0 * y0 + h5 * y1 + h * (h1 * d0 + h4 * d1) + hh * (h2 * a0 + h3 * a1)


def _derivative(fn: CoefFn, t: torch.Tensor) -> torch.Tensor:
    """Elementwise derivative of ``fn`` at ``t``: autograd, or a one-sided-safe finite difference
    when ``fn`` is not differentiable by autograd -- or where autograd gives NaN/inf although the
    function is smooth (e.g. ``g2 = sqrt(2t)**2`` at t = 0, where autograd computes 0 * inf)."""
    try:
        ad = _autograd_derivative(fn, t)
    except RuntimeError:
        ad = None
    if ad is not None and bool(torch.isfinite(ad).all()):
        return ad
    T0, T1 = float(t.min()), float(t.max())
    d = 1e-6 * max(T1 - T0, 1e-3)
    lo = torch.clamp(t - d, T0, T1)
    hi = torch.clamp(t + d, T0, T1)
    fd = (fn(hi) - fn(lo)) / (hi - lo)
    return fd if ad is None else torch.where(torch.isfinite(ad), ad, fd)


class NumericKernel(Kernel):
    r"""Kernel of $dx = f(t)x\,dt + g(t)\,dW$ by quadrature and Hermite interpolation.

    On a uniform grid $t_i = i h$ (``h = T/n``) the increments of $\log m = \int f$
    and $I = \int g^2/m^2$ are integrated with 8-point Gauss–Legendre per interval (the
    values of $\log m$ inside an interval by a nested Gauss–Legendre rule), so the node
    values are exact to round-off. Between nodes $\log m$ and $\sigma^2 = m^2 I$ are
    quintic Hermite interpolants using the exact slopes $f$ and $2f\sigma^2 + g^2$ and
    their derivatives ($f'$ and $(g^2)'$ by autograd), so the error is $O(h^6)$
    and stays *relative* as $\sigma^2 \to 0$ at t = 0.
    ``n`` doubles (from 256, up to 65536) until the interpolation error at every interval
    midpoint — measured against the quadrature there — is below ``tol`` (absolute for
    $\log m$, relative for $\sigma^2$). Evaluation is O(1) per point on any device and
    differentiable in ``t``.

    Parameters
    ----------
    f, g2:
        Elementwise callables of a float64 tensor ``t`` (``g2`` is $g(t)^2$).
    T:
        End of the time interval.
    tol:
        Interpolation tolerance (default 1e-12).
    """

    def __init__(self, f: CoefFn, g2: CoefFn, T: float, tol: float = 1e-12, n_min: int = 256,
                 n_max: int = 65536):
        self._f, self._g2, self.T, self.tol = f, g2, float(T), float(tol)
        n = n_min
        while True:
            tables = self._build(n)
            err = self._midpoint_error(tables, n)
            if err <= tol or n >= n_max:
                break
            n *= 2
        self.n, self.h, self.interp_error = n, self.T / n, err
        if not err <= tol:  # written so that a NaN error counts as a failure
            if not err <= 1e-7:
                raise ValueError(
                    f"NumericKernel: the kernel of this f, g could not be tabulated to better than "
                    f"{err:.2e} relative error with {n} intervals; the schedule is too rough "
                    f"(check f and g for kinks or singularities on [0, {self.T}])"
                )
            warnings.warn(
                f"NumericKernel reached interpolation error {err:.2e} (> tol={tol:.0e}) with {n} "
                f"intervals", RuntimeWarning, stacklevel=3)
        self._tables_cpu = tables
        self._cache: Dict[torch.device, tuple] = {}

    # The tables: node values and exact first and second derivatives of log m and σ².
    def _build(self, n):
        h = self.T / n
        nodes = torch.arange(n + 1, dtype=F64) * h
        nodes[-1] = self.T
        c, w = _GL_C, _GL_WT
        left = nodes[:-1]
        tau = left[:, None] + c[None, :] * h  # (n, 8)
        logm = torch.cat([torch.zeros(1, dtype=F64),
                          torch.cumsum(h * (self._f(tau) * w).sum(-1), 0)])
        logm_tau = self._log_m_inside(logm, left, c * h)
        inc_I = h * (self._g2(tau) * torch.exp(-2.0 * logm_tau) * w).sum(-1)
        I_nodes = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(inc_I, 0)])
        s2 = torch.exp(2.0 * logm) * I_nodes
        f, g2 = self._f(nodes), self._g2(nodes)
        df, dg2 = _derivative(self._f, nodes), _derivative(self._g2, nodes)
        ds2 = 2.0 * f * s2 + g2
        dds2 = 2.0 * df * s2 + 2.0 * f * ds2 + dg2
        return {"logm": logm, "f": f, "df": df, "s2": s2, "ds2": ds2, "dds2": dds2, "I": I_nodes,
                "nodes": nodes}

    def _log_m_inside(self, logm_nodes, left, offsets):
        """log m at ``left[i] + offsets[k]`` by Gauss–Legendre on [left_i, left_i + offset_k]."""
        c, w = _GL_C, _GL_WT
        tau2 = left[:, None, None] + offsets[None, :, None] * c[None, None, :]
        return logm_nodes[:-1, None] + offsets[None, :] * (self._f(tau2) * w).sum(-1)

    @staticmethod
    def _interp(tab, key, dkey, ddkey, i, s, h):
        y, d, a = tab[key], tab[dkey], tab[ddkey]
        return _hermite(y[i], y[i + 1], d[i], d[i + 1], a[i], a[i + 1], s, h)

    def _midpoint_error(self, tab, n):
        h = self.T / n
        left = tab["nodes"][:-1]
        logm_mid = self._log_m_inside(tab["logm"], left, torch.tensor([0.5 * h], dtype=F64))[:, 0]
        c, w = _GL_C, _GL_WT
        offs = c * (0.5 * h)
        logm_tau = self._log_m_inside(tab["logm"], left, offs)
        g2_tau = self._g2(left[:, None] + offs[None, :])
        I_mid = tab["I"][:-1] + 0.5 * h * (g2_tau * torch.exp(-2.0 * logm_tau) * w).sum(-1)
        s2_mid = torch.exp(2.0 * logm_mid) * I_mid
        i = torch.arange(n)
        s = torch.full_like(left, 0.5)
        e1 = (self._interp(tab, "logm", "f", "df", i, s, h) - logm_mid).abs().max()
        e2 = ((self._interp(tab, "s2", "ds2", "dds2", i, s, h) - s2_mid).abs() / s2_mid).max()
        return float(torch.maximum(e1, e2))

    def _tables(self, device):
        tab = self._cache.get(device)
        if tab is None:
            tab = {k: v.to(device) for k, v in self._tables_cpu.items()}
            self._cache[device] = tab
        return tab

    def _locate(self, t):
        u = t / self.h
        i = torch.clamp(torch.floor(u), 0, self.n - 1)
        return i.long(), u - i

    def f(self, t):
        return self._f(t)

    def g2(self, t):
        return self._g2(t)

    def log_m(self, t):
        i, s = self._locate(t)
        return self._interp(self._tables(t.device), "logm", "f", "df", i, s, self.h)

    def sigma2(self, t):
        i, s = self._locate(t)
        return self._interp(self._tables(t.device), "s2", "ds2", "dds2", i, s, self.h)

    def __repr__(self):
        return f"NumericKernel(T={self.T}, n={self.n}, interp_error={self.interp_error:.1e})"
