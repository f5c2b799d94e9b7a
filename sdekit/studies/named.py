r"""Named studies and user study files: the problems behind ``python -m sdekit study``.

A `StudySpec` is everything `sdekit.studies.work_precision` needs (problem, methods,
budgets, reference, metrics, seeds, grids, points) plus a reduced ``quick`` variant for smoke
runs. `NAMED_STUDIES` holds the built-in ones:

``vp-gmm2d``        VP SDE, 2-D 4-mode mixture, probability-flow ODE, exact score: flow-map error
                    against a tight float64 solve, on uniform and log-SNR grids.
``ve-gmm64``        VE SDE, 64-D 8-mode mixture, probability-flow ODE (EDM and log-SNR grids).
``custom-sde-gmm8`` a user-style `sdekit.LinearSDE` with custom $f$, $g$ (numeric kernel) and
                    an 8-mode ring mixture.
``ou-strong-weak``  Ornstein–Uhlenbeck from $x_0 = 1$: Euler–Maruyama and stochastic Heun, strong
                    and weak errors against the exact solution on the same Brownian path.

A *user study file* is a Python file that defines at least

- ``sde``: a `sdekit.LinearSDE` (any custom ``f``, ``g``, or a built-in), and
- ``mixture``: a `sdekit.GaussianMixture`, the data law at $t = 0$;

and optionally ``methods`` (list of method names), ``budgets`` (list, or dict method → list:
step counts, tolerances for adaptive methods), ``grids`` (list of grid kinds), ``metrics``,
``seeds``, ``n`` (start points per seed), ``t_eps`` (where the solves stop, default
``sdekit.SAMPLING_T_EPS``), ``dynamics`` (``"ode"``, the default: the probability-flow ODE
with the mixture's exact score, reference a tight solve; or ``"sde"``: the reverse SDE,
reference a fine Euler–Maruyama solve on the same Brownian path) and ``quick`` (a dict of the
same keys used with ``--quick``). `load_study_file` turns it into a `StudySpec`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .._defaults import SAMPLING_T_EPS
from ..oracles import GaussianMixture
from ..processes import LinearSDE, OrnsteinUhlenbeck, VESDE, VPSDE
from ..solvers import get_method
from .reference import StudyProblem

__all__ = ["StudySpec", "NAMED_STUDIES", "get_study", "load_study_file", "mixture_study", "steps_for_nfe",
           "ou_exact_on_path"]

F64 = torch.float64


@dataclass
class StudySpec:
    """A complete study: what `work_precision` is called with, and a ``quick`` override dict
    (any of the fields below) for seconds-long smoke runs."""

    name: str
    problem: Union[StudyProblem, Callable[[int], StudyProblem]]
    methods: List[Any]
    budgets: Any
    reference: Any = "tight"
    metrics: Sequence[str] = ("flow",)
    seeds: Sequence[int] = (0, 1, 2)
    grids: Any = None
    n: Optional[int] = None
    description: str = ""
    quick: Dict[str, Any] = field(default_factory=dict)

    def quick_version(self) -> "StudySpec":
        bad = sorted(set(self.quick) - {"methods", "budgets", "metrics", "seeds", "grids", "n"})
        if bad:
            raise ValueError(f"quick overrides of study {self.name!r} may set methods, budgets, metrics, seeds, "
                             f"grids, n; got {bad}")
        return replace(self, **self.quick)


def steps_for_nfe(methods: Sequence[str], nfes: Sequence[int]) -> Dict[str, List[int]]:
    """Step budgets giving about the NFEs ``nfes`` for each fixed-step method (``nfe //
    evals_per_step`` from the registry, at least 1)."""
    return {m: sorted({max(1, int(k) // get_method(m).evals_per_step) for k in nfes}) for m in methods}


def mixture_study(name: str, sde: LinearSDE, mixture: GaussianMixture, *, t_eps: float = SAMPLING_T_EPS,
                  dynamics: str = "ode", n: int = 500) -> StudyProblem:
    r"""The standard problem of a linear SDE and a data mixture: start points exact samples of
    $p_T$, the exact score, target law $p_{t_\varepsilon}$ (``mixture.push(sde, t_eps)``).

    ``dynamics="ode"``: the probability-flow ODE; ``"sde"``: the reverse SDE.
    """
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"sde must be a sdekit.LinearSDE, got {type(sde).__name__}")
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a sdekit.GaussianMixture, got {type(mixture).__name__}")
    score = mixture.exact_score(sde)
    if dynamics == "ode":
        prob = sde.probability_flow(score, t_eps=t_eps)
    elif dynamics == "sde":
        prob = sde.reverse(score, t_eps=t_eps)
    else:
        raise ValueError(f"dynamics must be 'ode' or 'sde', got {dynamics!r}")
    prior = mixture.push(sde, sde.T)
    return StudyProblem(prob, lambda k, g: prior.sample(k, g), target=mixture.push(sde, t_eps), name=name, n=n)


def mixture_2d() -> GaussianMixture:
    """Four modes at $(\\pm1, \\pm1)$, variance 0.01 (the benchmark's 2-D mixture)."""
    return GaussianMixture(torch.ones(4), [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], torch.full((4,), 0.01))


def mixture_nd(d: int, K: int = 8, seed: int = 0) -> GaussianMixture:
    """K modes in d dimensions: means N(0, I), diagonal stds uniform in [0.05, 0.3], weights in [1, 2]."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, d, generator=g, dtype=F64)
    std = 0.05 + 0.25 * torch.rand(K, d, generator=g, dtype=F64)
    w = 1.0 + torch.rand(K, generator=g, dtype=F64)
    return GaussianMixture(w, means, std ** 2)


def ring_mixture(K: int = 8, radius: float = 2.0, var: float = 0.02) -> GaussianMixture:
    """K equal modes on a circle of ``radius`` in 2-D, isotropic variance ``var``."""
    a = torch.arange(K, dtype=F64) * (2 * math.pi / K)
    return GaussianMixture(torch.ones(K), torch.stack([radius * a.cos(), radius * a.sin()], 1), torch.full((K,), var))


def ou_exact_on_path(theta: float, sigma: float) -> Callable:
    r"""The Ornstein–Uhlenbeck solution $x_T = e^{-\theta T}x_0 + \sigma\int_0^T e^{-\theta(T-s)}dW_s$
    on a `sdekit.solvers.BrownianPath` that starts at 0: on each fine step of size $h$ the
    integral is replaced by its conditional mean given the increment, $\tfrac{1 - e^{-\theta h}}
    {\theta h}\Delta W$ (exact in law per step; pathwise error $O(\theta\sigma h)$, far below
    the solves' errors when the path is fine)."""
    def exact(x0: torch.Tensor, bp) -> torch.Tensor:
        h = bp.h
        a = math.exp(-theta * h)
        dW = (bp.W[1:] - bp.W[:-1]).to(F64)
        w = a ** torch.arange(bp.n - 1, -1, -1, dtype=F64)
        return a ** bp.n * x0 + sigma * (1 - a) / (theta * h) * torch.einsum("k,k...->...", w, dW)

    return exact


# ------------------------------------------------------------------------------------------------
# the named studies
# ------------------------------------------------------------------------------------------------
def _vp_gmm2d() -> StudySpec:
    sde = VPSDE(0.1, 20.0)
    ode_methods = ["euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m"]
    budgets: Dict[str, Any] = steps_for_nfe(ode_methods, [10, 20, 50, 100, 200])
    budgets["dopri5"] = [1e-2, 1e-3, 1e-4, 1e-5]
    return StudySpec(
        "vp-gmm2d", mixture_study("vp-gmm2d", sde, mixture_2d(), n=1000), ode_methods + ["dopri5"], budgets,
        reference="tight", metrics=("flow", "sliced_wasserstein", "nll", "modes"), seeds=(0, 1, 2),
        grids=["uniform", "log_snr"],
        description="VP(0.1, 20), 2-D 4-mode mixture, PF ODE with the exact score, T -> 1e-3",
        quick=dict(methods=["euler", "dpmpp_2m", "dopri5"], n=200, seeds=(0, 1),
                   budgets={"euler": [10, 20, 40], "dpmpp_2m": [10, 20, 40], "dopri5": [1e-3, 1e-4]}))


def _ve_gmm64() -> StudySpec:
    sde = VESDE(0.01, 50.0)
    methods = ["euler", "heun", "dpmpp_2m", "dpm_solver_3"]
    return StudySpec(
        "ve-gmm64", mixture_study("ve-gmm64", sde, mixture_nd(64, 8), n=500), methods,
        steps_for_nfe(methods, [12, 24, 48, 96, 192]), reference="tight",
        metrics=("flow", "sliced_wasserstein", "modes"), seeds=(0, 1, 2), grids=["edm", "log_snr"],
        description="VE(0.01, 50), 64-D 8-mode mixture, PF ODE with the exact score, T -> 1e-3",
        quick=dict(methods=["euler", "dpmpp_2m"], n=100, seeds=(0, 1), grids=["edm"],
                   budgets={"euler": [12, 24, 48], "dpmpp_2m": [12, 24, 48]}))


def _custom_sde_gmm8() -> StudySpec:
    sde = LinearSDE(lambda t: -0.5 * (0.1 + 19.9 * t * t), lambda t: (0.1 + 19.9 * t * t).sqrt())
    methods = ["euler", "heun", "dpmpp_2m"]
    budgets: Dict[str, Any] = steps_for_nfe(methods, [10, 20, 50, 100, 200])
    budgets["dopri5"] = [1e-2, 1e-3, 1e-4]
    return StudySpec(
        "custom-sde-gmm8", mixture_study("custom-sde-gmm8", sde, ring_mixture(8), n=1000), methods + ["dopri5"],
        budgets, reference="tight", metrics=("flow", "nll", "modes"), seeds=(0, 1, 2), grids=["uniform", "log_snr"],
        description="LinearSDE with beta(t) = 0.1 + 19.9 t^2 (numeric kernel), 8-mode ring, PF ODE, T -> 1e-3",
        quick=dict(methods=["euler", "dpmpp_2m"], n=200, seeds=(0, 1), grids=["uniform"],
                   budgets={"euler": [10, 20, 40], "dpmpp_2m": [10, 20, 40]}))


def _ou_strong_weak() -> StudySpec:
    theta, sigma = 0.5, 1.0
    ou = OrnsteinUhlenbeck(theta, sigma, T=1.0)
    prob = StudyProblem(ou, lambda k, g: torch.ones(k, 1, dtype=F64), exact=ou_exact_on_path(theta, sigma),
                        name="ou-strong-weak", n=1000)
    return StudySpec(
        "ou-strong-weak", prob, ["euler_maruyama", "stochastic_heun"], [8, 16, 32, 64], reference="exact",
        metrics=("strong", "weak"), seeds=(0, 1, 2),
        description="Ornstein-Uhlenbeck (theta 0.5, sigma 1, T 1) from x0 = 1, exact solution on the same "
                    "Brownian path (additive noise: Euler-Maruyama's strong order is 1 here, above the "
                    "declared general-noise 0.5)",
        quick=dict(n=300, budgets=[8, 16, 32]))


NAMED_STUDIES: Dict[str, Callable[[], StudySpec]] = {
    "vp-gmm2d": _vp_gmm2d, "ve-gmm64": _ve_gmm64, "custom-sde-gmm8": _custom_sde_gmm8,
    "ou-strong-weak": _ou_strong_weak,
}


def get_study(name_or_path: str) -> StudySpec:
    """A named study (`NAMED_STUDIES`) or, for a path ending in ``.py``, a user study file."""
    if not isinstance(name_or_path, str):
        raise TypeError(f"study must be a name or a path, got {type(name_or_path).__name__}")
    if name_or_path in NAMED_STUDIES:
        return NAMED_STUDIES[name_or_path]()
    if name_or_path.endswith(".py") or os.path.sep in name_or_path:
        return load_study_file(name_or_path)
    raise ValueError(f"unknown study {name_or_path!r}; named studies: {', '.join(NAMED_STUDIES)}, or a path to a "
                     f".py file defining sde and mixture")


_FILE_KEYS = ("sde", "mixture", "methods", "budgets", "grids", "metrics", "seeds", "n", "t_eps", "dynamics",
              "quick", "reference", "name")


def load_study_file(path: str) -> StudySpec:
    """Load a user study file (see the module docs for its contract) into a `StudySpec`."""
    if not os.path.isfile(path):
        raise ValueError(f"study file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("sdekit_user_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ns = {k: getattr(mod, k) for k in _FILE_KEYS if hasattr(mod, k)}
    missing = [k for k in ("sde", "mixture") if k not in ns]
    if missing:
        raise ValueError(f"study file {path!r} must define {' and '.join(missing)} (a sdekit.LinearSDE `sde` and a "
                         f"sdekit.GaussianMixture `mixture`)")
    name = ns.get("name", os.path.splitext(os.path.basename(path))[0])
    dynamics = ns.get("dynamics", "ode")
    n = int(ns.get("n", 500))
    prob = mixture_study(name, ns["sde"], ns["mixture"], t_eps=float(ns.get("t_eps", SAMPLING_T_EPS)),
                         dynamics=dynamics, n=n)
    if dynamics == "ode":
        methods = list(ns.get("methods", ["euler", "heun", "dpmpp_2m"]))
        default_budgets: Any = {m: ([1e-2, 1e-3, 1e-4] if get_method(m).stepping == ("adaptive",) else
                                    steps_for_nfe([m], [10, 20, 50, 100])[m]) for m in methods}
        metrics, reference = ("flow", "modes"), "tight"
    else:
        methods = list(ns.get("methods", ["euler_maruyama"]))
        default_budgets = [8, 16, 32, 64]
        metrics, reference = ("strong", "sliced_wasserstein", "modes"), "fine"
    quick = dict(ns.get("quick", {}))
    quick.setdefault("n", min(n, 200))
    quick.setdefault("seeds", (0, 1))
    return StudySpec(name, prob, methods, ns.get("budgets", default_budgets), reference=ns.get("reference", reference),
                     metrics=tuple(ns.get("metrics", metrics)), seeds=tuple(ns.get("seeds", (0, 1, 2))),
                     grids=ns.get("grids"), n=n, description=f"user study file {path}", quick=quick)

