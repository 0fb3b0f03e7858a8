"""The fused CUDA codec (encode / decode / scores on codes) against independent references.

- encode: the GPU's codes must equal, bit for bit, a numpy scalar reference that follows the canonical
  encode arithmetic of docs/format.md (fmaf chains emulated exactly enough in float64: a float32 product
  is exact in float64, one addition then two roundings; a double-rounding difference needs a sum within
  2^-29 relative of a float32 midpoint, and then it must also sit on a code boundary). They must also
  equal the CPU core's codes whenever the CPU core itself follows the canonical arithmetic (detected on
  the same data); before that change lands the CPU core may differ in rare coordinates, bounded here.
- decode and scores: equal to the CPU core on the same codes to 1e-5 relative.
Runs only with torch + a CUDA device + a CUDA build of rotorquant; skipped cleanly otherwise.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.cuda

torch = pytest.importorskip("torch")
import rotorquant as rq  # noqa: E402
from rotorquant import _core  # noqa: E402
from rotorquant._quantizer import concatenate  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("torch has no usable CUDA device", allow_module_level=True)
if not rq.has_cuda():
    pytest.skip("rotorquant was built without CUDA or sees no CUDA device", allow_module_level=True)

DEVICE = torch.device("cuda", 0)
KINDS = ["identity", "dense", "hadamard", "rotor3", "planar", "quat"]
RELATIVE_TOLERANCE = 1e-5
# Before the CPU core adopts the canonical arithmetic, its codes may differ from the canonical ones in rare
# coordinates (mul+add without FMA moves y by ~1 ulp; an index flips when y sits within that of a boundary).
OLD_CPU_MISMATCH_FRACTION = 2e-3


# ---- the numpy canonical reference ---------------------------------------------------------------


def fma_chain(weights, inputs):
    """out[r, i] = chain over j ascending: acc = fmaf(weights[i, j], inputs[r, j], acc) from +0.0f."""
    weights = np.asarray(weights, dtype=np.float32).astype(np.float64)
    inputs = np.asarray(inputs, dtype=np.float32).astype(np.float64)
    acc = np.zeros((inputs.shape[0], weights.shape[0]), dtype=np.float32)
    for j in range(weights.shape[1]):
        acc = (inputs[:, j:j + 1] * weights[None, :, j] + acc.astype(np.float64)).astype(np.float32)
    return acc


def reference_rotate(q: rq.Quantizer, u):
    """y = Pi u in the canonical float32 operation order (u: (n, dim) float32)."""
    kind, dim, p = q.rotation, q.dim, q.padded_dim
    rotation = rq.Rotation(kind, dim, seed=q.seed)
    n = u.shape[0]
    padded = np.zeros((n, p), dtype=np.float32)
    padded[:, :dim] = u
    if kind == "identity":
        return padded
    if kind == "dense":
        return fma_chain(rotation.parameters().reshape(p, p), padded)
    if kind == "hadamard":
        v = padded * rotation.parameters().astype(np.float32)[None, :]
        h = 1
        while h < p:
            v = v.reshape(n, p // (2 * h), 2, h)
            a, b = v[:, :, 0, :].copy(), v[:, :, 1, :].copy()
            v[:, :, 0, :], v[:, :, 1, :] = a + b, a - b
            v = v.reshape(n, p)
            h *= 2
        return v * np.float32(1.0 / np.sqrt(np.float64(p)))
    k = {"rotor3": 3, "planar": 2, "quat": 4}[kind]
    matrix = rotation.matrix().astype(np.float32)  # block-diagonal: the CPU's derived block matrices
    y = np.empty((n, p), dtype=np.float32)
    for g in range(p // k):
        block = matrix[g * k:(g + 1) * k, g * k:(g + 1) * k]
        y[:, g * k:(g + 1) * k] = fma_chain(block, padded[:, g * k:(g + 1) * k])
    return y


def reference_encode(q: rq.Quantizer, x):
    """(indices (n, p) uint8, norms float64, signs (n, m) bool, residual norms float64) of the canonical encode."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    safe = np.where(norm == 0, 1.0, norm)
    u = np.where(norm[:, None] == 0, 0.0, x.astype(np.float64) / safe[:, None]).astype(np.float32)
    y = reference_rotate(q, u)
    p = q.padded_dim
    prod = q.mode == "prod"
    if q.mse_bits > 0:
        book = _core.codebook(p, q.mse_bits, q.codebook)
        boundaries = np.asarray(book["boundaries_f32"], dtype=np.float32)
        centroids = np.asarray(book["centroids_f32"], dtype=np.float32)
        idx = np.searchsorted(boundaries, y, side="right").astype(np.uint8)  # count of b <= y: ties go up
        residual = y - centroids[idx]
        stored = norm.copy()
        if q.norm_correction:
            centroid_sq = (centroids[idx].astype(np.float64) ** 2).sum(axis=1)
            ok = (norm != 0) & (centroid_sq > 0)
            stored[ok] = norm[ok] / np.sqrt(centroid_sq[ok])
    else:
        idx = np.zeros((x.shape[0], p), dtype=np.uint8)
        residual, stored = y.copy(), norm.copy()
    if not prod:
        return idx, stored, None, None
    residual[norm == 0] = 0.0
    projection = fma_chain(_native(q).qjl_matrix(), residual)
    signs = projection >= 0
    residual_norm = np.sqrt((residual.astype(np.float64) ** 2).sum(axis=1))
    return idx, stored, signs, residual_norm


