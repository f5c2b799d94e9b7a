"""Gaussian-mixture oracles against independent ground truth (numpy/scipy, closed-form VP kernel).

Ground truth is never computed with the code under test: densities come from
``scipy.stats.multivariate_normal``, VP marginals from the closed-form formulas coded here.
"""

import math

import numpy as np
from _mixture_params import random_params
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats
from scipy.special import logsumexp

import sdekit
from sdekit.oracles import GaussianMixture

F64 = torch.float64
HYP = settings(max_examples=20, deadline=None, derandomize=True)
KINDS = ("full", "diag", "iso")


# ----------------------------------------------------------------------------------------------
# Independent reference implementation (numpy / scipy)
# ----------------------------------------------------------------------------------------------

def full_covs(kind, S, d):
    if kind == "full":
        return S
    if kind == "diag":
        return np.array([np.diag(s) for s in S])
    return np.array([s * np.eye(d) for s in S])


def np_log_prob(w, mu, C, x):
    """log sum_k w_k N(x; mu_k, C_k) with normalised w, by scipy."""
    w = np.asarray(w) / np.sum(w)
    comps = np.stack([stats.multivariate_normal(mu[k], C[k]).logpdf(x).reshape(-1)
                      for k in range(len(w))], axis=1)
    return logsumexp(comps + np.log(w), axis=1)


