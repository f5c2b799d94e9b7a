"""diffusion.evaluate.ExactDensityEvaluator against exact answers: a network that IS the exact
score has NLL gap ~0 (solver error only) and an MMD at its two-sample floor; a network that is the
exact score of a shifted mixture has a clearly positive gap and an MMD far above the floor.
Deterministic (fixed seeds)."""

import math

import pytest
import torch

import sdekit
from diffusion.evaluate import ExactDensityEvaluator
from diffusion.model import ScoreModel
from sdekit.studies import mmd

from _score_nets import OracleNet


def gm(shift=0.0):
    return sdekit.GaussianMixture([0.4, 0.6], [[-1.5 + shift, 0.5], [1.0 + shift, -0.5]], [[0.3, 0.2], [0.5, 0.4]])


def test_exact_and_shifted_models():
    sde = sdekit.VPSDE()
    ev = ExactDensityEvaluator(gm(), n_points=64, n_samples=400, t_eps=1e-3, tol=1e-5, floor_repeats=3)
    exact = ev(ScoreModel(OracleNet(gm(), sde, "eps"), sde, predict="eps"), None, 0)
    assert abs(exact["nll_gap"]) < 1e-3
    assert exact["mmd_over_floor"] < 2.0
    wrong = ev(ScoreModel(OracleNet(gm(1.0), sde, "eps"), sde, predict="eps"), None, 0)
    assert wrong["nll_gap"] > 0.1 and wrong["nll_gap"] > 5 * wrong["nll_gap_se"]
    assert wrong["mmd_over_floor"] > 3.0


def test_mmd_is_zero_on_identical_samples_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g, dtype=torch.float64)
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-7)
    assert mmd(x, x + 1.0) > mmd(x, x + 0.3) > mmd(x, x + 0.1) > 0
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, x, bandwidths=(0.0,))
    with pytest.raises(ValueError, match="event shape"):
        mmd(x, x[:, :1])


def test_bad_input():
    with pytest.raises(TypeError, match="mixture"):
        ExactDensityEvaluator("not a mixture")
    with pytest.raises(ValueError, match="n_points"):
        ExactDensityEvaluator(gm(), n_points=1)
    with pytest.raises(ValueError, match="tol"):
        ExactDensityEvaluator(gm(), tol=-1.0)
