"""sdekit.likelihood against ground truth: exact Gaussian-mixture densities from the oracle.

Every accuracy check compares with ``GaussianMixture.exact_log_prob(sde)(x, t_eps)`` (or a
closed-form Gaussian), never with another path through the code under test. Unless a test is
about the prior, the prior is the oracle's EXACT marginal at T (``gm.push(sde, T)``), so that the
check isolates the ODE solve and the divergence; the default prior's mismatch is tested apart.

Statistical checks use fixed seeds (deterministic) and state their false-alarm rate.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sdekit
from sdekit.likelihood import (
    GaussianDataPrior,
    LikelihoodResult,
    NotDifferentiableError,
    exact_divergence,
    hutchinson_divergence,
    log_likelihood,
)
from sdekit.oracles import GaussianMixture
from sdekit.solvers.stats import SolverError

F64 = torch.float64
T_EPS = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def sin_sde():
    """A numeric-kernel LinearSDE from two lambdas with a sin term."""
    return sdekit.LinearSDE(lambda t: -0.5 * (1.0 + 0.8 * torch.sin(3.0 * t)),
                            lambda t: torch.sqrt(1.0 + 0.8 * torch.sin(3.0 * t)))


SDES = {
    "vp": lambda: sdekit.VPSDE(),
    "subvp": lambda: sdekit.SubVPSDE(),
    "ve": lambda: sdekit.VESDE(0.01, 50.0),
    "sin": sin_sde,
}


def mixture(d, seed, K=3, kind="diag", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=F64) + 0.5
    mu = scale * torch.randn(K, d, generator=g, dtype=F64)
    if kind == "full":
        A = torch.randn(K, d, d, generator=g, dtype=F64)
        covs = 0.3 * A @ A.transpose(1, 2) / d + 0.2 * torch.eye(d, dtype=F64)
    else:
        covs = 0.2 + 0.5 * torch.rand(K, d, generator=g, dtype=F64)
    return GaussianMixture(w, mu, covs)


def exact_logp(gm, sde, x):
    return gm.exact_log_prob(sde)(x.to(F64), T_EPS)


# ------------------------------------------------------------------------------------------------
# exact divergence: |log p - exact| <= 1e-4 nats/dim
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("d", [1, 2, 8])
def test_exact_divergence_matches_oracle(name, d):
    sde = SDES[name]()
    gm = mixture(d, seed=10 * d + len(name), kind="full" if d > 1 else "diag")
    x = gm.sample(6, generator=torch.Generator().manual_seed(d))
    res = log_likelihood(sde, gm.exact_score(sde), x, t_eps=T_EPS, rtol=1e-6, atol=1e-6, divergence="exact",
                         prior=gm.push(sde, sde.T))
    assert isinstance(res, LikelihoodResult)
    err = (res.log_prob - exact_logp(gm, sde, x)).abs() / d
    assert float(err.max()) <= 1e-4, f"{name} d={d}: max error {float(err.max()):.3g} nats/dim"
    assert res.divergence == "exact" and res.n_probes == 0
    assert torch.equal(res.stderr, torch.zeros(6, dtype=F64))
    assert torch.allclose(res.log_prob, res.prior_log_prob + res.delta_log_prob)
    # bookkeeping: one score call per function evaluation, counted by the backend; t stays in range
    st = res.stats
    assert st.nfe == st.extra["score_calls"] > 0
    assert st.nfe == 2 + 6 * (st.accepted + st.rejected)  # dopri5: FSAL, 6 new stages per attempt
    assert T_EPS <= st.extra["t_min"] and st.extra["t_max"] <= sde.T
    assert st.wall_time > 0 and st.extra["vectors_per_eval"] == d


def test_default_prior_vp_small_mismatch():
    """The process's own prior N(0, sigma(T)^2 I): accurate where p_T is close to it (m(T) ~ 4e-5)."""
    sde = sdekit.VPSDE(0.1, 40.0)
    gm = mixture(2, seed=5, kind="full")
    x = gm.sample(8, generator=torch.Generator().manual_seed(0))
    res = log_likelihood(sde, gm.exact_score(sde), x, rtol=1e-6, atol=1e-6)
    err = (res.log_prob - exact_logp(gm, sde, x)).abs() / 2
    assert float(err.max()) <= 1e-4
    # the prior term is the closed-form N(0, sigma_T^2) density of z
    s = sde.prior_std()
    z = res.z.to(F64)
    ref = -0.5 * (z ** 2).sum(1) / s ** 2 - 2 * math.log(s) - math.log(2 * math.pi)
    assert torch.allclose(res.prior_log_prob, ref, rtol=0, atol=1e-10)


