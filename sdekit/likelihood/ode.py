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
from ..solvers.integrate import ODE_BACKENDS, ODE_METHODS, integrate_ode, resolve_norm
from ..solvers.stats import CountingFunction, SolverError, SolverStats
from .divergence import (
    PROBES,
    NotDifferentiableError,
    draw_probes,
    exact_divergence_of,
    hutchinson_divergence_of,
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
        ``t_max``, and ``adjoint`` (live counts of the backward pass, filled by ``backward()``).
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
def _check_bool(v, name):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


def log_likelihood(sde: SDE, score: Callable, x: torch.Tensor, *, t_eps: float = LIKELIHOOD_T_EPS, method: str = "dopri5",
                   rtol: float = 1e-5, atol: float = 1e-5, divergence: str = "auto", probe: str = "rademacher",
                   n_probes: int = 1, generator: Optional[torch.Generator] = None, adjoint: bool = False,
                   norm: str = "auto", prior: Any = None, exact_dim_limit: int = 16,
                   max_steps: Optional[int] = None, params: Optional[Sequence[torch.Tensor]] = None,
                   options: Optional[Dict[str, Any]] = None, backend: str = "auto") -> LikelihoodResult:
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
    req = _request(sde, score, x, t_eps, method, rtol, atol, divergence, probe, n_probes, generator, adjoint, norm,
                   prior, exact_dim_limit, max_steps, params, backend)
    x, t_eps, mode, K, d, B = req.x, req.t_eps, req.mode, req.n_probes, req.d, int(req.x.shape[0])
    norm = resolve_norm(norm, method, backend, req.wants_grad, adjoint, options)  # "auto" -> a norm

    # ---- set up ----------------------------------------------------------------------------------
    counter = CountingFunction(score)
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
