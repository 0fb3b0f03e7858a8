"""Array interop: numpy, torch (CPU/CUDA), CuPy and any ``__dlpack__`` object.

Every public entry point funnels its array arguments through :func:`prepare`, which
validates them and yields a C-contiguous float32 2-D view ``(n, last_dim)`` on the
input's device (zero-copy when the input already is one), and gives results back
through :func:`finish` in the caller's framework, device and (by default) dtype.
No quantization math lives here.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def is_torch_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def is_cupy_array(x: Any) -> bool:
    cupy = _cupy()
    return cupy is not None and isinstance(x, cupy.ndarray)


@dataclass
class Prepared:
    """A validated input: ``flat`` is C-contiguous float32 of shape (n, last_dim)."""

    framework: str  # "numpy" | "torch" | "cupy"
    device: str  # "cpu" | "cuda"
    device_index: int  # CUDA device ordinal, -1 on CPU
    dtype: Any  # the caller's dtype object (numpy dtype, torch.dtype, cupy dtype)
    batch_shape: Tuple[int, ...]
    flat: Any

    @property
    def n(self) -> int:
        return int(self.flat.shape[0])

    def data_ptr(self) -> int:
        if self.framework == "torch":
            return int(self.flat.data_ptr())
        if self.framework == "cupy":
            return int(self.flat.data.ptr)
        return int(self.flat.ctypes.data)

    def stream(self) -> int:
        """The caller's current CUDA stream handle on the input's device (0 on CPU)."""
        if self.device != "cuda":
            return 0
        if self.framework == "torch":
            torch = _torch()
            return int(torch.cuda.current_stream(self.device_index).cuda_stream)
        cupy = _cupy()
        with cupy.cuda.Device(self.device_index):
            return int(cupy.cuda.get_current_stream().ptr)


def _dtype_name(framework: str, dtype: Any) -> str:
    if framework == "torch":
        return str(dtype).replace("torch.", "")
    return "bfloat16" if str(dtype) == "bfloat16" else np.dtype(dtype).name


def _describe_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _from_foreign(x: Any, name: str):
    """Converts an object that is not numpy/torch/cupy: DLPack producers, sequences, scalars."""
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as cpu_error:
            torch = _torch()
            if torch is None:
                try:
                    import torch  # noqa: F401  (only needed for device DLPack producers)
                except ImportError:
                    raise TypeError(
                        f"{name}: expected a CPU array or a CUDA array through torch/cupy; got a DLPack object "
                        f"of type {type(x).__name__} that numpy cannot read ({cpu_error}) and torch is not installed"
                    ) from cpu_error
                torch = _torch()
            return torch.from_dlpack(x)
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}: expected an array (numpy, torch, cupy or DLPack) of floats, got {type(x).__name__}")
    try:
        return np.asarray(x)
    except Exception as error:  # noqa: BLE001 - report any conversion failure as a TypeError
        raise TypeError(f"{name}: expected an array of floats, got {type(x).__name__} ({error})") from error


def prepare(x: Any, name: str, last_dim: Optional[int] = None, min_ndim: int = 1) -> Prepared:
    """Validates ``x`` and returns it as a C-contiguous float32 (n, last_dim) view on its device."""
    if not (isinstance(x, np.ndarray) or is_torch_tensor(x) or is_cupy_array(x)):
        x = _from_foreign(x, name)

    if is_torch_tensor(x):
        torch = _torch()
        allowed = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        if x.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.is_cuda:
            device, index = "cuda", int(x.device.index if x.device.index is not None else torch.cuda.current_device())
        elif x.device.type == "cpu":
            device, index = "cpu", -1
        else:
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got a tensor on device '{x.device}'")
        framework, dtype, shape = "torch", x.dtype, tuple(x.shape)
    elif is_cupy_array(x):
        if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
            raise TypeError(f"{name}: expected dtype float16, float32 or float64, got {x.dtype}")
        framework, device, index, dtype, shape = "cupy", "cuda", int(x.device.id), x.dtype, tuple(x.shape)
    else:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        is_bfloat16 = x.dtype.name == "bfloat16"  # ml_dtypes' bfloat16 for numpy
        if not is_bfloat16 and (x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8)):
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
        framework, device, index, dtype, shape = "numpy", "cpu", -1, x.dtype, tuple(x.shape)

    if len(shape) < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape {_describe_shape(shape)}")
    if last_dim is not None and (len(shape) == 0 or shape[-1] != last_dim):
        expected = f"(..., {last_dim})"
        raise ValueError(f"{name}: expected shape {expected}, got {_describe_shape(shape)}")

    batch_shape = shape[:-1]
    width = shape[-1] if shape else 1
    n = int(np.prod(batch_shape, dtype=np.int64)) if batch_shape else 1

    if framework == "torch":
        torch = _torch()
        flat = x.detach()
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        flat = flat.reshape(n, width)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if device == "cpu":
            flat = flat.numpy()
            framework_flat = flat
        else:
            framework_flat = flat
    elif framework == "cupy":
        cupy = _cupy()
        framework_flat = cupy.ascontiguousarray(x.reshape(n, width), dtype=cupy.float32)
    else:
        framework_flat = np.ascontiguousarray(x.reshape(n, width), dtype=np.float32)
    return Prepared(framework, device, index, dtype, batch_shape, framework_flat)


def empty_like_input(p: Prepared, width: int):
    """A float32 C-contiguous (n, width) output buffer on the input's device."""
    if p.device == "cuda":
        if p.framework == "torch":
            torch = _torch()
            return torch.empty((p.n, width), dtype=torch.float32, device=f"cuda:{p.device_index}")
        cupy = _cupy()
        with cupy.cuda.Device(p.device_index):
            return cupy.empty((p.n, width), dtype=cupy.float32)
    return np.empty((p.n, width), dtype=np.float32)


