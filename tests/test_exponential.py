"""Exponential integrators (DPM-Solver, DPM-Solver++) against closed-form ground truth.

Ground truth is written here from closed forms, never taken from another sdekit path (except
the converged reference solve of the Gaussian-mixture test, as stated there):

* the kernels m(t), sigma(t)^2 of VP, VE and a custom linear SDE with a sin term (solved by
  sdekit with its *numeric* kernel; here in closed form, because f = -0.4 b(t), g^2 = b(t)
  integrates to m = exp(-0.4 B), sigma^2 = (1 - exp(-0.8 B)) / 0.8 with B = int_0^t b);
* for Gaussian data N(mu, diag(s0^2)) the PF ODE flow map is exact:
  x_s - m_s mu = (x_t - m_t mu) * sqrt(v_s / v_t) per dimension, v = m^2 s0^2 + sigma^2;
* a model problem whose data prediction is a prescribed cubic in lambda, so the flow map is a
  closed-form integral (used to measure the order of the multistep update cleanly);
* k-diffusion's DPM-Solver++(2M) SDE and dpm_solver_pytorch's multistep DPM-Solver++ order 2,
  transcribed line by line in their own parameterisations (VE-scaled sigma_kd = sigma/m,
  x_kd = x/m; VP marginal_lambda / inverse_lambda in closed form).
"""

import math

import numpy as np
import pytest
import torch

import sdekit
from sdekit.oracles import GaussianMixture
from sdekit.solvers import METHODS, solve
from sdekit.solvers.grids import make_grid

F64 = torch.float64
T_EPS = 1e-3


# ----------------------------------------------------------------------------------------------
# Closed forms (test-owned)
# ----------------------------------------------------------------------------------------------


def vp_forms(t):
    B = 0.1 * t + 9.95 * t * t
    return torch.exp(-0.5 * B), -torch.expm1(-B)


VE_R = math.log(50.0 / 0.01)


def ve_forms(t):
    return torch.ones_like(t), 1e-4 * torch.expm1(2.0 * VE_R * t)


def custom_b(t):
    return 0.1 + 19.9 * t + 3.0 * torch.sin(6.0 * t)


def custom_forms(t):
    B = 0.1 * t + 9.95 * t * t + 0.5 * (1.0 - torch.cos(6.0 * t))
    return torch.exp(-0.4 * B), -torch.expm1(-0.8 * B) / 0.8


_SDE_CACHE = {}


def get_sde(name):
    """(sde, forms) with forms(t64) -> (m, sigma^2) in closed form."""
    if name not in _SDE_CACHE:
        if name == "vp":
            _SDE_CACHE[name] = (sdekit.VPSDE(), vp_forms)
        elif name == "ve":
            _SDE_CACHE[name] = (sdekit.VESDE(), ve_forms)
        else:
            sde = sdekit.LinearSDE(lambda t: -0.4 * custom_b(t), lambda t: custom_b(t).sqrt())
            _SDE_CACHE[name] = (sde, custom_forms)
    return _SDE_CACHE[name]


def coefs(forms, t):
    m, s2 = forms(torch.tensor(float(t), dtype=F64))
    return float(m), float(s2)


def fitted_order(steps, errs):
    """Least-squares slope of -log2(err) against log2(steps)."""
    return -np.polyfit(np.log2(steps), np.log2(errs), 1)[0]


# ----------------------------------------------------------------------------------------------
# Gaussian data: the exact PF-ODE flow map
# ----------------------------------------------------------------------------------------------

S0 = torch.tensor([0.5, 1.5], dtype=F64)
MU = torch.tensor([0.3, -0.7], dtype=F64)


def gaussian_score(forms):
    def score(x, t):
        m, s2 = forms(t.to(F64))
        m, v = m[:, None], (m * m)[:, None] * S0 ** 2 + s2[:, None]
        return (-(x - m * MU) / v).to(x.dtype)

    return score


