r"""Embeddings of the noise condition and of class labels.

The networks are conditioned on the noise level through $u = \log\bar\sigma = -\lambda/2$, where
$\lambda = \log(m^2/\sigma^2)$ is the log-SNR of the forward kernel (see `docs/concepts.md`,
section 2) and $\bar\sigma = \sigma/m$ is the noise level of the rescaled state $x_t/m$. The
caller (`diffusion.ScoreModel`) computes $u$ from the kernel; the network never sees raw t, so
the same network means the same thing under any linear process. For the processes in sdekit and
usual $t_\varepsilon$, $u$ lies roughly in $[-10, 10]$ (VP with $\beta \in [0.1, 20]$:
$u \approx -6.9$ at $t = 10^{-5}$ and $\approx 4.8$ at $t = 1$; VE with
$\sigma \in [0.01, 50]$: $u \in [-4.6, 3.9]$).

Two embeddings map $u$ to features:

* `SinusoidalEmbedding`: $[\sin(\omega_k u), \cos(\omega_k u)]_{k=1}^{D/2}$ with frequencies
  geometrically spaced from $\omega_{\min} = 1/16$ to $\omega_{\max} = 16$ (radians per unit of
  $u$). Why these: the lowest frequency is monotone over the whole range,
  $|\omega_{\min}u| \le 10/16 < \pi/2$ for $|u| \le 10$, so the features tell every noise level
  apart without aliasing; the highest has period $2\pi/16 \approx 0.39$, so a change of
  $\bar\sigma$ by 5 % ($\Delta u \approx 0.05$) turns its phase by 0.8 rad — finer than any
  sampler's step in $u$.
* `GaussianFourierEmbedding` (Tancik et al. 2020; used on $\log\sigma$ by Song et al. 2021):
  $[\sin(2\pi w_k u), \cos(2\pi w_k u)]$ with $w_k \sim N(0, s^2)$ drawn once from a seeded
  generator and kept as a buffer (so a state_dict restores it, and the same config rebuilds it).
  The default $s = 1$ gives typical frequencies $2\pi s\cdot 0.67 \approx 4$ rad per unit of $u$,
  inside the sinusoidal range; NCSN++'s $s = 16$ is far higher than needed for $|u| \le 10$.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._inputs import positive_int

__all__ = ["SinusoidalEmbedding", "GaussianFourierEmbedding", "noise_embedding", "EMBEDDINGS",
           "SINUSOIDAL_MIN_FREQ", "SINUSOIDAL_MAX_FREQ"]

#: Lowest sinusoidal frequency: $|\omega u| < \pi/2$ for $|u| \le 10$ (monotone, no aliasing).
SINUSOIDAL_MIN_FREQ = 1.0 / 16.0
#: Highest sinusoidal frequency: period $2\pi/16 \approx 0.39$ in $u = \log\bar\sigma$.
SINUSOIDAL_MAX_FREQ = 16.0


def _even_dim(dim, name: str) -> int:
    dim = positive_int(dim, name, minimum=2)
    if dim % 2:
        raise ValueError(f"{name} must be even (sin and cos pairs), got {dim}")
    return dim


class SinusoidalEmbedding(nn.Module):
    r"""$u \mapsto [\sin(\omega_k u), \cos(\omega_k u)]_k$, $\omega_k$ geometric in $[\omega_{\min}, \omega_{\max}]$.

    Parameters
    ----------
    dim:
        Output features (even).
    min_freq:
        Lowest frequency in radians per unit of $u$ (default `SINUSOIDAL_MIN_FREQ`; see the
        module notes for why).
    max_freq:
        Highest frequency in radians per unit of $u$ (default `SINUSOIDAL_MAX_FREQ`).

    Notes
    -----
    Computed in float32 whatever the input dtype (|ω u| ≤ 160 keeps float32 phases accurate to
    about 1e-5 rad).
    """

    def __init__(self, dim: int, min_freq: float = SINUSOIDAL_MIN_FREQ, max_freq: float = SINUSOIDAL_MAX_FREQ):
        super().__init__()
        self.dim = _even_dim(dim, "emb_dim")
        if not (0 < float(min_freq) <= float(max_freq) < math.inf):
            raise ValueError(f"need 0 < min_freq <= max_freq < inf, got min_freq={min_freq!r}, max_freq={max_freq!r}")
        half = self.dim // 2
        if half == 1:
            freqs = torch.tensor([float(min_freq)])
        else:
            freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), half, dtype=torch.float64))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        arg = u.float()[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class GaussianFourierEmbedding(nn.Module):
    r"""Random Fourier features $u \mapsto [\sin(2\pi w u), \cos(2\pi w u)]$, $w \sim N(0, s^2)$ fixed.

    Parameters
    ----------
    dim:
        Output features (even).
    scale:
        $s$, the standard deviation of the frequencies (cycles per unit of $u$).
    seed:
        Seed of the generator that draws $w$ (the buffer is also saved in the state_dict).
    """

    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        self.dim = _even_dim(dim, "emb_dim")
        if not (0 < float(scale) < math.inf):
            raise ValueError(f"fourier_scale must be positive and finite, got {scale!r}")
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        w = torch.randn(self.dim // 2, generator=g, dtype=torch.float32, device="cpu") * float(scale)
        self.register_buffer("w", w)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        arg = (2.0 * math.pi) * u.float()[:, None] * self.w[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


EMBEDDINGS = ("sinusoidal", "fourier")


def noise_embedding(kind: str, dim: int, fourier_scale: float = 1.0, seed: int = 0) -> nn.Module:
    """The noise-condition embedding by name: ``"sinusoidal"`` or ``"fourier"``."""
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return GaussianFourierEmbedding(dim, scale=fourier_scale, seed=seed)
    raise ValueError(f"embedding must be one of {list(EMBEDDINGS)}, got {kind!r}")
