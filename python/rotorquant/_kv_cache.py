"""``rotorquant.KVCache``: a compressed key/value cache with attention computed on the codes.

All math is in the C++ core (``_core.KVCache``, cpp/src/kv_cache.cpp) and the CUDA kernels; this module
validates arguments and moves arrays between numpy / torch (float16, bfloat16, float32, float64) and the core's
float32. A cache fed CUDA tensors (with a CUDA build of rotorquant) is device-resident: its state lives in torch
tensors on the GPU (``_kv_cache_device.DeviceKVState``) and never goes through the host; otherwise CUDA tensors
are copied to the host. docs/kv_cache.md describes the storage, the exact re-parameterizations, the seeds and
the device-resident mode.
"""
from __future__ import annotations

import re
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


def _cuda_usable() -> bool:
    return bool(_core.built_with_cuda) and _core.cuda_device_count() > 0


def _parse_device(device: Any):
    """None (decide at the first append), "cpu" (host-resident) or a torch.device("cuda", index)."""
    if device is None:
        return None
    torch = _torch()
    if torch is not None and isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device
    else:
        raise TypeError(f"device: expected None, 'cpu', 'cuda', 'cuda:<index>' or a torch.device, got "
                        f"{type(device).__name__}")
    if name == "cpu":
        return "cpu"
    if not re.fullmatch(r"cuda(:[0-9]+)?", name):
        raise ValueError(f"device: expected None, 'cpu', 'cuda' or 'cuda:<index>', got {name!r}")
    if not _cuda_usable():
        why = "rotorquant was built without CUDA" if not _core.built_with_cuda else "no CUDA device is usable"
        raise ValueError(f"device: expected a usable CUDA device for {name!r}, got none ({why}; "
                         "rotorquant.has_cuda() is False)")
    import torch  # noqa: F811 - a CUDA device needs torch

    resolved = torch.device(name)
    if resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    if resolved.index >= _core.cuda_device_count():
        raise ValueError(f"device: expected a CUDA device index in [0, {_core.cuda_device_count()}), got "
                         f"{resolved.index}")
    return resolved