def gaussian_flow(forms, x, t0, t1):
    m0, s20 = coefs(forms, t0)
    m1, s21 = coefs(forms, t1)
    v0, v1 = m0 ** 2 * S0 ** 2 + s20, m1 ** 2 * S0 ** 2 + s21
    return m1 * MU + (x - m0 * MU) * torch.sqrt(v1 / v0)


def gaussian_case(name, direction, n=16, seed=0):
    """(pf, x_start, t0, t1, exact x at t1)."""
    sde, forms = get_sde(name)
    pf = sde.probability_flow(gaussian_score(forms), t_eps=T_EPS)
    g = torch.Generator().manual_seed(seed)
    mT, s2T = coefs(forms, sde.T)
    xT = mT * MU + torch.sqrt(mT ** 2 * S0 ** 2 + s2T) * torch.randn(n, 2, generator=g, dtype=F64)
    if direction == "sample":
        t0, t1, x0 = sde.T, T_EPS, xT
    else:  # encode: start from the exact image of xT at t_eps and go back up
        t0, t1, x0 = T_EPS, sde.T, gaussian_flow(forms, xT, sde.T, T_EPS)
    return pf, x0, t0, t1, gaussian_flow(forms, x0, t0, t1)


ORDER_CASES = [
    ("dpm_solver_1", {}, 1),
    ("dpm_solver_2", {}, 2),
    ("dpm_solver_2", {"predict": "data"}, 2),
    ("dpm_solver_3", {}, 3),
    ("dpm_solver_3", {"predict": "data"}, 3),
    ("dpmpp_2m", {"lower_order_final": False}, 2),
    ("dpmpp_2m", {"predict": "noise", "lower_order_final": False}, 2),
]
ORDER_STEPS = {1: (16, 32, 64, 128), 2: (16, 32, 64, 128), 3: (32, 64, 128, 256)}


@pytest.mark.parametrize("sde_name", ["vp", "ve", "custom"])
@pytest.mark.parametrize("direction", ["sample", "encode"])
@pytest.mark.parametrize("method,opts,order", ORDER_CASES,
                         ids=[f"{m}-{o.get('predict', 'default')}" for m, o, _ in ORDER_CASES])
def test_gaussian_observed_order(sde_name, direction, method, opts, order):
    """Observed order (fitted over 16..128 steps, 32..256 for order 3, on the default log-SNR
    grid) within ±0.2."""
    pf, x0, t0, t1, exact = gaussian_case(sde_name, direction)
    steps = ORDER_STEPS[order]
    errs = [float((solve(pf, x0, t0, t1, method=method, steps=n, **opts).x - exact).abs().max())
            for n in steps]
    p = fitted_order(steps, errs)
    assert abs(p - order) <= 0.2, (p, errs)


@pytest.mark.parametrize("sde_name", ["vp", "ve", "custom"])
@pytest.mark.parametrize("direction", ["sample", "encode"])
def test_gaussian_dpmpp_3m_at_least_third_order(sde_name, direction):
    """On Gaussian data DPM-Solver++(3M) converges *faster* than third order over 16..128 steps
    (observed 3.3-4.5: the leading h^3 global error term nearly cancels for this problem), so
    here we assert >= 2.8; its clean order-3 test is on the model problem below. Asymptotically
    its first-order warm-up step caps the global order at 2 (measured in the encode direction
    at >= 512 steps), as for every multistep method started with a lower-order step."""
    pf, x0, t0, t1, exact = gaussian_case(sde_name, direction)
    steps = (16, 32, 64, 128)
    errs = [float((solve(pf, x0, t0, t1, method="dpmpp_3m", steps=n, lower_order_final=False).x - exact)
                  .abs().max()) for n in steps]
    assert fitted_order(steps, errs) >= 2.8, errs
    e2m = float((solve(pf, x0, t0, t1, method="dpmpp_2m", steps=64).x - exact).abs().max())
    assert errs[2] < 0.1 * e2m


# ----------------------------------------------------------------------------------------------
# Model problem: prescribed data prediction x0_hat = c * ((lambda - lambda_T) / L)^3
# ----------------------------------------------------------------------------------------------


