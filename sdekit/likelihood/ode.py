r"""Exact log-likelihoods through the probability-flow ODE (instantaneous change of variables).

The probability-flow ODE $dx/dt = v(x, t)$ of a forward process transports the marginals
$p_t$; along one of its trajectories the density obeys (continuity equation)

$$
    \frac{d}{dt}\log p_t(x_t) = -\nabla\cdot v(x_t, t),
$$

so integrating the augmented state $(x_t, \Delta_t)$, $d\Delta/dt = \nabla\cdot v$,
$\Delta_{t_\varepsilon} = 0$, from $t_\varepsilon$ (data side) up to $T$ gives

$$
    \log p_{t_\varepsilon}(x) = \log p_T(z) + \Delta_T,\qquad z = x_T .
$$

`log_likelihood` does exactly this through `sdekit.solvers.integrate_ode` (which runs
the native integrator or torchdiffeq, see ``backend``), with an exact or Hutchinson divergence (`.divergence`), an
optional adjoint backward pass, and the prior of the process (or a better-matched Gaussian, see
`GaussianDataPrior`). The derivation, the estimator's variance and worked numbers are in
``docs/likelihood.md``.

**Precision.** The whole solver state is float64 even for float32 data: torchdiffeq flattens a
tuple state into one tensor (one dtype), and ``odeint_counted`` refuses mixed dtypes, so a
float64 $\Delta$ next to a float32 $x$ is not possible. The score (and the divergence)
are evaluated in the data's dtype — the network's precision — and cast to float64 for the
integrator, so $\Delta$ accumulates in float64 and the step-size control sees float64 states.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .._validation import check_positive, check_state, short
from .._defaults import LIKELIHOOD_T_EPS
from .._gaussian import gaussian_log_prob
from ..dynamics import evaluate_score
from ..processes import SDE, LinearSDE
from ..solvers.integrate import ODE_BACKENDS, ODE_METHODS, _native_blockers, integrate_ode, resolve_norm
from ..solvers.stats import CountingFunction, SolverError, SolverStats
from .divergence import (
    PROBES,
    _counter_probes,
    _element_keys,
    _row_keys,
    NotDifferentiableError,
    draw_probes,
    exact_divergence_of,
    hutchinson_divergence_of,
    lowrank_cv_divergence_of,
    CV_SKETCH,
)

__all__ = ["log_likelihood", "LikelihoodResult", "GaussianDataPrior", "DIVERGENCES"]

F64 = torch.float64
DIVERGENCES = ("auto", "exact", "hutchinson")
BACKENDS = ODE_BACKENDS
#: error norms: "independent" = per-sample stepping (native integrator), see docs/solvers.md
NORMS = ("auto", "batch", "per-sample", "independent")


# ------------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------------
@dataclass
class LikelihoodResult:
    r"""What `log_likelihood` computed (all log densities in nats, float64, shape ``(B,)``).

    Attributes
    ----------
    log_prob:
        $\log p_{t_\varepsilon}(x)$ per sample: ``prior_log_prob + delta_log_prob``.
    prior_log_prob:
        $\log p_T(z)$ under the prior used.
    delta_log_prob:
        $\Delta_T = \int_{t_\varepsilon}^T \nabla\cdot v\,dt$ (mean over probes for Hutchinson).
    z:
        The ODE state at ``T``, shaped and typed like ``x``.
    stderr:
        Standard error of ``log_prob`` from the probes: ``std(probe estimates) / sqrt(n_probes)``
        (sample std, ``n_probes - 1`` degrees of freedom). ``0`` for the exact divergence (up to
        the solver error, which it does not include). ``+inf`` for a single Hutchinson probe: the
        estimator's spread cannot be estimated from one draw, and ``inf`` says "no information"
        where ``0`` would claim exactness and NaN would poison sums.
    stats:
        `SolverStats` of the forward solve: ``nfe`` = score
        evaluations made by the solver (each is one forward pass of the score followed by one
        batched vector–Jacobian product, ≈ 2–3× the cost of a forward pass alone),
        ``steps``/``accepted``/``rejected``, ``wall_time``; ``extra`` holds ``divergence``,
        ``vectors_per_eval`` (VJP vectors per evaluation: ``d`` exact, ``n_probes`` Hutchinson),
        ``score_calls`` (counted at the score itself; equals ``nfe``), ``preflight_evals``
        (the one-sample differentiability check, not in ``nfe``), ``first_step``, ``t_min``,
        ``t_max``, ``adjoint`` (live counts of the backward pass, filled by ``backward()``) and
        ``precondition`` (whether the preconditioned state was integrated).
    divergence:
        ``"exact"`` or ``"hutchinson"`` (what ``"auto"`` resolved to).
    n_probes:
        Hutchinson probes per sample (0 for the exact divergence).
    probe:
        ``"rademacher"`` / ``"gaussian"`` (None for exact).
    delta_per_probe:
        ``(B, n_probes)`` per-probe $\Delta_T$ (``(B, 1)`` for exact).
    dim:
        Data dimension ``d`` (elements per sample).
    t_eps:
        The start time $t_\varepsilon$.
    """

    log_prob: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    z: torch.Tensor
    stderr: torch.Tensor
    stats: SolverStats
    divergence: str
    n_probes: int
    probe: Optional[str]
    delta_per_probe: torch.Tensor
    dim: int
    t_eps: float

    @property
    def nats_per_dim(self) -> torch.Tensor:
        """``log_prob / dim`` (the negative of this, divided by ln 2, is bits/dim for continuous data)."""
        return self.log_prob / self.dim

    def confidence_interval(self, level: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample interval ``log_prob ± q * stderr`` for the probe randomness only.

        ``q`` is the Student-t quantile with ``n_probes - 1`` degrees of freedom (the stderr is
        estimated from the same probes; e.g. ``q = 2.13`` for 16 probes against 1.96 for a known
        variance). Exact divergence: a zero-width interval; one probe: ``(-inf, inf)``.
        """
        level = float(level)
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level!r}")
        if self.divergence == "exact":
            return self.log_prob.clone(), self.log_prob.clone()
        if self.n_probes < 2:
            inf = torch.full_like(self.log_prob, math.inf)
            return -inf, inf
        from scipy import stats as _st

        q = float(_st.t.ppf(0.5 + level / 2.0, self.n_probes - 1))
        return self.log_prob - q * self.stderr, self.log_prob + q * self.stderr


