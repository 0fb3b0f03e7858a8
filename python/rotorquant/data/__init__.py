"""Sample data: real KV vectors captured from a small LLM, and synthetic keys with outlier channels.

``load_kv_sample()`` returns post-RoPE queries, keys and values from SmolLM2-135M-Instruct (captured by
benchmarks/capture_kv.py over the start of the GPL-3 text), so that quantizers and rotations can be
evaluated on real, anisotropic data (keys have outlier channels) and not only on isotropic synthetic vectors.
``outlier_keys(dim, n, seed)`` draws anisotropic synthetic keys of any size (benchmarks/bench_rotor_network.py,
tests/python/test_rotor_network.py).
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np

__all__ = ["load_kv_sample", "outlier_keys", "KV_SAMPLE_FILE"]

KV_SAMPLE_FILE = "smollm2_kv.npz"


def load_kv_sample() -> dict[str, Any]:
    """Load the bundled SmolLM2 KV sample.

    Returns a dict with
      ``layers``: list of captured layer indices (e.g. [0, 1, 15, 29]),
      ``q``, ``k``, ``v``: dicts layer -> float32 numpy array; q is (num_heads, tokens, head_dim),
                           k and v are (num_kv_heads, tokens, head_dim); query head h uses kv head
                           h // (num_heads // num_kv_heads) (GQA),
      ``metadata``: dict (model, text_source, tokens, layers, head_dim, num_heads, num_kv_heads, ...).
    """
    resource = resources.files(__name__).joinpath(KV_SAMPLE_FILE)
    with resources.as_file(resource) as path:
        with np.load(path, allow_pickle=False) as archive:
            metadata = json.loads(str(archive["metadata"]))
            layers = [int(layer) for layer in metadata["layers"]]
            sample: dict[str, Any] = {"layers": layers, "metadata": metadata, "q": {}, "k": {}, "v": {}}
            for layer in layers:
                for name in ("q", "k", "v"):
                    sample[name][layer] = np.ascontiguousarray(archive[f"{name}_L{layer}"], dtype=np.float32)
    return sample


def outlier_keys(dim: int, n: int, seed: int) -> np.ndarray:
    """Synthetic anisotropic keys, float32 (n, dim): per-channel scales exp(U(-0.5, 0.5)), max(2, dim // 32)
    outlier channels scaled by U(10, 20) (outlier ratio 10-20x) with a mean offset of half their scale and a
    random sign, plus N(0, 1) noise times the channel scales; all from ``numpy.random.default_rng(seed)``.

    Rows are drawn in blocks (bounded float64 temporaries for large n); numpy's Generator draws the same normal
    stream in any block size, so the keys are those of one ``standard_normal((n, dim))`` draw."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-0.5, 0.5, dim))
    count = max(2, dim // 32)
    channels = rng.choice(dim, count, replace=False)
    scale[channels] *= rng.uniform(10, 20, count)
    mean = np.zeros(dim)
    mean[channels] = 0.5 * scale[channels] * rng.choice([-1.0, 1.0], count)
    keys = np.empty((n, dim), np.float32)
    block = max(1, (1 << 22) // max(dim, 1))  # ~32 MiB of float64 per block
    for start in range(0, n, block):
        rows = min(block, n - start)
        keys[start:start + rows] = mean + scale * rng.standard_normal((rows, dim))
    return keys
