r"""Native fixed-step methods. Each is a short loop over the grid ``ctx.ts`` (either direction).

Notation for one step from ``t`` to ``s`` (``s < t`` when sampling): $h = s - t$,
$m_t, \sigma_t$ the kernel, and for the exact forward transition from ``s`` to ``t``,
$a = m_t/m_s$, $b^2 = \sigma_t^2 - a^2\sigma_s^2$ (so $x_t | x_s \sim N(a x_s, b^2 I)$).
Tweedie's estimate is $\hat x_0 = (x + \sigma_t^2 \hat s)/m_t$.
"""

from __future__ import annotations

import math

import torch

from ._checks import at_least, nonnegative, one_of, positive, positive_or_inf
from ..parameterization import tweedie_mean
from .context import Context
from .fixed import grid_method
from .registry import options_of
from .stats import EVALS_ATTR, call_counted

__all__ = ["euler", "heun", "rk4", "euler_maruyama", "stochastic_heun", "reverse_diffusion", "ancestral",
           "pc", "ddim", "langevin", "annealed_langevin"]

ALL_NOISE = ("isotropic", "diagonal", "general")


# ----------------------------------------------------------------------------------------------
# ODE methods (probability-flow ODE); any direction
# ----------------------------------------------------------------------------------------------


def euler(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Explicit Euler: x <- x + h v(x, t)."""
    ts = ctx.ts
    x = x.clone()  # the state buffer we own and update in place
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        x = ctx.step_done(i, x.add_(ctx.velocity(x, t), alpha=s - t))
    return x


def heun(ctx: Context, x: torch.Tensor, churn: float = 0.0, churn_min: float = 0.0,
         churn_max: float = float("inf"), churn_noise: float = 1.0) -> torch.Tensor:
    r"""Heun's 2nd-order method (Karras et al. 2022, Alg. 2), with optional churn.

    Churn ($S_{churn}$ etc. in EDM, in terms of $\bar\sigma = \sigma/m$): when
    $\bar\sigma(t) \in [$ ``churn_min``, ``churn_max`` $]$, the noise level is first
    raised to $\hat{\bar\sigma} = (1+\gamma)\bar\sigma$, $\gamma = \min(S_{churn}/N, \sqrt2 - 1)$,
    by the exact forward transition from t to $\hat t$ (for VE this is EDM's
    $x + \sqrt{\hat\sigma^2 - \sigma^2}\,S_{noise}\,\varepsilon$).
    """
    ts = ctx.ts
    x = x.clone()  # the state buffer we own and update in place
    t_hat = list(ts[:-1])
    if churn > 0:
        gamma = min(churn / ctx.n, math.sqrt(2.0) - 1.0)
        k = ctx.sde.kernel
        lam = torch.tensor([ctx.coefs(t).lam for t in ts[:-1]], dtype=torch.float64)
        sbar = torch.exp(-0.5 * lam)
        use = (sbar >= churn_min) & (sbar <= churn_max)
        lam_T = k.log_snr_T
        lam_hat = torch.clamp(lam - 2.0 * math.log1p(gamma), min=lam_T)
        t_new = k.t_from_log_snr(lam_hat)
        t_hat = [float(tn) if u else t for tn, u, t in zip(t_new.tolist(), use.tolist(), ts[:-1])]
        ctx.prepare(t_hat)
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        if t_hat[i] != t:
            a, b2 = ctx.transition(t_hat[i], t)
            x = a * x + (churn_noise * math.sqrt(b2)) * ctx.randn()
            t = t_hat[i]
        h = s - t
        d = ctx.velocity(x, t)
        x_e = torch.add(x, d, alpha=h)
        x = ctx.step_done(i, x.add_(d.add_(ctx.velocity(x_e, s)), alpha=0.5 * h))
    return x


def rk4(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Classical 4th-order Runge–Kutta."""
    ts = ctx.ts
    ctx.prepare(0.5 * (ts[i] + ts[i + 1]) for i in range(ctx.n))
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        h, tm = s - t, 0.5 * (ts[i] + ts[i + 1])
        k1 = ctx.velocity(x, t)
        k2 = ctx.velocity(x + (0.5 * h) * k1, tm)
        k3 = ctx.velocity(x + (0.5 * h) * k2, tm)
        k4 = ctx.velocity(x + h * k3, s)
        x = ctx.step_done(i, x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4))
    return x


