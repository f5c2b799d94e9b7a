r"""Two-sample metrics and their noise floors.

The energy distance (Székely & Rizzo) between samples $X \sim P$, $Y \sim Q$,

$$
    \mathcal E(P, Q) = 2E\|X - Y\| - E\|X - X'\| - E\|Y - Y'\| \ \ge 0,
$$

is zero iff P = Q. `energy_distance` returns the unbiased U-statistic estimate (which can
be slightly negative). A finite-sample statistic is only meaningful next to its *noise floor*:
the distribution of the same statistic between two independent samples of the target
(`noise_floor`).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["energy_distance", "mmd", "noise_floor"]

#: Default Gaussian-kernel bandwidths of `mmd`, for data of unit-ish scale (toy 2-D sets).
MMD_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _mean_pdist(a: torch.Tensor, b: torch.Tensor, same: bool, chunk: int = 2048) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], chunk):
        total = total + torch.cdist(a[i:i + chunk], b).sum()
    n, m = a.shape[0], b.shape[0]
    return total / (n * (n - 1) if same else n * m)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased estimate of the energy distance between the samples ``x`` (n, ...) and ``y`` (m, ...)."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must have the same event shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("x and y need at least 2 samples each")
    a = x.reshape(x.shape[0], -1).to(torch.float64)
    b = y.reshape(y.shape[0], -1).to(torch.float64)
    return float(2 * _mean_pdist(a, b, False) - _mean_pdist(a, a, True) - _mean_pdist(b, b, True))


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=MMD_BANDWIDTHS) -> float:
    r"""Maximum mean discrepancy with a sum of Gaussian kernels, biased (V-statistic) form, $\ge 0$.

    $\mathrm{MMD}^2 = \overline{k(x, x')} + \overline{k(y, y')} - 2\,\overline{k(x, y)}$ with
    $k(a, b) = \sum_h \exp(-\|a - b\|^2 / 2h^2)$ over ``bandwidths``; returns $\mathrm{MMD}$. Being
    biased, it is positive even between two samples of one law: compare it with its
    `noise_floor` (``stat=mmd``), never with 0.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must have the same event shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    hs = [float(h) for h in bandwidths]
    if not hs or any(not h > 0 for h in hs):
        raise ValueError(f"bandwidths must be positive numbers, got {bandwidths!r}")
    a = x.reshape(x.shape[0], -1).to(torch.float64)
    b = y.reshape(y.shape[0], -1).to(torch.float64)

    def k(u, v):
        d2 = torch.cdist(u, v).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)

    v = k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()
    return float(v.clamp_min(0.0).sqrt())


def noise_floor(sample: Callable[[int, torch.Generator], torch.Tensor], n: int, repeats: int = 10,
                stat: Callable[[torch.Tensor, torch.Tensor], float] = energy_distance,
                seed: int = 0) -> torch.Tensor:
    """``repeats`` values of ``stat`` between two independent draws of ``n`` samples from ``sample``.

    ``sample(n, generator)`` must draw exact samples of the target. Compare a solver's statistic
    with, e.g., the maximum or a high quantile of these values.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([stat(sample(n, g), sample(n, g)) for _ in range(repeats)], dtype=torch.float64)
