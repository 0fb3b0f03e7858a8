"""rotorquant.hf: RotorQuantCache and the "rotorquant" attention implementation with transformers.

Mechanics are tested on a tiny random Llama (fast, exact comparisons); the real SmolLM2 tests are marked `model`.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
rqhf = pytest.importorskip("rotorquant.hf")

from rotorquant import KVCache  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models():
    """(codes model, sdpa model): one random tiny Llama (GQA 4 query heads on 2 KV heads) in two attention modes."""
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = None  # fixed-length generations
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    model.set_attn_implementation("rotorquant")
    return model, sdpa


def forward_chunks(model, cache, ids, chunks):
    """Runs ids through the model in chunks (prefill, chunked prefill, decode); returns the logits of every token."""
    logits, start = [], 0
    with torch.no_grad():
        for size in chunks:
            out = model(input_ids=ids[:, start:start + size], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            start += size
    return torch.cat(logits, dim=1)


def test_registration_and_cache_shape(tiny_models):
    model, _ = tiny_models
    assert "rotorquant" in transformers.AttentionInterface._global_mapping
    cache = rqhf.RotorQuantCache(model.config, key_bits=4, value_bits=3)
    assert isinstance(cache, transformers.Cache) and len(cache.layers) == 3
    kv = cache.kv_cache
    assert (kv.num_layers, kv.num_kv_heads, kv.head_dim) == (3, 2, 16)
    assert cache.attention_on_codes()
    assert cache.get_seq_length() == 0
    # a model built with attn_implementation="rotorquant" (as from_pretrained does) selects it too
    built = transformers.LlamaForCausalLM._from_config(copy.deepcopy(model.config), attn_implementation="rotorquant")
    assert built.config._attn_implementation == "rotorquant"
    assert rqhf.RotorQuantCache(built.config).attention_on_codes()


def test_codes_path_equals_slow_path_and_never_dequantizes(tiny_models, monkeypatch):
    model, sdpa = tiny_models
    ids = torch.randint(3, 96, (1, 23), generator=torch.Generator().manual_seed(1))
    options = dict(key_bits=3, value_bits=2, residual_window=4, sink_tokens=2, center_values=True)
    slow = rqhf.RotorQuantCache(sdpa.config, **options)
    assert not slow.attention_on_codes()
    slow_logits = forward_chunks(sdpa, slow, ids, (9, 5, 1, 1, 7))

    def forbidden(*args, **kwargs):
        raise AssertionError("the codes path rebuilt full-precision K/V")

    fast = rqhf.RotorQuantCache(model.config, **options)
    monkeypatch.setattr(KVCache, "dequantize", forbidden)
    fast_logits = forward_chunks(model, fast, ids, (9, 5, 1, 1, 7))
    assert fast.get_seq_length() == 23 and fast.kv_cache.quantized_length(0) == 23 - 4 - 2
    torch.testing.assert_close(fast_logits, slow_logits, rtol=0, atol=1e-4)


def test_everything_in_window_equals_dynamic_cache(tiny_models):
    model, sdpa = tiny_models
    ids = torch.randint(3, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    reference = forward_chunks(sdpa, transformers.DynamicCache(), ids, (8, 1, 8))
    cache = rqhf.RotorQuantCache(model.config, residual_window=64)
    logits = forward_chunks(model, cache, ids, (8, 1, 8))
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    # Quantized: close to the reference within the quantization error, not equal.
    quantized = forward_chunks(model, rqhf.RotorQuantCache(model.config, residual_window=0, sink_tokens=0), ids,
                               (8, 1, 8))
    difference = (quantized - reference).abs().max().item()
    assert 1e-4 < difference < 0.2 * reference.abs().max().item()


def test_generate_greedy_with_8_bits_equals_dynamic_cache(tiny_models):
    model, sdpa = tiny_models
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    reference = sdpa.generate(ids, **kwargs)
    cache = rqhf.RotorQuantCache(model.config, key_bits=8, value_bits=8, residual_window=0, sink_tokens=0)
    out = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(out, reference)
    assert cache.get_seq_length() == out.shape[1] - 1


def test_beam_search_reorders_the_cache(tiny_models):
    model, sdpa = tiny_models
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    reference = sdpa.generate(ids, **kwargs)
    cache = rqhf.RotorQuantCache(model.config, residual_window=64)  # exact: must reproduce DynamicCache
    out = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(out, reference)
    assert cache.kv_cache.batch_size == 6
    quantized = model.generate(ids, past_key_values=rqhf.RotorQuantCache(model.config, residual_window=2), **kwargs)
    assert quantized.shape[0] == 2


def test_left_padded_batch_matches_single_sequences(tiny_models):
    model, _ = tiny_models
    generator = torch.Generator().manual_seed(5)
    first = torch.randint(3, 96, (1, 11), generator=generator)
    second = torch.randint(3, 96, (1, 6), generator=generator)
    ids = torch.zeros((2, 11), dtype=torch.long)
    mask = torch.zeros((2, 11), dtype=torch.long)
    ids[0], mask[0] = first[0], 1
    ids[1, 5:], mask[1, 5:] = second[0], 1
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    options = dict(key_bits=8, value_bits=8, residual_window=64)
    batched = model.generate(ids, attention_mask=mask, past_key_values=rqhf.RotorQuantCache(model.config, **options),
                             **kwargs)
    for row, single in ((0, first), (1, second)):
        alone = model.generate(single, attention_mask=torch.ones_like(single),
                               past_key_values=rqhf.RotorQuantCache(model.config, **options), **kwargs)
        assert torch.equal(batched[row, 11:], alone[0, single.shape[1]:])


def test_cache_operations(tiny_models):
    model, _ = tiny_models
    cache = rqhf.RotorQuantCache(model.config, residual_window=3)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    forward_chunks(model, cache, ids, (9,))
    assert cache.get_seq_length() == 9 and cache.get_mask_sizes(1, 0) == (10, 0)
    cache.crop(-2)
    assert cache.get_seq_length() == 7 and cache.get_seq_length(2) == 7
    cache.crop(5)
    assert cache.get_seq_length() == 5
    cache.batch_repeat_interleave(2)
    assert cache.kv_cache.batch_size == 4
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert cache.kv_cache.batch_size == 2
    cache.reorder_cache(torch.tensor([1, 1]))
    assert cache.nbytes() > 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    with pytest.raises(ValueError):
        rqhf.RotorQuantCache(model.config, key_bits=9)


def test_attention_without_cache_falls_back_to_sdpa(tiny_models):
    model, sdpa = tiny_models
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False).logits
        b = sdpa(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---- real model ---------------------------------------------------------------------------------


@pytest.mark.model
def test_smollm2_greedy_64_tokens_8_bits_equals_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The GNU General Public License is a free, copyleft license for", return_tensors="pt")
    kwargs = dict(max_new_tokens=64, do_sample=False)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
        reference = model.generate(**inputs, **kwargs)
        model.set_attn_implementation("rotorquant")
        # Everything but the 4 sink tokens quantized (no recent window).
        cache = rqhf.RotorQuantCache(model.config, key_bits=8, value_bits=8, residual_window=0, sink_tokens=4)
        out = model.generate(**inputs, past_key_values=cache, **kwargs)
    finally:
        model.set_attn_implementation(previous)
    assert out.shape[1] - inputs["input_ids"].shape[1] == 64
    assert torch.equal(out, reference)
    # 8-bit keys and values (+ fp16 norms): 2 * (64 + 2) bytes per token and KV head; 4 float32 sink tokens;
    # the key means.
    tokens = out.shape[1] - 1  # the last generated token is never fed back
    assert cache.kv_cache.quantized_length(0) == tokens - 4
    assert cache.nbytes() == 30 * 3 * ((tokens - 4) * 2 * (64 + 2) + 4 * 2 * 64 * 4 + 64 * 4)


@pytest.mark.model
def test_smollm2_padded_batch_and_beam_search_run(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = ["The license allows", "Free software means that the users have the freedom to"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("rotorquant")
        options = dict(key_bits=8, value_bits=8, residual_window=256)
        out = model.generate(**batch, past_key_values=rqhf.RotorQuantCache(model.config, **options), **kwargs)
        for row, prompt in enumerate(prompts):
            single = tokenizer(prompt, return_tensors="pt")
            alone = model.generate(**single, past_key_values=rqhf.RotorQuantCache(model.config, **options), **kwargs)
            assert torch.equal(out[row, -12:], alone[0, -12:])
        beams = model.generate(**tokenizer(prompts[1], return_tensors="pt"), num_beams=2, max_new_tokens=6,
                               do_sample=False, past_key_values=rqhf.RotorQuantCache(model.config))
        assert beams.shape[0] == 1
    finally:
        model.set_attn_implementation(previous)
