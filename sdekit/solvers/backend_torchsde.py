r"""torchsde backend: ``torchsde:<method>`` for forward SDEs and reverse-time SDEs.

The problem is handed to ``torchsde.sdeint`` through `sdekit.dynamics.TorchsdeAdapter`
(flattened ``(B, D)`` states for data of any rank, Itô, increasing internal time): internal time
$s = |t - t_{start}|$ runs from 0 to $L = |t_{end} - t_{start}|$, i.e.
$t = t_{start} + s$ for a forward SDE and $t = t_{start} - s$ for a
`ReverseSDE` (the adapter negates the drift; Brownian increments are symmetric).
Users never negate time.

**Noise.** Isotropic (``g(t) I``, independent Brownian motions) and diagonal noise are torchsde
``"diagonal"`` noise, general noise ``"general"`` (``euler`` only). torchsde's ``"scalar"`` noise
(one Brownian motion shared by all dimensions) is a different process for ``d > 1`` and is never
used. The Stratonovich schemes ``heun``, ``midpoint`` and ``reversible_heun`` solve the Itô
problem only where Itô and Stratonovich coincide, i.e. where ``g`` does not depend on ``x``: they
accept isotropic noise only. ``reversible_heun`` is refused on reverse-time diffusions (measured
unstable: its extrapolated ``z`` state is driven by the large score drift near ``t_eps``) unless
``force=True``.

**Brownian motion.** A ``torchsde.BrownianInterval`` on ``[0, L]`` of size ``(B, m)`` with ``dt``
set (its cache is laid out for that step) and ``entropy`` an integer drawn from ``generator``
(one ``torch.Generator``; the global generator when ``None``), so a seed reproduces the path;
``srk`` gets the space–time Lévy area it needs. Pass ``bm=`` (a Brownian motion on ``[0, L]`` in
the internal time ``s``) to drive the solve with a path of your own, e.g. to compare with an exact
solution.

**Steps.** Fixed-step (default): ``n = ceil(L / dt)`` equal steps of ``L / n`` (``steps=n`` in
``solve``). ``adaptive=True``: torchsde's step-doubling controller (each attempt is one full step
and two half steps; ``rtol``/``atol`` apply, ``dt`` is the first step). ``max_steps`` and
``min_step`` raise `SolverError`.

**Counting.** NFE counts score calls (reverse SDE) or drift calls (forward SDE); ``g`` never calls
the score. torchsde's argument check evaluates the drift once at ``(s = 0, y0)`` to validate
shapes; that call is a validation call and is not counted. Steps are counted from the Brownian
queries (every torchsde step queries the Brownian motion exactly once); in adaptive mode an
attempt is accepted iff the next attempt starts where it ended. Drift evaluations per step:
euler 1, milstein 1, srk 10 (diagonal SRI scheme, 4 stages, stage drifts recomputed by torchsde),
heun 2, midpoint 2, reversible_heun 1 (+1 at the start).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import torch
import torchsde

from ..dynamics import ReverseSDE, TorchsdeAdapter
from .registry import MethodInfo, Option, register
from .stats import CountingFunction, Solution, SolverError, SolverStats, counted_problem

__all__ = ["run_torchsde", "TORCHSDE_METHODS"]

F64 = torch.float64
_STRATONOVICH = ("heun", "midpoint", "reversible_heun")
#: method -> (noise kinds, strong order, weak order, drift evaluations per step)
TORCHSDE_METHODS: Dict[str, tuple] = {
    "euler": (("isotropic", "diagonal", "general"), 0.5, 1.0, 1),
    "milstein": (("isotropic", "diagonal"), 1.0, 1.0, 1),
    "srk": (("isotropic", "diagonal"), 1.5, 1.5, 10),
    "heun": (("isotropic",), 1.0, 1.0, 2),
    "midpoint": (("isotropic",), 1.0, 1.0, 2),
    "reversible_heun": (("isotropic",), 1.0, 1.0, 1),
}
_EVALS = {k: v[3] for k, v in TORCHSDE_METHODS.items()}


class _Monitor:
    """Counts steps from the Brownian queries; enforces max_steps / min_step."""

    def __init__(self, method: str, adaptive: bool, L: float, t_start: float, direction: int,
                 max_steps: Optional[int], min_step: Optional[float], counter: CountingFunction):
        self.method, self.adaptive, self.L = method, adaptive, L
        self.t_start, self.direction = t_start, direction
        self.max_steps, self.min_step = max_steps, min_step
        self.counter = counter
        self.queries = 0
        self.attempts = 0
        self.rejected = 0
        self.validation_nfe = 0
        self.s_last = 0.0
        self._prev = None  # (a, b) of the previous adaptive attempt

    def t_of(self, s: float) -> float:
        return self.t_start + self.direction * s

    def stats(self) -> SolverStats:
        acc = self.attempts - self.rejected
        return SolverStats(nfe=self.counter.count - self.validation_nfe, steps=self.attempts, accepted=acc,
                           rejected=self.rejected, backend="torchsde", method=f"torchsde:{self.method}")

    def on_query(self, ta, tb) -> None:
        q = self.queries
        self.queries += 1
        if self.adaptive and q % 3 != 0:
            return  # the two half steps of the current attempt
        a = float(ta)
        b = float(tb) if tb is not None else a
        self.s_last = a
        if self.adaptive and self._prev is not None and a != self._prev[1]:
            self.rejected += 1
        self._prev = (a, b)
        if self.max_steps is not None and self.attempts >= self.max_steps:
            raise SolverError(f"max_steps={self.max_steps} exceeded (torchsde:{self.method})", step=self.attempts,
                              t=self.t_of(a), stats=self.stats())
        h = b - a
        if self.adaptive:
            if not (h > 0.0) or a + h == a:
                raise SolverError(f"step size underflow (h={h!r}) in torchsde:{self.method}", step=self.attempts,
                                  t=self.t_of(a), stats=self.stats())
            final = b >= self.L
            if self.min_step is not None and h < self.min_step and not final:
                raise SolverError(f"the step-size controller proposed dt={h:.3g} < min_step={self.min_step:g} "
                                  f"(torchsde:{self.method})", step=self.attempts, t=self.t_of(a), stats=self.stats())
        self.attempts += 1


class _CountingBrownian:
    """Delegates to a torchsde Brownian motion; reports every query to the monitor."""

    def __init__(self, bm, monitor: _Monitor):
        self._bm = bm
        self._monitor = monitor

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        self._monitor.on_query(ta, tb)
        return self._bm(ta, tb, return_U=return_U, return_A=return_A)

    def __getattr__(self, name):
        return getattr(self._bm, name)


class _TorchsdeSDE(torch.nn.Module):
    """What torchsde sees: ``f``/``g`` of the adapter, with the declared SDE/noise type, a
    non-finite check of the state (on CPU, where it costs no device sync) and the validation-call
    bookkeeping."""

    def __init__(self, adapter: TorchsdeAdapter, sde_type: str, noise_type: str, monitor: _Monitor):
        super().__init__()
        self.adapter = adapter
        self.sde_type, self.noise_type = sde_type, noise_type
        self._monitor = monitor
        self._validated = False

    def f(self, s, y):
        if y.device.type == "cpu" and not bool(torch.isfinite(y).all()):
            m = self._monitor
            raise SolverError(f"the state became non-finite (NaN or inf) (torchsde:{m.method})",
                              step=max(m.attempts - 1, 0), t=m.t_of(float(s)), stats=m.stats())
        out = self.adapter.f(s, y)
        if not self._validated:  # torchsde's check_contract: f(ts[0], y0), shape validation only
            self._validated = True
            self._monitor.validation_nfe = self._monitor.counter.count
        return out

    def g(self, s, y):
        return self.adapter.g(s, y)


def _entropy(generator, device) -> int:
    if generator is None:
        return int(torch.randint(0, 2 ** 31 - 1, (1,)))
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=generator.device))


def check_torchsde(plan) -> None:
    """The torchsde-specific refusals, at planning time (``MethodInfo.check``)."""
    name, method = plan.method.name, plan.method.name.split(":", 1)[1]
    if plan.norm != "batch":
        raise ValueError(f"torchsde's adaptive controller measures the error over the whole batch; "
                         f"norm={plan.norm!r} is not available for {name} (use norm='batch')")
    if isinstance(plan.generator, (list, tuple)):
        raise ValueError(f"{name} draws from one Brownian motion for the whole batch: pass one torch.Generator, "
                         f"not a list of per-sample generators")
    noise = plan.problem.noise
    if method in _STRATONOVICH and noise != "isotropic":
        raise ValueError(f"{name} is a Stratonovich scheme: it solves the Itô SDE only when the diffusion does "
                         f"not depend on x (isotropic noise g(t) I), where both interpretations agree; this problem "
                         f"has {noise!r} noise (state-dependent in general). Use torchsde:euler, torchsde:milstein "
                         f"or torchsde:srk")
    if method == "reversible_heun" and isinstance(plan.problem, ReverseSDE) and not plan.options["force"]:
        raise ValueError("torchsde:reversible_heun is unstable on reverse-time diffusions (the score drift near t_eps "
                         "makes its extrapolated state blow up); use torchsde:euler / srk, or pass force=True")


def run_torchsde(plan, x: torch.Tensor) -> Solution:
    """``run`` of ``torchsde:<method>``: a forward `SDE` or a `ReverseSDE`.

    ``plan.dt``: the step (fixed-step: ``ceil(L/dt)`` equal steps) or, with the option
    ``adaptive=True``, the first step. Options: ``adaptive``, ``force`` (allows
    ``reversible_heun`` on a reverse-time SDE), ``bm`` (a Brownian motion on ``[0, |t1 - t0|]``
    in the internal time, shape ``(B, D)``, ``(B, m)`` for general noise). See the module docs.
    """
    info, t0, t1, adaptive = plan.method, plan.t_start, plan.t_end, plan.mode == "adaptive"
    method = info.name.split(":", 1)[1]
    stats = SolverStats(method=info.name, backend="torchsde")
    direction = -1 if isinstance(plan.problem, ReverseSDE) else 1
    L = abs(t1 - t0)
    shape, B, D = tuple(x.shape), x.shape[0], int(x[0].numel())
    p, counter = counted_problem(plan.problem)  # score calls (reverse) or drift calls (forward)
    adapter = TorchsdeAdapter(p, shape, t0, direction)
    if adapter.noise_type == "scalar" and D > 1:  # never produced by the adapter; guard the invariant
        raise ValueError("torchsde 'scalar' noise shares one Brownian motion across dimensions; refused for d > 1")
    y0 = x.reshape(B, D)
    step, n_fixed = _steps(plan, L, method)
    out_s, idx = _output_s(plan, L)
    mon = _Monitor(method, adaptive, L, t0, direction, plan.max_steps, plan.min_step, counter)
    bm = plan.options["bm"]
    if bm is None:
        bm, stats.extra["entropy"] = _brownian(plan, adapter, y0, L, step, method)
    wrapped = _TorchsdeSDE(adapter, "stratonovich" if method in _STRATONOVICH else "ito", adapter.noise_type, mon)
    kw = dict(method=method, dt=step, adaptive=adaptive)
    if adaptive:
        kw.update(rtol=plan.rtol, atol=plan.atol, dt_min=0.0)  # min_step is enforced by the monitor
    try:
        with warnings.catch_warnings():
            if plan.problem.noise == "isotropic":  # additive noise: torchsde's adaptive-Euler caveat does not apply
                warnings.filterwarnings("ignore", message="Numerical solution is not guaranteed to converge")
            ys = torchsde.sdeint(wrapped, y0, torch.tensor(out_s, dtype=F64, device=x.device),
                                 bm=_CountingBrownian(bm, mon), **kw)
    except SolverError as e:
        _fill(stats, mon)
        e.stats = stats
        raise
    except AssertionError as e:  # torchsde's NaN check of the adaptive error estimate
        _fill(stats, mon)
        raise SolverError(f"torchsde:{method} failed: {e}", step=mon.attempts, t=mon.t_of(mon.s_last),
                          stats=stats) from e
    _fill(stats, mon)
    if n_fixed is not None and mon.attempts != n_fixed:  # the invariant the nudged step guarantees
        raise RuntimeError(f"internal error: torchsde took {mon.attempts} steps, expected {n_fixed}; please report")
    xT = ys[-1].reshape(shape)
    if not bool(torch.isfinite(xT).all()):
        raise SolverError(f"the state became non-finite (NaN or inf) (torchsde:{method})", step=mon.attempts,
                          t=t1, stats=stats)
    stats.extra.update(dt=L / n_fixed if n_fixed else float(plan.dt), adaptive=adaptive)
    sol = Solution(x=xT, stats=stats)
    if plan.save_at is not None:
        sel = ys.index_select(0, torch.tensor(idx, dtype=torch.long, device=ys.device))
        sol.ts, sol.xs = plan.save_at, sel.reshape((len(idx),) + shape)
    return sol


def _steps(plan, L: float, method: str):
    """``(step, n_fixed)``: torchsde's ``dt`` and the number of fixed steps (``None`` when adaptive)."""
    dt = plan.dt
    if plan.mode == "adaptive":
        return float(dt), None
    n_fixed = max(1, math.ceil(L / dt - 1e-9))
    # equal steps L/n, nudged up so torchsde's accumulated sum reaches L in exactly n steps
    step = L / n_fixed * (1.0 + max(1e-12, 8.0 * n_fixed * 2.3e-16))
    if plan.min_step is not None and L / n_fixed < plan.min_step:
        raise ValueError(f"dt={dt} gives steps of {L / n_fixed:.3g} < min_step={plan.min_step}")
    if plan.max_steps is not None and n_fixed > plan.max_steps:
        raise SolverError(f"max_steps={plan.max_steps} exceeded: dt={dt} needs {n_fixed} steps (torchsde:{method})",
                          step=0, t=plan.t_start, stats=SolverStats(backend="torchsde", method=plan.method.name))
    return step, n_fixed


