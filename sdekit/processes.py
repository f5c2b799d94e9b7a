r"""Forward processes: the general Itô SDE and the linear class used by diffusion models.

Time runs from data (t = 0) to noise (t = T). A general process is

$$
    dx = f(x, t)\,dt + G(x, t)\,dW,
$$

with a declared noise kind:

- ``"isotropic"``: $G = g(t) I$ with an *independent* Brownian motion per dimension.
  (torchsde's ``"scalar"`` noise shares ONE Brownian motion across dimensions, which is a
  different process for d > 1.) ``diffusion(x, t)`` returns $g(t)$ as a ``(B,)`` tensor.
- ``"diagonal"``: $G = \mathrm{diag}(g(x, t))$ elementwise; ``diffusion`` returns a tensor
  shaped like x.
- ``"general"``: $G(x, t)$ a ``(B, d, m)`` matrix for states of shape ``(B, d)`` (small d).

The linear class `LinearSDE` ($dx = f(t)x\,dt + g(t)\,dW$) adds the Gaussian
perturbation kernel $x_t | x_0 \sim N(m(t)x_0, \sigma(t)^2 I)$ from `sdekit.kernels`. The
built-in processes `VPSDE`, `SubVPSDE`, `VESDE`, `CosineVPSDE` and `OrnsteinUhlenbeck` are all
`LinearSDE`s.

User callables ``drift(x, t)``, ``diffusion(x, t)`` receive ``t`` as a ``(B,)`` tensor in the
state's dtype and device; the linear coefficients ``f(t)``, ``g(t)`` receive float64 tensors.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from . import kernels as K
from ._defaults import SAMPLING_T_EPS
from ._process_base import ProcessBase, apply_diffusion
from .dynamics import ProbabilityFlowODE, ReverseSDE, TorchsdeAdapter
from ._gaussian import gaussian_log_prob
from ._validation import (
    TimeLike,
    as_time,
    broadcast_to_data,
    check_callable,
    check_choice,
    check_positive,
    check_state,
    check_time_range,
    short,
    time_for,
)

__all__ = [
    "SDE",
    "LinearSDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "CosineVPSDE",
    "OrnsteinUhlenbeck",
    "NOISE_KINDS",
]

NOISE_KINDS = ("isotropic", "diagonal", "general")
F64 = torch.float64


def _check_T(T) -> float:
    return check_positive(T, "T")


def _check_range(lo, hi, lo_name: str, hi_name: str, strict: bool) -> Tuple[float, float]:
    """Two positive schedule bounds with ``hi >= lo`` (``hi > lo`` if ``strict``)."""
    a, b = check_positive(lo, lo_name), check_positive(hi, hi_name)
    if b < a or (strict and b == a):
        raise ValueError(f"{hi_name} must {'exceed' if strict else 'be >='} {lo_name}; got {lo_name}={lo}, "
                         f"{hi_name}={hi}")
    return a, b


def _batch_time(t64: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The ``(B,)`` time tensor in the state's dtype handed to user callables of (x, t)."""
    return t64.to(dtype=x.dtype, device=x.device).expand(x.shape[0])


