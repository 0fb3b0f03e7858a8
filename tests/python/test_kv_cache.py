"""rotorquant.KVCache: attention on the codes against a float64 numpy oracle over the decoded K/V,
the exactness claims of the window, centering and channel scaling, GQA/MQA, causal chunks, state
operations, bytes, bad input, and fidelity on real SmolLM2 captures."""
import math

import numpy as np
import pytest

import rotorquant as rq
from rotorquant.data import load_kv_sample

D = 64


def oracle_attention(q, k, v, scale=None, causal=True, mask=None):
    """Plain softmax attention in float64. q (B, Hq, L, d), k/v (B, H, T, d); query i at position T - L + i."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    b, hq, length, d = q.shape
    heads, seq = k.shape[1], k.shape[2]
    group = hq // heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("bhid,bhtd->bhit", q, k) * scale
    allowed = np.ones((b, 1, length, seq), dtype=bool)
    if causal:
        positions = seq - length + np.arange(length)
        allowed &= (np.arange(seq)[None, :] <= positions[:, None])[None, None]
    if mask is not None:
        allowed &= np.asarray(mask, dtype=bool).reshape(b, 1, length, seq)
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    seen = np.isfinite(row_max)
    weights = np.where(allowed, np.exp(scores - np.where(seen, row_max, 0.0)), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    out = np.einsum("bhit,bhtd->bhid", weights / np.where(total > 0, total, 1.0), v)
    return out


def random_kv(rng, batch, heads, tokens, d=D, outliers=True):
    k = rng.standard_normal((batch, heads, tokens, d)).astype(np.float32)
    v = rng.standard_normal((batch, heads, tokens, d)).astype(np.float32)
    if outliers:  # real keys: a shared bias direction and outlier channels
        k[..., 3] += 6.0
        k[..., 10] *= 5.0
        v += 0.5
    return k, v


def max_error(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# Tolerance of attend vs the float64 oracle on the same decoded K/V: float32 arithmetic on O(1) outputs.
EXACT = 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(key_bits=4, value_bits=3),
        dict(key_bits=2, value_bits=2, residual_window=0, sink_tokens=0),
        dict(key_bits=2, value_bits=3, residual_window=0, sink_tokens=13),
        dict(key_bits=3, value_bits=4, residual_window=5, center_values=True),
        dict(key_bits=4, value_bits=3, key_channel_scaling=1.0, center_values=True, residual_window=3),
        dict(key_bits=3, value_bits=3, mode="prod", residual_window=4),
        dict(key_bits=4, value_bits=2, rotation="dense", center_keys=False, residual_window=2),
        dict(key_bits=4, value_bits=4, rotation="rotor3", residual_window=0, key_channel_scaling=0.5),
        dict(key_bits=5, value_bits=3, norm_dtype="float32", norm_correction=True, residual_window=7),
    ],
)
@pytest.mark.parametrize("heads,q_heads", [(3, 9), (1, 4), (2, 2)])
def test_attend_matches_float64_oracle_on_decoded_kv(kwargs, heads, q_heads):
    rng = np.random.default_rng(1)
    params = dict(residual_window=6)
    params.update(kwargs)
    cache = rq.KVCache(2, heads, D, seed=3, **params)
    batch = 2
    for chunk in (11, 1, 7):  # several appends: tokens leave the window across calls
        k, v = random_kv(rng, batch, heads, chunk)
        cache.append(1, k, v)
    assert cache.seq_length(1) == 19 and cache.seq_length(0) == 0
    keys, values = cache.dequantize(1)
    for q_len in (1, 5):
        q = rng.standard_normal((batch, q_heads, q_len, D)).astype(np.float32)
        out = cache.attend(1, q)
        assert out.dtype == np.float32 and out.shape == q.shape
        assert max_error(out, oracle_attention(q, keys, values)) < EXACT
        out_full = cache.attend(1, q, causal=False, scale=0.2)
        assert max_error(out_full, oracle_attention(q, keys, values, scale=0.2, causal=False)) < EXACT


def test_window_keeps_newest_tokens_exact_and_quantizes_on_leaving():
    rng = np.random.default_rng(2)
    cache = rq.KVCache(1, 2, D, residual_window=8, sink_tokens=0)
    k, v = random_kv(rng, 1, 2, 5)
    cache.append(0, k, v)
    assert (cache.quantized_length(0), cache.window_length(0)) == (0, 5)
    keys, values = cache.dequantize(0)
    assert max_error(keys, k) < 1e-5 and max_error(values, v) < 1e-6
    # Attention entirely inside the window is plain attention on the real K/V.
    q = rng.standard_normal((1, 4, 5, D)).astype(np.float32)
    assert max_error(cache.attend(0, q), oracle_attention(q, k, v)) < EXACT
    k2, v2 = random_kv(rng, 1, 2, 6)
    cache.append(0, k2, v2)
    assert (cache.quantized_length(0), cache.window_length(0)) == (3, 8)
    keys, values = cache.dequantize(0)
    all_k, all_v = np.concatenate([k, k2], axis=2), np.concatenate([v, v2], axis=2)
    assert max_error(keys[:, :, 3:], all_k[:, :, 3:]) < 1e-5 and max_error(values[:, :, 3:], all_v[:, :, 3:]) < 1e-6
    assert max_error(keys[:, :, :3], all_k[:, :, :3]) > 1e-3  # the oldest three are now codes


def test_key_centering_is_exact_and_mean_fixed_from_first_chunk():
    rng = np.random.default_rng(3)
    k, v = random_kv(rng, 2, 3, 20)
    k += 30.0 * rng.standard_normal(D).astype(np.float32)  # a large shared bias direction
    centered = rq.KVCache(1, 3, D, key_bits=3, residual_window=0, sink_tokens=0, center_keys=True)
    centered.append(0, k[:, :, :12], v[:, :, :12])
    mean = centered.key_mean(0, 1)
    np.testing.assert_allclose(mean, k[:, 1, :12].reshape(-1, D).mean(axis=0), rtol=1e-5, atol=1e-4)
    centered.append(0, k[:, :, 12:], v[:, :, 12:])
    np.testing.assert_array_equal(centered.key_mean(0, 1), mean)  # fixed after the first chunk
    keys, values = centered.dequantize(0)
    q = rng.standard_normal((2, 9, 4, D)).astype(np.float32)
    out = centered.attend(0, q)
    # Softmax shift invariance: the codes hold k - mu; attention with or without the mean added back is the same,
    # so attend needs no correction.
    mus = np.stack([centered.key_mean(0, h) for h in range(3)])[None, :, None, :]
    with_mean = oracle_attention(q, keys, values)
    without_mean = oracle_attention(q, keys.astype(np.float64) - mus, values)
    # (only float32 rounding of keys ~ 100 when dequantize added the mean back separates the two)
    assert max_error(with_mean, without_mean) < 1e-6
    assert max_error(out, with_mean) < EXACT
    # Quality effect: centering removes the bias from what gets quantized.
    plain = rq.KVCache(1, 3, D, key_bits=3, residual_window=0, sink_tokens=0, center_keys=False)
    plain.append(0, k, v)
    exact = oracle_attention(q, k, v)
    assert max_error(out, exact) < max_error(plain.attend(0, q), exact)


def test_value_centering_adds_mean_back_once():
    rng = np.random.default_rng(4)
    k, v = random_kv(rng, 1, 2, 16)
    v += 4.0
    cache = rq.KVCache(1, 2, D, value_bits=2, residual_window=3, center_values=True)
    cache.append(0, k, v)
    mean = np.stack([cache.value_mean(0, h) for h in range(2)])
    np.testing.assert_allclose(mean, v[0].mean(axis=1), rtol=1e-5, atol=1e-5)
    keys, values = cache.dequantize(0)  # decoded codes + mean
    q = rng.standard_normal((1, 2, 3, D)).astype(np.float32)
    out = cache.attend(0, q)
    assert max_error(out, oracle_attention(q, keys, values)) < EXACT
    # Sum of weights is one: attention over (v - mu) plus mu equals attention over v.
    centered_out = oracle_attention(q, keys, values - mean[None, :, None, :]) + mean[None, :, None, :]
    assert max_error(centered_out, oracle_attention(q, keys, values)) < 1e-9


def test_key_channel_scaling_is_exact_reparameterization():
    rng = np.random.default_rng(5)
    k, v = random_kv(rng, 1, 1, 10)
    # With everything in the window, scaling changes nothing (exact on real K/V).
    exact_cache = rq.KVCache(1, 1, D, residual_window=64, key_channel_scaling=1.0)
    exact_cache.append(0, k, v)
    q = rng.standard_normal((1, 2, 10, D)).astype(np.float32)
    assert max_error(exact_cache.attend(0, q), oracle_attention(q, k, v)) < EXACT
    # With codes: q.k = (q*s).(k/s); attend on codes equals the oracle on s * decode(k/s) + mu.
    cache = rq.KVCache(1, 1, D, key_bits=3, residual_window=0, sink_tokens=0, key_channel_scaling=1.0)
    cache.append(0, k, v)
    scale = cache.key_scale(0, 0)
    centered = k[0, 0] - cache.key_mean(0, 0)
    rms = np.sqrt((centered.astype(np.float64) ** 2).mean(axis=0))
    np.testing.assert_allclose(scale, rms / rms.mean(), rtol=1e-4)
    keys, values = cache.dequantize(0)
    assert max_error(cache.attend(0, q), oracle_attention(q, keys, values)) < EXACT
    assert rq.KVCache(1, 1, D).key_scale(0, 0) is None


def test_causal_prefill_in_chunks_matches_one_pass():
    rng = np.random.default_rng(6)
    k, v = random_kv(rng, 1, 3, 24)
    q = rng.standard_normal((1, 9, 24, D)).astype(np.float32)
    one = rq.KVCache(1, 3, D, residual_window=0)
    one.append(0, k, v)
    full = one.attend(0, q)
    keys, values = one.dequantize(0)
    assert max_error(full, oracle_attention(q, keys, values)) < EXACT
    chunked = rq.KVCache(1, 3, D, residual_window=0)
    pieces = []
    for start, stop in ((0, 10), (10, 11), (11, 24)):
        chunked.append(0, k[:, :, start:stop], v[:, :, start:stop])
        pieces.append(chunked.attend(0, q[:, :, start:stop]))
    # Same codes (window 0: encoding is per vector), same statistics only if the first chunk is the same:
    # compare against the oracle on the chunked cache's own decoded K/V, row by row causal.
    keys_c, values_c = chunked.dequantize(0)
    assert max_error(np.concatenate(pieces, axis=2), oracle_attention(q, keys_c, values_c)) < EXACT


def test_mask_is_combined_with_causal_and_empty_rows_are_zero():
    rng = np.random.default_rng(7)
    k, v = random_kv(rng, 2, 1, 9)
    cache = rq.KVCache(1, 1, D, residual_window=4)
    cache.append(0, k, v)
    keys, values = cache.dequantize(0)
    q = rng.standard_normal((2, 2, 3, D)).astype(np.float32)
    mask = np.ones((2, 3, 9), dtype=bool)
    mask[0, :, :4] = False  # left padding of row 0
    mask[1, 0, :] = False   # a query that sees nothing
    out = cache.attend(0, q, mask=mask)
    ref = oracle_attention(q, keys, values, mask=mask)
    assert max_error(out, ref) < EXACT
    assert np.all(out[1, :, 0] == 0.0)
    out4 = cache.attend(0, q, mask=mask[:, None])
    np.testing.assert_array_equal(out, out4)


def test_torch_inputs_dtypes_and_devices():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    k, v = random_kv(rng, 1, 3, 6)
    cache = rq.KVCache(1, 3, D)
    cache.append(0, torch.from_numpy(k).to(torch.bfloat16), torch.from_numpy(v).to(torch.float16))
    q = torch.from_numpy(rng.standard_normal((1, 9, 2, D)).astype(np.float32))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = cache.attend(0, q.to(dtype))
        assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == q.shape
    ref = cache.attend(0, q.numpy())
    np.testing.assert_allclose(cache.attend(0, q).numpy(), ref, rtol=0, atol=0)
    assert cache.attend(0, q.numpy().astype(np.float16)).dtype == np.float16


def test_crop_reorder_reset_and_lengths():
    rng = np.random.default_rng(9)
    cache = rq.KVCache(2, 2, D, residual_window=4, sink_tokens=0)
    k, v = random_kv(rng, 3, 2, 10)
    for layer in range(2):
        cache.append(layer, k, v)
    keys, values = cache.dequantize(0)
    # reorder: beams select rows (repeats allowed, the batch size may change)
    cache.reorder([2, 0, 0, 1])
    assert cache.batch_size == 4
    keys_r, values_r = cache.dequantize(0)
    np.testing.assert_array_equal(keys_r, keys[[2, 0, 0, 1]])
    np.testing.assert_array_equal(values_r, values[[2, 0, 0, 1]])
    q = rng.standard_normal((4, 2, 1, D)).astype(np.float32)
    assert max_error(cache.attend(0, q), oracle_attention(q, keys_r, values_r)) < EXACT
    keys_1, values_1 = cache.dequantize(1)
    # crop inside the window, then into the codes
    cache.crop(8)
    assert (cache.seq_length(0), cache.quantized_length(0), cache.window_length(0)) == (8, 6, 2)
    np.testing.assert_array_equal(cache.dequantize(0)[0], keys_r[:, :, :8])
    np.testing.assert_array_equal(cache.dequantize(1)[0], keys_1[:, :, :8])
    cache.crop(3)
    assert (cache.seq_length(1), cache.quantized_length(1), cache.window_length(1)) == (3, 3, 0)
    np.testing.assert_array_equal(cache.dequantize(1)[1], values_1[:, :, :3])
    cache.crop(100)  # no-op
    assert cache.seq_length(0) == 3
    cache.append(0, k[:, :, :2].repeat(2, axis=0)[:4], v[:, :, :2].repeat(2, axis=0)[:4])
    assert cache.seq_length(0) == 5 and cache.window_length(0) == 2
    cache.reset()
    assert cache.batch_size == 0 and cache.seq_length(0) == 0 and cache.nbytes() == 0
    assert cache.key_mean(0, 0) is None
    cache.append(0, k[:1], v[:1])  # a new batch size after reset
    assert cache.batch_size == 1


def test_nbytes_formula_and_compression():
    rng = np.random.default_rng(10)
    layers, heads, batch, window = 3, 2, 2, 5
    sink = 4
    cache = rq.KVCache(layers, heads, D, key_bits=4, value_bits=3, residual_window=window, protected_layers=(-1,),
                       center_values=True, key_channel_scaling=0.5)
    assert cache.params["protected_layers"] == (2,)
    assert cache.nbytes() == 0
    tokens = 17
    for layer in range(layers):
        k, v = random_kv(rng, batch, heads, tokens)
        cache.append(layer, k, v)
    key_bytes = D * 4 // 8 + 2        # 4-bit indices + fp16 norm
    value_bytes = D * 3 // 8 + 2      # 3-bit indices + fp16 norm
    protected_bytes = 2 * (D + 2)     # 8-bit keys and values
    assert cache.code_bytes_per_token(0) == key_bytes + value_bytes
    assert cache.code_bytes_per_token(2) == protected_bytes
    quantized = tokens - window - sink
    expected = batch * heads * (2 * quantized * (key_bytes + value_bytes) + quantized * protected_bytes)
    expected += layers * batch * heads * (window + sink) * 2 * D * 4     # float32 window and sink
    expected += layers * heads * 3 * D * 4                      # key mean, value mean, key scale
    assert cache.nbytes() == expected
    # Outside the window K4/V3 costs <= 0.25 x bfloat16 (2 * D * 2 bytes per token and head).
    assert (key_bytes + value_bytes) / (2 * D * 2) <= 0.25


def test_seeds_are_per_layer_head_and_kind():
    cache = rq.KVCache(2, 2, D, seed=7)
    seeds = {cache.quantizer_params(layer, head, kind)["seed"] for layer in range(2) for head in range(2)
             for kind in (False, True)}
    assert len(seeds) == 8
    assert cache.quantizer_params(1, 0, True)["seed"] == rq._core.kv_quantizer_seed(7, 1, 0, 2, 1)
    assert cache.quantizer_params(0, 1, False)["bits"] == 4 and cache.quantizer_params(0, 1, True)["bits"] == 3
    other = rq.KVCache(2, 2, D, seed=8)
    assert other.quantizer_params(0, 0)["seed"] != cache.quantizer_params(0, 0)["seed"]
    # deterministic: same seed, same codes
    rng = np.random.default_rng(11)
    k, v = random_kv(rng, 1, 2, 9)
    a, b = rq.KVCache(1, 2, D, residual_window=0, seed=5), rq.KVCache(1, 2, D, residual_window=0, seed=5)
    assert a.quantized_length(0) == 0
    a.append(0, k, v)
    b.append(0, k, v)
    np.testing.assert_array_equal(a.dequantize(0)[0], b.dequantize(0)[0])


def test_bad_input_raises_value_error():
    cache = rq.KVCache(2, 3, D)
    rng = np.random.default_rng(12)
    k, v = random_kv(rng, 1, 3, 4)
    with pytest.raises(ValueError, match="head_dim|shape"):
        cache.append(0, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="layer"):
        cache.append(2, k, v)
    with pytest.raises(ValueError, match="layer"):
        cache.append(-1, k, v)
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, k, v[:, :, :3])
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="dtype"):
        cache.append(0, k.astype(np.int32), v)
    with pytest.raises(ValueError, match="non-finite"):
        bad = k.copy()
        bad[0, 0, 0, 0] = np.nan
        cache.append(0, bad, v)
    assert cache.seq_length(0) == 0  # nothing stored by a failed append
    cache.append(0, k, v)
    with pytest.raises(ValueError, match="batch"):
        cache.append(0, np.concatenate([k, k]), np.concatenate([v, v]))
    q = rng.standard_normal((1, 4, 1, D)).astype(np.float32)
    with pytest.raises(ValueError, match="multiple"):
        cache.attend(0, q)
    with pytest.raises(ValueError, match="head_dim|shape"):
        cache.attend(0, rng.standard_normal((1, 3, 1, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="layer"):
        cache.attend(5, rng.standard_normal((1, 3, 1, D)).astype(np.float32))
    with pytest.raises(ValueError, match="dtype"):
        cache.attend(0, np.zeros((1, 3, 1, D), dtype=np.int64))
    with pytest.raises(ValueError, match="mask"):
        cache.attend(0, np.zeros((1, 3, 1, D), dtype=np.float32), mask=np.ones((1, 1, 3), dtype=bool))
    with pytest.raises(ValueError):
        cache.reorder([0, 1])
    with pytest.raises(ValueError):
        cache.crop(-1)
    for kwargs in (dict(key_bits=9), dict(value_bits=0), dict(residual_window=-1), dict(protected_layers=(2,)),
                   dict(key_channel_scaling=1.5), dict(rotation="nope"), dict(mode="fast"),
                   dict(mode="prod", norm_correction=True)):
        with pytest.raises(ValueError):
            rq.KVCache(2, 3, D, **kwargs)
    with pytest.raises(ValueError):
        rq.KVCache(0, 3, D)


# ---- real SmolLM2 captures -----------------------------------------------------------------------


def relative_error(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def real_attention_errors(layer, tokens=256, **kwargs):
    sample = load_kv_sample()
    q, k, v = (sample[name][layer][:, :tokens][None] for name in ("q", "k", "v"))
    ref = oracle_attention(q, k, v)
    cache = rq.KVCache(1, 3, D, **kwargs)
    cache.append(0, k, v)
    out = cache.attend(0, q)
    keys, values = cache.dequantize(0)
    return relative_error(out, ref), max_error(out, oracle_attention(q, keys, values))


@pytest.mark.parametrize("layer", [0, 15])
def test_real_capture_matches_decoded_oracle_and_is_close_to_real_attention(layer):
    errors = {}
    for name, kwargs in {
        "k8v8": dict(key_bits=8, value_bits=8, residual_window=0, sink_tokens=0),
        "k4v3_plain": dict(key_bits=4, value_bits=3, residual_window=0, sink_tokens=0, center_keys=False),
        "k4v3_sink": dict(key_bits=4, value_bits=3, residual_window=0, sink_tokens=4),
        "k4v3": dict(key_bits=4, value_bits=3, residual_window=0, sink_tokens=4, center_values=True),
        "k4v3_window": dict(key_bits=4, value_bits=3, residual_window=128, sink_tokens=4, center_values=True),
    }.items():
        rel, exact = real_attention_errors(layer, **kwargs)
        assert exact < EXACT * 10, (name, exact)  # real outputs reach |o| ~ 10
        errors[name] = rel
    # 8 bits: codes with relative MSE ~ 1e-4 plus float16 norms: attention error below 2%.
    assert errors["k8v8"] < 0.02, errors
    # 4/3 bits: within the quantization error (3-bit values alone: relative error ~ sqrt(0.034) = 0.18).
    assert errors["k4v3"] < 0.16, errors
    # Each mechanism helps on real data: sinks + centering beat plain TurboQuant, the window beats no window.
    assert errors["k4v3_sink"] < errors["k4v3_plain"], errors
    assert errors["k4v3_window"] < errors["k4v3"], errors


def test_sink_tokens_stay_exact_and_positions_follow():
    rng = np.random.default_rng(13)
    cache = rq.KVCache(1, 1, D, residual_window=2, sink_tokens=3)
    k, v = random_kv(rng, 1, 1, 2)
    cache.append(0, k, v)  # partly fills the sink
    k2, v2 = random_kv(rng, 1, 1, 6)
    cache.append(0, k2, v2)
    assert (cache.sink_length(0), cache.quantized_length(0), cache.window_length(0)) == (3, 3, 2)
    all_k, all_v = np.concatenate([k, k2], axis=2), np.concatenate([v, v2], axis=2)
    keys, values = cache.dequantize(0)
    for part in (slice(0, 3), slice(6, 8)):
        assert max_error(keys[:, :, part], all_k[:, :, part]) < 1e-5
        assert max_error(values[:, :, part], all_v[:, :, part]) < 1e-6
    q = rng.standard_normal((1, 2, 4, D)).astype(np.float32)
    assert max_error(cache.attend(0, q), oracle_attention(q, keys, values)) < EXACT
    cache.crop(2)
    assert (cache.sink_length(0), cache.quantized_length(0), cache.window_length(0)) == (2, 0, 0)
    cache.append(0, k2[:, :, :4], v2[:, :, :4])  # refills the sink first
    assert (cache.sink_length(0), cache.quantized_length(0), cache.window_length(0)) == (3, 1, 2)
    keys, values = cache.dequantize(0)
    np.testing.assert_allclose(keys[:, :, 2], k2[:, :, 0], atol=1e-5)
