"""``solve``: one entry point for every method, fixed-step or adaptive, native or backend.

``solve`` is three lines of work: `sdekit.solvers.plan.make_plan` validates and normalises
the request once (method, problem, direction, grid, save points, limits, options), the method's
``run(plan, x)`` integrates (native loops in `sdekit.solvers.native` /
`sdekit.solvers.exponential` through `sdekit.solvers.fixed`, the native adaptive
integrator, the torchdiffeq and torchsde backends), and a common tail denoises and times it.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import torch

from ..parameterization import tweedie_mean
from .plan import Plan, make_plan
from .stats import Solution, call_counted

__all__ = ["solve"]

F64 = torch.float64


def solve(problem, x: torch.Tensor, t_start: Optional[float] = None, t_end: Optional[float] = None, *,
          method: str, steps: Optional[int] = None, dt: Optional[float] = None, rtol: Optional[float] = None,
          atol: Optional[float] = None, grid: Union[str, torch.Tensor, None] = None,
          save_at: Optional[Union[Sequence[float], torch.Tensor]] = None,
          generator: Union[torch.Generator, Sequence[torch.Generator], None] = None, denoise: bool = False,
          max_steps: Optional[int] = None, min_step: Optional[float] = None, norm: str = "batch",
          rho: float = 7.0, check_every: Optional[int] = None, brownian=None, **options: Any) -> Solution:
    r"""Integrate ``problem`` from ``t_start`` to ``t_end`` starting at ``x``.

    Parameters
    ----------
    problem:
        A forward `sdekit.SDE`, a `sdekit.ReverseSDE` or a
        `sdekit.ProbabilityFlowODE`.
    x:
        Initial state, batch first, any rank, any floating dtype.
    t_start, t_end:
        Default to the ends of ``grid`` when it is a tensor, else to the problem's own direction
        (forward SDE: 0 → T; reverse SDE / PF ODE: T → t_eps). ``t_start > t_end`` works for every method that allows it (ODE methods go
        both ways; a ReverseSDE only runs backwards, a forward SDE only forwards).
    method:
        A name from `sdekit.solvers.METHODS`: native ``euler``, ``heun``, ``rk4``,
        ``euler_maruyama``, ``stochastic_heun``, ``reverse_diffusion``, ``ancestral``, ``pc``,
        ``ddim``, ``langevin``, ``annealed_langevin``, ``dpm_solver_1/2/3``, ``dpmpp_2m``,
        ``dpmpp_3m``, ``dpmpp_2m_sde``, the native adaptive ``dopri5`` / ``bosh3`` (torchdiffeq's
        steps, less bookkeeping, no gradient through the solve), or ``torchdiffeq:<name>`` /
        ``torchsde:<name>``.
    steps:
        Fixed-step methods: the number of steps.
    dt:
        Fixed-step methods, instead of ``steps``: a step size, giving ``ceil(|Δt|/dt)`` uniform
        steps.
    grid:
        Fixed-step methods: the grid kind (``"uniform"`` default; ``"log_snr"`` default for the
        exponential integrators; ``"edm"``, ``"quadratic"`` or a tensor of times, see
        `sdekit.solvers.grids`).
    rtol, atol:
        Adaptive methods: required (no library default is used silently).
    save_at:
        Times at which to store the state (fixed-step: must be grid points).
    generator:
        A ``torch.Generator`` or a list of one generator per sample (a sample's noise then never
        depends on the batch it is in).
    brownian:
        A `sdekit.solvers.BrownianPath` driving ``euler_maruyama`` / ``stochastic_heun``
        (the same path for every step count: strong-error studies).
    denoise:
        Finish with Tweedie's $\hat x_0 = (x + \sigma^2 \hat s)/m$ at ``t_end`` (counted).
    max_steps:
        Adaptive-backend control: the most steps before `SolverError`.
    min_step:
        Adaptive-backend control: the smallest step before `SolverError`.
    norm:
        Adaptive-backend control: ``"batch"`` (one step size for the batch, from the RMS error
        over the batch: torchdiffeq's), ``"per-sample"`` (one step size, from the worst sample's
        error) or ``"independent"`` (per-sample stepping, native ``dopri5``/``bosh3`` only: each
        sample has its own step size, accepts or rejects on its own error and stops at its own
        end, so its result and NFE do not depend on the batch; the score is called on the
        samples still running with a ``(n,)`` time tensor, and ``stats`` holds the per-sample
        counts ``nfe_per_sample``, ``steps_per_sample``, ``accepted_per_sample``,
        ``rejected_per_sample`` and the total ``sample_evals``; see the Solvers page).
    check_every:
        Native methods check for non-finite states every ``check_every`` steps (default: every
        step on CPU; on CUDA a device-side flag checked once at the end, no host sync per step).
    **options:
        The method's options, as declared in the registry (``METHODS[method].options``: name,
        type, default, validator; listed by ``method_table()``), e.g. ``eta`` for ddim, ``churn``
        for heun, ``snr`` and ``n_corrector`` for pc; ``predict``, ``r1``, ``r2``,
        ``lower_order_final``, ``published_form`` and ``eta`` for the DPM-Solver family; the
        controller options for the adaptive methods; ``adaptive``, ``force``, ``bm`` for
        torchsde; ``adjoint``, ``adjoint_params`` for torchdiffeq. An unknown option raises
        ``ValueError`` naming the method and listing its options; a value of the wrong type
        ``TypeError``.

    Returns
    -------
    Solution
        ``x`` at ``t_end``, ``ts``/``xs`` at ``save_at``, and ``stats`` (nfe, steps, accepted,
        rejected, wall time, backend, method).

    Raises
    ------
    ValueError, TypeError
        For invalid arguments, before any work.
    SolverError
        When the state becomes non-finite or a step limit is exceeded; carries the step, the time
        and the partial statistics.
    """
    plan = make_plan(problem, x, t_start, t_end, method=method, steps=steps, dt=dt, rtol=rtol, atol=atol,
                     grid=grid, save_at=save_at, generator=generator, denoise=denoise, max_steps=max_steps,
                     min_step=min_step, norm=norm, rho=rho, check_every=check_every, brownian=brownian,
                     options=options)
    tic = time.perf_counter()
    sol = plan.method.run(plan, x)
    if plan.denoise:
        _denoise(plan, sol)
    if sol.x.device.type == "cuda":
        torch.cuda.synchronize(sol.x.device)
    sol.stats.wall_time = time.perf_counter() - tic
    return sol


def _denoise(plan: Plan, sol: Solution) -> None:
    """Finish with Tweedie's mean at ``t_end`` (one counted score call: its network evaluations)."""
    problem, t1, x = plan.problem, plan.t_end, sol.x
    k = problem.sde.kernel
    t64 = torch.tensor(t1, dtype=F64)
    m, s = float(k.m(t64)), float(k.sigma(t64))
    sc, n = call_counted(problem.score_fn, x, torch.full((x.shape[0],), t1, dtype=x.dtype, device=x.device))
    sol.x = tweedie_mean(x, sc, m, s * s)
    sol.stats.nfe += n
    sol.stats.extra["denoise_nfe"] = n
