"""Tests of the public codebook API: ``rotorquant.codebook(dim, bits, density="sphere")``.

The numbers come from the C++ solver (docs/codebook.md); a slow numpy oracle checks the
Lloyd-Max optimality conditions for the Gaussian density independently.
"""
import math

import numpy as np
import pytest

import rotorquant

GOLDEN_TOTALS_D128 = {
    "sphere": [0.3609, 0.1160, 0.0340, 0.0093],
    "gaussian": [0.3634, 0.1175, 0.0345, 0.0095],
}


def test_attributes_types_and_shapes():
    cb = rotorquant.codebook(128, 3)
    assert cb.dim == 128
    assert cb.bits == 3
    assert cb.density == "sphere"
    assert isinstance(cb.centroids, np.ndarray) and cb.centroids.dtype == np.float64
    assert isinstance(cb.boundaries, np.ndarray) and cb.boundaries.dtype == np.float64
    assert cb.centroids.shape == (8,)
    assert cb.boundaries.shape == (7,)
    assert isinstance(cb.mse_total, float) and isinstance(cb.mse_per_coordinate, float)
    assert cb.mse_total == pytest.approx(128 * cb.mse_per_coordinate, rel=1e-14)


@pytest.mark.parametrize("density", ["sphere", "gaussian"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_golden_totals_d128(density, bits):
    cb = rotorquant.codebook(128, bits, density=density)
    assert abs(cb.mse_total - GOLDEN_TOTALS_D128[density][bits - 1]) < 5e-5


def test_golden_closed_forms_one_bit():
    gaussian = rotorquant.codebook(128, 1, density="gaussian")
    assert gaussian.centroids[1] == pytest.approx(math.sqrt(2 / math.pi) / math.sqrt(128), rel=1e-14)
    assert gaussian.mse_total == pytest.approx(1 - 2 / math.pi, rel=1e-13)
    # Sphere: E|X| = 2 Gamma(d/2) / ((d - 1) sqrt(pi) Gamma((d - 1)/2)).
    d = 128
    mean_abs = 2 * math.exp(math.lgamma(d / 2) - math.lgamma((d - 1) / 2)) / ((d - 1) * math.sqrt(math.pi))
    sphere = rotorquant.codebook(d, 1)
    assert sphere.centroids[1] == pytest.approx(mean_abs, rel=1e-12)
    assert sphere.boundaries[0] == 0.0


@pytest.mark.parametrize("density", ["sphere", "gaussian"])
@pytest.mark.parametrize("dim,bits", [(2, 3), (3, 8), (64, 4), (128, 8), (4096, 5)])
def test_symmetric_monotone_midpoints(density, dim, bits):
    cb = rotorquant.codebook(dim, bits, density=density)
    c, b = cb.centroids, cb.boundaries
    assert c.shape == (2**bits,) and b.shape == (2**bits - 1,)
    np.testing.assert_array_equal(c, -c[::-1])
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(b, (c[:-1] + c[1:]) / 2)
    assert np.all((c[:-1] < b) & (b < c[1:]))
    if density == "sphere":
        assert c[-1] < 1.0


def test_d3_sphere_is_uniform_quantiser():
    # A coordinate of a uniform unit vector in R^3 is uniform on [-1, 1].
    cb = rotorquant.codebook(3, 5)
    levels = 32
    expected = -1 + (2 * np.arange(levels) + 1) / levels
    np.testing.assert_allclose(cb.centroids, expected, rtol=0, atol=1e-12)
    assert cb.mse_total == pytest.approx(4.0**-5, rel=1e-10)


def _gaussian_cell_means(boundaries, sigma):
    """Slow oracle: E[X | cell] for N(0, sigma^2), cells cut at `boundaries`."""
    edges = np.concatenate([[-np.inf], boundaries, [np.inf]])
    cdf = np.array([0.5 * math.erfc(-e / (sigma * math.sqrt(2))) if np.isfinite(e) else float(e > 0) for e in edges])
    pdf = np.array([math.exp(-0.5 * (e / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)) if np.isfinite(e) else 0.0
                    for e in edges])
    probability = np.diff(cdf)
    moment = sigma**2 * (pdf[:-1] - pdf[1:])
    return moment / probability, probability


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_gaussian_centroids_are_cell_means(bits):
    dim = 256
    sigma = 1 / math.sqrt(dim)
    cb = rotorquant.codebook(dim, bits, density="gaussian")
    means, probability = _gaussian_cell_means(cb.boundaries, sigma)
    # The erf-difference oracle in double loses relative accuracy in the upper tail cells.
    np.testing.assert_allclose(cb.centroids / sigma, means / sigma, rtol=0, atol=1e-9)
    mse = sigma**2 - np.sum(probability * cb.centroids**2)
    assert cb.mse_per_coordinate == pytest.approx(mse, rel=1e-7)


@pytest.mark.parametrize("density", ["sphere", "gaussian"])
def test_mse_decreases_and_within_paper_bounds(density):
    upper = math.sqrt(3) * math.pi / 2
    for dim in (4, 64, 128, 1024):
        totals = [rotorquant.codebook(dim, b, density=density).mse_total for b in range(1, 9)]
        assert all(a > b for a, b in zip(totals, totals[1:]))
        for b, total in enumerate(totals, start=1):
            assert 4.0**-b <= total <= upper * 4.0**-b


def test_sphere_approaches_gaussian():
    gaussian = rotorquant.codebook(64, 4, density="gaussian").mse_total
    gaps = [abs(rotorquant.codebook(d, 4).mse_total - gaussian) for d in (16, 128, 1024, 65536)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-5


def test_quantize_dequantize_round_trip_and_tie_rule():
    cb = rotorquant.codebook(128, 3)
    b32 = cb.boundaries.astype(np.float32)
    idx = cb.quantize(b32)
    np.testing.assert_array_equal(idx, np.arange(1, 8))  # exactly on a boundary -> upper cell
    below = np.nextafter(b32, np.float32(-1))
    np.testing.assert_array_equal(cb.quantize(below), np.arange(0, 7))
    np.testing.assert_array_equal(cb.quantize(cb.centroids.astype(np.float32)), np.arange(8))
    decoded = cb.dequantize(np.arange(8, dtype=np.uint8))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, cb.centroids.astype(np.float32))


def test_monte_carlo_mse():
    dim = 128
    cb = rotorquant.codebook(dim, 3, density="gaussian")
    x = np.random.default_rng(0).normal(0.0, 1 / math.sqrt(dim), size=200_000).astype(np.float32)
    xhat = cb.dequantize(cb.quantize(x))
    mse = float(np.mean((x.astype(np.float64) - xhat) ** 2))
    assert mse == pytest.approx(cb.mse_per_coordinate, rel=0.02)
    # And the index is the nearest centroid.
    nearest = np.argmin(np.abs(x[:2000, None].astype(np.float64) - cb.centroids[None, :]), axis=1)
    np.testing.assert_array_equal(cb.quantize(x[:2000]), nearest)


def test_cached_results_are_identical():
    a = rotorquant.codebook(96, 6)
    b = rotorquant.codebook(96, 6)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.mse_total == b.mse_total


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits(bits):
    with pytest.raises(ValueError):
        rotorquant.codebook(128, bits)


@pytest.mark.parametrize("dim", [1, 0, -4, (1 << 24) + 1])
def test_bad_dim(dim):
    with pytest.raises(ValueError):
        rotorquant.codebook(dim, 3)


def test_bad_density():
    with pytest.raises(ValueError):
        rotorquant.codebook(128, 3, density="foo")


def test_core_bindings_directly():
    core = rotorquant._core
    solved = core.codebook(128, 2, "gaussian")
    assert solved["centroids"].dtype == np.float64 and solved["centroids"].shape == (4,)
    assert solved["boundaries"].dtype == np.float64 and solved["boundaries"].shape == (3,)
    assert solved["mse_total"] == pytest.approx(128 * solved["mse_per_coordinate"], rel=1e-14)
    idx = core.codebook_quantize(128, 2, "gaussian", np.array([-1.0, 0.0, 1.0], dtype=np.float32))
    assert idx.dtype == np.uint8
    np.testing.assert_array_equal(idx, [0, 2, 3])
    values = core.codebook_dequantize(128, 2, "gaussian", idx)
    assert values.dtype == np.float32
    with pytest.raises(TypeError):
        core.codebook_quantize(128, 2, "gaussian", np.zeros(3, dtype=np.float64))
    with pytest.raises(ValueError):
        core.codebook_quantize(128, 2, "gaussian", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        core.codebook_dequantize(128, 2, "gaussian", np.array([4], dtype=np.uint8))
    with pytest.raises(ValueError):
        core.codebook(128, 9, "sphere")
    with pytest.raises(TypeError):
        core.codebook(128, 3, "foo")
