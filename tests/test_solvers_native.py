"""Native fixed-step solvers: convergence orders against exact solutions, samplers against the
exact Gaussian-mixture oracle, NFE accounting, reproducibility, grids and bad input.

Ground truth used here:
* Gaussian data N(0, s0^2 I) under VP: the PF ODE flow map is exact,
  x_s = x_t * sqrt(v_s / v_t) with v = m^2 s0^2 + sigma^2 (m, sigma from the VP closed form
  written below, not from sdekit).
* Ornstein-Uhlenbeck with a shared Brownian path: the reference is the exact-in-distribution
  exponential update on a 2^14 fine grid (its strong error ~1e-4, far below the tested errors).
* Moments of OU under Euler-Maruyama / stochastic Heun vs the exact OU moments (weak order).
* Mixture sampling: energy distance to exact samples vs the statistic's measured noise floor.
"""

import math

import pytest
import torch

import sdekit
from sdekit.oracles import GaussianMixture
from sdekit.solvers import BrownianPath, SolverError, make_grid, solve
from sdekit.studies import energy_distance, noise_floor

F = torch.float64
S0 = 0.5
B0, B1 = 0.1, 20.0


def vp_ms(t):
    """VP closed form, independent of sdekit: m = exp(-B/2), sigma^2 = 1 - exp(-B)."""
    Bt = B0 * t + 0.5 * (B1 - B0) * t * t
    return math.exp(-Bt / 2), math.sqrt(-math.expm1(-Bt))


def gauss_var(t):
    m, s = vp_ms(t)
    return m * m * S0 * S0 + s * s


def gauss_score(x, t):
    Bt = B0 * t.double() + 0.5 * (B1 - B0) * t.double() ** 2
    v = torch.exp(-Bt) * S0 ** 2 - torch.expm1(-Bt)
    return -x / v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


@pytest.fixture(scope="module")
def vp():
    return sdekit.VPSDE(B0, B1)


@pytest.fixture(scope="module")
def xT():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 2, dtype=F, generator=g) * math.sqrt(gauss_var(1.0))


def observed_orders(errs):
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("rk4", 4), ("ddim", 1)])
def test_ode_convergence_order(vp, xT, method, order):
    t_eps = 0.05
    exact = xT * math.sqrt(gauss_var(t_eps) / gauss_var(1.0))
    pf = vp.probability_flow(gauss_score, t_eps=t_eps)
    errs = [(solve(pf, xT, method=method, steps=n).x - exact).abs().max().item() for n in (32, 64, 128)]
    orders = observed_orders(errs)
    assert all(abs(o - order) <= 0.2 for o in orders), (errs, orders)


def _ou_reference(bp, x0, theta, sig):
    """Exact OU transition on the fine grid of the path (strong error O(h_fine))."""
    h = bp.h
    dW = bp.W[1:] - bp.W[:-1]
    x = x0.clone()
    for k in range(bp.n):
        x = math.exp(-theta * h) * x + sig * dW[k]
    return x


@pytest.mark.parametrize("method", ["euler_maruyama", "stochastic_heun"])
def test_ou_strong_order_shared_path(method):
    theta, sig = 2.0, 1.0
    ou = sdekit.OrnsteinUhlenbeck(theta, sig, T=1.0)
    x0 = torch.ones(1000, 1, dtype=F)
    bp = BrownianPath(x0.shape, 0.0, 1.0, 2 ** 14, generator=torch.Generator().manual_seed(3))
    ref = _ou_reference(bp, x0, theta, sig)
    errs = [(solve(ou, x0, method=method, steps=n, brownian=bp).x - ref).pow(2).mean().sqrt().item()
            for n in (16, 32, 64, 128)]
    orders = observed_orders(errs)
    # additive noise: both have strong order 1
    assert all(abs(o - 1.0) <= 0.2 for o in orders), (errs, orders)


