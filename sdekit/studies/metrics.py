r"""Two-sample metrics, accuracy metrics of solver studies, and their noise floors.

The energy distance (Székely & Rizzo) between samples $X \sim P$, $Y \sim Q$,

$$
    \mathcal E(P, Q) = 2E\|X - Y\| - E\|X - X'\| - E\|Y - Y'\| \ \ge 0,
$$

is zero iff P = Q. `energy_distance` returns the unbiased U-statistic estimate (which can
be slightly negative). A finite-sample statistic is only meaningful next to its *noise floor*:
the distribution of the same statistic between two independent samples of the target
(`noise_floor`).

The accuracy metrics of `sdekit.studies.work_precision`: `strong_error` (pathwise, against a
same-noise reference), `weak_error` (moments, with its Monte Carlo floor), `sliced_wasserstein`,
`nll_error` (cross-entropy against an exact density, with its floor) and `mode_occupancy`
(with `mode_occupancy_floor`); `roundoff_floor` is the floor of an exact reference.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

import torch

__all__ = ["energy_distance", "mmd", "noise_floor", "per_sample_error", "strong_error", "weak_error",
           "sliced_wasserstein", "nll_error", "mode_assignments", "mode_occupancy", "mode_occupancy_floor",
           "roundoff_floor", "FLOOR_Z", "FLOOR_QUANTILE"]

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


# ------------------------------------------------------------------------------------------------
# accuracy metrics of a study, each with its noise floor
# ------------------------------------------------------------------------------------------------
#: Width of the Monte Carlo floors of mean-type metrics (``weak``, ``nll``): ``FLOOR_Z`` standard
#: errors. For a Gaussian estimate a metric with zero true value exceeds it with probability 0.3 %.
FLOOR_Z = 3.0
#: Quantile of the resampled two-sample floors (``sliced_wasserstein``, ``mmd``, ``modes``).
FLOOR_QUANTILE = 0.95
#: Round-off floor of an exact (closed-form) reference: this many units of the dtype's epsilon,
#: relative to the root-mean-square size of the reference.
ROUNDOFF_ULPS = 100.0
#: Random projections of `sliced_wasserstein` (drawn from a fixed seed: the same directions for
#: every method, so differences between methods are not projection noise).
SW_PROJECTIONS = 128
SW_SEED = 12345


def _flat64(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    out = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contains non-finite values")
    return out


def _same_shape(x: torch.Tensor, ref: torch.Tensor) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"x and ref must have the same shape (one reference per sample), got "
                         f"{tuple(x.shape)} and {tuple(ref.shape)}")


def per_sample_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    r"""Per-sample error $e_i = \|x_i - x^{\rm ref}_i\|_2/\sqrt d$, shape ``(n,)`` (float64)."""
    _same_shape(x, ref)
    a, b = _flat64(x, "x"), _flat64(ref, "ref")
    return (a - b).norm(dim=1) / math.sqrt(a.shape[1])


def strong_error(x: torch.Tensor, ref: torch.Tensor, reduce: str = "rms") -> float:
    r"""Strong (pathwise) error against a reference from the same start points and noise.

    $\big(\tfrac1n\sum_i e_i^2\big)^{1/2}$ (``reduce="rms"``, the strong error of SDE theory,
    $E[\|X_N - X(T)\|^2]^{1/2}$ per coordinate), or the median / mean of
    $e_i = \|x_i - x^{\rm ref}_i\|/\sqrt d$ (``"median"``: the flow-map error of an ODE solve), or
    their maximum (``"max"``).
    """
    e = per_sample_error(x, ref)
    if reduce == "rms":
        return float(e.pow(2).mean().sqrt())
    if reduce == "median":
        return float(e.median())
    if reduce == "mean":
        return float(e.mean())
    if reduce == "max":
        return float(e.max())
    raise ValueError(f"reduce must be 'rms', 'median', 'mean' or 'max', got {reduce!r}")


def _moment_diffs(x: torch.Tensor, y: torch.Tensor, paired: bool, moments: Sequence[int]):
    """Per moment k: the coordinatewise difference of the means of $x^k$ and $y^k$ and its
    standard error (paired: from the differences; else from both samples)."""
    out = []
    for k in moments:
        a, b = x.pow(k), y.pow(k)
        if paired:
            dif = a - b
            out.append((dif.mean(0), dif.std(0, unbiased=True) / math.sqrt(dif.shape[0])))
        else:
            se = (a.var(0, unbiased=True) / a.shape[0] + b.var(0, unbiased=True) / b.shape[0]).sqrt()
            out.append((a.mean(0) - b.mean(0), se))
    return out


def weak_error(x: torch.Tensor, y: torch.Tensor, moments: Sequence[int] = (1, 2), paired: bool = False,
               z: float = FLOOR_Z) -> Tuple[float, float]:
    r"""Weak error on moments and its Monte Carlo floor: ``(error, floor)``.

    $\max_k \mathrm{RMS}_j\,\big|\overline{x_j^k} - \overline{y_j^k}\big|$ over the ``moments``
    $k$ (coordinatewise powers, RMS over the $d$ coordinates $j$). ``paired=True`` when
    ``y[i]`` is the reference of ``x[i]`` (same start point and noise): the standard error then
    comes from the differences (much smaller). The floor is ``z`` standard errors (same
    reduction): below it the error is not resolved by this many samples.
    """
    if paired:
        _same_shape(x, y)
    a, b = _flat64(x, "x"), _flat64(y, "y")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"x and y must have the same event size, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("weak_error needs at least 2 samples in x and y")
    ks = [int(k) for k in moments]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"moments must be positive integers, got {moments!r}")
    vals, floors = [], []
    for dif, se in _moment_diffs(a, b, paired, ks):
        vals.append(float(dif.pow(2).mean().sqrt()))
        floors.append(float(z * se.pow(2).mean().sqrt()))
    i = max(range(len(vals)), key=lambda j: vals[j] - floors[j])
    return vals[i], floors[i]


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = SW_PROJECTIONS,
                       seed: int = SW_SEED) -> float:
    r"""Sliced 2-Wasserstein distance $\big(E_\theta W_2^2(\theta^\top x, \theta^\top y)\big)^{1/2}$.

    Directions $\theta$ uniform on the sphere (``projections`` of them, from ``seed``); the 1-D
    $W_2$ between the projected empirical laws is computed from their quantile functions on
    a common grid of $\max(n, m)$ levels. Biased upwards by sampling noise: compare it with
    its `noise_floor` (``stat=sliced_wasserstein``).
    """
    a, b = _flat64(x, "x"), _flat64(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same event size, got {a.shape[1]} and {b.shape[1]}")
    projections = int(projections)
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    g = torch.Generator().manual_seed(int(seed))
    th = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    th = th / th.norm(dim=0, keepdim=True)
    pa, pb = (a @ th).sort(dim=0).values, (b @ th).sort(dim=0).values
    if pa.shape[0] != pb.shape[0]:
        q = (torch.arange(max(pa.shape[0], pb.shape[0]), dtype=torch.float64) + 0.5) / max(pa.shape[0], pb.shape[0])
        pa, pb = (p[(q * p.shape[0]).long().clamp_max(p.shape[0] - 1)] for p in (pa, pb))
    return float((pa - pb).pow(2).mean().sqrt())


def nll_error(x: torch.Tensor, y: torch.Tensor, log_prob: Callable[[torch.Tensor], torch.Tensor],
              paired: bool = False, z: float = FLOOR_Z) -> Tuple[float, float]:
    r"""Error of the cross-entropy against the exact density, and its floor: ``(error, floor)``.

    $\big|\overline{-\log p(x)} - \overline{-\log p(y)}\big|$ with ``log_prob`` the exact log
    density of the target law and ``y`` exact (or reference) samples: a weak error on the test
    function $-\log p$, zero when ``x`` has the target law. Floor: ``z`` standard errors.
    """
    lx = -log_prob(x).detach().to("cpu", torch.float64).reshape(-1, 1)
    ly = -log_prob(y).detach().to("cpu", torch.float64).reshape(-1, 1)
    if not (bool(torch.isfinite(lx).all()) and bool(torch.isfinite(ly).all())):
        raise ValueError("log_prob returned non-finite values")
    (dif, se), = _moment_diffs(lx, ly, paired, (1,))
    return float(dif.abs()), float(z * se)


def mode_assignments(x: torch.Tensor, mixture) -> torch.Tensor:
    r"""Index of the most probable component $\arg\max_k \pi_k\,\mathcal N(x; \mu_k, \Sigma_k)$ of a
    `sdekit.GaussianMixture` for each sample, shape ``(n,)``."""
    from ..oracles import GaussianMixture

    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a sdekit.GaussianMixture, got {type(mixture).__name__}")
    xs = x.detach().to("cpu", torch.float64)
    means, covs, logw = mixture.means, mixture.covs, mixture.weights.log()
    cols = [logw[k] + GaussianMixture([1.0], means[k:k + 1], covs[k:k + 1]).log_prob(xs)
            for k in range(mixture.n_components)]
    return torch.stack(cols, dim=1).argmax(dim=1)


def mode_occupancy(x: torch.Tensor, mixture) -> Tuple[float, torch.Tensor]:
    r"""Total-variation distance between the share of samples in each mode and the weights.

    Returns ``(tv, shares)`` with $\mathrm{TV} = \tfrac12\sum_k |\hat n_k/n - \pi_k|$ (0: every
    mode holds its share; a sampler that drops a mode scores at least its weight) and the
    ``(K,)`` shares. Its noise floor is `mode_occupancy_floor`.
    """
    k = mode_assignments(x, mixture)
    shares = torch.bincount(k, minlength=mixture.n_components).to(torch.float64) / k.numel()
    return float(0.5 * (shares - mixture.weights).abs().sum()), shares


def mode_occupancy_floor(mixture, n: int, repeats: int = 200, quantile: float = FLOOR_QUANTILE,
                         seed: int = 0) -> float:
    """``quantile`` of the occupancy TV of ``n`` exact multinomial draws of the mixture's labels
    (the value an exact sampler reaches by chance; assignment errors of overlapping modes are
    not included)."""
    g = torch.Generator().manual_seed(seed)
    w = mixture.weights
    tvs = []
    for _ in range(int(repeats)):
        lab = torch.multinomial(w, int(n), replacement=True, generator=g)
        sh = torch.bincount(lab, minlength=w.numel()).to(torch.float64) / n
        tvs.append(float(0.5 * (sh - w).abs().sum()))
    return float(torch.tensor(tvs).quantile(quantile))


def roundoff_floor(ref: torch.Tensor) -> float:
    """Floor of a strong error against an exact reference: `ROUNDOFF_ULPS` units of the
    reference dtype's epsilon times its RMS size."""
    r = _flat64(ref, "ref")
    eps = torch.finfo(ref.dtype).eps if ref.is_floating_point() else torch.finfo(torch.float64).eps
    return float(ROUNDOFF_ULPS * eps * r.pow(2).mean().sqrt().clamp_min(1.0))
