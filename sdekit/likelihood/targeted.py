r"""Accuracy-targeted log-likelihoods: `log_likelihood(..., target_stderr=ε)`.

The user states the standard error they want, $\varepsilon$ in **nats per dimension per
sample** (the unit log-likelihoods are reported in; $\varepsilon d$ nats per sample), and the
routine chooses the divergence estimator, the number of probes per sample and the solver
tolerance at low cost:

1. **Tolerance.** $\mathrm{rtol} = \mathrm{atol} = \tau(\varepsilon) =
   \min(\tau_{max}, \varepsilon / 10)$ (`_TOL_PER_TARGET`, `_TOL_MAX`). Measured on the
   $d = 64$ VP mixture (exact divergence, so only the solver errs): RMS solver error
   $1.5\cdot10^{-3}$ nats/dim at tol $10^{-3}$, $1.2\cdot10^{-3}$ at $3\cdot10^{-4}$,
   $2.5\cdot10^{-4}$ at $10^{-4}$, i.e. at most $\approx 4\tau$; with $\tau = \varepsilon/10$ the
   solver error is $\lesssim 0.4\varepsilon$ and adds $\lesssim 8\%$ in quadrature to the probe
   error. The stderr includes its measured scale (point 3). The resampled-probe solves (point 3)
   use the same rule: bosh3 with the state-only error control has an RMS solver error of
   0.2–0.45 $\tau$ for $\tau \le 10^{-3}$ at d = 24, 48, 64, but a heavy tail (worst sample
   ~7x the RMS), and with $\tau = 0.3\varepsilon$ that tail broke the coverage (0.865 at
   $\varepsilon = 0.004$); at $\tau = \varepsilon/10$ it is 0.89–0.96.
2. **Exact divergence** for the whole batch when $d \le$ ``exact_dim_limit`` (no probe error;
   then only the tolerance is chosen, and a second exact solve at $\tau/10$ gives the
   solver-error scale reported as the stderr), and for each sample whose planned number of probes
   reaches $d$ (the $d$ basis vectors then cost no more than the probes and leave no variance).
3. **Pilot and solver check.** Where the native linear path runs (a `LinearSDE`, no gradient)
   and the control variate is not asked for, every probe solve uses **resampled probes with
   bosh3** (`log_likelihood`'s ``resample_probes``, `RESAMPLED_METHOD`; see
   ``docs/likelihood.md``: at the same cost its per-probe error is ~4x smaller than a fixed
   probe's, so far fewer probes are needed). In both cases one solve of the whole batch with
   ``pilot_probes`` $= K_0 = 4$ probes at tolerance $\tau$ (the pilot) gives, per sample $b$, the sample variances of the
   single-probe estimates $\hat\ell_{bk} = \log p_T(z_b) + \hat\Delta_{bk}$ of $\log p$ — with
   ``control_variate=True`` (opt-in; only where the native linear solve runs) of BOTH estimators, plain
   ($s_{b}^2$) and corrected ($s_{b,cv}^2$), on the same probes
   (`sdekit.likelihood.divergence.lowrank_cv_divergence_of`). The solver check: with fixed
   probes, a one-probe solve at $\tau/10$ from the pilot's seed repeats the pilot's first probe
   and differs from it by solver error only; with resampled probes, one probe is held FIXED in a
   solve at $\tau$ with the state-only error control (the very steps of the resampled solves)
   and compared with a dopri5 solve with the same probe at $\tau/10$. Their RMS difference over
   the batch, $\sigma_{ode}$, is the solver-error scale at $\tau$ (one number: per sample the
   solver error of the later solves scatters around it).
4. **Estimator and probes per sample.** Plain Hutchinson needs
   $K_b = \lceil \kappa\, s_b^2 / (\varepsilon d)^2\rceil$ probes and costs $K_b$ VJPs per
   evaluation; the control variate needs $K_{b,cv}$ (the same with $s_{b,cv}^2$) and costs
   $K_{b,cv} + 2m$ ($m$ = `CV_SKETCH` sketch vectors and a second pass); the exact divergence
   costs $d$. Each sample takes the cheapest. Probe counts are at least $K_{min} = 8$ and rounded
   up to a bucket $8\cdot 2^j$ (at most 2x over-spent); $\kappa = 1.5$ (`_PLAN_INFLATION`) pads
   for pilots that under-estimated the variance. Each (estimator, bucket) is one solve of just
   its samples with FRESH probes (per-sample stepping, ``norm="independent"``, makes a sample's
   trajectory independent of its batch-mates); exact samples are solved at $\tau/10$.
5. **Estimate and stderr.** $\log p_b$ is the mean of the $K_b$ fresh estimates; the pilot's
   probes only plan (pooling them would bias both the mean and the stderr: the samples that
   stop early are those whose pilot happened to spread little). The reported

   $$ \mathrm{stderr}_b = \sqrt{\frac{\mathrm{std}_k(\hat\ell_{bk})^2}{K_b} + \sigma_{ode}^2} $$

   (probe part 0 for exact samples), so $\pm1.96\,\mathrm{stderr}$ is meant as a 95% interval
   for the total error, probes and solver; the tests measure its coverage against exact
   densities. With the control variate the fresh estimates are i.i.d. and unbiased given the
   solve's sketch, so the same formula holds.

The result is an ordinary `LikelihoodResult`; ``n_probes`` is the smallest $K_b$ among the
Hutchinson samples (so `LikelihoodResult.confidence_interval`, a Student-t interval with
``n_probes - 1`` degrees of freedom, is the conservative one for every sample but does not
include $\sigma_{ode}$), ``delta_per_probe`` holds the pilot's $K_0$ plain probes
(common to all samples; planning only), ``z`` is the pilot's, and ``stats.extra["targeted"]``
records the plan: ``estimator`` (per sample: ``"hutchinson"``, ``"cv"`` or ``"exact"``),
``control_variate``, ``resample_probes``, ``method``, ``rtol``/``atol``, ``pilot_probes``,
``pilot_nfe``, ``check_nfe``, ``solver_rms`` (nats per sample), ``probes_per_sample``
(0 = exact), ``exact_samples``, ``plan`` (per bucket: estimator, probes, samples, nfe, method,
resample_probes) and ``solves``. ``stats.nfe`` and
``extra["score_calls"]`` are summed over all solves, pilot and check included; ``wall_time`` is
end to end.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Dict, List, Optional

import torch

from .._validation import check_generator, short
from ..solvers.stats import CountingFunction, SolverStats
from . import ode
from .divergence import CV_SKETCH
from .ode import LikelihoodResult, log_likelihood

__all__ = ["targeted_log_likelihood", "tolerance_for_target", "RESAMPLED_METHOD"]

F64 = torch.float64

#: tolerance per unit of target (nats/dim): the measured solver error is <= ~4 tol (module doc),
#: so tol = target / 10 keeps it <= 0.4 target
_TOL_PER_TARGET = 0.1
#: loosest tolerance used: at 3e-3 and 1e-2 dopri5 takes the same 26 evaluations on the d = 64
#: mixture with a solver error of 6-9 tol (9e-3, 1.5e-2 nats/dim), i.e. the error-tol relation of
#: point 1 no longer holds there
_TOL_MAX = 1e-3
#: the method of the resampled-probe solves (docs/likelihood.md: its even weights make nearly every
#: evaluation an independent draw)
RESAMPLED_METHOD = "bosh3"
#: the tightest tolerance used (float64 state; below this the solve costs grow without benefit)
_TOL_MIN = 1e-8
#: the solver check runs at tol * _CHECK_RATIO: its error is then ~10x smaller (module doc), so the
#: difference of the two solves estimates the error at tol to ~10%
_CHECK_RATIO = 0.1
#: default pilot probes (planning only): 4 draws give each sample's variance to within a factor ~2
PILOT_PROBES = 4
#: fewest probes a sample's estimate is made of: its stderr then has >= 7 degrees of freedom
_K_MIN = 8
#: the plan asks for kappa s^2 / (eps d)^2 probes; 1.5 covers most of the pilot's underestimates
#: of the variance (P(s^2 < sigma^2 / 1.5) = 0.19 at 7 dof) at 1.5x the probes
_PLAN_INFLATION = 1.5


def tolerance_for_target(target_stderr: float) -> float:
    r"""The solver tolerance (rtol = atol) used for a target stderr $\varepsilon$ (nats/dim):
    $\min(10^{-3}, \max(10^{-8}, \varepsilon/10))$, for both kinds of solve (resampled probes with
    bosh3 and the state-only error control; fixed probes with dopri5); see the module docstring for
    the measurements."""
    return min(_TOL_MAX, max(_TOL_MIN, _TOL_PER_TARGET * float(target_stderr)))


def _all_args(common: Dict[str, Any]) -> Dict[str, Any]:
    """`log_likelihood`'s arguments: its defaults updated by ``common``."""
    import inspect

    a = {k: p.default for k, p in inspect.signature(log_likelihood).parameters.items()
         if p.default is not inspect.Parameter.empty}
    a.update(common)
    return a