@pytest.mark.parametrize("method,order", [("euler_maruyama", 1), ("stochastic_heun", 2)])
def test_ou_weak_order_by_variance(method, order):
    """Bias of Var[x_T] from x0 = 0 vs the exact sig^2/(2 theta) (1 - e^{-2 theta T}).

    Hand-derived discrete variances (linear recursion x' = a x + c dW): EM biases are
    .0375/.0175/.0085 at N = 8/16/32 (orders 1.10, 1.04); stochastic Heun's .089/.020/.0045 at
    N = 2/4/8 (orders 2.15, 2.15). The Monte Carlo standard error of the variance with n samples
    is 0.245*sqrt(2/n) (2.5e-4 for EM's n = 2e6, 1.7e-4 for Heun's n = 4e6): >= 25x below the
    smallest bias, so with the fixed seed a false alarm is practically impossible.
    """
    theta, sig, T = 2.0, 1.0, 1.0
    ou = sdekit.OrnsteinUhlenbeck(theta, sig, T=T)
    exact = sig ** 2 / (2 * theta) * (1 - math.exp(-2 * theta * T))
    n, steps = (2_000_000, (8, 16, 32)) if order == 1 else (4_000_000, (2, 4, 8))
    x0 = torch.zeros(n, 1, dtype=F)
    bias = [abs(solve(ou, x0, method=method, steps=n, generator=torch.Generator().manual_seed(n)).x.var().item()
                - exact) for n in steps]
    orders = observed_orders(bias)
    assert all(abs(o - order) <= 0.35 for o in orders), (bias, orders)


MIXTURE = dict(weights=[0.3, 0.7], means=[[-1.0, 0.5], [1.0, -0.5]], covs=[[0.05, 0.05], [0.1, 0.02]])


@pytest.fixture(scope="module")
def mixture_setup(vp):
    gm = GaussianMixture(**{k: torch.tensor(v, dtype=F) for k, v in MIXTURE.items()})
    t_eps = 1e-3
    target = gm.push(vp, t_eps)
    n = 1500
    floor = noise_floor(lambda k, g: target.sample(k, g), n, repeats=8, seed=11)
    xT = gm.push(vp, vp.T).sample(n, torch.Generator().manual_seed(5))
    return gm, target, floor, xT, t_eps


@pytest.mark.parametrize("method,steps,kw", [
    ("euler_maruyama", 500, {}), ("stochastic_heun", 250, {}), ("reverse_diffusion", 500, {}),
    ("ancestral", 500, {}), ("pc", 250, {}), ("ddim", 200, {"eta": 1.0}),
])
def test_sde_samplers_reproduce_mixture(vp, mixture_setup, method, steps, kw):
    """Energy distance to exact samples must be within 3x the max of 8 noise-floor draws.

    The factor 3 over the maximum of the floor keeps the false-alarm rate negligible; a biased
    sampler (see test_wrong_score_is_detected) exceeds it by far.
    """
    gm, target, floor, xT, t_eps = mixture_setup
    rev = vp.reverse(gm.exact_score(vp), t_eps=t_eps)
    out = solve(rev, xT, method=method, steps=steps, generator=torch.Generator().manual_seed(7), **kw).x
    stat = energy_distance(out, target.sample(out.shape[0], torch.Generator().manual_seed(8)))
    assert stat <= 3 * float(floor.max()), (stat, floor)


@pytest.mark.parametrize("method,steps,kw", [("euler", 400, {}), ("heun", 100, {}), ("rk4", 50, {}),
                                             ("ddim", 200, {}), ("heun", 100, {"churn": 10.0})])
def test_ode_samplers_reproduce_mixture(vp, mixture_setup, method, steps, kw):
    gm, target, floor, xT, t_eps = mixture_setup
    pf = vp.probability_flow(gm.exact_score(vp), t_eps=t_eps)
    out = solve(pf, xT, method=method, steps=steps, generator=torch.Generator().manual_seed(7), **kw).x
    stat = energy_distance(out, target.sample(out.shape[0], torch.Generator().manual_seed(8)))
    assert stat <= 3 * float(floor.max()), (stat, floor)


def test_wrong_score_is_detected(vp, mixture_setup):
    """The same statistic fails for a 30% too small score (the test can fail)."""
    gm, target, floor, xT, t_eps = mixture_setup
    sc = gm.exact_score(vp)
    rev = vp.reverse(lambda x, t: 0.7 * sc(x, t), t_eps=t_eps)
    out = solve(rev, xT, method="euler_maruyama", steps=500, generator=torch.Generator().manual_seed(7)).x
    stat = energy_distance(out, target.sample(out.shape[0], torch.Generator().manual_seed(8)))
    assert stat > 3 * float(floor.max())


