"""The trainer: AdamW, warm-up then cosine or constant learning rate, gradient clipping, EMA,
bf16 autocast, optional ``torch.compile``, deterministic seeding, periodic evaluation, a JSON-lines
loss log, and atomic checkpoints from which ``train(resume=True)`` continues bit for bit.

What a step does (step $k = 1, 2, \\dots$ counts optimizer updates):

1. learning rate $\\eta_k$: linear warm-up $\\eta\\,k/W$ for $k \\le W$ (``warmup``), then
   ``"cosine"`` $\\eta_{min} + \\tfrac12(\\eta - \\eta_{min})(1 + \\cos(\\pi\\,(k - 1 - W)/(K - W)))$ over the
   remaining $K - W$ steps (``steps`` $= K$), or ``"constant"`` $\\eta$ — a pure function of $k$
   (``lr_at``), so the schedule needs no state of its own;
2. a batch: the data are visited in epochs, each a fresh random permutation drawn from the
   *batch* generator;
3. the loss, ``loss(model, x0, label=labels, generator=noise)``, with the *noise* generator
   (the loss draws its times and noise from it), under bf16 autocast if asked (CUDA only);
4. a non-finite loss or gradient norm stops training with ``TrainingDivergedError`` naming the
   step; nothing is written after it, so the last checkpoint is the last good state;
5. gradients clipped to global norm ``grad_clip``, an AdamW update;
6. EMA of the parameters, $\\bar\\theta \\leftarrow d_k\\bar\\theta + (1 - d_k)\\theta$, with
   ``ema_warmup``: $d_k = \\min(d, (1 + k)/(10 + k))$ (score_sde's and TensorFlow's
   ``ExponentialMovingAverage(num_updates=k)`` rule: the average forgets its random initial value
   in the first few hundred steps instead of $1/(1-d)$), else $d_k = d$; buffers are copied.

Randomness comes from three streams, each seeded from ``seed`` through ``numpy``'s
``SeedSequence`` (independent streams): the batch generator (CPU), the noise generator (on the
device) and torch's global generator (dropout and the like). All three, CUDA's, NumPy's and
Python's are saved in every checkpoint with the model, the EMA, the optimizer moments, the epoch
permutation and position, and the per-step loss history; evaluation runs under
``torch.random.fork_rng`` so it consumes none of them. Resuming therefore reproduces an
uninterrupted run exactly on the CPU (on CUDA, as far as its kernels are deterministic).

Files under ``out_dir``: ``checkpoints/ckpt-*.{safetensors,json}`` (``diffusion.checkpoint``)
and ``log.jsonl``, one JSON object per line: ``{"event": "train", "step", "loss", "lr",
"grad_norm", "it_s", "elapsed_s"}`` every ``log_every`` steps (loss and gradient norm averaged
over the steps since the previous line), ``{"event": "eval", "step", <metrics>}`` and
``{"event": "diverged", ...}``. A checkpoint records the log's length, and resuming cuts the log
back to it, so the log of a resumed run reads as one run.

Under an initialised ``torch.distributed`` process group of $N > 1$ processes (``torchrun``;
``diffusion.distributed``, ``docs/scaling.md``) the trainer is data-parallel: every process keeps
the same replica and draws the same global batch and loss randomness, the network runs on this
process's rows only (``DistributedDataParallel``, gradients summed over processes), so $N$
processes with ``batch_size`` $B$ take the same steps as one process with $B$ (to rounding). Rank 0
alone writes checkpoints and the log; a run resumes under any number of processes; torch's global
generator is seeded per rank; a failed collective raises ``diffusion.distributed.DistributedError``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import distributed as _dist
from .checkpoint import (
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)

__all__ = ["TrainConfig", "Trainer", "TrainingDivergedError", "lr_at", "ema_decay_at"]

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
# independent random streams derived from the one seed (SeedSequence spawn keys)
_STREAM_BATCH, _STREAM_NOISE, _STREAM_GLOBAL, _STREAM_EVAL = range(4)
# EMA warm-up d_k = min(d, (1 + k) / (10 + k)) (score_sde / TensorFlow ExponentialMovingAverage)
_EMA_WARMUP_OFFSET = 10.0
_DRY_RUN_BATCH = 2  # samples in the shape check before the first step


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite.

    Attributes
    ----------
    step:
        The step whose loss (or gradient) was not finite (no update was applied for it).
    value:
        The offending value.
    checkpoint:
        The last good checkpoint (its manifest), or ``None`` if none was written.
    """

    def __init__(self, message: str, step: int, value: float, checkpoint: Optional[Path]):
        super().__init__(message)
        self.step, self.value, self.checkpoint = step, value, checkpoint


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of torch's global generator (dropout and the like) on ``rank``: rank 0 uses the
    single-process stream (so one process and rank 0 agree); rank $r > 0$ an independent stream
    keyed by $(r, \text{step})$, re-derived at the step a run starts or resumes from."""
    if rank == 0:
        return _seed(seed, _STREAM_GLOBAL)
    state = np.random.SeedSequence(seed, spawn_key=(_STREAM_GLOBAL, rank, step)).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def _seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for ``stream`` derived from ``seed``."""
    state = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (validated on construction).

    Parameters
    ----------
    steps:
        Number of optimizer updates $K$ (the cosine schedule ends there).
    batch_size:
        Samples per step.
    lr:
        Peak learning rate $\\eta$.
    weight_decay:
        AdamW's decoupled weight decay.
    warmup:
        Steps of linear learning-rate warm-up $W$ ($0 \\le W \\le K$).
    schedule:
        ``"cosine"`` (decay to ``min_lr`` over the steps after warm-up) or ``"constant"``.
    grad_clip:
        Clip the global gradient norm to this value; ``None`` does not clip (the norm is still
        logged).
    ema_decay:
        EMA decay $d \\in [0, 1)$.
    ema_warmup:
        Use $d_k = \\min(d, (1 + k)/(10 + k))$ at EMA update $k$ (see module docs).
    precision:
        ``"fp32"`` or ``"bf16"`` (autocast on CUDA; parameters and optimizer stay fp32).
    compile:
        ``torch.compile`` the network (``model.net`` if the model has one, else the model).
    seed:
        Seed of every random stream of the run.
    log_every:
        Period in steps of the log line.
    eval_every:
        Period in steps of the evaluation (0 disables it).
    ckpt_every:
        Period in steps of the checkpoint (0 disables periodic checkpoints; a checkpoint is
        always written when ``train`` ends).
    keep_last:
        Checkpoints kept on disk.
    device:
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    betas:
        AdamW's moment decays.
    adam_eps:
        AdamW's epsilon.
    min_lr:
        Final learning rate of the cosine schedule ($0 \\le$ ``min_lr`` $\\le$ ``lr``).
    progress:
        Show a tqdm progress bar (only when stderr is a terminal).
    """

    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    precision: str = "fp32"
    compile: bool = False
    seed: int = 0
    log_every: int = 100
    eval_every: int = 0
    ckpt_every: int = 1000
    keep_last: int = 3
    device: str = "auto"
    betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    min_lr: float = 0.0
    progress: bool = True

    def __post_init__(self):
        def bad(name, why):
            return ValueError(f"TrainConfig.{name} must be {why}, got {getattr(self, name)!r}")

        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise bad(name, f"an int >= {lo}")
            setattr(self, name, int(v))

        def real(name, lo, hi=math.inf, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise bad(name, "a finite number")
            v = float(v)
            if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
                raise bad(name, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
            setattr(self, name, v)

        def flag(name):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")

        integer("steps", 1)
        integer("batch_size", 1)
        real("lr", 0.0, lo_open=True)
        real("weight_decay", 0.0)
        integer("warmup", 0)
        if self.warmup > self.steps:
            raise bad("warmup", f"<= steps ({self.steps})")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"one of {SCHEDULES}")
        if self.grad_clip is not None:
            real("grad_clip", 0.0, lo_open=True)
        real("ema_decay", 0.0, 1.0, hi_open=True)
        flag("ema_warmup")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS}")
        flag("compile")
        integer("seed", 0)
        integer("log_every", 1)
        integer("eval_every", 0)
        integer("ckpt_every", 0)
        integer("keep_last", 1)
        if not isinstance(self.device, str):
            raise bad("device", "a string ('auto', 'cpu', 'cuda', 'cuda:0', ...)")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise bad("betas", "a pair (beta1, beta2)")
        b = []
        for i, v in enumerate(self.betas):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) < 1.0):
                raise bad("betas", f"a pair in [0, 1) (entry {i} is {v!r})")
            b.append(float(v))
        self.betas = (b[0], b[1])
        real("adam_eps", 0.0, lo_open=True)
        real("min_lr", 0.0, self.lr)
        flag("progress")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (``TrainConfig(**d)`` rebuilds it)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(names)}")
        d = dict(d)
        if "betas" in d and isinstance(d["betas"], list):
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of update ``step`` (1-based; see the module docs for the formula)."""
    k = int(step)
    if k < 1:
        raise ValueError(f"step must be >= 1, got {step!r}")
    W, K = config.warmup, config.steps
    if k <= W:
        return config.lr * k / W
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (k - 1 - W) / max(1, K - W))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(config: TrainConfig, update: int) -> float:
    """EMA decay of update ``update`` (1-based): $\\min(d, (1 + k)/(10 + k))$ with warm-up, else $d$."""
    if not config.ema_warmup:
        return config.ema_decay
    k = float(update)
    return min(config.ema_decay, (1.0 + k) / (_EMA_WARMUP_OFFSET + k))


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _dataset_tensors(dataset, name: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(data, labels)`` of a dataset (an object with ``.data`` / ``.labels``, or a tensor)."""
    if isinstance(dataset, torch.Tensor):
        data, labels = dataset, None
    else:
        if not hasattr(dataset, "data"):
            raise TypeError(f"{name} must be a tensor or have .data (a tensor (N, ...)), got {type(dataset).__name__}")
        data, labels = dataset.data, getattr(dataset, "labels", None)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{name}.data must be a torch.Tensor, got {type(data).__name__}")
    if data.dim() < 2 or data.shape[0] < 1:
        raise ValueError(f"{name}.data must have shape (N, ...) with N >= 1 and at least one event dimension, "
                         f"got {tuple(data.shape)}")
    if not data.is_floating_point():
        raise ValueError(f"{name}.data must be floating point, got dtype {data.dtype}")
    finite = torch.isfinite(data.reshape(data.shape[0], -1)).all(1)
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        raise ValueError(f"{name}.data has non-finite values (first at sample {i})")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != (data.shape[0],):
            raise ValueError(f"{name}.labels must be None or a LongTensor of shape ({data.shape[0]},), got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if bool((labels < 0).any()):
            raise ValueError(f"{name}.labels must be >= 0, got min {int(labels.min())}")
    return data, labels


def _json_or_none(obj) -> Any:
    """``obj.config`` (attribute or method) if it is JSON-serialisable, else ``None``."""
    cfg = getattr(obj, "config", None)
    if callable(cfg):
        try:
            cfg = cfg()
        except Exception:  # a config that cannot be produced is simply not recorded
            return None
    try:
        return json.loads(json.dumps(cfg, allow_nan=False))
    except (TypeError, ValueError):
        return None


def _expected_event_shape(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """The event shape the model or its network declares (``event_shape``; ``dim``;
    ``in_channels`` with ``image_size``; or the same keys in ``net.config``), else ``None``."""
    shape = getattr(model, "event_shape", None)
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in shape):
        return tuple(shape)
    net = getattr(model, "net", None)
    for src in (net, getattr(net, "config", None) if net is not None else None):
        if src is None:
            continue
        get = src.get if isinstance(src, Mapping) else (lambda k, _s=src: getattr(_s, k, None))
        dim = get("dim")
        if isinstance(dim, int) and not isinstance(dim, bool):
            return (dim,)
        c, size = get("in_channels"), get("image_size")
        if isinstance(c, int) and isinstance(size, int):
            return (c, size, size)
    return None


def _num_classes(model: nn.Module) -> Optional[int]:
    """``num_classes`` declared by the model or its network (``None``: unconditional)."""
    for obj in (model, getattr(model, "net", None)):
        n = getattr(obj, "num_classes", None) if obj is not None else None
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _metric(v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Train ``model`` on ``dataset`` by minimising ``loss``; checkpoints and logs in ``out_dir``.

    Parameters
    ----------
    model:
        An ``nn.Module`` (a ``ScoreModel``); moved to the configured device.
    dataset:
        An object with ``.data`` (a float tensor (N, ...)) and ``.labels`` (``None`` or a
        LongTensor (N,)), or a tensor (N, ...).
    loss:
        ``loss(model, x0, label=None, generator=None) -> scalar tensor`` (a ``DSMLoss``).
    config:
        A ``TrainConfig`` (default ``TrainConfig()``).
    out_dir:
        Directory of checkpoints and ``log.jsonl``; ``None`` writes nothing (no resume).
    eval_data:
        Held-out data (dataset or tensor): every ``eval_every`` steps the loss of the model and of
        the EMA on it is reported as ``heldout_loss`` / ``heldout_loss_ema`` (same times and noise
        at every evaluation, drawn from a dedicated stream).
    evaluate:
        Optional ``evaluate(model, ema_model, step) -> dict`` of extra metrics (numbers), merged
        into the evaluation record.
    use_labels:
        Pass the dataset's labels to the loss. ``None`` (default): iff the dataset has labels and
        the model (or ``model.net``) declares ``num_classes`` — an unconditional model trained on
        a labelled set (e.g. the mixture's component labels) ignores them.

    Attributes
    ----------
    model, ema_model:
        The trained network and its EMA copy (``ema_model`` is in eval mode).
    step:
        Updates done so far.
    history:
        ``{"step", "loss", "lr", "grad_norm"}`` per step (lists) and ``"eval"`` (records).
    """

    def __init__(self, model: nn.Module, dataset, loss: Callable, config: Optional[TrainConfig] = None,
                 out_dir: Union[str, os.PathLike, None] = None, *, eval_data=None,
                 evaluate: Optional[Callable] = None, use_labels: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a ScoreModel), got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(model, x0, label=None, generator=None), got "
                            f"{type(loss).__name__}")
        if config is None:
            config = TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be callable as evaluate(model, ema_model, step) -> dict, got "
                            f"{type(evaluate).__name__}")
        self.config = config
        self.device = self._resolve_device(config)
        data, labels = _dataset_tensors(dataset, "dataset")
        if use_labels is None:  # a conditional model trains on the labels, an unconditional one ignores them
            use_labels = labels is not None and _num_classes(model) is not None
        if not isinstance(use_labels, bool):
            raise TypeError(f"use_labels must be True, False or None (auto), got {use_labels!r}")
        if use_labels and labels is None:
            raise ValueError("use_labels=True but the dataset has no labels")
        self.use_labels = use_labels
        labels = labels if use_labels else None
        self.data = data.to(self.device)
        self.labels = labels.to(self.device) if labels is not None else None
        if eval_data is not None:
            ed, el = _dataset_tensors(eval_data, "eval_data")
            if ed.shape[1:] != data.shape[1:]:
                raise ValueError(f"eval_data has event shape {tuple(ed.shape[1:])} but dataset has "
                                 f"{tuple(data.shape[1:])}")
            self.eval_data: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = (
                ed.to(self.device), el.to(self.device) if el is not None and use_labels else None)
        else:
            self.eval_data = None
        self.evaluate = evaluate
        self.loss = loss
        self.out_dir = Path(out_dir) if out_dir is not None else None

        self.model = model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        self.ema_model = copy.deepcopy(self.model).eval()
        self.ema_model.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.gen_batch = torch.Generator()
        self.gen_noise = torch.Generator(device=self.device)
        self.step = 0
        self.ema_updates = 0
        self._perm: Optional[torch.Tensor] = None
        self._pos = 0
        self.history: Dict[str, List] = self._empty_history()
        self._compiled = False
        self._last_ckpt: Optional[Path] = None
        self._last_saved_step = -1
        # -- data parallel (torch.distributed; docs/scaling.md): one replica per rank, the network
        # runs on this rank's rows of the global batch, files are written by rank 0 only
        self.dist = _dist.info()
        self._sharded_net: Optional[nn.Module] = None
        if self.dist.distributed and not isinstance(getattr(self.model, "net", None), nn.Module):
            raise TypeError(f"distributed training needs a model with a .net module (a ScoreModel), got "
                            f"{type(self.model).__name__}")

    # -- setup ------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_device(config: TrainConfig) -> torch.device:
        name = config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"TrainConfig.device must name a torch device, got {config.device!r}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device is {config.device!r} but CUDA is not available")
        if config.precision == "bf16" and dev.type != "cuda":
            raise ValueError(f"TrainConfig.precision='bf16' needs a CUDA device (autocast), got device {dev}")
        return dev

    @staticmethod
    def _empty_history() -> Dict[str, List]:
        return {"step": [], "loss": [], "lr": [], "grad_norm": [], "eval": []}

    @property
    def checkpoint_dir(self) -> Optional[Path]:
        """``out_dir/checkpoints`` (or ``None``)."""
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    @property
    def log_path(self) -> Optional[Path]:
        """``out_dir/log.jsonl`` (or ``None``)."""
        return self.out_dir / "log.jsonl" if self.out_dir is not None else None

    def _fork_rng(self):
        if self.device.type != "cuda":
            return torch.random.fork_rng(devices=[])
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])

    def _check_data_fits(self) -> None:
        """Run the loss once on two samples (no update, no randomness consumed): a data shape the
        model cannot take fails here with a clear message instead of inside the first step."""
        event = tuple(self.data.shape[1:])
        want = _expected_event_shape(self.model)
        if want is not None and want != event:
            raise ValueError(f"dataset.data has event shape {event} (data shape {tuple(self.data.shape)}) but the "
                             f"network expects {want}")
        x = self.data[:_DRY_RUN_BATCH]
        lab = self.labels[:_DRY_RUN_BATCH] if self.labels is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            with self._fork_rng():
                g = torch.Generator(device=self.device).manual_seed(0)
                try:
                    with self._autocast():
                        out = self.loss(self.model, x, label=lab, generator=g)
                except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                    raise ValueError(f"the loss failed on a batch of dataset.data with event shape {event} "
                                     f"(data shape {tuple(self.data.shape)}); does the data fit the model? "
                                     f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.model.train(was_training)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise ValueError(f"loss(model, x0, ...) must return a scalar tensor (the batch mean), got "
                             f"{getattr(out, 'shape', type(out).__name__)}")

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.precision == "bf16")

    def _maybe_compile(self) -> None:
        if not self.config.compile or self._compiled:
            return
        target = self.model.net if isinstance(getattr(self.model, "net", None), nn.Module) else self.model
        target.compile()  # in place: parameter names (and checkpoints) are unchanged
        self._compiled = True

    def _fresh_start(self) -> None:
        cfg = self.config
        if self.checkpoint_dir is not None:
            existing = latest_checkpoint(self.checkpoint_dir)
            if existing is not None:
                raise ValueError(f"out_dir {self.out_dir} already holds checkpoints (newest {existing.name}); pass "
                                 f"resume=True to continue that run, or use a new out_dir")
        self.gen_batch.manual_seed(_seed(cfg.seed, _STREAM_BATCH))
        self.gen_noise.manual_seed(_seed(cfg.seed, _STREAM_NOISE))
        torch.manual_seed(_rank_seed(cfg.seed, self.dist.rank, 0))
        self.step, self.ema_updates, self._perm, self._pos = 0, 0, None, 0
        self._last_ckpt, self._last_saved_step = None, -1
        self.history = self._empty_history()
        with torch.no_grad():
            for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
                e.copy_(p)
            for e, b in zip(self.ema_model.buffers(), self.model.buffers()):
                e.copy_(b)
        if self.log_path is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")

    # -- batches ----------------------------------------------------------------------------------
    def _next_batch(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n, need, parts = self.data.shape[0], self.config.batch_size, []
        while need:
            if self._perm is None or self._pos >= n:
                self._perm = torch.randperm(n, generator=self.gen_batch)
                self._pos = 0
            take = min(need, n - self._pos)
            parts.append(self._perm[self._pos:self._pos + take])
            self._pos += take
            need -= take
        idx = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.device)
        return self.data[idx], (self.labels[idx] if self.labels is not None else None)

    # -- EMA ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        self.ema_updates += 1
        d = ema_decay_at(self.config, self.ema_updates)
        ema = list(self.ema_model.parameters())
        cur = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - d)
        for e, b in zip(self.ema_model.buffers(), self.model.buffers()):
            e.copy_(b)

    # -- checkpoints --------------------------------------------------------------------------------
    def _log_size(self) -> int:
        if self._log is not None:
            self._log.flush()
            os.fsync(self._log.fileno())
        return self.log_path.stat().st_size if self.log_path is not None and self.log_path.exists() else 0

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current state to ``out_dir/checkpoints`` (``None`` without
        ``out_dir``); returns its manifest."""
        if self.checkpoint_dir is None:
            return None
        if not self.dist.is_main:  # the replicas are identical: rank 0 writes
            self._last_saved_step = self.step
            return None
        tensors: Dict[str, torch.Tensor] = {}
        tensors.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        tensors.update({f"ema.{k}": v for k, v in self.ema_model.state_dict().items()})
        opt_tensors, opt_struct = flatten_state(self.optimizer.state_dict(), "optim")
        tensors.update(opt_tensors)
        rng_tensors, rng_meta = rng_state({"batch": self.gen_batch, "noise": self.gen_noise})
        tensors.update(rng_tensors)
        if self._perm is not None:
            tensors["data.perm"] = self._perm
        for key in ("loss", "lr", "grad_norm"):
            tensors[f"history.{key}"] = torch.tensor(self.history[key], dtype=torch.float64)
        _, evals = flatten_state(self.history["eval"], "eval")
        sde = getattr(self.model, "sde", None)
        process = None
        if sde is not None:
            try:
                from sdekit.config import process_config

                process = process_config(sde)
            except TypeError:  # a custom process: passed again at load
                process = None
        meta = {
            "kind": "diffusion.Trainer",
            "step": self.step,
            "config": self.config.to_dict(),
            "optim": opt_struct,
            "rng": rng_meta,
            "ema_updates": self.ema_updates,
            "data_pos": self._pos,
            "data_n": int(self.data.shape[0]),
            "world_size": self.dist.world_size,
            "evals": evals,
            "log_bytes": self._log_size(),
            "model_class": type(self.model).__name__,
            "model_config": _json_or_none(self.model),
            "net_config": _json_or_none(getattr(self.model, "net", None)),
            "loss_config": _json_or_none(self.loss),
            "process": process,
            "torch": torch.__version__,
        }
        path = save_checkpoint(self.checkpoint_dir, tensors, meta, keep_last=self.config.keep_last)
        self._last_ckpt, self._last_saved_step = path, self.step
        return path

    def _restore(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path, device="cpu")
        saved = meta.get("config", {})
        now = self.config.to_dict()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            warnings.warn(f"resuming {path.name} with a changed config: "
                          + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed),
                          RuntimeWarning, stacklevel=3)
        if meta.get("data_n") != int(self.data.shape[0]):
            raise ValueError(f"checkpoint {path.name} was trained on {meta.get('data_n')} samples but dataset has "
                             f"{int(self.data.shape[0])}; resume needs the same data")

        def sub(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(sub("model."))
        self.ema_model.load_state_dict(sub("ema."))
        self.optimizer.load_state_dict(unflatten_state(meta["optim"], tensors))
        set_rng_state(tensors, meta["rng"], {"batch": self.gen_batch, "noise": self.gen_noise})
        self.step = int(meta["step"])
        if self.dist.rank != 0:  # rank 0's global stream is the checkpoint's; the others re-derive theirs
            torch.manual_seed(_rank_seed(self.config.seed, self.dist.rank, self.step))
        self.ema_updates = int(meta["ema_updates"])
        self._perm = tensors.get("data.perm")
        self._pos = int(meta["data_pos"])
        self.history = self._empty_history()
        for key in ("loss", "lr", "grad_norm"):
            self.history[key] = tensors[f"history.{key}"].tolist()
        self.history["step"] = list(range(1, self.step + 1))
        self.history["eval"] = unflatten_state(meta["evals"], {})
        if self.log_path is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            n = int(meta.get("log_bytes", 0))
            size = self.log_path.stat().st_size if self.log_path.exists() else 0
            if size < n:
                warnings.warn(f"{self.log_path} is shorter ({size} bytes) than at checkpoint {path.name} ({n}); "
                              f"appending to it", RuntimeWarning, stacklevel=3)
            else:
                with open(self.log_path, "r+b") as f:  # drop lines written after the checkpoint
                    f.truncate(n)
        self._last_ckpt, self._last_saved_step = path, self.step

    # -- logging and evaluation -----------------------------------------------------------------------
    def _write(self, record: Dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def _heldout_loss(self, model: nn.Module) -> float:
        x, lab = self.eval_data
        g = torch.Generator(device=self.device).manual_seed(_seed(self.config.seed, _STREAM_EVAL))
        total, bs = 0.0, self.config.batch_size
        for i in range(0, x.shape[0], bs):
            xb = x[i:i + bs]
            with self._autocast():
                val = self.loss(model, xb, label=lab[i:i + bs] if lab is not None else None, generator=g)
            total += float(val.detach()) * xb.shape[0]
        return total / x.shape[0]

    def run_evaluation(self) -> Dict[str, Any]:
        """Evaluate now (held-out losses and the ``evaluate`` callback); consumes no training randomness."""
        record: Dict[str, Any] = {"step": self.step}
        was_training = self.model.training
        self.model.eval()
        try:
            with self._fork_rng():
                if self.eval_data is not None:
                    record["heldout_loss"] = self._heldout_loss(self.model)
                    record["heldout_loss_ema"] = self._heldout_loss(self.ema_model)
                if self.evaluate is not None:
                    extra = self.evaluate(self.model, self.ema_model, self.step)
                    if not isinstance(extra, Mapping):
                        raise TypeError(f"evaluate(model, ema_model, step) must return a dict, got "
                                        f"{type(extra).__name__}")
                    record.update({str(k): _metric(v) for k, v in extra.items()})
        finally:
            self.model.train(was_training)
        return record

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self, resume: bool = False, until: Optional[int] = None) -> Dict[str, List]:
        """Train to ``config.steps`` (or to step ``until``, e.g. to stop early and resume later).

        Parameters
        ----------
        resume:
            Continue from the newest valid checkpoint in ``out_dir`` (torn ones are skipped with a
            warning); without one, start fresh. ``False`` refuses an ``out_dir`` that already
            holds checkpoints.
        until:
            Stop after this step (the schedule is still that of ``config.steps``); a checkpoint is
            written there.

        Returns
        -------
        dict
            ``history``: per-step ``step``, ``loss``, ``lr``, ``grad_norm`` lists since step 1
            (restored from the checkpoint when resuming) and ``eval`` records.

        Raises
        ------
        TrainingDivergedError
            The loss or the gradient norm is NaN or infinite at some step.
        ValueError
            The data do not fit the model (before the first step), or a bad ``until``.
        """
        cfg = self.config
        end = cfg.steps if until is None else until
        if isinstance(end, bool) or not isinstance(end, int) or not 1 <= end <= cfg.steps:
            raise ValueError(f"until must be an int in [1, steps={cfg.steps}] or None, got {until!r}")
        if resume:
            if self.checkpoint_dir is None:
                raise ValueError("resume=True needs an out_dir with checkpoints")
            found = _dist.broadcast_object(latest_checkpoint(self.checkpoint_dir) if self.dist.is_main else None)
            if found is not None:
                self._restore(found)
            else:
                warnings.warn(f"resume=True but {self.checkpoint_dir} holds no valid checkpoint: starting fresh",
                              RuntimeWarning, stacklevel=2)
                self._fresh_start()
        else:
            self._fresh_start()
        self._check_data_fits()
        self._maybe_compile()
        if self.dist.distributed and self._sharded_net is None:
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self._sharded_net = _dist.ShardedNet(self.model.net, device_ids=ids)

        self._log = (open(self.log_path, "a", encoding="utf-8")
                     if self.log_path is not None and self.dist.is_main else None)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and sys.stderr.isatty() and self.dist.is_main))
        self.model.train()
        t_window, steps_window, t_start = time.perf_counter(), 0, time.perf_counter()
        try:
            while self.step < end:
                k = self.step + 1
                lr = lr_at(cfg, k)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x0, label = self._next_batch()
                with self._autocast(), self._sharded():
                    loss = self.loss(self.model, x0, label=label, generator=self.gen_noise)
                value = float(loss.detach())
                if not math.isfinite(value):
                    self._diverged(k, "loss", value)
                self.optimizer.zero_grad(set_to_none=True)
                with self._collective(k):
                    loss.backward()
                max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
                gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                if not math.isfinite(gnorm):
                    self._diverged(k, "gradient norm", gnorm)
                self.optimizer.step()
                self._update_ema()
                self.step = k
                self.history["step"].append(k)
                self.history["loss"].append(value)
                self.history["lr"].append(lr)
                self.history["grad_norm"].append(gnorm)
                steps_window += 1
                bar.update(1)

                last = k == cfg.steps
                if k % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    lo = (k - 1) // cfg.log_every * cfg.log_every  # the window (lo, k]
                    rec = {"event": "train", "step": k,
                           "loss": float(np.mean(self.history["loss"][lo:k])),
                           "lr": lr, "grad_norm": float(np.mean(self.history["grad_norm"][lo:k])),
                           "it_s": steps_window / max(now - t_window, 1e-12), "elapsed_s": now - t_start}
                    self._write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
                    t_window, steps_window = now, 0
                if cfg.eval_every and (k % cfg.eval_every == 0 or last):
                    record = self.run_evaluation()
                    self.history["eval"].append(record)
                    self._write({"event": "eval", **record})
                if cfg.ckpt_every and k % cfg.ckpt_every == 0:
                    self.save()
            if self._last_saved_step != self.step:
                self.save()
            with self._collective(self.step):
                _dist.barrier()  # every rank returns once rank 0's last checkpoint is written
        finally:
            bar.close()
            if self._log is not None:
                self._log.close()
                self._log = None
        return {k: list(v) for k, v in self.history.items()}

    _log = None

    # -- data parallel hooks (docs/scaling.md) ----------------------------------------------------
    @contextlib.contextmanager
    def _sharded(self):
        """While the loss runs: ``model.net`` is the `ShardedNet` (this rank's rows, gathered)."""
        if self._sharded_net is None:
            yield
            return
        modules = self.model._modules
        net = modules["net"]
        modules["net"] = self._sharded_net
        try:
            with self._collective(self.step + 1):
                yield
        finally:
            modules["net"] = net

    @contextlib.contextmanager
    def _collective(self, step: int):
        """Turn a failed collective (a rank died, or stopped answering past the timeout) into a
        `DistributedError` that names the step and the last checkpoint."""
        if not self.dist.distributed:
            yield
            return
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, (_dist.DistributedError, TrainingDivergedError)):
                raise
            ckpt = (f"the last checkpoint ({self._last_ckpt}) is valid" if self._last_ckpt is not None else
                    f"the last checkpoint (step {self._last_saved_step}) is valid" if self._last_saved_step > 0
                    else "no checkpoint was written")
            raise _dist.DistributedError(
                f"rank {self.dist.rank} of {self.dist.world_size}: a collective failed at step {step} (typically another "
                f"process died or stopped answering): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                f"{ckpt}; resume with train(resume=True) (any number of processes)") from exc

    def _diverged(self, step: int, what: str, value: float) -> None:
        self._write({"event": "diverged", "step": step, what.replace(" ", "_"): repr(value)})
        ckpt = self._last_ckpt
        where = (f"the last good checkpoint is {ckpt}" if ckpt is not None
                 else "no checkpoint was written before it")
        raise TrainingDivergedError(
            f"training diverged at step {step}: the {what} is {value} (not finite); no update was applied for it "
            f"and {where}. Lower TrainConfig.lr, raise warmup or set grad_clip, then resume.",
            step=step, value=value, checkpoint=ckpt)
