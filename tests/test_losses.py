"""diffusion.losses against ground truth.

* exactness: "simple" on an ε-net IS the ε-MSE; "edm" with EDM preconditioning IS the F-MSE; the
  loss value does not depend on the space the error is measured in;
* Vincent's identity with the exact Gaussian-mixture oracle: DSM − explicit score matching is the
  same constant for two different score functions (common random numbers);
* the exact score attains the lowest DSM loss; perturbed ones are measurably worse;
* the likelihood-weighted loss of the exact score equals its closed form for Gaussian data, and
  ½·DSM_{g²}(s) + E[ELBO(s)] is the same θ-free constant for two scores, with sdekit's ELBO;
* sliced score matching: J(s) − J(s*) = ½ E‖s − s*‖² and J(s*) = −½ E‖s*‖² (Hyvärinen's identity);
* training: every weighting × prediction space learns Gaussian data; sliced SM learns the score of
  a non-linear forward SDE simulated with sdekit.solve.

Statistical checks are two-sided z-tests at |z| < 3.29 (false-alarm rate 0.1% each) on fixed
seeds, so each is deterministic; "measurably worse" means z > 5.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import sdekit
from diffusion.losses import DSMLoss, SimulatedMarginals, SlicedScoreMatchingLoss, build_loss, dsm_weight
from diffusion.model import ScoreModel
from sdekit.parameterization import PREDICTIONS

from _score_nets import AffineNet, MLPNet, OracleNet

F64 = torch.float64
Z = 3.29


def gm2():
    return sdekit.GaussianMixture([0.4, 0.6], [[-1.5, 0.5], [1.0, -0.5]], [[0.3, 0.2], [0.5, 0.4]])


def numeric_sde():
    # a custom process with a numeric kernel (no closed form anywhere)
    return sdekit.LinearSDE(lambda t: -0.5 * (0.3 + 6.0 * t + torch.sin(4 * t)),
                            lambda t: torch.sqrt(0.3 + 6.0 * t + torch.sin(4 * t)), T=1.0)


PROCS = {"vp": lambda: sdekit.VPSDE(), "ve": lambda: sdekit.VESDE(0.01, 20.0), "numeric": numeric_sde}


class Perturbed(nn.Module):
    """An ε-prediction that is the exact one scaled and shifted: a wrong score with known error."""

    def __init__(self, oracle, scale=0.0, shift=0.0):
        super().__init__()
        self.oracle, self.scale, self.shift, self.dim = oracle, scale, shift, oracle.dim

    def forward(self, x, c, label=None):
        return self.oracle(x, c) * (1.0 + self.scale) + self.shift


def eps_model(sde, gm, scale=0.0, shift=0.0):
    return ScoreModel(Perturbed(OracleNet(gm, sde, "eps"), scale, shift), sde, predict="eps")


def z_of(diff):
    diff = diff.detach().to(F64)
    return float(diff.mean() / (diff.std() / math.sqrt(diff.numel())))


# ---------------------------------------------------------------------------------------------
# exact identities (no Monte Carlo)
# ---------------------------------------------------------------------------------------------


def test_simple_on_eps_net_is_eps_mse():
    """DSMLoss("simple") of an ε-net with uniform t equals mean ‖net(x_t, log σ̄) − ε‖²/d, with t, ε
    drawn by hand from the same generator stream (sample_times, then randn)."""
    sde = sdekit.VPSDE()
    torch.manual_seed(0)
    net = AffineNet(3).double()
    model = ScoreModel(net, sde, predict="eps")
    x0 = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    loss = DSMLoss(weighting="simple", time_sampling="uniform", t_eps=1e-3)(
        model, x0, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = 1e-3 + (1.0 - 1e-3) * torch.rand(64, generator=g, dtype=F64)
    eps = torch.randn(64, 3, generator=g, dtype=F64)
    m, s = sde.marginal(t)
    xt = m[:, None] * x0 + s[:, None] * eps
    ref = ((net(xt, torch.log(s / m)) - eps) ** 2).mean()
    assert torch.allclose(loss, ref, rtol=1e-12)
    loss.backward()  # differentiable in the parameters
    assert all(p.grad is not None for p in net.parameters())


def test_edm_weighting_with_edm_preconditioning_is_F_mse():
    """EDM: λ(σ̄)‖D − x0‖² = ‖F − F_target‖² with F_target = (x0 − c_skip x_t/m)/c_out."""
    sde = sdekit.VPSDE()
    sd = 0.6
    torch.manual_seed(0)
    net = AffineNet(2).double()
    model = ScoreModel(net, sde, predict="x0", precondition="edm", sigma_data=sd)
    x0 = sd * torch.randn(50, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    loss = DSMLoss(weighting="edm", t_eps=1e-3)(model, x0, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = 1e-3 + (1.0 - 1e-3) * torch.rand(50, generator=g, dtype=F64)
    eps = torch.randn(50, 2, generator=g, dtype=F64)
    m, s = (c[:, None] for c in sde.marginal(t))
    sb = s / m
    xt = m * x0 + s * eps
    c_in, c_skip, c_out = 1 / (m * torch.sqrt(sb**2 + sd**2)), sd**2 / (sb**2 + sd**2), sb * sd / torch.sqrt(sb**2 + sd**2)
    F = net(c_in * xt, torch.log(sb[:, 0]))
    ref = ((F - (x0 - c_skip * xt / m) / c_out) ** 2).mean()
    assert torch.allclose(loss, ref, rtol=1e-10)


@pytest.mark.parametrize("weighting", ["simple", "likelihood", "edm"])
@pytest.mark.parametrize("scheme", ["uniform", "importance", "importance_stratified"])
def test_loss_value_is_the_same_in_every_target_space(weighting, scheme):
    sde = numeric_sde()
    torch.manual_seed(0)
    model = ScoreModel(AffineNet(2).double(), sde, predict="v")
    x0 = gm2().sample(40, generator=torch.Generator().manual_seed(1))
    vals = [float(DSMLoss(target=tg, weighting=weighting, time_sampling=scheme, t_eps=1e-3)(
        model, x0, generator=torch.Generator().manual_seed(2)).detach()) for tg in (None,) + PREDICTIONS]
    assert np.allclose(vals, vals[0], rtol=1e-9), vals


def test_weights_in_closed_form():
    """w: simple σ², likelihood g² (VP: β(t)), edm σ²(1 + σ̄²/σd²); and the likelihood weight on the
    ε-error under importance sampling is the constant Λ (per 2d)."""
    sde = sdekit.VPSDE(0.1, 20.0)
    t = torch.linspace(0.01, 1, 7, dtype=F64)
    B = 0.1 * t + 0.5 * 19.9 * t * t
    s2 = 1 - torch.exp(-B)
    assert torch.allclose(dsm_weight(sde, t, "simple"), s2)
    assert torch.allclose(dsm_weight(sde, t, "likelihood"), 0.1 + 19.9 * t)
    assert torch.allclose(dsm_weight(sde, t, "edm", 0.5), s2 * (1 + s2 / torch.exp(-B) / 0.25))
    model = ScoreModel(AffineNet(2).double(), sde)
    terms = DSMLoss(weighting="likelihood", time_sampling="importance", t_eps=1e-3).terms(
        model, torch.zeros(30, 2, dtype=F64), generator=torch.Generator().manual_seed(0))
    lam = lambda u: -math.log(math.expm1(0.1 * u + 0.5 * 19.9 * u * u))  # noqa: E731
    eps_factor = terms.factor * sde.kernel.sigma2(terms.t) ** -1  # factor on the score error × 1/σ²
    assert torch.allclose(eps_factor, torch.full_like(eps_factor, (lam(1e-3) - lam(1.0)) / 4), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Vincent's identity and optimality, with the exact oracle
# ---------------------------------------------------------------------------------------------


def dsm_and_esm(loss, model, x0, seed):
    """Per-sample DSM terms and explicit-score-matching terms on the same (t, x_t)."""
    terms = loss.terms(model, x0, generator=torch.Generator().manual_seed(seed))
    exact = gm2().exact_score(model.sde)(terms.x_t, terms.t)
    esm = terms.factor * ((model.score(terms.x_t, terms.t) - exact) ** 2).sum(1)
    return terms.per_sample, esm


@pytest.mark.parametrize("name", sorted(PROCS))
@pytest.mark.parametrize("weighting,scheme", [("simple", "uniform"), ("likelihood", "importance"),
                                              ("edm", "stratified")])
def test_vincent_identity(name, weighting, scheme):
    """DSM(s) − ESM(s) is the same for the exact score and a perturbed one (z-test on the per-sample
    difference, common random numbers; 0.1%), while ESM(perturbed) is far from 0 (z > 5)."""
    sde = PROCS[name]()
    gm = gm2()
    x0 = gm.sample(3000, generator=torch.Generator().manual_seed(0))
    loss = DSMLoss(weighting=weighting, time_sampling=scheme, t_eps=1e-3)
    d1, e1 = dsm_and_esm(loss, eps_model(sde, gm), x0, 1)
    d2, e2 = dsm_and_esm(loss, eps_model(sde, gm, scale=0.2, shift=0.1), x0, 1)
    assert float(e1.abs().max()) < 1e-8 * float(d1.abs().max())  # the oracle is exact
    assert abs(z_of((d1 - e1) - (d2 - e2))) < Z
    assert z_of(e2) > 5.0


@pytest.mark.parametrize("name", sorted(PROCS))
@pytest.mark.parametrize("weighting,scheme", [("simple", "uniform"), ("likelihood", "importance"),
                                              ("edm", "importance_stratified")])
def test_exact_score_minimises_dsm(name, weighting, scheme):
    """DSM(perturbed) − DSM(exact) > 0 with z > 5 for four perturbations (on the same draws)."""
    sde = PROCS[name]()
    gm = gm2()
    x0 = gm.sample(4000, generator=torch.Generator().manual_seed(3))
    loss = DSMLoss(weighting=weighting, time_sampling=scheme, t_eps=1e-3)
    base = loss.terms(eps_model(sde, gm), x0, generator=torch.Generator().manual_seed(4)).per_sample
    for scale, shift in ((0.2, 0.0), (-0.2, 0.0), (0.0, 0.25), (0.0, -0.25)):
        pert = loss.terms(eps_model(sde, gm, scale, shift), x0, generator=torch.Generator().manual_seed(4)).per_sample
        assert z_of(pert - base) > 5.0, (scale, shift)


# ---------------------------------------------------------------------------------------------
# likelihood weighting and the ELBO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROCS))
def test_likelihood_loss_of_exact_score_gaussian_closed_form(name):
    """Gaussian data N(μ, vI) in d = 2: the likelihood-weighted loss of the exact score is
    (½DSM_{g²})/d = Λ/2 + ½ log(V(t_eps)/V(T)) + log(m(T)/m(t_eps)), V = m²v + σ²
    (docs/training.md); z-test, 0.1%."""
    sde = PROCS[name]()
    v, t_eps = 0.5, 1e-3
    gm = sdekit.GaussianMixture([1.0], [[0.3, -0.2]], [v])
    model = ScoreModel(OracleNet(gm, sde, "eps"), sde, predict="eps")
    x0 = gm.sample(20000, generator=torch.Generator().manual_seed(0))
    per = DSMLoss(weighting="likelihood", time_sampling="importance", t_eps=t_eps).terms(
        model, x0, generator=torch.Generator().manual_seed(1)).per_sample
    ts = torch.tensor([t_eps, sde.T], dtype=F64)
    m, s = sde.marginal(ts)
    lam = torch.log(m**2 / s**2)
    V = m**2 * v + s**2
    exact = float(0.5 * (lam[0] - lam[1]) + 0.5 * torch.log(V[0] / V[1]) + torch.log(m[1] / m[0]))
    se = float(per.std() / math.sqrt(per.numel()))
    assert abs(float(per.mean()) - exact) < Z * se, (float(per.mean()), exact, se)
    assert se < 0.02 * abs(exact)  # the check is sharp


@pytest.mark.parametrize("name", ["vp", "numeric"])
def test_likelihood_loss_plus_elbo_is_theta_free(name):
    """For any score s: ½·DSM_{g²}(s) + E_{x~p_{t_eps}}[ELBO_s(x)] = E[log π(x_T)] + d log(m(T)/m(t_eps))
    + (d/2)Λ, with sdekit.likelihood.elbo (docs/training.md). Checked for the exact score and a
    perturbed one on the mixture; z-test (0.1%) on the combined Monte-Carlo error."""
    sde = PROCS[name]()
    gm = gm2()
    d, t_eps, N = 2, 1e-3, 3000
    ts = torch.tensor([t_eps, sde.T], dtype=F64)
    m, s = sde.marginal(ts)
    Lam = float(torch.log(m[0] ** 2 / s[0] ** 2) - torch.log(m[1] ** 2 / s[1] ** 2))
    sp2 = sde.prior_std() ** 2
    ex2 = float(torch.trace(gm.covariance) + (gm.mean ** 2).sum())  # E‖x0‖²
    log_prior = -0.5 * d * math.log(2 * math.pi * sp2) - (float(m[1]) ** 2 * ex2 + d * float(s[1]) ** 2) / (2 * sp2)
    const = log_prior + d * float(torch.log(m[1] / m[0])) + 0.5 * d * Lam
    x0 = gm.sample(N, generator=torch.Generator().manual_seed(0))
    xs = gm.push(sde, t_eps).sample(N, generator=torch.Generator().manual_seed(1))
    sums = []
    for scale, shift in ((0.0, 0.0), (0.5, 0.3)):
        model = eps_model(sde, gm, scale, shift)
        per = d * DSMLoss(weighting="likelihood", time_sampling="importance", t_eps=t_eps).terms(
            model, x0, generator=torch.Generator().manual_seed(2)).per_sample
        el = model.elbo(xs, t_eps=t_eps, n_t=2, generator=torch.Generator().manual_seed(3)).log_prob
        total = float(per.mean() + el.mean())
        se = math.sqrt(float(per.var()) / N + float(el.var()) / N)
        assert abs(total - const) < Z * se, (scale, total, const, se)
        sums.append((float(per.mean()), float(el.mean())))
    # the two scores differ in each term by much more than the error of the check
    assert sums[1][0] - sums[0][0] > 5 * se and sums[0][1] - sums[1][1] > 5 * se


# ---------------------------------------------------------------------------------------------
# sliced score matching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection,vr", [("rademacher", True), ("rademacher", False), ("gaussian", True),
                                           ("gaussian", False)])
def test_sliced_score_matching_identity(projection, vr):
    """Hyvärinen: J(s) = E[tr∇s + ½‖s‖²] = ½E‖s − s*‖² − ½E‖s*‖². At a fixed t on the mixture's
    marginal: J(s*) = −½E‖s*‖² and J(s) − J(s*) = ½E‖s − s*‖² (per dim; z-tests, 0.1%)."""
    sde = sdekit.VPSDE()
    gm = gm2()
    N, t0 = 6000, 0.3
    xt = gm.push(sde, t0).sample(N, generator=torch.Generator().manual_seed(0))
    t = torch.full((N,), t0, dtype=F64)
    loss = SlicedScoreMatchingLoss(projection=projection, variance_reduced=vr, n_projections=4, weighting="none")
    exact = gm.exact_score(sde)
    s_star = exact(xt, t)
    J_star = loss.per_sample(exact, xt, t, sde, generator=torch.Generator().manual_seed(1))
    ref_star = -0.5 * (s_star**2).sum(1) / 2
    assert abs(z_of(J_star - ref_star)) < Z
    pert = lambda x, tt: 1.5 * exact(x, tt) + 0.3 * x  # noqa: E731
    J_pert = loss.per_sample(pert, xt, t, sde, generator=torch.Generator().manual_seed(1))
    esm = 0.5 * ((pert(xt, t) - s_star) ** 2).sum(1) / 2
    assert abs(z_of((J_pert - J_star) - esm)) < Z
    assert z_of(J_pert - J_star) > 5.0


def test_sliced_score_matching_through_the_model_linear_sde():
    """On a linear SDE the loss draws x_t from the kernel; for the oracle model it is lower than for
    a perturbed one on the same draws."""
    sde = sdekit.VPSDE()
    gm = gm2()
    x0 = gm.sample(3000, generator=torch.Generator().manual_seed(0))
    loss = SlicedScoreMatchingLoss(t_eps=1e-2)
    with torch.no_grad():
        a = loss(eps_model(sde, gm), x0, generator=torch.Generator().manual_seed(1))
        b = loss(eps_model(sde, gm, 0.5, 0.0), x0, generator=torch.Generator().manual_seed(1))
    assert float(b) > float(a)


def test_simulated_marginals_match_the_kernel():
    """SimulatedMarginals on an Ornstein-Uhlenbeck process from a fixed x0: at every stored time the
    paths have mean m(t_k) x0 and variance σ(t_k)² of the exact kernel (z-tests, 0.1% each; the
    Euler-Maruyama bias at 8 substeps is far below the Monte-Carlo error)."""
    sde = sdekit.OrnsteinUhlenbeck(theta=2.0, sigma=1.5, T=1.0)
    N = 4000
    x0 = torch.full((N, 1), 2.0, dtype=F64)
    sim = SimulatedMarginals(sde, x0, n_times=4, substeps=32, generator=torch.Generator().manual_seed(0),
                             include_zero=True)
    assert torch.allclose(sim.times, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64))
    assert torch.equal(sim.states[0], x0)
    for k in range(1, 5):
        tk = float(sim.times[k])
        m, s = math.exp(-2.0 * tk), math.sqrt(1.5**2 / 4.0 * (1 - math.exp(-4.0 * tk)))
        x = sim.states[k, :, 0]
        assert abs(float(x.mean()) - 2.0 * m) < Z * s / math.sqrt(N)
        var_se = s**2 * math.sqrt(2.0 / (N - 1))
        assert abs(float(x.var()) - s**2) < Z * var_se
    xt, t = sim.draw(10, generator=torch.Generator().manual_seed(1))
    assert xt.shape == (10, 1) and t.dtype == F64 and set(t.tolist()) <= set(sim.times.tolist())


def double_well_samples(n, seed):
    """Exact samples of p ∝ exp(−U), U = x⁴/4 − x²/2, by inverse-CDF on a fine grid (numpy)."""
    grid = np.linspace(-4, 4, 200001)
    p = np.exp(-(grid**4) / 4 + grid**2 / 2)
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    u = np.random.default_rng(seed).uniform(size=n)
    return torch.tensor(np.interp(u, cdf, grid), dtype=torch.float32)[:, None]


def test_sliced_score_matching_learns_a_nonlinear_forward_sde():
    """dx = −U'(x) dt + √2 dW started at its stationary law exp(−U)/Z keeps p_t = exp(−U)/Z, whose
    score is −U'(x) = x − x³ for every t. Paths are simulated with sdekit.solve (Euler–Maruyama,
    cached by SimulatedMarginals); a small MLP trained for 600 steps with sliced SM must reach a
    relative L2(p) score error below 0.1 (measured 0.011-0.021)."""
    torch.manual_seed(0)
    sde = sdekit.SDE(lambda x, t: x - x**3, lambda x, t: math.sqrt(2.0), T=1.0)
    x0 = double_well_samples(4000, 0)
    sim = SimulatedMarginals(sde, x0, n_times=16, substeps=8, generator=torch.Generator().manual_seed(1))
    assert sim.states.shape == (16, 4000, 1)
    # stationarity survives the simulation: the mean of x² at T matches the data's (z-test, 0.1%)
    diff = sim.states[-1, :, 0] ** 2 - x0[:, 0] ** 2
    assert abs(z_of(diff)) < Z
    model = ScoreModel(MLPNet(1, 64), sde, predict="score")
    loss = SlicedScoreMatchingLoss(n_projections=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(600):
        xt, t = sim.draw(256, generator=g)
        opt.zero_grad()
        loss(model, x_t=xt, t=t, generator=g).backward()
        opt.step()
    xe = double_well_samples(4000, 9)
    with torch.no_grad():
        for tv in (0.1, 0.5, 1.0):
            s = model.score(xe, torch.full((4000,), tv))
            true = xe - xe**3
            rel = float(((s - true) ** 2).mean() / (true**2).mean())
            assert rel < 0.1, (tv, rel)


# ---------------------------------------------------------------------------------------------
# training every combination on Gaussian data
# ---------------------------------------------------------------------------------------------


COMBOS = [(p, None, w) for p in PREDICTIONS for w in ("simple", "likelihood", "edm")] + \
         [("x0", "edm", w) for w in ("simple", "likelihood", "edm")]


@pytest.mark.parametrize("predict,precondition,weighting", COMBOS)
def test_every_combination_trains_on_gaussian_data(predict, precondition, weighting):
    """An AffineNet (affine in x, coefficients an MLP of log σ̄) learns 2-D Gaussian data with VP in
    400 Adam steps, for every prediction space × weighting (and EDM preconditioning):

    * the loss's own excess risk, the explicit score-matching error with the loss's weighting and
      time sampling, falls below 10% of the untrained net's (measured ≤ 3.3%);
    * the ε-space error E‖σ(s_θ − s*)‖²/d averaged over a log-SNR-uniform t grid on [1e-2, 1] is below
      0.05 (measured ≤ 0.026; untrained 0.62), or 0.15 for the "edm" weighting, which puts little
      weight on low noise levels without EDM's preconditioning (measured ≤ 0.092).
    """
    sde = sdekit.VPSDE()
    mu, v = torch.tensor([1.0, -0.5]), torch.tensor([0.3, 0.8])
    gm = sdekit.GaussianMixture([1.0], mu[None], v[None])
    torch.manual_seed(0)
    model = ScoreModel(AffineNet(2, 32), sde, predict=predict, precondition=precondition, sigma_data=0.8)
    scheme = "uniform" if weighting == "simple" else "importance"
    loss = DSMLoss(weighting=weighting, time_sampling=scheme, t_eps=1e-2)
    esm0 = weighted_esm(model, loss, gm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        x0 = gm.sample(256, generator=g, dtype=torch.float32)
        opt.zero_grad()
        loss(model, x0, generator=g).backward()
        opt.step()
    rel = weighted_esm(model, loss, gm) / esm0
    assert rel < 0.1, rel
    err = eps_space_error(model, gm, sde)
    assert err < (0.15 if weighting == "edm" else 0.05), err


def weighted_esm(model, loss, gm):
    """E[w/(qZ) ‖s_θ − s*‖²] on fixed draws: the explicit score-matching error the loss targets."""
    x0 = gm.sample(4096, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    with torch.no_grad():
        terms = loss.terms(model, x0, generator=torch.Generator().manual_seed(8))
        exact = gm.exact_score(model.sde)(terms.x_t.to(F64), terms.t)
        return float((terms.factor * ((model.score(terms.x_t, terms.t).to(F64) - exact) ** 2).sum(1)).mean())


def eps_space_error(model, gm, sde):
    t_grid, _ = __import__("sdekit.time_sampling", fromlist=["x"]).sample_times(
        sde, 32, t_eps=1e-2, scheme="importance_stratified", generator=torch.Generator().manual_seed(5))
    errs = []
    with torch.no_grad():
        for tv in t_grid.tolist():
            x = gm.push(sde, tv).sample(512, generator=torch.Generator().manual_seed(6), dtype=torch.float32)
            tt = torch.full((512,), tv, dtype=F64)
            s = model.score(x, tt).to(F64)
            ref = gm.exact_score(sde)(x.to(F64), tt)
            errs.append(float((sde.kernel.sigma2(torch.tensor(tv, dtype=F64)) * ((s - ref) ** 2)).mean()))
    return float(np.mean(errs))


# ---------------------------------------------------------------------------------------------
# configuration and bad input
# ---------------------------------------------------------------------------------------------


def test_config_round_trip():
    for loss in (DSMLoss("v", "likelihood", "importance_stratified", 1e-4, 0.5),
                 SlicedScoreMatchingLoss("gaussian", False, 3, "sigma2", "stratified", 1e-3)):
        again = build_loss(loss.config)
        assert type(again) is type(loss) and again.config == loss.config
    import json
    json.dumps(DSMLoss().config)


def test_bad_input():
    with pytest.raises(ValueError, match=r"weighting must be one of \('simple', 'likelihood', 'edm'\)"):
        DSMLoss(weighting="sigma")
    with pytest.raises(ValueError, match="target must be one of"):
        DSMLoss(target="noise")
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        DSMLoss(time_sampling="sobol")
    with pytest.raises(ValueError, match="t_eps"):
        DSMLoss(t_eps=0.0)
    with pytest.raises(ValueError, match="projection must be one of"):
        SlicedScoreMatchingLoss(projection="sphere")
    with pytest.raises(ValueError, match="n_projections"):
        SlicedScoreMatchingLoss(n_projections=0)
    with pytest.raises(ValueError, match="config\\['name'\\] must be one of"):
        build_loss({"name": "mse"})
    with pytest.raises(ValueError, match="bad dsm loss config"):
        build_loss({"name": "dsm", "weight": "simple"})
    model = ScoreModel(AffineNet(2), sdekit.VPSDE())
    with pytest.raises(TypeError, match="diffusion.ScoreModel"):
        DSMLoss()(lambda x, t: x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"x has shape \(4, 3\)"):
        DSMLoss()(model, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="t_eps must lie in"):
        DSMLoss(t_eps=2.0)(model, torch.zeros(4, 2))
    nonlin = ScoreModel(AffineNet(1), sdekit.SDE(lambda x, t: -x**3, lambda x, t: 1.0), predict="score")
    with pytest.raises(TypeError, match="SlicedScoreMatchingLoss"):
        DSMLoss()(nonlin, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="SimulatedMarginals"):
        SlicedScoreMatchingLoss()(nonlin, torch.zeros(4, 1))
