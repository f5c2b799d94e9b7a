"""The ``diffusion`` command line: ``python -m diffusion`` or the ``diffusion`` console script.

Subcommands
-----------
``quickstart``
    Train on the 2-D Gaussian mixture, sample with six samplers, score against the exact density,
    write plots (``diffusion.quickstart``). ``--data digits`` trains the tiny U-Net on 8×8 digits.
``train``
    Train a score model on a data set (``--resume`` continues a run in the same folder).
``sample``
    Draw samples from a trained model with any `sdekit.solve` method → ``.npz`` + PNG.
``nll``
    Negative log-likelihood (nats) and bits/dim of data under a trained model, ± standard error.

``train``, ``sample`` and ``nll`` also run under ``torchrun --nproc_per_node=N -m diffusion ...``
(``--backend auto|gloo|nccl``): ``train`` is data-parallel (N processes with ``--batch-size B``
take the same steps as one with ``B``), ``sample`` splits the samples and ``nll`` the batches
over the processes; rank 0 gathers and writes every output, and the results are bit-identical to
one process (``docs/scaling.md``).

A run folder (written by ``train`` and ``quickstart``) holds ``model/`` (the EMA model, safetensors
+ JSON), ``train/`` (resumable trainer checkpoints and ``log.jsonl``) and ``run.json`` (which data
set it was trained on). ``sample`` and ``nll`` take ``--checkpoint RUN_FOLDER`` (or a ``model/``
folder). Every error in the input is one line naming what was wrong and what is valid, with exit
code 2; outputs are written atomically, after the inputs were checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "CLIError"]

#: Largest seed accepted (torch generators take 64-bit seeds; we keep them non-negative).
MAX_SEED = 2 ** 63 - 1

#: Named processes of ``--process``: the sdekit classes with their default parameters
#: (``ve``: sigma_max from the data, see `_build_process`).
PROCESS_NAMES = {"vp": "VPSDE", "subvp": "SubVPSDE", "cosine": "CosineVPSDE", "ve": "VESDE"}
NETS = ("auto", "mlp", "unet-tiny", "unet-cifar")
PREDICTS = ("eps", "x0", "v", "score")
WEIGHTINGS = ("simple", "likelihood", "edm")
TIME_SAMPLINGS = ("uniform", "importance", "stratified", "importance_stratified")


class CLIError(Exception):
    """A bad input of the command line: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# argument types
# ------------------------------------------------------------------------------------------------
def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: an integer in [0, 2**63 - 1]") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {v} out of range: an integer in [0, 2**63 - 1]")
    return v


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a positive number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return v


def _prob(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a number in [0, 1)") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return v


# ------------------------------------------------------------------------------------------------
# shared checks
# ------------------------------------------------------------------------------------------------
def _device(name: str):
    """A torch device from ``auto``/``cpu``/``cuda``/``cuda:N``; CUDA without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: valid devices are auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                           f"cuda build: {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _writable_dir(path: str, what: str = "--out") -> Path:
    """Create ``path`` if needed and check a file can be written there (before any work)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{what} {str(p)!r} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"{what} {str(p)!r} cannot be written: {exc.strerror or exc}") from None
    return p


def _writable_file(path: str, what: str) -> Path:
    p = Path(path)
    _writable_dir(str(p.parent) if str(p.parent) else ".", f"the folder of {what}")
    if p.exists() and p.is_dir():
        raise CLIError(f"{what} {str(p)!r} is a folder, not a file")
    return p


def _method(name: str):
    from sdekit.solvers.registry import METHODS

    if name not in METHODS:
        raise CLIError(f"unknown sampler {name!r}; valid samplers (sdekit.solve methods): "
                       f"{', '.join(sorted(METHODS))}")
    return METHODS[name]


def _dataset(name: str, split: str, **kw):
    from .data import DATASETS, get_dataset

    if name not in DATASETS:
        raise CLIError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    try:
        return get_dataset(name, split=split, **kw)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        raise CLIError(f"data set {name!r}: {exc}") from None