# ----------------------------------------------------------------------------------------------
# SDE methods (forward or reverse SDE problems)
# ----------------------------------------------------------------------------------------------


def euler_maruyama(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    r"""Euler–Maruyama: $x \leftarrow x + h\,b(x,t) + G(x,t)\sqrt{|h|}\,z$."""
    lean = ctx.linear_sde_steps()
    if lean is not None:
        return _euler_maruyama_linear(ctx, x, *lean)
    ts = ctx.ts
    x = x.clone()  # the state buffer we own and update in place
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        x = x.add_(ctx.drift(x, t), alpha=s - t)  # x + h b(x, t)
        x = ctx.step_done(i, ctx.add_noise(x, t, s))  # + G(x, t) dW
    return x


#: steps between two non-finite checks of `_euler_maruyama_linear` (a failed check replays the block)
CHECK_BLOCK = 16


def _euler_maruyama_linear(ctx: Context, x: torch.Tensor, tv, A, C, S) -> torch.Tensor:
    r"""`euler_maruyama` on a linear reverse SDE with precomputed float coefficients
    (`Context.linear_sde_steps`): per step one score call and three in-place passes
    ($x + c\hat s$, times $a$, plus $\sigma z$) — the same noise stream as the generic loop.

    Non-finite check (when the plan asks for one every step, the CPU default): once every
    `CHECK_BLOCK` steps, one reduction and host read, and a copy of the state and the
    generator's state at the last good check. Non-finiteness persists under this update
    ($a_i$ is finite and non-zero, so a NaN/inf component stays NaN/inf whatever the score
    returns), so a bad check means the first bad step lies in the block just run: the block is
    replayed from the copy with the same noise, checking every step, and the `SolverError`
    names that first bad step and its time — as a per-step check would, without its per-step
    reduction. (A score that is not deterministic may not fail again in the replay: the error
    then names the block's last step and says so.)"""
    x = x.clone()  # the state buffer we own and update in place
    shape = x.shape
    counter, gen, stats, n = ctx.counter, ctx._gen, ctx.stats, ctx.n
    fn = counter.fn
    noise = torch.empty_like(x)
    hook = ctx.step_done if (ctx._save_idx or ctx._check_every != 1) else None

    reports = getattr(fn, EVALS_ATTR, None) is not None  # a guided score counts its network evaluations

    def step(i: int) -> None:
        if reports:
            s, evals = call_counted(fn, x, tv[i])
            counter.count += evals
        else:
            counter.count += 1
            s = fn(x, tv[i])
        if s.shape != shape:
            raise ValueError(f"score(x, t) must return a tensor shaped like x {tuple(shape)}, got {tuple(s.shape)}")
        x.add_(s, alpha=C[i]).mul_(A[i]).add_(torch.randn(shape, generator=gen, out=noise), alpha=S[i])

    if hook is not None:  # save points or a device-side / custom check: the shared per-step hook
        for i in range(n):
            step(i)
            x = hook(i, x)
        return x
    get_state = gen.get_state if gen is not None else torch.get_rng_state
    set_state = gen.set_state if gen is not None else torch.set_rng_state
    good_x, good_rng, i0 = x.clone(), get_state(), 0  # the state before step i0
    for i in range(n):
        step(i)
        if (i + 1) % CHECK_BLOCK == 0 or i + 1 == n:
            if math.isfinite(float(x.sum())):
                good_x.copy_(x)
                good_rng, i0 = get_state(), i + 1
                continue
            x.copy_(good_x)  # replay the block step by step to find its first bad step
            set_state(good_rng)
            for j in range(i0, i + 1):
                step(j)
                if not math.isfinite(float(x.sum())):
                    stats.steps = stats.accepted = j + 1
                    ctx.fail(j)
            stats.steps = stats.accepted = i + 1
            ctx.fail(i, note=f" (found by the check after step {i}; the replay of steps {i0}..{i} stayed finite: "
                             f"the score did not repeat itself, so the first bad step is one of them)")
    stats.steps += n
    stats.accepted += n
    return x


def stochastic_heun(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    r"""Stochastic Heun for additive noise (Kloeden & Platen's improved Euler):

    $\tilde x = x + h b(x,t) + G(t)\Delta W$,
    $x \leftarrow x + \tfrac h2 (b(x,t) + b(\tilde x, s)) + \tfrac12 (G(t) + G(s))\Delta W$.
    """
    ts = ctx.ts
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        h = s - t
        dW = ctx.dW(t, s)
        d0 = ctx.drift(x, t)
        gt = ctx.diffuse(x, t, dW)  # additive noise: G does not depend on x
        x_e = x + h * d0 + gt
        x = x + (0.5 * h) * (d0 + ctx.drift(x_e, s)) + 0.5 * (gt + ctx.diffuse(x, s, dW))
        x = ctx.step_done(i, x)
    return x


# ----------------------------------------------------------------------------------------------
# Score-based samplers for linear SDEs (ReverseSDE or ProbabilityFlowODE problems)
# ----------------------------------------------------------------------------------------------


def reverse_diffusion(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    r"""Song et al.'s reverse-diffusion predictor with the exact one-step forward discretisation:
    $x \leftarrow (2 - a)x + b^2 \hat s + b z$ (VP: $a = \sqrt{1-\beta_i}, b^2 = \beta_i$;
    VE: $a = 1, b^2 = \sigma_i^2 - \sigma_{i-1}^2$)."""
    ts = ctx.ts
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        a, b2 = ctx.transition(t, s)
        x = (2.0 - a) * x + b2 * ctx.score(x, t) + math.sqrt(b2) * ctx.randn()
        x = ctx.step_done(i, x)
    return x


def ancestral(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    r"""Ancestral (DDPM) sampling from the exact posterior $q(x_s | x_t, \hat x_0)$:
    mean $(x + b^2\hat s)/a$ (Ho et al.'s form), variance $b^2\sigma_s^2/\sigma_t^2$."""
    ts = ctx.ts
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        a, b2 = ctx.transition(t, s)
        std = math.sqrt(b2) * ctx.coefs(s).sigma / ctx.coefs(t).sigma
        x = (x + b2 * ctx.score(x, t)) / a + std * ctx.randn()
        x = ctx.step_done(i, x)
    return x


def ddim(ctx: Context, x: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
    r"""DDIM (Song, Meng & Ermon 2021) for any linear SDE:
    $x_s = m_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\varepsilon + c z$,
    $\hat\varepsilon = -\sigma_t\hat s$, $c = \eta\,b\,\sigma_s/\sigma_t$.
    η = 0 is deterministic (equals DPM-Solver-1), η = 1 is ancestral sampling."""
    ts = ctx.ts
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        ct, cs = ctx.coefs(t), ctx.coefs(s)
        sc = ctx.score(x, t)
        x0 = tweedie_mean(x, sc, ct.m, ct.sigma ** 2)
        eps = -ct.sigma * sc
        if eta > 0:
            _, b2 = ctx.transition(t, s)
            c = eta * math.sqrt(b2) * cs.sigma / ct.sigma
            x = cs.m * x0 + math.sqrt(max(cs.sigma ** 2 - c * c, 0.0)) * eps + c * ctx.randn()
        else:
            x = cs.m * x0 + cs.sigma * eps
        x = ctx.step_done(i, x)
    return x


def _snr_norm(snr_norm: str) -> bool:
    if snr_norm not in ("batch", "per-sample"):
        raise ValueError(f"snr_norm must be 'batch' or 'per-sample', got {snr_norm!r}")
    return snr_norm == "per-sample"


def _langevin_step(ctx: Context, x: torch.Tensor, t: float, snr: float, alpha: float, per_sample: bool):
    """One Langevin corrector step with Song et al.'s signal-to-noise step-size rule."""
    grad = ctx.score(x, t)
    z = ctx.randn()
    if per_sample:
        gn = grad.flatten(1).norm(dim=1)
        zn = z.flatten(1).norm(dim=1)
        eps = (2.0 * alpha) * (snr * zn / gn) ** 2
        eps = eps.reshape(-1, *([1] * (x.dim() - 1)))
    else:  # score_sde's batch-averaged norms (couples the samples of a batch)
        eps = (2.0 * alpha) * (snr * z.flatten(1).norm(dim=1).mean() / grad.flatten(1).norm(dim=1).mean()) ** 2
        return x + eps * grad + (2.0 * eps).sqrt() * z
    return x + eps * grad + torch.sqrt(2.0 * eps) * z


def pc(ctx: Context, x: torch.Tensor, snr: float = 0.16, n_corrector: int = 1, snr_norm: str = "batch"
       ) -> torch.Tensor:
    r"""Predictor–corrector (Song et al. 2021): per step, ``n_corrector`` Langevin corrector steps
    at t (step $2\alpha(\mathrm{snr}\,\|z\|/\|\hat s\|)^2$, $\alpha = a^2$), then the
    reverse-diffusion predictor to s. ``snr_norm="batch"`` (default) is score_sde's rule with
    batch-mean norms (it couples the samples of a batch); ``"per-sample"`` uses each sample's own
    norms, so a sample never depends on its batch, but it is biased in low dimension, where
    $\|z\|$ and $\|\hat s\|$ do not concentrate (measured: +6% std after 50
    steps at d = 2, none visible at d = 256)."""
    ts = ctx.ts
    per_sample = _snr_norm(snr_norm)
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        a, b2 = ctx.transition(t, s)
        for _ in range(n_corrector):
            x = _langevin_step(ctx, x, t, snr, a * a, per_sample)
        x = (2.0 - a) * x + b2 * ctx.score(x, t) + math.sqrt(b2) * ctx.randn()
        x = ctx.step_done(i, x)
    return x


def langevin(ctx: Context, x: torch.Tensor, step_size: float = None, snr: float = 0.16,
             snr_norm: str = "batch") -> torch.Tensor:
    r"""Unadjusted Langevin dynamics at the fixed noise level ``t = ts[0] = ts[-1]``:
    $x \leftarrow x + \epsilon\,\hat s(x,t) + \sqrt{2\epsilon}\,z$, ``steps`` iterations.
    ``step_size`` ε, or (if None) Song et al.'s snr rule (see `pc` for ``snr_norm``)."""
    t = ctx.ts[0]
    per_sample = _snr_norm(snr_norm)
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size!r}")
    for i in range(ctx.n):
        if step_size is None:
            x = _langevin_step(ctx, x, t, snr, 1.0, per_sample)
        else:
            x = x + step_size * ctx.score(x, t) + math.sqrt(2.0 * step_size) * ctx.randn()
        x = ctx.step_done(i, x)
    return x


def annealed_langevin(ctx: Context, x: torch.Tensor, step_size: float = 2e-5, n_inner: int = 100) -> torch.Tensor:
    r"""Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the noise ladder given by the
    grid: at each level $t_i$ (i = 0..N, descending noise), ``n_inner`` steps
    $x \leftarrow x + \tfrac{\alpha_i}{2}\hat s + \sqrt{\alpha_i} z$ with
    $\alpha_i = \epsilon\,\sigma_i^2/\sigma_N^2$ (ε = ``step_size``, σ the kernel std).
    The score is evaluated only at the grid's noise levels."""
    ts = ctx.ts
    s_last = ctx.coefs(ts[-1]).sigma
    for i, t in enumerate(ts):
        alpha = step_size * (ctx.coefs(t).sigma / s_last) ** 2
        for _ in range(n_inner):
            x = x + (0.5 * alpha) * ctx.score(x, t) + math.sqrt(alpha) * ctx.randn()
        if i < ctx.n:
            x = ctx.step_done(i, x)
    return x


# ----------------------------------------------------------------------------------------------
# Declarations (registered in METHODS; options: defaults from the signatures above)
# ----------------------------------------------------------------------------------------------

_SNR = (float, positive("snr"))
_SNR_NORM = (str, one_of("snr_norm", "batch", "per-sample"))

grid_method(euler, problem="ode", noise=(), strong_order=1, weak_order=None, evals_per_step=1, stochastic=False,
            doc="explicit Euler on the PF ODE")
grid_method(heun, problem="ode", noise=(), strong_order=2, weak_order=None, evals_per_step=2, stochastic=True,
            stochastic_option="churn",
            options=options_of(heun, churn=(float, nonnegative("churn")), churn_min=(float, nonnegative("churn_min")),
                               churn_max=(float, positive_or_inf("churn_max")),
                               churn_noise=(float, nonnegative("churn_noise"))),
            doc="Heun (EDM Alg. 2), optional churn")
grid_method(rk4, problem="ode", noise=(), strong_order=4, weak_order=None, evals_per_step=4, stochastic=False,
            doc="classical Runge-Kutta 4")
grid_method(euler_maruyama, problem="sde", noise=ALL_NOISE, strong_order=0.5, weak_order=1.0, evals_per_step=1,
            stochastic=True, doc="Euler-Maruyama (strong order 1 for additive noise)")
grid_method(stochastic_heun, problem="sde", noise=("isotropic",), strong_order=1.0, weak_order=2.0, evals_per_step=2,
            stochastic=True, doc="stochastic Heun for additive noise")
grid_method(reverse_diffusion, problem="score", noise=("isotropic",), strong_order=0.5, weak_order=1.0,
            evals_per_step=1, stochastic=True, doc="Song et al.'s reverse-diffusion predictor")
grid_method(ancestral, problem="score", noise=("isotropic",), strong_order=0.5, weak_order=1.0, evals_per_step=1,
            stochastic=True, doc="DDPM ancestral sampling")
grid_method(pc, problem="score", noise=("isotropic",), strong_order=0.5, weak_order=1.0, evals_per_step=2,
            stochastic=True,
            options=options_of(pc, snr=_SNR, n_corrector=(int, at_least("n_corrector", 0)), snr_norm=_SNR_NORM),
            doc="predictor-corrector: reverse diffusion + Langevin corrector (evals/step = 1 + n_corrector)")
# The same update as dpm_solver_1 (tested); the grids differ on purpose: DDIM's published
# schedules are uniform (or quadratic) in t, DPM-Solver's is uniform in log-SNR.
grid_method(ddim, problem="score", noise=("isotropic",), strong_order=1.0, weak_order=1.0, evals_per_step=1,
            stochastic=True, stochastic_option="eta", options=options_of(ddim, eta=(float, nonnegative("eta"))),
            doc="DDIM(eta); eta = 0 is dpm_solver_1's update (on a uniform grid), eta > 0 draws noise")
grid_method(langevin, problem="score", noise=("isotropic",), strong_order=0.0, weak_order=None, evals_per_step=1,
            stochastic=True, fixed_level=True,
            options=options_of(langevin, step_size=(float, positive("step_size")), snr=_SNR, snr_norm=_SNR_NORM),
            doc="unadjusted Langevin at a fixed noise level (t_start == t_end)")
grid_method(annealed_langevin, problem="score", noise=("isotropic",), strong_order=0.0, weak_order=None,
            evals_per_step=100, stochastic=True,
            options=options_of(annealed_langevin, step_size=(float, positive("step_size")),
                               n_inner=(int, at_least("n_inner", 1))),
            doc="annealed Langevin over a noise ladder (evals/level = n_inner)")
