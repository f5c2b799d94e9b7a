"""Bad input raises ValueError / TypeError at the public boundary, naming the argument (and,
where there is one, the offending value) -- docs/concepts.md, "Errors and validation"."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdekit

F64 = torch.float64
HYP = settings(max_examples=20, deadline=None, derandomize=True)

VP = sdekit.VPSDE()
CUSTOM = sdekit.LinearSDE(lambda t: -0.5 * (1 + torch.sin(3 * t)), lambda t: torch.sqrt(1 + torch.sin(3 * t)))
X = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))


def score(x, t):
    return -x


def good_f(t):
    return -0.5 + 0 * t


def good_g(t):
    return 1.0 + 0 * t


# ---------------------------------------------------------------------------------------------
# t outside [0, T]
# ---------------------------------------------------------------------------------------------

OUT_OF_RANGE = [1.5, -0.1, torch.tensor(1.0001, dtype=F64), torch.tensor([0.2, 0.5, 1.7, 0.1], dtype=F64)]


def calls(t):
    rev = VP.reverse(score, eta=1.0)
    pf = VP.probability_flow(score)
    return {
        "marginal": lambda: VP.marginal(t),
        "custom.marginal": lambda: CUSTOM.marginal(t),
        "sample_marginal": lambda: VP.sample_marginal(X, t),
        "marginal_log_prob": lambda: VP.marginal_log_prob(X, X, t),
        "conditional_score": lambda: VP.conditional_score(X, X, t),
        "drift": lambda: VP.drift(X, t),
        "diffusion": lambda: VP.diffusion(X, t),
        "f": lambda: VP.f(t),
        "g": lambda: CUSTOM.g(t),
        "log_snr": lambda: VP.log_snr(t),
        "marginal_derivatives": lambda: VP.marginal_derivatives(t),
        "reverse.drift": lambda: rev.drift(X, t),
        "pf": lambda: pf(t, X),
        "tweedie_denoise": lambda: sdekit.tweedie_denoise(score, VP, X, t),
    }


@pytest.mark.parametrize("t", OUT_OF_RANGE, ids=["1.5", "-0.1", "1.0001", "vector"])
@pytest.mark.parametrize("what", list(calls(0.5)))
def test_t_outside_interval(what, t):
    with pytest.raises(ValueError, match=r"\bt must lie in \[0(\.0)?, 1\.0\]") as info:
        calls(t)[what]()
    bad = "1.7" if isinstance(t, torch.Tensor) and t.dim() == 1 else repr(float(t))[:5]
    assert bad in str(info.value)


@HYP
@given(t=st.one_of(st.floats(1.0 + 1e-9, 1e6), st.floats(-1e6, -1e-9)))
def test_t_outside_interval_property(t):
    with pytest.raises(ValueError, match=r"\bt must lie in"):
        VP.sample_marginal(X, t)
    with pytest.raises(ValueError, match=r"\bt must lie in"):
        CUSTOM.marginal(t)


def test_t_inside_interval_endpoints_ok():
    for t in (0.0, 1.0, torch.tensor([0.0, 1.0, 0.5, 1e-9], dtype=F64)):
        VP.drift(X, t)
        CUSTOM.marginal(t)


@pytest.mark.parametrize("t, exc, pattern", [
    (float("nan"), ValueError, r"t must be finite"),
    (float("inf"), ValueError, r"t must be finite"),
    ("0.5", TypeError, r"t must be a float or a torch.Tensor.*'0.5'"),
    (True, TypeError, r"\bt\b.*bool"),
    (torch.zeros(2, 2, dtype=F64), ValueError, r"\bt must be a scalar.*\(2, 2\)"),
    (torch.tensor([0.1, 0.2, 0.3], dtype=F64), ValueError, r"\bt has 3 entries.*4 samples"),
    (torch.tensor(0.5, dtype=torch.complex64), TypeError, r"\bt must be a real tensor"),
])
def test_malformed_t(t, exc, pattern):
    with pytest.raises(exc, match=pattern):
        VP.sample_marginal(X, t)


def test_mismatched_time_dtype():
    with pytest.raises(ValueError, match=r"\bt has dtype torch.float16.*float64"):
        VP.sample_marginal(X, torch.tensor(0.5, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\bt has dtype torch.float16"):
        VP.reverse(score).drift(X, torch.full((4,), 0.5, dtype=torch.float16))
    # float64 times and times in the state's dtype are both fine
    x32 = X.float()
    VP.sample_marginal(x32, torch.tensor(0.5, dtype=torch.float32))
    VP.sample_marginal(x32, torch.tensor(0.5, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Process construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_T_not_positive(T):
    for make in (lambda: sdekit.LinearSDE(good_f, good_g, T=T), lambda: sdekit.VPSDE(T=T),
                 lambda: sdekit.VESDE(T=T), lambda: sdekit.OrnsteinUhlenbeck(T=T),
                 lambda: sdekit.SDE(lambda x, t: x, lambda x, t: 1.0, T=T),
                 lambda: sdekit.LinearSDE.from_kernel(lambda t: 1.0, lambda t: t, T=T)):
        with pytest.raises(ValueError, match=r"\bT must be a finite positive number, got " + re_num(T)):
            make()


def re_num(v):
    return {0: "0", -1.0: "-1.0"}.get(v, repr(v)).replace(".", r"\.") if isinstance(v, (int, float)) else ""


def test_T_wrong_type():
    with pytest.raises(TypeError, match=r"\bT must be a real number.*'1'"):
        sdekit.VPSDE(T="1")


@pytest.mark.parametrize("g, pattern", [
    (lambda t: 0.5 - t, r"g\(t\) must be positive on \(0, T\]; g\(0\.5"),  # zero at t = 0.5
    (lambda t: -1.0 + 0 * t, r"g\(t\) must be positive.*g\(0\) = -1"),
    (lambda t: 0 * t, r"g\(t\) must be positive.*g\(0\.001\) = 0"),
    (lambda t: 1.0 / (t - 0.5), r"g\(t\) is not finite at t=0\.5"),
    (lambda t: torch.sqrt(t - 0.25), r"g\(t\) is not finite at t=0\b"),
])
def test_g_not_positive_or_not_finite(g, pattern):
    with pytest.raises(ValueError, match=pattern):
        sdekit.LinearSDE(good_f, g)


def test_g_zero_at_t0_only_is_allowed():
    # g(0) = 0 with g > 0 on (0, T] is a valid process (e.g. EDM-like sigma = t)
    sdekit.LinearSDE(lambda t: 0.0, lambda t: torch.sqrt(2 * t), T=1.0)


def test_f_not_finite():
    with pytest.raises(ValueError, match=r"f\(t\) is not finite at t=0\b"):
        sdekit.LinearSDE(lambda t: torch.log(t), good_g)


@pytest.mark.parametrize("which", ["f", "g"])
def test_coefficient_wrong_shape(which):
    bad = lambda t: torch.ones(3, dtype=F64)
    args = (bad, good_g) if which == "f" else (good_f, bad)
    with pytest.raises(ValueError, match=rf"\b{which}\(t\) returned shape \(3,\).*elementwise"):
        sdekit.LinearSDE(*args)


@pytest.mark.parametrize("which", ["f", "g"])
def test_coefficient_not_tensor_friendly(which):
    bad = (lambda t: -0.5 * (1 + 0.5 * math.sin(t))) if which == "f" else (lambda t: math.sqrt(1 + t))
    args = (bad, good_g) if which == "f" else (good_f, bad)
    with pytest.raises(TypeError, match=rf"\b{which}\(t\) failed.*use torch\.sin, not math\.sin"):
        sdekit.LinearSDE(*args)


def test_coefficient_not_callable_or_missing():
    with pytest.raises(TypeError, match=r"\bf must be a callable of t or a real number, got str: '0\.5'"):
        sdekit.LinearSDE("0.5", good_g)
    with pytest.raises(TypeError, match=r"\bg must be a callable of t or a real number, got bool"):
        sdekit.LinearSDE(good_f, True)
    with pytest.raises(ValueError, match=r"\bf must be finite, got nan"):
        sdekit.LinearSDE(float("nan"), good_g)
    with pytest.raises(TypeError, match=r"needs both f and g"):
        sdekit.LinearSDE(good_f, None)
    with pytest.raises(TypeError, match=r"\bkernel must be"):
        sdekit.LinearSDE(kernel="vp")
    with pytest.raises(TypeError, match=r"\bdrift must be callable"):
        sdekit.SDE(1.0, lambda x, t: 1.0)
    with pytest.raises(TypeError, match=r"\bdiffusion must be callable"):
        sdekit.SDE(lambda x, t: x, 1.0)


@pytest.mark.parametrize("noise", ["scalar", "Diagonal", "", None])
def test_unknown_noise_kind(noise):
    with pytest.raises(ValueError, match=r"\bnoise must be one of .*got " + re_repr(noise)):
        sdekit.SDE(lambda x, t: x, lambda x, t: 1.0, noise=noise)


def re_repr(v):
    import re

    return re.escape(repr(v))


@pytest.mark.parametrize("make, pattern", [
    (lambda: sdekit.VPSDE(beta_min=5.0, beta_max=1.0), r"\bbeta_max must be >= beta_min; got beta_min=5\.0, beta_max=1\.0"),
    (lambda: sdekit.SubVPSDE(beta_min=5.0, beta_max=1.0), r"\bbeta_max must be >= beta_min"),
    (lambda: sdekit.VPSDE(beta_min=-0.1), r"\bbeta_min must be a finite positive number, got -0\.1"),
    (lambda: sdekit.VPSDE(beta_max=float("nan")), r"\bbeta_max must be a finite positive number, got nan"),
    (lambda: sdekit.VESDE(sigma_min=1.0, sigma_max=0.5), r"\bsigma_max must exceed sigma_min; got sigma_min=1\.0, sigma_max=0\.5"),
    (lambda: sdekit.VESDE(sigma_min=0.0), r"\bsigma_min must be a finite positive number, got 0\.0"),
    (lambda: sdekit.CosineVPSDE(T=1.0), r"\bT must be < 1.*T=1\.0"),
    (lambda: sdekit.CosineVPSDE(T=1.5), r"\bT must be < 1.*T=1\.5"),
    (lambda: sdekit.CosineVPSDE(s=-0.01), r"\bs must be a finite positive number, got -0\.01"),
    (lambda: sdekit.OrnsteinUhlenbeck(theta=0.0), r"\btheta must be a finite positive number, got 0\.0"),
    (lambda: sdekit.OrnsteinUhlenbeck(sigma=-2), r"\bsigma must be a finite positive number, got -2"),
])
def test_builtin_parameters(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


# ---------------------------------------------------------------------------------------------
# States
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_state(bad):
    x0 = X.clone()
    x0[1, 2] = bad
    with pytest.raises(ValueError, match=r"\bx0 contains 1 non-finite value"):
        VP.sample_marginal(x0, 0.5)
    with pytest.raises(ValueError, match=r"\bx0 contains 1 non-finite"):
        VP.marginal_log_prob(X, x0, 0.5)
    with pytest.raises(ValueError, match=r"\bx_t contains 1 non-finite"):
        VP.marginal_log_prob(x0, X, 0.5)
    with pytest.raises(ValueError, match=r"\bx contains 1 non-finite"):
        VP.reverse(score).drift(x0, 0.5)
    with pytest.raises(ValueError, match=r"\bx contains 1 non-finite"):
        VP.probability_flow(score)(0.5, x0)
    with pytest.raises(ValueError, match=r"\bx_t contains 1 non-finite"):
        sdekit.tweedie_denoise(score, VP, x0, 0.5)


def test_malformed_state():
    with pytest.raises(TypeError, match=r"\bx0 must be a torch.Tensor, got list"):
        VP.sample_marginal([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match=r"\bx0 must be a floating-point tensor, got dtype torch.int64"):
        VP.sample_marginal(torch.arange(4), 0.5)
    with pytest.raises(ValueError, match=r"\bx0 must have a batch dimension"):
        VP.sample_marginal(torch.tensor(1.0), 0.5)
    with pytest.raises(ValueError, match=r"\bx_t has shape \(4, 3\) but x0 has \(4, 2\)"):
        VP.marginal_log_prob(X, X[:, :2], 0.5)
    with pytest.raises(ValueError, match=r"\bx_t must have shape \(B, d\)"):
        sdekit.tweedie_covariance(score, VP, X[:, 0], 0.5)


def test_wrong_user_output_shapes():
    sde = sdekit.SDE(lambda x, t: x[:, :1], lambda x, t: 1.0)
    with pytest.raises(ValueError, match=r"\bdrift\(x, t\) must return a tensor of shape \(4, 3\), got \S*\(?\[?4, 1\b"):
        sde.drift(X, 0.5)
    sde = sdekit.SDE(lambda x, t: x, lambda x, t: torch.ones(4, 2, dtype=x.dtype), noise="diagonal")
    with pytest.raises(ValueError, match=r"\bdiagonal diffusion\(x, t\) must return shape \(4, 3\), got \(4, 2\)"):
        sde.diffusion(X, 0.5)
    sde = sdekit.SDE(lambda x, t: x, lambda x, t: torch.ones(4, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"\bisotropic diffusion\(x, t\) must return shape \(4,\)"):
        sde.diffusion(X, 0.5)


# ---------------------------------------------------------------------------------------------
# Reverse dynamics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [-0.5, -1e-12, float("nan"), float("inf")])
def test_eta_negative_or_not_finite(eta):
    with pytest.raises(ValueError, match=r"\beta must be a finite non-negative number, got " + re_repr(eta)):
        VP.reverse(score, eta=eta)


def test_eta_wrong_type():
    with pytest.raises(TypeError, match=r"\beta must be a real number, got str"):
        VP.reverse(score, eta="1")


@pytest.mark.parametrize("t_eps", [1.0, 1.5])
def test_t_eps_not_below_T(t_eps):
    with pytest.raises(ValueError, match=r"\bt_eps must be < T = 1\.0; got t_eps=" + re_repr(t_eps)):
        VP.reverse(score, t_eps=t_eps)
    with pytest.raises(ValueError, match=r"\bt_eps must be < T"):
        VP.probability_flow(score, t_eps=t_eps)


@pytest.mark.parametrize("t_eps", [0.0, -1e-3, float("nan")])
def test_t_eps_not_positive(t_eps):
    with pytest.raises(ValueError, match=r"\bt_eps must be a finite positive number, got " + re_repr(t_eps)):
        VP.reverse(score, t_eps=t_eps)


def test_score_not_callable():
    with pytest.raises(TypeError, match=r"\bscore must be callable.*got Tensor"):
        VP.reverse(X)
    with pytest.raises(TypeError, match=r"\bsde must be a sdekit.SDE, got str"):
        sdekit.ReverseSDE("vp", score)


@pytest.mark.parametrize("bad_score, got", [
    (lambda x, t: x[:, :2], r"\S*\(?\[?4, 2\b"),  # (4, 2) or torch.Size([4, 2])
    (lambda x, t: x.flatten(), r"\S*\(?\[?12\b"),
    (lambda x, t: 0.0, "float"),
])
def test_score_wrong_shape(bad_score, got):
    pattern = r"\bscore\(x, t\) must return a tensor shaped like x \(4, 3\), got " + got
    with pytest.raises(ValueError, match=pattern):
        VP.reverse(bad_score).drift(X, 0.5)
    with pytest.raises(ValueError, match=pattern):
        VP.probability_flow(bad_score)(0.5, X)
    with pytest.raises(ValueError, match=pattern):
        sdekit.tweedie_denoise(bad_score, VP, X, 0.5)


def test_parameterisation_needs_linear_sde():
    sde = sdekit.SDE(lambda x, t: x, lambda x, t: 1.0)
    with pytest.raises(TypeError, match=r"\bsde must be a linear SDE.*got SDE"):
        sdekit.score_from_eps(lambda x, t: x, sde)


def test_negative_eta_schedule_is_rejected():
    vp = sdekit.VPSDE()
    with pytest.raises(ValueError, match="eta"):
        vp.reverse(lambda x, t: -x, eta=lambda t: 1.0 - 2.0 * t)  # negative for t > 0.5
    rev = vp.reverse(lambda x, t: -x, eta=lambda t: torch.ones_like(t))
    assert rev.eta is not None
