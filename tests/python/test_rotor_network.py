"""The rotor_network rotation (docs/rotor_network.md) through the public API.

Structure against an independent numpy oracle (Kronecker product of the Sylvester Hadamard matrix and the
odd-radix blocks, times the sign diagonal), the mixing-balance bound for every head_dim of the issue, the
Lloyd-Max total on isotropic data for non-power-of-two sizes, and its purpose: on keys with outlier channels
it must do as well as a dense Haar rotation (measured margin ~15%, asserted at 5%), on synthetic and on the
bundled real SmolLM2 keys. CUDA: the forward map is bit-identical to the CPU core.
"""
import numpy as np
import pytest

import rotorquant as rq
from rotorquant.data import load_kv_sample, outlier_keys

ISSUE_DIMS = [64, 80, 96, 112, 128, 160, 192, 256]
# p * M_ij^2 range of one block stage, [r min B_r^2, r max B_r^2] (docs/rotor_network.md, section 3).
STAGE_WEIGHT_RANGE = {3: (1 / 3, 4 / 3), 5: (0.5709, 1.7562), 7: (0.4504, 2.2324)}


def sylvester(n):
    i = np.arange(n)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.array([bin(int(v)).count("1") % 2 for v in bits.ravel()]).reshape(n, n)
    return np.where(parity == 1, -1.0, 1.0)


def split_padded_dim(p):
    """(2^a, odd prime factors ascending) of a 7-smooth p."""
    two = 1
    while p % 2 == 0:
        p //= 2
        two *= 2
    odd = []
    for r in (3, 5, 7):
        while p % r == 0:
            p //= r
            odd.append(r)
    assert p == 1
    return two, odd


def oracle_matrix(rotation):
    """(B_{r_Q} (x) ... (x) B_{r_1} (x) H / sqrt(2^a)) diag(s) from the parameters, in float64."""
    p = rotation.padded_dim
    params = rotation.parameters().astype(np.float64)
    two, odd = split_padded_dim(p)
    offsets, offset = {}, p
    for r in sorted(set(odd)):
        offsets[r] = offset
        offset += r * r
    assert params.size == offset
    m = sylvester(two) / np.sqrt(two)
    for r in odd:
        m = np.kron(params[offsets[r]:offsets[r] + r * r].reshape(r, r), m)
    signs = params[:p]
    assert set(np.unique(signs)) <= {-1.0, 1.0}
    return m * signs[None, :]