def _output_s(plan, L: float):
    """The output times in the internal time ``s`` and, per save_at entry, its index among them."""
    if plan.save_at is None:
        return [0.0, L], None
    tol = 1e-12 * max(1.0, L)
    s_req = (plan.save_at - plan.t_start).abs().clamp(0.0, L).tolist()
    out_s = [0.0] + sorted({s for s in s_req if tol < s < L - tol}) + [L]
    pos = {s: i for i, s in enumerate(out_s)}
    return out_s, [0 if s <= tol else len(out_s) - 1 if s >= L - tol else pos[s] for s in s_req]


def _brownian(plan, adapter, y0: torch.Tensor, L: float, step: float, method: str):
    """A ``torchsde.BrownianInterval`` on ``[0, L]`` seeded from the plan's generator, and its entropy."""
    if plan.problem.noise == "general":
        with torch.no_grad():
            m_noise = int(adapter.g(torch.zeros((), dtype=F64), y0).shape[-1])
    else:
        m_noise = y0.shape[1]
    entropy = _entropy(plan.generator, y0.device)
    bm = torchsde.BrownianInterval(t0=0.0, t1=L, size=(y0.shape[0], m_noise), dtype=y0.dtype, device=y0.device,
                                   entropy=entropy, dt=step,
                                   levy_area_approximation="space-time" if method == "srk" else "none")
    return bm, entropy


def _fill(stats: SolverStats, mon: _Monitor) -> None:
    s = mon.stats()
    stats.nfe, stats.steps, stats.accepted, stats.rejected = s.nfe, s.steps, s.accepted, s.rejected


_OPTIONS = (Option("adaptive", bool, False, None, "torchsde's step-doubling controller (needs rtol, atol)"),
            Option("force", bool, False, None, "allow reversible_heun on a reverse-time SDE"),
            Option("bm", object, None, None, "a Brownian motion on [0, |t_end - t_start|] (internal time)"))
for _name, (_noise, _strong, _weak, _evals) in TORCHSDE_METHODS.items():
    register(MethodInfo(
        name=f"torchsde:{_name}", problem="sde", noise=_noise, strong_order=_strong, weak_order=_weak,
        evals_per_step=_evals, backend="torchsde", stepping=("dt", "adaptive"), default_grid="uniform",
        stochastic=True, run=run_torchsde, options=_OPTIONS, check=check_torchsde,
        doc=(f"torchsde {_name}: fixed step dt (or steps) by default, adaptive=True for step doubling"
             + ("; Stratonovich scheme, exact for the Itô SDE only with isotropic (x-independent) noise"
                if _name in _STRATONOVICH else ""))))
