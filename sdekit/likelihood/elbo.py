r"""The variational lower bound (ELBO) on $\log p_{t_\varepsilon}(x)$ for any linear SDE.

For a score model $s_\theta$ and the linear forward process
$dx = f(t)x\,dt + g(t)\,dW$ (Song, Durkan, Murray & Ermon 2021, *Maximum likelihood
training of score-based diffusion models*, Theorem 1 in its pointwise, denoising form), the
density $p^{\theta}_{t_\varepsilon}$ of the reverse-time SDE driven by $s_\theta$
and started from the prior $\pi$ at $T$ satisfies, for every point $x$ taken as
the state at time $s = t_\varepsilon$,

$$
    \log p^{\theta}_{s}(x) \;\ge\; \mathcal L(x) =
    \mathbb E\big[\log\pi(x_T)\big]
    - \tfrac12\int_s^T g(t)^2\,\mathbb E\Big[\|s_\theta(x_t,t)\|^2
    + 2\,s_\theta(x_t,t)\cdot\tfrac{\varepsilon}{b(t)}\Big]dt
    + d\int_s^T f(t)\,dt,
$$

with $x_t = a(t)x + b(t)\varepsilon$ the forward process *started at x at time s*:
$a = m(t)/m(s)$, $b^2 = m(t)^2\,(e^{-\lambda(t)} - e^{-\lambda(s)})$ (λ the log-SNR),
so that $\nabla\log p(x_t|x_s{=}x) = -\varepsilon/b$ and the integrand is Song et al.'s
$\|s_\theta - \nabla\log p_{st}\|^2 - \|\nabla\log p_{st}\|^2$ written without the
cancelling $\|\varepsilon\|^2/b^2$. $\nabla\cdot(f(t)x) = d\,f(t)$. With the exact
score and $\pi = p_T$ the bound is an equality (the gap is the KL divergence between the
forward path measure given $x_s = x$ and the model's, which then coincide); with the
process's own prior $\pi = N(0, \sigma(T)^2 I)$ its expectation is
$\log p_s(x) + \mathbb E[\log\pi(x_T) - \log p_T(x_T) \mid x_s = x]$.

**What is estimated** is therefore a lower bound on $\log p^\theta_{t_\varepsilon}(x)$ — the
same quantity that `sdekit.likelihood.log_likelihood` integrates through the
probability-flow ODE — not $\log p_0$ (that needs a decoder term for
$[0, t_\varepsilon]$; see ``docs/likelihood_data.md``).

**Estimator** (derivation and variance analysis in ``docs/likelihood_data.md``): the prior term
is exact for the Gaussian prior; $d\int f = d\,(\log m(T) - \log m(s))$ is exact; the
time integral is Monte Carlo with

* *importance sampling* of t with density $\propto g^2/\sigma^2 = -\lambda'(t)$, i.e.
  $\lambda \sim U[\lambda(T), \lambda(s)]$, $t = \lambda^{-1}(\lambda)$, weight
  $(\lambda(s) - \lambda(T))\,\sigma(t)^2/g(t)^2$ (``importance="auto"``), uniform t
  (``None``), or the defensive half-and-half mixture of the two (``"mixture"``);
* *antithetic noise* $\pm\varepsilon$ (removes the $O(1/b)$ odd term, whose variance
  otherwise diverges logarithmically at $t \to s$);
* a *control variate* $c(t)\,g^2(\|\varepsilon\|^2 - d)/b^2$ with
  $c = \rho(2-\rho)$, $\rho = u/(v + u)$,
  $u = b^2/a^2 = m(s)^2(e^{-\lambda(t)} - e^{-\lambda(s)})$ (so $du = g^2/a^2\,dt$),
  v = ``data_var``
  (the optimal coefficient for Gaussian data of variance v); its mean is added back in closed form,
  $\tfrac d2\big[\log(1 + u_T/v) + u_T/(v + u_T)\big]$, so the estimate is unbiased for
  every v > 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from .._defaults import LIKELIHOOD_T_EPS
from .._gaussian import gaussian_log_prob
from ..time_sampling import sample_times
from .._validation import check_bool, check_callable, check_choice, check_generator, check_int, check_positive, check_state, short
from ..dynamics import evaluate_score
from ..processes import LinearSDE
from ..solvers.stats import SolverStats

__all__ = ["elbo", "ElboResult", "IMPORTANCE"]

F64 = torch.float64
IMPORTANCE = ("auto", "log_snr", "uniform", "mixture", None)


@dataclass
class ElboResult:
    r"""What `elbo` estimated (nats, float64, shape ``(B,)``).

    Attributes
    ----------
    log_prob:
        The Monte-Carlo estimate of the lower bound $\mathcal L(x) \le \log p^\theta_{t_\varepsilon}(x)$
        per sample (unbiased for $\mathcal L$).
    stderr:
        Its Monte-Carlo standard error: sample std over the ``n_t`` independent time draws
        (each averaged over its ``n_eps`` noises) divided by $\sqrt{n_t}$.
    stats:
        A ``SolverStats`` like ``LikelihoodResult.stats``: ``nfe`` = score evaluations per
        sample (``n_t * n_eps``, doubled when antithetic), ``steps`` = ``accepted`` = ``n_t``
        (time draws), ``wall_time``, ``backend = "monte_carlo"``, ``method = "elbo"``;
        ``extra`` holds ``score_calls``, ``divergence_term``, ``control_variate_mean``,
        ``lambda_range`` and ``data_var``. ``nfe`` and ``wall_time`` are also read-only
        attributes of the result (as before ``stats`` existed).
    score_calls:
        Calls of ``score`` (each on a batch of up to ``max_batch`` rows).
    prior_term:
        $E[\log\pi(x_T) | x]$: exact for the Gaussian prior, a Monte-Carlo mean for a
        user ``prior_log_prob``.
    constant_term:
        The exactly integrated part, the same for every sample:
        $d(\log m(T) - \log m(s))$ plus the control variate's mean.
    """

    log_prob: torch.Tensor
    stderr: torch.Tensor
    stats: SolverStats
    score_calls: int
    t_eps: float
    n_t: int
    n_eps: int
    importance: str
    antithetic: bool
    control_variate: bool
    prior_term: torch.Tensor
    constant_term: float
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Score evaluations per sample (``stats.nfe``)."""
        return self.stats.nfe

    @property
    def wall_time(self) -> float:
        """Seconds spent (``stats.wall_time``)."""
        return self.stats.wall_time


