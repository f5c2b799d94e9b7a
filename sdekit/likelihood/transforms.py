r"""Data transforms, dequantization and bits per dimension — every term from a declared Jacobian.

A likelihood computed by `sdekit.likelihood.log_likelihood` (or bounded by
`sdekit.likelihood.elbo`) is a density of the *model-space* variable $x$, in nats.
Benchmarks report bits per dimension of the *native* data — for images, integers
$k \in \{0, \dots, 255\}$. Three things connect the two:

1.  **Dequantization** (discrete data only). Integers have a probability mass function, not a
    density. Uniform dequantization adds $u \sim U[0, 1)^d$ (times the bin width
    $\Delta$): $y = k + \Delta u$, so that the bins $[k, k + \Delta)$ tile the
    continuous space. For any density $p_y$,

    $$
    \log P(k) = \log\int_{[0,1)^d} p_y(k + \Delta u)\,\Delta^d\,du
    \;\ge\; \mathbb E_u\big[\log p_y(k + \Delta u)\big] + d\log\Delta
    $$

    (Jensen), where $P(k) = \int_{\text{bin}(k)} p_y$ is the discrete model that the
    continuous density induces. The gap is $\mathrm{KL}(U(\text{bin}) \,\|\, p_y(\cdot|\text{bin}))$,
    which vanishes as the density becomes flat on the scale of one bin.

2.  **The data transform** $x = a\,y + b$ (elementwise; `DataTransform`) with
    $\log|\det \partial x/\partial y| = \sum_i \log|a_i|$, so
    $\log p_y(y) = \log p_x(x) + \sum_i \log|a_i|$.

3.  **Units**: bits per dimension divide by $d\ln 2$.

Together (`bits_per_dim`):

$$
    \mathrm{bpd} = -\frac{\log p_x(x) + \sum_i \log|a_i| + d\log\Delta}{d\,\ln 2},
    \qquad x = a(k + \Delta u) + b,
$$

an upper bound (in expectation over $u$) on the discrete code length
$-\log_2 P(k)/d$. There is no magic constant: score_sde's ``bpd = -log_p/(d ln 2) + 7``
(centered data) or ``+ 8`` is this formula for $a = 2/256$, $\Delta = 1$
($-\log_2(2/256) = 7$) or $a = 1/256$ ($-\log_2(1/256) = 8$); see
``docs/likelihood_data.md``.

Continuous data (``discrete_levels=None``) need no dequantization; their "bits per dimension"
is a differential quantity and may be negative. Declaring data discrete and then calling
`bits_per_dim` without a dequantization raises: a density evaluated at lattice points is
not a probability and can give negative "bits" (a common bug).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from .._validation import check_generator, check_int, check_positive, check_real, short

__all__ = ["DataTransform", "UniformDequantization", "bits_per_dim"]

F64 = torch.float64
_LN2 = math.log(2.0)
Number = Union[int, float]


def _coef(value: Any, name: str, nonzero: bool) -> Union[float, torch.Tensor]:
    """A scalar (float) or a float64 CPU tensor of per-coordinate coefficients."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        out = value.detach().to(device="cpu", dtype=F64)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{name} must be finite, got {short(value)}")
        if nonzero and bool((out == 0).any()):
            raise ValueError(f"{name} must be nonzero everywhere (the map must be invertible), got {short(value)}")
        return out
    v = check_real(value, name)
    if nonzero and v == 0.0:
        raise ValueError(f"{name} must be nonzero (the map must be invertible), got {value!r}")
    return v