def test_gaussian_data_prior_fixes_ve_mismatch():
    """VE with sigma_max small against the data: the default prior is badly biased; the exact
    pushed-Gaussian prior is exact for Gaussian data."""
    sde = sdekit.VESDE(0.01, 2.0)
    mean = torch.tensor([1.5, -2.0], dtype=F64)
    var = torch.tensor([0.5, 3.0], dtype=F64)
    gm = GaussianMixture([1.0], mean[None], var[None])
    x = gm.sample(8, generator=torch.Generator().manual_seed(1))
    exact = exact_logp(gm, sde, x)
    score = gm.exact_score(sde)
    good = log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6, prior=GaussianDataPrior(mean, var))
    assert float(((good.log_prob - exact).abs() / 2).max()) <= 1e-4
    same = log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6, prior=("gaussian", mean, var))
    assert torch.equal(same.log_prob, good.log_prob)
    bad = log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6)
    assert float(((bad.log_prob - exact).abs() / 2).mean()) > 0.05
    # moments from a data set: close to the truth, far better than the default prior
    data = gm.sample(20000, generator=torch.Generator().manual_seed(2))
    est = log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6, prior=GaussianDataPrior.from_data(data))
    assert float(((est.log_prob - exact).abs() / 2).max()) < 0.02


def test_general_sde_path_with_user_prior():
    """A linear process written as a general SDE (drift and diffusion callables) goes through the
    general PF velocity f(x,t) - g^2/2 s; with the exact prior it matches the OU oracle."""
    ou = sdekit.OrnsteinUhlenbeck(theta=0.5, sigma=1.0, T=2.0)
    gen = sdekit.SDE(lambda x, t: -0.5 * x, lambda x, t: torch.ones(x.shape[0], dtype=x.dtype), T=2.0)
    gm = mixture(2, seed=7, kind="full")
    x = gm.sample(6, generator=torch.Generator().manual_seed(3))
    res = log_likelihood(gen, gm.exact_score(ou), x, rtol=1e-6, atol=1e-6, prior=gm.push(ou, 2.0))
    assert float(((res.log_prob - exact_logp(gm, ou, x)).abs() / 2).max()) <= 1e-4
    with pytest.raises(ValueError, match="prior"):
        log_likelihood(gen, gm.exact_score(ou), x)


def test_data_shapes_rank1_and_image():
    """(B,) data (closed-form Gaussian) and (B, C, H, W) data (oracle with an event shape)."""
    sde = sdekit.VPSDE()
    s0 = 0.7

    def var_t(t):
        m, s = sde.marginal(t.to(F64))
        return m ** 2 * s0 ** 2 + s ** 2

    def score(x, t):
        return -x / var_t(t).to(x.dtype)

    x = torch.linspace(-2, 2, 5, dtype=F64)
    res = log_likelihood(sde, score, x, rtol=1e-7, atol=1e-7)
    v = float(var_t(torch.tensor(T_EPS, dtype=F64)))
    exact = -0.5 * x ** 2 / v - 0.5 * math.log(2 * math.pi * v)
    # default prior: m(T) ~ 6.6e-3 leaves a variance mismatch of m^2 s0^2 ~ 2e-5
    assert float((res.log_prob - exact).abs().max()) <= 1e-4
    assert res.z.shape == x.shape and res.dim == 1

    g = torch.Generator().manual_seed(4)
    gm = GaussianMixture([0.4, 0.6], torch.randn(2, 1, 2, 2, generator=g, dtype=F64),
                         0.3 + torch.rand(2, 1, 2, 2, generator=g, dtype=F64))
    xi = gm.sample(4, generator=g)
    ri = log_likelihood(sde, gm.exact_score(sde), xi, rtol=1e-6, atol=1e-6, prior=gm.push(sde, sde.T))
    assert ri.z.shape == xi.shape and ri.dim == 4 and ri.divergence == "exact"
    assert float(((ri.log_prob - exact_logp(gm, sde, xi)).abs() / 4).max()) <= 1e-4


