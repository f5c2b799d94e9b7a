r"""Evaluation against an exact density: the trainer's periodic check on toy data.

For data whose law is a Gaussian mixture $p_0$ (`diffusion.data` sets ``"mixture"`` and
``"mixture_nd"`` carry it as ``dataset.mixture``), the density of the data at $t_\varepsilon$ is
exact for any linear SDE (`sdekit.GaussianMixture.push`), so a trained model can be scored by

* the **exact-NLL gap** in nats per dimension,
  $\frac1d\,\overline{\log p_{t_\varepsilon}(x) - \log p^\theta_{t_\varepsilon}(x)}$ over held-out
  points $x \sim p_0$, with $\log p^\theta$ from the probability-flow ODE with exact divergence
  (`ScoreModel.log_likelihood`) and its standard error over the points; and
* a **sample metric**: the MMD (`sdekit.studies.mmd`) between model samples (PF ODE, adaptive
  dopri5) and fresh exact samples, reported beside its two-sample floor — the median MMD between
  two independent exact sample sets of the same size. A ratio near 1 means the metric cannot
  tell the model from the data at this sample size, not that they are equal.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from sdekit._validation import check_int, check_positive
from sdekit.studies import mmd, noise_floor

__all__ = ["ExactDensityEvaluator"]

F64 = torch.float64


class ExactDensityEvaluator:
    r"""``evaluate(model, ema_model, step) -> dict`` for `diffusion.Trainer` on mixture data.

    Parameters
    ----------
    mixture:
        The data law, an `sdekit.GaussianMixture` (e.g. ``dataset.mixture``).
    n_points:
        Held-out points for the NLL gap (drawn once, fixed seed).
    n_samples:
        Model and exact samples for the MMD (0 switches the sample metric off).
    t_eps, tol:
        Lower end of the likelihood / sampling interval and rtol = atol of the adaptive solves.
    floor_repeats:
        Exact-vs-exact pairs for the MMD floor (its median is reported).
    use_ema:
        Score the EMA network (default) or the raw one.
    seed:
        Seed of the held-out points, the prior draws and the floor.
    """

    def __init__(self, mixture, *, n_points: int = 256, n_samples: int = 1000, t_eps: float = 1e-5,
                 tol: float = 1e-5, floor_repeats: int = 5, use_ema: bool = True, seed: int = 0):
        if not hasattr(mixture, "push") or not hasattr(mixture, "sample"):
            raise TypeError(f"mixture must be an sdekit.GaussianMixture, got {type(mixture).__name__}")
        self.mixture = mixture
        self.n_points = check_int(n_points, "n_points", minimum=2)
        self.n_samples = check_int(n_samples, "n_samples", minimum=0)
        self.t_eps = check_positive(t_eps, "t_eps")
        self.tol = check_positive(tol, "tol")
        self.floor_repeats = check_int(floor_repeats, "floor_repeats", minimum=1)
        self.use_ema = bool(use_ema)
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        self.points = mixture.sample(self.n_points, generator=g)
        self._floor: Optional[float] = None

    def floor(self) -> float:
        """Median MMD between two independent exact sample sets of ``n_samples`` each (cached)."""
        if self._floor is None:
            vals = noise_floor(lambda n, g: self.mixture.sample(n, generator=g), self.n_samples,
                               repeats=self.floor_repeats, stat=mmd, seed=self.seed + 1)
            self._floor = float(vals.median())
        return self._floor

    def __call__(self, model, ema_model=None, step: int = 0) -> Dict[str, Any]:
        net = ema_model if (self.use_ema and ema_model is not None) else model
        sde, d = net.sde, self.points.shape[1]
        dtype = next((p.dtype for p in net.parameters()), F64)
        x = self.points.to(dtype=dtype)
        truth = self.mixture.push(sde, self.t_eps).log_prob(self.points.to(F64))
        res = net.log_likelihood(x, t_eps=self.t_eps, rtol=self.tol, atol=self.tol, divergence="exact")
        gap = (truth - res.log_prob.to(F64)) / d
        out = {"nll_gap": float(gap.mean()), "nll_gap_se": float(gap.std() / math.sqrt(gap.numel())),
               "nll_nfe": int(res.stats.nfe)}
        if self.n_samples:
            g = torch.Generator().manual_seed(self.seed + 2)
            x_T = sde.prior_sample((self.n_samples, d), generator=g).to(x.dtype)
            sol = net.sample(x_T=x_T, method="dopri5", rtol=self.tol, atol=self.tol, t_eps=self.t_eps)
            exact = self.mixture.sample(self.n_samples, generator=g)
            m, fl = mmd(sol.x.detach(), exact), self.floor()
            out.update({"mmd": m, "mmd_floor": fl, "mmd_over_floor": m / fl if fl > 0 else math.inf,
                        "sample_nfe": int(sol.stats.nfe)})
        return out
