"""The multi-head CUDA codec entry ``_core.CudaQuantizerGroup`` (cuda/include/rotorquant/cuda/codec.hpp).

One encode / decode call covers every head (quantizers with equal parameters but their own seeds) and group (e.g.
sequences of a batch) in one kernel launch, reading and writing rows through strides (HeadLayout). Its codes must
equal, bit for bit, each head's own codes: the CPU core's and the single-head CUDA codec's (CudaQuantizer) on the
same rows, for every rotation kind and kernel (fast, dense tensor-core, general: other bits, dims, prod mode,
norm correction); its decode must equal the single-head CUDA decode bit for bit and the CPU decode to 1e-5.
Rows outside the layout must stay untouched. Argument errors raise ValueError / TypeError.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import rotorquant as rq  # noqa: E402
from rotorquant import _core  # noqa: E402

FIELDS = ("indices", "norms", "qjl_signs", "residual_norms")
SENTINEL = 0xA5  # code bytes outside the written rows keep it

# (rotation, dim, bits, mode, extra Quantizer options): the kernel each exercises in the comment
CASES = [
    ("identity", 128, 3, "mse", {}),                                # fast, 16 lanes per row
    ("hadamard", 128, 4, "mse", {}),                                # fast
    ("hadamard", 256, 2, "mse", {}),                                # fast, 32 lanes, 2 chunks
    ("planar", 64, 2, "mse", {"norm_correction": True}),            # fast, norm correction
    ("quat", 128, 3, "mse", {}),                                    # fast
    ("rotor3", 128, 4, "mse", {}),                                  # fast, padded outputs (129)
    ("dense", 128, 3, "mse", {}),                                   # dense tensor-core kernel
    ("dense", 64, 4, "mse", {"norm_correction": True}),             # dense tensor-core kernel, norm correction
    ("dense", 48, 3, "mse", {}),                                    # general (no tensor-core plan)
    ("hadamard", 100, 5, "mse", {}),                                # general: bits 5, padded dim
    ("identity", 96, 8, "mse", {"norm_dtype": "float32"}),          # general: bits 8, float32 norms
    ("quat", 64, 1, "mse", {}),                                     # general: bits 1
    ("rotor3", 50, 3, "prod", {}),                                  # general: prod (QJL per head)
    ("dense", 64, 1, "prod", {"norm_dtype": "float32"}),            # general: prod without an mse stage
    ("planar", 128, 4, "prod", {"qjl_dim": 80}),                    # general: prod, qjl_dim != dim
]


def case_id(case):
    rotation, dim, bits, mode, extra = case
    return f"{rotation}-d{dim}-b{bits}-{mode}" + "".join(f"-{k}={v}" for k, v in extra.items())


def quantizers(case, heads, seed=11):
    rotation, dim, bits, mode, extra = case
    return [rq.Quantizer(dim, bits, rotation=rotation, mode=mode, seed=seed + 7 * h, **extra) for h in range(heads)]


def sizes_of(q):
    n = q._native
    return (int(n.index_bytes), int(n.norm_bytes), int(n.sign_bytes), int(n.residual_norm_bytes))


def test_without_cuda_the_group_raises_runtime_error():
    if _core.built_with_cuda:
        pytest.skip("rotorquant was built with CUDA")
    with pytest.raises(RuntimeError, match="without CUDA"):
        _core.CudaQuantizerGroup([rq.Quantizer(64, 3, rotation="hadamard")._native], 0)


cuda = pytest.mark.cuda


@pytest.fixture(scope="module")
def device():
    if not (torch.cuda.is_available() and rq.has_cuda()):
        pytest.skip("needs torch with CUDA and a CUDA build of rotorquant")
    return torch.device("cuda", 0)


def code_storage(q, heads, groups, capacity, device):
    """(heads, groups, capacity, bytes) uint8 per field, filled with SENTINEL (a KV cache's code buffers)."""
    return {name: torch.full((heads, groups, capacity, size), SENTINEL, dtype=torch.uint8, device=device)
            for name, size in zip(FIELDS, sizes_of(q))}


def pointers(storage, first):
    return [t.data_ptr() + first * t.shape[-1] if t.shape[-1] else 0 for t in storage.values()]


def stream_of(device):
    return int(torch.cuda.current_stream(device).cuda_stream)


def single_head_codes(q, rows, device):
    """One head's codes of rows (n, dim) float32 on the GPU through the single-head CudaQuantizer."""
    rows = rows.contiguous()
    n = rows.shape[0]
    out = {name: torch.empty((n, size), dtype=torch.uint8, device=device) for name, size in zip(FIELDS, sizes_of(q))}
    native = q._device_native("cuda", device.index)
    native.encode(rows.data_ptr(), n, *[t.data_ptr() if t.numel() else 0 for t in out.values()], stream_of(device),
                  True)
    return out


@cuda
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_group_encode_equals_each_heads_codes_bit_for_bit(device, case):
    heads, groups, slots, capacity = 3, 2, 41, 64
    qs = quantizers(case, heads)
    group = _core.CudaQuantizerGroup([q._native for q in qs], device.index)
    assert group.heads == heads and group.device == device.index
    dim = qs[0].dim
    gen = torch.Generator(device="cpu").manual_seed(5)
    # x lives in a (groups, heads, slots, dim) buffer (as a KV cache's window) and is read in place
    buffer = (torch.randn((groups, heads, slots, dim), generator=gen) * 3.0).to(device)
    buffer[1, 2, 7] = 0.0  # a zero row
    for n, start, first in ((0, 0, 0), (1, 5, 0), (1, 40, 63), (7, 3, 11), (37, 2, 20)):
        x = buffer[:, :, start:start + n]
        storage = code_storage(qs[0], heads, groups, capacity, device)
        group.encode(x.data_ptr(), n, groups, x.stride(1), x.stride(0), *pointers(storage, first),
                     groups * capacity, capacity, stream_of(device), True)
        for name, t in storage.items():  # nothing written outside rows first .. first + n - 1
            outside = torch.cat([t[:, :, :first].flatten(), t[:, :, first + n:].flatten()])
            assert bool((outside == SENTINEL).all()), name
        for h, q in enumerate(qs):
            for g in range(groups):
                rows = x[g, h]
                cpu = q._native.encode(np.ascontiguousarray(rows.cpu().numpy()))
                gpu = single_head_codes(q, rows, device)
                for name, expected in zip(FIELDS, cpu):
                    got = storage[name][h, g, first:first + n].cpu().numpy()
                    np.testing.assert_array_equal(got, expected, err_msg=f"{name} head {h} group {g} n {n} (CPU)")
                    np.testing.assert_array_equal(got, gpu[name].cpu().numpy(),
                                                  err_msg=f"{name} head {h} group {g} n {n} (CudaQuantizer)")


@cuda
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[9], CASES[12]], ids=case_id)
def test_group_encode_of_unaligned_and_contiguous_layouts(device, case):
    """Rows whose heads / groups are not 16-byte aligned (the fast kernels need it: the general kernel runs) and the
    plain contiguous (heads, n, dim) layout with codes (heads, n, bytes) give the same codes."""
    heads, n = 4, 9
    qs = quantizers(case, heads, seed=3)
    group = _core.CudaQuantizerGroup([q._native for q in qs], device.index)
    dim = qs[0].dim
    gen = torch.Generator(device="cpu").manual_seed(8)
    flat = torch.randn(heads * n * dim + 1, generator=gen).to(device)
    for x in (flat[1:].view(heads, n, dim), flat[:-1].view(heads, n, dim)):  # 4-byte and 16-byte aligned
        storage = code_storage(qs[0], heads, 1, n, device)
        group.encode(x.data_ptr(), n, 1, n * dim, 0, *pointers(storage, 0), n, 0, stream_of(device), True)
        for h, q in enumerate(qs):
            cpu = q._native.encode(np.ascontiguousarray(x[h].cpu().numpy()))
            for name, expected in zip(FIELDS, cpu):
                np.testing.assert_array_equal(storage[name][h, 0].cpu().numpy(), expected, err_msg=f"{name} head {h}")


