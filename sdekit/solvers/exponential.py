r"""Exponential integrators for the probability-flow ODE of any linear SDE: DPM-Solver and DPM-Solver++.

Everything is built from the process's own kernel — $m(t)$, $\sigma(t)$ and the
log-SNR from ``ctx.coefs`` and ``kernel.t_from_log_snr`` — so a custom (numeric-kernel)
`LinearSDE` is solved exactly as VP is.

Notation (Lu et al. 2022a, "DPM-Solver", and 2022b, "DPM-Solver++"): $\alpha_t = m(t)$,
$\sigma_t = \sigma(t)$, $\lambda_t = \log(\alpha_t/\sigma_t)$. **Careful:** sdekit's
log-SNR ``ctx.coefs(t).lam`` is $\log(m^2/\sigma^2) = 2\lambda_t$. One step goes from ``t``
to ``s`` (``s < t`` when sampling), $h = \lambda_s - \lambda_t$ (negative when encoding,
``t_eps → T``). Model outputs are computed from the score $\hat s$:
noise prediction $\hat\varepsilon = -\sigma_t\hat s$, data prediction
$\hat x_0 = (x + \sigma_t^2\hat s)/\alpha_t$.

The PF ODE solved exactly in its linear part reads (DPM-Solver eq. 3.4; its data-prediction form
in DPM-Solver++ §3)

$$
    x_s = \frac{\alpha_s}{\alpha_t}x_t - \alpha_s\int_{\lambda_t}^{\lambda_s} e^{-\lambda}\hat\varepsilon\,d\lambda
    = \frac{\sigma_s}{\sigma_t}x_t + \sigma_s\int_{\lambda_t}^{\lambda_s} e^{\lambda}\hat x_0\,d\lambda .
$$

Both are the same update in a *frame* $(A, B, H)$: noise prediction uses
$(\alpha_s/\alpha_t,\ \sigma_s,\ h)$, data prediction $(\sigma_s/\sigma_t,\ \alpha_s,\ -h)$,
and a Taylor expansion $M(\lambda) = M + (\lambda-\lambda_t)M' + \dots$ of the model output
$M \in \{\hat\varepsilon, \hat x_0\}$ gives

$$
    x_s = A\,x_t - B\big[\varphi_1(H)\,M + \varphi_2(H)\,hM' + \varphi_3(H)\,h^2 M'' + \dots\big],
$$

$$
    \varphi_1(H) = e^H - 1,\quad \varphi_2(H) = \frac{e^H - 1}{H} - 1,\quad
    \varphi_3(H) = \frac{\varphi_2(H)}{H} - \frac12 .
$$

(These are the ``phi_1, phi_2, phi_3`` of the reference implementation ``dpm_solver_pytorch``;
its data-prediction branch writes ``expm1(-h)``, ``phi_1/h + 1`` — the same numbers with the sign
of $H$ folded in.) Every method below is this formula with $hM'$, $h^2M''$
replaced by differences of model outputs.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from ._checks import nonnegative, one_of, open_interval
from ..parameterization import tweedie_mean
from .context import Coefs, Context
from .fixed import grid_method
from .registry import options_of

__all__ = ["dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"]

F64 = torch.float64

#: Below this many steps the multistep methods lower their order in the last steps (the published
#: implementations' ``lower_order_final``; diffusers uses the same threshold of 15).
LOWER_ORDER_FINAL_BELOW = 15


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _lam(c: Coefs) -> float:
    """DPM-Solver's $\\lambda_t = \\log(\\alpha_t/\\sigma_t)$ = half of sdekit's log-SNR."""
    return 0.5 * c.lam


def _check_predict(predict: str) -> bool:
    """True for data prediction, False for noise prediction."""
    if predict not in ("data", "noise"):
        raise ValueError(f"predict must be 'data' or 'noise', got {predict!r}")
    return predict == "data"


def _model(ctx: Context, x: torch.Tensor, t: float, data: bool) -> torch.Tensor:
    r"""One counted score evaluation, as $\hat x_0 = (x + \sigma_t^2\hat s)/\alpha_t$ or
    $\hat\varepsilon = -\sigma_t\hat s$."""
    c = ctx.coefs(t)
    s = ctx.score(x, t)
    if data:
        return tweedie_mean(x, s, c.m, c.sigma * c.sigma)
    return (-c.sigma) * s


def _frame(ct: Coefs, cs: Coefs, data: bool) -> Tuple[float, float, float]:
    r"""``(A, B, H)`` of the step t → s: noise $(\alpha_s/\alpha_t, \sigma_s, h)$,
    data $(\sigma_s/\sigma_t, \alpha_s, -h)$ (see the module docs)."""
    h = _lam(cs) - _lam(ct)
    if data:
        return cs.sigma / ct.sigma, cs.m, -h
    return cs.m / ct.m, cs.sigma, h


def _phis(H: float) -> Tuple[float, float, float]:
    r"""$\varphi_1 = e^H - 1$, $\varphi_2 = \varphi_1/H - 1$, $\varphi_3 = \varphi_2/H - 1/2$.

    For $|H| < 10^{-2}$ the Taylor series (5 terms) replaces the cancelling differences."""
    if abs(H) < 1e-2:
        p1 = H * (1 + H / 2 * (1 + H / 3 * (1 + H / 4 * (1 + H / 5))))
        p2 = H / 2 * (1 + H / 3 * (1 + H / 4 * (1 + H / 5 * (1 + H / 6))))
        p3 = H / 6 * (1 + H / 4 * (1 + H / 5 * (1 + H / 6 * (1 + H / 7))))
        return p1, p2, p3
    p1 = math.expm1(H)
    p2 = p1 / H - 1.0
    return p1, p2, p2 / H - 0.5


def _intermediate_times(ctx: Context, rs: Sequence[float]) -> List[List[float]]:
    r"""For each fraction ``r`` and each step i, the time with $\lambda = \lambda_{t_i} + r h_i$.

    One vectorised call of ``kernel.t_from_log_snr`` for all of them; their coefficients are
    prepared with ``ctx.prepare`` so the stepping loop issues no coefficient kernels."""
    lam = torch.tensor([ctx.coefs(t).lam for t in ctx.ts], dtype=F64)
    target = torch.stack([lam[:-1] + r * (lam[1:] - lam[:-1]) for r in rs])
    times = ctx.sde.kernel.t_from_log_snr(target.flatten()).reshape(target.shape).tolist()
    ctx.prepare(t for row in times for t in row)
    return times


def _check_fraction(r: float, name: str, lo: float = 0.0) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (lo < float(r) < 1.0):
        raise ValueError(f"{name} must lie strictly between {lo:g} and 1, got {r!r}")
    return float(r)


def _check_bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------
# Singlestep DPM-Solver (Lu et al. 2022a) — noise prediction by default
# ----------------------------------------------------------------------------------------------


def dpm_solver_1(ctx: Context, x: torch.Tensor, predict: str = "noise") -> torch.Tensor:
    r"""DPM-Solver-1 (Lu et al. 2022a, eq. 3.7) = DDIM with η = 0.

    Noise prediction: $x_s = \frac{\alpha_s}{\alpha_t}x - \sigma_s(e^h - 1)\hat\varepsilon_t$.
    Data prediction (DPM-Solver++, first order):
    $x_s = \frac{\sigma_s}{\sigma_t}x - \alpha_s(e^{-h} - 1)\hat x_{0,t}$ — the same numbers.
    One score evaluation per step.
    """
    data = _check_predict(predict)
    ts = ctx.ts
    for i in range(ctx.n):
        ct, cs = ctx.coefs(ts[i]), ctx.coefs(ts[i + 1])
        A, B, H = _frame(ct, cs, data)
        M = _model(ctx, x, ts[i], data)
        x = ctx.step_done(i, A * x - (B * math.expm1(H)) * M)
    return x


def dpm_solver_2(ctx: Context, x: torch.Tensor, predict: str = "noise", r1: float = 0.5) -> torch.Tensor:
    r"""Singlestep DPM-Solver-2 (Lu et al. 2022a, Algorithm 1); ``predict="data"`` is DPM-Solver++(2S)
    (Lu et al. 2022b, Algorithm 1).

    Per step, with $s_1 = t_\lambda(\lambda_t + r_1 h)$ (noise prediction shown):

    $$
        \begin{aligned}
        u &= \frac{\alpha_{s_1}}{\alpha_t}x - \sigma_{s_1}(e^{r_1h} - 1)\hat\varepsilon(x, t) \\
        x_s &= \frac{\alpha_s}{\alpha_t}x - \sigma_s(e^h - 1)\hat\varepsilon(x, t)
        - \frac{\sigma_s}{2r_1}(e^h - 1)\big(\hat\varepsilon(u, s_1) - \hat\varepsilon(x, t)\big).
        \end{aligned}
    $$

    Two score evaluations per step (NFE = 2 · steps). $r_1$ is taken as the realised
    $(\lambda_{s_1} - \lambda_t)/h$ so the coefficients match the time actually visited.
    """
    data = _check_predict(predict)
    r1 = _check_fraction(r1, "r1")
    ts = ctx.ts
    (mid,) = _intermediate_times(ctx, [r1])
    for i in range(ctx.n):
        t, s1, s = ts[i], mid[i], ts[i + 1]
        ct, c1, cs = ctx.coefs(t), ctx.coefs(s1), ctx.coefs(s)
        A1, B1, H1 = _frame(ct, c1, data)
        A, B, H = _frame(ct, cs, data)
        r = H1 / H
        M = _model(ctx, x, t, data)
        u = A1 * x - (B1 * math.expm1(H1)) * M
        D = _model(ctx, u, s1, data) - M
        e1 = math.expm1(H)
        x = ctx.step_done(i, A * x - (B * e1) * M - (B * e1 / (2.0 * r)) * D)
    return x


def dpm_solver_3(ctx: Context, x: torch.Tensor, predict: str = "noise", r1: float = 1.0 / 3.0,
                 r2: float = 2.0 / 3.0) -> torch.Tensor:
    r"""Singlestep DPM-Solver-3 (Lu et al. 2022a, Algorithm 2, $r_1 = 1/3$, $r_2 = 2/3$).

    Noise prediction shown (data prediction: the same in the frame of the module docs):

    $$
        \begin{aligned}
        u_1 &= \frac{\alpha_{s_1}}{\alpha_t}x - \sigma_{s_1}(e^{r_1h} - 1)\hat\varepsilon_t \\
        D_1 &= \hat\varepsilon(u_1, s_1) - \hat\varepsilon_t \\
        u_2 &= \frac{\alpha_{s_2}}{\alpha_t}x - \sigma_{s_2}(e^{r_2h} - 1)\hat\varepsilon_t
        - \frac{\sigma_{s_2}r_2}{r_1}\Big(\frac{e^{r_2h} - 1}{r_2h} - 1\Big)D_1 \\
        D_2 &= \hat\varepsilon(u_2, s_2) - \hat\varepsilon_t \\
        x_s &= \frac{\alpha_s}{\alpha_t}x - \sigma_s(e^h - 1)\hat\varepsilon_t
        - \frac{\sigma_s}{r_2}\Big(\frac{e^h - 1}{h} - 1\Big)D_2 .
        \end{aligned}
    $$

    Three score evaluations per step (NFE = 3 · steps).
    """
    data = _check_predict(predict)
    r1 = _check_fraction(r1, "r1")
    r2 = _check_fraction(r2, "r2", lo=r1)
    ts = ctx.ts
    mid1, mid2 = _intermediate_times(ctx, [r1, r2])
    for i in range(ctx.n):
        t, s1, s2, s = ts[i], mid1[i], mid2[i], ts[i + 1]
        ct, c1, c2, cs = ctx.coefs(t), ctx.coefs(s1), ctx.coefs(s2), ctx.coefs(s)
        A1, B1, H1 = _frame(ct, c1, data)
        A2, B2, H2 = _frame(ct, c2, data)
        A, B, H = _frame(ct, cs, data)
        q1, q2 = H1 / H, H2 / H  # realised r1, r2
        M = _model(ctx, x, t, data)
        u1 = A1 * x - (B1 * math.expm1(H1)) * M
        D1 = _model(ctx, u1, s1, data) - M
        u2 = A2 * x - (B2 * math.expm1(H2)) * M - (B2 * q2 / q1 * _phis(H2)[1]) * D1
        D2 = _model(ctx, u2, s2, data) - M
        p1, p2, _ = _phis(H)
        x = ctx.step_done(i, A * x - (B * p1) * M - (B * p2 / q2) * D2)
    return x


# ----------------------------------------------------------------------------------------------
# Multistep DPM-Solver++ (Lu et al. 2022b) — data prediction by default
# ----------------------------------------------------------------------------------------------


def _multistep(ctx: Context, x: torch.Tensor, order: int, data: bool, lower_order_final: bool,
               third_order_factor: float = 2.0) -> torch.Tensor:
    r"""Multistep update of ``order`` 1..3, one score evaluation per step (the last state's model
    output is never needed). Warm-up: step i uses order $\min(\text{order}, i + 1)$.
    Final steps (``lower_order_final`` and fewer than 15 steps): step i uses at most
    $n - i$ (first order for the last step, ≤ 2 for the one before)."""
    ts, n = ctx.ts, ctx.n
    Ms: List[torch.Tensor] = []  # model outputs, latest last (at most 3 kept)
    lams: List[float] = []
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        ct, cs = ctx.coefs(t), ctx.coefs(s)
        Ms = (Ms + [_model(ctx, x, t, data)])[-3:]
        lams = (lams + [_lam(ct)])[-3:]
        k = min(order, i + 1)
        if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
            k = min(k, n - i)
        A, B, H = _frame(ct, cs, data)
        h = _lam(cs) - lams[-1]
        p1, p2, p3 = _phis(H)
        M0 = Ms[-1]
        if k == 1:  # DPM-Solver-1 / DDIM
            x = A * x - (B * p1) * M0
        elif k == 2:  # DPM-Solver++(2M), Lu et al. 2022b Alg. 2 ("midpoint" form)
            r0 = (lams[-1] - lams[-2]) / h
            D1 = (M0 - Ms[-2]) / r0
            x = A * x - (B * p1) * M0 - (0.5 * B * p1) * D1
        else:  # third order: D1 ≈ h M', D2 ≈ h² M''/2 from three past outputs
            r0 = (lams[-1] - lams[-2]) / h
            r1 = (lams[-2] - lams[-3]) / h
            D1_0 = (M0 - Ms[-2]) / r0
            D1_1 = (Ms[-2] - Ms[-3]) / r1
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            x = A * x - (B * p1) * M0 - (B * p2) * D1 - (third_order_factor * B * p3) * D2
        x = ctx.step_done(i, x)
    return x


def dpmpp_2m(ctx: Context, x: torch.Tensor, predict: str = "data", lower_order_final: bool = True) -> torch.Tensor:
    r"""DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction.

    With $h_i = \lambda_{t_i} - \lambda_{t_{i-1}}$, $r_i = h_{i-1}/h_i$:

    $$
        D_i = \Big(1 + \frac{1}{2r_i}\Big)\hat x_0(t_{i-1}) - \frac{1}{2r_i}\hat x_0(t_{i-2}),\qquad
        x_{t_i} = \frac{\sigma_{t_i}}{\sigma_{t_{i-1}}}x_{t_{i-1}} - \alpha_{t_i}(e^{-h_i} - 1)D_i .
    $$

    The first step is first order (no history). With ``lower_order_final`` (default) and fewer
    than 15 steps the last step is first order, as in the published implementations.
    ``predict="noise"`` gives multistep DPM-Solver-2 (noise prediction). NFE = steps.
    """
    return _multistep(ctx, x, 2, _check_predict(predict), _check_bool(lower_order_final, "lower_order_final"))


def dpmpp_3m(ctx: Context, x: torch.Tensor, predict: str = "data", lower_order_final: bool = True,
             published_form: bool = False) -> torch.Tensor:
    r"""DPM-Solver++(3M): third-order multistep, data prediction (the order-3 multistep update of the
    reference implementation ``dpm_solver_pytorch``, with the factor below).

    With the three latest outputs $M_0, M_1, M_2$ (newest first), $r_0 = h_0/h$,
    $r_1 = h_1/h$:

    $$
        D_{1,0} = \frac{M_0 - M_1}{r_0},\ D_{1,1} = \frac{M_1 - M_2}{r_1},\
        D_1 = D_{1,0} + \frac{r_0}{r_0 + r_1}(D_{1,0} - D_{1,1}),\ D_2 = \frac{D_{1,0} - D_{1,1}}{r_0 + r_1},
    $$

    $$
        x_s = A x - B\big[\varphi_1 M_0 + \varphi_2 D_1 + 2\varphi_3 D_2\big]
    $$

    (frame and $\varphi_k$ as in the module docs). $D_1 \approx hM'$ and
    $D_2 \approx h^2M''/2$, so the Taylor term $\varphi_3 h^2 M''$ needs the factor 2.
    The reference implementations (``dpm_solver_pytorch``'s ``multistep_dpm_solver_third_update``,
    k-diffusion's ``sample_dpmpp_3m_sde``) use $\varphi_3 D_2$ without it, which makes the
    method second order only; ``published_form=True`` reproduces ``dpm_solver_pytorch`` exactly
    (tested to 1e-12; k-diffusion's ``sample_dpmpp_3m_sde`` at η = 0 differs from it only in its
    second-order warm-up step). Measured: on Gaussian data the default is 3-10x more accurate at
    20-50 steps; on a 2-D mixture with sharp modes the published form is ~1.8x more accurate.

    Warm-up steps use orders 1 and 2 (the first-order first step has local error O(h²), so the
    asymptotic global order is 2 unless the model output is nearly constant there, as it is at
    high noise when sampling); ``lower_order_final`` as in `dpmpp_2m` (order ≤ 2 in the
    second-to-last step, 1 in the last, below 15 steps). NFE = steps.
    """
    factor = 1.0 if _check_bool(published_form, "published_form") else 2.0
    return _multistep(ctx, x, 3, _check_predict(predict), _check_bool(lower_order_final, "lower_order_final"),
                      third_order_factor=factor)


def dpmpp_2m_sde(ctx: Context, x: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    r"""DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``, 'midpoint'), for any α.

    k-diffusion works in VE scaling, $\sigma_{kd} = \sigma/\alpha = e^{-\lambda}$,
    $x_{kd} = x/\alpha$. Rewritten for a general $\alpha_t$ (with
    $\kappa = 1 - e^{-(1+\eta)h}$, $r = h_{i-1}/h_i$, $z \sim N(0, I)$):

    $$
        x_s = \frac{\sigma_s}{\sigma_t}e^{-\eta h}x + \alpha_s\kappa\,\hat x_0(t)
        + \frac{\alpha_s\kappa}{2r}\big(\hat x_0(t) - \hat x_0(t_{prev})\big)
        + \sigma_s\sqrt{1 - e^{-2\eta h}}\,z .
    $$

    η = 1 (default) is SDE-DPM-Solver++(2M) (Lu et al. 2022b; its first-order member is
    $x_s = \frac{\sigma_s}{\sigma_t}e^{-h}x + \alpha_s(1 - e^{-2h})\hat x_0 +
    \sigma_s\sqrt{1 - e^{-2h}}z$); η = 0 is the deterministic DPM-Solver++(2M) without
    lower-order final steps. The first step is first order. Accepts a ReverseSDE or a PF ODE of
    a linear SDE (only its score is used); runs from high to low noise; noise from the solve's
    generator. NFE = steps.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    eta = float(eta)
    ts = ctx.ts
    M_prev, h_prev = None, None
    for i in range(ctx.n):
        t, s = ts[i], ts[i + 1]
        ct, cs = ctx.coefs(t), ctx.coefs(s)
        h = _lam(cs) - _lam(ct)
        M = _model(ctx, x, t, True)
        kappa = -math.expm1(-(1.0 + eta) * h)
        x = (cs.sigma / ct.sigma * math.exp(-eta * h)) * x + (cs.m * kappa) * M
        if M_prev is not None:
            x = x + (cs.m * kappa * 0.5 * h / h_prev) * (M - M_prev)
        if eta > 0:
            x = x + (cs.sigma * math.sqrt(-math.expm1(-2.0 * eta * h))) * ctx.randn()
        M_prev, h_prev = M, h
        x = ctx.step_done(i, x)
    return x


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------