def _cv_possible(sde, score, x, common) -> bool:
    """Whether the control-variate solve can run: the native flat solve of a linear SDE without
    gradients (`_solve_flat`, where the "cv" branch of the field lives)."""
    a = _all_args(common)
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    return ode._fast_path(sde, x, a["method"], "independent", a["backend"], False, wants_grad, a["options"])


def _solve_cv(sde, score, x, k: int, probe: str, generator, common):
    r"""One solve with the control variate (`lowrank_cv_divergence_of`): ``k`` probes and
    `CV_SKETCH` sketch vectors drawn once; ``delta_per_probe`` is ``(B, 2k)``: the corrected
    estimates, then the plain ones of the same probes. Only ``delta_per_probe``,
    ``prior_log_prob``, ``z`` and ``stats`` of the returned result are meaningful."""
    import dataclasses

    a = _all_args(common)
    req = ode._request(sde, score, x, a["t_eps"], a["method"], a["rtol"], a["atol"], "hutchinson", probe, 2 * k,
                       generator, False, "independent", a["prior"], a["exact_dim_limit"], a["max_steps"],
                       a["params"], a["backend"])
    if req.wants_grad:
        raise ValueError("the control variate runs without gradients (x or the score's parameters require grad)")
    req = dataclasses.replace(req, mode="cv")
    moments = ode._resolve_moments(a["precondition"], a["data_moments"], a["prior"], sde, x, True)
    res = ode._solve_flat(sde, CountingFunction(score), req, a["method"], "independent", a["backend"],
                          a["max_steps"], a["options"], generator, probe, moments)
    res.stats.extra["vectors_per_eval"] = k + 2 * CV_SKETCH
    return res


