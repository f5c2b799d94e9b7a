"""Per-sample adaptive stepping (``norm="independent"``): each sample its own step size, error
test and end time; finished samples cost nothing; a sample's result and NFE do not depend on its
batch. Deterministic (fixed seeds); no statistical tests."""

import math

import pytest
import torch

import sdekit
from sdekit.likelihood import log_likelihood
from sdekit.oracles import GaussianMixture
from sdekit.solvers.adaptive import NATIVE_ADAPTIVE_METHODS, integrate_adaptive
from sdekit.solvers.integrate import integrate_ode
from sdekit.solvers.stats import SolverError

F64 = torch.float64
S0 = 0.5


class RowGaussScore(torch.nn.Module):
    """Exact score $-x / v(t)$ of data $N(0, S_0^2 I)$, $v = m^2 S_0^2 + \\sigma^2$, with one
    time per row; counts the rows it is called on."""

    def __init__(self, sde):
        super().__init__()
        self.sde, self.rows, self.calls = sde, 0, 0

    def var(self, t):
        m, s = self.sde.marginal(torch.as_tensor(t, dtype=F64))
        return m * m * S0 * S0 + s * s

    def forward(self, x, t):
        self.rows += x.shape[0]
        self.calls += 1
        return -x / self.var(t).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("t0,t1", [(1.0, 1e-3), (1e-3, 1.0)])
def test_exact_gaussian_flow_and_per_sample_counts(method, t0, t1):
    """Against the closed-form PF flow of Gaussian data; every sample's NFE is 2 + s * its attempted
    steps, and the rows the score saw add up to the per-sample NFE (finished samples cost nothing)."""
    sde = sdekit.VPSDE()
    score = RowGaussScore(sde)
    pf = sde.probability_flow(score, t_eps=1e-3)
    # rows of very different scales: their steps differ, so samples finish at different iterations
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    x = x * torch.logspace(-3, 1, 16, dtype=F64).unsqueeze(1)
    tol = 1e-7 if method == "dopri5" else 1e-6
    sol = sdekit.solve(pf, x, t0, t1, method=method, rtol=tol, atol=tol, norm="independent")
    exact = x * math.sqrt(float(score.var(t1) / score.var(t0)))
    assert float(((sol.x - exact).abs() / (tol + tol * exact.abs())).max()) < 50.0
    st = sol.stats
    s = NATIVE_ADAPTIVE_METHODS[method]
    assert torch.equal(st.nfe_per_sample, 2 + s * st.steps_per_sample)
    assert torch.equal(st.steps_per_sample, st.accepted_per_sample + st.rejected_per_sample)
    assert st.sample_evals == int(st.nfe_per_sample.sum()) == score.rows
    assert st.nfe == score.calls == int(st.nfe_per_sample.max())
    assert st.nfe == 2 + s * st.steps and st.steps == st.accepted + st.rejected == int(st.steps_per_sample.max())
    assert int(st.nfe_per_sample.min()) < int(st.nfe_per_sample.max())  # the steps did differ
    assert score.rows < st.nfe * x.shape[0]  # ... and the finished samples were not evaluated


def _mixture_pf():
    sde = sdekit.VPSDE()
    gm = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [[0.05, 0.3], [0.4, 0.1]])
    return sde, gm, sde.probability_flow(gm.exact_score(sde), t_eps=1e-3)


def test_a_sample_does_not_depend_on_its_batch():
    """Alone, in a batch of 64, in a shuffled batch: the same x (float64, 1e-12) and the same NFE."""
    sde, gm, pf = _mixture_pf()
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * sde.prior_std()
    kw = dict(method="dopri5", rtol=1e-5, atol=1e-5, norm="independent")
    full = sdekit.solve(pf, x, **kw)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuf = sdekit.solve(pf, x[perm], **kw)
    inv = torch.argsort(perm)
    torch.testing.assert_close(shuf.x[inv], full.x, rtol=0, atol=1e-12)
    assert torch.equal(shuf.stats.nfe_per_sample[inv], full.stats.nfe_per_sample)
    nfe = full.stats.nfe_per_sample
    for i in {int(nfe.argmin()), int(nfe.argmax())}:
        one = sdekit.solve(pf, x[i:i + 1], **kw)
        torch.testing.assert_close(one.x[0], full.x[i], rtol=0, atol=1e-12)
        assert int(one.stats.nfe_per_sample[0]) == int(nfe[i]) == one.stats.nfe
    assert int(nfe.min()) < int(nfe.max())


