"""The device-resident state of ``rotorquant.KVCache`` (docs/kv_cache.md, "Device-resident mode").

``KVCache`` hands its work to a :class:`DeviceKVState` once it is device-resident. This module only
orchestrates torch tensors on the device (allocation, growth, ring-buffer bookkeeping, reorder / crop /
indexing); every piece of quantization math runs in the C++ core or the CUDA kernels:

* statistics of a layer's first chunk: ``_core.kv_chunk_statistics`` (the CPU cache's own function, on a
  host copy of that chunk, so the floats are the CPU's bit for bit);
* encoding the tokens that leave the window: the per-(layer, head, kind) ``rotorquant.Quantizer`` objects
  (same parameters and seeds as the core's) through their CUDA codec (``_core.CudaQuantizer``, codes
  bit-identical to the CPU's, docs/format.md section 8); decoding likewise;
* decode attention (q_len == 1): ``rotorquant.DecodeAttention``, the fused kernel on the codes.

The torch operations here are data movement plus the exact re-parameterizations the CPU cache applies
elementwise in float32 (centering ``k - mu``, ``k / s``; ``dequantize`` multiplies by s and adds mu back) and,
for the paths the fused kernel does not cover, float32 softmax attention on the dequantized keys and values.

The same class also runs on CPU torch tensors (with the CPU codec): the tests use that to check the state
machine against the C++ cache on machines without a GPU.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _core
from ._quantizer import Quantizer

_FIELDS = ("indices", "norms", "qjl_signs", "residual_norms")
_CAPACITY_QUANTUM = 256  # code capacity is a multiple of this many tokens
# Query rows x keys per SDPA call on the dequantized path (bounds any score matrix to 512 MiB of float32).
_ATTENTION_ELEMENTS = 1 << 27


def _decode_attention_class():
    """rotorquant.DecodeAttention (the fused decode-attention kernel), or None in builds without it."""
    try:
        from ._attention import DecodeAttention  # noqa: PLC0415 - optional: a later module of the package
    except ImportError:
        return None
    return DecodeAttention


def _fused_attention_class(device: torch.device):
    """(DecodeAttention class, None) when the fused kernel can serve a cache on `device`, else (None, why)."""
    if device.type != "cuda":
        return None, "the cache is not on a CUDA device"
    cls = _decode_attention_class()
    if cls is None:
        return None, "this rotorquant has no DecodeAttention (fused decode attention kernel)"
    return cls, None


def _round_up(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def _runs(start: int, count: int, period: int) -> List[Tuple[int, int]]:
    """The slots (start + i) % period for i < count as at most two contiguous [begin, end) runs."""
    if count <= 0:
        return []
    start %= period
    first = min(count, period - start)
    runs = [(start, start + first)]
    if count > first:
        runs.append((0, count - first))
    return runs


class _Layer:
    """Device state of one layer: codes (Hkv, B, capacity, bytes) per field and kind, sink + window float32
    tokens (B, Hkv, sink_tokens + residual_window, d), statistics, and the host-side token counts."""

    def __init__(self):
        self.sink_count = 0
        self.code_count = 0
        self.window_start = 0  # ring position (relative to slot sink_tokens) of the oldest window token
        self.window_count = 0
        self.capacity = 0
        self.keys: Dict[str, torch.Tensor] = {}
        self.values: Dict[str, torch.Tensor] = {}
        self.fp_keys: Optional[torch.Tensor] = None
        self.fp_values: Optional[torch.Tensor] = None
        self.has_statistics = False
        self.key_mean: Optional[torch.Tensor] = None  # (Hkv, d) float32 on the device
        self.value_mean: Optional[torch.Tensor] = None
        self.key_scale: Optional[torch.Tensor] = None
        self.host_statistics: Tuple[Optional[np.ndarray], ...] = (None, None, None)
        self.code_lengths: Optional[torch.Tensor] = None  # (B,) int32, for the fused kernel
        self.fp_lengths: Optional[torch.Tensor] = None
        self.filled: Tuple[int, int] = (-1, -1)  # the values code_lengths / fp_lengths hold

    @property
    def seq_length(self) -> int:
        return self.sink_count + self.code_count + self.window_count

    def tensors(self):
        for group in (self.keys, self.values):
            yield from group.values()
        for t in (self.fp_keys, self.fp_values, self.key_mean, self.value_mean, self.key_scale):
            if t is not None:
                yield t


class DeviceKVState:
    """Tokens, codes and statistics of a device-resident KVCache (one torch device)."""

    def __init__(self, params: Dict[str, Any], native_cache, device: torch.device, checks: bool = True):
        self.params = params
        self.native = native_cache  # _core.KVCache: quantizer parameters and seeds (holds no tokens in this mode)
        self.device = device
        self.checks = bool(checks)
        self.batch = 0
        self.layers: List[Optional[_Layer]] = [None] * params["num_layers"]
        self._quantizers: Dict[Tuple[int, int, int], Quantizer] = {}
        self._attention: Dict[int, Any] = {}  # layer -> DecodeAttention or a str saying why not
        self._native_lists: Dict[Tuple[int, int], Optional[List[Any]]] = {}  # (layer, kind) -> CudaQuantizers
        self._code_sizes: Dict[Tuple[int, int], Tuple[int, int, int, int]] = {}

    # -- quantizers ----------------------------------------------------------------------------
    def quantizer(self, layer: int, head: int, kind: int) -> Quantizer:
        key = (layer, head, kind)
        if key not in self._quantizers:
            self._quantizers[key] = Quantizer._from_params(dict(self.native.quantizer_params(layer, head, bool(kind))))
        return self._quantizers[key]

    def _sizes(self, layer: int, kind: int) -> Tuple[int, int, int, int]:
        """Bytes per token of the four code fields (the same for every head of a layer)."""
        key = (layer, kind)
        if key not in self._code_sizes:
            n = self.quantizer(layer, 0, kind)._native
            self._code_sizes[key] = (int(n.index_bytes), int(n.norm_bytes), int(n.sign_bytes),
                                     int(n.residual_norm_bytes))
        return self._code_sizes[key]

    def _native_on_device(self, q: Quantizer):
        if self.device.type != "cuda":
            return None
        return q._device_native("cuda", self.device.index)

    def _stream(self) -> int:
        return int(torch.cuda.current_stream(self.device).cuda_stream) if self.device.type == "cuda" else 0

    @staticmethod
    def _pointer(t: torch.Tensor) -> int:
        return int(t.data_ptr()) if t.numel() else 0

    def _natives(self, layer: int, kind: int) -> Optional[List[Any]]:
        """The layer's per-head _core.CudaQuantizer objects (cached), or None when the codec runs on the host
        (CPU tensors, or a rotation kind without a CUDA codec: rotor_network)."""
        key = (layer, kind)
        cache = self._native_lists
        if key not in cache:
            natives = [self._native_on_device(self.quantizer(layer, h, kind))
                       for h in range(self.params["num_kv_heads"])]
            cache[key] = None if any(n is None for n in natives) else natives
        return cache[key]

    def _encode(self, layer: int, kind: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x (Hkv, n, d) float32 contiguous (already centered and scaled) -> codes {field: (Hkv, n, bytes)}."""
        heads, n = x.shape[0], x.shape[1]
        sizes = self._sizes(layer, kind)
        codes = {name: torch.empty((heads, n, size), dtype=torch.uint8, device=self.device)
                 for name, size in zip(_FIELDS, sizes)}
        if n == 0:
            return codes
        natives = self._natives(layer, kind)
        if natives is not None:  # the fused CUDA codec, one launch per head, asynchronous on the current stream
            stream = self._stream()
            x_base, x_step = x.data_ptr(), n * x.shape[2] * 4
            bases = [self._pointer(codes[f]) for f in _FIELDS]
            for h, native in enumerate(natives):  # head h's rows start h * n rows into every array
                native.encode(x_base + h * x_step, n, *(b + h * n * size if b else 0 for b, size in zip(bases, sizes)),
                              stream, False)
            return codes
        for h in range(heads):  # the CPU core
            arrays = self.quantizer(layer, h, kind)._native.encode(np.ascontiguousarray(x[h].cpu().numpy()))
            for name, array in zip(_FIELDS, arrays):
                codes[name][h].copy_(torch.from_numpy(np.ascontiguousarray(array)))
        return codes

    def _decode(self, layer: int, kind: int, codes: Dict[str, torch.Tensor]) -> torch.Tensor:
        """codes {field: (Hkv, n, bytes) contiguous} -> (Hkv, n, d) float32."""
        heads, n = codes["norms"].shape[0], codes["norms"].shape[1]
        d = self.params["head_dim"]
        out = torch.empty((heads, n, d), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        natives = self._natives(layer, kind)
        if natives is not None:
            stream = self._stream()
            sizes = [codes[f].shape[2] for f in _FIELDS]
            bases = [self._pointer(codes[f]) for f in _FIELDS]
            out_base = out.data_ptr()
            for h, native in enumerate(natives):
                native.decode(*(b + h * n * size if b else 0 for b, size in zip(bases, sizes)), n,
                              out_base + h * n * d * 4, 0, stream, False)
            return out
        for h in range(heads):
            arrays = [np.ascontiguousarray(codes[f][h].cpu().numpy()) for f in _FIELDS]
            out[h].copy_(torch.from_numpy(self.quantizer(layer, h, kind)._native.decode(*arrays)))
        return out

    # -- description ---------------------------------------------------------------------------
    def seq_length(self, layer: int) -> int:
        state = self.layers[layer]
        return 0 if state is None else state.seq_length

    def quantized_length(self, layer: int) -> int:
        state = self.layers[layer]
        return 0 if state is None else state.code_count

    def window_length(self, layer: int) -> int:
        state = self.layers[layer]
        return 0 if state is None else state.window_count

    def sink_length(self, layer: int) -> int:
        state = self.layers[layer]
        return 0 if state is None else state.sink_count

    def nbytes(self) -> int:
        """Bytes of the device tensors holding data: codes at their allocated capacity, the sink + window
        buffers (float32, sink_tokens + residual_window slots), the statistics in use."""
        return int(sum(t.numel() * t.element_size() for state in self.layers if state is not None
                       for t in state.tensors()))

    def statistics(self, layer: int) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        state = self.layers[layer]
        return (None, None, None) if state is None else state.host_statistics

    def codes(self, layer: int, head: int, kind: int) -> Dict[str, torch.Tensor]:
        """{field: (B, code_count, bytes) contiguous copy} of one head's keys (kind 0) or values (kind 1)."""
        state = self.layers[layer]
        if state is None:
            return {name: torch.empty((self.batch, 0, size), dtype=torch.uint8, device=self.device)
                    for name, size in zip(_FIELDS, self._sizes(layer, kind))}
        group = state.keys if kind == 0 else state.values
        return {name: group[name][head, :, :state.code_count].contiguous() for name in _FIELDS}

    def is_empty(self) -> bool:
        return self.batch == 0

    # -- append --------------------------------------------------------------------------------
    def _centered(self, x: torch.Tensor, mean: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, Hkv, n, d) minus the per-head mean (one float32 subtraction, as the CPU)."""
        return x if mean is None else x - mean[None, :, None, :]

    def _window_slots(self, state: _Layer, first: int, count: int) -> List[Tuple[int, int]]:
        """fp-buffer slot runs of window tokens first .. first + count - 1 (0 = the oldest)."""
        sink, window = self.params["sink_tokens"], self.params["residual_window"]
        return [(sink + a, sink + b) for a, b in _runs(state.window_start + first, count, window)]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: (B, Hkv, T, d) torch tensors on the device (validated by KVCache)."""
        what = "KVCache.append"
        p = self.params
        batch, heads, tokens, d = (int(s) for s in keys.shape)
        if self.batch and batch != self.batch:
            raise ValueError(f"{what}: batch size: expected {self.batch} (fixed by the first append; reset() or "
                             f"reorder() to change it), got {batch}")
        if tokens == 0:
            return
        k = keys.detach().to(torch.float32).contiguous()
        v = values.detach().to(torch.float32).contiguous()
        state = self.layers[layer]
        fresh = state is None
        if fresh:
            state = _Layer()
        pending_check = []  # device booleans, all True when the append is valid (checked with one sync)
        # Statistics of the layer's first chunk: the core's function on a host copy (checks finiteness too).
        if not state.has_statistics:
            host_k = np.ascontiguousarray(k.cpu().numpy())
            host_v = np.ascontiguousarray(v.cpu().numpy())
            stats = _core.kv_chunk_statistics(host_k, host_v, p["center_keys"], p["center_values"],
                                              float(p["key_channel_scaling"]))
            device_stats = tuple(None if s is None else torch.from_numpy(s).to(self.device) for s in stats)
        else:
            stats = state.host_statistics
            device_stats = (state.key_mean, state.value_mean, state.key_scale)
            if self.checks:
                pending_check.append(torch.isfinite(k).all() & torch.isfinite(v).all())
        key_mean, value_mean, key_scale = device_stats

        sink_capacity, window = p["sink_tokens"], p["residual_window"]
        to_sink = max(0, min(tokens, sink_capacity - state.sink_count))
        offset = to_sink
        rest = tokens - offset
        old_window = state.window_count
        evict = max(0, old_window + rest - window)
        evict_window = min(evict, old_window)
        evict_new = evict - evict_window

        # Phase 1 (may raise, changes nothing): encode the tokens that leave the window.
        key_codes = value_codes = None
        if evict > 0:
            parts_k, parts_v = [], []
            for a, b in self._window_slots(state, 0, evict_window):
                parts_k.append(state.fp_keys[:, :, a:b])
                parts_v.append(state.fp_values[:, :, a:b])
            if evict_new > 0:
                parts_k.append(self._centered(k[:, :, offset:offset + evict_new], key_mean))
                parts_v.append(self._centered(v[:, :, offset:offset + evict_new], value_mean))
            xk = torch.cat(parts_k, dim=2) if len(parts_k) > 1 else parts_k[0]
            xv = torch.cat(parts_v, dim=2) if len(parts_v) > 1 else parts_v[0]
            if key_scale is not None:
                xk = xk / key_scale[None, :, None, :]
            # (B, Hkv, evict, d) -> (Hkv, B * evict, d): one batched encode per head and kind
            xk = xk.transpose(0, 1).reshape(heads, batch * evict, d).contiguous()
            xv = xv.transpose(0, 1).reshape(heads, batch * evict, d).contiguous()
            key_codes = self._encode(layer, 0, xk)
            value_codes = self._encode(layer, 1, xv)
            if self.checks:
                for codes in (key_codes, value_codes):
                    pending_check.append(self._norms_finite(codes))
        if pending_check:
            ok = pending_check[0]
            for flag in pending_check[1:]:
                ok = ok & flag
            if not bool(ok):  # the one host synchronization of a checked append
                self._raise_append_error(k, v, key_codes, value_codes)

        # Phase 2: commit.
        if fresh:
            self.layers[layer] = state
        if self.batch == 0:
            self.batch = batch
        if not state.has_statistics:
            state.key_mean, state.value_mean, state.key_scale = device_stats
            state.host_statistics = tuple(stats)
            state.has_statistics = True
        if state.fp_keys is None:
            slots = sink_capacity + window
            state.fp_keys = torch.zeros((batch, heads, slots, d), dtype=torch.float32, device=self.device)
            state.fp_values = torch.zeros_like(state.fp_keys)
        if to_sink > 0:
            s0 = state.sink_count
            state.fp_keys[:, :, s0:s0 + to_sink] = self._centered(k[:, :, :to_sink], state.key_mean)
            state.fp_values[:, :, s0:s0 + to_sink] = self._centered(v[:, :, :to_sink], state.value_mean)
            state.sink_count += to_sink
        if evict > 0:
            self._reserve(layer, state, batch, state.code_count + evict)
            c0, c1 = state.code_count, state.code_count + evict
            for group, codes in ((state.keys, key_codes), (state.values, value_codes)):
                for name in _FIELDS:
                    if codes[name].shape[-1]:  # fields of zero bytes (signs, residual norms in mse mode): no copy
                        group[name][:, :, c0:c1] = codes[name].view(heads, batch, evict, codes[name].shape[-1])
            state.code_count = c1
        elif not state.keys:
            self._reserve(layer, state, batch, 0)
        if window > 0 and rest > 0:
            state.window_start = (state.window_start + evict_window) % window
            state.window_count -= evict_window
            stay = rest - evict_new
            if stay > 0:
                new_k = self._centered(k[:, :, offset + evict_new:], state.key_mean)
                new_v = self._centered(v[:, :, offset + evict_new:], state.value_mean)
                done = 0
                for a, b in self._window_slots(state, state.window_count, stay):
                    state.fp_keys[:, :, a:b] = new_k[:, :, done:done + b - a]
                    state.fp_values[:, :, a:b] = new_v[:, :, done:done + b - a]
                    done += b - a
                state.window_count += stay

    def _norms_finite(self, codes: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Device bool: every stored norm (and residual norm) of the codes is finite (the CUDA encoder stores
        the rounded norm, inf on overflow, and flags it; the CPU core raises instead)."""
        dtype = torch.float16 if self.params["norm_dtype"] == "float16" else torch.float32
        flags = []
        for name in ("norms", "residual_norms"):
            t = codes[name]
            if t.numel():
                flags.append(torch.isfinite(t.contiguous().view(dtype)).all())
        ok = flags[0]
        for flag in flags[1:]:
            ok = ok & flag
        return ok

    def _raise_append_error(self, k, v, key_codes, value_codes):
        what = "KVCache.append"
        for name, x in (("keys", k), ("values", v)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{what}: {name} contains non-finite values (NaN or Inf): expected finite values")
        dtype = self.params["norm_dtype"]
        limit = "65504" if dtype == "float16" else "3.4e38"
        for name, codes in (("key", key_codes), ("value", value_codes)):
            if codes is not None and not bool(self._norms_finite(codes)):
                raise ValueError(f"{what}: the norm of a {name} token leaving the window overflows {dtype}: expected "
                                 f"norms <= {limit}" + (', use norm_dtype="float32"' if dtype == "float16" else ""))
        raise ValueError(f"{what}: invalid input")  # pragma: no cover - one of the above holds

    def _reserve(self, layer: int, state: _Layer, batch: int, needed: int) -> None:
        """Code capacity >= needed tokens (geometric growth, copy on growth)."""
        if state.keys and needed <= state.capacity:
            return
        old = state.capacity if state.keys else 0
        if old == 0:
            capacity = _round_up(max(needed + needed // 8, 1), _CAPACITY_QUANTUM)
        else:
            capacity = _round_up(max(needed, 2 * old), _CAPACITY_QUANTUM)
        heads = self.params["num_kv_heads"]
        for kind, group in ((0, state.keys), (1, state.values)):
            for name, size in zip(_FIELDS, self._sizes(layer, kind)):
                grown = torch.empty((heads, batch, capacity, size), dtype=torch.uint8, device=self.device)
                if name in group and state.code_count:
                    grown[:, :, :state.code_count] = group[name][:, :, :state.code_count]
                group[name] = grown
        state.capacity = capacity

    # -- read ------------------------------------------------------------------------------------
    def dequantize(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, seq, d) float32 keys and values in sequence order, as KVCache::dequantize builds them."""
        p = self.params
        heads, d = p["num_kv_heads"], p["head_dim"]
        state = self.layers[layer]
        if state is None or state.seq_length == 0:
            empty = torch.zeros((self.batch, heads, 0, d), dtype=torch.float32, device=self.device)
            return empty, empty.clone()
        batch, count = self.batch, state.code_count
        outputs = []
        for kind, group in ((0, state.keys), (1, state.values)):
            fp = state.fp_keys if kind == 0 else state.fp_values
            parts = [fp[:, :, :state.sink_count]]
            if count:
                codes = {name: group[name][:, :, :count].reshape(heads, batch * count, group[name].shape[-1])
                         .contiguous() for name in _FIELDS}
                decoded = self._decode(layer, kind, codes).view(heads, batch, count, d).transpose(0, 1)
                if kind == 0 and state.key_scale is not None:
                    decoded = decoded * state.key_scale[None, :, None, :]
                parts.append(decoded)
            for a, b in self._window_slots(state, 0, state.window_count):
                parts.append(fp[:, :, a:b])
            out = torch.cat(parts, dim=2)
            mean = state.key_mean if kind == 0 else state.value_mean
            if mean is not None:
                out = out + mean[None, :, None, :]
            outputs.append(out.contiguous())
        return outputs[0], outputs[1]

    # -- attention -------------------------------------------------------------------------------
    def decode_attention(self, layer: int):
        """The layer's DecodeAttention (cached), or a str saying why the fused kernel does not apply."""
        if layer in self._attention:
            return self._attention[layer]
        result: Any
        decode_attention_class, reason = _fused_attention_class(self.device)
        if decode_attention_class is None:
            result = reason
        else:
            heads = self.params["num_kv_heads"]
            key_quantizers = [self.quantizer(layer, h, 0) for h in range(heads)]
            value_quantizers = [self.quantizer(layer, h, 1) for h in range(heads)]
            reason = decode_attention_class.unsupported_reason(key_quantizers[0].params, value_quantizers[0].params)
            if reason is not None:
                result = str(reason)
            else:
                result = decode_attention_class(key_quantizers, value_quantizers, device=self.device)
        self._attention[layer] = result
        return result

    def attention_path(self, layer: int, q_len: int) -> str:
        if q_len == 1 and not isinstance(self.decode_attention(layer), str):
            return "fused"
        return "dequantized"

    def attend(self, layer: int, queries: torch.Tensor, scale: float, causal: bool,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
        """queries (B, Hq, q_len, d) on the device; mask (B, q_len, seq) bool on the device or None.
        Returns (B, Hq, q_len, d) in the queries' dtype."""
        what = "KVCache.attend"
        batch, q_heads, q_len, d = (int(s) for s in queries.shape)
        if self.checks and queries.numel() and not bool(torch.isfinite(queries).all()):
            raise ValueError(f"{what}: queries contains non-finite values (NaN or Inf): expected finite values")
        seq = self.seq_length(layer)
        if q_len == 0 or seq == 0 or self.batch == 0:
            return torch.zeros(queries.shape, dtype=queries.dtype, device=self.device)
        softmax_scale = scale if scale > 0 else 1.0 / math.sqrt(d)
        if self.attention_path(layer, q_len) == "fused":
            return self._attend_fused(layer, queries, softmax_scale, mask)
        return self._attend_dequantized(layer, queries, softmax_scale, causal, mask)

    def _attend_fused(self, layer: int, queries: torch.Tensor, scale: float, mask: Optional[torch.Tensor]):
        p = self.params
        state = self.layers[layer]
        attention = self.decode_attention(layer)
        batch = self.batch
        q = queries[:, :, 0, :]
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            q = q.to(torch.float32)
        q = q.contiguous()
        if state.code_lengths is None or state.code_lengths.shape[0] != batch:
            state.code_lengths = torch.empty((batch,), dtype=torch.int32, device=self.device)
            state.fp_lengths = torch.empty((batch,), dtype=torch.int32, device=self.device)
            state.filled = (-1, -1)
        fp_count = state.sink_count + state.window_count
        if state.filled[0] != state.code_count:  # device lengths are rewritten only when they change
            state.code_lengths.fill_(state.code_count)
        if state.filled[1] != fp_count:
            state.fp_lengths.fill_(fp_count)
        state.filled = (state.code_count, fp_count)
        max_code_length = max(1, state.code_count)
        fp_slots = p["sink_tokens"] + p["residual_window"]
        options: Dict[str, Any] = dict(max_code_length=max_code_length, scale=scale, out_dtype=q.dtype,
                                       key_scales=state.key_scale,
                                       value_means=state.value_mean if p["center_values"] else None)
        if fp_slots > 0:
            options.update(fp_keys=state.fp_keys, fp_values=state.fp_values, fp_lengths=state.fp_lengths)
        visible_any = None
        if mask is not None:
            row = mask[:, 0, :]  # (B, seq): q_len == 1
            sink, count = state.sink_count, state.code_count
            code_mask = torch.zeros((batch, max_code_length), dtype=torch.bool, device=self.device)
            code_mask[:, :count] = row[:, sink:sink + count]
            options["code_mask"] = code_mask
            if fp_slots > 0:
                fp_mask = torch.zeros((batch, fp_slots), dtype=torch.bool, device=self.device)
                fp_mask[:, :sink] = row[:, :sink]
                done = sink + count
                for a, b in self._window_slots(state, 0, state.window_count):
                    fp_mask[:, a:b] = row[:, done:done + b - a]
                    done += b - a
                options["fp_mask"] = fp_mask
            visible_any = row.any(dim=1)
        keys, values = state.keys, state.values
        out = attention(q, keys["indices"].permute(1, 0, 2, 3), keys["norms"].permute(1, 0, 2, 3),
                        values["indices"].permute(1, 0, 2, 3), values["norms"].permute(1, 0, 2, 3),
                        state.code_lengths, **options)
        if visible_any is not None:  # rows that see no token are zeros, as on the CPU
            out = torch.where(visible_any[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.unsqueeze(2).to(queries.dtype)

    def _attend_dequantized(self, layer: int, queries: torch.Tensor, scale: float, causal: bool,
                            mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Float32 softmax attention over dequantize(): decoded codes on the device, then SDPA in chunks of
        query rows with an explicit boolean mask (causal rule AND the caller's mask)."""
        keys, values = self.dequantize(layer)
        batch, q_heads, q_len, d = (int(s) for s in queries.shape)
        heads = self.params["num_kv_heads"]
        group = q_heads // heads
        seq = keys.shape[2]
        # query head i uses KV head i // group: (B, Hq, L, d) -> (B, Hkv, group, L, d)
        q = queries.detach().to(torch.float32).reshape(batch, heads, group, q_len, d)
        out = torch.empty((batch, heads, group, q_len, d), dtype=torch.float32, device=self.device)
        chunk = max(1, _ATTENTION_ELEMENTS // max(1, batch * q_heads * seq))
        positions = torch.arange(seq, device=self.device)
        for i0 in range(0, q_len, chunk):
            i1 = min(q_len, i0 + chunk)
            rows = i1 - i0
            q_chunk = q[:, :, :, i0:i1].reshape(batch, heads, group * rows, d)
            # causal: the chunk's last query sits at position seq - q_len + i1 - 1; later keys are never seen
            span = seq - q_len + i1 if causal else seq
            visible = None
            if causal and seq - q_len + i0 < span - 1:  # some query of the chunk does not see every key of the span
                last = (seq - q_len) + torch.arange(i0, i1, device=self.device)
                visible = (positions[None, :span] <= last[:, None])[None].expand(batch, rows, span)
            if mask is not None:
                visible = mask[:, i0:i1, :span] if visible is None else visible & mask[:, i0:i1, :span]
            attn_mask = None
            if visible is not None:
                attn_mask = visible[:, None, None].expand(batch, 1, group, rows, span).reshape(batch, 1, group * rows,
                                                                                             span)
            o = F.scaled_dot_product_attention(q_chunk, keys[:, :, :span], values[:, :, :span], attn_mask=attn_mask,
                                               scale=scale)
            o = o.view(batch, heads, group, rows, d)
            if visible is not None:  # rows that see no token: zeros (SDPA would give NaN)
                seen = visible.any(dim=2)[:, None, None, :, None]
                o = torch.where(seen, o, torch.zeros((), dtype=o.dtype, device=o.device))
            out[:, :, :, i0:i1] = o
        return out.view(batch, q_heads, q_len, d).to(queries.dtype)

    # -- batch and length operations ---------------------------------------------------------------
    def reorder(self, indices: torch.Tensor) -> None:
        """indices: 1-D int64 on the device, validated by KVCache."""
        count = int(indices.shape[0])
        if self.batch == 0:
            return
        for state in self.layers:
            if state is None:
                continue
            for group in (state.keys, state.values):
                for name in list(group):
                    group[name] = group[name].index_select(1, indices)
            state.fp_keys = state.fp_keys.index_select(0, indices)
            state.fp_values = state.fp_values.index_select(0, indices)
            state.code_lengths = state.fp_lengths = None
        self.batch = count

    def crop(self, length: int) -> None:
        window = self.params["residual_window"]
        sink = self.params["sink_tokens"]
        for state in self.layers:
            if state is None or length >= state.seq_length:
                continue
            after_sink = length - min(length, state.sink_count)
            state.sink_count = min(length, state.sink_count)
            if after_sink >= state.code_count:
                state.window_count = after_sink - state.code_count
            else:
                state.code_count = after_sink
                state.window_count = 0
            # Keep the window a prefix of its ring (slots sink .. sink + window_count - 1) unless full: the
            # fused kernel reads fp slots [0, sink_count + window_count).
            if window > 0 and state.window_start != 0:
                if state.window_count > 0:
                    order = [state.fp_keys[:, :, a:b] for a, b in self._window_slots(state, 0, state.window_count)]
                    order_v = [state.fp_values[:, :, a:b] for a, b in self._window_slots(state, 0, state.window_count)]
                    kept_k, kept_v = torch.cat(order, dim=2), torch.cat(order_v, dim=2)
                    state.fp_keys[:, :, sink:sink + state.window_count] = kept_k
                    state.fp_values[:, :, sink:sink + state.window_count] = kept_v
                state.window_start = 0

    def reset(self) -> None:
        self.batch = 0
        self.layers = [None] * self.params["num_layers"]


def check_indices(indices: Any, batch: int, device: torch.device) -> torch.Tensor:
    """beam indices (sequence, numpy or torch) -> validated 1-D int64 tensor on `device` (ValueError as the core)."""
    what = "KVCache.reorder"
    if isinstance(indices, torch.Tensor):
        tensor = indices.detach()
        if tensor.ndim != 1 or (tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype.is_complex
                                                    or tensor.dtype == torch.bool)):
            raise ValueError(f"{what}: expected a 1-D sequence of integers, got shape {tuple(tensor.shape)} dtype "
                             f"{tensor.dtype}")
        tensor = tensor.to(device=device, dtype=torch.int64)
    else:
        array = np.asarray(indices)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(f"{what}: expected a 1-D sequence of integers, got shape {array.shape} dtype {array.dtype}")
        tensor = torch.as_tensor(array.astype(np.int64), device=device)
    count = int(tensor.shape[0])
    if count < 1:
        raise ValueError(f"{what}: number of indices: expected >= 1, got {count}")
    if batch:
        low, high = (int(x) for x in torch.stack([tensor.min(), tensor.max()]).cpu())
        if low < 0 or high >= batch:
            bad = low if low < 0 else high
            raise ValueError(f"{what}: index: expected in [0, {batch}), got {bad}")
    return tensor