# ------------------------------------------------------------------------------------------------
# priors
# ------------------------------------------------------------------------------------------------
class GaussianDataPrior:
    r"""The exact time-``T`` marginal of Gaussian data $N(\mu, \mathrm{diag}(v))$ under a linear SDE.

    $x_T = m(T)x_0 + \sigma(T)\varepsilon$ gives $p_T = N(m\mu,\ m^2 v + \sigma^2)$
    elementwise. Used as the prior in `log_likelihood` it replaces the process's
    $N(0, \sigma(T)^2 I)$, which ignores the data: harmless for VP ($m(T) \approx 0$),
    but a VE process with $\sigma_{max}$ not large against the data scale leaves
    $p_T$ far from $N(0, \sigma_{max}^2)$ and biases every log-likelihood by
    $\log p_T(z) - \log N(z; 0, \sigma_{max}^2)$. With the data's mean and variance the
    mismatch shrinks to the non-Gaussianity of $p_T$ (zero for Gaussian data).

    Parameters
    ----------
    mean:
        A number or a tensor broadcastable to one sample's shape (e.g. per-dimension moments
        from `from_data`). A tensor that requires grad stays differentiable.
    var:
        The variance, positive; a number or a tensor like ``mean``.
    """

    def __init__(self, mean: Union[float, torch.Tensor] = 0.0, var: Union[float, torch.Tensor] = 1.0):
        try:  # tensors keep their autograd graph: learnable prior moments get gradients
            self.mean = torch.as_tensor(mean).to(F64)
            self.var = torch.as_tensor(var).to(F64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"mean and var must be numbers or tensors, got {mean!r}, {var!r}") from e
        if not bool(torch.isfinite(self.mean.detach()).all()):
            raise ValueError(f"mean must be finite, got {short(self.mean)}")
        if not bool(torch.isfinite(self.var.detach()).all()) or bool((self.var.detach() <= 0).any()):
            raise ValueError(f"var must be finite and positive, got {short(self.var)}")

    @classmethod
    def from_data(cls, data: torch.Tensor, per_dim: bool = True) -> "GaussianDataPrior":
        """Moments of a data set ``(N, ...)``: per-dimension (default) or one scalar mean/variance."""
        data = check_state(data, "data").to(F64)
        if data.shape[0] < 2:
            raise ValueError("data must hold at least 2 samples to estimate a variance")
        if per_dim:
            return cls(data.mean(0), data.var(0).clamp_min(1e-12))
        return cls(float(data.mean()), max(float(data.var()), 1e-12))

    def bind(self, sde: LinearSDE) -> Callable[[torch.Tensor], torch.Tensor]:
        """``log_prob(z)`` of the marginal at ``sde.T`` (needs a `LinearSDE`)."""
        if not isinstance(sde, LinearSDE):
            raise TypeError(f"GaussianDataPrior pushes Gaussian data through a linear SDE's kernel; "
                            f"got {type(sde).__name__}")
        T = torch.tensor(sde.T, dtype=F64)
        m, s2 = float(sde.kernel.m(T)), float(sde.kernel.sigma2(T))

        def log_prob(z: torch.Tensor) -> torch.Tensor:
            mean = (m * self.mean).to(device=z.device)
            var = (m * m * self.var + s2).to(device=z.device)
            zz = z.to(F64)
            try:
                lp = gaussian_log_prob(torch.broadcast_to(zz, torch.broadcast_shapes(zz.shape, mean.shape,
                                                                                    var.shape)), mean, var,
                                       event_dims=zz.dim() - 1)
            except RuntimeError as e:
                raise ValueError(f"GaussianDataPrior mean {tuple(self.mean.shape)} / var {tuple(self.var.shape)} "
                                 f"do not broadcast to the data shape {tuple(z.shape[1:])}") from e
            return lp

        return log_prob

    def __repr__(self):
        return f"GaussianDataPrior(mean={short(self.mean)}, var={short(self.var)})"


def _resolve_prior(prior, sde: SDE) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A ``log_prob(z) -> (B,)`` callable and a description."""
    if prior is None or (isinstance(prior, str) and prior == "sde"):
        if isinstance(sde, LinearSDE):
            return sde.prior_log_prob, f"N(0, sigma(T)^2 I), sigma(T) = {sde.prior_std():.6g}"
        if getattr(sde, "prior", None) is not None:
            return sde.prior_log_prob, repr(sde.prior)
        raise ValueError("a general (non-linear) SDE has no closed-form marginal at T, so log_likelihood "
                         "cannot pick a prior: pass prior=<object with log_prob(z) -> (B,)> (the density "
                         "of x_T), or build the SDE with SDE(..., prior=...)")
    if isinstance(prior, str):
        if prior == "gaussian_data":
            raise ValueError("prior='gaussian_data' needs the data's moments: pass "
                             "prior=GaussianDataPrior(mean, var) (or GaussianDataPrior.from_data(train_x)), "
                             "or prior=('gaussian', mean, var)")
        raise ValueError(f"prior must be None/'sde', a GaussianDataPrior, ('gaussian', mean, var), an object "
                         f"with log_prob(z), or a callable z -> (B,); got {prior!r}")
    if isinstance(prior, tuple):
        if len(prior) != 3 or prior[0] != "gaussian":
            raise ValueError(f"a tuple prior must be ('gaussian', mean, var); got {short(prior)}")
        prior = GaussianDataPrior(prior[1], prior[2])
    if isinstance(prior, GaussianDataPrior):
        return prior.bind(sde), repr(prior)
    lp = getattr(prior, "log_prob", None)
    if callable(lp):
        return lp, repr(prior)
    if callable(prior):
        return prior, repr(prior)
    raise TypeError(f"prior must be an object with log_prob(z) or a callable z -> (B,), got {type(prior).__name__}")


# ------------------------------------------------------------------------------------------------
# the augmented vector field
# ------------------------------------------------------------------------------------------------
class _AugmentedField(torch.nn.Module):
    r"""``(t, (x, Δ)) -> (v, ∇·v)``: PF velocity and its divergence (exact ``(B, 1)`` or per probe
    ``(B, K)``), from one score evaluation and one batched VJP. The state is float64; the field is
    evaluated in the data's dtype. Outputs keep an autograd graph only when grad mode is on and a
    gradient is wanted (``needs_graph``) — during a differentiable solve or the adjoint backward
    pass; otherwise they are detached and the VJP builds no second-order graph.

    For a linear SDE the velocity is affine in the score, $v = a(t)x + c(t)s(x,t)$
    (`affine_coefficients`), so
    $\nabla\cdot v = a\,d + c\,\nabla\cdot s$: the VJPs run through the score alone and the
    linear part is exact (for Rademacher probes $\varepsilon^\top aI\varepsilon = a\,d$
    identically, so the estimator is unchanged; for Gaussian probes its variance drops). The
    linear part is also combined in float64."""

    def __init__(self, pf, dtype: torch.dtype, mode: str, probes: Optional[torch.Tensor], needs_graph: bool,
                 shape: Tuple[int, ...] = ()):
        super().__init__()
        self.pf = pf
        self.dtype = dtype
        self.mode = mode
        self.probes = probes
        self.needs_graph = needs_graph
        self.affine = getattr(pf.sde, "is_linear", False)
        self.shape = tuple(shape)  # the data's shape
        self.d = math.prod(self.shape[1:])

    def _divergence(self, out: torch.Tensor, xu: torch.Tensor, graph: bool, index=None) -> torch.Tensor:
        if self.mode == "exact":
            return exact_divergence_of(out, xu, create_graph=graph).unsqueeze(1)
        probes = self.probes if index is None else self.probes[:, index]  # per-sample stepping: the running rows
        return hutchinson_divergence_of(out, xu, probes, create_graph=graph)

    def forward(self, t: torch.Tensor, state: Tuple[torch.Tensor, torch.Tensor], index=None):
        # index (per-sample stepping, norm="independent"): the running samples' rows, t their (n,) times
        x = state[0]
        graph = self.needs_graph and torch.is_grad_enabled()
        with torch.enable_grad():
            xin = x if (graph and x.requires_grad) else x.detach().requires_grad_(True)
            xu = xin.to(self.dtype)
            if self.affine:
                t64 = t.to(F64)
                s = evaluate_score(self.pf.score_fn, xu, t64)
                div_s = self._divergence(s, xu, graph, index)
            else:
                v = self.pf._drift(xu, t)
                div = self._divergence(v, xu, graph, index)
        if self.affine:
            a, c = self.pf.affine_coefficients(t64)
            ax, cx = a, c
            if t64.dim() == 1:  # per-sample times (norm="independent"): one coefficient per row
                a, c = a.unsqueeze(1), c.unsqueeze(1)  # for (n, K) divergences
                ax, cx = (u.reshape((-1,) + (1,) * (x.dim() - 1)) for u in (a, c))  # for x's rank
            xv = xin if graph else x
            sv = s if graph else s.detach()
            v = ax * xv + cx * sv.to(F64)
            div = a * self.d + c * (div_s if graph else div_s.detach()).to(F64)
            return v, div
        v, div = v.to(F64), div.to(F64)
        if not graph:
            v, div = v.detach(), div.detach()
        return v, div


def _probe_divergence(mode: str, s: torch.Tensor, xu: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Per-probe divergence columns: Hutchinson ``(B, K)``, or for ``mode="cv"`` (the targeted
    mode's control variate, `lowrank_cv_divergence_of`) ``(B, 2K)``: corrected, then plain."""
    if mode == "cv":
        return lowrank_cv_divergence_of(s, xu, probes, CV_SKETCH)
    return hutchinson_divergence_of(s, xu, probes)


