"""Perturbation kernels checked against ground truth written here: adaptive quadrature (scipy),
closed forms in numpy, finite differences and hand-derived SDE coefficients.

Conventions (docs/concepts.md, section 1): x_t | x_0 ~ N(m(t) x_0, sigma(t)^2 I), m = exp(int_0^t f),
sigma^2 = m^2 int_0^t g^2/m^2, lambda = log(m^2/sigma^2).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.integrate import quad

import sdekit
from sdekit.kernels import NumericKernel

F64 = torch.float64
HYP = settings(max_examples=20, deadline=None, derandomize=True)



def rel(a, b):
    """max |a/b - 1| over entries (numpy or torch)."""
    a = np.asarray(a.detach() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 (e.g. VE's m' = 0) -> nan -> not <= tol
        return float(np.max(np.abs(a / b - 1.0)))


# ---------------------------------------------------------------------------------------------
# Custom linear SDEs without a closed-form kernel: torch callables for sdekit, the same
# functions in plain `math` for scipy's quadrature (the reference never touches sdekit).
# ---------------------------------------------------------------------------------------------

CUSTOM = {
    "sin": dict(
        f=lambda t: -0.5 * (1 + 0.8 * torch.sin(5 * t)),
        g=lambda t: torch.sqrt(1 + 0.8 * torch.sin(5 * t)) + 0.3 * t,
        f_np=lambda u: -0.5 * (1 + 0.8 * math.sin(5 * u)),
        g_np=lambda u: math.sqrt(1 + 0.8 * math.sin(5 * u)) + 0.3 * u,
        T=1.0,
    ),
    # growing then shrinking drift, oscillating noise, longer horizon
    "poly-cos": dict(
        f=lambda t: -(0.2 + 0.75 * t * t + 0.5 * torch.cos(4 * t)),
        g=lambda t: torch.sqrt(0.5 + 3 * t * t) * (1 + 0.2 * torch.sin(9 * t)),
        f_np=lambda u: -(0.2 + 0.75 * u * u + 0.5 * math.cos(4 * u)),
        g_np=lambda u: math.sqrt(0.5 + 3 * u * u) * (1 + 0.2 * math.sin(9 * u)),
        T=2.0,
    ),
    # f identically zero (a constant, not a callable of t), VE-like growing noise
    "f-zero": dict(
        f=lambda t: 0.0,
        g=lambda t: torch.exp(1.5 * t) * (1.2 + torch.cos(3 * t)),
        f_np=lambda u: 0.0,
        g_np=lambda u: math.exp(1.5 * u) * (1.2 + math.cos(3 * u)),
        T=1.5,
    ),
}

_QUAD = dict(epsabs=0.0, epsrel=1e-13, limit=200)


def quad_log_m(spec, t):
    return quad(spec["f_np"], 0.0, t, **_QUAD)[0]


def quad_sigma2(spec, t):
    """sigma(t)^2 = m(t)^2 int_0^t g(u)^2 / m(u)^2 du, with a nested quad for m(u)."""
    g = spec["g_np"]
    inner = quad(lambda u: g(u) ** 2 * math.exp(-2.0 * quad_log_m(spec, u)), 0.0, t, **_QUAD)[0]
    return math.exp(2.0 * quad_log_m(spec, t)) * inner


def eval_times(T, n_log=10, n_lin=11):
    return np.unique(np.concatenate([np.logspace(-6, 0, n_log) * T, np.linspace(0.0, T, n_lin + 1)[1:]]))


@pytest.fixture(scope="module", params=list(CUSTOM))
def custom(request):
    spec = CUSTOM[request.param]
    return spec, sdekit.LinearSDE(spec["f"], spec["g"], T=spec["T"])


def test_numeric_kernel_matches_quadrature(custom):
    spec, sde = custom
    ts = eval_times(spec["T"])
    assert len(ts) >= 20 and ts.min() <= 1e-6 * spec["T"] * 1.0001 and ts.max() == spec["T"]
    m_ref = np.array([math.exp(quad_log_m(spec, t)) for t in ts])
    s_ref = np.sqrt([quad_sigma2(spec, t) for t in ts])
    m, s = sde.marginal(torch.tensor(ts, dtype=F64))
    assert m.dtype == F64 and s.dtype == F64
    assert rel(m, m_ref) <= 1e-9
    assert rel(s, s_ref) <= 1e-9
    # log-SNR from the reference (absolute error in lambda == relative error in SNR)
    lam_ref = np.log(m_ref**2 / s_ref**2)
    assert np.max(np.abs(sde.log_snr(torch.tensor(ts)).numpy() - lam_ref)) <= 1e-9 * max(1, np.abs(lam_ref).max())
    # scalar times give the same numbers as a tensor of times
    m1, s1 = sde.marginal(float(ts[3]))
    assert m1.dim() == 0 and rel(m1, m_ref[3]) <= 1e-9 and rel(s1, s_ref[3]) <= 1e-9


def test_numeric_kernel_coefficients_are_the_users(custom):
    spec, sde = custom
    ts = eval_times(spec["T"])
    f_ref = np.array([spec["f_np"](t) for t in ts])
    g_ref = np.array([spec["g_np"](t) for t in ts])
    tt = torch.tensor(ts)
    assert np.allclose(sde.f(tt).numpy(), f_ref, rtol=1e-14, atol=1e-15)
    assert np.allclose(sde.g(tt).numpy(), g_ref, rtol=1e-14, atol=0)
    assert np.allclose(sde.g2(tt).numpy(), g_ref**2, rtol=1e-14, atol=0)


def test_numeric_kernel_g_vanishing_at_zero():
    """g = sqrt(2t), f = 0 (EDM-like): sigma^2 = int_0^t 2u du = t^2, so sigma(t) = t exactly.
    g^2 = sqrt(2t)**2 has a NaN autograd derivative at t = 0 (0 * inf); the kernel must not
    turn that into NaNs on the first interval."""
    sde = sdekit.LinearSDE(lambda t: 0.0, lambda t: torch.sqrt(2 * t), T=2.0)
    ts = torch.tensor(eval_times(2.0))
    m, s = sde.marginal(ts)
    assert torch.equal(m, torch.ones_like(ts))
    assert rel(s, ts) <= 1e-12
    m0, s0 = sde.marginal(0.0)
    assert float(m0) == 1.0 and float(s0) == 0.0


def test_numeric_kernel_too_rough_raises():
    # g^2 = sqrt(t): (g^2)' is infinite at 0, the Hermite tables cannot reach the tolerance
    with pytest.raises(ValueError, match="could not be tabulated"):
        NumericKernel(lambda t: torch.zeros_like(t), lambda t: torch.sqrt(t), 1.0, n_max=1024)


# ---------------------------------------------------------------------------------------------
# Built-ins: numpy closed forms written here, from the docs' derivations
# ---------------------------------------------------------------------------------------------


def ref_vp(b0, b1, T):
    beta = lambda t: b0 + t * (b1 - b0)
    B = lambda t: b0 * t + 0.5 * (b1 - b0) * t * t
    return dict(f=lambda t: -0.5 * beta(t), g2=beta, m=lambda t: np.exp(-0.5 * B(t)),
                s2=lambda t: -np.expm1(-B(t)))


def ref_subvp(b0, b1, T):
    r = ref_vp(b0, b1, T)
    B = lambda t: b0 * t + 0.5 * (b1 - b0) * t * t
    r.update(g2=lambda t: (b0 + t * (b1 - b0)) * -np.expm1(-2 * B(t)), s2=lambda t: np.expm1(-B(t)) ** 2)
    return r


def ref_ve(smin, smax, T):
    # sigma_ve(t) = smin (smax/smin)^(t/T); sigma^2 = sigma_ve^2 - smin^2 = smin^2 ((smax/smin)^(2t/T) - 1)
    # (written with expm1 so the reference itself keeps its digits as t -> 0)
    lr = math.log(smax / smin) / T
    return dict(f=lambda t: 0.0 * t, g2=lambda t: 2 * lr * smin**2 * np.exp(2 * lr * t),
                m=lambda t: np.ones_like(t), s2=lambda t: smin**2 * np.expm1(2 * lr * t))


def ref_cosine(s, T):
    # alphabar = cos^2(phi)/cos^2(phi0), phi = pi/2 (t+s)/(1+s); 1 - alphabar written as
    # (cos^2 phi0 - cos^2 phi)/cos^2 phi0 = sin(phi - phi0) sin(phi + phi0)/cos^2 phi0 (no cancellation)
    c = math.pi / (2 * (1 + s))
    phi = lambda t: c * (t + s)
    phi0 = c * s
    return dict(f=lambda t: -c * np.tan(phi(t)), g2=lambda t: 2 * c * np.tan(phi(t)),
                m=lambda t: np.cos(phi(t)) / math.cos(phi0),
                s2=lambda t: np.sin(phi(t) - phi0) * np.sin(phi(t) + phi0) / math.cos(phi0) ** 2)


def ref_ou(theta, sig, T):
    return dict(f=lambda t: -theta + 0 * t, g2=lambda t: sig**2 + 0 * t, m=lambda t: np.exp(-theta * t),
                s2=lambda t: -sig**2 / (2 * theta) * np.expm1(-2 * theta * t))


BUILTINS = [
    ("VP", lambda: sdekit.VPSDE(), lambda: ref_vp(0.1, 20.0, 1.0)),
    ("VP-custom", lambda: sdekit.VPSDE(0.5, 5.0, T=2.0), lambda: ref_vp(0.5, 5.0, 2.0)),
    ("subVP", lambda: sdekit.SubVPSDE(), lambda: ref_subvp(0.1, 20.0, 1.0)),
    ("subVP-custom", lambda: sdekit.SubVPSDE(0.2, 8.0, T=0.7), lambda: ref_subvp(0.2, 8.0, 0.7)),
    ("VE", lambda: sdekit.VESDE(), lambda: ref_ve(0.01, 50.0, 1.0)),
    ("VE-custom", lambda: sdekit.VESDE(0.1, 10.0, T=3.0), lambda: ref_ve(0.1, 10.0, 3.0)),
    ("cosine", lambda: sdekit.CosineVPSDE(), lambda: ref_cosine(0.008, 0.9946)),
    ("cosine-custom", lambda: sdekit.CosineVPSDE(0.02, T=0.98), lambda: ref_cosine(0.02, 0.98)),
    ("OU", lambda: sdekit.OrnsteinUhlenbeck(), lambda: ref_ou(1.0, 1.0, 1.0)),
    ("OU-custom", lambda: sdekit.OrnsteinUhlenbeck(2.5, 0.3, T=4.0), lambda: ref_ou(2.5, 0.3, 4.0)),
]


@pytest.fixture(scope="module", params=BUILTINS, ids=[b[0] for b in BUILTINS])
def builtin(request):
    _, make, ref = request.param
    return make(), ref()


def builtin_times(T):
    return np.unique(np.concatenate([[1e-8, 1e-7], np.logspace(-6, 0, 12) * T, np.linspace(0, T, 11)[1:]]))


def test_builtin_closed_forms_match_numpy_reference(builtin):
    sde, ref = builtin
    ts = builtin_times(sde.T)
    m, s = sde.marginal(torch.tensor(ts))
    assert rel(m, ref["m"](ts)) <= 1e-12
    assert rel(s, np.sqrt(ref["s2"](ts))) <= 1e-11
    assert np.allclose(sde.f(torch.tensor(ts)).numpy(), ref["f"](ts), rtol=1e-13, atol=1e-300)
    assert rel(sde.g2(torch.tensor(ts)), ref["g2"](ts)) <= 1e-13


def test_vp_and_ve_textbook_formulas():
    """The literal textbook forms at moderate t (where the naive expressions have all their digits)."""
    ts = np.linspace(0.05, 1.0, 20)
    vp = sdekit.VPSDE(0.1, 20.0)
    B = 0.1 * ts + 0.5 * (20.0 - 0.1) * ts**2
    m, s = vp.marginal(torch.tensor(ts))
    assert rel(m, np.exp(-B / 2)) <= 1e-13
    assert rel(s**2, 1 - np.exp(-B)) <= 1e-12
    ve = sdekit.VESDE(0.01, 50.0)
    m, s = ve.marginal(torch.tensor(ts))
    assert np.all(m.numpy() == 1.0)
    assert rel(s**2, 0.01**2 * ((50.0 / 0.01) ** (2 * ts) - 1)) <= 1e-12


def test_builtin_equals_numeric_kernel_of_its_own_coefficients(builtin):
    sde, _ = builtin
    k = sde.kernel
    nk = NumericKernel(k.f, k.g2, sde.T)
    ts = torch.tensor(builtin_times(sde.T))
    assert rel(nk.m(ts), k.m(ts)) <= 1e-9
    assert rel(nk.sigma(ts), k.sigma(ts)) <= 1e-9
    lam, lam_n = k.log_snr(ts), nk.log_snr(ts)
    assert float(((lam_n - lam).abs() / lam.abs().clamp_min(1.0)).max()) <= 1e-9


# ---------------------------------------------------------------------------------------------
# Derivative identities
# ---------------------------------------------------------------------------------------------


def all_processes():
    out = [(name, make()) for name, make, _ in BUILTINS]
    out += [(name, sdekit.LinearSDE(s["f"], s["g"], T=s["T"])) for name, s in CUSTOM.items()]
    return out


PROCESSES = all_processes()
PROC_IDS = [p[0] for p in PROCESSES]
PROC_ONLY = [p[1] for p in PROCESSES]


def autograd_dt(fn, ts):
    tg = ts.clone().requires_grad_(True)
    y = fn(tg)
    if not y.requires_grad:  # a constant (VE's m = 1)
        return torch.zeros_like(ts)
    return torch.autograd.grad(y.sum(), tg)[0]


@pytest.mark.parametrize("sde", PROC_ONLY, ids=PROC_IDS)
def test_marginal_derivatives_vs_autograd_and_finite_differences(sde):
    ts = torch.tensor(np.concatenate([np.logspace(-4, -1, 5), np.linspace(0.15, 0.98, 6)]) * sde.T)
    dm, ds = sde.marginal_derivatives(ts)
    # autograd through the kernel (the numeric kernel's Hermite interpolant is differentiable in t)
    dm_ad, ds_ad = autograd_dt(sde.kernel.m, ts), autograd_dt(sde.kernel.sigma, ts)
    # sigma' = (2 f sigma^2 + g^2)/(2 sigma) cancels near stationarity (OU at large t): compare
    # relative to the size of the terms that cancel
    f, g2 = sde.f(ts), sde.g2(ts)
    _, s = sde.marginal(ts)
    ds_scale = (2 * f.abs() * s**2 + g2) / (2 * s)
    assert rel(dm_ad, dm) <= 1e-9 or np.allclose(dm.numpy(), 0.0)
    assert float(((ds_ad - ds).abs() / ds_scale).max()) <= 1e-9
    # central finite differences of the public marginal (step relative to t)
    h = 1e-5 * ts
    mp, sp = sde.marginal(ts + h)
    mm, sm = sde.marginal(ts - h)
    fd_m, fd_s = (mp - mm) / (2 * h), (sp - sm) / (2 * h)
    assert torch.allclose(fd_m, dm, rtol=1e-6, atol=1e-9)
    assert float(((fd_s - ds).abs() / ds_scale).max()) <= 1e-6


@pytest.mark.parametrize("sde", PROC_ONLY, ids=PROC_IDS)
def test_variance_ode_and_log_snr_slope(sde):
    """(sigma^2)' = 2 f sigma^2 + g^2 and lambda' = -g^2/sigma^2 < 0, by finite differences."""
    ts = torch.tensor(np.concatenate([np.logspace(-4, -1, 4), np.linspace(0.1, 0.97, 8)]) * sde.T)
    h = 1e-5 * ts
    _, s = sde.marginal(ts)
    _, sp = sde.marginal(ts + h)
    _, sm = sde.marginal(ts - h)
    fd_s2 = (sp**2 - sm**2) / (2 * h)
    f, g2 = sde.f(ts), sde.g2(ts)
    scale = 2 * f.abs() * s**2 + g2  # the two terms cancel near stationarity (OU at large t)
    assert float(((fd_s2 - (2 * f * s**2 + g2)).abs() / scale).max()) <= 1e-6
    fd_lam = (sde.log_snr(ts + h) - sde.log_snr(ts - h)) / (2 * h)
    expected = -g2 / s**2
    assert torch.allclose(fd_lam, expected, rtol=1e-6, atol=0)
    assert bool((expected < 0).all())
    lam = sde.log_snr(torch.linspace(1e-4, sde.T, 500, dtype=F64))
    assert bool((torch.diff(lam) < 0).all())  # strictly decreasing


def test_custom_coefficients_in_identities_are_the_users():
    """The identities above with f, g taken from the test's own numpy functions (not the SDE)."""
    spec = CUSTOM["sin"]
    sde = sdekit.LinearSDE(spec["f"], spec["g"], T=spec["T"])
    ts = np.linspace(0.05, 0.95, 7)
    h = 1e-5
    s2 = lambda t: float(sde.marginal(t)[1]) ** 2
    for t in ts:
        fd = (s2(t + h) - s2(t - h)) / (2 * h)
        assert fd == pytest.approx(2 * spec["f_np"](t) * quad_sigma2(spec, t) + spec["g_np"](t) ** 2, rel=1e-7)


