"""The method protocol and registry: what each method solves, how it steps, its orders, cost,
randomness and options, and the one function that runs it.

Every method — native loop, native adaptive integrator, torchdiffeq or torchsde — is a
`MethodInfo` in `METHODS`. `sdekit.solvers.plan.make_plan` validates a request
against it once (problem kind, noise kind, stepping mode, options) and ``method.run(plan, x)``
does the work; there is no other route. Method names are public API.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["Option", "MethodInfo", "MethodRow", "MethodTable", "METHODS", "register", "get_method", "method_table",
           "options_of", "STEPPING_MODES", "PROBLEM_KINDS"]

#: ``"grid"``: fixed steps on the solve's grid (``steps``/``dt``/``grid``); ``"dt"``: equal steps
#: of ``dt`` inside the backend (torchsde); ``"adaptive"``: an error controller chooses the steps
#: (``rtol``, ``atol``).
STEPPING_MODES = ("grid", "dt", "adaptive")
#: ``"ode"``: a ProbabilityFlowODE; ``"sde"``: a forward SDE or a ReverseSDE; ``"score"``: a
#: ReverseSDE or ProbabilityFlowODE of a *linear* SDE (the method uses the kernel and the score).
PROBLEM_KINDS = ("ode", "sde", "score")

_TYPE_NAMES = {float: "a real number", int: "an integer", bool: "True or False", str: "a string",
               object: "any value"}


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: its name, type, default and validator.

    ``type`` is ``float`` (any real number except a bool), ``int`` (an integer, not a bool),
    ``bool``, ``str`` or ``object`` (anything); ``None`` is accepted iff the default is ``None``.
    ``check(value)`` raises ``ValueError`` for a value of the right type that is not allowed (its
    return value is ignored: the method receives the value as given).
    """

    name: str
    type: type
    default: Any
    check: Optional[Callable[[Any], Any]] = None
    doc: str = ""

    def validate(self, value: Any, method: str) -> Any:
        if value is None and self.default is None:
            return None
        t = self.type
        ok = (t is object or (t is bool and isinstance(value, bool)) or
              (t is not bool and not isinstance(value, bool) and
               isinstance(value, {float: numbers.Real, int: numbers.Integral}.get(t, t))))
        if not ok:
            raise TypeError(f"option {self.name!r} of method {method!r} must be {_TYPE_NAMES.get(t, t.__name__)}"
                            f"{' or None' if self.default is None else ''}, got {type(value).__name__}: {value!r}")
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as e:
                raise ValueError(f"{e} (option {self.name!r} of method {method!r})") from None
        return value


def options_of(fn: Callable, skip: int = 2, **specs: Union[type, Tuple]) -> Tuple[Option, ...]:
    """Declare the keyword options of a method body ``fn(ctx, x, **options)``.

    Each keyword names one option: ``type`` or ``(type, check)`` or ``(type, check, doc)``. The
    default is read from ``fn``'s signature (one source), and every parameter after the first
    ``skip`` must be declared (and nothing else), so the declaration cannot drift from the body.
    """
    params = list(inspect.signature(fn).parameters.values())[skip:]
    names = [p.name for p in params]
    if sorted(names) != sorted(specs):
        raise TypeError(f"options of {fn.__name__}: declared {sorted(specs)}, the body takes {sorted(names)}")
    out = []
    for p in params:
        spec = specs[p.name] if isinstance(specs[p.name], tuple) else (specs[p.name],)
        out.append(Option(p.name, spec[0], p.default, *spec[1:]))
    return tuple(out)


