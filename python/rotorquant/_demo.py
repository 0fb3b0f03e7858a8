"""The default job of the command line: how each rotation kind prepares vectors for a
Lloyd-Max scalar quantizer, on isotropic vectors and on vectors with outlier channels.

Pipeline per vector (rotorquant.Quantizer, mse mode, fp32 norms): normalize -> rotate ->
per-coordinate Lloyd-Max code -> packed bits; decode: centroid -> inverse rotate -> rescale. Isotropic data cannot rank rotations (every kind reaches the
Lloyd-Max optimum, DESIGN.md section 4.1); outlier channels separate them.
"""
from __future__ import annotations

import time

import numpy as np

from ._codebook import codebook
from ._quantizer import Quantizer
from ._rotation import rotation_kinds


def make_vectors(n: int, dim: int, seed: int, outlier_channels: int = 0, outlier_scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if outlier_channels:
        channels = rng.choice(dim, size=min(outlier_channels, dim), replace=False)
        x[:, channels] *= outlier_scale
    return x


def quantize_roundtrip(quantizer: Quantizer, x: np.ndarray) -> np.ndarray:
    return quantizer.decode(quantizer.encode(x))


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
    header = (f"{'rotation':>10} {'padded':>6} {'B/vec':>6} {'params':>8} {'optimum':>9} {'isotropic':>10} "
              f"{'outliers':>10} {'M vec/s':>8}")
    print(header)
    print("-" * len(header))
    for kind in rotation_kinds():
        quantizer = Quantizer(dim, bits, rotation=kind, seed=seed, norm_dtype="float32")
        optimum = codebook(quantizer.padded_dim, bits).mse_total
        start = time.perf_counter()
        iso = relative_mse(isotropic, quantize_roundtrip(quantizer, isotropic))
        elapsed = time.perf_counter() - start
        out = relative_mse(outliers, quantize_roundtrip(quantizer, outliers))
        print(f"{kind:>10} {quantizer.padded_dim:>6} {quantizer.bytes_per_vector:>6} {quantizer.num_parameters:>8} "
              f"{optimum:>9.4f} {iso:>10.4f} {out:>10.4f} {n / elapsed / 1e6:>8.2f}")
    print("\nB/vec: real bytes of one code (packed indices + norm); fp16 would take", 2 * dim, "bytes.")
