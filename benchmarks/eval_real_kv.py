"""Quantizer quality on real KV vectors (SmolLM2-135M-Instruct sample shipped as rotorquant.data).

For every rotation kind x mode (mse, prod) x bits in {2, 3, 4}, over the sample's layers and KV heads:

- relative MSE of keys and of values: sum ||x - x_hat||^2 / sum ||x||^2 (decode of the codes);
- attention fidelity with the model's real post-RoPE queries (GQA: query head h reads KV head
  h // (num_heads / num_kv_heads); causal; scale 1/sqrt(head_dim)), scores estimated on the key codes
  with ``Quantizer.inner_product``:
    KL(softmax(true scores) || softmax(estimated scores)) in nats, mean over query rows;
    top-1: fraction of rows whose attention argmax is unchanged;
    slope: least-squares slope of estimated on true scores (bias; 1 = unbiased scale);
    out cos: cosine similarity of the attention output with K and V both quantized
             (estimated scores, decoded V) against the exact output, mean over rows.
Query rows: every query position t >= --min-context (default 32, i.e. at least 32 visible keys),
every --query-stride-th one (default 1 = all); all query heads.

    python benchmarks/eval_real_kv.py [--bits 2 3 4] [--out docs/results_real_kv.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import rotorquant

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_NPZ = REPO_ROOT / "python" / "rotorquant" / "data" / "smollm2_kv.npz"


def load_sample() -> dict:
    """The KV sample from the installed package, or from the source tree if the package predates it."""
    try:
        from rotorquant.data import load_kv_sample
        return load_kv_sample()
    except (ImportError, FileNotFoundError):
        with np.load(SOURCE_NPZ, allow_pickle=False) as archive:
            metadata = json.loads(str(archive["metadata"]))
            layers = [int(layer) for layer in metadata["layers"]]
            sample = {"layers": layers, "metadata": metadata, "q": {}, "k": {}, "v": {}}
            for layer in layers:
                for name in ("q", "k", "v"):
                    sample[name][layer] = np.ascontiguousarray(archive[f"{name}_L{layer}"], dtype=np.float32)
        return sample


def log_softmax_rows(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    s = np.where(mask, scores, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


class Totals:
    """Running sums of one (rotation, mode, bits) configuration over layers and heads."""

    def __init__(self):
        self.key_err = self.key_energy = self.value_err = self.value_energy = 0.0
        self.kl_sum = self.top1_sum = self.cos_sum = 0.0
        self.rows = 0
        self.sxy = self.sxx = 0.0  # slope of estimated on true (through the centred means)
        self.per_layer_key = {}
        self.bytes_per_vector = None

    def row(self, rotation, mode, bits):
        return {
            "rotation": rotation, "mode": mode, "bits": bits, "bytes": self.bytes_per_vector,
            "key_rel_mse": self.key_err / self.key_energy,
            "value_rel_mse": self.value_err / self.value_energy,
            "kl": self.kl_sum / self.rows, "top1": self.top1_sum / self.rows,
            "slope": self.sxy / self.sxx, "out_cos": self.cos_sum / self.rows,
        }


def evaluate(sample, rotation, mode, bits, query_rows, seed):
    meta = sample["metadata"]
    dim = int(meta["head_dim"])
    group = int(meta["num_heads"]) // int(meta["num_kv_heads"])
    scale = 1.0 / np.sqrt(dim)
    quantizer = rotorquant.Quantizer(dim, bits, rotation=rotation, mode=mode, seed=seed)
    totals = Totals()
    for layer in sample["layers"]:
        q_all, k_all, v_all = sample["q"][layer], sample["k"][layer], sample["v"][layer]
        tokens = k_all.shape[1]
        mask = (np.arange(tokens)[None, :] <= query_rows[:, None])  # (rows, tokens) causal
        layer_err = layer_energy = 0.0
        for kv_head in range(k_all.shape[0]):
            keys, values = k_all[kv_head], v_all[kv_head]
            key_codes = quantizer.encode(keys)
            value_codes = quantizer.encode(values)
            if totals.bytes_per_vector is None:
                totals.bytes_per_vector = key_codes.nbytes / len(key_codes)
            keys_hat = np.asarray(quantizer.decode(key_codes), dtype=np.float64)
            values_hat = np.asarray(quantizer.decode(value_codes), dtype=np.float64)
            err = float(((keys - keys_hat) ** 2).sum())
            energy = float((keys.astype(np.float64) ** 2).sum())
            totals.key_err += err
            totals.key_energy += energy
            layer_err += err
            layer_energy += energy
            totals.value_err += float(((values - values_hat) ** 2).sum())
            totals.value_energy += float((values.astype(np.float64) ** 2).sum())

            heads = range(kv_head * group, (kv_head + 1) * group)
            queries = np.ascontiguousarray(q_all[list(heads)][:, query_rows].reshape(-1, dim))
            estimated = np.asarray(quantizer.inner_product(key_codes, queries), dtype=np.float64)
            estimated = estimated.reshape(len(heads), len(query_rows), tokens) * scale
            true = (queries.astype(np.float64) @ keys.astype(np.float64).T).reshape(estimated.shape) * scale
            log_p = log_softmax_rows(true, mask)
            log_p_hat = log_softmax_rows(estimated, mask)
            p = np.exp(log_p)
            p_hat = np.exp(log_p_hat)
            kl = np.where(mask, p * (log_p - np.where(mask, log_p_hat, 0.0)), 0.0).sum(axis=-1)
            totals.kl_sum += float(kl.sum())
            top1 = np.argmax(np.where(mask, true, -np.inf), axis=-1) == np.argmax(np.where(mask, estimated, -np.inf),
                                                                                      axis=-1)
            totals.top1_sum += float(top1.sum())
            exact_out = p @ values.astype(np.float64)
            quant_out = p_hat @ values_hat
            cos = (exact_out * quant_out).sum(-1) / (np.linalg.norm(exact_out, axis=-1) *
                                                     np.linalg.norm(quant_out, axis=-1) + 1e-30)
            totals.cos_sum += float(cos.sum())
            totals.rows += kl.size
            t, e = true[:, mask], estimated[:, mask]
            t = t - t.mean(axis=-1, keepdims=True)
            e = e - e.mean(axis=-1, keepdims=True)
            totals.sxy += float((t * e).sum())
            totals.sxx += float((t * t).sum())
        totals.per_layer_key[layer] = layer_err / layer_energy
    return totals


def markdown(rows, per_layer, layers, header_lines):
    lines = list(header_lines)
    lines += ["", "| rotation | mode | bits | bytes/vec | key rel. MSE | value rel. MSE | attn KL (nats) | top-1 | "
              "score slope | out cos (K+V quantized) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rotation']} | {r['mode']} | {r['bits']} | {r['bytes']:.0f} | {r['key_rel_mse']:.4f} | "
                     f"{r['value_rel_mse']:.4f} | {r['kl']:.4f} | {r['top1']:.3f} | {r['slope']:.3f} | "
                     f"{r['out_cos']:.4f} |")
    lines += ["", "Key relative MSE per layer (mode mse):", "",
              "| rotation | bits | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
              "|---|---:|" + "---:|" * len(layers)]
    for (rotation, bits), values in per_layer.items():
        lines.append(f"| {rotation} | {bits} | " + " | ".join(f"{values[layer]:.4f}" for layer in layers) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rotations", nargs="+", default=None, help="default: rotorquant.rotation_kinds()")
    parser.add_argument("--modes", nargs="+", default=["mse", "prod"])
    parser.add_argument("--min-context", type=int, default=32, help="first query position used (visible keys - 1)")
    parser.add_argument("--query-stride", type=int, default=1, help="use every k-th query position")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()

    started = time.perf_counter()
    sample = load_sample()
    meta = sample["metadata"]
    tokens = int(meta["tokens"])
    query_rows = np.arange(min(args.min_context, tokens - 1), tokens, args.query_stride)
    rotations = args.rotations or rotorquant.rotation_kinds()

    rows, per_layer = [], {}
    for mode in args.modes:
        for bits in args.bits:
            for rotation in rotations:
                totals = evaluate(sample, rotation, mode, bits, query_rows, args.seed)
                rows.append(totals.row(rotation, mode, bits))
                if mode == "mse":
                    per_layer[(rotation, bits)] = totals.per_layer_key
                r = rows[-1]
                print(f"  {rotation:>8} {mode:>4} b={bits}: key {r['key_rel_mse']:.4f} value "
                      f"{r['value_rel_mse']:.4f} KL {r['kl']:.4f} top1 {r['top1']:.3f} cos {r['out_cos']:.4f}",
                      flush=True)
    elapsed = time.perf_counter() - started

    header = [
        "## Quantizers on real KV vectors (SmolLM2-135M-Instruct)",
        "",
        f"Data: `rotorquant.data.load_kv_sample()` — {meta['model']}; post-RoPE q/k/v captured over the first "
        f"{tokens} tokens of {meta['text_source']} (perplexity {meta.get('perplexity', '?')}); layers "
        f"{sample['layers']}, {meta['num_heads']} query heads, {meta['num_kv_heads']} KV heads, head_dim "
        f"{meta['head_dim']}. Totals over all layers and KV heads.",
        f"Quantizer(dim={meta['head_dim']}, bits, rotation, mode, seed={args.seed}), codebook 'sphere', fp16 norms, "
        "no norm correction; `prod` = (bits-1)-bit MSE + 1-bit QJL (same total bits). bytes/vec = "
        f"`codes.nbytes / len(codes)` (fp16 vector: {2 * int(meta['head_dim'])} B; rotor3 pads 64 to 66). "
        "Relative MSE is of `decode`; in prod mode decode adds the unbiased QJL residual estimate, whose "
        "variance makes its MSE larger than that of the (bits-1)-bit MSE part alone.",
        f"Attention: GQA, causal, scale 1/sqrt({meta['head_dim']}); query positions {query_rows[0]}..{tokens - 1} "
        f"step {args.query_stride} ({len(query_rows)} per head, all {meta['num_heads']} heads); estimated scores "
        "from `Quantizer.inner_product` on the key codes; out cos uses estimated scores and decoded V.",
        f"Run: rotorquant {rotorquant.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {elapsed:.0f} s.",
    ]
    text = markdown(rows, per_layer, sample["layers"], header)
    print()
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
