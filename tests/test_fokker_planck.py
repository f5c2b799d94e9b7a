"""Fokker–Planck residuals: exact marginals vanish, wrong densities do not, values match sympy.

Ground truth: the exact Gaussian-mixture marginals solve the Fokker–Planck equation; stationary
densities of Langevin-type diffusions are known in closed form; and the residual's *value* is
checked against sympy applied to the original (non-log) form (∂_t p + ∇·(Fp) − ½ ΣΣ ∂_i∂_j(D_ij p))/p.
"""


from _mixture_params import random_params
import pytest
import sympy as sp
import torch
from hypothesis import given, settings, strategies as st

import sdekit
from sdekit import kernels
from sdekit.fokker_planck import fokker_planck_residual
from sdekit.oracles import GaussianMixture

F64 = torch.float64
HYP = settings(max_examples=25, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------------------------
# Drawn processes and mixtures
# ----------------------------------------------------------------------------------------------

@st.composite
def processes(draw):
    kind = draw(st.sampled_from(["vp", "subvp", "ve", "cosine", "ou", "custom"]))
    u = lambda lo, hi: draw(st.floats(lo, hi, allow_nan=False))  # noqa: E731
    if kind == "vp":
        b0 = u(0.05, 1.0)
        return sdekit.VPSDE(b0, b0 + u(0.5, 25.0), T=u(0.5, 1.5))
    if kind == "subvp":
        b0 = u(0.05, 1.0)
        return sdekit.SubVPSDE(b0, b0 + u(0.5, 25.0), T=u(0.5, 1.5))
    if kind == "ve":
        return sdekit.VESDE(u(0.005, 0.1), u(1.0, 50.0), T=u(0.5, 2.0))
    if kind == "cosine":
        return sdekit.CosineVPSDE(u(0.001, 0.02), T=u(0.5, 0.99))
    if kind == "ou":
        return sdekit.OrnsteinUhlenbeck(u(0.1, 3.0), u(0.2, 2.0), T=u(0.5, 3.0))
    a, b, c = u(0.1, 3.0), u(-0.9, 0.9), u(0.5, 10.0)
    e, b2, c2, ph = u(0.2, 5.0), u(-0.9, 0.9), u(0.5, 10.0), u(0.0, 3.0)
    return sdekit.LinearSDE(lambda t: -a * (1 + b * torch.sin(c * t)),
                            lambda t: torch.sqrt(e * (1 + b2 * torch.sin(c2 * t + ph))), T=u(0.5, 2.0))


def random_mixture(kind, d, K, seed):
    w, mu, S = random_params(kind, d, K, seed, mean_scale=1.5)
    return GaussianMixture(torch.tensor(w), torch.tensor(mu), torch.tensor(S))


def draw_points(gm, sde, n, seed):
    """Times in [1e-3, T] and points around the marginal (x0 from p_0, 1.5x the kernel noise)."""
    g = torch.Generator().manual_seed(seed)
    t = 1e-3 + (sde.T - 1e-3) * torch.rand(n, generator=g, dtype=F64)
    x0 = gm.sample(n, generator=g)
    m, s = sde.kernel.m(t)[:, None], sde.kernel.sigma(t)[:, None]
    return m * x0 + 1.5 * s * torch.randn(x0.shape, generator=g, dtype=F64), t


class ScaledVarianceKernel(kernels.Kernel):
    """The kernel of ``base`` with sigma^2 multiplied by ``factor`` (no longer a solution)."""

    def __init__(self, base, factor):
        self.base, self.factor, self.T = base, factor, base.T

    def f(self, t):
        return self.base.f(t)

    def g2(self, t):
        return self.base.g2(t)

    def log_m(self, t):
        return self.base.log_m(t)

    def sigma2(self, t):
        return self.factor * self.base.sigma2(t)


mixture_args = dict(sde=processes(), cov=st.sampled_from(["full", "diag", "iso"]), d=st.integers(1, 4),
                    K=st.integers(1, 3), seed=st.integers(0, 10**6))


@HYP
@given(**mixture_args)
def test_exact_marginal_has_zero_residual(sde, cov, d, K, seed):
    gm = random_mixture(cov, d, K, seed)
    x, t = draw_points(gm, sde, 8, seed)
    r = fokker_planck_residual(sde, gm.exact_log_prob(sde), x, t)
    assert r.shape == (8,) and r.dtype == F64
    assert float(r.abs().max()) <= 1e-6, (sde, r)


@HYP
@given(**mixture_args)
def test_five_percent_wrong_variance_is_detected(sde, cov, d, K, seed):
    gm = random_mixture(cov, d, K, seed)
    x, t = draw_points(gm, sde, 8, seed)
    wrong = sdekit.LinearSDE(T=sde.T, kernel=ScaledVarianceKernel(sde.kernel, 1.05))
    r = fokker_planck_residual(sde, gm.exact_log_prob(wrong), x, t)
    assert float(r.abs().max()) > 1e-6, (sde, r)


def test_general_sde_wrappers_of_a_linear_process():
    """VP written as a general SDE with isotropic, diagonal and general noise: same zero residual."""
    vp = sdekit.VPSDE()
    beta = lambda t: 0.1 + 19.9 * t  # noqa: E731  (coded here, not taken from the kernel)
    drift = lambda x, t: -0.5 * beta(t)[:, None] * x  # noqa: E731
    gm = random_mixture("full", 3, 2, 1)
    x, t = draw_points(gm, vp, 10, 1)
    diffusions = {
        "isotropic": lambda x, t: beta(t).sqrt(),
        "diagonal": lambda x, t: beta(t).sqrt()[:, None].expand_as(x),
        "general": lambda x, t: beta(t).sqrt()[:, None, None] * torch.eye(3, dtype=x.dtype).expand(len(x), 3, 3),
    }
    for noise, diff in diffusions.items():
        sde = sdekit.SDE(drift, diff, noise=noise)
        r = fokker_planck_residual(sde, gm.exact_log_prob(vp), x, t)
        assert float(r.abs().max()) < 1e-9, (noise, r)


# ----------------------------------------------------------------------------------------------
# The residual's value against closed forms
# ----------------------------------------------------------------------------------------------

@HYP
@given(sde=processes(), d=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_residual_value_for_a_gaussian_with_arbitrary_variance(sde, d, seed):
    """p_t = N(0, v(t) I), v arbitrary: R = (v' - 2 f v - g^2)(|x|^2/(2 v^2) - d/(2 v)) (Concepts §8)."""
    v = lambda t: 1.0 + t * t + 0.5 * torch.sin(3 * t)  # noqa: E731  (> 0.5 for all t)
    dv = lambda t: 2 * t + 1.5 * torch.cos(3 * t)  # noqa: E731

    def log_p(x, t):
        return -0.5 * (x * x).sum(-1) / v(t) - 0.5 * d * torch.log(v(t))

    g = torch.Generator().manual_seed(seed)
    t = 1e-3 + (sde.T - 1e-3) * torch.rand(6, generator=g, dtype=F64)
    x = 2.0 * torch.randn(6, d, generator=g, dtype=F64)
    f, g2 = sde.f(t), sde.g2(t)
    expected = (dv(t) - 2 * f * v(t) - g2) * ((x * x).sum(-1) / (2 * v(t) ** 2) - d / (2 * v(t)))
    r = fokker_planck_residual(sde, log_p, x, t)
    torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-10)


_X0, _X1, _T = sp.symbols("x0 x1 t", real=True)


def _sympy_residual(F, D, ell, xs):
    """(∂_t p + Σ_i ∂_i(F_i p) − ½ Σ_ij ∂_i∂_j(D_ij p)) / p with p = exp(ell): the original form."""
    p = sp.exp(ell)
    n = len(xs)
    expr = sp.diff(p, _T) + sum(sp.diff(F[i] * p, xs[i]) for i in range(n))
    expr -= sp.Rational(1, 2) * sum(sp.diff(D[i][j] * p, xs[i], xs[j]) for i in range(n) for j in range(n))
    num = sp.lambdify((*xs, _T), expr, "numpy")
    den = sp.lambdify((*xs, _T), p, "numpy")
    return lambda *args: num(*args) / den(*args)


@pytest.mark.parametrize("noise", ["isotropic", "diagonal", "general"])
def test_residual_value_matches_sympy(noise):
    """A non-linear 2-d SDE and a density that is *not* its marginal: the full residual value."""
    x0, x1, t = _X0, _X1, _T
    F = [-x0**3 + sp.sin(t) * x1, -x1 + sp.Rational(1, 2) * x0 * x1]
    ell = -(x0**2 + x0 * x1 + 2 * x1**2) / (2 * (1 + t)) + sp.Rational(1, 10) * sp.sin(x0 * x1)
    if noise == "isotropic":
        g = 1 + t
        D = [[g**2, 0], [0, g**2]]
    elif noise == "diagonal":
        G = [sp.sqrt(1 + x0**2) * (1 + sp.sin(t) / 5), 1 + sp.tanh(x0 * x1) / 2]
        D = [[G[0] ** 2, 0], [0, G[1] ** 2]]
    else:
        Gm = sp.Matrix([[1 + sp.sin(x0) * 3 / 10, x1 / 5, sp.Rational(1, 10)],
                        [x0 / 10, sp.Rational(6, 5) + sp.cos(x1 * t) * 2 / 5, sp.Rational(3, 10)]])
        D = (Gm * Gm.T).tolist()
    ref = _sympy_residual(F, D, ell, [x0, x1])

    def drift(x, t):
        a, b = x[:, 0], x[:, 1]
        return torch.stack([-a**3 + torch.sin(t) * b, -b + 0.5 * a * b], 1)

    def diffusion(x, t):
        a, b = x[:, 0], x[:, 1]
        if noise == "isotropic":
            return 1 + t
        if noise == "diagonal":
            return torch.stack([torch.sqrt(1 + a * a) * (1 + torch.sin(t) / 5), 1 + torch.tanh(a * b) / 2], 1)
        one = torch.ones_like(a)
        row0 = torch.stack([1 + 0.3 * torch.sin(a), b / 5, 0.1 * one], 1)
        row1 = torch.stack([a / 10, 1.2 + 0.4 * torch.cos(b * t), 0.3 * one], 1)
        return torch.stack([row0, row1], 1)

    def log_p(x, t):
        a, b = x[:, 0], x[:, 1]
        return -(a * a + a * b + 2 * b * b) / (2 * (1 + t)) + 0.1 * torch.sin(a * b)

    sde = sdekit.SDE(drift, diffusion, noise=noise, T=2.0)
    g = torch.Generator().manual_seed(3)
    x = 1.5 * torch.randn(7, 2, generator=g, dtype=F64)
    tt = 2.0 * torch.rand(7, generator=g, dtype=F64)
    r = fokker_planck_residual(sde, log_p, x, tt)
    expected = torch.tensor([ref(*x[b].tolist(), float(tt[b])) for b in range(7)], dtype=F64)
    torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-10)
    # a scalar time broadcasts
    r1 = fokker_planck_residual(sde, log_p, x, 0.7)
    expected1 = torch.tensor([ref(*x[b].tolist(), 0.7) for b in range(7)], dtype=F64)
    torch.testing.assert_close(r1, expected1, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Stationary densities of state-dependent diffusions (Langevin construction)
# ----------------------------------------------------------------------------------------------
# For dx = [½ ∇·D + ½ D ∇log π] dt + G dW with D = G Gᵀ, the probability flux
# F π − ½ Σ_j ∂_j(D_ij π) = π [F − ½ ∇·D − ½ D ∇log π] vanishes, so π is stationary and its
# residual (with ∂_t log π = 0) is identically zero.

def test_stationary_density_1d_state_dependent_noise():
    # π ∝ exp(−x²/2 − x⁴/4), D(x) = 1 + x²: F = ½ D' + ½ D (log π)' = x − ½ (1 + x²)(x + x³)
    sde = sdekit.SDE(lambda x, t: x - 0.5 * (1 + x * x) * (x + x**3),
                     lambda x, t: torch.sqrt(1 + x * x), noise="diagonal", T=1.0)
    log_pi = lambda x, t: (-0.5 * x * x - 0.25 * x**4).sum(-1)  # noqa: E731
    x = torch.linspace(-3.0, 3.0, 25, dtype=F64)[:, None]
    r = fokker_planck_residual(sde, log_pi, x, 0.5)
    assert float(r.abs().max()) < 1e-10
    perturbed = lambda x, t: log_pi(x, t) + 0.2 * torch.sin(x).sum(-1)  # noqa: E731
    assert float(fokker_planck_residual(sde, perturbed, x, 0.5).abs().max()) > 1e-2


def test_stationary_density_3d_diagonal_noise_with_cross_dependence():
    A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]], dtype=F64)

    def D_diag(x):  # D_ii = 1 + x_i² + ½ sin²(x_{i+1}); the row divergence is ∂_i D_ii = 2 x_i
        return 1 + x * x + 0.5 * torch.sin(torch.roll(x, -1, dims=1)) ** 2

    def grad_log_pi(x):
        return -x @ A - 0.4 * x**3

    sde = sdekit.SDE(lambda x, t: x + 0.5 * D_diag(x) * grad_log_pi(x),
                     lambda x, t: torch.sqrt(D_diag(x)), noise="diagonal", T=1.0)
    log_pi = lambda x, t: -0.5 * ((x @ A) * x).sum(-1) - 0.1 * (x**4).sum(-1)  # noqa: E731
    x = 1.5 * torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.rand(12, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert float(fokker_planck_residual(sde, log_pi, x, t).abs().max()) < 1e-9
    perturbed = lambda x, t: log_pi(x, t) - 0.05 * (x**2).sum(-1)  # noqa: E731  (variance ~5% off)
    assert float(fokker_planck_residual(sde, perturbed, x, t).abs().max()) > 1e-2


def _G_parts(x):
    a0, a1 = x[:, 0], x[:, 1]
    a = 1.5 + torch.sin(a0)
    tb = torch.tanh(a1)
    hq = 0.2 * a0 / (1 + a0**2)
    b = 1.2 + 0.5 * torch.cos(a1)
    return a, tb, hq, b


def _G(x):
    """A state-dependent 2x3 noise matrix of full row rank: [[a(x0), 0.3 tanh(x1), 0.2], [h(x0), b(x1), 0.3]]."""
    a, tb, hq, b = _G_parts(x)
    one = torch.ones_like(a)
    return torch.stack([torch.stack([a, 0.3 * tb, 0.2 * one], 1), torch.stack([hq, b, 0.3 * one], 1)], 1)


def _div_D(x):
    """(∇·D)_i = Σ_j ∂_j D_ij for D = G Gᵀ, derived by hand:
    D00 = a² + 0.09 tanh²x1 + 0.04, D01 = a h + 0.3 tanh(x1) b + 0.06, D11 = h² + b² + 0.09, so
    (∇·D)_0 = 2 a a' + 0.3 (tanh' b + tanh b'), (∇·D)_1 = a' h + a h' + 2 b b'."""
    a0, a1 = x[:, 0], x[:, 1]
    a, tb, hq, b = _G_parts(x)
    da, dtb, db = torch.cos(a0), 1 - tb**2, -0.5 * torch.sin(a1)
    dhq = 0.2 * (1 - a0**2) / (1 + a0**2) ** 2
    return torch.stack([2 * a * da + 0.3 * (dtb * b + tb * db), da * hq + a * dhq + 2 * b * db], 1)


def test_stationary_density_general_noise_2d():
    A = torch.tensor([[1.0, 0.4], [0.4, 1.5]], dtype=F64)
    grad_log_pi = lambda x: -x @ A - 0.4 * x**3  # noqa: E731
    log_pi = lambda x, t: -0.5 * ((x @ A) * x).sum(-1) - 0.1 * (x**4).sum(-1)  # noqa: E731

    def drift(x, t):
        G = _G(x)
        D = G @ G.transpose(1, 2)
        return 0.5 * _div_D(x) + 0.5 * torch.einsum("bij,bj->bi", D, grad_log_pi(x))

    sde = sdekit.SDE(drift, lambda x, t: _G(x), noise="general", T=1.0)
    x = 1.5 * torch.randn(10, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert float(fokker_planck_residual(sde, log_pi, x, 0.3).abs().max()) < 1e-9
    perturbed = lambda x, t: log_pi(x, t) + 0.3 * x[:, 0] * x[:, 1] / (1 + x[:, 0] ** 2)  # noqa: E731
    assert float(fokker_planck_residual(sde, perturbed, x, 0.3).abs().max()) > 1e-2
    # Omitting the divergence term (the naive drift ½ D ∇log π) breaks stationarity
    naive = sdekit.SDE(lambda x, t: drift(x, t) - 0.5 * _div_D(x),
                       lambda x, t: _G(x), noise="general", T=1.0)
    assert float(fokker_planck_residual(naive, log_pi, x, 0.3).abs().max()) > 1e-2


def test_bad_inputs():
    sde = sdekit.VPSDE()
    lp = lambda x, t: -(x * x).sum(-1)  # noqa: E731
    with pytest.raises(TypeError, match="sde"):
        fokker_planck_residual("vp", lp, torch.zeros(2, 2), 0.5)
    with pytest.raises(TypeError, match="log_density"):
        fokker_planck_residual(sde, None, torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        fokker_planck_residual(sde, lp, torch.zeros(2, 2, dtype=F64), 2.0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        fokker_planck_residual(sde, lambda x, t: x, torch.zeros(2, 2, dtype=F64), 0.5)
