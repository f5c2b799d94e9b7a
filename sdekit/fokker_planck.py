r"""Fokker–Planck residual of a candidate log density under a forward SDE, by exact autograd.

For $dx = F(x,t)\,dt + G(x,t)\,dW$ with $D = GG^\top$, the marginal density solves
$\partial_t p = -\nabla\cdot(Fp) + \tfrac12\sum_{ij}\partial_i\partial_j(D_{ij}p)$. Dividing by
$p$ and writing $\ell = \log p$ (see *Concepts*, section 8),

$$
    \mathcal R(x, t) = \partial_t\ell + \nabla\cdot F + F\cdot\nabla\ell
    - \frac12\sum_{i,j}\Big[\partial_i\partial_j D_{ij} + 2\,\partial_i D_{ij}\,\partial_j\ell
    + D_{ij}\big(\partial_i\partial_j\ell + \partial_i\ell\,\partial_j\ell\big)\Big],
$$

which vanishes identically for the true marginals $p_t$, and for a stationary density
$\pi$ of a time-homogeneous SDE (with $\partial_t\ell = 0$). All derivatives are exact
(autograd): $d$ backward passes for the Hessian and the drift divergence, and $d$ (diagonal
noise) or $d^2$ (general noise) more for the derivatives of $D$ — meant for small d.
"""

from __future__ import annotations

from typing import Callable

import torch

from .processes import SDE
from ._validation import TimeLike, check_callable, check_state, check_time_range, time_for

__all__ = ["fokker_planck_residual"]


def _grad(y: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Gradient of ``y.sum()`` w.r.t. ``x`` (zeros when ``y`` does not depend on ``x``)."""
    if not y.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True, create_graph=create_graph,
                               allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def fokker_planck_residual(sde, log_density: Callable, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
    r"""Per-sample Fokker–Planck residual $\mathcal R(x, t)$ of ``log_density`` under ``sde``.

    $$
        \mathcal R = \frac{\partial_t p + \nabla\cdot(Fp) - \frac12\sum_{ij}\partial_i\partial_j(D_{ij}p)}{p},
        \qquad D = GG^\top,
    $$

    computed in log form (see module docs) by exact autograd.

    Parameters
    ----------
    sde:
        A `sdekit.SDE` (linear or general; noise ``"isotropic"``, ``"diagonal"`` — G may
        depend on x — or ``"general"`` ``(B, d, m)`` matrices).
    log_density:
        ``log_density(x, t) -> (B,)``: the candidate $\log p_t(x)$ (normalisation constants
        do not matter). It receives ``x`` (requiring grad) and ``t`` as a ``(B,)`` tensor in x's
        dtype (requiring grad) and must be differentiable twice in x and once in t; a function
        that ignores t is treated as stationary ($\partial_t\ell = 0$). Samples must not
        interact (row b of the output depends only on row b of x); the same holds for the SDE's
        drift and diffusion.
    x:
        Points, ``(B, d)`` (any ``(B, ...)`` for isotropic/diagonal noise; general noise needs 2-d).
    t:
        A float, a 0-d tensor or a ``(B,)`` tensor of times in ``[0, T]``.

    Returns
    -------
    torch.Tensor
        ``(B,)`` tensor (x's dtype, detached): the residual at each point.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a sdekit.SDE, got {type(sde).__name__}")
    check_callable(log_density, "log_density", "(x, t) -> (B,) tensor")
    x = check_state(x, "x")
    t64 = time_for(t, x)
    check_time_range(t64, sde.T)
    if sde.noise == "general" and x.dim() != 2:
        raise ValueError(f"general noise needs x of shape (B, d); got {tuple(x.shape)}")
    B = x.shape[0]
    n = int(x[0].numel())

    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        tr = t64.detach().to(x.dtype).expand(B).clone().requires_grad_(True)
        ell = log_density(xr, tr)
        if not isinstance(ell, torch.Tensor) or ell.shape != (B,):
            raise ValueError(f"log_density(x, t) must return a tensor of shape ({B},), got "
                             f"{getattr(ell, 'shape', type(ell).__name__)}")
        if not ell.requires_grad:
            gx, gt = torch.zeros_like(xr), torch.zeros_like(tr)
        else:
            gx, gt = torch.autograd.grad(ell.sum(), (xr, tr), create_graph=True, allow_unused=True)
            gx = torch.zeros_like(xr) if gx is None else gx
            gt = torch.zeros_like(tr) if gt is None else gt
        gxf = gx.reshape(B, n)

        # Drift and its divergence.
        F = sde._drift(xr, t64)
        Ff = F.reshape(B, n)
        div_F = torch.zeros(B, dtype=x.dtype, device=x.device)
        for i in range(n):
            div_F = div_F + _grad(Ff[:, i], xr, False).reshape(B, n)[:, i]

        # Diffusion matrix D = G G^T, its row divergence v_j = sum_i d_i D_ij (D symmetric) and
        # sum_ij d_i d_j D_ij = sum_j d_j v_j; and the contraction sum_ij D_ij (H_ij + g_i g_j).
        G = sde._diffusion(xr, t64)
        if sde.noise == "general":
            D = torch.einsum("bik,bjk->bij", G, G)
            v = torch.zeros(B, n, dtype=x.dtype, device=x.device)
            if D.requires_grad:
                for i in range(n):
                    for j in range(n):
                        v[:, i] = v[:, i] + _grad(D[:, i, j], xr, True)[:, j]
            contraction = torch.einsum("bij,bi,bj->b", D, gxf, gxf)
            for i in range(n):
                Hi = _grad(gxf[:, i], xr, False).reshape(B, n)
                contraction = contraction + (D[:, i, :] * Hi).sum(-1)
        else:
            if sde.noise == "isotropic":
                Dd = (G * G).reshape(B, 1).expand(B, n)
            else:
                Dd = (G * G).reshape(B, n)
            v = torch.zeros(B, n, dtype=x.dtype, device=x.device)
            if Dd.requires_grad:
                for i in range(n):
                    v[:, i] = _grad(Dd[:, i], xr, True).reshape(B, n)[:, i]
            contraction = (Dd * gxf * gxf).sum(-1)
            for i in range(n):
                Hii = _grad(gxf[:, i], xr, False).reshape(B, n)[:, i]
                contraction = contraction + Dd[:, i] * Hii
        dd_D = torch.zeros(B, dtype=x.dtype, device=x.device)
        if v.requires_grad:
            for j in range(n):
                dd_D = dd_D + _grad(v[:, j], xr, False).reshape(B, n)[:, j]

        R = (gt + div_F + (Ff * gxf).sum(-1)
             - 0.5 * (dd_D + 2.0 * (v * gxf).sum(-1) + contraction))
    return R.detach()
