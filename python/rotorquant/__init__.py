"""rotorquant: data-oblivious vector quantization (TurboQuant, RotorQuant) for LLM KV caches.

The math lives in the C++ core (``rotorquant._core``, also linkable as ``rotorquant::core``);
this package validates inputs, moves arrays between numpy / torch / CuPy and the core, and
returns results in the caller's framework, device and dtype.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

from ._version import __version__

try:
    from . import _core
except ImportError as _error:  # pragma: no cover - only when the extension was not built
    raise ImportError(
        "rotorquant's compiled extension rotorquant._core could not be imported; install the package with "
        f"`pip install .` from the source tree (the source folder itself is not importable): {_error}"
    ) from _error

from . import clifford
from ._codebook import Codebook, codebook
from ._rotation import Rotation, rotation_kinds
from ._quantizer import Codes, Quantizer, RotorQuant, TurboQuant, concatenate
from ._kv_cache import KVCache
from ._attention import DecodeAttention

__all__ = [
    "__version__",
    "Codebook",
    "Codes",
    "DecodeAttention",
    "KVCache",
    "Quantizer",
    "RotorQuant",
    "TurboQuant",
    "concatenate",
    "Rotation",
    "clifford",
    "cmake_dir",
    "codebook",
    "cuda_device_count",
    "has_cuda",
    "num_threads",
    "rotation_kinds",
    "set_num_threads",
    "show_config",
]


def has_cuda() -> bool:
    """True only when rotorquant was compiled with CUDA and a CUDA device is usable here."""
    return bool(_core.built_with_cuda) and _core.cuda_device_count() > 0


def cuda_device_count() -> int:
    """Number of usable CUDA devices (0 without a CUDA build, a driver or a device)."""
    return int(_core.cuda_device_count()) if _core.built_with_cuda else 0


def num_threads() -> int:
    """Worker threads used by batched CPU calls."""
    return int(_core.num_threads())


def set_num_threads(n: int) -> None:
    """Sets the worker threads of batched CPU calls; ``n <= 0`` restores the default (all cores)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    _core.set_num_threads(n)


def cmake_dir() -> str:
    """Folder holding rotorquantConfig.cmake: pass it as ``-Drotorquant_DIR=...`` to CMake."""
    folder = Path(__file__).resolve().parent / "lib" / "cmake" / "rotorquant"
    if not (folder / "rotorquantConfig.cmake").is_file():
        raise FileNotFoundError(f"rotorquantConfig.cmake not found in {folder}; is rotorquant installed from a wheel?")
    return str(folder)


def config() -> dict:
    """Build and runtime configuration as a dict (what show_config prints)."""
    info = {
        "version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "compiler": _core.compiler,
        "built_with_cuda": bool(_core.built_with_cuda),
        "cuda_archs": _core.cuda_archs if _core.built_with_cuda else None,
        "cuda_runtime": _core.cuda_runtime_version() if _core.built_with_cuda else None,
        "cuda_devices": [_core.cuda_device_name(i) for i in range(cuda_device_count())],
        "has_cuda": has_cuda(),
        "num_threads": num_threads(),
        "rotation_kinds": rotation_kinds(),
        "package_dir": str(Path(__file__).resolve().parent),
    }
    try:
        info["cmake_dir"] = cmake_dir()
    except FileNotFoundError:
        info["cmake_dir"] = None
    return info


def show_config() -> None:
    """Prints version, build options, CUDA availability and devices, and the CMake folder."""
    for key, value in config().items():
        print(f"{key:>16}: {value}")
