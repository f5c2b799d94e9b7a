"""A DDPM-style conv U-Net used only by the GPU benchmarks (a realistic score-network cost).

ch=64, channel multipliers (1, 2, 2, 2), three residual blocks per level, self-attention at 16x16,
sinusoidal time embedding: 11.82M parameters for 3x32x32 inputs — the size of the
11.8M-parameter U-Net the issue's reference timings were taken with.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.n1 = nn.GroupNorm(32, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2 = nn.GroupNorm(32, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.t(F.silu(emb))[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n = nn.GroupNorm(32, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.n(x)).reshape(B, 3, C, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])[:, 0]
        return x + self.out(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, ch=64, mult=(1, 2, 2, 2), nres=3, attn_res=(16,), in_ch=3, res=32):
        super().__init__()
        temb = 4 * ch
        self.ch = ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        chans, c, r = [ch], ch, res
        for i, m in enumerate(mult):
            for _ in range(nres):
                blk = nn.ModuleList([ResBlock(c, ch * m, temb)])
                c = ch * m
                if r in attn_res:
                    blk.append(Attn(c))
                self.down.append(blk)
                chans.append(c)
            if i < len(mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                chans.append(c)
                r //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, temb), Attn(c), ResBlock(c, c, temb)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(nres + 1):
                blk = nn.ModuleList([ResBlock(c + chans.pop(), ch * m, temb)])
                c = ch * m
                if r in attn_res:
                    blk.append(Attn(c))
                self.up.append(blk)
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
                r *= 2
        self.outn = nn.GroupNorm(32, c)
        self.outc = nn.Conv2d(c, in_ch, 3, padding=1)

    def forward(self, x, t):
        emb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            if isinstance(blk[0], ResBlock):
                h = blk[0](h, emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:
                h = blk[0](h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = blk[0](torch.cat([h, hs.pop()], 1), emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:
                h = blk[1](blk[0](h))
        return self.outc(F.silu(self.outn(h)))


if __name__ == "__main__":
    net = UNet()
    print(sum(p.numel() for p in net.parameters()) / 1e6, "M params")
    print(net(torch.randn(2, 3, 32, 32), torch.rand(2)).shape)