#: resampled probes are hashed for up to this many calls at once, and for at most this many entries
_PROBE_BLOCK = 16
_PROBE_BLOCK_ENTRIES = 1 << 20


class _FlatLinearField:
    r"""The augmented field of a linear SDE on one flat float64 state ``[u | δ]`` ``(B, d + K)``,
    for the native integrator (no gradient through the solve).

    The state is the *preconditioned* data coordinate
    $u = (x - m(t)\mu)/\nu(t)$, $\nu^2 = m^2 c^2 + \sigma^2$ (per dimension), whose velocity
    $\dot u = -\frac{g^2}{2\nu}\big(s(x, t) + u/\nu\big)$ vanishes for Gaussian data
    $N(\mu, c^2)$, and $\dot\delta = \nabla_u\cdot\dot u = -\frac{g^2}{2}\big(\nabla\cdot s +
    \sum_i \nu_i^{-2}\big)$ (derivation and the $\log|\det|$ term: `log_likelihood`,
    ``docs/likelihood.md``). With preconditioning off it is the plain PF field
    $\dot x = f x - \frac{g^2}{2} s$, $\dot\Delta = f d - \frac{g^2}{2}\nabla\cdot s$.

    Per evaluation: the kernel coefficients as Python floats (computed for all stage times of a
    step at once when ``t`` is a view of the integrator's stage-time vector, else at ``t``), one
    cast of the state to the data's dtype, the score and its VJP(s), and two or three passes that
    write straight into one new ``(B, d + K)`` output (no tuple state, no ``cat``, no float64
    copies of the score inside the autograd graph). Scalar moments (the default) keep $\nu$ a
    float; per-dimension moments make it a ``(d,)`` tensor.
    """

    def __init__(self, sde: LinearSDE, score: Callable, x: torch.Tensor, mode: str, probes: Optional[torch.Tensor],
                 K: int, mean: Optional[torch.Tensor], var: Optional[torch.Tensor],
                 resample: Optional[Tuple[int, str]] = None):
        self.kernel, self.score, self.mode, self.probes, self.K = sde.kernel, score, mode, probes, K
        self.shape = tuple(x.shape)
        self.B, self.d = self.shape[0], math.prod(self.shape[1:])
        self.dtype = x.dtype
        # resample_probes: (seed, probe kind). Every running row is evaluated at every call, so a
        # row's evaluation count is the solve's call count: the probes of the next few calls are
        # hashed for all rows at once (a block; amortises the hash's ~30 small ops)
        self.resample = resample if mode == "hutchinson" else None
        if self.resample is not None:
            self._calls = 0
            self._stream = _row_keys(resample[0], torch.arange(self.B, device=x.device))
            self._keys = _element_keys(K * self.d, resample[1], x.device)
            self._block_len = max(1, min(_PROBE_BLOCK, _PROBE_BLOCK_ENTRIES // max(1, self.B * K * self.d)))
            self._block, self._block_start = None, 0
        self.pre = var is not None
        self.scalar = False
        if self.pre:
            mean, var = mean.to(F64), var.to(F64)
            if mean.dim() == 0 and var.dim() == 0:
                self.scalar, self.mean, self.var = True, float(mean), float(var)
            else:  # per-dimension moments, flattened to (d,)
                self.mean = torch.broadcast_to(mean, self.shape[1:]).reshape(self.d).to(x.device).clone()
                self.var = torch.broadcast_to(var, self.shape[1:]).reshape(self.d).to(x.device).clone()
        self._base: Optional[torch.Tensor] = None  # the stage-time vector whose coefficients are cached
        self._coef_rows: list = []

    def _probes(self, index: Optional[torch.Tensor]) -> torch.Tensor:
        """The probes of this evaluation for the rows ``index`` (all rows when ``None``): the fixed
        ones, or with ``resample_probes`` fresh ones keyed by (row, its evaluation count)."""
        if self.resample is None:
            return self.probes if index is None else self.probes[:, index]
        c = self._calls
        self._calls += 1
        if self._block is None or not self._block_start <= c < self._block_start + self._block_len:
            M, B = self._block_len, self.B
            counts = torch.arange(c, c + M, device=self._stream.device).repeat_interleave(B)
            blk = _counter_probes(self._stream.repeat(M), counts, self._keys, self.K, self.shape[1:],
                                  self.resample[1], self.dtype)  # (K, M * B, ...)
            self._block, self._block_start = blk.reshape((self.K, M) + self.shape), c
        out = self._block[:, c - self._block_start]
        return out if index is None else out[:, index]

    def _coefficients(self, t: torch.Tensor) -> Tuple[float, float, float, float]:
        """``m, σ², f, g²`` at ``t`` as floats, from the kernel's own formulas. The native integrator
        passes each stage time as a 0-d view of one stage-time vector per step: its coefficients
        are computed for the whole vector at the first stage (one vectorised call) and looked up
        for the others (the vector is held, so it cannot be recycled while cached)."""
        base = t._base
        if base is not None and base.dim() == 1 and t.dim() == 0 and base.dtype == F64:
            if base is not self._base:
                k = self.kernel
                self._coef_rows = torch.stack([k.m(base), k.sigma2(base), k.f(base), k.g2(base)], 1).tolist()
                self._base = base
            return self._coef_rows[t.storage_offset() - base.storage_offset()]
        k = self.kernel
        return float(k.m(t)), float(k.sigma2(t)), float(k.f(t)), float(k.g2(t))

    def _nu(self, m: float, s2: float):
        r"""$\nu = \sqrt{m^2 c^2 + \sigma^2}$: a float (scalar moments) or a ``(d,)`` tensor."""
        if self.scalar:
            return math.sqrt(m * m * self.var + s2)
        return (self.var * (m * m) + s2).sqrt_()

    def to_x(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""$x = \nu u + m\mu$ (the identity without preconditioning)."""
        if not self.pre:
            return u
        m, s2, _, _ = self._coefficients(t)
        return u * self._nu(m, s2) + self.mean * m

    def from_x(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""$u = (x - m\mu)/\nu$."""
        if not self.pre:
            return x
        m, s2, _, _ = self._coefficients(t)
        return (x - self.mean * m) / self._nu(m, s2)

    def log_nu_sum(self, t: torch.Tensor) -> float:
        r"""$\sum_i \log\nu_i(t)$ (0 without preconditioning)."""
        if not self.pre:
            return 0.0
        m, s2, _, _ = self._coefficients(t)
        nu = self._nu(m, s2)
        return self.d * math.log(nu) if self.scalar else float(nu.log().sum())

    def _per_sample(self, t: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The same field with one time per row (per-sample stepping, ``norm="independent"``):
        ``t`` is ``(n,)``, ``y`` the ``(n, d + K)`` running rows, ``index`` their positions in the
        batch (for their Hutchinson probes)."""
        n, d = y.shape[0], self.d
        k = self.kernel
        t64 = t.to(F64)
        m, s2, f, g2 = (v.reshape(n, 1) for v in (k.m(t64), k.sigma2(t64), k.f(t64), k.g2(t64)))
        c = -0.5 * g2
        u = y[:, :d]
        nu = None
        if not self.pre:
            xin = u
        else:
            nu = torch.sqrt(m * m * self.var + s2)  # (n, 1) for scalar moments, (n, d) per dimension
            xin = u * nu + m * self.mean
        with torch.enable_grad():
            xu = xin.to(self.dtype).reshape((n,) + self.shape[1:]).detach().requires_grad_(True)
            s = self.score(xu, t.to(self.dtype))
            if not isinstance(s, torch.Tensor) or s.shape != xu.shape:
                raise ValueError(f"score(x, t) must return a tensor shaped like x {tuple(xu.shape)}, got "
                                 f"{getattr(s, 'shape', type(s).__name__)}")
            if self.mode == "exact":
                div = exact_divergence_of(s, xu).unsqueeze(1)
            else:
                div = _probe_divergence(self.mode, s, xu, self._probes(index))
        s = s.detach().reshape(n, d).to(F64)
        div = div.detach().to(F64)
        if not self.pre:  # x' = f x - (g²/2) s;  Δ' = f d - (g²/2) div s
            return torch.cat([f * u + c * s, f * d + c * div], 1)
        inv = nu.reciprocal()  # u' = -(g²/(2ν)) (s + u/ν);  δ' = -(g²/2) (div s + Σ 1/ν²)
        trace = d * inv.square() if self.scalar else inv.square().sum(1, keepdim=True)
        return torch.cat([(c * inv) * (s + u * inv), c * (div + trace)], 1)

    def __call__(self, t: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if t.dim() == 1:  # per-sample stepping: one time per running row
            return self._per_sample(t, y, index)
        B, d = self.B, self.d
        m, s2, f, g2 = self._coefficients(t)
        c = -0.5 * g2
        u = y[:, :d]
        if not self.pre:
            xin = u
        elif self.scalar:
            nu = math.sqrt(m * m * self.var + s2)
            xin = u * nu if self.mean == 0.0 else torch.add(u, m * self.mean / nu).mul_(nu)
        else:
            nu = self._nu(m, s2)
            xin = torch.addcmul(self.mean * m, u, nu)
        with torch.enable_grad():
            xu = xin.to(self.dtype).reshape(self.shape).detach().requires_grad_(True)
            s = self.score(xu, t.to(self.dtype).expand(B))
            if not isinstance(s, torch.Tensor) or s.shape != xu.shape:
                raise ValueError(f"score(x, t) must return a tensor shaped like x {self.shape}, got "
                                 f"{getattr(s, 'shape', type(s).__name__)}")
            if self.mode == "exact":
                div = exact_divergence_of(s, xu).unsqueeze(1)
            else:
                div = _probe_divergence(self.mode, s, xu, self._probes(None))
        out = torch.empty(B, d + self.K, dtype=F64, device=y.device)
        ox, od = out[:, :d], out[:, d:]
        s = s.detach().reshape(B, d)
        if not self.pre:  # x' = f x - (g²/2) s;  Δ' = f d - (g²/2) div s
            torch.mul(s, c, out=ox)
            if f != 0.0:
                ox.add_(u, alpha=f)
            torch.mul(div.detach(), c, out=od)
            if f != 0.0:
                od.add_(f * d)
        elif self.scalar:  # u' = -(g²/(2ν)) (s + u/ν);  δ' = -(g²/2) (div s + d/ν²)
            torch.add(s, u, alpha=1.0 / nu, out=ox)
            ox.mul_(c / nu)
            torch.add(div.detach(), d / (nu * nu), out=od)
            od.mul_(c)
        else:
            inv = nu.reciprocal_()
            torch.addcmul(s, u, inv, out=ox)
            ox.mul_(inv.mul(c))
            torch.add(div.detach(), float(inv.square().sum()), out=od)
            od.mul_(c)
        return out


def _graph_leaves(out: torch.Tensor, exclude: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Leaf tensors requiring grad that ``out`` depends on (its AccumulateGrad nodes), except ``exclude``."""
    seen, found, ids = set(), [], {id(exclude)}
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor) and id(var) not in ids:
            ids.add(id(var))
            found.append(var)
        stack.extend(n for n, _ in node.next_functions)
    return tuple(found)


def _preflight(score: Callable, x: torch.Tensor, T: float) -> Tuple[torch.Tensor, ...]:
    """One score evaluation on ``x[:1]`` at ``T``: shape, finiteness, differentiability in x.

    Returns the tensors requiring grad that the score depends on (its parameters)."""
    x1 = x[:1].detach().requires_grad_(True)
    with torch.enable_grad():
        try:
            s = evaluate_score(score, x1, torch.tensor(T, dtype=F64, device=x.device))
        except (ValueError, TypeError) as e:
            raise type(e)(f"score(x, t) failed on the first sample x[:1] (x has shape {tuple(x.shape)}): {e}") from e
        if not bool(torch.isfinite(s.detach()).all()):
            raise ValueError(f"score(x[:1], T={T}) returned non-finite values; the probability-flow ODE "
                             f"cannot be integrated")
        if not s.requires_grad:
            raise NotDifferentiableError(
                "score(x, t) is not differentiable w.r.t. x by autograd (it returned a tensor without an "
                "autograd graph: detached, computed with numpy, or under torch.no_grad()); the divergence "
                "of the probability-flow velocity (exact or Hutchinson) and the adjoint need the score's "
                "Jacobian by autograd. Write the score with torch operations (or wrap numpy code in a "
                "torch.autograd.Function with a backward)")
        params = _graph_leaves(s, x1)
        (g,) = torch.autograd.grad(s.sum(), x1, allow_unused=True)
    if g is None:
        raise NotDifferentiableError(
            "score(x, t) does not depend on x through autograd (its graph does not reach x: the input was "
            "detached or converted); the divergence needs d score / dx by autograd")
    return params


# ------------------------------------------------------------------------------------------------
# log_likelihood
# ------------------------------------------------------------------------------------------------
#: the accuracy-targeted mode's entry, ``(sde, score, x, target_stderr, arguments) -> result``:
#: `sdekit.likelihood.targeted` registers it on import (it builds on this module, which therefore
#: does not import it: no import cycle); the package's ``__init__`` imports both
_TARGETED: list = [None]


def _check_bool(v, name):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


def log_likelihood(sde: SDE, score: Callable, x: torch.Tensor, *, t_eps: float = LIKELIHOOD_T_EPS, method: str = "dopri5",
                   rtol: float = 1e-5, atol: float = 1e-5, divergence: str = "auto", probe: str = "rademacher",
                   n_probes: int = 1, generator: Optional[torch.Generator] = None, adjoint: bool = False,
                   norm: str = "auto", prior: Any = None, exact_dim_limit: int = 16,
                   max_steps: Optional[int] = None, params: Optional[Sequence[torch.Tensor]] = None,
                   options: Optional[Dict[str, Any]] = None, backend: str = "auto",
                   precondition: Union[bool, str] = "auto", data_moments: Any = None,
                   target_stderr: Optional[float] = None, resample_probes: bool = False) -> LikelihoodResult:
    r"""Log-likelihood $\log p_{t_\varepsilon}(x)$ (nats per sample) by the probability-flow ODE.

    Integrates $dx/dt = v$, $d\Delta/dt = \nabla\cdot v$ from $t_\varepsilon$ to
    $T$, where $v = f - \frac12 GG^\top s$ is the PF velocity of ``sde`` with the
    score ``s`` (`SDE.probability_flow`; $v = f(t)x - \frac12 g(t)^2 s$ for a linear
    SDE), and returns $\log p_T(z) + \Delta_T$.

    Parameters
    ----------
    sde:
        Any `SDE`. Linear SDEs bring their prior $N(0, \sigma(T)^2 I)$; a
        general SDE needs ``prior`` (or ``SDE(..., prior=...)``); with state-dependent noise it
        also needs a differentiable ``diffusion_divergence``.
    score:
        ``score(x, t) -> tensor`` shaped like ``x``, differentiable in ``x`` by autograd, treating
        samples independently. An ``nn.Module`` or a closure — its parameters are found from the
        autograd graph of one evaluation (see ``params``).
    x:
        Data ``(B, ...)``, float32 or float64, finite.
    t_eps:
        Start time in ``(0, T)``; the result is the density of $p_{t_\varepsilon}$ (the data
        convolved with the kernel at $t_\varepsilon$).
    method:
        An adaptive torchdiffeq method (``dopri5``, ``dopri8``, ``bosh3``, ``adaptive_heun``,
        ``fehlberg2``); the state is ``(x, Δ)`` in float64.
    rtol:
        Relative tolerance of the solve.
    atol:
        Absolute tolerance of the solve.
    divergence:
        ``"exact"`` (``d`` vector–Jacobian products per evaluation, batched), ``"hutchinson"``
        (``n_probes`` random probes, unbiased), or ``"auto"``: exact iff ``d <= exact_dim_limit``.
    probe:
        Hutchinson probes: ``"rademacher"`` (±1, lower variance) or ``"gaussian"``.
    n_probes:
        Probes per sample, drawn ONCE per solve and held fixed along the trajectory (a fixed
        probe keeps the ODE smooth for the adaptive solver). All probes share each function
        evaluation (one batched VJP). The per-probe integrals give ``stderr``.
    generator:
        The `torch.Generator` the probes are drawn from.
    adjoint:
        Backpropagate with the adjoint ODE (memory O(1) in the number of steps): gradients of
        ``log_prob`` w.r.t. ``x`` and the score's parameters. Uses the seminorm (the backward
        error control ignores the parameter-gradient components) with ``norm="batch"``.
    norm:
        ``"auto"`` (default): per-sample stepping (``"independent"``) wherever the native
        integrator runs the solve (no gradient wanted, ``dopri5``/``bosh3``), else
        ``"per-sample"`` (``"batch"`` with the adjoint); see `sdekit.solvers.integrate.resolve_norm`.
        ``"independent"``: each sample has its own step size, error test and end, so its
        log-likelihood and NFE do not depend on the rest of the batch (Hutchinson probes stay tied
        to their sample; ``stats.nfe_per_sample`` etc. hold the per-sample counts). ``"batch"``:
        one step for the batch from the RMS error over the batch (torchdiffeq's; the worst
        sample's error grows with the batch size). ``"per-sample"``: one step sized for the worst
        sample.
    prior:
        ``None`` (the process's own prior), a `GaussianDataPrior` /
        ``("gaussian", mean, var)`` (Gaussian data pushed to T exactly), or any object with
        ``log_prob(z) -> (B,)`` or callable ``z -> (B,)`` (``z`` arrives in float64).
    exact_dim_limit:
        Largest ``d`` for which ``"auto"`` picks the exact divergence and ``"exact"`` is allowed
        (raise it deliberately to run exact at larger ``d``; the cost grows like ``d``).
    max_steps:
        Raise `SolverError` after this many attempted steps.
    params:
        Tensors whose gradients are wanted (default: every leaf requiring grad found in the
        autograd graph of one score evaluation — an ``nn.Module``'s parameters or tensors a
        closure captures). Decides whether the solve keeps a graph and what the adjoint
        differentiates.
    options:
        Extra solver options (``first_step``, ``max_step``, ``safety``, ``ifactor``, ``dfactor``;
        the torchdiffeq backend accepts its other options too).
    backend:
        Which integrator runs the solve (chosen by `sdekit.solvers.integrate_ode`).
        ``"native"``: `sdekit.solvers.adaptive.integrate_adaptive`
        — the same Dormand–Prince / Bogacki–Shampine steps, controller and NFE as torchdiffeq, with
        less per-step bookkeeping (faster for cheap scores and small states); available for
        ``dopri5`` and ``bosh3`` when no gradient is needed. ``"torchdiffeq"``:
        `odeint_counted` (any adaptive method,
        backpropagation through the solver, ``adjoint=True``). ``"auto"`` (default): native where
        it applies on the CPU, else torchdiffeq (on CUDA the native path works but has not been
        timed yet, so it is opt-in there). ``stats.backend`` says which ran.
    precondition:
        Integrate the Gaussian-preconditioned state $u = (x - m(t)\mu)/\nu(t)$ instead of $x$
        (see Notes). ``"auto"`` (default): on for a drift-free (variance-exploding, $f \equiv 0$)
        process when the solve runs the native linear path (a `LinearSDE`, ``dopri5``/``bosh3``,
        no gradient or adjoint, backend ``"auto"`` on the CPU or ``"native"``); off otherwise.
        ``True``: on wherever the native linear path runs (``ValueError`` where it cannot).
        ``False``: integrate $x$. ``stats.extra["precondition"]`` says whether it ran. Measured
        (``benchmarks/likelihood_ve.py``, exact mixture score, tol 1e-5): VE 116 → 80 NFE with
        3.7× lower mean error at d = 2 (68 with the data's moments), 140 → 134 at d = 64 (128);
        on VP and cosine VP the default moments make it the identity ($m^2 + \sigma^2 = 1$);
        sub-VP 62 → 50 NFE but 4× the error at d = 2 — hence only VE-type processes by default.
    data_moments:
        ``(mean, var)`` per dimension (numbers or tensors broadcastable to one sample's shape) or a
        `GaussianDataPrior`: the $\mu, c^2$ of the preconditioning — e.g. the training set's
        moments (`GaussianDataPrior.from_data`). Default: the moments of ``prior`` when it is a
        `GaussianDataPrior` / ``("gaussian", mean, var)``, else $\mu = 0$, $c^2 = 1$ (data
        standardised, the convention of the built-in processes; for VE this is
        $u = x/\sqrt{1 + \sigma^2}$, EDM's input scaling). Never estimated from the batch: a
        sample's result must not depend on what else is in its batch. Any moments give the same
        log-density up to the solver error; better ones give fewer steps.
    target_stderr:
        Accuracy-targeted mode (`sdekit.likelihood.targeted`): the wanted standard error of each
        sample's ``log_prob`` in **nats per dimension** ($\varepsilon$; $\varepsilon d$ nats per
        sample). The tolerance ($\min(10^{-3}, \varepsilon/10)$), each sample's estimator (exact
        when $d \le$ ``exact_dim_limit``; else Hutchinson, or exact where that is cheaper for it;
        `targeted_log_likelihood` also offers a low-rank control variate) and its number of
        probes (from a pilot solve's per-sample probe variance) are chosen; ``stderr`` is the measured probe error plus
        the measured solver-error scale, and
        ``stats.extra["targeted"]`` records the plan (pilot included in ``nfe``). Incompatible with
        ``n_probes``, ``rtol``/``atol`` other than the defaults, ``divergence`` other than
        ``"auto"``, ``norm`` other than ``"auto"`` and ``adjoint=True`` (``ValueError``).

    Returns
    -------
    LikelihoodResult

    Raises
    ------
    ValueError, TypeError
        Bad input (non-finite data, ``t_eps`` outside ``(0, T)``, exact divergence above
        ``exact_dim_limit``, a score that is not differentiable in ``x``), before the solve.
    SolverError
        The solve failed (non-finite state, ``max_steps``), with the step, time and partial stats.

    Notes
    -----
    **Preconditioned state.** With per-dimension constants $\mu, c^2$ let
    $\nu(t)^2 = m(t)^2c^2 + \sigma(t)^2$ (the marginal variance of Gaussian data $N(\mu, c^2)$)
    and $u = (x - m\mu)/\nu$. From $\dot x = f x - \frac{g^2}{2}s$, $\dot m = f m$ and
    $\frac{d}{dt}\nu^2 = 2f\nu^2 + g^2$ (as $\frac{d}{dt}\sigma^2 = 2f\sigma^2 + g^2$),

    $$
        \dot u = \frac{\dot x - \dot m\mu - \dot\nu u}{\nu}
                = -\frac{g^2}{2\nu}\Big(s(x, t) + \frac{u}{\nu}\Big),
    $$

    i.e. the score minus the score $-(x - m\mu)/\nu^2$ of the Gaussian with the data's
    moments: zero for Gaussian data, small and slowly varying for data near it, so the adaptive
    solver takes fewer steps (for VE, $x$ itself grows like $\sigma$ and its relative error control
    loosens; $u$ stays $O(1)$). The divergence in $u$ is
    $\nabla_u\cdot\dot u = -\frac{g^2}{2}\big(\nabla_x\cdot s + \sum_i\nu_i^{-2}\big)
    = \nabla_x\cdot v - \sum_i\dot\nu_i/\nu_i$. Since $x = \nu u + m\mu$ is a per-dimension affine map,
    $\log p^x_t(x) = \log p^u_t(u) - \sum_i\log\nu_i(t)$ (the $\log|\det|$ of the map), and
    integrating $\delta = \int\nabla_u\cdot\dot u\,dt$ from $t_\varepsilon$ to $T$,

    $$
        \log p_{t_\varepsilon}(x) = \log p_T(x_T) + \delta_T
            + \sum_i \log\frac{\nu_i(T)}{\nu_i(t_\varepsilon)},\qquad x_T = \nu(T)u_T + m(T)\mu .
    $$

    ``delta_log_prob`` reports $\delta_T + \sum_i\log(\nu_i(T)/\nu_i(t_\varepsilon))$, which is
    $\int\nabla_x\cdot v\,dt$ as without preconditioning. The Hutchinson estimate is of
    $\nabla_x\cdot s$ in both cases (the $\nu$ terms are exact), so its variance is unchanged.

    **Resampled probes.** A Runge–Kutta step integrates the log-density change as the quadrature
    $\Delta_{n+1} = \Delta_n + h\sum_j b_j\,\widehat{\nabla\cdot v}(x_j, t_j)$ over its stage
    points. With ``resample_probes=True`` each stage value is $\varepsilon_j^\top J_j\varepsilon_j$
    with its own probe $\varepsilon_j$, independent of everything before it, and the stage points
    $x_j, t_j$ do not depend on any probe (the steps are controlled on the state alone), so
    $E[\Delta_T] = $ the same quadrature of the exact divergence: unbiased, as with a fixed
    probe. Its variance is $\sum_{\text{steps}}h^2\sum_j b_j^2\,\mathrm{Var}_j$ instead of
    (for a probe held fixed, whose errors add up coherently) roughly
    $\mathrm{Var}\big(\int\varepsilon^\top J\varepsilon\,dt\big)$: the errors of different
    steps average out. The gain grows with the number of steps in the region where the
    Jacobian's off-diagonal part is large; at loose tolerances (few steps) it vanishes. The
    log-density's own quadrature error is then not controlled; measured with the exact divergence
    it is 2–10× that of the controlled solve at the same tolerance (4e-4 against 6e-5 nats/dim at
    the worst sample, d = 64, tol 1e-5), far below the probe error it trades for. ``stderr`` stays
    honest: the ``n_probes`` columns are still independent, identically distributed estimates.

    Examples
    --------
    >>> import torch, sdekit
    >>> from sdekit.oracles import GaussianMixture
    >>> from sdekit.likelihood import log_likelihood
    >>> gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.2])
    >>> sde = sdekit.VPSDE()
    >>> x = gm.sample(4, generator=torch.Generator().manual_seed(0))
    >>> res = log_likelihood(sde, gm.exact_score(sde), x, divergence="exact")
    >>> err = (res.log_prob - gm.exact_log_prob(sde)(x, 1e-5)).abs().max()
    """
    if target_stderr is not None:  # accuracy-targeted mode: the plan calls back into this function
        return _TARGETED[0](sde, score, x, target_stderr, locals())
    req = _request(sde, score, x, t_eps, method, rtol, atol, divergence, probe, n_probes, generator, adjoint, norm,
                   prior, exact_dim_limit, max_steps, params, backend)
    _check_bool(resample_probes, "resample_probes")
    x, t_eps, mode, K, B = req.x, req.t_eps, req.mode, req.n_probes, int(req.x.shape[0])
    norm = resolve_norm(norm, method, backend, req.wants_grad, adjoint, options)  # "auto" -> a norm

    # ---- set up ----------------------------------------------------------------------------------
    counter = CountingFunction(score)
    fast = _fast_path(sde, x, method, norm, backend, adjoint, req.wants_grad, options)
    moments = _resolve_moments(precondition, data_moments, prior, sde, x, fast)
    if fast:
        return _solve_flat(sde, counter, req, method, norm, backend, max_steps, options, generator, probe, moments,
                           resample_probes)
    if resample_probes and mode == "hutchinson":
        why = _fast_path_blockers(sde, x, method, norm, backend, adjoint, req.wants_grad, options)
        raise ValueError(f"resample_probes=True runs on the native linear path only, which cannot run here: "
                         f"{'; '.join(why)}")
    pf = sde.probability_flow(counter, t_eps)
    pf.check_inputs = False  # the integrators keep every t in [t_eps, T]
    probes = draw_probes(tuple(x.shape), K, probe, generator, x.dtype, x.device) if mode == "hutchinson" else None
    field_ = _AugmentedField(pf, x.dtype, mode, probes, needs_graph=req.wants_grad, shape=tuple(x.shape))
    y0 = (x.to(F64), torch.zeros(B, K, dtype=F64, device=x.device))
    tic = time.perf_counter()
    try:
        (z64, delta), info = integrate_ode(
            field_, y0, t_eps, sde.T, method=method, rtol=req.rtol, atol=req.atol,
            norm="seminorm" if adjoint and norm == "batch" else norm, backend=backend, needs_grad=req.wants_grad,
            adjoint=adjoint, adjoint_params=tuple(p for p in req.params if p.requires_grad) if adjoint else None,
            max_steps=max_steps, options=options, sample_index=norm == "independent")
    except SolverError as e:
        if e.stats is not None:
            e.stats.extra["score_calls"] = counter.count
        raise
    res = _assemble(req, sde, z64, delta, info, tic, counter, method, probe, norm)
    res.stats.extra["precondition"] = False
    return res


def _assemble(req: "_Request", sde: SDE, z64: torch.Tensor, delta: torch.Tensor, info: Dict[str, Any], tic: float,
              counter: CountingFunction, method: str, probe: str, norm: str) -> LikelihoodResult:
    """The `LikelihoodResult` of a finished solve: prior term, checks, stderr, statistics."""
    x, t_eps, mode, K, d, B = req.x, req.t_eps, req.mode, req.n_probes, req.d, int(req.x.shape[0])
    prior_lp = req.prior_fn(z64)
    if not isinstance(prior_lp, torch.Tensor) or tuple(prior_lp.shape) != (B,):
        raise ValueError(f"prior log_prob(z) must return a (B,) = ({B},) tensor, got "
                         f"{getattr(prior_lp, 'shape', type(prior_lp).__name__)}")
    prior_lp = prior_lp.to(F64)
    delta_mean = delta.mean(1)
    log_prob = prior_lp + delta_mean
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    wall = time.perf_counter() - tic
    if not bool(torch.isfinite(log_prob.detach()).all()):
        bad = int((~torch.isfinite(log_prob.detach())).sum())
        raise SolverError(f"log_prob is non-finite for {bad} sample(s) (prior log density {short(prior_lp)}); "
                          f"z may lie outside the prior's support", step=info["steps"], t=sde.T)
    if mode == "exact":
        stderr = torch.zeros(B, dtype=F64, device=x.device)
    elif K == 1:
        stderr = torch.full((B,), math.inf, dtype=F64, device=x.device)
    else:
        stderr = delta.detach().std(1, unbiased=True) / math.sqrt(K)
    native = info["backend"] == "native"
    stats = SolverStats(nfe=info["nfe"], steps=info["steps"], accepted=info["accepted"], rejected=info["rejected"],
                        wall_time=wall, backend=info["backend"], method=method if native else f"torchdiffeq:{method}")
    if "nfe_per_sample" in info:  # per-sample stepping (norm="independent")
        stats.set_per_sample(info)
    stats.extra.update(divergence=mode, vectors_per_eval=d if mode == "exact" else K, score_calls=counter.count,
                       preflight_evals=1, first_step=info.get("first_step"), t_min=info["t_min"],
                       t_max=info["t_max"], prior=req.prior_desc, adjoint=info["adjoint"], dim=d)
    stats.extra["norm"] = norm
    return LikelihoodResult(log_prob=log_prob, prior_log_prob=prior_lp, delta_log_prob=delta_mean,
                            z=z64.to(x.dtype), stderr=stderr, stats=stats, divergence=mode,
                            n_probes=K if mode == "hutchinson" else 0,
                            probe=probe if mode == "hutchinson" else None, delta_per_probe=delta, dim=d,
                            t_eps=t_eps)


def _fast_path(sde: SDE, x: torch.Tensor, method: str, norm: str, backend: str, adjoint: bool, wants_grad: bool,
               options) -> bool:
    """Whether the solve runs `_FlatLinearField` on the native integrator: a linear SDE, no
    gradient, a native method and options, and the native backend chosen (``"auto"`` on the CPU)."""
    return not _fast_path_blockers(sde, x, method, norm, backend, adjoint, wants_grad, options)


def _fast_path_blockers(sde: SDE, x: torch.Tensor, method: str, norm: str, backend: str, adjoint: bool,
                        wants_grad: bool, options) -> list:
    """Why `_fast_path` is False (empty when it is True)."""
    why = []
    if not isinstance(sde, LinearSDE):
        why.append(f"the SDE ({type(sde).__name__}) is not a LinearSDE")
    if backend == "torchdiffeq":
        why.append("backend='torchdiffeq'")
    why += _native_blockers(method, wants_grad, adjoint, norm, options)
    if not why and backend != "native" and x.device.type != "cpu":
        why.append(f"the data is on {x.device.type} (pass backend='native')")
    return why


#: times (evenly spaced over [0, T]) at which ``precondition="auto"`` checks that the drift vanishes
_DRIFT_PROBE_TIMES = 33


def _drift_free(sde: LinearSDE) -> bool:
    r"""Whether $f(t) = 0$ (a variance-exploding process: $m \equiv 1$, the scale of $x$ grows like
    $\sigma(t)$), checked on `_DRIFT_PROBE_TIMES` times. ``precondition="auto"`` switches the
    preconditioned state on exactly for these processes: measured (``benchmarks/likelihood_ve.py``)
    fewer NFE at lower error on VE; on the VP family the default moments make it the identity, and
    on sub-VP it saved NFE at a larger error (so there it is opt-in)."""
    t = torch.linspace(0.0, float(sde.T), _DRIFT_PROBE_TIMES, dtype=F64)
    with torch.no_grad():
        return bool((sde.kernel.f(t) == 0).all())


def _resolve_moments(precondition, data_moments, prior, sde: SDE, x: torch.Tensor, fast: bool
                     ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The per-dimension data moments ``(μ, c²)`` of the preconditioned state, or None (off)."""
    if not (isinstance(precondition, bool) or precondition == "auto"):
        raise ValueError(f"precondition must be True, False or 'auto', got {precondition!r}")
    if data_moments is not None:
        if isinstance(data_moments, GaussianDataPrior):
            g = data_moments
        elif isinstance(data_moments, tuple) and len(data_moments) == 2:
            g = GaussianDataPrior(*data_moments)
        else:
            raise TypeError(f"data_moments must be (mean, var) or a GaussianDataPrior, got {short(data_moments)}")
        mean, var = g.mean.detach(), g.var.detach()
        try:
            ok = torch.broadcast_shapes(mean.shape, var.shape, x.shape[1:]) == x.shape[1:]
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"data_moments mean {tuple(mean.shape)} / var {tuple(var.shape)} do not broadcast to "
                             f"one sample's shape {tuple(x.shape[1:])}")
    if precondition is False:
        return None
    if not fast:
        if precondition is True:
            raise ValueError("precondition=True needs the native solve of a linear SDE without gradients (a "
                             "LinearSDE, method 'dopri5' or 'bosh3', no adjoint, no gradient wanted, backend "
                             "'auto' on the CPU or 'native'); pass precondition=False or 'auto'")
        return None
    if precondition == "auto" and not _drift_free(sde):
        return None
    if data_moments is None:
        if isinstance(prior, GaussianDataPrior):
            return prior.mean.detach(), prior.var.detach()
        if isinstance(prior, tuple) and len(prior) == 3 and prior[0] == "gaussian":
            g = GaussianDataPrior(prior[1], prior[2])
            return g.mean.detach(), g.var.detach()
        # the standardised-data convention: mean 0, variance 1 per dimension (for VE, u = x / sqrt(1 + sigma^2))
        return torch.zeros((), dtype=F64), torch.ones((), dtype=F64)
    return mean, var


def _solve_flat(sde: LinearSDE, counter: CountingFunction, req: "_Request", method: str, norm: str, backend: str,
                max_steps, options, generator, probe: str,
                moments: Optional[Tuple[torch.Tensor, torch.Tensor]], resample: bool = False,
                control_delta: Optional[bool] = None) -> LikelihoodResult:
    """`log_likelihood` on one flat float64 state ``[u | δ]`` with `_FlatLinearField`.
    ``control_delta``: whether the δ columns enter the error control (default: unless
    ``resample``; the targeted mode's solver check runs a fixed probe without it, so that it takes
    the steps of the resampled solves)."""
    x, t_eps, mode, K, d, B = req.x, req.t_eps, req.mode, req.n_probes, req.d, int(req.x.shape[0])
    # "cv" (the targeted mode's control variate): K = 2 x probes state columns, K/2 probes + CV_SKETCH
    n_vec = K if mode == "hutchinson" else K // 2 + CV_SKETCH
    resample = resample and mode == "hutchinson"
    if control_delta is None:
        control_delta = not resample
    if resample:  # one seed from the generator; the probes are a hash of (seed, row, evaluation count)
        gdev = generator.device if generator is not None else "cpu"
        probes, seeded = None, (int(torch.randint(0, 2 ** 32 - 1, (1,), generator=generator, device=gdev)), probe)
    else:
        probes = draw_probes(tuple(x.shape), n_vec, probe, generator, x.dtype, x.device) if mode != "exact" else None
        seeded = None
    mean, var = moments if moments is not None else (None, None)
    field_ = _FlatLinearField(sde, counter, x, mode, probes, K, mean, var, seeded)
    t0 = torch.tensor(t_eps, dtype=F64, device=x.device)
    t1 = torch.tensor(sde.T, dtype=F64, device=x.device)
    u0 = field_.from_x(x.detach().to(F64).reshape(B, d), t0)
    y0 = torch.cat([u0, torch.zeros(B, K, dtype=F64, device=x.device)], 1)
    tic = time.perf_counter()
    try:
        y1, info = integrate_ode(field_, y0, t_eps, sde.T, method=method, rtol=req.rtol, atol=req.atol, norm=norm,
                                 backend="native", max_steps=max_steps, options=options,
                                 segments=(d,) if control_delta else (), sample_index=norm == "independent",
                                 error_columns=None if control_delta else d)
    except SolverError as e:
        if e.stats is not None:
            e.stats.extra["score_calls"] = counter.count
        raise
    z64 = field_.to_x(y1[:, :d], t1).reshape(x.shape)
    # the log|det| of u -> x at both ends: log p_x = log p_u - sum log nu (see docs/likelihood.md)
    delta = y1[:, d:] + (field_.log_nu_sum(t1) - field_.log_nu_sum(t0))
    res = _assemble(req, sde, z64, delta, info, tic, counter, method, probe, norm)
    res.stats.extra["precondition"] = moments is not None
    res.stats.extra["resample_probes"] = resample
    return res


@dataclass(frozen=True)
class _Request:
    """The validated arguments of one `log_likelihood` call."""

    x: torch.Tensor
    t_eps: float
    rtol: float
    atol: float
    mode: str  # "exact" or "hutchinson"
    n_probes: int  # K: 1 for exact
    d: int
    params: Tuple[torch.Tensor, ...]
    wants_grad: bool
    prior_fn: Callable[[torch.Tensor], torch.Tensor]
    prior_desc: str


def _request(sde, score, x, t_eps, method, rtol, atol, divergence, probe, n_probes, generator, adjoint, norm, prior,
             exact_dim_limit, max_steps, params, backend) -> _Request:
    """Validate `log_likelihood`'s arguments (before the solve; one preflight score call)."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a sdekit.SDE, got {type(sde).__name__}")
    if not callable(score):
        raise TypeError(f"score must be callable (x, t) -> tensor, got {type(score).__name__}")
    x = check_state(x, "x")
    t_eps = check_positive(t_eps, "t_eps")
    if not t_eps < sde.T:
        raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}); got t_eps={t_eps!r}")
    if not isinstance(method, str) or method not in ODE_METHODS:
        raise ValueError(f"method must be an adaptive torchdiffeq method, one of {sorted(ODE_METHODS)}; "
                         f"got {method!r}")
    rtol = check_positive(rtol, "rtol")
    atol = check_positive(atol, "atol")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, numbers.Integral) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _check_bool(adjoint, "adjoint")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(exact_dim_limit, bool) or not isinstance(exact_dim_limit, numbers.Integral) or exact_dim_limit < 0:
        raise ValueError(f"exact_dim_limit must be a non-negative integer, got {exact_dim_limit!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral)
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    if sde.state_dependent_noise and sde.diffusion_divergence is None:
        raise ValueError(f"this SDE has state-dependent noise ({sde.noise!r}); the probability-flow velocity "
                         f"contains div(G G^T), whose own divergence log_likelihood needs by autograd: build the "
                         f"SDE with a differentiable diffusion_divergence=(x, t) -> div(G G^T)")
    prior_fn, prior_desc = _resolve_prior(prior, sde)
    d = int(x[0].numel())
    mode = _divergence_mode(divergence, d, exact_dim_limit)
    if params is not None:
        params = tuple(params)
        if not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("params must be a sequence of tensors")
    found = _preflight(score, x, sde.T)
    if params is None:
        params = found
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return _Request(x, t_eps, rtol, atol, mode, int(n_probes) if mode == "hutchinson" else 1, d, params, wants_grad,
                    prior_fn, prior_desc)


def _divergence_mode(divergence: str, d: int, exact_dim_limit: int) -> str:
    """``"exact"`` or ``"hutchinson"`` (what ``"auto"`` resolves to at dimension ``d``)."""
    if divergence == "auto":
        return "exact" if d <= exact_dim_limit else "hutchinson"
    if divergence == "exact" and d > exact_dim_limit:
        raise ValueError(
            f"divergence='exact' at data dimension d = {d} needs {d} vector-Jacobian products (backward passes "
            f"of the score) per function evaluation, i.e. roughly {d}x the cost of a Hutchinson solve (hours for "
            f"image data); exact_dim_limit = {exact_dim_limit}. Use divergence='hutchinson' (unbiased; raise "
            f"n_probes to shrink the error, result.stderr measures it), or pass exact_dim_limit={d} if you "
            f"really want the exact trace")
    return divergence