@cuda
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_decode_equals_each_heads_decode(device, case, dtype):
    heads, groups, capacity, n = 3, 2, 50, 13
    qs = quantizers(case, heads, seed=21)
    group = _core.CudaQuantizerGroup([q._native for q in qs], device.index)
    dim = qs[0].dim
    dtype_code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    gen = torch.Generator(device="cpu").manual_seed(9)
    storage = code_storage(qs[0], heads, groups, capacity, device)
    x = torch.randn((groups, heads, n, dim), generator=gen).to(device)
    group.encode(x.data_ptr(), n, groups, x.stride(1), x.stride(0), *pointers(storage, 4), groups * capacity,
                 capacity, stream_of(device), True)
    # output rows into a (groups, heads, n + 2, dim) buffer at row 1 (strided, as a view of a larger tensor)
    out_buffer = torch.full((groups, heads, n + 2, dim), 7.0, dtype=dtype, device=device)
    out = out_buffer[:, :, 1:1 + n]
    group.decode(*pointers(storage, 4), n, groups, groups * capacity, capacity, out.data_ptr(), out.stride(1),
                 out.stride(0), dtype_code, stream_of(device), True)
    assert bool((out_buffer[:, :, 0] == 7.0).all()) and bool((out_buffer[:, :, n + 1] == 7.0).all())
    for h, q in enumerate(qs):
        native = q._device_native("cuda", device.index)
        for g in range(groups):
            codes = {name: storage[name][h, g, 4:4 + n].contiguous() for name in FIELDS}
            single = torch.empty((n, dim), dtype=dtype, device=device)
            native.decode(*[t.data_ptr() if t.numel() else 0 for t in codes.values()], n, single.data_ptr(),
                          dtype_code, stream_of(device), True)
            assert torch.equal(out[g, h], single), f"head {h} group {g}"
            if dtype == torch.float32:
                cpu = q._native.decode(*[np.ascontiguousarray(t.cpu().numpy()) for t in codes.values()])
                error = np.abs(out[g, h].cpu().numpy().astype(np.float64) - cpu).max()
                assert error <= 1e-5 * max(1.0, np.abs(cpu).max()), (h, g, error)