def test_langevin_methods(vp, mixture_setup):
    gm, _, _, _, _ = mixture_setup
    t = 0.3
    target = gm.push(vp, t)
    n = 1500
    floor = noise_floor(lambda k, g: target.sample(k, g), n, repeats=8, seed=2)
    rev = vp.reverse(gm.exact_score(vp))
    x = torch.randn(n, 2, dtype=F, generator=torch.Generator().manual_seed(1))
    out = solve(rev, x, t, t, method="langevin", steps=400, step_size=2e-3,
                generator=torch.Generator().manual_seed(2)).x
    ref = target.sample(n, torch.Generator().manual_seed(3))
    assert energy_distance(out, ref) <= 3 * float(floor.max())
    # annealed Langevin over a ladder from T down to t: scores only at the ladder's levels
    seen = set()
    score = gm.exact_score(vp)

    def recording_score(x, tt):
        seen.add(round(float(tt[0]), 12))
        return score(x, tt)

    rev2 = vp.reverse(recording_score)
    ladder = torch.linspace(1.0, t, 11, dtype=F)
    out = solve(rev2, x, method="annealed_langevin", grid=ladder, step_size=1e-2, n_inner=60,
                generator=torch.Generator().manual_seed(4)).x
    assert seen == {round(v, 12) for v in ladder.tolist()}
    assert energy_distance(out, ref) <= 3 * float(floor.max())


def test_nfe_accounting(vp, xT):
    pf = vp.probability_flow(gauss_score)
    rev = vp.reverse(gauss_score)
    calls = {"n": 0}

    def counted(x, t):
        calls["n"] += 1
        return gauss_score(x, t)

    for method, problem, per_step, kw in [("euler", pf, 1, {}), ("heun", pf, 2, {}), ("rk4", pf, 4, {}),
                                          ("ddim", pf, 1, {}), ("euler_maruyama", rev, 1, {}),
                                          ("stochastic_heun", rev, 2, {}), ("pc", rev, 3, {"n_corrector": 2}),
                                          ("ancestral", rev, 1, {})]:
        prob = type(problem)(vp, counted) if method in ("euler", "heun", "rk4", "ddim") else vp.reverse(counted)
        calls["n"] = 0
        sol = solve(prob, xT, method=method, steps=7, generator=torch.Generator().manual_seed(0), **kw)
        assert sol.stats.nfe == calls["n"] == 7 * per_step, method
        assert sol.stats.steps == sol.stats.accepted == 7 and sol.stats.rejected == 0
        assert sol.stats.backend == "native" and sol.stats.method == method
    calls["n"] = 0
    sol = solve(vp.probability_flow(counted), xT, method="euler", steps=5, denoise=True)
    assert sol.stats.nfe == calls["n"] == 6
    # Tweedie's final step on Gaussian data: E[x0 | x_t] = m s0^2 / v * x_t
    m, _ = vp_ms(1e-3)
    x_end = solve(vp.probability_flow(gauss_score), xT, method="euler", steps=5).x
    assert torch.allclose(sol.x, m * S0 ** 2 / gauss_var(1e-3) * x_end, rtol=1e-10, atol=1e-12)


def test_forward_backward_roundtrip(vp, xT):
    pf = vp.probability_flow(gauss_score, t_eps=1e-2)
    x_eps = solve(pf, xT, method="rk4", steps=200).x
    back = solve(pf, x_eps, 1e-2, 1.0, method="rk4", steps=200).x
    assert (back - xT).abs().max() < 1e-7


def test_reproducible_and_batch_independent(vp, xT):
    rev = vp.reverse(gauss_score)
    a = solve(rev, xT, method="euler_maruyama", steps=20, generator=torch.Generator().manual_seed(4)).x
    b = solve(rev, xT, method="euler_maruyama", steps=20, generator=torch.Generator().manual_seed(4)).x
    assert torch.equal(a, b)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(xT.shape[0])]
    full = solve(rev, xT, method="ancestral", steps=20, generator=gens).x
    one = solve(rev, xT[3:4], method="ancestral", steps=20, generator=[torch.Generator().manual_seed(103)]).x
    assert torch.equal(full[3:4], one)


def test_rank4_data_and_save_at(vp):
    x = torch.randn(3, 2, 4, 4, dtype=F, generator=torch.Generator().manual_seed(0))
    rev = vp.reverse(gauss_score)
    grid = make_grid("uniform", 1.0, 1e-3, 10)
    sol = solve(rev, x, method="euler_maruyama", steps=10, save_at=[float(grid[5]), 1e-3],
                generator=torch.Generator().manual_seed(0))
    assert sol.x.shape == x.shape and sol.xs.shape == (2, *x.shape)
    assert torch.equal(sol.xs[1], sol.x)