def _solve_fixed_state_controlled(sde, score, x, probe: str, generator, common):
    r"""One solve with ONE probe held fixed whose $\delta$ column is left out of the error control:
    the steps are those of a `resample_probes` solve at the same tolerance (they depend on the
    state only), so against a tight solve with the same probe it measures the resampled solves'
    quadrature error without probe noise."""
    a = _all_args(common)
    req = ode._request(sde, score, x, a["t_eps"], a["method"], a["rtol"], a["atol"], "hutchinson", probe, 1,
                       generator, False, "independent", a["prior"], a["exact_dim_limit"], a["max_steps"],
                       a["params"], a["backend"])
    moments = ode._resolve_moments(a["precondition"], a["data_moments"], a["prior"], sde, x, True)
    return ode._solve_flat(sde, CountingFunction(score), req, a["method"], "independent", a["backend"],
                           a["max_steps"], a["options"], generator, probe, moments, resample=False,
                           control_delta=False)


def _check_target(target_stderr) -> float:
    if isinstance(target_stderr, bool) or not isinstance(target_stderr, numbers.Real):
        raise TypeError(f"target_stderr must be a positive number (nats per dimension), got "
                        f"{type(target_stderr).__name__}: {target_stderr!r}")
    v = float(target_stderr)
    if not (v > 0.0) or math.isinf(v):  # NaN fails the comparison
        raise ValueError(f"target_stderr must be a finite positive number (nats per dimension per sample), "
                         f"got {target_stderr!r}")
    return v


def _buckets(extra: torch.Tensor, k0: int) -> List[int]:
    """Bucket sizes (extra probes) ``k0 * 2**j`` covering the largest request in ``extra``."""
    sizes, k = [], k0
    top = int(extra.max()) if extra.numel() else 0
    while True:
        sizes.append(k)
        if k >= top:
            return sizes
        k *= 2