def _native(q):
    return q._native


def unpack_indices(q: rq.Quantizer, packed):
    """Indices (n, p) from the bit planes of docs/format.md (independent of the core's unpacker)."""
    p, bits = q.padded_dim, q.mse_bits
    split = {1: [1], 2: [2], 3: [2, 1], 4: [4], 5: [4, 1], 6: [4, 2], 7: [4, 2, 1], 8: [8]}[bits]
    packed = np.asarray(packed, dtype=np.uint8)  # (n, index bytes)
    idx = np.zeros((packed.shape[0], p), dtype=np.int64)
    offset, remaining = 0, bits
    for width in split:
        remaining -= width
        plane_bytes = -(-p * width // 8)
        plane = packed[:, offset:offset + plane_bytes].astype(np.int64)
        j = np.arange(p)
        bit = j * width
        values = (plane[:, bit // 8] >> (bit % 8)) & ((1 << width) - 1)
        idx |= values << remaining
        # unused trailing bits must be zero
        used_bits = p * width
        if used_bits % 8:
            assert not np.any(plane[:, -1] >> (used_bits % 8)), "unused trailing bits of a plane are not zero"
        offset += plane_bytes
    assert offset == packed.shape[1]
    return idx.astype(np.uint8)


def unpack_signs(packed, m):
    packed = np.asarray(packed, dtype=np.uint8)
    bits = np.unpackbits(packed, axis=1, bitorder="little")
    if bits.shape[1] > m:
        assert not bits[:, m:].any(), "unused trailing sign bits are not zero"
    return bits[:, :m].astype(bool)


def host(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def stored_norm_bits(values, dtype):
    """double -> float -> (float16, round to nearest even) as the format stores it."""
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(dtype)


def random_rows(n, dim, seed, scale=1.0):
    generator = np.random.default_rng(seed)
    return (generator.standard_normal((n, dim)) * scale).astype(np.float32)


def assert_close(actual, expected, relative=RELATIVE_TOLERANCE):
    actual = np.asarray(host(actual), dtype=np.float64)
    expected = np.asarray(host(expected), dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(actual - expected).max())
    assert error <= relative * scale, f"max abs diff {error:.3e} > {relative:.0e} * {scale:.3f}"


def check_codes_canonical(q: rq.Quantizer, x_np, codes):
    """GPU codes == canonical reference, exactly; and == the CPU core (exactly once it is canonical)."""
    assert codes.device == "cuda:0"
    idx_ref, norm_ref, signs_ref, residual_ref = reference_encode(q, x_np)
    flat = codes.to("cpu").flat()
    n = x_np.shape[0]
    dtype = np.dtype(q.norm_dtype)
    norms = flat["norms"].view(dtype)[:, 0]
    np.testing.assert_array_equal(norms, stored_norm_bits(norm_ref, dtype))
    if q.mse_bits > 0:
        idx = unpack_indices(q, flat["indices"])
        mismatched = np.argwhere(idx != idx_ref)
        assert mismatched.size == 0, f"{len(mismatched)} indices differ from the canonical reference, first {mismatched[:5]}"
    if q.mode == "prod":
        signs = unpack_signs(flat["qjl_signs"], q.qjl_dim)
        mismatched = np.argwhere(signs != signs_ref)
        assert mismatched.size == 0, f"{len(mismatched)} QJL signs differ from the reference, first {mismatched[:5]}"
        residual = flat["residual_norms"].view(dtype)[:, 0]
        np.testing.assert_array_equal(residual, stored_norm_bits(residual_ref, dtype))

    # the CPU core
    cpu = q.encode(x_np)
    cpu_flat = cpu.flat()
    cpu_canonical = True
    if q.mse_bits > 0:
        cpu_idx = unpack_indices(q, cpu_flat["indices"])
        cpu_canonical = bool(np.array_equal(cpu_idx, idx_ref))
    if q.mode == "prod":
        cpu_canonical = cpu_canonical and bool(np.array_equal(unpack_signs(cpu_flat["qjl_signs"], q.qjl_dim), signs_ref))
    if cpu_canonical:
        for name in ("indices", "norms", "qjl_signs", "residual_norms"):
            np.testing.assert_array_equal(flat[name], cpu_flat[name], err_msg=name)
    else:  # the CPU core still has the pre-canonical arithmetic: rare differences only
        total = max(1, n * q.padded_dim)
        if q.mse_bits > 0:
            differing = int((unpack_indices(q, cpu_flat["indices"]) != idx_ref).sum())
            assert differing <= OLD_CPU_MISMATCH_FRACTION * total + 2, differing
        np.testing.assert_array_equal(flat["norms"], cpu_flat["norms"])


# ---- encode ------------------------------------------------------------------------------------------

ENCODE_CASES = [
    # (dim, bits, mode)
    (128, 1, "mse"), (128, 2, "mse"), (128, 3, "mse"), (128, 4, "mse"), (128, 8, "mse"),
    (64, 3, "mse"), (256, 4, "mse"), (100, 3, "mse"), (5, 2, "mse"), (130, 5, "mse"),
    (128, 1, "prod"), (128, 3, "prod"), (64, 2, "prod"), (96, 4, "prod"),
]


@pytest.mark.parametrize("dim,bits,mode", ENCODE_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_encode_is_bit_identical_to_the_canonical_reference(kind, dim, bits, mode):
    q = rq.Quantizer(dim, bits, rotation=kind, mode=mode, seed=dim + bits)
    x = random_rows(517, dim, seed=dim * 10 + bits)
    x[3] = 0.0  # a zero vector
    codes = q.encode(torch.from_numpy(x).to(DEVICE))
    check_codes_canonical(q, x, codes)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4097])
@pytest.mark.parametrize("kind", ["dense", "hadamard", "rotor3"])
def test_encode_edge_batch_sizes(kind, n):
    q = rq.Quantizer(128, 3, rotation=kind, mode="prod", seed=n)
    x = random_rows(n, 128, seed=n)
    codes = q.encode(torch.from_numpy(x).to(DEVICE))
    assert codes.shape == (n, 128) and codes.nbytes == n * q.bytes_per_vector
    check_codes_canonical(q, x, codes)


@pytest.mark.parametrize("options", [dict(norm_dtype="float32"), dict(norm_correction=True),
                                     dict(codebook="gaussian"), dict(mode="prod", qjl_dim=200),
                                     dict(mode="prod", qjl_dim=13)])
def test_encode_options(options):
    q = rq.Quantizer(128, 3, rotation="hadamard", seed=3, **options)
    x = random_rows(300, 128, seed=5, scale=3.0)
    check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_real_kv_cache(kind):
    data = np.load(rq.__path__[0] + "/data/smollm2_kv.npz")
    q = rq.Quantizer(64, 3, rotation=kind, mode="mse", seed=7)
    for name in ("k_L0", "v_L15", "k_L29"):
        x = data[name].astype(np.float32).reshape(-1, 64)
        check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))


@pytest.mark.parametrize("kind", ["hadamard", "dense", "rotor3"])  # the fast, tensor-core and general kernels
@pytest.mark.parametrize("dim", [64, 96])
def test_encode_rejects_non_finite_and_overflow_like_the_cpu(kind, dim):
    q = rq.Quantizer(dim, 2, rotation=kind)
    x = torch.randn(50, dim, device=DEVICE)
    x[17, 3] = float("nan")
    x[30, 0] = float("inf")
    with pytest.raises(ValueError, match="row 17"):
        q.encode(x)
    big = torch.full((4, dim), 1e4, device=DEVICE)  # norm >= 8e4 > 65504
    big[:2] = 1.0
    with pytest.raises(ValueError, match="row 2 overflows float16"):
        q.encode(big)
    q32 = rq.Quantizer(dim, 2, rotation=kind, norm_dtype="float32")
    codes = q32.encode(big)
    assert codes.device == "cuda:0"
    check_codes_canonical(q32, big.cpu().numpy(), codes)


def test_unsupported_padded_dim_is_a_clear_error():
    q = rq.Quantizer(1000, 2, rotation="planar")
    with pytest.raises(ValueError, match="padded_dim"):
        q.encode(torch.randn(3, 1000, device=DEVICE))


def test_encode_accepts_half_inputs_and_runs_on_the_current_stream():
    q = rq.Quantizer(128, 4, rotation="rotor3", seed=1)
    x = torch.randn(1000, 128, device=DEVICE, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        codes = q.encode(x)
    stream.synchronize()
    check_codes_canonical(q, x.float().cpu().numpy(), codes)


# ---- the fast encode kernel (mse, bits 2..4, dim 64 / 128 / 256, every kind but dense) ----------------
# codec_encode_fast.cuh: float4 loads, register FWHT / block rotations, tiles of several rows per warp with the
# next tile prefetched. These cases cover its shapes (n below one tile, odd n, several tiles per warp), the
# padded outputs of rotor3 (66, 129, 258) and rows of every scale.

FAST_KINDS = ["identity", "hadamard", "rotor3", "planar", "quat"]


def wide_range_rows(n, dim, seed):
    """Rows of every scale (2^-140 .. 2^100: tiny and huge norms, subnormal inputs), zero rows, -0.0 entries, rows
    with one nonzero coordinate and rows mixing 2^100 with 2^-40."""
    generator = np.random.default_rng(seed)
    x = generator.standard_normal((n, dim))
    scales = generator.integers(-140, 101, size=n)
    x = (x * np.exp2(scales.astype(np.float64))[:, None]).astype(np.float32)
    if n > 8:
        x[0] = 0.0
        x[1] = 0.0
        x[1, dim // 3] = -3.5
        x[2] = np.where(np.arange(dim) % 2 == 1, np.float32(2.0**100), np.float32(2.0**-40) * np.arange(1, dim + 1))
        x[3] = np.ldexp(1.0 + np.arange(dim), -149 + np.arange(dim) % 3).astype(np.float32)  # subnormal inputs
        x[4, ::3] = -0.0
        x[5] = -0.0
    return x


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("kind", FAST_KINDS)
def test_fast_encode_is_bit_identical(kind, dim, bits):
    # n = 20011: odd, not a multiple of any tile, and more tiles than warps of the persistent grid
    q = rq.Quantizer(dim, bits, rotation=kind, seed=dim + 7 * bits)
    x = random_rows(20011, dim, seed=dim * 13 + bits)
    x[5] = 0.0
    check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))
    for n in (1, 2, 5, 9, 33):  # less than one tile / one block
        check_codes_canonical(q, x[:n], q.encode(torch.from_numpy(x[:n].copy()).to(DEVICE)))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("kind", FAST_KINDS)
def test_fast_encode_rows_of_every_scale_and_options(kind, dim, bits):
    x = wide_range_rows(777, dim, seed=dim + bits)
    for options in (dict(norm_dtype="float32"), dict(norm_dtype="float32", norm_correction=True),
                    dict(norm_dtype="float32", codebook="gaussian")):
        q = rq.Quantizer(dim, bits, rotation=kind, seed=bits, **options)
        check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))
    # float16 norms with norm correction on ordinary rows
    q = rq.Quantizer(dim, bits, rotation=kind, seed=bits, norm_correction=True)
    y = random_rows(300, dim, seed=bits, scale=0.5)
    check_codes_canonical(q, y, q.encode(torch.from_numpy(y).to(DEVICE)))


