"""rotor_network against the other rotations: quality on keys with outlier channels, bytes, parameters, speed.

Two parts, every number measured in this run (the dense rotation is the baseline of every ratio):

1. Real keys: the bundled SmolLM2-135M-Instruct sample (``rotorquant.data.load_kv_sample()``, head_dim 64),
   all captured layers and KV heads, through benchmarks/eval_real_kv.py's evaluation: key relative MSE
   sum ||k - k^||^2 / sum ||k||^2 and attention KL(softmax(q.k) || softmax(q.k^)) with the model's real
   queries (GQA, causal, scale 1/sqrt(64)), mse mode.
2. Synthetic anisotropic keys for d in {64, 80, 96, 112, 128, 160, 192, 256, 576} and three sizes that
   rotor_network pads (97 -> 98, 176 -> 180, 208 -> 210): per-channel scales
   exp(U(-0.5, 0.5)), max(2, d/32) outlier channels scaled by U(10, 20) (outlier ratio 10-20x) with a mean
   offset of half their scale; n keys; queries N(0, I) with the scores q.k / sqrt(d) rescaled by one constant
   per d so that the exact scores have standard deviation 2 (typical attention logits); every query attends
   every key. Relative MSE and attention KL as above (scores estimated with ``Quantizer.inner_product``).

Speed: CPU ``Quantizer.encode`` throughput (vectors/s) on n keys of each d, best of --repeats, with
--threads worker threads, and the rotation alone (``Rotation.apply``); "x dense" is dense time / kind time
(> 1 = faster than dense). The machine may be shared: only the ratios of one run mean anything.

    python benchmarks/bench_rotor_network.py [--bits 3] [--n 4000] [--threads 1] [--out table.md]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

import rotorquant as rq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_real_kv import evaluate, load_sample  # noqa: E402

KINDS = ["identity", "dense", "hadamard", "rotor3", "planar", "quat", "rotor_network"]
DIMS = [64, 80, 96, 112, 128, 160, 192, 256, 576]
AWKWARD_DIMS = [97, 176, 208]  # a prime and two head_dims with a factor 11 / 13: padded to 98, 180, 210


def outlier_keys(dim: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-0.5, 0.5, dim))
    count = max(2, dim // 32)
    channels = rng.choice(dim, count, replace=False)
    scale[channels] *= rng.uniform(10, 20, count)
    mean = np.zeros(dim)
    mean[channels] = 0.5 * scale[channels] * rng.choice([-1.0, 1.0], count)
    return (mean + scale * rng.standard_normal((n, dim))).astype(np.float32)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    s = scores - scores.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def synthetic_quality(kind: str, keys: np.ndarray, queries: np.ndarray, temperature: float, bits: int,
                      seed: int) -> dict:
    dim = keys.shape[1]
    quantizer = rq.Quantizer(dim, bits, rotation=kind, seed=seed)
    codes = quantizer.encode(keys)
    decoded = np.asarray(quantizer.decode(codes), np.float64)
    rel_mse = float(((decoded - keys) ** 2).sum() / (keys.astype(np.float64) ** 2).sum())
    true = queries.astype(np.float64) @ keys.astype(np.float64).T * temperature
    estimated = np.asarray(quantizer.inner_product(codes, queries), np.float64) * temperature
    log_p, log_p_hat = log_softmax(true), log_softmax(estimated)
    kl = float((np.exp(log_p) * (log_p - log_p_hat)).sum(axis=-1).mean())
    return {"rel_mse": rel_mse, "kl": kl, "bytes": codes.nbytes / len(codes), "padded": quantizer.padded_dim,
            "params": rq.Rotation(kind, dim, seed=seed).num_parameters}


def best_time(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def speeds(kind: str, keys: np.ndarray, bits: int, repeats: int) -> tuple[float, float]:
    quantizer = rq.Quantizer(keys.shape[1], bits, rotation=kind, seed=0)
    rotation = rq.Rotation(kind, keys.shape[1], seed=0)
    quantizer.encode(keys[:16])
    rotation.apply(keys[:16])
    return best_time(lambda: quantizer.encode(keys), repeats), best_time(lambda: rotation.apply(keys), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--n", type=int, default=4000, help="synthetic keys per d (speed uses the same keys)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU worker threads for the timings")
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS + AWKWARD_DIMS)
    parser.add_argument("--kinds", nargs="+", default=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    bits = args.bits
    lines = [f"rotorquant {rq.__version__}, {platform.machine()} {platform.processor() or ''}, "
             f"{args.threads} CPU thread(s) for timings, {bits} bits, mse mode, fp16 norms, seed {args.seed}", ""]

    if not args.skip_real:
        sample = load_sample()
        meta = sample["metadata"]
        tokens = int(meta["tokens"])
        query_rows = np.arange(min(32, tokens - 1), tokens)
        lines += [f"Real keys: {meta['model']}, layers {sample['layers']}, head_dim {meta['head_dim']}, "
                  f"{tokens} tokens, queries at positions {query_rows[0]}..{tokens - 1}.", "",
                  "| kind | padded_dim | bytes/vec | parameters | key rel. MSE | vs dense | attn KL | vs dense |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        real = {}
        for kind in args.kinds:
            totals = evaluate(sample, kind, "mse", bits, query_rows, args.seed)
            real[kind] = totals.row(kind, "mse", bits)
            print(f"real {kind:>13}: rel MSE {real[kind]['key_rel_mse']:.4f} KL {real[kind]['kl']:.4f}", flush=True)
        dim = int(meta["head_dim"])
        for kind in args.kinds:
            r, d = real[kind], real.get("dense", real[kind])
            rotation = rq.Rotation(kind, dim, seed=args.seed)
            lines.append(f"| {kind} | {rotation.padded_dim} | {r['bytes']:.0f} | {rotation.num_parameters} | "
                         f"{r['key_rel_mse']:.4f} | {r['key_rel_mse'] / d['key_rel_mse']:.3f} | {r['kl']:.4f} | "
                         f"{r['kl'] / d['kl']:.3f} |")
        lines.append("")

    rq.set_num_threads(args.threads)
    lines += [f"Synthetic outlier keys: n = {args.n} keys and {args.queries} queries per d. Encode and rotate "
              "speeds: vectors/s, and dense time / kind time.", "",
              "| d | kind | padded_dim | bytes/vec | parameters | rel. MSE | vs dense | attn KL | vs dense | "
              "encode vec/s | x dense | rotate vec/s | x dense |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dim in args.dims:
        keys = outlier_keys(dim, args.n, seed=args.seed + dim)
        rng = np.random.default_rng(args.seed + 7 * dim)
        queries = rng.standard_normal((args.queries, dim)).astype(np.float32)
        raw = queries.astype(np.float64) @ keys.astype(np.float64).T / np.sqrt(dim)
        temperature = 2.0 / raw.std() / np.sqrt(dim)
        results = {}
        for kind in args.kinds:  # hadamard pads non-powers of two to the next one: see its bytes/vec
            results[kind] = synthetic_quality(kind, keys, queries, temperature, bits, args.seed)
            results[kind]["encode_s"], results[kind]["rotate_s"] = speeds(kind, keys, bits, args.repeats)
        base = results.get("dense")
        for kind in args.kinds:
            r = results[kind]
            b = base or r
            lines.append(
                f"| {dim} | {kind} | {r['padded']} | {r['bytes']:.0f} | {r['params']} | {r['rel_mse']:.4f} | "
                f"{r['rel_mse'] / b['rel_mse']:.3f} | {r['kl']:.4f} | {r['kl'] / b['kl']:.3f} | "
                f"{args.n / r['encode_s']:,.0f} | {b['encode_s'] / r['encode_s']:.2f} | "
                f"{args.n / r['rotate_s']:,.0f} | {b['rotate_s'] / r['rotate_s']:.2f} |")
            print(lines[-1], flush=True)
    rq.set_num_threads(0)

    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