def test_save_at_and_compact_equals_mask():
    """Save points are hit per sample; masking finished rows gives the same numbers as compacting."""
    from sdekit.solvers.adaptive import _config
    from sdekit.solvers.adaptive_per_sample import integrate_per_sample

    sde = sdekit.VPSDE()
    score = RowGaussScore(sde)
    pf = sde.probability_flow(score, t_eps=1e-3)
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(4)) * \
        torch.logspace(-2, 1, 8, dtype=F64).unsqueeze(1)
    save = [1.0, 0.5, 0.1, 1e-3]
    sol = sdekit.solve(pf, x, method="dopri5", rtol=1e-8, atol=1e-8, save_at=save, norm="independent")
    assert sol.xs.shape == (4, 8, 2) and torch.equal(sol.xs[0], x) and torch.equal(sol.xs[-1], sol.x)
    for k, t in enumerate(save):
        exact = x * math.sqrt(float(score.var(t) / score.var(1.0)))
        assert float((sol.xs[k] - exact).abs().max()) < 1e-6
    cfg = _config("bosh3", x, 1e-5, 1e-5, "independent", 1.0, 1e-3, (), None, math.inf, 0.9, 10.0, 0.2, None,
                  None, (0.5,))
    f = lambda t, y: pf(t, y)  # noqa: E731
    with torch.no_grad():
        a, ia = integrate_per_sample(f, x, cfg, compact=True)
        b, ib = integrate_per_sample(f, x, cfg, compact=False)
    assert torch.equal(a, b) and torch.equal(ia["saved"][0], ib["saved"][0])
    assert torch.equal(ia["nfe_per_sample"], ib["nfe_per_sample"]) and ia["nfe"] == ib["nfe"]


def test_likelihood_is_per_sample_and_probes_follow_the_sample():
    """Exact divergence: a sample's log p and NFE are the same alone and in its batch. Hutchinson:
    each sample keeps its own probe while the batch shrinks (per-sample stepping agrees with the
    shared step at a tight tolerance, which uses probe i for sample i throughout)."""
    sde = sdekit.VPSDE()
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0, 0.5], [1.0, 0.5, -0.5]], [0.3, 0.05])
    x = gm.sample(8, generator=torch.Generator().manual_seed(2))
    score = gm.exact_score(sde)
    kw = dict(rtol=1e-6, atol=1e-6, norm="independent", divergence="exact")
    full = log_likelihood(sde, score, x, **kw)
    for i in (0, 5):
        one = log_likelihood(sde, score, x[i:i + 1], **kw)
        torch.testing.assert_close(one.log_prob[0], full.log_prob[i], rtol=0, atol=1e-12)
        assert int(one.stats.nfe_per_sample[0]) == int(full.stats.nfe_per_sample[i])
    hk = dict(divergence="hutchinson", n_probes=2, rtol=1e-6, atol=1e-6)
    ind = log_likelihood(sde, score, x, norm="independent", generator=torch.Generator().manual_seed(5), **hk)
    bat = log_likelihood(sde, score, x, norm="batch", generator=torch.Generator().manual_seed(5), **hk)
    assert int(ind.stats.nfe_per_sample.min()) < int(ind.stats.nfe_per_sample.max())
    # both solves are 1e-6 accurate; a probe swapped between samples would move Delta by O(0.1)
    torch.testing.assert_close(ind.delta_per_probe, bat.delta_per_probe, rtol=0, atol=1e-3)


