r"""A Brownian path shared between solves, for strong-error studies.

`BrownianPath` draws $W$ on a fine uniform grid once; the increment over any step
whose ends are fine-grid points is the exact sum of the fine increments, so solves with 8, 16,
32 ... steps are driven by the *same* path (what a strong-order test needs). Pass it to
`sdekit.solve` as ``brownian=``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["BrownianPath"]


class BrownianPath:
    """Standard Brownian motion of shape ``shape`` on ``[min(t0,t1), max(t0,t1)]``, sampled at
    ``n_fine + 1`` equally spaced times.

    ``increment(t, s)`` returns $W(s) - W(t)$ for grid-aligned ``t``, ``s`` (either order;
    for reverse-time solves the sign convention does not matter in law, but a path is only
    "shared" if every solve uses the same ends). Raises ``ValueError`` for unaligned times.
    """

    def __init__(self, shape: Sequence[int], t0: float, t1: float, n_fine: int,
                 generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64,
                 device=None):
        if isinstance(n_fine, bool) or not isinstance(n_fine, int) or n_fine < 1:
            raise ValueError(f"n_fine must be a positive integer, got {n_fine!r}")
        if t0 == t1:
            raise ValueError(f"t0 and t1 must differ, both are {t0!r}")
        self.lo, self.hi = float(min(t0, t1)), float(max(t0, t1))
        self.n, self.h = n_fine, (self.hi - self.lo) / n_fine
        self.shape = tuple(shape)
        dW = torch.randn((n_fine, *self.shape), generator=generator, dtype=torch.float64) * self.h ** 0.5
        W = torch.cat([torch.zeros((1, *self.shape), dtype=torch.float64), torch.cumsum(dW, 0)])
        self.W = W.to(dtype=dtype, device=device)

    def _index(self, t: float) -> int:
        u = (float(t) - self.lo) / self.h
        k = round(u)
        if abs(u - k) > 1e-6 or k < 0 or k > self.n:
            raise ValueError(f"time {t!r} is not on this BrownianPath's grid (spacing {self.h:.6g} on "
                             f"[{self.lo}, {self.hi}]); choose steps that divide n_fine={self.n}")
        return k

    def increment(self, t: float, s: float) -> torch.Tensor:
        """$W(s) - W(t)$ (shape ``shape``)."""
        return self.W[self._index(s)] - self.W[self._index(t)]