# ---------------------------------------------------------------------------------------------
# log-SNR inversion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde", PROC_ONLY, ids=PROC_IDS)
def test_t_from_log_snr_round_trip(sde):
    ts = torch.tensor(np.unique(np.concatenate([np.logspace(-4, 0, 15), np.linspace(1e-4, 1, 10)])) * sde.T)
    ts = ts[ts >= 1e-4]
    back = sde.t_from_log_snr(sde.log_snr(ts))
    assert rel(back, ts) <= 1e-9
    # lambda below log_snr(T) is not reached by any t in [0, T]
    lam_T = float(sde.log_snr(sde.T))
    with pytest.raises(ValueError, match="lam"):
        sde.t_from_log_snr(lam_T - 1.0)
    with pytest.raises(ValueError, match="lam"):
        sde.t_from_log_snr(torch.tensor([lam_T + 1.0, lam_T - 0.5]))
    with pytest.raises(ValueError, match="lam"):
        sde.t_from_log_snr(float("nan"))


@HYP
@given(u=st.floats(0.0, 1.0), which=st.sampled_from(range(len(PROC_ONLY))))
def test_t_from_log_snr_round_trip_property(u, which):
    sde = PROC_ONLY[which]
    t = 1e-4 * (sde.T / 1e-4) ** u  # log-uniform in [1e-4, T]
    back = float(sde.t_from_log_snr(float(sde.log_snr(t))))
    assert back == pytest.approx(t, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# from_kernel
# ---------------------------------------------------------------------------------------------


def test_from_kernel_edm():
    # m = 1, sigma = t:  f = m'/m = 0;  g^2 = (sigma^2)' - 2 f sigma^2 = 2t.
    sde = sdekit.LinearSDE.from_kernel(lambda t: 1.0, lambda t: t, T=80.0)
    ts = torch.linspace(0, 80, 33, dtype=F64)
    assert torch.equal(sde.f(ts), torch.zeros_like(ts))
    assert torch.allclose(sde.g2(ts), 2 * ts, rtol=1e-14, atol=0)
    m, s = sde.marginal(ts)
    assert torch.equal(m, torch.ones_like(ts)) and torch.allclose(s, ts)


def test_from_kernel_flow_matching_path():
    # m = 1 - t, sigma = t (rectified-flow / FM Gaussian path), T < 1:
    #   f   = m'/m = -1/(1 - t)
    #   g^2 = (sigma^2)' - 2 f sigma^2 = 2t + 2t^2/(1 - t) = (2t(1 - t) + 2t^2)/(1 - t) = 2t/(1 - t)
    sde = sdekit.LinearSDE.from_kernel(lambda t: 1 - t, lambda t: t, T=0.999)
    ts = torch.linspace(0, 0.999, 50, dtype=F64)
    assert torch.allclose(sde.f(ts), -1 / (1 - ts), rtol=1e-13, atol=0)
    assert torch.allclose(sde.g2(ts), 2 * ts / (1 - ts), rtol=1e-12, atol=1e-300)
    # ... and the process's reverse dynamics use exactly those coefficients
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    rev = sde.reverse(lambda x, t: -x, eta=1.0)
    t = 0.5
    assert torch.allclose(rev.drift(x, t), -1 / (1 - t) * x - (2 * t / (1 - t)) * (-x), rtol=1e-12)


def test_from_kernel_reproduces_vp():
    b0, b1 = 0.1, 20.0
    B = lambda t: b0 * t + 0.5 * (b1 - b0) * t * t
    sde = sdekit.LinearSDE.from_kernel(lambda t: torch.exp(-0.5 * B(t)), lambda t: torch.sqrt(-torch.expm1(-B(t))))
    ts = torch.linspace(1e-3, 1.0, 40, dtype=F64)
    beta = b0 + ts * (b1 - b0)
    assert torch.allclose(sde.f(ts), -0.5 * beta, rtol=1e-12, atol=0)
    assert torch.allclose(sde.g2(ts), beta, rtol=1e-10, atol=0)
    assert torch.allclose(sde.g(ts), beta.sqrt(), rtol=1e-10, atol=0)
    # ... and VPSDE's own coefficients
    vp = sdekit.VPSDE(b0, b1)
    assert torch.allclose(sde.f(ts), vp.f(ts), rtol=1e-12, atol=0)
    assert torch.allclose(sde.g(ts), vp.g(ts), rtol=1e-10, atol=0)
    # at t = 0, sigma ~ sqrt(beta_min t) has an infinite derivative, but g^2(0) = beta_min is finite
    t0 = torch.tensor([0.0, 1e-9], dtype=F64)
    assert torch.allclose(sde.g2(t0), b0 + t0 * (b1 - b0), rtol=1e-8, atol=0)
    assert float(sde.f(0.0)) == pytest.approx(-0.5 * b0, rel=1e-14)


def test_from_kernel_unreachable_raises():
    # m = 1, sigma = t (1.5 - t): (sigma^2)' = 2 sigma sigma' = 2 t (1.5 - t)(1.5 - 2t) < 0 for t > 0.75
    with pytest.raises(ValueError, match=r"g\^2"):
        sdekit.LinearSDE.from_kernel(lambda t: 1.0, lambda t: t * (1.5 - t), T=1.0)
    # on [0, 0.7] the same kernel is reachable
    sde = sdekit.LinearSDE.from_kernel(lambda t: 1.0, lambda t: t * (1.5 - t), T=0.7)
    t = torch.tensor(0.5, dtype=F64)
    assert float(sde.g2(t)) == pytest.approx(2 * 0.5 * 1.0 * 0.5)


def test_from_kernel_bad_start_raises():
    with pytest.raises(ValueError, match="sigma"):
        sdekit.LinearSDE.from_kernel(lambda t: 1.0, lambda t: 0.1 + t)
    with pytest.raises(ValueError, match="m"):
        sdekit.LinearSDE.from_kernel(lambda t: 1 - 2 * t, lambda t: t)


# ---------------------------------------------------------------------------------------------
# from_alphas_cumprod
# ---------------------------------------------------------------------------------------------


def test_from_alphas_cumprod_ddpm_linear():
    N = 1000
    betas = np.linspace(1e-4, 0.02, N)
    ac = np.cumprod(1 - betas)
    sde = sdekit.LinearSDE.from_alphas_cumprod(torch.tensor(ac))
    n = np.arange(1, N + 1)
    tk = torch.tensor(n / N)
    m, s = sde.marginal(tk)
    assert np.max(np.abs(m.numpy() ** 2 - ac[n - 1])) <= 1e-12
    assert np.max(np.abs(s.numpy() ** 2 - (1 - ac[n - 1]))) <= 1e-12
    # between the knots too, VP: sigma^2 = 1 - m^2, and m(0) = 1, sigma(0) = 0
    tt = torch.linspace(0, 1, 3001, dtype=F64)
    m, s = sde.marginal(tt)
    assert torch.allclose(s**2, 1 - m**2, rtol=0, atol=1e-14)
    assert float(m[0]) == 1.0 and float(s[0]) == 0.0
    # f is the slope of log m on each interval (computed here from the table); g^2 = -2 f
    log_m_knots = np.concatenate([[0.0], 0.5 * np.log(ac)])
    slopes = np.diff(log_m_knots) * N
    mids = torch.tensor((np.arange(N) + 0.5) / N)
    assert np.allclose(sde.f(mids).numpy(), slopes, rtol=1e-9, atol=0)
    assert torch.allclose(sde.g2(mids), -2 * sde.f(mids), rtol=1e-15, atol=0)
    assert bool((sde.g2(mids) > 0).all())
    # DDPM's beta_n ~ 1 - alpha_n is g^2 h to first order
    assert np.allclose(sde.g2(mids).numpy() / N, betas, rtol=0.011)


def test_from_alphas_cumprod_other_T():
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 100))
    sde = sdekit.LinearSDE.from_alphas_cumprod(ac, T=2.0)
    m, _ = sde.marginal(torch.tensor([0.02 * 50, 2.0], dtype=F64))  # knots n = 50, 100
    assert np.allclose(m.numpy() ** 2, [ac[49], ac[99]], rtol=1e-13)


