r"""Time grids for fixed-step solvers.

Every grid runs from ``t_start`` to ``t_end`` (either direction), is float64, hits both ends
exactly, and is computed in closed form per index (``t0 + i*h``, never accumulated):

- ``"uniform"``: $t_i = t_0 + i\,h$, $h = (t_1 - t_0)/N$.
- ``"log_snr"``: uniform in $\lambda = \log(m^2/\sigma^2)$, mapped back with the kernel's inverse.
- ``"edm"``: Karras et al.'s $\rho$-schedule in $\bar\sigma = \sigma/m = e^{-\lambda/2}$,
  $\bar\sigma_i = (\bar\sigma_0^{1/\rho} + \tfrac{i}{N}(\bar\sigma_N^{1/\rho} - \bar\sigma_0^{1/\rho}))^\rho$.
- ``"quadratic"``: $t_i = t_1 + (t_0 - t_1)(1 - i/N)^2$ (DDIM's quadratic: dense near ``t_end``).
- a tensor: used as given (validated: strictly monotone, finite).
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["make_grid", "GRID_KINDS"]

GRID_KINDS = ("uniform", "log_snr", "edm", "quadratic")
F64 = torch.float64


def make_grid(kind: Union[str, torch.Tensor], t_start: float, t_end: float, steps: int, sde=None,
              rho: float = 7.0) -> torch.Tensor:
    """Return the ``(steps + 1,)`` float64 grid of kind ``kind`` from ``t_start`` to ``t_end``.

    ``"log_snr"`` and ``"edm"`` need a linear ``sde`` (its kernel's log-SNR and inverse).
    """
    if isinstance(kind, torch.Tensor):
        g = kind.detach().to("cpu", F64).flatten()
        if g.numel() < 2 or not bool(torch.isfinite(g).all()):
            raise ValueError(f"grid must hold >= 2 finite times, got {g.tolist()[:8]}")
        d = torch.diff(g)
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("grid must be strictly monotone")
        return g
    if kind not in GRID_KINDS:
        raise ValueError(f"grid must be one of {GRID_KINDS} or a tensor of times, got {kind!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    i = torch.arange(steps + 1, dtype=F64)
    t0, t1 = float(t_start), float(t_end)
    if kind == "uniform":
        g = t0 + i * ((t1 - t0) / steps)
    elif kind == "quadratic":
        g = t1 + (t0 - t1) * (1.0 - i / steps) ** 2
    else:
        if sde is None or not getattr(sde, "is_linear", False):
            raise ValueError(f"grid={kind!r} needs a linear SDE (its log-SNR); got {type(sde).__name__}")
        k = sde.kernel
        lam0, lam1 = (float(k.log_snr(torch.tensor(t, dtype=F64))) for t in (t0, t1))
        if kind == "log_snr":
            lam = lam0 + i * ((lam1 - lam0) / steps)
        else:
            rho = float(rho)
            if not rho > 0:
                raise ValueError(f"rho must be positive, got {rho}")
            s0, s1 = torch.tensor([lam0, lam1], dtype=F64).mul(-0.5).exp().tolist()
            sig = (s0 ** (1 / rho) + i / steps * (s1 ** (1 / rho) - s0 ** (1 / rho))) ** rho
            lam = -2.0 * torch.log(sig)
        g = k.t_from_log_snr(lam)
    g[0], g[-1] = t0, t1
    return g
