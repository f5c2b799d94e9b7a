"""sdekit.time_sampling against first principles.

The density q of each scheme must integrate to 1 (quadrature, independent of the sampler), the
draws must follow it (Kolmogorov–Smirnov against the CDF written from the log-SNR directly, not
through the inversion the sampler uses), mean(h/q) must be unbiased for integrals known in closed
form, and stratification must cut the variance. Statistical checks use fixed seeds and state
their false-alarm rate (each is a 0.1% two-sided test).
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import quad as integrate_quad

import sdekit
from sdekit.time_sampling import SCHEMES, sample_times, time_density

F64 = torch.float64
Z_999 = 3.29  # two-sided 0.1% normal quantile


def numeric_sde():
    # dx = f x dt + g dW with a numeric kernel; g^2 = 0.5 + 4t + sin(3t)^2, f = -g^2/2 (VP-like)
    g2 = lambda t: 0.5 + 4.0 * t + torch.sin(3.0 * t) ** 2  # noqa: E731
    return sdekit.LinearSDE(lambda t: -0.5 * g2(t), lambda t: torch.sqrt(g2(t)), T=1.0)


PROCESSES = {
    "vp": lambda: sdekit.VPSDE(0.1, 20.0),
    "subvp": lambda: sdekit.SubVPSDE(0.1, 20.0),
    "ve": lambda: sdekit.VESDE(0.01, 50.0),
    "cosine": lambda: sdekit.CosineVPSDE(),
    "ou": lambda: sdekit.OrnsteinUhlenbeck(1.0, 1.0, 3.0),
    "numeric": numeric_sde,
}


def integrate(fn, t_eps, T):
    """int_{t_eps}^T fn(t) dt by adaptive Gauss-Kronrod (scipy.integrate.quad) in u = log t."""
    val, err = integrate_quad(lambda u: float(fn(torch.tensor(math.exp(u), dtype=F64))) * math.exp(u),
                              math.log(t_eps), math.log(T), epsabs=1e-11, epsrel=1e-11, limit=200)
    return val


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_density_integrates_to_one(name, scheme):
    sde = PROCESSES[name]()
    t_eps = 1e-4
    q = lambda t: time_density(sde, t, t_eps=t_eps, scheme=scheme)  # noqa: E731
    assert abs(integrate(q, t_eps, sde.T) - 1.0) < 1e-8
    # the density returned with the draws is the same function
    ts, qs = sample_times(sde, 64, t_eps=t_eps, scheme=scheme, generator=torch.Generator().manual_seed(0))
    assert ts.dtype == F64 and qs.dtype == F64 and ts.shape == (64,) and qs.shape == (64,)
    assert float(ts.min()) >= t_eps and float(ts.max()) <= sde.T
    assert torch.allclose(qs, time_density(sde, ts, t_eps=t_eps, scheme=scheme), rtol=1e-12, atol=0)


def reference_cdf(sde, t, t_eps, scheme):
    """CDFs from first principles: uniform, and the log-SNR fraction (lambda(t_eps) - lambda(t)) / Lambda."""
    T = sde.T
    unif = (t - t_eps) / (T - t_eps)
    lam = sde.kernel.log_snr
    ends = lam(torch.tensor([t_eps, T], dtype=F64))
    imp = (ends[0] - lam(t)) / (ends[0] - ends[1])
    return {"uniform": unif, "importance": imp, "mixture": 0.5 * (unif + imp)}[scheme]


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("scheme", ["uniform", "importance", "mixture"])
def test_draws_follow_density_ks(name, scheme):
    """KS test of 4000 draws against the reference CDF; false-alarm rate 0.1% per case."""
    sde = PROCESSES[name]()
    t_eps = 1e-3
    t, _ = sample_times(sde, 4000, t_eps=t_eps, scheme=scheme, generator=torch.Generator().manual_seed(1))
    u = reference_cdf(sde, t, t_eps, scheme).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("name", ["vp", "numeric", "ve"])
@pytest.mark.parametrize("scheme", ["stratified", "importance_stratified"])
def test_stratified_one_draw_per_stratum(name, scheme):
    """Mapped through the scheme's CDF, the n draws fall one in each cell [k/n, (k+1)/n)."""
    sde = PROCESSES[name]()
    n = 500
    t, _ = sample_times(sde, n, t_eps=1e-3, scheme=scheme, generator=torch.Generator().manual_seed(2))
    base = "uniform" if scheme == "stratified" else "importance"
    u = reference_cdf(sde, t, 1e-3, base)
    cells = torch.floor(u * n + 1e-6 * (u * n - torch.round(u * n)).sign()).long().clamp(0, n - 1)
    # away from cell boundaries floor is exact; the tiny nudge protects round-off at a boundary
    assert sorted(cells.tolist()) == list(range(n))
    # the assignment to positions is shuffled (not sorted by time)
    assert not bool((torch.diff(t) > 0).all())


