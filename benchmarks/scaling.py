"""Scaling benchmark: the sharded likelihood (as ``diffusion nll`` runs it under ``torchrun``) with
1 and 2 processes on this machine: wall time and whether the results are bit-identical.

Not a test. Prints a markdown table and writes JSON (default ``benchmarks/results/scaling.json``).

Problem: an ``MLPScoreNet`` score model (width 128, depth 3, seeded initialisation) on the VP SDE,
``n`` points of the 2-D Gaussian mixture, ``ScoreModel.log_likelihood`` with the exact divergence,
dopri5 at rtol = atol = 1e-5, t_eps = 1e-5, in batches of ``--batch-size`` points. The work is split
as in ``diffusion nll``: batch ``b`` (its own seed, ``diffusion.distributed.sample_seed``) goes to
the process that owns it under ``diffusion.distributed.shard_bounds``, and rank 0 gathers the
per-point log-likelihoods. The processes are started with ``multiprocessing`` (spawn) and joined in
a gloo process group, as ``torchrun`` would; the clock runs from a barrier after set-up to the end
of the gather (process start-up and imports are not timed: they are a fixed cost per launch,
reported separately). Repeats are interleaved (1, 2, 1, 2, ...); the table gives the median and
the best, and the speed-up of the medians.

Each process uses one intra-op thread, so 2 processes use 2 cores: on a machine shared with other
jobs the speed-up measures the spare cores as much as the method (the load average is recorded
before and after). GPU rows (NCCL, one process per GPU) are owed: this machine has no GPU.

Usage::

    PYTHONPATH=. python benchmarks/scaling.py            # n = 512 points, 3 repeats (about a minute)
    PYTHONPATH=. python benchmarks/scaling.py --quick    # smoke run (seconds of work)
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RTOL = ATOL = 1e-5
T_EPS = 1e-5
WIDTH, DEPTH = 128, 3
JOIN_TIMEOUT_S = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def _worker(rank: int, world: int, port: int, n: int, batch: int, seed: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    t_boot = time.perf_counter()
    from diffusion import distributed as D
    from diffusion.data import get_dataset
    from diffusion.model import ScoreModel
    from diffusion.nets import MLPScoreNet
    from sdekit import VPSDE

    info = D.init_from_env(backend="gloo")
    torch.manual_seed(seed)
    model = ScoreModel(MLPScoreNet(2, width=WIDTH, depth=DEPTH), VPSDE()).eval()
    x = get_dataset("mixture", split="test", n=n, seed=seed).data[:n]
    n_batches = -(-n // batch)
    b_lo, b_hi = D.shard_bounds(n_batches, info.rank, info.world_size)
    setup = time.perf_counter() - t_boot
    D.barrier()
    tic = time.perf_counter()
    lps, nfe = [torch.empty(0, dtype=torch.float64)], []
    for b in range(b_lo, b_hi):
        res = model.log_likelihood(x[b * batch:(b + 1) * batch], divergence="exact", rtol=RTOL, atol=ATOL,
                                   t_eps=T_EPS, generator=D.sample_generator(seed, b))
        lps.append(res.log_prob.detach().double())
        nfe.append(int(res.stats.nfe))
    busy = time.perf_counter() - tic
    lp = D.gather_cat(torch.cat(lps))
    busy_all = D.gather_cat(torch.tensor([busy], dtype=torch.float64))
    nfe_all = D.gather_cat(torch.tensor(nfe, dtype=torch.long))
    wall = time.perf_counter() - tic
    if info.is_main:
        np.savez(out, log_prob=lp.numpy(), wall=wall, busy=busy_all.numpy(), nfe=nfe_all.numpy(), setup=setup)
    D.shutdown()


def run_once(world: int, n: int, batch: int, seed: int, tmp: Path) -> Dict:
    """One launch of ``world`` processes; returns rank 0's measurements."""
    out = tmp / f"w{world}-{time.monotonic_ns()}.npz"
    ctx = mp.get_context("spawn")
    port = _free_port()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, world, port, n, batch, seed, str(out)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            raise RuntimeError(f"a {world}-process launch did not finish within {JOIN_TIMEOUT_S} s")
    if any(p.exitcode != 0 for p in procs) or not out.exists():
        raise RuntimeError(f"a {world}-process launch failed: exit codes {[p.exitcode for p in procs]}")
    launch = time.perf_counter() - t0
    with np.load(out) as z:
        res = {k: z[k] for k in z.files}
    out.unlink()
    return {"wall": float(res["wall"]), "busy": res["busy"].tolist(), "nfe": res["nfe"].tolist(),
            "setup": float(res["setup"]), "launch": launch, "log_prob": res["log_prob"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 points, one repeat")
    ap.add_argument("--n", type=int, default=512, help="points (default 512)")
    ap.add_argument("--batch-size", type=int, default=64, help="points per batch, the unit of work (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per process count (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.batch_size, args.repeats = 64, 16, 1
    if args.n < 1 or args.batch_size < 1 or args.repeats < 1:
        ap.error("--n, --batch-size and --repeats must be >= 1")
    worlds = (1, 2)
    tmp = Path(args.out).resolve().parent
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    runs: Dict[int, List[Dict]] = {w: [] for w in worlds}
    for _ in range(args.repeats):
        for w in worlds:
            runs[w].append(run_once(w, args.n, args.batch_size, args.seed, tmp))
    load_after = _load()
    ref = runs[1][0]["log_prob"]
    identical = all(np.array_equal(r["log_prob"], ref) for w in worlds for r in runs[w])
    from diffusion.distributed import shard_bounds

    n_batches = -(-args.n // args.batch_size)
    rows = []
    for w in worlds:
        walls = [r["wall"] for r in runs[w]]
        rows.append({"processes": w, "backend": "gloo" if w > 1 else "none", "device": "cpu",
                     "points": args.n, "batch_size": args.batch_size,
                     "batches_per_process": [hi - lo for lo, hi in (shard_bounds(n_batches, r, w) for r in range(w))],
                     "wall_s_median": statistics.median(walls), "wall_s_best": min(walls), "wall_s_all": walls,
                     "busy_s_per_process": runs[w][0]["busy"], "nfe_per_batch": runs[w][0]["nfe"],
                     "launch_s_median": statistics.median(r["launch"] for r in runs[w]),
                     "bit_identical_to_1_process": all(np.array_equal(r["log_prob"], ref) for r in runs[w])})
    speedup = rows[0]["wall_s_median"] / rows[1]["wall_s_median"]
    result = {
        "benchmark": "scaling", "problem": f"MLPScoreNet({WIDTH}x{DEPTH}) on VPSDE, 2-D mixture, exact divergence, "
                                           f"dopri5 rtol=atol={RTOL:g}, t_eps={T_EPS:g}",
        "quick": bool(args.quick), "repeats": args.repeats, "rows": rows, "speedup_2_vs_1": speedup,
        "bit_identical": identical, "nll_nats": float(-ref.mean()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_before": load_before, "load_avg_after": load_after, "torch": torch.__version__,
                    "python": platform.python_version(), "threads_per_process": 1,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "owed": "multi-GPU rows (NCCL, one process per GPU): no GPU on this machine",
    }
    print(f"Sharded likelihood, {args.n} points in batches of {args.batch_size} ({result['problem']}); "
          f"load average before {load_before}, after {load_after}; {os.cpu_count()} cores\n")
    print("| processes | backend | batches per process | wall s (median) | wall s (best) | speed-up | "
          "bit-identical to 1 process |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['backend']} | {row['batches_per_process']} | {row['wall_s_median']:.2f} | "
              f"{row['wall_s_best']:.2f} | {rows[0]['wall_s_median'] / row['wall_s_median']:.2f}x | "
              f"{'yes' if row['bit_identical_to_1_process'] else 'NO'} |")
    print(f"\nmulti-GPU rows owed (no GPU here); NLL {result['nll_nats']:.6f} nats")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
