"""The method registry: what each method solves, its order and cost, and its implementation.

``solve`` validates a request against this table, and error messages list the valid methods.
Method names are public API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

__all__ = ["MethodInfo", "METHODS", "register", "get_method", "method_table"]


@dataclass(frozen=True)
class MethodInfo:
    """Facts about one method.

    name: public name (``"euler"``, ``"torchdiffeq:dopri5"`` ...).
    problem: ``"ode"`` (probability-flow ODE), ``"sde"`` (any SDE problem), or ``"score"``
        (a sampler that needs a linear SDE and a score: accepts a ReverseSDE or a
        ProbabilityFlowODE built from one).
    noise: noise kinds accepted for SDE problems (``()`` for ODE methods).
    strong_order, weak_order: convergence orders (ODE methods: ``strong_order`` is the order).
    evals_per_step: score (or drift) evaluations per step (for adaptive methods: per attempted step).
    adaptive: whether the step size is chosen by an error controller.
    backend: ``"native"``, ``"torchdiffeq"`` or ``"torchsde"``.
    stochastic: whether it draws random numbers (needs a generator for reproducibility).
    """

    name: str
    problem: str
    noise: Tuple[str, ...]
    strong_order: float
    weak_order: Optional[float]
    evals_per_step: int
    adaptive: bool
    backend: str
    stochastic: bool
    fn: Optional[Callable] = None
    doc: str = ""


METHODS: Dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    METHODS[info.name] = info
    return info


def get_method(name: str) -> MethodInfo:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}: {name!r}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _adaptive_word(m: MethodInfo) -> str:
    # torchsde methods step with a fixed dt unless solve(..., adaptive=True); they are routed
    # through the backend path (m.adaptive) either way
    if m.backend == "torchsde":
        return "optional (adaptive=True)"
    return "yes" if m.adaptive else "no"


def method_table() -> str:
    """A markdown table of the registry (used by the docs)."""
    rows = ["| method | problem | noise | order (strong/weak) | evals/step | adaptive | backend |",
            "|---|---|---|---|---|---|---|"]
    for m in METHODS.values():
        order = f"{m.strong_order:g}" + (f" / {m.weak_order:g}" if m.weak_order is not None else "")
        rows.append(f"| `{m.name}` | {m.problem} | {', '.join(m.noise) or '-'} | {order} | "
                    f"{m.evals_per_step} | {_adaptive_word(m)} | {m.backend} |")
    return "\n".join(rows)
