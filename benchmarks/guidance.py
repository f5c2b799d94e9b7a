"""CPU benchmark: classifier-free guidance of a trained class-conditional model on the 2-D labelled mixture.

Not a test. Prints markdown tables, writes JSON (default ``benchmarks/results/guidance.json``) and
PNG plots (``benchmarks/results/guidance.png``: metrics vs w and vs NFE;
``benchmarks/results/guidance_samples.png``: samples vs w, exact oracle and trained model).

Data: ``diffusion.data.get_dataset("mixture")`` — 6 anisotropic Gaussians, label = component, so
``sdekit.oracles.LabelledMixture`` gives the exact class distributions and the exact guided score
$\\nabla\\log p_t(x) + (1 + w)\\nabla\\log p_t(c \\mid x)$ at every t.

1. Train a class-conditional ``MLPScoreNet`` (``num_classes=6``) with label dropout to the null
   label (``ScoreModel(..., label_dropout=0.1)``) by ``diffusion.Trainer`` for ``--train-steps``
   steps (about a minute on one busy core; ``--quick``: seconds).
2. Per class c and guidance scale w, sample with ``model.sample(label=c, guidance=w)`` (PF ODE,
   ``heun``) and report
   * ``mmd_class``: MMD to exact samples of the class $p_0(x \\mid c)$ (w = 0 is the target; for
     w > 0 it measures how far guidance moves away from the class distribution),
   * ``mmd_guided``: MMD to samples of the *exact* guided sampler (the oracle's guided score, the
     same solver with ``--ref-steps`` steps): the model's error at that w,
   * ``share_c``: the share of samples the exact classifier $p_{t_\\varepsilon}(c \\mid x)$ assigns
     to c (argmax; rises with w as derived in ``docs/guidance.md``), ``log_p_c``: the median exact
     $\\log p(c \\mid x)$, and ``spread``: the mean distance to the class mean;
   next to the MMD floor (median of exact-vs-exact MMDs of the same size).
3. NFE sweep: for w in ``--nfe-ws`` the mean over classes of ``mmd_guided`` vs solver steps; NFE
   is what ``SolverStats`` reports (2 network evaluations per score call under guidance).
4. Inpainting bias (exact scores, no training): on the coupled 2-D mixture of
   ``tests/test_guidance.py`` with $x_0 = 0.3$ known, replacement and reconstruction guidance
   (both variances) against the exact posterior ``GaussianMixture.condition``: mean, standard
   deviation, the mass above 0.75 (the heavy component) and the KS distance of $x_1$.

Usage::

    PYTHONPATH=. python benchmarks/guidance.py            # ~2-3 min on a busy 2-core machine
    PYTHONPATH=. python benchmarks/guidance.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import sdekit  # noqa: E402
from sdekit.guidance import classifier_free_guidance  # noqa: E402
from sdekit.oracles import LabelledMixture  # noqa: E402
from sdekit.studies import mmd  # noqa: E402

F64 = torch.float64


def machine() -> Dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg": load,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def train(a, ds):
    from diffusion import DSMLoss, MLPScoreNet, ScoreModel, TrainConfig, Trainer

    torch.manual_seed(a.seed)
    net = MLPScoreNet(dim=2, width=a.width, depth=a.depth, num_classes=ds.num_classes)
    model = ScoreModel(net, sdekit.VPSDE(), label_dropout=a.label_dropout, t_eps=1e-3)
    loss = DSMLoss(weighting="likelihood", time_sampling="importance_stratified", t_eps=1e-5)
    cfg = TrainConfig(steps=a.train_steps, batch_size=a.batch, lr=2e-3, warmup=max(1, a.train_steps // 50),
                      ema_decay=0.999, seed=a.seed, progress=False, device="cpu", ckpt_every=0,
                      log_every=max(1, a.train_steps // 10))
    tr = Trainer(model, ds, loss, cfg)
    tic = time.perf_counter()
    tr.train()
    secs = time.perf_counter() - tic
    return tr.ema_model, {"steps": a.train_steps, "seconds": secs, "it_s": a.train_steps / secs,
                          "final_loss": statistics.fmean(tr.history["loss"][-50:]),
                          "label_dropout": a.label_dropout, "width": a.width, "depth": a.depth}


def exact_guided_samples(lm, sde, c, w, x_T, steps):
    cond = lm.exact_conditional_score(sde)
    score = classifier_free_guidance(lambda x, t: cond(x, t, c), lm.exact_score(sde), w)
    with torch.no_grad():
        return sdekit.solve(sde.probability_flow(score, t_eps=1e-3), x_T, method="heun", steps=steps).x


def model_samples(model, c, w, x_T, steps):
    sol = model.sample(x_T=x_T.float(), label=c, guidance=w, method="heun", steps=steps)
    return sol.x.double(), sol.stats.nfe


def coupled_mixture() -> sdekit.GaussianMixture:
    """The coupled mixture of tests/test_guidance.py (the known coordinate reweights the components)."""
    covs = torch.tensor([[[0.3, 0.25], [0.25, 0.3]], [[0.3, -0.2], [-0.2, 0.3]], [[0.1, 0.0], [0.0, 0.4]]], dtype=F64)
    return sdekit.GaussianMixture([0.4, 0.35, 0.25], [[-1.0, -1.0], [1.0, -0.5], [0.5, 1.5]], covs)


def inpainting_bias(n: int, runs) -> Dict[str, Any]:
    """Replacement and reconstruction guidance vs the exact posterior (exact scores)."""
    from sdekit.inverse import reconstruction_guidance, replacement_sample

    gm, sde = coupled_mixture(), sdekit.VPSDE()
    mask, y = torch.tensor([True, False]), torch.tensor([0.3, 0.0], dtype=F64)
    post = gm.condition(mask, y[:1])

    def ks(z):
        z = torch.sort(z).values
        cdf = (post.weights * torch.special.ndtr((z[:, None] - post.means[:, 0]) / post.covs[:, 0, 0].sqrt())).sum(1)
        i = torch.arange(1, z.numel() + 1, dtype=F64)
        return float(torch.maximum(i / z.numel() - cdf, cdf - (i - 1) / z.numel()).max())

    def summary(xu):
        return {"mean": float(xu.mean()), "std": float(xu.std()), "mass_above_0.75": float((xu > 0.75).double().mean()),
                "ks": ks(xu)}

    ex = post.sample(20 * n, torch.Generator().manual_seed(0))[:, 0]
    out = {"known_value": 0.3, "exact": dict(summary(ex), ks=0.0, weights=post.weights.tolist()), "rows": []}
    x0 = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(4), dtype=F64)
    for method, steps in runs:
        stochastic = method == "euler_maruyama"
        wrap = (lambda s: sde.reverse(s)) if stochastic else (lambda s: sde.probability_flow(s))
        g = torch.Generator().manual_seed(5)
        x = replacement_sample(wrap(gm.exact_score(sde)), x0, mask, y, method=method, steps=steps, generator=g).x
        out["rows"].append(dict(summary(x[:, 1]), method="replacement", solver=method, steps=steps))
        for var in ("sigma_bar", "pigdm"):
            rg = reconstruction_guidance(gm.exact_score(sde), sde, mask, y, variance=var)
            with torch.no_grad():
                x = sdekit.solve(wrap(rg), x0, method=method, steps=steps, generator=torch.Generator().manual_seed(5)).x
            out["rows"].append(dict(summary(x[:, 1]), method=f"reconstruction ({var})", solver=method, steps=steps,
                                    known_abs_err=float((x[:, 0] - 0.3).abs().mean())))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds: tiny training, 2 classes, few samples (smoke)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 2000; quick 100)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--n", type=int, default=None, help="samples per class and w (default 600; quick 150)")
    p.add_argument("--ws", default=None, help="comma-separated guidance scales (default 0,0.5,1,2,4)")
    p.add_argument("--steps", type=int, default=None, help="heun steps of the w sweep (default 25)")
    p.add_argument("--ref-steps", type=int, default=None, help="heun steps of the exact guided reference (default 100)")
    p.add_argument("--nfe-steps", default=None, help="heun steps of the NFE sweep (default 3,6,12,25,50)")
    p.add_argument("--nfe-ws", default="0,2")
    p.add_argument("--classes", default=None, help="comma-separated classes (default all 6; quick 0,3)")
    p.add_argument("--floor-repeats", type=int, default=5)
    p.add_argument("--n-inpaint", type=int, default=None, help="samples of the inpainting comparison (default 2000; "
                   "quick 200; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "guidance.json"))
    p.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "results", "guidance.png"))
    p.add_argument("--samples-plot", default=os.path.join(ROOT, "benchmarks", "results", "guidance_samples.png"))
    a = p.parse_args(argv)
    q = a.quick
    a.train_steps = a.train_steps or (100 if q else 2000)
    a.n = a.n or (150 if q else 600)
    ws = [float(v) for v in (a.ws or ("0,1,3" if q else "0,0.5,1,2,4")).split(",")]
    a.steps = a.steps or (8 if q else 25)
    a.ref_steps = a.ref_steps or (20 if q else 100)
    nfe_steps = [int(v) for v in (a.nfe_steps or ("3,8" if q else "3,6,12,25,50")).split(",")]
    nfe_ws = [float(v) for v in a.nfe_ws.split(",")]
    torch.set_num_threads(a.threads)

    from diffusion.data import get_dataset

    ds = get_dataset("mixture", split="train", n=20_000 if not q else 4000, seed=a.seed)
    lm = LabelledMixture.from_mixture(ds.mixture)  # label = component, as in the data set
    classes = [int(v) for v in (a.classes or ("0,3" if q else ",".join(map(str, range(lm.num_classes))))).split(",")]
    sde = sdekit.VPSDE()
    info = machine()
    print(f"machine: {info}")
    model, tr = train(a, ds)
    print(f"trained {tr['steps']} steps in {tr['seconds']:.1f} s ({tr['it_s']:.1f} it/s), loss {tr['final_loss']:.4f}")

    g = torch.Generator().manual_seed(a.seed + 1)
    floors = [mmd(lm.class_mixture(classes[0]).sample(a.n, g), lm.class_mixture(classes[0]).sample(a.n, g))
              for _ in range(a.floor_repeats)]
    floor = statistics.median(floors)
    rows: List[Dict[str, Any]] = []
    refs = {}
    for c in classes:
        target = lm.class_mixture(c)
        mean_c = target.mean
        exact_c = target.sample(a.n, torch.Generator().manual_seed(1000 + c))
        for w in sorted(set(ws) | set(nfe_ws)):
            x_T = sde.prior_sample((a.n, 2), generator=torch.Generator().manual_seed(10 * c + 1), dtype=F64)
            ref = exact_guided_samples(lm, sde, c, w, x_T, a.ref_steps)
            x_T2 = sde.prior_sample((a.n, 2), generator=torch.Generator().manual_seed(10 * c + 2), dtype=F64)
            refs[(c, w)] = (ref, x_T2)
            if w not in ws:
                continue
            xs, nfe = model_samples(model, c, w, x_T2, a.steps)
            t0 = torch.full((a.n,), 1e-3, dtype=F64)
            post, post_ref = lm.exact_class_log_posterior(sde)(xs, t0), lm.exact_class_log_posterior(sde)(ref, t0)
            lp, lp_ref = post[:, c], post_ref[:, c]
            rows.append({"class": c, "w": w, "nfe": nfe, "mmd_class": mmd(xs, exact_c), "mmd_guided": mmd(xs, ref),
                         "exact_mmd_class": mmd(ref, exact_c),
                         "share_c": float((post.argmax(1) == c).double().mean()),
                         "exact_share_c": float((post_ref.argmax(1) == c).double().mean()),
                         "log_p_c": float(lp.median()), "exact_log_p_c": float(lp_ref.median()),
                         "spread": float((xs - mean_c).norm(dim=1).mean()),
                         "exact_spread": float((ref - mean_c).norm(dim=1).mean())})
    nfe_rows = []
    for w in nfe_ws:
        for steps in nfe_steps:
            vals, nfe = [], None
            for c in classes:
                ref, x_T2 = refs[(c, w)]
                xs, nfe = model_samples(model, c, w, x_T2, steps)
                vals.append(mmd(xs, ref))
            nfe_rows.append({"w": w, "steps": steps, "nfe": nfe, "mmd_guided_mean": statistics.fmean(vals),
                             "per_class": vals})

    print(f"\n### Guided sampling of a trained class-conditional model (CPU, load {info['load_avg']}; "
          f"{tr['steps']} training steps in {tr['seconds']:.0f} s; heun {a.steps} steps; n = {a.n}; "
          f"MMD floor {floor:.4f})\n")
    print("| class | w | NFE | MMD to class | MMD to exact guided | exact guided: MMD to class | share assigned to c "
          "(exact guided) | spread (exact guided) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['class']} | {r['w']:g} | {r['nfe']} | {r['mmd_class']:.4f} | {r['mmd_guided']:.4f} | "
              f"{r['exact_mmd_class']:.4f} | {r['share_c']:.4f} ({r['exact_share_c']:.4f}) | "
              f"{r['spread']:.3f} ({r['exact_spread']:.3f}) |")
    print("\n| w | heun steps | NFE | mean MMD to exact guided |")
    print("|---|---|---|---|")
    for r in nfe_rows:
        print(f"| {r['w']:g} | {r['steps']} | {r['nfe']} | {r['mmd_guided_mean']:.4f} |")

    n_inp = a.n_inpaint if a.n_inpaint is not None else (200 if q else 2000)
    runs = [("heun", 20)] if q else [("heun", 100), ("euler_maruyama", 400)]
    inpaint = inpainting_bias(n_inp, runs) if n_inp else None
    if inpaint:
        e = inpaint["exact"]
        print(f"\n### Inpainting x_1 given x_0 = 0.3 (exact scores; n = {n_inp})\n")
        print("| method | solver | mean | std | mass above 0.75 | KS to exact |")
        print("|---|---|---|---|---|---|")
        print(f"| exact posterior | - | {e['mean']:.3f} | {e['std']:.3f} | {e['mass_above_0.75']:.3f} | 0 |")
        for r in inpaint["rows"]:
            print(f"| {r['method']} | {r['solver']} {r['steps']} | {r['mean']:.3f} | {r['std']:.3f} | "
                  f"{r['mass_above_0.75']:.3f} | {r['ks']:.3f} |")

    payload = {"machine": info, "quick": q, "inpainting": inpaint, "train": tr, "sde": repr(sde), "n": a.n,
               "steps": a.steps,
               "ref_steps": a.ref_steps, "classes": classes, "ws": ws, "mmd_floor": floor, "mmd_floor_repeats": floors,
               "rows": rows, "nfe_rows": nfe_rows}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {a.out}")
    if a.plot or a.samples_plot:
        plot(a, payload, lm, sde, model, classes, ws)
    return payload


def plot(a, payload, lm, sde, model, classes, ws):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, nfe_rows, floor = payload["rows"], payload["nfe_rows"], payload["mmd_floor"]
    if a.plot:
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
        for c in classes:
            rc = [r for r in rows if r["class"] == c]
            ax[0].plot([r["w"] for r in rc], [r["mmd_guided"] for r in rc], "o-", label=f"class {c}")
            ax[1].plot([r["w"] for r in rc], [r["share_c"] for r in rc], "o-", label=f"class {c} (model)")
            ax[1].plot([r["w"] for r in rc], [r["exact_share_c"] for r in rc], "k:", lw=0.8)
        ax[0].axhline(floor, color="gray", ls="--", label="MMD floor")
        ax[0].set(xlabel="guidance scale w", ylabel="MMD to exact guided samples", yscale="log",
                  title="model error vs w")
        ax[1].set(xlabel="guidance scale w", ylabel="share of samples classified as c",
                  title="class share (dotted: exact guided)")
        for w in sorted({r["w"] for r in nfe_rows}):
            rw = [r for r in nfe_rows if r["w"] == w]
            ax[2].plot([r["nfe"] for r in rw], [r["mmd_guided_mean"] for r in rw], "o-", label=f"w = {w:g}")
        ax[2].axhline(floor, color="gray", ls="--")
        ax[2].set(xlabel="NFE (network evaluations)", ylabel="mean MMD to exact guided", xscale="log", yscale="log",
                  title="vs NFE (heun)")
        for x in ax:
            x.legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
        fig.savefig(a.plot, dpi=90)
        print(f"wrote {a.plot}")
    if a.samples_plot:
        show = [w for w in ws if w in (0.0, 1.0, 4.0)] or ws[:3]
        fig, ax = plt.subplots(2, len(show), figsize=(3.0 * len(show), 6.0), squeeze=False)
        n = 300
        for j, w in enumerate(show):
            for c in range(lm.num_classes):
                x_T = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(77 + c), dtype=F64)
                ex = exact_guided_samples(lm, sde, c, w, x_T, a.ref_steps)
                xs, _ = model_samples(model, c, w, x_T, a.steps)
                ax[0, j].scatter(ex[:, 0], ex[:, 1], s=1.5, alpha=0.6)
                ax[1, j].scatter(xs[:, 0], xs[:, 1], s=1.5, alpha=0.6)
            ax[0, j].set_title(f"exact guided score, w = {w:g}", fontsize=9)
            ax[1, j].set_title(f"trained model (CFG), w = {w:g}", fontsize=9)
            for i in range(2):
                ax[i, j].set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", xticks=[], yticks=[])
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(a.samples_plot)), exist_ok=True)
        fig.savefig(a.samples_plot, dpi=70)
        print(f"wrote {a.samples_plot}")


if __name__ == "__main__":
    main()