def resolve_dtype(p: Prepared, dtype: Any):
    """The dtype of a result: the input's by default, else ``dtype`` given as a name or framework dtype."""
    if dtype is None:
        return p.dtype
    name = dtype if isinstance(dtype, str) else _dtype_name(p.framework, dtype)
    if name not in _FLOAT_NAMES:
        raise TypeError(f"dtype: expected one of {', '.join(_FLOAT_NAMES)}, got {dtype!r}")
    if p.framework == "torch":
        return getattr(_torch(), name)
    if name == "bfloat16":
        raise TypeError("dtype: bfloat16 output needs a torch input (numpy has no bfloat16), got a numpy/cupy input")
    return np.dtype(name)


def finish(p: Prepared, out_flat: Any, width: int, dtype: Any = None):
    """Reshapes (n, width) float32 results to batch_shape + (width,) in the caller's framework and dtype."""
    target = resolve_dtype(p, dtype)
    shape = tuple(p.batch_shape) + (width,)
    if p.framework == "torch":
        torch = _torch()
        result = torch.from_numpy(out_flat) if isinstance(out_flat, np.ndarray) else out_flat
        if p.device == "cuda" and not result.is_cuda:
            result = result.to(f"cuda:{p.device_index}")
        result = result.reshape(shape)
        return result if result.dtype == target else result.to(target)
    if p.framework == "cupy" and isinstance(out_flat, np.ndarray):
        cupy = _cupy()
        with cupy.cuda.Device(p.device_index):
            out_flat = cupy.asarray(out_flat)
    result = out_flat.reshape(shape)
    if result.dtype != target:
        result = result.astype(target)
    return result


def check_out(p: Prepared, out: Any, width: int, name: str = "out"):
    """Validates a caller-given output buffer; returns its (n, width) float32 view that the core writes into."""
    expected_shape = tuple(p.batch_shape) + (width,)
    if p.framework == "torch":
        torch = _torch()
        if not is_torch_tensor(out):
            raise TypeError(f"{name}: expected a torch.Tensor like the input, got {type(out).__name__}")
        if out.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype float32, got {out.dtype}")
        if (out.device.type == "cuda") != (p.device == "cuda") or (
            p.device == "cuda" and out.device.index != p.device_index
        ):
            raise ValueError(f"{name}: expected a tensor on the input's device, got one on {out.device}")
        if not out.is_contiguous():
            raise ValueError(f"{name}: expected a C-contiguous tensor (the result is written in place), got strides {out.stride()}")
        if tuple(out.shape) != expected_shape:
            raise ValueError(f"{name}: expected shape {_describe_shape(expected_shape)}, got {_describe_shape(out.shape)}")
        view = out.reshape(p.n, width)
        return view.numpy() if p.device == "cpu" else view
    if p.framework == "cupy":
        cupy = _cupy()
        if not is_cupy_array(out) or out.dtype != cupy.float32:
            raise TypeError(f"{name}: expected a cupy float32 array like the input, got {type(out).__name__}")
        if not out.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array (the result is written in place)")
        if tuple(out.shape) != expected_shape:
            raise ValueError(f"{name}: expected shape {_describe_shape(expected_shape)}, got {_describe_shape(out.shape)}")
        return out.reshape(p.n, width)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array like the input, got {type(out).__name__}")
    if out.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32, got {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name}: expected a writeable C-contiguous array (the result is written in place)")
    if tuple(out.shape) != expected_shape:
        raise ValueError(f"{name}: expected shape {_describe_shape(expected_shape)}, got {_describe_shape(out.shape)}")
    return out.reshape(p.n, width)


def finish_array(p: Prepared, result: np.ndarray):
    """Hands a host float32 result of any shape back in the framework and on the device of input ``p``."""
    if p.framework == "torch":
        torch = _torch()
        tensor = torch.from_numpy(np.ascontiguousarray(result))
        return tensor.to(f"cuda:{p.device_index}") if p.device == "cuda" else tensor
    if p.framework == "cupy":
        cupy = _cupy()
        with cupy.cuda.Device(p.device_index):
            return cupy.asarray(result)
    return result
