r"""The quickstart: train a score network, sample it with many samplers, score everything against
the exact answer, and draw the pictures.

On the 2-D Gaussian mixture (``--data mixture``, the default) the data law $p_0$ is known exactly,
so every number has a ground truth:

1. **Train** a 3×128 residual MLP ($\hat\varepsilon$ prediction) on the VP SDE
   ($\beta \in [0.1, 20]$) with the likelihood-weighted DSM loss and stratified importance-sampled
   $t$ (the recipe of the training benchmark), AdamW with warm-up and cosine decay, EMA.
2. **Sample** the EMA model with six samplers of `sdekit.solve`: Euler–Maruyama and
   predictor–corrector on the reverse SDE, DDIM ($\eta = 0$) and DPM-Solver++(2M) on the PF ODE,
   adaptive dopri5 on the PF ODE, and torchsde's adaptive Euler on the reverse SDE — all from
   the same prior draws $x_T$ and down to the same $t_\varepsilon$.
3. **Score** each sampler by the MMD between its samples and exact samples of
   $p_{t_\varepsilon}$ (`sdekit.GaussianMixture.push`), next to the MMD's two-sample floor: the
   distribution of the same statistic between two independent exact sample sets of the same
   size. A sampler whose MMD lies below the floor's 95% quantile cannot be told from exact
   sampling at this sample size (verdict ``at floor``; 5% false-alarm rate per sampler if its
   samples were exact); above it, the table gives the ratio to the floor's median.
4. **Likelihood**: the model's $-\log p^\theta_{t_\varepsilon}(x)$ on held-out points by the
   PF ODE with exact divergence, next to the exact $-\log p_{t_\varepsilon}(x)$, and the paired
   gap in nats per dimension with its standard error over the points. Verdict ``pass`` when the
   gap is below `NLL_GAP_TARGET` nats/dim.
5. **Plots** in the output folder: ``samples.png`` (each sampler over the density contours),
   ``trajectories.png`` (PF-ODE and reverse-SDE paths), ``loss.png`` (the training loss),
   ``error_vs_nfe.png`` (MMD vs NFE for every sampler with the floor band and the model's own
   converged level; flow-map error vs NFE of the deterministic samplers against a tight solve
   of the same model), plus ``results.json``, ``samples.npz`` and the model checkpoint.

``--data digits`` trains the tiny U-Net on the 8×8 digits that ship with scikit-learn, writes a
sample grid and the test-set bits/dim (PF ODE, Hutchinson divergence).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

import sdekit
from sdekit.studies import mmd, noise_floor

from . import plots
from .data import get_dataset
from .losses import DSMLoss
from .model import ScoreModel
from .nets import MLPScoreNet, UNet
from .train import TrainConfig, Trainer

__all__ = ["run_quickstart", "NLL_GAP_TARGET", "SAMPLERS", "FLOOR_QUANTILE"]

F64 = torch.float64

#: Pass mark of the quickstart's likelihood check, in nats per dimension: the mean of
#: $\log p_{t_\varepsilon}(x) - \log p^\theta_{t_\varepsilon}(x)$ over held-out points. The
#: training benchmark reaches 0.012 in 2 minutes; the quickstart trains for about a minute.
NLL_GAP_TARGET = 0.05

#: Quantile of the two-sample MMD floor below which a sampler is "at floor" (false-alarm rate
#: $1 - q$ per sampler when its samples are exact).
FLOOR_QUANTILE = 0.95

#: The samplers: (label, sdekit method, budget kind, default budget, budgets of the NFE sweep, options).
SAMPLERS: Tuple[Tuple[str, str, str, float, Tuple[float, ...], Dict[str, Any]], ...] = (
    ("Euler-Maruyama (SDE)", "euler_maruyama", "steps", 200, (25, 50, 100, 200), {}),
    ("predictor-corrector (SDE)", "pc", "steps", 100, (25, 50, 100), {}),
    ("DDIM eta=0 (ODE)", "ddim", "steps", 50, (5, 10, 20, 50), {}),
    ("DPM-Solver++(2M) (ODE)", "dpmpp_2m", "steps", 20, (5, 10, 20, 40), {}),
    ("dopri5 adaptive (ODE)", "dopri5", "tol", 1e-5, (1e-2, 1e-3, 1e-4, 1e-5), {}),
    ("torchsde euler adaptive (SDE)", "torchsde:euler", "tol", 1e-2, (1e-1, 1e-2), {"adaptive": True,
                                                                                           "dt": 1e-2}),
)

# the mixture's data live within radius ~3 of the origin (means on the circle of radius 2)
_PLOT_LIM = 3.2


def _say(log: Callable[[str], None], msg: str) -> None:
    log(msg)


def _sampler_kwargs(kind: str, budget: float, opts: Dict[str, Any]) -> Dict[str, Any]:
    kw = dict(opts)
    if kind == "steps":
        kw["steps"] = int(budget)
    else:
        kw["rtol"] = kw["atol"] = float(budget)
    return kw


def _machine() -> Dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **{k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                                for k, v in arrays.items()})
    os.replace(tmp, path)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _train(model: ScoreModel, train_set, loss, cfg: TrainConfig, out: Path, log) -> Tuple[Trainer, float]:
    trainer = Trainer(model, train_set, loss, cfg, out_dir=out / "train")
    t0 = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# the 2-D mixture
# ------------------------------------------------------------------------------------------------
def _quickstart_mixture(out: Path, device: torch.device, quick: bool, seed: int, steps: Optional[int],
                        log) -> Dict[str, Any]:
    t_all = time.perf_counter()
    sde = sdekit.VPSDE(0.1, 20.0)
    t_lik = sdekit.LIKELIHOOD_T_EPS
    t_samp = sdekit.SAMPLING_T_EPS
    n_train = 4000 if quick else 100_000
    train_set = get_dataset("mixture", n=n_train, seed=seed)
    mixture = train_set.mixture
    steps = steps if steps is not None else (150 if quick else 2000)
    n_samples = 256 if quick else 2000
    n_nll = 64 if quick else 500
    floor_repeats = 5 if quick else 20

    net = MLPScoreNet(2, width=128, depth=3)
    model = ScoreModel(net, sde, predict="eps", t_eps=t_samp)
    loss = DSMLoss(weighting="likelihood", time_sampling="importance_stratified", t_eps=t_lik)
    cfg = TrainConfig(steps=steps, batch_size=512, lr=2e-3, warmup=max(1, steps // 50), ema_decay=0.999,
                      grad_clip=1.0, seed=seed, log_every=max(1, steps // 20), ckpt_every=0, device=str(device),
                      progress=True)
    _say(log, f"[1/4] training a 3x128 MLP (eps prediction) on the 2-D Gaussian mixture, VP SDE, "
              f"{steps} steps of batch 512 on {device} ...")
    trainer, train_s = _train(model, train_set, loss, cfg, out, log)
    ema = trainer.ema_model
    ema.save(out / "model")
    _write_json(out / "run.json", {"data": "mixture", "data_options": {"seed": seed}, "command": "quickstart"})
    losses = trainer.history["loss"]
    plots.loss_curve(losses, out / "loss.png", ylabel="DSM loss (likelihood weighting)")
    _say(log, f"      {steps} steps in {train_s:.1f} s ({steps / train_s:.0f} it/s); final loss "
              f"{sum(losses[-50:]) / len(losses[-50:]):.3f} (mean of the last 50 steps)")

    # ---- exact references --------------------------------------------------------------------
    p_samp = mixture.push(sde, t_samp)
    gen = torch.Generator().manual_seed(seed + 1)
    x_T = sde.prior_sample((n_samples, 2), generator=gen, dtype=torch.float32)
    exact = p_samp.sample(n_samples, generator=gen, dtype=torch.float32)
    floor_vals = noise_floor(lambda n, g: p_samp.sample(n, generator=g), n_samples, repeats=floor_repeats,
                             stat=mmd, seed=seed + 2)
    floor_med = float(floor_vals.median())
    floor_q = float(torch.quantile(floor_vals, FLOOR_QUANTILE))

    def verdict(m: float) -> str:
        return "at floor" if m <= floor_q else f"{m / floor_med:.1f}x floor"

    # ---- samplers ------------------------------------------------------------------------------
    _say(log, f"[2/4] sampling {n_samples} points with {len(SAMPLERS)} samplers from the same x_T ...")
    x_dev = x_T.to(device)
    rows, samples, curves, flow_curves, results = [], {}, {}, {}, []
    # the model's own converged samples: a tight adaptive PF-ODE solve (no solver error to speak of)
    ema64 = _as_float64(ema)
    ref_tol = 1e-5 if quick else 1e-7
    ref_sol = ema64.sample(x_T=x_T.double().to(device), method="dopri5", rtol=ref_tol, atol=ref_tol)
    ref = ref_sol.x.float().cpu()
    model_level = mmd(ref, exact)
    for label, method, kind, budget, sweep, opts in SAMPLERS:
        budgets = sorted(set(sweep) | {budget}, reverse=(kind == "tol"))
        if quick:
            budgets = [budget]
        pts, fpts = [], []
        for b in budgets:
            g = torch.Generator(device=device).manual_seed(seed + 3)
            t0 = time.perf_counter()
            sol = ema.sample(x_T=x_dev, method=method, generator=g, **_sampler_kwargs(kind, b, opts))
            secs = time.perf_counter() - t0
            x = sol.x.float().cpu()
            if not torch.isfinite(x).all():
                raise RuntimeError(f"sampler {method} produced non-finite samples at budget {b}")
            m = mmd(x, exact)
            pts.append((float(sol.stats.nfe), m))
            stochastic = kind == "tol" and method.startswith("torchsde") or method in ("euler_maruyama", "pc")
            if not stochastic:
                fpts.append((float(sol.stats.nfe), float((x - ref).norm(dim=1).median())))
            if b == budget:
                samples[label] = x
                rec = {"sampler": label, "method": method, kind: b, "nfe": int(sol.stats.nfe), "seconds": secs,
                       "mmd": m, "mmd_over_floor": m / floor_med, "verdict": verdict(m)}
                results.append(rec)
                budget_s = f"{int(b)} steps" if kind == "steps" else f"tol {b:g}"
                rows.append([label, budget_s, str(int(sol.stats.nfe)), f"{secs:.2f}", f"{m:.4f}", rec["verdict"]])
        curves[label] = pts
        if fpts:
            flow_curves[label] = fpts

    # ---- likelihood ----------------------------------------------------------------------------
    lik_tol = 1e-3 if quick else 1e-5
    _say(log, f"[3/4] log-likelihood of {n_nll} held-out points by the PF ODE (exact divergence, dopri5, "
              f"rtol = atol = {lik_tol:g}) against the exact density ...")
    held = get_dataset("mixture", split="test", n=n_nll, seed=seed).data
    t0 = time.perf_counter()
    res = ema.log_likelihood(held.to(device), t_eps=t_lik, rtol=lik_tol, atol=lik_tol, divergence="exact")
    nll_s = time.perf_counter() - t0
    model_lp = res.log_prob.to(F64).cpu()
    exact_lp = mixture.push(sde, t_lik).log_prob(held.to(F64))
    gap = (exact_lp - model_lp) / 2
    se = lambda v: float(v.std() / math.sqrt(v.numel()))  # noqa: E731
    nll = {"model_nll_nats": float(-model_lp.mean()), "model_nll_se": se(model_lp),
           "exact_nll_nats": float(-exact_lp.mean()), "exact_nll_se": se(exact_lp),
           "gap_nats_per_dim": float(gap.mean()), "gap_se": se(gap), "nfe": int(res.stats.nfe), "seconds": nll_s,
           "bits_per_dim_model": float(-model_lp.mean()) / (2 * math.log(2)),
           "bits_per_dim_exact": float(-exact_lp.mean()) / (2 * math.log(2)),
           "target_gap": NLL_GAP_TARGET,
           "verdict": "pass" if float(gap.mean()) <= NLL_GAP_TARGET else "fail"}

    # ---- plots -----------------------------------------------------------------------------------
    _say(log, "[4/4] plots ...")
    grid = plots.density_grid(p_samp.log_prob, _PLOT_LIM)
    panels = [("exact samples of $p_{t_\\varepsilon}$", exact)] + [(k, v) for k, v in samples.items()]
    plots.scatter_over_density(panels, out / "samples.png", grid=grid, lim=_PLOT_LIM)
    n_paths = 10
    xs_T = x_T[:n_paths].to(device)
    # save points log-spaced in t: the paths move most near t_eps
    save = torch.logspace(math.log10(sde.T), math.log10(t_samp), 80, dtype=F64)
    pf = ema.sample(x_T=xs_T, method="dopri5", rtol=1e-5, atol=1e-5, save_at=save)
    em_grid = torch.linspace(sde.T, t_samp, 201, dtype=F64)
    em = ema.sample(x_T=xs_T[:4], method="euler_maruyama", grid=em_grid, save_at=em_grid,
                    generator=torch.Generator(device=device).manual_seed(seed + 4))
    plots.trajectories_plot([("probability-flow ODE (dopri5)", pf.ts, pf.xs.cpu()),
                             ("reverse SDE (Euler-Maruyama, 200 steps)", em.ts, em.xs.cpu())],
                            out / "trajectories.png", grid=grid, lim=_PLOT_LIM)
    plots.error_vs_nfe(curves, out / "error_vs_nfe.png", floor=(floor_med, floor_q), model_level=model_level,
                       flow_curves=flow_curves)
    _save_npz(out / "samples.npz", x_T=x_T, exact=exact, reference=ref,
              **{m: samples[l] for l, m, *_ in SAMPLERS if l in samples})

    total_s = time.perf_counter() - t_all
    summary = {"data": "mixture", "quick": quick, "device": str(device), "seed": seed, "machine": _machine(),
               "train": {"steps": steps, "seconds": train_s, "it_s": steps / train_s,
                         "final_loss": sum(losses[-50:]) / len(losses[-50:])},
               "n_samples": n_samples, "mmd_floor_median": floor_med, "mmd_floor_q95": floor_q,
               "model_level_mmd": model_level, "samplers": results, "curves": curves, "flow_curves": flow_curves,
               "nll": nll, "total_seconds": total_s}
    _write_json(out / "results.json", summary)

    # ---- the report --------------------------------------------------------------------------------
    header = ["sampler", "budget", "NFE", "seconds", "MMD", "verdict"]
    lines = [
        "",
        f"Samples: MMD to {n_samples} exact samples of p_t_eps (t_eps = {t_samp:g}); two-sample floor: median "
        f"{floor_med:.4f}, {int(FLOOR_QUANTILE * 100)}% quantile {floor_q:.4f} ({floor_repeats} exact-vs-exact pairs).",
        f"The model's own converged sampler (dopri5, tol {ref_tol:g}) has MMD {model_level:.4f} "
        f"({'at floor' if model_level <= floor_q else f'{model_level / floor_med:.1f}x floor'}): no sampler can "
        f"do better than the model.",
        "",
        _table(rows, header),
        "",
        f"Likelihood of {n_nll} held-out points (nats per sample, t_eps = {t_lik:g}):",
        f"  model NLL {nll['model_nll_nats']:.4f} +- {nll['model_nll_se']:.4f}   exact NLL "
        f"{nll['exact_nll_nats']:.4f} +- {nll['exact_nll_se']:.4f}   ({nll['nfe']} NFE, {nll_s:.1f} s)",
        f"  gap {nll['gap_nats_per_dim']:.4f} +- {nll['gap_se']:.4f} nats/dim (target <= {NLL_GAP_TARGET}): "
        f"{nll['verdict']}",
        "",
        f"Wrote {out}/: samples.png, trajectories.png, loss.png, error_vs_nfe.png, results.json, samples.npz, "
        f"model/ (checkpoint: python -m diffusion sample --checkpoint {out})",
        f"Total {total_s:.0f} s.",
    ]
    _say(log, "\n".join(lines))
    return summary


def _as_float64(model: ScoreModel) -> ScoreModel:
    """A float64 copy of ``model`` for tight reference solves (float32 rounding would floor them)."""
    import copy

    m64 = copy.deepcopy(model).to(F64)
    m64.eval()
    return m64


# ------------------------------------------------------------------------------------------------
# 8x8 digits
# ------------------------------------------------------------------------------------------------
def _quickstart_digits(out: Path, device: torch.device, quick: bool, seed: int, steps: Optional[int],
                       log) -> Dict[str, Any]:
    t_all = time.perf_counter()
    sde = sdekit.VPSDE(0.1, 20.0)
    train_set = get_dataset("digits", split="train", seed=seed)
    test_set = get_dataset("digits", split="test", seed=seed)
    steps = steps if steps is not None else (20 if quick else 3000)
    batch = 32 if quick else 128
    net = UNet.tiny(in_channels=1, image_size=8)
    model = ScoreModel(net, sde, predict="eps", t_eps=sdekit.SAMPLING_T_EPS)
    loss = DSMLoss(weighting="simple", time_sampling="uniform", t_eps=sdekit.LIKELIHOOD_T_EPS)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup=max(1, steps // 50), ema_decay=0.999,
                      seed=seed, log_every=max(1, steps // 20), ckpt_every=max(1, steps // 4), device=str(device),
                      progress=True)
    _say(log, f"[1/3] training the tiny U-Net on {len(train_set)} 8x8 digits, {steps} steps of batch {batch} "
              f"on {device} ...")
    trainer, train_s = _train(model, train_set, loss, cfg, out, log)
    ema = trainer.ema_model
    ema.save(out / "model")
    _write_json(out / "run.json", {"data": "digits", "data_options": {"seed": seed}, "command": "quickstart"})
    plots.loss_curve(trainer.history["loss"], out / "loss.png", ylabel="DSM loss (eps, simple weighting)")
    _say(log, f"      {steps} steps in {train_s:.1f} s ({steps / train_s:.1f} it/s)")

    _say(log, "[2/3] sampling 64 digits (DPM-Solver++(2M), 20 steps, denoised at t_eps) ...")
    g = torch.Generator(device=device).manual_seed(seed + 1)
    t0 = time.perf_counter()
    sol = ema.sample(64, method="dpmpp_2m", steps=20, generator=g, denoise=True)
    samp_s = time.perf_counter() - t0
    x = sol.x.float().cpu()
    plots.image_grid(x, out / "samples.png", nrow=8, title=f"{steps} training steps, DPM-Solver++(2M) 20 steps")
    plots.image_grid(test_set.data[:64], out / "data.png", nrow=8, title="held-out digits")
    _save_npz(out / "samples.npz", x=x)

    n_nll = 16 if quick else 256
    _say(log, f"[3/3] bits/dim of {n_nll} held-out digits (PF ODE, Hutchinson divergence, 1 probe, "
              f"rtol = atol = 1e-4, uniform dequantization) ...")
    xq = test_set.data[:n_nll].to(device)
    t0 = time.perf_counter()
    bpd = ema.bits_per_dim(xq, test_set.transform, dequantization=test_set.dequantization, rtol=1e-4, atol=1e-4,
                           divergence="hutchinson", generator=torch.Generator(device=device).manual_seed(seed + 2),
                           t_eps=sdekit.LIKELIHOOD_T_EPS)
    nll_s = time.perf_counter() - t0
    bpd = bpd.to(F64).cpu()
    total_s = time.perf_counter() - t_all
    summary = {"data": "digits", "quick": quick, "device": str(device), "seed": seed, "machine": _machine(),
               "train": {"steps": steps, "seconds": train_s, "it_s": steps / train_s},
               "sample": {"method": "dpmpp_2m", "steps": 20, "nfe": int(sol.stats.nfe), "seconds": samp_s},
               "bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / math.sqrt(bpd.numel())),
               "nll_seconds": nll_s, "total_seconds": total_s}
    _write_json(out / "results.json", summary)
    _say(log, "\n".join([
        "",
        f"bits/dim on {n_nll} held-out digits: {summary['bits_per_dim']:.3f} +- {summary['bits_per_dim_se']:.3f} "
        f"(uniform data over 17 levels would be log2(17) = {math.log2(17):.3f})",
        f"Wrote {out}/: samples.png (look at it), data.png, loss.png, results.json, samples.npz, model/",
        f"Total {total_s:.0f} s.",
    ]))
    return summary


def run_quickstart(out, data: str = "mixture", device: str = "cpu", quick: bool = False, seed: int = 0,
                   steps: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the quickstart into the folder ``out`` and return its summary (also ``out/results.json``).

    Parameters
    ----------
    out:
        Output folder (created; must be writable).
    data:
        ``"mixture"`` (2-D Gaussian mixture with its exact density) or ``"digits"`` (8×8 images).
    device:
        A torch device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    quick:
        A seconds-long smoke run of the same pipeline (for CI): fewer steps, samples and budgets.
    seed:
        Seed of the data, the training run and the sampling noise.
    steps:
        Training steps (default 2000 for the mixture, 3000 for digits; 150 / 20 with ``quick``).
    log:
        Where the progress lines and the final report go.
    """
    if data not in ("mixture", "digits"):
        raise ValueError(f"data must be 'mixture' or 'digits', got {data!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    run = _quickstart_mixture if data == "mixture" else _quickstart_digits
    return run(out, dev, quick, seed, steps, log)
