"""Smoke test of the solver benchmark script: ``--quick`` runs, exits 0 and writes valid JSON.

No timing is asserted (speed targets live in ``benchmarks/``, never in tests).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "solvers.py")


def test_solvers_benchmark_quick(tmp_path):
    out = tmp_path / "solvers.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    assert {"machine", "quick", "sections", "config", "runtime_s", "overhead", "dopri5", "accuracy"} <= set(res)
    assert res["quick"] is True
    m = res["machine"]
    assert {"cpu_model", "cores", "torch", "torch_threads", "date"} <= set(m)
    assert m["torch_threads"] == 1

    ov = res["overhead"]["rows"]
    assert {r["case"] for r in ov} == {"euler_maruyama (reverse SDE)", "heun (PF ODE)", "euler_maruyama vs torchsde"}
    for r in ov:
        assert {"variant", "shape", "steps", "per_step_ms", "ratio_vs_hand", "times_s"} <= set(r)
        assert len(r["times_s"]) >= 3 and all(t > 0 for t in r["times_s"])
    # the hand loops reproduce sdekit's arithmetic (same noise, same coefficients; float32 rounding)
    assert res["overhead"]["checks"]
    for k, v in res["overhead"]["checks"].items():
        assert v < 1e-4, (k, v)
    assert {p["method"] for p in res["overhead"]["profile"]} == {"euler_maruyama", "heun"}

    d5 = res["dopri5"]["rows"]
    assert {r["variant"] for r in d5} >= {"torchdiffeq.odeint direct", "sdekit solve, first_step given"}
    nfe = {r["variant"]: r["nfe"] for r in d5}
    assert nfe["sdekit solve, first_step given"] == nfe["torchdiffeq.odeint direct"]

    acc = res["accuracy"]
    assert acc["issue_reference"]
    p = acc["problems"][0]
    assert p["d"] == 2
    assert {"reference", "deterministic", "stochastic", "noise_floor", "twin"} <= set(p)
    methods = {q["method"].split(" ")[0] for q in p["deterministic"]}
    assert {"euler", "heun", "rk4", "ddim", "dpmpp_2m", "dpmpp_3m", "torchdiffeq:dopri5"} <= methods
    assert {q["method"] for q in p["stochastic"]} == {"euler_maruyama", "pc"}
    for q in p["deterministic"]:
        assert q["nfe"] > 0 and q["median_err"] >= 0
    assert "## overhead" in proc.stdout and "## accuracy" in proc.stdout


def test_solvers_benchmark_rejects_unknown_section(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--only", "nope", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--only" in proc.stderr
    assert not (tmp_path / "x.json").exists()
