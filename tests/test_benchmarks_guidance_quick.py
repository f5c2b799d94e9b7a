"""Smoke test of the guidance benchmark: ``--quick`` runs, exits 0 and writes valid JSON.

No accuracy is asserted beyond sanity (targets live in ``benchmarks/guidance.py`` and docs/guidance.md):
the NFE the solver reports is 2 per score call under guidance and 1 at w = 0, and the exact
posterior of the inpainting comparison is the one the tests check.
"""

import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "guidance.py")


def test_guidance_benchmark_quick(tmp_path):
    """Runs ``main`` in-process (a subprocess would spend most of the time importing torch again)."""
    out = tmp_path / "guidance.json"
    spec = importlib.util.spec_from_file_location("guidance_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--quick", "--train-steps", "5", "--n", "40", "--n-inpaint", "40", "--classes", "1", "--ws", "0,1",
              "--nfe-ws", "1", "--nfe-steps", "2", "--ref-steps", "5", "--steps", "3", "--floor-repeats", "2",
              "--out", str(out), "--plot", str(tmp_path / "g.png"), "--samples-plot", "",
              "--threads", str(torch.get_num_threads())])
    res = json.loads(out.read_text())
    assert res["quick"] is True and (tmp_path / "g.png").stat().st_size > 0
    steps = res["steps"]
    for r in res["rows"]:
        assert r["nfe"] == (2 * steps if r["w"] == 0 else 4 * steps)  # heun: 2 calls per step
        assert 0 <= r["share_c"] <= 1 and r["mmd_guided"] >= 0
    assert abs(res["inpainting"]["exact"]["mass_above_0.75"] - 0.6) < 0.1  # 800 exact draws: sd 0.017
    assert {r["method"] for r in res["inpainting"]["rows"]} == {"replacement", "reconstruction (sigma_bar)",
                                                                "reconstruction (pigdm)"}
