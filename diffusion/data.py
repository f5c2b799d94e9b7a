r"""Data sets for training score models: toy 2-D sets, exact Gaussian mixtures, 8×8 digits, user data.

`get_dataset(name, split="train", n=..., seed=..., **kw)` returns a `Dataset` with ``.data``
(float32, model space), ``.labels``, ``.num_classes``, ``.transform`` (sdekit's `DataTransform`
for discrete image data, so bits/dim has no magic constant), ``.mixture`` (the exact
`sdekit.GaussianMixture` for the mixture sets: exact density and score at every t through
``mixture.exact_log_prob(sde)`` / ``mixture.exact_score(sde)``), ``.shape`` (event shape) and,
for generative toy sets, ``.sample(n, generator)``.

**Splits.** Generative sets draw ``split="train"`` from the stream seeded $2\,\mathrm{seed}$ and
``split="test"`` from $2\,\mathrm{seed} + 1$: different seeds, so the two sets are independent
draws (disjoint with probability 1). Finite sets (digits, npz, folder) are permuted once with
``split_seed`` and cut into disjoint index sets (the last ``test_fraction`` is the test set);
``seed`` only drives their dequantization noise.

**The 2-D sets** (each standardised by its *exact* mean and standard deviation per coordinate, so
the population has mean 0 and unit variance per coordinate; no statistics of a sample are used):

* ``"mixture"``: 6 anisotropic Gaussian components with means on the circle of radius 2 at angles
  $2\pi k/6$, standard deviations 0.4 and 0.12 along and across an axis that alternates between
  radial (even k) and tangential (odd k), weights $\propto (6, 5, 4, 3, 2, 1)$. Labels = component.
  Not standardised: its exact density is ``.mixture``.
* ``"mixture_nd"`` (``dim``, ``n_components=8``, ``mixture_seed=0``): means $\sim N(0, I_d)$,
  diagonal variances uniform in $[0.05, 0.3]$, weights uniform in $[0.5, 1]$ (normalised), all drawn
  from ``mixture_seed`` (the same distribution for both splits). Labels = component.
* ``"moons"`` (``noise=0.05``): sklearn's two half circles $(\cos\theta, \sin\theta)$ and
  $(1 - \cos\theta, \tfrac12 - \sin\theta)$, $\theta \sim U[0, \pi]$, equal weights, plus
  $N(0, \text{noise}^2 I)$. Exact moments: mean $(\tfrac12, \tfrac14)$, variances
  $\tfrac34 + \text{noise}^2$ and $\tfrac9{16} - \tfrac1\pi + \text{noise}^2$. Labels = moon.
* ``"swiss_roll"`` (``noise=0.5``): sklearn's 2-D roll $(t\cos t, t\sin t)$,
  $t \sim U[\tfrac32\pi, \tfrac92\pi]$, plus $N(0, \text{noise}^2 I)$ (raw units, radius up to 14).
  Moments by 256-point Gauss–Legendre quadrature (exact to round-off for these smooth
  integrands). No labels.
* ``"checkerboard"``: uniform on the 8 squares $(i, j)$ with $i + j$ even of the 4×4 board of
  unit squares on $[-2, 2]^2$; each coordinate is uniform on $[-2, 2]$ (mean 0, variance 4/3), so
  the standardised density is exactly $\tfrac18\cdot\tfrac43 = \tfrac16$ on the black squares,
  0 elsewhere. No labels.
* ``"rings"`` (``noise=0.08``): 4 concentric circles of radii 1, 2, 3, 4 with equal weights,
  uniform angle, plus $N(0, \text{noise}^2 I)$; mean 0, variance per coordinate
  $E[r^2]/2 + \text{noise}^2 = 3.75 + \text{noise}^2$. Labels = ring.

**Image sets** hold their native integer levels in ``.native`` (uint8) and the transform
$x = a\,y + b$ with $y = k + u$ (uniform dequantization). ``dequantize="uniform"`` (default)
gives ``.data`` = one seeded dequantization draw — data whose density is the one bits/dim
measures; ``dequantize="center"`` gives the bin centres $y = k + \tfrac12$.
``Dataset.dequantized(generator, index)`` draws fresh dequantization noise (for training
loops that redraw it each epoch).

* ``"digits"``: scikit-learn's 8×8 digits (1797 images shipped inside the package: no
  download), shape (1, 8, 8), 17 levels $k \in \{0..16\}$, labels 0..9. The transform is
  ``DataTransform(2/17, -1, low=0, high=16, discrete_levels=17)``: $x = 2y/17 - 1$,
  $y \in [0, 17)$ onto $x \in [-1, 1)$ — `DataTransform.uint8_to_symmetric` with 17 levels
  instead of 256; $\log|dx/dy| = \log(2/17)$ per dimension.
* ``"npz"`` (``path``, ``key``, ``label_key=None``, ``channels_last=False``): a NumPy ``.npz``
  (loaded with ``allow_pickle=False``). uint8 arrays get ``DataTransform.uint8_to_symmetric()``;
  float arrays are taken as already in model space (``transform=None``).
* ``"folder"`` (``path``, ``size``, ``mode="RGB"|"L"``): images read with PIL, converted to RGB
  or grayscale and resized to ``size``×``size`` (bilinear); one subfolder per class gives labels
  (sorted names), images directly in ``path`` give none. uint8 →
  ``DataTransform.uint8_to_symmetric()``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from sdekit import GaussianMixture
from sdekit.likelihood import DataTransform
from sdekit.likelihood.transforms import UniformDequantization

__all__ = ["Dataset", "get_dataset", "DATASETS", "digits_transform"]

F32 = torch.float32
F64 = torch.float64

#: The digits' native lattice $\{0, \dots, 16\}$ onto $[-1, 1)$: $x = 2y/17 - 1$, $y = k + u$.
DIGITS_LEVELS = 17


def digits_transform() -> DataTransform:
    """A fresh ``DataTransform(2/17, -1, 0, 16, discrete_levels=17)`` for the 8×8 digits."""
    return DataTransform(2.0 / DIGITS_LEVELS, -1.0, 0, DIGITS_LEVELS - 1, discrete_levels=DIGITS_LEVELS)


# ---------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """A data set in model space.

    Attributes
    ----------
    name, split:
        The name given to `get_dataset` and ``"train"`` or ``"test"``.
    data:
        ``(N, *shape)`` float32 tensor in model space.
    labels:
        ``(N,)`` int64 tensor, or ``None``.
    num_classes:
        Number of classes (labels are ``0..num_classes-1``), or ``None``.
    transform:
        sdekit `DataTransform` from native data to model space (discrete image sets), or ``None``.
    mixture:
        The exact `sdekit.GaussianMixture` of the data (mixture sets), or ``None``.
    native:
        Native integer levels ``(N, *shape)`` uint8 (image sets), or ``None``.
    indices:
        For finite sets, the ``(N,)`` positions of these samples in the source (train and test
        are disjoint); ``None`` for generative sets.
    description:
        One line on what the data are.
    """

    name: str
    split: str
    data: torch.Tensor
    labels: Optional[torch.Tensor] = None
    num_classes: Optional[int] = None
    transform: Optional[DataTransform] = None
    mixture: Optional[GaussianMixture] = None
    native: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    description: str = ""
    _sampler: Optional[Callable[[int, torch.Generator], Tuple[torch.Tensor, Optional[torch.Tensor]]]] = \
        field(default=None, repr=False)

    @property
    def shape(self) -> Tuple[int, ...]:
        """Event shape (one sample)."""
        return tuple(self.data.shape[1:])

    @property
    def dim(self) -> int:
        """Dimensions per sample."""
        return int(math.prod(self.shape))

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def generative(self) -> bool:
        """Whether fresh draws are available through `sample` (toy and mixture sets)."""
        return self._sampler is not None

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               return_labels: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """``n`` fresh float32 draws ``(n, *shape)`` from the data distribution (generative sets).

        With ``return_labels=True`` returns ``(x, labels)`` (labels ``None`` for unlabelled sets).

        Raises
        ------
        ValueError
            For finite data sets (digits, npz, folder) — use ``.data`` — or ``n < 1``.
        """
        if self._sampler is None:
            raise ValueError(f"data set {self.name!r} is a finite sample with no generative model; "
                             f"use .data (and get_dataset(..., split='test') for held-out data)")
        n = _positive_int(n, "n")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        x, y = self._sampler(n, generator if generator is not None else torch.Generator().manual_seed(
            int(torch.randint(0, 2 ** 62, (1,)))))
        return (x, y) if return_labels else x

    @property
    def dequantization(self) -> Optional[UniformDequantization]:
        """The uniform dequantization matching ``transform`` (discrete data), else ``None``."""
        if self.transform is None or not self.transform.is_discrete:
            return None
        return self.transform.dequantization()

    def dequantized(self, generator: Optional[torch.Generator] = None,
                    index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fresh uniformly dequantized model-space data (float32) for rows ``index`` (all if ``None``).

        ``transform.to_model(native, dequantization, generator)``: the same map as ``.data``
        with new noise $u$.
        """
        if self.native is None or self.dequantization is None:
            raise ValueError(f"data set {self.name!r} has no discrete native data to dequantize")
        k = self.native if index is None else self.native[index]
        return self.transform.to_model(k, self.dequantization, generator=generator).to(F32)


