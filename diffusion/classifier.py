r"""A noise-conditional classifier $p_\phi(c \mid x_t, t)$ for classifier guidance, and its trainer.

Classifier guidance (`sdekit.guidance.ClassifierGuidance`) needs $\nabla_x\log p_t(c \mid x)$
at every noise level, so the classifier sees noisy inputs: `train_classifier` minimises the
cross-entropy

$$
    \mathbb E_{t \sim U[t_\varepsilon, T]}\ \mathbb E_{(x_0, c)}\ \mathbb E_{x_t \sim p(x_t \mid x_0)}
    \big[-\log p_\phi(c \mid x_t, t)\big],
$$

with $x_t = m(t)x_0 + \sigma(t)\varepsilon$ drawn from the forward kernel
(`sdekit.LinearSDE.marginal_sample`), whose minimiser is the exact $p_t(c \mid x)$. The network
is a residual MLP on the flattened input (vectors and small images alike) conditioned, like the
score networks, on the noise level $\log\bar\sigma(t) = -\lambda(t)/2$
(`diffusion.model.noise_condition`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from sdekit._validation import check_int, check_positive, check_state
from sdekit.time_sampling import sample_times

from .model import noise_condition
from .nets._inputs import activation, positive_int
from .nets.embeddings import noise_embedding

__all__ = ["NoiseConditionalClassifier", "train_classifier", "classifier_guided_score"]

F64 = torch.float64


class _Block(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lin1 = nn.Linear(width, width)
        self.cond = nn.Linear(width, width)
        self.act = activation(act)
        self.lin2 = nn.Linear(width, width)

    def forward(self, h, c):
        return h + self.lin2(self.act(self.lin1(self.norm(h)) + self.cond(c)))


class NoiseConditionalClassifier(nn.Module):
    r"""$\log p_\phi(c \mid x_t, t)$: a residual MLP on the flattened input, conditioned on the noise level.

    Parameters
    ----------
    sde:
        The forward process (a `sdekit.LinearSDE`: its kernel defines the noise condition).
    num_classes:
        Number of classes $C \ge 2$.
    event_shape:
        Shape of one sample (e.g. ``(2,)`` or ``(1, 8, 8)``).
    width:
        Hidden width.
    depth:
        Number of residual blocks.
    emb_dim:
        Features of the noise-condition embedding (even).
    act:
        Activation (``"silu"``, ``"gelu"``, ``"relu"``, ``"tanh"``).
    """

    def __init__(self, sde, num_classes: int, event_shape: Sequence[int], width: int = 128, depth: int = 3,
                 emb_dim: int = 32, act: str = "silu"):
        super().__init__()
        if not getattr(sde, "is_linear", False):
            raise TypeError(f"sde must be a sdekit.LinearSDE (x_t is drawn from its kernel), got {type(sde).__name__}")
        self.sde = sde
        self.num_classes = positive_int(num_classes, "num_classes", minimum=2)
        if isinstance(event_shape, numbers.Integral):
            event_shape = (int(event_shape),)
        self.event_shape = tuple(positive_int(s, "event_shape entry") for s in event_shape)
        self.width, self.depth, self.emb_dim, self.act = (positive_int(width, "width"), positive_int(depth, "depth"),
                                                          int(emb_dim), act)
        d = math.prod(self.event_shape)
        self.embed = noise_embedding("sinusoidal", emb_dim)
        self.emb_mlp = nn.Sequential(nn.Linear(emb_dim, self.width), activation(act), nn.Linear(self.width, self.width))
        self.inp = nn.Linear(d, self.width)
        self.blocks = nn.ModuleList([_Block(self.width, act) for _ in range(self.depth)])
        self.out = nn.Sequential(nn.LayerNorm(self.width), activation(act), nn.Linear(self.width, self.num_classes))

    @property
    def config(self) -> Dict[str, Any]:
        """The constructor's arguments except ``sde`` (JSON-serialisable)."""
        return {"num_classes": self.num_classes, "event_shape": list(self.event_shape), "width": self.width,
                "depth": self.depth, "emb_dim": self.emb_dim, "act": self.act}

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        x = check_state(x, "x")
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.event_shape))}); got {tuple(x.shape)}")
        return x

    def logits(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""Unnormalised class scores ``(B, C)`` at $(x_t, t)$; ``t`` a float or a ``(B,)`` tensor in $(0, T]$."""
        x = self._check_x(x)
        t64 = torch.as_tensor(t, dtype=F64, device=x.device) if not isinstance(t, torch.Tensor) else t.to(x.device, F64)
        t64 = t64.expand(x.shape[0]) if t64.dim() == 0 else t64
        if t64.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or a ({x.shape[0]},) tensor, got shape {tuple(t64.shape)}")
        dtype = self.inp.weight.dtype
        c = self.emb_mlp(self.embed(noise_condition(self.sde, t64)).to(dtype))
        h = self.inp(x.reshape(x.shape[0], -1).to(dtype))
        for blk in self.blocks:
            h = blk(h, c)
        return self.out(h)

    def log_probs(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""$\log p_\phi(c \mid x_t, t)$ for every class, ``(B, C)``."""
        return torch.log_softmax(self.logits(x, t), dim=1)

    def _labels(self, label, batch: int, device) -> torch.Tensor:
        if isinstance(label, bool) or not isinstance(label, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"label must be an int or a (B,) integer tensor, got {type(label).__name__}")
        lab = torch.as_tensor(label, device=device)
        if lab.is_floating_point() or lab.dtype == torch.bool:
            raise TypeError(f"label must be integer, got dtype {lab.dtype}")
        lab = lab.long().expand(batch) if lab.dim() == 0 else lab.long()
        if lab.shape != (batch,):
            raise ValueError(f"label must be an int or a ({batch},) tensor, got shape {tuple(lab.shape)}")
        bad = (lab < 0) | (lab >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"label must lie in [0, {self.num_classes - 1}] (num_classes = {self.num_classes}); "
                             f"got {lab[bad][:6].tolist()}")
        return lab

    def log_prob(self, x: torch.Tensor, t, label) -> torch.Tensor:
        r"""$\log p_\phi(c \mid x_t, t)$ of ``label`` (an int or ``(B,)``), shape ``(B,)``; differentiable in x."""
        lab = self._labels(label, x.shape[0], x.device)
        return self.log_probs(x, t).gather(1, lab[:, None])[:, 0].to(x.dtype)

    def log_prob_fn(self, label) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``log_prob(x, t)`` with ``label`` fixed (what `sdekit.guidance.classifier_guidance` takes)."""
        if isinstance(label, numbers.Integral) and not isinstance(label, bool):
            self._labels(label, 1, torch.device("cpu"))
        return lambda x, t: self.log_prob(x, t, label)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """Same as `logits`."""
        return self.logits(x, t)


def _dataset(dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    data, labels = getattr(dataset, "data", None), getattr(dataset, "labels", None)
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise TypeError(f"dataset must have .data (a float tensor) and .labels, got {type(dataset).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (data.shape[0],):
        raise ValueError(f"a classifier needs a labelled dataset (.labels of shape ({data.shape[0]},)); got "
                         f"{None if labels is None else tuple(labels.shape)}")
    return data, labels.long()


def train_classifier(classifier: NoiseConditionalClassifier, dataset, *, steps: int = 2000, batch_size: int = 256,
                     lr: float = 2e-3, weight_decay: float = 0.0, t_eps: float = 1e-3, seed: int = 0,
                     time_limit: Optional[float] = None) -> Dict[str, List[float]]:
    r"""Train ``classifier`` by cross-entropy on $x_t$ drawn from the forward kernel (module docs).

    Times $t \sim U[t_\varepsilon, T]$ (`sdekit.time_sampling.sample_times`), batches drawn with
    replacement, AdamW with a cosine learning rate; deterministic for a given ``seed`` (CPU).

    Parameters
    ----------
    classifier:
        A `NoiseConditionalClassifier` (trained in place, left in eval mode).
    dataset:
        An object with ``.data`` ``(N, *event_shape)`` and ``.labels`` ``(N,)`` in ``[0, C)``.
    steps:
        Optimiser steps.
    batch_size:
        Samples per step.
    lr:
        AdamW's learning rate.
    weight_decay:
        AdamW's decoupled weight decay.
    t_eps:
        Lowest training time.
    seed:
        Seeds the batch, time and noise draws.
    time_limit:
        Stop early after this many seconds (``None``: run every step).

    Returns
    -------
    ``{"loss": [...], "accuracy": [...]}`` per step (accuracy on the noisy batch).
    """
    import time

    if not isinstance(classifier, NoiseConditionalClassifier):
        raise TypeError(f"classifier must be a NoiseConditionalClassifier, got {type(classifier).__name__}")
    steps = check_int(steps, "steps", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    lr = check_positive(lr, "lr")
    t_eps = check_positive(t_eps, "t_eps")
    data, labels = _dataset(dataset)
    if tuple(data.shape[1:]) != classifier.event_shape:
        raise ValueError(f"dataset samples have shape {tuple(data.shape[1:])} but the classifier expects "
                         f"{classifier.event_shape}")
    bad = (labels < 0) | (labels >= classifier.num_classes)
    if bool(bad.any()):
        raise ValueError(f"dataset labels must lie in [0, {classifier.num_classes - 1}]; got "
                         f"{labels[bad][:6].tolist()}")
    dev = next(classifier.parameters()).device
    data, labels = data.to(dev), labels.to(dev)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    sde = classifier.sde
    hist: Dict[str, List[float]] = {"loss": [], "accuracy": []}
    classifier.train()
    tic = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(data.shape[0], (batch_size,), generator=g).to(dev)
        x0, y = data[idx], labels[idx]
        t, _ = sample_times(sde, batch_size, t_eps=t_eps, generator=g)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(dev)
        m, s = (c.to(x0.dtype).to(dev).reshape(-1, *([1] * (x0.dim() - 1))) for c in sde.marginal(t))
        xt = m * x0 + s * eps
        logits = classifier.logits(xt, t.to(dev))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist["loss"].append(float(loss.detach()))
        hist["accuracy"].append(float((logits.argmax(1) == y).float().mean()))
        if time_limit is not None and time.perf_counter() - tic > time_limit:
            break
    classifier.eval()
    return hist


def classifier_guided_score(model, classifier: NoiseConditionalClassifier, label, scale: float, *,
                            interval: Optional[Sequence[float]] = None, noise_level: str = "sigma"):
    r"""$s_\theta(x, t) + (1 + w)\nabla_x\log p_\phi(c \mid x_t, t)$ for a `ScoreModel` and a classifier.

    The score is the model's unconditional score (the null label for a class-conditional
    network). Returns a `sdekit.guidance.ClassifierGuidance` (2 network evaluations per call,
    counted by `sdekit.solve`).
    """
    from sdekit.guidance import classifier_guidance

    if not isinstance(classifier, NoiseConditionalClassifier):
        raise TypeError(f"classifier must be a NoiseConditionalClassifier, got {type(classifier).__name__}")
    return classifier_guidance(model.score_fn(None), classifier.log_prob_fn(label), scale, sde=model.sde,
                               interval=interval, noise_level=noise_level)
