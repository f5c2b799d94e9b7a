r"""Divergence estimators for vector fields given by autograd: exact (batched basis) and Hutchinson.

For a field $v: \mathbb R^d \to \mathbb R^d$ evaluated on a batch (samples independent:
``v(x)[b]`` depends on ``x[b]`` only), the divergence $\nabla\cdot v = \operatorname{tr} J$
($J = \partial v/\partial x$) is obtained from vector–Jacobian products
$u \mapsto u^\top J$ (one reverse-mode backward pass each):

* **exact** — $\operatorname{tr}J = \sum_i e_i^\top J e_i$: ``d`` VJPs with the basis
  vectors, evaluated together as ONE batched backward pass (``torch.autograd.grad(...,
  is_grads_batched=True)``, i.e. ``vmap`` over the backward graph) after ONE forward pass.
  Its cost grows like ``d`` backward passes, so it is meant for small ``d``.
* **Hutchinson** — $\operatorname{tr}J = \mathbb E[\varepsilon^\top J\varepsilon]$ for any
  probe with $\mathbb E[\varepsilon\varepsilon^\top] = I$ (Rademacher $\pm1$ entries or
  standard normal). ``K`` probes are evaluated together in one batched backward pass; the ``K``
  single-probe estimates are returned separately so that their spread gives a standard error.

Both return ``(v, div)`` — the field value from the same forward pass and the divergence — so a
caller integrating ``v`` never evaluates the field twice. With ``create_graph=True`` the results
are differentiable (w.r.t. ``x`` and whatever parameters ``fn`` uses), as needed for training
through the likelihood or for the adjoint method.

Every function raises ``ValueError`` if the field is not differentiable w.r.t. ``x`` by autograd
(e.g. it detaches its input or goes through numpy): the divergence would silently be wrong.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Tuple

import torch

from .._validation import check_choice, check_generator, check_int

__all__ = ["exact_divergence", "hutchinson_divergence", "draw_probes", "counter_probes", "PROBES",
           "exact_divergence_of", "hutchinson_divergence_of", "lowrank_cv_divergence_of", "CV_SKETCH",
           "NotDifferentiableError"]

PROBES = ("rademacher", "gaussian")

#: elements of the (vectors, B, d) gradient block computed per batched backward pass
_CHUNK_ELEMENTS = 1 << 24


class NotDifferentiableError(ValueError):
    """The vector field is not differentiable w.r.t. its input by autograd."""


def _not_differentiable(what: str) -> NotDifferentiableError:
    return NotDifferentiableError(
        f"{what} is not differentiable w.r.t. x by autograd (its output has no autograd graph "
        f"leading back to x: it was detached, computed with numpy, or under torch.no_grad()); "
        f"the divergence needs its Jacobian by autograd")


def _vjps(out: torch.Tensor, x: torch.Tensor, vecs: torch.Tensor, create_graph: bool,
          retain_graph: bool) -> torch.Tensor:
    """``vecs[k]^T J`` for every k in one (batched) backward pass; shape ``(K, *x.shape)``."""
    if not out.requires_grad:
        raise _not_differentiable("fn")
    K = vecs.shape[0]
    if K == 1:
        (g,) = torch.autograd.grad(out, x, vecs[0], create_graph=create_graph, retain_graph=retain_graph,
                                   allow_unused=True)
        if g is None:
            raise _not_differentiable("fn")
        return g.unsqueeze(0)
    try:
        (g,) = torch.autograd.grad(out, x, vecs, create_graph=create_graph, retain_graph=True,
                                   allow_unused=True, is_grads_batched=True)
    except RuntimeError as e:  # a backward op without a vmap rule: one backward pass per vector
        if "does not require grad" in str(e):
            raise _not_differentiable("fn") from e
        warnings.warn(f"batched vector-Jacobian products failed ({e}); falling back to {K} separate "
                      f"backward passes", RuntimeWarning, stacklevel=3)
        gs = []
        for k in range(K):
            (gk,) = torch.autograd.grad(out, x, vecs[k], create_graph=create_graph, retain_graph=True,
                                        allow_unused=True)
            if gk is None:
                raise _not_differentiable("fn")
            gs.append(gk)
        g = torch.stack(gs)
    if g is None:
        raise _not_differentiable("fn")
    return g


def exact_divergence_of(out: torch.Tensor, x: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """Exact divergence ``(B,)`` of ``out`` (computed from ``x`` with autograd) w.r.t. ``x``.

    Low-level form of `exact_divergence` for callers that already hold the forward pass.
    The ``d`` basis VJPs are done in batched backward passes of at most ``2**24`` gradient
    elements each (one pass for moderate ``B * d**2``).
    """
    B = x.shape[0]
    d = x[0].numel()
    per_vec = max(1, B * d)
    chunk = max(1, min(d, _CHUNK_ELEMENTS // per_vec))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    total = None
    for i0 in range(0, d, chunk):
        i1 = min(d, i0 + chunk)
        vecs = eye[i0:i1].reshape(i1 - i0, 1, d).expand(i1 - i0, B, d).reshape((i1 - i0,) + tuple(x.shape))
        g = _vjps(out, x, vecs, create_graph, retain_graph=True if i1 < d else create_graph)
        g = g.reshape(i1 - i0, B, d)
        idx = torch.arange(i0, i1, device=x.device)
        part = g[torch.arange(i1 - i0, device=x.device), :, idx].sum(0)  # sum_i (e_i^T J)_i
        total = part if total is None else total + part
    return total


def hutchinson_divergence_of(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor, *,
                             create_graph: bool = False) -> torch.Tensor:
    """Per-probe Hutchinson estimates ``(B, K)`` of the divergence of ``out`` w.r.t. ``x``.

    ``probes`` has shape ``(K, *x.shape)``. Low-level form of `hutchinson_divergence`.
    """
    g = _vjps(out, x, probes, create_graph, retain_graph=create_graph)
    K, B = probes.shape[0], x.shape[0]
    prod = (g * probes).reshape(K, B, -1)
    # sum over the data dimension as a matrix-vector product: on the CPU a reduction over a short
    # trailing axis (d = 2) costs ~8x a product with a ones vector
    return (prod @ _ones(prod.shape[-1], prod.dtype, prod.device)).transpose(0, 1)


#: sketch vectors of `lowrank_cv_divergence_of` (its first ``m`` vectors): enough for a
#: Jacobian "diagonal + rank 3" (the 4-component benchmark mixture) with one to spare; measured
#: per-step variance reduction on that mixture 7-37x at t = 0.4 ... 0.7 with m = 4 against 5-28x with m = 3
CV_SKETCH = 4
#: kappa of the eigenvalue shrinkage in `lowrank_cv_divergence_of`: measured on the d = 64 mixture,
#: the CV's added variance where A is diagonal (t = 0.1) falls 103 -> 29 -> 6 -> 0.6 for kappa = 0, 1,
#: 2, 4 while its gain at the peak (t = 0.5) goes 19x -> 18x -> 16x -> 10x; 2 balances the two
_CV_SHRINK = 2.0


def lowrank_cv_divergence_of(out: torch.Tensor, x: torch.Tensor, vecs: torch.Tensor, m: int = CV_SKETCH, *,
                             create_graph: bool = False) -> torch.Tensor:
    r"""Hutchinson estimates with a shifted low-rank control variate, and the plain ones: ``(B, 2K)``.

    ``vecs`` is ``(K + m, *x.shape)``: ``K`` probes $v_k$ then ``m`` sketch vectors $\omega_j$
    (all with $\mathbb E[vv^\top] = I$; Rademacher recommended). With $A = \partial\,out/\partial x$
    (per sample; only vector–Jacobian products $u^\top A$ are used):

    1. $Q$ = an orthonormal basis of $(A - c_0I)^\top\Omega$, $c_0 = \sum_j\omega_j^\top A\omega_j /
       \sum_j\lVert\omega_j\rVert^2$ (one batched pass together with the probes; the shift keeps a
       matrix near $cI$ from returning $\Omega$ itself);
    2. $T = Q^\top A Q$ (a second pass, $m$ VJPs), and the diagonal level off the subspace,
       $c = \sum_j\tilde\omega_j^\top A\tilde\omega_j / \sum_j\lVert\tilde\omega_j\rVert^2$ with
       $\tilde\omega = (I - QQ^\top)\omega$ (from the products at hand);
    3. $\hat A = Q\,f(T - cI)\,Q^\top$ with $f$ shrinking eigenvalues $\lambda \mapsto
       \lambda^3/(\lambda^2 + \tau^2)$, $\tau$ = `_CV_SHRINK` × the RMS of $(A - cI)^\top\tilde\omega$
       (the diagonal's spread): the low-rank part is kept, sketch noise of a spread diagonal dropped;
       $\mathrm{tr}\,\hat A = \mathrm{tr}\,f(T - cI)$ exactly;
    4. $E_k = v_k^\top A v_k - v_k^\top\hat A v_k + \mathrm{tr}\,\hat A$.

    $\hat A$ depends on $\Omega$ and $A$ only, so given $\Omega$ each $E_k$ is an unbiased
    estimate of $\mathrm{tr}A$ ($\mathbb E\,v^\top Mv = \mathrm{tr}M$ for the fixed
    $M = A - \hat A$), and the $E_k$ are i.i.d. given $\Omega$: their spread gives an honest
    stderr. For Rademacher probes the error is $v^\top M v - \mathrm{tr}M$, off-diagonal part of
    $M$ only: where $A$ is close to $cI$ plus a part of rank $< m$ (the score of a mixture with
    few mixed components), $\hat A$ takes that part and the variance falls; where $A$ is diagonal
    with a spread, $\hat A$ adds off-diagonal terms and the variance grows (Hutch++'s failure on
    such matrices) — hence the plain estimates are returned alongside, columns ``K:2K``, for the
    caller to choose. Cost: ``m + K`` VJPs in one batched pass plus ``m`` in a second.
    """
    m = int(m)
    n = vecs.shape[0]
    K = n - m
    if m < 1 or K < 1:
        raise ValueError(f"vecs must hold m = {m} sketch vectors and at least one probe; got {n} vectors")
    B = x.shape[0]
    g = _vjps(out, x, vecs, create_graph, retain_graph=True)  # (K + m, B, ...): u^T A
    V = vecs.reshape(n, B, -1)
    G = g.reshape(n, B, -1)
    d = V.shape[-1]
    om, Gom = V[K:].transpose(0, 1), G[K:].transpose(0, 1)  # (B, m, d): omega_j, omega_j^T A
    # the sketch of A - c0 I, c0 = the mean diagonal (Rademacher: omega^T A omega / |omega|^2);
    # unshifted, a matrix near c I (the score of a mixture away from its boundaries) would give back
    # Omega itself instead of A's low-rank part
    c0 = (Gom * om).sum((1, 2)) / (om * om).sum((1, 2))
    Q, _ = torch.linalg.qr((Gom - c0[:, None, None] * om).transpose(1, 2))  # (B, d, m) orthonormal
    qv = Q.transpose(1, 2).transpose(0, 1).reshape((m,) + tuple(x.shape)).to(vecs.dtype)
    Z = _vjps(out, x, qv, create_graph, retain_graph=create_graph).reshape(m, B, d).transpose(0, 1)  # Q^T A
    T = Z @ Q  # (B, m, m) = Q^T A Q
    # the diagonal level c off the sketched subspace: omega~^T A omega~ / |omega~|^2 with
    # omega~ = (I - QQ^T) omega, from the products at hand (no further VJPs)
    a = Q.transpose(1, 2) @ om.transpose(1, 2)  # (B, m, m): Q^T omega_j (columns)
    wAw = (Gom * om).sum(-1)  # omega^T A omega
    wPAw = (a * (Z @ om.transpose(1, 2))).sum(1)  # (Q^T w) . (Q^T A w)
    wAPw = ((Gom @ Q).transpose(1, 2) * a).sum(1)  # (A^T w)^T Q (Q^T w)
    wPAPw = (a * (T @ a)).sum(1)
    num = (wAw - wPAw - wAPw + wPAPw).sum(1)
    den = ((om * om).sum(-1) - (a * a).sum(1)).sum(1)
    c = num / den.clamp_min(1e-12)  # (B,)
    That = T - c[:, None, None] * torch.eye(m, dtype=T.dtype, device=T.device)
    That = 0.5 * (That + That.transpose(1, 2))  # v^T Ahat v sees the symmetric part only
    # shrink the eigenvalues of the same size as the diagonal's spread around c: where A is a spread
    # diagonal (no low-rank part) a sketch of it only adds off-diagonal terms; lam -> lam^3/(lam^2 + tau^2)
    # keeps a low-rank part (|lam| >> tau) and drops those smoothly. tau^2 = kappa^2 x the mean
    # |(A - cI)^T w~|^2 / |w~|^2 over the sketch vectors projected off Q (where A - cI is its diagonal
    # spread when Q holds the low-rank part)
    r = Gom - (Z.transpose(1, 2) @ a).transpose(1, 2) - c[:, None, None] * (om - (Q @ a).transpose(1, 2))
    tau2 = _CV_SHRINK ** 2 * r.pow(2).sum((1, 2)) / den.clamp_min(1e-12)
    lam, U = torch.linalg.eigh(That)
    lam = lam * lam.pow(2) / (lam.pow(2) + tau2[:, None])
    That = (U * lam[:, None, :]) @ U.transpose(1, 2)  # Ahat = Q That Q^T
    P = (G[:K] * V[:K]).sum(-1)  # (K, B): v^T A v, the plain estimates
    qv_k = torch.einsum("bdm,kbd->kbm", Q, V[:K])  # Q^T v
    quad = torch.einsum("kbi,bij,kbj->kb", qv_k, That, qv_k)  # v^T Ahat v
    E = P - quad + torch.diagonal(That, dim1=1, dim2=2).sum(-1)
    return torch.cat([E, P], 0).transpose(0, 1)


_ONES: dict = {}


def _ones(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A cached ones vector (read-only use: the divergence is evaluated at every solver stage)."""
    key = (n, dtype, torch.device(device))
    v = _ONES.get(key)
    if v is None:
        if len(_ONES) > 64:
            _ONES.clear()
        v = _ONES[key] = torch.ones(n, dtype=dtype, device=device)
    return v


def _prepare(fn: Callable, x: torch.Tensor):
    if not callable(fn):
        raise TypeError(f"fn must be callable (x, t) -> tensor, got {type(fn).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x must be a floating-point tensor with a batch dimension, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _call(fn, xin, t):
    out = fn(xin) if t is None else fn(xin, t)
    if not isinstance(out, torch.Tensor) or out.shape != xin.shape:
        raise ValueError(f"fn must return a tensor shaped like x {tuple(xin.shape)}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return out


def exact_divergence(fn: Callable, x: torch.Tensor, t=None, *, create_graph: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``(fn(x, t), div)``: the field and its exact divergence $\sum_i \partial_i fn_i$, ``(B,)``.

    One forward pass and ``d`` vector–Jacobian products done as one batched backward pass
    (``d = x[0].numel()``; cost ≈ forward + ``d`` backward passes — meant for small ``d``).
    ``fn`` is called as ``fn(x, t)`` (``fn(x)`` if ``t`` is None) on a batch whose samples it
    treats independently. With ``create_graph=True`` both outputs stay differentiable;
    otherwise they are detached.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> v, div = exact_divergence(lambda x: x @ A.T, torch.randn(3, 2))
    >>> div
    tensor([5., 5., 5.])
    """
    xin = _prepare(fn, x)
    with torch.enable_grad():
        out = _call(fn, xin, t)
        div = exact_divergence_of(out, xin, create_graph=create_graph)
    if not create_graph:
        out, div = out.detach(), div.detach()
    return out, div


def hutchinson_divergence(fn: Callable, x: torch.Tensor, t=None, probes: Optional[torch.Tensor] = None, *,
                          n_probes: int = 1, probe: str = "rademacher",
                          generator: Optional[torch.Generator] = None,
                          create_graph: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``(fn(x, t), est)``: the field and per-probe Hutchinson estimates ``(B, K)`` of its divergence.

    $\widehat{\nabla\cdot fn}_k = \varepsilon_k^\top J\,\varepsilon_k$, unbiased when
    $\mathbb E[\varepsilon\varepsilon^\top] = I$. ``probes`` is ``(K, *x.shape)`` (or
    ``x.shape`` for one probe); if omitted, ``n_probes`` probes of kind ``probe`` are drawn from
    ``generator`` (`draw_probes`). One forward pass and one batched backward pass for all
    ``K`` probes. The estimate is ``est.mean(1)``; its standard error ``est.std(1) / sqrt(K)``.
    """
    xin = _prepare(fn, x)
    if probes is None:
        probes = draw_probes(tuple(x.shape), n_probes, probe, generator, x.dtype, x.device)
    else:
        if not isinstance(probes, torch.Tensor):
            raise TypeError(f"probes must be a tensor, got {type(probes).__name__}")
        if tuple(probes.shape) == tuple(x.shape):
            probes = probes.unsqueeze(0)
        if tuple(probes.shape[1:]) != tuple(x.shape) or probes.shape[0] < 1:
            raise ValueError(f"probes must have shape (K, *x.shape) = (K, {', '.join(map(str, x.shape))}); "
                             f"got {tuple(probes.shape)}")
        probes = probes.to(dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        out = _call(fn, xin, t)
        est = hutchinson_divergence_of(out, xin, probes, create_graph=create_graph)
    if not create_graph:
        out, est = out.detach(), est.detach()
    return out, est


def draw_probes(shape, n_probes: int, probe: str = "rademacher", generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``n_probes`` probe vectors of shape ``shape``, stacked: ``(n_probes, *shape)``.

    ``"rademacher"``: independent ±1 entries (the lower-variance choice: the variance of
    $\\varepsilon^\\top A\\varepsilon$ is $2\\sum_{i\\ne j}\\bar A_{ij}^2$ against
    $2\\sum_{i,j}\\bar A_{ij}^2$ for Gaussian probes, $\\bar A = (A + A^\\top)/2$);
    ``"gaussian"``: standard normal entries.
    """
    n_probes = check_int(n_probes, "n_probes", 1)
    check_choice(probe, "probe", PROBES)
    check_generator(generator)
    full = (int(n_probes),) + tuple(int(s) for s in shape)
    gdev = generator.device if generator is not None else (device if device is not None else "cpu")
    if probe == "rademacher":
        e = torch.randint(0, 2, full, generator=generator, device=gdev).to(dtype) * 2 - 1
    else:
        e = torch.randn(full, generator=generator, dtype=dtype, device=gdev)
    return e.to(device=device) if device is not None else e


_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) on int64 tensors holding values in
    $[0, 2^{32})$; the multiplier is below $2^{31}$, so no product leaves int64. Returns a new
    tensor."""
    h = (h >> 16).bitwise_xor_(h).mul_(0x45D9F3B).bitwise_and_(_M32)
    h = (h >> 16).bitwise_xor_(h).mul_(0x45D9F3B).bitwise_and_(_M32)
    return (h >> 16).bitwise_xor_(h)


def counter_probes(seed: int, rows: torch.Tensor, counts: torch.Tensor, n_probes: int, shape,
                   probe: str = "rademacher", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Probe vectors that are a pure function of ``(seed, row, count)``: ``(n_probes, n, *shape)``.

    Row $j$ of the result holds ``n_probes`` probes for the sample at batch position
    ``rows[j]``, at its ``counts[j]``-th draw. The entries come from a counter-based hash (no
    generator state), so a sample's sequence of probes does not depend on which other samples are
    drawn with it or in what order — what per-sample stepping needs when every evaluation draws
    fresh probes (`log_likelihood`'s ``resample_probes``). ``"rademacher"``: ±1 from one bit of
    a 32-bit hash (32 entries per hash); ``"gaussian"``: Box–Muller from two 32-bit hashes. Tested for balance and pairwise
    independence in ``tests/test_likelihood_resample.py``.

    Parameters
    ----------
    seed:
        Integer in $[0, 2^{32})$; different seeds give independent streams.
    rows, counts:
        ``(n,)`` int64 tensors (values in $[0, 2^{32})$) on the device of the result.
    n_probes:
        Probes per row.
    shape:
        One sample's shape.
    probe:
        ``"rademacher"`` or ``"gaussian"``.
    dtype:
        Floating dtype of the result.
    """
    check_choice(probe, "probe", PROBES)
    if not 0 <= int(seed) <= _M32:
        raise ValueError(f"seed must lie in [0, 2**32), got {seed!r}")
    shape = tuple(int(s) for s in shape)
    keys = _element_keys(int(n_probes) * math.prod(shape), probe, rows.device)
    return _counter_probes(_row_keys(int(seed), rows), counts, keys, int(n_probes), shape, probe, dtype)


def _row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """The per-row stream keys of `counter_probes` (``(n,)``; computed once per solve)."""
    return _mix32(_mix32(torch.full_like(rows, seed)) ^ rows)


#: Rademacher entries per 32-bit hash (its bits 0..31; each bit of the hash is uniform and the bits
#: are independent to the precision the tests check)
_BITS = 32


def _element_keys(n_entries: int, probe: str, device) -> torch.Tensor:
    """The scrambled word indices of `counter_probes`: one hash per 32 Rademacher entries, two per
    Gaussian entry."""
    width = -(-n_entries // _BITS) if probe == "rademacher" else 2 * n_entries
    return torch.arange(width, dtype=torch.int64, device=device).mul_(0x9E3779B1).bitwise_and_(_M32)


_SHIFTS: dict = {}


def _counter_probes(row_keys: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, n_probes: int,
                    shape: Tuple[int, ...], probe: str, dtype: torch.dtype) -> torch.Tensor:
    """`counter_probes` without validation, from the rows' stream keys (`_row_keys`) and the word
    keys (`_element_keys`)."""
    n, entries = row_keys.shape[0], n_probes * math.prod(shape)
    base = _mix32(row_keys ^ counts)  # (n,)
    h = _mix32(base.unsqueeze(1) ^ keys)  # (n, words)
    if probe == "rademacher":
        sh = _SHIFTS.get(h.device)
        if sh is None:
            sh = _SHIFTS[h.device] = torch.arange(_BITS, dtype=torch.int64, device=h.device)
        bits = (h.unsqueeze(2) >> sh).bitwise_and_(1).reshape(n, -1)[:, :entries]  # (n, entries)
        v = bits.to(dtype).mul_(-2.0).add_(1.0)
    else:
        u = (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
        u1, u2 = u[:, 0::2], u[:, 1::2]
        v = ((-2.0 * u1.log()).sqrt() * torch.cos(2.0 * math.pi * u2)).to(dtype)
    return v.reshape((n, n_probes) + shape).transpose(0, 1)
