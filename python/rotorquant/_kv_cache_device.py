"""The device-resident state of ``rotorquant.KVCache`` (docs/kv_cache.md, "Device-resident mode").

``KVCache`` hands its work to a :class:`DeviceKVState` once it is device-resident. This module only
orchestrates torch tensors on the device (allocation, growth, ring-buffer bookkeeping, reorder / crop /
indexing); every piece of quantization math runs in the C++ core or the CUDA kernels:

* statistics of a layer's first chunk: ``_core.kv_chunk_statistics`` (the CPU cache's own function, on a
  host copy of that chunk, so the floats are the CPU's bit for bit);
* encoding the tokens that leave the window: the per-(layer, head, kind) ``rotorquant.Quantizer`` objects
  (same parameters and seeds as the core's) through their CUDA codecs, all heads of a (layer, kind) in one
  launch (``_core.CudaQuantizerGroup``, codes bit-identical to the CPU's, docs/format.md section 8) that reads
  the tokens where they are (window slots) and writes the codes in place (the code buffers); decoding likewise;
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
from ._quantizer import _FUSED_CUDA_ROTATIONS, Quantizer

_FIELDS = ("indices", "norms", "qjl_signs", "residual_norms")
# Input dtypes whose conversion to float32 is exact: the torch ops below take them as they are (type promotion
# computes in float32); float64 is converted first (float32 rounding, as the CPU cache's input conversion).
_EXACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CAPACITY_QUANTUM = 256  # code capacity is a multiple of this many tokens
_ATTENTION_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DecodeAttention's native dtype codes
# Query rows x keys per SDPA call on the dequantized path (bounds any score matrix to 512 MiB of float32).
_ATTENTION_ELEMENTS = 1 << 27


_DECODE_ATTENTION: List[Any] = []  # [class or None] once looked up


def _decode_attention_class():
    """rotorquant.DecodeAttention (the fused decode-attention kernel), or None in builds without it."""
    if not _DECODE_ATTENTION:
        try:
            from ._attention import DecodeAttention  # noqa: PLC0415 - optional: a later module of the package
        except ImportError:
            DecodeAttention = None
        _DECODE_ATTENTION.append(DecodeAttention)
    return _DECODE_ATTENTION[0]


def _fused_attention_class(device: torch.device):
    """(DecodeAttention class, None) when the fused kernel can serve a cache on `device`, else (None, why)."""
    if device.type != "cuda":
        return None, "the cache is not on a CUDA device"
    cls = _decode_attention_class()
    if cls is None:
        return None, "this rotorquant has no DecodeAttention (fused decode attention kernel)"
    return cls, None


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    """Device scalar max |x|: finite iff every element of x is (NaN and inf propagate); one reduction kernel."""
    return torch.linalg.vector_norm(x, ord=math.inf)


def _all_finite(scalars: List[torch.Tensor]) -> bool:
    """Whether every max |x| in `scalars` is finite: their maximum (NaN propagates), one host synchronization."""
    total = scalars[0]
    for t in scalars[1:]:
        total = torch.maximum(total, t)
    return math.isfinite(float(total))


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
        # the same as (1, Hkv, 1, d) views, broadcast against (B, Hkv, tokens, d)
        self.key_mean4: Optional[torch.Tensor] = None
        self.value_mean4: Optional[torch.Tensor] = None
        self.key_scale4: Optional[torch.Tensor] = None
        self.host_statistics: Tuple[Optional[np.ndarray], ...] = (None, None, None)
        self.fused_arguments: Optional[Tuple[Any, ...]] = None  # see DeviceKVState._attend_fused

    def set_statistics(self, key_mean, value_mean, key_scale, host_statistics) -> None:
        self.key_mean, self.value_mean, self.key_scale = key_mean, value_mean, key_scale
        self.key_mean4, self.value_mean4, self.key_scale4 = (None if t is None else t[None, :, None, :]
                                                             for t in (key_mean, value_mean, key_scale))
        self.host_statistics = tuple(host_statistics)
        self.has_statistics = True

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
        self._codec_groups: Dict[Tuple[int, int], Any] = {}  # (layer, kind) -> CudaQuantizerGroup or None
        self._code_sizes: Dict[Tuple[int, int], Tuple[int, int, int, int]] = {}
        self._length_table: Optional[torch.Tensor] = None  # (rows, B) int32, row i = i (see _lengths)

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

    def _stream(self) -> int:
        return int(torch.cuda.current_stream(self.device).cuda_stream) if self.device.type == "cuda" else 0

    def _codec_group(self, layer: int, kind: int):
        """The layer's _core.CudaQuantizerGroup of keys (kind 0) or values (cached), or None when the codec runs on
        the host (CPU tensors, or a rotation kind without a CUDA codec: rotor_network)."""
        key = (layer, kind)
        groups = self._codec_groups
        if key not in groups:
            group = None
            heads = [self.quantizer(layer, h, kind) for h in range(self.params["num_kv_heads"])]
            if self.device.type == "cuda" and self.params["rotation"] in _FUSED_CUDA_ROTATIONS:
                group = _core.CudaQuantizerGroup([q._native for q in heads], self.device.index)
            groups[key] = group
        return groups[key]

    def _encode_into(self, layer: int, state: _Layer, kind: int, x: torch.Tensor, first: int, stream: int) -> None:
        """Encodes x (B, Hkv, e, d) float32 (any strides) into code slots first .. first + e - 1 of every (head,
        sequence) of `kind` (0 keys, 1 values). The slots must lie below the capacity."""
        batch, heads, e, d = (int(s) for s in x.shape)
        if e == 0 or batch == 0:
            return
        group = state.keys if kind == 0 else state.values
        sizes = self._sizes(layer, kind)
        codec = self._codec_group(layer, kind)
        if codec is not None:  # one launch for every head and sequence, reading x in place, codes written in place
            if x.stride(3) != 1 or (e > 1 and x.stride(2) != d):
                x = x.contiguous()
            capacity = state.capacity
            pointers = [group[name].data_ptr() + first * size if size else 0 for name, size in zip(_FIELDS, sizes)]
            codec.encode(x.data_ptr(), e, batch, x.stride(1), x.stride(0), *pointers, batch * capacity, capacity,
                         stream, False)
            return
        for h in range(heads):  # the CPU core, one head at a time (rows of head h: sequence-major)
            rows = np.ascontiguousarray(x[:, h].reshape(batch * e, d).cpu().numpy())
            arrays = self.quantizer(layer, h, kind)._native.encode(rows)
            for name, array, size in zip(_FIELDS, arrays, sizes):
                if size:
                    codes = torch.from_numpy(np.ascontiguousarray(array)).view(batch, e, size)
                    group[name][h, :, first:first + e] = codes.to(self.device)

    def _decode_rows(self, layer: int, state: _Layer, kind: int, count: int) -> torch.Tensor:
        """Code slots 0 .. count - 1 of every (sequence, head) of `kind` -> (B, Hkv, count, d) float32."""
        batch, heads, d = self.batch, self.params["num_kv_heads"], self.params["head_dim"]
        out = torch.empty((batch, heads, count, d), dtype=torch.float32, device=self.device)
        if count == 0 or batch == 0:
            return out
        group = state.keys if kind == 0 else state.values
        sizes = self._sizes(layer, kind)
        codec = self._codec_group(layer, kind)
        if codec is not None:  # one launch, codes read in place, rows written in sequence order
            capacity = state.capacity
            pointers = [group[name].data_ptr() if size else 0 for name, size in zip(_FIELDS, sizes)]
            codec.decode(*pointers, count, batch, batch * capacity, capacity, out.data_ptr(), count * d,
                         heads * count * d, 0, self._stream(), False)
            return out
        for h in range(heads):
            arrays = [np.ascontiguousarray(group[name][h, :, :count].reshape(batch * count, size).cpu().numpy())
                      for name, size in zip(_FIELDS, sizes)]
            decoded = self.quantizer(layer, h, kind)._native.decode(*arrays)
            out[:, h].copy_(torch.from_numpy(decoded).view(batch, count, d))
        return out

    def _lengths(self, batch: int, value: int) -> torch.Tensor:
        """A (batch,) int32 device tensor holding `value` everywhere, for the fused kernel's lengths: a row of a
        table whose row i holds i, so that no step writes lengths (rows are never written after creation)."""
        table = self._length_table
        if table is None or table.shape[1] != batch or table.shape[0] <= value:
            rows = _round_up(value + 1, _CAPACITY_QUANTUM)
            if table is not None and table.shape[1] == batch:
                rows = max(rows, 2 * table.shape[0])
            table = torch.arange(rows, dtype=torch.int32, device=self.device)[:, None].expand(rows, batch).contiguous()
            self._length_table = table
        return table[value]

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
    def _window_slots(self, state: _Layer, first: int, count: int) -> List[Tuple[int, int]]:
        """fp-buffer slot runs of window tokens first .. first + count - 1 (0 = the oldest)."""
        sink, window = self.params["sink_tokens"], self.params["residual_window"]
        return [(sink + a, sink + b) for a, b in _runs(state.window_start + first, count, window)]

    @staticmethod
    def _centered(x: torch.Tensor, mean4: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, Hkv, n, d) as float32 minus the per-head mean (one float32 subtraction, as the CPU)."""
        return x.to(torch.float32) if mean4 is None else torch.sub(x, mean4)

    @staticmethod
    def _store_centered(out: torch.Tensor, x: torch.Tensor, mean4: Optional[torch.Tensor]) -> None:
        """out (a float32 view of sink / window slots) = x - mean (or x), one op, no temporary."""
        if mean4 is None:
            out.copy_(x)
        else:
            torch.sub(x, mean4, out=out)

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
        k, v = keys.detach(), values.detach()
        if k.dtype not in _EXACT_DTYPES:
            k = k.to(torch.float32)
        if v.dtype not in _EXACT_DTYPES:
            v = v.to(torch.float32)
        state = self.layers[layer]
        fresh = state is None
        if fresh:
            state = _Layer()
        pending_check = []  # device scalars max |x|, all finite when the append is valid (checked with one sync)
        # Statistics of the layer's first chunk: the core's function on a host copy (checks finiteness too).
        if not state.has_statistics:
            host_k = np.ascontiguousarray(k.to(torch.float32).cpu().numpy())
            host_v = np.ascontiguousarray(v.to(torch.float32).cpu().numpy())
            stats = _core.kv_chunk_statistics(host_k, host_v, p["center_keys"], p["center_values"],
                                              float(p["key_channel_scaling"]))
            device_stats = tuple(None if s is None else torch.from_numpy(s).to(self.device) for s in stats)
            key_mean4, value_mean4, key_scale4 = (None if t is None else t[None, :, None, :] for t in device_stats)
        else:
            stats = state.host_statistics
            key_mean4, value_mean4, key_scale4 = state.key_mean4, state.value_mean4, state.key_scale4
            if self.checks:
                pending_check += [_max_abs(k), _max_abs(v)]

        sink_capacity, window = p["sink_tokens"], p["residual_window"]
        to_sink = max(0, min(tokens, sink_capacity - state.sink_count))
        offset = to_sink
        rest = tokens - offset
        old_window = state.window_count
        evict = max(0, old_window + rest - window)
        evict_window = min(evict, old_window)
        evict_new = evict - evict_window

        # Phase 1 (may raise; changes nothing visible): encode the tokens that leave the window into the code slots
        # after code_count (capacity grown first). Slots beyond code_count hold nothing until the commit.
        c0, c1 = state.code_count, state.code_count + evict
        if evict > 0:
            self._reserve(layer, state, batch, c1)
            stream = self._stream()
            fp_keys, fp_values = state.fp_keys, state.fp_values
            for kind, x, fp, mean4, scale4 in ((0, k, fp_keys, key_mean4, key_scale4),
                                               (1, v, fp_values, value_mean4, None)):
                parts = [fp[:, :, a:b] for a, b in self._window_slots(state, 0, evict_window)]
                if evict_new > 0:
                    parts.append(self._centered(x[:, :, offset:offset + evict_new], mean4))
                tokens_out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
                if scale4 is not None:
                    tokens_out = tokens_out / scale4
                self._encode_into(layer, state, kind, tokens_out, c0, stream)
            if self.checks:
                pending_check += self._stored_norms(state, c0, c1)
        if pending_check and not _all_finite(pending_check):  # the one host synchronization of a checked append
            self._raise_append_error(k, v, state if evict > 0 else None, c0, c1)

        # Phase 2: commit.
        if fresh:
            self.layers[layer] = state
        if self.batch == 0:
            self.batch = batch
        if not state.has_statistics:
            state.set_statistics(*device_stats, stats)
        if state.fp_keys is None:
            slots = sink_capacity + window
            state.fp_keys = torch.zeros((batch, heads, slots, d), dtype=torch.float32, device=self.device)
            state.fp_values = torch.zeros_like(state.fp_keys)
        if to_sink > 0:
            s0 = state.sink_count
            self._store_centered(state.fp_keys[:, :, s0:s0 + to_sink], k[:, :, :to_sink], state.key_mean4)
            self._store_centered(state.fp_values[:, :, s0:s0 + to_sink], v[:, :, :to_sink], state.value_mean4)
            state.sink_count += to_sink
        if evict > 0:
            state.code_count = c1
        elif not state.keys:
            self._reserve(layer, state, batch, 0)
        if window > 0 and rest > 0:
            # the evicted slots were read by the encode above (queued before these writes on the same stream)
            state.window_start = (state.window_start + evict_window) % window
            state.window_count -= evict_window
            stay = rest - evict_new
            if stay > 0:
                done = offset + evict_new
                for a, b in self._window_slots(state, state.window_count, stay):
                    self._store_centered(state.fp_keys[:, :, a:b], k[:, :, done:done + b - a], state.key_mean4)
                    self._store_centered(state.fp_values[:, :, a:b], v[:, :, done:done + b - a], state.value_mean4)
                    done += b - a
                state.window_count += stay

    def _stored_norms(self, state: _Layer, c0: int, c1: int) -> List[torch.Tensor]:
        """max |stored norm| (and residual norm) of code slots c0 .. c1 - 1 of keys and values, device scalars: finite
        iff every norm is (the CUDA encoder stores the rounded norm, inf on overflow, and flags it; the CPU core
        raises instead)."""
        dtype = torch.float16 if self.params["norm_dtype"] == "float16" else torch.float32
        out = []
        for group in (state.keys, state.values):
            for name in ("norms", "residual_norms"):
                t = group[name]
                if t.shape[-1]:  # (Hkv, B, capacity, bytes) uint8 -> (Hkv, B, capacity, 1) norms, no copy
                    out.append(_max_abs(t.view(dtype)[:, :, c0:c1]))
        return out

    def _raise_append_error(self, k, v, state: Optional[_Layer], c0: int, c1: int):
        what = "KVCache.append"
        for name, x in (("keys", k), ("values", v)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{what}: {name} contains non-finite values (NaN or Inf): expected finite values")
        dtype = self.params["norm_dtype"]
        limit = "65504" if dtype == "float16" else "3.4e38"
        norm_dtype = torch.float16 if dtype == "float16" else torch.float32
        groups = () if state is None else ((state.keys, "key"), (state.values, "value"))
        for group, name in groups:  # code slots c0 .. c1 - 1 of the tokens that left the window
            for field in ("norms", "residual_norms"):
                t = group[field]
                if t.shape[-1] and not bool(torch.isfinite(t.view(norm_dtype)[:, :, c0:c1]).all()):
                    raise ValueError(f"{what}: the norm of a {name} token leaving the window overflows {dtype}: "
                                     f"expected norms <= {limit}" +
                                     (', use norm_dtype="float32"' if dtype == "float16" else ""))
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
        count = state.code_count
        outputs = []
        for kind in (0, 1):
            fp = state.fp_keys if kind == 0 else state.fp_values
            parts = [fp[:, :, :state.sink_count]]
            if count:
                decoded = self._decode_rows(layer, state, kind, count)  # (B, Hkv, count, d)
                if kind == 0 and state.key_scale4 is not None:
                    decoded = decoded * state.key_scale4
                parts.append(decoded)
            for a, b in self._window_slots(state, 0, state.window_count):
                parts.append(fp[:, :, a:b])
            out = torch.cat(parts, dim=2)
            mean4 = state.key_mean4 if kind == 0 else state.value_mean4
            if mean4 is not None:
                out = out + mean4
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
        if self.checks and queries.numel() and not _all_finite([_max_abs(queries)]):
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
        fp_count = state.sink_count + state.window_count
        code_lengths = self._lengths(batch, state.code_count)
        max_code_length = max(1, state.code_count)
        fp_slots = p["sink_tokens"] + p["residual_window"]
        options: Dict[str, Any] = dict(max_code_length=max_code_length, scale=scale, out_dtype=q.dtype,
                                       key_scales=state.key_scale,
                                       value_means=state.value_mean if p["center_values"] else None)
        if fp_slots > 0:
            options.update(fp_keys=state.fp_keys, fp_values=state.fp_values, fp_lengths=self._lengths(batch, fp_count))
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
        fixed = None
        if mask is None and type(attention) is _decode_attention_class():
            # the arguments that stay the same over decode steps (buffers, statistics, shapes); once the validated call
            # below has accepted them, later steps with the same ones launch the kernel directly (_run_fused)
            fixed = (batch, int(q.shape[1]), q.dtype, state.capacity, keys["indices"].data_ptr(),
                     keys["norms"].data_ptr(), values["indices"].data_ptr(), values["norms"].data_ptr(),
                     self._pointer(options.get("fp_keys")), self._pointer(options.get("fp_values")),
                     self._pointer(options["key_scales"]), self._pointer(options["value_means"]))
            if state.fused_arguments == fixed:
                out = self._run_fused(attention, state, q, code_lengths, options)
                return out.unsqueeze(2).to(queries.dtype)
        out = attention(q, keys["indices"].permute(1, 0, 2, 3), keys["norms"].permute(1, 0, 2, 3),
                        values["indices"].permute(1, 0, 2, 3), values["norms"].permute(1, 0, 2, 3),
                        code_lengths, **options)
        state.fused_arguments = fixed
        if visible_any is not None:  # rows that see no token are zeros, as on the CPU
            out = torch.where(visible_any[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.unsqueeze(2).to(queries.dtype)

    @staticmethod
    def _pointer(t: Optional[torch.Tensor]) -> int:
        return int(t.data_ptr()) if t is not None and t.numel() else 0

    def _run_fused(self, attention, state: _Layer, q: torch.Tensor, code_lengths: torch.Tensor,
                   options: Dict[str, Any]) -> torch.Tensor:
        """DecodeAttention's launch (its _native.run, the arguments as DecodeAttention.__call__ passes them) for a decode
        step whose fixed arguments (state.fused_arguments) passed DecodeAttention.__call__'s checks before; the
        per-step ones are built here: q (B, Hq, d) contiguous in a float dtype, lengths from _lengths, max_code_length
        <= capacity, the softmax scale KVCache checked. No mask (masked steps take the validated call)."""
        native = attention._native
        batch, q_heads = int(q.shape[0]), int(q.shape[1])
        max_code_length = options["max_code_length"]
        out = torch.empty(q.shape, dtype=q.dtype, device=self.device)
        workspace_bytes = int(native.workspace_bytes(batch, q_heads, max_code_length))
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=self.device)
        dtype = _ATTENTION_DTYPES[q.dtype]
        capacity = state.capacity
        keys, values = state.keys, state.values
        fp_lengths = options.get("fp_lengths")
        fp_capacity = 0 if fp_lengths is None else int(state.fp_keys.shape[2])
        native.run(batch, q_heads, q.data_ptr(), dtype, out.data_ptr(), dtype, float(options["scale"]),
                   keys["indices"].data_ptr(), keys["norms"].data_ptr(), values["indices"].data_ptr(),
                   values["norms"].data_ptr(), capacity, batch * capacity,  # sequence and head strides in rows
                   0, 0, 0,  # no block table (contiguous layout)
                   code_lengths.data_ptr(), max_code_length, self._pointer(options.get("fp_keys")),
                   self._pointer(options.get("fp_values")), self._pointer(fp_lengths) if fp_capacity else 0,
                   fp_capacity, self._pointer(options["key_scales"]), self._pointer(options["value_means"]),
                   0, 0, 0,  # no masks
                   self._pointer(workspace), workspace_bytes, self._stream())
        return out

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
