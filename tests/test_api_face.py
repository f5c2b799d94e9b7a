"""The public face: top-level names, submodules loaded by `import sdekit`, consistent names with
their old aliases, the stated t_eps defaults, constant coefficients."""

import inspect
import subprocess
import sys

import torch

import sdekit

F64 = torch.float64


def test_import_sdekit_loads_every_documented_submodule():
    code = ("import sdekit\n"
            "for name in ['likelihood', 'solvers', 'studies', 'kernels', 'oracles', 'parameterization']:\n"
            "    getattr(sdekit, name)\n"
            "print(sdekit.likelihood.elbo.__module__, sdekit.studies.energy_distance.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sdekit.likelihood.elbo", "sdekit.studies.metrics"]


def test_top_level_names_are_the_submodule_objects():
    from sdekit import likelihood
    for name in ["log_likelihood", "elbo", "bits_per_dim", "DataTransform", "UniformDequantization",
                 "LikelihoodResult", "ElboResult"]:
        assert getattr(sdekit, name) is getattr(likelihood, name) and name in sdekit.__all__
    assert sdekit.tweedie_mean is sdekit.parameterization.tweedie_mean


def test_marginal_sample_and_its_old_name():
    sde = sdekit.VPSDE()
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    a = sde.marginal_sample(x0, 0.4, generator=torch.Generator().manual_seed(1))
    b = sde.sample_marginal(x0, 0.4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    m, s = sde.marginal(0.4)
    assert torch.allclose(a[0], m * x0 + s * a[1], rtol=1e-14)
    assert sdekit.LinearSDE.sample_marginal is sdekit.LinearSDE.marginal_sample


def _default(fn, name="t_eps"):
    return inspect.signature(fn).parameters[name].default


def test_t_eps_defaults_follow_the_stated_rule():
    """Sampling stops at SAMPLING_T_EPS = 1e-3, likelihoods at LIKELIHOOD_T_EPS = 1e-5 (docs/concepts.md)."""
    assert sdekit.SAMPLING_T_EPS == 1e-3 and sdekit.LIKELIHOOD_T_EPS == 1e-5
    for fn in (sdekit.SDE.reverse, sdekit.SDE.probability_flow, sdekit.ReverseSDE.__init__,
               sdekit.ProbabilityFlowODE.__init__):
        assert _default(fn) == sdekit.SAMPLING_T_EPS, fn
    for fn in (sdekit.log_likelihood, sdekit.elbo):
        assert _default(fn) == sdekit.LIKELIHOOD_T_EPS, fn
    sde = sdekit.VPSDE()
    assert sde.reverse(lambda x, t: -x).t_eps == sde.probability_flow(lambda x, t: -x).t_end == 1e-3


def test_constant_coefficients_are_accepted():
    """LinearSDE(f=-0.5, g=1.0) is the Ornstein-Uhlenbeck process with theta = 0.5, sigma = 1."""
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=F64)
    ou = sdekit.OrnsteinUhlenbeck(theta=0.5, sigma=1.0)
    for sde in (sdekit.LinearSDE(-0.5, 1.0), sdekit.LinearSDE(f=-0.5, g=torch.tensor(1.0, dtype=F64)),
                sdekit.LinearSDE(lambda u: -0.5 + 0 * u, 1)):
        m, s = sde.marginal(t)
        m_ref, s_ref = ou.marginal(t)
        assert torch.allclose(m, m_ref, rtol=1e-12) and torch.allclose(s, s_ref, rtol=1e-10, atol=0)
        assert torch.equal(sde.f(t), torch.full_like(t, -0.5)) and torch.equal(sde.g(t), torch.ones_like(t))


def test_mixture_shape_error_names_each_shape_once():
    gm = sdekit.GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, 1.0]])
    try:
        gm.log_prob(torch.zeros(4, 3, dtype=F64))
    except ValueError as e:
        assert str(e) == "x must have shape (B, 2) for this mixture; got (4, 3)"
    else:
        raise AssertionError("no error")
