"""diffusion.ScoreModel: conversions against the exact Gaussian-mixture oracle, the wiring into
sdekit's solvers and likelihoods (same numbers as calling sdekit directly with the same score),
train/eval mode handling and bad input. Deterministic (fixed seeds, no statistical tolerance)."""

import pytest
import torch
from torch import nn

import sdekit
from diffusion.model import ScoreModel
from sdekit.likelihood import DataTransform, bits_per_dim, elbo, log_likelihood
from sdekit.parameterization import PREDICTIONS

from _score_nets import AffineNet, OracleNet

F64 = torch.float64


def gm2():
    return sdekit.GaussianMixture([0.4, 0.6], [[-1.5, 0.5], [1.0, -0.5]], [[0.3, 0.2], [0.5, 0.4]])


def numeric_sde():
    return sdekit.LinearSDE(lambda t: -0.5 * (0.3 + 6.0 * t), lambda t: torch.sqrt(0.3 + 6.0 * t), T=1.0)


PROCS = {"vp": lambda: sdekit.VPSDE(), "ve": lambda: sdekit.VESDE(0.01, 20.0), "numeric": numeric_sde}


def batch(sde, B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.01 + 0.98 * sde.T * torch.rand(B, generator=g, dtype=F64)
    x = gm2().push(sde, 0.5).sample(B, generator=g)
    return x, t


@pytest.mark.parametrize("name", sorted(PROCS))
@pytest.mark.parametrize("predict,precondition", [(p, None) for p in PREDICTIONS] + [("x0", "edm")])
def test_exact_network_gives_exact_score(name, predict, precondition):
    """With the exact optimal network in any space (and EDM's exact F), model.score is the oracle's
    exact score to round-off: tests noise_cond (t is recovered from it), the conversions and the
    preconditioning together."""
    sde = PROCS[name]()
    gm = gm2()
    net = OracleNet(gm, sde, predict, precondition, sigma_data=0.8)
    model = ScoreModel(net, sde, predict=predict, precondition=precondition, sigma_data=0.8)
    x, t = batch(sde)
    ref = gm.exact_score(sde)(x, t)
    assert torch.allclose(model.score(x, t), ref, rtol=1e-7, atol=1e-7 * float(ref.abs().max()))
    assert torch.allclose(model(x, t), ref, rtol=1e-7, atol=1e-7 * float(ref.abs().max()))
    # predict_as gives the other spaces (x0 = the exact posterior mean)
    x0 = model.predict_as(x, t, "x0")
    assert torch.allclose(x0, gm.exact_posterior_mean(sde)(x, t), rtol=1e-7, atol=1e-7)


def test_noise_cond_is_log_sigma_bar():
    sde = sdekit.VPSDE()
    model = ScoreModel(AffineNet(2), sde)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    m, s = sde.marginal(t)
    assert torch.allclose(model.noise_cond(t, dtype=F64), torch.log(s / m), rtol=1e-12)
    assert model.noise_cond(t).dtype == torch.float32  # the parameters' dtype by default
    with pytest.raises(ValueError, match="noise condition is not finite"):
        model.noise_cond(torch.tensor([0.0], dtype=F64))


def exact_model(sde, predict="eps"):
    return ScoreModel(OracleNet(gm2(), sde, predict), sde, predict=predict)


@pytest.mark.parametrize("method,kind,kw", [
    ("dpmpp_2m", "pf", {"steps": 12}), ("euler", "pf", {"steps": 12}), ("ddim", "pf", {"steps": 12}),
    ("dopri5", "pf", {"rtol": 1e-5, "atol": 1e-5}),
    ("euler_maruyama", "rev", {"steps": 12}), ("ancestral", "rev", {"steps": 12}),
    ("dpmpp_2m_sde", "rev", {"steps": 12})])
def test_sample_routes_to_the_right_problem(method, kind, kw):
    """model.sample gives exactly what sdekit.solve gives on the PF ODE (ODE methods, deterministic
    samplers) or the reverse SDE (SDE methods, stochastic samplers) with the exact score."""
    sde = sdekit.VPSDE()
    model = exact_model(sde)
    xT = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    score = gm2().exact_score(sde)
    prob = sde.probability_flow(score, t_eps=1e-3) if kind == "pf" else sde.reverse(score, 1.0, t_eps=1e-3)
    ref = sdekit.solve(prob, xT, method=method, generator=torch.Generator().manual_seed(2), **kw)
    out = model.sample(x_T=xT, method=method, generator=torch.Generator().manual_seed(2), **kw)
    assert isinstance(out, sdekit.Solution)
    assert torch.allclose(out.x, ref.x, rtol=1e-6, atol=1e-6)
    assert out.stats.nfe == ref.stats.nfe


def test_sample_problem_override_and_n():
    sde = sdekit.VPSDE()
    model = exact_model(sde)
    g = torch.Generator().manual_seed(3)
    xT = sde.prior_sample((32, 2), generator=g, dtype=F64)
    score = gm2().exact_score(sde)
    ref = sdekit.solve(sde.reverse(score, 0.5, t_eps=1e-3), xT, method="ddim", steps=10)
    out = model.sample(x_T=xT, method="ddim", steps=10, problem="reverse", eta=0.5)
    assert torch.allclose(out.x, ref.x, rtol=1e-6, atol=1e-6)
    # n: prior draw in the parameters' dtype, shape from the net (OracleNet declares dim=2)
    model32 = ScoreModel(AffineNet(2), sde)
    s = model32.sample(8, method="euler", steps=3, generator=torch.Generator().manual_seed(0))
    assert s.x.shape == (8, 2) and s.x.dtype == torch.float32
    with pytest.raises(ValueError, match="exactly one of n"):
        model32.sample(method="euler", steps=3)
    with pytest.raises(ValueError, match="problem must be one of"):
        model32.sample(4, method="euler", steps=3, problem="forward")


def test_training_mode_restored_and_eval_inside():
    sde = sdekit.VPSDE()
    net = AffineNet(2)
    model = ScoreModel(net, sde)
    model.train()
    x = torch.randn(4, 2)
    model.sample(x_T=x, method="euler", steps=2)
    assert model.training and net.training
    assert net.modes and not any(net.modes)  # every call during sampling ran in eval mode
    net.modes.clear()
    model.eval()
    model.elbo(x, n_t=2)
    assert not model.training
    model.train()
    model.log_likelihood(x, rtol=1e-2, atol=1e-2, divergence="exact")
    assert model.training and not any(net.modes)
    # sampling does not build a graph
    assert not model.sample(x_T=x, method="euler", steps=2).x.requires_grad


def test_likelihood_wiring_matches_sdekit():
    """log_likelihood / elbo / bits_per_dim are sdekit's numbers for the same score."""
    sde = sdekit.VPSDE()
    model = exact_model(sde)
    score = gm2().exact_score(sde)
    x = gm2().sample(6, generator=torch.Generator().manual_seed(4))
    kw = dict(t_eps=1e-3, method="dopri5", rtol=1e-6, atol=1e-6)
    ll = model.log_likelihood(x, **kw)
    ref = log_likelihood(sde, score, x, **kw)
    assert torch.allclose(ll.log_prob, ref.log_prob, rtol=1e-6, atol=1e-6)
    e = model.elbo(x, n_t=16, generator=torch.Generator().manual_seed(5), t_eps=1e-3)
    e_ref = elbo(sde, score, x, n_t=16, generator=torch.Generator().manual_seed(5), t_eps=1e-3)
    assert torch.allclose(e.log_prob, e_ref.log_prob, rtol=1e-8)
    tr = DataTransform.identity()
    bpd = model.bits_per_dim(x, tr, **kw)
    assert torch.allclose(bpd, bits_per_dim(ref.log_prob, tr, 2), rtol=1e-6, atol=1e-6)
    bpd_e = model.bits_per_dim(x, tr, bound="elbo", n_t=16, generator=torch.Generator().manual_seed(5), t_eps=1e-3)
    assert torch.allclose(bpd_e, bits_per_dim(e_ref.log_prob, tr, 2), rtol=1e-8)


def test_labels_are_passed():
    class LabelNet(AffineNet):
        def forward(self, x, noise_cond, label=None):
            base = super().forward(x, noise_cond)
            return base if label is None else base + label[:, None].to(x.dtype)

    sde = sdekit.VPSDE()
    model = ScoreModel(LabelNet(2), sde, predict="score")
    x = torch.randn(3, 2)
    t = torch.full((3,), 0.5)
    diff = model.score(x, t, torch.tensor([0, 1, 2])) - model.score(x, t)
    assert torch.allclose(diff, torch.tensor([[0.0], [1.0], [2.0]]).expand(3, 2))
    out = model.sample(x_T=x, method="euler", steps=2, label=1)
    assert out.x.shape == (3, 2)


def test_bad_input():
    sde = sdekit.VPSDE()
    net = AffineNet(2)
    with pytest.raises(ValueError, match=r"predict must be one of \('eps', 'x0', 'v', 'score'\)"):
        ScoreModel(net, sde, predict="noise")
    with pytest.raises(ValueError, match=r"precondition must be one of \(None, 'edm'\)"):
        ScoreModel(net, sde, precondition="karras")
    with pytest.raises(ValueError, match="needs predict='x0'"):
        ScoreModel(net, sde, predict="eps", precondition="edm")
    with pytest.raises(TypeError, match="nn.Module"):
        ScoreModel(lambda x, c, l=None: x, sde)
    with pytest.raises(ValueError, match="sigma_data"):
        ScoreModel(net, sde, sigma_data=-1.0)
    with pytest.raises(ValueError, match="predict='score'"):
        ScoreModel(net, sdekit.SDE(lambda x, t: -x ** 3, lambda x, t: 1.0), predict="eps")
    model = ScoreModel(net, sde)
    with pytest.raises(ValueError, match=r"x has shape \(4, 3\) but the network AffineNet expects \(B, 2\)"):
        model.score(torch.randn(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1.0\]"):
        model.score(torch.randn(4, 2), 0.0)
    with pytest.raises(ValueError, match=r"t must be a scalar or a \(4,\) tensor"):
        model.score(torch.randn(4, 2), torch.full((3,), 0.5))

    class Wrong(nn.Module):
        def forward(self, x, c, label=None):
            return x[:, :1]

    with pytest.raises(ValueError, match="must return a tensor shaped like x"):
        ScoreModel(Wrong(), sde).score(torch.randn(4, 2), 0.5)


def test_log_likelihood_freezes_trainable_parameters():
    """A trained network's parameters require grad; the likelihood must not build a graph through
    them (it would keep every evaluation's graph and take the torchdiffeq route). Same numbers
    as a frozen copy, the native backend, and the flags restored afterwards."""
    from diffusion.nets import MLPScoreNet

    torch.manual_seed(0)
    net = MLPScoreNet(2, width=32, depth=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)            # leave the zero-initialised output: a non-trivial score
    model = ScoreModel(net, sdekit.VPSDE(), predict="eps")
    x = gm2().sample(8, generator=torch.Generator().manual_seed(1)).float()
    kw = dict(t_eps=1e-3, rtol=1e-5, atol=1e-5, divergence="exact")
    res = model.log_likelihood(x, **kw)
    assert res.stats.backend == "native"
    assert all(p.requires_grad for p in model.parameters())
    frozen = ScoreModel(MLPScoreNet(2, width=32, depth=2), sdekit.VPSDE(), predict="eps")
    frozen.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)
    ref = log_likelihood(frozen.sde, frozen.score_fn(), x, **kw)
    assert torch.equal(res.log_prob, ref.log_prob)