def g2_integral(name, sde, t_eps):
    """Closed-form int_{t_eps}^T g^2 dt, written from the process parameters (not the kernel)."""
    T = sde.T
    if name == "vp":
        B = lambda t: 0.1 * t + 0.5 * (20.0 - 0.1) * t * t  # noqa: E731
        return B(T) - B(t_eps)
    if name == "ve":
        sve2 = lambda t: (0.01 * (50.0 / 0.01) ** t) ** 2  # noqa: E731
        return sve2(T) - sve2(t_eps)
    if name == "numeric":
        G = lambda t: 0.5 * t + 2.0 * t * t + 0.5 * t - math.sin(6.0 * t) / 12.0  # noqa: E731
        return G(T) - G(t_eps)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["vp", "ve", "numeric"])
@pytest.mark.parametrize("scheme", ["uniform", "importance", "mixture", "stratified", "importance_stratified"])
def test_unbiased_integral(name, scheme):
    """mean(g^2/q) estimates int g^2 dt: R independent estimates of n = 32 draws each; z-test of
    their mean against the closed form (false-alarm rate 0.1%)."""
    sde = PROCESSES[name]()
    t_eps = 1e-3
    exact = g2_integral(name, sde, t_eps)
    gen = torch.Generator().manual_seed(3)
    n = 32
    if scheme in ("stratified", "importance_stratified"):  # strata are per call
        R = 60 if name == "numeric" else 200  # the numeric kernel inverts the log-SNR by bisection
        est = []
        for _ in range(R):
            t, q = sample_times(sde, n, t_eps=t_eps, scheme=scheme, generator=gen)
            est.append(float((sde.kernel.g2(t) / q).mean()))
        est = np.array(est)
    else:  # iid draws: one call, split into 400 estimates
        t, q = sample_times(sde, 400 * n, t_eps=t_eps, scheme=scheme, generator=gen)
        est = (sde.kernel.g2(t) / q).reshape(400, n).mean(1).numpy()
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - exact) < Z_999 * se + 1e-12 * abs(exact), (est.mean(), exact, se)


@pytest.mark.parametrize("plain,strat", [("uniform", "stratified"), ("importance", "importance_stratified")])
def test_stratified_reduces_variance(plain, strat):
    """Variance of mean(h/q) over 200 repeats, n = 64, for a smooth h: stratified at least 20x
    lower (the theory gives O(n^-2) relative; a single seed, deterministic)."""
    sde = sdekit.VPSDE(0.1, 20.0)
    h = lambda t: torch.cos(3.0 * t) + t  # noqa: E731
    gen = torch.Generator().manual_seed(4)
    v = {}
    for scheme in (plain, strat):
        est = []
        for _ in range(200):
            t, q = sample_times(sde, 64, t_eps=1e-3, scheme=scheme, generator=gen)
            est.append(float((h(t) / q).mean()))
        v[scheme] = np.var(est, ddof=1)
    assert v[strat] < v[plain] / 20.0, v


def test_importance_weight_of_likelihood_weighting_is_constant():
    """With q ∝ g²/σ², g²/(q σ²) is the constant Λ = λ(t_eps) − λ(T) (the reason to sample so)."""
    sde = numeric_sde()
    t, q = sample_times(sde, 256, t_eps=1e-4, scheme="importance", generator=torch.Generator().manual_seed(5))
    w = sde.kernel.g2(t) / (q * sde.kernel.sigma2(t))
    Lam = float(sde.log_snr(torch.tensor(1e-4, dtype=F64)) - sde.log_snr(torch.tensor(1.0, dtype=F64)))
    assert torch.allclose(w, torch.full_like(w, Lam), rtol=1e-8)


def test_reproducible_and_device():
    sde = sdekit.VPSDE()
    a = sample_times(sde, 10, t_eps=1e-3, scheme="importance_stratified", generator=torch.Generator().manual_seed(7))
    b = sample_times(sde, 10, t_eps=1e-3, scheme="importance_stratified", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t, _ = sample_times(sde, 3, t_eps=1e-3, device="cpu")
    assert t.device.type == "cpu"


def test_bad_input():
    sde = sdekit.VPSDE()
    with pytest.raises(ValueError, match="t_eps"):
        sample_times(sde, 4, t_eps=0.0)
    with pytest.raises(ValueError, match="t_eps"):
        sample_times(sde, 4, t_eps=1.0)
    with pytest.raises(ValueError, match="n must be"):
        sample_times(sde, 0, t_eps=1e-3)
    with pytest.raises(ValueError, match="n must be"):
        sample_times(sde, 2.5, t_eps=1e-3)
    with pytest.raises(ValueError, match="scheme must be one of"):
        sample_times(sde, 4, t_eps=1e-3, scheme="sobol")
    with pytest.raises(TypeError, match="generator"):
        sample_times(sde, 4, t_eps=1e-3, generator=3)
    nonlinear = sdekit.SDE(lambda x, t: -x ** 3, lambda x, t: 1.0)
    with pytest.raises(TypeError, match="linear SDE"):
        sample_times(nonlinear, 4, t_eps=1e-3, scheme="importance")
    t, q = sample_times(nonlinear, 4, t_eps=1e-3, scheme="stratified")
    assert torch.all(q == 1.0 / (1.0 - 1e-3))
