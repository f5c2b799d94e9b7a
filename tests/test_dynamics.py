"""Reverse-time SDE family, probability-flow ODE and score parameterisations, checked against
closed forms written here (Gaussian data, where every quantity is explicit)."""

import math

import numpy as np
import pytest
import torch
import torchdiffeq
import torchsde
from hypothesis import given, settings, strategies as st

import sdekit
from sdekit import parameterization as P

F64 = torch.float64
HYP = settings(max_examples=15, deadline=None, derandomize=True)

# ---------------------------------------------------------------------------------------------
# Closed-form kernels written here (torch, float64) -- independent of sdekit's kernels.
# ---------------------------------------------------------------------------------------------


def vp_coefs(t, b0=0.1, b1=20.0):
    """VP: beta, B = int beta, f = -beta/2, g^2 = beta, m = exp(-B/2), sigma^2 = 1 - exp(-B)."""
    t = torch.as_tensor(t, dtype=F64)
    beta = b0 + t * (b1 - b0)
    B = b0 * t + 0.5 * (b1 - b0) * t * t
    return dict(f=-0.5 * beta, g2=beta, m=torch.exp(-0.5 * B), s=torch.sqrt(-torch.expm1(-B)))


def subvp_coefs(t, b0=0.1, b1=20.0):
    c = vp_coefs(t, b0, b1)
    B = -2 * torch.log(c["m"])
    c.update(g2=c["g2"] * -torch.expm1(-2 * B), s=-torch.expm1(-B))
    return c


def ve_coefs(t, smin=0.01, smax=50.0):
    t = torch.as_tensor(t, dtype=F64)
    r = math.log(smax / smin)
    return dict(f=torch.zeros_like(t), g2=2 * r * smin**2 * torch.exp(2 * r * t), m=torch.ones_like(t),
                s=smin * torch.sqrt(torch.expm1(2 * r * t)))


PROCS = {
    "VP": (sdekit.VPSDE(), vp_coefs),
    "subVP": (sdekit.SubVPSDE(), subvp_coefs),
    "VE": (sdekit.VESDE(), ve_coefs),
}


def bc(c, x):
    """Broadcast a 0-d or (B,) coefficient over a batch of any rank."""
    c = torch.as_tensor(c, dtype=x.dtype)
    return c if c.dim() == 0 else c.reshape(-1, *[1] * (x.dim() - 1))


class Gaussian:
    """Data N(mu, s0^2 I); under a linear SDE x_t ~ N(m mu, (m^2 s0^2 + sigma^2) I)."""

    def __init__(self, coefs, mu, s0):
        self.coefs, self.mu, self.s0 = coefs, mu, s0

    def _ms(self, x, t):
        c = self.coefs(t)
        return bc(c["m"], x), bc(c["s"], x)

    def score(self, x, t):
        m, s = self._ms(x, t)
        return -(x - m * self.mu) / (m * m * self.s0**2 + s * s)

    def eps(self, x, t):  # E[eps | x_t] = -sigma * score
        m, s = self._ms(x, t)
        return s * (x - m * self.mu) / (m * m * self.s0**2 + s * s)

    def denoiser(self, x, t):  # E[x0 | x_t] = mu + m s0^2/(m^2 s0^2 + sigma^2) (x - m mu)
        m, s = self._ms(x, t)
        return self.mu + m * self.s0**2 / (m * m * self.s0**2 + s * s) * (x - m * self.mu)

    def v(self, x, t):  # v = m eps - sigma x0, conditional expectation
        m, s = self._ms(x, t)
        return m * self.eps(x, t) - s * self.denoiser(x, t)


