"""Quality study for the KV-cache defaults (issue 4): which knobs bring 3-4 bit keys close to full precision?

A *simulated* cache: a ``DynamicLayer`` subclass that stores K/V quantized-then-dequantized with
``rotorquant.Quantizer`` (the real encode/decode of the C++ core; one quantizer per layer, KV head and K/V, seed
``seed + 2 * (layer * kv_heads + head) + (0 for K, 1 for V)``), so every knob can be measured before the real cache
(which attends on the codes) exists. It follows the protocol of ``rotorquant.evaluation.chunked_perplexity``:
2048 tokens of GPL-3 in chunks of 128; each chunk attends to the quantized cache of all earlier chunks.

Knobs (each an exact re-parameterization or a storage choice, never a change of the model):
- ``window``: the most recent ``window`` tokens stay in full precision; older ones are quantized when they leave
  the window (``window=0``: everything quantized, the current chunk included).
- ``center_keys`` / ``center_values``: per layer and KV head, the mean of the first chunk's keys (values) is
  subtracted before quantizing and added back after decoding (exact for attention: softmax is shift-invariant
  in the keys, and the value mean is added back once because the probabilities sum to 1).
- ``key_scaling``: per layer, KV head and channel, keys are divided by s before quantizing and multiplied by s
  after decoding (equivalent to scaling queries by s); s = (channel RMS of the first chunk's keys) ** power.
- ``protected_layers`` with ``protected_bits``: those layers use more bits for K and V.
- ``norm_correction``: the quantizer's option storing n / ||c[idx]||.

    python benchmarks/kv_quality_study.py [--set study|combo|all] [--only NAME ...] [--tokens 2048] [--json out.jsonl]

Prints one line per configuration: perplexity, delta against the DynamicCache run of the same process, bytes per
token (real code bytes outside the window), ratio to bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class SimConfig:
    name: str
    key_bits: int = 4
    value_bits: int = 3
    rotation: str = "hadamard"
    mode: str = "mse"
    window: int = 0
    center_keys: bool = False
    center_values: bool = False
    key_scaling: Optional[float] = None  # power of the channel RMS, None = off
    protected_layers: Tuple[int, ...] = ()
    protected_bits: int = 8
    norm_correction: bool = False
    seed: int = 0


def make_simulated_cache(config: SimConfig, model_config):
    """A transformers Cache whose layers store quantized-then-dequantized K/V (see module docstring)."""
    import torch
    from transformers.cache_utils import Cache, DynamicLayer

    import rotorquant

    text_config = model_config.get_text_config(decoder=True)
    num_layers = int(text_config.num_hidden_layers)
    kv_heads = int(text_config.num_key_value_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)
    protected = {int(layer) % num_layers for layer in config.protected_layers}

    class SimulatedLayer(DynamicLayer):
        def __init__(self, layer_idx: int):
            super().__init__()
            self.layer_idx = layer_idx
            bits_k = config.protected_bits if layer_idx in protected else config.key_bits
            bits_v = config.protected_bits if layer_idx in protected else config.value_bits
            mode = config.mode
            self.quantizers = []
            for head in range(kv_heads):
                base = config.seed + 2 * (layer_idx * kv_heads + head)
                nc = config.norm_correction and mode == "mse"
                qk = rotorquant.Quantizer(head_dim, bits_k, rotation=config.rotation, mode=mode if bits_k > 1 else "mse",
                                          seed=base, norm_correction=nc)
                qv = rotorquant.Quantizer(head_dim, bits_v, rotation=config.rotation, mode=mode if bits_v > 1 else "mse",
                                          seed=base + 1, norm_correction=nc)
                self.quantizers.append((qk, qv))
            self.key_shift = self.value_shift = self.key_scale = None
            self.old_keys = self.old_values = None  # dequantized (float) quantized part
            self.recent_keys = self.recent_values = None  # full-precision window

        def _calibrate(self, keys, values):
            # keys: (batch, kv_heads, tokens, head_dim); statistics per KV head over batch and tokens
            if config.center_keys:
                self.key_shift = keys.mean(dim=(0, 2), keepdim=True)
            if config.center_values:
                self.value_shift = values.mean(dim=(0, 2), keepdim=True)
            if config.key_scaling is not None:
                centered = keys - self.key_shift if self.key_shift is not None else keys
                rms = centered.pow(2).mean(dim=(0, 2), keepdim=True).sqrt().clamp_min(1e-6)
                scale = rms.pow(config.key_scaling)
                # normalize so the geometric mean of s per head is 1 (only the shape matters)
                self.key_scale = scale / scale.log().mean(dim=-1, keepdim=True).exp()

        def _roundtrip(self, x, which: int, shift, scale):
            y = x
            if shift is not None:
                y = y - shift
            if scale is not None:
                y = y / scale
            out = torch.empty_like(y)
            for head in range(kv_heads):
                q = self.quantizers[head][which]
                part = y[:, head].contiguous().float()
                out[:, head] = q.decode(q.encode(part)).to(y.dtype)
            if scale is not None:
                out = out * scale
            if shift is not None:
                out = out + shift
            return out

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._calibrate(key_states, value_states)
                empty = key_states[:, :, :0]
                self.old_keys, self.old_values = empty.clone(), value_states[:, :, :0].clone()
                self.recent_keys, self.recent_values = empty.clone(), value_states[:, :, :0].clone()
            self.recent_keys = torch.cat([self.recent_keys, key_states], dim=-2)
            self.recent_values = torch.cat([self.recent_values, value_states], dim=-2)
            overflow = self.recent_keys.shape[-2] - config.window
            if overflow > 0:
                k_out = self._roundtrip(self.recent_keys[:, :, :overflow], 0, self.key_shift, self.key_scale)
                v_out = self._roundtrip(self.recent_values[:, :, :overflow], 1, self.value_shift, None)
                self.old_keys = torch.cat([self.old_keys, k_out], dim=-2)
                self.old_values = torch.cat([self.old_values, v_out], dim=-2)
                self.recent_keys = self.recent_keys[:, :, overflow:]
                self.recent_values = self.recent_values[:, :, overflow:]
            self.keys = torch.cat([self.old_keys, self.recent_keys], dim=-2)
            self.values = torch.cat([self.old_values, self.recent_values], dim=-2)
            return self.keys, self.values

    class SimulatedCache(Cache):
        def __init__(self):
            super().__init__(layers=[SimulatedLayer(i) for i in range(num_layers)])

    return SimulatedCache()


def study_configs() -> List[SimConfig]:
    """The study, most informative first (a full 2048-token pass costs 0.5-3 min on a shared 2-core machine):
    the plain TurboQuant reference (hadamard, everything quantized, no centering), one knob at a time, then
    the combinations that meet the targets."""
    S = SimConfig
    return [
        S("plain K4/V4", 4, 4),
        S("scale0.5 K4/V4", 4, 4, key_scaling=0.5),
        S("window128 K4/V3", 4, 3, window=128),
        S("window128+scale0.5 K4/V3", 4, 3, window=128, key_scaling=0.5),
        S("window128+scale0.5 K4/V4", 4, 4, window=128, key_scaling=0.5),
        S("window128+scale0.5 K8/V4", 8, 4, window=128, key_scaling=0.5),
        S("window128+scale0.5 K3/V3", 3, 3, window=128, key_scaling=0.5),
        S("plain K4/V3", 4, 3),
        S("center K4/V4", 4, 4, center_keys=True),
        S("window128+center+scale0.5 K4/V3", 4, 3, window=128, center_keys=True, key_scaling=0.5),
        S("scale1.0 K4/V4", 4, 4, key_scaling=1.0),
        S("scale0.25 K4/V4", 4, 4, key_scaling=0.25),
        S("window128+scale0.5+protect0,-1 K3/V3", 3, 3, window=128, key_scaling=0.5, protected_layers=(0, -1)),
        S("window128 K4/V4", 4, 4, window=128),
        S("plain K3/V3", 3, 3),
        S("plain K8/V4", 8, 4),
        S("protect0,-1 K4/V4", 4, 4, protected_layers=(0, -1)),
        S("normcorr K4/V4", 4, 4, norm_correction=True),
        S("scale0.75 K4/V4", 4, 4, key_scaling=0.75),
        S("plain K8/V8", 8, 8),
    ]


def combo_configs() -> List[SimConfig]:
    """Extra combinations (run with --set combo)."""
    S = SimConfig
    return [S("window128+center+scale0.5 K4/V4", 4, 4, window=128, center_keys=True, key_scaling=0.5),
            S("window128+scale0.5 K4/V2", 4, 2, window=128, key_scaling=0.5),
            S("window128+scale0.5 K2/V2", 2, 2, window=128, key_scaling=0.5)]


def bytes_per_token(config: SimConfig, num_layers=30, kv_heads=3, head_dim=64) -> Dict[str, float]:
    from rotorquant.evaluation import kv_bytes_per_token

    return kv_bytes_per_token(num_layers, kv_heads, head_dim, config.key_bits, config.value_bits, config.rotation,
                              config.mode, config.protected_layers, config.protected_bits)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--set", choices=["study", "combo", "all"], default="study")
    parser.add_argument("--only", nargs="*", default=None, help="run only configurations whose name contains one of these")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    args = parser.parse_args(argv)

    import torch

    from rotorquant import evaluation

    configs = {"study": study_configs, "combo": combo_configs}.get(args.set, lambda: study_configs() + combo_configs())()
    if args.only:
        configs = [c for c in configs if any(o in c.name for o in args.only)]
    model, tokenizer = evaluation.load_smollm2()
    text = evaluation.load_text()
    base = evaluation.chunked_perplexity(model, tokenizer, text, args.tokens, args.chunk)
    print(f"baseline DynamicCache perplexity {base['perplexity']:.4f} ({base['seconds']:.1f} s, "
          f"torch threads {torch.get_num_threads()})", flush=True)
    print(f"| configuration | perplexity | delta | bytes/token | vs bf16 | s |")
    for config in configs:
        result = evaluation.chunked_perplexity(model, tokenizer, text, args.tokens, args.chunk,
                                               lambda m, c=config: make_simulated_cache(c, m.config))
        delta = result["perplexity"] / base["perplexity"] - 1.0
        b = bytes_per_token(config)
        print(f"| {config.name} | {result['perplexity']:.4f} | {100 * delta:+.2f}% | {b['bytes_per_token']} | "
              f"{b['ratio_to_bf16']:.3f} | {result['seconds']:.0f} |", flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps({"config": dataclasses.asdict(config), "perplexity": result["perplexity"],
                                         "baseline": base["perplexity"], "delta": delta, "bytes": b,
                                         "seconds": result["seconds"]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
