"""The default job of the command line: how each rotation kind prepares vectors for a
Lloyd-Max scalar quantizer, on isotropic vectors and on vectors with outlier channels.

Pipeline per vector (composed from core primitives; the fused Quantizer comes with the
quantizer issue): normalize -> rotate -> per-coordinate Lloyd-Max code -> centroid ->
inverse rotate -> rescale. Isotropic data cannot rank rotations (every kind reaches the
Lloyd-Max optimum, DESIGN.md section 4.1); outlier channels separate them.
"""
from __future__ import annotations

import time

import numpy as np

from ._codebook import codebook
from ._rotation import Rotation, rotation_kinds


def make_vectors(n: int, dim: int, seed: int, outlier_channels: int = 0, outlier_scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if outlier_channels:
        channels = rng.choice(dim, size=min(outlier_channels, dim), replace=False)
        x[:, channels] *= outlier_scale
    return x


def quantize_roundtrip(rotation: Rotation, x: np.ndarray, bits: int) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32)
    unit = x / np.where(norms > 0, norms, 1.0)
    rotated = rotation.apply(unit)
    book = codebook(rotation.padded_dim, bits)
    codes = book.quantize(rotated)
    restored = rotation.inverse(book.dequantize(codes))
    return restored * norms


def relative_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(np.sum((x - x_hat) ** 2) / np.sum(x * x))


def run_demo(dim: int = 128, bits: int = 3, n: int = 20000, seed: int = 0) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: expected 1..8, got {bits}")
    if dim < 2:
        raise ValueError(f"dim: expected >= 2, got {dim}")
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    isotropic = make_vectors(n, dim, seed)
    outliers = make_vectors(n, dim, seed + 1, outlier_channels=max(1, dim // 32), outlier_scale=12.0)
    print(f"rotorquant demo: n={n} vectors, dim={dim}, {bits} bits/coordinate, seed={seed}")
    print("relative MSE ||x - x^||^2 / ||x||^2 after normalize -> rotate -> Lloyd-Max -> inverse")
    print("(isotropic data: every rotation should sit at the Lloyd-Max optimum; outlier channels x12 separate them)\n")
    header = f"{'rotation':>10} {'padded':>6} {'params':>8} {'optimum':>9} {'isotropic':>10} {'outliers':>10} {'M vec/s':>8}"
    print(header)
    print("-" * len(header))
    for kind in rotation_kinds():
        rotation = Rotation(kind, dim, seed=seed)
        optimum = codebook(rotation.padded_dim, bits).mse_total
        start = time.perf_counter()
        iso = relative_mse(isotropic, quantize_roundtrip(rotation, isotropic, bits))
        elapsed = time.perf_counter() - start
        out = relative_mse(outliers, quantize_roundtrip(rotation, outliers, bits))
        print(f"{kind:>10} {rotation.padded_dim:>6} {rotation.num_parameters:>8} {optimum:>9.4f} {iso:>10.4f} "
              f"{out:>10.4f} {n / elapsed / 1e6:>8.2f}")
