"""rotorquant.Quantizer / Codes through the public API: statistics, format, special values, interop."""
import pickle

import numpy as np
import pytest

import rotorquant as rq

KINDS = ["identity", "dense", "hadamard", "rotor3", "planar", "quat", "rotor_network"]


def unit_vectors(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# -- MSE against the Lloyd-Max optimum ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_matches_lloyd_max_total(kind, d, bits):
    """Isotropic unit vectors: mean ||x - x^||^2 within 2% of the Lloyd-Max total of padded_dim.
    n = 3000 puts the standard error of the mean at ~0.3-0.6%, far inside 2%.

    rotor3 zero-pads 64/128/256 to 66/129/258 (the seed's construction). In the rotated space the
    padded group carries less energy than the codebook expects, which costs up to ~3% there (d=64,
    b=1); decoding drops the padded coordinates, and the decoded error is back at the total. The
    C++ tests check the rotated-space error against its exact expectation."""
    q = rq.Quantizer(d, bits, rotation=kind, seed=bits, norm_dtype="float32")
    x = unit_vectors(3000, d, seed=d * 10 + bits)
    err = np.mean(np.sum((x - q.decode(q.encode(x))) ** 2, axis=1))
    book = rq.codebook(q.padded_dim, bits)
    assert abs(err / book.mse_total - 1) < 0.02, (err, book.mse_total)
    if q.padded_dim != d:
        y = rq.Rotation(kind, d, seed=bits).apply(x)
        rotated_err = np.mean(np.sum((y - book.dequantize(book.quantize(y))) ** 2, axis=1))
        assert err <= rotated_err * 1.001


def test_rotation_inside_quantizer_is_not_a_no_op():
    """A one-hot vector is the worst case for identity (all energy in one coordinate): a real rotation
    spreads it and brings the error down to the isotropic level; a silent no-op would not."""
    x = np.zeros((1, 128), np.float32)
    x[0, 5] = 3.0
    errors = {}
    for kind in KINDS:
        q = rq.Quantizer(128, 3, rotation=kind, seed=0)
        errors[kind] = float(np.sum((q.decode(q.encode(x)) - x) ** 2) / 9.0)
    assert errors["identity"] > 0.5
    for kind in ("dense", "hadamard", "rotor_network"):
        assert errors[kind] < 0.1, errors
    identity_out = rq.Quantizer(128, 3, rotation="identity").decode(rq.Quantizer(128, 3, rotation="identity").encode(x))
    for kind in ("rotor3", "planar", "quat"):  # block rotations spread the spike over their block only
        q = rq.Quantizer(128, 3, rotation=kind, seed=0)
        out = q.decode(q.encode(x))
        assert np.count_nonzero(np.abs(out[0] - identity_out[0]) > 1e-3) >= 1, kind
        assert errors[kind] < errors["identity"] * 0.97, errors


def test_decode_is_exactly_the_inverse_rotation_of_centroids():
    q = rq.Quantizer(64, 3, rotation="hadamard", seed=4, norm_dtype="float32")
    x = unit_vectors(10, 64, 1) * 7.0
    codes = q.encode(x)
    rotation = rq.Rotation("hadamard", 64, seed=4)
    book = rq.codebook(64, 3)
    idx = book.quantize(rotation.apply(x / np.linalg.norm(x, axis=1, keepdims=True)))
    expected = rotation.inverse(book.dequantize(idx)) * codes.norms[:, None]
    np.testing.assert_allclose(q.decode(codes), expected, rtol=1e-5, atol=1e-6)


# -- inner products -------------------------------------------------------------------------
def slope(truth, estimate):
    t = truth - truth.mean()
    return float(np.sum(t * (estimate - estimate.mean())) / np.sum(t * t))


def test_prod_is_unbiased_with_theoretical_variance():
    """Slope of estimate on truth within 0.02 of 1 over 20k pairs; empirical variance of the error
    within 15% of theory. Given the residual r (known from the (b-1)-bit mse stage) the QJL term of m
    Gaussian rows has variance (pi/2)/m * (||r||^2 ||y||^2 - (2/pi) <y, r>^2)."""
    d, bits, truths, estimates, variances = 128, 3, [], [], []
    for seed in range(10):
        prod = rq.Quantizer(d, bits, mode="prod", seed=seed, norm_dtype="float32")
        mse = rq.Quantizer(d, bits - 1, mode="mse", seed=seed, norm_dtype="float32")
        x = unit_vectors(40, d, 100 + seed) * 2.0
        y = unit_vectors(50, d, 200 + seed)
        codes = prod.encode(x)
        est = prod.inner_product(codes, y)
        r = x - mse.decode(mse.encode(x))
        np.testing.assert_allclose(np.linalg.norm(r, axis=1) / 2.0, codes.residual_norms, rtol=1e-4)
        yr = y @ r.T
        var = (np.pi / 2) / prod.qjl_dim * (np.sum(r * r, axis=1)[None, :] * np.sum(y * y, axis=1)[:, None]
                                            - (2 / np.pi) * yr ** 2)
        truths.append(y @ x.T)
        estimates.append(est)
        variances.append(var)
    truth, estimate, var = (np.concatenate([a.ravel() for a in arrays]) for arrays in (truths, estimates, variances))
    assert truth.size >= 20000
    assert abs(slope(truth, estimate) - 1) < 0.02
    ratio = np.var(estimate - truth) / np.mean(var)
    assert abs(ratio - 1) < 0.15, ratio


def test_mse_inner_products_shrink():
    """mse codes are biased towards zero: E[<y, x^>] = (1 - mse_total) <y, x> roughly (the slope shows it)."""
    q = rq.Quantizer(128, 2, rotation="dense", seed=1, norm_dtype="float32")
    x = unit_vectors(400, 128, 5)
    y = x[:200] + 0.5 * unit_vectors(200, 128, 6)  # correlated queries give a wide range of truths
    truth, est = y @ x.T, q.inner_product(q.encode(x), y)
    s = slope(truth.ravel(), est.ravel())
    total = rq.codebook(128, 2).mse_total
    assert 1 - 2 * total < s < 1 - total / 2, (s, total)


@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_inner_product_matches_decode_for_mse_and_shapes(mode):
    q = rq.Quantizer(96, 3, rotation="rotor3", mode=mode, seed=3)
    x = unit_vectors(30, 96, 7).reshape(5, 6, 96)
    y = unit_vectors(4, 96, 8)
    codes = q.encode(x)
    est = q.inner_product(codes, y)
    assert est.shape == (4, 5, 6) and est.dtype == np.float32
    if mode == "mse":
        np.testing.assert_allclose(est, np.einsum("qd,abd->qab", y, q.decode(codes)), rtol=1e-4, atol=1e-5)
    assert q.inner_product(codes, y[0]).shape == (5, 6)
    assert q.inner_product(codes[:0], y).shape == (4, 0, 6)


# -- format ---------------------------------------------------------------------------------
def test_nbytes_is_the_real_formula():
    q = rq.Quantizer(128, 3, rotation="hadamard")
    codes = q.encode(unit_vectors(1000, 128, 0))
    assert q.bytes_per_vector == 50 and codes.nbytes == 50 * 1000
    assert q.compression_ratio == pytest.approx(256 / 50)
    prod = rq.Quantizer(128, 3, rotation="hadamard", mode="prod")
    assert prod.bytes_per_vector == 32 + 2 + 16 + 2
    assert rq.Quantizer(128, 3, norm_dtype="float32").bytes_per_vector == 52
    assert rq.Quantizer(128, 4, rotation="rotor3").bytes_per_vector == 65 + 2  # 129 padded coords * 4 bits


@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_codes_roundtrip_bytes_and_reject_damage(mode):
    q = rq.Quantizer(64, 3, rotation="quat", mode=mode, seed=9)
    codes = q.encode(unit_vectors(20, 64, 3))
    blob = codes.to_bytes()
    back = rq.Codes.from_bytes(blob)
    assert back == codes
    np.testing.assert_array_equal(q.decode(back), q.decode(codes))
    for cut in (0, 5, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError):
            rq.Codes.from_bytes(blob[:cut])
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x10
    with pytest.raises(ValueError, match="checksum|corrupt"):
        rq.Codes.from_bytes(bytes(damaged))
    with pytest.raises(ValueError):
        rq.Codes.from_bytes(blob + b"\x00")
    with pytest.raises(ValueError):
        rq.Codes.from_bytes(q.to_bytes())  # a quantizer blob is not codes
    with pytest.raises(TypeError):
        rq.Codes.from_bytes("text")


def test_decoding_with_another_quantizer_is_refused():
    a, b = rq.Quantizer(64, 3, seed=1), rq.Quantizer(64, 3, seed=2)
    codes = a.encode(unit_vectors(3, 64, 0))
    with pytest.raises(ValueError, match="different quantizer"):
        b.decode(codes)
    with pytest.raises(ValueError, match="different quantizer"):
        b.inner_product(codes, unit_vectors(1, 64, 1))
    with pytest.raises(TypeError, match="Codes"):
        a.decode(np.zeros((3, 64)))


def test_slicing_and_concatenate():
    q = rq.Quantizer(32, 2, rotation="planar", mode="prod", seed=0)
    x = unit_vectors(10, 32, 2)
    codes = q.encode(x)
    assert len(codes) == 10 and codes.shape == (10, 32)
    joined = rq.concatenate([codes[:3], codes[3:7], codes[7:]])
    assert joined == codes
    np.testing.assert_array_equal(q.decode(codes[4]), q.decode(codes)[4])
    np.testing.assert_array_equal(q.decode(codes[[1, 3]]), q.decode(codes)[[1, 3]])
    with pytest.raises(IndexError):
        codes[10]
    with pytest.raises(ValueError, match="different quantizer"):
        rq.concatenate([codes, rq.Quantizer(32, 2, seed=0).encode(x)])
    with pytest.raises(ValueError):
        rq.concatenate([])


# -- special values -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_zero_vectors_empty_batches_and_non_finite(mode):
    q = rq.Quantizer(48, 3, rotation="hadamard", mode=mode)
    x = unit_vectors(4, 48, 0)
    x[2] = 0.0
    codes = q.encode(x)
    out = q.decode(codes)
    assert np.all(out[2] == 0.0) and codes.norms[2] == 0
    assert np.all(q.inner_product(codes, x)[:, 2] == 0.0)
    empty = q.encode(np.zeros((0, 48), np.float32))
    assert empty.nbytes == 0 and q.decode(empty).shape == (0, 48)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 7] = bad
        with pytest.raises(ValueError, match="row 1"):
            q.encode(y)
    with pytest.raises(ValueError, match="float32"):
        q.encode(np.full((1, 48), 1e5, np.float32))  # norm overflows float16
    big = rq.Quantizer(48, 3, norm_dtype="float32").encode(np.full((1, 48), 1e5, np.float32))
    assert np.isfinite(big.norms).all()


