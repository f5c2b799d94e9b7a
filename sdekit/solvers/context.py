"""The bookkeeping every native method shares, done once so each method body is its update rule.

A `Context` holds the time grid (float64, both directions), the counted score/drift, the
kernel coefficients at every time the method will visit (computed in one vectorised float64
call and kept as Python floats, so the hot loop issues no coefficient kernels and no host
synchronisation), the noise source (one ``torch.Generator`` or one per sample), save points and
the non-finite check.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

from ..dynamics import ProbabilityFlowODE, ReverseSDE
from .stats import SolverError, SolverStats, counted_problem

__all__ = ["Context", "Coefs"]

F64 = torch.float64


def _unaliased(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A user drift may return ``x`` itself or a view of it; methods update the state in place,
    so such an output is copied first."""
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return out.clone()
    return out


class Coefs(NamedTuple):
    r"""Kernel coefficients at one time, as Python floats. ``score_coef`` is $c(t)$ of the
    problem's drift $f(t)x + c(t)s(x, t)$ (`affine_coefficients`:
    PF $-g^2/2$, reverse SDE $-(1+\eta^2)g^2/2$; 0 for a forward SDE). A named tuple: a grid
    of 1000 times builds in a third of a frozen dataclass's time."""

    t: float
    m: float
    sigma: float
    f: float
    g2: float
    lam: float
    eta: float
    score_coef: float