@dataclass(frozen=True)
class MethodInfo:
    """The protocol every method implements: what it declares and the one function that runs it.

    Attributes
    ----------
    name:
        Public name (``"euler"``, ``"torchdiffeq:dopri5"`` ...).
    problem:
        ``"ode"`` (a ProbabilityFlowODE), ``"sde"`` (a forward SDE or a ReverseSDE) or
        ``"score"`` (a ReverseSDE or ProbabilityFlowODE of a linear SDE: the method uses the
        kernel $m$, $\\sigma$, $\\lambda$ and the score).
    noise:
        Noise kinds accepted for ``"sde"`` / ``"score"`` problems (``()`` for ODE methods).
    strong_order, weak_order:
        Convergence orders. ODE methods: ``strong_order`` is the ODE order, ``weak_order`` is
        ``None``. Samplers of a fixed noise level (Langevin): 0.
    evals_per_step:
        Score (or drift) evaluations per step with the default options (adaptive methods: per
        attempted step; see ``doc`` where options change it).
    backend:
        ``"native"``, ``"torchdiffeq"`` or ``"torchsde"``.
    stepping:
        The stepping modes, from `STEPPING_MODES`; the first is the default. A method with
        two modes declares a bool option ``adaptive`` that selects ``"adaptive"``.
    default_grid:
        The grid kind used when ``grid`` is not given (``"uniform"`` or ``"log_snr"``), for
        methods that step on the solve's grid; ``"uniform"`` for ``"dt"`` stepping (equal
        steps); ``None`` for adaptive-only methods.
    stochastic:
        Whether the method can draw random numbers.
    stochastic_option:
        If set, the method draws random numbers only when this option is > 0 (``ddim``'s and
        ``dpmpp_2m_sde``'s ``eta``, ``heun``'s ``churn``); see `is_stochastic`.
    options:
        The method's keyword options (`Option`): name, type, default, validator.
    run:
        ``run(plan, x) -> Solution``: the one calling convention (``plan`` from
        `sdekit.solvers.plan.make_plan`).
    body:
        Fixed-step native methods: the update loop ``body(ctx, x, **options) -> x`` that ``run``
        drives (see `sdekit.solvers.fixed`); ``None`` for the others.
    fixed_level:
        The method samples at one noise level (``t_start == t_end``; the grid repeats it).
    check:
        Optional ``check(plan)`` for method-specific refusals, called at the end of planning.
    doc:
        One line for the method table.
    """

    name: str
    problem: str
    noise: Tuple[str, ...]
    strong_order: float
    weak_order: Optional[float]
    evals_per_step: int
    backend: str
    stepping: Tuple[str, ...]
    default_grid: Optional[str]
    stochastic: bool
    run: Callable
    options: Tuple[Option, ...] = ()
    stochastic_option: Optional[str] = None
    body: Optional[Callable] = None
    fixed_level: bool = False
    check: Optional[Callable] = None
    doc: str = ""

    def __post_init__(self):
        problems = self.problem in PROBLEM_KINDS
        modes = bool(self.stepping) and all(m in STEPPING_MODES for m in self.stepping)
        names = [o.name for o in self.options]
        if not (problems and modes and len(set(names)) == len(names)):
            raise ValueError(f"bad declaration of method {self.name!r}: problem {self.problem!r}, stepping "
                             f"{self.stepping!r}, options {names}")
        if len(self.stepping) > 1 and "adaptive" not in names:
            raise ValueError(f"method {self.name!r} has two stepping modes: it must declare a bool option 'adaptive'")
        if (self.default_grid is None) != (self.stepping == ("adaptive",)):
            raise ValueError(f"method {self.name!r}: default_grid must be given iff it can take fixed steps")
        if self.stochastic_option is not None and self.stochastic_option not in names:
            raise ValueError(f"method {self.name!r}: stochastic_option {self.stochastic_option!r} is not an option")

    @property
    def adaptive(self) -> bool:
        """Whether an error controller can choose the steps (always, or with ``adaptive=True``)."""
        return "adaptive" in self.stepping

    @property
    def fixed_step(self) -> bool:
        """Whether the method can take fixed steps (on the solve's grid or of size ``dt``)."""
        return self.stepping != ("adaptive",)

    def is_stochastic(self, options: Mapping[str, Any]) -> bool:
        """Whether the method draws random numbers with these (validated) options."""
        if not self.stochastic:
            return False
        if self.stochastic_option is None:
            return True
        return float(options[self.stochastic_option]) > 0

    def validate_options(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """Type-check and validate ``given``; return every option (defaults filled in), read-only.

        Raises ``ValueError`` naming the method and listing its options for an unknown name.
        """
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(sorted(known)) if known else "none"
            raise ValueError(f"unknown options {unknown} for method {self.name!r}; its options are: {valid}")
        return MappingProxyType({k: (o.validate(given[k], self.name) if k in given else o.default)
                                 for k, o in known.items()})


METHODS: Dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    """Add ``info`` to `METHODS` (its name must be new)."""
    if info.name in METHODS:
        raise ValueError(f"method {info.name!r} is already registered")
    METHODS[info.name] = info
    return info


def get_method(name: str) -> MethodInfo:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}: {name!r}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# ------------------------------------------------------------------------------------------------
# the method table: data, printed as markdown
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodRow:
    """One row of `method_table`: the declarations of a method as plain data."""

    name: str
    problem: str
    noise: Tuple[str, ...]
    strong_order: float
    weak_order: Optional[float]
    evals_per_step: int
    stepping: Tuple[str, ...]
    default_grid: Optional[str]
    stochastic: str
    options: Tuple[str, ...]
    backend: str
    doc: str

    @classmethod
    def of(cls, m: MethodInfo) -> "MethodRow":
        stoch = ("no" if not m.stochastic else "yes" if m.stochastic_option is None
                 else f"if {m.stochastic_option} > 0")
        return cls(m.name, m.problem, m.noise, m.strong_order, m.weak_order, m.evals_per_step, m.stepping,
                   m.default_grid, stoch, tuple(o.name for o in m.options), m.backend, m.doc)

    def cells(self) -> List[str]:
        order = f"{self.strong_order:g}" + (f" / {self.weak_order:g}" if self.weak_order is not None else "")
        steps = {("grid",): "grid", ("adaptive",): "adaptive", ("dt", "adaptive"): "dt; adaptive=True"}
        return [f"`{self.name}`", self.problem, ", ".join(self.noise) or "-", order, str(self.evals_per_step),
                steps.get(self.stepping, ", ".join(self.stepping)), self.default_grid or "-", self.stochastic,
                ", ".join(self.options) or "-", self.backend]


_HEADER = ["method", "problem", "noise", "order (strong/weak)", "evals/step", "stepping", "default grid",
           "stochastic", "options", "backend"]


class MethodTable(tuple):
    """The registry as a tuple of `MethodRow`; ``str()`` (or ``format("markdown")``) is
    the markdown table printed in the docs."""

    def format(self, fmt: str = "markdown") -> str:
        if fmt != "markdown":
            raise ValueError(f"fmt must be 'markdown', got {fmt!r}")
        lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
        lines += ["| " + " | ".join(r.cells()) + " |" for r in self]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def names(self) -> List[str]:
        return [r.name for r in self]


def method_table() -> MethodTable:
    """The registry as data: one `MethodRow` per method, in registration order.

    ``print(method_table())`` prints the markdown table of the docs.
    """
    return MethodTable(MethodRow.of(m) for m in METHODS.values())
