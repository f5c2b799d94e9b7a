r"""`UNet`: a DDPM/ADM-style U-Net for images ``(B, C, H, W)``.

Layout (Ho et al. 2020; Dhariwal & Nichol 2021):

* conditioning vector $c = \mathrm{MLP}(\mathrm{emb}(u)) + E[y]$ of width ``4 * channels``, with
  $u$ = ``noise_cond`` = $\log\bar\sigma$ (sinusoidal embedding, see `diffusion.nets.embeddings`)
  and $E$ a label table with ``num_classes + 1`` rows (the last is the null label);
* a 3×3 input convolution, then per resolution level ``num_res_blocks`` residual blocks (and
  self-attention where the resolution is in ``attn_resolutions``) followed by a stride-2
  convolution, except at the last level;
* a middle residual block – attention – residual block at the lowest resolution;
* the mirror-image up path with ``num_res_blocks + 1`` blocks per level, each taking the matching
  down-path activation as a skip connection (channel concatenation), and nearest-neighbour 2×
  upsampling followed by a 3×3 convolution;
* GroupNorm – SiLU – 3×3 output convolution.

A residual block is
$h = \mathrm{conv}_1(\phi(\mathrm{GN}(x)))$,
$h = \mathrm{conv}_2(\mathrm{drop}(\phi(\mathrm{GN}(h)(1 + s) + b)))$ with $(s, b) = W\phi(c)$
(scale/shift conditioning, ADM's "use_scale_shift_norm"), and output $\mathrm{skip}(x) + h$
($\mathrm{skip}$ a 1×1 convolution when the channel count changes). $\phi$ is SiLU; GroupNorm
uses 32 groups, or for narrow layers the largest divisor of the channel count that leaves at
least 4 channels per group (`group_count`).

**Zero initialisation** (ADM's choice): the output convolution, every block's $\mathrm{conv}_2$
and every attention output projection start at zero, so the network outputs exactly 0 at
initialisation and each residual branch starts as the identity.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._inputs import as_int_tuple, check_x, conditioning, positive_int
from .embeddings import SinusoidalEmbedding

__all__ = ["UNet", "group_count"]

#: GroupNorm's group count when the channels allow it (Wu & He 2018; DDPM, ADM).
MAX_GROUPS = 32
#: Fewest channels per group: with one channel per group GroupNorm becomes instance norm, whose
#: statistics over a 4×4 map (16 values) are too noisy; small nets use fewer, wider groups.
MIN_GROUP_CHANNELS = 4


def group_count(channels: int, max_groups: int = MAX_GROUPS, min_group_channels: int = MIN_GROUP_CHANNELS) -> int:
    r"""The largest divisor $g$ of ``channels`` with $g \le$ ``max_groups`` and at least
    ``min_group_channels`` channels per group (1 if none: one group, i.e. LayerNorm over C, H, W)."""
    for g in range(min(max_groups, channels // min_group_channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _gn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _gn(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(c)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.heads = num_heads
        self.norm = _gn(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    r"""U-Net $f(x, u, y)$ for images of shape ``(B, in_channels, image_size, image_size)``.

    Parameters
    ----------
    in_channels:
        Image channels (1 grayscale, 3 RGB); the output has the same channels.
    image_size:
        Height = width; must be divisible by ``2 ** (len(channel_mult) - 1)``.
    channels:
        Base channel count (level $i$ has ``channels * channel_mult[i]``).
    channel_mult:
        Channel multipliers per resolution level (one level per entry; each level but the last
        halves the resolution).
    num_res_blocks:
        Residual blocks per level on the down path (``+ 1`` on the up path).
    attn_resolutions:
        Resolutions (side lengths) with self-attention; ``None`` means the lowest resolution only.
        The middle block always has attention.
    num_heads:
        Attention heads; must divide the channel count at every attention resolution.
    dropout:
        Dropout probability in the residual blocks.
    num_classes:
        ``None`` (unconditional) or the number of classes; ``num_classes`` is the null label.

    Notes
    -----
    Called as ``net(x, noise_cond, label=None)``; ``x`` must have exactly the shape above,
    ``noise_cond`` is ``(B,)``. The output has x's shape and dtype (inputs are cast to the
    parameters' dtype). Presets: `UNet.tiny` (8×8 digits on a CPU) and `UNet.cifar` (32×32 RGB).
    """

    def __init__(self, in_channels: int, image_size: int, channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Optional[Sequence[int]] = None, num_heads: int = 4,
                 dropout: float = 0.0, num_classes: Optional[int] = None):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.image_size = positive_int(image_size, "image_size")
        channels = positive_int(channels, "channels")
        channel_mult = as_int_tuple(channel_mult, "channel_mult")
        if len(channel_mult) == 0:
            raise ValueError("channel_mult must have at least one level, got ()")
        num_res_blocks = positive_int(num_res_blocks, "num_res_blocks")
        num_heads = positive_int(num_heads, "num_heads")
        factor = 2 ** (len(channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size must be divisible by 2**(len(channel_mult)-1) = {factor} "
                             f"(channel_mult={channel_mult}); got image_size={self.image_size}")
        resolutions = [self.image_size // 2 ** i for i in range(len(channel_mult))]
        lowest = resolutions[-1]
        attn = (lowest,) if attn_resolutions is None else as_int_tuple(attn_resolutions, "attn_resolutions")
        for r in attn:
            if r not in resolutions:
                raise ValueError(f"attn_resolutions entries must be resolutions of this net {resolutions}; got {r}")
        for i, r in enumerate(resolutions):
            if (r in attn or r == lowest) and (channels * channel_mult[i]) % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide the {channels * channel_mult[i]} channels "
                                 f"at attention resolution {r}")
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.num_classes = None if num_classes is None else positive_int(num_classes, "num_classes")
        self._config: Dict[str, Any] = dict(
            name="UNet", in_channels=self.in_channels, image_size=self.image_size, channels=channels,
            channel_mult=list(channel_mult), num_res_blocks=num_res_blocks, attn_resolutions=list(attn),
            num_heads=num_heads, dropout=float(dropout), num_classes=self.num_classes)

        emb_dim = 4 * channels
        self.embed = SinusoidalEmbedding(channels if channels % 2 == 0 else channels + 1)
        self.emb_mlp = nn.Sequential(nn.Linear(self.embed.dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes is not None else None

        self.conv_in = nn.Conv2d(self.in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                stage = nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if resolutions[level] in attn:
                    stage.append(Attention(ch, num_heads))
                self.down.append(stage)
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch, num_heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                stage = nn.ModuleList([ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if resolutions[level] in attn:
                    stage.append(Attention(ch, num_heads))
                if level != 0 and i == num_res_blocks:
                    stage.append(Upsample(ch))
                self.up.append(stage)
        assert not skips
        self.norm_out = _gn(ch)
        self.conv_out = _zero(nn.Conv2d(ch, self.in_channels, 3, padding=1))

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, in_channels: int = 1, image_size: int = 8, num_classes: Optional[int] = None) -> "UNet":
        """A small U-Net for 8×8 digits on a CPU: 16 base channels, levels (1, 2) (16 channels at
        8×8, 32 at 4×4), one block per level, attention at 4×4 — 0.19 M parameters (unconditional,
        one channel). Forward + backward at batch 128 took 0.3 s on one thread of a loaded 2-core CPU."""
        return cls(in_channels, image_size, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(image_size // 2,), num_heads=4, dropout=0.0, num_classes=num_classes)

    @classmethod
    def cifar(cls, in_channels: int = 3, image_size: int = 32, num_classes: Optional[int] = None) -> "UNet":
        """DDPM's CIFAR-10 layout: 128 base channels, levels (1, 2, 2, 2) (32…4), two blocks per
        level, attention at 16×16, dropout 0.1 — 38.3 M parameters (for a GPU; DDPM's own is 35.7 M,
        the difference is the scale/shift conditioning)."""
        return cls(in_channels, image_size, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(image_size // 2,), num_heads=4, dropout=0.1, num_classes=num_classes)

    @property
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments plus ``"name"``; `build_net` inverts it."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_x(x, (self.in_channels, self.image_size, self.image_size),
                f"UNet(in_channels={self.in_channels}, image_size={self.image_size})")
        dtype = self.conv_in.weight.dtype
        c = F.silu(conditioning(self, x, noise_cond, label, dtype))
        h = self.conv_in(x.to(dtype))
        hs = [h]
        for stage in self.down:
            for layer in stage:
                h = layer(h, c)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, c)
        for stage in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in stage:
                h = layer(h, c)
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)