def test_float32_data_accumulates_in_float64():
    sde = sdekit.VPSDE()
    gm = mixture(8, seed=3, kind="full")
    x = gm.sample(6, generator=torch.Generator().manual_seed(5)).to(torch.float32)
    res = log_likelihood(sde, gm.exact_score(sde), x, rtol=1e-6, atol=1e-6, prior=gm.push(sde, sde.T))
    assert res.log_prob.dtype == F64 and res.delta_log_prob.dtype == F64 and res.delta_per_probe.dtype == F64
    assert res.z.dtype == torch.float32 and res.z.shape == x.shape
    # the score runs in float32 (relative rounding ~6e-8); the integral is still accurate
    assert float(((res.log_prob - exact_logp(gm, sde, x)).abs() / 8).max()) <= 1e-4


def test_deterministic_given_generator():
    sde = sdekit.VPSDE()
    gm = mixture(4, seed=1)
    x = gm.sample(5, generator=torch.Generator().manual_seed(0))
    kw = dict(divergence="hutchinson", n_probes=3, rtol=1e-4, atol=1e-4)
    a = log_likelihood(sde, gm.exact_score(sde), x, generator=torch.Generator().manual_seed(9), **kw)
    b = log_likelihood(sde, gm.exact_score(sde), x, generator=torch.Generator().manual_seed(9), **kw)
    c = log_likelihood(sde, gm.exact_score(sde), x, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.log_prob, b.log_prob) and not torch.equal(a.log_prob, c.log_prob)
    assert a.delta_per_probe.shape == (5, 3)


# ------------------------------------------------------------------------------------------------
# Hutchinson: unbiased, and its stderr is calibrated
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_many_probes_one_solve(probe):
    """256 probes in ONE solve (one score call per evaluation); the mean lies within 3 standard
    errors of the exact value for each of 4 samples. False-alarm rate: 3 sigma two-sided is 0.27%
    per check, ~1.1% for the 4 checks of a parametrisation (the seed is fixed, so the outcome is
    deterministic)."""
    sde = sdekit.VPSDE()
    gm = mixture(8, seed=21, kind="full")
    x = gm.sample(4, generator=torch.Generator().manual_seed(6))
    res = log_likelihood(sde, gm.exact_score(sde), x, rtol=1e-6, atol=1e-6, divergence="hutchinson",
                         probe=probe, n_probes=256, generator=torch.Generator().manual_seed(11),
                         prior=gm.push(sde, sde.T))
    assert res.delta_per_probe.shape == (4, 256) and res.n_probes == 256 and res.probe == probe
    assert res.stats.extra["score_calls"] == res.stats.nfe < 200  # probes share evaluations
    z = (res.log_prob - exact_logp(gm, sde, x)) / res.stderr
    assert float(z.abs().max()) <= 3.0, z
    assert torch.allclose(res.stderr, res.delta_per_probe.std(1) / 16.0)


