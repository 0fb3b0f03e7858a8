"""Fused CUDA decode attention (rotorquant.DecodeAttention) against the CPU KVCache.attend (the reference).

The codes handed to the kernel are made independently of the cache by the per-head quantizers with the cache's
seeds, from the tokens the cache quantized (centered, divided by the key scales, as docs/kv_cache.md says), so a
match also checks the layout contract. The tests of shapes, layouts and options run with float32 queries (the SIMT
kernel) and float16 queries (the tensor-core kernel). Tolerances: float32 output 1e-4 of the output's max magnitude (accumulation
order, exp2 approximation), float16 1e-3, bfloat16 8e-3 (its rounding unit is 2^-8).
"""
import numpy as np
import pytest

import rotorquant as rq
from rotorquant import DecodeAttention, KVCache, Quantizer

TOLERANCE = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 8e-3}
# float32 queries run the SIMT split kernel, float16 / bfloat16 queries the tensor-core one (docs/attention.md §6):
# the shape, layout and option tests run both.
PATHS = ["float32", "float16"]


def _params(dim, bits, rotation="hadamard", mode="mse", norm_dtype="float16"):
    return dict(dim=dim, bits=bits, rotation=rotation, mode=mode, norm_dtype=norm_dtype)


# ---- support rules (no GPU needed) -----------------------------------------------------------------------

@pytest.mark.parametrize("dim,kb,vb,rotation,mode,expected", [
    (128, 3, 3, "hadamard", "mse", None),
    (64, 2, 4, "dense", "mse", None),
    (256, 4, 2, "quat", "mse", None),
    (128, 4, 3, "planar", "mse", None),
    (64, 3, 3, "identity", "mse", None),
    (128, 3, 3, "hadamard", "prod", "mse mode only"),
    (128, 8, 3, "hadamard", "mse", "2, 3 or 4 bits"),
    (128, 3, 1, "hadamard", "mse", "2, 3 or 4 bits"),
    (128, 3, 3, "rotor3", "mse", "rotations"),
    (128, 3, 3, "rotor_network", "mse", "rotations"),
    (96, 3, 3, "dense", "mse", "head_dim 64, 128 or 256"),
    (96, 3, 3, "hadamard", "mse", "no padding"),
])
def test_unsupported_reason(dim, kb, vb, rotation, mode, expected):
    reason = DecodeAttention.unsupported_reason(_params(dim, kb, rotation, mode), _params(dim, vb, rotation, mode))
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_unsupported_reason_mismatched_sides():
    assert "norm_dtype" in DecodeAttention.unsupported_reason(_params(128, 3), _params(128, 3, norm_dtype="float32"))
    assert "dims" in DecodeAttention.unsupported_reason(_params(128, 3), _params(64, 3))


@pytest.mark.skipif(rq.has_cuda(), reason="checks the error of a build or machine without CUDA")
def test_constructor_without_cuda_raises():
    keys = [Quantizer(128, 3, rotation="hadamard")]
    with pytest.raises((RuntimeError, ValueError)):
        DecodeAttention(keys, keys)


# ---- fixtures for the GPU tests ----------------------------------------------------------------------------

def _keys_values(rng, batch, heads, tokens, dim, real=None):
    if real is not None:
        k, v = real
        return np.ascontiguousarray(k[None, :, :tokens]), np.ascontiguousarray(v[None, :, :tokens])
    profile = np.exp(rng.normal(0.0, 1.0, size=dim)).astype(np.float32)  # anisotropic channels, outliers
    bias = rng.normal(0.0, 3.0, size=(1, heads, 1, dim)).astype(np.float32)
    k = (rng.standard_normal((batch, heads, tokens, dim)).astype(np.float32) * profile + bias).astype(np.float32)
    v = rng.standard_normal((batch, heads, tokens, dim)).astype(np.float32)
    return k, v