@pytest.mark.parametrize("dim", [1, 2, 3, 12, 45, 63, 80, 96, 100, 112, 130])
def test_matrix_matches_kronecker_oracle_and_apply(dim):
    rotation = rq.Rotation("rotor_network", dim, seed=dim)
    m = oracle_matrix(rotation)
    np.testing.assert_allclose(rotation.matrix(), m, rtol=0, atol=1e-12)
    x = np.random.default_rng(dim).standard_normal((5, dim)).astype(np.float32)
    padded = np.zeros((5, rotation.padded_dim))
    padded[:, :dim] = x
    np.testing.assert_allclose(rotation.apply(x), padded @ m.T, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rotation.inverse(rotation.apply(x)), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dim", [4, 64, 128, 256])
def test_power_of_two_is_the_randomized_hadamard_transform(dim):
    rotation = rq.Rotation("rotor_network", dim, seed=3)
    signs = rotation.parameters()
    assert rotation.padded_dim == dim and signs.size == dim
    np.testing.assert_allclose(rotation.matrix() * np.sqrt(dim), sylvester(dim) * signs[None, :], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", ISSUE_DIMS + [576])
def test_mixing_balance_bound(dim):
    """Every output mixes every input: p M_ij^2 lies in the product of the stage ranges (radix 2: exactly 1)."""
    rotation = rq.Rotation("rotor_network", dim, seed=0)
    assert rotation.padded_dim == dim  # the issue's head_dims need no padding
    assert rotation.num_parameters <= 4 * dim
    low = high = 1.0
    for r in split_padded_dim(dim)[1]:
        low *= STAGE_WEIGHT_RANGE[r][0]
        high *= STAGE_WEIGHT_RANGE[r][1]
    weights = dim * rotation.matrix() ** 2
    assert weights.min() >= low * (1 - 1e-4) and weights.max() <= high * (1 + 1e-4), (weights.min(), weights.max())


@pytest.mark.parametrize("dim", [80, 96, 112, 160])
@pytest.mark.parametrize("bits", [2, 3])
def test_mse_matches_lloyd_max_total_without_padding(dim, bits):
    """Isotropic unit vectors: mean error within 2% of the Lloyd-Max total (n = 3000: s.e. ~0.5%)."""
    q = rq.Quantizer(dim, bits, rotation="rotor_network", seed=bits, norm_dtype="float32")
    assert q.padded_dim == dim
    x = np.random.default_rng(dim + bits).standard_normal((3000, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    err = np.mean(np.sum((x - q.decode(q.encode(x))) ** 2, axis=1))
    total = rq.codebook(dim, bits).mse_total
    assert abs(err / total - 1) < 0.02, (err, total)


def test_outlier_keys_generator():
    """rotorquant.data.outlier_keys (shared by this file and benchmarks/bench_rotor_network.py): float32, seeded,
    drawn in row blocks that give exactly one standard_normal((n, dim)) draw, and max(2, dim // 32) channels whose
    RMS is 10-20x their scale (> 5x the median channel RMS; the other channels' scales are within e^+-0.5)."""
    dim, n, seed = 1024, 4200, 11  # 4096-row blocks at dim 1024: two blocks
    x = outlier_keys(dim, n, seed)
    assert x.dtype == np.float32 and x.shape == (n, dim)
    rng = np.random.default_rng(seed)  # the documented recipe in one draw
    scale = np.exp(rng.uniform(-0.5, 0.5, dim))
    count = max(2, dim // 32)
    channels = rng.choice(dim, count, replace=False)
    scale[channels] *= rng.uniform(10, 20, count)
    mean = np.zeros(dim)
    mean[channels] = 0.5 * scale[channels] * rng.choice([-1.0, 1.0], count)
    np.testing.assert_array_equal(x, (mean + scale * rng.standard_normal((n, dim))).astype(np.float32))
    np.testing.assert_array_equal(outlier_keys(dim, 10, seed), x[:10])
    for d in (64, 96, 1024):
        rms = np.sqrt((outlier_keys(d, 3000, d).astype(np.float64) ** 2).mean(axis=0))
        assert (rms > 5 * np.median(rms)).sum() == max(2, d // 32)


def relative_mse(kind, x, bits=3, seed=0):
    q = rq.Quantizer(x.shape[1], bits, rotation=kind, seed=seed)
    err = np.asarray(q.decode(q.encode(x)), np.float64) - x
    return float((err ** 2).sum() / (x.astype(np.float64) ** 2).sum())


@pytest.mark.parametrize("dim", [80, 96, 112, 160])
def test_outlier_keys_as_good_as_dense(dim):
    """The issue's target: within 5% of dense (Haar) relative MSE on keys with 10-20x outlier channels,
    and far better than the block rotors, which keep an outlier inside its block."""
    x = outlier_keys(dim, 2000, seed=dim)
    network = relative_mse("rotor_network", x)
    dense = relative_mse("dense", x)
    quat = relative_mse("quat", x)
    assert network <= 1.05 * dense, (network, dense)
    assert network < 0.5 * quat, (network, quat)


def test_real_smollm2_keys_as_good_as_dense():
    sample = load_kv_sample()
    keys = np.concatenate([sample["k"][layer].reshape(-1, sample["k"][layer].shape[-1]) for layer in sample["layers"]])
    network = relative_mse("rotor_network", keys)
    dense = relative_mse("dense", keys)
    assert network <= 1.05 * dense, (network, dense)


def test_codes_round_trip_through_bytes():
    q = rq.Quantizer(96, 3, rotation="rotor_network", seed=5)
    x = outlier_keys(96, 10, seed=1)
    codes = q.encode(x)
    assert codes.bytes_per_vector == 96 * 3 // 8 + 2  # no padding: 36 B of indices + fp16 norm
    again = rq.Codes.from_bytes(codes.to_bytes())
    assert again == codes and again.params["rotation"] == "rotor_network"
    np.testing.assert_array_equal(q.decode(again), q.decode(codes))


def test_validation():
    with pytest.raises(ValueError):
        rq.Rotation("rotor_network", 0)
    with pytest.raises(ValueError, match="rotor_network"):
        rq.Rotation("rotor_network", 2**24 + 1)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [2, 7, 63, 64, 80, 96, 112, 130, 160, 192, 576, 1000, 4100, 8192])
def test_cuda_forward_is_bit_identical_to_cpu(dim):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not rq.has_cuda():
        pytest.skip("needs a CUDA device and a CUDA build")
    rotation = rq.Rotation("rotor_network", dim, seed=dim)
    x = torch.randn(333, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float32)
    y_cuda = rotation.apply(x.to("cuda"))
    torch.cuda.synchronize()
    assert torch.equal(y_cuda.cpu(), rotation.apply(x))  # canonical forward arithmetic on both
    back = rotation.inverse(y_cuda)
    torch.cuda.synchronize()
    torch.testing.assert_close(back.cpu(), rotation.inverse(rotation.apply(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_rejects_too_large_rows():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not rq.has_cuda():
        pytest.skip("needs a CUDA device and a CUDA build")
    rotation = rq.Rotation("rotor_network", 8193, seed=0)  # padded_dim 8232 > 8192
    assert rotation.padded_dim > 8192
    with pytest.raises(ValueError, match="rotor_network"):
        rotation.apply(torch.zeros(1, 8193, device="cuda"))