def _data_options(pairs: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``--data-option key=value`` (values parsed as JSON when they parse, else kept as strings)."""
    out: Dict[str, Any] = {}
    for item in pairs or ():
        if "=" not in item:
            raise CLIError(f"--data-option {item!r} must be key=value (e.g. n=5000, path=data.npz)")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _load_run(path: str, device) -> Tuple[Any, Dict[str, Any], Path]:
    """The EMA model of a run folder (or a model folder / checkpoint file) and the run's description."""
    from .checkpoint import CheckpointError
    from .model import ScoreModel

    p = Path(path)
    if not p.exists():
        raise CLIError(f"--checkpoint {str(p)!r} does not exist (give a run folder written by "
                       f"'diffusion train' or 'diffusion quickstart', or its model/ folder)")
    run_dir = p if (p / "model").is_dir() else (p.parent if p.is_dir() and (p.parent / "run.json").exists()
                                                 else (p.parent.parent if p.is_file() else p))
    model_path = p / "model" if (p / "model").is_dir() else p
    try:
        model = ScoreModel.load(model_path, map_location=str(device))
    except FileNotFoundError as exc:
        raise CLIError(f"--checkpoint {str(p)!r}: {exc}") from None
    except (CheckpointError, ValueError, KeyError, OSError) as exc:
        raise CLIError(f"--checkpoint {str(p)!r} is not a readable model checkpoint: {exc}") from None
    run: Dict[str, Any] = {}
    rj = run_dir / "run.json"
    if rj.is_file():
        try:
            run = json.loads(rj.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CLIError(f"{str(rj)!r} is not valid JSON: {exc}") from None
    model.eval()
    return model, run, run_dir


def _distributed(args, device):
    """Join ``torchrun``'s process group when launched by it (a no-op otherwise); on CUDA each
    process takes the GPU ``cuda:LOCAL_RANK``. Returns ``(DistInfo, device)``."""
    import torch

    from . import distributed as D

    joined = D.is_distributed()
    try:
        info = D.init_from_env(backend=args.backend, device=str(device))
        args.owns_process_group = info.distributed and not joined  # main() leaves it at the end
    except ValueError as exc:
        raise CLIError(f"--backend {args.backend} --device {device}: {exc}") from None
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return info, device


def _say(info, *lines: str) -> None:
    """Print on rank 0 only."""
    if info.is_main:
        print(*lines, sep="\n", flush=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_npz(path: Path, **arrays) -> None:
    import numpy as np

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------------------------
def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    device = _device(args.device)
    out = _writable_dir(args.out)
    if args.data not in ("mixture", "digits"):
        raise CLIError(f"quickstart --data {args.data!r}: valid: mixture, digits")
    print(f"diffusion quickstart: writing to {out.resolve()}", flush=True)
    run_quickstart(out, data=args.data, device=str(device), quick=args.quick, seed=args.seed, steps=args.steps)
    return 0


def _build_process(spec: str, data):
    """``vp``/``subvp``/``cosine``/``ve`` or a JSON process description (`sdekit.config`)."""
    import sdekit
    from sdekit.config import process_config, process_from_config

    if spec in PROCESS_NAMES:
        cfg = process_config(getattr(sdekit, PROCESS_NAMES[spec])())
        if spec == "ve":
            # Song & Ermon (2020), technique 1: sigma_max ~ the largest pairwise distance in the data
            import torch

            x = data.data[:2000].reshape(min(2000, len(data)), -1).double()
            cfg["sigma_max"] = float(torch.cdist(x, x).max())
    else:
        try:
            cfg = json.loads(spec)
        except json.JSONDecodeError:
            raise CLIError(f"--process {spec!r}: valid names are {', '.join(PROCESS_NAMES)}, or a JSON process "
                           f"description like '{{\"type\": \"VPSDE\", \"beta_min\": 0.1, \"beta_max\": 20}}'") from None
    try:
        return process_from_config(cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise CLIError(f"--process {spec!r}: {exc}") from None


def _build_net(kind: str, data, width: int, depth: int, num_classes: Optional[int]):
    from .nets import MLPScoreNet, UNet

    shape = data.shape
    if kind == "auto":
        kind = "mlp" if len(shape) == 1 else "unet-tiny"
    if kind == "mlp":
        if len(shape) != 1:
            raise CLIError(f"--net mlp takes vector data; data set {data.name!r} has shape {shape}: use --net unet-tiny")
        return MLPScoreNet(shape[0], width=width, depth=depth, num_classes=num_classes)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise CLIError(f"--net {kind} takes square images (C, H, H); data set {data.name!r} has shape {shape}")
    factory = UNet.tiny if kind == "unet-tiny" else UNet.cifar
    return factory(in_channels=shape[0], image_size=shape[1], num_classes=num_classes)


def cmd_train(args) -> int:
    from . import distributed as D
    from .losses import DSMLoss
    from .model import ScoreModel
    from .train import TrainConfig, Trainer, TrainingDivergedError
    from . import plots

    device = _device(args.device)
    dist, device = _distributed(args, device)
    out = _writable_dir(args.out)
    if not args.resume and (out / "train" / "checkpoints").is_dir() and any((out / "train" / "checkpoints").iterdir()):
        raise CLIError(f"--out {str(out)!r} already holds a training run: pass --resume to continue it, or choose "
                       f"a new folder")
    opts = _data_options(args.data_option)
    opts.setdefault("seed", args.seed)
    data = _dataset(args.data, "train", **opts)
    sde = _build_process(args.process, data)
    num_classes = data.num_classes if args.conditional else None
    if args.conditional and num_classes is None:
        raise CLIError(f"--conditional needs a labelled data set; {args.data!r} has no labels")
    net = _build_net(args.net, data, args.width, args.depth, num_classes)
    try:
        if args.label_dropout and not args.conditional:
            raise CLIError("--label-dropout needs --conditional (a class-conditional model)")
        model = ScoreModel(net, sde, predict=args.predict, t_eps=args.t_eps, label_dropout=args.label_dropout)
        loss = DSMLoss(weighting=args.weighting, time_sampling=args.time_sampling, t_eps=args.loss_t_eps)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          warmup=min(args.steps, args.warmup if args.warmup is not None else args.steps // 50),
                          ema_decay=args.ema_decay, seed=args.seed, device=str(device), precision=args.precision,
                          log_every=max(1, min(100, args.steps // 20)), ckpt_every=args.ckpt_every, progress=True)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    run = {"data": args.data, "data_options": opts, "command": "train", "process": args.process, "net": args.net,
           "conditional": bool(args.conditional)}
    procs = f" x {dist.world_size} processes ({dist.backend})" if dist.distributed else ""
    _say(dist, f"diffusion train: {args.data} ({len(data)} samples, shape {data.shape}), {sde!r}, "
               f"{type(net).__name__} ({sum(p.numel() for p in net.parameters()) / 1e6:.3f} M parameters), "
               f"{args.steps} steps on {device}{procs}; writing to {out.resolve()}")
    trainer = Trainer(model, data, loss, cfg, out_dir=out / "train")
    t0 = time.perf_counter()
    try:
        trainer.train(resume=args.resume)
    except TrainingDivergedError as exc:
        raise CLIError(f"training diverged: {exc}") from None
    secs = time.perf_counter() - t0
    if not dist.is_main:  # rank 0 writes the outputs; the others return once they are written
        D.barrier()
        return 0
    trainer.ema_model.save(out / "model")
    _atomic_write_text(out / "run.json", json.dumps(run, indent=1) + "\n")
    plots.loss_curve(trainer.history["loss"], out / "loss.png")
    D.barrier()
    last = trainer.history["loss"][-min(50, len(trainer.history["loss"])):]
    print(f"trained to step {trainer.step} in {secs:.1f} s; loss (mean of the last {len(last)} steps) "
          f"{sum(last) / len(last):.4f}\nwrote {out}/model (EMA weights), {out}/train (resumable), {out}/loss.png")
    return 0


def _budget_kwargs(info, args) -> Dict[str, Any]:
    adaptive = "adaptive" in info.stepping
    grid_ok = "grid" in info.stepping or "dt" in info.stepping
    kw: Dict[str, Any] = {}
    if args.steps is not None:
        if not grid_ok:
            raise CLIError(f"sampler {info.name!r} is adaptive: give --rtol/--atol, not --steps")
        kw["steps"] = args.steps
    if args.rtol is not None or args.atol is not None:
        if not adaptive:
            raise CLIError(f"sampler {info.name!r} is a fixed-step method: give --steps, not --rtol/--atol")
        kw["rtol"] = args.rtol if args.rtol is not None else 1e-5
        kw["atol"] = args.atol if args.atol is not None else kw["rtol"]
        if info.backend == "torchsde":
            kw["adaptive"] = True
            kw.setdefault("dt", 1e-2)
    if not kw:
        if "grid" in info.stepping or "dt" in info.stepping:
            kw["steps"] = 100 if info.problem in ("sde", "score") and info.stochastic == "yes" else 20
        else:
            kw["rtol"] = kw["atol"] = 1e-5
    return kw


def cmd_sample(args) -> int:
    import torch

    from . import plots

    from . import distributed as D

    info = _method(args.sampler)
    device = _device(args.device)
    dist, device = _distributed(args, device)
    out = _writable_file(args.out, "--out") if args.out else None
    model, run, run_dir = _load_run(args.checkpoint, device)
    kw = _budget_kwargs(info, args)
    if "adaptive" in info.stepping and info.backend == "native" and _per_sample_stepping():
        kw["norm"] = "independent"  # each sample's steps are its own: results do not depend on the sharding
    elif "adaptive" in info.stepping and dist.distributed:
        _say(dist, f"note: {args.sampler} shares one step size across each process's samples, so the samples "
                   f"depend (to the tolerance) on how they are split over the {dist.world_size} processes")
    label = None
    if args.label is not None:
        nc = getattr(model.net, "num_classes", None)
        if nc is None:
            raise CLIError("--label needs a class-conditional model; this one was trained without labels")
        if not 0 <= args.label < nc:
            raise CLIError(f"--label {args.label} out of range: the model has classes 0..{nc - 1}")
        label = args.label
    interval = None
    if args.guidance is not None:
        if not math.isfinite(args.guidance):
            raise CLIError(f"--guidance must be a finite number, got {args.guidance}")
        if label is None:
            raise CLIError("--guidance needs --label (the class to guide towards)")
        if not getattr(model, "label_dropout", 0.0):
            raise CLIError("--guidance needs a model trained with label dropout to the null label "
                           "(train --conditional --label-dropout 0.1); this one was not")
    if args.guidance_interval is not None:
        if args.guidance is None:
            raise CLIError("--guidance-interval needs --guidance")
        try:
            interval = tuple(float(v) for v in args.guidance_interval.split(","))
        except ValueError:
            interval = ()
        if len(interval) != 2 or not (0 <= interval[0] < interval[1]):
            raise CLIError(f"--guidance-interval must be LO,HI with 0 <= LO < HI, got {args.guidance_interval!r}")
    if out is None:
        out = _writable_file(str(run_dir / f"samples-{args.sampler.replace(':', '-')}.npz"), "the output file")
    png = out.with_suffix(".png")
    ev = model.event_shape
    if ev is None:
        raise CLIError(f"the model's network {type(model.net).__name__} does not declare its data shape")
    dtype = next(model.parameters()).dtype
    # sample i has its own seed (diffusion.distributed.sample_seed): its prior draw and its noise do
    # not depend on the batch it is in, hence not on the number of processes
    lo, hi = D.shard_bounds(args.n, dist.rank, dist.world_size)
    gens = [D.sample_generator(args.seed, i, device) for i in range(lo, hi)]
    t0 = time.perf_counter()
    nfe = 0
    if gens:
        x_T = torch.cat([model.sde.prior_sample((1,) + tuple(ev), generator=g, dtype=dtype, device=device)
                         for g in gens])
        try:
            sol = model.sample(x_T=x_T, method=args.sampler, generator=gens, label=label, guidance=args.guidance,
                               guidance_interval=interval, **kw)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"sampler {args.sampler!r}: {exc}") from None
        x, nfe = sol.x.detach().float().cpu(), int(sol.stats.nfe)
    else:  # more processes than samples
        x = torch.empty((0,) + tuple(ev))
    x = D.gather_cat(x)
    nfes = D.gather_cat(torch.tensor([nfe]))
    secs = time.perf_counter() - t0
    if not dist.is_main:  # rank 0 writes the outputs
        return 0
    nfe = int(nfes.max())  # the slowest process's NFE (all equal for fixed-step samplers)
    if not torch.isfinite(x).all():
        raise CLIError(f"sampler {args.sampler!r} produced non-finite samples; try more steps or a tighter tolerance")
    _atomic_npz(out, x=x.numpy(), nfe=nfe, seconds=secs, sampler=args.sampler, seed=args.seed,
                nfe_per_process=nfes.numpy(), processes=dist.world_size)
    shape = tuple(x.shape[1:])
    if len(shape) == 3:
        plots.image_grid(x[:64], png, nrow=8, title=f"{args.sampler}, NFE {nfe}")
    else:
        grid, lim = None, float(x.reshape(x.shape[0], -1)[:, :2].abs().quantile(0.995)) * 1.1
        if shape == (2,) and run.get("data"):
            try:
                mix = _dataset(run["data"], "test", **{**run.get("data_options", {}), "n": 2}).mixture
            except CLIError:
                mix = None
            if mix is not None:
                lim = max(lim, 3.2)
                grid = plots.density_grid(mix.push(model.sde, model.t_eps).log_prob, lim)
        plots.scatter_over_density([(f"{args.sampler}, NFE {nfe}", x.reshape(x.shape[0], -1)[:, :2])],
                                   png, grid=grid, lim=lim)
    procs = f" over {dist.world_size} processes" if dist.distributed else ""
    print(f"{args.n} samples with {args.sampler} ({', '.join(f'{k}={v}' for k, v in kw.items())}){procs}: "
          f"NFE {nfe}, {secs:.2f} s\nwrote {out} and {png}")
    return 0


def cmd_nll(args) -> int:
    import torch

    from . import distributed as D

    device = _device(args.device)
    dist, device = _distributed(args, device)
    model, run, _ = _load_run(args.checkpoint, device)
    out = _writable_file(args.out, "--out") if args.out else None
    name = args.data or run.get("data")
    if name is None:
        raise CLIError("--data is needed: the checkpoint's run.json does not say which data set it was trained on")
    opts = dict(run.get("data_options", {})) if name == run.get("data") else {}
    opts.update(_data_options(args.data_option))
    opts.pop("n", None)
    data = _dataset(name, args.split, **opts)
    n = min(args.n, len(data))
    x = data.data[:n]
    if model.event_shape is not None and tuple(x.shape[1:]) != tuple(model.event_shape):
        raise CLIError(f"data set {name!r} has shape {tuple(x.shape[1:])} but the model takes {model.event_shape}")
    discrete = data.transform is not None and data.transform.is_discrete
    d = int(x[0].numel())
    if discrete:  # the same dequantization on every process
        x = data.dequantized(generator=torch.Generator().manual_seed(args.seed), index=torch.arange(n))
    # the unit of work is a batch of --batch-size points with its own seed (Hutchinson probes):
    # process r takes a contiguous run of batches, so every batch is computed exactly as by one process
    n_batches = -(-n // args.batch_size)
    b_lo, b_hi = D.shard_bounds(n_batches, dist.rank, dist.world_size)
    t0 = time.perf_counter()
    lps, nfes = [torch.empty(0, dtype=torch.float64)], []
    try:
        for b in range(b_lo, b_hi):
            i = b * args.batch_size
            res = model.log_likelihood(x[i:i + args.batch_size].to(device), divergence=args.divergence,
                                       n_probes=args.probes, rtol=args.rtol, atol=args.atol, t_eps=args.t_eps,
                                       generator=D.sample_generator(args.seed, b, device))
            lps.append(res.log_prob.detach().double().cpu())
            nfes.append(int(res.stats.nfe))
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    lp = D.gather_cat(torch.cat(lps))
    nfe_all = D.gather_cat(torch.tensor(nfes, dtype=torch.long))
    secs = time.perf_counter() - t0
    if not dist.is_main:  # rank 0 reports and writes
        return 0
    nfes = [int(v) for v in nfe_all]
    se = float(lp.std() / math.sqrt(n)) if n > 1 else math.inf
    report: Dict[str, Any] = {"data": name, "split": args.split, "n": n, "dim": d, "divergence": args.divergence,
                              "probes": args.probes, "rtol": args.rtol, "atol": args.atol, "t_eps": args.t_eps,
                              "nll_nats": float(-lp.mean()), "nll_se": se, "nfe_per_batch": nfes, "seconds": secs,
                              "processes": dist.world_size}
    lines = [f"NLL of {n} {args.split} points of {name!r} (d = {d}, t_eps = {args.t_eps:g}, {args.divergence} "
             f"divergence, rtol {args.rtol:g}, atol {args.atol:g}): {report['nll_nats']:.4f} +- {se:.4f} nats "
             f"({report['nll_nats'] / d:.4f} nats/dim); NFE per batch {nfes}; {secs:.1f} s"]
    if discrete:
        from sdekit.likelihood import bits_per_dim

        class _R:  # bits_per_dim takes a LikelihoodResult-like object with log_prob
            log_prob = lp
        bpd = bits_per_dim(_R, data.transform, tuple(x.shape[1:]), dequantization=data.dequantization).double()
        report.update(bits_per_dim=float(bpd.mean()), bits_per_dim_se=float(bpd.std() / math.sqrt(n)))
        lines.append(f"bits/dim {report['bits_per_dim']:.4f} +- {report['bits_per_dim_se']:.4f} "
                     f"(uniform dequantization: an upper bound on the discrete data's bits/dim)")
    else:
        report["bits_per_dim_continuous"] = report["nll_nats"] / (d * math.log(2))
        lines.append(f"continuous bits/dim (NLL / (d ln 2)) {report['bits_per_dim_continuous']:.4f}")
    if data.mixture is not None:
        exact = data.mixture.push(model.sde, args.t_eps).log_prob(data.data[:n].double())
        gap = (exact - lp) / d
        report.update(exact_nll_nats=float(-exact.mean()), gap_nats_per_dim=float(gap.mean()),
                      gap_se=float(gap.std() / math.sqrt(n)) if n > 1 else math.inf)
        lines.append(f"exact NLL of the same points {report['exact_nll_nats']:.4f}; gap {report['gap_nats_per_dim']:.4f}"
                     f" +- {report['gap_se']:.4f} nats/dim")
    print("\n".join(lines))
    if out is not None:
        _atomic_write_text(out, json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------
# the parser
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (argparse's own convention)."""

    def error(self, message):  # pragma: no cover - exercised through main
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="diffusion", description="Train, sample and evaluate score-based diffusion models "
                                               "(on sdekit's SDE/ODE solvers and likelihoods).")
    p.add_argument("--version", action="version", version=f"diffusion {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def common(sp, device="cpu"):
        sp.add_argument("--device", default=device, help=f"cpu, cuda, cuda:N or auto (default {device})")
        sp.add_argument("--seed", type=_seed, default=0, help="random seed in [0, 2**63-1] (default 0)")

    def backend(sp):
        sp.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                        help="torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU)")

    q = sub.add_parser("quickstart", help="train on a 2-D mixture, sample with six samplers, compare with the "
                                          "exact answer, write plots (the README's main job)")
    q.add_argument("--data", default="mixture", help="mixture (default) or digits")
    q.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    q.add_argument("--steps", type=_pos_int, default=None, help="training steps (default 2000; digits 3000)")
    q.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the same pipeline")
    common(q)
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train a score model by denoising score matching")
    t.add_argument("--data", default="mixture", help="data set: mixture, mixture_nd, moons, swiss_roll, "
                                                     "checkerboard, rings, digits, npz, folder")
    t.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                   help="data set option, repeatable (e.g. n=20000, path=x.npz)")
    t.add_argument("--process", default="vp", help="vp, subvp, cosine, ve, or a JSON process description")
    t.add_argument("--net", default="auto", choices=NETS, help="network (auto: mlp for vectors, unet-tiny for images)")
    t.add_argument("--width", type=_pos_int, default=128, help="MLP width (default 128)")
    t.add_argument("--depth", type=_pos_int, default=3, help="MLP residual blocks (default 3)")
    t.add_argument("--predict", default="eps", choices=PREDICTS, help="network output (default eps)")
    t.add_argument("--weighting", default="likelihood", choices=WEIGHTINGS, help="DSM weighting (default likelihood)")
    t.add_argument("--time-sampling", default="importance_stratified", choices=TIME_SAMPLINGS,
                   help="how training times are drawn (default importance_stratified)")
    t.add_argument("--loss-t-eps", type=_pos_float, default=1e-5, help="lower end of the loss's time integral")
    t.add_argument("--t-eps", type=_pos_float, default=1e-3, help="sampling end time stored with the model")
    t.add_argument("--steps", type=_pos_int, default=4000)
    t.add_argument("--batch-size", type=_pos_int, default=512)
    t.add_argument("--lr", type=_pos_float, default=2e-3)
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps/50)")
    t.add_argument("--ema-decay", type=_prob, default=0.999)
    t.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    t.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint period in steps (0: only at the end)")
    t.add_argument("--conditional", action="store_true", help="class-conditional model (labelled data)")
    t.add_argument("--label-dropout", type=_prob, default=0.0,
                   help="probability of training on the null label (classifier-free guidance needs > 0, e.g. 0.1)")
    t.add_argument("--out", default="runs/train", help="run folder (default runs/train)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    common(t, device="auto")
    backend(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained model -> .npz + PNG")
    s.add_argument("--checkpoint", required=True, help="run folder (or its model/ folder)")
    s.add_argument("--sampler", default="dpmpp_2m", help="an sdekit.solve method (default dpmpp_2m); "
                                                         "see sdekit.solvers.method_table()")
    s.add_argument("--steps", type=_pos_int, default=None, help="steps of a fixed-step sampler")
    s.add_argument("--rtol", type=_pos_float, default=None, help="relative tolerance of an adaptive sampler")
    s.add_argument("--atol", type=_pos_float, default=None, help="absolute tolerance of an adaptive sampler")
    s.add_argument("--n", "--num-samples", dest="n", type=_pos_int, default=1000,
                   help="number of samples (default 1000; write --num-samples after torchrun, whose own parser "
                        "takes --n for an abbreviation of its options)")
    s.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w (score (1+w) s(x|c) - w s(x); needs --label and a model "
                        "trained with --label-dropout)")
    s.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="apply guidance only where the noise level sigma/m lies in [LO, HI]")
    s.add_argument("--out", default=None, help="output .npz (default RUN/samples-SAMPLER.npz); the PNG goes beside it")
    common(s)
    backend(s)
    s.set_defaults(func=cmd_sample)

    n = sub.add_parser("nll", help="negative log-likelihood and bits/dim of data under a trained model")
    n.add_argument("--checkpoint", required=True, help="run folder (or its model/ folder)")
    n.add_argument("--data", default=None, help="data set (default: the one the model was trained on)")
    n.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="data set option, repeatable")
    n.add_argument("--split", default="test", choices=("train", "test"))
    n.add_argument("--n", "--num-points", dest="n", type=_pos_int, default=500,
                   help="number of points (default 500; write --num-points after torchrun, whose own parser "
                        "takes --n for an abbreviation of its options)")
    n.add_argument("--batch-size", type=_pos_int, default=500)
    n.add_argument("--divergence", default="auto", choices=("auto", "exact", "hutchinson"))
    n.add_argument("--probes", type=_pos_int, default=1, help="Hutchinson probes per point")
    n.add_argument("--rtol", type=_pos_float, default=1e-5)
    n.add_argument("--atol", type=_pos_float, default=1e-5)
    n.add_argument("--t-eps", type=_pos_float, default=1e-5, help="the density is that of p_{t_eps}")
    n.add_argument("--out", default=None, help="write the report as JSON here")
    common(n)
    backend(n)
    n.set_defaults(func=cmd_nll)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import DistributedError, shutdown

    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"diffusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"diffusion {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        print(f"diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if getattr(args, "owns_process_group", False):
            shutdown()  # leave the process group this command joined (not one its caller set up)


def _per_sample_stepping() -> bool:
    """Whether the native adaptive integrator offers per-sample stepping (``norm="independent"``)."""
    from sdekit.solvers import adaptive

    return "independent" in getattr(adaptive, "ADAPTIVE_NORMS", ())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