def test_hutchinson_stderr_coverage():
    """Over 200 independent checks (samples with independent probes, two seeds x 100 samples), the
    95% interval (Student t, 31 dof, from 32 Gaussian probes) covers the exact log-density.
    Binomial tolerance: the fraction of 200 Bernoulli(0.95) outcomes has sd 0.0154; we accept
    [0.90, 0.995] (about -3.2 / +2.9 sd; false-alarm rate < 0.3%, seeds fixed). With ±1.96 stderr
    (normal quantile) the expected coverage is slightly lower (~0.94 for t with 31 dof)."""
    sde = sdekit.VPSDE()
    gm = mixture(8, seed=3, kind="full")
    x = gm.sample(100, generator=torch.Generator().manual_seed(3))
    exact = exact_logp(gm, sde, x)
    hits_t, hits_z = [], []
    for seed in (11, 12):
        res = log_likelihood(sde, gm.exact_score(sde), x, rtol=1e-5, atol=1e-5, divergence="hutchinson",
                             probe="gaussian", n_probes=32, generator=torch.Generator().manual_seed(seed),
                             prior=gm.push(sde, sde.T))
        lo, hi = res.confidence_interval(0.95)
        hits_t.append((exact >= lo) & (exact <= hi))
        hits_z.append((res.log_prob - exact).abs() <= 1.96 * res.stderr)
    cov_t = float(torch.cat(hits_t).double().mean())
    cov_z = float(torch.cat(hits_z).double().mean())
    assert 0.90 <= cov_t <= 0.995, cov_t
    assert 0.88 <= cov_z <= 0.995, cov_z


def test_single_probe_stderr_is_inf_not_nan():
    sde = sdekit.VPSDE()
    gm = mixture(20, seed=2)
    x = gm.sample(3, generator=torch.Generator().manual_seed(0))
    res = log_likelihood(sde, gm.exact_score(sde), x, rtol=1e-4, atol=1e-4,
                         generator=torch.Generator().manual_seed(0))
    assert res.divergence == "hutchinson" and res.n_probes == 1  # auto: d = 20 > exact_dim_limit
    assert torch.isinf(res.stderr).all() and not torch.isnan(res.stderr).any()
    lo, hi = res.confidence_interval()
    assert torch.isinf(lo).all() and torch.isinf(hi).all()


# ------------------------------------------------------------------------------------------------
# divergence estimators (unit level)
# ------------------------------------------------------------------------------------------------
def test_divergence_estimators():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=F64)
    x = torch.randn(7, 5, generator=g, dtype=F64)
    v, div = exact_divergence(lambda y: torch.sin(y) @ A.T, x)
    ref = (torch.cos(x) * torch.diagonal(A)).sum(1)  # d/dy_i of sum_j A_ij sin(y_j) = A_ii cos(y_i)
    assert torch.allclose(div, ref, atol=1e-12) and not div.requires_grad
    assert torch.allclose(v, torch.sin(x) @ A.T)
    # Hutchinson with basis-like probes: (K, B, d); all K probes in one backward pass
    _, est = hutchinson_divergence(lambda y, t: t * (y @ A.T), x, 2.0, n_probes=4000, probe="gaussian",
                                   generator=g)
    assert est.shape == (7, 4000)
    se = est.std(1) / math.sqrt(4000)
    assert float(((est.mean(1) - 2.0 * torch.trace(A)) / se).abs().max()) <= 3.5
    # Rademacher probes of a diagonal matrix give the trace exactly
    D = torch.diag(torch.arange(1.0, 6.0, dtype=F64))
    _, est = hutchinson_divergence(lambda y: y @ D, x, n_probes=3, generator=g)
    assert torch.allclose(est, torch.full((7, 3), 15.0, dtype=F64))
    # differentiable outputs with create_graph
    w = torch.tensor(1.5, dtype=F64, requires_grad=True)
    _, div = exact_divergence(lambda y: w * y ** 2, x, create_graph=True)
    (gw,) = torch.autograd.grad(div.sum(), w)
    assert torch.allclose(gw, 2 * x.sum())
    with pytest.raises(NotDifferentiableError):
        exact_divergence(lambda y: y.detach() * 2, x)
    with pytest.raises(ValueError, match="probes must have shape"):
        hutchinson_divergence(lambda y: y, x, probes=torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------
# gradients: adjoint == backprop, and both equal the closed-form gradient
# ------------------------------------------------------------------------------------------------
class TinyScore(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1)) - x


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_adjoint_gradients_match_backprop(divergence):
    sde = sdekit.VPSDE()
    net = TinyScore()
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = {}
    for adjoint in (False, True):
        x = x0.clone().requires_grad_(True)
        res = log_likelihood(sde, net, x, rtol=1e-8, atol=1e-8, adjoint=adjoint, divergence=divergence,
                             n_probes=2, generator=torch.Generator().manual_seed(3))
        grads[adjoint] = torch.autograd.grad(res.log_prob.sum(), [x, *net.parameters()])
        if adjoint:
            assert res.stats.extra["adjoint"]["nfe"] > 0  # the backward pass was counted
    for a, b in zip(grads[False], grads[True]):
        rel = float((a - b).norm() / b.norm().clamp_min(1e-300))
        assert rel <= 1e-4, rel


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradients_against_closed_form(adjoint):
    """A Gaussian model with learnable mean and variance: log p_{t_eps}(x) = log N(x; m mu, m^2 v + s^2)
    in closed form, so d log p / d(x, mu, v) are known exactly (ground truth for both modes); the
    prior is the exact pushed Gaussian, which depends on (mu, v) too."""
    sde = sdekit.VPSDE()
    mu = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    v = torch.tensor([0.4, 1.3], dtype=F64, requires_grad=True)

    def score(x, t):
        m, s = sde.marginal(t.to(F64))
        m, s = m[:, None], s[:, None]
        return -(x - m * mu) / (m ** 2 * v + s ** 2)

    x = torch.tensor([[0.1, 0.2], [1.0, -2.0], [-0.7, 0.4]], dtype=F64, requires_grad=True)
    res = log_likelihood(sde, score, x, rtol=1e-9, atol=1e-9, adjoint=adjoint, prior=GaussianDataPrior(mu, v))
    got = torch.autograd.grad(res.log_prob.sum(), [x, mu, v])
    m, s = sde.marginal(T_EPS)
    var = m ** 2 * v + s ** 2
    closed = (-0.5 * ((x - m * mu) ** 2 / var + torch.log(2 * math.pi * var))).sum(1)
    assert float((res.log_prob - closed).detach().abs().max()) <= 1e-6
    want = torch.autograd.grad(closed.sum(), [x, mu, v])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)