@pytest.mark.parametrize("table, what", [
    (np.array([0.9, 0.95, 0.5]), "decreasing"),
    (np.array([0.9, 0.9, 0.5]), "decreasing"),
    (np.array([1.0, 0.9, 0.5]), r"\(0, 1\)"),
    (np.array([0.9, 0.5, 0.0]), r"\(0, 1\)"),
    (np.array([0.9, np.nan, 0.5]), r"\(0, 1\)"),
    (np.array([0.5]), ">= 2"),
    (np.array([[0.9, 0.5], [0.4, 0.3]]), "1-d"),
])
def test_from_alphas_cumprod_invalid(table, what):
    with pytest.raises(ValueError, match="alphas_cumprod") as info:
        sdekit.LinearSDE.from_alphas_cumprod(table)
    assert info.match(what)


# ---------------------------------------------------------------------------------------------
# t broadcasting over data ranks, and the kernel API against independent formulas
# ---------------------------------------------------------------------------------------------

SHAPES = [(6,), (6, 3), (6, 2, 3, 2)]
VP = sdekit.VPSDE()
VP_REF = ref_vp(0.1, 20.0, 1.0)


def time_forms(B):
    tv = np.linspace(0.05, 0.95, B)
    return [
        ("float", 0.37, np.full(B, 0.37)),
        ("0-d", torch.tensor(0.37, dtype=F64), np.full(B, 0.37)),
        ("(B,)", torch.tensor(tv, dtype=F64), tv),
        ("(1,)", torch.tensor([0.61], dtype=F64), np.full(B, 0.61)),
    ]


