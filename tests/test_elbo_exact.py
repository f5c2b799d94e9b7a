r"""The ELBO with the exact score and the matched prior is the exact log-density.

With $s_\theta = \nabla\log p_t$ (the Gaussian-mixture oracle) and $\pi = p_T$, the bound is an
equality: $\mathcal L(x) = \log p_{t_\varepsilon}(x)$ for every x (docs/likelihood_data.md). So
the Monte-Carlo estimate must agree with the oracle's exact $\log p_{t_\varepsilon}(x)$ within its
own standard error, at every $t_\varepsilon$ — including large ones, where $m(t_\varepsilon) < 1$
and a transition built from the wrong starting point (b^2 = m_t^2 u / m_s^2 instead of
m_t^2 u) is biased by 0.1-0.16 nats on VP and sub-VP at $t_\varepsilon = 0.1$
(z = -6 to -9 per point at these settings, measured on the code before the fix).

False alarms: the estimate is a mean of n_t = 32000 (16000) i.i.d. draws, so z is standard normal
to a good approximation (the calibration in docs/likelihood_data.md found std(z) = 1.01-1.03).
Each configuration checks 4 points at |z| < 4.5 (two-sided p = 6.8e-6 each) and their combined
z = sum(z)/2 at |z| < 4 (p = 6.3e-5): over the 15 + 12 configurations below about 1e-3 in all.
Seeds are fixed, so the suite is deterministic.
"""

import pytest
import torch

import sdekit
from sdekit.likelihood.elbo import ElboResult, elbo
from sdekit.solvers import SolverStats

F64 = torch.float64
Z_POINT, Z_COMBINED = 4.5, 4.0
MIXTURE = sdekit.GaussianMixture([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [[0.1, 0.3], [0.2, 0.05]])
SDES = {
    "vp": sdekit.VPSDE(),
    "subvp": sdekit.SubVPSDE(),
    "cosine": sdekit.CosineVPSDE(),
    "ve": sdekit.VESDE(),
    "numeric": sdekit.LinearSDE(lambda t: -1.5 * (1 + 0.5 * torch.sin(4 * t)), lambda t: 0.5 + 2 * t, T=1.5),
}


def _z_scores(sde, t_eps, n_t, **kw):
    lp = MIXTURE.exact_log_prob(sde)
    x = MIXTURE.push(sde, t_eps).sample(4, generator=torch.Generator().manual_seed(1))
    r = elbo(sde, MIXTURE.exact_score(sde), x, n_t=n_t, generator=torch.Generator().manual_seed(0),
             t_eps=t_eps, prior_log_prob=lambda z: lp(z, sde.T), **kw)
    return (r.log_prob - lp(x, t_eps)) / r.stderr, r


def _assert_exact(z, label):
    combined = float(z.sum()) / z.numel() ** 0.5
    assert bool((z.abs() < Z_POINT).all()) and abs(combined) < Z_COMBINED, \
        f"{label}: z = {[round(v, 2) for v in z.tolist()]}, combined {combined:.2f}"


@pytest.mark.parametrize("t_eps", [1e-5, 1e-2, 0.1])
@pytest.mark.parametrize("name", list(SDES))
def test_elbo_with_exact_score_and_matched_prior_is_the_exact_log_density(name, t_eps):
    z, r = _z_scores(SDES[name], t_eps, 32000)
    _assert_exact(z, f"{name}, t_eps={t_eps}")
    assert bool((r.stderr < 0.05).all())  # measured 0.016-0.031: the test can see a 0.1-nat bias


@pytest.mark.parametrize("kw", [dict(control_variate=False), dict(antithetic=False), dict(importance=None),
                                dict(importance="mixture"), dict(data_var=0.05, n_eps=2), dict(data_var=20.0)],
                         ids=["no_cv", "no_antithetic", "uniform", "mixture", "small_v", "large_v"])
@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_every_variance_reduction_keeps_it_exact_at_a_large_t_eps(name, kw):
    """The control variate's rho and closed-form mean must use the same u = b^2/a^2 as the
    transition; a mismatch is a bias that depends on data_var (measured 4-16 SE before the fix)."""
    z, _ = _z_scores(SDES[name], 0.1, 16000, **kw)
    _assert_exact(z, f"{name}, {kw}")


def test_elbo_result_reports_solver_stats():
    sde = SDES["vp"]
    x = MIXTURE.sample(3, generator=torch.Generator().manual_seed(2))
    r = elbo(sde, MIXTURE.exact_score(sde), x, n_t=40, n_eps=2, generator=torch.Generator().manual_seed(0),
             max_batch=100)
    assert isinstance(r, ElboResult) and isinstance(r.stats, SolverStats)
    assert r.stats.nfe == r.nfe == 40 * 2 * 2 and r.stats.steps == r.stats.accepted == 40
    assert r.stats.method == "elbo" and r.stats.extra["score_calls"] == r.score_calls
    assert r.wall_time == r.stats.wall_time > 0
    with pytest.raises(AttributeError):
        r.nfe = 3