def test_grids():
    vp = sdekit.VPSDE()
    for t0, t1 in [(1.0, 1e-3), (1e-3, 1.0)]:
        g = make_grid("uniform", t0, t1, 7)
        assert g[0] == t0 and g[-1] == t1
        assert torch.allclose(g, t0 + torch.arange(8, dtype=F) * ((t1 - t0) / 7), rtol=0, atol=1e-15)
        lam = vp.kernel.log_snr(make_grid("log_snr", t0, t1, 9, sde=vp))
        d = torch.diff(lam)
        assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-8)
        e = make_grid("edm", t0, t1, 9, sde=vp)
        sbar = torch.exp(-0.5 * vp.kernel.log_snr(e)) ** (1 / 7)
        d = torch.diff(sbar)
        assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-8)
        q = make_grid("quadratic", t0, t1, 4)
        assert torch.allclose(q, t1 + (t0 - t1) * (1 - torch.arange(5, dtype=F) / 4) ** 2)


def test_nan_mid_solve_reports_step_and_time(vp, xT):
    def bad_score(x, t):
        s = gauss_score(x, t)
        return s * float("nan") if float(t[0]) < 0.5 else s

    with pytest.raises(SolverError) as e:
        solve(vp.probability_flow(bad_score), xT, method="euler", steps=10)
    err = e.value
    assert err.step is not None and err.t is not None and err.stats.nfe > 0
    assert "non-finite" in str(err) and err.t <= 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="euler", steps=0), "steps"),
    (dict(method="euler", steps=2.5), "steps"),
    (dict(method="euler", steps=5, t_start=0.5, t_end=0.5), "differ"),
    (dict(method="euler", steps=5, t_start=1.5), "t_start"),
    (dict(method="euler", steps=5, t_end=-0.1), "t_end"),
    (dict(method="nope", steps=5), "valid methods"),
    (dict(method="euler"), "steps"),
    (dict(method="euler", steps=5, rtol=1e-3), "rtol"),
    (dict(method="euler_maruyama", steps=5), "SDE"),
    (dict(method="euler", steps=5, dt=0.1), "not both"),
    (dict(method="euler", steps=5, save_at=[0.123456]), "grid point"),
    (dict(method="euler", steps=5, generator=[torch.Generator()]), "generator"),
])
def test_bad_input(vp, xT, kwargs, match):
    pf = vp.probability_flow(gauss_score)
    with pytest.raises((ValueError, TypeError), match=match):
        solve(pf, xT, **kwargs)


def test_method_invalid_for_noise_kind():
    sde = sdekit.SDE(lambda x, t: -x, lambda x, t: 1 + 0.1 * x ** 2, noise="diagonal")
    x = torch.zeros(4, 2, dtype=F)
    with pytest.raises(ValueError, match="noise"):
        solve(sde, x, 0.0, 1.0, method="stochastic_heun", steps=4)
    with pytest.raises(ValueError, match="linear SDE"):
        solve(sde, x, 0.0, 1.0, method="ancestral", steps=4)
    out = solve(sde, x, 0.0, 1.0, method="euler_maruyama", steps=4, generator=torch.Generator().manual_seed(0))
    assert out.stats.nfe == 4 and torch.isfinite(out.x).all()
    rev = sdekit.VPSDE().reverse(gauss_score)
    with pytest.raises(ValueError, match="high to low"):
        solve(rev, x, 0.1, 0.9, method="euler_maruyama", steps=4)


def test_drift_returning_a_view_of_the_state():
    """dX = X^T dt on a 2x2 state (batch 2, d = 2): the drift returns a *view* of the state with
    permuted elements, so an in-place update without a copy would read half-updated values.
    Exact Euler map: X <- X + h X^T."""
    sde = sdekit.SDE(lambda x, t: x.T, lambda x, t: torch.zeros(x.shape[0], dtype=x.dtype), noise="isotropic")
    x0 = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=F)
    out = solve(sde, x0, 0.0, 1.0, method="euler_maruyama", steps=4, generator=torch.Generator().manual_seed(0)).x
    ref = x0.clone()
    for _ in range(4):
        ref = ref + 0.25 * ref.T
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(x0, torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=F))  # the caller's tensor is untouched