# ---------------------------------------------------------------------------------------------------
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= float(value) < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _stream(seed: int, split: str) -> torch.Generator:
    """Train draws from seed 2*seed, test from 2*seed + 1 (never the same stream)."""
    return torch.Generator().manual_seed(2 * seed + (1 if split == "test" else 0))


def _generative(name: str, split: str, n: int, seed: int, sampler, num_classes, mixture=None,
                description: str = "") -> Dataset:
    x, y = sampler(n, _stream(seed, split))
    return Dataset(name=name, split=split, data=x, labels=y, num_classes=num_classes, mixture=mixture,
                   description=description, _sampler=sampler)


class _MixtureSampler:
    """Draws (x, component) from weights, means and per-component square-root factors $L_k$
    ($\\Sigma_k = L_kL_k^\\top$, or elementwise standard deviations for diagonal covariances) —
    an implementation independent of `GaussianMixture.sample`, which the tests compare against."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, factors: torch.Tensor, diagonal: bool):
        self.w, self.mu, self.L, self.diagonal = weights, means, factors, diagonal

    def __call__(self, n: int, generator: torch.Generator):
        comp = torch.multinomial(self.w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.mu.shape[1], generator=generator, dtype=F64)
        if self.diagonal:
            x = self.mu[comp] + self.L[comp] * z
        else:
            x = self.mu[comp] + torch.einsum("nij,nj->ni", self.L[comp], z)
        return x.to(F32), comp.to(torch.long)


def _mixture_2d() -> Tuple[GaussianMixture, _MixtureSampler]:
    K, radius, long_sd, short_sd = 6, 2.0, 0.4, 0.12
    angles = 2 * math.pi * torch.arange(K, dtype=F64) / K
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    weights = torch.arange(K, 0, -1, dtype=F64)
    weights = weights / weights.sum()
    axis = angles + (torch.arange(K) % 2) * (math.pi / 2)     # radial (even k) or tangential (odd k)
    R = torch.stack([torch.stack([torch.cos(axis), -torch.sin(axis)], 1),
                     torch.stack([torch.sin(axis), torch.cos(axis)], 1)], 1)   # (K, 2, 2) rotations
    L = R * torch.tensor([long_sd, short_sd], dtype=F64)[None, None, :]        # R diag(sd)
    covs = L @ L.transpose(1, 2)
    return GaussianMixture(weights, means, covs), _MixtureSampler(weights, means, L, diagonal=False)


def _mixture_nd(dim: int, n_components: int, mixture_seed: int) -> Tuple[GaussianMixture, _MixtureSampler]:
    g = torch.Generator().manual_seed(int(mixture_seed))
    means = torch.randn(n_components, dim, generator=g, dtype=F64)
    var = 0.05 + 0.25 * torch.rand(n_components, dim, generator=g, dtype=F64)
    weights = 0.5 + 0.5 * torch.rand(n_components, generator=g, dtype=F64)
    weights = weights / weights.sum()
    return GaussianMixture(weights, means, var), _MixtureSampler(weights, means, var.sqrt(), diagonal=True)


def _gauss_legendre_moments(curve: Callable[[np.ndarray], np.ndarray], a: float, b: float,
                            noise: float, nodes: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and per-coordinate std of $c(t) + N(0, \\text{noise}^2 I)$, $t \\sim U[a, b]$, by quadrature."""
    s, w = np.polynomial.legendre.leggauss(nodes)
    t = 0.5 * (b - a) * s + 0.5 * (a + b)
    w = 0.5 * w                                           # weights of the uniform density on [a, b]
    c = curve(t)                                          # (nodes, 2)
    mean = (w[:, None] * c).sum(0)
    var = (w[:, None] * (c - mean) ** 2).sum(0) + noise ** 2
    return mean, np.sqrt(var)


