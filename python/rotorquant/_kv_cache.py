"""``rotorquant.KVCache``: a compressed key/value cache with attention computed on the codes.

All math is in the C++ core (``_core.KVCache``, cpp/src/kv_cache.cpp); this module validates arguments
and moves arrays between numpy / torch (float16, bfloat16, float32, float64) and the core's float32.
CUDA tensors are copied to the host and results copied back (a later release adds CUDA kernels).
docs/kv_cache.md describes the storage, the exact re-parameterizations and the seeds.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._rotation import _check_int, rotation_kinds

__all__ = ["KVCache", "KVCacheDtypeError"]

_MODES = ("mse", "prod")
_NORM_DTYPES = ("float16", "float32")


class KVCacheDtypeError(TypeError, ValueError):
    """An input of an unsupported dtype: both a TypeError (house style) and a ValueError (issue contract)."""


def _torch():
    return sys.modules.get("torch")


def _is_torch(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _describe(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _to_host_float32(x: Any, name: str, what: str) -> Tuple[np.ndarray, Tuple[str, Any, Any]]:
    """x (numpy or torch, CPU or CUDA, float16/bfloat16/float32/float64) -> (C-contiguous float32 numpy, source)."""
    if _is_torch(x):
        torch = _torch()
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise KVCacheDtypeError(f"{what}: expected {name} of dtype float16, bfloat16, float32 or float64, got {x.dtype}")
        host = x.detach()
        if host.device.type != "cpu":
            host = host.to("cpu")
        host = host.to(torch.float32).contiguous()
        return host.numpy(), ("torch", x.dtype, x.device)
    if isinstance(x, np.ndarray):
        if not (x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8)) and x.dtype.name != "bfloat16":
            raise KVCacheDtypeError(f"{what}: expected {name} of dtype float16, bfloat16, float32 or float64, got {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32), ("numpy", x.dtype, None)
    raise KVCacheDtypeError(f"{what}: expected {name} as a numpy array or torch tensor, got {type(x).__name__}")


def _from_host(result: np.ndarray, source: Tuple[str, Any, Any]):
    framework, dtype, device = source
    if framework == "torch":
        torch = _torch()
        tensor = torch.from_numpy(result)
        if device is not None and device.type != "cpu":
            tensor = tensor.to(device)
        return tensor if tensor.dtype == dtype else tensor.to(dtype)
    if result.dtype != dtype and dtype.name != "bfloat16":
        return result.astype(dtype)
    return result


class KVCache:
    """A compressed KV cache for ``num_layers`` attention layers of ``num_kv_heads`` heads of ``head_dim``.

    ``append(layer, keys, values)`` stores (batch, num_kv_heads, tokens, head_dim) keys and values: the newest
    ``residual_window`` tokens stay in full precision (float32), older ones are quantized as they leave the
    window (``key_bits`` / ``value_bits`` per coordinate, ``rotation``, ``mode``); the first ``sink_tokens``
    tokens of the sequence also stay in full precision (attention sinks); layers listed in
    ``protected_layers`` at ``protected_bits``. ``attend(layer, queries)`` computes softmax attention of
    (batch, q_heads, q_len, head_dim) queries on the codes (q_heads a multiple of num_kv_heads: GQA/MQA),
    causal for q_len > 1, without rebuilding the full-precision history.

    Exact re-parameterizations, fixed from the first chunk appended to each layer:
    ``center_keys`` subtracts a per-(layer, head) key mean (free: softmax is shift-invariant);
    ``center_values`` subtracts a value mean and adds it back once to the output;
    ``key_channel_scaling`` = a in [0, 1] divides keys by s_j = (rms_j / mean rms)^a per channel before
    rotating and multiplies queries by s (q.k = (q*s).(k/s)); 0 (or False) disables it, True means 1.

    Inputs may be numpy arrays or torch tensors of float16, bfloat16, float32 or float64, on the CPU or (through
    a host copy) CUDA; ``attend`` returns the queries' framework, dtype and device.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        key_bits: int = 4,
        value_bits: int = 3,
        rotation: str = "hadamard",
        mode: str = "mse",
        residual_window: int = 128,
        sink_tokens: int = 4,
        protected_layers: Sequence[int] = (),
        protected_bits: int = 8,
        seed: int = 0,
        center_keys: bool = True,
        center_values: bool = False,
        key_channel_scaling: float = 0.0,
        norm_dtype: str = "float16",
        norm_correction: bool = False,
    ):
        num_layers = _check_int("num_layers", num_layers, 1)
        num_kv_heads = _check_int("num_kv_heads", num_kv_heads, 1)
        head_dim = _check_int("head_dim", head_dim, 2, 4096)
        key_bits = _check_int("key_bits", key_bits, 1, 8)
        value_bits = _check_int("value_bits", value_bits, 1, 8)
        protected_bits = _check_int("protected_bits", protected_bits, 1, 8)
        residual_window = _check_int("residual_window", residual_window, 0)
        sink_tokens = _check_int("sink_tokens", sink_tokens, 0)
        for name, value, choices in (("rotation", rotation, rotation_kinds()), ("mode", mode, _MODES),
                                     ("norm_dtype", norm_dtype, _NORM_DTYPES)):
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a str (one of {', '.join(choices)}), got {type(value).__name__}")
            if value not in choices:
                raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
        if isinstance(protected_layers, (str, bytes)) or not hasattr(protected_layers, "__iter__"):
            raise TypeError(f"protected_layers: expected a sequence of ints, got {type(protected_layers).__name__}")
        layers = []
        for entry in protected_layers:
            layer = _check_int("protected_layers entry", entry, -num_layers, num_layers - 1)
            layers.append(layer + num_layers if layer < 0 else layer)
        for name, flag in (("center_keys", center_keys), ("center_values", center_values),
                           ("norm_correction", norm_correction)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        if isinstance(key_channel_scaling, (bool, np.bool_)):
            key_channel_scaling = 1.0 if key_channel_scaling else 0.0
        if not isinstance(key_channel_scaling, (int, float, np.integer, np.floating)):
            raise TypeError(f"key_channel_scaling: expected a float in [0, 1] or a bool, got {type(key_channel_scaling).__name__}")
        key_channel_scaling = float(key_channel_scaling)
        if not 0.0 <= key_channel_scaling <= 1.0:
            raise ValueError(f"key_channel_scaling: expected an exponent in [0, 1] (0 = off), got {key_channel_scaling}")
        self._params: Dict[str, Any] = dict(
            num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, key_bits=key_bits,
            value_bits=value_bits, rotation=rotation, mode=mode, residual_window=residual_window,
            sink_tokens=sink_tokens, protected_layers=tuple(sorted(set(layers))), protected_bits=protected_bits, seed=int(seed),
            center_keys=bool(center_keys), center_values=bool(center_values),
            key_channel_scaling=key_channel_scaling, norm_dtype=norm_dtype, norm_correction=bool(norm_correction),
        )
        self._core = _core.KVCache(
            num_layers, num_kv_heads, head_dim, key_bits, value_bits, rotation, mode, residual_window, sink_tokens,
            list(self._params["protected_layers"]), protected_bits, seed, bool(center_keys), bool(center_values),
            key_channel_scaling, norm_dtype, bool(norm_correction))

    # -- description ------------------------------------------------------------------------
    @property
    def params(self) -> Dict[str, Any]:
        """The constructor arguments (protected layers normalized to sorted non-negative indices)."""
        return dict(self._params)

    @property
    def num_layers(self) -> int:
        return self._params["num_layers"]

    @property
    def num_kv_heads(self) -> int:
        return self._params["num_kv_heads"]

    @property
    def head_dim(self) -> int:
        return self._params["head_dim"]

    @property
    def batch_size(self) -> int:
        """Batch size fixed by the first append (0 while empty)."""
        return int(self._core.batch_size)

    def _layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        layer = int(layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an integer in [0, {self.num_layers}), got {layer}")
        return layer

    def seq_length(self, layer: int = 0) -> int:
        """Tokens held for ``layer`` (codes + window)."""
        return int(self._core.seq_length(self._layer(layer)))

    def quantized_length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held as codes."""
        return int(self._core.quantized_length(self._layer(layer)))

    def window_length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held in full precision (the newest ones)."""
        return int(self._core.window_length(self._layer(layer)))

    def sink_length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held in full precision at the start of the sequence (``sink_tokens``)."""
        return int(self._core.sink_length(self._layer(layer)))

    def nbytes(self) -> int:
        """Real bytes held: codes, sink and window tokens (float32) and the per-(layer, head) statistics in use."""
        return int(self._core.nbytes())

    def code_bytes_per_token(self, layer: int = 0) -> int:
        """Bytes of one token of one KV head outside the window (key codes + value codes)."""
        return int(self._core.code_bytes_per_token(self._layer(layer)))

    def is_protected(self, layer: int) -> bool:
        return bool(self._core.is_protected(self._layer(layer)))

    def quantizer_params(self, layer: int, kv_head: int, values: bool = False) -> Dict[str, Any]:
        """Parameters of the key (or value) quantizer of (layer, kv_head), incl. its derived seed."""
        return dict(self._core.quantizer_params(self._layer(layer), _check_int("kv_head", kv_head, 0, self.num_kv_heads - 1),
                                                bool(values)))

    def key_mean(self, layer: int, kv_head: int) -> Optional[np.ndarray]:
        """The key mean subtracted in (layer, kv_head) (None before the first append or when disabled)."""
        values = self._core.key_mean(self._layer(layer), _check_int("kv_head", kv_head, 0, self.num_kv_heads - 1))
        return np.asarray(values, dtype=np.float32) if values else None

    def value_mean(self, layer: int, kv_head: int) -> Optional[np.ndarray]:
        values = self._core.value_mean(self._layer(layer), _check_int("kv_head", kv_head, 0, self.num_kv_heads - 1))
        return np.asarray(values, dtype=np.float32) if values else None

    def key_scale(self, layer: int, kv_head: int) -> Optional[np.ndarray]:
        values = self._core.key_scale(self._layer(layer), _check_int("kv_head", kv_head, 0, self.num_kv_heads - 1))
        return np.asarray(values, dtype=np.float32) if values else None

    def __repr__(self) -> str:
        p = self._params
        return (f"KVCache(num_layers={p['num_layers']}, num_kv_heads={p['num_kv_heads']}, head_dim={p['head_dim']}, "
                f"key_bits={p['key_bits']}, value_bits={p['value_bits']}, rotation={p['rotation']!r}, "
                f"mode={p['mode']!r}, residual_window={p['residual_window']}, "
                f"protected_layers={p['protected_layers']}, batch_size={self.batch_size}, nbytes={self.nbytes()})")

    # -- data ---------------------------------------------------------------------------------
    def _check_4d(self, array: np.ndarray, name: str, what: str, heads: Optional[int]) -> None:
        if array.ndim != 4 or array.shape[3] != self.head_dim or (heads is not None and array.shape[1] != heads):
            expected = f"(batch, {heads if heads is not None else 'q_heads'}, tokens, {self.head_dim})"
            raise ValueError(f"{what}: expected {name} of shape {expected}, got {_describe(array.shape)}")

    def append(self, layer: int, keys: Any, values: Any) -> None:
        """Stores (batch, num_kv_heads, tokens, head_dim) keys and values at the end of ``layer``."""
        what = "KVCache.append"
        layer = self._layer(layer)
        k, _ = _to_host_float32(keys, "keys", what)
        v, _ = _to_host_float32(values, "values", what)
        self._check_4d(k, "keys", what, self.num_kv_heads)
        self._check_4d(v, "values", what, self.num_kv_heads)
        if k.shape != v.shape:
            raise ValueError(f"{what}: expected values of the keys' shape {_describe(k.shape)}, got {_describe(v.shape)}")
        self._core.append(layer, k, v)

    def attend(self, layer: int, queries: Any, scale: Optional[float] = None, causal: bool = True,
               mask: Any = None):
        """Softmax attention of (batch, q_heads, q_len, head_dim) queries over ``layer``, computed on the codes.

        Query head i uses KV head i // (q_heads // num_kv_heads). ``scale`` defaults to 1/sqrt(head_dim).
        With ``causal``, query i of the chunk sits at position seq_length - q_len + i and sees positions <= its
        own. ``mask`` (optional): booleans (True = may attend) of shape (batch, q_len, seq_length) or
        (batch, 1, q_len, seq_length), combined with the causal rule. Rows that see nothing get zeros.
        Returns the queries' framework, dtype and device.
        """
        what = "KVCache.attend"
        layer = self._layer(layer)
        q, source = _to_host_float32(queries, "queries", what)
        self._check_4d(q, "queries", what, None)
        if q.shape[1] % self.num_kv_heads != 0:
            raise ValueError(f"{what}: expected q_heads a multiple of num_kv_heads = {self.num_kv_heads}, "
                             f"got q_heads = {q.shape[1]}")
        if self.batch_size and q.shape[0] != self.batch_size:
            raise ValueError(f"{what}: expected queries of batch size {self.batch_size} (the cache's), got {q.shape[0]}")
        if scale is None:
            scale = 0.0
        elif not isinstance(scale, (int, float, np.integer, np.floating)) or isinstance(scale, bool) or not (
                np.isfinite(scale) and scale > 0):
            raise ValueError(f"{what}: expected scale a finite float > 0 (or None), got {scale!r}")
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"{what}: expected causal a bool, got {type(causal).__name__}")
        mask_array = None
        if mask is not None:
            mask_array = self._mask(mask, q.shape[0], q.shape[2], self.seq_length(layer), what)
        out = self._core.attend(layer, q, float(scale), bool(causal), mask_array)
        return _from_host(out, source)

    @staticmethod
    def _mask(mask: Any, batch: int, q_len: int, seq: int, what: str) -> np.ndarray:
        if _is_torch(mask):
            mask = mask.detach().to("cpu").numpy()
        mask = np.asarray(mask)
        if mask.ndim == 4:
            if mask.shape[1] != 1:
                raise ValueError(f"{what}: expected a mask shared by all heads (batch, 1, q_len, seq), got "
                                 f"{_describe(mask.shape)}")
            mask = mask[:, 0]
        if mask.shape != (batch, q_len, seq):
            raise ValueError(f"{what}: expected mask of shape ({batch}, {q_len}, {seq}) or ({batch}, 1, {q_len}, {seq}),"
                             f" got {_describe(mask.shape)}")
        if mask.dtype != np.bool_:
            raise KVCacheDtypeError(f"{what}: expected a boolean mask (True = may attend), got dtype {mask.dtype}")
        return np.ascontiguousarray(mask, dtype=np.uint8)

    def dequantize(self, layer: int) -> Tuple[np.ndarray, np.ndarray]:
        """Keys and values of ``layer`` as the cache represents them, (batch, num_kv_heads, seq_length, head_dim)
        float32 each: the documented slow path (and the reference the tests compare attend with)."""
        keys, values = self._core.dequantize(self._layer(layer))
        return keys, values

    def reorder(self, beam_indices: Any) -> None:
        """New batch row i = old row beam_indices[i] (beam search; repeats allowed, any length >= 1)."""
        if _is_torch(beam_indices):
            beam_indices = beam_indices.detach().to("cpu").numpy()
        indices = np.asarray(beam_indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError(f"KVCache.reorder: expected a 1-D sequence of integers, got shape "
                             f"{_describe(indices.shape)} dtype {indices.dtype}")
        self._core.reorder(np.ascontiguousarray(indices, dtype=np.int64))

    def crop(self, length: int) -> None:
        """Keeps the first ``length`` tokens of every layer (codes already made stay codes)."""
        self._core.crop(_check_int("length", length, 0))

    def reset(self) -> None:
        """Drops every token, the statistics fixed from the first chunk and the batch size."""
        self._core.reset()