def model_problem(name):
    r"""PF ODE whose data prediction is :math:`c\,g(\lambda)`, :math:`g = ((\lambda-\lambda_T)/L)^3`.

    The data-prediction form of the flow map, :math:`x_s/\sigma_s = x_t/\sigma_t + \int e^{\lambda}
    \hat x_0\,d\lambda`, is then exact in closed form: :math:`\int e^u (u-a)^3 du
    = e^u((u-a)^3 - 3(u-a)^2 + 6(u-a) - 6)`. g and g' vanish at the start, so the lower-order
    warm-up steps are accurate to O(h^4) and the observed order is that of the multistep update.
    """
    sde, forms = get_sde(name)

    def lam_dpm(t):
        m, s2 = coefs(forms, t)
        return 0.5 * math.log(m * m / s2)

    a, b = lam_dpm(sde.T), lam_dpm(T_EPS)
    L = b - a
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)

    def score(x, t):
        m, s2 = forms(t.to(F64))
        lam = 0.5 * torch.log(m * m / s2)
        x0 = ((lam - a) / L)[:, None] ** 3 * c
        return (m[:, None] * x0 - x) / s2[:, None]

    x0 = torch.tensor([[0.3, -0.2, 1.0], [1.0, 0.5, -0.5]], dtype=F64)
    P = lambda u: math.exp(u) * ((u - a) ** 3 - 3 * (u - a) ** 2 + 6 * (u - a) - 6) / L ** 3
    sT, se = math.sqrt(coefs(forms, sde.T)[1]), math.sqrt(coefs(forms, T_EPS)[1])
    exact = se * (x0 / sT + (P(b) - P(a)) * c)
    return sde.probability_flow(score, t_eps=T_EPS), x0, exact


@pytest.mark.parametrize("sde_name", ["vp", "custom"])
def test_multistep_order_on_model_problem(sde_name):
    pf, x0, exact = model_problem(sde_name)
    steps = (8, 16, 32, 64)

    def errs(method, **opts):
        return [float((solve(pf, x0, method=method, steps=n, lower_order_final=False, **opts).x - exact)
                      .abs().max() / exact.abs().max()) for n in steps]

    p3 = fitted_order(steps, errs("dpmpp_3m"))
    p2 = fitted_order(steps, errs("dpmpp_2m"))
    p_pub = fitted_order(steps, errs("dpmpp_3m", published_form=True))
    assert abs(p3 - 3) <= 0.2, p3
    assert abs(p2 - 2) <= 0.2, p2
    # dpm_solver_pytorch / k-diffusion weight phi_3 * D2 with D2 ~ h^2 M''/2: second order only.
    assert abs(p_pub - 2) <= 0.3, p_pub


# ----------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", ["vp", "custom"])
@pytest.mark.parametrize("direction", ["sample", "encode"])
def test_dpm_solver_1_equals_ddim(sde_name, direction):
    pf, x0, t0, t1, _ = gaussian_case(sde_name, direction)
    for predict in ("noise", "data"):
        a = solve(pf, x0, t0, t1, method="dpm_solver_1", steps=13, predict=predict).x
        b = solve(pf, x0, t0, t1, method="ddim", steps=13, grid="log_snr", eta=0.0).x
        assert float((a - b).abs().max()) <= 1e-12


@pytest.mark.parametrize("method", ["dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m"])
def test_noise_and_data_prediction_agree_in_the_limit(method):
    """Both parameterisations solve the same ODE: the two results converge to each other."""
    pf, x0, t0, t1, exact = gaussian_case("vp", "sample")
    a = solve(pf, x0, method=method, steps=64, predict="noise").x
    b = solve(pf, x0, method=method, steps=64, predict="data").x
    assert float((a - b).abs().max()) < 1e-2 * float((exact - x0).abs().max())


