r"""Score-matching losses: denoising score matching for any linear SDE, sliced score matching for any SDE.

Denoising score matching (Vincent 2011). With $x_t = m(t)x_0 + \sigma(t)\varepsilon$ from the
process's kernel, the kernel's score is $\nabla\log p(x_t|x_0) = -\varepsilon/\sigma$ and

$$\mathcal J_w(\theta) = \int_{t_\varepsilon}^T w(t)\,
  \mathbb E\,\big\|s_\theta(x_t, t) - \nabla\log p(x_t|x_0)\big\|^2\,dt
  = \int_{t_\varepsilon}^T \frac{w(t)}{\sigma(t)^2}\,\mathbb E\,\|\hat\varepsilon_\theta - \varepsilon\|^2\,dt,$$

which differs from the explicit score-matching objective (with $\nabla\log p_t$ in place of the
kernel's score) by a constant independent of $\theta$. Every weighting is written as $w(t)$
multiplying this score-space error:

* ``"simple"``: $w = \sigma^2$ (Ho et al.'s $\varepsilon$-MSE);
* ``"likelihood"``: $w = g^2$ (Song, Durkan, Murray & Ermon 2021): $\tfrac12\mathcal J_{g^2}$ is
  the negative ELBO up to a constant that does not depend on $\theta$ (``docs/training.md``);
* ``"edm"``: $w = \sigma^2(1 + \bar\sigma^2/\sigma_d^2)$ with $\bar\sigma = \sigma/m$, which is
  EDM's $\lambda(\bar\sigma) = (\bar\sigma^2+\sigma_d^2)/(\bar\sigma\sigma_d)^2$ on the denoiser error
  $\|D_\theta - x_0\|^2 = (\sigma^4/m^2)\|s_\theta - \nabla\log p(x_t|x_0)\|^2$.

**Estimator and normalisation.** With $t_i \sim q$ (`sdekit.time_sampling`) the loss is the
unbiased estimate $\frac1B\sum_i \frac{w(t_i)}{q(t_i)}\,\mathrm{err}_i / Z$ with
$Z = d\,(T - t_\varepsilon)$ for ``"simple"`` and ``"edm"`` (the loss is then the time average, under
uniform $t$, of the per-coordinate error: exactly the $\varepsilon$-MSE for an $\varepsilon$-network
with ``"simple"``) and $Z = 2d$ for ``"likelihood"`` (the loss is then $-\mathrm{ELBO}/d$ + const in
nats per dimension). With importance sampling $q \propto g^2/\sigma^2$ the likelihood weight
$w/q$ on the $\varepsilon$-error is the constant $\Lambda = \lambda(t_\varepsilon) - \lambda(T)$ (used as such).

**Targets.** The error is measured in a prediction space (``target``, default the model's own
``predict``): at fixed $t$ every conversion is affine with slope
$a(t) = \partial s/\partial\,\mathrm{prediction}$ (`sdekit.parameterization.prediction_score_scale`), so
the score-space error is $a^2$ times the error in that space and the loss *value* is the same in
every space; only rounding differs.

Sliced score matching (Song, Garg, Shi & Ermon 2019) needs no kernel:
$\mathbb E\big[v^\top\nabla_x(v^\top s_\theta) + \tfrac12(v^\top s_\theta)^2\big]$, or with the
variance-reduced form $\tfrac12\|s_\theta\|^2$ in place of $\tfrac12(v^\top s_\theta)^2$. For a
non-linear forward SDE its samples $x_t$ come from simulating the SDE (`SimulatedMarginals`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch

from sdekit._validation import broadcast_to_data, check_positive, check_state
from sdekit.parameterization import PREDICTIONS, convert_prediction, prediction_score_scale, prediction_target
from sdekit.time_sampling import SCHEMES, sample_times

__all__ = ["DSMLoss", "SlicedScoreMatchingLoss", "SimulatedMarginals", "DSMTerms", "build_loss", "WEIGHTINGS",
           "PROJECTIONS", "dsm_weight", "drop_labels"]

F64 = torch.float64
WEIGHTINGS = ("simple", "likelihood", "edm")
PROJECTIONS = ("rademacher", "gaussian")
_IMPORTANCE = ("importance", "importance_stratified")


def dsm_weight(sde, t: torch.Tensor, weighting: str, sigma_data: float = 1.0) -> torch.Tensor:
    r"""The weighting $w(t)$ of the score-space error, float64 (module docs).

    ``"simple"``: $\sigma^2$; ``"likelihood"``: $g^2$; ``"edm"``: $\sigma^2(1 + \bar\sigma^2/\sigma_d^2)$,
    $\bar\sigma^2 = e^{-\lambda}$.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    ker = sde.kernel
    t = t.to(F64)
    if weighting == "simple":
        return ker.sigma2(t)
    if weighting == "likelihood":
        return ker.g2(t)
    sd = check_positive(sigma_data, "sigma_data")
    return ker.sigma2(t) * (1.0 + torch.exp(-ker.log_snr(t)) / (sd * sd))