def batch(shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


SHAPES = [(5,), (5, 3), (5, 2, 3, 3)]
SHAPE_IDS = ["rank1", "rank2", "rank4"]

# ---------------------------------------------------------------------------------------------
# Reverse SDE family and PF ODE for the linear class
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, "fn"])
def test_reverse_drift_gaussian_vp(shape, eta):
    sde, coefs = PROCS["VP"]
    mu = 0.3 + batch(shape[1:] or (), seed=9)
    data = Gaussian(coefs, mu, 0.7)
    eta_arg = (lambda t: 0.2 + 0.6 * t) if eta == "fn" else eta
    rev = sde.reverse(data.score, eta=eta_arg, t_eps=1e-3)
    x = batch(shape, seed=1)
    B = shape[0]
    for t in [0.5, torch.tensor(0.02, dtype=F64), torch.linspace(0.01, 1.0, B, dtype=F64)]:
        t64 = torch.as_tensor(t, dtype=F64)
        e = (0.2 + 0.6 * t64) if eta == "fn" else torch.full_like(t64, eta)
        c = coefs(t64)
        score = -(x - bc(c["m"], x) * mu) / (bc(c["m"], x) ** 2 * 0.49 + bc(c["s"], x) ** 2)
        expected = bc(c["f"], x) * x - bc((1 + e * e) / 2 * c["g2"], x) * score
        got = rev.drift(x, t)
        assert got.shape == x.shape
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
        g = rev.diffusion(x, t)
        assert torch.allclose(g, (e * c["g2"].sqrt()).expand(B), rtol=1e-13)
        if eta == 0.0:
            pf = sde.probability_flow(data.score, t_eps=1e-3)
            assert torch.allclose(pf(t, x), expected, rtol=1e-12, atol=1e-12)
            assert torch.allclose(pf.velocity(x, t), expected, rtol=1e-12, atol=1e-12)


