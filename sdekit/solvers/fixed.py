"""The driver of every fixed-step native method: build the `sdekit.solvers.context.Context`
from the plan, run the method's loop, collect the statistics and save points.

A fixed-step method is declared with `grid_method`: its body ``body(ctx, x, **options) -> x``
is a short loop over ``ctx.ts`` (see `sdekit.solvers.native`); its options and their
defaults come from the body's signature and the declared types and validators.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .context import Context
from .registry import MethodInfo, Option, register
from .stats import Solution, SolverStats

__all__ = ["run_fixed", "grid_method"]


def run_fixed(plan, x: torch.Tensor) -> Solution:
    """``run`` of the fixed-step methods: the body steps on ``plan.grid`` (grad mode is the
    caller's: wrap in ``torch.no_grad()`` to sample)."""
    info = plan.method
    stats = SolverStats(method=info.name, backend=info.backend)
    ctx = Context(plan.problem, x, plan.grid, plan.generator, dict(plan.save_idx), stats, plan.check_every,
                  brownian=plan.brownian)
    if 0 in plan.save_idx:
        ctx.saved[plan.save_idx[0]] = x.detach().clone()
    xT = info.body(ctx, x, **plan.options)
    ctx.finish_checks()
    stats.nfe = ctx.counter.count
    sol = Solution(x=xT, stats=stats)
    if plan.save_at is not None:
        sol.ts, sol.xs = plan.save_at, torch.stack(ctx.saved)
    return sol


def grid_method(body: Callable, *, problem: str, noise: Tuple[str, ...], strong_order: float,
                weak_order: Optional[float], evals_per_step: int, stochastic: bool,
                options: Tuple[Option, ...] = (), stochastic_option: Optional[str] = None,
                default_grid: str = "uniform", backend: str = "native", name: Optional[str] = None,
                fixed_level: bool = False, doc: str = "") -> MethodInfo:
    """Register the fixed-step method ``body`` (named ``name`` or ``body.__name__``) and return it."""
    return register(MethodInfo(
        name=name or body.__name__, problem=problem, noise=noise, strong_order=float(strong_order),
        weak_order=None if weak_order is None else float(weak_order), evals_per_step=evals_per_step,
        backend=backend, stepping=("grid",), default_grid=default_grid, stochastic=stochastic, run=run_fixed,
        options=options, stochastic_option=stochastic_option, body=body, fixed_level=fixed_level, doc=doc))
