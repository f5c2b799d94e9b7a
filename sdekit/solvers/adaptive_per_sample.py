r"""Per-sample adaptive stepping: every sample of a batch is its own initial-value problem.

`integrate_adaptive` with ``norm="independent"`` runs this loop. It is the shared-step
integrator's algorithm (same tableaus, error ratio, controller, initial-step heuristic and
step-shortening at stops, see `sdekit.solvers.adaptive`) applied to each sample separately:

* sample $i$ has its own time $t_i$, step $h_i$ and error ratio
  $r_i = \max_{\text{components}} \mathrm{RMS}(\hat e_i / \mathrm{sc}_i)$ over its own columns;
  it accepts or rejects on $r_i \le 1$ alone and stops when $t_i$ reaches ``t_end``;
* every iteration attempts one step for every sample still running (one batched evaluation per
  stage of the samples still running, called with a ``(n,)`` tensor of their stage times);
* a sample that reached ``t_end`` leaves the batch: the running set is compacted (its rows are
  dropped from the state, the stage buffer and the controller state), so it costs no further
  evaluations and no arithmetic. Measured against masking (keep the full arrays, evaluate the
  running rows only) in ``docs/solvers.md``.

Because no quantity couples two samples, a sample's path — its steps, its NFE, its result — is
the same whatever else is in the batch (up to the last bits of batched BLAS kernels; tested to
1e-12 in float64). Per sample, NFE is $2 + s\,(\text{accepted} + \text{rejected})$ as for the
shared step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch

from .stats import SolverError, SolverStats

__all__ = ["integrate_per_sample"]

F64 = torch.float64


def _row_ratio(r: torch.Tensor, blocks) -> torch.Tensor:
    """Per-row error ratio: RMS over each column block, then the max over blocks: ``(n,)``
    (columns past the last block, outside ``error_columns``, are not controlled)."""
    end = blocks[-1][1]
    r2 = (r if end == r.shape[1] else r[:, :end]).square()
    if len(blocks) == 1:
        return r2.mean(1).sqrt()
    return torch.stack([r2[:, a:b].mean(1) for a, b in blocks], 1).amax(1).sqrt()


def _initial_steps(call, y0: torch.Tensor, t0: float, t1: float, order: int, rtol: float, atol: float,
                   blocks) -> Tuple[torch.Tensor, torch.Tensor]:
    """The shared-step `initial_step` heuristic, per sample: ``(h (n,), f0)``; two evaluations."""
    n = y0.shape[0]
    direction = 1.0 if t1 > t0 else -1.0
    length = abs(t1 - t0)
    dev = y0.device
    f0 = call(torch.full((n,), t0, dtype=F64, device=dev), y0)
    scale = y0.abs().mul(rtol).add_(atol)
    d0 = _row_ratio(y0 / scale, blocks)
    d1 = _row_ratio(f0 / scale, blocks)
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(tiny, torch.full_like(d0, 1e-6), 0.01 * d0 / d1).abs().clamp_(max=length)
    y1 = torch.addcmul(y0, (direction * h0).to(y0.dtype).unsqueeze(1), f0)
    f1 = call(t0 + direction * h0.to(F64), y1)
    d2 = _row_ratio((f1 - f0) / scale, blocks) / h0
    flat = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(flat, torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / torch.maximum(d1, d2)) ** (1.0 / float(order)))
    first = torch.minimum(torch.minimum(100.0 * h0, h1), torch.full_like(h0, length))
    bad = ~torch.isfinite(first) | (first <= 0.0)
    first = torch.where(bad, torch.full_like(first, length * 1e-3), first)
    return first.to(F64), f0


def integrate_per_sample(func: Callable, y0: torch.Tensor, cfg, *, sample_index: bool = False,
                         compact: bool = True) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The per-sample stepping loop of `integrate_adaptive` (``norm="independent"``).

    ``cfg`` is `integrate_adaptive`'s validated configuration. ``func(t, y)`` (or
    ``func(t, y, index)`` with ``sample_index=True``) receives the running samples only: ``t`` a
    ``(n,)`` float64 tensor of their times, ``y`` their ``(n, D)`` states, ``index`` their
    ``(n,)`` int64 positions in ``y0``'s batch. ``compact=False`` keeps full-size arrays and
    masks finished rows instead of dropping them (for the benchmark only; same results).
    Returns ``(y(t_end), info)`` as `integrate_adaptive`: ``nfe``, ``steps``, ``accepted``,
    ``rejected`` describe the batched run, i.e. the critical path (batched evaluations, iterations,
    and the accepted/rejected steps of the sample that ran longest, so that
    ``nfe = 2 + s * steps`` and ``steps = accepted + rejected`` hold as for the shared step), plus
    the per-sample counters (int64 ``(B,)`` tensors ``nfe_per_sample``, ``steps_per_sample``,
    ``accepted_per_sample``, ``rejected_per_sample``; float64 ``first_step_per_sample``) and the
    total ``sample_evals`` (rows evaluated, the sum of ``nfe_per_sample``).
    """
    tab, method, t0, t_end = cfg.tab, cfg.method, cfg.t0, cfg.t_end
    B, D = y0.shape
    dev, dt_ = y0.device, y0.dtype
    S = len(tab.c) + 1
    lo, hi = min(t0, t_end), max(t0, t_end)
    direction = 1.0 if t_end > t0 else -1.0
    bounds = cfg.bounds
    blocks = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    rows = [torch.tensor(r, dtype=dt_, device=dev) for r in tab.a]
    e = torch.tensor(tab.e, dtype=dt_, device=dev)
    exponent = 1.0 / tab.order
    calls = [0]  # batched evaluations

    # per-sample counters, indexed by the original sample
    nfe_s = torch.zeros(B, dtype=torch.int64, device=dev)
    acc_s = torch.zeros(B, dtype=torch.int64, device=dev)
    rej_s = torch.zeros(B, dtype=torch.int64, device=dev)
    out = torch.empty_like(y0)
    stops = sorted(set(cfg.save_at), reverse=direction < 0) + [t_end]
    stops_t = torch.tensor(stops, dtype=F64, device=dev)
    n_save = len(stops) - 1
    saved: List[torch.Tensor] = [torch.empty_like(y0) for _ in range(n_save)]

    def call(t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        f = func(t, y, idx) if sample_index else func(t, y)
        if tuple(f.shape) != tuple(y.shape):
            raise ValueError(f"func(t, y) must return shape {tuple(y.shape)}, got {tuple(f.shape)}")
        return f

    def fail(msg: str, t_reached: float, step: int):
        stats = SolverStats(backend="native", method=method, nfe=calls[0], steps=step,
                            accepted=int(acc_s.max()), rejected=step - int(acc_s.max()),
                            nfe_per_sample=nfe_s.clone(), steps_per_sample=acc_s + rej_s,
                            accepted_per_sample=acc_s.clone(), rejected_per_sample=rej_s.clone(),
                            sample_evals=int(nfe_s.sum()))
        raise SolverError(msg + f" ({method}, norm='independent')", step=step, t=t_reached, stats=stats)

    y = y0.detach().clone()
    idx = torch.arange(B, device=dev)
    if cfg.first_step is None:
        h, f0 = _initial_steps(lambda t, yy: call(t, yy, idx), y, t0, t_end, tab.order, cfg.rtol, cfg.atol, blocks)
        nfe_s += 2
    else:
        h = torch.full((B,), min(cfg.first_step, hi - lo), dtype=F64, device=dev)
        f0 = call(torch.full((B,), t0, dtype=F64, device=dev), y, idx)
        nfe_s += 1
    first = h.clone()
    K = torch.empty(S, B, D, dtype=dt_, device=dev)
    K[0].copy_(f0)
    t = torch.full((B,), t0, dtype=F64, device=dev)
    k_stop = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)  # masking mode only
    it = 0
    n = B
    while n > 0:
        if cfg.max_steps is not None and it >= cfg.max_steps:
            fail(f"max_steps = {cfg.max_steps} attempted steps reached before t_end = {t_end} by "
                 f"{n} sample(s)", float(t[0]), it)
        if compact:
            ya, Ka, ta, ha, ks, ia = y, K, t, h, k_stop, idx
        else:
            ia = active.nonzero().squeeze(1)
            ya, Ka, ta, ha, ks = y[ia], K[:, ia], t[ia], h[ia], k_stop[ia]
        hcl = ha.clamp(max=cfg.max_step)
        t1 = ta + direction * hcl
        target = stops_t[ks]
        cross = direction * (t1 - target) >= 0.0
        t1 = torch.where(cross, target, t1)
        hs = t1 - ta  # signed steps (a zero step, h below the time's ulp, fails after this iteration)
        hcol = hs.to(dt_).unsqueeze(1)
        Kf = Ka.view(S, -1)
        m = ya.shape[0]
        tst = [t1 if ci == 1.0 else torch.clamp(ta + ci * hs, lo, hi) for ci in tab.c]
        yi = ya
        for i in range(S - 1):
            yi = torch.addcmul(ya, hcol, torch.mv(Kf[:i + 1].t(), rows[i]).view(m, D))
            Ka[i + 1].copy_(call(tst[i], yi, ia))
        err = torch.mv(Kf.t(), e).view(m, D).mul_(hcol)
        tol = torch.maximum(ya.abs(), yi.abs()).mul_(cfg.rtol).add_(cfg.atol)
        ratio = _row_ratio(err.div_(tol), blocks)
        nfe_s[ia] += S - 1
        it += 1
        bad = ~torch.isfinite(ratio)
        ok = ratio <= 1.0
        acc_s[ia] += ok.to(torch.int64)
        rej_s[ia] += (~ok).to(torch.int64)
        okc = ok.unsqueeze(1)
        ya = torch.where(okc, yi, ya)
        ta = torch.where(ok, t1, ta)
        Ka[0] = torch.where(okc, Ka[S - 1], Ka[0])
        floor = torch.where(ratio < 1.0, torch.ones_like(ratio), torch.full_like(ratio, cfg.dfactor))
        factor = torch.clamp(torch.maximum(cfg.safety / ratio ** exponent, floor), max=cfg.ifactor)
        factor = torch.where(ratio == 0.0, torch.full_like(factor, cfg.ifactor), factor)
        ha = hs.abs() * factor
        finished = ta == t_end
        zero = hs == 0.0
        hit = ok & (ta == target) & ~finished  # accepted steps that ended on a save point
        small = (ha < cfg.min_step) & ~finished if cfg.min_step is not None else zero
        # one host read per iteration (a device sync on CUDA) for every decision below
        any_zero, any_bad, any_done, any_hit, any_small = torch.stack(
            [zero.any(), bad.any(), finished.any(), hit.any(), small.any()]).tolist()
        if any_zero:
            j = int(zero.nonzero()[0, 0])
            fail(f"the step size underflowed for sample {int(ia[j])} (h = {float(hcl[j]):.3g} at "
                 f"t = {float(ta[j])!r})", float(ta[j]), it)
        if any_bad:
            j = int(bad.nonzero()[0, 0])
            fail(f"the error estimate of sample {int(ia[j])} is not finite: the state or the vector field "
                 f"became NaN/inf", float(ta[j]), it)
        if n_save and any_hit:
            for k in ks[hit].unique().tolist():
                sel = hit & (ks == k)
                saved[k][ia[sel]] = ya[sel]
            ks = ks + hit.to(torch.int64)
        if cfg.min_step is not None and any_small:
            j = int(small.nonzero()[0, 0])
            fail(f"the step-size controller proposed h = {float(ha[j]):.3g} < min_step = {cfg.min_step:g} "
                 f"for sample {int(ia[j])}", float(ta[j]), it)
        if any_done:
            out[ia[finished]] = ya[finished]
        if compact:
            if any_done:
                keep = ~finished
                y, K, t, h, k_stop, idx = ya[keep], Ka[:, keep].contiguous(), ta[keep], ha[keep], ks[keep], ia[keep]
            else:
                y, K, t, h, k_stop = ya, Ka, ta, ha, ks
            n = y.shape[0]
        else:
            y[ia], K[:, ia], t[ia], h[ia], k_stop[ia] = ya, Ka, ta, ha, ks
            if any_done:
                active[ia[finished]] = False
            n = int(active.sum()) if any_done else n
    steps_s = acc_s + rej_s
    j = int(torch.argmax(steps_s))  # the critical path: the sample that ran longest (the first of ties)
    info = {"nfe": calls[0], "steps": it, "accepted": int(acc_s[j]), "rejected": int(rej_s[j]),
            "first_step": float(first.min()), "last_proposal": None, "t_min": lo, "t_max": hi,
            "saved": [saved[stops.index(v)] for v in cfg.save_at],
            "nfe_per_sample": nfe_s, "accepted_per_sample": acc_s, "rejected_per_sample": rej_s,
            "steps_per_sample": steps_s, "first_step_per_sample": first, "sample_evals": int(nfe_s.sum())}
    return out, info