@pytest.mark.parametrize("kind", ["hadamard", "dense"])  # the fast and the tensor-core kernel
def test_fast_encode_unaligned_input_uses_the_general_kernel(kind):
    q = rq.Quantizer(128, 3, rotation=kind, seed=2)
    storage = torch.from_numpy(random_rows(101 * 128 + 1, 1, seed=3).reshape(-1)).to(DEVICE)
    x = storage[1:].view(101, 128)  # 4-byte but not 16-byte aligned
    check_codes_canonical(q, x.cpu().numpy(), q.encode(x))


def _float32_parts(value):
    """(B, e) with |value| = B * 2^e, B a 24-bit integer (normal float32)."""
    mantissa, exponent = np.frexp(np.float64(abs(value)))  # value = mantissa * 2^exponent, mantissa in [0.5, 1)
    return int(mantissa * 2**24), int(exponent) - 24


def midpoint_rows(dim, bits, trials=400):
    """Rows whose unit coordinate x_p / norm lies next to the float32 rounding midpoint M beside a codebook boundary
    b, on the side that changes the index if x_p / norm is not rounded exactly.

    Like tests/cpp/test_canonical.cpp: M = (2 B -+ 1) 2^(e - 1) for b = +-B 2^e (B the 24-bit mantissa; the
    midpoint between b and its neighbour towards the lower cell); a random float probe x_p in [M, 2 M), r = RN(M /
    x_p) and a norm N (a double next to 1 / r) with RN(1 / N) = r, kept when RN(x_p r) = M: then the product
    x_p * RN(1 / N) rounds to M and then to the even neighbour, while x_p / N lies a fraction of a double ulp
    beside M and may round to the other float, across b. The other coordinates ("fillers") are multiples of 2^H,
    2^(2H) the largest power of 4 within the window of sums whose square root rounds to N, chosen greedily so that
    sum x_j^2 is exactly a double in that window; every sum of these squares is exact in any order (all
    multiples of 2^(2H), total < 2^53 2^(2H); N where that fails are skipped), so every backend gets the norm N.
    Returns the rows where the index of x_p differs between x_p / N and the product x_p * (1 / N) rounded to float
    (the shortcut the exact quotient must not take) and the number of such rows."""
    from fractions import Fraction
    import math

    book = _core.codebook(dim, bits, "sphere")
    boundaries = np.asarray(book["boundaries_f32"], dtype=np.float32)
    generator = np.random.default_rng(dim * 10 + bits)
    rows = []
    for b in boundaries:
        if b == 0:
            continue
        mantissa, exponent = _float32_parts(b)
        if mantissa == 1 << 23:
            continue  # a power of two: the midpoint below is a quarter ulp away
        odd = 2 * mantissa - 1 if b > 0 else 2 * mantissa + 1  # toward the lower cell
        midpoint = Fraction(odd) * Fraction(2) ** (exponent - 1)
        for _ in range(trials):
            probe_mantissa = int(generator.integers(1 << 23, 1 << 24))
            probe = Fraction(probe_mantissa) * Fraction(2) ** (exponent - 1 + 25 - 24)  # in [M, 4 M)
            r = float(midpoint / probe)
            if Fraction(float(Fraction(probe) * Fraction(r))) != midpoint:
                continue  # RN(x_p r) must be exactly M
            start = 1.0 / r
            for step in (-1, 0, 1):
                norm = float(start + step * math.ulp(start))
                if 1.0 / norm != r:
                    continue
                ulp = Fraction(math.ulp(norm))
                low, high = (Fraction(norm) - ulp / 2) ** 2, (Fraction(norm) + ulp / 2) ** 2
                h = math.floor(math.log2(high - low) / 2)
                unit = Fraction(2) ** (2 * h)
                if (Fraction(norm) + ulp) ** 2 >= 2**53 * unit or (probe / Fraction(2) ** h).denominator != 1:
                    continue  # sums not exact, or the probe not a multiple of 2^H
                x_p = np.float32(np.sign(b) * float(probe))
                divided = np.float32(np.float64(x_p) / norm)
                product = np.float32(np.float64(x_p) * (1.0 / norm))
                if np.searchsorted(boundaries, divided, side="right") == np.searchsorted(boundaries, product,
                                                                                          side="right"):
                    continue  # not a hard case
                target = math.floor((low + high) / 2 / unit)  # the sum of squares in units of 2^(2H)
                remainder = target - int(probe ** 2 / unit)
                fillers = []
                while remainder > 0 and len(fillers) < dim - 1:
                    f = math.isqrt(remainder)
                    shift = max(0, f.bit_length() - 24)
                    f = (f >> shift) << shift  # a float32
                    fillers.append(np.float32(np.ldexp(f, h)))
                    remainder -= f * f
                if remainder != 0:
                    continue
                row = np.zeros(dim, dtype=np.float32)
                row[:len(fillers)] = fillers
                row[-1] = x_p
                assert np.sqrt(np.sum(row.astype(np.float64) ** 2)) == norm, "the construction must give the norm N"
                rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, dim), np.float32), len(rows)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_fast_encode_unit_coordinates_next_to_float_midpoints(dim, bits):
    x, hard = midpoint_rows(dim, bits)
    # the construction works: rows whose probe gets another index when x / norm is replaced by x * (1 / norm)
    assert hard >= 10, hard
    for scale in (1.0, 2.0**-60, 2.0**40):  # powers of two keep every relation exact
        xs = (x * np.float32(scale)).astype(np.float32)
        q = rq.Quantizer(dim, bits, rotation="identity", seed=1, norm_dtype="float32")
        check_codes_canonical(q, xs, q.encode(torch.from_numpy(xs).to(DEVICE)))
        q = rq.Quantizer(dim, bits, rotation="hadamard", seed=1, norm_dtype="float32")
        check_codes_canonical(q, xs, q.encode(torch.from_numpy(xs).to(DEVICE)))


