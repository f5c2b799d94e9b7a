r"""``python -m sdekit demo``: a tour of sdekit on a custom SDE that has no closed-form kernel.

1. Define $dx = f(t)x\,dt + g(t)\,dW$ from two lambdas (with a sin term) and compare the
   numeric kernel $m(t)$, $\sigma(t)$ with independent ``scipy.integrate.quad`` values.
2. Push a 2-D, 3-mode Gaussian mixture through it (exact marginals) and check that the exact
   marginal density solves the Fokker–Planck equation (residual at round-off level).
3. Sample the mixture back with the reverse SDE (plain Euler–Maruyama loop) and the
   probability-flow ODE (adaptive dopri5 through sdekit.solve), both driven by the exact score, and
   compare the samples' mean and covariance with the exact ones.

Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List

import torch

__all__ = ["run_demo", "CUSTOM_F", "CUSTOM_G"]

F64 = torch.float64

# The custom process (torch versions for sdekit; math versions for the quadrature reference).
CUSTOM_F = lambda t: -0.5 * (1 + 0.8 * torch.sin(5 * t))  # noqa: E731
CUSTOM_G = lambda t: torch.sqrt(1 + 0.8 * torch.sin(5 * t)) + 0.3 * t  # noqa: E731
_F_MATH = lambda u: -0.5 * (1 + 0.8 * math.sin(5 * u))  # noqa: E731
_G_MATH = lambda u: math.sqrt(1 + 0.8 * math.sin(5 * u)) + 0.3 * u  # noqa: E731
T_END = 2.0


def _quad_reference(t: float):
    """m(t), sigma(t) by nested adaptive quadrature: log m = int_0^t f, sigma^2 = m^2 int_0^t g^2/m^2."""
    from scipy.integrate import quad

    opts = dict(epsabs=0.0, epsrel=1e-13, limit=200)
    log_m = lambda s: quad(_F_MATH, 0.0, s, **opts)[0]  # noqa: E731
    inner = quad(lambda u: _G_MATH(u) ** 2 * math.exp(-2.0 * log_m(u)), 0.0, t, **opts)[0]
    lm = log_m(t)
    return math.exp(lm), math.exp(lm) * math.sqrt(inner)


def _fmt_vec(v: torch.Tensor) -> str:
    return "[" + ", ".join(f"{float(a):+.4f}" for a in v.flatten()) + "]"


def _fmt_cov(c: torch.Tensor) -> str:
    return "[" + "; ".join(" ".join(f"{float(a):+.4f}" for a in row) for row in c) + "]"


def _moments(x: torch.Tensor):
    mean = x.mean(0)
    xc = x - mean
    return mean, xc.T @ xc / (x.shape[0] - 1)


def run_demo(seed: int = 0, n_samples: int = 4000, sde_steps: int = 500,
             out=print) -> Dict[str, float]:
    """Run the demo, printing through ``out``; returns the headline numbers.

    Runs single-threaded (restored afterwards): its tensors are small, and on a busy machine
    intra-op threads cost far more in synchronisation than they save.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(seed, n_samples, sde_steps, out)
    finally:
        torch.set_num_threads(threads)


