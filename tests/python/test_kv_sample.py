"""The bundled real KV sample (rotorquant.data.load_kv_sample)."""
import numpy as np
import pytest

from rotorquant.data import load_kv_sample


@pytest.fixture(scope="module")
def sample():
    return load_kv_sample()


def test_metadata_describes_smollm2(sample):
    meta = sample["metadata"]
    assert "SmolLM2-135M" in meta["model"]
    assert meta["head_dim"] == 64
    assert meta["num_heads"] == 9
    assert meta["num_kv_heads"] == 3
    assert meta["tokens"] >= 128
    assert sample["layers"] == sorted(meta["layers"])
    assert 0 in sample["layers"] and len(sample["layers"]) >= 3


def test_shapes_dtypes_and_finite(sample):
    meta = sample["metadata"]
    tokens, head_dim = meta["tokens"], meta["head_dim"]
    for layer in sample["layers"]:
        q, k, v = sample["q"][layer], sample["k"][layer], sample["v"][layer]
        assert q.shape == (meta["num_heads"], tokens, head_dim)
        assert k.shape == (meta["num_kv_heads"], tokens, head_dim)
        assert v.shape == k.shape
        for array in (q, k, v):
            assert array.dtype == np.float32
            assert array.flags.c_contiguous
            assert np.isfinite(array).all()
            assert np.abs(array).max() > 0.1  # not an empty / zeroed capture


def test_gqa_relation(sample):
    meta = sample["metadata"]
    assert meta["num_heads"] % meta["num_kv_heads"] == 0
    assert meta["num_heads"] // meta["num_kv_heads"] == 3


def test_real_keys_have_outlier_channels(sample):
    ratios = []
    for layer in sample["layers"]:
        k = sample["k"][layer].astype(np.float64)
        channel_rms = np.sqrt((k ** 2).mean(axis=1))  # (kv_heads, head_dim)
        ratios.append((channel_rms.max(axis=1) / np.median(channel_rms, axis=1)).max())
    assert max(ratios) > 3.0, ratios


def test_keys_are_not_isotropic_unlike_random_vectors(sample):
    # The same statistic on isotropic Gaussian vectors of the same shape stays small: the outlier
    # property is a property of the data, not of the statistic.
    layer = sample["layers"][1]
    k = sample["k"][layer]
    rng = np.random.default_rng(0)
    g = rng.standard_normal(k.shape)
    rms_g = np.sqrt((g ** 2).mean(axis=1))
    rms_k = np.sqrt((k.astype(np.float64) ** 2).mean(axis=1))
    ratio_g = (rms_g.max(axis=1) / np.median(rms_g, axis=1)).max()
    ratio_k = (rms_k.max(axis=1) / np.median(rms_k, axis=1)).max()
    assert ratio_g < 1.5
    assert ratio_k > 2 * ratio_g


def test_attention_with_sample_is_causal_softmax_ready(sample):
    # Real queries against real keys give peaked (non-uniform) attention: the sample is usable for
    # attention-fidelity studies. Entropy well below log(tokens) for the last query.
    meta = sample["metadata"]
    layer = sample["layers"][-1]
    q = sample["q"][layer][0, -1].astype(np.float64)
    k = sample["k"][layer][0].astype(np.float64)
    scores = k @ q / np.sqrt(meta["head_dim"])
    p = np.exp(scores - scores.max())
    p /= p.sum()
    entropy = -(p * np.log(p + 1e-300)).sum()
    assert entropy < 0.9 * np.log(meta["tokens"])
