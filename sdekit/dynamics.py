r"""Reverse-time SDEs and the probability-flow ODE derived from a forward process and a score.

For $dx = f\,dt + G\,dW$ with marginals $p_t$ and $D = GG^T$, every member of

$$
    dx = \Big[f - \frac{1+\eta^2}{2}\big(D\,\nabla\log p_t + \nabla\cdot D\big)\Big]dt + \eta\,G\,d\bar W,
$$

run from $T$ down to $t_\varepsilon$, has the same marginals $p_t$
($(\nabla\cdot D)_i = \sum_j \partial_j D_{ij}$, zero for isotropic noise). η = 1 is
Anderson's reverse SDE, η = 0 the probability-flow ODE (Song et al. 2021, eq. 13 and App. D).
η may be a constant or a function of t (an EDM-style stochasticity schedule).

Both objects know their time direction (``t_start = T`` → ``t_end = t_eps``) and can be handed
to torchsde (`ReverseSDE.to_torchsde`, which runs in the increasing variable
$s = T - t$ internally) and torchdiffeq (`ProbabilityFlowODE` is callable as
``(t, x)`` and torchdiffeq integrates decreasing times itself).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ._defaults import SAMPLING_T_EPS
from ._process_base import ProcessBase, PublicCoefficients, apply_diffusion
from ._validation import TimeLike, broadcast_to_data, check_callable, check_positive, check_state, check_time_range, time_for

__all__ = [
    "ReverseSDE",
    "ProbabilityFlowODE",
    "TorchsdeAdapter",
    "evaluate_score",
    "diffusion_divergence",
    "score_coefficient",
]

F64 = torch.float64


def evaluate_score(score: Callable, x: torch.Tensor, t64: torch.Tensor) -> torch.Tensor:
    """Call ``score(x, t)`` with ``t`` as a ``(B,)`` tensor in x's dtype; check the output shape."""
    tb = t64.to(dtype=x.dtype, device=x.device).expand(x.shape[0])
    s = score(x, tb)
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        raise ValueError(f"score(x, t) must return a tensor shaped like x {tuple(x.shape)}, got "
                         f"{getattr(s, 'shape', type(s).__name__)}")
    return s


def diffusion_divergence(sde, x: torch.Tensor, t64: torch.Tensor) -> torch.Tensor:
    r"""$(\nabla\cdot GG^T)_i = \sum_j \partial_j (GG^T)_{ij}$ for state-dependent noise.

    Uses ``sde.diffusion_divergence`` when supplied, otherwise exact autograd (one backward pass
    per state dimension for diagonal noise, d² for general noise: meant for small d).
    Zero for isotropic noise.
    """
    if not sde.state_dependent_noise:
        return torch.zeros_like(x)
    if sde.diffusion_divergence is not None:
        out = sde.diffusion_divergence(x, t64.to(x.dtype).expand(x.shape[0]))
        if out.shape != x.shape:
            raise ValueError(f"diffusion_divergence must return shape {tuple(x.shape)}, got {tuple(out.shape)}")
        return out
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        G = sde._diffusion(xr, t64)
        B = x.shape[0]
        out = torch.zeros(B, x[0].numel(), dtype=x.dtype, device=x.device)
        if sde.noise == "diagonal":
            D = (G * G).reshape(B, -1)
            for i in range(D.shape[1]):
                (gi,) = torch.autograd.grad(D[:, i].sum(), xr, retain_graph=True, allow_unused=True)
                if gi is not None:
                    out[:, i] = gi.reshape(B, -1)[:, i]
        else:
            D = torch.einsum("bik,bjk->bij", G, G)
            d = D.shape[1]
            for i in range(d):
                for j in range(d):
                    (gij,) = torch.autograd.grad(D[:, i, j].sum(), xr, retain_graph=True, allow_unused=True)
                    if gij is not None:
                        out[:, i] += gij[:, j]
    return out.reshape(x.shape).detach()


def score_coefficient(eta: torch.Tensor) -> torch.Tensor:
    r"""$c = -\tfrac{1+\eta^2}{2}$, the factor of $GG^\top\nabla\log p_t$ in the drift of the
    reverse-time family (module docs); $\eta = 0$ gives the probability-flow ODE's $-\tfrac12$.

    The one place this coefficient is written: both problems' drifts and ``affine_coefficients``
    (hence the solvers' linear fast path) use it.
    """
    return -0.5 * (1.0 + eta * eta)


def _eta_fn(eta) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(eta):
        return lambda t64: torch.as_tensor(eta(t64), dtype=F64, device=t64.device)
    v = check_positive(eta, "eta", allow_zero=True)
    return lambda t64: torch.full_like(t64, v)