def test_vp_and_numeric_kernel_with_vp_schedule_agree():
    """A LinearSDE with VP's f, g (numeric kernel) gives dpmpp_2m's VPSDE output to 1e-8."""
    vp = sdekit.VPSDE()
    lin = sdekit.LinearSDE(f=lambda t: -0.5 * (0.1 + 19.9 * t), g=lambda t: (0.1 + 19.9 * t).sqrt())
    gm = GaussianMixture([1.0, 2.0, 1.0], [[1.0, 1.0], [-1.0, 0.5], [0.0, -1.0]], [0.05, 0.1, 0.02])
    score = gm.exact_score(vp)
    x = gm.push(vp, 1.0).sample(64, torch.Generator().manual_seed(3))
    for method in ("dpmpp_2m", "dpm_solver_3"):
        a = solve(vp.probability_flow(score), x, method=method, steps=20).x
        b = solve(lin.probability_flow(score), x, method=method, steps=20).x
        assert float((a - b).abs().max()) <= 1e-8, method


def test_default_grid_is_log_snr():
    pf, x0, t0, t1, _ = gaussian_case("custom", "sample")
    for method in ("dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"):
        assert METHODS[method].default_grid == "log_snr"
    a = solve(pf, x0, method="dpmpp_2m", steps=12).x
    b = solve(pf, x0, method="dpmpp_2m", steps=12, grid="log_snr").x
    c = solve(pf, x0, method="dpmpp_2m", steps=12, grid="uniform").x
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_float32_state_and_reverse_sde_problem():
    sde, forms = get_sde("vp")
    score = gaussian_score(forms)
    pf, x0, _, _, exact = gaussian_case("vp", "sample")
    x32 = solve(pf, x0.float(), method="dpmpp_3m", steps=30).x
    x64 = solve(pf, x0, method="dpmpp_3m", steps=30).x
    assert x32.dtype == torch.float32 and float((x32.double() - x64).abs().max()) < 1e-5
    rs = sde.reverse(score, t_eps=T_EPS)
    assert torch.equal(solve(rs, x0, method="dpmpp_2m", steps=10).x, solve(pf, x0, method="dpmpp_2m", steps=10).x)


# ----------------------------------------------------------------------------------------------
# NFE, registry, options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,evals", [("dpm_solver_1", 1), ("dpm_solver_2", 2), ("dpm_solver_3", 3),
                                          ("dpmpp_2m", 1), ("dpmpp_3m", 1), ("dpmpp_2m_sde", 1)])
def test_nfe_and_registry(method, evals):
    info = METHODS[method]
    assert (info.evals_per_step, info.problem, info.noise, info.backend, info.adaptive) == \
        (evals, "score", ("isotropic",), "native", False)
    assert info.stochastic == (method == "dpmpp_2m_sde")
    pf, x0, _, _, _ = gaussian_case("vp", "sample")
    for steps in (1, 2, 3, 7, 20):
        st = solve(pf, x0, method=method, steps=steps, generator=torch.Generator().manual_seed(0)).stats
        assert (st.nfe, st.steps, st.accepted) == (evals * steps, steps, steps)


def test_bad_options():
    pf, x0, _, _, _ = gaussian_case("vp", "sample")
    with pytest.raises(ValueError, match="predict"):
        solve(pf, x0, method="dpmpp_2m", steps=5, predict="eps")
    with pytest.raises(ValueError, match="r1"):
        solve(pf, x0, method="dpm_solver_2", steps=5, r1=1.5)
    with pytest.raises(ValueError, match="r2"):
        solve(pf, x0, method="dpm_solver_3", steps=5, r1=0.5, r2=0.4)
    with pytest.raises(TypeError, match="lower_order_final"):
        solve(pf, x0, method="dpmpp_3m", steps=5, lower_order_final="yes")
    with pytest.raises(ValueError, match="eta"):
        solve(pf, x0, method="dpmpp_2m_sde", steps=5, eta=-1.0)
    with pytest.raises(ValueError, match="high to low"):
        solve(pf, x0, T_EPS, 1.0, method="dpmpp_2m_sde", steps=5)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M) SDE
# ----------------------------------------------------------------------------------------------