def boundary_rows(dim, bits, codebook):
    """Rows whose unit coordinates x_j / norm are exactly given float32 targets: every boundary of the codebook, its
    negation, the floats one ulp either side of both, +0 and -0 (the fast kernel's symmetric index search: ties go
    to the upper cell, -0 and +0 to levels / 2). Targets fill a row while their squares sum to <= 1/2; two fillers
    bring sum x_j^2 to 1 within ~2^-45, so norm = 1 within ~2^-46 and x_j / norm rounds back to x_j (a relative
    change far below half an ulp). Returns the rows and the targets' (row, column, value)."""
    book = _core.codebook(dim, bits, codebook)
    targets = []
    for b in np.asarray(book["boundaries_f32"], dtype=np.float32):
        for v in (b, -b):
            v = np.float32(v)
            targets += [v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))]
    targets += [np.float32(0.0), np.float32(-0.0)]
    rows, placed, row, energy = [], [], [], 0.0
    for v in targets + [None]:
        if v is None or energy + float(v) ** 2 > 0.5 or len(row) == dim - 2:
            x = np.zeros(dim, dtype=np.float32)
            x[:len(row)] = row
            remainder = 1.0 - float(np.sum(x.astype(np.float64) ** 2))
            first = np.float32(np.sqrt(remainder))
            while float(first) ** 2 > remainder:
                first = np.nextafter(first, np.float32(0))
            x[-2], x[-1] = first, np.float32(np.sqrt(remainder - float(first) ** 2))
            placed += [(len(rows), j, w) for j, w in enumerate(row)]
            rows.append(x)
            row, energy = [], 0.0
            if v is None:
                break
        row.append(v)
        energy += float(v) ** 2
    return np.stack(rows), placed