def per_sample_normal_logpdf(xt, x0, t_np):
    """log N(xt_i; m(t_i) x0_i, sigma(t_i)^2 I), summed over the sample's entries (numpy)."""
    B = xt.shape[0]
    xt, x0 = xt.reshape(B, -1).numpy(), x0.reshape(B, -1).numpy()
    m = VP_REF["m"](t_np)[:, None]
    s2 = VP_REF["s2"](t_np)[:, None]
    return (-0.5 * (xt - m * x0) ** 2 / s2 - 0.5 * np.log(2 * np.pi * s2)).sum(1)


@pytest.mark.parametrize("shape", SHAPES, ids=["rank1", "rank2", "rank4"])
def test_broadcasting_over_ranks(shape):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, dtype=F64, generator=gen)
    B = shape[0]
    for name, t, t_np in time_forms(B):
        xt, eps = VP.sample_marginal(x0, t, generator=torch.Generator().manual_seed(7))
        assert xt.shape == shape and eps.shape == shape and xt.dtype == F64
        m = VP_REF["m"](t_np).reshape(B, *[1] * (len(shape) - 1))
        s = np.sqrt(VP_REF["s2"](t_np)).reshape(m.shape)
        assert np.allclose(xt.numpy(), m * x0.numpy() + s * eps.numpy(), rtol=1e-13, atol=1e-14), name
        # same noise -> same result as looping over the samples
        eps_ref = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(7))
        assert torch.equal(eps, eps_ref)

        lp = VP.marginal_log_prob(xt, x0, t)
        assert lp.shape == (B,)
        assert np.allclose(lp.numpy(), per_sample_normal_logpdf(xt, x0, t_np), rtol=1e-12), name
        cs = VP.conditional_score(xt, x0, t)
        assert cs.shape == shape
        for i in range(B):
            ti = float(t_np[i])
            lpi = VP.marginal_log_prob(xt[i:i + 1], x0[i:i + 1], ti)
            assert lpi.shape == (1,) and float(lpi) == pytest.approx(float(lp[i]), rel=1e-13)
            csi = VP.conditional_score(xt[i:i + 1], x0[i:i + 1], ti)
            assert torch.allclose(csi, cs[i:i + 1], rtol=1e-13)
        # conditional score is the gradient of the log density in x_t
        xr = xt.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(VP.marginal_log_prob(xr, x0, t).sum(), xr)
        assert torch.allclose(grad, cs, rtol=1e-12, atol=1e-12), name