@cuda
def test_group_checks_name_head_group_and_row(device):
    heads, groups, n, capacity = 3, 2, 5, 8
    qs = quantizers(CASES[1], heads)  # hadamard 128 / 4 bits: the fast kernel
    group = _core.CudaQuantizerGroup([q._native for q in qs], device.index)
    dim = qs[0].dim
    stream = stream_of(device)

    def encode(x, check=True):
        storage = code_storage(qs[0], heads, groups, capacity, device)
        group.encode(x.data_ptr(), n, groups, x.stride(1), x.stride(0), *pointers(storage, 0), groups * capacity,
                     capacity, stream, check)
        return storage

    x = torch.randn((groups, heads, n, dim), device=device)
    x[1, 2, 3, 17] = float("nan")
    x[1, 2, 4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"head 2, group 1, row 3 contains non-finite values"):
        encode(x)
    encode(x, check=False)  # unchecked: no error (unspecified codes for the bad rows)
    x = torch.randn((groups, heads, n, dim), device=device)
    x[0, 1, 2] *= 1e6  # norm > 65504: overflows the float16 norm
    with pytest.raises(ValueError, match=r"the norm of head 1, group 0, row 2 overflows float16"):
        encode(x)
    storage = encode(torch.randn((groups, heads, n, dim), device=device))
    storage["norms"][2, 1, 1] = 0xFF  # a NaN float16 norm: corrupted codes
    out = torch.empty((groups, heads, n, dim), device=device)
    with pytest.raises(ValueError, match=r"stored norm of the code at head 2, group 1, row 1"):
        group.decode(*pointers(storage, 0), n, groups, groups * capacity, capacity, out.data_ptr(), out.stride(1),
                      out.stride(0), 0, stream, True)


