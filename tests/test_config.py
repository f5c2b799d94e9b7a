"""Process configs: ``process_config`` / ``process_from_config`` round-trip every built-in and
table-defined process exactly (through JSON text), and refuse what cannot be written down."""

import json

import pytest
import torch

import sdekit
from sdekit.config import PROCESS_TYPES, process_config, process_from_config

F64 = torch.float64


def _table(n=40, seed=0):
    """A strictly decreasing alphas_cumprod table with values that are not 'round' floats."""
    g = torch.Generator().manual_seed(seed)
    betas = 1e-4 + 0.05 * torch.rand(n, generator=g, dtype=F64)
    return torch.cumprod(1.0 - betas, 0)


PROCESSES = [
    sdekit.VPSDE(0.1, 20.0),
    sdekit.VPSDE(0.123456789, 17.3, T=0.7),
    sdekit.SubVPSDE(0.2, 15.0, T=1.3),
    sdekit.VESDE(0.01, 50.0),
    sdekit.VESDE(0.002, 80.0, T=2.5),
    sdekit.CosineVPSDE(),
    sdekit.CosineVPSDE(s=0.01, T=0.9),
    sdekit.OrnsteinUhlenbeck(theta=0.7, sigma=1.3, T=3.0),
    sdekit.LinearSDE.from_alphas_cumprod(_table()),
    sdekit.LinearSDE.from_alphas_cumprod(_table(1000, seed=1), T=0.5),
]


@pytest.mark.parametrize("sde", PROCESSES, ids=lambda s: type(s).__name__)
def test_round_trip_is_exact(sde):
    cfg = process_config(sde)
    text = json.dumps(cfg, allow_nan=False)  # plain JSON: numbers and lists only
    sde2 = process_from_config(json.loads(text))
    assert type(sde2) is type(sde)
    assert process_config(sde2) == cfg
    t = torch.linspace(0.0, sde.T, 1001, dtype=F64)
    # bit-for-bit: the same constructor on the same float64 numbers
    for name in ("m", "sigma", "g2", "f"):
        a, b = getattr(sde.kernel, name)(t), getattr(sde2.kernel, name)(t)
        assert torch.equal(a, b), name
    lam = sde.log_snr(t[1:])
    assert torch.equal(lam, sde2.log_snr(t[1:]))


def test_config_contents():
    assert process_config(sdekit.VPSDE(0.1, 20.0)) == {"type": "VPSDE", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0}
    assert process_config(sdekit.OrnsteinUhlenbeck(2.0, 0.5)) == {"type": "OrnsteinUhlenbeck", "theta": 2.0,
                                                                  "sigma": 0.5, "T": 1.0}
    table = _table(1000, seed=2)
    cfg = process_config(sdekit.LinearSDE.from_alphas_cumprod(table, T=2.0))
    assert cfg["type"] == "LinearSDE.from_alphas_cumprod" and cfg["T"] == 2.0
    # the table itself, as a list (exp(2 * (log a) / 2) differs from a in ~15% of entries)
    assert cfg["alphas_cumprod"] == table.tolist()
    assert set(PROCESS_TYPES) == {"VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "OrnsteinUhlenbeck",
                                  "LinearSDE.from_alphas_cumprod"}


@pytest.mark.parametrize("sde", [
    sdekit.LinearSDE(lambda t: -0.5 * (1 + t), lambda t: (1 + t).sqrt()),
    sdekit.LinearSDE.from_kernel(lambda t: torch.exp(-t), lambda t: (1 - torch.exp(-2 * t)).sqrt()),
    sdekit.SDE(lambda x, t: -x, lambda x, t: torch.ones_like(t)),
], ids=["LinearSDE(f,g)", "from_kernel", "SDE"])
def test_custom_callables_raise_type_error(sde):
    with pytest.raises(TypeError) as e:
        process_config(sde)
    msg = str(e.value)
    assert type(sde).__name__ in msg and "pass the process again at load" in msg.lower()


def test_user_subclass_is_not_described_as_its_parent():
    class MyVP(sdekit.VPSDE):
        def g2(self, t):  # a subclass may change anything
            return 2 * super().g2(t)

    with pytest.raises(TypeError, match="MyVP"):
        process_config(MyVP())


def test_bad_input():
    with pytest.raises(TypeError, match="sde must be an sdekit process"):
        process_config("VPSDE")
    with pytest.raises(TypeError, match="cfg must be a mapping"):
        process_from_config(["VPSDE"])
    with pytest.raises(ValueError, match="cfg\\['type'\\] must be one of .*'Nope'"):
        process_from_config({"type": "Nope"})
    with pytest.raises(ValueError, match="missing \\['beta_max'\\]"):
        process_from_config({"type": "VPSDE", "beta_min": 0.1, "T": 1.0})
    with pytest.raises(ValueError, match="unexpected \\['sigma_max'\\]"):
        process_from_config({"type": "VPSDE", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "sigma_max": 3})
    with pytest.raises(ValueError, match="beta_min"):  # the process validates the values
        process_from_config({"type": "VPSDE", "beta_min": -0.1, "beta_max": 20.0, "T": 1.0})
    with pytest.raises(ValueError, match="alphas_cumprod"):
        process_from_config({"type": "LinearSDE.from_alphas_cumprod", "alphas_cumprod": "0.9,0.5", "T": 1.0})
    with pytest.raises(ValueError, match="strictly decreasing"):
        process_from_config({"type": "LinearSDE.from_alphas_cumprod", "alphas_cumprod": [0.5, 0.9], "T": 1.0})
