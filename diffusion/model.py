r"""`ScoreModel`: a network plus a forward process — the one object a user passes on.

A network ``net(x, noise_cond, label=None)`` predicts one of four equivalent quantities in its
``predict`` space (``"eps"``, ``"x0"``, ``"v"``, ``"score"``; see `sdekit.parameterization`).
`ScoreModel` feeds it the noise condition $\log\bar\sigma(t) = -\lambda(t)/2$ (a function of the
kernel, not of raw $t$, so a network means the same thing under every process), optionally
preconditions it (EDM's $c_{in}$, $c_{skip}$, $c_{out}$ derived from the kernel of any linear
SDE), and converts its output to a score through `sdekit.parameterization` — never re-deriving a
formula. The score plugs into every sdekit solver (`sample`) and likelihood (`log_likelihood`,
`bits_per_dim`, `elbo`).
"""

from __future__ import annotations

import contextlib
import json
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from sdekit._validation import check_positive, check_state, short
from sdekit.parameterization import (
    PREDICTIONS,
    convert_prediction,
    edm_preconditioning,
    score_from_prediction,
)

__all__ = ["ScoreModel", "PRECONDITIONINGS", "PREDICTIONS", "noise_condition"]

F64 = torch.float64
PRECONDITIONINGS = (None, "edm")
PROBLEMS = ("reverse", "probability_flow")
FORMAT = "diffusion.ScoreModel"
FORMAT_VERSION = 1


def _event_shape_of(net: nn.Module) -> Optional[Tuple[int, ...]]:
    """The event shape a network declares, if it does (``event_shape``; ``dim``; or
    ``in_channels`` with ``image_size``), else None."""
    shape = getattr(net, "event_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    dim = getattr(net, "dim", None)
    if isinstance(dim, numbers.Integral) and not isinstance(dim, bool):
        return (int(dim),)
    c, size = getattr(net, "in_channels", None), getattr(net, "image_size", None)
    if isinstance(c, numbers.Integral) and size is not None:
        hw = (int(size), int(size)) if isinstance(size, numbers.Integral) else tuple(int(s) for s in size)
        return (int(c),) + hw
    return None


def noise_condition(sde, t) -> torch.Tensor:
    r"""The networks' noise condition at times ``t``: $\log\bar\sigma(t) = -\lambda(t)/2$ (float64).

    $\lambda$ is the kernel's log-SNR; for a non-linear process (no kernel) it is $t$ itself. Shared
    by `ScoreModel` and `diffusion.classifier.NoiseConditionalClassifier`.
    """
    t64 = t.to(F64) if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=F64)
    c = -0.5 * sde.kernel.log_snr(t64) if sde.is_linear else t64
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"the noise condition is not finite at t = {short(t64[~torch.isfinite(c)])} "
                         f"(t must be > 0)")
    return c