class _Derived:
    """Shared pieces of the reverse SDE and the PF ODE: validation and the corrected drift."""

    def _init_common(self, sde, score, t_eps):
        if not isinstance(sde, ProcessBase):
            raise TypeError(f"sde must be a sdekit.SDE, got {type(sde).__name__}")
        check_callable(score, "score")
        t_eps = check_positive(t_eps, "t_eps")
        if t_eps >= sde.T:
            raise ValueError(f"t_eps must be < T = {sde.T}; got t_eps={t_eps}")
        self.sde, self.score_fn, self.T, self.t_eps = sde, score, sde.T, t_eps
        self.t_start, self.t_end = sde.T, t_eps

    def with_score(self, score: Callable):
        r"""A copy of this problem driven by ``score`` instead; everything else is shared.

        The process, $\eta$, ``t_eps`` and the time direction are the same objects; the
        original is not changed. For the probability-flow ODE (an ``nn.Module``) the copy gets its
        own module registry: a ``score`` that is an ``nn.Module`` is registered as
        ``score_module`` (its parameters are what adjoint methods differentiate); any other
        callable — typically a wrapper of the old score, such as an evaluation counter — keeps
        the original's registered score module, so its parameters stay visible.

        Raises ``TypeError`` if ``score`` is not callable.
        """
        check_callable(score, "score")
        new = copy.copy(self)
        if isinstance(new, torch.nn.Module):
            new._modules = type(new._modules)(new._modules)  # own registry: the original is untouched
            new._modules.pop("score_fn", None)
            if isinstance(score, torch.nn.Module):
                new._modules["score_module"] = score
        new.__dict__["score_fn"] = score
        return new

    def _drift(self, x, t64):
        r"""$f + c(t)\,(D\nabla\log p + \nabla\cdot D)$ with $c$ = ``_score_coefficient(t)``."""
        sde = self.sde
        s = evaluate_score(self.score_fn, x, t64)
        corr = sde._diffusion_matrix_action(x, t64, s)
        if sde.state_dependent_noise:
            corr = corr + diffusion_divergence(sde, x, t64)
        return sde._drift(x, t64) + broadcast_to_data(self._score_coefficient(t64), x) * corr

    def _check_xt(self, x, t):
        x = check_state(x, "x")
        t64 = time_for(t, x)
        check_time_range(t64, self.T)
        return x, t64

    def _score_coefficient(self, t64: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def affine_coefficients(self, t: TimeLike) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        r"""``(a(t), c(t))`` with drift $= a(t)\,x + c(t)\,s(x, t)$ for a linear forward SDE.

        For $dx = f(t)x\,dt + g(t)\,dW$: the probability-flow ODE has $a = f$,
        $c = -\tfrac12 g^2$; the reverse SDE $a = f$, $c = -\tfrac{1+\eta^2}{2}g^2$.
        This is the same formula as the drift itself (from the kernel's ``f`` and ``g2``), split
        so that callers can treat the linear part analytically — e.g. the divergence
        $\nabla\cdot v = a\,d + c\,\nabla\cdot s$ needs the score's Jacobian only.
        ``None`` when the forward SDE is not linear. Float64 tensors shaped like ``t``
        (0-d or ``(B,)``); ``t`` is not range-checked.
        """
        if not getattr(self.sde, "is_linear", False):
            return None
        t64 = t.to(F64) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=F64)
        k = self.sde.kernel
        return k.f(t64), self._score_coefficient(t64) * k.g2(t64)


