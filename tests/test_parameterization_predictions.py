"""sdekit.parameterization's tensor-level conversions and EDM preconditioning, against formulas
written here from first principles (x_t = m x0 + σ ε, score of the kernel -ε/σ) and against EDM's
published VE coefficients. Deterministic: no statistical tolerance."""

import itertools
import math

import pytest
import torch

import sdekit
from sdekit.parameterization import (
    PREDICTIONS,
    convert_prediction,
    edm_preconditioning,
    prediction_score_scale,
    prediction_target,
    score_from_eps,
    score_from_prediction,
    score_from_v,
)

F64 = torch.float64


def numeric_sde():
    return sdekit.LinearSDE(lambda t: -0.5 * (0.3 + 6.0 * t), lambda t: torch.sqrt(0.3 + 6.0 * t), T=1.0)


PROCS = {"vp": lambda: sdekit.VPSDE(), "ve": lambda: sdekit.VESDE(0.01, 50.0), "cosine": lambda: sdekit.CosineVPSDE(),
         "numeric": numeric_sde}


def setup(name, seed=0, B=7, d=3):
    sde = PROCS[name]()
    g = torch.Generator().manual_seed(seed)
    t = 0.02 + 0.95 * sde.T * torch.rand(B, generator=g, dtype=F64)
    x0 = torch.randn(B, d, generator=g, dtype=F64)
    eps = torch.randn(B, d, generator=g, dtype=F64)
    m, s = sde.kernel.m(t)[:, None], sde.kernel.sigma(t)[:, None]
    return sde, t, x0, eps, m, s, m * x0 + s * eps


@pytest.mark.parametrize("name", sorted(PROCS))
def test_targets_are_the_four_views_of_one_pair(name):
    """For x_t = m x0 + σ ε the targets are ε, x0, v = mε − σx0, −ε/σ, and convert_prediction maps
    each to each other exactly (the true pair (x0, ε) is a fixed point of every conversion)."""
    sde, t, x0, eps, m, s, xt = setup(name)
    views = {"eps": eps, "x0": x0, "v": m * eps - s * x0, "score": -eps / s}
    for p in PREDICTIONS:
        assert torch.allclose(prediction_target(x0, eps, sde, t, p), views[p], rtol=1e-12, atol=1e-12)
    for a, b in itertools.product(PREDICTIONS, PREDICTIONS):
        out = convert_prediction(views[a], xt, sde, t, source=a, target=b)
        assert torch.allclose(out, views[b], rtol=1e-10, atol=1e-10), (a, b)


@pytest.mark.parametrize("name", sorted(PROCS))
def test_conversions_of_an_arbitrary_prediction(name):
    """For a prediction that is NOT the true noise, conversions still satisfy x_t = m x̂0 + σ ε̂ and
    agree with the callable-level score_from_eps / score_from_v / Tweedie."""
    sde, t, x0, eps, m, s, xt = setup(name, seed=1)
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(xt.shape, generator=g, dtype=F64)
    for src in PREDICTIONS:
        e = convert_prediction(pred, xt, sde, t, source=src, target="eps")
        x0h = convert_prediction(pred, xt, sde, t, source=src, target="x0")
        assert torch.allclose(m * x0h + s * e, xt, rtol=1e-10, atol=1e-10)
        back = convert_prediction(convert_prediction(pred, xt, sde, t, source=src, target="v"), xt, sde, t,
                                  source="v", target=src)
        assert torch.allclose(back, pred, rtol=1e-9, atol=1e-9)
    assert torch.allclose(score_from_prediction(pred, xt, sde, t, "eps"),
                          score_from_eps(lambda x, tt: pred, sde)(xt, t), rtol=1e-12)
    assert torch.allclose(score_from_prediction(pred, xt, sde, t, "v"),
                          score_from_v(lambda x, tt: pred, sde)(xt, t), rtol=1e-12)
    assert torch.allclose(score_from_prediction(pred, xt, sde, t, "x0"), (m * pred - xt) / s**2, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(PROCS))
