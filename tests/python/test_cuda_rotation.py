"""CUDA rotations: every kind on the GPU equals the CPU core (the oracle) to 1e-5 relative.

Runs only with torch + a CUDA device + a CUDA build of rotorquant; skipped cleanly otherwise.
"""
import pytest

pytestmark = pytest.mark.cuda

torch = pytest.importorskip("torch")
import rotorquant  # noqa: E402
from rotorquant import _core  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("torch has no usable CUDA device", allow_module_level=True)
if not rotorquant.has_cuda():
    pytest.skip("rotorquant was built without CUDA or sees no CUDA device", allow_module_level=True)

KINDS = ["identity", "dense", "hadamard", "rotor3", "planar", "quat", "rotor_network"]
DIMS = [1, 3, 5, 63, 64, 80, 96, 112, 128, 130, 256]
BATCHES = [0, 1, 7, 1000, 4097]
RELATIVE_TOLERANCE = 1e-5
DEVICE = torch.device("cuda", 0)


def assert_close(actual, expected, relative=RELATIVE_TOLERANCE):
    """max |actual - expected| <= relative * max(1, max |expected|), compared on the CPU in float64."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    scale = max(1.0, float(expected.abs().max()))
    error = float((actual - expected).abs().max())
    assert error <= relative * scale, f"max abs diff {error:.3e} > {relative:.0e} * {scale:.3f}"


def random_rows(n, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=generator, dtype=torch.float32)


def seed_of(kind, dim, n):
    return 1000 * KINDS.index(kind) + 7 * dim + n


# ---- the public API against the CPU core -----------------------------------------------


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_apply_and_inverse_match_cpu(kind, dim, n):
    rotation = rotorquant.Rotation(kind, dim, seed=seed_of(kind, dim, n))
    padded = rotation.padded_dim
    x_cpu = random_rows(n, dim, seed=n + dim)
    x_cuda = x_cpu.to(DEVICE)

    y_cuda = rotation.apply(x_cuda)
    assert isinstance(y_cuda, torch.Tensor) and y_cuda.device == x_cuda.device
    assert y_cuda.dtype == torch.float32 and tuple(y_cuda.shape) == (n, padded)
    y_cpu = rotation.apply(x_cpu)
    torch.cuda.synchronize()
    assert_close(y_cuda, y_cpu)

    # inverse on arbitrary (n, padded_dim) inputs, not only on images of apply
    z_cpu = random_rows(n, padded, seed=n + dim + 1)
    x_back_cuda = rotation.inverse(z_cpu.to(DEVICE))
    assert x_back_cuda.device == x_cuda.device and tuple(x_back_cuda.shape) == (n, dim)
    torch.cuda.synchronize()
    assert_close(x_back_cuda, rotation.inverse(z_cpu))

    # round trip on the GPU
    round_trip = rotation.inverse(y_cuda)
    torch.cuda.synchronize()
    assert_close(round_trip, x_cpu)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_grid_stride_loops_on_large_batches(kind):
    # Enough (row, group) items / row tiles / row groups that every kernel loops past its grid.
    dim, n = 130, 200_000 if kind != "dense" else 40_000
    rotation = rotorquant.Rotation(kind, dim, seed=11)
    x_cpu = random_rows(n, dim, seed=5)
    y_cuda = rotation.apply(x_cpu.to(DEVICE))
    back_cuda = rotation.inverse(y_cuda)
    torch.cuda.synchronize()
    assert_close(y_cuda, rotation.apply(x_cpu))
    assert_close(back_cuda, x_cpu)


@pytest.mark.parametrize("dim", [1000, 4100, 8192])
def test_cuda_hadamard_large_rows(dim):
    rotation = rotorquant.Rotation("hadamard", dim, seed=3)
    x_cpu = random_rows(9, dim, seed=dim)
    y_cuda = rotation.apply(x_cpu.to(DEVICE))
    torch.cuda.synchronize()
    assert_close(y_cuda, rotation.apply(x_cpu))
    assert_close(rotation.inverse(y_cuda), x_cpu)


def test_cuda_dense_non_tile_multiple_dim():
    rotation = rotorquant.Rotation("dense", 333, seed=4)
    x_cpu = random_rows(130, 333, seed=4)
    y_cuda = rotation.apply(x_cpu.to(DEVICE))
    torch.cuda.synchronize()
    assert_close(y_cuda, rotation.apply(x_cpu))
    assert_close(rotation.inverse(y_cuda), x_cpu)


@pytest.mark.parametrize("dtype, relative", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_half_inputs_come_back_in_input_dtype(kind, dtype, relative):
    rotation = rotorquant.Rotation(kind, 96, seed=2)
    x_cpu = random_rows(50, 96, seed=2).to(dtype)
    y_cuda = rotation.apply(x_cpu.to(DEVICE))
    assert y_cuda.dtype == dtype and y_cuda.is_cuda
    back = rotation.inverse(y_cuda)
    assert back.dtype == dtype and back.is_cuda
    torch.cuda.synchronize()
    # Same float32 math on both sides; only the final rounding to the half dtype may differ.
    assert_close(y_cuda, rotation.apply(x_cpu), relative=relative)
    assert_close(back, x_cpu, relative=4 * relative)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_runs_on_the_callers_stream(kind):
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available")
    rotation = rotorquant.Rotation(kind, 64, seed=8)
    x_cpu = random_rows(2000, 64, seed=8)
    source = x_cpu.to(DEVICE)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()  # non-blocking w.r.t. the legacy default stream
    with torch.cuda.stream(stream):
        x = torch.zeros_like(source)
        torch.cuda._sleep(20_000_000)  # keeps `stream` busy: a launch elsewhere would read zeros
        x.copy_(source)
        y = rotation.apply(x)
        back = rotation.inverse(y)
    stream.synchronize()
    assert_close(y, rotation.apply(x_cpu))
    assert_close(back, x_cpu)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "identity"])
def test_cuda_rotation_changes_the_input_and_keeps_norms(kind):
    # Guards against a silent no-op kernel (DESIGN.md, known fact 7).
    dim = 64
    rotation = rotorquant.Rotation(kind, dim, seed=21)
    x = random_rows(100, dim, seed=21).to(DEVICE)
    y = rotation.apply(x)
    torch.cuda.synchronize()
    assert (y[:, :dim] - x).abs().max().item() > 0.1
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)


def test_cuda_identity_is_a_copy():
    rotation = rotorquant.Rotation("identity", 77, seed=0)
    x = random_rows(33, 77, seed=1).to(DEVICE)
    y = rotation.apply(x)
    torch.cuda.synchronize()
    assert y.data_ptr() != x.data_ptr()
    assert torch.equal(y, x)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_empty_batch(kind):
    rotation = rotorquant.Rotation(kind, 5, seed=1)
    y = rotation.apply(torch.empty(0, 5, device=DEVICE))
    assert y.is_cuda and tuple(y.shape) == (0, rotation.padded_dim)
    x = rotation.inverse(torch.empty(0, rotation.padded_dim, device=DEVICE))
    assert x.is_cuda and tuple(x.shape) == (0, 5)


# ---- _core.CudaRotation directly (raw pointers) ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_core_cuda_rotation_with_data_ptr(kind):
    dim, n = 130, 257
    core_rotation = _core.Rotation(kind, dim, 5)
    cuda_rotation = _core.CudaRotation(core_rotation, 0)
    assert cuda_rotation.device == 0
    assert cuda_rotation.dim == dim and cuda_rotation.padded_dim == core_rotation.padded_dim
    padded = cuda_rotation.padded_dim

    x_cpu = random_rows(n, dim, seed=6)
    x = x_cpu.to(DEVICE)
    y = torch.full((n, padded), float("nan"), device=DEVICE)
    stream = torch.cuda.current_stream().cuda_stream
    cuda_rotation.apply(x.data_ptr(), y.data_ptr(), n, stream)
    back = torch.full((n, dim), float("nan"), device=DEVICE)
    cuda_rotation.inverse(y.data_ptr(), back.data_ptr(), n, stream)
    torch.cuda.synchronize()

    expected = rotorquant.Rotation(kind, dim, seed=5).apply(x_cpu)  # the CPU core, same (kind, dim, seed)
    assert_close(y, expected)  # also: every output element was written (no NaN left)
    assert_close(back, x_cpu)


def test_core_cuda_rotation_default_device_and_zero_rows():
    cuda_rotation = _core.CudaRotation(_core.Rotation("rotor3", 6, 0))
    assert cuda_rotation.device == torch.cuda.current_device()
    cuda_rotation.apply(0, 0, 0, 0)  # n == 0: no-op, null pointers allowed
    cuda_rotation.inverse(0, 0, 0, 0)


def test_core_cuda_rotation_errors():
    rotation = _core.Rotation("planar", 8, 0)
    with pytest.raises(ValueError, match="device"):
        _core.CudaRotation(rotation, _core.cuda_device_count() + 5)
    with pytest.raises(ValueError, match="8192"):
        _core.CudaRotation(_core.Rotation("hadamard", 8193, 0), 0)
    cuda_rotation = _core.CudaRotation(rotation, 0)
    with pytest.raises(ValueError, match=">= 0"):
        cuda_rotation.apply(0, 0, -1, 0)
    with pytest.raises(ValueError, match="null"):
        cuda_rotation.apply(0, 0, 3, 0)


def test_cuda_device_queries():
    count = _core.cuda_device_count()
    assert count == torch.cuda.device_count() and count >= 1
    assert _core.cuda_device_name(0) == torch.cuda.get_device_name(0)
    major, minor = (int(part) for part in _core.cuda_runtime_version().split("."))
    assert major >= 11 and minor >= 0
    with pytest.raises(ValueError):
        _core.cuda_device_name(count)