def test_eta_families_differ_and_pf_is_eta0():
    """The eta-dependence is real: drifts for eta = 0 and 1 differ by exactly g^2/2 * score."""
    sde, coefs = PROCS["subVP"]
    data = Gaussian(coefs, torch.tensor([1.0, -2.0], dtype=F64), 0.5)
    x, t = batch((4, 2), seed=3), 0.4
    d0 = sde.reverse(data.score, eta=0.0).drift(x, t)
    d1 = sde.reverse(data.score, eta=1.0).drift(x, t)
    c = coefs(t)
    assert torch.allclose(d0 - d1, 0.5 * c["g2"] * data.score(x, torch.full((4,), t, dtype=F64)), rtol=1e-12)
    assert torch.allclose(sde.probability_flow(data.score)(t, x), d0, rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# State-dependent noise: the divergence term of G G^T
# ---------------------------------------------------------------------------------------------


def c_of(t):
    return 0.5 + t


def diag_sde(**kw):
    # dx = -(1 + t) x dt + c(t) sqrt(1 + x^2) dW (diagonal):  D = c^2 (1 + x^2),  div D = 2 c^2 x
    return sdekit.SDE(lambda x, t: -bc(1 + t, x) * x,
                      lambda x, t: bc(c_of(t), x) * torch.sqrt(1 + x * x), noise="diagonal", T=1.0, **kw)


def nonlinear_score(x, t):
    return -x**3 + torch.sin(x) * bc(t, x)


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 2)], ids=["rank2", "rank4"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_reverse_drift_state_dependent_diagonal_noise(shape, eta):
    sde = diag_sde()
    x = batch(shape, seed=4)
    t = torch.tensor([0.1, 0.35, 0.6, 0.9][: shape[0]], dtype=F64)
    c2 = bc(c_of(t), x) ** 2
    D = c2 * (1 + x * x)
    div = 2 * c2 * x
    F = -bc(1 + t, x) * x
    s = nonlinear_score(x, t)
    expected = F - (1 + eta**2) / 2 * (D * s + div)
    rev = sde.reverse(nonlinear_score, eta=eta)
    assert torch.allclose(rev.drift(x, t), expected, rtol=1e-12, atol=1e-12)
    # the noise of the reverse process is eta * G
    assert torch.allclose(rev.diffusion(x, t), eta * bc(c_of(t), x) * torch.sqrt(1 + x * x), rtol=1e-14)
    if eta == 0.0:
        pf = sde.probability_flow(nonlinear_score)
        assert torch.allclose(pf(t, x), expected, rtol=1e-12, atol=1e-12)


def test_user_diffusion_divergence_is_used():
    calls = []

    def my_div(x, t):  # deliberately not the true divergence, to see that it is the one used
        calls.append(t)
        return 5.0 * x + bc(t, x)

    sde = diag_sde(diffusion_divergence=my_div)
    x, t = batch((4, 3), seed=5), 0.3
    rev = sde.reverse(nonlinear_score, eta=1.0)
    tt = torch.full((4,), t, dtype=F64)
    D = c_of(t) ** 2 * (1 + x * x)
    expected = -(1 + t) * x - (D * nonlinear_score(x, tt) + 5.0 * x + t)
    assert torch.allclose(rev.drift(x, t), expected, rtol=1e-12, atol=1e-12)
    assert calls and calls[-1].shape == (4,)


def test_reverse_drift_general_noise_divergence():
    # G(x) = [[1 + x1^2, 0], [x0, 1]]:  D = G G^T = [[(1+x1^2)^2, (1+x1^2) x0], [(1+x1^2) x0, x0^2 + 1]]
    # (div D)_0 = d0 D00 + d1 D01 = 2 x1 x0;  (div D)_1 = d0 D10 + d1 D11 = 1 + x1^2
    def G(x, t):
        z = torch.zeros_like(x[:, 0])
        return torch.stack([torch.stack([1 + x[:, 1] ** 2, z], -1),
                            torch.stack([x[:, 0], torch.ones_like(z)], -1)], 1)

    sde = sdekit.SDE(lambda x, t: -x, G, noise="general", T=1.0)
    x, t = batch((6, 2), seed=6), 0.25
    x0, x1 = x[:, 0], x[:, 1]
    D = torch.stack([torch.stack([(1 + x1**2) ** 2, (1 + x1**2) * x0], -1),
                     torch.stack([(1 + x1**2) * x0, x0**2 + 1], -1)], 1)
    div = torch.stack([2 * x1 * x0, 1 + x1**2], -1)
    s = nonlinear_score(x, torch.full((6,), t, dtype=F64))
    for eta in (0.0, 1.0):
        expected = -x - (1 + eta**2) / 2 * (torch.einsum("bij,bj->bi", D, s) + div)
        assert torch.allclose(sde.reverse(nonlinear_score, eta=eta).drift(x, t), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# torchsde / torchdiffeq integration
# ---------------------------------------------------------------------------------------------


def gaussian_std(coefs, s0, t):
    c = coefs(t)
    return float(torch.sqrt(c["m"] ** 2 * s0**2 + c["s"] ** 2))


def test_torchsde_reverse_sde_rank4():
    sde, coefs = PROCS["VP"]
    s0, t_eps, T = 0.5, 1e-3, sde.T
    data = Gaussian(coefs, torch.zeros(()), s0)
    shape = (64, 1, 4, 4)
    x = gaussian_std(coefs, s0, T) * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rev = sde.reverse(data.score, eta=1.0, t_eps=t_eps)
    torch.manual_seed(0)
    ys = torchsde.sdeint(rev.to_torchsde(x.shape), x.flatten(1), torch.tensor([0.0, T - t_eps]),
                         method="euler", dt=0.01)
    assert ys.shape == (2, 64, 16) and ys.dtype == torch.float32
    assert torch.isfinite(ys).all()
    assert torch.equal(ys[0], x.flatten(1))
    # the reverse SDE carries N(0, std(T)^2) to N(0, std(t_eps)^2) = approximately N(0, s0^2)
    std = float(ys[-1].std())
    assert std == pytest.approx(gaussian_std(coefs, s0, t_eps), rel=0.1)


def test_torchsde_forward_sde_rank4():
    sde, coefs = PROCS["VP"]
    s0 = 2.0
    shape = (64, 2, 2, 4)
    x0 = s0 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    ys = torchsde.sdeint(sde.to_torchsde(shape), x0.flatten(1), torch.tensor([0.0, 0.3, 1.0]),
                         method="euler", dt=0.005)
    assert ys.shape == (3, 64, 16) and torch.isfinite(ys).all()
    for k, t in ((1, 0.3), (2, 1.0)):
        assert float(ys[k].std()) == pytest.approx(gaussian_std(coefs, s0, t), rel=0.1)


def test_torchsde_general_sde_diagonal_noise():
    sde = diag_sde()
    x = batch((8, 3), seed=2, dtype=torch.float32)
    rev = sde.reverse(nonlinear_score, eta=0.5, t_eps=1e-2)
    # a seeded Brownian path: without one torchsde draws from the global RNG, so the path (and
    # whether Euler at dt = 0.05 on this x^5-growth drift stays finite) depended on test order
    ts = torch.tensor([0.0, 1.0 - 1e-2])
    bm = torchsde.BrownianInterval(0.0, float(ts[-1]), size=x.shape, dtype=x.dtype, entropy=7)
    ys = torchsde.sdeint(rev.to_torchsde(x.shape), x, ts, method="euler", dt=0.05, bm=bm)
    assert ys.shape == (2, 8, 3) and torch.isfinite(ys).all()


@pytest.mark.parametrize("name", ["VP", "VE"])
def test_torchdiffeq_pf_ode_rank4_exact_gaussian(name):
    """For N(0, s0^2 I) data the PF ODE is linear: x_t = x_T * std(t)/std(T), std^2 = m^2 s0^2 + sigma^2.
    (dx/dt = f x + g^2 x/(2 v) with v = std^2, and v' = 2 f v + g^2, so (log std)' = f + g^2/(2v).)"""
    sde, coefs = PROCS[name]
    s0, t_eps, T = 0.5, 1e-3, sde.T
    data = Gaussian(coefs, torch.zeros(()), s0)
    pf = sde.probability_flow(data.score, t_eps=t_eps)
    x = torch.randn((8, 3, 4, 4), generator=torch.Generator().manual_seed(2)) * gaussian_std(coefs, s0, T)
    out = torchdiffeq.odeint(pf, x, torch.tensor([T, t_eps]), method="rk4", options=dict(step_size=0.01))
    assert out.shape == (2, 8, 3, 4, 4) and torch.isfinite(out).all()
    exact = x * (gaussian_std(coefs, s0, t_eps) / gaussian_std(coefs, s0, T))
    assert torch.allclose(out[-1], exact, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Score parameterisations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROCS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_parameterisations_recover_exact_score(name, shape):
    sde, coefs = PROCS[name]
    mu = 0.5 + batch(shape[1:] or (), seed=11)
    data = Gaussian(coefs, mu, 1.3)
    x = 2 * batch(shape, seed=12)
    B = shape[0]
    t = torch.linspace(0.05, 0.95, B, dtype=F64)
    exact = data.score(x, t)
    s2 = bc(coefs(t)["s"], x) ** 2
    for conv, model in ((P.score_from_eps, data.eps), (P.score_from_denoiser, data.denoiser),
                        (P.score_from_v, data.v)):
        got = conv(model, sde)(x, t)
        assert got.shape == shape
        # (m D - x)/sigma^2 cancels when sigma is small (VE at small t): allow round-off of x/sigma^2
        tol = 1e-12 * (1 + exact.abs()) + 1e-14 * (1 + x.abs() + mu.abs()) / s2
        assert bool(((got - exact).abs() <= tol).all()), conv.__name__
    # inverse adapters reproduce the closed-form eps / denoiser
    assert torch.allclose(P.eps_from_score(data.score, sde)(x, t), data.eps(x, t), rtol=1e-12, atol=1e-12)
    assert torch.allclose(P.denoiser_from_score(data.score, sde)(x, t), data.denoiser(x, t), rtol=1e-12, atol=1e-12)
    # round trips
    s_rt = P.score_from_eps(P.eps_from_score(data.score, sde), sde)(x, t)
    assert torch.allclose(s_rt, exact, rtol=1e-12, atol=1e-12)
    s_rt = P.score_from_denoiser(P.denoiser_from_score(data.score, sde), sde)(x, t)
    assert torch.allclose(s_rt, exact, rtol=1e-12, atol=1e-12)
    # v target from (eps, x0): m eps - sigma x0
    eps, x0 = batch(shape, seed=13), batch(shape, seed=14)
    c = coefs(t)
    v = P.v_from_eps_x0(eps, x0, sde, t)
    assert torch.allclose(v, bc(c["m"], x) * eps - bc(c["s"], x) * x0, rtol=1e-13, atol=1e-14)
    # ... and a v-model that returns that target recovers the conditional score -eps/sigma
    xt = bc(c["m"], x) * x0 + bc(c["s"], x) * eps
    s_cond = P.score_from_v(lambda y, tt: v, sde)(xt, t)
    assert torch.allclose(s_cond, -eps / bc(c["s"], x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(PROCS))
def test_tweedie_denoise_is_posterior_mean(name):
    sde, coefs = PROCS[name]
    mu = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    data = Gaussian(coefs, mu, 0.8)
    x = batch((6, 3), seed=15)
    for t in (0.3, torch.linspace(0.02, 0.9, 6, dtype=F64)):
        tt = torch.as_tensor(t, dtype=F64).expand(6)
        assert torch.allclose(P.tweedie_denoise(data.score, sde, x, t), data.denoiser(x, tt), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(PROCS))
def test_tweedie_covariance_full_covariance_gaussian(name):
    sde, coefs = PROCS[name]
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 3))
    Sigma = A @ A.T + 0.3 * np.eye(3)
    mu = np.array([0.5, -1.0, 2.0])
    S_t, mu_t = torch.tensor(Sigma), torch.tensor(mu)

    def score(x, t):  # x_t ~ N(m mu, m^2 Sigma + sigma^2 I)
        c = coefs(t)
        m, s = c["m"].reshape(-1, 1, 1), c["s"].reshape(-1, 1, 1)
        C = m * m * S_t + s * s * torch.eye(3, dtype=F64)
        return -torch.linalg.solve(C, (x - c["m"][:, None] * mu_t).unsqueeze(-1)).squeeze(-1)

    x = torch.tensor(rng.normal(size=(4, 3)))
    ts = np.array([0.05, 0.3, 0.6, 0.95])
    cov = P.tweedie_covariance(score, sde, x, torch.tensor(ts))
    assert cov.shape == (4, 3, 3)
    for i, t in enumerate(ts):
        c = coefs(torch.tensor(t))
        m, s = float(c["m"]), float(c["s"])
        ref = Sigma - m * Sigma @ np.linalg.inv(m * m * Sigma + s * s * np.eye(3)) @ (m * Sigma)
        assert np.allclose(cov[i].numpy(), ref, rtol=1e-9, atol=1e-11 * np.abs(Sigma).max())


@HYP
@given(t=st.floats(0.01, 1.0), s0=st.floats(0.1, 3.0), seed=st.integers(0, 1000))
def test_parameterisation_property_vp(t, s0, seed):
    sde, coefs = PROCS["VP"]
    data = Gaussian(coefs, torch.tensor([0.2, -0.4], dtype=F64), s0)
    x = batch((3, 2), seed=seed)
    tt = torch.full((3,), t, dtype=F64)
    exact = data.score(x, tt)
    for conv, model in ((P.score_from_eps, data.eps), (P.score_from_denoiser, data.denoiser),
                        (P.score_from_v, data.v)):
        assert torch.allclose(conv(model, sde)(x, tt), exact, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# affine split of the PF / reverse drift (used by the likelihood's divergence)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_affine_coefficients_closed_form_vp(eta):
    """PF: a = f = -beta/2, c = -g^2/2; reverse: c = -(1 + eta^2) g^2 / 2 (closed forms coded here)."""
    sde = sdekit.VPSDE()
    t = torch.tensor([0.05, 0.5, 1.0], dtype=F64)
    cf = vp_coefs(t)
    score = lambda x, tt: -x  # noqa: E731
    a, c = sde.probability_flow(score, 1e-3).affine_coefficients(t)
    torch.testing.assert_close(a, cf["f"], rtol=1e-14, atol=0)
    torch.testing.assert_close(c, -0.5 * cf["g2"], rtol=1e-14, atol=0)
    a, c = sde.reverse(score, eta=eta).affine_coefficients(t)
    torch.testing.assert_close(a, cf["f"], rtol=1e-14, atol=0)
    torch.testing.assert_close(c, -0.5 * (1 + eta * eta) * cf["g2"], rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["subvp", "ve", "custom"])
def test_affine_coefficients_reassemble_the_drift(name):
    sde = {"subvp": sdekit.SubVPSDE(), "ve": sdekit.VESDE(0.01, 50.0),
           "custom": sdekit.LinearSDE(lambda t: -0.3 - t, lambda t: 1.0 + t)}[name]
    score = lambda x, tt: torch.sin(x) - x  # noqa: E731
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    for t in (0.1, 0.6):
        pf, rev = sde.probability_flow(score, 1e-3), sde.reverse(score, eta=lambda tt: 0.5 + tt)
        for proc, drift in ((pf, pf.velocity(x, t)), (rev, rev.drift(x, t))):
            a, c = proc.affine_coefficients(t)
            torch.testing.assert_close(a * x + c * score(x, t), drift, rtol=1e-13, atol=1e-13)


def test_affine_coefficients_none_for_a_general_sde():
    sde = sdekit.SDE(lambda x, t: -x ** 3, lambda x, t: torch.ones_like(t), noise="isotropic")
    assert sde.probability_flow(lambda x, t: -x, 1e-3).affine_coefficients(0.5) is None