def test_no_graph_kept_for_plain_evaluation():
    """Without parameters or x requiring grad, outputs carry no graph (no memory growth)."""
    sde = sdekit.VPSDE()
    gm = mixture(2, seed=0)
    x = gm.sample(4, generator=torch.Generator().manual_seed(0))
    res = log_likelihood(sde, gm.exact_score(sde), x, rtol=1e-4, atol=1e-4)
    assert not res.log_prob.requires_grad and not res.z.requires_grad


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def _gauss_score(x, t):
    return -x


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_data(bad):
    x = torch.zeros(3, 2)
    x[1, 0] = bad
    with pytest.raises(ValueError, match="x contains"):
        log_likelihood(sdekit.VPSDE(), _gauss_score, x)


@pytest.mark.parametrize("t_eps", [0.0, -1e-3, 1.0, 2.0, float("nan")])
def test_bad_t_eps(t_eps):
    with pytest.raises(ValueError, match="t_eps"):
        log_likelihood(sdekit.VPSDE(), _gauss_score, torch.zeros(2, 2), t_eps=t_eps)


def test_exact_divergence_refused_at_image_dimension():
    x = torch.zeros(2, 3, 32, 32)
    calls = []

    def score(y, t):
        calls.append(1)
        return -y

    with pytest.raises(ValueError, match="hutchinson") as e:
        log_likelihood(sdekit.VPSDE(), score, x, divergence="exact")
    assert "3072" in str(e.value) and not calls  # refused before any evaluation


@pytest.mark.parametrize("kind", ["detached", "numpy"])
@pytest.mark.parametrize("divergence,adjoint", [("exact", False), ("hutchinson", False), ("exact", True)])
def test_non_differentiable_score(kind, divergence, adjoint):
    if kind == "detached":
        def score(x, t):
            return (-x).detach()
    else:
        def score(x, t):
            return torch.from_numpy(-np.asarray(x.detach().numpy()))
    with pytest.raises(NotDifferentiableError, match="not differentiable"):
        log_likelihood(sdekit.VPSDE(), score, torch.randn(3, 2, dtype=F64), divergence=divergence,
                       adjoint=adjoint)