def _standardised(sampler, mean, std):
    mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float64))
    std_t = torch.as_tensor(np.asarray(std, dtype=np.float64))

    def draw(n, generator):
        x, y = sampler(n, generator)
        return ((x - mean_t) / std_t).to(F32), y

    return draw


def _moons_raw(noise: float):
    def draw(n, generator):
        lab = torch.randint(0, 2, (n,), generator=generator)
        theta = math.pi * torch.rand(n, generator=generator, dtype=F64)
        upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
        lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
        x = torch.where(lab[:, None] == 0, upper, lower)
        return x + noise * torch.randn(n, 2, generator=generator, dtype=F64), lab
    return draw


SWISS_ROLL_RANGE = (1.5 * math.pi, 4.5 * math.pi)


def _swiss_roll_raw(noise: float):
    a, b = SWISS_ROLL_RANGE

    def draw(n, generator):
        t = a + (b - a) * torch.rand(n, generator=generator, dtype=F64)
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
        return x + noise * torch.randn(n, 2, generator=generator, dtype=F64), None
    return draw


def _checkerboard_raw():
    def draw(n, generator):
        i = torch.randint(0, 4, (n,), generator=generator)
        j = 2 * torch.randint(0, 2, (n,), generator=generator) + i % 2      # i + j even
        u = torch.rand(n, 2, generator=generator, dtype=F64)
        return torch.stack([i, j], 1).to(F64) + u - 2.0, None
    return draw


