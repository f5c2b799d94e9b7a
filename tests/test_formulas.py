"""The shared formulas that have one home: the Gaussian log-density (`sdekit._gaussian`),
Tweedie's mean (`sdekit.parameterization.tweedie_mean`) and the reverse-family score
coefficient (`sdekit.dynamics.score_coefficient`), each against an independent reference.
"""

import math

import pytest
import torch

import sdekit
from sdekit._gaussian import LOG_2PI, gaussian_log_prob
from sdekit.dynamics import score_coefficient
from sdekit.parameterization import tweedie_mean

F64 = torch.float64


def _normal_ref(x, mean, var, event_dims):
    lp = torch.distributions.Normal(torch.as_tensor(mean, dtype=F64),
                                    torch.as_tensor(var, dtype=F64).sqrt()).log_prob(x)
    lp = lp.expand_as(x) if lp.shape != x.shape else lp
    return lp.sum(tuple(range(-event_dims, 0))) if event_dims else lp


@pytest.mark.parametrize("var_shape", [(), (4, 1, 1), (4, 3, 2), (1, 3, 1), (3, 2)])
@pytest.mark.parametrize("event_dims", [None, 1, 0])
def test_gaussian_log_prob_matches_torch_distributions(var_shape, event_dims):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, generator=g, dtype=F64)
    mean = torch.randn(4, 3, 2, generator=g, dtype=F64)
    var = 0.1 + torch.rand(var_shape, generator=g, dtype=F64)
    k = 2 if event_dims is None else event_dims
    got = gaussian_log_prob(x, mean, var, event_dims=event_dims)
    ref = _normal_ref(x, mean, var, k)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-13, atol=1e-12)
    assert LOG_2PI == math.log(2 * math.pi)


def test_gaussian_log_prob_with_a_number_mean_and_var():
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    ref = _normal_ref(x, 0.0, 2.5, 1)
    assert torch.allclose(gaussian_log_prob(x, 0.0, 2.5), ref, rtol=1e-14)
    assert torch.allclose(gaussian_log_prob(x, 0.3, 2.5), _normal_ref(x, 0.3, 2.5, 1), rtol=1e-14)


@pytest.mark.parametrize("sde", [sdekit.VPSDE(), sdekit.VESDE(), sdekit.CosineVPSDE()], ids=repr)
def test_tweedie_mean_is_the_exact_posterior_mean(sde):
    """(x + sigma^2 score)/m with the exact mixture score equals the mixture's E[x_0 | x_t]
    (computed by the oracle from the Gaussian posterior of each component, not by Tweedie)."""
    gm = sdekit.GaussianMixture([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [[0.1, 0.3], [0.2, 0.05]])
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for t in (0.05, 0.5):
        tt = torch.full((5,), t, dtype=F64)
        m, s = (float(v) for v in sde.marginal(t))
        got = tweedie_mean(x, gm.exact_score(sde)(x, tt), m, s * s)
        ref = gm.exact_posterior_mean(sde)(x, tt)
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10), (t, got, ref)


def test_score_coefficient_of_the_reverse_family():
    eta = torch.tensor([0.0, 1.0, 0.5, 2.0], dtype=F64)
    assert torch.equal(score_coefficient(eta), torch.tensor([-0.5, -1.0, -0.625, -2.5], dtype=F64))
    sde = sdekit.VPSDE()
    score = lambda x, t: -x  # noqa: E731
    t = torch.tensor([0.3], dtype=F64)
    a_pf, c_pf = sde.probability_flow(score).affine_coefficients(t)
    a_r, c_r = sde.reverse(score, eta=0.0).affine_coefficients(t)
    assert torch.equal(c_pf, c_r) and torch.allclose(c_pf, -0.5 * sde.g2(t), rtol=1e-15)
    x = torch.tensor([[0.7, -0.2]], dtype=F64)
    assert torch.allclose(sde.probability_flow(score).velocity(x, 0.3),
                          sde.reverse(score, eta=0.0).drift(x, 0.3), rtol=1e-15)