def _check_model(model):
    from .model import ScoreModel

    if not isinstance(model, ScoreModel):
        raise TypeError(f"model must be a diffusion.ScoreModel, got {type(model).__name__}")
    if not model.sde.is_linear:
        raise TypeError(f"denoising score matching needs a linear SDE (a Gaussian kernel); the model's process is "
                        f"{type(model.sde).__name__}: use SlicedScoreMatchingLoss")
    return model


def drop_labels(model, label, batch: int, device, generator: Optional[torch.Generator] = None):
    r"""Classifier-free-guidance training: each label replaced by the null label ``num_classes``
    with probability ``model.label_dropout`` (drawn from ``generator``, after the loss's own draws).

    ``label=None`` (the null label everywhere) and models with ``label_dropout == 0`` pass through
    without drawing. Labels must be classes, ``[0, num_classes)``.
    """
    p = float(getattr(model, "label_dropout", 0.0))
    if label is None:
        return None
    C = getattr(model, "num_classes", None)
    if C is not None:
        lab = torch.as_tensor(label)
        bad = (lab < 0) | (lab >= C)
        if bool(bad.any()):
            raise ValueError(f"training labels must lie in [0, {C - 1}] (num_classes = {C}); got "
                             f"{lab[bad].flatten()[:6].tolist()}")
    if p == 0.0:
        return label
    gdev = generator.device if generator is not None else device
    drop = torch.rand(batch, generator=generator, dtype=torch.float64, device=gdev).to(device) < p
    lab = label.to(device) if isinstance(label, torch.Tensor) else torch.full((batch,), int(label), device=device)
    return torch.where(drop, torch.full_like(lab, C), lab)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    gdev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=gdev).to(x.device)


@dataclass
class DSMTerms:
    """One draw of the DSM estimator (for diagnostics and tests).

    Attributes
    ----------
    per_sample:
        ``(B,)`` per-sample loss terms (their mean is the loss).
    t, q:
        float64 ``(B,)`` times and their density.
    x_t, eps:
        The noisy inputs and the noise.
    factor:
        float64 ``(B,)``: $w/(q Z)$, the factor that multiplies the *score-space* squared error.
    """

    per_sample: torch.Tensor
    t: torch.Tensor
    q: torch.Tensor
    x_t: torch.Tensor
    eps: torch.Tensor
    factor: torch.Tensor


