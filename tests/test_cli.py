"""The `diffusion` command line: the quickstart end to end (``--quick``), train / sample / nll,
and every bad input as one line with exit code 2 and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion import __version__
from diffusion.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``quickstart --quick`` run shared by the tests below."""
    out = tmp_path_factory.mktemp("qs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["quickstart", "--quick", "--out", str(out), "--seed", "3"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def test_quickstart_quick_writes_every_output(quick_run):
    for name in ("samples.png", "trajectories.png", "loss.png", "error_vs_nfe.png", "results.json",
                 "samples.npz", "run.json"):
        assert (quick_run / name).is_file() and (quick_run / name).stat().st_size > 0, name
    assert any((quick_run / "model").iterdir())
    res = json.loads((quick_run / "results.json").read_text())
    assert len(res["samplers"]) >= 5
    methods = {r["method"] for r in res["samplers"]}
    assert {"euler_maruyama", "pc", "ddim", "dpmpp_2m", "dopri5", "torchsde:euler"} <= methods
    for r in res["samplers"]:
        assert r["nfe"] > 0 and np.isfinite(r["mmd"]) and r["verdict"]
    # NFE honest for the fixed-step samplers: steps x evaluations per step
    nfe = {r["method"]: r["nfe"] for r in res["samplers"]}
    assert nfe["euler_maruyama"] == 200 and nfe["pc"] == 200 and nfe["dpmpp_2m"] == 20
    assert res["mmd_floor_median"] > 0 and res["mmd_floor_q95"] >= res["mmd_floor_median"]
    nll = res["nll"]
    assert np.isfinite(nll["model_nll_nats"]) and np.isfinite(nll["exact_nll_nats"])
    # the exact NLL of the mixture's held-out points: around its entropy (~1.9 nats for this mixture)
    assert 0.5 < nll["exact_nll_nats"] < 4.0
    with np.load(quick_run / "samples.npz") as z:
        assert z["exact"].shape == (256, 2) and np.isfinite(z["dpmpp_2m"]).all()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["frobnicate"], "invalid choice"),
    (["quickstart", "--seed", "-1"], "seed"),
    (["quickstart", "--seed", str(2 ** 64)], "seed"),
    (["quickstart", "--seed", "abc"], "seed"),
    (["sample"], "--checkpoint"),
])
def test_argument_errors_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in err


def test_bad_inputs_are_one_line_errors(quick_run, tmp_path, capsys):
    # unknown sampler: lists the valid ones
    code, out, err = run(["sample", "--checkpoint", quick_run, "--sampler", "nope"], capsys)
    assert code == 2 and "unknown sampler 'nope'" in err and "dpmpp_2m" in err and len(err.strip().splitlines()) == 1
    # a fixed-step sampler given tolerances / an adaptive one given steps
    code, _, err = run(["sample", "--checkpoint", quick_run, "--sampler", "ddim", "--rtol", "1e-3"], capsys)
    assert code == 2 and "fixed-step" in err
    code, _, err = run(["sample", "--checkpoint", quick_run, "--sampler", "dopri5", "--steps", "10"], capsys)
    assert code == 2 and "adaptive" in err
    # missing checkpoint
    code, _, err = run(["nll", "--checkpoint", tmp_path / "missing"], capsys)
    assert code == 2 and "does not exist" in err
    # unknown data set
    code, _, err = run(["train", "--data", "imagenet", "--out", tmp_path / "t"], capsys)
    assert code == 2 and "unknown data set 'imagenet'" in err and "mixture" in err
    # CUDA on a machine without it
    if not torch.cuda.is_available():
        code, _, err = run(["quickstart", "--quick", "--device", "cuda", "--out", tmp_path / "q"], capsys)
        assert code == 2 and "CUDA is not available" in err
        assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
    code, _, err = run(["quickstart", "--quick", "--device", "tpu", "--out", tmp_path / "q"], capsys)
    assert code == 2 and "valid" in err
    # an output folder that cannot be written (a file in the way)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["train", "--out", blocker, "--steps", "2"], capsys)
    assert code == 2 and "not a folder" in err
    code, _, err = run(["train", "--out", blocker / "sub", "--steps", "2"], capsys)
    assert code == 2 and "cannot be written" in err


