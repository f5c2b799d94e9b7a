"""The body of the 2-process gloo tests (tests/test_distributed.py): one launch of two processes
does every multi-process check, so the cost of starting Python and torch twice is paid once.

Each rank writes what it saw under ``root``; the test compares it with the same work done by one
process. Everything here is deterministic (fixed seeds)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

# a tiny run: big enough that the shards differ, small enough for seconds on a busy CPU
TRAIN = dict(steps=6, batch_size=30, lr=1e-2, ckpt_every=3, log_every=1, device="cpu", progress=False, seed=5,
             ema_decay=0.9)
N_DATA = 120
DIE_AT = 5  # the step at which rank 1 dies in the fault scenario


def make_trainer(out_dir, **over):
    """The trainer every process builds identically (data, network, loss, config)."""
    from diffusion.losses import DSMLoss
    from diffusion.model import ScoreModel
    from diffusion.nets import MLPScoreNet
    from diffusion.train import TrainConfig, Trainer
    from sdekit import VPSDE

    torch.manual_seed(0)
    data = torch.randn(N_DATA, 2, generator=torch.Generator().manual_seed(1))
    model = ScoreModel(MLPScoreNet(2, width=32, depth=2, emb_dim=16), VPSDE())
    # stratified times: the batch's randomness is global, the hardest case for sharding
    loss = DSMLoss(weighting="likelihood", time_sampling="importance_stratified")
    return Trainer(model, data, loss, TrainConfig(**{**TRAIN, **over}), out_dir=out_dir)


def cli_sample_args(run, sampler, steps, out):
    a = ["sample", "--checkpoint", str(run), "--sampler", sampler, "--n", "13", "--seed", "7", "--out", str(out)]
    return a + (["--steps", str(steps)] if steps else ["--rtol", "1e-4", "--atol", "1e-4"])


def cli_nll_args(run, divergence, out):
    return ["nll", "--checkpoint", str(run), "--n", "21", "--batch-size", "4", "--divergence", divergence,
            "--probes", "2", "--rtol", "1e-3", "--atol", "1e-3", "--seed", "3", "--out", str(out)]


SAMPLERS = [("euler_maruyama", 8), ("dpmpp_2m", 6), ("dopri5", None)]
DIVERGENCES = ["exact", "hutchinson"]


class _DieAt:
    """A loss that kills its process (no clean-up, like a crash) at step ``step`` on ``rank``."""

    def __init__(self, loss, trainer_ref, rank, step):
        self.loss, self.ref, self.rank, self.step = loss, trainer_ref, rank, step

    def __call__(self, *a, **k):
        from diffusion import distributed as D

        if D.rank() == self.rank and self.ref[0].step + 1 == self.step:
            os._exit(3)
        return self.loss(*a, **k)


def main(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    root = Path(root)
    report = {"rank": rank, "errors": {}, "codes": {}}

    def scenario(name, fn):
        """Run one scenario; a failure is recorded under its name and the next scenario runs."""
        try:
            fn()
        except BaseException:  # noqa: BLE001 - recorded for the test that owns the scenario
            report["errors"][name] = traceback.format_exc()

    from diffusion import distributed as D
    from diffusion.cli import main as cli

    info = D.init_from_env(backend="gloo", timeout_s=60)
    report["world"] = info.world_size

    def train_api():  # data-parallel training through the API (each rank its own out_dir: only rank 0 may write)
        tr = make_trainer(root / f"api-rank{rank}")
        hist = tr.train()
        report["loss"], report["grad_norm"] = hist["loss"], hist["grad_norm"]
        report["params"] = [p.detach().double().flatten().tolist() for p in tr.model.parameters()]

    def command_line():  # the command line under a process group, as torchrun would run it
        codes = report["codes"]
        codes["train"] = cli(["train", "--data", "mixture", "--data-option", "n=500", "--steps", "8",
                              "--batch-size", "32", "--width", "16", "--depth", "1", "--device", "cpu",
                              "--backend", "gloo", "--ckpt-every", "4", "--out", str(root / "cli-run")])
        run = root / "cli-run"
        for sampler, steps in SAMPLERS:
            codes[sampler] = cli(cli_sample_args(run, sampler, steps, root / f"sample-{sampler}-w{world}.npz"))
        for div in DIVERGENCES:
            codes[div] = cli(cli_nll_args(run, div, root / f"nll-{div}-w{world}.json"))

    def fault():  # a rank dies mid-training: the others stop with DistributedError, the checkpoint stays valid
        ref = []
        tr = make_trainer(root / "fault", steps=8, ckpt_every=2)
        ref.append(tr)
        tr.loss = _DieAt(tr.loss, ref, rank=1, step=DIE_AT)
        try:
            tr.train()
            report["fault"] = "no error"
        except D.DistributedError as exc:
            report["fault"] = f"DistributedError: {exc}"
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to show
            report["fault"] = f"{type(exc).__name__}: {exc}"

    scenario("train_api", train_api)
    scenario("command_line", command_line)
    scenario("fault", fault)
    (root / f"report-rank{rank}.json").write_text(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)  # the process group may be broken (fault scenario): skip its clean-up