class DSMLoss:
    r"""Denoising score matching for a `ScoreModel` on any linear SDE (module docs).

    Parameters
    ----------
    target:
        The space where the error is measured: ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, or
        ``None`` (default) for the model's own ``predict`` space. The value of the loss does not
        depend on it (equivalent weights).
    weighting:
        ``"simple"`` ($w = \sigma^2$), ``"likelihood"`` ($w = g^2$) or ``"edm"``.
    time_sampling:
        A scheme of `sdekit.time_sampling.sample_times`: ``"uniform"``, ``"importance"``
        ($q \propto g^2/\sigma^2$), ``"stratified"``, ``"importance_stratified"`` or ``"mixture"``.
    t_eps:
        Lower end of the time integral, in $(0, T)$.
    sigma_data:
        $\sigma_d$ for ``"edm"`` (default: the model's ``sigma_data``).
    """

    def __init__(self, target: Optional[str] = None, weighting: str = "simple", time_sampling: str = "uniform",
                 t_eps: float = 1e-5, sigma_data: Optional[float] = None):
        if target is not None and (not isinstance(target, str) or target not in PREDICTIONS):
            raise ValueError(f"target must be one of {PREDICTIONS} or None (the model's predict), got {target!r}")
        if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not isinstance(time_sampling, str) or time_sampling not in SCHEMES:
            raise ValueError(f"time_sampling must be one of {SCHEMES}, got {time_sampling!r}")
        self.target = target
        self.weighting = weighting
        self.time_sampling = time_sampling
        self.t_eps = check_positive(t_eps, "t_eps")
        self.sigma_data = None if sigma_data is None else check_positive(sigma_data, "sigma_data")

    @property
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable description; `build_loss` inverts it."""
        return {"name": "dsm", "target": self.target, "weighting": self.weighting,
                "time_sampling": self.time_sampling, "t_eps": self.t_eps, "sigma_data": self.sigma_data}

    def __repr__(self):
        return "DSMLoss(" + ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name") + ")"

    def normaliser(self, sde, d: int) -> float:
        r"""$Z$: $d(T - t_\varepsilon)$ for ``"simple"`` / ``"edm"``, $2d$ for ``"likelihood"``."""
        return 2.0 * d if self.weighting == "likelihood" else d * (sde.T - self.t_eps)

    def score_factor(self, sde, t: torch.Tensor, q: torch.Tensor, d: int, sigma_data: float) -> torch.Tensor:
        r"""$w(t)/(q(t)Z)$, the factor on the score-space squared error (float64)."""
        if self.weighting == "likelihood" and self.time_sampling in _IMPORTANCE:
            # q = g^2/(sigma^2 Lambda): w/q = Lambda sigma^2 exactly (no g^2/q round-off)
            ends = sde.kernel.log_snr(torch.tensor([self.t_eps, sde.T], dtype=F64, device=t.device))
            w_over_q = float(ends[0] - ends[1]) * sde.kernel.sigma2(t)
        else:
            w_over_q = dsm_weight(sde, t, self.weighting, sigma_data) / q
        return w_over_q / self.normaliser(sde, d)

    def terms(self, model, x0: torch.Tensor, label=None, generator: Optional[torch.Generator] = None) -> DSMTerms:
        """Draw $t$, $\\varepsilon$ and evaluate the per-sample terms (see `DSMTerms`)."""
        model = _check_model(model)
        x0 = check_state(x0, "x0")
        sde = model.sde
        if not self.t_eps < sde.T:
            raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}); got {self.t_eps!r}")
        B, d = x0.shape[0], x0[0].numel()
        t, q = sample_times(sde, B, t_eps=self.t_eps, scheme=self.time_sampling, generator=generator,
                            device=x0.device)
        eps = _randn_like(x0, generator)
        label = drop_labels(model, label, B, x0.device, generator)
        m = broadcast_to_data(sde.kernel.m(t), x0)
        s = broadcast_to_data(sde.kernel.sigma(t), x0)
        x_t = m * x0 + s * eps
        target = self.target or model.predict
        pred = model.net_output(x_t, t, label)
        if target != model.predict:
            pred = convert_prediction(pred, x_t, sde, t, source=model.predict, target=target)
        tgt = prediction_target(x0, eps, sde, t, target)
        err = (pred - tgt).pow(2).reshape(B, -1).sum(1)
        sd = model.sigma_data if self.sigma_data is None else self.sigma_data
        factor = self.score_factor(sde, t, q, d, sd)
        a2 = prediction_score_scale(sde, t, target).pow(2)
        per_sample = (factor * a2).to(err.dtype) * err
        return DSMTerms(per_sample=per_sample, t=t, q=q, x_t=x_t, eps=eps, factor=factor)

    def __call__(self, model, x0: torch.Tensor, label=None, generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
        """The loss (a scalar, mean over the batch) for data ``x0`` ``(B, ...)``; differentiable in the
        model's parameters. ``generator`` drives $t$ and $\\varepsilon$ (same seed, same loss)."""
        return self.terms(model, x0, label, generator).per_sample.mean()


# ---------------------------------------------------------------------------------------------
# Sliced score matching
# ---------------------------------------------------------------------------------------------


