"""Fast paths must compute what the plain formulas compute: the lean Euler–Maruyama loop on a
linear reverse SDE (deferred non-finite check that still names the first bad step) and the
likelihood's precomputed augmented field / preconditioned state."""

from __future__ import annotations

import math

import pytest
import torch

import sdekit
from sdekit.solvers import SolverError
from sdekit.solvers.grids import make_grid

F64 = torch.float64


def _hand_em(sde, score, x0, ts, gen):
    """Euler–Maruyama on the reverse SDE (eta = 1) written from the formulas: the reference."""
    x = x0.clone()
    t64 = torch.tensor(ts, dtype=F64)
    f, g2 = sde.kernel.f(t64).tolist(), sde.kernel.g2(t64).tolist()
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        tv = torch.full((x.shape[0],), ts[i], dtype=x.dtype)
        x = x + h * (f[i] * x - g2[i] * score(x, tv)) + math.sqrt(g2[i] * abs(h)) * torch.randn(
            x.shape, generator=gen, dtype=x.dtype)
    return x


@pytest.mark.parametrize("sde", [sdekit.VPSDE(), sdekit.VESDE()], ids=["vp", "ve"])
def test_lean_euler_maruyama_matches_the_formula(sde):
    score = lambda x, t: -x / (1.0 + t.reshape(-1, 1))  # noqa: E731  (depends on t: catches a wrong time)
    x0 = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    sol = sdekit.solve(sde.reverse(score), x0, method="euler_maruyama", steps=40,
                       generator=torch.Generator().manual_seed(1))
    ts = make_grid("uniform", sde.T, sdekit.SAMPLING_T_EPS, 40).tolist()
    ref = _hand_em(sde, score, x0, ts, torch.Generator().manual_seed(1))
    assert sol.stats.nfe == 40 and sol.stats.steps == 40
    assert torch.allclose(sol.x, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_bad", [0.5, 0.8123, 0.03])  # inside a check block, early, the last step
def test_lean_euler_maruyama_names_the_first_bad_step(t_bad):
    calls = []

    def score(x, t):
        calls.append(float(t[0]))
        return -x * float("nan") if float(t[0]) < t_bad else -x

    sde = sdekit.VPSDE()
    steps = 50
    ts = make_grid("uniform", sde.T, sdekit.SAMPLING_T_EPS, steps).tolist()
    first = next(i for i in range(steps) if ts[i] < t_bad)  # the first step whose score is NaN
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SolverError, match="non-finite") as e:
        sdekit.solve(sde.reverse(score), x0, method="euler_maruyama", steps=steps,
                     generator=torch.Generator().manual_seed(2))
    err = e.value
    assert err.step == first and err.t == ts[first + 1]
    assert err.stats.steps == first + 1 and err.stats.nfe == len(calls)


# ------------------------------------------------------------------------------------------------
# likelihood: the preconditioned state on the native linear path
# ------------------------------------------------------------------------------------------------
def _mixture(d, B, seed=0):
    from sdekit.oracles import GaussianMixture

    g = torch.Generator().manual_seed(seed)
    gm = GaussianMixture(torch.rand(3, generator=g, dtype=F64) + 0.5, 1.5 * torch.randn(3, d, generator=g, dtype=F64),
                         0.2 + 0.6 * torch.rand(3, d, generator=g, dtype=F64))
    return gm, gm.sample(B, generator=g)