def kdiffusion_2m_sde(score, forms, x, ts, gen, eta=1.0):
    """k-diffusion's sample_dpmpp_2m_sde ('midpoint') transcribed in VE scaling: sigma_kd = sigma/m,
    x_kd = x/m, denoised = Tweedie's x0; the result is mapped back with x = m x_kd."""
    def denoised(xk, t):
        m, s2 = coefs(forms, t)
        xx = m * xk
        return (xx + s2 * score(xx, torch.full((xx.shape[0],), t, dtype=F64))) / m

    sig = [math.sqrt(coefs(forms, t)[1]) / coefs(forms, t)[0] for t in ts]
    xk = x / coefs(forms, ts[0])[0]
    old, h_last = None, None
    for i in range(len(ts) - 1):
        d = denoised(xk, ts[i])
        t, s = -math.log(sig[i]), -math.log(sig[i + 1])
        h = s - t
        eta_h = eta * h
        xk = sig[i + 1] / sig[i] * math.exp(-eta_h) * xk + (-math.expm1(-h - eta_h)) * d
        if old is not None:
            r = h_last / h
            xk = xk + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (d - old)
        if eta:
            z = torch.randn(xk.shape, generator=gen, dtype=F64)
            xk = xk + z * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
        old, h_last = d, h
    return coefs(forms, ts[-1])[0] * xk


@pytest.mark.parametrize("sde_name", ["vp", "custom"])
def test_2m_sde_matches_kdiffusion_transcription(sde_name):
    sde, forms = get_sde(sde_name)
    score = gaussian_score(forms)
    pf, x0, t0, t1, _ = gaussian_case(sde_name, "sample", n=32)
    ts = make_grid("log_snr", t0, t1, 15, sde=sde).tolist()
    ours = solve(sde.reverse(score, t_eps=T_EPS), x0, method="dpmpp_2m_sde", steps=15,
                 generator=torch.Generator().manual_seed(7)).x
    ref = kdiffusion_2m_sde(score, forms, x0, ts, torch.Generator().manual_seed(7))
    assert float((ours - ref).abs().max()) <= 1e-10
    # eta = 0 is the deterministic DPM-Solver++(2M) without lower-order final steps
    a = solve(pf, x0, method="dpmpp_2m_sde", steps=12, eta=0.0).x
    b = solve(pf, x0, method="dpmpp_2m", steps=12, lower_order_final=False).x
    assert float((a - b).abs().max()) <= 1e-12


def test_2m_sde_reproducible():
    sde, forms = get_sde("vp")
    rs = sde.reverse(gaussian_score(forms), t_eps=T_EPS)
    _, x0, _, _, _ = gaussian_case("vp", "sample")
    run = lambda seed: solve(rs, x0, method="dpmpp_2m_sde", steps=10, generator=torch.Generator().manual_seed(seed)).x
    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))


def test_2m_sde_gaussian_variance():
    """Exact score of N(0, s0^2) under VP; start from exact N(0, v_T) samples. At 100 steps the
    scheme's own variance bias is 0.3% (computed exactly by propagating its linear recursion:
    +7.6% at 10 steps, +6.2% at 20, +1.8% at 40, then order 2). Tolerance: 4 standard
    deviations of the sample variance, sqrt(2/N) relative, plus 0.5% for that bias."""
    s0, n, d, steps = 0.5, 4000, 8, 100
    sde = sdekit.VPSDE()

    def score(x, t):
        m, s2 = vp_forms(t.to(F64))
        return -x / (m * m * s0 ** 2 + s2)[:, None]

    g = torch.Generator().manual_seed(11)
    mT, s2T = coefs(vp_forms, 1.0)
    xT = math.sqrt(mT ** 2 * s0 ** 2 + s2T) * torch.randn(n, d, generator=g, dtype=F64)
    x = solve(sde.reverse(score, t_eps=T_EPS), xT, method="dpmpp_2m_sde", steps=steps, generator=g).x
    me, s2e = coefs(vp_forms, T_EPS)
    v = me ** 2 * s0 ** 2 + s2e
    rel = float((x * x).mean()) / v - 1.0
    assert abs(rel) <= 4.0 * math.sqrt(2.0 / (n * d)) + 0.005, rel
    assert abs(float(x.mean())) <= 4.0 * math.sqrt(v / (n * d))


