"""Score networks: shapes, conditioning, config round trip, zero init, gradients, sizes, bad input.

Everything here is deterministic (seeded) and runs in a few seconds on one CPU thread; the CIFAR
configuration is built on the meta device (parameter shapes without memory or initialisation).
"""

import ast
import json
from pathlib import Path

import pytest
import torch

from diffusion.nets import NETS, GaussianFourierEmbedding, MLPScoreNet, SinusoidalEmbedding, UNet, build_net
from diffusion.nets.embeddings import SINUSOIDAL_MAX_FREQ, SINUSOIDAL_MIN_FREQ
from diffusion.nets.unet import group_count

NETS_DIR = Path(__file__).resolve().parents[1] / "diffusion" / "nets"


def small_unet(**kw):
    """A 3-level, 2-attention-resolution U-Net on 16x16 RGB — every code path, small."""
    args = dict(in_channels=3, image_size=16, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                attn_resolutions=(8, 4), num_heads=2, dropout=0.1)
    args.update(kw)
    return UNet(**args)


CONFIGS = {
    "mlp_sin": lambda: MLPScoreNet(3, width=32, depth=2, emb_dim=16),
    "mlp_fourier_nonorm_gelu": lambda: MLPScoreNet(3, width=32, depth=2, emb_dim=16, embedding="fourier",
                                                   norm=None, activation="gelu", fourier_seed=3),
    "mlp_cond": lambda: MLPScoreNet(3, width=32, depth=1, emb_dim=16, num_classes=4),
    "mlp_depth0": lambda: MLPScoreNet(3, width=32, depth=0, emb_dim=16),
    "unet_tiny": lambda: UNet.tiny(),
    "unet_tiny_cond": lambda: UNet.tiny(num_classes=10),
    "unet_small": small_unet,
    "unet_small_cond": lambda: small_unet(num_classes=3),
}