def _reg(fn, order: int, weak: float, evals: int, stochastic: bool, doc: str, strong=None, **options) -> None:
    grid_method(fn, problem="score", noise=("isotropic",), strong_order=order if strong is None else strong,
                weak_order=weak, evals_per_step=evals, stochastic=stochastic,
                stochastic_option="eta" if stochastic else None, options=options_of(fn, **options),
                default_grid="log_snr", doc=doc)


_P = (str, one_of("predict", "data", "noise"))  # option declarations: (type, validator)
_R = (float, open_interval("r1", 0.0, 1.0))
_LOF = bool
_reg(dpm_solver_1, 1, 1, 1, False, "DPM-Solver-1 (= DDIM eta=0), exponential integrator", predict=_P)
_reg(dpm_solver_2, 2, 2, 2, False, "singlestep DPM-Solver-2 (noise prediction; predict='data' for ++)",
     predict=_P, r1=_R)
_reg(dpm_solver_3, 3, 3, 3, False, "singlestep DPM-Solver-3 (noise prediction; predict='data' for ++)",
     predict=_P, r1=_R, r2=(float, open_interval("r2", 0.0, 1.0)))
_reg(dpmpp_2m, 2, 2, 1, False, "multistep DPM-Solver++(2M), data prediction", predict=_P, lower_order_final=_LOF)
_reg(dpmpp_3m, 3, 3, 1, False, "multistep DPM-Solver++(3M), data prediction (third-order D2 weight; "
     "published_form=True for dpm_solver_pytorch's)", predict=_P, lower_order_final=_LOF, published_form=bool)
_reg(dpmpp_2m_sde, 1, 1, 1, True, "DPM-Solver++(2M) SDE (k-diffusion midpoint), any alpha", strong=1,
     eta=(float, nonnegative("eta")))