class SDE(ProcessBase):
    r"""A general Itô SDE $dx = f(x,t)\,dt + G(x,t)\,dW$ on $t \in [0, T]$.

    Parameters
    ----------
    drift:
        ``drift(x, t) -> tensor`` shaped like ``x`` (``t`` arrives as a ``(B,)`` tensor).
    diffusion:
        ``diffusion(x, t)``: ``(B,)`` (or a number) for ``"isotropic"``, shaped like ``x`` for
        ``"diagonal"``, ``(B, d, m)`` for ``"general"``.
    noise:
        ``"isotropic"``, ``"diagonal"`` or ``"general"`` (see module docs).
    T:
        End time (> 0).
    prior:
        Optional object with ``sample(shape, generator, dtype, device)`` and ``log_prob(z)`` used
        by `prior_sample` / `prior_log_prob` (a general SDE has no closed kernel).
    diffusion_divergence:
        Optional ``(x, t) -> tensor`` returning $\nabla\cdot(GG^T)$ (the vector
        $\sum_j \partial_j (GG^T)_{ij}$) for state-dependent noise; by autograd otherwise.
    """

    is_linear = False

    def __init__(self, drift: Callable, diffusion: Callable, noise: str = "isotropic", T: float = 1.0,
                 prior=None, diffusion_divergence: Optional[Callable] = None):
        check_callable(drift, "drift")
        check_callable(diffusion, "diffusion")
        check_choice(noise, "noise", NOISE_KINDS)
        self.T = _check_T(T)
        self.noise = noise
        self._user_drift, self._user_diffusion = drift, diffusion
        self.prior = prior
        self.diffusion_divergence = diffusion_divergence

    # -- internal, unvalidated (hot loops call these with float64 t already checked) -----------
    def _drift(self, x: torch.Tensor, t64: torch.Tensor) -> torch.Tensor:
        out = self._user_drift(x, _batch_time(t64, x))
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"drift(x, t) must return a tensor of shape {tuple(x.shape)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return out

    def _diffusion(self, x: torch.Tensor, t64: torch.Tensor) -> torch.Tensor:
        out = self._user_diffusion(x, _batch_time(t64, x))
        if isinstance(out, (int, float)):
            out = torch.full((x.shape[0],), float(out), dtype=x.dtype, device=x.device)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"diffusion(x, t) must return a tensor, got {type(out).__name__}")
        if self.noise == "isotropic":
            if out.dim() == 0:
                out = out.expand(x.shape[0])
            if out.shape != (x.shape[0],):
                raise ValueError(f"isotropic diffusion(x, t) must return shape ({x.shape[0]},) "
                                 f"(g(t) per sample), got {tuple(out.shape)}")
        elif self.noise == "diagonal":
            if out.shape != x.shape:
                raise ValueError(f"diagonal diffusion(x, t) must return shape {tuple(x.shape)}, "
                                 f"got {tuple(out.shape)}")
        else:
            if x.dim() != 2 or out.dim() != 3 or out.shape[:2] != x.shape:
                raise ValueError(f"general diffusion(x, t) needs x of shape (B, d) and returns "
                                 f"(B, d, m); got x {tuple(x.shape)}, G {tuple(out.shape)}")
        return out

    def _diffusion_matrix_action(self, x: torch.Tensor, t64: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """$G G^T v$ for a vector field ``v`` shaped like ``x``."""
        G = self._diffusion(x, t64)
        if self.noise == "isotropic":
            return broadcast_to_data(G * G, x) * v
        if self.noise == "diagonal":
            return G * G * v
        return torch.einsum("bij,bkj,bk->bi", G, G, v)

    def _noise_increment(self, x: torch.Tensor, t64: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
        r"""$G(x,t)\,dW$ with ``dW`` shaped like ``x`` (``(B, m)`` for general noise)."""
        return apply_diffusion(self.noise, self._diffusion(x, t64), x, dW)

    @property
    def t_start(self) -> float:
        """Forward processes run from 0 (data) ..."""
        return 0.0

    @property
    def t_end(self) -> float:
        """... to T (noise)."""
        return self.T

    def to_torchsde(self, shape: Sequence[int]):
        """A torchsde-compatible module (flattened states, Itô) for the forward process."""
        return TorchsdeAdapter(self, shape, 0.0, direction=1)

    # -- public, validated -----------------------------------------------------------------------
    def _check_xt(self, x, t, name="x"):
        x = check_state(x, name)
        t64 = time_for(t, x)
        check_time_range(t64, self.T)
        return x, t64


    @property
    def state_dependent_noise(self) -> bool:
        """Whether G may depend on x (only diagonal/general noise may); decides the divergence term."""
        return self.noise != "isotropic"

    def prior_sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """A sample of the prior at t = T (requires ``prior`` for a general SDE)."""
        if self.prior is None:
            raise ValueError("this SDE has no prior: pass prior=... (an object with sample and log_prob)")
        return self.prior.sample(tuple(shape), generator, dtype, device)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of the prior at ``z``, summed over non-batch dimensions."""
        if self.prior is None:
            raise ValueError("this SDE has no prior: pass prior=... (an object with sample and log_prob)")
        return self.prior.log_prob(check_state(z, "z"))

    # -- derived dynamics ------------------------------------------------------------------------
    def reverse(self, score: Callable, eta: Union[float, Callable] = 1.0, t_eps: float = SAMPLING_T_EPS):
        r"""The reverse-time family $dx = [f - \frac{1+\eta^2}{2}\,GG^T\nabla\log p]dt + \eta G\,d\bar W$.

        See `sdekit.dynamics.ReverseSDE`.
        """
        return ReverseSDE(self, score, eta=eta, t_eps=t_eps)

    def probability_flow(self, score: Callable, t_eps: float = SAMPLING_T_EPS):
        r"""The probability-flow ODE $dx/dt = f - \frac12 GG^T\nabla\log p$ (callable as ``(t, x)``).

        See `sdekit.dynamics.ProbabilityFlowODE`.
        """
        return ProbabilityFlowODE(self, score, t_eps=t_eps)

    def __repr__(self):
        return f"{type(self).__name__}(noise={self.noise!r}, T={self.T})"


class LinearSDE(SDE):
    r"""The linear SDE $dx = f(t)\,x\,dt + g(t)\,dW$ with isotropic noise and a Gaussian kernel.

    Parameters
    ----------
    f, g:
        Callables of a float64 tensor ``t`` (elementwise), or constants (real numbers, e.g.
        ``LinearSDE(-0.5, 1.0)`` is the Ornstein–Uhlenbeck process with $\theta = 0.5$). ``g``
        must be positive and finite on ``(0, T]``.
    T:
        End time (> 0).
    kernel:
        A `sdekit.kernels.Kernel` to use instead of the numeric one (built-ins pass their
        closed forms); when given, ``f`` and ``g`` may be ``None``.
    tol:
        Interpolation tolerance of the numeric kernel.

    Examples
    --------
    >>> import torch, sdekit
    >>> sde = sdekit.LinearSDE(lambda t: -0.5 * (1 + torch.sin(3 * t)), lambda t: (1 + torch.sin(3 * t)).sqrt())
    >>> m, s = sde.marginal(0.5)
    """

    is_linear = True
    noise = "isotropic"

    def __init__(self, f: Optional[Callable] = None, g: Optional[Callable] = None, T: float = 1.0, *,
                 kernel: Optional[K.Kernel] = None, tol: float = 1e-12):
        self.T = _check_T(T)
        self.noise = "isotropic"
        self.prior = None
        self.diffusion_divergence = None
        if kernel is None:
            if f is None or g is None:
                raise TypeError("LinearSDE needs both f and g (callables of t), or a kernel")
            fw = K.wrap_time_function(f, "f")
            gw = K.wrap_time_function(g, "g")
            self._validate_coefficients(fw, gw)
            kernel = K.NumericKernel(fw, lambda t: gw(t) ** 2, self.T, tol=tol)
        elif not isinstance(kernel, K.Kernel):
            raise TypeError(f"kernel must be a sdekit.kernels.Kernel, got {type(kernel).__name__}")
        self.kernel = kernel

    def _validate_coefficients(self, f, g, n: int = 1001):
        t = torch.linspace(0.0, self.T, n, dtype=F64)
        fv, gv = f(t), g(t)
        bad = ~torch.isfinite(fv)
        if bad.any():
            raise ValueError(f"f(t) is not finite at t={float(t[bad][0]):.6g} (f={float(fv[bad][0])})")
        bad = ~torch.isfinite(gv)
        if bad.any():
            raise ValueError(f"g(t) is not finite at t={float(t[bad][0]):.6g} (g={float(gv[bad][0])})")
        bad = gv[1:] <= 0
        if bad.any() or gv[0] < 0:
            i = 0 if gv[0] < 0 else int(torch.nonzero(bad)[0]) + 1
            raise ValueError(f"g(t) must be positive on (0, T]; g({float(t[i]):.6g}) = {float(gv[i]):.6g}")

    # -- coefficients ----------------------------------------------------------------------------
    def _t(self, t: TimeLike, name: str = "t") -> torch.Tensor:
        t64 = as_time(t, name)
        check_time_range(t64, self.T, name)
        return t64

    def f(self, t: TimeLike) -> torch.Tensor:
        """Drift coefficient $f(t)$ (float64)."""
        return self.kernel.f(self._t(t))

    def g(self, t: TimeLike) -> torch.Tensor:
        """Diffusion coefficient $g(t)$ (float64)."""
        return torch.sqrt(self.kernel.g2(self._t(t)))

    def g2(self, t: TimeLike) -> torch.Tensor:
        """$g(t)^2$ (float64)."""
        return self.kernel.g2(self._t(t))

    def marginal(self, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""``(m(t), sigma(t))`` of the kernel $x_t | x_0 \sim N(m x_0, \sigma^2 I)$ (float64)."""
        t64 = self._t(t)
        return self.kernel.m(t64), self.kernel.sigma(t64)

    def marginal_derivatives(self, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""``(m'(t), sigma'(t))`` from the exact identities $m' = fm$,
        $\sigma' = (2f\sigma^2 + g^2)/(2\sigma)$ (float64)."""
        t64 = self._t(t)
        k = self.kernel
        f, s = k.f(t64), k.sigma(t64)
        return f * k.m(t64), (2.0 * f * s * s + k.g2(t64)) / (2.0 * s)

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        r"""$\lambda(t) = \log(m(t)^2/\sigma(t)^2)$, strictly decreasing (float64)."""
        return self.kernel.log_snr(self._t(t))

    def t_from_log_snr(self, lam: TimeLike) -> torch.Tensor:
        r"""Inverse of `log_snr`: the t in ``(0, T]`` with $\lambda(t) =$ ``lam``."""
        lam64 = as_time(lam, "lam")
        lam_T = self.kernel.log_snr_T
        if float(lam64.min()) < lam_T - 1e-9 * max(1.0, abs(lam_T)):
            raise ValueError(f"lam must be >= log_snr(T) = {lam_T:.6g}; got {short(lam)}")
        return self.kernel.t_from_log_snr(lam64)

    # -- process ---------------------------------------------------------------------------------
    def _drift(self, x, t64):
        return broadcast_to_data(self.kernel.f(t64), x) * x

    def _diffusion(self, x, t64):
        g = torch.sqrt(self.kernel.g2(t64)).to(dtype=x.dtype, device=x.device)
        return g.expand(x.shape[0])

    def _coefs(self, t64: torch.Tensor, x: torch.Tensor):
        """(m, sigma) broadcast to ``x``'s shape, in x's dtype."""
        t64 = t64.to(x.device)
        return broadcast_to_data(self.kernel.m(t64), x), broadcast_to_data(self.kernel.sigma(t64), x)

    # -- kernel API --------------------------------------------------------------------------------
    def marginal_sample(self, x0: torch.Tensor, t: TimeLike, generator: Optional[torch.Generator] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw $x_t = m(t)x_0 + \\sigma(t)\\varepsilon$ from the kernel; returns ``(x_t, eps)``.

        Named like `prior_sample` / `prior_log_prob` and `marginal_log_prob` (the kernel's
        density); ``sample_marginal`` is the same method under its old name.
        """
        x0, t64 = self._check_xt(x0, t, "x0")
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        m, s = self._coefs(t64, x0)
        return m * x0 + s * eps, eps

    sample_marginal = marginal_sample  # the old name, kept as an alias

    def marginal_log_prob(self, x_t: torch.Tensor, x0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """$\\log N(x_t; m x_0, \\sigma^2 I)$ summed over non-batch dims, shape ``(B,)``."""
        x_t = check_state(x_t, "x_t")
        x0, t64 = self._check_xt(x0, t, "x0")
        if x_t.shape != x0.shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)} but x0 has {tuple(x0.shape)}")
        m, s = self._coefs(t64, x0)
        return gaussian_log_prob(x_t, m * x0, s * s)

    def conditional_score(self, x_t: torch.Tensor, x0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """$\\nabla_{x_t}\\log p(x_t|x_0) = -(x_t - m x_0)/\\sigma^2$."""
        x_t = check_state(x_t, "x_t")
        x0, t64 = self._check_xt(x0, t, "x0")
        m, s = self._coefs(t64, x0)
        return -(x_t - m * x0) / (s * s)

    def prior_std(self) -> float:
        """Standard deviation $\\sigma(T)$ of the prior $N(0, \\sigma(T)^2 I)$."""
        return float(self.kernel.sigma(torch.tensor(self.T, dtype=F64)))

    def prior_sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """A sample of the prior $N(0, \\sigma(T)^2 I)$ (the kernel at T for data at 0)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
        return self.prior_std() * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """$\\log N(z; 0, \\sigma(T)^2 I)$ summed over non-batch dims, shape ``(B,)``."""
        z = check_state(z, "z")
        return gaussian_log_prob(z, 0.0, self.prior_std() ** 2)

    # -- alternative constructors ---------------------------------------------------------------
    @classmethod
    def from_kernel(cls, m: Callable, sigma: Callable, T: float = 1.0, *, dm: Optional[Callable] = None,
                    dsigma: Optional[Callable] = None, check_points: int = 2001) -> "LinearSDE":
        r"""Build the process whose kernel is $N(m(t)x_0, \sigma(t)^2 I)$.

        $f = m'/m$ and $g^2 = (\sigma^2)' - 2f\sigma^2$ (derivatives by autograd
        unless ``dm``, ``dsigma`` are given). Raises ``ValueError`` if $m \le 0$,
        $\sigma(0) \ne 0$, or $g^2 < 0$ somewhere on ``[0, T]`` (the kernel is not
        reachable by a diffusion). Works for EDM's $s(t), \sigma(t)$ and for Gaussian
        flow-matching paths (e.g. ``m = 1 - t``, ``sigma = t`` with ``T < 1``).
        """
        T = _check_T(T)
        ker = K.UserKernel(m, sigma, T, dm=dm, dsigma=dsigma)
        t = torch.linspace(0.0, T, check_points, dtype=F64)
        mv, sv, g2 = ker.m(t), ker.sigma(t), ker.g2(t)
        for name, v in (("m", mv), ("sigma", sv)):
            bad = ~torch.isfinite(v)
            if bad.any():
                raise ValueError(f"{name}(t) is not finite at t={float(t[bad][0]):.6g}")
        if (mv <= 0).any():
            i = int(torch.nonzero(mv <= 0)[0])
            raise ValueError(f"m(t) must be positive on [0, T]; m({float(t[i]):.6g}) = {float(mv[i]):.6g}")
        bad = ~torch.isfinite(g2)  # checked after m > 0: 1/m blows g^2 up where m vanishes
        if bad.any():
            raise ValueError(f"g^2(t) is not finite at t={float(t[bad][0]):.6g}")
        if abs(float(mv[0]) - 1.0) > 1e-12 or abs(float(sv[0])) > 1e-12:
            raise ValueError(f"a kernel from t = 0 needs m(0) = 1 and sigma(0) = 0; got "
                             f"m(0) = {float(mv[0]):.6g}, sigma(0) = {float(sv[0]):.6g}")
        scale = float((g2.abs().max()).clamp_min(1e-300))
        neg = g2 < -1e-10 * scale
        if neg.any():
            i = int(torch.nonzero(neg)[0])
            raise ValueError(
                f"this kernel is not reachable by a diffusion: g^2 = (sigma^2)' - 2 f sigma^2 = "
                f"{float(g2[i]):.6g} < 0 at t = {float(t[i]):.6g}")
        return cls(T=T, kernel=ker)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, T: float = 1.0) -> "LinearSDE":
        r"""A continuous VP process through a discrete DDPM table $\bar\alpha_1..\bar\alpha_N$.

        $\log m$ is piecewise linear through $(nT/N, \frac12\log\bar\alpha_n)$ and
        $(0, 0)$; $\sigma^2 = 1 - m^2$ (see `sdekit.kernels.DiscreteVPKernel`).
        Discrete step n corresponds to time $t = nT/N$.
        """
        T = _check_T(T)
        a = torch.as_tensor(alphas_cumprod, dtype=F64)
        if a.dim() != 1 or a.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-d table with >= 2 entries, got shape {tuple(a.shape)}")
        if not bool(torch.isfinite(a).all()) or (a <= 0).any() or (a >= 1).any():
            raise ValueError(f"alphas_cumprod must lie in (0, 1); got {short(a)}")
        if (torch.diff(a) >= 0).any():
            raise ValueError("alphas_cumprod must be strictly decreasing")
        return cls(T=T, kernel=K.DiscreteVPKernel(a, T))

    def __repr__(self):
        return f"{type(self).__name__}(T={self.T}, kernel={self.kernel!r})"


class _BetaScheduleSDE(LinearSDE):
    """Shared constructor of the linear-beta processes (VP, sub-VP): validates the schedule."""

    _kernel_cls = None

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        b0, b1 = _check_range(beta_min, beta_max, "beta_min", "beta_max", strict=False)
        self.beta_min, self.beta_max = b0, b1
        super().__init__(T=T, kernel=self._kernel_cls(b0, b1, _check_T(T)))

    def __repr__(self):
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class VPSDE(_BetaScheduleSDE):
    r"""Variance-preserving SDE: $dx = -\frac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dW$,
    $\beta(t) = \beta_{min} + t(\beta_{max} - \beta_{min})$."""

    _kernel_cls = K.VPKernel


class SubVPSDE(_BetaScheduleSDE):
    r"""Sub-VP SDE: $dx = -\frac12\beta x\,dt + \sqrt{\beta(1 - e^{-2\int_0^t\beta})}\,dW$."""

    _kernel_cls = K.SubVPKernel


class VESDE(LinearSDE):
    r"""Variance-exploding SDE $dx = \sqrt{d\sigma_{ve}^2/dt}\,dW$,
    $\sigma_{ve}(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^{t/T}$.

    The kernel is exact from t = 0: $\sigma(t)^2 = \sigma_{ve}(t)^2 - \sigma_{min}^2$.
    score_sde's ``VESDE`` reports std $\sigma_{ve}(t)$, i.e. treats data as already carrying
    $\sigma_{min}$ noise; to compare, use $\sigma_{ve}^2 = \sigma^2 + \sigma_{min}^2$.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0):
        s0, s1 = _check_range(sigma_min, sigma_max, "sigma_min", "sigma_max", strict=True)
        self.sigma_min, self.sigma_max = s0, s1
        super().__init__(T=T, kernel=K.VEKernel(s0, s1, _check_T(T)))

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"


class CosineVPSDE(LinearSDE):
    r"""The cosine schedule (Nichol & Dhariwal 2021) as a VP SDE,
    $\bar\alpha(t) = \cos^2(\frac{\pi}{2}\frac{t+s}{1+s})/\cos^2(\frac{\pi}{2}\frac{s}{1+s})$.

    $\beta(t) = g^2 = \frac{\pi}{1+s}\tan(\frac{\pi}{2}\frac{t+s}{1+s})$ blows up at t = 1,
    so ``T`` must be < 1; the default 0.9946 is DPM-Solver's choice (log-SNR(T) ≈ −9.2).
    """

    def __init__(self, s: float = 0.008, T: float = 0.9946):
        s = check_positive(s, "s")
        T = _check_T(T)
        if T >= 1.0:
            raise ValueError(f"T must be < 1 for the cosine schedule (its drift is singular at t = 1); got T={T}")
        self.s = s
        super().__init__(T=T, kernel=K.CosineKernel(s, T))

    def __repr__(self):
        return f"CosineVPSDE(s={self.s}, T={self.T})"


class OrnsteinUhlenbeck(LinearSDE):
    r"""Ornstein–Uhlenbeck process $dx = -\theta x\,dt + \sigma\,dW$ (θ > 0, σ > 0)."""

    def __init__(self, theta: float = 1.0, sigma: float = 1.0, T: float = 1.0):
        self.theta = check_positive(theta, "theta")
        self.sigma = check_positive(sigma, "sigma")
        super().__init__(T=T, kernel=K.OUKernel(self.theta, self.sigma, _check_T(T)))

    def __repr__(self):
        return f"OrnsteinUhlenbeck(theta={self.theta}, sigma={self.sigma}, T={self.T})"