class Context:
    """Shared state of one native solve (see module docs).

    Attributes used by methods: ``ts`` (list of float times, ``n + 1`` entries), ``n`` (steps),
    ``problem``, ``sde`` (the forward process), ``linear`` (fast coefficient path available),
    ``options``.
    """

    def __init__(self, problem, x: torch.Tensor, grid: torch.Tensor, generator, save_idx: Dict[int, int],
                 stats: SolverStats, check_every: int, brownian=None):
        self.problem = problem
        self.sde = problem if not hasattr(problem, "score_fn") else problem.sde
        self.linear = bool(getattr(self.sde, "is_linear", False))
        self.grid = grid
        self.ts: List[float] = grid.tolist()
        self.n = len(self.ts) - 1
        self.B, self.dtype, self.device, self.shape = x.shape[0], x.dtype, x.device, x.shape
        self.stats = stats
        self.problem, self.counter = counted_problem(problem)  # same object, counted score (or drift)
        self._eta = getattr(problem, "_eta", None)
        # which drift the linear fast path computes, decided once (not per call)
        self._mode = ("reverse" if isinstance(problem, ReverseSDE) else
                      "pf" if isinstance(problem, ProbabilityFlowODE) else "forward")
        self._coefs: Dict[float, Coefs] = {}
        self._transitions: Dict[Tuple[float, float], Tuple[float, float]] = {}
        # the (B,) time tensors score(x, t) receives, for every grid time at once: one expanded
        # (stride-0, no per-step allocation; in-place writes to it raise) view per time
        self._tvec: Dict[float, torch.Tensor] = dict(zip(self.ts, grid.to(dtype=x.dtype, device=x.device)
                                                         .unsqueeze(1).expand(-1, self.B).unbind(0)))
        self._gen = generator
        self._brownian = brownian
        self._save_idx = save_idx
        self.saved: List[Optional[torch.Tensor]] = [None] * len(set(save_idx.values()))
        self._check_every = check_every
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._noise_buf: Optional[torch.Tensor] = None
        self._grid_prepared = False  # the grid's coefficients are computed on first use

    # -- coefficients --------------------------------------------------------------------------
    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``(len(t), 7)`` float64: m, sigma, f, g2, lambda, eta, score_coef at the times ``t``."""
        k = self.sde.kernel
        with torch.no_grad():
            m, s2, f, g2 = k.m(t), k.sigma2(t), k.f(t), k.g2(t)
            lam = k.log_snr(t)
            eta = self._eta(t) if self._eta is not None else torch.ones_like(t)
            eta = torch.as_tensor(eta, dtype=F64).expand_as(t)
            if not bool((torch.isfinite(eta) & (eta >= 0)).all()):
                raise ValueError(f"eta(t) must be finite and >= 0 at every solver time; got {eta.tolist()[:8]}")
            # the drift's score coefficient from the one place that defines it
            score_c = (self.problem.affine_coefficients(t)[1].expand_as(t) if self._mode in ("reverse", "pf")
                       else torch.zeros_like(t))
            return torch.stack([m, s2.sqrt(), f, g2, lam, eta, score_c], 1)

    def prepare(self, times: Iterable[float]) -> None:
        """Compute kernel coefficients for ``times`` in one vectorised float64 call."""
        new = [float(t) for t in times if float(t) not in self._coefs]
        if not new or not self.linear:
            return
        rows = self._rows(torch.tensor(new, dtype=F64)).tolist()
        make = Coefs._make
        self._coefs.update(zip(new, (make((ti, *r)) for ti, r in zip(new, rows))))

    def transition(self, t: float, s: float) -> Tuple[float, float]:
        """``(a, b^2)`` of the forward kernel from ``s`` to ``t`` (`Kernel.transition`), as floats.

        Cached: the first call computes every consecutive grid pair ``(ts[i], ts[i+1])`` in one
        vectorised kernel call, so a stepping loop does no tensor work for it; an off-grid pair
        (e.g. Heun's churn time) is computed on demand."""
        hit = self._transitions.get((t, s))
        if hit is None:
            pairs = [(t, s)] + ([] if self._transitions else list(zip(self.ts[:-1], self.ts[1:])))
            a, b2 = self.sde.kernel.transition(torch.tensor([p[1] for p in pairs], dtype=F64),
                                               torch.tensor([p[0] for p in pairs], dtype=F64))
            self._transitions.update(zip(pairs, zip(a.tolist(), b2.tolist())))
            hit = self._transitions[(t, s)]
        return hit

    def coefs(self, t: float) -> Coefs:
        """Coefficients at time ``t`` (computed on demand if not prepared)."""
        c = self._coefs.get(t)
        if c is None:
            if not self._grid_prepared and self.linear:  # first use: the whole grid in one call
                self._grid_prepared = True
                self.prepare(self.ts + [t])
            else:
                self.prepare([t])
            c = self._coefs[t]
        return c

    def t_vec(self, t: float) -> torch.Tensor:
        """A cached ``(B,)`` tensor holding ``t`` in the state's dtype (what score(x, t) receives)."""
        v = self._tvec.get(t)
        if v is None:
            v = torch.full((self.B,), t, dtype=self.dtype, device=self.device)
            self._tvec[t] = v
        return v

    def linear_sde_steps(self) -> Optional[Tuple[List[torch.Tensor], List[float], List[float], List[float]]]:
        r"""Per-step float coefficients of Euler–Maruyama on a linear reverse SDE, or None.

        Step ``i`` from ``t`` to ``s`` ($h = s - t$) is
        $x \leftarrow a_i\,(x + c_i\,\hat s(x, t)) + \sigma_i z$ with $a_i = 1 + h f(t)$,
        $c_i = h\,\mathrm{score\_coef}(t)/a_i$, $\sigma_i = \eta(t)\sqrt{g^2(t)|h|}$ — the
        update $x + h(f x + \mathrm{score\_coef}\,\hat s) + \eta g\sqrt{|h|}z$ regrouped into two
        in-place passes (and the noise add). Returns ``(t_vecs, a, c, sigma)`` (lists of length
        ``n``) when that fast path applies: a linear reverse SDE, no shared Brownian path, one
        generator (or none) on the state's device, and every $a_i$ finite and non-zero.
        """
        if not self.linear or self._mode != "reverse" or self._brownian is not None:
            return None
        g = self._gen
        if g is not None and (not isinstance(g, torch.Generator) or g.device != self.device):
            return None
        t = self.grid[:-1].to(device="cpu", dtype=F64)
        h = torch.diff(self.grid.to(device="cpu", dtype=F64))
        with torch.no_grad():
            f, score_c = self.problem.affine_coefficients(t)  # the drift's split, from its one definition
            g2 = self.sde.kernel.g2(t)
            eta = torch.as_tensor(self._eta(t), dtype=F64).expand_as(t) if self._eta is not None else 1.0
        if self._eta is not None and not bool((torch.isfinite(eta) & (eta >= 0)).all()):
            raise ValueError(f"eta(t) must be finite and >= 0 at every solver time; got {eta.tolist()[:8]}")
        a = 1.0 + h * f
        if not bool((torch.isfinite(a) & (a != 0.0)).all()):
            return None
        tv = [self._tvec[ti] for ti in self.ts[:-1]]
        return tv, a.tolist(), (h * score_c / a).tolist(), (eta * (g2 * h.abs()).sqrt()).tolist()

    # -- evaluations (counted) -----------------------------------------------------------------
    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Counted score evaluation at the float time ``t``."""
        s = self.counter(x, self._tvec.get(t) if t in self._tvec else self.t_vec(t))
        if s.shape != x.shape:
            raise ValueError(f"score(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {tuple(s.shape)}")
        return s

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Probability-flow velocity dx/dt = f x - g^2/2 * score of a PF-ODE problem (generic path
        for nonlinear SDEs)."""
        if self.linear:
            c = self._coefs.get(t) or self.coefs(t)
            return torch.add(c.f * x, self.score(x, t), alpha=c.score_coef)  # one fused pass
        return _unaliased(self.problem._drift(x, torch.tensor(t, dtype=F64, device=self.device)), x)

    def drift(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Drift of the SDE problem (forward: f x; reverse: f x - (1+eta^2)/2 g^2 score)."""
        if self.linear:
            c = self._coefs.get(t) or self.coefs(t)
            if self._mode in ("reverse", "pf"):
                return torch.add(c.f * x, self.score(x, t), alpha=c.score_coef)
            self.counter.count += 1
            return c.f * x
        t64 = torch.tensor(t, dtype=F64, device=self.device)
        out = self.problem._drift(x, t64) if hasattr(self.problem, "score_fn") else self.counter(x, t64)
        return _unaliased(out, x)

    def diffuse(self, x: torch.Tensor, t: float, dW: torch.Tensor) -> torch.Tensor:
        """G(x, t) dW (reverse SDE: eta(t) g(t) dW)."""
        if self.linear:
            c = self.coefs(t)
            eta = c.eta if self._mode == "reverse" else 1.0
            return (eta * math.sqrt(c.g2)) * dW
        return self.problem._noise_increment(x, torch.tensor(t, dtype=F64, device=self.device), dW)

    # -- randomness ----------------------------------------------------------------------------
    def randn(self) -> torch.Tensor:
        """Standard normal noise shaped like the state. The returned buffer is reused by the next
        call, so consume it before drawing again."""
        g = self._gen
        if isinstance(g, (list, tuple)):
            return torch.stack([torch.randn(self.shape[1:], generator=gi, dtype=self.dtype, device=gi.device)
                                .to(self.device) for gi in g])
        if g is not None and g.device != self.device:
            return torch.randn(self.shape, generator=g, dtype=self.dtype, device=g.device).to(self.device)
        if self._noise_buf is None:
            self._noise_buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return torch.randn(self.shape, generator=g, dtype=self.dtype, device=self.device, out=self._noise_buf)

    def add_noise(self, x: torch.Tensor, t: float, s: float) -> torch.Tensor:
        """``x + G(x, t) (W(s) - W(t))``. For a linear SDE this is one fused in-place pass on
        ``x`` (callers pass the state buffer they own, never the user's input)."""
        if self.linear and self._brownian is None:
            c = self._coefs.get(t) or self.coefs(t)
            eta = c.eta if self._mode == "reverse" else 1.0
            return x.add_(self.randn(), alpha=eta * math.sqrt(c.g2 * abs(s - t)))
        return x + self.diffuse(x, t, self.dW(t, s))

    def dW(self, t: float, s: float) -> torch.Tensor:
        r"""Brownian increment over the step t -> s: from the shared ``brownian`` path if one was
        given, else $\sqrt{|s - t|}\,z$."""
        if self._brownian is not None:
            return self._brownian.increment(t, s).to(dtype=self.dtype, device=self.device)
        return math.sqrt(abs(s - t)) * self.randn()

    # -- per-step bookkeeping --------------------------------------------------------------------
    def step_done(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Call after step ``i`` produced ``x`` (the state at ``ts[i + 1]``): save and check."""
        self.stats.steps += 1
        self.stats.accepted += 1
        j = self._save_idx.get(i + 1)
        if j is not None:
            self.saved[j] = x.detach().clone()
        if self._check_every == 1:  # CPU: one reduction and a (free) host read per step
            if not math.isfinite(float(x.sum())):
                self.fail(i)
        else:
            bad = ~torch.isfinite(x.sum())
            self._bad_step = torch.where((self._bad_step < 0) & bad, torch.full_like(self._bad_step, i), self._bad_step)
            if self._check_every > 1 and (i + 1) % self._check_every == 0:
                self.finish_checks()
        return x

    def finish_checks(self) -> None:
        """Raise if a deferred non-finite check recorded a bad step."""
        i = int(self._bad_step)
        if i >= 0:
            self.fail(i)

    def fail(self, i: int, note: str = "") -> None:
        """Raise the `SolverError` for a non-finite state after step ``i`` (at ``ts[i + 1]``)."""
        self.stats.nfe = self.counter.count
        raise SolverError("the state became non-finite (NaN or inf)" + note, step=i, t=self.ts[i + 1],
                          stats=self.stats)
