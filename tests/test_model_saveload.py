"""ScoreModel.save / ScoreModel.load through diffusion.checkpoint (safetensors + JSON),
sdekit.config (process descriptions) and diffusion.nets.build_net. Needs the nets, train and
model branches merged (it is not skipped when they are missing: it must run after the merge)."""

import pytest
import torch

import sdekit
from diffusion.checkpoint import save_checkpoint
from diffusion.model import ScoreModel
from diffusion.nets import MLPScoreNet

from _score_nets import AffineNet

F64 = torch.float64


def probe(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 2, generator=g)
    t = 0.05 + 0.9 * torch.rand(8, generator=g, dtype=F64)
    with torch.no_grad():
        return model.score(x, t)


@pytest.mark.parametrize("predict,precondition", [("v", None), ("x0", "edm"), ("eps", None)])
def test_round_trip(tmp_path, predict, precondition):
    sde = sdekit.VPSDE(0.1, 15.0)
    torch.manual_seed(0)
    model = ScoreModel(MLPScoreNet(2, width=32, depth=2), sde, predict=predict, precondition=precondition,
                       sigma_data=0.7, t_eps=2e-3)
    path = model.save(tmp_path / "ckpt")
    for where in (tmp_path / "ckpt", path):
        loaded = ScoreModel.load(where)
        assert loaded.config == model.config
        assert type(loaded.sde) is type(sde) and loaded.sde.kernel.beta_max == 15.0
        assert torch.equal(probe(loaded), probe(model))
        assert loaded.net.config == model.net.config


def test_custom_process_must_be_passed_again(tmp_path):
    g2 = lambda t: 0.3 + 6.0 * t  # noqa: E731
    sde = sdekit.LinearSDE(lambda t: -0.5 * g2(t), lambda t: torch.sqrt(g2(t)), T=1.0)
    torch.manual_seed(0)
    model = ScoreModel(MLPScoreNet(2, width=16, depth=1), sde)
    model.save(tmp_path / "c")
    with pytest.raises(ValueError, match="pass it again"):
        ScoreModel.load(tmp_path / "c")
    loaded = ScoreModel.load(tmp_path / "c", sde=sde)
    assert torch.equal(probe(loaded), probe(model))


def test_mismatched_process_and_bad_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = ScoreModel(MLPScoreNet(2, width=16, depth=1), sdekit.VPSDE())
    model.save(tmp_path / "a")
    with pytest.raises(ValueError, match="does not match the saved process"):
        ScoreModel.load(tmp_path / "a", sde=sdekit.VESDE())
    save_checkpoint(tmp_path / "other", {"w": torch.zeros(2)}, {"format": "something-else"})
    with pytest.raises(ValueError, match="not a ScoreModel checkpoint"):
        ScoreModel.load(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ScoreModel.load(tmp_path / "empty")
    with pytest.raises(TypeError, match="no .config dict"):
        ScoreModel(AffineNet(2), sdekit.VPSDE()).save(tmp_path / "b")