@cuda
def test_group_argument_errors(device):
    qs = quantizers(CASES[1], 2)
    native = [q._native for q in qs]
    with pytest.raises(ValueError, match="number of quantizers"):
        _core.CudaQuantizerGroup([], device.index)
    with pytest.raises(ValueError, match="equal parameters except the seed"):
        _core.CudaQuantizerGroup([native[0], rq.Quantizer(128, 3, rotation="hadamard")._native], device.index)
    with pytest.raises(ValueError, match="quantizer 1"):
        _core.CudaQuantizerGroup([native[0], None], device.index)
    with pytest.raises(ValueError, match="rotation kind"):
        _core.CudaQuantizerGroup([rq.Quantizer(64, 3, rotation="rotor_network")._native], device.index)
    with pytest.raises(ValueError, match="device"):
        _core.CudaQuantizerGroup(native, rq.cuda_device_count())
    with pytest.raises(TypeError):
        _core.CudaQuantizerGroup(native[0], device.index)
    group = _core.CudaQuantizerGroup(native, device.index)
    dim, n = 128, 4
    x = torch.randn((2, n, dim), device=device)
    storage = code_storage(qs[0], 2, 1, n, device)
    ptrs = pointers(storage, 0)
    stream = stream_of(device)
    good = dict(x_ptr=x.data_ptr(), n=n, groups=1, x_head_stride=n * dim, x_group_stride=0, indices_ptr=ptrs[0],
                norms_ptr=ptrs[1], signs_ptr=ptrs[2], residual_norms_ptr=ptrs[3], code_head_stride=n,
                code_group_stride=0, stream=stream, check=True)
    group.encode(**good)
    for change, message in ((dict(n=-1), "n: expected >= 0"), (dict(groups=0), r"groups: expected in \[1, 65535\]"),
                            (dict(groups=70000), r"groups: expected in \[1, 65535\]"),
                            (dict(x_head_stride=-4), "x_head_stride: expected >= 0"),
                            (dict(code_group_stride=-1), "code_group_stride: expected >= 0"),
                            (dict(code_head_stride=1), "non-overlapping"),
                            (dict(groups=2, code_group_stride=2), "non-overlapping"),
                            (dict(x_ptr=0), "x: expected a non-null device pointer"),
                            (dict(norms_ptr=0), "norms: expected a non-null device pointer"),
                            (dict(indices_ptr=0), "indices: expected a non-null device pointer"),
                            (dict(norms_ptr=ptrs[1] + 1), "norms: expected a pointer aligned to 2 bytes")):
        with pytest.raises(ValueError, match=message):
            group.encode(**{**good, **change})
    group.encode(**{**good, "n": 0, "x_ptr": 0})  # nothing to do: no pointer is needed
    with pytest.raises(TypeError):
        group.encode(**{**good, "n": 1.5})
    out = torch.empty((2, n, dim), device=device)
    decode = dict(indices_ptr=ptrs[0], norms_ptr=ptrs[1], signs_ptr=0, residual_norms_ptr=0, n=n, groups=1,
                  code_head_stride=n, code_group_stride=0, out_ptr=out.data_ptr(), out_head_stride=n * dim,
                  out_group_stride=0, dtype=0, stream=stream, check=True)
    group.decode(**decode)
    for change, error, message in ((dict(dtype=3), TypeError, "dtype"),
                                   (dict(out_head_stride=dim), ValueError, "non-overlapping"),
                                   (dict(out_ptr=0), ValueError, "out: expected a non-null device pointer"),
                                   (dict(out_ptr=out.data_ptr() + 2), ValueError, "aligned to 4 bytes"),
                                   (dict(groups=0), ValueError, "groups")):
        with pytest.raises(error, match=message):
            group.decode(**{**decode, **change})
    # overlapping code rows are fine to read (decode checks only its output rows): head 1 decodes head 0's codes
    before = out[0].clone()
    group.decode(**{**decode, "code_head_stride": 0})
    assert torch.equal(out[0], before)
