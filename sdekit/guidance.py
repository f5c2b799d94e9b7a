r"""Guidance as score transforms: classifier guidance and classifier-free guidance.

A guided sampler only changes the score it integrates, so each kind of guidance here is a
callable ``score(x, t)`` built from other score callables: pass it to `sdekit.SDE.reverse` /
`sdekit.SDE.probability_flow` and every solver of `sdekit.solve` samples the guided problem
unchanged. With a guidance scale $w$ (``docs/guidance.md`` derives both):

* **classifier guidance** (Dhariwal & Nichol 2021) from a score $s(x, t) \approx \nabla\log p_t(x)$
  and a differentiable noise-conditional classifier $\ell(x, t) \approx \log p_t(c \mid x)$:

$$
\tilde s = s + (1 + w)\,\nabla_x \ell;
$$

* **classifier-free guidance** (Ho & Salimans 2022) from a conditional score
  $s_c \approx \nabla\log p_t(x \mid c)$ and an unconditional one $s_u$ (the same network with
  the null label):

$$
\tilde s = s_u + (1 + w)\,(s_c - s_u) = (1 + w)\,s_c - w\,s_u.
$$

Both target the same guided score $\nabla\log p_t(x) + (1 + w)\nabla\log p_t(c \mid x)$ (Bayes:
$\nabla\log p_t(c \mid x) = \nabla\log p_t(x \mid c) - \nabla\log p_t(x)$): $w = 0$ is the plain
conditional score, $w = -1$ the unconditional one, $w > 0$ sharpens the class.

**Guidance interval.** Optionally the guidance acts only where the noise level lies in an
interval (Kynkäänniemi et al. 2024 guide only at intermediate noise): the noise level is
$\bar\sigma(t) = \sigma(t)/m(t) = e^{-\lambda(t)/2}$ (``noise_level="sigma"``) or the log-SNR
$\lambda(t)$ (``noise_level="log_snr"``), from the process's kernel. Outside the interval the
scale is 0, i.e. the plain conditional score.

**Counting (NFE).** `sdekit.SolverStats.nfe` counts *network evaluations*. Every transform
keeps a running count ``network_evals`` of the evaluations of the callables it wraps, and the
solvers' counting layer (`sdekit.solvers.stats.call_counted`) counts each call of a guided score
as the evaluations it made: classifier-free guidance costs 2 per call (conditional and
unconditional; 1 where the scale is 0 outside the guidance interval, as only $s_c$ is needed),
classifier guidance 2 (the score and the classifier, whose gradient is one extra backward pass,
not counted separately). A batched implementation that stacks the two inputs into one call of
batch $2B$ does the same work and would be counted 2 just the same. A wrapped callable that keeps
its own ``network_evals`` (a guided score inside another) is counted by the advance of that
counter, so nested transforms add up honestly.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ._validation import TimeLike, broadcast_to_data, check_callable, check_choice, check_real, time_for
from .solvers.stats import EVALS_ATTR, call_counted

__all__ = ["GuidedScore", "ClassifierGuidance", "ClassifierFreeGuidance", "classifier_guidance",
           "classifier_free_guidance", "classifier_gradient", "check_scale", "NOISE_LEVELS"]

F64 = torch.float64

#: The noise variables a guidance interval can be given in (see module docs).
NOISE_LEVELS = ("sigma", "log_snr")


def check_scale(scale, name: str = "scale") -> float:
    """The guidance scale $w$ as a float: a finite real number (NaN or inf is a ``ValueError``)."""
    return check_real(scale, name)


def _check_interval(interval, noise_level: str, sde) -> Optional[Tuple[float, float]]:
    if interval is None:
        return None
    check_choice(noise_level, "noise_level", NOISE_LEVELS)
    if sde is None or not getattr(sde, "is_linear", False):
        raise TypeError(f"a guidance interval is given in the noise level of a linear SDE's kernel: pass "
                        f"sde= a sdekit.LinearSDE (got {type(sde).__name__})")
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise ValueError(f"interval must be a pair (low, high) of noise levels, got {interval!r}")
    lo = check_real(interval[0], "interval[0]", allow_inf=True)
    hi = check_real(interval[1], "interval[1]", allow_inf=True)
    if not lo < hi:
        raise ValueError(f"interval must satisfy low < high, got {interval!r}")
    if noise_level == "sigma" and hi <= 0:
        raise ValueError(f"a sigma interval must reach above 0 (sigma = sigma(t)/m(t) > 0), got {interval!r}")
    return lo, hi


def classifier_gradient(log_prob: Callable, x: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""$\nabla_x\,\ell(x, t)$ of a per-sample log-probability ``log_prob(x, t) -> (B,)``, by autograd.

    Works inside ``torch.no_grad()`` (samplers run there): the gradient is taken on a detached copy
    of ``x`` with grad enabled. Returns ``(gradient shaped like x, log_prob values (B,))``, both
    detached.
    """
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        lp = log_prob(xr, t)
        if not isinstance(lp, torch.Tensor) or lp.shape != (x.shape[0],):
            raise ValueError(f"log_prob(x, t) must return a ({x.shape[0]},) tensor of log-probabilities, got "
                             f"{getattr(lp, 'shape', type(lp).__name__)}")
        (g,) = torch.autograd.grad(lp.sum(), xr)
    return g.detach(), lp.detach()


