"""``rotorquant.Quantizer``, ``Codes`` and the presets ``TurboQuant`` / ``RotorQuant``.

All quantization math is in the C++ core (``_core.Quantizer``); this module validates
arguments, moves arrays between frameworks and keeps the packed arrays of a batch of codes.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from . import _core, _interop
from ._rotation import _check_int, rotation_kinds

MODES = ("mse", "prod")
CODEBOOKS = ("sphere", "gaussian")
NORM_DTYPES = ("float16", "float32")
_FIELDS = ("indices", "norms", "qjl_signs", "residual_norms")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str (one of {', '.join(choices)}), got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _is_torch(a: Any) -> bool:
    return _interop.is_torch_tensor(a)


def _nbytes(a: Any) -> int:
    if _is_torch(a):
        return int(a.numel() * a.element_size())
    return int(a.nbytes)


def _contiguous(a: Any):
    """A C-contiguous version of a code array (numpy, torch or CuPy)."""
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a)
    if _is_torch(a):
        return a.contiguous()
    return _interop._cupy().ascontiguousarray(a)


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if _is_torch(a):
        return a.cpu().numpy()
    return a.get()


def _array_device(a: Any) -> Tuple[str, int]:
    """("cpu", -1) or ("cuda", index) of a code array."""
    if isinstance(a, np.ndarray):
        return "cpu", -1
    if _is_torch(a):
        return ("cuda", int(a.device.index)) if a.is_cuda else ("cpu", -1)
    return "cuda", int(a.device.id)


def _params_key(params: Dict[str, Any]) -> Tuple:
    return tuple(params[k] for k in ("dim", "bits", "rotation", "mode", "seed", "codebook", "norm_dtype",
                                     "norm_correction", "qjl_dim"))


# Rotation kinds with a fused CUDA encode/decode/scores kernel (cuda/src/codec.cu); others run on the host.
_FUSED_CUDA_ROTATIONS = frozenset({"identity", "dense", "hadamard", "rotor3", "planar", "quat"})

class Codes:
    """A batch of packed codes: the real bytes of the format (docs/format.md), one row per vector.

    ``shape`` is the shape of the data the codes stand for (batch_shape + (dim,)); indexing and
    slicing select along the first batch axis; ``nbytes`` counts every byte held (indices, norms and,
    in prod mode, sign bits and residual norms). Codes remember the framework and dtype of the
    encoded input, which ``Quantizer.decode`` returns by default.

    Codes of CUDA inputs live on the input's GPU (uint8 torch tensors, or CuPy arrays for CuPy
    inputs); ``device`` says where, and ``to("cpu")`` / ``to("cuda")`` move them (same bytes).
    """

    __slots__ = ("_params", "_arrays", "_batch_shape", "_source")

    def __init__(self, params: Dict[str, Any], arrays: Dict[str, np.ndarray], batch_shape: Tuple[int, ...],
                 source: Optional[Tuple[str, Any]] = None):
        self._params = dict(params)
        self._arrays = arrays
        self._batch_shape = tuple(int(s) for s in batch_shape)
        # (framework, dtype, device, device index) of the encoded input: what decode returns by default.
        self._source = source or ("numpy", np.dtype(np.float32), "cpu", -1)

    # -- description --------------------------------------------------------------------
    @property
    def params(self) -> Dict[str, Any]:
        """The quantizer parameters the codes were made with."""
        return dict(self._params)

    @property
    def bits(self) -> int:
        return int(self._params["bits"])

    @property
    def dim(self) -> int:
        return int(self._params["dim"])

    @property
    def mode(self) -> str:
        return self._params["mode"]

    @property
    def batch_shape(self) -> Tuple[int, ...]:
        return self._batch_shape

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._batch_shape + (self.dim,)

    @property
    def n(self) -> int:
        return int(np.prod(self._batch_shape, dtype=np.int64)) if self._batch_shape else 1

    @property
    def nbytes(self) -> int:
        """Real bytes held by the packed arrays."""
        return int(sum(_nbytes(a) for a in self._arrays.values()))

    @property
    def device(self) -> str:
        """Where the packed arrays live: "cpu" or "cuda:<index>"."""
        kind, index = _array_device(self._arrays["norms"])
        return "cpu" if kind == "cpu" else f"cuda:{index}"

    def to(self, device: Any) -> "Codes":
        """The same codes on ``device`` ("cpu", "cuda", "cuda:1" or a torch.device): numpy arrays on the CPU,
        uint8 torch tensors on a GPU. Returns self when they already are there."""
        name = str(device)
        if name == "cpu":
            if self.device == "cpu" and all(isinstance(a, np.ndarray) for a in self._arrays.values()):
                return self
            arrays = {k: _to_numpy(a) for k, a in self._arrays.items()}
            framework, dtype, _, _ = self._source
            if framework == "cupy":
                framework, dtype = "numpy", np.dtype(str(dtype))
            return Codes(self._params, arrays, self._batch_shape, (framework, dtype, "cpu", -1))
        if not name.startswith("cuda"):
            raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
        import torch

        target = torch.device(name)
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if self.device == f"cuda:{target.index}":
            return self
        arrays = {k: (a if _is_torch(a) else torch.from_numpy(np.ascontiguousarray(_to_numpy(a)))).to(target)
                  for k, a in self._arrays.items()}
        framework, dtype, _, _ = self._source
        if framework != "torch":
            dtype_name = str(dtype)
            dtype = getattr(torch, dtype_name) if hasattr(torch, dtype_name) else torch.float32
        return Codes(self._params, arrays, self._batch_shape, ("torch", dtype, "cuda", int(target.index)))

    @property
    def bytes_per_vector(self) -> int:
        return int(sum(a.shape[-1] for a in self._arrays.values()))

    @property
    def indices(self) -> np.ndarray:
        """Packed index bit planes, uint8 of shape batch_shape + (index bytes per vector,)."""
        return self._arrays["indices"]

    def _as_norm_dtype(self, a: Any):
        name = self._params["norm_dtype"]
        if _is_torch(a):
            import torch

            return a.view(getattr(torch, name))[..., 0]
        if isinstance(a, np.ndarray):
            return a.view(np.dtype(name).newbyteorder("<"))[..., 0]
        return a.view(np.dtype(name))[..., 0]

    @property
    def norms(self) -> np.ndarray:
        """Stored norms as float16/float32, shape batch_shape (on the codes' device)."""
        return self._as_norm_dtype(self._arrays["norms"])

    @property
    def qjl_signs(self) -> np.ndarray:
        return self._arrays["qjl_signs"]

    @property
    def residual_norms(self) -> np.ndarray:
        return self._as_norm_dtype(self._arrays["residual_norms"])

    def __len__(self) -> int:
        if not self._batch_shape:
            raise TypeError("len() of Codes of a single vector (no batch axis)")
        return self._batch_shape[0]

    def __repr__(self) -> str:
        p = self._params
        return (f"Codes(shape={self.shape}, bits={p['bits']}, mode={p['mode']!r}, rotation={p['rotation']!r}, "
                f"nbytes={self.nbytes}, bytes_per_vector={self.bytes_per_vector})")

    def __getitem__(self, key) -> "Codes":
        if not self._batch_shape:
            raise IndexError("Codes of a single vector cannot be indexed")
        if isinstance(key, tuple):
            raise IndexError("Codes are indexed along the first batch axis only (one int, slice or index array)")
        if isinstance(key, (int, np.integer)):
            size = self._batch_shape[0]
            if not -size <= int(key) < size:
                raise IndexError(f"index {int(key)} is out of range for {size} codes")
        def select(a):
            if _is_torch(a) and isinstance(key, (np.ndarray, list)):
                import torch

                return a[torch.as_tensor(np.asarray(key), device=a.device)].contiguous()
            return _contiguous(a[key])

        arrays = {name: select(a) for name, a in self._arrays.items()}
        batch_shape = tuple(arrays["norms"].shape[:-1])
        return Codes(self._params, arrays, batch_shape, self._source)

    def flat(self) -> Dict[str, np.ndarray]:
        """The four arrays as C-contiguous 2-D (n, bytes) uint8 arrays (what the core reads), on the codes' device."""
        return {name: _contiguous(a.reshape(self.n, a.shape[-1])) for name, a in self._arrays.items()}

    # -- serialization -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialized codes: versioned header with the parameters, the packed arrays, CRC-32 (docs/format.md).
        The batch is flattened to one axis."""
        quantizer = Quantizer._from_params(self._params)
        f = self.to("cpu").flat()
        return _core.codes_to_bytes(quantizer._native, f["indices"], f["norms"], f["qjl_signs"], f["residual_norms"])

    @staticmethod
    def from_bytes(buffer) -> "Codes":
        """Reads serialized codes; truncated, corrupted or foreign buffers raise ValueError."""
        if not isinstance(buffer, (bytes, bytearray, memoryview)):
            raise TypeError(f"buffer: expected bytes, bytearray or memoryview, got {type(buffer).__name__}")
        params, indices, norms, signs, residuals = _core.codes_from_bytes(bytes(buffer))
        arrays = dict(zip(_FIELDS, (indices, norms, signs, residuals)))
        return Codes(params, arrays, (indices.shape[0],))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codes):
            return NotImplemented
        return (_params_key(self._params) == _params_key(other._params) and self._batch_shape == other._batch_shape
                and all(np.array_equal(_to_numpy(self._arrays[k]), _to_numpy(other._arrays[k])) for k in _FIELDS))

    __hash__ = None  # mutable-array container


def concatenate(codes: Sequence[Codes]) -> Codes:
    """Joins codes of one quantizer along the first batch axis."""
    codes = list(codes)
    if not codes:
        raise ValueError("concatenate: expected at least one Codes, got an empty sequence")
    for i, c in enumerate(codes):
        if not isinstance(c, Codes):
            raise TypeError(f"concatenate: expected Codes, got {type(c).__name__} at position {i}")
        if not c.batch_shape:
            raise ValueError(f"concatenate: Codes at position {i} hold a single vector (no batch axis)")
        if _params_key(c._params) != _params_key(codes[0]._params):
            raise ValueError(f"concatenate: Codes at position {i} come from a different quantizer "
                             f"({c._params} vs {codes[0]._params})")
        if c.batch_shape[1:] != codes[0].batch_shape[1:]:
            raise ValueError(f"concatenate: batch shapes {c.batch_shape} and {codes[0].batch_shape} differ beyond axis 0")
        if c.device != codes[0].device:
            raise ValueError(f"concatenate: Codes at position {i} are on {c.device}, the first on {codes[0].device}")
    first = codes[0]._arrays["norms"]
    if _is_torch(first):
        import torch

        arrays = {name: torch.cat([c._arrays[name] for c in codes], dim=0) for name in _FIELDS}
    elif isinstance(first, np.ndarray):
        arrays = {name: np.concatenate([c._arrays[name] for c in codes], axis=0) for name in _FIELDS}
    else:
        cupy = _interop._cupy()
        arrays = {name: cupy.concatenate([c._arrays[name] for c in codes], axis=0) for name in _FIELDS}
    batch_shape = (sum(c.batch_shape[0] for c in codes),) + codes[0].batch_shape[1:]
    return Codes(codes[0]._params, arrays, batch_shape, codes[0]._source)


class Quantizer:
    """Data-oblivious vector quantizer of the TurboQuant family.

    ``Quantizer(dim, bits, rotation="dense", mode="mse", seed=0, codebook="sphere", norm_dtype="float16",
    norm_correction=False, qjl_dim=None)``

    - ``mode="mse"``: normalize, rotate, Lloyd-Max code every coordinate with ``bits`` bits, store the norm.
    - ``mode="prod"``: ``bits - 1`` bits as above plus a 1-bit QJL sign sketch (``qjl_dim`` rows, default
      padded_dim) of the residual and its norm: unbiased inner products.
    - ``rotation``: any of ``rotorquant.rotation_kinds()``; the presets are ``TurboQuant`` (dense) and
      ``RotorQuant`` (rotor3).
    """

    def __init__(self, dim: int, bits: int, rotation: str = "dense", mode: str = "mse", seed: int = 0,
                 codebook: str = "sphere", norm_dtype: str = "float16", norm_correction: bool = False,
                 qjl_dim: Optional[int] = None):
        dim = _check_int("dim", dim, 1)
        bits = _check_int("bits", bits, 1, 8)
        _check_choice("rotation", rotation, rotation_kinds())
        _check_choice("mode", mode, MODES)
        seed = _check_int("seed", seed, 0, 2**64 - 1)
        _check_choice("codebook", codebook, CODEBOOKS)
        _check_choice("norm_dtype", norm_dtype, NORM_DTYPES)
        if not isinstance(norm_correction, (bool, np.bool_)):
            raise TypeError(f"norm_correction: expected a bool, got {type(norm_correction).__name__}")
        if qjl_dim is None:
            qjl_dim = 0
        else:
            qjl_dim = _check_int("qjl_dim", qjl_dim, 1)
            if mode != "prod":
                raise ValueError(f"qjl_dim: only used in mode 'prod', got qjl_dim={qjl_dim} with mode {mode!r}")
        self._native = _core.Quantizer(dim, bits, rotation, mode, seed, codebook, norm_dtype, bool(norm_correction),
                                       qjl_dim)
        self._params = dict(self._native.params())

    @classmethod
    def _from_params(cls, params: Dict[str, Any]) -> "Quantizer":
        return cls(params["dim"], params["bits"], rotation=params["rotation"], mode=params["mode"],
                   seed=params["seed"], codebook=params["codebook"], norm_dtype=params["norm_dtype"],
                   norm_correction=params["norm_correction"], qjl_dim=params["qjl_dim"] or None)

    # -- description --------------------------------------------------------------------
    @property
    def params(self) -> Dict[str, Any]:
        return dict(self._params)

    dim = property(lambda self: self._native.dim)
    bits = property(lambda self: self._native.bits)
    padded_dim = property(lambda self: self._native.padded_dim)
    mse_bits = property(lambda self: self._native.mse_bits)
    qjl_dim = property(lambda self: self._native.qjl_dim)
    rotation = property(lambda self: self._native.rotation)
    mode = property(lambda self: self._native.mode)
    seed = property(lambda self: self._native.seed)
    codebook = property(lambda self: self._native.codebook)
    norm_dtype = property(lambda self: self._native.norm_dtype)
    norm_correction = property(lambda self: self._native.norm_correction)

    @property
    def num_parameters(self) -> int:
        """Stored parameters: rotation floats + QJL matrix entries + codebook centroids."""
        return int(self._native.num_parameters)

    @property
    def bytes_per_vector(self) -> int:
        """Real bytes of one code: packed indices + norm (+ sign bits + residual norm in prod mode)."""
        n = self._native
        return int(n.index_bytes + n.norm_bytes + n.sign_bytes + n.residual_norm_bytes)

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes of a vector divided by the bytes of its code."""
        return 2.0 * self.dim / self.bytes_per_vector

    def centroids(self) -> np.ndarray:
        return self._native.centroids()

    def __repr__(self) -> str:
        p = self._params
        extra = f", qjl_dim={self.qjl_dim}" if p["mode"] == "prod" else ""
        return (f"Quantizer(dim={p['dim']}, bits={p['bits']}, rotation={p['rotation']!r}, mode={p['mode']!r}, "
                f"seed={p['seed']}, codebook={p['codebook']!r}, norm_dtype={p['norm_dtype']!r}, "
                f"norm_correction={p['norm_correction']}{extra})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Quantizer) and _params_key(self._params) == _params_key(other._params)

    def __hash__(self) -> int:
        return hash(_params_key(self._params))

    # -- work ---------------------------------------------------------------------------
    def encode(self, x: Any, check: bool = True) -> Codes:
        """Quantizes x of shape (..., dim) (numpy / torch / CuPy / DLPack, float16/bfloat16/float32/float64).
        Zero vectors encode to norm 0; NaN or Inf raise ValueError.

        CUDA inputs are encoded on their GPU by the fused kernel, on the caller's current stream, and the
        codes stay there (bit-identical to the CPU's codes for float32 input). ``check=True`` (default) makes
        that call wait for the stream once to raise ValueError for NaN/Inf rows or norms that overflow the
        norm dtype; ``check=False`` keeps it fully asynchronous (such rows then get unspecified codes).
        On the CPU the checks always run."""
        prepared = _interop.prepare(x, "x", last_dim=self.dim)
        batch = tuple(prepared.batch_shape)
        device_native = self._device_native(prepared.device, prepared.device_index)
        if device_native is not None:
            arrays = self._encode_on_device(device_native, prepared, bool(check))
            arrays = {name: a.reshape(batch + (a.shape[-1],)) for name, a in arrays.items()}
            return Codes(self._params, arrays, batch, (prepared.framework, prepared.dtype, prepared.device,
                                                        prepared.device_index))
        flat = self._host(prepared)
        indices, norms, signs, residuals = self._native.encode(flat)
        arrays = {name: a.reshape(batch + (a.shape[-1],))
                  for name, a in zip(_FIELDS, (indices, norms, signs, residuals))}
        return Codes(self._params, arrays, batch, (prepared.framework, prepared.dtype, prepared.device,
                                                    prepared.device_index))

    def decode(self, codes: Codes, dtype: Any = None):
        """Reconstructs (..., dim) vectors, in the framework, device and dtype of the encoded input by default."""
        self._check_codes(codes)
        kind, index = _array_device(codes._arrays["norms"])
        if kind == "cuda":
            return self._decode_on_device(codes, index, dtype)
        f = codes.flat()
        out = self._native.decode(f["indices"], f["norms"], f["qjl_signs"], f["residual_norms"])
        return self._to_source(codes, out.reshape(codes.batch_shape + (self.dim,)), dtype)

    def inner_product(self, codes: Codes, y: Any):
        """Estimates <y_i, x_j> on the codes for queries y of shape (..., dim): the queries are rotated once and
        scores come from centroid lookups (never decoding the set). Result shape: y's batch + codes' batch.
        In prod mode the estimate is unbiased."""
        self._check_codes(codes)
        prepared = _interop.prepare(y, "y", last_dim=self.dim)
        kind, index = _array_device(codes._arrays["norms"])
        if kind == "cuda":
            scores = self._scores_on_device(codes, index, prepared, 1, prepared.n)
            scores = scores.reshape(tuple(prepared.batch_shape) + codes.batch_shape)
            return scores if prepared.framework != "numpy" else _to_numpy(scores)
        queries = self._host(prepared)
        f = codes.flat()
        scores = self._native.inner_product(f["indices"], f["norms"], f["qjl_signs"], f["residual_norms"], queries)
        scores = scores.reshape(tuple(prepared.batch_shape) + codes.batch_shape)
        return _interop.finish_array(prepared, scores)

    def grouped_scores(self, codes: Codes, queries: Any):
        """Attention-style scores with grouped queries (GQA): ``codes`` of batch shape (heads, n) (one row of
        codes per KV head), ``queries`` of shape (heads, group, dim): query g of head h scores the codes of
        head h only. Returns (heads, group, n) float32 estimates of <q, x>. On the GPU each loaded code serves
        every query of its head."""
        self._check_codes(codes)
        if len(codes.batch_shape) != 2:
            raise ValueError(f"codes: expected batch shape (heads, n), got {codes.batch_shape}")
        prepared = _interop.prepare(queries, "queries", last_dim=self.dim)
        heads, n = codes.batch_shape
        if len(prepared.batch_shape) != 2 or prepared.batch_shape[0] != heads:
            raise ValueError(f"queries: expected shape ({heads}, group, {self.dim}), got "
                             f"{tuple(prepared.batch_shape) + (self.dim,)}")
        group = prepared.batch_shape[1]
        kind, index = _array_device(codes._arrays["norms"])
        if kind == "cuda":
            scores = self._scores_on_device(codes, index, prepared, heads, group)
            scores = scores.reshape(heads, group, n)
            return scores if prepared.framework != "numpy" else _to_numpy(scores)
        queries_host = self._host(prepared).reshape(heads, group, self.dim)
        out = np.empty((heads, group, n), dtype=np.float32)
        for h in range(heads):
            f = codes[h].flat()
            out[h] = self._native.inner_product(f["indices"], f["norms"], f["qjl_signs"], f["residual_norms"],
                                                np.ascontiguousarray(queries_host[h]))
        return _interop.finish_array(prepared, out)

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The parameters that define the quantizer (everything else is derived from them and the seed)."""
        state = self.params
        state["format_version"] = 1
        return state

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "Quantizer":
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        missing = [k for k in ("dim", "bits", "rotation", "mode", "seed", "codebook", "norm_dtype", "norm_correction",
                               "qjl_dim") if k not in state]
        if missing:
            raise ValueError(f"state: expected keys dim, bits, rotation, mode, seed, codebook, norm_dtype, "
                             f"norm_correction, qjl_dim; missing {', '.join(missing)}")
        if state.get("format_version", 1) != 1:
            raise ValueError(f"state: expected format_version 1, got {state.get('format_version')}")
        return cls._from_params(state)

    def to_bytes(self) -> bytes:
        return self._native.to_bytes()

    @classmethod
    def from_bytes(cls, buffer) -> "Quantizer":
        if not isinstance(buffer, (bytes, bytearray, memoryview)):
            raise TypeError(f"buffer: expected bytes, bytearray or memoryview, got {type(buffer).__name__}")
        return cls._from_params(_core.Quantizer.params_from_bytes(bytes(buffer)))

    def save(self, path) -> None:
        """Writes the quantizer (magic, version, parameters, CRC-32) to ``path``."""
        data = self.to_bytes()
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)  # never leaves a half-written file under the final name

    @classmethod
    def load(cls, path) -> "Quantizer":
        with open(path, "rb") as handle:
            return cls.from_bytes(handle.read())

    def __getstate__(self):
        return self.state_dict()

    def __setstate__(self, state):
        other = Quantizer.from_state_dict(state)
        self._native, self._params = other._native, other._params
        self._device_natives = {}

    # -- helpers ------------------------------------------------------------------------
    def _check_codes(self, codes: Codes) -> None:
        if not isinstance(codes, Codes):
            raise TypeError(f"codes: expected rotorquant.Codes, got {type(codes).__name__}")
        if _params_key(codes._params) != _params_key(self._params):
            raise ValueError(f"codes: made by a different quantizer: expected {self._params}, got {codes._params}")

    def _device_native(self, device: str, index: int):
        """The cached _core.CudaQuantizer of this quantizer on CUDA device ``index``; None on the CPU or when
        rotorquant has no CUDA codec for it (no CUDA build, or a rotation kind without a fused kernel yet:
        rotor_network): inputs then go through the host."""
        if device != "cuda" or not _core.built_with_cuda or _core.cuda_device_count() == 0:
            return None
        if self._params["rotation"] not in _FUSED_CUDA_ROTATIONS:
            return None  # no fused CUDA codec for this kind yet: the documented host path
        cache = self.__dict__.setdefault("_device_natives", {})
        if index not in cache:
            cache[index] = _core.CudaQuantizer(self._native, index)
        return cache[index]

    def _require_device_native(self, index: int):
        native = self._device_native("cuda", index)
        if native is None:
            raise RuntimeError("codes on a GPU need rotorquant built with CUDA and a usable CUDA device")
        return native

    @staticmethod
    def _empty(framework: str, index: int, shape, dtype_name: str):
        if framework == "cupy":
            cupy = _interop._cupy()
            with cupy.cuda.Device(index):
                return cupy.empty(shape, dtype=dtype_name)
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype_name), device=f"cuda:{index}")

    @staticmethod
    def _pointer(a: Any) -> int:
        if a is None:
            return 0
        if _is_torch(a):
            return int(a.data_ptr()) if a.numel() else 0
        return int(a.data.ptr) if a.size else 0

    @staticmethod
    def _stream_of(a: Any, index: int) -> int:
        if _is_torch(a):
            import torch

            return int(torch.cuda.current_stream(index).cuda_stream)
        cupy = _interop._cupy()
        with cupy.cuda.Device(index):
            return int(cupy.cuda.get_current_stream().ptr)

    def _encode_on_device(self, native, prepared, check: bool) -> Dict[str, Any]:
        n, nat = prepared.n, self._native
        framework = "cupy" if prepared.framework == "cupy" else "torch"
        sizes = (nat.index_bytes, nat.norm_bytes, nat.sign_bytes, nat.residual_norm_bytes)
        arrays = {name: self._empty(framework, prepared.device_index, (n, size), "uint8")
                  for name, size in zip(_FIELDS, sizes)}
        native.encode(prepared.data_ptr(), n, *(self._pointer(arrays[name]) for name in _FIELDS),
                      prepared.stream(), check)
        return arrays

    def _decode_on_device(self, codes: Codes, index: int, dtype: Any):
        native = self._require_device_native(index)
        framework, src_dtype, _, _ = codes._source
        framework = "cupy" if not _is_torch(codes._arrays["norms"]) else "torch"
        prepared = _interop.Prepared(framework, "cuda", index, src_dtype, codes.batch_shape, None)
        if framework == "torch" and not _is_torch_dtype(src_dtype):
            import torch

            prepared.dtype = getattr(torch, str(np.dtype(src_dtype)))
        target = _interop.resolve_dtype(prepared, dtype)
        name = str(target).replace("torch.", "")
        kernel_dtype = {"float32": 0, "float16": 1, "bfloat16": 2}.get(name, 0)
        out_name = name if name in ("float32", "float16", "bfloat16") else "float32"
        f = codes.flat()
        out = self._empty(framework, index, (codes.n, self.dim), out_name)
        native.decode(*(self._pointer(f[k]) for k in _FIELDS), codes.n, self._pointer(out), kernel_dtype,
                      self._stream_of(f["norms"], index), True)
        out = out.reshape(codes.batch_shape + (self.dim,))
        if out_name != name:
            out = out.to(target) if framework == "torch" else out.astype(target)
        return out

    def _scores_on_device(self, codes: Codes, index: int, prepared, heads: int, group: int):
        if prepared.device != "cuda" or prepared.device_index != index:
            where = "the CPU" if prepared.device != "cuda" else f"cuda:{prepared.device_index}"
            raise ValueError(f"y: expected queries on the codes' device cuda:{index}, got them on {where}")
        native = self._require_device_native(index)
        f = codes.flat()
        n = codes.n // heads
        framework = "cupy" if prepared.framework == "cupy" else "torch"
        out = self._empty(framework, index, (heads * group, n), "float32")
        native.scores(*(self._pointer(f[k]) for k in _FIELDS), n, heads, prepared.data_ptr(), group,
                      self._pointer(out), prepared.stream(), True)
        return out

    @staticmethod
    def _host(prepared) -> np.ndarray:
        """The float32 (n, dim) input on the host (CUDA inputs without a CUDA build of rotorquant)."""
        if prepared.device == "cuda":
            flat = prepared.flat
            return flat.cpu().numpy() if _interop.is_torch_tensor(flat) else flat.get()
        return prepared.flat

    @staticmethod
    def _to_source(codes: Codes, out: np.ndarray, dtype: Any):
        framework, src_dtype, device, device_index = codes._source
        prepared = _interop.Prepared(framework, device, device_index, src_dtype, codes.batch_shape, None)
        width = out.shape[-1]
        return _interop.finish(prepared, out.reshape(codes.n, width), width, dtype)


def _is_torch_dtype(dtype: Any) -> bool:
    torch = _interop._torch()
    return torch is not None and isinstance(dtype, torch.dtype)


def TurboQuant(dim: int, bits: int, mode: str = "mse", seed: int = 0, **options) -> Quantizer:
    """TurboQuant (Zandieh et al.): a dense Haar rotation + Lloyd-Max codes (+ QJL in prod mode)."""
    return Quantizer(dim, bits, rotation="dense", mode=mode, seed=seed, **options)


def RotorQuant(dim: int, bits: int, mode: str = "mse", seed: int = 0, **options) -> Quantizer:
    """RotorQuant: Cl(3,0) rotor sandwiches on groups of 3 coordinates instead of the dense rotation."""
    return Quantizer(dim, bits, rotation="rotor3", mode=mode, seed=seed, **options)