@pytest.mark.parametrize("codebook", ["sphere", "gaussian"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_fast_encode_unit_coordinates_on_boundaries_and_signed_zeros(dim, bits, codebook):
    x, placed = boundary_rows(dim, bits, codebook)
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    u = (x.astype(np.float64) / norm[:, None]).astype(np.float32)
    for r, j, v in placed:  # the construction gives exactly the targets (signed zeros included)
        assert u[r, j].tobytes() == np.float32(v).tobytes(), (r, j, v, u[r, j])
    boundaries = np.asarray(_core.codebook(dim, bits, codebook)["boundaries_f32"], dtype=np.float32)
    levels = 1 << bits
    expected = {(r, j): int(np.searchsorted(boundaries, v, side="right")) for r, j, v in placed}
    assert expected[placed[-1][:2]] == levels // 2 and expected[placed[-2][:2]] == levels // 2  # -0 and +0
    q = rq.Quantizer(dim, bits, rotation="identity", seed=1, codebook=codebook, norm_dtype="float32")
    codes = q.encode(torch.from_numpy(x).to(DEVICE))
    check_codes_canonical(q, x, codes)
    idx = unpack_indices(q, codes.to("cpu").flat()["indices"])
    for (r, j), e in expected.items():
        assert idx[r, j] == e, (r, j, idx[r, j], e)


# ---- decode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,bits,mode", [(128, 3, "mse"), (128, 3, "prod"), (64, 1, "prod"), (100, 4, "mse"),
                                           (256, 2, "mse"), (5, 8, "mse")])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_cpu(kind, dim, bits, mode):
    q = rq.Quantizer(dim, bits, rotation=kind, mode=mode, seed=11, norm_correction=(mode == "mse" and bits == 4))
    x = torch.randn(333, dim, device=DEVICE)
    codes = q.encode(x)
    out = q.decode(codes)
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == (333, dim)
    expected = q.decode(codes.to("cpu"))
    assert_close(out, expected)
    for dtype in (torch.float16, torch.bfloat16):
        half = q.decode(codes, dtype=dtype)
        assert half.dtype == dtype and half.is_cuda
        torch.testing.assert_close(half.float().cpu(), expected.to(dtype).float(), rtol=1e-2, atol=1e-2)


