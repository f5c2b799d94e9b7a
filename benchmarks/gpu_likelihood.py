"""GPU likelihood benchmark (issue: likelihood through the PF ODE, item 7).

A U-Net-sized score network (benchmarks/_unet.py, 11.8M parameters) on 3x32x32 data at batch
128, VP SDE, dopri5 at rtol = atol = 1e-5, one Rademacher probe — the *same* probe vectors for
every variant, so bits/dim can be compared sample by sample:

* ``plain``: the classic recipe — ``torchdiffeq.odeint`` on (x, logp) with a function doing one
  forward pass with a graph and one ``torch.autograd.grad`` VJP, float32, eager.
* ``sdekit``: ``sdekit.likelihood.log_likelihood`` with the same network, float32, eager.
* ``sdekit+bf16``: bfloat16 autocast inside the network call only (the rest of the score and
  the ODE stay float32/float64), channels-last memory format, eager.
* ``sdekit+cudagraph``: the network's forward and backward captured as CUDA graphs
  (``torch.cuda.make_graphed_callables``, float32) — for a network bound by kernel launches.
* ``sdekit+compile``: the network wrapped in ``torch.compile``.
* ``sdekit+compile+bf16`` / ``+fp16``: compiled and autocast.

The score is a stand-in for a trained model with a realistic cost: an epsilon-prediction
``eps = sigma x / v(t) + 0.05 sigma U(x, t)`` (v = m^2 s_d^2 + sigma^2, the exact Gaussian part,
plus the randomly initialised U-Net), score = -eps / sigma. Data: N(0, s_d^2) images.
Reported: wall seconds per batch (median of ``--repeats`` after a warm-up), samples/s, NFE,
mean bits/dim (continuous: -log p / (d ln 2)), max |Δ bpd| vs ``plain`` per sample, and the
share of time spent in the network (a standalone forward + VJP timing x NFE / wall).

Usage: ``python benchmarks/gpu_likelihood.py [--quick] [--out FILE]`` (``--quick``: tiny network,
CPU ok, for a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchdiffeq  # noqa: E402  (benchmarks may call the backend directly: it is the baseline)

import sdekit  # noqa: E402
from sdekit.likelihood import log_likelihood  # noqa: E402
from sdekit.likelihood.divergence import draw_probes  # noqa: E402
from _unet import UNet  # noqa: E402

S_D = 0.5
T_EPS = 1e-5


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_score(sde, net_call, dev):
    k = sde.kernel

    def score(x, t):
        t64 = t.to(torch.float64)
        m, s = k.m(t64), k.sigma(t64)
        v = (m * m * S_D ** 2 + s * s).to(x.dtype).reshape(-1, 1, 1, 1)
        s = s.to(x.dtype).reshape(-1, 1, 1, 1)
        return -x / v - 0.05 * net_call(x, t).to(x.dtype)

    return score


def plain_recipe(sde, score, x, probe, rtol, atol):
    """The classic torchdiffeq + autograd recipe (one VJP per evaluation), float32."""
    k = sde.kernel
    calls = [0]

    def func(t, state):
        xt, _ = state
        calls[0] += 1
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            tb = t.expand(xt.shape[0]).to(xt.dtype)
            t64 = t.to(torch.float64)
            f, g2 = float(k.f(t64)), float(k.g2(t64))
            v = f * xt - 0.5 * g2 * score(xt, tb)
            (vjp,) = torch.autograd.grad(v, xt, probe)
        return v.detach(), (vjp * probe).flatten(1).sum(1)

    ts = torch.tensor([T_EPS, sde.T], dtype=torch.float32, device=x.device)
    xs, ds = torchdiffeq.odeint(func, (x, torch.zeros(x.shape[0], device=x.device)), ts, method="dopri5",
                                rtol=rtol, atol=atol)
    z, delta = xs[-1], ds[-1]
    logp = sde.prior_log_prob(z).to(torch.float64) + delta.to(torch.float64)
    return logp, calls[0]


def timed(fn, repeats, dev):
    out = fn()  # warm-up (and compilation)
    sync(dev)
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--variants",
                    default="plain,sdekit,sdekit+bf16,sdekit+compile+bf16,sdekit+compile,sdekit+compile+fp16")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_likelihood.json"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        args.batch, args.tol, args.repeats = 4, 1e-3, 1
        args.variants = "plain,sdekit"
    torch.manual_seed(0)
    net = UNet(ch=32, nres=1) if args.quick else UNet()
    net = net.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in net.parameters())
    sde = sdekit.VPSDE()
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (S_D * torch.randn(args.batch, 3, 32, 32, generator=g)).to(dev)
    probe = draw_probes(x.shape, 1, "rademacher", generator=torch.Generator().manual_seed(2)).to(dev)
    d = x[0].numel()
    results = {"machine": {"device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
                           "torch": torch.__version__, "python": platform.python_version()},
               "config": {"batch": args.batch, "tol": args.tol, "t_eps": T_EPS, "params_M": n_params / 1e6,
                          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                          "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
               "variants": {}}
    print(f"device {results['machine']['device']}, torch {torch.__version__}, net {n_params / 1e6:.2f}M params, "
          f"batch {args.batch}, tol {args.tol}", flush=True)

    def net_eager(x, t):
        return net(x, t)

    compiled = {}

    def net_variant(name):
        if "cudagraph" in name:
            # fp32 forward + backward captured as CUDA graphs for the batch shape; other shapes
            # (log_likelihood's one-sample differentiability probe) run eagerly
            static_x = x.detach().clone().requires_grad_(True)
            static_t = torch.full((args.batch,), 0.5, device=dev)
            # make_graphed_callables replaces a module's forward in place: graph a copy
            graphed = torch.cuda.make_graphed_callables(copy.deepcopy(net), (static_x, static_t))

            def call(xx, tt):
                if xx.shape == static_x.shape and xx.requires_grad and xx.dtype == static_x.dtype:
                    return graphed(xx, tt.to(static_t.dtype))
                return net(xx, tt)

            return call
        amp = torch.bfloat16 if "bf16" in name else torch.float16 if "fp16" in name else None
        if "compile" not in name and amp is None:
            return net_eager
        if "compile" in name:
            key = "cl" if amp else "plain"
            if key not in compiled:
                mdl = net.to(memory_format=torch.channels_last) if amp else net
                compiled[key] = torch.compile(mdl)
            cnet = compiled[key]
        else:
            cnet = net.to(memory_format=torch.channels_last)

        def call(x, t):
            if amp is None:
                return cnet(x, t)
            with torch.autocast("cuda", dtype=amp):
                return cnet(x.contiguous(memory_format=torch.channels_last), t)

        return call

    # standalone network cost: forward + one VJP at batch B (the work of one evaluation)
    def net_cost(call):
        t = torch.full((args.batch,), 0.5, device=dev)

        def one():
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                out = call(xr, t).float()
                torch.autograd.grad(out, xr, probe[0])
        for _ in range(3):
            one()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(10):
            one()
        sync(dev)
        return (time.perf_counter() - t0) / 10

    base_bpd = None
    for name in args.variants.split(","):
        call = net_variant(name)
        score = make_score(sde, call, dev)
        try:
            if name == "plain":
                (logp, nfe), wall, times = timed(lambda: plain_recipe(sde, score, x, probe[0], args.tol, args.tol),
                                                 args.repeats, dev)
            else:
                def run():
                    r = log_likelihood(sde, score, x, t_eps=T_EPS, rtol=args.tol, atol=args.tol,
                                       divergence="hutchinson", n_probes=1,
                                       generator=torch.Generator().manual_seed(2))
                    return r.log_prob, r.stats.nfe
                (logp, nfe), wall, times = timed(run, args.repeats, dev)
        except Exception as e:  # report and go on: one failing variant must not hide the others
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            results["variants"][name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        bpd = (-logp / (d * math.log(2))).cpu()
        if base_bpd is None:
            base_bpd = bpd
        cost = net_cost(call)
        row = {"wall_s": wall, "times": times, "samples_per_s": args.batch / wall, "nfe": int(nfe),
               "ms_per_nfe": 1e3 * wall / nfe, "bpd_mean": float(bpd.mean()),
               "max_abs_dbpd_vs_plain": float((bpd - base_bpd).abs().max()),
               "mean_dbpd_vs_plain": float((bpd - base_bpd).mean()),
               "net_fwd_vjp_ms": 1e3 * cost, "net_share": min(1.0, cost * nfe / wall)}
        results["variants"][name] = row
        _write(args.out, results)  # after every variant: a run cut short keeps what it measured
        print(f"{name}: {wall:.3f} s/batch, {row['samples_per_s']:.1f} samples/s, nfe {nfe}, "
              f"{row['ms_per_nfe']:.2f} ms/nfe, bpd {row['bpd_mean']:.4f}, max|dbpd| {row['max_abs_dbpd_vs_plain']:.2e}, "
              f"net fwd+vjp {row['net_fwd_vjp_ms']:.2f} ms ({100 * row['net_share']:.0f}% of wall)", flush=True)

    base = results["variants"].get("plain", {})
    lines = ["| variant | s/batch | samples/s | speed-up vs plain | NFE | ms/NFE | mean bpd | max abs dbpd | net share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["variants"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:60]} | | | | | | | |")
            continue
        sp = base.get("wall_s", float("nan")) / r["wall_s"]
        lines.append(f"| {name} | {r['wall_s']:.3f} | {r['samples_per_s']:.1f} | {sp:.2f}x | {r['nfe']} | "
                     f"{r['ms_per_nfe']:.2f} | {r['bpd_mean']:.4f} | {r['max_abs_dbpd_vs_plain']:.1e} | "
                     f"{100 * r['net_share']:.0f}% |")
    table = "\n".join(lines)
    print(table)
    results["table"] = table
    _write(args.out, results)


def _write(path, results):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