def test_norm_correction_preserves_norms():
    q = rq.Quantizer(128, 2, rotation="dense", norm_correction=True, norm_dtype="float32")
    x = unit_vectors(50, 128, 3) * 13.0
    np.testing.assert_allclose(np.linalg.norm(q.decode(q.encode(x)), axis=1), 13.0, rtol=1e-5)
    with pytest.raises(ValueError, match="norm_correction"):
        rq.Quantizer(128, 2, mode="prod", norm_correction=True)


# -- API, presets, persistence, errors ------------------------------------------------------
def test_presets_and_parameters():
    t, r = rq.TurboQuant(128, 3), rq.RotorQuant(128, 3, mode="prod")
    assert t.rotation == "dense" and r.rotation == "rotor3" and r.mode == "prod"
    assert t.num_parameters == 128 * 128 + 8
    assert r.num_parameters == 43 * 4 + 129 * 129 + 4  # rotors + QJL matrix (m = padded_dim) + 2-bit centroids


def test_save_load_state_dict_and_pickle(tmp_path):
    q = rq.Quantizer(80, 4, rotation="rotor3", mode="prod", seed=123, codebook="gaussian", qjl_dim=40)
    path = tmp_path / "q.rq"
    q.save(path)
    loaded = rq.Quantizer.load(path)
    assert loaded == q and loaded.qjl_dim == 40
    assert rq.Quantizer.from_state_dict(q.state_dict()) == q
    assert pickle.loads(pickle.dumps(q)) == q
    x = unit_vectors(5, 80, 0)
    assert loaded.encode(x) == q.encode(x)
    blob = bytearray(path.read_bytes())
    blob[12] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError):
        rq.Quantizer.load(path)