class Case:
    """A CPU KVCache with one layer and the same state as kernel inputs on the GPU."""

    def __init__(self, batch=2, kv_heads=2, group=4, dim=128, tokens=300, key_bits=4, value_bits=3,
                 rotation="hadamard", window=16, sinks=4, center_values=True, key_channel_scaling=0.5,
                 norm_dtype="float16", seed=7, real=None, value_scale=1.0, key_ramp=None, value_ramp=None):
        import torch
        rng = np.random.default_rng(seed)
        self.cache = KVCache(1, kv_heads, dim, key_bits=key_bits, value_bits=value_bits, rotation=rotation,
                             residual_window=window, sink_tokens=sinks, center_values=center_values,
                             key_channel_scaling=key_channel_scaling, norm_dtype=norm_dtype, seed=seed)
        k, v = _keys_values(rng, batch, kv_heads, tokens, dim, real)
        v = (v * np.float32(value_scale)).astype(np.float32)
        if key_ramp is not None:  # per-token factors (tokens,)
            k = (k * np.asarray(key_ramp, np.float32)[None, None, :, None]).astype(np.float32)
        if value_ramp is not None:
            v = (v * np.asarray(value_ramp, np.float32)[None, None, :, None]).astype(np.float32)
        batch = k.shape[0]
        self.batch, self.kv_heads, self.group, self.dim = batch, kv_heads, group, dim
        self.cache.append(0, k, v)
        self.n_codes = self.cache.quantized_length(0)
        self.n_sinks = self.cache.sink_length(0)
        self.n_window = self.cache.window_length(0)
        self.key_quantizers = [Quantizer._from_params(self.cache.quantizer_params(0, h)) for h in range(kv_heads)]
        self.value_quantizers = [Quantizer._from_params(self.cache.quantizer_params(0, h, values=True))
                                 for h in range(kv_heads)]
        zeros = np.zeros((kv_heads, dim), np.float32)
        key_mean = np.stack([self.cache.key_mean(0, h) for h in range(kv_heads)]) if self.cache.key_mean(0, 0) is not None else zeros
        value_mean = np.stack([self.cache.value_mean(0, h) for h in range(kv_heads)]) if center_values else zeros
        scales = self.cache.key_scale(0, 0)
        key_scale = np.stack([self.cache.key_scale(0, h) for h in range(kv_heads)]) if scales is not None else None
        kc = k - key_mean[None, :, None, :]
        vc = v - value_mean[None, :, None, :]
        coded = slice(self.n_sinks, self.n_sinks + self.n_codes)
        kq = kc[:, :, coded] if key_scale is None else kc[:, :, coded] / key_scale[None, :, None, :]
        vq = vc[:, :, coded]
        capacity = max(self.n_codes, 1)
        shapes = {}
        arrays = {}
        for side, x, quantizers in (("key", kq, self.key_quantizers), ("value", vq, self.value_quantizers)):
            ib, nb = quantizers[0]._native.index_bytes, quantizers[0]._native.norm_bytes
            indices = np.zeros((batch, kv_heads, capacity, ib), np.uint8)
            norms = np.zeros((batch, kv_heads, capacity, nb), np.uint8)
            for h in range(kv_heads):
                if self.n_codes:
                    codes = quantizers[h].encode(np.ascontiguousarray(x[:, h].reshape(-1, dim), dtype=np.float32))
                    indices[:, h, :self.n_codes] = codes.indices.reshape(batch, self.n_codes, ib)
                    norms[:, h, :self.n_codes] = np.ascontiguousarray(codes.norms).view(np.uint8).reshape(
                        batch, self.n_codes, nb)
            arrays[f"{side}_indices"] = indices
            arrays[f"{side}_norms"] = norms
            shapes[side] = (ib, nb)
        fp = list(range(self.n_sinks)) + list(range(tokens - self.n_window, tokens))
        self.fp_positions = fp
        dev = torch.device("cuda")
        self.tensors = {name: torch.from_numpy(a).to(dev) for name, a in arrays.items()}
        self.tensors["code_lengths"] = torch.full((batch,), self.n_codes, dtype=torch.int32, device=dev)
        if fp:
            self.tensors["fp_keys"] = torch.from_numpy(np.ascontiguousarray(kc[:, :, fp])).to(dev)
            self.tensors["fp_values"] = torch.from_numpy(np.ascontiguousarray(vc[:, :, fp])).to(dev)
            self.tensors["fp_lengths"] = torch.full((batch,), len(fp), dtype=torch.int32, device=dev)
        if key_scale is not None:
            self.tensors["key_scales"] = torch.from_numpy(np.ascontiguousarray(key_scale)).to(dev)
        if center_values:
            self.tensors["value_means"] = torch.from_numpy(np.ascontiguousarray(value_mean)).to(dev)
        self.attention = DecodeAttention(self.key_quantizers, self.value_quantizers)

    def queries(self, rng, dtype, scale=1.0):
        import torch
        q = torch.from_numpy((rng.standard_normal((self.batch, self.kv_heads * self.group, self.dim)) * scale)
                             .astype(np.float32)).to(dtype)
        return q.to("cuda")

    def reference(self, q, mask=None):
        import torch
        q_host = q.float().cpu().numpy()[:, :, None, :]
        out = self.cache.attend(0, q_host, mask=mask)
        return torch.from_numpy(out[:, :, 0, :])

    def run(self, q, **kwargs):
        t = dict(self.tensors)
        t.update(kwargs)
        args = [t.pop(name) for name in ("key_indices", "key_norms", "value_indices", "value_norms", "code_lengths")]
        return self.attention(q, *args, **t)