def _where(x: Any) -> str:
    if _is_torch(x):
        return str(x.device)
    return f"a {type(x).__name__} (host memory)"


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

    Inputs may be numpy arrays or torch tensors of float16, bfloat16, float32 or float64, on the CPU or CUDA;
    ``attend`` returns the queries' framework, dtype and device.

    ``device``: None (default) keeps the cache on the host unless its first append brings CUDA torch tensors and
    ``rotorquant.has_cuda()``: then the cache becomes **device-resident** on that GPU (codes, sink and window
    tokens and statistics in torch tensors there, encoded by the CUDA codec, decode attention by the fused
    kernel; docs/kv_cache.md "Device-resident mode"). ``"cuda"``, ``"cuda:1"`` or a torch.device force it;
    ``"cpu"`` forces the host (CUDA inputs are then copied). Mixing devices afterwards raises ValueError.
    ``device_checks`` (device mode only): True (default) validates like the CPU (non-finite inputs, norms
    overflowing ``norm_dtype``) at the price of one host synchronization per ``append`` and per ``attend``;
    False skips them (bad values then give unspecified codes, as ``Quantizer.encode(check=False)``).
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
        device: Any = None,
        device_checks: bool = True,
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
                           ("norm_correction", norm_correction), ("device_checks", device_checks)):
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
        self._device_request = _parse_device(device)
        self._device_checks = bool(device_checks)
        self._params["device"] = None if self._device_request is None else str(self._device_request)
        self._params["device_checks"] = self._device_checks
        self._state = None  # DeviceKVState once device-resident
        self._state_is_automatic = False  # created by the first CUDA append (device=None): undone by reset()
        if self._device_request is not None and self._device_request != "cpu":
            self._make_device_state(self._device_request)

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
        if self._state is not None:
            return int(self._state.batch)
        return int(self._core.batch_size)

    @property
    def device(self) -> Optional[str]:
        """Where the cache lives: "cuda:<index>" (device-resident), "cpu" (host), or None while undecided
        (``device=None`` and nothing appended yet)."""
        if self._state is not None:
            return str(self._state.device)
        if self._device_request == "cpu" or self._core.batch_size:
            return "cpu"
        return None

    @property
    def device_resident(self) -> bool:
        """True when the cache's state lives in torch tensors on a GPU (docs/kv_cache.md)."""
        return self._state is not None

    def _make_device_state(self, device) -> None:
        from ._kv_cache_device import DeviceKVState  # needs torch

        self._state = DeviceKVState(self._params, self._core, device, self._device_checks)
        self._state_is_automatic = False

    def _use_torch_state_for_tests(self, device="cpu") -> "KVCache":
        """Runs this (empty) cache's device-resident state machine on CPU torch tensors with the CPU codec, so the
        tests can check it against the C++ cache without a GPU. Not for production use."""
        import torch

        self._make_device_state(torch.device(device))
        return self

    def attend_path(self, layer: int = 0, q_len: int = 1) -> str:
        """Which implementation ``attend`` uses for ``layer`` and queries of ``q_len`` positions: "host" (the C++
        core), "fused" (device-resident, the fused decode kernel on the codes) or "dequantized" (device-resident,
        codes decoded on the device, then float32 attention)."""
        layer = self._layer(layer)
        q_len = _check_int("q_len", q_len, 0)
        if self._state is None:
            return "host"
        return self._state.attention_path(layer, q_len)

    def _layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        layer = int(layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an integer in [0, {self.num_layers}), got {layer}")
        return layer

    def seq_length(self, layer: int = 0) -> int:
        """Tokens held for ``layer`` (codes + window)."""
        if self._state is not None:
            return self._state.seq_length(self._layer(layer))
        return int(self._core.seq_length(self._layer(layer)))

    def quantized_length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held as codes."""
        if self._state is not None:
            return self._state.quantized_length(self._layer(layer))
        return int(self._core.quantized_length(self._layer(layer)))

    def window_length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held in full precision (the newest ones)."""
        if self._state is not None:
            return self._state.window_length(self._layer(layer))
        return int(self._core.window_length(self._layer(layer)))

    def sink_length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held in full precision at the start of the sequence (``sink_tokens``)."""
        if self._state is not None:
            return self._state.sink_length(self._layer(layer))
        return int(self._core.sink_length(self._layer(layer)))

    def nbytes(self) -> int:
        """Real bytes held: codes, sink and window tokens (float32) and the per-(layer, head) statistics in use.
        Device-resident: the bytes of the device tensors holding them (codes at their allocated capacity, the
        sink + window buffers at sink_tokens + residual_window slots)."""
        if self._state is not None:
            return self._state.nbytes()
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

    def _statistic(self, which: int, layer: int, kv_head: int) -> Optional[np.ndarray]:
        layer = self._layer(layer)
        kv_head = _check_int("kv_head", kv_head, 0, self.num_kv_heads - 1)
        if self._state is not None:
            values = self._state.statistics(layer)[which]
            return None if values is None else np.array(values[kv_head], dtype=np.float32)
        getter = (self._core.key_mean, self._core.value_mean, self._core.key_scale)[which]
        values = getter(layer, kv_head)
        return np.asarray(values, dtype=np.float32) if values else None

    def codes(self, layer: int, kv_head: int, values: bool = False):
        """The packed codes of (layer, kv_head), keys or ``values``: a :class:`rotorquant.Codes` of batch shape
        (batch, quantized_length(layer)), oldest token first (numpy arrays, or torch tensors on the cache's GPU
        when device-resident). ``Quantizer.decode`` with ``quantizer_params`` decodes them."""
        from ._quantizer import Codes

        layer = self._layer(layer)
        kv_head = _check_int("kv_head", kv_head, 0, self.num_kv_heads - 1)
        params = self.quantizer_params(layer, kv_head, values)
        if self._state is not None:
            arrays = self._state.codes(layer, kv_head, int(bool(values)))
            device = self._state.device
            source = ("torch", _torch().float32, device.type, -1 if device.index is None else int(device.index))
        else:
            arrays = dict(zip(("indices", "norms", "qjl_signs", "residual_norms"),
                              self._core.codes(layer, kv_head, bool(values))))
            source = None
        batch_shape = tuple(int(x) for x in arrays["norms"].shape[:2])
        return Codes(params, arrays, batch_shape, source)

    def key_mean(self, layer: int, kv_head: int) -> Optional[np.ndarray]:
        """The key mean subtracted in (layer, kv_head) (None before the first append or when disabled)."""
        return self._statistic(0, layer, kv_head)

    def value_mean(self, layer: int, kv_head: int) -> Optional[np.ndarray]:
        return self._statistic(1, layer, kv_head)

    def key_scale(self, layer: int, kv_head: int) -> Optional[np.ndarray]:
        return self._statistic(2, layer, kv_head)

    def __repr__(self) -> str:
        p = self._params
        return (f"KVCache(num_layers={p['num_layers']}, num_kv_heads={p['num_kv_heads']}, head_dim={p['head_dim']}, "
                f"key_bits={p['key_bits']}, value_bits={p['value_bits']}, rotation={p['rotation']!r}, "
                f"mode={p['mode']!r}, residual_window={p['residual_window']}, "
                f"protected_layers={p['protected_layers']}, device={self.device!r}, batch_size={self.batch_size}, "
                f"nbytes={self.nbytes()})")

    # -- data ---------------------------------------------------------------------------------
    def _check_4d(self, array: np.ndarray, name: str, what: str, heads: Optional[int]) -> None:
        if array.ndim != 4 or array.shape[3] != self.head_dim or (heads is not None and array.shape[1] != heads):
            expected = f"(batch, {heads if heads is not None else 'q_heads'}, tokens, {self.head_dim})"
            raise ValueError(f"{what}: expected {name} of shape {expected}, got {_describe(array.shape)}")

    def _check_device_tensor(self, x: Any, name: str, what: str) -> None:
        """A device-resident cache takes torch tensors on its device, of a float dtype."""
        torch = _torch()
        if not _is_torch(x) or x.device != self._state.device:
            raise ValueError(f"{what}: expected {name} as a torch tensor on {self._state.device} (the cache is "
                             f"device-resident there), got {_where(x)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise KVCacheDtypeError(f"{what}: expected {name} of dtype float16, bfloat16, float32 or float64, got {x.dtype}")

    def _route_append(self, keys: Any, values: Any, what: str) -> bool:
        """True when the append goes to the device state (creating it on a first CUDA append in auto mode)."""
        if self._state is not None or self._device_request == "cpu":
            return self._state is not None
        on_cuda = [_is_torch(x) and x.is_cuda for x in (keys, values)]
        if not any(on_cuda) or not _cuda_usable():
            return False  # the host path (CUDA tensors through a host copy when rotorquant cannot use the GPU)
        if self._core.batch_size:
            raise ValueError(f"{what}: expected keys and values in host memory (the cache became host-resident with "
                             f"its first append), got keys on {_where(keys)} and values on {_where(values)}")
        if not all(on_cuda) or keys.device != values.device:
            raise ValueError(f"{what}: expected values on the keys' device {_where(keys)}, got {_where(values)}")
        self._make_device_state(keys.device)
        self._state_is_automatic = True
        return True

    def append(self, layer: int, keys: Any, values: Any) -> None:
        """Stores (batch, num_kv_heads, tokens, head_dim) keys and values at the end of ``layer``."""
        what = "KVCache.append"
        layer = self._layer(layer)
        if self._route_append(keys, values, what):
            try:
                for name, x in (("keys", keys), ("values", values)):
                    self._check_device_tensor(x, name, what)
                self._check_4d(keys, "keys", what, self.num_kv_heads)
                self._check_4d(values, "values", what, self.num_kv_heads)
                if tuple(keys.shape) != tuple(values.shape):
                    raise ValueError(f"{what}: expected values of the keys' shape {_describe(keys.shape)}, got "
                                     f"{_describe(values.shape)}")
                self._state.append(layer, keys, values)
            finally:
                if self._state.is_empty() and self._state_is_automatic:
                    self._state = None  # an automatic device choice is undone by a failed (or empty) first append
            return
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
        if self._state is not None:
            return self._attend_on_device(layer, queries, scale, causal, mask, what)
        q, source = _to_host_float32(queries, "queries", what)
        scale = self._check_attend_arguments(q.shape, scale, causal, what)
        mask_array = None
        if mask is not None:
            mask_array = self._mask(mask, q.shape[0], q.shape[2], self.seq_length(layer), what)
        out = self._core.attend(layer, q, float(scale), bool(causal), mask_array)
        return _from_host(out, source)

    def _check_attend_arguments(self, shape, scale: Any, causal: Any, what: str) -> float:
        if len(shape) != 4 or shape[3] != self.head_dim:
            raise ValueError(f"{what}: expected queries of shape (batch, q_heads, tokens, {self.head_dim}), got "
                             f"{_describe(shape)}")
        if shape[1] % self.num_kv_heads != 0:
            raise ValueError(f"{what}: expected q_heads a multiple of num_kv_heads = {self.num_kv_heads}, "
                             f"got q_heads = {shape[1]}")
        if self.batch_size and shape[0] != self.batch_size:
            raise ValueError(f"{what}: expected queries of batch size {self.batch_size} (the cache's), got {shape[0]}")
        if scale is None:
            scale = 0.0
        elif not isinstance(scale, (int, float, np.integer, np.floating)) or isinstance(scale, bool) or not (
                np.isfinite(scale) and scale > 0):
            raise ValueError(f"{what}: expected scale a finite float > 0 (or None), got {scale!r}")
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"{what}: expected causal a bool, got {type(causal).__name__}")
        return float(scale)

    def _attend_on_device(self, layer: int, queries: Any, scale: Any, causal: Any, mask: Any, what: str):
        torch = _torch()
        self._check_device_tensor(queries, "queries", what)
        shape = tuple(int(s) for s in queries.shape)
        scale = self._check_attend_arguments(shape, scale, causal, what)
        mask_tensor = None
        if mask is not None:
            seq = self.seq_length(layer)
            if _is_torch(mask):
                mask_tensor = mask.detach()
                if mask_tensor.ndim == 4:
                    if mask_tensor.shape[1] != 1:
                        raise ValueError(f"{what}: expected a mask shared by all heads (batch, 1, q_len, seq), got "
                                         f"{_describe(mask_tensor.shape)}")
                    mask_tensor = mask_tensor[:, 0]
                if tuple(mask_tensor.shape) != (shape[0], shape[2], seq):
                    raise ValueError(f"{what}: expected mask of shape ({shape[0]}, {shape[2]}, {seq}) or "
                                     f"({shape[0]}, 1, {shape[2]}, {seq}), got {_describe(mask.shape)}")
                if mask_tensor.dtype != torch.bool:
                    raise KVCacheDtypeError(f"{what}: expected a boolean mask (True = may attend), got dtype "
                                            f"{mask_tensor.dtype}")
                mask_tensor = mask_tensor.to(self._state.device)
            else:
                mask_tensor = torch.from_numpy(self._mask(mask, shape[0], shape[2], seq, what).astype(bool))
                mask_tensor = mask_tensor.to(self._state.device)
        return self._state.attend(layer, queries, scale, bool(causal), mask_tensor)

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
        float32 each: the documented slow path (and the reference the tests compare attend with). numpy arrays,
        or torch tensors on the cache's GPU when it is device-resident."""
        if self._state is not None:
            return self._state.dequantize(self._layer(layer))
        keys, values = self._core.dequantize(self._layer(layer))
        return keys, values

    def reorder(self, beam_indices: Any) -> None:
        """New batch row i = old row beam_indices[i] (beam search; repeats allowed, any length >= 1)."""
        if self._state is not None:
            from ._kv_cache_device import check_indices

            self._state.reorder(check_indices(beam_indices, self._state.batch, self._state.device))
            return
        if _is_torch(beam_indices):
            beam_indices = beam_indices.detach().to("cpu").numpy()
        indices = np.asarray(beam_indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError(f"KVCache.reorder: expected a 1-D sequence of integers, got shape "
                             f"{_describe(indices.shape)} dtype {indices.dtype}")
        self._core.reorder(np.ascontiguousarray(indices, dtype=np.int64))

    def crop(self, length: int) -> None:
        """Keeps the first ``length`` tokens of every layer (codes already made stay codes)."""
        length = _check_int("length", length, 0)
        if self._state is not None:
            self._state.crop(length)
            return
        self._core.crop(length)

    def reset(self) -> None:
        """Drops every token, the statistics fixed from the first chunk and the batch size. A device chosen
        automatically by the first append (``device=None``) is forgotten too; a forced one stays."""
        self._core.reset()
        if self._state is not None:
            self._state.reset()
            if self._state_is_automatic:
                self._state = None
