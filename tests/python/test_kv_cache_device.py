"""Device-resident rotorquant.KVCache (docs/kv_cache.md "Device-resident mode") against the C++ cache.

Every test feeds a device-resident cache and a host (C++ core) cache the same appends and compares what they
hold: code bytes (equal: the encoders are bit-identical, docs/format.md section 8), dequantized K/V, attention,
lengths, statistics, and the errors. The state machine (ring window, sinks, eviction, growth, reorder, crop) is
the same Python code on any torch device, so it also runs on CPU torch tensors with the CPU codec
(`torch_cpu`, no GPU needed); the `cuda` variants run it on the GPU with the CUDA codec and kernels.
"""
import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rotorquant as rq  # noqa: E402
from rotorquant._kv_cache_device import _decode_attention_class  # noqa: E402

D = 64
BACKENDS = ["torch_cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
HAS_DECODE_ATTENTION = _decode_attention_class() is not None
NO_FUSED_REASON = "rotorquant has no DecodeAttention yet (the fused decode-attention kernel is not merged)"


def make_pair(backend, num_layers=2, heads=2, d=D, **kwargs):
    """(host cache, device-resident cache) with the same parameters."""
    host = rq.KVCache(num_layers, heads, d, **kwargs)
    if backend == "cuda":
        device = rq.KVCache(num_layers, heads, d, device="cuda", **kwargs)
    else:
        device = rq.KVCache(num_layers, heads, d, **kwargs)._use_torch_state_for_tests()
    return host, device


def on(backend, array):
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to("cuda") if backend == "cuda" else tensor


def host_array(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def random_kv(rng, batch, heads, tokens, d=D):
    """Keys with a shared bias direction and an outlier channel (as real keys), values with an offset."""
    k = rng.standard_normal((batch, heads, tokens, d)).astype(np.float32)
    v = rng.standard_normal((batch, heads, tokens, d)).astype(np.float32)
    k[..., 3] += 6.0
    k[..., 10] *= 5.0
    v += 0.5
    return k, v


def relative_max_error(actual, expected):
    actual = np.asarray(host_array(actual), dtype=np.float64)
    expected = np.asarray(host_array(expected), dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    return float(np.abs(actual - expected).max() / max(1.0, np.abs(expected).max()))


def dequantize_tolerance(backend, rotation, mode="mse"):
    """CPU torch: the same decoder, exact. CUDA decode agrees with the CPU's to float32 rounding: a few roundings
    per coordinate for identity/hadamard (log2 d butterfly stages)/planar/quat/rotor3 blocks (<= 8 * 2^-24 ~ 5e-7,
    so 1e-6 of the largest value); the dense rotation and the QJL term of prod mode sum d = 64 products in another
    order (~sqrt(d) * 2^-24 typical, d * 2^-24 ~ 4e-6 worst): 1e-5, the codec's own decode tolerance. rotor_network
    decodes through the host (no CUDA codec): exact."""
    if backend != "cuda" or rotation == "rotor_network":
        return 0.0
    return 1e-5 if rotation == "dense" or mode == "prod" else 1e-6


# Tolerances of attend against the host cache: the dequantized path is float32 attention over the same K/V in
# another order (1e-4 relative, the figure); the fused kernel 1e-3 relative (the figure for
# fp16/bf16; float32 queries here).
DEQUANTIZED_TOLERANCE = 1e-4
FUSED_TOLERANCE = 1e-3

CONFIGS = [
    dict(key_bits=4, value_bits=3, residual_window=6, sink_tokens=2),
    dict(key_bits=3, value_bits=3, residual_window=5, sink_tokens=0, center_values=True, key_channel_scaling=0.5),
    dict(key_bits=2, value_bits=4, rotation="planar", residual_window=0, sink_tokens=3),
    dict(key_bits=3, value_bits=3, mode="prod", residual_window=4),
    dict(key_bits=4, value_bits=2, rotation="quat", protected_layers=(0,), residual_window=3, sink_tokens=1),
    dict(key_bits=4, value_bits=4, rotation="rotor3", residual_window=2),
    dict(key_bits=3, value_bits=3, rotation="rotor_network", residual_window=3),
    dict(key_bits=4, value_bits=3, rotation="dense", norm_dtype="float32", norm_correction=True, center_keys=False,
         residual_window=7, sink_tokens=0),
]


def assert_same_state(host, device, backend, check_codes=True):
    assert device.batch_size == host.batch_size
    for layer in range(host.num_layers):
        lengths = [(f(layer), g(layer)) for f, g in ((host.seq_length, device.seq_length),
                                                    (host.quantized_length, device.quantized_length),
                                                    (host.window_length, device.window_length),
                                                    (host.sink_length, device.sink_length))]
        assert all(a == b for a, b in lengths), lengths
        for head in range(host.num_kv_heads):
            for getter in ("key_mean", "value_mean", "key_scale"):
                a, b = getattr(host, getter)(layer, head), getattr(device, getter)(layer, head)
                assert (a is None) == (b is None), getter
                if a is not None:
                    np.testing.assert_array_equal(a, b, err_msg=getter)  # bit for bit
            if check_codes:
                for values in (False, True):
                    a = host.codes(layer, head, values).to("cpu").flat()
                    b = device.codes(layer, head, values).to("cpu").flat()
                    for name in a:
                        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{name} layer {layer} head {head}")
        hk, hv = host.dequantize(layer)
        dk, dv = device.dequantize(layer)
        assert isinstance(dk, torch.Tensor) and dk.device == device._state.device
        tolerance = dequantize_tolerance(backend, host.params["rotation"], host.params["mode"])
        assert relative_max_error(dk, hk) <= tolerance
        assert relative_max_error(dv, hv) <= tolerance


def assert_attend_close(host, device, backend, layer, q, **kwargs):
    expected = host.attend(layer, q, **kwargs)
    out = device.attend(layer, on(backend, q), **{k: (on(backend, v) if isinstance(v, np.ndarray) else v)
                                                 for k, v in kwargs.items()})
    assert isinstance(out, torch.Tensor) and out.shape == expected.shape and out.dtype == torch.float32
    path = device.attend_path(layer, q.shape[2])
    tolerance = FUSED_TOLERANCE if path == "fused" else DEQUANTIZED_TOLERANCE
    error = relative_max_error(out, expected)
    assert error <= tolerance, f"{path} path: relative error {error:.2e} > {tolerance:.0e}"
    return path


# ---- the C++ statistics function -----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(), dict(center_values=True), dict(key_channel_scaling=0.5),
                                     dict(center_keys=False, key_channel_scaling=1.0, center_values=True)])
def test_kv_chunk_statistics_are_the_cpu_caches_bit_for_bit(options):
    rng = np.random.default_rng(1)
    k, v = random_kv(rng, 3, 2, 11)
    cache = rq.KVCache(1, 2, D, **options)
    cache.append(0, k, v)
    key_mean, value_mean, key_scale = rq._core.kv_chunk_statistics(
        k, v, cache.params["center_keys"], cache.params["center_values"], cache.params["key_channel_scaling"])
    for name, stat in (("key_mean", key_mean), ("value_mean", value_mean), ("key_scale", key_scale)):
        for head in range(2):
            expected = getattr(cache, name)(0, head)
            if expected is None:
                assert stat is None
            else:
                np.testing.assert_array_equal(stat[head], expected)
    # the means are the float64 means rounded once
    if key_mean is not None:
        np.testing.assert_array_equal(key_mean, k.astype(np.float64).mean(axis=(0, 2)).astype(np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        bad = k.copy()
        bad[0, 1, 2, 3] = np.inf
        rq._core.kv_chunk_statistics(bad, v, True, False, 0.0)
    with pytest.raises(ValueError, match="shape"):
        rq._core.kv_chunk_statistics(k, np.ascontiguousarray(v[:, :, :3]), True, False, 0.0)
    with pytest.raises(ValueError, match="key_channel_scaling"):
        rq._core.kv_chunk_statistics(k, v, True, False, 2.0)


def test_host_codes_accessor_decodes_to_dequantize():
    rng = np.random.default_rng(2)
    cache = rq.KVCache(1, 2, D, residual_window=3, sink_tokens=2, key_channel_scaling=0.5)
    k, v = random_kv(rng, 2, 2, 12)
    cache.append(0, k, v)
    keys, values = cache.dequantize(0)
    count = cache.quantized_length(0)
    assert count == 12 - 3 - 2
    for head in range(2):
        codes = cache.codes(0, head)
        assert codes.batch_shape == (2, count) and codes.device == "cpu"
        decoded = rq.Quantizer._from_params(cache.quantizer_params(0, head)).decode(codes)
        rebuilt = decoded * cache.key_scale(0, head) + cache.key_mean(0, head)
        np.testing.assert_allclose(rebuilt, keys[:, head, 2:2 + count], rtol=0, atol=1e-5)
        decoded = rq.Quantizer._from_params(cache.quantizer_params(0, head, True)).decode(cache.codes(0, head, True))
        np.testing.assert_allclose(decoded, values[:, head, 2:2 + count], rtol=0, atol=1e-6)


# ---- device argument ------------------------------------------------------------------------------------------


def test_device_argument_validation():
    with pytest.raises(TypeError, match="device"):
        rq.KVCache(1, 2, D, device=3)
    with pytest.raises(ValueError, match="device"):
        rq.KVCache(1, 2, D, device="tpu")
    with pytest.raises(ValueError, match="device"):
        rq.KVCache(1, 2, D, device="cuda:x")
    with pytest.raises(TypeError, match="device_checks"):
        rq.KVCache(1, 2, D, device_checks="yes")
    if not rq.has_cuda():
        with pytest.raises(ValueError, match="usable CUDA device"):
            rq.KVCache(1, 2, D, device="cuda")
        with pytest.raises(ValueError, match="usable CUDA device"):
            rq.KVCache(1, 2, D, device=torch.device("cuda", 0))
    host = rq.KVCache(1, 2, D, device="cpu")
    assert host.device == "cpu" and not host.device_resident and host.params["device"] == "cpu"
    auto = rq.KVCache(1, 2, D)
    assert auto.device is None and auto.attend_path(0) == "host"
    rng = np.random.default_rng(3)
    k, v = random_kv(rng, 1, 2, 5)
    auto.append(0, torch.from_numpy(k), torch.from_numpy(v))  # CPU tensors: host-resident, as before
    assert auto.device == "cpu" and not auto.device_resident


# ---- device-resident state vs the C++ cache ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_device_cache_holds_the_cpu_caches_codes_and_attends_alike(backend, config):
    rng = np.random.default_rng(4)
    host, device = make_pair(backend, seed=9, **config)
    batch, q_heads = 2, 4
    for step, tokens in enumerate((9, 1, 1, 5, 1, 30, 1)):
        k, v = random_kv(rng, batch, 2, tokens)
        for layer in range(2):
            host.append(layer, k, v)
            device.append(layer, on(backend, k), on(backend, v))
        q = rng.standard_normal((batch, q_heads, 1, D)).astype(np.float32)
        for layer in range(2):
            assert_attend_close(host, device, backend, layer, q)
    assert_same_state(host, device, backend)
    seq = host.seq_length(0)
    q = rng.standard_normal((batch, q_heads, 5, D)).astype(np.float32)
    mask = rng.random((batch, 5, seq)) < 0.7
    mask[1, 2] = False  # a row that sees nothing: zeros
    for layer in range(2):
        assert assert_attend_close(host, device, backend, layer, q) == "dequantized"
        assert_attend_close(host, device, backend, layer, q, mask=mask, scale=0.3)
        assert_attend_close(host, device, backend, layer, q, causal=False)
        out = device.attend(layer, on(backend, q), mask=on(backend, mask))
        assert float(out[1, :, 2].abs().max()) == 0.0
    decode_mask = rng.random((batch, 1, 1, seq)) < 0.6
    decode_mask[0, 0, 0] = False
    decode_mask[1] = False  # batch row 1 sees nothing
    q1 = rng.standard_normal((batch, q_heads, 1, D)).astype(np.float32)
    for layer in range(2):
        assert_attend_close(host, device, backend, layer, q1, mask=decode_mask)
    # the output keeps the queries' dtype
    half = device.attend(0, on(backend, q1).to(torch.bfloat16))
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantized_attention_in_query_chunks(backend, monkeypatch):
    import rotorquant._kv_cache_device as device_module

    rng = np.random.default_rng(13)
    host, device = make_pair(backend, num_layers=1, residual_window=3, sink_tokens=1)
    k, v = random_kv(rng, 2, 2, 20)
    host.append(0, k, v)
    device.append(0, on(backend, k), on(backend, v))
    q = rng.standard_normal((2, 4, 7, D)).astype(np.float32)
    mask = rng.random((2, 7, 20)) < 0.8
    # two query rows per SDPA call: the chunks' key spans and masks must line up with the causal positions
    monkeypatch.setattr(device_module, "_ATTENTION_ELEMENTS", 2 * 2 * 4 * 20)
    for kwargs in (dict(), dict(mask=mask), dict(causal=False, mask=mask)):
        assert_attend_close(host, device, backend, 0, q, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_growth_across_capacity_doublings(backend):
    rng = np.random.default_rng(5)
    host, device = make_pair(backend, num_layers=1, residual_window=4, sink_tokens=1)
    capacities = []
    for tokens in (1, 6, 300, 700, 1, 1500):
        k, v = random_kv(rng, 2, 2, tokens)
        host.append(0, k, v)
        device.append(0, on(backend, k), on(backend, v))
        capacities.append(device._state.layers[0].capacity)
    assert capacities[0] == 256 and len(set(capacities)) >= 4, capacities
    assert all(c >= n for c, n in zip(capacities, [0, 2, 302, 1002, 1003, 2503])), capacities
    assert_same_state(host, device, backend)
    # real bytes: codes at capacity (2 heads x 2 rows), sink + window slots (float32 K and V), the key means
    per_token = host.code_bytes_per_token(0)
    assert device.nbytes() == 2 * 2 * capacities[-1] * per_token + 2 * 2 * (1 + 4) * D * 4 * 2 + 2 * D * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_reorder_crop_reset_follow_the_cpu_cache(backend):
    rng = np.random.default_rng(6)
    host, device = make_pair(backend, residual_window=5, sink_tokens=2, center_values=True)

    def append(batch, tokens):
        k, v = random_kv(rng, batch, 2, tokens)
        for layer in range(2):
            host.append(layer, k, v)
            device.append(layer, on(backend, k), on(backend, v))

    def check():
        assert_same_state(host, device, backend)
        q = rng.standard_normal((host.batch_size, 2, 1, D)).astype(np.float32)
        for layer in range(2):
            assert_attend_close(host, device, backend, layer, q)

    append(3, 14)
    for _ in range(3):
        append(3, 1)  # the window ring wraps
    check()
    host.reorder([2, 0, 0, 1])
    device.reorder(on(backend, np.array([2, 0, 0, 1])) if backend == "cuda" else [2, 0, 0, 1])
    assert device.batch_size == 4
    check()
    append(4, 3)
    for length in (18, 14, 12, 9, 3, 1):  # into the window (ring wrapped), the codes, the sink
        host.crop(length)
        device.crop(length)
        check()
        append(4, 2)
        append(4, 1)
        check()
    host.crop(100)  # longer than held: no-op
    device.crop(100)
    check()
    host.reset()
    device.reset()
    assert device.batch_size == 0 and device.seq_length(0) == 0 and device.key_mean(0, 0) is None
    assert device.device_resident  # a forced (here: test) device stays after reset
    append(1, 9)  # a new batch size after reset
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_errors_as_on_the_cpu(backend):
    rng = np.random.default_rng(7)
    _, cache = make_pair(backend, num_layers=2, heads=3, residual_window=2)
    k, v = random_kv(rng, 1, 3, 4)
    kt, vt = on(backend, k), on(backend, v)
    with pytest.raises(ValueError, match="head_dim|shape"):
        cache.append(0, kt[..., :32], vt[..., :32])
    with pytest.raises(ValueError, match="layer"):
        cache.append(2, kt, vt)
    with pytest.raises(ValueError, match="layer"):
        cache.append(-1, kt, vt)
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, kt, vt[:, :, :3])
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, kt[:, :2], vt[:, :2])
    with pytest.raises(ValueError, match="dtype"):
        cache.append(0, kt.to(torch.int32), vt)
    with pytest.raises(ValueError, match="torch tensor on"):
        cache.append(0, k, v)  # numpy arrays: host memory
    for first in (True, False):  # the first append (statistics on the host) and a later one (device check)
        bad = k.copy()
        bad[0, 1, 2, 3] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            cache.append(0, on(backend, bad), vt)
        with pytest.raises(ValueError, match="non-finite"):
            cache.append(0, kt, on(backend, bad))
        assert cache.seq_length(0) == (0 if first else 4)  # nothing stored by a failed append
        if first:
            cache.append(0, kt, vt)
    with pytest.raises(ValueError, match="batch"):
        cache.append(0, torch.cat([kt, kt]), torch.cat([vt, vt]))
    q = rng.standard_normal((1, 4, 1, D)).astype(np.float32)
    with pytest.raises(ValueError, match="multiple"):
        cache.attend(0, on(backend, q))
    with pytest.raises(ValueError, match="head_dim|shape"):
        cache.attend(0, on(backend, rng.standard_normal((1, 3, 1, 32)).astype(np.float32)))
    with pytest.raises(ValueError, match="layer"):
        cache.attend(5, on(backend, rng.standard_normal((1, 3, 1, D)).astype(np.float32)))
    good_q = on(backend, rng.standard_normal((1, 3, 1, D)).astype(np.float32))
    with pytest.raises(ValueError, match="dtype"):
        cache.attend(0, good_q.to(torch.int64))
    with pytest.raises(ValueError, match="batch"):
        cache.attend(0, torch.cat([good_q, good_q]))
    with pytest.raises(ValueError, match="mask"):
        cache.attend(0, good_q, mask=on(backend, np.ones((1, 1, 3), dtype=bool)))
    with pytest.raises(ValueError, match="dtype"):
        cache.attend(0, good_q, mask=on(backend, np.ones((1, 1, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="scale"):
        cache.attend(0, good_q, scale=-1.0)
    with pytest.raises(TypeError, match="causal"):
        cache.attend(0, good_q, causal="yes")
    with pytest.raises(ValueError, match="non-finite"):
        cache.attend(0, good_q * float("nan"))
    with pytest.raises(ValueError, match="torch tensor on"):
        cache.attend(0, host_array(good_q))
    with pytest.raises(ValueError):
        cache.reorder([0, 1])
    with pytest.raises(ValueError):
        cache.reorder([])
    with pytest.raises(ValueError):
        cache.reorder([[0]])
    with pytest.raises(ValueError):
        cache.crop(-1)
    assert cache.seq_length(0) == 4 and cache.batch_size == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_overflow_raises_and_stores_nothing(backend):
    rng = np.random.default_rng(8)
    _, cache = make_pair(backend, num_layers=1, residual_window=0, sink_tokens=0)
    k, v = random_kv(rng, 1, 2, 3)
    cache.append(0, on(backend, k), on(backend, v))
    big = (rng.standard_normal((1, 2, 3, D)) * 1e4).astype(np.float32)  # centered norms ~ 8e4 > 65504
    with pytest.raises(ValueError, match="overflows float16"):
        cache.append(0, on(backend, big), on(backend, v))
    assert cache.seq_length(0) == 3 and cache.quantized_length(0) == 3
    _, wide = make_pair(backend, num_layers=1, residual_window=0, sink_tokens=0, norm_dtype="float32")
    wide.append(0, on(backend, k), on(backend, v))
    wide.append(0, on(backend, big), on(backend, v))
    assert wide.quantized_length(0) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_mode_stores_the_same_codes(backend):
    rng = np.random.default_rng(9)
    host = rq.KVCache(1, 2, D, residual_window=3)
    if backend == "cuda":
        device = rq.KVCache(1, 2, D, residual_window=3, device="cuda", device_checks=False)
    else:
        device = rq.KVCache(1, 2, D, residual_window=3, device_checks=False)._use_torch_state_for_tests()
    for tokens in (7, 1, 1, 4):
        k, v = random_kv(rng, 2, 2, tokens)
        host.append(0, k, v)
        device.append(0, on(backend, k), on(backend, v))
    assert_same_state(host, device, backend)


# ---- the fused path's arguments, against an oracle of the DecodeAttention contract (no GPU needed) ---------------


class ContractDecodeAttention:
    """A slow float64 oracle of the rotorquant.DecodeAttention contract on CPU tensors: asserts the layout rules
    of the contract, decodes the codes with the CPU core and runs softmax attention over codes + fp tokens."""

    calls = 0

    def __init__(self, key_quantizers, value_quantizers, device=None):
        assert len(key_quantizers) == len(value_quantizers) >= 1
        self.key_quantizers, self.value_quantizers = key_quantizers, value_quantizers

    @staticmethod
    def unsupported_reason(key_params, value_params):
        for p in (key_params, value_params):
            if p["mode"] != "mse" or not 2 <= p["bits"] <= 4 or p["dim"] not in (64, 128, 256):
                return "unsupported mode, bits or head_dim"
            if p["rotation"] not in ("identity", "dense", "hadamard", "planar", "quat"):
                return "unsupported rotation"
        return None

    def __call__(self, queries, key_indices, key_norms, value_indices, value_norms, code_lengths, *,
                 max_code_length=None, block_table=None, fp_keys=None, fp_values=None, fp_lengths=None,
                 key_scales=None, value_means=None, scale=None, out_dtype=None, code_mask=None, fp_mask=None):
        type(self).calls += 1
        batch, q_heads, d = queries.shape
        heads = len(self.key_quantizers)
        assert block_table is None and q_heads % heads == 0
        for indices, norms in ((key_indices, key_norms), (value_indices, value_norms)):
            assert indices.dtype == norms.dtype == torch.uint8 and indices.shape[:3] == norms.shape[:3]
            assert indices.shape[:2] == (batch, heads)
            index_bytes, norm_bytes = indices.shape[3], norms.shape[3]
            assert indices.stride(3) == 1 and indices.stride(2) == index_bytes
            assert norms.stride(3) == 1 and norms.stride(2) == norm_bytes
            for dim in (0, 1):  # equal row strides
                assert indices.stride(dim) // index_bytes == norms.stride(dim) // norm_bytes
                assert indices.stride(dim) % index_bytes == 0 and norms.stride(dim) % norm_bytes == 0
        assert code_lengths.dtype == torch.int32 and tuple(code_lengths.shape) == (batch,)
        lengths = code_lengths.tolist()
        assert max(lengths) <= max_code_length <= key_indices.shape[2]
        if fp_keys is not None:
            for t in (fp_keys, fp_values):
                assert t.dtype == torch.float32 and t.is_contiguous() and t.shape[:2] == (batch, heads)
            assert fp_lengths.dtype == torch.int32 and tuple(fp_lengths.shape) == (batch,)
            assert max(fp_lengths.tolist()) <= fp_keys.shape[2]
        if code_mask is not None:
            assert code_mask.dtype == torch.bool and code_mask.shape[0] == batch
            assert code_mask.shape[1] >= max_code_length
        if fp_mask is not None:
            assert fp_mask.dtype == torch.bool and tuple(fp_mask.shape) == (batch, fp_keys.shape[2])
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        group = q_heads // heads
        out = torch.zeros((batch, q_heads, d), dtype=torch.float64)

        def decode(quantizer, indices, norms, b, h, n):
            empty = np.zeros((n, 0), dtype=np.uint8)
            arrays = [np.ascontiguousarray(indices[b, h, :n].numpy()), np.ascontiguousarray(norms[b, h, :n].numpy()),
                      empty, empty]
            return torch.from_numpy(quantizer._native.decode(*arrays)).double()

        for b in range(batch):
            for h in range(heads):
                n = lengths[b]
                keys = decode(self.key_quantizers[h], key_indices, key_norms, b, h, n)
                if key_scales is not None:
                    keys = keys * key_scales[h].double()
                values = decode(self.value_quantizers[h], value_indices, value_norms, b, h, n)
                visible = code_mask[b, :n] if code_mask is not None else torch.ones(n, dtype=torch.bool)
                if fp_keys is not None:
                    m = int(fp_lengths[b])
                    keys = torch.cat([keys, fp_keys[b, h, :m].double()])
                    values = torch.cat([values, fp_values[b, h, :m].double()])
                    visible = torch.cat([visible, fp_mask[b, :m] if fp_mask is not None else
                                         torch.ones(m, dtype=torch.bool)])
                for g in range(group):
                    row = h * group + g
                    if visible.any():
                        scores = (keys @ queries[b, row].double()) * scale
                        scores[~visible] = -math.inf
                        out[b, row] = torch.softmax(scores, dim=0) @ values
                    if value_means is not None:  # a row that sees nothing: zeros + value mean (the contract)
                        out[b, row] += value_means[h].double()
        return out.to(out_dtype or queries.dtype)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[4]],
                         ids=["k4v3", "centered-scaled", "planar-window0", "protected-quat"])
def test_fused_path_arguments_follow_the_contract(monkeypatch, config):
    import rotorquant._kv_cache_device as device_module

    monkeypatch.setattr(device_module, "_fused_attention_class", lambda device: (ContractDecodeAttention, None))
    ContractDecodeAttention.calls = 0
    rng = np.random.default_rng(12)
    host, device = make_pair("torch_cpu", seed=3, **config)
    assert device.attend_path(0, 1) == ("dequantized" if config.get("protected_layers") else "fused")
    assert device.attend_path(1, 1) == "fused" and device.attend_path(1, 2) == "dequantized"
    batch, q_heads = 3, 6
    for tokens in (13, 1, 1, 1, 1, 1, 1, 1, 1, 20, 1, 1):  # the window ring wraps; sinks; codes grow
        k, v = random_kv(rng, batch, 2, tokens)
        for layer in range(2):
            host.append(layer, k, v)
            device.append(layer, torch.from_numpy(k), torch.from_numpy(v))
        seq = host.seq_length(1)
        q = rng.standard_normal((batch, q_heads, 1, D)).astype(np.float32)
        mask = rng.random((batch, 1, 1, seq)) < 0.5
        mask[2] = False  # a row that sees nothing: zeros (no value mean), as the CPU
        for kwargs in (dict(), dict(mask=mask), dict(scale=0.2, mask=mask)):
            expected = host.attend(1, q, **kwargs)
            out = device.attend(1, torch.from_numpy(q), **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                                          for k, v in kwargs.items()})
            assert relative_max_error(out, expected) <= 1e-5
    assert ContractDecodeAttention.calls == 12 * 3
    device.crop(host.seq_length(1) - 2)  # the window ring, re-linearized by crop
    host.crop(host.seq_length(1) - 2)
    q = rng.standard_normal((batch, q_heads, 1, D)).astype(np.float32)
    assert relative_max_error(device.attend(1, torch.from_numpy(q)), host.attend(1, q)) <= 1e-5


# ---- Hugging Face with the device state (CPU torch tensors; the same code the GPU runs) -----------------------------


def tiny_llama(head_dim, hidden=64, layers=2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("rotorquant.hf")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=head_dim, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = None
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    model.set_attn_implementation("rotorquant")
    return model, sdpa


def torch_state_cache(config, **options):
    import rotorquant.hf as rqhf

    cache = rqhf.RotorQuantCache(config, **options)
    cache.kv_cache._use_torch_state_for_tests()
    return cache


def test_hf_generate_and_beam_search_with_the_device_state():
    model, sdpa = tiny_llama(16)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    cache = torch_state_cache(model.config, key_bits=8, value_bits=8, residual_window=0, sink_tokens=0)
    assert torch.equal(model.generate(ids, past_key_values=cache, **kwargs), sdpa.generate(ids, **kwargs))
    assert cache.kv_cache.device_resident and cache.kv_cache._core.batch_size == 0
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    cache = torch_state_cache(model.config, residual_window=64)  # exact: must reproduce DynamicCache
    assert torch.equal(model.generate(ids, past_key_values=cache, **kwargs), sdpa.generate(ids, **kwargs))
    assert cache.kv_cache.batch_size == 6
    # the slow path (another attention implementation gets dequantized K/V as torch tensors)
    options = dict(key_bits=3, value_bits=2, residual_window=4, sink_tokens=2, center_values=True)
    slow, fast = torch_state_cache(sdpa.config, **options), torch_state_cache(model.config, **options)
    ids = torch.randint(3, 96, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for start, size in ((0, 9), (9, 5), (14, 1), (15, 1), (16, 7)):
            chunk = ids[:, start:start + size]
            a = sdpa(input_ids=chunk, past_key_values=slow, use_cache=True).logits
            b = model(input_ids=chunk, past_key_values=fast, use_cache=True).logits
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_hf_decode_through_the_fused_path_arguments(monkeypatch):
    import rotorquant._kv_cache_device as device_module

    monkeypatch.setattr(device_module, "_fused_attention_class", lambda device: (ContractDecodeAttention, None))
    ContractDecodeAttention.calls = 0
    model, _ = tiny_llama(64, hidden=128)
    options = dict(key_bits=4, value_bits=3, residual_window=5, sink_tokens=2, center_values=True)
    fused = torch_state_cache(model.config, **options)
    host = rqhf_cache(model.config, **options)
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(6))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    a = model.generate(ids, past_key_values=fused, **kwargs)
    b = model.generate(ids, past_key_values=host, **kwargs)
    assert torch.equal(a, b)
    assert ContractDecodeAttention.calls == 2 * 9  # every decode step of every layer; prefill: dequantized path
    assert fused.kv_cache.attend_path(0, 1) == "fused"


def rqhf_cache(config, **options):
    import rotorquant.hf as rqhf

    return rqhf.RotorQuantCache(config, **options)


# ---- CUDA only ----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_automatic_device_choice_and_mixing_errors():
    rng = np.random.default_rng(10)
    k, v = random_kv(rng, 1, 2, 6)
    cache = rq.KVCache(1, 2, D, residual_window=2)
    assert cache.device is None
    cache.append(0, torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda().half())
    assert cache.device_resident and cache.device == f"cuda:{torch.cuda.current_device()}"
    assert cache._core.batch_size == 0  # nothing went to the host core
    with pytest.raises(ValueError, match="expected keys as a torch tensor on cuda"):
        cache.append(0, torch.from_numpy(k), torch.from_numpy(v))
    with pytest.raises(ValueError, match="expected queries as a torch tensor on cuda"):
        cache.attend(0, torch.zeros(1, 2, 1, D))
    cache.reset()
    assert cache.device is None and not cache.device_resident
    cache.append(0, k, v)  # now host-resident
    assert cache.device == "cpu"
    with pytest.raises(ValueError, match="host memory"):
        cache.append(0, torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda())
    # a failed first CUDA append does not fix the device
    fresh = rq.KVCache(1, 2, D)
    bad = torch.from_numpy(k).cuda()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fresh.append(0, bad, torch.from_numpy(v).cuda())
    assert fresh.device is None
    # device="cpu": CUDA inputs go through the host copy, as before
    forced_host = rq.KVCache(1, 2, D, device="cpu")
    forced_host.append(0, torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda())
    out = forced_host.attend(0, torch.zeros(1, 2, 1, D, device="cuda"))
    assert out.is_cuda and not forced_host.device_resident
    assert rq.KVCache(1, 2, D, device="cuda:0").device == "cuda:0"
    assert rq.KVCache(1, 2, D, device=torch.device("cuda")).device_resident
    with pytest.raises(ValueError, match="index"):
        rq.KVCache(1, 2, D, device=f"cuda:{rq.cuda_device_count()}")


@pytest.mark.cuda
def test_fused_path_is_used_where_supported():
    if not HAS_DECODE_ATTENTION:
        pytest.skip(NO_FUSED_REASON)
    cache = rq.KVCache(3, 2, D, key_bits=4, value_bits=3, protected_layers=(2,), device="cuda")
    assert cache.attend_path(0, 1) == "fused" and cache.attend_path(0, 2) == "dequantized"
    assert cache.attend_path(2, 1) == "dequantized"  # 8-bit protected layer
    assert rq.KVCache(1, 2, D, mode="prod", device="cuda").attend_path(0, 1) == "dequantized"
    assert rq.KVCache(1, 2, D, rotation="rotor3", device="cuda").attend_path(0, 1) == "dequantized"


@pytest.mark.cuda
@pytest.mark.parametrize("d,heads,q_heads", [(128, 8, 32), (64, 1, 7), (256, 2, 2)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fused_decode_attention_matches_the_cpu_cache(d, heads, q_heads, dtype):
    if not HAS_DECODE_ATTENTION:
        pytest.skip(NO_FUSED_REASON)
    rng = np.random.default_rng(11)
    options = dict(key_bits=3, value_bits=2, residual_window=16, sink_tokens=4, center_values=True,
                   key_channel_scaling=0.5)
    host, device = make_pair("cuda", num_layers=1, heads=heads, d=d, **options)
    assert device.attend_path(0, 1) == "fused"
    torch_dtype = getattr(torch, dtype)
    # the output's own rounding is half an ulp: 2^-12 (fp16), 2^-9 (bf16) relative, on top of the kernel's 1e-3
    tolerance = {"float32": FUSED_TOLERANCE, "float16": 2e-3, "bfloat16": 5e-3}[dtype]
    for tokens in (37, 1, 1, 100, 1):
        k, v = random_kv(rng, 3, heads, tokens, d)
        k_device, v_device = on("cuda", k).to(torch_dtype), on("cuda", v).to(torch_dtype)
        # the host gets exactly the values the device saw
        host.append(0, k_device.float().cpu().numpy(), v_device.float().cpu().numpy())
        device.append(0, k_device, v_device)
        q = rng.standard_normal((3, q_heads, 1, d)).astype(np.float32)
        q_device = on("cuda", q).to(torch_dtype)
        expected = host.attend(0, q_device.float().cpu().numpy())
        out = device.attend(0, q_device)
        assert out.dtype == torch_dtype
        assert relative_max_error(out.float(), expected) <= tolerance


# ---- Hugging Face on CUDA -------------------------------------------------------------------------------------------


def cuda_models(head_dim, hidden, layers):
    """tiny_llama(...) moved to the GPU (skips without one)."""
    if not (rq.has_cuda() and torch.cuda.is_available()):
        pytest.skip("no usable CUDA device")
    model, sdpa = tiny_llama(head_dim, hidden=hidden, layers=layers)
    return model.cuda(), sdpa.cuda()


@pytest.mark.cuda
def test_hf_greedy_8_bits_on_cuda_equals_dynamic_cache():
    import rotorquant.hf as rqhf

    # the CPU test's model, prompt and length (tests/python/test_hf.py): its smallest greedy margin is 0.012
    model, sdpa = cuda_models(16, hidden=64, layers=3)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3)).cuda()
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    reference = sdpa.generate(ids, **kwargs)
    cache = rqhf.RotorQuantCache(model.config, key_bits=8, value_bits=8, residual_window=0, sink_tokens=0)
    out = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(out, reference)
    kv = cache.kv_cache
    assert kv.device_resident and kv._core.batch_size == 0  # never copied to the host core
    assert kv.quantized_length(0) == out.shape[1] - 1


@pytest.mark.cuda
def test_hf_k4_v3_on_cuda_runs_on_the_device():
    import rotorquant.hf as rqhf

    model, sdpa = cuda_models(64, hidden=128, layers=2)  # head_dim 64: the fused kernel applies
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(4)).cuda()
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    cache = rqhf.RotorQuantCache(model.config, key_bits=4, value_bits=3, residual_window=8, sink_tokens=2)
    out = model.generate(ids, past_key_values=cache, **kwargs)
    assert out.shape == (2, 60) and out.is_cuda
    kv = cache.kv_cache
    assert kv.device_resident and kv._core.batch_size == 0
    assert kv.seq_length(0) == 59 and kv.quantized_length(0) == 59 - 8 - 2
    if HAS_DECODE_ATTENTION:
        assert kv.attend_path(0, 1) == "fused"
    # the codes path agrees with the slow path (sdpa on dequantized K/V) to float32 attention accuracy
    slow = rqhf.RotorQuantCache(sdpa.config, key_bits=4, value_bits=3, residual_window=8, sink_tokens=2)
    fast = rqhf.RotorQuantCache(model.config, key_bits=4, value_bits=3, residual_window=8, sink_tokens=2)
    with torch.no_grad():
        logits = [m(input_ids=ids, past_key_values=c, use_cache=True).logits for m, c in ((sdpa, slow), (model, fast))]
        for step in range(3):
            token = ids[:, step:step + 1]
            logits.extend(m(input_ids=token, past_key_values=c, use_cache=True).logits for m, c in ((sdpa, slow),
                                                                                                  (model, fast)))
    for a, b in zip(logits[0::2], logits[1::2]):
        assert relative_max_error(b, a) <= 1e-3

