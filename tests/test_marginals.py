"""Marginal agreement: forward simulation vs the kernel; reverse dynamics vs the exact marginals.

(a) Euler–Maruyama forward paths from a fixed x0 match N(m(t) x0, σ(t)² I).
(b) The reverse SDE (η = 1, 0.5) and the probability-flow ODE, driven by the exact mixture score
    and started from exact samples of p_T, reproduce p_t at t = 0.3 (two-sample energy distance
    against a measured noise floor); a wrong score (×0.7) fails the same check.
(c) The probability-flow ODE is invertible: forward t_eps → T and back returns the start point.

All statistical checks use fixed seeds (deterministic); their false-alarm rates are stated at
each check.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchdiffeq import odeint

import sdekit
from sdekit.oracles import GaussianMixture

F64 = torch.float64


def vp():
    return sdekit.VPSDE(0.1, 20.0, T=1.0)


def _beta(t):
    return 0.5 + 12.0 * t * (1 + 0.3 * torch.sin(8 * t))


def custom():
    """A linear SDE with oscillating coefficients (numeric quadrature + Hermite kernel):
    f = -β/2, g² = 1.3 β (1 + 0.2 cos 5t), β = 0.5 + 12 t (1 + 0.3 sin 8t); not variance preserving."""
    return sdekit.LinearSDE(lambda t: -0.5 * _beta(t),
                            lambda t: torch.sqrt(1.3 * _beta(t) * (1 + 0.2 * torch.cos(5 * t))), T=1.0)


PROCESSES = {"vp": vp, "custom": custom}


# ----------------------------------------------------------------------------------------------
# (a) Euler–Maruyama forward simulation vs the perturbation kernel
# ----------------------------------------------------------------------------------------------

EM_H = 4e-4  # step; 2500 steps on [0, 1]
EM_TIMES = (0.1, 0.3, 0.6, 1.0)
EM_PATHS, EM_DIM = 5000, 4  # n = 20000 standardised scalars per check
# Family-wise false-alarm rate 1e-4 over 2 processes x 4 times x 2 tests (Bonferroni).
EM_ALPHA = 1e-4 / (len(PROCESSES) * len(EM_TIMES) * 2)


def em_law(f, g2, h, steps):
    """The exact law of the EM chain x <- (1 + f_n h) x + g_n sqrt(h) z from a fixed x0:
    N(a_n x0, v_n) with a_{n+1} = (1 + f_n h) a_n, v_{n+1} = (1 + f_n h)^2 v_n + g_n^2 h."""
    a, v = np.ones(steps + 1), np.zeros(steps + 1)
    for i in range(steps):
        a[i + 1] = (1 + f[i] * h) * a[i]
        v[i + 1] = (1 + f[i] * h) ** 2 * v[i] + g2[i] * h
    return a, v


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_euler_maruyama_matches_kernel(name):
    sde = PROCESSES[name]()
    steps = int(round(sde.T / EM_H))
    # Euler–Maruyama with the (time-only) coefficients f(t), g(t) sampled at the step midpoints:
    # x_{n+1} = x_n + f(t_n + h/2) x_n h + g(t_n + h/2) ΔW_n. The state enters as in plain EM; the
    # midpoint removes the O(h) quadrature error of the coefficients (the left-point rule needs
    # about half the step for the same bias bound).
    grid = (torch.arange(steps, dtype=F64) + 0.5) * EM_H
    f, g = sde.f(grid), sde.g(grid)
    x0 = torch.tensor([1.5, -0.7, 0.0, 2.5], dtype=F64)
    n = EM_PATHS * EM_DIM
    # EM discretisation bias, computed exactly from the EM chain's Gaussian law (em_law) and
    # required to be a small fraction of the tests' standard errors: the standardised mean bias
    # |a_n - m| |x0| / sigma below 0.25 / sqrt(n), and the relative variance bias |v_n / sigma^2 - 1|
    # below 0.25 sqrt(2 / n). (Here it is at most ~0.2 of a standard error; a shift of 0.25 SE
    # raises the per-check false-alarm rate EM_ALPHA = 6e-6 by less than a factor 2.)
    a, v = em_law(f.numpy(), (g * g).numpy(), EM_H, steps)
    checkpoints = {int(round(t / EM_H)): t for t in EM_TIMES}
    for i, t in checkpoints.items():
        m, s2 = float(sde.kernel.m(torch.tensor(t, dtype=F64))), float(sde.kernel.sigma2(torch.tensor(t, dtype=F64)))
        assert abs(a[i] - m) * float(x0.abs().max()) / math.sqrt(s2) < 0.25 / math.sqrt(n), (t, a[i], m)
        assert abs(v[i] / s2 - 1) < 0.25 * math.sqrt(2 / n), (t, v[i], s2)

    gen = torch.Generator().manual_seed(2024)
    x = x0.expand(EM_PATHS, EM_DIM).clone()
    sqh = math.sqrt(EM_H)
    zcrit = stats.norm.isf(EM_ALPHA / 2)
    results = []
    for i in range(steps):
        x = x + f[i] * x * EM_H + g[i] * sqh * torch.randn(x.shape, generator=gen, dtype=F64)
        if i + 1 in checkpoints:
            t = checkpoints[i + 1]
            m, s = sde.marginal(t)
            Z = ((x - m * x0) / s).flatten()  # i.i.d. N(0, 1) if the kernel is right
            z_mean = float(Z.mean()) * math.sqrt(n)
            q = float((Z * Z).sum())  # chi-square with n degrees of freedom (mean known)
            p_var = 2 * min(stats.chi2.cdf(q, n), stats.chi2.sf(q, n))
            results.append((t, z_mean, q / n))
            assert abs(z_mean) < zcrit, (name, t, z_mean)
            assert p_var > EM_ALPHA, (name, t, q / n, p_var)
            if t == 1.0:
                # power: a 10% wrong kernel variance is rejected by the same test (~9 standard errors)
                q_wrong = q / 1.10
                assert 2 * min(stats.chi2.cdf(q_wrong, n), stats.chi2.sf(q_wrong, n)) < EM_ALPHA
    assert len(results) == len(EM_TIMES)


# ----------------------------------------------------------------------------------------------
# (b) Reverse SDE / PF ODE with the exact score reproduce the exact marginal
# ----------------------------------------------------------------------------------------------

N_SAMPLES = 2000
T_MID = 0.3
REV_H = 5e-4


def mixture_2d():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    mu = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=F64)
    covs = torch.tensor([[[0.4, 0.15], [0.15, 0.3]], [[0.25, -0.1], [-0.1, 0.5]], [[0.3, 0.0], [0.0, 0.2]]],
                        dtype=F64)
    return GaussianMixture(w, mu, covs)


def energy_distance(x, y):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (within-sample terms as U-statistics)."""
    n, m = len(x), len(y)
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)


