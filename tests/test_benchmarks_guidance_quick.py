"""Smoke test of the guidance benchmark: ``--quick`` runs, exits 0 and writes valid JSON.

No accuracy is asserted beyond sanity (targets live in ``benchmarks/guidance.py`` and docs/guidance.md):
the NFE the solver reports is 2 per score call under guidance and 1 at w = 0, and the exact
posterior of the inpainting comparison is the one the tests check.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "guidance.py")


def test_guidance_benchmark_quick(tmp_path):
    out = tmp_path / "guidance.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--train-steps", "20", "--n", "60", "--n-inpaint", "60",
                           "--out", str(out), "--plot", str(tmp_path / "g.png"), "--samples-plot", ""],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True and (tmp_path / "g.png").stat().st_size > 0
    steps = res["steps"]
    for r in res["rows"]:
        assert r["nfe"] == (2 * steps if r["w"] == 0 else 4 * steps)  # heun: 2 calls per step
        assert 0 <= r["share_c"] <= 1 and r["mmd_guided"] >= 0
    assert abs(res["inpainting"]["exact"]["mass_above_0.75"] - 0.6) < 0.1
    assert {r["method"] for r in res["inpainting"]["rows"]} == {"replacement", "reconstruction (sigma_bar)",
                                                                "reconstruction (pigdm)"}
