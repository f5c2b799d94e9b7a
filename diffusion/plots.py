r"""Figures of the command line: samples over a density, trajectories, loss curves, error vs NFE,
image grids.

Every function takes plain tensors / lists and a path, draws with matplotlib's ``Agg`` backend (no
display needed) and writes the PNG atomically (a temporary file in the same folder, then
``os.replace``), so an interrupted run never leaves half a picture.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["density_grid", "scatter_over_density", "trajectories_plot", "loss_curve", "error_vs_nfe",
           "image_grid", "save_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically and close it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _plt().close(fig)
    return path


def density_grid(log_prob, lim: float, n: int = 160) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, Y, log p)`` on an ``n``×``n`` grid of $[-\\text{lim}, \\text{lim}]^2$ (``log_prob`` maps
    a float64 ``(m, 2)`` tensor to ``(m,)``)."""
    u = torch.linspace(-lim, lim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(u, u, indexing="xy")
    lp = log_prob(torch.stack([X.reshape(-1), Y.reshape(-1)], dim=1)).reshape(n, n)
    return X.numpy(), Y.numpy(), lp.detach().numpy()


def _contours(ax, grid, levels: int = 8) -> None:
    X, Y, lp = grid
    top = float(np.max(lp))
    # log-density contours from the mode down by 9 nats: the shape of every component
    ax.contour(X, Y, lp, levels=np.linspace(top - 9.0, top, levels), colors="0.55", linewidths=0.6,
               linestyles="solid")


def scatter_over_density(panels: Sequence[Tuple[str, torch.Tensor]], path, grid=None, lim: float = 3.2,
                         max_points: int = 2000, title: Optional[str] = None) -> Path:
    """One panel per ``(title, samples (n, 2))``, the density contours ``grid`` under each."""
    plt = _plt()
    k = len(panels)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[k:]:
        ax.axis("off")
    for ax, (name, x) in zip(axes.flat, panels):
        if grid is not None:
            _contours(ax, grid)
        xs = x[:max_points].detach().cpu().double().numpy()
        ax.scatter(xs[:, 0], xs[:, 1], s=1.5, alpha=0.5, color="C0", rasterized=True)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def trajectories_plot(paths: Sequence[Tuple[str, torch.Tensor, torch.Tensor]], path, grid=None,
                      lim: float = 3.2) -> Path:
    """Reverse-time paths ``(title, ts (K,), xs (K, n, 2))`` (K saved times from $T$ down to
    $t_\varepsilon$) over the contours of the data density (start points hollow, end points filled),
    and a last panel with the first coordinate of every path against $t$."""
    plt = _plt()
    k = len(paths)
    fig, axes = plt.subplots(1, k + 1, figsize=(3.6 * (k + 1), 3.6), squeeze=False)
    for ax, (name, _ts, traj) in zip(axes.flat, paths):
        if grid is not None:
            _contours(ax, grid)
        tr = traj.detach().cpu().double().numpy()
        for j in range(tr.shape[1]):
            ax.plot(tr[:, j, 0], tr[:, j, 1], lw=0.7, color=f"C{j % 10}", alpha=0.8)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=14, facecolors="none", edgecolors="k", linewidths=0.6,
                   label="$x_T$ (prior)", zorder=3)
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=10, color="k", label=r"$x_{t_\varepsilon}$", zorder=3)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(labelsize=7)
    ax = axes.flat[k]
    styles = ("-", ":", "--")
    for i, (name, ts, traj) in enumerate(paths):
        tr = traj.detach().cpu().double().numpy()
        t = ts.detach().cpu().double().numpy()
        for j in range(tr.shape[1]):
            ax.plot(t, tr[:, j, 0], styles[i % 3], lw=0.8, color=f"C{j % 10}", alpha=0.8,
                    label=name.split(" (")[0] if j == 0 else None)
    ax.invert_xaxis()
    ax.set_xscale("log")
    ax.set_xlabel("t (reverse time runs right)")
    ax.set_ylabel("$x_1$")
    ax.set_title("first coordinate against t", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def loss_curve(losses: Sequence[float], path, heldout: Optional[Sequence[Tuple[int, float]]] = None,
               window: int = 50, ylabel: str = "loss") -> Path:
    """Per-step training loss (light) with its moving average over ``window`` steps."""
    plt = _plt()
    y = np.asarray(losses, dtype=float)
    steps = np.arange(1, y.size + 1)
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    ax.plot(steps, y, color="C0", alpha=0.25, lw=0.6, label="per step")
    w = max(1, min(window, y.size))
    if y.size >= w:
        avg = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], avg, color="C0", lw=1.6, label=f"moving average ({w} steps)")
    if heldout:
        hs, hv = zip(*heldout)
        ax.plot(hs, hv, "o-", color="C3", ms=3, lw=1, label="held-out (EMA)")
    lo, hi = np.percentile(y, [1, 99]) if y.size else (0, 1)
    pad = 0.1 * (hi - lo + 1e-12)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def error_vs_nfe(curves: Dict[str, List[Tuple[float, float]]], path, *, floor: Optional[Tuple[float, float]] = None,
                 model_level: Optional[float] = None, ylabel: str = "MMD to exact samples",
                 flow_curves: Optional[Dict[str, List[Tuple[float, float]]]] = None,
                 flow_ylabel: str = "median |x - x_ref| (flow-map error)") -> Path:
    """Log-log error against NFE per sampler.

    ``floor = (median, q95)`` of the metric between two exact sample sets is drawn as a band: a
    point inside it cannot be told from exact samples at this sample size. ``model_level`` is the
    metric of the model's own converged sampler (a tight adaptive solve): below it no sampler can
    go, whatever its NFE. ``flow_curves`` (optional second panel) are pure solver errors of the
    deterministic samplers against a tight solve of the same model from the same $x_T$, where
    the observed order shows.
    """
    plt = _plt()
    two = bool(flow_curves)
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11.5 if two else 6.2, 4.0), squeeze=False)
    ax = axes[0, 0]
    for i, (name, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", ms=3.5, lw=1.2, label=name)
    if floor is not None:
        ax.axhspan(0.0, floor[1], color="0.85", zorder=0, label="two-sample floor (≤ 95% quantile)")
        ax.axhline(floor[0], color="0.5", lw=0.8, ls=":", zorder=0)
    if model_level is not None:
        ax.axhline(model_level, color="k", lw=0.9, ls="--", label="model, tight dopri5 (no solver error)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (score evaluations)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if two:
        ax2 = axes[0, 1]
        for i, (name, pts) in enumerate(flow_curves.items()):
            pts = sorted(p for p in pts if p[1] > 0)
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{list(curves).index(name)}"
                     if name in curves else f"C{i}", ms=3.5, lw=1.2, label=name)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("NFE (score evaluations)")
        ax2.set_ylabel(flow_ylabel)
        ax2.set_title("deterministic samplers vs a tight solve of the same model", fontsize=9)
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def image_grid(images: torch.Tensor, path, nrow: Optional[int] = None, title: Optional[str] = None) -> Path:
    """Images ``(n, C, H, W)`` with values in $[-1, 1]$ (clipped) as one grid."""
    plt = _plt()
    x = images.detach().cpu().float().clamp(-1, 1)
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    canvas = torch.ones(c, ncol * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    img = ((canvas + 1) / 2).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(0.45 * nrow + 0.6, 0.45 * ncol + 0.6))
    ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