def _lik_mixture(d, seed, scale=1.0):
    """tests/test_likelihood.py's ``mixture(d, seed, kind="full", scale=scale)``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(3, generator=g, dtype=F64) + 0.5
    mu = scale * torch.randn(3, d, generator=g, dtype=F64)
    A = torch.randn(3, d, d, generator=g, dtype=F64)
    covs = 0.3 * A @ A.transpose(1, 2) / d + 0.2 * torch.eye(d, dtype=F64)
    return GaussianMixture(w, mu, covs)


SDES = {"vp": sdekit.VPSDE, "ve": lambda: sdekit.VESDE(0.01, 50.0),
        "custom": lambda: sdekit.LinearSDE(lambda t: -0.5 * (1.0 + 0.8 * torch.sin(3.0 * t)),
                                           lambda t: torch.sqrt(1.0 + 0.8 * torch.sin(3.0 * t)))}


def _worst_error(sde, gm, x, **kw):
    res = log_likelihood(sde, gm.exact_score(sde), x, t_eps=1e-5, rtol=1e-6, atol=1e-6, divergence="exact",
                         prior=gm.push(sde, sde.T), **kw)
    return float(((res.log_prob - gm.exact_log_prob(sde)(x, 1e-5)).abs() / x[0].numel()).max())


@pytest.mark.parametrize("name,d", [("vp", 8), ("ve", 2), ("custom", 2)])
def test_likelihood_default_meets_1e4_nats_per_dim_at_tol_1e6(name, d):
    """Issue 9's promise: rtol = atol = 1e-6, exact divergence, float64, no other arguments:
    worst sample within 1e-4 nats/dim of the exact density (the prior is the exact marginal at T,
    so only the solver's error is measured; the full table is in docs/likelihood.md)."""
    sde = SDES[name]()
    gm = _lik_mixture(d, 100 + d)
    x = gm.sample(8, generator=torch.Generator().manual_seed(d))
    assert _worst_error(sde, gm, x) <= 1e-4


def test_likelihood_default_meets_1e4_where_the_batch_norm_does_not():
    """One hard sample among 127 copies of an easy one (VP, d = 8, mixture means x2): the batch
    RMS dilutes the hard sample's error below the tolerance and misses 1e-4 nats/dim (measured
    2.0e-4); the default (per-sample stepping) does not depend on the company (7.9e-6)."""
    sde = sdekit.VPSDE()
    gm = _lik_mixture(8, 1, scale=2.0)
    x = gm.sample(256, generator=torch.Generator().manual_seed(1))
    hard, easy = x[27:28], x[255:256]  # the samples with the most / fewest steps of this draw
    xb = torch.cat([hard, easy.expand(127, 8)])
    assert _worst_error(sde, gm, xb) <= 1e-4
    assert _worst_error(sde, gm, xb, norm="batch") > 1e-4  # the control: why the default changed


def test_bad_input_and_failures_name_the_sample():
    sde, gm, pf = _mixture_pf()
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="independent"):
        sdekit.solve(pf, x, method="heun", steps=4, norm="independent")
    with pytest.raises(ValueError, match="independent"):
        sdekit.solve(pf, x, method="torchdiffeq:dopri5", rtol=1e-5, atol=1e-5, norm="independent")
    with pytest.raises(ValueError, match="norm"):
        sdekit.solve(pf, x, method="dopri5", rtol=1e-5, atol=1e-5, norm="sample")
    with pytest.raises(ValueError, match="independent"):
        integrate_ode(lambda t, y: -y, x, 0.0, 1.0, rtol=1e-5, atol=1e-5, norm="independent", backend="torchdiffeq")
    with pytest.raises(ValueError, match="sample_index"):
        integrate_adaptive(lambda t, y: -y, x, 0.0, 1.0, rtol=1e-5, atol=1e-5, sample_index=True)

    def blow_up(t, y, index):  # sample 2 turns NaN once its time passes 0.5
        out = -y.clone()
        out[(t > 0.5) & (index == 2)] = math.nan
        return out

    with pytest.raises(SolverError, match="sample 2") as ei:
        integrate_adaptive(blow_up, x, 0.0, 1.0, rtol=1e-6, atol=1e-6, norm="independent", sample_index=True)
    assert ei.value.stats.nfe_per_sample.shape == (4,)
    with pytest.raises(SolverError, match="max_steps"):
        integrate_adaptive(lambda t, y: -y, x, 0.0, 1.0, rtol=1e-10, atol=1e-10, norm="independent", max_steps=3)