RING_RADII = (1.0, 2.0, 3.0, 4.0)


def _rings_raw(noise: float):
    radii = torch.tensor(RING_RADII, dtype=F64)

    def draw(n, generator):
        lab = torch.randint(0, len(RING_RADII), (n,), generator=generator)
        phi = 2 * math.pi * torch.rand(n, generator=generator, dtype=F64)
        x = radii[lab, None] * torch.stack([torch.cos(phi), torch.sin(phi)], 1)
        return x + noise * torch.randn(n, 2, generator=generator, dtype=F64), lab
    return draw


# -- loaders ------------------------------------------------------------------------------------------
def _load_mixture(split, n=10_000, seed=0):
    gm, sampler = _mixture_2d()
    return _generative("mixture", split, _positive_int(n, "n"), seed, sampler, gm.n_components, gm,
                       "2-D mixture of 6 anisotropic Gaussians (exact density: .mixture)")


def _load_mixture_nd(split, dim=8, n=10_000, seed=0, n_components=8, mixture_seed=0):
    dim, k = _positive_int(dim, "dim"), _positive_int(n_components, "n_components")
    gm, sampler = _mixture_nd(dim, k, mixture_seed)
    return _generative("mixture_nd", split, _positive_int(n, "n"), seed, sampler, k, gm,
                       f"{dim}-D diagonal Gaussian mixture with {k} components (exact density: .mixture)")


def _load_moons(split, n=10_000, seed=0, noise=0.05):
    noise = _nonneg_float(noise, "noise")
    mean = (0.5, 0.25)
    std = (math.sqrt(0.75 + noise ** 2), math.sqrt(9 / 16 - 1 / math.pi + noise ** 2))
    return _generative("moons", split, _positive_int(n, "n"), seed, _standardised(_moons_raw(noise), mean, std), 2,
                       description=f"two moons, noise {noise}, standardised")


def _load_swiss_roll(split, n=10_000, seed=0, noise=0.5):
    noise = _nonneg_float(noise, "noise")
    mean, std = _gauss_legendre_moments(lambda t: np.stack([t * np.cos(t), t * np.sin(t)], 1),
                                        *SWISS_ROLL_RANGE, noise)
    return _generative("swiss_roll", split, _positive_int(n, "n"), seed,
                       _standardised(_swiss_roll_raw(noise), mean, std), None,
                       description=f"2-D swiss roll, noise {noise}, standardised")


def _load_checkerboard(split, n=10_000, seed=0):
    std = math.sqrt(4.0 / 3.0)
    return _generative("checkerboard", split, _positive_int(n, "n"), seed,
                       _standardised(_checkerboard_raw(), (0.0, 0.0), (std, std)), None,
                       description="4x4 checkerboard (8 squares), standardised; density 1/6 on the support")