def _close(out, ref, dtype_name):
    import torch
    out = out.float().cpu()
    scale = ref.abs().max().item()
    error = (out - ref).abs().max().item()
    assert torch.isfinite(out).all()
    print(f"error/tolerance {error / (TOLERANCE[dtype_name] * max(scale, 1e-6)):.3f} ({dtype_name})")  # -s shows the margins
    assert error <= TOLERANCE[dtype_name] * max(scale, 1e-6), f"max error {error:.3g} vs max |ref| {scale:.3g}"


def _torch_dtype(name):
    import torch
    return getattr(torch, name)


# ---- GPU tests ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("group", [1, 3, 4, 7, 8, 9])
@pytest.mark.parametrize("qdtype", PATHS)
def test_gqa_ratios_match_cpu(group, qdtype):
    rng = np.random.default_rng(group)
    case = Case(batch=2, kv_heads=2, group=group, tokens=333)
    q = case.queries(rng, _torch_dtype(qdtype))
    _close(case.run(q), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", PATHS)
def test_mqa_many_query_heads(qdtype):
    rng = np.random.default_rng(1)
    case = Case(batch=3, kv_heads=1, group=32, dim=64, tokens=200)
    q = case.queries(rng, _torch_dtype(qdtype))
    _close(case.run(q), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("key_bits,value_bits", [(4, 4), (4, 3), (3, 4), (3, 3), (2, 2), (2, 3), (2, 4), (3, 2)])
@pytest.mark.parametrize("qdtype", PATHS)
def test_dims_and_bits_match_cpu(dim, key_bits, value_bits, qdtype):
    rng = np.random.default_rng(dim + 10 * key_bits + value_bits)
    case = Case(batch=2, kv_heads=2, group=4, dim=dim, tokens=260, key_bits=key_bits, value_bits=value_bits)
    q = case.queries(rng, _torch_dtype(qdtype))
    _close(case.run(q), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("rotation", ["identity", "dense", "hadamard", "planar", "quat"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("qdtype", PATHS)
def test_rotations_match_cpu(rotation, dim, qdtype):
    rng = np.random.default_rng(3)
    case = Case(batch=2, kv_heads=2, group=2, dim=dim, tokens=190, rotation=rotation)
    q = case.queries(rng, _torch_dtype(qdtype))
    _close(case.run(q), case.reference(q), qdtype)


def _offset_copy(q, elements):
    """q's values in a contiguous tensor whose data starts `elements` elements into its storage."""
    import torch
    flat = torch.empty(q.numel() + elements, dtype=q.dtype, device=q.device)
    view = flat[elements:].view(q.shape)
    view.copy_(q)
    return view


@pytest.mark.cuda
@pytest.mark.parametrize("rotation", ["identity", "hadamard", "planar", "quat"])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [4, 8])
@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("qdtype", ["float16", "bfloat16"])
def test_fused_query_rotation_equals_prepared(rotation, dim, group, window, qdtype):
    # Half-precision queries at an 8-byte aligned address are rotated inside the tensor-core split kernel (no prepare
    # launch without a window, no wait for it with one); 4-byte aligned ones take prepare's q_rot. Both compute the
    # same operations in the same order, so the outputs are identical bit for bit, token rows (GQA 4) and head rows
    # (GQA 8) alike, with key channel scales and every local rotation; and both match the CPU.
    import torch
    rng = np.random.default_rng(dim + group + window)
    case = Case(batch=2, kv_heads=2, group=group, dim=dim, tokens=150 + window, rotation=rotation, window=window,
                sinks=4 if window else 0)
    q = case.queries(rng, _torch_dtype(qdtype), scale=3.0)
    fused_q, prepared_q = _offset_copy(q, 4), _offset_copy(q, 2)
    assert fused_q.data_ptr() % 8 == 0 and prepared_q.data_ptr() % 8 == 4
    fused, prepared = case.run(fused_q), case.run(prepared_q)
    torch.cuda.synchronize()
    assert torch.equal(fused, prepared)
    _close(fused, case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("rotation", ["hadamard", "dense"])
@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("qdtype", ["float16", "bfloat16"])
def test_back_to_back_calls_read_the_previous_output(rotation, window, qdtype):
    # Without prepare (fused rotation, no window) the split kernel is a programmatic dependent of whatever kernel
    # precedes it and starts its prologue while that kernel ends (the combine kernel lets its dependents launch at its
    # start); it must read the call's inputs only after griddepcontrol.wait. A chain of calls in which each call's
    # output is the next call's queries (written by the previous combine at its very end) must give, bit for bit, what
    # the same chain gives with the host waiting for every call.
    import torch
    rng = np.random.default_rng(31 + window)
    case = Case(batch=2, kv_heads=2, group=4, dim=128, tokens=3000 + window, key_bits=3, value_bits=3,
                rotation=rotation, window=window, sinks=4 if window else 0)
    q0 = case.queries(rng, _torch_dtype(qdtype), scale=3.0)

    def chain(wait):
        q, outs = q0, []
        for _ in range(6):
            q = case.run(q)
            if wait:
                torch.cuda.synchronize()
            outs.append(q)
        torch.cuda.synchronize()
        return outs

    for _ in range(3):
        free, waited = chain(False), chain(True)
        for a, b in zip(free, waited):
            assert torch.equal(a, b)
    assert all(torch.isfinite(o.float()).all() for o in waited)
    assert not torch.equal(waited[0], waited[1])  # the chain moves: each call sees new queries
    _close(waited[0], case.reference(q0), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_query_and_output_dtypes(dtype):
    import torch
    rng = np.random.default_rng(4)
    case = Case(batch=2, kv_heads=2, group=4, tokens=500)
    q = case.queries(rng, _torch_dtype(dtype))
    out = case.run(q)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    _close(out, case.reference(q), dtype)
    out32 = case.run(q, out_dtype=torch.float32)
    assert out32.dtype == torch.float32
    # float16 / bfloat16 queries take the tensor-core products (fp16 operands): 1e-3 even for a float32 output
    _close(out32, case.reference(q), "float32" if dtype == "float32" else "float16")


@pytest.mark.cuda
@pytest.mark.parametrize("window,sinks,spare", [(28, 4, 0), (100, 4, 0), (100, 4, 37), (300, 8, 0), (2000, 4, 3)])
@pytest.mark.parametrize("qdtype", PATHS)
def test_long_window_over_several_slots(window, sinks, spare, qdtype):
    # The full-precision tokens are spread over up to 8 workspace slots of a multiple of 32 tokens (attention.cu):
    # 32 tokens in one slot, 104 in 4 of 32, 308 in 8 of 64, 2004 in 8 of 256; with spare capacity (garbage past
    # fp_lengths, so the last slots hold no token) too. Each matches the CPU.
    import torch
    rng = np.random.default_rng(window + spare)
    case = Case(batch=2, kv_heads=2, group=4, dim=128, tokens=300 + window + sinks, key_bits=3, value_bits=3,
                window=window, sinks=sinks)
    if spare:
        for name in ("fp_keys", "fp_values"):
            t = case.tensors[name]
            garbage = torch.full(t.shape[:2] + (spare,) + t.shape[3:], float("nan"), device=t.device)
            case.tensors[name] = torch.cat([t, garbage], dim=2).contiguous()
    q = case.queries(rng, _torch_dtype(qdtype), scale=3.0)
    _close(case.run(q), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,window,sinks", [
    (1, 0, 0),      # one code token
    (7, 0, 0),      # below one warp step
    (5, 0, 4),      # one code, four sinks
    (40, 64, 4),    # everything in full precision (no codes)
    (131, 0, 0),    # codes only, odd length
    (1027, 128, 4),  # codes over several splits
    (4099, 128, 4),
])
@pytest.mark.parametrize("key_bits,value_bits", [(4, 4), (3, 3)])
@pytest.mark.parametrize("qdtype", PATHS)
def test_lengths_and_edges(tokens, window, sinks, key_bits, value_bits, qdtype):
    """Lengths around tiles and splits, with partial last tiles (loaded directly) after whole tiles staged through
    shared memory: K4/V4 with two of its slots in the padding, K3/V3 in the compact layout (d = 128, GQA 3)."""
    rng = np.random.default_rng(tokens)
    case = Case(batch=2, kv_heads=2, group=3, tokens=tokens, window=window, sinks=sinks, key_bits=key_bits,
                value_bits=value_bits)
    q = case.queries(rng, _torch_dtype(qdtype))
    kwargs = {}
    if case.n_codes == 0:
        kwargs["max_code_length"] = 0
    _close(case.run(q, **kwargs), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,splits", [(200, (1, 7)), (600, (8, 15)), (1500, (16, 31)), (5000, (32, 1024))])
@pytest.mark.parametrize("qdtype", PATHS)
def test_combine_widths_match_cpu(tokens, splits, qdtype):
    """The combine launch merges a row with 1, 2, 4 or 8 warps (fewer than 8, 8-15, 16-31, 32 or more splits), each
    warp keeping several splits' loads in flight: every width, with the full-precision slot, matches the CPU cache."""
    rng = np.random.default_rng(tokens)
    case = Case(batch=1, kv_heads=2, group=4, tokens=tokens, window=16, sinks=4)
    n = case.attention.num_splits(1, 8, case.n_codes)
    assert splits[0] <= n <= splits[1], f"{tokens} tokens: {n} splits, this case wants {splits}"
    q = case.queries(rng, _torch_dtype(qdtype))
    _close(case.run(q), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", PATHS)
def test_options_off_and_float32_norms(qdtype):
    rng = np.random.default_rng(5)
    case = Case(batch=2, kv_heads=2, group=4, tokens=300, center_values=False, key_channel_scaling=0.0,
                norm_dtype="float32")
    q = case.queries(rng, _torch_dtype(qdtype))
    _close(case.run(q), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("value_scale", [1e-6, 1e6])
def test_tensor_core_path_value_norm_range(value_scale):
    """The tensor-core kernel folds value norms into fp16 weights with a running power-of-two scale: norms far
    outside the fp16 range (float32 norms) must neither overflow nor lose precision."""
    import torch
    rng = np.random.default_rng(13)
    case = Case(batch=2, kv_heads=2, group=4, tokens=700, norm_dtype="float32", value_scale=value_scale,
                center_values=False)
    q = case.queries(rng, torch.float16)
    _close(case.run(q, out_dtype=torch.float32), case.reference(q), "float16")


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", PATHS)
def test_real_captured_kv_and_cosine_to_exact_attention(qdtype):
    import torch
    from rotorquant.data import load_kv_sample
    sample = load_kv_sample()
    tokens = sample["metadata"]["tokens"]
    for layer in sample["layers"]:
        k, v, q_all = sample["k"][layer], sample["v"][layer], sample["q"][layer]
        case = Case(kv_heads=k.shape[0], group=q_all.shape[0] // k.shape[0], dim=k.shape[2], tokens=tokens,
                    key_bits=4, value_bits=3, window=32, sinks=4, key_channel_scaling=0.0, center_values=False,
                    real=(k, v))
        q = torch.from_numpy(np.ascontiguousarray(q_all[:, -1][None])).to(_torch_dtype(qdtype)).cuda()  # last position
        out = case.run(q)
        _close(out, case.reference(q), qdtype)
        # exact attention of the last query over all tokens (float64)
        scores = np.einsum("hd,htd->ht", q_all[:, -1].astype(np.float64),
                           np.repeat(k.astype(np.float64), case.group, axis=0)) / np.sqrt(k.shape[2])
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        exact = np.einsum("ht,htd->hd", p, np.repeat(v.astype(np.float64), case.group, axis=0))
        got = out[0].double().cpu().numpy()
        cosine = (got * exact).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(exact, axis=1)
        assert cosine.min() >= 0.99, f"layer {layer}: cosine {cosine.min():.4f}"


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", PATHS)
def test_per_sequence_lengths(qdtype):
    """Sequences of different lengths in one call: each matches its own CPU cache (no centering, so the codes of
    every sequence come from the same quantizers)."""
    import torch
    rng = np.random.default_rng(6)
    lengths = [1, 64, 257, 0, 1000]
    cache = KVCache(1, 2, 128, residual_window=0, sink_tokens=0, center_keys=False, key_bits=4, value_bits=3, seed=11)
    cases = []
    k_all, v_all = _keys_values(rng, 1, 2, max(lengths), 128)
    for t in lengths:
        c = KVCache(1, 2, 128, residual_window=0, sink_tokens=0, center_keys=False, key_bits=4, value_bits=3, seed=11)
        if t:
            c.append(0, k_all[:, :, :t], v_all[:, :, :t])
        cases.append(c)
    kq = [Quantizer._from_params(cache.quantizer_params(0, h)) for h in range(2)]
    vq = [Quantizer._from_params(cache.quantizer_params(0, h, values=True)) for h in range(2)]
    batch, capacity = len(lengths), max(lengths)
    tensors = {}
    for side, x, qs in (("key", k_all, kq), ("value", v_all, vq)):
        ib, nb = qs[0]._native.index_bytes, qs[0]._native.norm_bytes
        indices = np.full((batch, 2, capacity, ib), 0xFF, np.uint8)  # garbage beyond each length
        norms = np.full((batch, 2, capacity, nb), 0x7B, np.uint8)
        for h in range(2):
            codes = qs[h].encode(np.ascontiguousarray(x[0, h]))
            for b, t in enumerate(lengths):
                indices[b, h, :t] = codes.indices[:t]
                norms[b, h, :t] = np.ascontiguousarray(codes.norms).view(np.uint8).reshape(-1, nb)[:t]
        tensors[side] = (torch.from_numpy(indices).cuda(), torch.from_numpy(norms).cuda())
    attention = DecodeAttention(kq, vq)
    q = torch.from_numpy(rng.standard_normal((batch, 8, 128)).astype(np.float32)).to(_torch_dtype(qdtype)).cuda()
    lengths_t = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = attention(q, *tensors["key"], *tensors["value"], lengths_t).cpu()
    for b, t in enumerate(lengths):
        if t == 0:
            assert torch.all(out[b] == 0)
            continue
        ref = torch.from_numpy(cases[b].attend(0, q[b:b + 1, :, None].float().cpu().numpy())[0, :, 0])
        _close(out[b:b + 1], ref[None], qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("key_bits,value_bits", [(4, 4), (4, 3), (3, 3), (2, 2)])
@pytest.mark.parametrize("qdtype", PATHS)
def test_paged_layout_equals_contiguous(block_size, key_bits, value_bits, qdtype):
    """Pages of every size: below one tile (loaded token by token) and of one or more tiles (whole tiles staged through
    shared memory: K4/V4 with two slots in the padding, K4/V3 with one, K3/V3 compact, K2/V2)."""
    import torch
    rng = np.random.default_rng(block_size)
    case = Case(batch=3, kv_heads=2, group=4, tokens=700, key_bits=key_bits, value_bits=value_bits)
    q = case.queries(rng, _torch_dtype(qdtype))
    contiguous = case.run(q)
    out = case.run(q, **_paged(case, block_size, rng))
    assert torch.equal(out, contiguous)  # same arithmetic, other addresses
    _close(out, case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [None, 16, 64])
@pytest.mark.parametrize("key_bits,value_bits,group", [(3, 3, 4), (2, 2, 4), (4, 3, 4), (4, 4, 4), (3, 3, 8),
                                                       (4, 3, 8)])
def test_long_splits_match_cpu(block_size, key_bits, value_bits, group):
    """Splits long enough that every warp takes several tiles, so that the staged bit pairs refill their two slots in
    the loop (a warp's lane 0 issues the copies of its tile after next), contiguous and paged; both score layouts
    (token rows for GQA 4, head rows for 8 heads per chunk)."""
    import torch
    rng = np.random.default_rng(17)
    case = Case(batch=4, kv_heads=8, group=group, tokens=6000, key_bits=key_bits, value_bits=value_bits)
    splits = case.attention.num_splits(case.batch, case.kv_heads * case.group, case.n_codes)
    assert case.n_codes / splits >= 4 * 64, f"{splits} splits of {case.n_codes} codes: too short for this test"
    q = case.queries(rng, torch.float16)
    contiguous = case.run(q)
    _close(contiguous, case.reference(q), "float16")
    if block_size is not None:
        assert torch.equal(case.run(q, **_paged(case, block_size, rng)), contiguous)


@pytest.mark.cuda
@pytest.mark.parametrize("key_bits,value_bits,group", [(3, 3, 4), (2, 2, 4), (4, 3, 8)])
def test_running_maximum_and_value_scale_move_within_splits(key_bits, value_bits, group):
    """Key norms growing 150-fold and value norms 1000-fold along long splits: the running softmax maximum moves by
    more than the rescale threshold inside single tiles, at different tiles for different heads, and the value scale
    rises about ten times per split. The kernel reduces a tile's maxima only when some lane finds a score or a norm
    over the running limits; a missed move would leave fp16 weights far above 2^8 (overflow, or lost precision)."""
    import torch
    rng = np.random.default_rng(29)
    tokens = 6000
    ramp = np.linspace(0.0, 1.0, tokens)
    case = Case(batch=4, kv_heads=8, group=group, tokens=tokens, key_bits=key_bits, value_bits=value_bits,
                key_ramp=np.exp(5.0 * ramp), value_ramp=np.exp2(10.0 * ramp))
    splits = case.attention.num_splits(case.batch, case.kv_heads * case.group, case.n_codes)
    assert case.n_codes / splits >= 4 * 64, f"{splits} splits of {case.n_codes} codes: too short for this test"
    q = case.queries(rng, torch.float16)
    out = case.run(q, out_dtype=torch.float32)
    _close(out, case.reference(q), "float16")


def _paged(case, block_size, rng):
    """The case's codes as pages of `block_size` tokens in a shuffled pool: the keyword arguments of Case.run."""
    import torch
    n = case.n_codes
    blocks_per_seq = (n + block_size - 1) // block_size
    num_blocks = case.batch * blocks_per_seq + 5
    order = torch.from_numpy(rng.permutation(num_blocks)[:case.batch * blocks_per_seq].astype(np.int32)).cuda()
    table = order.view(case.batch, blocks_per_seq)
    paged = {"block_table": table, "max_code_length": n}
    for side in ("key", "value"):
        for field in ("indices", "norms"):
            src = case.tensors[f"{side}_{field}"]  # (B, H, n, bytes)
            pool = torch.randint(0, 255, (num_blocks, case.kv_heads, block_size, src.shape[3]), dtype=torch.uint8,
                                 device="cuda")
            padded = torch.zeros((case.batch, case.kv_heads, blocks_per_seq * block_size, src.shape[3]),
                                 dtype=torch.uint8, device="cuda")
            padded[:, :, :n] = src[:, :, :n]
            blocks = padded.view(case.batch, case.kv_heads, blocks_per_seq, block_size, -1).permute(0, 2, 1, 3, 4)
            pool[table.reshape(-1).long()] = blocks.reshape(-1, case.kv_heads, block_size, src.shape[3])
            paged[f"{side}_{field}"] = pool
    return paged


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", PATHS)
def test_strided_head_major_layout(qdtype):
    """Codes stored (num_kv_heads, batch, capacity, bytes) and passed as a permuted view."""
    rng = np.random.default_rng(8)
    case = Case(batch=3, kv_heads=2, group=4, tokens=400)
    q = case.queries(rng, _torch_dtype(qdtype))
    views = {name: case.tensors[name].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
             for name in ("key_indices", "key_norms", "value_indices", "value_norms")}
    _close(case.run(q, **views), case.reference(q), qdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", PATHS)
def test_masks_match_cpu(qdtype):
    import torch
    rng = np.random.default_rng(9)
    case = Case(batch=2, kv_heads=2, group=4, tokens=600)
    q = case.queries(rng, _torch_dtype(qdtype))
    seq = case.cache.seq_length(0)
    mask = rng.random((case.batch, 1, seq)) > 0.3
    mask[1] = False  # row 1 sees nothing: zeros
    code_mask = torch.from_numpy(mask[:, 0, case.n_sinks:case.n_sinks + case.n_codes].copy()).cuda()
    fp_mask = torch.from_numpy(mask[:, 0, case.fp_positions].copy()).cuda()
    out = case.run(q, code_mask=code_mask, fp_mask=fp_mask)
    ref = case.reference(q, mask=mask)
    _close(out, ref, qdtype)
    assert torch.all(out[1] == 0)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    import torch
    rng = np.random.default_rng(10)
    case = Case(batch=2, kv_heads=2, group=4, tokens=800)
    q = case.queries(rng, _torch_dtype("float16"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.run(q)  # warm up (allocator, lazy module loading) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = case.run(q)
    q.copy_(case.queries(rng, _torch_dtype("float16")))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, case.reference(q), "float16")


@pytest.mark.cuda
def test_argument_errors():
    import torch
    rng = np.random.default_rng(12)
    case = Case(batch=2, kv_heads=2, group=4, tokens=100)
    q = case.queries(rng, _torch_dtype("float32"))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        case.run(q[:, :3].contiguous())
    with pytest.raises(ValueError, match="queries of shape"):
        case.run(q[..., :64].contiguous())
    with pytest.raises(TypeError, match="dtype"):
        case.run(q.double())
    with pytest.raises(ValueError, match="on cuda"):
        case.run(q.cpu())
    with pytest.raises(TypeError, match="torch CUDA tensor"):
        case.run(q.cpu().numpy())
    with pytest.raises(TypeError, match="dtype"):
        case.run(q, code_lengths=case.tensors["code_lengths"].long())
    with pytest.raises(ValueError, match="key_indices of shape"):
        case.run(q, key_indices=case.tensors["key_indices"][:, :, :, :-1].contiguous())
    with pytest.raises(ValueError, match="same row strides"):
        case.run(q, key_norms=case.tensors["key_norms"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3))
    with pytest.raises(ValueError, match="max_code_length"):
        case.run(q, max_code_length=10**6)
    with pytest.raises(ValueError, match="together"):
        case.run(q, fp_lengths=None)
    with pytest.raises(ValueError, match="scale"):
        case.run(q, scale=-1.0)
    with pytest.raises(ValueError, match="power of two"):
        table = torch.zeros((2, 4), dtype=torch.int32, device="cuda")
        pool = torch.zeros((8, 2, 24, case.tensors["key_indices"].shape[3]), dtype=torch.uint8, device="cuda")
        case.run(q, block_table=table, key_indices=pool,
                 key_norms=torch.zeros((8, 2, 24, 2), dtype=torch.uint8, device="cuda"),
                 value_indices=torch.zeros((8, 2, 24, case.tensors["value_indices"].shape[3]), dtype=torch.uint8,
                                           device="cuda"),
                 value_norms=torch.zeros((8, 2, 24, 2), dtype=torch.uint8, device="cuda"))
    with pytest.raises(ValueError, match="unsupported"):
        qs = [Quantizer(128, 3, rotation="hadamard", mode="prod")]
        DecodeAttention(qs, qs)
    with pytest.raises(ValueError, match="one key and one value"):
        DecodeAttention(case.key_quantizers, case.value_quantizers[:1])
    with pytest.raises(ValueError, match="parameters of head 0"):
        DecodeAttention([Quantizer(128, 3, rotation="hadamard"), Quantizer(128, 4, rotation="hadamard")],
                        [Quantizer(128, 3, rotation="hadamard")] * 2)