def targeted_log_likelihood(sde, score, x: torch.Tensor, *, target_stderr: float,
                            pilot_probes: int = PILOT_PROBES, generator: Optional[torch.Generator] = None,
                            exact_dim_limit: int = 16, probe: str = "rademacher", control_variate: bool = False,
                            **kwargs: Any):
    r"""`log_likelihood` with per-sample standard error $\approx$ ``target_stderr`` nats/dim.

    See the module docstring for the plan. ``control_variate=True`` lets each sample choose the
    low-rank control variate too (off by default — `log_likelihood(target_stderr=...)` runs
    without it: end to end it did not lower the error reliably on the benchmark mixture and cost
    more wall time at d = 24, see ``docs/likelihood.md``). ``kwargs`` are passed to every underlying
    `log_likelihood` call (``t_eps``, ``method``, ``prior``, ``max_steps``, ...); the
    tolerances, ``n_probes``, ``divergence`` and ``norm`` are chosen here.
    """
    eps = _check_target(target_stderr)
    for name in _CHOSEN:
        if name in kwargs:
            raise ValueError(f"{name}={kwargs[name]!r} cannot be combined with target_stderr={target_stderr!r}: the "
                             f"accuracy-targeted mode chooses {name} itself (drop one of the two)")
    if isinstance(pilot_probes, bool) or not isinstance(pilot_probes, numbers.Integral) or pilot_probes < 2:
        raise ValueError(f"pilot_probes must be an integer >= 2 (a variance needs two draws), got {pilot_probes!r}")
    k0 = int(pilot_probes)
    check_generator(generator)
    tic = time.perf_counter()
    tol = tolerance_for_target(eps)
    common = dict(kwargs, rtol=tol, atol=tol, norm="independent", exact_dim_limit=max(exact_dim_limit, 1))
    B, d = int(x.shape[0]), int(x[0].numel())

    check_common = dict(common, rtol=tol * _CHECK_RATIO, atol=tol * _CHECK_RATIO)

    # ---- exact divergence for the whole batch ---------------------------------------------------
    if d <= exact_dim_limit:
        res = log_likelihood(sde, score, x, divergence="exact", **common)
        chk = log_likelihood(sde, score, x, divergence="exact", **check_common)
        # no probes: the stderr is the solver error's scale, the RMS over the batch of tol vs tol/10
        solver_rms = float((res.log_prob - chk.log_prob).detach().pow(2).mean().sqrt())
        res.stderr = torch.full_like(res.log_prob, solver_rms).detach()
        res.stats.nfe += chk.stats.nfe
        res.stats.extra["score_calls"] = res.stats.extra.get("score_calls", 0) + chk.stats.extra["score_calls"]
        res.stats.extra["targeted"] = dict(target_stderr=eps, estimator="exact", rtol=tol, atol=tol,
                                           pilot_probes=0, probes_per_sample=torch.zeros(B, dtype=torch.long),
                                           solves=2, pilot_nfe=0, check_nfe=chk.stats.nfe,
                                           solver_rms=solver_rms)
        res.stats.wall_time = time.perf_counter() - tic
        return res

    # ---- pilot and solver check ----------------------------------------------------------------
    gdev = x.device if x.device.type != "cpu" else "cpu"
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device if generator is not None
                             else "cpu"))
    use_cv = control_variate and _cv_possible(sde, score, x, common)
    use_rs = not use_cv and _cv_possible(sde, score, x, common)
    if use_rs:
        # resampled probes with bosh3 (docs/likelihood.md): the pilot plans, the check measures the
        # quadrature error of the steps these solves take (a fixed probe, the state-only error
        # control, against a tight solve with the same probe)
        rs = dict(common, method=RESAMPLED_METHOD)
        est_kw = dict(rs, resample_probes=True)
        pilot = log_likelihood(sde, score, x, divergence="hutchinson", n_probes=k0, probe=probe,
                               generator=torch.Generator(gdev).manual_seed(seed), **est_kw)
        fixed = _solve_fixed_state_controlled(sde, score, x, probe, torch.Generator(gdev).manual_seed(seed + 1), rs)
        chk = log_likelihood(sde, score, x, divergence="hutchinson", n_probes=1, probe=probe,
                             generator=torch.Generator(gdev).manual_seed(seed + 1),
                             **dict(check_common, rtol=tol * _CHECK_RATIO, atol=tol * _CHECK_RATIO))
        runs = [pilot, fixed, chk]
        est = pilot.prior_log_prob[:, None] + pilot.delta_per_probe
        solver_rms = float((fixed.log_prob - chk.log_prob).detach().pow(2).mean().sqrt())
        check_nfe = fixed.stats.nfe + chk.stats.nfe
    else:
        # the pilot and the check draw from generators seeded alike, so the check's one probe is the
        # pilot's first: their difference is solver error only (no probe noise)
        est_kw = common
        if use_cv:  # the pilot measures both estimators on the same probes: columns [corrected | plain]
            pilot = _solve_cv(sde, score, x, k0, probe, torch.Generator(gdev).manual_seed(seed), common)
        else:
            pilot = log_likelihood(sde, score, x, divergence="hutchinson", n_probes=k0, probe=probe,
                                   generator=torch.Generator(gdev).manual_seed(seed), **common)
        chk = log_likelihood(sde, score, x, divergence="hutchinson", n_probes=1, probe=probe,
                             generator=torch.Generator(gdev).manual_seed(seed), **check_common)
        runs = [pilot, chk]
        est = pilot.prior_log_prob[:, None] + pilot.delta_per_probe  # per-probe log p estimates
        if use_cv:
            est_cv, est = est[:, :k0], est[:, k0:]
        first = est[:, 0]  # the pilot's first (plain) probe is the check's probe (probes come first)
        # the solver error: one number for the batch (the RMS over samples of the tol vs tol/10
        # difference). Per sample it is not a usable estimate: the solves of the plan take other steps
        # than the pilot, and their errors at one tolerance scatter around this scale
        solver_rms = float((first - chk.log_prob).detach().pow(2).mean().sqrt())
        check_nfe = chk.stats.nfe
    # probes needed by each estimator, at least K_MIN, and its cost in VJPs per evaluation: plain K,
    # control variate K + 2 m (sketch and second pass), exact d. Each sample takes the cheapest.
    unit = (eps * d) ** 2
    need_plain = torch.ceil(_PLAN_INFLATION * est.detach().var(1, unbiased=True) / unit).clamp_min(_K_MIN)
    cost = {"hutchinson": need_plain}
    need = {"hutchinson": need_plain}
    if use_cv:
        need["cv"] = torch.ceil(_PLAN_INFLATION * est_cv.detach().var(1, unbiased=True) / unit).clamp_min(_K_MIN)
        cost["cv"] = need["cv"] + 2 * CV_SKETCH
    names = list(cost) + ["exact"]
    costs = torch.stack([cost[n] for n in cost] + [torch.full((B,), float(d), dtype=F64, device=x.device)], 1)
    choice = costs.argmin(1).cpu()  # ties go to the plain estimator (first)
    log_prob = torch.empty(B, dtype=F64, device=x.device)
    prior_lp = torch.empty(B, dtype=F64, device=x.device)
    probe_var = torch.zeros(B, dtype=F64, device=x.device)  # the variance of the mean over the probes
    count = torch.zeros(B, dtype=torch.long)
    chosen = [names[i] for i in choice.tolist()]
    plan: List[Dict[str, Any]] = []
    for name in names[:-1]:
        mask = choice == names.index(name)
        if not bool(mask.any()):
            continue
        nb = need[name].cpu()
        lo, size = 0, _K_MIN  # buckets K_MIN * 2^j
        while True:
            idx = torch.nonzero((nb > lo) & (nb <= size) & mask).flatten()
            if idx.numel():
                xi = x[idx.to(x.device)]
                if name == "cv":
                    r = _solve_cv(sde, score, xi, size, probe, generator, common)
                    e = (r.prior_log_prob[:, None] + r.delta_per_probe)[:, :size]  # the corrected columns
                else:
                    r = log_likelihood(sde, score, xi, divergence="hutchinson", n_probes=size, probe=probe,
                                       generator=generator, **est_kw)
                    e = r.prior_log_prob[:, None] + r.delta_per_probe  # fresh probes: independent of the plan
                runs.append(r)
                di = idx.to(x.device)
                log_prob = log_prob.index_copy(0, di, e.mean(1))
                prior_lp = prior_lp.index_copy(0, di, r.prior_log_prob)
                probe_var = probe_var.index_copy(0, di, e.detach().var(1, unbiased=True) / size)
                count[idx] = size
                plan.append(dict(estimator=name, probes=size, samples=int(idx.numel()), nfe=r.stats.nfe,
                                 method=r.stats.method, resample_probes=r.stats.extra.get("resample_probes", False)))
            if not bool((nb[mask] > size).any()):
                break
            lo, size = size, 2 * size
    exact_idx = torch.nonzero(choice == names.index("exact")).flatten()
    if exact_idx.numel():
        # at the check's tolerance: the stderr of these samples is the solver-error scale measured at
        # tol (the Hutchinson check), which under-stated the exact solves' own error at tol on a
        # full-rank score (benchmarks/likelihood_accuracy.py); at tol/10 it is a conservative bound
        di = exact_idx.to(x.device)
        r = log_likelihood(sde, score, x[di], divergence="exact", **dict(check_common, exact_dim_limit=d))
        runs.append(r)
        log_prob = log_prob.index_copy(0, di, r.log_prob)
        prior_lp = prior_lp.index_copy(0, di, r.prior_log_prob)
        plan.append(dict(estimator="exact", probes=d, samples=int(exact_idx.numel()), nfe=r.stats.nfe))
    stderr = (probe_var + solver_rms ** 2).sqrt()
    if not bool(torch.isfinite(log_prob.detach()).all() and torch.isfinite(stderr).all()):
        raise RuntimeError(f"targeted log_likelihood produced non-finite values: log_prob {short(log_prob)}, "
                           f"stderr {short(stderr)}")
    stats = SolverStats(nfe=sum(r.stats.nfe for r in runs), steps=sum(r.stats.steps for r in runs),
                        accepted=sum(r.stats.accepted for r in runs), rejected=sum(r.stats.rejected for r in runs),
                        wall_time=time.perf_counter() - tic, backend=pilot.stats.backend, method=pilot.stats.method)
    evals = [r.stats.sample_evals for r in runs]
    stats.sample_evals = sum(evals) if all(e is not None for e in evals) else None
    stats.extra.update(pilot.stats.extra)
    stats.extra.update(
        score_calls=sum(r.stats.extra.get("score_calls", 0) for r in runs),
        preflight_evals=sum(r.stats.extra.get("preflight_evals", 0) for r in runs),
        vectors_per_eval=None,  # differs between the solves: see targeted["plan"]
        targeted=dict(target_stderr=eps, estimator=chosen, control_variate=use_cv, rtol=tol, atol=tol, pilot_probes=k0,
                      pilot_nfe=pilot.stats.nfe, pilot_sample_evals=pilot.stats.sample_evals,
                      check_nfe=check_nfe, solver_rms=solver_rms, resample_probes=use_rs,
                      method=RESAMPLED_METHOD if use_rs else common.get("method", "dopri5"),
                      probes_per_sample=count.clone(), exact_samples=int(exact_idx.numel()), plan=plan,
                      solves=len(runs)))
    n_min = int(count[count > 0].min()) if bool((count > 0).any()) else 0
    return LikelihoodResult(log_prob=log_prob, prior_log_prob=prior_lp, delta_log_prob=log_prob - prior_lp,
                            z=pilot.z, stderr=stderr, stats=stats, divergence="hutchinson", n_probes=n_min,
                            probe=probe, delta_per_probe=est, dim=d, t_eps=pilot.t_eps)