def _as_data(y: Any, name: str) -> torch.Tensor:
    """A real tensor with a batch dimension, converted to float64 (uint8 and integer dtypes allowed)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype == torch.bool or y.dtype.is_complex:
        raise TypeError(f"{name} must be a real tensor, got dtype {y.dtype}")
    if y.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (shape (B, ...)); got a 0-d tensor")
    return y if y.dtype == F64 else y.to(F64)


def _first_bad(mask: torch.Tensor, values: torch.Tensor) -> Tuple[tuple, float]:
    idx = tuple(int(i) for i in torch.nonzero(mask)[0])
    return idx, float(values[idx])


class DataTransform:
    r"""An invertible elementwise affine map $x = a\,y + b$ from native data to model space.

    Parameters
    ----------
    scale:
        $a$ (nonzero): a Python number, or a tensor that broadcasts against one sample's shape
        (e.g. per-channel ``(C, 1, 1)``).
    shift:
        $b$: a Python number, or a tensor like ``scale``.
    low:
        The lower end of the declared range of the native data (see ``high``).
    high:
        The upper end of the declared range of the native data. For discrete data the values
        are the lattice $\{low + j\Delta : j = 0, \dots, L-1\}$ with
        $\Delta = (high-low)/(L-1)$, so ``high`` is the largest *value* (255 for 8-bit data);
        after uniform dequantization the data lie in $[low, high + \Delta)$. For continuous
        data the range is $[low, high]$ (``±inf`` allowed).
    discrete_levels:
        ``L`` (an integer ≥ 2) for discrete data, ``None`` for continuous data.

    Examples
    --------
    >>> import torch
    >>> from sdekit.likelihood.transforms import DataTransform
    >>> tr = DataTransform.uint8_to_symmetric()        # x = 2 (k + u) / 256 - 1
    >>> k = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    >>> x = tr.to_model(k, tr.dequantization(), generator=torch.Generator().manual_seed(0))
    >>> bool((x >= -1).all() and (x < 1).all())
    True
    """

    def __init__(self, scale: Any, shift: Any = 0.0, low: Number = -math.inf, high: Number = math.inf,
                 discrete_levels: Optional[int] = None):
        self.scale = _coef(scale, "scale", nonzero=True)
        self.shift = _coef(shift, "shift", nonzero=False)
        lo = check_real(low, "low", allow_inf=True)
        hi = check_real(high, "high", allow_inf=True)
        if not lo < hi:
            raise ValueError(f"low must be < high; got low={low!r}, high={high!r}")
        if discrete_levels is not None:
            discrete_levels = check_int(discrete_levels, "discrete_levels", 2, allow_none=True)
            if math.isinf(lo) or math.isinf(hi):
                raise ValueError(f"discrete data need a finite range; got low={low!r}, high={high!r}")
        self.low, self.high, self.discrete_levels = lo, hi, discrete_levels

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def uint8_to_symmetric(cls) -> "DataTransform":
        r"""8-bit integers to $[-1, 1)$: $x = 2y/256 - 1$, $y = k + u \in [0, 256)$.

        score_sde's convention for centered data (``(255 k/255 + u)/256 * 2 - 1``).
        $\log|dx/dy| = \log(2/256) = -7\ln 2$ per dimension.
        """
        return cls(2.0 / 256.0, -1.0, 0, 255, discrete_levels=256)

    @classmethod
    def uint8_to_unit(cls) -> "DataTransform":
        r"""8-bit integers to $[0, 1)$: $x = y/256$ (score_sde, ``centered=False``);
        $\log|dx/dy| = -8\ln 2$ per dimension."""
        return cls(1.0 / 256.0, 0.0, 0, 255, discrete_levels=256)

    @classmethod
    def identity(cls, low: Number = -math.inf, high: Number = math.inf) -> "DataTransform":
        """Continuous data already in model space (``x = y``)."""
        return cls(1.0, 0.0, low, high, None)

    # -- properties ----------------------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return self.discrete_levels is not None

    @property
    def bin_width(self) -> Optional[float]:
        r"""$\Delta = (high - low)/(L - 1)$ for discrete data (1 for 8-bit integers), else ``None``."""
        if self.discrete_levels is None:
            return None
        return (self.high - self.low) / (self.discrete_levels - 1)

    @property
    def log_abs_det_jacobian_per_dim(self) -> float:
        r"""$\log|a|$ per coordinate (the mean of $\log|a_i|$ for a tensor ``scale``,
        exact per dimension when ``scale`` broadcasts evenly over the sample)."""
        if isinstance(self.scale, torch.Tensor):
            return float(torch.log(self.scale.abs()).mean())
        return math.log(abs(self.scale))

    def event_log_abs_det_jacobian(self, event_shape: Union[int, Sequence[int]]) -> float:
        r"""$\sum_i \log|a_i|$ over one sample of shape ``event_shape`` (an int ``d`` means ``(d,)``)."""
        shape = _event_shape(event_shape, "event_shape")
        d = math.prod(shape)
        if not isinstance(self.scale, torch.Tensor):
            return d * math.log(abs(self.scale))
        try:
            full = torch.broadcast_to(self.scale, shape)
        except RuntimeError as exc:
            raise ValueError(f"scale of shape {tuple(self.scale.shape)} does not broadcast to the sample "
                             f"shape {shape}") from exc
        return float(torch.log(full.abs()).sum())

    def log_abs_det_jacobian(self, y: torch.Tensor) -> torch.Tensor:
        r"""$\log|\det\partial x/\partial y|$ per sample, shape ``(B,)`` (float64; constant in y)."""
        y = _as_data(y, "y")
        val = self.event_log_abs_det_jacobian(tuple(y.shape[1:]))
        return torch.full((y.shape[0],), val, dtype=F64, device=y.device)

    # -- validation ----------------------------------------------------------------------------------
    def support(self) -> Tuple[float, float, bool]:
        """``(lo, hi, hi_inclusive)`` of the continuous native variable ``y`` (dequantized if discrete)."""
        if self.is_discrete:
            return self.low, self.high + self.bin_width, False
        return self.low, self.high, True

    def validate(self, y: Any, name: str = "y") -> torch.Tensor:
        """Check continuous native data ``y`` (dequantized, for discrete data) against the declared
        range; raise ``ValueError`` naming ``name`` and the first offending value (NaN/inf too).
        Returns ``y`` as float64."""
        y = _as_data(y, name)
        bad = ~torch.isfinite(y)
        if bool(bad.any()):
            idx, v = _first_bad(bad, y)
            raise ValueError(f"{name} must be finite; {name}[{', '.join(map(str, idx))}] = {v}")
        lo, hi, incl = self.support()
        out = (y < lo) | ((y > hi) if incl else (y >= hi))
        if bool(out.any()):
            idx, v = _first_bad(out, y)
            rng = f"[{lo:g}, {hi:g}]" if incl else f"[{lo:g}, {hi:g})"
            raise ValueError(f"{name} must lie in {rng} (the declared data range); "
                             f"{name}[{', '.join(map(str, idx))}] = {v:g}")
        return y

    def validate_discrete(self, k: Any, name: str = "k") -> torch.Tensor:
        """Check discrete native data ``k`` (before dequantization): finite, in ``[low, high]`` and on
        the lattice ``low + j * bin_width``. Returns ``k`` as float64."""
        if not self.is_discrete:
            raise ValueError("validate_discrete needs a discrete transform (discrete_levels=None here)")
        k = _as_data(k, name)
        bad = ~torch.isfinite(k)
        if bool(bad.any()):
            idx, v = _first_bad(bad, k)
            raise ValueError(f"{name} must be finite; {name}[{', '.join(map(str, idx))}] = {v}")
        out = (k < self.low) | (k > self.high)
        if bool(out.any()):
            idx, v = _first_bad(out, k)
            raise ValueError(f"{name} must lie in [{self.low:g}, {self.high:g}] (the declared data range); "
                             f"{name}[{', '.join(map(str, idx))}] = {v:g}")
        j = (k - self.low) / self.bin_width
        off = (j - torch.round(j)).abs() > 1e-6
        if bool(off.any()):
            idx, v = _first_bad(off, k)
            raise ValueError(f"{name} must take the discrete values low + j*{self.bin_width:g} "
                             f"(j = 0..{self.discrete_levels - 1}); {name}[{', '.join(map(str, idx))}] = {v:g}")
        return k

    # -- the map -----------------------------------------------------------------------------------------
    def _coef_for(self, c, y: torch.Tensor):
        if isinstance(c, torch.Tensor):
            c = c.to(device=y.device)
            try:
                torch.broadcast_shapes(c.shape, tuple(y.shape[1:]))
            except RuntimeError as exc:
                raise ValueError(f"scale/shift of shape {tuple(c.shape)} do not broadcast to the sample "
                                 f"shape {tuple(y.shape[1:])}") from exc
        return c

    def forward(self, y: Any, name: str = "y") -> torch.Tensor:
        """``x = scale * y + shift`` after `validate` (float64)."""
        y = self.validate(y, name)
        return self._coef_for(self.scale, y) * y + self._coef_for(self.shift, y)

    def inverse(self, x: Any, name: str = "x") -> torch.Tensor:
        """``y = (x - shift) / scale`` (float64); ``x`` must be finite."""
        x = _as_data(x, name)
        if not bool(torch.isfinite(x).all()):
            idx, v = _first_bad(~torch.isfinite(x), x)
            raise ValueError(f"{name} must be finite; {name}[{', '.join(map(str, idx))}] = {v}")
        return (x - self._coef_for(self.shift, x)) / self._coef_for(self.scale, x)

    __call__ = forward

    def dequantization(self) -> "UniformDequantization":
        """The `UniformDequantization` matching this transform's lattice (discrete data only)."""
        if not self.is_discrete:
            raise ValueError("continuous data (discrete_levels=None) are not dequantized")
        return UniformDequantization(self.discrete_levels, bin_width=self.bin_width, low=self.low)

    def to_model(self, data: Any, dequantization: Optional["UniformDequantization"] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Native data to model space: validate, dequantize (discrete data), then `forward`.

        ``dequantization`` is required for discrete transforms and must be ``None`` for continuous
        ones (same rules as `bits_per_dim`).
        """
        _check_pairing(self, dequantization)
        if dequantization is None:
            return self.forward(data, "data")
        return self.forward(dequantization(data, generator=generator), "dequantized data")

    def __repr__(self):
        s = short(self.scale) if isinstance(self.scale, torch.Tensor) else repr(self.scale)
        b = short(self.shift) if isinstance(self.shift, torch.Tensor) else repr(self.shift)
        return (f"DataTransform(scale={s}, shift={b}, low={self.low!r}, high={self.high!r}, "
                f"discrete_levels={self.discrete_levels!r})")


class UniformDequantization:
    r"""Uniform dequantization $y = k + \Delta u$, $u \sim U[0, 1)$ i.i.d. per coordinate.

    Calling it on a tensor of lattice values (any real dtype, e.g. ``torch.uint8``) returns the
    float64 dequantized tensor; values off the lattice, out of range, NaN or inf raise
    ``ValueError``. Randomness comes from ``generator``.

    Parameters
    ----------
    levels:
        Number of discrete values ``L`` (256 for 8-bit data).
    bin_width:
        $\Delta$ (1 for integers).
    low:
        Smallest discrete value; the lattice is ``low + j * bin_width``, ``j = 0..L-1``.
    """

    def __init__(self, levels: int = 256, bin_width: float = 1.0, low: float = 0.0):
        self.levels = check_int(levels, "levels", 2)
        self.bin_width = check_positive(bin_width, "bin_width")
        self.low = check_real(low, "low")

    @property
    def high(self) -> float:
        return self.low + (self.levels - 1) * self.bin_width

    @property
    def log_bin_width(self) -> float:
        r"""$\log\Delta$ — the per-dimension term of the bound $\log P(k) \ge E_u\log p_y + d\log\Delta$."""
        return math.log(self.bin_width)

    def __call__(self, k: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_generator(generator)
        lattice = DataTransform(1.0, 0.0, self.low, self.high, self.levels)
        k = lattice.validate_discrete(k, "k")
        u = torch.rand(k.shape, generator=generator, dtype=F64,
                       device=generator.device if generator is not None else k.device).to(k.device)
        return k + self.bin_width * u

    def matches(self, transform: DataTransform) -> bool:
        """Whether this dequantization's lattice is the transform's declared lattice."""
        if not transform.is_discrete or transform.discrete_levels != self.levels:
            return False
        tol = 1e-12 * max(1.0, abs(self.bin_width))
        return abs(transform.bin_width - self.bin_width) <= tol and abs(transform.low - self.low) <= \
            1e-12 * max(1.0, abs(self.low))

    def __repr__(self):
        return f"UniformDequantization(levels={self.levels}, bin_width={self.bin_width!r}, low={self.low!r})"


def _event_shape(dim: Any, name: str) -> Tuple[int, ...]:
    if isinstance(dim, (tuple, list, torch.Size)):
        if len(dim) == 0:
            raise ValueError(f"{name} must be a non-empty shape of positive sizes, got {dim!r}")
        return tuple(check_int(s, f"{name}[{i}]", 1) for i, s in enumerate(dim))
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or a shape tuple, got {type(dim).__name__}: {dim!r}")
    return (check_int(dim, name, 1),)


def _check_pairing(transform: DataTransform, dequantization: Any) -> None:
    if not isinstance(transform, DataTransform):
        raise TypeError(f"transform must be a DataTransform, got {type(transform).__name__}")
    if dequantization is not None and not isinstance(dequantization, UniformDequantization):
        raise TypeError(f"dequantization must be a UniformDequantization or None (continuous data), "
                        f"got {type(dequantization).__name__}: {dequantization!r}")
    if transform.is_discrete and dequantization is None:
        raise ValueError(
            f"the transform declares discrete data ({transform.discrete_levels} levels) but "
            f"dequantization=None: a continuous density evaluated at lattice points is not a "
            f"probability (it can exceed 1 and give negative bits/dim). Dequantize "
            f"(dequantization=transform.dequantization()) and evaluate the model at k + u")
    if not transform.is_discrete and dequantization is not None:
        raise ValueError(f"the transform declares continuous data (discrete_levels=None) but "
                         f"dequantization={dequantization!r} was given; declare discrete_levels or "
                         f"pass dequantization=None")
    if dequantization is not None and not dequantization.matches(transform):
        raise ValueError(f"dequantization={dequantization!r} does not match the transform's lattice "
                         f"(levels={transform.discrete_levels}, bin_width={transform.bin_width!r}, "
                         f"low={transform.low!r})")


def bits_per_dim(log_prob: Any, transform: DataTransform, dim: Union[int, Sequence[int]],
                 dequantization: Optional[UniformDequantization] = None) -> torch.Tensor:
    r"""Bits per dimension of native data from a model-space log density (nats per sample).

    $$
        \mathrm{bpd} = -\frac{\log p_x(x) + \sum_i\log|\partial x_i/\partial y_i| + d\log\Delta}{d\ln 2}
    $$

    where $x$ = ``transform(dequantize(k))`` is where ``log_prob`` was evaluated. For
    discrete data (with uniform dequantization) its expectation over the dequantization noise is
    an upper bound on $-\log_2 P(k)/d$, the code length of the discrete model that the
    density induces on bins $[k, k+\Delta)$; for continuous data (``dequantization=None``)
    it is $-\log_2 p_y(y)/d$ and may be negative.

    Parameters
    ----------
    log_prob:
        ``(B,)`` tensor (or a number, or an object with a ``.log_prob`` attribute such as a
        `LikelihoodResult` or an ``ElboResult``): model-space log
        density in nats, per sample.
    transform:
        The `DataTransform` that produced ``x``.
    dim:
        Dimensions per sample ``d`` (an int), or the sample shape (needed when ``scale`` is a
        per-channel tensor).
    dequantization:
        A `UniformDequantization` matching the transform's lattice (required for discrete
        data; see the module notes), or ``None`` for continuous data.

    Returns
    -------
    torch.Tensor
        ``(B,)`` float64 tensor (0-d for a number).
    """
    if hasattr(log_prob, "log_prob") and not isinstance(log_prob, torch.Tensor):
        log_prob = log_prob.log_prob
    if isinstance(log_prob, bool):
        raise TypeError(f"log_prob must be a tensor or a number, got {log_prob!r}")
    if isinstance(log_prob, numbers.Real):
        lp = torch.tensor(float(log_prob), dtype=F64)
    elif isinstance(log_prob, torch.Tensor):
        if log_prob.dtype == torch.bool or log_prob.dtype.is_complex:
            raise TypeError(f"log_prob must be a real tensor, got dtype {log_prob.dtype}")
        if log_prob.dim() > 1:
            raise ValueError(f"log_prob must be per sample, shape (B,); got shape {tuple(log_prob.shape)}")
        lp = log_prob.detach().to(F64)
    else:
        raise TypeError(f"log_prob must be a tensor or a number, got {type(log_prob).__name__}")
    if not bool(torch.isfinite(lp).all()):
        raise ValueError(f"log_prob must be finite (nats per sample), got {short(log_prob)}")
    _check_pairing(transform, dequantization)
    shape = _event_shape(dim, "dim")
    d = math.prod(shape)
    logdet = transform.event_log_abs_det_jacobian(shape)
    log_bin = d * dequantization.log_bin_width if dequantization is not None else 0.0
    return -(lp + logdet + log_bin) / (d * _LN2)
