r"""Inverse problems with known coordinates (inpainting): replacement and reconstruction guidance.

The observation is $y = Mx$: the coordinates selected by a boolean ``mask`` (shaped like one
sample) are known. Two approximate samplers of $p(x \mid y)$ built on an unconditional score:

* **replacement** (Song et al. 2021, "imputation"; `replacement_sample`): integrate the reverse
  problem step by step, and after every step overwrite the known coordinates with a fresh draw of
  the forward kernel, $x_{t,k} \leftarrow m(t)\,y + \sigma(t)\,\varepsilon$. The unknown
  coordinates then follow the unconditional score evaluated at a state whose known part is
  *independent* of them; this ignores the correlation between $x_{t,u}$ and $x_{t,k}$ given $y$,
  so the result is biased whenever the data couple the two (``docs/guidance.md``).
* **reconstruction guidance** (Ho et al. 2022; Chung et al. 2023's DPS; `ReconstructionGuidance`):
  add to the score a Gaussian approximation of $\nabla_x\log p_t(y \mid x_t)$ through Tweedie's
  $\hat x_0(x_t) = (x_t + \sigma^2 s)/m$ (`sdekit.parameterization.tweedie_mean`),

$$
\tilde s = s - \nabla_x\,\frac{\|y - M\hat x_0(x)\|^2}{2\,r_t^2},
$$

  with $r_t^2$ = ``obs_var`` + the variance of $x_0$ given $x_t$ assumed by ``variance``. A score
  transform: every solver samples it unchanged.

Both are compared with the exact posterior of a Gaussian mixture (`sdekit.GaussianMixture.condition`)
in ``tests/test_guidance.py`` and ``docs/guidance.md``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ._validation import broadcast_to_data, check_choice, check_generator, check_positive, check_state, short
from .guidance import GuidedScore
from .parameterization import tweedie_mean

__all__ = ["Observation", "replacement_sample", "ReconstructionGuidance", "reconstruction_guidance",
           "VARIANCES"]

F64 = torch.float64

#: How `ReconstructionGuidance` models $\mathrm{Var}[x_0 \mid x_t]$ per coordinate.
VARIANCES = ("sigma_bar", "pigdm")


class Observation:
    r"""Known coordinates $y = Mx$: a boolean ``mask`` over one sample's coordinates and the values.

    Parameters
    ----------
    mask:
        Boolean tensor of the event shape (``True`` = known), with at least one known and one
        unknown coordinate.
    y:
        The observed data, shaped like one sample (``event_shape``) or a batch ``(B, *event_shape)``;
        entries where ``mask`` is ``False`` are ignored.
    """

    def __init__(self, mask: torch.Tensor, y: torch.Tensor):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor shaped like one sample, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        n = int(mask.sum())
        if n == 0 or n == mask.numel():
            raise ValueError(f"mask must mark some coordinates known and some unknown; it marks {n} of "
                             f"{mask.numel()} known")
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got {type(y).__name__}")
        if tuple(y.shape) != tuple(mask.shape) and tuple(y.shape[1:]) != tuple(mask.shape):
            shape = ", ".join(map(str, mask.shape))
            raise ValueError(f"y must have the mask's shape {tuple(mask.shape)} or (B, {shape}); got {tuple(y.shape)}")
        if not bool(torch.isfinite(y[..., mask] if y.shape == mask.shape else y[:, mask]).all()):
            raise ValueError(f"y must be finite at the known coordinates, got {short(y)}")
        self.mask = mask
        self.y = y

    def fit(self, x: torch.Tensor):
        """``(mask, y)`` broadcast to the state ``x`` (same dtype and device); checks the shapes."""
        if tuple(x.shape[1:]) != tuple(self.mask.shape):
            raise ValueError(f"the mask has shape {tuple(self.mask.shape)} but the state has event shape "
                             f"{tuple(x.shape[1:])} (x: {tuple(x.shape)})")
        y = self.y.to(device=x.device, dtype=x.dtype)
        if y.dim() == x.dim() and y.shape[0] != x.shape[0]:
            raise ValueError(f"y has a batch of {y.shape[0]} but the state has {x.shape[0]} samples")
        mask = self.mask.to(x.device).expand_as(x)
        return mask, y.expand_as(x)


def _as_observation(mask, y) -> Observation:
    return mask if isinstance(mask, Observation) and y is None else Observation(mask, y)


def replacement_sample(problem, x: torch.Tensor, mask, y: Optional[torch.Tensor] = None, *, method: str,
                       steps: Optional[int] = None, grid=None, generator: Optional[torch.Generator] = None,
                       **options):
    r"""Inpaint by replacement: solve ``problem`` one grid step at a time, re-noising the known part.

    Before the first step and after every step $t_i \to t_{i+1}$ the known coordinates are set to
    $m(t_{i+1})\,y + \sigma(t_{i+1})\,\varepsilon$ with fresh $\varepsilon$ (the forward kernel,
    `sdekit.LinearSDE.marginal`); at the end they are set to $y$ itself.

    Parameters
    ----------
    problem:
        A `sdekit.ReverseSDE` or `sdekit.ProbabilityFlowODE` of a linear SDE (unconditional score).
    x:
        The starting state at the problem's ``t_start`` (its known part is replaced first).
    mask:
        The `Observation`, or a boolean mask of the known coordinates (with ``y``).
    y:
        The observed values (with a boolean ``mask``; see `Observation`).
    method:
        A one-step `sdekit.solve` method on a grid (multistep methods would restart at every
        step and adaptive ones have no grid: both are refused).
    steps:
        Number of steps, as for `sdekit.solve`.
    grid:
        Grid kind or tensor of times, as for `sdekit.solve`.
    generator:
        Random generator of the stochastic methods and of the re-noised known part.
    **options:
        Passed to `sdekit.solve`.

    Returns
    -------
    `sdekit.Solution`: the samples (known coordinates equal to y) and the summed statistics.
    """
    from .solvers import solve
    from .solvers.plan import make_plan
    from .solvers.registry import get_method
    from .solvers.stats import Solution, SolverStats

    obs = _as_observation(mask, y)
    x = check_state(x, "x")
    check_generator(generator)
    if not hasattr(problem, "score_fn") or not getattr(problem.sde, "is_linear", False):
        raise TypeError(f"problem must be a ReverseSDE or ProbabilityFlowODE of a linear SDE (the forward "
                        f"kernel re-noises the known part), got {type(problem).__name__}")
    info = get_method(method)
    if "grid" not in info.stepping:
        raise ValueError(f"replacement steps on a grid; method {method!r} steps {info.stepping}: use a fixed-step "
                         f"method")
    if method in _MULTISTEP:
        raise ValueError(f"method {method!r} is multistep: run one step at a time it restarts at first order "
                         f"every step; use a one-step method (e.g. 'euler', 'heun', 'ddim', 'euler_maruyama', "
                         f"'reverse_diffusion', 'dpm_solver_2')")
    plan = make_plan(problem, x, method=method, steps=steps, grid=grid, generator=generator, options=options)
    m_, y_ = obs.fit(x)
    kernel = problem.sde.kernel
    ts = plan.grid
    gdev = generator.device if generator is not None else x.device

    def renoise(state, t):
        t64 = torch.tensor(float(t), dtype=F64)
        m, s = float(kernel.m(t64)), float(kernel.sigma(t64))
        eps = torch.randn(state.shape, generator=generator, dtype=state.dtype, device=gdev).to(state.device)
        return torch.where(m_, m * y_ + s * eps, state)

    stats = SolverStats(method=plan.method.name, backend=plan.method.backend)
    x = renoise(x, ts[0])
    for i in range(ts.numel() - 1):
        sol = solve(problem, x, method=method, grid=ts[i:i + 2].clone(), generator=generator, **options)
        stats.nfe += sol.stats.nfe
        stats.steps += sol.stats.steps
        stats.accepted += sol.stats.accepted
        stats.wall_time += sol.stats.wall_time
        x = renoise(sol.x, ts[i + 1]) if i + 2 < ts.numel() else torch.where(m_, y_, sol.x)
    return Solution(x=x, stats=stats)


#: Methods that carry a history between steps (one-step-at-a-time solving would reset it).
_MULTISTEP = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde")


class ReconstructionGuidance(GuidedScore):
    r"""The score plus a Tweedie reconstruction term for known coordinates (module docs).

    $$
        \tilde s(x, t) = s(x, t) - \gamma\,\nabla_x\,\frac{\|M(y - \hat x_0(x, t))\|^2}{2\,r_t^2},\qquad
        \hat x_0 = \frac{x + \sigma^2 s(x, t)}{m},
    $$

    with $\gamma$ = ``scale`` and $r_t^2$ = ``obs_var`` + $v_t$, where ``variance`` picks $v_t$:
    ``"sigma_bar"``: $\bar\sigma^2 = \sigma^2/m^2$ (Ho et al. 2022's reconstruction guidance with
    weight $\gamma$: the posterior variance of $x_0$ when the data vary much more than the noise);
    ``"pigdm"``: $\bar\sigma^2\sigma_d^2/(\bar\sigma^2 + \sigma_d^2)$ (Song et al. 2023's ΠGDM,
    the posterior variance for data of variance $\sigma_d^2$ = ``sigma_data**2``: bounded as
    $t \to T$). The gradient goes through the score network (one forward and one backward pass,
    counted as one network evaluation); works under ``torch.no_grad()``.

    Parameters
    ----------
    score:
        The unconditional score callable ``(x, t)``.
    sde:
        The linear forward process (its kernel gives $m$, $\sigma$).
    mask:
        The `Observation`, or a boolean mask of the known coordinates (with ``y``).
    y:
        The observed values (with a boolean ``mask``).
    scale:
        $\gamma \ge 0$ (0: the unconditional score).
    obs_var:
        Observation noise variance $\ge 0$.
    variance:
        ``"sigma_bar"`` or ``"pigdm"``.
    sigma_data:
        $\sigma_d > 0$ for ``"pigdm"``.
    """

    def __init__(self, score: Callable, sde, mask, y: Optional[torch.Tensor] = None, *, scale: float = 1.0,
                 obs_var: float = 0.0, variance: str = "sigma_bar", sigma_data: float = 1.0):
        check_positive(scale, "scale", allow_zero=True)
        super().__init__(scale)
        if not callable(score):
            raise TypeError(f"score must be callable (x, t) -> score, got {type(score).__name__}")
        if not getattr(sde, "is_linear", False):
            raise TypeError(f"sde must be a linear SDE (Tweedie's formula needs its kernel), got {type(sde).__name__}")
        self.score, self.sde = score, sde
        self.obs = _as_observation(mask, y)
        self.obs_var = check_positive(obs_var, "obs_var", allow_zero=True)
        self.variance = check_choice(variance, "variance", VARIANCES)
        self.sigma_data = check_positive(sigma_data, "sigma_data")

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        from ._validation import time_for

        mask, y = self.obs.fit(x)
        t64 = time_for(t, x).expand(x.shape[0])
        k = self.sde.kernel
        m = broadcast_to_data(k.m(t64), x)
        s2 = broadcast_to_data(k.sigma2(t64), x)
        sbar2 = s2 / (m * m)
        v = sbar2 if self.variance == "sigma_bar" else sbar2 * self.sigma_data ** 2 / (sbar2 + self.sigma_data ** 2)
        r2 = self.obs_var + v
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            s = self._eval(self.score, xr, t)
            x0 = tweedie_mean(xr, s, m, s2)
            resid = torch.where(mask, y - x0, torch.zeros_like(x0))
            loss = (resid * resid / (2 * r2)).sum()
            (g,) = torch.autograd.grad(loss, xr)
        return s.detach() - self.scale * g

    def __repr__(self):
        return f"ReconstructionGuidance(scale={self.scale}, obs_var={self.obs_var}, variance={self.variance!r})"


def reconstruction_guidance(score: Callable, sde, mask, y: Optional[torch.Tensor] = None, *, scale: float = 1.0,
                            obs_var: float = 0.0, variance: str = "sigma_bar",
                            sigma_data: float = 1.0) -> ReconstructionGuidance:
    """The reconstruction-guided score callable ``(x, t)``; see `ReconstructionGuidance`."""
    return ReconstructionGuidance(score, sde, mask, y, scale=scale, obs_var=obs_var, variance=variance,
                                  sigma_data=sigma_data)
