"""The forward transition x_t | x_s ~ N(a x_s, b^2 I) of every kernel (`Kernel.transition`).

Ground truth written here: composite Gauss-Legendre quadrature of the process's own coefficients f, g^2,
a = exp(int_s^t f), b^2 = int_s^t g(u)^2 exp(2 int_u^t f) du, high-precision closed
forms (mpmath) for the small-gap regime where a difference of variances cancels, and the
Chapman-Kolmogorov composition a_su = a_st a_tu, b^2_su = a_tu^2 b^2_st + b^2_tu.
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdekit

F64 = torch.float64
HYP = settings(max_examples=25, deadline=None, derandomize=True)

SDES = {
    "vp": sdekit.VPSDE(),
    "subvp": sdekit.SubVPSDE(beta_min=0.1, beta_max=20.0),
    "ve": sdekit.VESDE(sigma_min=0.01, sigma_max=50.0),
    "cosine": sdekit.CosineVPSDE(),
    "ou": sdekit.OrnsteinUhlenbeck(theta=1.3, sigma=0.7, T=2.0),
    "numeric": sdekit.LinearSDE(lambda t: -0.5 * (1 + 0.8 * torch.sin(5 * t)),
                                lambda t: torch.sqrt(1 + 0.8 * torch.sin(5 * t)) + 0.3 * t),
    "user": sdekit.LinearSDE.from_kernel(lambda t: 1 - 0.5 * t, lambda t: t, T=1.0),
    "discrete": sdekit.LinearSDE.from_alphas_cumprod(
        torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)),
}


_X, _W = (torch.tensor(v, dtype=F64) for v in np.polynomial.legendre.leggauss(16))


def gauss_legendre(fn, lo, hi, panels=64):
    """int_lo^hi fn for a batch of lower limits ``lo`` (tensor) and one ``hi``: composite 16-point
    Gauss-Legendre on ``panels`` equal panels, all nodes in one vectorised call of ``fn``."""
    edges = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, panels + 1, dtype=F64)
    half = 0.5 * (edges[:, 1:] - edges[:, :-1])
    nodes = 0.5 * (edges[:, 1:] + edges[:, :-1])[..., None] + half[..., None] * _X
    return (fn(nodes) * _W * half[..., None]).sum((-1, -2))


def quad_transition(sde, s, t):
    """(a, b^2) by nested quadrature of the process's f and g^2 (never calls m, sigma or log-SNR):
    a = exp(int_s^t f), b^2 = int_s^t g(u)^2 exp(2 int_u^t f) du."""
    k = sde.kernel
    int_f = lambda lo: gauss_legendre(k.f, lo, t)  # noqa: E731
    b2 = gauss_legendre(lambda u: k.g2(u) * torch.exp(2.0 * int_f(u.flatten()).reshape(u.shape)),
                        torch.tensor([s], dtype=F64), t)
    return math.exp(float(int_f(torch.tensor([s], dtype=F64)))), float(b2)


def transition(sde, s, t):
    a, b2 = sde.kernel.transition(torch.tensor(s, dtype=F64), torch.tensor(t, dtype=F64))
    return float(a), float(b2)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine", "ou", "numeric", "user"])
def test_transition_matches_quadrature_of_the_coefficients(name):
    sde = SDES[name]
    T = sde.T
    for s, t in [(0.0, 0.3 * T), (0.05 * T, 0.5 * T), (0.4 * T, 0.45 * T), (0.6 * T, T)]:
        a, b2 = transition(sde, s, t)
        a_ref, b2_ref = quad_transition(sde, s, t)
        assert abs(a / a_ref - 1) < 1e-9, (name, s, t, a, a_ref)
        assert abs(b2 / b2_ref - 1) < 1e-8, (name, s, t, b2, b2_ref)


def test_transition_of_a_discrete_schedule():
    """log m is piecewise linear through the table's knots and sigma^2 = 1 - m^2, so
    a = exp(interpolated log m(t) - log m(s)) and b^2 = 1 - a^2 (variance preserving)."""
    sde = SDES["discrete"]
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0).numpy()
    knots_t = np.arange(1001) / 1000.0
    knots_logm = np.concatenate([[0.0], 0.5 * np.log(abar)])
    for s, t in [(0.0, 0.3), (0.1234, 0.1239), (0.5, 1.0), (0.25, 0.2501)]:
        a, b2 = transition(sde, s, t)
        a_ref = math.exp(np.interp(t, knots_t, knots_logm) - np.interp(s, knots_t, knots_logm))
        assert abs(a / a_ref - 1) < 1e-12, (s, t, a, a_ref)
        assert abs(b2 / -math.expm1(2 * math.log(a_ref)) - 1) < 1e-9, (s, t, b2)


def _vp_B(u, b0=0.1, b1=20.0):
    u = mpmath.mpf(u)
    return b0 * u + (b1 - b0) * u * u / 2


def _exact_small_gap(name, s, t):
    """b^2 in 50-digit arithmetic from the closed-form kernels (m, sigma^2 or B written here)."""
    mpmath.mp.dps = 50
    s, t = mpmath.mpf(s), mpmath.mpf(t)
    if name == "vp":
        return -mpmath.expm1(-(_vp_B(t) - _vp_B(s)))
    if name == "subvp":
        Bs, Bt = _vp_B(s), _vp_B(t)
        return mpmath.exp(-Bt) * (2 * mpmath.cosh(Bt) - 2 * mpmath.cosh(Bs))
    if name == "ve":
        r = mpmath.log(mpmath.mpf(50) / mpmath.mpf("0.01"))
        return mpmath.mpf("0.01") ** 2 * (mpmath.exp(2 * r * t) - mpmath.exp(2 * r * s))
    if name == "ou":
        th, sg = mpmath.mpf("1.3"), mpmath.mpf("0.7")
        return sg**2 / (2 * th) * -mpmath.expm1(-2 * th * (t - s))
    if name == "cosine":
        c = mpmath.pi / (2 * (1 + mpmath.mpf("0.008")))
        ab = lambda u: (mpmath.cos(c * (u + mpmath.mpf("0.008"))) / mpmath.cos(c * mpmath.mpf("0.008"))) ** 2  # noqa
        return ab(t) * ((1 - ab(t)) / ab(t) - (1 - ab(s)) / ab(s))
    raise KeyError(name)


@pytest.mark.parametrize("name,tol", [("vp", 1e-12), ("subvp", 1e-12), ("ve", 1e-12), ("ou", 1e-12),
                                      ("cosine", 1e-5)])
def test_small_steps_keep_relative_accuracy(name, tol):
    """A step of 1e-9 is where sigma_t^2 - a^2 sigma_s^2 loses ~7 digits; the closed forms keep all
    (the generic log-SNR formula used by the cosine kernel keeps ~1e-7, measured)."""
    for s in (1e-5, 0.1, 0.5):
        t = s + 1e-9
        _, b2 = transition(SDES[name], s, t)
        ref = float(_exact_small_gap(name, s, t))
        assert abs(b2 / ref - 1) < tol, (name, s, b2, ref)


@pytest.mark.parametrize("name", list(SDES))
def test_transition_from_zero_is_the_kernel(name):
    sde = SDES[name]
    t = torch.tensor([1e-6, 0.01, 0.3, 0.9], dtype=F64) * sde.T
    a, b2 = sde.kernel.transition(torch.zeros_like(t), t)
    m, s = sde.marginal(t)
    assert torch.allclose(a, m, rtol=1e-12, atol=0) and torch.allclose(b2, s * s, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", list(SDES))
@HYP
@given(u=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_transitions_compose(name, u):
    """Chapman-Kolmogorov: going s -> t -> u in two steps is the one step s -> u."""
    sde = SDES[name]
    s, t, w = sorted(x * sde.T for x in u)
    a_st, b_st = transition(sde, s, t)
    a_tw, b_tw = transition(sde, t, w)
    a_sw, b_sw = transition(sde, s, w)
    assert math.isclose(a_sw, a_st * a_tw, rel_tol=1e-10)
    assert math.isclose(b_sw, a_tw**2 * b_st + b_tw, rel_tol=1e-8, abs_tol=1e-300)


@pytest.mark.parametrize("name", list(SDES))
def test_variance_is_never_negative_or_nan(name):
    """Equal times, reversed times and t = s = 0 give b^2 = 0, never a negative number or NaN."""
    sde = SDES[name]
    T = sde.T
    s = torch.tensor([0.0, 0.0, 0.3, 0.7, T, 0.5, 1e-7], dtype=F64) * torch.tensor(
        [1.0, 1.0, T, T, 1.0, T, 1.0], dtype=F64)
    t = torch.tensor([0.0, 1e-300, 0.3 * T, 0.2 * T, T, 0.5 * T + 1e-13, 2e-7], dtype=F64)
    a, b2 = sde.kernel.transition(s, t)
    assert bool(torch.isfinite(a).all() and torch.isfinite(b2).all()), (a, b2)
    assert bool((b2 >= 0).all()), b2
    assert float(b2[0]) == 0.0 and float(b2[2]) == 0.0 and float(b2[3]) == 0.0 and float(b2[4]) == 0.0
    assert float(b2[6]) > 0.0


def test_log_snr_T():
    for sde in SDES.values():
        assert sde.kernel.log_snr_T == float(sde.log_snr(sde.T))