def _load_rings(split, n=10_000, seed=0, noise=0.08):
    noise = _nonneg_float(noise, "noise")
    std = math.sqrt(sum(r * r for r in RING_RADII) / len(RING_RADII) / 2 + noise ** 2)
    return _generative("rings", split, _positive_int(n, "n"), seed,
                       _standardised(_rings_raw(noise), (0.0, 0.0), (std, std)), len(RING_RADII),
                       description=f"4 concentric rings, noise {noise}, standardised")


def _split_indices(N: int, split: str, test_fraction: float, split_seed: int) -> torch.Tensor:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    n_test = max(1, int(round(N * float(test_fraction))))
    if n_test >= N:
        raise ValueError(f"test_fraction={test_fraction} leaves no training data out of {N} samples")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(int(split_seed)))
    return perm[N - n_test:] if split == "test" else perm[:N - n_test]


def _finite(name, split, native: torch.Tensor, labels, num_classes, transform, n, seed, test_fraction,
            split_seed, dequantize, description) -> Dataset:
    idx = _split_indices(native.shape[0], split, test_fraction, split_seed)
    if n is not None:
        n = _positive_int(n, "n")
        if n > idx.numel():
            raise ValueError(f"n={n} exceeds the {idx.numel()} {split} samples of {name!r}")
        idx = idx[:n]
    native = native[idx]
    labels = labels[idx] if labels is not None else None
    if transform is None:
        data = native.to(F32)
        native = None
    elif dequantize == "uniform":
        data = transform.to_model(native, transform.dequantization(), _stream(seed, split)).to(F32)
    elif dequantize == "center":
        data = transform.forward(native.to(F64) + 0.5 * transform.bin_width, "native").to(F32)
    else:
        raise ValueError(f"dequantize must be 'uniform' or 'center', got {dequantize!r}")
    return Dataset(name=name, split=split, data=data, labels=labels, num_classes=num_classes,
                   transform=transform, native=native, indices=idx, description=description)


def _load_digits(split, n=None, seed=0, test_fraction=0.2, split_seed=0, dequantize="uniform"):
    from sklearn.datasets import load_digits

    d = load_digits()
    native = torch.from_numpy(np.asarray(d.images, dtype=np.uint8)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    return _finite("digits", split, native, labels, 10, digits_transform(), n, seed, test_fraction,
                   split_seed, dequantize, "scikit-learn 8x8 digits, 17 levels onto [-1, 1)")


def _labels_from(arr: np.ndarray, name: str, num_classes: Optional[int], count: int):
    if arr.ndim != 1 or arr.shape[0] != count:
        raise ValueError(f"{name} must have shape ({count},) (one label per sample), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    labels = torch.from_numpy(arr.astype(np.int64))
    k = int(labels.max()) + 1 if num_classes is None else _positive_int(num_classes, "num_classes")
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise ValueError(f"{name} must lie in [0, {k - 1}], got range [{int(labels.min())}, {int(labels.max())}]")
    return labels, k


def _load_npz(split, path=None, key=None, label_key=None, num_classes=None, channels_last=False, n=None,
              seed=0, test_fraction=0.2, split_seed=0, dequantize="uniform"):
    if path is None:
        raise ValueError("get_dataset('npz', ...) needs path=... (a .npz file)")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a file")
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        if key is None:
            if len(keys) != 1:
                raise ValueError(f"{str(path)!r} holds arrays {keys}; pass key=... to choose one")
            key = keys[0]
        if key not in keys:
            raise ValueError(f"key={key!r} is not in {str(path)!r}; arrays: {keys}")
        arr = f[key]
        lab = None
        if label_key is not None:
            if label_key not in keys:
                raise ValueError(f"label_key={label_key!r} is not in {str(path)!r}; arrays: {keys}")
            lab = f[label_key]
    if arr.ndim < 2 or arr.shape[0] < 2:
        raise ValueError(f"array {key!r} must have shape (N, ...) with N >= 2 samples, got {arr.shape}")
    if channels_last:
        if arr.ndim != 4:
            raise ValueError(f"channels_last=True needs an (N, H, W, C) array, got {arr.shape}")
        arr = np.ascontiguousarray(np.transpose(arr, (0, 3, 1, 2)))
    labels, k = (None, None) if lab is None else _labels_from(lab, f"labels {label_key!r}", num_classes, arr.shape[0])
    if arr.dtype == np.uint8:
        transform = DataTransform.uint8_to_symmetric()
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"array {key!r} in {str(path)!r} has non-finite values")
        transform = None
    else:
        raise ValueError(f"array {key!r} has dtype {arr.dtype}; expected uint8 images or floating-point "
                         f"data already in model space")
    native = torch.from_numpy(np.ascontiguousarray(arr))
    return _finite("npz", split, native, labels, k, transform, n, seed, test_fraction, split_seed, dequantize,
                   f"{path.name}[{key}]")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _load_folder(split, path=None, size=None, mode="RGB", n=None, seed=0, test_fraction=0.2, split_seed=0,
                 dequantize="uniform"):
    from PIL import Image

    if path is None:
        raise ValueError("get_dataset('folder', ...) needs path=... (a directory of images)")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path={str(root)!r} is not a directory")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L' (grayscale), got {mode!r}")
    size = None if size is None else _positive_int(size, "size")

    def images(d: Path) -> List[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and images(p))
    files: List[Tuple[Path, int]] = [(p, -1) for p in images(root)]
    if classes and files:
        raise ValueError(f"{str(root)!r} has both images and class subfolders {classes}; use one layout")
    for c, name in enumerate(classes):
        files += [(p, c) for p in images(root / name)]
    if len(files) < 2:
        raise ValueError(f"{str(root)!r} holds {len(files)} images (extensions {IMAGE_EXTENSIONS}); need at least 2")
    arrays = []
    for p, _ in files:
        with Image.open(p) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"image {str(p)!r} has size {a.shape[:2]} but {str(files[0][0])!r} has "
                             f"{arrays[0].shape[:2]}; pass size=... to resize all images")
        arrays.append(a)
    arr = np.stack(arrays)
    arr = arr[:, None] if arr.ndim == 3 else np.transpose(arr, (0, 3, 1, 2))
    native = torch.from_numpy(np.ascontiguousarray(arr))
    labels = torch.tensor([c for _, c in files], dtype=torch.long) if classes else None
    return _finite("folder", split, native, labels, len(classes) if classes else None,
                   DataTransform.uint8_to_symmetric(), n, seed, test_fraction, split_seed, dequantize,
                   f"images from {str(root)!r} ({mode}, {arr.shape[2]}x{arr.shape[3]})")