# ----------------------------------------------------------------------------------------------
# Gaussian mixture (exact score): accuracy at 20 NFE and the published algorithm
# ----------------------------------------------------------------------------------------------


def official_multistep(score, x, steps, order=2, algorithm="dpmsolver++", lower_order_final=True, t_T=1.0,
                        t_0=T_EPS, b0=0.1, b1=20.0):
    """dpm_solver_pytorch's multistep solver (order 2 or 3, 'dpmsolver' solver type, logSNR grid)
    for the continuous VP schedule, transcribed with its own closed-form marginal_lambda and
    inverse_lambda. ``algorithm="dpmsolver++"``: data prediction; ``"dpmsolver"``: noise
    prediction. (Its lower_order_final applies below 10 steps, sdekit's below 15.)"""
    data = algorithm == "dpmsolver++"
    log_alpha = lambda t: -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0
    sigma = lambda t: math.sqrt(1.0 - math.exp(2.0 * log_alpha(t)))
    lam = lambda t: log_alpha(t) - 0.5 * math.log(1.0 - math.exp(2.0 * log_alpha(t)))

    def inverse_lambda(l):
        tmp = 2.0 * (b1 - b0) * math.log1p(math.exp(-2.0 * l))
        return tmp / (math.sqrt(b0 ** 2 + tmp) + b0) / (b1 - b0)

    lT, l0 = lam(t_T), lam(t_0)
    ts = [t_T] + [inverse_lambda(lT + (l0 - lT) * i / steps) for i in range(1, steps)] + [t_0]

    def model(x, t):
        s = score(x, torch.full((x.shape[0],), t, dtype=F64))
        return (x + sigma(t) ** 2 * s) / math.exp(log_alpha(t)) if data else -sigma(t) * s

    def update(x, ms, tp, t, k):
        h = lam(t) - lam(tp[-1])
        a_t, lin = math.exp(log_alpha(t)), (sigma(t) / sigma(tp[-1]) if data else
                                           math.exp(log_alpha(t) - log_alpha(tp[-1])))
        if k == 1:
            return lin * x - (a_t * math.expm1(-h) if data else sigma(t) * math.expm1(h)) * ms[-1]
        r0 = (lam(tp[-1]) - lam(tp[-2])) / h
        D1_0 = (ms[-1] - ms[-2]) / r0
        if k == 2:
            if data:
                phi = math.expm1(-h)
                return lin * x - a_t * phi * ms[-1] - 0.5 * a_t * phi * D1_0
            phi = math.expm1(h)
            return lin * x - sigma(t) * phi * ms[-1] - 0.5 * sigma(t) * phi * D1_0
        r1 = (lam(tp[-2]) - lam(tp[-3])) / h
        D1_1 = (ms[-2] - ms[-3]) / r1
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        if data:
            phi_1 = math.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            return lin * x - a_t * phi_1 * ms[-1] + a_t * phi_2 * D1 - a_t * phi_3 * D2
        phi_1 = math.expm1(h)
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        return lin * x - sigma(t) * (phi_1 * ms[-1] + phi_2 * D1 + phi_3 * D2)

    ms, tp = [model(x, ts[0])], [ts[0]]
    for step in range(1, order):  # warm-up with lower orders
        x = update(x, ms, tp, ts[step], step)
        tp.append(ts[step])
        ms.append(model(x, ts[step]))
    for step in range(order, steps + 1):
        k = min(order, steps + 1 - step) if (lower_order_final and steps < 10) else order
        x = update(x, ms, tp, ts[step], k)
        if step < steps:
            tp, ms = (tp + [ts[step]])[-order:], (ms + [model(x, ts[step])])[-order:]
    return x


