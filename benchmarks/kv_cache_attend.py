"""CPU benchmark of rotorquant.KVCache: append + decode-step attend on the codes vs torch sdpa over float32 K/V
of the same shape (the baseline, measured in the same run), and the bytes held vs a bf16 cache.

    python benchmarks/kv_cache_attend.py [--tokens 2048] [--batch 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import rotorquant as rq


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--q-heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, h, hq, d, t = args.batch, args.kv_heads, args.q_heads, args.head_dim, args.tokens
    keys = rng.standard_normal((b, h, t, d)).astype(np.float32)
    values = rng.standard_normal((b, h, t, d)).astype(np.float32)
    query = rng.standard_normal((b, hq, 1, d)).astype(np.float32)
    k_t, v_t, q_t = (torch.from_numpy(a) for a in (keys, values, query))
    k_rep, v_rep = (x.repeat_interleave(hq // h, dim=1) for x in (k_t, v_t))
    baseline = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(q_t, k_rep, v_rep), args.repeats)
    bf16_bytes = 2 * b * h * t * d * 2
    print(f"{'config':<28}{'append s':>10}{'attend ms':>11}{'sdpa ms':>9}{'ratio':>8}{'bytes/bf16':>12}")
    for key_bits, value_bits, window in ((8, 8, 0), (4, 4, 0), (4, 3, 0), (4, 3, 128)):
        cache = rq.KVCache(1, h, d, key_bits=key_bits, value_bits=value_bits, residual_window=window)
        start = time.perf_counter()
        cache.append(0, keys, values)
        append_time = time.perf_counter() - start
        attend = best_time(lambda: cache.attend(0, query), args.repeats)
        name = f"K{key_bits}/V{value_bits} window {window}"
        print(f"{name:<28}{append_time:>10.3f}{attend * 1e3:>11.2f}{baseline * 1e3:>9.2f}{attend / baseline:>8.1f}"
              f"{cache.nbytes() / bf16_bytes:>12.3f}")
    print(f"threads: rotorquant {rq.num_threads()}, torch {torch.get_num_threads()}; batch {b}, tokens {t}, "
          f"{hq} query / {h} KV heads, head_dim {d}")


if __name__ == "__main__":
    main()