@pytest.mark.parametrize("sde", [sdekit.VESDE(), sdekit.SubVPSDE()], ids=["ve", "subvp"])
def test_preconditioned_likelihood_is_exact_and_cheaper(sde):
    """Default (preconditioned) and ``precondition=False`` against the mixture's exact log density:
    both within the tolerance, the preconditioned one with fewer NFE. Deterministic (exact divergence)."""
    from sdekit.likelihood import log_likelihood

    gm, x = _mixture(2, 32)
    t_eps = 1e-5
    exact = gm.exact_log_prob(sde)(x, t_eps)
    pT = gm.push(sde, sde.T)
    kw = dict(t_eps=t_eps, divergence="exact", prior=pT, rtol=1e-5, atol=1e-5)
    auto = log_likelihood(sde, gm.exact_score(sde), x, **kw)
    assert auto.stats.extra["precondition"] == isinstance(sde, sdekit.VESDE)  # auto: VE-type only
    on = log_likelihood(sde, gm.exact_score(sde), x, precondition=True, **kw)
    off = log_likelihood(sde, gm.exact_score(sde), x, precondition=False, **kw)
    data = gm.sample(4000, generator=torch.Generator().manual_seed(3))
    per_dim = log_likelihood(sde, gm.exact_score(sde), x, precondition=True, data_moments=(data.mean(0), data.var(0)),
                             **kw)
    assert on.stats.extra["precondition"] and per_dim.stats.extra["precondition"]
    assert not off.stats.extra["precondition"]
    for r in (on, off, per_dim):
        assert float((r.log_prob - exact).abs().max()) / 2 < 2e-4
    # total work: rows evaluated (per-sample stepping, the default, has one NFE count per sample)
    work = lambda r: r.stats.sample_evals if r.stats.sample_evals is not None else r.stats.nfe * x.shape[0]  # noqa
    assert work(on) < work(off) and work(per_dim) < work(off)
    # delta_log_prob is the integral of div_x v either way (the log|det| term is folded in)
    assert torch.allclose(on.delta_log_prob, off.delta_log_prob, atol=2e-3)


def test_preconditioned_state_maps_gaussian_data_to_a_fixed_point():
    """For Gaussian data N(mu, c^2) with those moments the preconditioned velocity is zero: the
    solve needs the minimum number of steps and the result is exact to round-off."""
    from sdekit.likelihood import log_likelihood
    from sdekit.oracles import GaussianMixture

    sde = sdekit.VESDE()
    mu, var = torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.3, 2.0, 1.0], dtype=F64)
    gm = GaussianMixture(torch.ones(1, dtype=F64), mu[None], var[None])
    x = gm.sample(16, generator=torch.Generator().manual_seed(1))
    r = log_likelihood(sde, gm.exact_score(sde), x, divergence="exact", data_moments=(mu, var),
                       prior=gm.push(sde, sde.T))
    exact = gm.exact_log_prob(sde)(x, r.t_eps)
    assert float((r.log_prob - exact).abs().max()) < 1e-8
    # zero velocity: the steps only grow from the heuristic's first step (1e-4 here) by the
    # controller's factor 10 up to T = 1, i.e. 5 steps; in x the same solve needs many more
    assert r.stats.accepted <= 5
    off = log_likelihood(sde, gm.exact_score(sde), x, divergence="exact", precondition=False,
                         prior=gm.push(sde, sde.T))
    assert off.stats.nfe > 2 * r.stats.nfe


def test_precondition_option_is_checked():
    from sdekit.likelihood import log_likelihood

    gm, x = _mixture(2, 4)
    sde = sdekit.VESDE()
    r = log_likelihood(sde, gm.exact_score(sde), x, backend="torchdiffeq", divergence="exact")
    assert r.stats.extra["precondition"] is False  # the generic path never preconditions
    with pytest.raises(ValueError, match="precondition=True needs"):
        log_likelihood(sde, gm.exact_score(sde), x, precondition=True, backend="torchdiffeq")
    with pytest.raises(ValueError, match="precondition must be"):
        log_likelihood(sde, gm.exact_score(sde), x, precondition="yes")
    with pytest.raises(ValueError, match="data_moments"):
        log_likelihood(sde, gm.exact_score(sde), x, data_moments=(torch.zeros(3), torch.ones(3)))
    with pytest.raises(TypeError, match="data_moments"):
        log_likelihood(sde, gm.exact_score(sde), x, data_moments=[0.0, 1.0])