@pytest.mark.parametrize("kwargs, error", [
    (dict(dim=0, bits=3), ValueError), (dict(dim=64, bits=0), ValueError), (dict(dim=64, bits=9), ValueError),
    (dict(dim=64, bits=3, rotation="householder"), ValueError), (dict(dim=64, bits=3, mode="qjl"), ValueError),
    (dict(dim=64, bits=3, codebook="uniform"), ValueError), (dict(dim=64, bits=3, norm_dtype="bfloat16"), ValueError),
    (dict(dim=64, bits=3, qjl_dim=32), ValueError), (dict(dim=64, bits=3, mode="prod", qjl_dim=0), ValueError),
    (dict(dim=64.0, bits=3), TypeError), (dict(dim=64, bits=3, seed=-1), ValueError),
    (dict(dim=64, bits=3, norm_correction="yes"), TypeError),
])
def test_bad_parameters(kwargs, error):
    with pytest.raises(error):
        rq.Quantizer(**kwargs)


def test_bad_inputs():
    q = rq.Quantizer(64, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        q.encode(np.zeros((2, 63), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        q.encode(np.zeros((2, 64), np.int16))
    codes = q.encode(unit_vectors(2, 64, 0))
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        q.inner_product(codes, np.zeros((2, 65), np.float32))
    with pytest.raises(ValueError):
        q.inner_product(codes, np.full((1, 64), np.nan, np.float32))


class TestTorch:
    torch = pytest.importorskip("torch")

    def test_torch_roundtrip_keeps_framework_and_dtype(self):
        torch = self.torch
        q = rq.Quantizer(64, 4, rotation="hadamard")
        x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
        codes = q.encode(x)
        out = q.decode(codes)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == (3, 7, 64)
        assert q.decode(codes, dtype=torch.float32).dtype == torch.float32
        rel = ((out.float() - x.float()) ** 2).sum() / (x.float() ** 2).sum()
        assert rel < 0.02
        est = q.inner_product(codes, torch.randn(2, 64))
        assert isinstance(est, torch.Tensor) and est.shape == (2, 3, 7)
        np.testing.assert_array_equal(codes.indices, q.encode(x.float().numpy()).indices)


@pytest.mark.cuda
def test_cuda_tensors_roundtrip_to_cuda():
    """CUDA inputs are encoded on their GPU, the codes stay there, results come back on the device."""
    torch = pytest.importorskip("torch")
    q = rq.Quantizer(128, 3, rotation="hadamard", mode="prod", seed=2)
    x = torch.randn(100, 128, device="cuda", dtype=torch.float16)
    codes = q.encode(x)
    assert codes.device.startswith("cuda")
    out = q.decode(codes)
    assert out.is_cuda and out.dtype == torch.float16
    reference = q.decode(codes.to("cpu"))
    torch.testing.assert_close(out.cpu(), reference)
    est = q.inner_product(codes, x[:3])
    assert est.is_cuda and est.shape == (3, 100)


def test_codes_device_and_grouped_scores_on_the_cpu():
    """Codes report their device; grouped_scores (GQA layout) equals per-head inner products."""
    q = rq.Quantizer(64, 3, rotation="rotor3", mode="prod", seed=3)
    keys = unit_vectors(3 * 20, 64, 1).reshape(3, 20, 64)
    codes = q.encode(keys)
    assert codes.device == "cpu" and codes.to("cpu") is codes
    queries = unit_vectors(3 * 4, 64, 2).reshape(3, 4, 64)
    scores = q.grouped_scores(codes, queries)
    assert scores.shape == (3, 4, 20)
    for h in range(3):
        np.testing.assert_allclose(scores[h], q.inner_product(codes[h], queries[h]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="heads"):
        q.grouped_scores(codes[0], queries)
    with pytest.raises(ValueError, match="queries"):
        q.grouped_scores(codes, queries[:2])
    with pytest.raises(ValueError, match="device"):
        codes.to("tpu")