def noise_floor(target, seed, repeats=30):
    """95th percentile of the energy distance between two independent exact samples of `target`."""
    g = torch.Generator().manual_seed(seed)
    null = [energy_distance(target.sample(N_SAMPLES, generator=g), target.sample(N_SAMPLES, generator=g))
            for _ in range(repeats)]
    return float(np.quantile(null, 0.95))


def reverse_em(sde, score, eta, x, t_end, seed):
    """Plain Euler–Maruyama for the reverse-time SDE, from T down to t_end (steps of -REV_H)."""
    rsde = sde.reverse(score, eta=eta, t_eps=1e-3)
    gen = torch.Generator().manual_seed(seed)
    steps = int(round((sde.T - t_end) / REV_H))
    ts = sde.T - REV_H * torch.arange(steps + 1, dtype=F64)
    ts[-1] = t_end
    for i in range(steps):
        # the internal, unvalidated drift/diffusion (the public ones re-validate x and t each call)
        t, h = ts[i], float(ts[i] - ts[i + 1])
        drift = rsde._drift(x, t)
        g = rsde._diffusion(x, t)[:, None] if eta > 0 else None
        x = x - drift * h
        if eta > 0:
            x = x + g * math.sqrt(h) * torch.randn(x.shape, generator=gen, dtype=F64)
    return x


def pf_ode(sde, score, x, t_end):
    ode = sde.probability_flow(score, t_eps=1e-3)
    ts = torch.tensor([sde.T, t_end], dtype=F64)
    return odeint(ode, x, ts, method="rk4", options=dict(step_size=0.005))[-1]


def run_dynamics(kind, sde, score, x_T, seed):
    if kind == "pf_ode":
        return pf_ode(sde, score, x_T, T_MID)
    return reverse_em(sde, score, {"eta1": 1.0, "eta05": 0.5}[kind], x_T, T_MID, seed)


