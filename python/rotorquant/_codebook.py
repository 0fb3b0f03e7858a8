"""``rotorquant.codebook``: Lloyd-Max codebooks for coordinates of random unit vectors."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _core
from ._rotation import _check_int

DENSITIES = ("sphere", "gaussian")


@dataclass(frozen=True)
class Codebook:
    """Optimal scalar quantizer (Lloyd-Max) for one coordinate of a random unit vector in R^dim.

    ``centroids`` (2**bits, ascending) and ``boundaries`` (2**bits - 1 interior cell edges, the
    midpoints of neighbouring centroids) are float64; ``mse_per_coordinate`` is E[(X - Q(X))^2]
    and ``mse_total`` = dim * mse_per_coordinate, the expected squared error of a unit vector.
    """

    dim: int
    bits: int
    density: str
    centroids: np.ndarray = field(repr=False)
    boundaries: np.ndarray = field(repr=False)
    mse_per_coordinate: float
    mse_total: float

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def quantize(self, values) -> np.ndarray:
        """Index (uint8) of the cell of each value (a value exactly on a boundary goes to the upper cell)."""
        x = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
        return _core.codebook_quantize(self.dim, self.bits, self.density, x.reshape(-1)).reshape(x.shape)

    def dequantize(self, indices) -> np.ndarray:
        """float32 centroid of each index."""
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices: expected an integer array, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.levels):
            raise ValueError(f"indices: expected values in [0, {self.levels - 1}], got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        flat = np.ascontiguousarray(idx.reshape(-1), dtype=np.uint8)
        return _core.codebook_dequantize(self.dim, self.bits, self.density, flat).reshape(idx.shape)


def codebook(dim: int, bits: int, density: str = "sphere") -> Codebook:
    """The Lloyd-Max codebook for ``dim`` (>= 2), ``bits`` (1..8) and density "sphere" (exact) or
    "gaussian" (N(0, 1/dim) approximation). Solved to ~1e-12 in C++ and cached."""
    dim = _check_int("dim", dim, 2, 1 << 24)
    bits = _check_int("bits", bits, 1, 8)
    if not isinstance(density, str):
        raise TypeError(f"density: expected a str ('sphere' or 'gaussian'), got {type(density).__name__}")
    if density not in DENSITIES:
        raise ValueError(f"density: expected 'sphere' or 'gaussian', got {density!r}")
    solved = _core.codebook(dim, bits, density)
    centroids = np.array(solved["centroids"], dtype=np.float64)
    boundaries = np.array(solved["boundaries"], dtype=np.float64)
    centroids.setflags(write=False)
    boundaries.setflags(write=False)
    return Codebook(dim, bits, density, centroids, boundaries, float(solved["mse_per_coordinate"]),
                    float(solved["mse_total"]))