def _run(seed, n_samples, sde_steps, out):
    from .solvers import solve

    import sdekit
    from sdekit.fokker_planck import fokker_planck_residual
    from sdekit.oracles import GaussianMixture

    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    results: Dict[str, float] = {}

    # -- 1. the kernel of a custom SDE ---------------------------------------------------------
    out("sdekit demo (seed %d)" % seed)
    out("")
    out("1. A custom linear SDE  dx = f(t) x dt + g(t) dW  with no closed-form kernel:")
    out("     f(t) = -0.5 (1 + 0.8 sin 5t),   g(t) = sqrt(1 + 0.8 sin 5t) + 0.3 t,   T = %g" % T_END)
    sde = sdekit.LinearSDE(CUSTOM_F, CUSTOM_G, T=T_END)
    out("   kernel: %r" % (sde.kernel,))
    out("   %-8s %-20s %-20s %-9s  %-20s %-20s %-9s" % ("t", "m(t) sdekit", "m(t) quad", "rel.err",
                                                      "sigma(t) sdekit", "sigma(t) quad", "rel.err"))
    times: List[float] = [1e-4, 0.01, 0.1, 0.5, 1.0, 1.5, T_END]
    m_num, s_num = sde.marginal(torch.tensor(times, dtype=F64))
    worst = 0.0
    for i, t in enumerate(times):
        m_ref, s_ref = _quad_reference(t)
        em = abs(float(m_num[i]) / m_ref - 1.0)
        es = abs(float(s_num[i]) / s_ref - 1.0)
        worst = max(worst, em, es)
        out("   %-8g %-20.15g %-20.15g %-9.1e  %-20.15g %-20.15g %-9.1e"
            % (t, float(m_num[i]), m_ref, em, float(s_num[i]), s_ref, es))
    out("   max relative error of the numeric kernel vs quad: %.2e" % worst)
    results["kernel_max_rel_err"] = worst
    out("")

    # -- 2. exact mixture marginals solve the Fokker-Planck equation -------------------------
    gm = GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
        covs=[[[0.30, 0.10], [0.10, 0.20]], [[0.15, -0.05], [-0.05, 0.40]], [[0.25, 0.0], [0.0, 0.10]]],
    )
    out("2. Data: a 2-D Gaussian mixture with 3 modes; its marginal p_t under the SDE is exact.")
    log_p = gm.exact_log_prob(sde)
    fp_worst = 0.0
    parts = []
    for t in (0.05, 0.5, 1.0, T_END):
        x = gm.push(sde, t).sample(256, generator=gen)
        r = fokker_planck_residual(sde, log_p, x, t)
        v = float(r.abs().max())
        fp_worst = max(fp_worst, v)
        parts.append("t=%g: %.1e" % (t, v))
    out("   Fokker-Planck residual max |R| over 256 points of p_t: " + ", ".join(parts))
    out("   Fokker-Planck residual max: %.2e" % fp_worst)
    results["fp_residual_max"] = fp_worst
    out("")

    # -- 3. sampling back with the exact score --------------------------------------------------
    t_eps = 1e-3
    score = gm.exact_score(sde)
    target = gm.push(sde, t_eps)
    mean_ref, cov_ref = target.mean, target.covariance
    x_T = gm.push(sde, T_END).sample(n_samples, generator=gen)
    out("3. Sampling p_{t_eps} (t_eps = %g) from %d exact samples of p_T with the exact score." % (t_eps, n_samples))
    out("   exact       mean %s   cov %s" % (_fmt_vec(mean_ref), _fmt_cov(cov_ref)))

    # reverse SDE, eta = 1: Euler-Maruyama from T down to t_eps
    rev = sde.reverse(score, eta=1.0, t_eps=t_eps)
    sol = solve(rev, x_T, method="euler_maruyama", steps=sde_steps, generator=gen)
    mean_sde, cov_sde = _moments(sol.x)
    out("   reverse SDE mean %s   cov %s   (euler_maruyama, %d steps, nfe %d)"
        % (_fmt_vec(mean_sde), _fmt_cov(cov_sde), sde_steps, sol.stats.nfe))

    # probability-flow ODE, adaptive dopri5 through the torchdiffeq backend
    pf = sde.probability_flow(score, t_eps=t_eps)
    sol = solve(pf, x_T, method="torchdiffeq:dopri5", rtol=1e-6, atol=1e-6)
    mean_ode, cov_ode = _moments(sol.x)
    out("   PF ODE      mean %s   cov %s   (torchdiffeq:dopri5, rtol=atol=1e-6, nfe %d)"
        % (_fmt_vec(mean_ode), _fmt_cov(cov_ode), sol.stats.nfe))
    err_sde = max(float((mean_sde - mean_ref).abs().max()), float((cov_sde - cov_ref).abs().max()))
    err_ode = max(float((mean_ode - mean_ref).abs().max()), float((cov_ode - cov_ref).abs().max()))
    v = float(cov_ref.diagonal().max())
    out("   max |moment error|: reverse SDE %.3f, PF ODE %.3f (Monte Carlo standard error: "
        "mean %.3f, covariance %.3f)" % (err_sde, err_ode, math.sqrt(v / n_samples), v * math.sqrt(2.0 / n_samples)))
    results.update(moment_err_sde=err_sde, moment_err_ode=err_ode)
    out("")
    elapsed = time.perf_counter() - t_start
    out("done in %.1f s" % elapsed)
    results["seconds"] = elapsed
    return results
