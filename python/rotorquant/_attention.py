"""``rotorquant.DecodeAttention``: fused CUDA decode attention on packed K/V codes (docs/attention.md).

The math is in the CUDA kernels (cuda/src/attention_kernels.cuh) behind ``_core.CudaDecodeAttention``; this module
checks torch CUDA tensors (shape, dtype, device, strides, alignment) and passes raw pointers, the current torch
stream and a workspace from torch's caching allocator, so a call never synchronizes with the host and can be
captured in a CUDA graph.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from . import _core
from ._quantizer import Quantizer

__all__ = ["DecodeAttention"]

_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _torch():
    torch = sys.modules.get("torch")
    if torch is None:
        import torch  # noqa: F811  (DecodeAttention needs torch CUDA tensors)
    return torch


def _shape(t) -> str:
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


class DecodeAttention:
    """Decode attention (one query position per sequence) computed on packed codes with fused CUDA kernels.

    ``DecodeAttention(key_quantizers, value_quantizers, device=None)``: one :class:`rotorquant.Quantizer` per KV head
    for keys and one for values (same parameters except the seed, as :class:`rotorquant.KVCache` builds them).
    Calling it with torch CUDA tensors returns the attention output ``(batch, q_heads, head_dim)``; see
    :meth:`__call__` and docs/attention.md for the code layouts (contiguous or paged).
    """

    def __init__(self, key_quantizers: Sequence[Quantizer], value_quantizers: Sequence[Quantizer], device: Any = None):
        key_quantizers, value_quantizers = list(key_quantizers), list(value_quantizers)
        for name, items in (("key_quantizers", key_quantizers), ("value_quantizers", value_quantizers)):
            for q in items:
                if not isinstance(q, Quantizer):
                    raise TypeError(f"DecodeAttention: expected {name} as rotorquant.Quantizer objects, got "
                                    f"{type(q).__name__}")
        if not key_quantizers or len(key_quantizers) != len(value_quantizers):
            raise ValueError(f"DecodeAttention: expected one key and one value quantizer per KV head, got "
                             f"{len(key_quantizers)} key and {len(value_quantizers)} value quantizers")
        reason = self.unsupported_reason(key_quantizers[0].params, value_quantizers[0].params)
        if reason is not None:
            raise ValueError(f"DecodeAttention: unsupported quantizers: {reason}")
        torch = _torch()
        if device is None:
            index = torch.cuda.current_device() if torch.cuda.is_available() else -1
        else:
            device = torch.device(device)
            if device.type != "cuda":
                raise ValueError(f"DecodeAttention: expected a CUDA device, got {device}")
            index = device.index if device.index is not None else torch.cuda.current_device()
        self._key_quantizers = key_quantizers
        self._value_quantizers = value_quantizers
        self._native = _core.CudaDecodeAttention([q._native for q in key_quantizers],
                                                 [q._native for q in value_quantizers], index)
        self.device = torch.device("cuda", self._native.device)
        self.num_kv_heads = len(key_quantizers)
        self.head_dim = key_quantizers[0].dim
        self.key_index_bytes = key_quantizers[0]._native.index_bytes
        self.value_index_bytes = value_quantizers[0]._native.index_bytes
        self.norm_bytes = key_quantizers[0]._native.norm_bytes

    @staticmethod
    def unsupported_reason(key_params: Dict[str, Any], value_params: Dict[str, Any]) -> Optional[str]:
        """None when the fused kernels support this pair of quantizer parameter dicts, else why not."""
        if value_params.get("dim") != key_params.get("dim"):
            return "keys and values have different dims"
        for field in ("rotation", "mode", "norm_dtype"):
            if value_params.get(field) != key_params.get(field):
                return f"keys and values differ in {field}"
        reason = _core.decode_attention_unsupported_reason(int(key_params["dim"]), int(key_params["bits"]),
                                                           int(value_params["bits"]), key_params["rotation"],
                                                           key_params["mode"], key_params["norm_dtype"])
        return reason or None

    def num_splits(self, batch: int, q_heads: int, max_code_length: int) -> int:
        """How many sequence splits the kernels use for these sizes."""
        return int(self._native.num_splits(batch, q_heads, max_code_length))

    # -- argument checks ------------------------------------------------------------------------
    def _tensor(self, t, name: str, dtypes, ndim: int, what: str):
        torch = _torch()
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: expected {name} as a torch CUDA tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{what}: expected {name} on {self.device}, got {t.device}")
        if t.dtype not in dtypes:
            raise TypeError(f"{what}: expected {name} of dtype {' or '.join(str(d).replace('torch.', '') for d in dtypes)},"
                            f" got {str(t.dtype).replace('torch.', '')}")
        if t.dim() != ndim:
            raise ValueError(f"{what}: expected {name} with {ndim} dimensions, got shape {_shape(t)}")
        return t

    def _codes(self, indices, norms, side: str, index_bytes: int, paged: bool, batch: int, what: str):
        """Checks one side's code tensors; returns (row strides of dims 0 and 1, capacity or block count)."""
        torch = _torch()
        self._tensor(indices, f"{side}_indices", (torch.uint8,), 4, what)
        self._tensor(norms, f"{side}_norms", (torch.uint8,), 4, what)
        heads = self.num_kv_heads
        if indices.shape[1] != heads or indices.shape[3] != index_bytes or (not paged and indices.shape[0] != batch):
            first = "num_blocks" if paged else str(batch)
            raise ValueError(f"{what}: expected {side}_indices of shape ({first}, {heads}, "
                             f"{'block_size' if paged else 'capacity'}, {index_bytes}), got {_shape(indices)}")
        if tuple(norms.shape) != tuple(indices.shape[:3]) + (self.norm_bytes,):
            expected = "(" + ", ".join(str(int(s)) for s in indices.shape[:3]) + f", {self.norm_bytes})"
            raise ValueError(f"{what}: expected {side}_norms of shape {expected}, got {_shape(norms)}")
        if paged:
            if not (indices.is_contiguous() and norms.is_contiguous()):
                raise ValueError(f"{what}: expected contiguous {side}_indices / {side}_norms in the paged layout")
            return None
        if indices.stride(3) != 1 or indices.stride(2) != index_bytes or norms.stride(3) != 1 or \
                norms.stride(2) != self.norm_bytes:
            raise ValueError(f"{what}: expected {side}_indices / {side}_norms dense in their last two dimensions "
                             f"(strides (..., {index_bytes}, 1) / (..., {self.norm_bytes}, 1)), got strides "
                             f"{tuple(indices.stride())} / {tuple(norms.stride())}")
        strides = []
        for dim in (0, 1):
            si, sn = indices.stride(dim), norms.stride(dim)
            if si % index_bytes or sn % self.norm_bytes or si // index_bytes != sn // self.norm_bytes:
                raise ValueError(f"{what}: expected {side}_indices and {side}_norms with the same row strides, got "
                                 f"strides {tuple(indices.stride())} and {tuple(norms.stride())}")
            strides.append(si // index_bytes)
        return tuple(strides)

    def __call__(self, queries, key_indices, key_norms, value_indices, value_norms, code_lengths, *,
                 max_code_length: Optional[int] = None, block_table=None, fp_keys=None, fp_values=None,
                 fp_lengths=None, key_scales=None, value_means=None, scale: Optional[float] = None,
                 out_dtype=None, code_mask=None, fp_mask=None):
        """Softmax attention of one query position per sequence over its codes and full-precision tokens.

        - ``queries``: (batch, q_heads, head_dim) float16 / bfloat16 / float32; q_heads a multiple of num_kv_heads
          (query head i uses KV head i // (q_heads // num_kv_heads)). float16 / bfloat16 queries run the code tokens
          on tensor cores (fp16 operands with hi/lo-split queries and key centroids: within 1e-3 of the largest
          output), float32 queries on float32 CUDA cores (within 1e-4); docs/attention.md §2.
        - contiguous layout (``block_table`` None): ``key_indices`` uint8 (batch, num_kv_heads, capacity,
          index_bytes), ``key_norms`` uint8 (batch, num_kv_heads, capacity, norm_bytes), dense in the last two
          dimensions, any strides in the first two (equal for indices and norms, counted in rows). Same for values.
        - paged layout: ``key_indices`` (num_blocks, num_kv_heads, block_size, index_bytes) contiguous, norms
          alike, ``block_table`` (batch, max_blocks) int32: code token t of sequence b is in block
          block_table[b, t // block_size] at slot t % block_size (block_size a power of two).
        - ``code_lengths``: (batch,) int32, codes per sequence; ``max_code_length``: a host bound on them
          (default: capacity, or max_blocks * block_size); codes beyond it are not read.
        - ``fp_keys`` / ``fp_values``: (batch, num_kv_heads, fp_capacity, head_dim) float32 contiguous tokens in
          full precision (original domain, centered as KVCache stores sinks and window), ``fp_lengths`` (batch,)
          int32: slots used.
        - ``key_scales`` / ``value_means``: (num_kv_heads, head_dim) float32: keys were divided by s before
          quantizing (code scores use q * s); value means are added to the output.
        - ``code_mask`` (batch, >= max_code_length) / ``fp_mask`` (batch, fp_capacity) bool: False = masked out.
        - ``scale``: softmax scale (default 1/sqrt(head_dim)). A row that sees no token gets zeros.

        Returns (batch, q_heads, head_dim) in ``out_dtype`` (default: the queries' dtype), on the current stream.
        """
        torch = _torch()
        what = "DecodeAttention"
        floats = (torch.float16, torch.bfloat16, torch.float32)
        self._tensor(queries, "queries", floats, 3, what)
        batch, q_heads, d = (int(s) for s in queries.shape)
        if d != self.head_dim:
            raise ValueError(f"{what}: expected queries of shape (batch, q_heads, {self.head_dim}), got {_shape(queries)}")
        if q_heads % self.num_kv_heads:
            raise ValueError(f"{what}: expected q_heads a multiple of num_kv_heads = {self.num_kv_heads}, got {q_heads}")
        queries = queries.contiguous()
        out_dtype = queries.dtype if out_dtype is None else out_dtype
        if out_dtype not in floats:
            raise TypeError(f"{what}: expected out_dtype float16, bfloat16 or float32, got {out_dtype}")
        paged = block_table is not None
        key_strides = self._codes(key_indices, key_norms, "key", self.key_index_bytes, paged, batch, what)
        value_strides = self._codes(value_indices, value_norms, "value", self.value_index_bytes, paged, batch, what)
        if paged:
            self._tensor(block_table, "block_table", (torch.int32,), 2, what)
            if block_table.shape[0] != batch or not block_table.is_contiguous():
                raise ValueError(f"{what}: expected a contiguous block_table of shape ({batch}, max_blocks), got "
                                 f"{_shape(block_table)}")
            if tuple(key_indices.shape[:3]) != tuple(value_indices.shape[:3]):
                raise ValueError(f"{what}: expected key and value blocks of the same shape, got {_shape(key_indices)} "
                                 f"and {_shape(value_indices)}")
            block_size = int(key_indices.shape[2])
            if block_size & (block_size - 1):
                raise ValueError(f"{what}: expected block_size (dimension 2 of the code blocks) a power of two, got "
                                 f"{block_size}")
            capacity = int(block_table.shape[1]) * block_size
            batch_stride = head_stride = 0
        else:
            if key_strides != value_strides or key_indices.shape[2] != value_indices.shape[2]:
                raise ValueError(f"{what}: expected key and value codes with the same capacity and row strides, got "
                                 f"{_shape(key_indices)} strides {key_strides} and {_shape(value_indices)} strides "
                                 f"{value_strides}")
            capacity = int(key_indices.shape[2])
            batch_stride, head_stride = key_strides
            block_size = 0
        self._tensor(code_lengths, "code_lengths", (torch.int32,), 1, what)
        if code_lengths.shape[0] != batch or not code_lengths.is_contiguous():
            raise ValueError(f"{what}: expected contiguous code_lengths of shape ({batch},), got {_shape(code_lengths)}")
        if max_code_length is None:
            max_code_length = capacity
        if isinstance(max_code_length, bool) or not isinstance(max_code_length, int) or not 0 <= max_code_length <= capacity:
            raise ValueError(f"{what}: expected max_code_length an int in [0, {capacity}], got {max_code_length!r}")
        fp_capacity = 0
        if fp_keys is not None or fp_values is not None or fp_lengths is not None:
            if fp_keys is None or fp_values is None or fp_lengths is None:
                raise ValueError(f"{what}: expected fp_keys, fp_values and fp_lengths together")
            self._tensor(fp_keys, "fp_keys", (torch.float32,), 4, what)
            self._tensor(fp_values, "fp_values", (torch.float32,), 4, what)
            self._tensor(fp_lengths, "fp_lengths", (torch.int32,), 1, what)
            fp_capacity = int(fp_keys.shape[2])
            expected = (batch, self.num_kv_heads, fp_capacity, d)
            for name, t in (("fp_keys", fp_keys), ("fp_values", fp_values)):
                if tuple(t.shape) != expected or not t.is_contiguous():
                    raise ValueError(f"{what}: expected contiguous {name} of shape {expected}, got {_shape(t)}")
            if fp_lengths.shape[0] != batch or not fp_lengths.is_contiguous():
                raise ValueError(f"{what}: expected contiguous fp_lengths of shape ({batch},), got {_shape(fp_lengths)}")
        for name, t in (("key_scales", key_scales), ("value_means", value_means)):
            if t is not None:
                self._tensor(t, name, (torch.float32,), 2, what)
                if tuple(t.shape) != (self.num_kv_heads, d) or not t.is_contiguous():
                    raise ValueError(f"{what}: expected contiguous {name} of shape ({self.num_kv_heads}, {d}), got "
                                     f"{_shape(t)}")
        mask_stride = 0
        if code_mask is not None:
            self._tensor(code_mask, "code_mask", (torch.bool,), 2, what)
            if code_mask.shape[0] != batch or code_mask.shape[1] < max_code_length or code_mask.stride(1) != 1:
                raise ValueError(f"{what}: expected code_mask of shape ({batch}, >= {max_code_length}) with unit "
                                 f"stride in dimension 1, got {_shape(code_mask)}")
            mask_stride = int(code_mask.stride(0))
        if fp_mask is not None:
            if fp_capacity == 0:
                raise ValueError(f"{what}: fp_mask given without full-precision tokens")
            self._tensor(fp_mask, "fp_mask", (torch.bool,), 2, what)
            if tuple(fp_mask.shape) != (batch, fp_capacity) or not fp_mask.is_contiguous():
                raise ValueError(f"{what}: expected contiguous fp_mask of shape ({batch}, {fp_capacity}), got "
                                 f"{_shape(fp_mask)}")
        if scale is None:
            scale = 0.0
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < float(scale) < float("inf")):
            raise ValueError(f"{what}: expected scale a finite float > 0 (or None), got {scale!r}")

        out = torch.empty((batch, q_heads, d), dtype=out_dtype, device=self.device)
        if batch == 0:
            return out
        workspace_bytes = int(self._native.workspace_bytes(batch, q_heads, max_code_length))
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=self.device)

        def ptr(t):
            return int(t.data_ptr()) if t is not None and t.numel() else 0

        def name(dtype):
            return _DTYPE_CODES[str(dtype).replace("torch.", "")]

        stream = int(torch.cuda.current_stream(self.device).cuda_stream)
        self._native.run(batch, q_heads, ptr(queries), name(queries.dtype), ptr(out), name(out_dtype), float(scale),
                         ptr(key_indices), ptr(key_norms), ptr(value_indices), ptr(value_norms), batch_stride,
                         head_stride, ptr(block_table), int(block_table.shape[1]) if paged else 0, block_size,
                         ptr(code_lengths) if max_code_length > 0 else 0, max_code_length, ptr(fp_keys),
                         ptr(fp_values), ptr(fp_lengths) if fp_capacity > 0 else 0, fp_capacity, ptr(key_scales),
                         ptr(value_means), ptr(code_mask), mask_stride, ptr(fp_mask), ptr(workspace),
                         workspace_bytes, stream)
        return out
