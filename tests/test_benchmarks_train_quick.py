"""Smoke test of the training benchmark: ``--quick`` runs, exits 0 and writes valid JSON.

Needs the merged package (``ScoreModel``, ``MLPScoreNet``, ``DSMLoss``, ``get_dataset``); skipped
until those modules exist. No timing or accuracy is asserted (targets live in ``benchmarks/``).
"""

import json
import os
import subprocess
import sys

import pytest

for mod in ("diffusion.model", "diffusion.nets", "diffusion.losses", "diffusion.data"):
    pytest.importorskip(mod)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_cpu.py")


def test_train_benchmark_quick(tmp_path):
    out = tmp_path / "train_cpu.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1", "--budget", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True
    assert {"cpu_model", "cores", "torch", "torch_threads", "date"} <= set(res["machine"])
    assert res["machine"]["torch_threads"] == 1
    assert [r["name"] for r in res["rows"]] == ["exact score", "plain eps-DSM loop", "diffusion.Trainer"]
    for r in res["rows"]:
        assert r["pf_ode_nfe"] > 0 and r["nll_nfe"] > 0 and r["mmd"] >= 0 and r["samples_finite"]
        assert r["gap_nats_per_dim"] == r["gap_nats_per_dim"]  # not NaN
    for r in res["rows"][1:]:
        assert r["train"]["steps"] >= 1 and r["train"]["it_s"] > 0
    assert res["rows"][2]["train"]["loss"]["weighting"] == "likelihood"
    # the exact score's NLL gap is solver error only
    assert abs(res["rows"][0]["gap_nats_per_dim"]) < 0.05
    assert res["mmd_floor"] > 0
    assert "| recipe |" in proc.stdout


def test_train_benchmark_rejects_bad_budget(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--budget", "-1", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--budget" in proc.stderr
    assert not (tmp_path / "x.json").exists()