def test_decode_edge_sizes_and_corrupted_norms():
    q = rq.Quantizer(128, 2, rotation="dense", seed=2)
    empty = q.encode(torch.empty(0, 128, device=DEVICE))
    assert q.decode(empty).shape == (0, 128)
    codes = q.encode(torch.randn(10, 128, device=DEVICE))
    codes._arrays["norms"][4] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8, device=DEVICE)  # NaN
    with pytest.raises(ValueError, match="code 4"):
        q.decode(codes)


# ---- scores ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,bits,mode", [(128, 3, "mse"), (128, 3, "prod"), (64, 2, "prod"), (96, 4, "mse"),
                                           (128, 1, "prod")])
@pytest.mark.parametrize("kind", KINDS)
def test_inner_product_matches_cpu(kind, dim, bits, mode):
    q = rq.Quantizer(dim, bits, rotation=kind, mode=mode, seed=5)
    x = torch.randn(1000, dim, device=DEVICE)
    y = torch.randn(6, dim, device=DEVICE)
    codes = q.encode(x)
    scores = q.inner_product(codes, y)
    assert scores.is_cuda and scores.shape == (6, 1000)
    expected = q.inner_product(codes.to("cpu"), y.cpu())
    assert_close(scores, expected)


@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_grouped_scores_real_kv_gqa(mode):
    data = np.load(rq.__path__[0] + "/data/smollm2_kv.npz")
    keys = torch.from_numpy(data["k_L15"].astype(np.float32)).to(DEVICE)       # (3, 512, 64)
    queries = torch.from_numpy(data["q_L15"].astype(np.float32)).to(DEVICE)    # (9, 512, 64): 3 per KV head
    queries = queries.reshape(3, 3, 512, 64)[:, :, :40].reshape(3, 120, 64)   # (heads, group, dim)
    q = rq.Quantizer(64, 3, rotation="rotor3", mode=mode, seed=1)
    codes = q.encode(keys)
    scores = q.grouped_scores(codes, queries)
    assert scores.shape == (3, 120, 512) and scores.is_cuda
    expected = q.grouped_scores(codes.to("cpu"), queries.cpu())
    assert_close(scores, expected)
    for h in range(3):  # and the plain inner product per head
        assert_close(scores[h], q.inner_product(codes[h], queries[h]))