@pytest.mark.parametrize("kwargs,match", [
    (dict(divergence="trace"), "divergence"),
    (dict(probe="sphere"), "probe"),
    (dict(n_probes=0), "n_probes"),
    (dict(n_probes=2.5), "n_probes"),
    (dict(method="rk4"), "method"),
    (dict(norm="max"), "norm"),
    (dict(rtol=-1.0), "rtol"),
    (dict(prior="gaussian_data"), "GaussianDataPrior"),
    (dict(prior=("gaussian", 0.0)), "gaussian"),
    (dict(prior=("gaussian", 0.0, -1.0)), "var"),
    (dict(exact_dim_limit=-1), "exact_dim_limit"),
    (dict(max_steps=0), "max_steps"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        log_likelihood(sdekit.VPSDE(), _gauss_score, torch.zeros(2, 2), **kwargs)


def test_bad_score_and_sde():
    with pytest.raises(TypeError, match="sde"):
        log_likelihood("vp", _gauss_score, torch.zeros(2, 2))
    with pytest.raises(TypeError, match="score"):
        log_likelihood(sdekit.VPSDE(), None, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shaped like x"):
        log_likelihood(sdekit.VPSDE(), lambda x, t: x[:, :1], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        log_likelihood(sdekit.VPSDE(), lambda x, t: x / 0.0, torch.ones(2, 2))


def test_solver_limits_raise_with_stats():
    gm = mixture(2, seed=0)
    sde = sdekit.VPSDE()
    with pytest.raises(SolverError) as e:
        log_likelihood(sde, gm.exact_score(sde), gm.sample(3), rtol=1e-9, atol=1e-9, max_steps=3)
    assert e.value.stats is not None and e.value.stats.steps >= 3


# ------------------------------------------------------------------------------------------------
# the benchmark script keeps working
# ------------------------------------------------------------------------------------------------
def test_benchmark_script_quick(tmp_path):
    out = tmp_path / "lik.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "likelihood_cpu.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| recipe |" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["quick"] and len(rows) >= 4
    exact = [r for r in rows if r["divergence"] == "exact"]
    assert exact and max(r["err_max"] for r in exact) <= 1e-4
    for r in rows:
        assert r["nfe"] > 0 and r["wall_s"] > 0


def test_benchmark_script_ve_sweep_quick(tmp_path):
    """``--only ve --sweep --quick`` on one tiny case and two tolerances: both tables, well-formed JSON."""
    out = tmp_path / "sweep.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "likelihood_cpu.py"), "--only", "ve",
                           "--sweep", "--quick", "--threads", "1", "--tols", "1e-3,1e-4", "--cases", "2x16",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| d | B | recipe | tol |" in proc.stdout and "| d | B | error | E |" in proc.stdout
    data = json.loads(out.read_text())
    assert {"machine", "torch_threads", "timestamp", "tols", "ref_tol", "targets", "recipes", "cases",
            "points"} <= set(data)
    assert data["quick"] and data["torch_threads"] == 1 and data["tols"] == [1e-3, 1e-4]
    recipes = {r["label"] for r in data["recipes"]}
    assert len(recipes) == 3 and len(data["points"]) == 3 * 2
    for p in data["points"]:
        assert p["recipe"] in recipes and not p.get("failed")
        for k in ("nfe", "nfe_per_sample_mean", "wall_s", "solver_err_max", "solver_err_mean", "exact_err_max",
                  "exact_err_mean"):
            assert math.isfinite(p[k]) and p[k] >= 0, (k, p[k])
        assert p["nfe"] > 0 and p["wall_s"] > 0 and p["solver_err_mean"] <= p["solver_err_max"]
    (case,) = data["cases"]
    assert case["probe_identical_to_kdiffusion_draw"] is True
    assert case["reference_spread_max"] < 1e-6  # the three 1e-11 references solve the same ODE
    assert len(case["equal_accuracy"]) == 2 * len(data["targets"])
    for row in case["equal_accuracy"]:
        assert set(row["recipes"]) == recipes
        for r in row["recipes"].values():
            assert r["status"] in ("interpolated", "at_loosest", "not_reached")
            assert (r["wall_s"] is None) == (r["status"] == "not_reached")
            assert r["wall_s"] is None or (math.isfinite(r["wall_s"]) and r["wall_s"] > 0)


# ---------------------------------------------------------------------------------------------
# backends: the native integrator and torchdiffeq give the same solve
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence,norm", [("exact", "batch"), ("hutchinson", "per-sample")])
def test_native_and_torchdiffeq_backends_agree(divergence, norm):
    sde = sdekit.VPSDE()
    gm = mixture(3, seed=4)
    x = gm.sample(24, generator=torch.Generator().manual_seed(0))
    kw = dict(divergence=divergence, norm=norm, n_probes=2, prior=gm.push(sde, sde.T), rtol=1e-7, atol=1e-7)
    nat = log_likelihood(sde, gm.exact_score(sde), x, generator=torch.Generator().manual_seed(3), **kw)
    td = log_likelihood(sde, gm.exact_score(sde), x, generator=torch.Generator().manual_seed(3),
                        backend="torchdiffeq", **kw)
    assert nat.stats.backend == "native" and td.stats.backend == "torchdiffeq"  # auto -> native on CPU
    assert (nat.stats.nfe, nat.stats.accepted, nat.stats.rejected) == (td.stats.nfe, td.stats.accepted,
                                                                     td.stats.rejected)
    torch.testing.assert_close(nat.log_prob, td.log_prob, rtol=0, atol=1e-9)
    torch.testing.assert_close(nat.delta_per_probe, td.delta_per_probe, rtol=0, atol=1e-9)
    exact = gm.exact_log_prob(sde)(x, T_EPS)
    if divergence == "exact":
        assert float(((nat.log_prob - exact) / 3).abs().max()) < 1e-4
    assert nat.stats.extra["score_calls"] == nat.stats.nfe  # one score call per counted evaluation


def test_backend_choice_and_refusals():
    sde = sdekit.VPSDE()
    gm = mixture(2, seed=5)
    x = gm.sample(4, generator=torch.Generator().manual_seed(0))
    score = gm.exact_score(sde)
    # a gradient is wanted -> torchdiffeq (backprop through the solver), under auto
    xg = x.clone().requires_grad_(True)
    r = log_likelihood(sde, score, xg, rtol=1e-4, atol=1e-4)
    assert r.stats.backend == "torchdiffeq" and r.log_prob.requires_grad
    r = log_likelihood(sde, score, x, rtol=1e-4, atol=1e-4, method="dopri8")
    assert r.stats.backend == "torchdiffeq"
    for kwargs, match in [(dict(adjoint=True), "adjoint"), (dict(method="adaptive_heun"), "method"),
                          (dict(options={"jump_t": [0.5]}), "jump_t")]:
        with pytest.raises(ValueError, match=match):
            log_likelihood(sde, score, x, rtol=1e-4, atol=1e-4, backend="native", **kwargs)
    with pytest.raises(ValueError, match="backend"):
        log_likelihood(sde, score, x, backend="scipy")
    # native solver options are honoured: max_step bounds every step
    r = log_likelihood(sde, score, x, rtol=1e-3, atol=1e-3, options={"max_step": 0.05})
    assert r.stats.backend == "native" and r.stats.accepted >= 20


def test_native_solver_failure_reports_step_time_and_stats():
    sde = sdekit.VPSDE()

    def bad(x, t):
        hole = ((t > 0.3) & (t < 0.6))[:, None]  # NaN inside (0.3, 0.6) only: the preflight at T passes
        return torch.where(hole, torch.full_like(x, float("nan")), -x)

    with pytest.raises(SolverError, match="not finite") as ei:
        log_likelihood(sde, bad, torch.zeros(3, 2, dtype=F64), rtol=1e-4, atol=1e-4, prior=lambda z: z.sum(1))
    e = ei.value
    assert e.stats.nfe > 0 and e.stats.extra["score_calls"] > 0 and T_EPS <= e.t <= 0.6