@pytest.mark.parametrize("predict", PREDICTIONS)
def test_score_scale_is_the_slope(name, predict):
    """prediction_score_scale = d score / d prediction, checked by autograd of the conversion."""
    sde, t, x0, eps, m, s, xt = setup(name, seed=2)
    pred = torch.randn(xt.shape, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    sc = score_from_prediction(pred, xt, sde, t, predict)
    (grad,) = torch.autograd.grad(sc[:, 0].sum(), pred)
    assert torch.allclose(grad[:, 0], prediction_score_scale(sde, t, predict), rtol=1e-10)
    assert torch.all(grad[:, 1:] == 0)


def test_edm_coefficients_match_edm_for_ve():
    """VE (m = 1): c_in = 1/sqrt(σ²+σd²), c_skip = σd²/(σ²+σd²), c_out = σσd/sqrt(σ²+σd²) (EDM Table 1)."""
    sde = sdekit.VESDE(0.002, 80.0)
    t = torch.linspace(0.01, 1.0, 9, dtype=F64)
    sig = 0.002 * torch.sqrt(torch.expm1(2.0 * math.log(80.0 / 0.002) * t))  # σ(t) of the VE kernel, by hand
    sd = 0.5
    c_in, c_skip, c_out, m = edm_preconditioning(sde, t, sd)
    assert torch.allclose(m, torch.ones_like(t))
    assert torch.allclose(c_in, 1 / torch.sqrt(sig**2 + sd**2), rtol=1e-10)
    assert torch.allclose(c_skip, sd**2 / (sig**2 + sd**2), rtol=1e-10)
    assert torch.allclose(c_out, sig * sd / torch.sqrt(sig**2 + sd**2), rtol=1e-10)


@pytest.mark.parametrize("name", sorted(PROCS))
def test_edm_coefficients_unit_variance_any_process(name):
    """EDM's design rules on any linear SDE, for x0 ~ N(0, σd²): Var[c_in x_t] = 1 and the F target
    (x0 − c_skip x_t/m)/c_out has variance 1; c_skip minimises it (d/dc_skip of the variance is 0)."""
    sde = PROCS[name]()
    sd = 0.7
    t = torch.linspace(0.01, sde.T, 11, dtype=F64)
    c_in, c_skip, c_out, m = edm_preconditioning(sde, t, sd)
    mk, sk = sde.kernel.m(t), sde.kernel.sigma(t)
    assert torch.allclose(m, mk)
    assert torch.allclose(c_in**2 * (mk**2 * sd**2 + sk**2), torch.ones_like(t), rtol=1e-10)
    sbar = sk / mk
    var_target = lambda cs: ((1 - cs) ** 2 * sd**2 + cs**2 * sbar**2) / c_out**2  # noqa: E731
    assert torch.allclose(var_target(c_skip), torch.ones_like(t), rtol=1e-10)
    h = 1e-6
    assert torch.all((var_target(c_skip + h) - var_target(c_skip - h)).abs() < 1e-8)


def test_bad_names():
    sde, t, x0, eps, m, s, xt = setup("vp")
    with pytest.raises(ValueError, match="source must be one of"):
        convert_prediction(xt, xt, sde, t, source="noise", target="eps")
    with pytest.raises(ValueError, match="predict must be one of"):
        prediction_target(x0, eps, sde, t, "y")
    with pytest.raises(ValueError, match="pred must be a tensor shaped like x"):
        convert_prediction(xt[:, :2], xt, sde, t, source="eps", target="x0")
    with pytest.raises(ValueError, match="sigma_data"):
        edm_preconditioning(sde, t, 0.0)
    with pytest.raises(TypeError, match="linear SDE"):
        prediction_score_scale(sdekit.SDE(lambda x, t: -x, lambda x, t: 1.0), t, "eps")