def np_grad(fun, x, h=1e-5):
    """Central finite differences of a function (B, d) -> (B,)."""
    g = np.zeros_like(x)
    for i in range(x.shape[1]):
        e = np.zeros(x.shape[1])
        e[i] = h
        g[:, i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return g


def vp_closed_form(t, beta_min, beta_max):
    """VP kernel coded independently: m = exp(-B/2), sigma^2 = 1 - exp(-B)."""
    B = beta_min * t + 0.5 * (beta_max - beta_min) * t * t
    return math.exp(-0.5 * B), 1.0 - math.exp(-B)


def make(kind, d, K, seed, loop=False):
    """A mixture from random_params; ``loop=True`` forces the one-component-at-a-time code path."""
    w, mu, S = random_params(kind, d, K, seed)
    gm = GaussianMixture(torch.tensor(w), torch.tensor(mu), torch.tensor(S))
    if loop:
        gm._VECTORIZE_LIMIT = 0
    return (w, mu, S), gm


def points(d, n, seed, scale=3.0):
    return np.random.default_rng(seed + 1000).normal(0.0, scale, (n, d))


# ----------------------------------------------------------------------------------------------
# log_prob and score
# ----------------------------------------------------------------------------------------------

@HYP
@given(kind=st.sampled_from(KINDS), d=st.integers(1, 4), K=st.integers(1, 3), seed=st.integers(0, 10**6),
       loop=st.booleans())
def test_log_prob_matches_scipy(kind, d, K, seed, loop):
    (w, mu, S), gm = make(kind, d, K, seed, loop)
    x = points(d, 16, seed)
    ref = np_log_prob(w, mu, full_covs(kind, S, d), x)
    got = gm.log_prob(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-11)


@HYP
@given(kind=st.sampled_from(KINDS), d=st.integers(1, 4), K=st.integers(1, 3), seed=st.integers(0, 10**6),
       loop=st.booleans())
def test_score_matches_autograd_and_finite_differences(kind, d, K, seed, loop):
    (w, mu, S), gm = make(kind, d, K, seed, loop)
    x = points(d, 8, seed, scale=2.0)
    C = full_covs(kind, S, d)
    fd = np_grad(lambda y: np_log_prob(w, mu, C, y), x)
    xt = torch.tensor(x, requires_grad=True)
    (auto,) = torch.autograd.grad(gm.log_prob(xt).sum(), xt)
    s = gm.score(torch.tensor(x))
    np.testing.assert_allclose(s.numpy(), auto.numpy(), rtol=1e-10, atol=1e-10)
    # central differences with h = 1e-5: truncation ~ h^2 |f'''| and round-off ~ 1e-16/h
    np.testing.assert_allclose(s.numpy(), fd, rtol=1e-6, atol=1e-6)


def test_mixture_mean_and_covariance_exact():
    for kind in KINDS:
        (w, mu, S), gm = make(kind, 3, 3, 7)
        wn = w / w.sum()
        C = full_covs(kind, S, 3)
        mean = (wn[:, None] * mu).sum(0)
        second = sum(wn[k] * (C[k] + np.outer(mu[k], mu[k])) for k in range(3))
        np.testing.assert_allclose(gm.mean.numpy(), mean, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(gm.covariance.numpy(), second - np.outer(mean, mean), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gm.weights.numpy(), wn, rtol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_moments(kind):
    """Sample mean and variances vs the (numpy-computed) mixture moments.

    Family-wise false-alarm rate 1e-4 per kind, split (Bonferroni) over 1 mean test (Hotelling-type
    chi-square with d degrees of freedom, exact covariance known) and n_dir variance z-tests
    (normal approximation of the sample variance, its standard error from the sample 4th moment).
    The seed is fixed, so the outcome is deterministic.
    """
    d, K, n, n_dir, alpha = 3, 3, 40000, 6, 1e-4
    (w, mu, S), gm = make(kind, d, K, 11)
    wn = w / w.sum()
    C = full_covs(kind, S, d)
    mean = (wn[:, None] * mu).sum(0)
    cov = sum(wn[k] * (C[k] + np.outer(mu[k] - mean, mu[k] - mean)) for k in range(K))
    x = gm.sample(n, generator=torch.Generator().manual_seed(123)).numpy()
    assert x.shape == (n, d)
    a = alpha / (1 + n_dir)
    diff = x.mean(0) - mean
    t2 = n * diff @ np.linalg.solve(cov, diff)
    assert t2 < stats.chi2.isf(a, d), t2
    dirs = np.random.default_rng(5).normal(size=(n_dir, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    zcrit = stats.norm.isf(a / 2)
    for u in dirs:
        p = (x - mean) @ u  # known mean: unbiased variance estimate mean(p^2)
        v_true = u @ cov @ u
        se = math.sqrt(np.var(p * p) / n)
        z = (np.mean(p * p) - v_true) / se
        assert abs(z) < zcrit, (u, z)
    # the test has power: a 5% wrong variance is rejected along the first direction
    p = (x - mean) @ dirs[0]
    z_wrong = (np.mean(p * p) - 1.05 * dirs[0] @ cov @ dirs[0]) / math.sqrt(np.var(p * p) / n)
    assert abs(z_wrong) > zcrit


def test_sample_reproducible_dtype_device():
    _, gm = make("full", 2, 2, 3)
    a = gm.sample(50, generator=torch.Generator().manual_seed(1))
    b = gm.sample(50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == F64
    c = gm.sample(50, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    assert c.dtype == torch.float32 and torch.allclose(c.double(), a, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Marginals under a linear SDE
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.25, 0.7, 1.0])
def test_push_matches_vp_closed_form(kind, t):
    beta_min, beta_max = 0.1, 20.0
    sde = sdekit.VPSDE(beta_min, beta_max)
    d, K = 3, 3
    (w, mu, S), gm = make(kind, d, K, 21)
    m, s2 = vp_closed_form(t, beta_min, beta_max)
    C = m * m * full_covs(kind, S, d) + s2 * np.eye(d)
    pt = gm.push(sde, t)
    assert pt.cov_type == gm.cov_type
    np.testing.assert_allclose(pt.means.numpy(), m * mu, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(pt.covariance_matrices().numpy(), C, rtol=1e-12, atol=1e-14)
    if kind != "full":
        ref_layout = m * m * S + s2
        np.testing.assert_allclose(pt.covs.numpy(), ref_layout, rtol=1e-13)
    x = points(d, 10, 3, scale=1.5)
    np.testing.assert_allclose(pt.log_prob(torch.tensor(x)).numpy(), np_log_prob(w, m * mu, C, x),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gm.exact_log_prob(sde)(torch.tensor(x), t).numpy(),
                               np_log_prob(w, m * mu, C, x), rtol=1e-10, atol=1e-10)
    if t > 0:
        fd = np_grad(lambda y: np_log_prob(w, m * mu, C, y), x)
        np.testing.assert_allclose(gm.exact_score(sde)(torch.tensor(x), t).numpy(), fd, rtol=1e-6, atol=1e-6)


@HYP
@given(kind=st.sampled_from(KINDS), d=st.integers(1, 4), K=st.integers(1, 3), seed=st.integers(0, 10**6),
       proc=st.sampled_from(["vp", "ve", "subvp", "custom"]))
def test_exact_score_batched_t_equals_per_sample_push(kind, d, K, seed, proc):
    sde = {"vp": sdekit.VPSDE(), "ve": sdekit.VESDE(0.01, 10.0), "subvp": sdekit.SubVPSDE(),
           "custom": CUSTOM}[proc]
    _, gm = make(kind, d, K, seed, loop=bool(seed % 2))
    B = 6
    rng = np.random.default_rng(seed)
    t = torch.tensor(rng.uniform(0.0, sde.T, B))
    x = torch.tensor(points(d, B, seed, scale=2.0))
    s = gm.exact_score(sde)(x, t)
    lp = gm.exact_log_prob(sde)(x, t)
    for b in range(B):
        pb = gm.push(sde, float(t[b]))
        torch.testing.assert_close(s[b], pb.score(x[b:b + 1])[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lp[b], pb.log_prob(x[b:b + 1])[0], rtol=1e-12, atol=1e-12)
    # a float, a 0-d tensor and a length-1 tensor mean the same time for the whole batch
    s0 = gm.exact_score(sde)(x, float(t[0]))
    torch.testing.assert_close(s0, gm.exact_score(sde)(x, t[0]))
    torch.testing.assert_close(s0, gm.exact_score(sde)(x, t[:1]))
    torch.testing.assert_close(s0[0], s[0])


CUSTOM = sdekit.LinearSDE(lambda t: -0.6 * (1 + 0.5 * torch.sin(4 * t)),
                          lambda t: torch.sqrt(1.5 * (1 + 0.4 * torch.cos(3 * t))), T=1.0)


def test_exact_score_is_gradient_of_exact_log_prob_and_differentiable():
    sde = sdekit.VPSDE()
    _, gm = make("full", 3, 3, 5)
    x = torch.tensor(points(3, 5, 5, 1.5), requires_grad=True)
    t = torch.tensor([0.05, 0.2, 0.4, 0.8, 1.0], dtype=F64)
    lp = gm.exact_log_prob(sde)(x, t)
    (g,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
    s = gm.exact_score(sde)(x, t)
    torch.testing.assert_close(s, g, rtol=1e-11, atol=1e-11)
    # Jacobian of the score == Hessian of the log density (both by autograd, second order)
    for i in range(3):
        (h_row,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)
        (j_row,) = torch.autograd.grad(s[:, i].sum(), x, retain_graph=True)
        torch.testing.assert_close(j_row, h_row, rtol=1e-10, atol=1e-10)


def test_hessian_single_gaussian_closed_form():
    """K = 1: the Hessian of log p_t is -C^{-1}, C = m^2 Sigma + sigma^2 I (VP closed form)."""
    (w, mu, S), gm = make("full", 3, 1, 9)
    sde = sdekit.VPSDE()
    t = 0.3
    m, s2 = vp_closed_form(t, 0.1, 20.0)
    C = m * m * S[0] + s2 * np.eye(3)
    score = gm.exact_score(sde)
    x0 = torch.tensor([0.3, -0.2, 1.0], dtype=F64)
    H = torch.autograd.functional.jacobian(lambda y: score(y[None], t)[0], x0)
    np.testing.assert_allclose(H.numpy(), -np.linalg.inv(C), rtol=1e-11, atol=1e-12)


def test_posterior_moments_against_tweedie_by_finite_differences():
    """E[x0|x] = (x + s2 grad log p)/m, Cov = s2/m^2 (I + s2 hess log p), derivatives by FD of scipy."""
    sde = sdekit.VPSDE()
    d, t = 2, 0.4
    (w, mu, S), gm = make("full", d, 3, 13)
    m, s2 = vp_closed_form(t, 0.1, 20.0)
    C = m * m * full_covs("full", S, d) + s2 * np.eye(d)
    f = lambda y: np_log_prob(w, m * mu, C, y)  # noqa: E731
    x = points(d, 4, 13, 1.0)
    g = np_grad(f, x, h=1e-5)
    mean_ref = (x + s2 * g) / m
    got = gm.exact_posterior_mean(sde)(torch.tensor(x), t).numpy()
    np.testing.assert_allclose(got, mean_ref, rtol=1e-6, atol=1e-6)
    h = 1e-4
    H = np.zeros((len(x), d, d))
    for i in range(d):
        e = np.zeros(d)
        e[i] = h
        H[:, i, :] = (np_grad(f, x + e, h) - np_grad(f, x - e, h)) / (2 * h)
    cov_ref = s2 / m**2 * (np.eye(d) + s2 * H)
    got_cov = gm.exact_posterior_covariance(sde)(torch.tensor(x), t).numpy()
    np.testing.assert_allclose(got_cov, cov_ref, rtol=1e-5, atol=1e-5)


def test_image_shaped_diagonal_mixture():
    """Rank-4 data (B, C, H, W) for a diagonal mixture: scipy on the flattened coordinates."""
    rng = np.random.default_rng(0)
    K, shape = 2, (2, 3, 4)
    d = int(np.prod(shape))
    w = np.array([0.4, 0.6])
    mu = rng.normal(size=(K,) + shape)
    var = rng.uniform(0.3, 1.5, (K,) + shape)
    gm = GaussianMixture(torch.tensor(w), torch.tensor(mu), torch.tensor(var))
    assert gm.event_shape == shape and gm.dim == d and gm.cov_type == "diag"
    x = rng.normal(size=(5,) + shape)
    C = np.array([np.diag(v.reshape(-1)) for v in var])
    ref = np_log_prob(w, mu.reshape(K, d), C, x.reshape(5, d))
    np.testing.assert_allclose(gm.log_prob(torch.tensor(x)).numpy(), ref, rtol=1e-11)
    sde = sdekit.VPSDE()
    s = gm.exact_score(sde)(torch.tensor(x, dtype=torch.float32), torch.full((5,), 0.5))
    assert s.shape == (5,) + shape and s.dtype == torch.float32
    s_flat = gm.exact_score(sde)(torch.tensor(x.reshape(5, d)), 0.5)
    torch.testing.assert_close(s.reshape(5, d).double(), s_flat, rtol=1e-5, atol=1e-5)
    assert gm.sample(3).shape == (3,) + shape
    gi = GaussianMixture(torch.tensor(w), torch.tensor(mu), torch.tensor([0.5, 2.0]))
    ref_i = np_log_prob(w, mu.reshape(K, d), np.array([0.5 * np.eye(d), 2.0 * np.eye(d)]), x.reshape(5, d))
    np.testing.assert_allclose(gi.log_prob(torch.tensor(x)).numpy(), ref_i, rtol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_vectorized_and_loop_paths_agree(kind):
    """The all-components-at-once path and the one-at-a-time path give the same values and gradients."""
    sde = sdekit.VPSDE()
    (_, vec), (_, loop) = make(kind, 3, 4, 17), make(kind, 3, 4, 17, loop=True)
    x = torch.tensor(points(3, 9, 17, 2.0))
    t = torch.linspace(0.0, 1.0, 9, dtype=F64)
    for fn in ("exact_score", "exact_log_prob", "exact_posterior_mean"):
        torch.testing.assert_close(getattr(vec, fn)(sde)(x, t), getattr(loop, fn)(sde)(x, t), rtol=1e-12, atol=1e-12)
    xv, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (gv,) = torch.autograd.grad(vec.exact_score(sde)(xv, t)[:, 0].sum(), xv)
    (gl,) = torch.autograd.grad(loop.exact_score(sde)(xl, t)[:, 0].sum(), xl)
    torch.testing.assert_close(gv, gl, rtol=1e-11, atol=1e-11)


def test_large_diagonal_runs():
    """d = 3072, B = 1024 for a diagonal mixture (pure elementwise math): finite, right shape."""
    g = torch.Generator().manual_seed(0)
    K = 4
    gm = GaussianMixture(torch.ones(K), torch.randn(K, 3, 32, 32, generator=g),
                         0.1 + torch.rand(K, 3, 32, 32, generator=g))
    x = torch.randn(1024, 3, 32, 32, generator=g)
    s = gm.exact_score(sdekit.VPSDE())(x, torch.rand(1024, generator=g))
    assert s.shape == x.shape and s.dtype == torch.float32 and bool(torch.isfinite(s).all())


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    mu = [[0.0, 0.0], [1.0, 1.0]]
    eye = [[[1.0, 0.0], [0.0, 1.0]]] * 2
    with pytest.raises(ValueError, match=r"weights.*-0\.5"):
        GaussianMixture([1.0, -0.5], mu, eye)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0, 0.0], mu, eye)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0, float("nan")], mu, eye)
    with pytest.raises(ValueError, match=r"covs\[1\].*positive definite"):
        GaussianMixture([1.0, 1.0], mu, [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match=r"covs\[0\].*symmetric"):
        GaussianMixture([1.0, 1.0], mu, [[[1.0, 0.5], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(ValueError, match=r"covs\[1\].*positive"):
        GaussianMixture([1.0, 1.0], mu, [[1.0, 1.0], [1.0, -1.0]])
    with pytest.raises(ValueError, match=r"covs\[0\]"):
        GaussianMixture([1.0, 1.0], mu, [0.0, 1.0])
    with pytest.raises(ValueError, match="means"):
        GaussianMixture([1.0, 1.0, 1.0], mu, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture([1.0, 1.0], mu, [[[1.0, 0.0, 0.0]] * 3] * 2)
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture([1.0, 1.0], mu, [1.0, 1.0, 1.0])
    gm = GaussianMixture([1.0, 3.0], mu, eye)
    torch.testing.assert_close(gm.weights, torch.tensor([0.25, 0.75], dtype=F64))
    with pytest.raises(ValueError, match="x must have shape"):
        gm.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="t must lie in"):
        gm.exact_score(sdekit.VPSDE())(torch.zeros(4, 2), 1.5)
    with pytest.raises(ValueError, match="t has 3 entries"):
        gm.exact_score(sdekit.VPSDE())(torch.zeros(4, 2), torch.rand(3, dtype=F64))
    with pytest.raises(TypeError, match="LinearSDE"):
        gm.exact_score(sdekit.SDE(lambda x, t: x, lambda x, t: 1.0))
    with pytest.raises(ValueError, match="scalar time"):
        gm.push(sdekit.VPSDE(), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        gm.sample(0)


# ----------------------------------------------------------------------------------------------
# the score's analytic backward pass (Jacobian-vector products) against finite differences
# ----------------------------------------------------------------------------------------------
def np_hessian(fun, x, h=1e-4):
    """Central finite differences of the gradient of fun (B, d) -> (B,): (B, d, d)."""
    d = x.shape[1]
    H = np.zeros((x.shape[0], d, d))
    for j in range(d):
        e = np.zeros(d)
        e[j] = h
        H[:, :, j] = (np_grad(fun, x + e, h) - np_grad(fun, x - e, h)) / (2 * h)
    return H


@pytest.mark.parametrize("analytic", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_score_vjp_and_divergence_match_finite_difference_hessian(kind, analytic):
    """u^T J (one VJP), the batched-VJP exact divergence tr J, and second derivatives of the score
    (gradgradcheck), against a Hessian of scipy's log density by finite differences."""
    from sdekit.likelihood import exact_divergence

    d, K, seed, t = 3, 3, 21, 0.35
    (w, mu, S), gm = make(kind, d, K, seed)
    sde = sdekit.VPSDE()
    m, s2 = vp_closed_form(t, 0.1, 20.0)
    C = m * m * full_covs(kind, S, d) + s2 * np.eye(d)
    x = points(d, 6, seed, 1.0)
    H = np_hessian(lambda y: np_log_prob(w, m * mu, C, y), x)
    score = gm.exact_score(sde, analytic_vjp=analytic)
    u = np.random.default_rng(seed).normal(size=x.shape)
    xt = torch.tensor(x, requires_grad=True)
    (vjp,) = torch.autograd.grad(score(xt, t), xt, torch.tensor(u))
    np.testing.assert_allclose(vjp.numpy(), np.einsum("bi,bij->bj", u, H), rtol=1e-5, atol=1e-5)
    _, div = exact_divergence(lambda y: score(y, t), torch.tensor(x))
    np.testing.assert_allclose(div.numpy(), np.trace(H, axis1=1, axis2=2), rtol=1e-5, atol=1e-5)
    tt = torch.full((2,), t, dtype=F64)
    assert torch.autograd.gradgradcheck(lambda y: score(y, tt), (torch.tensor(x[:2], requires_grad=True),))


def test_score_time_derivative_still_exact():
    """With t requiring grad the score is differentiated in t as well (plain autograd path)."""
    _, gm = make("diag", 2, 2, 3)
    sde = sdekit.VPSDE()
    x = torch.tensor(points(2, 3, 3, 1.0))
    t = torch.tensor(0.4, dtype=F64, requires_grad=True)
    s = gm.exact_score(sde)(x, t)
    (ds_dt,) = torch.autograd.grad(s.sum(), t)
    h = 1e-6
    fd = (gm.exact_score(sde)(x, 0.4 + h).sum() - gm.exact_score(sde)(x, 0.4 - h).sum()) / (2 * h)
    assert abs(float(ds_dt) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_exact_score_analytic_vjp_must_be_bool():
    _, gm = make("iso", 2, 2, 1)
    with pytest.raises(TypeError, match="analytic_vjp must be True or False, got 'yes'"):
        gm.exact_score(sdekit.VPSDE(), analytic_vjp="yes")