#: `log_likelihood` arguments that the targeted mode chooses itself: passing one (other than its
#: default) with ``target_stderr`` is a contradiction and raises
_CHOSEN = ("n_probes", "rtol", "atol", "divergence", "norm", "method", "resample_probes")


def _dispatch(sde, score, x, target_stderr, args: Dict[str, Any]):
    """`log_likelihood`'s hook: ``args`` are its arguments (``locals()`` at its top)."""
    import inspect

    eps = _check_target(target_stderr)
    defaults = {k: p.default for k, p in inspect.signature(log_likelihood).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for name in _CHOSEN:
        if args[name] != defaults[name]:
            raise ValueError(f"{name}={args[name]!r} cannot be combined with target_stderr={target_stderr!r}: the "
                             f"accuracy-targeted mode chooses {name} itself (drop one of the two)")
    if args["adjoint"] is not False:
        raise ValueError(f"adjoint={args['adjoint']!r} cannot be combined with target_stderr={target_stderr!r}: the "
                         f"targeted mode runs several solves whose plan depends on the data; differentiate "
                         f"through it with adjoint=False (plain backpropagation)")
    rest = {k: v for k, v in args.items()
            if k in defaults and k not in _CHOSEN + ("sde", "score", "x", "target_stderr", "adjoint", "generator", "exact_dim_limit",
                                   "probe")}
    return targeted_log_likelihood(sde, score, x, target_stderr=eps, generator=args["generator"],
                                   exact_dim_limit=args["exact_dim_limit"], probe=args["probe"], **rest)


ode._TARGETED[0] = _dispatch  # log_likelihood(target_stderr=...) calls it