def test_corrupt_checkpoint_is_a_clear_error(quick_run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quick_run / "model", bad / "model")
    for f in (bad / "model").glob("*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    code, _, err = run(["sample", "--checkpoint", bad, "--n", "4"], capsys)
    assert code == 2 and "checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not list(bad.glob("samples-*"))  # nothing written


def test_sample_and_nll_from_the_run(quick_run, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    code, out, err = run(["sample", "--checkpoint", quick_run, "--sampler", "ddim", "--steps", "10", "--n", "64",
                          "--out", npz, "--seed", "1"], capsys)
    assert code == 0, err
    with np.load(npz) as z:
        assert z["x"].shape == (64, 2) and int(z["nfe"]) == 10 and np.isfinite(z["x"]).all()
    assert npz.with_suffix(".png").is_file()
    # same seed, same samples
    npz2 = tmp_path / "s2.npz"
    assert run(["sample", "--checkpoint", quick_run, "--sampler", "ddim", "--steps", "10", "--n", "64",
                "--out", npz2, "--seed", "1"], capsys)[0] == 0
    with np.load(npz) as a, np.load(npz2) as b:
        np.testing.assert_array_equal(a["x"], b["x"])
    rep = tmp_path / "nll.json"
    code, out, err = run(["nll", "--checkpoint", quick_run, "--n", "32", "--rtol", "1e-3", "--atol", "1e-3",
                          "--out", rep], capsys)
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert r["n"] == 32 and r["dim"] == 2 and np.isfinite(r["nll_nats"]) and "gap_nats_per_dim" in r
    assert "nats/dim" in out


def test_train_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", "moons", "--data-option", "n=512", "--batch-size", "64", "--width", "32",
            "--depth", "1", "--device", "cpu", "--out", out, "--ckpt-every", "3"]
    code, o, err = run(base + ["--steps", "6"], capsys)
    assert code == 0, err
    assert (out / "model").is_dir() and (out / "loss.png").is_file()
    # the same folder again without --resume is refused; with --resume the run continues
    code, _, err = run(base + ["--steps", "6"], capsys)
    assert code == 2 and "--resume" in err
    with pytest.warns(RuntimeWarning, match="changed config"):
        code, o, err = run(base + ["--steps", "9", "--resume"], capsys)
    assert code == 0, err
    assert "step 9" in o
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 9


def test_python_m_runs_the_command_line():
    """`python -m diffusion` is the command line (one subprocess: an error case, exit 2, no traceback;
    --version is tested in process)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "diffusion", "sample", "--checkpoint", "/nonexistent/x"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_tutorial_python_block_runs(capsys):
    """docs/tutorial.md's Python walk-through runs as written and its claims hold."""
    import re

    text = (REPO / "docs" / "tutorial.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1
    ns = {"__name__": "__tutorial__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(blocks[0], "docs/tutorial.md", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count("MMD") == 3 and "NLL gap" in out
    # 200 steps: a rough model (gap ~0.3-0.5 nats/dim, varying with the thread count), but a
    # model: an untrained network's gap is ~5 nats/dim on this mixture
    assert 0.0 < float(ns["gap"].mean()) < 1.0


def test_conditional_train_and_guided_sampling(tmp_path, quick_run, capsys):
    out = tmp_path / "cond"
    code, _, err = run(["train", "--data", "mixture", "--data-option", "n=512", "--steps", "4", "--batch-size", "64",
                        "--width", "32", "--depth", "1", "--device", "cpu", "--conditional", "--label-dropout", "0.2",
                        "--out", out], capsys)
    assert code == 0, err
    npz = tmp_path / "g.npz"
    code, o, err = run(["sample", "--checkpoint", out, "--sampler", "ddim", "--steps", "5", "--n", "16", "--label", "1",
                        "--guidance", "2", "--out", npz], capsys)
    assert code == 0, err
    with np.load(npz) as z:
        assert z["x"].shape == (16, 2) and int(z["nfe"]) == 10  # classifier-free guidance: two evaluations a step
    code, o, err = run(["sample", "--checkpoint", out, "--sampler", "ddim", "--steps", "5", "--n", "16", "--label", "1",
                        "--guidance", "2", "--guidance-interval", "0.1,5", "--out", npz], capsys)
    assert code == 0, err
    with np.load(npz) as z:  # outside the interval a step costs one evaluation
        assert 5 < int(z["nfe"]) < 10
    # bad guidance requests: one line each, exit 2
    for argv, needle in [(["--guidance", "2"], "needs --label"),
                         (["--label", "1", "--guidance", "nan"], "finite"),
                         (["--label", "9", "--guidance", "1"], "out of range"),
                         (["--label", "1", "--guidance-interval", "0,1"], "needs --guidance"),
                         (["--label", "1", "--guidance", "1", "--guidance-interval", "2,1"], "LO,HI")]:
        code, _, err = run(["sample", "--checkpoint", out, "--sampler", "ddim", "--steps", "2", "--n", "2"] + argv,
                           capsys)
        assert code == 2 and needle in err, (argv, err)
    # an unconditional model cannot be guided or labelled
    code, _, err = run(["sample", "--checkpoint", quick_run, "--sampler", "ddim", "--steps", "2", "--n", "2",
                        "--label", "1"], capsys)
    assert code == 2 and "class-conditional" in err
    code, _, err = run(["train", "--data", "moons", "--steps", "2", "--label-dropout", "0.1", "--out", tmp_path / "m"],
                       capsys)
    assert code == 2 and "--conditional" in err
