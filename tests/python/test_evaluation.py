"""Tests of the evaluation harness (rotorquant.evaluation): the chunked-perplexity protocol, the needle prompt,
the byte accounting; the real SmolLM2 model only under the `model` marker."""
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from rotorquant import Quantizer, evaluation  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real (fast) word-level tokenizer built locally: no download."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4}
    texts = list(evaluation.FILLER_SENTENCES) + [evaluation.NEEDLE_TEMPLATE, evaluation.NEEDLE_QUESTION]
    for text in texts:
        for word, _ in Whitespace().pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    for digit in "0123456789":
        vocab.setdefault(digit, len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model(word_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(word_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    return model


def _random_ids(n, vocab, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=generator)


def _reference_perplexity(model, ids):
    """Independent float64 reference: one full forward, mean NLL via cross_entropy."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    return math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))


@pytest.mark.parametrize("chunk", [1, 7, 32, 128, 300])
def test_chunked_dynamic_cache_equals_full_forward(tiny_model, chunk):
    ids = _random_ids(200, tiny_model.config.vocab_size)
    reference = _reference_perplexity(tiny_model, ids)
    result = evaluation.chunked_perplexity(tiny_model, None, ids, n_tokens=None, chunk=chunk)
    assert result["predictions"] == 199
    assert result["tokens"] == 200
    assert abs(result["perplexity"] / reference - 1.0) < 1e-4
    no_cache = evaluation.chunked_perplexity(tiny_model, None, ids, n_tokens=None, chunk=None)
    assert abs(no_cache["perplexity"] / reference - 1.0) < 1e-6


def test_chunked_perplexity_sees_the_cache(tiny_model):
    """A cache that blanks earlier chunks must change the result: the protocol really attends to the cache."""
    from transformers import DynamicCache

    class ForgetfulCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            old = keys.shape[-2] - key_states.shape[-2]
            keys, values = keys.clone(), values.clone()
            keys[:, :, :old] = 0.0  # what earlier chunks left in the cache is lost
            values[:, :, :old] = 0.0
            return keys, values

    ids = _random_ids(192, tiny_model.config.vocab_size, seed=2)
    full = evaluation.chunked_perplexity(tiny_model, None, ids, n_tokens=None, chunk=64)
    forgetful = evaluation.chunked_perplexity(tiny_model, None, ids, n_tokens=None, chunk=64,
                                              cache_factory=lambda m: ForgetfulCache(config=m.config))
    assert abs(forgetful["perplexity"] / full["perplexity"] - 1.0) > 1e-3


def test_chunked_perplexity_rejects_bad_arguments(tiny_model):
    ids = _random_ids(50, tiny_model.config.vocab_size)
    with pytest.raises(ValueError, match="fewer than n_tokens"):
        evaluation.chunked_perplexity(tiny_model, None, ids, n_tokens=100)
    with pytest.raises(ValueError, match="chunk"):
        evaluation.chunked_perplexity(tiny_model, None, ids, n_tokens=None, chunk=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluation.chunked_perplexity(tiny_model, None, ids[:, :1], n_tokens=None)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_prompt_places_the_passkey_at_the_depth(word_tokenizer, depth):
    prompt = evaluation.needle_prompt(word_tokenizer, depth, filler_tokens=300, passkey="4 7 1 3 2")
    ids = prompt["input_ids"]
    filler = prompt["filler_tokens"]
    assert filler >= 300
    # the needle sits at the sentence boundary nearest the depth: within one filler sentence (<= 5 words here)
    assert abs(prompt["actual_depth"] - depth) * filler <= 5
    needle = word_tokenizer.decode(ids[prompt["needle_start"]:prompt["needle_end"]])
    assert needle.startswith("The pass key is 4 7 1 3 2 .")
    before = ids[prompt["filler_start"]:prompt["needle_start"]]
    assert len(before) == round(prompt["actual_depth"] * filler)
    # filler tokens around the needle add up; the question and the generation prompt come last
    after = ids[prompt["needle_end"]:prompt["filler_end"]]
    assert len(before) + len(after) == filler
    assert ids[:2] == word_tokenizer.convert_tokens_to_ids(["<|im_start|>", "user"])
    assert ids[-3:] == word_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "assistant"])
    assert word_tokenizer.decode(ids[prompt["filler_end"]:]).startswith("What is the pass key ?")


def test_needle_prompt_rejects_bad_depth(word_tokenizer):
    with pytest.raises(ValueError, match="depth"):
        evaluation.needle_prompt(word_tokenizer, 1.5)
    with pytest.raises(ValueError, match="filler_tokens"):
        evaluation.needle_prompt(word_tokenizer, 0.5, filler_tokens=0)


def test_needle_retrieval_runs_and_scores(tiny_model, word_tokenizer):
    result = evaluation.needle_retrieval(tiny_model, word_tokenizer, depths=(0.5,), filler_tokens=60,
                                         max_new_tokens=3)
    assert result["total"] == 1
    row = result["results"][0]
    assert row["new_tokens"] <= 3
    assert row["correct"] == (row["passkey"] in "".join(ch for ch in row["answer"] if ch.isdigit()))


@pytest.mark.parametrize("rotation", ["hadamard", "rotor3"])
def test_kv_bytes_per_token_counts_real_code_bytes(rotation):
    layers, heads, dim = 30, 3, 64
    result = evaluation.kv_bytes_per_token(layers, heads, dim, 4, 3, rotation=rotation, protected_layers=(0, -1))
    k4 = Quantizer(dim, 4, rotation=rotation).bytes_per_vector
    v3 = Quantizer(dim, 3, rotation=rotation).bytes_per_vector
    b8 = Quantizer(dim, 8, rotation=rotation).bytes_per_vector
    assert result["bytes_per_token"] == heads * (28 * (k4 + v3) + 2 * 2 * b8)
    assert result["bf16_bytes_per_token"] == layers * heads * 2 * dim * 2
    if rotation == "hadamard":
        # 4-bit index bytes 32 + 2 norm bytes; 3-bit 24 + 2
        assert (k4, v3) == (34, 26)


@pytest.mark.parametrize("key_bits,value_bits,mode", [(4, 3, "mse"), (8, 4, "mse"), (4, 4, "prod")])
def test_kv_bytes_per_token_matches_the_kv_cache(key_bits, value_bits, mode):
    """The byte accounting agrees with what rotorquant.KVCache reports for its codes."""
    from rotorquant import KVCache

    layers, heads, dim = 6, 3, 64
    cache = KVCache(layers, heads, dim, key_bits=key_bits, value_bits=value_bits, mode=mode, protected_layers=(0, -1))
    expected = heads * sum(cache.code_bytes_per_token(layer) for layer in range(layers))
    result = evaluation.kv_bytes_per_token(layers, heads, dim, key_bits, value_bits, mode=mode,
                                           protected_layers=(0, -1))
    assert result["bytes_per_token"] == expected


def test_shared_direction_stress_shows_what_centering_does():
    """With 99% of the key energy in one shared direction, plain per-vector quantization destroys attention;
    centering (exact for softmax) restores it to the quality of ordinary keys."""
    plain, centered = evaluation.shared_direction_stress(4, 4, tokens=256, queries=32)
    assert not plain["center_keys"] and centered["center_keys"]
    assert abs(plain["measured_shared_energy"] - 0.99) < 0.005
    assert centered["attention_kl"] < plain["attention_kl"] / 10
    assert centered["output_rel_error"] < plain["output_rel_error"] / 2
    assert centered["top1"] > plain["top1"]


def test_evaluation_import_is_light():
    """Importing rotorquant.evaluation must not import torch or transformers by itself (checked in a subprocess)."""
    import subprocess
    import sys

    code = ("import sys, rotorquant.evaluation; "
            "print(int('torch' in sys.modules), int('transformers' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]


def test_grid_budget():
    specs = evaluation.evaluation_grid(modes=("mse", "prod"))
    kinds = [s.kind for s in specs]
    assert kinds[:2] == ["dynamic", "quanto"]
    rq = [s for s in specs if s.kind == "rotorquant"]
    defaults = [s for s in rq if "residual_window" not in s and s["mode"] == "mse"]
    assert len(defaults) == 7 * 5
    zero = [s for s in rq if s.get("residual_window") == 0]
    assert {(s["key_bits"], s["value_bits"]) for s in zero if s["rotation"] == "hadamard"} == \
        {(8, 8), (8, 4), (4, 4), (4, 3), (3, 3), (4, 2), (2, 2)}
    assert {s["rotation"] for s in zero if (s["key_bits"], s["value_bits"]) == (4, 4)} == \
        {"dense", "hadamard", "rotor3", "planar", "quat"}
    assert len({s.label for s in specs}) == len(specs)


def test_load_smollm2_rejects_non_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        evaluation.load_smollm2(path)
    with pytest.raises(FileNotFoundError, match="gguf"):
        evaluation.load_smollm2(tmp_path)


@pytest.mark.model
def test_smollm2_dynamic_cache_perplexity_is_sane():
    pytest.importorskip("gguf")
    model, tokenizer = evaluation.load_smollm2()
    text = evaluation.load_text()
    result = evaluation.chunked_perplexity(model, tokenizer, text, n_tokens=256, chunk=128)
    assert math.isfinite(result["perplexity"])
    # measured 21.67 on 256 tokens of GPL-3 (19.66 on 2048); a broken model or protocol lands far outside
    assert 10.0 < result["perplexity"] < 40.0