def test_scores_edge_cases_and_device_mismatch():
    q = rq.Quantizer(64, 2, rotation="hadamard", mode="prod")
    codes = q.encode(torch.randn(0, 64, device=DEVICE))
    assert q.inner_product(codes, torch.randn(3, 64, device=DEVICE)).shape == (3, 0)
    codes = q.encode(torch.randn(33, 64, device=DEVICE))
    assert q.inner_product(codes, torch.randn(0, 64, device=DEVICE)).shape == (0, 33)
    with pytest.raises(ValueError, match="device"):
        q.inner_product(codes, torch.randn(2, 64))
    bad = torch.randn(2, 64, device=DEVICE)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="row 1"):
        q.inner_product(codes, bad)


# ---- Codes on the GPU --------------------------------------------------------------------------------


def test_codes_move_between_devices_and_keep_their_bytes():
    q = rq.Quantizer(128, 3, rotation="hadamard", mode="prod", seed=4)
    x = torch.randn(2, 50, 128, device=DEVICE)
    codes = q.encode(x)
    assert codes.device == "cuda:0" and codes.shape == (2, 50, 128)
    assert codes.nbytes == 100 * q.bytes_per_vector
    on_cpu = codes.to("cpu")
    assert on_cpu.device == "cpu" and on_cpu == codes
    back = on_cpu.to("cuda")
    assert back.device == "cuda:0" and back == codes
    restored = rq.Codes.from_bytes(codes.to_bytes())
    np.testing.assert_array_equal(restored.flat()["indices"], on_cpu.flat()["indices"])
    part = codes[1][3:9]
    assert part.device == "cuda:0" and part.shape == (6, 128)
    assert_close(q.decode(part), q.decode(on_cpu[1][3:9]))
    picked = codes[0][np.array([4, 1, 4])]
    assert picked.device == "cuda:0" and picked == on_cpu[0][np.array([4, 1, 4])]
    joined = concatenate([codes[0], codes[1]])
    assert joined.device == "cuda:0" and joined.shape == (100, 128) and joined == on_cpu.to("cpu").__class__(
        on_cpu.params, {k: v.reshape(100, -1) for k, v in on_cpu._arrays.items()}, (100,))


def test_cupy_arrays_if_available():
    cupy = pytest.importorskip("cupy")
    q = rq.Quantizer(64, 2, rotation="quat", seed=3)
    x = cupy.random.standard_normal((100, 64), dtype=cupy.float32)
    codes = q.encode(x)
    assert codes.device == "cuda:0"
    check_codes_canonical(q, cupy.asnumpy(x), codes)
    out = q.decode(codes)
    assert isinstance(out, cupy.ndarray)


# ---- dense rotation on tensor cores (codec_encode_dense.cuh) ----------------------------------------
# mse, bits 2..4, dim 64 / 128: y is filtered on fp16 tensor cores with a proven error bound and the coordinates
# within that bound of a boundary are recomputed with the canonical fmaf chain. The codes must be exactly canonical.

