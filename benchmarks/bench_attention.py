"""Fused decode attention on compressed K/V (rotorquant.DecodeAttention) against torch SDPA in bf16, on one GPU.

    python benchmarks/bench_attention.py [--quick] [--batches 1 8 32] [--contexts 4096 32768 131072]
        [--q-heads 32] [--bits 3/3 4/3] [--no-baselines] [--window 0]

Shapes (issue 6): Hq = 32 query heads, Hkv = 8 KV heads, head_dim 128, one query position per sequence (decode),
every sequence at the full context, K/V bits 4/4, 4/3, 3/3, 2/2 (hadamard rotation, float16 norms), no
full-precision window (the codes path alone; --window N adds N float32 tokens per sequence and KV head, as the KV
cache's sinks and recent window, which the SDPA baselines do not have). Codes are random bytes (every bit pattern is
a valid index) with random positive norms: speed does not depend on the values.

Columns:
- ms: one attention call (CUDA events, mean of repeated calls after a warm-up; prepare + split + combine launches).
- GB/s: compressed bytes read (K and V indices + norms) / time; "of copy": that over the device-to-device copy
  bandwidth measured in the same run (torch copy_ of 2 GiB, read + write counted).
- SDPA ms: torch.nn.functional.scaled_dot_product_attention on bf16 K/V of the same shape (enable_gqa, the
  backend torch picks), its GB/s on the bf16 K/V bytes, and the ratio SDPA time / fused time ("x SDPA").
- dec+SDPA ms: the codes decoded to bf16 by the CUDA codec (one launch per KV head) then SDPA; "x dec+SDPA" likewise.
- graph ms / graph SDPA / graph x: the fused call and SDPA each captured in a CUDA graph (GRAPH_CALLS calls per
  graph, the time of one call): what a serving loop that replays captured decode steps pays, without Python's
  per-call argument checks and launch latency. Small problems (B = 1 below 128K) are bound by those on the eager path.
Rows that do not fit in memory are skipped.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import rotorquant as rq
from rotorquant import _core

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
BITS = [(4, 4), (4, 3), (3, 3), (2, 2)]


def time_ms(fn, min_total_ms=60.0, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    repeats = 1
    while True:
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        torch.cuda.synchronize()
        total = start.elapsed_time(stop)
        if total >= min_total_ms or repeats >= 256:
            return total / repeats
        repeats *= 2


GRAPH_CALLS = 16


def graph_ms(fn, device):
    """Time of one fn() when GRAPH_CALLS calls are captured in a CUDA graph and the graph is replayed."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator pools, lazy initialization)
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    ms = time_ms(graph.replay) / GRAPH_CALLS
    del graph
    return ms


def copy_bandwidth(device) -> float:
    src = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * (1 << 31) / ms / 1e6  # GB/s, read + write


def quantizers(bits, values, seed=0):
    return [rq.Quantizer(DIM, bits, rotation="hadamard", seed=seed + 2 * h + values) for h in range(KV_HEADS)]


def random_codes(batch, context, q, device):
    """Codes stored head-major (Hkv, B, T, bytes) so that one decode launch per head covers a head: passed to the
    fused kernel as a (B, Hkv, T, bytes) view."""
    nat = q._native
    indices = torch.randint(0, 256, (KV_HEADS, batch, context, nat.index_bytes), dtype=torch.uint8, device=device)
    norms = (torch.rand((KV_HEADS, batch, context), device=device) * 20 + 1).half()
    norms = norms.view(torch.uint8).view(KV_HEADS, batch, context, 2)
    return indices, norms


