r"""Scaling out with ``torch.distributed``: process-group set-up from ``torchrun``'s environment,
rank bookkeeping, contiguous shards, gathers, per-sample seeds and the data-parallel wrapper the
`Trainer` uses (``docs/scaling.md``).

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); NCCL on GPUs, gloo on CPUs.

**Training.** Every rank holds the same replica (same initial weights, broadcast by
``DistributedDataParallel``; same batch and noise generators), draws the same global batch of
$B$ indices and the same loss randomness (times, noise, label dropout: whatever the loss draws from
its generator, over the whole batch), and runs the *network* only on its own contiguous slice of
rows (`shard_bounds`). The slices' outputs are all-gathered, so every rank evaluates the same
global loss $L = \frac1B\sum_i \ell_i$; the backward pass sends each rank only the gradient of its
own rows, and the parameter gradients are **summed** over ranks (a DDP communication hook), which
is exactly $\nabla L$. Hence $N$ processes with global batch $B$ take the same steps as one
process with batch $B$, to float rounding (the order of the gradient sum differs). The loss's
elementwise part (drawing $t$ and $\varepsilon$, forming $x_t$, the error) is repeated on every
rank: $O(Bd)$, the price of batch-wide randomness (stratified times) staying exactly that of one
process.

**Evaluation.** Work is split into contiguous shards whose content does not depend on the number
of processes (a sample with its own seed `sample_generator`; a likelihood batch with its own seed),
and rank 0 gathers the pieces in order (`gather_cat`), so the result is bit-identical to one
process whenever a piece's computation does not depend on which other pieces share its process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "DistInfo",
    "DistributedError",
    "BACKENDS",
    "DEFAULT_TIMEOUT_S",
    "init_from_env",
    "info",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "shutdown",
    "shard_bounds",
    "gather_cat",
    "broadcast_object",
    "sample_seed",
    "sample_generator",
    "ShardedNet",
]

BACKENDS = ("auto", "gloo", "nccl")
#: Collective timeout (seconds) of a process group set up here: a rank that stops answering makes
#: the others fail after at most this long instead of torch's 30 minutes.
DEFAULT_TIMEOUT_S = 300.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective operation failed: another process died, or stopped answering for longer than
    the process group's timeout."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` in ``[0, world_size)``, ``local_rank`` on its node,
    the ``backend`` (``None`` without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """The current process's `DistInfo` (rank 0 of 1 without a process group)."""
    if not _initialized():
        return DistInfo()
    import torch.distributed as dist

    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=str(dist.get_backend()))


def is_distributed() -> bool:
    """True when running in an initialised process group of more than one process."""
    return info().distributed


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return info().rank


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return info().world_size


def is_main() -> bool:
    """True on rank 0 (and without a process group)."""
    return info().rank == 0


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {v!r}") from None


