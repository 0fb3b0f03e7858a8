"""``rotorquant.Rotation``: the random orthogonal maps of the core, on numpy/torch/CuPy arrays."""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional

import numpy as np

from . import _core
from . import _interop


def rotation_kinds():
    """Names of all rotation kinds: identity, dense, hadamard, rotor3, planar, quat, rotor_network."""
    return list(_core.rotation_kinds())


def _check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}: expected an integer {bound}, got {value}")
    return value


class Rotation:
    """A seeded random orthogonal map of R^dim into R^padded_dim.

    ``apply(x)`` takes (..., dim) and returns (..., padded_dim); ``inverse(y)`` takes
    (..., padded_dim) and returns (..., dim); ``inverse(apply(x)) == x`` and norms are
    preserved. Inputs may be numpy arrays, torch tensors (CPU or CUDA), CuPy arrays or
    DLPack objects of float16/bfloat16/float32/float64; work is done in float32 and the
    result comes back in the input's framework, device and dtype (or ``dtype=``).
    CUDA inputs run on the caller's current stream.
    """

    def __init__(self, kind: str, dim: int, seed: int = 0):
        if not isinstance(kind, str):
            raise TypeError(f"kind: expected a str (one of {', '.join(rotation_kinds())}), got {type(kind).__name__}")
        if kind not in rotation_kinds():
            raise ValueError(f"kind: expected one of {', '.join(rotation_kinds())}, got {kind!r}")
        dim = _check_int("dim", dim, 1)
        seed = _check_int("seed", seed, 0, 2**64 - 1)
        self._rotation = _core.Rotation(kind, dim, seed)
        self._cuda: Dict[int, Any] = {}
        self._cuda_lock = threading.Lock()

    # -- properties ---------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._rotation.kind

    @property
    def dim(self) -> int:
        return self._rotation.dim

    @property
    def padded_dim(self) -> int:
        return self._rotation.padded_dim

    @property
    def seed(self) -> int:
        return self._rotation.seed

    @property
    def num_parameters(self) -> int:
        """Number of stored float parameters that define the map."""
        return self._rotation.num_parameters

    def parameters(self) -> np.ndarray:
        """The float32 parameters exactly as every backend uses them (layout in rotation.hpp / docs)."""
        return self._rotation.parameters()

    def matrix(self) -> np.ndarray:
        """The orthogonal (padded_dim, padded_dim) float64 matrix M: apply(x) = M @ pad(x)."""
        return self._rotation.matrix()

    def __repr__(self) -> str:
        return (f"Rotation(kind={self.kind!r}, dim={self.dim}, seed={self.seed}, padded_dim={self.padded_dim}, "
                f"num_parameters={self.num_parameters})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rotation) and (self.kind, self.dim, self.seed) == (other.kind, other.dim, other.seed)

    def __hash__(self) -> int:
        return hash((self.kind, self.dim, self.seed))

    def __getstate__(self):
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["kind"], state["dim"], state["seed"])

    # -- maps ---------------------------------------------------------------------
    def apply(self, x: Any, *, out: Any = None, dtype: Any = None):
        """Rotates x of shape (..., dim) into (..., padded_dim)."""
        return self._run(x, forward=True, out=out, dtype=dtype)

    def inverse(self, y: Any, *, out: Any = None, dtype: Any = None):
        """Maps y of shape (..., padded_dim) back to (..., dim)."""
        return self._run(y, forward=False, out=out, dtype=dtype)

    def _device_rotation(self, device_index: int):
        with self._cuda_lock:
            rotation = self._cuda.get(device_index)
            if rotation is None:
                if not _core.built_with_cuda:
                    raise RuntimeError("rotorquant was built without CUDA support; cannot run on a CUDA tensor "
                                       "(reinstall with nvcc available, or move the tensor to the CPU)")
                rotation = _core.CudaRotation(self._rotation, device_index)
                self._cuda[device_index] = rotation
            return rotation

    def _run(self, x: Any, forward: bool, out: Any, dtype: Any):
        name = "x" if forward else "y"
        in_width = self.dim if forward else self.padded_dim
        out_width = self.padded_dim if forward else self.dim
        prepared = _interop.prepare(x, name, last_dim=in_width)
        if out is not None:
            if dtype is not None:
                raise ValueError("dtype: cannot be given together with out= (out must be float32)")
            target = _interop.check_out(prepared, out, out_width)
        else:
            target = _interop.empty_like_input(prepared, out_width)
        if prepared.device == "cuda":
            device_rotation = self._device_rotation(prepared.device_index)
            launch = device_rotation.apply if forward else device_rotation.inverse
            out_ptr = int(target.data_ptr()) if _interop.is_torch_tensor(target) else int(target.data.ptr)
            launch(prepared.data_ptr(), out_ptr, prepared.n, prepared.stream())
        else:
            if forward:
                self._rotation.apply_into(prepared.flat, target)
            else:
                self._rotation.inverse_into(prepared.flat, target)
        if out is not None:
            return out
        return _interop.finish(prepared, target, out_width, dtype)