WRONG_SCALE = 0.7
WITH_WRONG = ("eta1", "pf_ode")  # dynamics also run with the wrong score


@pytest.fixture(scope="module")
def marginal_setup():
    """Per process: mixture, start samples at T, reference samples at T_MID, noise floor, and a
    cache of solver outputs. For the dynamics in WITH_WRONG one integration of a 2N batch carries
    both the exact score (first N) and the wrong score 0.7 x exact (last N): same dynamics, half
    the per-step overhead."""
    out = {}
    gm = mixture_2d()
    for i, (name, make) in enumerate(sorted(PROCESSES.items())):
        sde = make()
        g = torch.Generator().manual_seed(100 + i)
        x_T = gm.push(sde, sde.T).sample(N_SAMPLES, generator=g)
        target = gm.push(sde, T_MID)
        ref = target.sample(N_SAMPLES, generator=g)
        out[name] = dict(sde=sde, gm=gm, x_T=x_T, ref=ref, floor=noise_floor(target, 200 + i), runs={})
    return out


def solver_samples(setup, name, kind, wrong=False):
    s = setup[name]
    if kind not in s["runs"]:
        sde, gm, x_T = s["sde"], s["gm"], s["x_T"]
        exact = gm.exact_score(sde)
        if kind in WITH_WRONG:
            scale = torch.cat([torch.ones(N_SAMPLES, dtype=F64), torch.full((N_SAMPLES,), WRONG_SCALE, dtype=F64)])
            x = run_dynamics(kind, sde, lambda x, t: scale[:, None] * exact(x, t), torch.cat([x_T, x_T]), seed=7)
            s["runs"][kind] = (x[:N_SAMPLES], x[N_SAMPLES:])
        else:
            s["runs"][kind] = (run_dynamics(kind, sde, exact, x_T, seed=7), None)
    return s["runs"][kind][1 if wrong else 0]


# Pass criterion: stat <= 3 x (95th percentile of the null distribution, 30 repeats). Under the
# null (exact dynamics) N * stat is asymptotically a weighted sum of chi^2_1 variables; even in the
# worst case of a single dominant term P(chi^2_1 > 3 x 3.84) ~ 7e-4, so the false-alarm rate is
# below ~1e-3 per check (and deterministic: seeds are fixed). The margin also absorbs the small
# O(h) bias of the Euler–Maruyama loop (h = 5e-4). Over 30 seeds per case the exact dynamics gave
# ratios stat / q95 of at most 1.4, the wrong score at least 21.
@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("kind", ["eta1", "eta05", "pf_ode"])
def test_reverse_dynamics_reproduce_exact_marginal(marginal_setup, name, kind):
    s = marginal_setup[name]
    stat = energy_distance(solver_samples(marginal_setup, name, kind), s["ref"])
    assert stat <= 3 * s["floor"], (name, kind, stat, s["floor"])


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("kind", WITH_WRONG)
def test_wrong_score_fails_the_same_check(marginal_setup, name, kind):
    s = marginal_setup[name]
    stat = energy_distance(solver_samples(marginal_setup, name, kind, wrong=True), s["ref"])
    assert stat > 3 * s["floor"], (name, kind, stat, s["floor"])


# ----------------------------------------------------------------------------------------------
# (c) PF ODE round trip
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_pf_ode_round_trip(name):
    sde = PROCESSES[name]()
    gm = mixture_2d()
    t_eps = 1e-3
    ode = sde.probability_flow(gm.exact_score(sde), t_eps=t_eps)
    x0 = gm.push(sde, t_eps).sample(16, generator=torch.Generator().manual_seed(5))
    tol = dict(method="dopri5", rtol=1e-11, atol=1e-11)
    # step_t makes dopri5 land exactly on the end time instead of probing beyond [0, T]
    fwd = odeint(ode, x0, torch.tensor([t_eps, sde.T], dtype=F64),
                 options=dict(first_step=1e-4, step_t=torch.tensor([sde.T], dtype=F64)), **tol)[-1]
    back = odeint(ode, fwd, torch.tensor([sde.T, t_eps], dtype=F64),
                  options=dict(first_step=1e-4, step_t=torch.tensor([t_eps], dtype=F64)), **tol)[-1]
    assert float((fwd - x0).abs().max()) > 0.1  # it actually moved
    assert float((back - x0).abs().max()) < 1e-6