class SimulatedMarginals:
    r"""Samples $(x_t, t)$ of ANY forward SDE from x0 by simulation with `sdekit.solve`, cached.

    Paths start at the rows of ``x0`` at $t = 0$ and are integrated on a uniform grid of
    ``n_times * substeps`` steps to $T$; the states at $t_k = kT/n$ ($k = 1..n$, and $t_0 = 0$ when
    ``include_zero``) are stored. `draw` returns pairs with a uniformly random time index and path.

    Parameters
    ----------
    sde:
        A forward `sdekit.SDE` (non-linear allowed) or `sdekit.LinearSDE`.
    x0:
        ``(N, ...)`` starting states (data).
    n_times:
        Number of stored times.
    substeps:
        Solver steps between stored times.
    method:
        An SDE method of `sdekit.solve` (default ``"euler_maruyama"``).
    generator:
        Drives the Brownian increments.
    include_zero:
        Also store $t_0 = 0$ (the data itself).
    """

    def __init__(self, sde, x0: torch.Tensor, *, n_times: int = 32, substeps: int = 4,
                 method: str = "euler_maruyama", generator: Optional[torch.Generator] = None,
                 include_zero: bool = False, t_min: float = 0.0):
        from sdekit.solvers import solve

        x0 = check_state(x0, "x0")
        for name, v in (("n_times", n_times), ("substeps", substeps)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.sde = sde
        T = float(sde.T)
        steps = int(n_times) * int(substeps)
        grid = torch.linspace(0.0, T, steps + 1, dtype=F64)
        keep = grid[int(substeps)::int(substeps)]
        if include_zero:
            keep = torch.cat([grid[:1], keep])
        with torch.no_grad():
            sol = solve(sde, x0, 0.0, T, method=method, grid=grid, save_at=keep, generator=generator)
        self.times = keep.to(x0.device)
        self.states = sol.xs.detach()  # (n_times, N, ...)
        self.stats = sol.stats

    def draw(self, batch: int, generator: Optional[torch.Generator] = None):
        """``(x_t, t)``: ``batch`` states and their float64 times, drawn uniformly over (time, path)."""
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or int(batch) < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        K, N = self.states.shape[:2]
        gdev = generator.device if generator is not None else torch.device("cpu")
        k = torch.randint(K, (int(batch),), generator=generator, device=gdev).to(self.states.device)
        i = torch.randint(N, (int(batch),), generator=generator, device=gdev).to(self.states.device)
        return self.states[k, i], self.times[k]


class SlicedScoreMatchingLoss:
    r"""Sliced score matching (Song et al. 2019) on samples $x_t$ of any forward SDE.

    Per sample and projection $v$ (Rademacher or standard Gaussian, $\mathbb E[vv^\top] = I$):
    $v^\top\nabla_x(v^\top s_\theta) + \tfrac12(v^\top s_\theta)^2$, or with ``variance_reduced``
    $v^\top\nabla_x(v^\top s_\theta) + \tfrac12\|s_\theta\|^2$; both have expectation
    $\mathbb E[\mathrm{tr}\,\nabla s_\theta + \tfrac12\|s_\theta\|^2] = \tfrac12\mathbb E\|s_\theta - \nabla\log p_t\|^2 - C$.
    The loss is the batch mean of $w(t)$ times that, divided by $d$.

    Parameters
    ----------
    projection:
        ``"rademacher"`` or ``"gaussian"``.
    variance_reduced:
        Use $\tfrac12\|s\|^2$ (exact expectation over $v$) for the quadratic term.
    n_projections:
        Projections per sample.
    weighting:
        ``"auto"`` ($\sigma^2$ for a linear SDE, 1 otherwise), ``"sigma2"``, ``"none"``, or a
        callable ``w(t)`` of a float64 tensor.
    time_sampling:
        How `__call__` draws t for data ``x0`` under a linear SDE: a scheme of
        `sdekit.time_sampling`.
    t_eps:
        Lower end of the time interval.
    """

    def __init__(self, projection: str = "rademacher", variance_reduced: bool = True, n_projections: int = 1,
                 weighting: Union[str, Callable] = "auto", time_sampling: str = "uniform", t_eps: float = 1e-5):
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if not isinstance(variance_reduced, bool):
            raise TypeError(f"variance_reduced must be a bool, got {variance_reduced!r}")
        if isinstance(n_projections, bool) or not isinstance(n_projections, numbers.Integral) or n_projections < 1:
            raise ValueError(f"n_projections must be an integer >= 1, got {n_projections!r}")
        if not (callable(weighting) or weighting in ("auto", "sigma2", "none")):
            raise ValueError(f"weighting must be 'auto', 'sigma2', 'none' or a callable w(t), got {weighting!r}")
        if time_sampling not in SCHEMES:
            raise ValueError(f"time_sampling must be one of {SCHEMES}, got {time_sampling!r}")
        self.projection = projection
        self.variance_reduced = variance_reduced
        self.n_projections = int(n_projections)
        self.weighting = weighting
        self.time_sampling = time_sampling
        self.t_eps = check_positive(t_eps, "t_eps")

    @property
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable description (a callable weighting is not)."""
        if callable(self.weighting):
            raise TypeError("a SlicedScoreMatchingLoss with a callable weighting has no serialisable config")
        return {"name": "ssm", "projection": self.projection, "variance_reduced": self.variance_reduced,
                "n_projections": self.n_projections, "weighting": self.weighting,
                "time_sampling": self.time_sampling, "t_eps": self.t_eps}

    def __repr__(self):
        return (f"SlicedScoreMatchingLoss(projection={self.projection!r}, variance_reduced={self.variance_reduced}, "
                f"n_projections={self.n_projections}, weighting={self.weighting!r})")

    def _weight(self, sde, t: torch.Tensor) -> torch.Tensor:
        w = self.weighting
        if callable(w):
            out = torch.as_tensor(w(t), dtype=F64, device=t.device).expand_as(t)
        elif w == "none" or (w == "auto" and not sde.is_linear):
            out = torch.ones_like(t)
        else:
            if not sde.is_linear:
                raise TypeError(f"weighting='sigma2' needs a linear SDE, got {type(sde).__name__}")
            out = sde.kernel.sigma2(t)
        return out

    def per_sample(self, score: Callable, x_t: torch.Tensor, t: torch.Tensor, sde,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``(B,)`` weighted per-sample terms (averaged over projections, divided by d) for a score callable."""
        x_t = check_state(x_t, "x_t")
        B, d = x_t.shape[0], x_t[0].numel()
        P = self.n_projections
        x = x_t.detach().repeat(P, *([1] * (x_t.dim() - 1))).requires_grad_(True)
        tt = t.repeat(P)
        gdev = generator.device if generator is not None else x.device
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=gdev).to(x.device)
        if self.projection == "rademacher":
            v = v.sign()
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            s = score(x, tt)
            sv = (s * v).reshape(x.shape[0], -1).sum(1)
            (grad,) = torch.autograd.grad(sv.sum(), x, create_graph=create)
        jac = (grad * v).reshape(x.shape[0], -1).sum(1)
        quad = 0.5 * (s * s).reshape(x.shape[0], -1).sum(1) if self.variance_reduced else 0.5 * sv * sv
        per = (jac + quad).reshape(P, B).mean(0)
        return self._weight(sde, t.to(F64)).to(per.dtype) * per / d

    def __call__(self, model, x0: Optional[torch.Tensor] = None, label=None,
                 generator: Optional[torch.Generator] = None, *, x_t: Optional[torch.Tensor] = None,
                 t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss (scalar) for a `ScoreModel` (or a score callable with ``.sde`` given by a ScoreModel).

        Either ``x0`` (data; a linear SDE's kernel draws $x_t$) or ``x_t`` and ``t`` (e.g. from
        `SimulatedMarginals`, for any SDE).
        """
        from .model import ScoreModel

        if not isinstance(model, ScoreModel):
            raise TypeError(f"model must be a diffusion.ScoreModel, got {type(model).__name__}")
        sde = model.sde
        if (x_t is None) != (t is None):
            raise ValueError("pass x_t and t together")
        if x_t is None:
            if x0 is None:
                raise ValueError("pass data x0 (linear SDE) or samples x_t and times t")
            if not sde.is_linear:
                raise ValueError(f"the process {type(sde).__name__} has no Gaussian kernel to draw x_t from x0: "
                                 f"simulate it with diffusion.losses.SimulatedMarginals and pass x_t=, t=")
            x0 = check_state(x0, "x0")
            t, _ = sample_times(sde, x0.shape[0], t_eps=self.t_eps, scheme=self.time_sampling,
                                generator=generator, device=x0.device)
            eps = _randn_like(x0, generator)
            x_t = broadcast_to_data(sde.kernel.m(t), x0) * x0 + broadcast_to_data(sde.kernel.sigma(t), x0) * eps
        elif x0 is not None:
            raise ValueError("pass either x0 or (x_t, t), not both")
        t = torch.as_tensor(t, dtype=F64, device=x_t.device)
        if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must be a ({x_t.shape[0]},) tensor of times, got shape {tuple(t.shape)}")
        P = self.n_projections

        def score(x, tt):
            lab = label.repeat(P) if isinstance(label, torch.Tensor) and label.dim() == 1 else label
            return model.score(x, tt, lab)

        return self.per_sample(score, x_t, t, sde, generator).mean()


def build_loss(config: Dict[str, Any]):
    """Rebuild a loss from its ``.config`` (``{"name": "dsm" | "ssm", ...}``)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    cfg = dict(config)
    name = cfg.pop("name", None)
    kinds = {"dsm": DSMLoss, "ssm": SlicedScoreMatchingLoss}
    if name not in kinds:
        raise ValueError(f"config['name'] must be one of {tuple(kinds)}, got {name!r}")
    try:
        return kinds[name](**cfg)
    except TypeError as exc:
        raise ValueError(f"bad {name} loss config {config}: {exc}") from exc