def inputs(net, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (net.dim,) if isinstance(net, MLPScoreNet) else (net.in_channels, net.image_size, net.image_size)
    return torch.randn((batch,) + shape, generator=g), 4 * torch.randn(batch, generator=g)


def randomize(net, seed=1, scale=0.1):
    """Perturb every parameter (the zero-initialised ones too) so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_dtype_and_zero_init(name):
    torch.manual_seed(0)
    net = CONFIGS[name]()
    x, u = inputs(net)
    out = net(x, u)
    assert out.shape == x.shape and out.dtype == x.dtype
    # zero-initialised output layer: exactly zero at initialisation, whatever the input
    assert torch.count_nonzero(out) == 0
    # float64 input: cast in, cast back
    out64 = randomize(net)(x.double(), u.double())
    assert out64.dtype == torch.float64 and out64.shape == x.shape
    assert torch.isfinite(out64).all() and out64.abs().max() > 0


@pytest.mark.parametrize("name", ["mlp_cond", "unet_tiny_cond", "unet_small_cond"])
def test_label_conditioning_and_null_label(name):
    torch.manual_seed(0)
    net = randomize(CONFIGS[name]()).eval()
    x, u = inputs(net, batch=4)
    k = net.num_classes
    a = net(x, u, torch.zeros(4, dtype=torch.long))
    b = net(x, u, torch.ones(4, dtype=torch.long))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()          # the label changes the output
    null = net(x, u, torch.full((4,), k, dtype=torch.long))
    assert torch.equal(net(x, u), null)                          # label=None is the null label
    assert (null - a).abs().max() > 0
    mixed = net(x, u, torch.tensor([0, 1, 0, 1]))                # per-sample labels
    assert torch.equal(mixed[0], a[0]) and torch.equal(mixed[1], b[1])


@pytest.mark.parametrize("name", ["mlp_sin", "unet_tiny"])
def test_noise_condition_changes_the_output(name):
    net = randomize(CONFIGS[name]()).eval()
    x, u = inputs(net, batch=3)
    assert (net(x, u) - net(x, u + 0.5)).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip_through_json_and_state_dict(name):
    torch.manual_seed(0)
    net = randomize(CONFIGS[name]()).eval()
    cfg = json.loads(json.dumps(net.config))                      # JSON-serialisable
    assert cfg["name"] in NETS and cfg == net.config
    torch.manual_seed(123)                                        # a different initialisation
    clone = build_net(cfg).eval()
    assert clone.config == net.config and clone.num_classes == net.num_classes
    x, u = inputs(net)
    assert not torch.equal(clone(x, u), net(x, u))
    clone.load_state_dict(net.state_dict())
    assert torch.equal(clone(x, u), net(x, u))


def test_fourier_features_are_seeded_and_saved():
    a, b, c = GaussianFourierEmbedding(16, seed=3), GaussianFourierEmbedding(16, seed=3), GaussianFourierEmbedding(16, seed=4)
    assert torch.equal(a.w, b.w) and not torch.equal(a.w, c.w)
    assert "w" in a.state_dict()


def test_sinusoidal_frequencies_cover_the_documented_range():
    emb = SinusoidalEmbedding(64)
    assert emb.freqs[0] == pytest.approx(SINUSOIDAL_MIN_FREQ) and emb.freqs[-1] == pytest.approx(SINUSOIDAL_MAX_FREQ)
    u = torch.linspace(-10, 10, 2001)
    e = emb(u)
    # the lowest frequency's sine is strictly monotone on [-10, 10]: no two noise levels alias
    assert (e[1:, 0] - e[:-1, 0] > 0).all()
    assert torch.cdist(e[::50], e[::50]).add(torch.eye(41) * 1e9).min() > 0.1


@pytest.mark.parametrize("name", ["mlp_fourier_nonorm_gelu", "mlp_cond", "unet_tiny_cond", "unet_small_cond"])
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    net = randomize(CONFIGS[name]())
    net.eval()                                                    # no dropout: deterministic
    x, u = inputs(net, batch=6)
    label = torch.arange(6) % (net.num_classes + 1) if net.num_classes else None
    net(x, u, label).square().sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, pname


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tiny = count(UNet.tiny())
    assert 50_000 <= tiny <= 300_000, tiny
    with torch.device("meta"):
        cifar = UNet.cifar()
    n = count(cifar)
    assert 10_000_000 <= n <= 40_000_000, n
    assert cifar.config["channel_mult"] == [1, 2, 2, 2]


def test_mlp_batch_512():
    net = MLPScoreNet(2)                                           # the default 4x256 net
    x = torch.randn(512, 2)
    assert net(x, torch.zeros(512)).shape == (512, 2)


def test_group_count():
    assert [group_count(c) for c in (16, 32, 48, 64, 128, 256, 3, 24)] == [4, 8, 12, 16, 32, 32, 1, 6]


def test_nets_do_not_import_sdekit():
    for path in NETS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("sdekit", "diffusion") for n in names), (path.name, names)


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_x_shape():
    mlp, unet = CONFIGS["mlp_sin"](), UNet.tiny()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\).*got shape \(4, 2\)"):
        mlp(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\).*got shape \(4, 3, 8, 8\)"):
        unet(torch.randn(4, 3, 8, 8), torch.zeros(4))
    with pytest.raises(ValueError, match=r"got shape \(4, 1, 16, 16\)"):
        unet(torch.randn(4, 1, 16, 16), torch.zeros(4))
    with pytest.raises(ValueError, match=r"got shape \(1, 8, 8\)"):
        unet(torch.randn(1, 8, 8), torch.zeros(1))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mlp(torch.ones(4, 3, dtype=torch.long), torch.zeros(4))


def test_bad_noise_cond():
    net = CONFIGS["mlp_sin"]()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"noise_cond must have shape \(B,\) = \(4,\).*got shape \(5,\)"):
        net(x, torch.zeros(5))
    with pytest.raises(ValueError, match=r"noise_cond.*got shape \(4, 1\)"):
        net(x, torch.zeros(4, 1))
    with pytest.raises(TypeError, match="noise_cond must be a floating-point tensor"):
        net(x, torch.zeros(4, dtype=torch.long))
    assert torch.equal(net(x, torch.tensor(0.5)), net(x, torch.full((4,), 0.5)))   # 0-d broadcasts


def test_bad_label():
    cond, uncond = CONFIGS["mlp_cond"](), CONFIGS["mlp_sin"]()
    x, u = torch.randn(3, 3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"label must lie in \[0, 4\].*label\[1\] = 5"):
        cond(x, u, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"label\[2\] = -1"):
        cond(x, u, torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match=r"label must have shape \(B,\) = \(3,\)"):
        cond(x, u, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="label must be an integer tensor"):
        cond(x, u, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, u, torch.tensor([0, 1, 2]))


def test_bad_constructor_arguments_and_config():
    with pytest.raises(ValueError, match="image_size must be divisible by .* 4"):
        UNet(1, 10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        UNet(1, 8, channels=16, channel_mult=(1, 2), num_heads=3)
    with pytest.raises(ValueError, match=r"attn_resolutions entries must be resolutions of this net \[8, 4\]; got 2"):
        UNet(1, 8, channels=16, channel_mult=(1, 2), attn_resolutions=(2,))
    with pytest.raises(ValueError, match="embedding must be one of"):
        MLPScoreNet(2, embedding="learned")
    with pytest.raises(ValueError, match="emb_dim must be even"):
        MLPScoreNet(2, emb_dim=7)
    with pytest.raises(ValueError, match="activation must be one of"):
        MLPScoreNet(2, activation="swish")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        MLPScoreNet(2, num_classes=0)
    with pytest.raises(ValueError, match=r"dropout must be a probability"):
        UNet(1, 8, dropout=1.0)
    with pytest.raises(ValueError, match=r"unknown network name 'Transformer'.*\['MLPScoreNet', 'UNet'\]"):
        build_net({"name": "Transformer"})
    with pytest.raises(ValueError, match=r"unknown network name None"):
        build_net({"dim": 2})
    with pytest.raises(ValueError, match=r"\['heads'\] that MLPScoreNet does not take"):
        build_net({"name": "MLPScoreNet", "dim": 2, "heads": 4})
    with pytest.raises(TypeError, match="config must be a mapping"):
        build_net("UNet")
