r"""`MLPScoreNet`: a residual MLP for vector data, conditioned on the noise level and a label.

Architecture (pre-norm residual MLP):

$$
h_0 = W_{\rm in}x,\quad c = \mathrm{MLP}_{\rm emb}\big(\mathrm{emb}(u)\big) + E[y],\quad
h_{i+1} = h_i + W_{2,i}\,\phi\big(W_{1,i}\,\mathrm{LN}(h_i) + V_i\,\phi(c)\big),\quad
\mathrm{out} = W_{\rm out}\,\phi(\mathrm{LN}(h_L)),
$$

with $u$ = ``noise_cond`` ($\log\bar\sigma$, see `diffusion.nets.embeddings`), $\phi$ the
activation (SiLU by default), LN a LayerNorm (or the identity with ``norm=None``) and $E$ a label
table with ``num_classes + 1`` rows, the last being the null label.

**Zero initialisation.** $W_{\rm out}$ and every $W_{2,i}$ start at zero (weights and biases), as
in ADM (Dhariwal & Nichol 2021) and EDM's U-Nets: the network outputs exactly 0 at
initialisation (for an ε-prediction, the prior guess $E[\varepsilon] = 0$) and every residual
block starts as the identity, which keeps deep stacks stable at the first steps. The gradient
still reaches every parameter from the second optimiser step on.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ._inputs import activation, check_x, conditioning, positive_int
from .embeddings import noise_embedding

__all__ = ["MLPScoreNet"]

NORMS = ("layernorm", None)


def _norm(kind: Optional[str], width: int) -> nn.Module:
    return nn.LayerNorm(width) if kind == "layernorm" else nn.Identity()


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, norm: Optional[str], act: str):
        super().__init__()
        self.norm = _norm(norm, width)
        self.lin1 = nn.Linear(width, width)
        self.cond = nn.Linear(width, width)
        self.act = activation(act)
        self.lin2 = nn.Linear(width, width)
        nn.init.zeros_(self.lin2.weight)
        nn.init.zeros_(self.lin2.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.lin2(self.act(self.lin1(self.norm(h)) + self.cond(c)))


class MLPScoreNet(nn.Module):
    r"""Residual MLP $f(x, u, y)$ for data of shape ``(B, dim)``.

    Parameters
    ----------
    dim:
        Data dimension $d$.
    width:
        Hidden width.
    depth:
        Number of residual blocks.
    emb_dim:
        Features of the noise-condition embedding (even).
    embedding:
        ``"sinusoidal"`` (fixed geometric frequencies) or ``"fourier"`` (seeded Gaussian random
        frequencies); see `diffusion.nets.embeddings`.
    num_classes:
        ``None`` for an unconditional net, else the number of classes; labels ``0..num_classes-1``
        are classes and ``num_classes`` is the null label (``label=None``).
    activation:
        ``"silu"`` (default), ``"gelu"``, ``"relu"`` or ``"tanh"``.
    norm:
        ``"layernorm"`` (pre-norm, default) or ``None``.
    fourier_scale:
        Standard deviation of the Fourier frequencies (``embedding="fourier"`` only).
    fourier_seed:
        Seed of the Fourier frequencies (``embedding="fourier"`` only).

    Notes
    -----
    Called as ``net(x, noise_cond, label=None)`` with ``x`` of shape ``(B, dim)``, ``noise_cond``
    of shape ``(B,)`` (a 0-d tensor broadcasts) and ``label`` an int64 ``(B,)`` tensor or
    ``None``. The output has x's shape and dtype (the input is cast to the parameters' dtype and
    the output cast back). Wrong shapes, dtypes or labels raise ``ValueError``/``TypeError``
    naming the argument.

    Examples
    --------
    >>> import torch
    >>> net = MLPScoreNet(2, width=64, depth=2)
    >>> net(torch.randn(5, 2), torch.zeros(5)).shape
    torch.Size([5, 2])
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 4, emb_dim: int = 128,
                 embedding: str = "sinusoidal", num_classes: Optional[int] = None,
                 activation: str = "silu", norm: Optional[str] = "layernorm",
                 fourier_scale: float = 1.0, fourier_seed: int = 0):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        width = positive_int(width, "width")
        depth = positive_int(depth, "depth", minimum=0)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        self.num_classes = None if num_classes is None else positive_int(num_classes, "num_classes")
        self.embed = noise_embedding(embedding, emb_dim, fourier_scale, fourier_seed)
        self._config: Dict[str, Any] = dict(
            name="MLPScoreNet", dim=self.dim, width=width, depth=depth, emb_dim=int(emb_dim),
            embedding=embedding, num_classes=self.num_classes, activation=activation, norm=norm,
            fourier_scale=float(fourier_scale), fourier_seed=int(fourier_seed))
        self.emb_mlp = nn.Sequential(nn.Linear(emb_dim, width), _act(activation), nn.Linear(width, width))
        self.label_emb = nn.Embedding(self.num_classes + 1, width) if self.num_classes is not None else None
        self.inp = nn.Linear(self.dim, width)
        self.blocks = nn.ModuleList([_ResidualBlock(width, norm, activation) for _ in range(depth)])
        self.cond_act = _act(activation)
        self.out_norm = _norm(norm, width)
        self.out_act = _act(activation)
        self.out = nn.Linear(width, self.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments plus ``"name"``; `build_net` inverts it."""
        return dict(self._config)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_x(x, (self.dim,), "MLPScoreNet(dim=%d)" % self.dim)
        dtype = self.out.weight.dtype
        c = self.cond_act(conditioning(self, x, noise_cond, label, dtype))
        h = self.inp(x.to(dtype))
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.out_act(self.out_norm(h))).to(x.dtype)


def _act(name: str) -> nn.Module:
    return activation(name)