def init_from_env(backend: str = "auto", device: Optional[str] = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (no-op without one).

    Parameters
    ----------
    backend:
        ``"auto"`` (NCCL when ``device`` is CUDA, else gloo), ``"gloo"`` or ``"nccl"``.
    device:
        The device the caller will compute on (``"cpu"``, ``"cuda"``, ...), or ``None``.
    timeout_s:
        Collective timeout in seconds: a rank that dies or hangs makes the others fail with an
        error after at most this long.

    Returns
    -------
    DistInfo
        Rank 0 of 1 when the environment names no multi-process run (``WORLD_SIZE`` unset or 1).

    Raises
    ------
    ValueError
        A bad ``backend``/``timeout_s``, NCCL (or a CUDA device) requested where CUDA is not
        available, or an inconsistent environment — before any process group is created.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    dev = torch.device(device) if device is not None else None
    cuda_wanted = backend == "nccl" or (dev is not None and dev.type == "cuda")
    if cuda_wanted and not torch.cuda.is_available():
        what = "backend 'nccl'" if backend == "nccl" else f"device {device!r}"
        raise ValueError(f"{what} needs CUDA GPUs, but torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}); use backend 'gloo' and device 'cpu'")
    if backend == "nccl" and dev is not None and dev.type != "cuda":
        raise ValueError(f"backend 'nccl' runs on CUDA devices, got device {device!r}; use backend 'gloo' for CPUs")
    if _initialized():
        return info()
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return DistInfo()
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world}")
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun "
                         f"(torchrun --nproc_per_node=N -m diffusion ...)")
    r = _env_int("RANK")
    if not 0 <= r < world:
        raise ValueError(f"environment variable RANK must be in [0, WORLD_SIZE={world}), got {r}")
    local = _env_int("LOCAL_RANK")
    local = r if local is None else local
    if backend == "auto":
        backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                             f"use --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
    import torch.distributed as dist

    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return DistInfo(rank=r, world_size=world, local_rank=local, backend=backend)


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if one is initialised."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# shards, gathers, seeds
# ------------------------------------------------------------------------------------------------
def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: ``n`` items cut into ``world_size`` contiguous shards
    whose sizes differ by at most one (the first ``n % world_size`` shards take one more).

    Examples
    --------
    >>> [shard_bounds(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    for name, v, lo in (("n", n, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    base, extra = divmod(int(n), int(world_size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def gather_cat(x: torch.Tensor, dst: int = 0) -> Optional[torch.Tensor]:
    """Concatenate every rank's ``x`` (same trailing shape and dtype, any number of rows) along
    dimension 0 in rank order, on rank ``dst``; other ranks get ``None``. Without a process group,
    ``x`` itself. The tensors travel through CPU memory (any backend)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not is_distributed():
        return x
    import torch.distributed as dist

    parts: List[Optional[torch.Tensor]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    if dist.get_rank() != dst:
        return None
    return torch.cat(parts).to(x.device)  # type: ignore[arg-type]


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (a picklable object; ``obj`` itself without a group)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a run seeded ``seed``: independent streams per sample
    (``numpy``'s ``SeedSequence(seed, spawn_key=(index,))``), the same on every process."""
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    state = np.random.SeedSequence(int(seed), spawn_key=(int(index),)).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def sample_generator(seed: int, index: int, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with `sample_seed` ``(seed, index)``."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, index))


# ------------------------------------------------------------------------------------------------
# data-parallel network
# ------------------------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """All-gather every rank's rows in rank order; backward keeps this rank's rows of the
    gradient (every rank computes the same loss, hence the same incoming gradient)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: Tuple[int, ...], rank: int):  # type: ignore[override]
        import torch.distributed as dist

        lo = sum(counts[:rank])
        ctx.lo, ctx.hi = lo, lo + counts[rank]
        width = max(counts)
        pad = local.new_zeros((width,) + tuple(local.shape[1:]))
        pad[:local.shape[0]] = local
        bufs = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(bufs, pad.contiguous())
        return torch.cat([b[:c] for b, c in zip(bufs, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad[ctx.lo:ctx.hi], None, None


def _sum_hook(state, bucket):
    """DDP communication hook: all-reduce SUM of the bucket (DDP's default averages)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class ShardedNet(nn.Module):
    """Wrap a network ``net(x, noise_cond, label)`` for data-parallel training (module docs).

    Called on the whole global batch (on every rank, the same batch), it runs
    ``DistributedDataParallel(net)`` on this rank's rows `shard_bounds` only, all-gathers the
    outputs and returns the whole batch's output. With the loss computed identically on every
    rank, the parameter gradients after ``backward`` are those of one process on the whole batch.

    Parameters
    ----------
    net:
        The network (its parameters are shared, not copied). DDP broadcasts rank 0's parameters
        and buffers on construction.
    device_ids:
        ``DistributedDataParallel``'s ``device_ids`` (``[local_rank]`` on CUDA, ``None`` on CPU).
    """

    def __init__(self, net: nn.Module, device_ids: Optional[Sequence[int]] = None):
        super().__init__()
        if not is_distributed():
            raise RuntimeError("ShardedNet needs an initialised process group with more than one process")
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.ddp = DDP(net, device_ids=list(device_ids) if device_ids is not None else None)
        self.ddp.register_comm_hook(None, _sum_hook)
        d = info()
        self.rank, self.world_size = d.rank, d.world_size

    def forward(self, x: torch.Tensor, cond: torch.Tensor, label=None) -> torch.Tensor:
        n = x.shape[0]
        if n < self.world_size:
            raise ValueError(f"a batch of {n} rows cannot be split over {self.world_size} processes: "
                             f"use a batch_size >= the number of processes")
        counts = tuple(shard_bounds(n, r, self.world_size)[1] - shard_bounds(n, r, self.world_size)[0]
                       for r in range(self.world_size))
        lo, hi = shard_bounds(n, self.rank, self.world_size)

        def rows(v):
            return v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v

        out = self.ddp(x[lo:hi], rows(cond), rows(label))
        return _GatherRows.apply(out, counts, self.rank)