@pytest.fixture(scope="module")
def mixture():
    """2-D, 4 modes at (±1, ±1), component std 0.1, VP; 400 exact samples at T; reference: rk4
    with 400 steps on a log-SNR grid (differs from 800 steps by 3e-7 at most)."""
    sde = sdekit.VPSDE()
    gm = GaussianMixture([1.0] * 4, [[1, 1], [1, -1], [-1, 1], [-1, -1]], [0.01] * 4)
    score = gm.exact_score(sde)
    pf = sde.probability_flow(score, t_eps=T_EPS)
    xT = gm.push(sde, 1.0).sample(400, torch.Generator().manual_seed(0))
    ref = solve(pf, xT, method="rk4", steps=400, grid="log_snr").x
    return score, pf, xT, ref


def median_err(x, ref):
    return float((x - ref).norm(dim=1).median())


def test_mixture_dpmpp_2m_20_nfe(mixture):
    """Median per-sample error at 20 NFE. Measured: dpmpp_2m (data prediction, DPM-Solver++(2M))
    8.2e-3; multistep DPM-Solver-2 with noise prediction (``predict="noise"``, the original
    DPM-Solver's multistep) 2.4e-3. The brief quoted ~2.1e-3 for the published implementation on
    "such a problem": that matches the noise-prediction variant; DPM-Solver++(2M) itself,
    transcribed from dpm_solver_pytorch below, gives the same 8.2e-3 on this problem as ours."""
    score, pf, xT, ref = mixture
    sol = solve(pf, xT, method="dpmpp_2m", steps=20)
    assert sol.stats.nfe == 20
    assert median_err(sol.x, ref) <= 1.0e-2
    assert median_err(solve(pf, xT, method="dpmpp_2m", steps=20, predict="noise").x, ref) <= 3.0e-3
    for steps in (8, 20):
        for algorithm, predict in (("dpmsolver++", "data"), ("dpmsolver", "noise")):
            official = official_multistep(score, xT, steps, 2, algorithm)
            ours = solve(pf, xT, method="dpmpp_2m", steps=steps, predict=predict).x
            assert float((ours - official).abs().max()) <= 1e-12, (steps, algorithm)


def test_mixture_dpmpp_3m_published_form(mixture):
    """``published_form=True`` reproduces dpm_solver_pytorch's multistep order 3 (both
    parameterisations) to 1e-12. Measured median errors at 20 NFE: 5.3e-3 (published form) vs
    9.3e-3 (the default, third-order form) on this mixture — the published form is formally
    second order, yet more accurate here; on the Gaussian tests the default is 3-10x better."""
    score, pf, xT, ref = mixture
    for steps in (8, 20):
        for algorithm, predict in (("dpmsolver++", "data"), ("dpmsolver", "noise")):
            official = official_multistep(score, xT, steps, 3, algorithm)
            ours = solve(pf, xT, method="dpmpp_3m", steps=steps, predict=predict, published_form=True).x
            assert float((ours - official).abs().max()) <= 1e-12, (steps, algorithm)
    e_default = median_err(solve(pf, xT, method="dpmpp_3m", steps=20).x, ref)
    e_published = median_err(solve(pf, xT, method="dpmpp_3m", steps=20, published_form=True).x, ref)
    assert e_default <= 1.2e-2 and e_published <= 7e-3


def test_mixture_lower_order_final(mixture):
    """dpmpp_2m: the default (first-order last step below 15 steps) is at least as accurate at
    10..14 steps, and identical from 15 steps on."""
    _, pf, xT, ref = mixture
    for steps in (10, 12, 14):
        e_def = median_err(solve(pf, xT, method="dpmpp_2m", steps=steps).x, ref)
        e_off = median_err(solve(pf, xT, method="dpmpp_2m", steps=steps, lower_order_final=False).x, ref)
        assert e_def <= e_off, (steps, e_def, e_off)
    for method in ("dpmpp_2m", "dpmpp_3m"):
        a = solve(pf, xT, method=method, steps=15).x
        assert torch.equal(a, solve(pf, xT, method=method, steps=15, lower_order_final=False).x)
