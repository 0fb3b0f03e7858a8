"""Bundled sample data: real KV vectors captured from a small LLM.

``load_kv_sample()`` returns post-RoPE queries, keys and values from SmolLM2-135M-Instruct (captured by
benchmarks/capture_kv.py over the start of the GPL-3 text), so that quantizers and rotations can be
evaluated on real, anisotropic data (keys have outlier channels) and not only on isotropic synthetic vectors.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np

__all__ = ["load_kv_sample", "KV_SAMPLE_FILE"]

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