_LOADERS: Dict[str, Callable[..., Dataset]] = {
    "mixture": _load_mixture, "mixture_nd": _load_mixture_nd, "moons": _load_moons,
    "swiss_roll": _load_swiss_roll, "checkerboard": _load_checkerboard, "rings": _load_rings,
    "digits": _load_digits, "npz": _load_npz, "folder": _load_folder,
}
#: Valid names for `get_dataset`.
DATASETS = tuple(_LOADERS)


def get_dataset(name: str, split: str = "train", **kw: Any) -> Dataset:
    """Load or generate a data set in model space.

    Parameters
    ----------
    name:
        One of `DATASETS`: ``"mixture"``, ``"mixture_nd"``, ``"moons"``, ``"swiss_roll"``,
        ``"checkerboard"``, ``"rings"``, ``"digits"``, ``"npz"``, ``"folder"`` (see the module
        notes for each set, its exact density or transform, and its options).
    split:
        ``"train"`` or ``"test"`` (independent draws for generative sets, disjoint index sets for
        finite ones).
    **kw:
        ``n`` (samples; default 10 000 for generative sets, the whole split for finite ones),
        ``seed`` (default 0) and the set's own options.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid names), unknown split or option, bad option values.

    Examples
    --------
    >>> ds = get_dataset("mixture", n=1000, seed=0)
    >>> ds.data.shape, ds.num_classes
    (torch.Size([1000, 2]), 6)
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set name {name!r}; valid names: {list(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    loader = _LOADERS[name]
    params = [p for p in inspect.signature(loader).parameters if p != "split"]
    unknown = sorted(k for k in kw if k not in params)
    if unknown:
        raise ValueError(f"data set {name!r} does not take options {unknown}; valid options: {params}")
    if "seed" in kw and (isinstance(kw["seed"], bool) or not isinstance(kw["seed"], numbers.Integral)
                         or int(kw["seed"]) < 0):
        raise ValueError(f"seed must be a non-negative integer, got {kw['seed']!r}")
    return loader(split, **kw)
