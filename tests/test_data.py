"""Data sets: shapes, dtypes, seeding, splits, transforms, exact distributions, loaders, bad input.

Statistical tests use fixed seeds (the suite is deterministic); their false-alarm rates for a
fresh seed are stated next to each threshold.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffusion.data import DATASETS, Dataset, digits_transform, get_dataset

GENERATIVE = ["mixture", "mixture_nd", "moons", "swiss_roll", "checkerboard", "rings"]
EXPECTED_CLASSES = {"mixture": 6, "mixture_nd": 8, "moons": 2, "swiss_roll": None, "checkerboard": None, "rings": 4}


@pytest.mark.parametrize("name", GENERATIVE)
def test_generative_sets_shapes_dtypes_seeds_and_splits(name):
    tr = get_dataset(name, n=300, seed=1)
    assert isinstance(tr, Dataset) and tr.generative and tr.split == "train"
    d = 8 if name == "mixture_nd" else 2
    assert tr.data.shape == (300, d) and tr.data.dtype == torch.float32 and tr.shape == (d,)
    assert torch.isfinite(tr.data).all()
    assert tr.num_classes == EXPECTED_CLASSES[name]
    if tr.num_classes is None:
        assert tr.labels is None
    else:
        assert tr.labels.dtype == torch.long and tr.labels.shape == (300,)
        assert 0 <= int(tr.labels.min()) and int(tr.labels.max()) < tr.num_classes
    assert (tr.mixture is not None) == name.startswith("mixture")
    assert tr.transform is None
    # determinism by seed, and independent train/test streams
    assert torch.equal(get_dataset(name, n=300, seed=1).data, tr.data)
    assert not torch.equal(get_dataset(name, n=300, seed=2).data, tr.data)
    te = get_dataset(name, split="test", n=300, seed=1)
    assert not torch.equal(te.data, tr.data)
    common = (tr.data[:, None, :] == te.data[None, :, :]).all(-1)
    assert not common.any()                                   # no test point is a training point
    # fresh draws: deterministic per generator, labels consistent
    x1, y1 = tr.sample(50, torch.Generator().manual_seed(5), return_labels=True)
    x2 = tr.sample(50, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and x1.shape == (50, d) and x1.dtype == torch.float32
    assert (y1 is None) == (tr.labels is None)


@pytest.mark.parametrize("name", ["moons", "swiss_roll", "checkerboard", "rings"])
def test_toy_sets_are_standardised_by_their_exact_moments(name):
    """Population mean 0 and variance 1 per coordinate, from the exact moments in the docstring.

    n = 40 000; each check is at 5 standard errors (false alarm ~6e-7 each, < 1e-5 for the 16
    checks of this test together for a fresh seed)."""
    x = get_dataset(name, n=40_000, seed=0).data.double()
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    se_mean = x.std(0) / math.sqrt(n)
    se_var = ((x - mean) ** 4).mean(0).sub(var ** 2).sqrt() / math.sqrt(n)
    assert (mean.abs() < 5 * se_mean).all(), (mean, se_mean)
    assert ((var - 1).abs() < 5 * se_var).all(), (var, se_var)


def test_checkerboard_support():
    x = get_dataset("checkerboard", n=5000, seed=0).data.double() * math.sqrt(4 / 3)   # back to [-2, 2]^2
    assert x.abs().max() <= 2
    cell = torch.floor(x + 2)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()              # only squares with i + j even


@pytest.mark.parametrize("name,kw", [("mixture", {}), ("mixture_nd", {"dim": 8})])
def test_mixture_data_are_distributed_as_the_exact_mixture(name, kw):
    """Labels ~ Categorical(weights) (chi-square test) and, given label k, the squared Mahalanobis
    distance under component k's exact covariance ~ chi2(d) (Kolmogorov–Smirnov per component).
    Bonferroni over the 1 + K tests at a family-wise level of 1e-3: the false-alarm rate of this
    test for a fresh seed is at most 1e-3."""
    ds = get_dataset(name, n=20_000, seed=3, **kw)
    gm = ds.mixture
    K, d = gm.n_components, gm.dim
    alpha = 1e-3 / (1 + K)
    counts = torch.bincount(ds.labels, minlength=K).double()
    expected = gm.weights * len(ds)
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > alpha
    x = ds.data.double().reshape(len(ds), d)
    means, covs = gm.means.reshape(K, d), gm.covariance_matrices()
    for k in range(K):
        r = x[ds.labels == k] - means[k]
        m2 = (r * torch.linalg.solve(covs[k], r.T).T).sum(1)
        assert stats.kstest(m2.numpy(), stats.chi2(d).cdf).pvalue > alpha, k
    # the oracle's own density at t = 0 agrees with the data on average (log-likelihood sanity)
    assert torch.isfinite(gm.log_prob(x)).all()


def test_mixture_nd_distribution_is_fixed_by_mixture_seed():
    a = get_dataset("mixture_nd", dim=4, n=10, seed=0)
    b = get_dataset("mixture_nd", dim=4, n=10, seed=1, split="test")
    c = get_dataset("mixture_nd", dim=4, n=10, seed=0, mixture_seed=1)
    assert torch.equal(a.mixture.means, b.mixture.means)
    assert not torch.equal(a.mixture.means, c.mixture.means)
    assert a.data.shape == (10, 4) and a.mixture.dim == 4


def test_digits_shapes_split_and_transform():
    tr, te = get_dataset("digits"), get_dataset("digits", split="test")
    assert tr.shape == (1, 8, 8) and tr.data.dtype == torch.float32 and tr.num_classes == 10
    assert len(tr) + len(te) == 1797 and len(te) == round(0.2 * 1797)
    assert set(tr.indices.tolist()).isdisjoint(te.indices.tolist())
    assert sorted(tr.indices.tolist() + te.indices.tolist()) == list(range(1797))
    assert set(tr.labels.unique().tolist()) == set(range(10))
    assert tr.native.dtype == torch.uint8 and int(tr.native.max()) == 16
    # the transform: 17 levels onto [-1, 1), log|dx/dy| = log(2/17) per dimension
    t = tr.transform
    assert t.discrete_levels == 17 and t.low == 0 and t.high == 16 and t.bin_width == 1
    assert t.log_abs_det_jacobian_per_dim == pytest.approx(math.log(2 / 17), abs=1e-15)
    assert t.support() == (0, 17, False)
    assert float(t.forward(torch.zeros(1, 1))) == -1.0 and float(t.forward(torch.full((1, 1), 17.0 - 1e-12, dtype=torch.float64))) < 1
    # round trip on the 17 levels: forward then inverse returns the level (to 1e-13; exact after rounding)
    k = torch.arange(17, dtype=torch.float64)[None]
    back = t.inverse(t.forward(k))
    assert (back - k).abs().max() < 1e-13 and torch.equal(torch.round(back), k)
    # .data is one dequantization draw: each value lies in its own bin (up to float32 rounding)
    y = t.inverse(tr.data.double()) - tr.native.double()
    assert y.min() > -1e-5 and y.max() < 1 + 1e-5
    assert tr.data.min() >= -1 and tr.data.max() <= 1      # [-1, 1) up to float32 rounding
    # same seed same data; a new seed redraws only the dequantization noise
    assert torch.equal(get_dataset("digits").data, tr.data)
    other = get_dataset("digits", seed=1)
    assert torch.equal(other.native, tr.native) and not torch.equal(other.data, tr.data)
    # bin centres, and fresh draws through dequantized()
    centre = get_dataset("digits", dequantize="center")
    assert torch.allclose(t.inverse(centre.data.double()), tr.native.double() + 0.5, atol=1e-5)
    fresh = tr.dequantized(torch.Generator().manual_seed(99), index=torch.arange(4))
    assert fresh.shape == (4, 1, 8, 8) and not torch.equal(fresh, tr.data[:4])
    assert torch.equal(torch.floor(t.inverse(fresh.double()) + 1e-5).clamp(max=16), tr.native[:4].double())
    with pytest.raises(ValueError, match="finite sample"):
        tr.sample(3)


def test_digits_n_and_options():
    assert len(get_dataset("digits", n=100)) == 100
    with pytest.raises(ValueError, match=r"n=2000 exceeds the 1438 train samples"):
        get_dataset("digits", n=2000)
    with pytest.raises(ValueError, match="dequantize must be 'uniform' or 'center'"):
        get_dataset("digits", dequantize="floor")
    with pytest.raises(ValueError, match="test_fraction must lie in"):
        get_dataset("digits", test_fraction=1.5)


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(20, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(20) % 3
    floats = rng.normal(size=(20, 5)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x=imgs, y=labels, f=floats)
    tr = get_dataset("npz", path=str(path), key="x", label_key="y", channels_last=True)
    te = get_dataset("npz", path=path, key="x", label_key="y", channels_last=True, split="test")
    assert tr.shape == (3, 4, 4) and len(tr) == 16 and len(te) == 4 and tr.num_classes == 3
    assert set(tr.indices.tolist()).isdisjoint(te.indices.tolist())
    src = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    assert torch.equal(tr.native, src[tr.indices]) and torch.equal(tr.labels, torch.from_numpy(labels)[tr.indices])
    assert tr.transform.discrete_levels == 256 and tr.transform.scale == 2 / 256     # uint8_to_symmetric
    y = tr.transform.inverse(tr.data.double()) - tr.native.double()
    assert y.min() > -1e-4 and y.max() < 1 + 1e-4
    fl = get_dataset("npz", path=path, key="f")
    assert fl.transform is None and fl.shape == (5,)
    assert torch.equal(fl.data, torch.from_numpy(floats)[fl.indices])
    with pytest.raises(ValueError, match=r"holds arrays \['x', 'y', 'f'\]; pass key="):
        get_dataset("npz", path=path)
    with pytest.raises(ValueError, match="key='z' is not in"):
        get_dataset("npz", path=path, key="z")
    with pytest.raises(ValueError, match="needs path="):
        get_dataset("npz")
    np.savez(tmp_path / "bad.npz", x=np.arange(10, dtype=np.int32).reshape(5, 2))
    with pytest.raises(ValueError, match="dtype int32"):
        get_dataset("npz", path=tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="pickle"):                  # never unpickles
        get_dataset("npz", path=tmp_path / "obj.npz")


def test_folder_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = {}
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(5):
            a = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / cls / f"{i}.png")
            pixels[(c, i)] = a
    Image.fromarray(rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)).save(tmp_path / "dog" / "big.png")
    with pytest.raises(ValueError, match="pass size="):
        get_dataset("folder", path=tmp_path)
    (tmp_path / "dog" / "big.png").unlink()
    tr = get_dataset("folder", path=tmp_path, test_fraction=0.2)
    te = get_dataset("folder", path=tmp_path, split="test", test_fraction=0.2)
    assert tr.shape == (3, 6, 6) and len(tr) == 8 and len(te) == 2 and tr.num_classes == 2
    files = [(c, i) for c in range(2) for i in range(5)]               # sorted class folders, sorted files
    for row, j in enumerate(tr.indices.tolist()):
        c, i = files[j]
        assert int(tr.labels[row]) == c
        assert torch.equal(tr.native[row], torch.from_numpy(pixels[(c, i)]).permute(2, 0, 1))
    assert tr.transform.discrete_levels == 256 and tr.transform.scale == 2 / 256
    gray = get_dataset("folder", path=tmp_path, mode="L", size=4)
    assert gray.shape == (1, 4, 4) and gray.native.dtype == torch.uint8
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(5, 5), dtype=np.uint8)).save(flat / f"{i}.png")
    f = get_dataset("folder", path=flat, mode="L", test_fraction=0.34)
    assert f.labels is None and f.num_classes is None and f.shape == (1, 5, 5)
    with pytest.raises(ValueError, match="is not a directory"):
        get_dataset("folder", path=tmp_path / "missing")
    with pytest.raises(ValueError, match="mode must be 'RGB' or 'L'"):
        get_dataset("folder", path=tmp_path, mode="CMYK")


def test_bad_names_and_options():
    with pytest.raises(ValueError, match=r"unknown data set name 'cifar'; valid names: \['mixture', .*'folder'\]"):
        get_dataset("cifar")
    assert len(DATASETS) == 9
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        get_dataset("moons", split="val")
    with pytest.raises(ValueError, match=r"does not take options \['dim'\]"):
        get_dataset("moons", dim=3)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        get_dataset("moons", n=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        get_dataset("moons", seed=-1)
    with pytest.raises(ValueError, match="noise must be a finite number"):
        get_dataset("rings", noise=float("nan"))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        get_dataset("moons", n=10).sample(0)


def test_digits_transform_constant_free():
    t = digits_transform()
    assert t.scale == 2 / 17 and t.shift == -1 and t.discrete_levels == 17