def _check_elbo_args(sde, score, x0, n_t, n_eps, max_batch, generator, t_eps, importance, antithetic,
                     control_variate, data_var, prior_log_prob):
    """Validate every argument of `elbo` before any work; return the normalised ones."""
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"sde must be a sdekit.LinearSDE (the bound uses its Gaussian kernel), got "
                        f"{type(sde).__name__}")
    check_callable(score, "score")
    x0 = check_state(x0, "x0")
    n_t, n_eps = check_int(n_t, "n_t", 2), check_int(n_eps, "n_eps", 1)
    max_batch = check_int(max_batch, "max_batch", 1)
    check_generator(generator)
    t_eps = check_positive(t_eps, "t_eps")
    if not t_eps < sde.T:
        raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}); got {t_eps!r}")
    check_choice(importance, "importance", IMPORTANCE)
    mode = {"auto": "log_snr", None: "uniform"}.get(importance, importance)
    check_bool(antithetic, "antithetic")
    check_bool(control_variate, "control_variate")
    v = check_positive(data_var, "data_var")
    check_callable(prior_log_prob, "prior_log_prob", "z -> (N,)", allow_none=True)
    return x0, n_t, n_eps, max_batch, t_eps, mode, v


def elbo(sde: LinearSDE, score: Callable, x0: torch.Tensor, *, n_t: int = 256, n_eps: int = 1,
         generator: Optional[torch.Generator] = None, t_eps: float = LIKELIHOOD_T_EPS, importance="auto",
         antithetic: bool = True, control_variate: bool = True, data_var: float = 1.0,
         prior_log_prob: Optional[Callable] = None, max_batch: int = 8192) -> ElboResult:
    r"""Monte-Carlo estimate of the ELBO $\mathcal L(x) \le \log p^\theta_{t_\varepsilon}(x)$ (module docs).

    Parameters
    ----------
    sde:
        A `sdekit.LinearSDE` (closed-form or numeric kernel): only its ``g``, its
        transition (``kernel.transition``), log-SNR and its inverse are used.
    score:
        ``score(x, t) -> tensor`` shaped like ``x`` (``t`` a ``(N,)`` tensor in x's dtype).
    x0:
        Data, ``(B, ...)``, taken as the state at time ``t_eps``.
    n_t:
        Independent time draws per sample (≥ 2, for the standard error).
    n_eps:
        Noise draws per time draw (each used as ±ε when ``antithetic``).
    generator:
        ``torch.Generator`` for all randomness (same seed, same estimate).
    t_eps:
        The data-side end of the time integral, in ``(0, T)``. Default ``LIKELIHOOD_T_EPS`` = 1e-5
        (the rule, in ``docs/concepts.md``: likelihoods stop at 1e-5, sampling at 1e-3).
    importance:
        ``"auto"`` or ``"log_snr"``: t with density $\propto g^2/\sigma^2$ (uniform
        log-SNR); ``None`` or ``"uniform"``: t uniform on ``[t_eps, T]``; ``"mixture"``: each
        draw from either with probability 1/2, weighted by the mixture density (the second moment of
        the weighted integrand is at most twice that of either).
    antithetic:
        Variance reduction (module docs): antithetic noise pairs; does not change the
        expectation.
    control_variate:
        Variance reduction (module docs); does not change the expectation.
    data_var:
        A rough per-coordinate variance of the data, used by the control variate.
    prior_log_prob:
        Optional ``z -> (N,)`` log density of the prior at T (default: the process's own
        $N(0, \sigma(T)^2 I)$, integrated exactly); estimated by Monte Carlo with one
        $x_T$ per time draw.
    max_batch:
        Maximum rows per score call.

    Returns
    -------
    ElboResult
        The bound per sample with its standard error and statistics.
    """
    x0, n_t, n_eps, max_batch, t_eps, mode, v = _check_elbo_args(
        sde, score, x0, n_t, n_eps, max_batch, generator, t_eps, importance, antithetic, control_variate,
        data_var, prior_log_prob)
    start = time.perf_counter()
    B, event, d, dev = x0.shape[0], tuple(x0.shape[1:]), x0[0].numel(), x0.device
    y = x0.detach().to(F64).reshape(B, d)
    ker = sde.kernel
    s64 = torch.tensor(t_eps, dtype=F64, device=dev)
    T64 = torch.tensor(sde.T, dtype=F64, device=dev)
    lam_s, lam_T = float(ker.log_snr(s64)), ker.log_snr_T
    Lam = lam_s - lam_T
    if not (math.isfinite(Lam) and Lam > 0):
        raise ValueError(f"log-SNR must decrease on [t_eps, T]: lambda(t_eps)={lam_s:.6g}, lambda(T)={lam_T:.6g}")

    # ---- exactly integrated terms ---------------------------------------------------------------
    a_T, b2_T = (float(c) for c in ker.transition(s64, T64))
    u_T = b2_T / (a_T * a_T)  # u = b^2/a^2, with du = g^2/a^2 dt (module docs)
    divergence = d * float(ker.log_m(T64) - ker.log_m(s64))  # int_s^T div(f x) dt = d log(m(T)/m(s))
    cv_mean = 0.5 * d * (math.log1p(u_T / v) + u_T / (v + u_T)) if control_variate else 0.0
    constant = divergence + cv_mean
    prior_term = None
    if prior_log_prob is None:  # E log N(a_T y + b_T eps; 0, sp^2 I) = log N(a_T y; 0, sp^2 I) - d b_T^2 / (2 sp^2)
        sp2 = sde.prior_std() ** 2
        prior_term = gaussian_log_prob(a_T * y, 0.0, sp2) - d * b2_T / (2.0 * sp2)

    # ---- Monte Carlo over (t, eps) ----------------------------------------------------------------
    reps = n_eps * (2 if antithetic else 1)
    k_chunk = max(1, min(n_t, max_batch // max(1, B * reps)))
    gdev = generator.device if generator is not None else dev
    Y = torch.empty(B, n_t, dtype=F64, device=dev)  # per time draw: prior draw - 1/2 * weighted integrand
    P_draws = torch.empty(B, n_t, dtype=F64, device=dev) if prior_log_prob is not None else None
    calls, done = 0, 0
    while done < n_t:
        k = min(k_chunk, n_t - done)
        t, weight = _draw_times(sde, mode, B, k, t_eps, Lam, generator, dev)
        a, b2 = ker.transition(s64, t)
        u = b2 / (a * a)
        c_over_b2 = (2.0 - u / (v + u)) / (a * a * (v + u)) if control_variate else torch.zeros_like(u)
        eps = torch.randn(B, k, n_eps, d, generator=generator, dtype=F64, device=gdev).to(dev)
        bracket, n_calls = _bracket(score, y, a, b2.sqrt(), t, eps, antithetic, max_batch, x0.dtype, event)
        calls += n_calls
        bracket = bracket + c_over_b2[:, :, None] * (eps * eps).sum(-1)  # c g^2 |eps|^2 / b^2, c = rho (2 - rho)
        Y[:, done:done + k] = -0.5 * (weight[:, :, None] * bracket).mean(-1)
        if prior_log_prob is not None:
            e_T = torch.randn(B, k, d, generator=generator, dtype=F64, device=gdev).to(dev)
            lp = _prior_draws(prior_log_prob, a_T * y[:, None, :] + math.sqrt(b2_T) * e_T, x0.dtype, event)
            P_draws[:, done:done + k] = lp
            Y[:, done:done + k] += lp
        done += k

    est = constant + Y.mean(1) + (prior_term if prior_term is not None else 0.0)
    prior_term = P_draws.mean(1) if prior_term is None else prior_term
    se = Y.std(1, unbiased=True) / math.sqrt(n_t)
    if not bool(torch.isfinite(est).all() and torch.isfinite(se).all()):
        raise ValueError(f"the ELBO estimate is not finite ({short(est)}); check the score near "
                         f"t_eps={t_eps} and the data scale")
    extra = {"divergence_term": divergence, "control_variate_mean": cv_mean, "lambda_range": Lam, "data_var": v}
    stats = SolverStats(nfe=n_t * reps, steps=n_t, accepted=n_t, wall_time=time.perf_counter() - start,
                        backend="monte_carlo", method="elbo", extra=dict(extra, score_calls=calls))
    return ElboResult(log_prob=est, stderr=se, stats=stats, score_calls=calls, t_eps=t_eps, n_t=n_t,
                      n_eps=n_eps, importance=mode, antithetic=antithetic, control_variate=control_variate,
                      prior_term=prior_term, constant_term=constant, extra=extra)


def _draw_times(sde, mode, B, k, t_eps, Lam, generator, dev):
    """``(t, weight)``, ``(B, k)`` each: times on ``[t_eps, T]`` drawn by `sdekit.time_sampling`
    (the one implementation shared with the training losses) and the weight $g^2(t)/q(t)$."""
    scheme = {"log_snr": "importance", "uniform": "uniform", "mixture": "mixture"}[mode]
    t, q = sample_times(sde, B * k, t_eps=t_eps, scheme=scheme, generator=generator, device=dev)
    t, q = t.reshape(B, k), q.reshape(B, k)
    if mode == "log_snr":  # q = g^2 / (sigma^2 Lam): the weight g^2/q is Lam sigma^2 exactly
        return t, Lam * sde.kernel.sigma2(t)
    return t, sde.kernel.g2(t) / q


def _bracket(score, y, a, b, t, eps, antithetic, max_batch, dtype, event):
    r"""$\|s\|^2 + 2 s\cdot\varepsilon/b$ at $x_t = a y + b\varepsilon$ (antithetic: the $\pm\varepsilon$
    average), shape ``(B, k, n_eps)``, and the number of score calls."""
    B, k, n_eps, d = eps.shape
    bb = b[:, :, None, None]
    mean = a[:, :, None, None] * y[:, None, None, :]
    tt = t[:, :, None].expand(B, k, n_eps).reshape(-1)
    xt = (mean + bb * eps).reshape(-1, d)
    if antithetic:
        xt, tt = torch.cat([xt, (mean - bb * eps).reshape(-1, d)]), torch.cat([tt, tt])
    chunks = [_call_score(score, xt[i:i + max_batch], tt[i:i + max_batch], dtype, event)
              for i in range(0, xt.shape[0], max_batch)]
    sc = torch.cat(chunks)
    if antithetic:
        sp, sm = sc[: sc.shape[0] // 2].reshape(B, k, n_eps, d), sc[sc.shape[0] // 2:].reshape(B, k, n_eps, d)
        return 0.5 * ((sp * sp).sum(-1) + (sm * sm).sum(-1)) + ((sp - sm) * eps).sum(-1) / bb[..., 0], len(chunks)
    sp = sc.reshape(B, k, n_eps, d)
    return (sp * sp).sum(-1) + 2.0 * (sp * eps).sum(-1) / bb[..., 0], len(chunks)


def _prior_draws(prior_log_prob, zT, dtype, event):
    """``prior_log_prob`` at the ``(B, k, d)`` draws ``zT``, checked, as float64 ``(B, k)``."""
    B, k = zT.shape[:2]
    lp = prior_log_prob(zT.reshape(B * k, *event).to(dtype))
    if not isinstance(lp, torch.Tensor) or lp.shape != (B * k,):
        raise ValueError(f"prior_log_prob(z) must return a tensor of shape ({B * k},), got "
                         f"{getattr(lp, 'shape', type(lp).__name__)}")
    lp = lp.to(F64).reshape(B, k)
    if not bool(torch.isfinite(lp).all()):
        raise ValueError("prior_log_prob returned non-finite values")
    return lp


def _call_score(score: Callable, x64: torch.Tensor, t64: torch.Tensor, dtype: torch.dtype, event) -> torch.Tensor:
    s = evaluate_score(score, x64.to(dtype).reshape(x64.shape[0], *event), t64)
    s = s.detach().to(F64).reshape(x64.shape[0], -1)
    if not bool(torch.isfinite(s).all()):
        bad = ~torch.isfinite(s).all(1)
        raise ValueError(f"score returned non-finite values at t = {float(t64[bad][0]):.6g} "
                         f"({int(bad.sum())} of {bad.numel()} rows)")
    return s