@HYP
@given(rank=st.sampled_from([1, 2, 4]), B=st.integers(1, 5), seed=st.integers(0, 2**16),
       per_sample=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_broadcasting_property(rank, B, seed, per_sample, dtype):
    gen = torch.Generator().manual_seed(seed)
    shape = (B,) + (2, 3, 2)[: rank - 1]
    x0 = torch.randn(shape, generator=gen, dtype=dtype)
    t_np = np.random.default_rng(seed).uniform(0.01, 1.0, B) if per_sample else np.full(B, 0.3)
    t = torch.tensor(t_np, dtype=dtype) if per_sample else 0.3
    xt, eps = VP.sample_marginal(x0, t, generator=gen)
    assert xt.dtype == dtype and xt.shape == shape
    t_np = t.double().numpy() if per_sample else t_np
    lp = VP.marginal_log_prob(xt, x0, t)
    ref = per_sample_normal_logpdf(xt.double(), x0.double(), t_np)
    tol = 1e-12 if dtype == F64 else 1e-4
    assert np.allclose(lp.double().numpy(), ref, rtol=tol, atol=tol)
    cs = VP.conditional_score(xt, x0, t)
    m = VP_REF["m"](t_np).reshape(B, *[1] * (rank - 1))
    s2 = VP_REF["s2"](t_np).reshape(m.shape)
    assert np.allclose(cs.double().numpy(), -(xt.double().numpy() - m * x0.double().numpy()) / s2,
                       rtol=tol * 10, atol=tol * 10)