class FusedCase:
    """One shape's fused call on random codes of the key / value quantizers kq, vq (lists, one per KV head): code
    tensors (head-major storage, (B, Hkv, T, bytes) views), lengths at the full context, bf16 queries; call() runs
    rq.DecodeAttention on them."""

    def __init__(self, batch, context, kq, vq, q_heads, device, window=0):
        self.attention = rq.DecodeAttention(kq, vq, device=device)
        self.fp = {}
        if window:
            self.fp = {name: torch.randn(batch, KV_HEADS, window, DIM, device=device)
                       for name in ("fp_keys", "fp_values")}
            self.fp["fp_lengths"] = torch.full((batch,), window, dtype=torch.int32, device=device)
        self.ki, self.kn = random_codes(batch, context, kq[0], device)
        self.vi, self.vn = random_codes(batch, context, vq[0], device)
        self.lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, q_heads, DIM, device=device, dtype=torch.bfloat16)
        self.views = [t.permute(1, 0, 2, 3) for t in (self.ki, self.kn, self.vi, self.vn)]

    def call(self):
        return self.attention(self.q, *self.views, self.lengths, **self.fp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B in {1, 32}, context 32K, bits 3/3 and 4/3")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--no-baselines", action="store_true", help="skip SDPA and decode+SDPA")
    parser.add_argument("--q-heads", type=int, default=Q_HEADS,
                        help=f"query heads (a multiple of the {KV_HEADS} KV heads; default {Q_HEADS}, GQA 4)")
    parser.add_argument("--window", type=int, default=0,
                        help="full-precision tokens per sequence besides the codes (default 0: the codes alone)")
    parser.add_argument("--bits", nargs="+", default=None, metavar="K/V",
                        help="K/V bit pairs, e.g. 3/3 4/3 (default: " + " ".join(f"{k}/{v}" for k, v in BITS) + ")")
    args = parser.parse_args()
    if args.window < 0:
        parser.error(f"--window must be >= 0, got {args.window}")
    if args.q_heads < KV_HEADS or args.q_heads % KV_HEADS:
        parser.error(f"--q-heads must be a positive multiple of {KV_HEADS}, got {args.q_heads}")
    try:
        pairs = [tuple(int(x) for x in pair.split("/")) for pair in args.bits] if args.bits else BITS
    except ValueError:
        parser.error(f"--bits takes pairs like 3/3, got {args.bits}")
    if any(len(p) != 2 or not all(2 <= b <= 4 for b in p) for p in pairs):
        parser.error(f"--bits takes pairs of 2, 3 or 4 bits like 3/3, got {args.bits}")
    q_heads = args.q_heads
    if not (torch.cuda.is_available() and rq.has_cuda()):
        print("bench_attention: needs a CUDA device and a CUDA build of rotorquant", file=sys.stderr)
        return 1
    batches, contexts, bit_pairs = args.batches, args.contexts, pairs
    if args.quick:
        batches, contexts, bit_pairs = [1, 32], [32768], [(3, 3), (4, 3)]
    device = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(device)
    copy = copy_bandwidth(device)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}; "
          f"copy bandwidth (read + write) {copy:.0f} GB/s")
    print(f"Hq={q_heads} Hkv={KV_HEADS} d={DIM}, decode (1 query position), hadamard codes, fp16 norms"
          + (f", {args.window} full-precision tokens" if args.window else ""))
    header = (f"{'B':>3} {'context':>8} {'K/V':>4} {'bytes/tok':>9} {'ms':>8} {'GB/s':>7} {'of copy':>7} "
              f"{'SDPA ms':>8} {'SDPA GB/s':>9} {'x SDPA':>7} {'dec+SDPA ms':>11} {'x dec+SDPA':>10} "
              f"{'graph ms':>8} {'graph SDPA':>10} {'graph x':>7}")
    print(header)
    print("-" * len(header))
    stream = torch.cuda.current_stream(device).cuda_stream
    for batch in batches:
        for context in contexts:
            sdpa_ms = sdpa_graph_ms = None
            for key_bits, value_bits in bit_pairs:
                kq, vq = quantizers(key_bits, 0), quantizers(value_bits, 1)
                per_token = kq[0]._native.index_bytes + vq[0]._native.index_bytes + 4
                bf16_bytes = 2 * batch * KV_HEADS * context * DIM * 2
                code_bytes = batch * KV_HEADS * context * per_token
                free, _ = torch.cuda.mem_get_info(device)
                needed = code_bytes + (0 if args.no_baselines else 2 * bf16_bytes) + (1 << 30)
                if needed > free:
                    print(f"{batch:>3} {context:>8} {key_bits}/{value_bits}  skipped: needs {needed / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} free")
                    continue
                case = FusedCase(batch, context, kq, vq, q_heads, device, args.window)
                ki, kn, vi, vn, q, fused = case.ki, case.kn, case.vi, case.vn, case.q, case.call
                ms = time_ms(fused)
                row = (f"{batch:>3} {context:>8} {key_bits}/{value_bits:<2} {per_token:>9} {ms:>8.3f} "
                       f"{code_bytes / ms / 1e6:>7.0f} {code_bytes / ms / 1e6 / copy:>7.1%}")
                if not args.no_baselines:
                    q4 = q.unsqueeze(2)
                    if sdpa_ms is None:
                        k16 = torch.randn(batch, KV_HEADS, context, DIM, device=device, dtype=torch.bfloat16)
                        v16 = torch.randn_like(k16)

                        def sdpa():
                            return F.scaled_dot_product_attention(q4, k16, v16, enable_gqa=True)

                        sdpa_ms = time_ms(sdpa)
                        sdpa_graph_ms = graph_ms(sdpa, device)
                        del k16, v16
                    k16 = torch.empty(KV_HEADS, batch, context, DIM, device=device, dtype=torch.bfloat16)
                    v16 = torch.empty_like(k16)
                    kd = [_core.CudaQuantizer(x._native, device.index) for x in kq]
                    vd = [_core.CudaQuantizer(x._native, device.index) for x in vq]

                    def decode_then_sdpa():
                        for h in range(KV_HEADS):
                            kd[h].decode(ki[h].data_ptr(), kn[h].data_ptr(), 0, 0, batch * context, k16[h].data_ptr(), 2,
                                         stream, False)
                            vd[h].decode(vi[h].data_ptr(), vn[h].data_ptr(), 0, 0, batch * context, v16[h].data_ptr(), 2,
                                         stream, False)
                        return F.scaled_dot_product_attention(q4, k16.permute(1, 0, 2, 3), v16.permute(1, 0, 2, 3),
                                                              enable_gqa=True)

                    decode_ms = time_ms(decode_then_sdpa)
                    del k16, v16
                    row += (f" {sdpa_ms:>8.3f} {bf16_bytes / sdpa_ms / 1e6:>9.0f} {sdpa_ms / ms:>7.2f} "
                            f"{decode_ms:>11.3f} {decode_ms / ms:>10.2f}")
                    fused_graph_ms = graph_ms(fused, device)
                    row += f" {fused_graph_ms:>8.3f} {sdpa_graph_ms:>10.3f} {sdpa_graph_ms / fused_graph_ms:>7.2f}"
                print(row, flush=True)
                del ki, kn, vi, vn, case, fused
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
