r"""What the derived dynamics need of a forward process, below both `processes` and `dynamics`.

`sdekit.dynamics` (reverse-time SDEs, the probability-flow ODE) works with any forward process
through this small interface and never imports `sdekit.processes`; `sdekit.processes` builds its
`reverse`/`probability_flow` methods on `sdekit.dynamics`. So the import graph is
``processes -> dynamics -> _process_base``, without a circle.
"""

from __future__ import annotations

import torch

from ._validation import TimeLike, broadcast_to_data

__all__ = ["apply_diffusion", "PublicCoefficients", "ProcessBase"]


def apply_diffusion(noise: str, G: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """$G v$ for a diffusion coefficient ``G`` in the layout of ``noise`` (see `sdekit.processes`)."""
    if noise == "isotropic":
        return broadcast_to_data(G, x) * v
    if noise == "diagonal":
        return G * v
    return torch.einsum("bij,bj->bi", G, v)


class PublicCoefficients:
    """Validated public ``drift(x, t)`` / ``diffusion(x, t)`` over the unvalidated ``_drift`` /
    ``_diffusion`` that solvers call (shared by forward and reverse-time processes)."""

    def drift(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Drift at ``(x, t)``, shaped like ``x`` (in actual time: integrating towards smaller t
        uses ``dx = drift * dt`` with dt < 0)."""
        x, t64 = self._check_xt(x, t)
        return self._drift(x, t64)

    def diffusion(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Diffusion coefficient at ``(x, t)`` in the layout of the noise kind (see `sdekit.processes`)."""
        x, t64 = self._check_xt(x, t)
        return self._diffusion(x, t64)


class ProcessBase(PublicCoefficients):
    """Base of every forward process (`sdekit.SDE` and its subclasses).

    Subclasses provide ``T``, ``noise`` (``"isotropic"``, ``"diagonal"`` or ``"general"``),
    ``state_dependent_noise``, ``diffusion_divergence`` (a callable or None) and the unvalidated
    ``_drift(x, t64)``, ``_diffusion(x, t64)``, ``_diffusion_matrix_action(x, t64, v)``,
    ``_noise_increment(x, t64, dW)`` and ``_check_xt(x, t)`` that the dynamics and the solvers call.
    """