DENSE_DIMS = [64, 128]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", DENSE_DIMS)
def test_dense_tensor_core_encode_is_bit_identical(dim, bits):
    # n = 20011: odd, not a multiple of the 16-row tile, more tiles than warps of the persistent grid
    q = rq.Quantizer(dim, bits, rotation="dense", seed=dim + 7 * bits)
    x = random_rows(20011, dim, seed=dim * 17 + bits)
    x[5] = 0.0
    x[6, :] = -0.0
    check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))
    for n in (1, 2, 5, 15, 16, 17, 33):  # less than one tile / one warp / one block
        check_codes_canonical(q, x[:n], q.encode(torch.from_numpy(x[:n].copy()).to(DEVICE)))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", DENSE_DIMS)
def test_dense_tensor_core_encode_rows_of_every_scale_and_options(dim, bits):
    x = wide_range_rows(777, dim, seed=dim + bits)
    generator = np.random.default_rng(dim * bits)
    heavy = (generator.standard_t(2, size=(300, dim)) * np.where(np.arange(dim) % 9 == 0, 40.0, 1.0)).astype(np.float32)
    x = np.concatenate([x, heavy])  # heavy tails and outlier channels: one large coordinate dominates u
    for options in (dict(norm_dtype="float32"), dict(norm_dtype="float32", norm_correction=True),
                    dict(norm_dtype="float32", codebook="gaussian")):
        q = rq.Quantizer(dim, bits, rotation="dense", seed=bits, **options)
        check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))
    q = rq.Quantizer(dim, bits, rotation="dense", seed=bits, norm_correction=True)  # float16 norms
    check_codes_canonical(q, heavy, q.encode(torch.from_numpy(heavy).to(DEVICE)))


def rows_on_boundaries(q: rq.Quantizer, n, seed):
    """Rows x = M^T y (float32) of unit vectors y whose coordinates, all but 8, are codebook boundaries (a float ulp
    either side or exact); the 8 others make ||y|| = 1. The encoder's rotated coordinates then lie within ~1e-7 of
    the boundaries: the tensor-core estimate (error ~1e-4) cannot decide them, nearly all take the exact fallback."""
    p = q.padded_dim
    m = rq.Rotation("dense", p, seed=q.seed).parameters().reshape(p, p).astype(np.float64)
    boundaries = np.asarray(_core.codebook(p, q.mse_bits, q.codebook)["boundaries_f32"], dtype=np.float64)
    small = boundaries[np.abs(boundaries) <= 1.5 / np.sqrt(p)]
    generator = np.random.default_rng(seed)
    y = generator.choice(small, size=(n, p))
    y *= 1.0 + generator.choice([-1.0, 0.0, 1.0], size=(n, p)) * 2.0**-23  # a float ulp either side
    for row in y:  # keep room for the fillers: sum of squares <= 0.9
        while (row[:-8] ** 2).sum() > 0.9:
            row[generator.integers(0, p - 8)] = 0.0
        row[-8:] = np.sqrt((1.0 - (row[:-8] ** 2).sum()) / 8) * generator.choice([-1.0, 1.0], size=8)
    return (y @ m).astype(np.float32) * np.float32(3.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", DENSE_DIMS)
def test_dense_tensor_core_encode_rows_on_the_boundaries(dim, bits):
    q = rq.Quantizer(dim, bits, rotation="dense", seed=3 * bits, norm_dtype="float32", norm_correction=True)
    x = rows_on_boundaries(q, 400, seed=dim + bits)
    # the test has teeth: the fp16 estimate of y puts many coordinates in another cell than the canonical chain
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    u = (x.astype(np.float64) / norm).astype(np.float32)
    m = rq.Rotation("dense", dim, seed=q.seed).parameters().reshape(dim, dim).astype(np.float32)
    estimate = u.astype(np.float16).astype(np.float64) @ m.astype(np.float16).astype(np.float64).T
    boundaries = np.asarray(_core.codebook(dim, bits, "sphere")["boundaries_f32"], dtype=np.float32)
    canonical = np.searchsorted(boundaries, reference_rotate(q, u), side="right")
    wrong = int((np.searchsorted(boundaries, estimate, side="right") != canonical).sum())
    assert wrong >= 0.2 * x.size, wrong
    check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))


def test_dense_other_dims_and_bits_use_the_general_kernel():
    for dim, bits in ((256, 3), (96, 4), (128, 1), (128, 5)):
        q = rq.Quantizer(dim, bits, rotation="dense", seed=dim)
        x = random_rows(301, dim, seed=bits)
        check_codes_canonical(q, x, q.encode(torch.from_numpy(x).to(DEVICE)))