class ScoreModel(nn.Module):
    r"""A score model $s_\theta(x, t)$ made of a network and a forward process.

    Parameters
    ----------
    net:
        An ``nn.Module`` called as ``net(x, noise_cond, label=None)`` returning a tensor of x's
        shape; ``noise_cond`` is a ``(B,)`` tensor.
    sde:
        The forward process: a `sdekit.LinearSDE` (any, including numeric kernels) for every
        ``predict``; a non-linear `sdekit.SDE` only with ``predict="score"`` (its noise condition
        is then the raw time $t$: there is no kernel).
    predict:
        What the (preconditioned) network predicts: ``"eps"``, ``"x0"``, ``"v"`` or ``"score"``.
    precondition:
        ``None`` or ``"edm"``: $D(x_t) = c_{skip}x_t/m + c_{out}F(c_{in}x_t, \log\bar\sigma)$ with
        the coefficients of `sdekit.parameterization.edm_preconditioning`; $D$ is a denoiser, so
        ``"edm"`` requires ``predict="x0"``.
    sigma_data:
        $\sigma_d > 0$, the data's per-coordinate standard deviation (EDM preconditioning and the
        ``"edm"`` loss weighting).
    t_eps:
        The end time $t_\varepsilon$ of sampling (the reverse SDE / PF ODE stop there).
    label_dropout:
        Probability $p_\varnothing \in [0, 1)$ with which training (`diffusion.losses.DSMLoss`)
        replaces a label by the null label ``net.num_classes``, so that one class-conditional
        network also learns the unconditional score (classifier-free guidance, `guided_score`).
        Recorded in the checkpoint; 0 (default) means the null label was never trained, and
        guidance is refused.

    Notes
    -----
    `ScoreModel` is an ``nn.Module`` holding ``net``: ``.parameters()``, ``.to()``,
    ``state_dict()`` act on the network.
    """

    def __init__(self, net: nn.Module, sde, predict: str = "eps", precondition: Optional[str] = None,
                 sigma_data: float = 1.0, t_eps: float = 1e-3, label_dropout: float = 0.0):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module called as net(x, noise_cond, label=None), got "
                            f"{type(net).__name__}")
        if getattr(sde, "T", None) is None or not hasattr(sde, "is_linear"):
            raise TypeError(f"sde must be a sdekit process (LinearSDE or SDE), got {type(sde).__name__}")
        if not isinstance(predict, str) or predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {PREDICTIONS}, got {predict!r}")
        if precondition not in PRECONDITIONINGS:
            raise ValueError(f"precondition must be one of {PRECONDITIONINGS}, got {precondition!r}")
        if precondition == "edm" and predict != "x0":
            raise ValueError(f"precondition='edm' builds a denoiser D = c_skip x/m + c_out F, so it needs "
                             f"predict='x0'; got predict={predict!r}")
        if not sde.is_linear and predict != "score":
            raise ValueError(f"a non-linear process ({type(sde).__name__}) has no Gaussian kernel to convert "
                             f"{predict!r} predictions: use predict='score'")
        self.net = net
        self.sde = sde
        self.predict = predict
        self.precondition = precondition
        self.sigma_data = check_positive(sigma_data, "sigma_data")
        self.t_eps = check_positive(t_eps, "t_eps")
        if not self.t_eps < sde.T:
            raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}); got {t_eps!r}")
        self.label_dropout = check_positive(label_dropout, "label_dropout", allow_zero=True)
        if not self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout!r}")
        if self.label_dropout > 0 and self.num_classes is None:
            raise ValueError(f"label_dropout={label_dropout!r} needs a class-conditional network (num_classes set); "
                             f"{type(net).__name__} has num_classes=None")

    # -- configuration -------------------------------------------------------------------------
    @property
    def config(self) -> Dict[str, Any]:
        """The model's hyper-parameters (JSON-serialisable except for ``sde``, which is described by
        `sdekit.config.process_config` at save time)."""
        return {"predict": self.predict, "precondition": self.precondition, "sigma_data": self.sigma_data,
                "t_eps": self.t_eps, "label_dropout": self.label_dropout}

    @property
    def num_classes(self) -> Optional[int]:
        """The network's class count (``None``: unconditional); label ``num_classes`` is the null label."""
        n = getattr(self.net, "num_classes", None)
        return int(n) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else None

    @property
    def event_shape(self) -> Optional[Tuple[int, ...]]:
        """The data shape the network declares (``None`` if it does not say)."""
        return _event_shape_of(self.net)

    def _param_like(self) -> Tuple[torch.dtype, torch.device]:
        for p in self.net.parameters():
            return p.dtype, p.device
        return torch.get_default_dtype(), torch.device("cpu")

    # -- the network in its prediction space ------------------------------------------------------
    def _times(self, t, x: torch.Tensor) -> torch.Tensor:
        """t as a float64 ``(B,)`` tensor on x's device, checked to lie in (0, T]."""
        if isinstance(t, bool) or not isinstance(t, (numbers.Real, torch.Tensor)):
            raise TypeError(f"t must be a float or a (B,) tensor of times, got {type(t).__name__}")
        t64 = torch.as_tensor(t, dtype=F64, device=x.device) if not isinstance(t, torch.Tensor) else \
            t.to(device=x.device, dtype=F64)
        if t64.dim() == 0:
            t64 = t64.expand(x.shape[0])
        if t64.dim() != 1 or t64.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t must be a scalar or a ({x.shape[0]},) tensor for x of shape {tuple(x.shape)}; "
                             f"got shape {tuple(t64.shape)}")
        t64 = t64.expand(x.shape[0])
        low = (t64 <= 0) if self.sde.is_linear else (t64 < 0)  # a kernel's score is singular at t = 0
        bad = ~torch.isfinite(t64) | low | (t64 > self.sde.T * (1 + 1e-12))
        if bool(bad.any()):
            span = f"(0, {self.sde.T}]" if self.sde.is_linear else f"[0, {self.sde.T}]"
            raise ValueError(f"t must lie in {span} (a linear SDE's score is singular at t = 0); "
                             f"got {short(t64[bad])}")
        return t64

    def noise_cond(self, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        r"""The network's noise condition: $\log\bar\sigma(t) = -\lambda(t)/2$ ($\lambda$ the kernel's log-SNR).

        For a non-linear process (no kernel) it is $t$ itself.

        Parameters
        ----------
        t:
            Times, a ``(B,)`` tensor in $(0, T]$.
        dtype:
            Output dtype (default: the network parameters' dtype).
        """
        if dtype is None:
            dtype = self._param_like()[0]
        return noise_condition(self.sde, t).to(dtype)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        x = check_state(x, "x")
        shape = self.event_shape
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but the network {type(self.net).__name__} expects "
                             f"(B, {', '.join(map(str, shape))})")
        return x

    def _call_net(self, x: torch.Tensor, cond: torch.Tensor, label) -> torch.Tensor:
        out = self.net(x, cond, label)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"net(x, noise_cond, label) must return a tensor shaped like x {tuple(x.shape)}, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        return out

    def _output(self, x: torch.Tensor, t64: torch.Tensor, label) -> torch.Tensor:
        cond = self.noise_cond(t64, dtype=x.dtype)
        if self.precondition is None:
            return self._call_net(x, cond, label)
        c_in, c_skip, c_out, m = (c.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
                                  for c in edm_preconditioning(self.sde, t64, self.sigma_data))
        return c_skip * (x / m) + c_out * self._call_net(c_in * x, cond, label)

    def net_output(self, x: torch.Tensor, t, label=None) -> torch.Tensor:
        r"""The prediction in ``predict`` space at $(x, t)$, after preconditioning.

        Parameters
        ----------
        x:
            Noisy states $x_t$, ``(B, *event_shape)``.
        t:
            A float or a ``(B,)`` tensor of times in $(0, T]$.
        label:
            Class labels (``(B,)`` long tensor) for a class-conditional network, or ``None``.
        """
        x = self._check_x(x)
        return self._output(x, self._times(t, x), label)

    def predict_as(self, x: torch.Tensor, t, target: str, label=None) -> torch.Tensor:
        """The network's prediction converted to ``target`` space (``"eps"``, ``"x0"``, ``"v"``, ``"score"``)."""
        x = self._check_x(x)
        t64 = self._times(t, x)
        return convert_prediction(self._output(x, t64, label), x, self.sde, t64, source=self.predict,
                                  target=target)

    def score(self, x: torch.Tensor, t, label=None) -> torch.Tensor:
        r"""The score $s_\theta(x, t) \approx \nabla_x\log p_t(x)$ (converted by `sdekit.parameterization`)."""
        x = self._check_x(x)
        t64 = self._times(t, x)
        out = self._output(x, t64, label)
        if self.predict == "score":
            return out
        return score_from_prediction(out, x, self.sde, t64, self.predict)

    def forward(self, x: torch.Tensor, t, label=None) -> torch.Tensor:
        """Same as `score` (so a `ScoreModel` is itself a score callable ``(x, t)``)."""
        return self.score(x, t, label)

    def score_fn(self, label=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A plain ``score(x, t)`` callable for sdekit, with ``label`` fixed."""
        if label is None:
            return self.score

        def score(x, t):
            lab = label
            if isinstance(lab, torch.Tensor) and lab.dim() == 1 and lab.shape[0] != x.shape[0]:
                raise ValueError(f"label has {lab.shape[0]} entries but the batch has {x.shape[0]}")
            return self.score(x, t, lab)

        return score

    def _class_label(self, label, n: Optional[int] = None):
        """A class label for conditional sampling: an int or a ``(B,)`` integer tensor in
        ``[0, num_classes)`` (the null label is not a class)."""
        C = self.num_classes
        if C is None:
            raise ValueError(f"label={label!r} was given but the network {type(self.net).__name__} is unconditional "
                             f"(num_classes=None)")
        if isinstance(label, bool) or not isinstance(label, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"label must be an int or a (B,) integer tensor, got {type(label).__name__}")
        lab = torch.as_tensor(label)
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise TypeError(f"label must be an integer (tensor), got dtype {lab.dtype}")
        bad = (lab < 0) | (lab >= C)
        if bool(bad.any()):
            raise ValueError(f"label must lie in [0, {C - 1}] (the model has {C} classes; {C} is the null label, "
                             f"not a class); got {lab[bad].tolist() if lab.dim() else int(lab)}")
        if n is not None and lab.dim() == 1 and lab.shape[0] != n:
            raise ValueError(f"label has {lab.shape[0]} entries but {n} samples are drawn")
        return label

    def guided_score(self, label, scale: float, *, interval: Optional[Sequence[float]] = None,
                     noise_level: str = "sigma"):
        r"""The classifier-free-guided score $s_\varnothing + (1 + w)(s_c - s_\varnothing)$ for ``label``.

        $s_c$ is this model's score with the label, $s_\varnothing$ with the null label
        (`sdekit.guidance.ClassifierFreeGuidance`: each call costs two network evaluations, one
        outside the guidance ``interval``, and `sdekit.solve` counts them).

        Parameters
        ----------
        label:
            An int class or a ``(B,)`` integer tensor, in ``[0, num_classes)``.
        scale:
            The guidance scale $w$ (finite): 0 is the conditional model, $w > 0$ sharpens the class.
        interval:
            Guide only where the noise level lies in ``interval = (low, high)``; see
            `sdekit.guidance`.
        noise_level:
            The variable of ``interval``: ``"sigma"`` ($\bar\sigma = \sigma/m$) or ``"log_snr"``
            ($\lambda$).

        Raises
        ------
        ValueError
            For a label out of range, a NaN or infinite scale, an unconditional network, or a model
            trained without the null label (``label_dropout == 0``).
        """
        from sdekit.guidance import check_scale, classifier_free_guidance

        w = check_scale(scale, "scale")
        self._class_label(label)
        if self.label_dropout == 0:
            raise ValueError("classifier-free guidance needs the unconditional score, i.e. a model trained with "
                             "label dropout to the null label; this model has label_dropout=0 (never trained on "
                             "the null label): retrain with ScoreModel(..., label_dropout=0.1), or sample with "
                             "guidance=None")
        return classifier_free_guidance(self.score_fn(label), self.score_fn(None), w, sde=self.sde,
                                        interval=interval, noise_level=noise_level)

    @contextlib.contextmanager
    def _inference(self, no_grad: bool):
        was_training = self.training
        self.eval()
        try:
            with (torch.no_grad() if no_grad else contextlib.nullcontext()):
                yield
        finally:
            self.train(was_training)

    def _label_for(self, label, n: int, device):
        if label is None or isinstance(label, torch.Tensor):
            return label.to(device) if isinstance(label, torch.Tensor) else None
        if isinstance(label, numbers.Integral) and not isinstance(label, bool):
            return torch.full((n,), int(label), dtype=torch.long, device=device)
        raise TypeError(f"label must be None, an int or a LongTensor, got {type(label).__name__}")

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, n: Optional[int] = None, x_T: Optional[torch.Tensor] = None, *,
               shape: Optional[Sequence[int]] = None, method: str = "dpmpp_2m", steps: Optional[int] = None,
               rtol: Optional[float] = None, atol: Optional[float] = None,
               generator: Optional[torch.Generator] = None, label=None, problem: Optional[str] = None,
               eta: float = 1.0, t_eps: Optional[float] = None, guidance: Optional[float] = None,
               guidance_interval: Optional[Sequence[float]] = None, **options: Any):
        r"""Draw samples by solving the reverse SDE or the probability-flow ODE with `sdekit.solve`.

        Parameters
        ----------
        n:
            The number of samples: the start $x_T$ is drawn from the process's prior, in the
            network's dtype and device. Pass exactly one of ``n`` and ``x_T``.
        x_T:
            The start itself, ``(B, *event_shape)``.
        shape:
            Event shape of a sample (default: the network's declared shape).
        method:
            A `sdekit.solve` method. ODE methods and the deterministic samplers (``ddim``,
            ``dpm_solver_*``, ``dpmpp_2m``, ``dpmpp_3m``) solve the PF ODE; SDE methods and the
            stochastic samplers (``euler_maruyama``, ``reverse_diffusion``, ``ancestral``, ``pc``,
            ``dpmpp_2m_sde`` ...) the reverse SDE.
        steps:
            Passed to `sdekit.solve`: the number of steps of a fixed-step method.
        rtol:
            Passed to `sdekit.solve`: relative tolerance of an adaptive method.
        atol:
            Passed to `sdekit.solve`: absolute tolerance of an adaptive method.
        generator:
            Passed to `sdekit.solve` (and used for the prior draw).
        **options:
            Passed to `sdekit.solve`: method options such as ``snr`` of ``pc``.
        label:
            An int (every sample) or a ``(n,)`` LongTensor of class labels, or ``None``.
        problem:
            Override the choice: ``"reverse"`` or ``"probability_flow"``.
        eta:
            Noise scale of the reverse SDE family (1 = the reverse-time SDE).
        t_eps:
            End time (default: the model's ``t_eps``).
        guidance:
            Classifier-free guidance scale $w$ (needs ``label``; see `guided_score`), or ``None``
            for the plain (conditional) score. The solver's NFE counts both network evaluations.
        guidance_interval:
            ``(low, high)`` in $\bar\sigma = \sigma/m$: guide only there (see `guided_score`).

        Returns
        -------
        sdekit.Solution
            The samples in ``.x`` and the solver statistics in ``.stats``.
        """
        from sdekit.solvers import solve
        from sdekit.solvers.registry import get_method

        info = get_method(method)
        if problem is None:
            problem = "probability_flow" if (info.problem == "ode" or (info.problem == "score" and not info.stochastic)) \
                else "reverse"
        if problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {PROBLEMS} or None, got {problem!r}")
        if (n is None) == (x_T is None):
            raise ValueError("pass exactly one of n (number of samples) and x_T (the starting states)")
        dtype, device = self._param_like()
        if x_T is None:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
                raise ValueError(f"n must be an integer >= 1, got {n!r}")
            ev = tuple(int(s) for s in shape) if shape is not None else self.event_shape
            if ev is None:
                raise ValueError(f"the network {type(self.net).__name__} does not declare its data shape: "
                                 f"pass shape=(...) (the event shape of one sample)")
            x_T = self.sde.prior_sample((int(n),) + ev, generator=generator, dtype=dtype,
                                        device=generator.device if generator is not None else device).to(device)
        x_T = self._check_x(x_T)
        t_eps = self.t_eps if t_eps is None else check_positive(t_eps, "t_eps")
        if guidance is not None:
            if label is None:
                raise ValueError("guidance needs a label (the class to guide towards)")
            score = self.guided_score(self._label_for(self._class_label(label, x_T.shape[0]), x_T.shape[0],
                                                      x_T.device), guidance, interval=guidance_interval)
        else:
            if guidance_interval is not None:
                raise ValueError("guidance_interval was given without guidance (a scale)")
            score = self.score_fn(self._label_for(label, x_T.shape[0], x_T.device))
        prob = (self.sde.probability_flow(score, t_eps=t_eps) if problem == "probability_flow"
                else self.sde.reverse(score, eta=eta, t_eps=t_eps))
        with self._inference(no_grad=True):
            return solve(prob, x_T, method=method, steps=steps, rtol=rtol, atol=atol, generator=generator,
                         **options)

    # -- likelihoods -----------------------------------------------------------------------------
    def log_likelihood(self, x: torch.Tensor, label=None, **kw: Any):
        r"""$\log p^\theta_{t_\varepsilon}(x)$ through the PF ODE: `sdekit.likelihood.log_likelihood`
        with this model's score (keyword arguments pass through; eval mode, restored after).

        The network's parameters are frozen for the solve unless `params=` is passed: a score
        that closes over parameters requiring gradients makes the likelihood keep the autograd
        graph of every evaluation for a backward pass through the solver (measured: ~9 MB per
        evaluation for a 256-wide MLP at batch 500, gigabytes for a few hundred evaluations) and
        forces the torchdiffeq backend. Pass `params=list(model.parameters())` to differentiate
        $\log p$ with respect to them (then with `adjoint=True` for memory that does not grow).
        """
        from sdekit.likelihood import log_likelihood

        x = self._check_x(x)
        frozen = [] if kw.get("params") is not None else [p for p in self.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            with self._inference(no_grad=False):  # the divergence needs autograd in x
                return log_likelihood(self.sde, self.score_fn(self._label_for(label, x.shape[0], x.device)),
                                      x, **kw)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def elbo(self, x: torch.Tensor, label=None, **kw: Any):
        r"""The ELBO $\le \log p^\theta_{t_\varepsilon}(x)$: `sdekit.likelihood.elbo` with this model's score."""
        from sdekit.likelihood import elbo

        x = self._check_x(x)
        with self._inference(no_grad=True):
            return elbo(self.sde, self.score_fn(self._label_for(label, x.shape[0], x.device)), x, **kw)

    def bits_per_dim(self, x: torch.Tensor, transform, label=None, dequantization=None, bound: str = "ode",
                     **kw: Any) -> torch.Tensor:
        r"""Bits per dimension of native data through `sdekit.likelihood.bits_per_dim`.

        Parameters
        ----------
        x:
            Model-space data (``transform`` applied, dequantized if discrete), ``(B, ...)``.
        transform:
            The `sdekit.likelihood.DataTransform` that produced ``x``.
        dequantization:
            The `sdekit.likelihood.UniformDequantization` used (discrete data), or ``None``.
        bound:
            ``"ode"`` (exact PF-ODE likelihood, `log_likelihood`) or ``"elbo"`` (the variational
            bound, `elbo`: an upper bound on bits/dim).
        **kw:
            Passed to `log_likelihood` / `elbo`.

        Returns
        -------
        torch.Tensor
            ``(B,)`` float64 tensor.
        """
        from sdekit.likelihood import bits_per_dim

        if bound not in ("ode", "elbo"):
            raise ValueError(f"bound must be 'ode' or 'elbo', got {bound!r}")
        res = self.log_likelihood(x, label, **kw) if bound == "ode" else self.elbo(x, label, **kw)
        return bits_per_dim(res, transform, tuple(x.shape[1:]), dequantization=dequantization)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory) -> Any:
        """Write the network's weights (safetensors) and the model's description (JSON) with
        `diffusion.checkpoint.save_checkpoint`; returns the checkpoint path.

        The process is stored by `sdekit.config.process_config`; a custom callable process cannot
        be, and must be passed again to `load`.
        """
        from diffusion.checkpoint import save_checkpoint
        from sdekit.config import process_config

        net_config = getattr(self.net, "config", None)
        if not isinstance(net_config, dict):
            raise TypeError(f"the network {type(self.net).__name__} has no .config dict, so it cannot be rebuilt "
                            f"at load; use a diffusion.nets network (or give yours a config and build_net support)")
        try:
            sde_config = process_config(self.sde)
        except TypeError:
            sde_config = None
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": self.config, "net": net_config,
                "sde": sde_config, "sde_class": type(self.sde).__name__}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return save_checkpoint(directory, tensors, meta)

    @classmethod
    def load(cls, directory, sde=None, map_location="cpu") -> "ScoreModel":
        """Rebuild a model written by `save` (never unpickles: safetensors + JSON).

        Parameters
        ----------
        directory:
            The directory given to `save` (its latest checkpoint is read) or a checkpoint path.
        sde:
            The forward process; required when the saved one was a custom callable process, and
            checked against the saved description otherwise.
        map_location:
            Device for the weights.
        """
        from pathlib import Path

        from diffusion.checkpoint import latest_checkpoint, load_checkpoint
        from diffusion.nets import build_net
        from sdekit.config import process_config, process_from_config

        path = Path(directory)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in directory {str(path)!r}")
            path = found
        tensors, meta = load_checkpoint(path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a ScoreModel checkpoint (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} has ScoreModel format version {meta.get('version')!r}; this code "
                             f"reads version {FORMAT_VERSION}")
        saved = meta.get("sde")
        if sde is None:
            if saved is None:
                raise ValueError(f"the checkpoint's process is a custom {meta.get('sde_class')} that cannot be "
                                 f"serialised: pass it again as ScoreModel.load(..., sde=...)")
            sde = process_from_config(saved)
        elif saved is not None and json.loads(json.dumps(process_config(sde))) != saved:
            raise ValueError(f"sde {sde!r} does not match the saved process {saved}")
        net = build_net(meta["net"])
        model = cls(net, sde, **meta["model"])
        state = {k: v.to(map_location) for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {str(path)!r} does not fit the network {meta['net'].get('name')}: "
                             f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        return model.to(map_location)

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, predict={self.predict!r}, precondition={self.precondition!r}, "
                f"sigma_data={self.sigma_data}, t_eps={self.t_eps}, label_dropout={self.label_dropout}")