class GuidedScore:
    r"""Base of the guided scores: a score callable ``(x, t)`` with a scale, an optional guidance
    interval and a running count of network evaluations (``network_evals``).

    Parameters
    ----------
    scale:
        The guidance scale $w$ (finite; $w = 0$ is the plain conditional score).
    sde:
        The forward process, needed only for a guidance ``interval`` (its kernel gives the noise level).
    interval:
        ``(low, high)``: guide only where the noise level lies in ``[low, high]`` (``None``: always).
    noise_level:
        ``"sigma"`` ($\bar\sigma = \sigma/m$) or ``"log_snr"`` ($\lambda$): the variable of ``interval``.
    """

    def __init__(self, scale: float, *, sde=None, interval: Optional[Sequence[float]] = None,
                 noise_level: str = "sigma"):
        self.scale = check_scale(scale)
        self.noise_level = check_choice(noise_level, "noise_level", NOISE_LEVELS)
        self.interval = _check_interval(interval, noise_level, sde)
        self.sde = sde
        setattr(self, EVALS_ATTR, 0)

    def _eval(self, fn: Callable, *args, through: Optional[Callable] = None):
        """``fn(*args)`` (or ``through(fn, *args)``), adding the network evaluations of ``fn`` made
        during it to ``network_evals`` (`sdekit.solvers.stats.call_counted`)."""
        if through is None:
            out, n = call_counted(fn, *args)
        else:
            before = getattr(fn, EVALS_ATTR, None)
            out = through(fn, *args)
            n = 1 if before is None else int(getattr(fn, EVALS_ATTR)) - int(before)
        setattr(self, EVALS_ATTR, getattr(self, EVALS_ATTR) + n)
        return out

    def reset_count(self) -> None:
        """Set ``network_evals`` back to 0."""
        setattr(self, EVALS_ATTR, 0)

    def scale_at(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        r"""The scale in effect per sample, float64 ``(B,)``: $w$ inside the interval, 0 outside."""
        t64 = time_for(t, x)
        w = torch.full((x.shape[0],), self.scale, dtype=F64, device=x.device)
        if self.interval is None:
            return w
        lam = self.sde.kernel.log_snr(t64.detach()).expand(x.shape[0])
        level = torch.exp(-0.5 * lam) if self.noise_level == "sigma" else lam
        inside = (level >= self.interval[0]) & (level <= self.interval[1])
        return torch.where(inside, w, torch.zeros_like(w))

    def _describe(self) -> str:
        extra = "" if self.interval is None else f", interval={self.interval} in {self.noise_level}"
        return f"scale={self.scale}{extra}"


class ClassifierFreeGuidance(GuidedScore):
    r"""Classifier-free guidance $\tilde s = s_u + (1 + w)(s_c - s_u)$ (module docs).

    Parameters
    ----------
    cond, uncond:
        Score callables ``(x, t)``: conditional (the label fixed) and unconditional (the null label).
    scale:
        The guidance scale $w$; see `GuidedScore`.
    sde:
        The forward process (for an ``interval``); see `GuidedScore`.
    interval:
        Where to guide, in ``noise_level``; see `GuidedScore`.
    noise_level:
        ``"sigma"`` or ``"log_snr"``; see `GuidedScore`.

    Notes
    -----
    Each call evaluates ``cond`` and ``uncond`` once (``network_evals`` += 2), or only ``cond``
    when the scale is 0 for the whole batch (outside the guidance interval).
    """

    def __init__(self, cond: Callable, uncond: Callable, scale: float, *, sde=None,
                 interval: Optional[Sequence[float]] = None, noise_level: str = "sigma"):
        super().__init__(scale, sde=sde, interval=interval, noise_level=noise_level)
        self.cond = check_callable(cond, "cond", "(x, t) -> conditional score")
        self.uncond = check_callable(uncond, "uncond", "(x, t) -> unconditional score")

    def __call__(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        w = self.scale_at(x, t)
        s_c = self._eval(self.cond, x, t)
        if not bool((w != 0).any()):
            return s_c
        s_u = self._eval(self.uncond, x, t)
        return s_u + broadcast_to_data(1.0 + w, s_c) * (s_c - s_u)

    def __repr__(self):
        return f"ClassifierFreeGuidance({self._describe()})"


class ClassifierGuidance(GuidedScore):
    r"""Classifier guidance $\tilde s = s + (1 + w)\nabla_x\ell$ (module docs).

    Parameters
    ----------
    score:
        The score callable ``(x, t)`` (unconditional: then $w = 0$ samples $p(x \mid c)$).
    log_prob:
        ``log_prob(x, t) -> (B,)``: $\log p_t(c \mid x)$ of the target class, differentiable in x
        (e.g. ``lambda x, t: classifier.log_prob(x, t, label)``).
    scale:
        The guidance scale $w$; see `GuidedScore`.
    sde:
        The forward process (for an ``interval``); see `GuidedScore`.
    interval:
        Where to guide, in ``noise_level``; see `GuidedScore`.
    noise_level:
        ``"sigma"`` or ``"log_snr"``; see `GuidedScore`.

    Notes
    -----
    Each call evaluates ``score`` once and ``log_prob`` once with its gradient
    (``network_evals`` += 2; the backward pass is not counted separately).
    """

    def __init__(self, score: Callable, log_prob: Callable, scale: float, *, sde=None,
                 interval: Optional[Sequence[float]] = None, noise_level: str = "sigma"):
        super().__init__(scale, sde=sde, interval=interval, noise_level=noise_level)
        self.score = check_callable(score, "score", "(x, t) -> score")
        self.log_prob = check_callable(log_prob, "log_prob", "(x, t) -> (B,) log p_t(c | x)")

    def __call__(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        w = self.scale_at(x, t)
        s = self._eval(self.score, x, t)
        g, _ = self._eval(self.log_prob, x, t, through=classifier_gradient)
        return s + broadcast_to_data(1.0 + w, s) * g.to(s.dtype)

    def __repr__(self):
        return f"ClassifierGuidance({self._describe()})"


def classifier_free_guidance(cond: Callable, uncond: Callable, scale: float, *, sde=None,
                             interval: Optional[Sequence[float]] = None,
                             noise_level: str = "sigma") -> ClassifierFreeGuidance:
    r"""The classifier-free-guided score $s_u + (1 + w)(s_c - s_u)$ as a callable ``(x, t)``.

    See `ClassifierFreeGuidance`; ``interval=(low, high)`` (with ``sde``) guides only where
    $\bar\sigma(t) = \sigma/m$ (or $\lambda(t)$ with ``noise_level="log_snr"``) lies in it.

    Examples
    --------
    >>> import torch, sdekit
    >>> from sdekit.oracles import LabelledMixture
    >>> from sdekit.guidance import classifier_free_guidance
    >>> lm = LabelledMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3])
    >>> sde = sdekit.VPSDE()
    >>> cond = lambda x, t: lm.exact_conditional_score(sde)(x, t, 1)
    >>> guided = classifier_free_guidance(cond, lm.exact_score(sde), 2.0)
    >>> sol = sdekit.solve(sde.probability_flow(guided), sde.prior_sample((8, 2)), method="heun", steps=10)
    >>> sol.stats.nfe   # heun: 2 score calls per step, each 2 network evaluations
    40
    """
    return ClassifierFreeGuidance(cond, uncond, scale, sde=sde, interval=interval, noise_level=noise_level)


def classifier_guidance(score: Callable, log_prob: Callable, scale: float, *, sde=None,
                        interval: Optional[Sequence[float]] = None,
                        noise_level: str = "sigma") -> ClassifierGuidance:
    r"""The classifier-guided score $s + (1 + w)\nabla_x\log p_t(c \mid x)$ as a callable ``(x, t)``.

    See `ClassifierGuidance`.
    """
    return ClassifierGuidance(score, log_prob, scale, sde=sde, interval=interval, noise_level=noise_level)