class ReverseSDE(PublicCoefficients, _Derived):
    r"""The reverse-time SDE $dx = [f - \frac{1+\eta^2}{2}(D\nabla\log p + \nabla\cdot D)]dt + \eta G\,d\bar W$.

    Integrated from ``t_start = T`` down to ``t_end = t_eps``. ``eta`` is any non-negative number or
    a function of float64 t (η = 1: Anderson's reverse SDE); every η ≥ 0 gives the same marginals.
    ``t_eps`` defaults to ``sdekit.SAMPLING_T_EPS`` = 1e-3 (the rule for defaults is stated in
    ``docs/concepts.md``, "Where time stops").
    """

    def __init__(self, sde, score: Callable, eta: Union[float, Callable] = 1.0, t_eps: float = SAMPLING_T_EPS):
        self._init_common(sde, score, t_eps)
        self.eta = eta
        self._eta = _eta_fn(eta)
        if callable(eta):  # probe the schedule once on [t_eps, T]: a negative eta is a user error
            probe = torch.linspace(self.t_eps, self.T, 65, dtype=F64)
            vals = self._eta(probe).expand_as(probe)
            bad = ~(torch.isfinite(vals) & (vals >= 0))
            if bad.any():
                i = int(torch.nonzero(bad)[0])
                raise ValueError(f"eta(t) must be finite and >= 0; eta({float(probe[i]):.6g}) = {float(vals[i])!r}")
        self.noise = sde.noise
        self.state_dependent_noise = sde.state_dependent_noise

    def _score_coefficient(self, t64):
        return score_coefficient(self._eta(t64))

    def _diffusion(self, x, t64):
        G = self.sde._diffusion(x, t64)
        eta = self._eta(t64).to(dtype=x.dtype, device=x.device)
        if self.noise == "general":
            return eta.reshape(-1, 1, 1) * G if eta.dim() else eta * G
        if self.noise == "diagonal":
            return broadcast_to_data(eta, x) * G
        return eta * G

    def _noise_increment(self, x, t64, dW):
        return apply_diffusion(self.noise, self._diffusion(x, t64), x, dW)

    def to_torchsde(self, shape: Sequence[int], t_start: Optional[float] = None) -> "TorchsdeAdapter":
        """A torchsde-compatible module in the increasing variable $s = t_{start} - t$."""
        return TorchsdeAdapter(self, shape, self.T if t_start is None else t_start, direction=-1)

    def __repr__(self):
        return f"ReverseSDE({self.sde!r}, eta={self.eta!r}, t_eps={self.t_eps})"


class ProbabilityFlowODE(torch.nn.Module, _Derived):
    r"""The probability-flow ODE $\frac{dx}{dt} = f - \frac12(D\nabla\log p_t + \nabla\cdot D)$.

    Callable as ``ode(t, x)`` (torchdiffeq's signature) returning $dx/dt$ in actual time;
    torchdiffeq integrates it from ``T`` to ``t_eps`` directly (``odeint(ode, x_T,
    torch.tensor([ode.T, ode.t_eps]))``). If ``score`` is an ``nn.Module`` it is registered as a
    submodule so adjoint methods see its parameters. Set ``check_inputs = False`` to skip the
    per-call range check (solvers validate their grid once). ``t_eps`` defaults to
    ``sdekit.SAMPLING_T_EPS`` = 1e-3 (see ``docs/concepts.md``, "Where time stops").
    """

    def __init__(self, sde, score: Callable, t_eps: float = SAMPLING_T_EPS):
        torch.nn.Module.__init__(self)
        self._init_common(sde, score, t_eps)
        if isinstance(score, torch.nn.Module):
            self.score_module = score
        self.check_inputs = True

    def _score_coefficient(self, t64):
        return score_coefficient(torch.zeros_like(t64))

    def forward(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """$dx/dt$ at ``(t, x)``."""
        if self.check_inputs:
            x, t64 = self._check_xt(x, t)
        else:
            t64 = t.to(F64) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=F64, device=x.device)
        return self._drift(x, t64)

    def velocity(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Same as ``self(t, x)`` with the ``(x, t)`` argument order used elsewhere in sdekit."""
        return self.forward(t, x)

    def __repr__(self):
        return f"ProbabilityFlowODE({self.sde!r}, t_eps={self.t_eps})"


class TorchsdeAdapter(torch.nn.Module):
    """Expose a problem to torchsde: flattened ``(B, D)`` states, increasing solver time.

    Internal time ``s`` maps to process time ``t = t_start + direction * s``; the drift is
    multiplied by ``direction`` (Brownian increments are symmetric, so the noise is unchanged).
    Isotropic and diagonal noise are exposed as torchsde ``"diagonal"`` noise (independent
    Brownian motions per dimension), general noise as ``"general"``. Itô interpretation.
    """

    sde_type = "ito"

    def __init__(self, problem, shape: Sequence[int], t_start: float, direction: int):
        super().__init__()
        if direction not in (-1, 1):
            raise ValueError(f"direction must be +1 or -1, got {direction!r}")
        self.problem = problem
        self.shape = tuple(int(s) for s in shape)
        self.t_start = float(t_start)
        self.direction = direction
        self.noise_type = "general" if problem.noise == "general" else "diagonal"

    def _t(self, s):
        s64 = s.to(F64) if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=F64)
        return self.t_start + self.direction * s64

    def f(self, s, y):
        x = y.reshape(self.shape)
        return (self.direction * self.problem._drift(x, self._t(s).to(y.device))).reshape(y.shape)

    def g(self, s, y):
        x = y.reshape(self.shape)
        G = self.problem._diffusion(x, self._t(s).to(y.device))
        if self.problem.noise == "isotropic":
            return G.reshape(-1, 1).expand(y.shape)
        if self.problem.noise == "diagonal":
            return G.reshape(y.shape)
        return G
