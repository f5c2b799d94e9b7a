"""torch.distributed on CPU (gloo): data-parallel training equals one process with the same global
batch, sharded sampling and likelihoods are bit-identical to one process, a rank that dies stops
the others with a named error and leaves a valid checkpoint, resume under another number of
processes continues the same run, and the bad set-ups (NCCL without GPUs, a half torchrun
environment) are one-line errors.

The two-process part is ONE launch of two spawned processes (`tests/_ddp_worker.py`) shared by
the tests below: starting Python and torch dominates its cost. Every join has a timeout, so a hung
collective fails the test instead of the suite.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import _ddp_worker as W
from diffusion import distributed as D
from diffusion.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from diffusion.cli import main as cli

WORLD = 2
JOIN_TIMEOUT_S = 100.0  # the launch takes ~10 s on a quiet 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run `_ddp_worker.main` on 2 gloo processes; returns (root, [report of rank 0, rank 1])."""
    root = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=W.main, args=(r, WORLD, port, str(root)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s"
    reports = []
    for r in range(WORLD):
        f = root / f"report-rank{r}.json"
        if r == 1 and not f.exists():  # rank 1 dies on purpose in the fault scenario, before its report
            reports.append(None)
            continue
        reports.append(json.loads(f.read_text()))
    return root, reports


def _ok(report, scenario):
    """Fail with the worker's traceback if ``scenario`` raised on that rank."""
    assert scenario not in report["errors"], report["errors"][scenario]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same training run in this process (no process group)."""
    root = tmp_path_factory.mktemp("one")
    tr = W.make_trainer(root / "api")
    hist = tr.train()
    return root, tr, hist


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def test_ddp_training_equals_one_process_with_the_global_batch(launch, single):
    _, reports = launch
    _, tr, hist = single
    r0 = reports[0]
    _ok(r0, "train_api")
    assert r0["world"] == WORLD
    np.testing.assert_allclose(r0["loss"], hist["loss"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(r0["grad_norm"], hist["grad_norm"], rtol=1e-5, atol=0)
    for p2, p1 in zip(r0["params"], tr.model.parameters()):
        np.testing.assert_allclose(p2, p1.detach().double().flatten().numpy(), rtol=1e-4, atol=1e-6)
    # the loss moved (the comparison is not between two untrained models)
    assert hist["loss"][0] != hist["loss"][-1]


def test_only_rank_0_writes_and_its_checkpoints_load(launch):
    root, reports = launch
    _ok(reports[0], "train_api")
    assert [c.name for c in list_checkpoints(root / "api-rank0" / "checkpoints")][-1].startswith("ckpt-00000006")
    assert (root / "api-rank0" / "log.jsonl").stat().st_size > 0
    rank1 = root / "api-rank1"
    assert not (rank1 / "checkpoints").exists() or not any((rank1 / "checkpoints").iterdir())
    assert not (rank1 / "log.jsonl").exists()
    _, meta = load_checkpoint(latest_checkpoint(root / "api-rank0" / "checkpoints"))
    assert meta["world_size"] == WORLD and meta["step"] == W.TRAIN["steps"]


def test_resume_under_another_world_size_continues_the_same_run(launch, single, tmp_path):
    """A 2-process checkpoint at step 3 resumed by 1 process reaches the uninterrupted run's step 6."""
    root, _ = launch
    _, _, hist = single
    out = tmp_path / "resumed"
    shutil.copytree(root / "api-rank0", out)
    for f in (out / "checkpoints").glob("ckpt-00000006.*"):
        f.unlink()
    tr = W.make_trainer(out)
    h = tr.train(resume=True)
    np.testing.assert_allclose(h["loss"], hist["loss"], rtol=1e-5, atol=0)
    # the log reads as one run of 6 steps
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


# ------------------------------------------------------------------------------------------------
# sharded evaluation through the command line
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,steps", W.SAMPLERS)
def test_sharded_sampling_is_bit_identical_to_one_process(launch, sampler, steps, capsys):
    root, reports = launch
    _ok(reports[0], "command_line")
    assert reports[0]["codes"]["train"] == 0 and reports[0]["codes"][sampler] == 0
    if sampler == "dopri5" and not __import__("diffusion.cli", fromlist=["x"])._per_sample_stepping():
        pytest.skip("adaptive sampling is shard-independent only with per-sample stepping (norm='independent')")
    one = root / f"sample-{sampler}-w1.npz"
    assert cli(W.cli_sample_args(root / "cli-run", sampler, steps, one)) == 0
    capsys.readouterr()
    a, b = np.load(one), np.load(root / f"sample-{sampler}-w{WORLD}.npz")
    assert a["x"].shape == (13, 2) and int(b["processes"]) == WORLD
    assert np.array_equal(a["x"], b["x"]), np.abs(a["x"] - b["x"]).max()


@pytest.mark.parametrize("divergence", W.DIVERGENCES)
def test_sharded_nll_is_bit_identical_to_one_process(launch, divergence, capsys):
    root, reports = launch
    _ok(reports[0], "command_line")
    assert reports[0]["codes"][divergence] == 0
    one = root / f"nll-{divergence}-w1.json"
    assert cli(W.cli_nll_args(root / "cli-run", divergence, one)) == 0
    capsys.readouterr()
    a, b = json.loads(one.read_text()), json.loads((root / f"nll-{divergence}-w{WORLD}.json").read_text())
    assert b["processes"] == WORLD and a["n"] == b["n"] == 21
    assert a["nll_nats"] == b["nll_nats"] and a["nll_se"] == b["nll_se"]  # the same floats, bit for bit
    assert a["nfe_per_batch"] == b["nfe_per_batch"] and len(a["nfe_per_batch"]) == 6


# ------------------------------------------------------------------------------------------------
# faults and bad set-ups
# ------------------------------------------------------------------------------------------------
def test_a_dead_rank_stops_the_others_with_a_named_error_and_a_valid_checkpoint(launch):
    root, reports = launch
    _ok(reports[0], "fault")
    msg = reports[0]["fault"]
    assert msg.startswith("DistributedError"), msg
    assert f"step {W.DIE_AT}" in msg and "checkpoint" in msg
    found = latest_checkpoint(root / "fault" / "checkpoints")
    _, meta = load_checkpoint(found)  # verifies the hash: a whole, valid checkpoint
    assert meta["step"] == W.DIE_AT - 1
    # and the run continues from it in one process
    tr = W.make_trainer(root / "fault", steps=8, ckpt_every=2)
    assert len(tr.train(resume=True)["loss"]) == 8


def test_nccl_without_gpus_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="nccl.*CUDA"):
        D.init_from_env(backend="nccl")
    with pytest.raises(ValueError, match="needs CUDA"):
        D.init_from_env(device="cuda")
    out = tmp_path / "run"
    code = cli(["train", "--backend", "nccl", "--device", "cpu", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "nccl" in err and "gloo" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_half_a_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        D.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no group, rank 0 of 1
    assert D.init_from_env() == D.DistInfo()
    with pytest.raises(ValueError, match="backend"):
        D.init_from_env(backend="mpi")


def test_shards_cover_the_rows_once_in_order():
    for n in (0, 1, 5, 10, 31):
        for w in (1, 2, 3, 7):
            b = [D.shard_bounds(n, r, w) for r in range(w)]
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(w - 1))
            sizes = [hi - lo for lo, hi in b]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        D.shard_bounds(4, 2, 2)
    # per-sample seeds: distinct streams, a pure function of (seed, index)
    assert D.sample_seed(0, 1) == D.sample_seed(0, 1) != D.sample_seed(0, 2) != D.sample_seed(1, 1)
