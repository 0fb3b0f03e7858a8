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

``--speed-only``: only a speed table, on --speed-n keys per d (default 1M: the input streams from memory, as
in bulk encoding), for --kinds (default dense, hadamard, identity, rotor_network) at --dims (default 64, 96,
128, 160, 256): encode time per vector (``Quantizer.encode`` of all n keys) and the rotation alone
(``Rotation.apply`` on 4096 of the keys, repeated; in cache), with the ratios to dense. The kinds are timed in
turn within every repeat (best of --repeats each), so a load change on a shared machine hits all of them; the
load average is printed before and after.

    nice python benchmarks/bench_rotor_network.py --speed-only [--speed-n 1000000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import rotorquant as rq
from rotorquant.data import outlier_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_real_kv import evaluate, load_sample  # noqa: E402

KINDS = ["identity", "dense", "hadamard", "rotor3", "planar", "quat", "rotor_network"]
DIMS = [64, 80, 96, 112, 128, 160, 192, 256, 576]
AWKWARD_DIMS = [97, 176, 208]  # a prime and two head_dims with a factor 11 / 13: padded to 98, 180, 210


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


SPEED_KINDS = ["dense", "hadamard", "identity", "rotor_network"]
SPEED_DIMS = [64, 96, 128, 160, 256]
ROTATE_BLOCK, ROTATE_ROWS = 4096, 200_000  # rotate timings: 4096 rows (in cache) applied ~200k rows' worth


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def speed_table(dims: list[int], kinds: list[str], n: int, bits: int, repeats: int, threads: int,
                seed: int) -> list[str]:
    """Encode and rotate time per vector of every kind at every d, kinds interleaved within each repeat."""
    lines = [f"Speed: rotorquant {rq.__version__}, {cpu_model()} ({os.cpu_count()} logical CPUs), "
             f"CPU kernels {os.environ.get('ROTORQUANT_CPU_KERNELS', 'auto (widest supported)')}, "
             f"{threads} thread(s), {bits} bits, mse mode, fp16 norms, n = {n} synthetic outlier keys per d, "
             f"best of {repeats}; load average (1/5/15 min) at start {load_average()}", "",
             "| d | kind | padded_dim | encode ns/vector | encode M vectors/s | encode x dense | "
             "rotate ns/vector (4096 rows in cache) | rotate x dense |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    rq.set_num_threads(threads)
    for dim in dims:
        keys = outlier_keys(dim, n, seed=seed + dim)
        quantizers = {kind: rq.Quantizer(dim, bits, rotation=kind, seed=seed) for kind in kinds}
        rotations = {kind: rq.Rotation(kind, dim, seed=seed) for kind in kinds}
        for kind in kinds:  # warm-up (first-touch allocations, lazy tables)
            quantizers[kind].encode(keys[:1024])
            rotations[kind].apply(keys[:1024])
        encode = {kind: float("inf") for kind in kinds}
        rotate = {kind: float("inf") for kind in kinds}
        # The rotation alone on a block of rows that stays in cache, into a preallocated output (on n = 1M rows a
        # new output per call would time page faults more than the rotation).
        block = keys[:min(n, ROTATE_BLOCK)]
        rounds = max(1, ROTATE_ROWS // len(block))
        outputs = {kind: np.empty((len(block), rotations[kind].padded_dim), np.float32) for kind in kinds}
        for _ in range(repeats):
            for kind in kinds:
                encode[kind] = min(encode[kind], best_time(lambda: quantizers[kind].encode(keys), 1))
                out = outputs[kind]
                rotate[kind] = min(rotate[kind], best_time(
                    lambda: [rotations[kind].apply(block, out=out) for _ in range(rounds)], 1) / (rounds * len(block)) * n)
        base = "dense" if "dense" in kinds else kinds[0]
        for kind in kinds:
            lines.append(f"| {dim} | {kind} | {quantizers[kind].padded_dim} | {encode[kind] / n * 1e9:.1f} | "
                         f"{n / encode[kind] / 1e6:.2f} | {encode[base] / encode[kind]:.2f} | "
                         f"{rotate[kind] / n * 1e9:.1f} | {rotate[base] / rotate[kind]:.2f} |")
            print(lines[-1], flush=True)
        del keys
    rq.set_num_threads(0)
    lines += ["", f"Load average at end: {load_average()}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--n", type=int, default=4000, help="synthetic keys per d (speed uses the same keys)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU worker threads for the timings")
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help="default: 64 80 96 112 128 160 192 256 576 97 176 208 (speed-only: 64 96 128 160 256)")
    parser.add_argument("--kinds", nargs="+", default=None,
                        help="default: all kinds (speed-only: dense hadamard identity rotor_network)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    parser.add_argument("--speed-only", action="store_true", help="only the speed table (see the module doc)")
    parser.add_argument("--speed-n", type=int, default=1_000_000, help="keys per d in --speed-only mode")
    args = parser.parse_args()
    bits = args.bits
    if args.speed_only:
        dims = args.dims or SPEED_DIMS
        kinds = args.kinds or SPEED_KINDS
        text = "\n".join(speed_table(dims, kinds, args.speed_n, bits, args.repeats, args.threads, args.seed)) + "\n"
        print()
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    args.dims = args.dims or DIMS + AWKWARD_DIMS
    args.kinds = args.kinds or KINDS
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
