"""The multi-head CUDA codec entry (``_core.CudaQuantizerGroup``, one launch for every head and sequence) against the
per-head loop it replaces (one ``_core.CudaQuantizer`` launch per KV head, the baseline, measured in the same run).

    python benchmarks/bench_codec_group.py [--heads 8] [--batches 1,8] [--kinds hadamard,dense,rotor3]

Rows: a decode step's encode (n = 1 token per sequence, `batch` sequences, read in place from a
(batch, heads, 132, d) window buffer by the group; the per-head loop needs the (heads, batch, d) copy the old
device cache made, counted in its time) and a prefill-sized encode / decode (n = 4096 tokens per sequence).
"us/call" is host wall time per call (stream synchronized once per 200 calls: the launch-bound regime of a decode
step); "ms" is CUDA-event time (the bandwidth-bound regime). check=False everywhere (as the KV cache).
"""
from __future__ import annotations

import argparse
import time

import torch

import rotorquant as rq
from rotorquant import _core

from bench_cuda import time_ms  # noqa: E402  (CUDA events, warm-up, mean of repeats)

FIELDS = ("indices", "norms", "qjl_signs", "residual_norms")


def sizes_of(q):
    n = q._native
    return (int(n.index_bytes), int(n.norm_bytes), int(n.sign_bytes), int(n.residual_norm_bytes))


def host_us(fn, calls=200, rounds=3):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--kinds", default="hadamard,dense,rotor3")
    parser.add_argument("--prefill", type=int, default=4096, help="tokens per sequence of the large rows")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and rq.has_cuda()):
        raise SystemExit("bench_codec_group.py needs a CUDA GPU and rotorquant built with CUDA")
    device = torch.device("cuda", 0)
    stream = int(torch.cuda.current_stream(device).cuda_stream)
    heads, d = args.heads, args.dim
    print(f"device: {torch.cuda.get_device_name(device)}; {heads} heads, dim {d}, {args.bits} bits mse, float16 norms")
    header = f"{'kind':<9} {'batch':>5} {'what':<24} {'per-head loop':>14} {'group':>10} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for kind in args.kinds.split(","):
        qs = [rq.Quantizer(d, args.bits, rotation=kind, seed=100 + h) for h in range(heads)]
        singles = [q._device_native("cuda", device.index) for q in qs]
        group = _core.CudaQuantizerGroup([q._native for q in qs], device.index)
        sizes = sizes_of(qs[0])
        for batch in (int(b) for b in args.batches.split(",")):
            # decode step: one token per sequence leaving a (batch, heads, 132, d) window buffer at slot 5
            window = torch.randn((batch, heads, 132, d), device=device)
            capacity = 4096
            storage = [torch.empty((heads, batch, capacity, s), dtype=torch.uint8, device=device) for s in sizes]
            staging = [torch.empty((heads, batch, s), dtype=torch.uint8, device=device) for s in sizes]

            def loop_step():
                x = window[:, :, 5].transpose(0, 1).contiguous()  # (heads, batch, d), as the old cache copied it
                for h, native in enumerate(singles):
                    native.encode(x[h].data_ptr(), batch, *[t[h].data_ptr() if t.shape[-1] else 0 for t in staging],
                                  stream, False)
                for t, out in zip(staging, storage):  # and the copies into the code buffers
                    if t.shape[-1]:
                        out[:, :, 100].copy_(t)

            x_step = window[:, :, 5]
            pointers = [t.data_ptr() + 100 * t.shape[-1] if t.shape[-1] else 0 for t in storage]

            def group_step():
                group.encode(x_step.data_ptr(), 1, batch, x_step.stride(1), x_step.stride(0), *pointers,
                             batch * capacity, capacity, stream, False)

            a, b = host_us(loop_step), host_us(group_step)
            print(f"{kind:<9} {batch:>5} {'decode-step encode us':<24} {a:>14.1f} {b:>10.1f} {a / b:>7.1f}x")
            # prefill-sized: (batch, heads, n, d) contiguous -> codes (heads, batch, n, bytes)
            n = args.prefill
            x = torch.randn((batch, heads, n, d), device=device)
            big = [torch.empty((heads, batch, n, s), dtype=torch.uint8, device=device) for s in sizes]
            per_head = x.transpose(0, 1).contiguous()  # the per-head loop's layout: rows of head h contiguous

            def loop_encode():
                for h, native in enumerate(singles):
                    native.encode(per_head[h].data_ptr(), batch * n,
                                  *[t[h].data_ptr() if t.shape[-1] else 0 for t in big], stream, False)

            def group_encode():
                group.encode(x.data_ptr(), n, batch, x.stride(1), x.stride(0),
                             *[t.data_ptr() if t.shape[-1] else 0 for t in big], batch * n, n, stream, False)

            a, b = time_ms(loop_encode), time_ms(group_encode)
            print(f"{kind:<9} {batch:>5} {f'encode {n} tok ms':<24} {a:>14.3f} {b:>10.3f} {a / b:>7.2f}x")
            out = torch.empty((batch, heads, n, d), device=device)
            out_per_head = torch.empty((heads, batch * n, d), device=device)

            def loop_decode():
                for h, native in enumerate(singles):
                    native.decode(*[t[h].data_ptr() if t.shape[-1] else 0 for t in big], batch * n,
                                  out_per_head[h].data_ptr(), 0, stream, False)

            def group_decode():
                group.decode(*[t.data_ptr() if t.shape[-1] else 0 for t in big], n, batch, batch * n, n,
                             out.data_ptr(), n * d, heads * n * d, 0, stream, False)

            a, b = time_ms(loop_decode), time_ms(group_decode)
            print(f"{kind:<9} {batch:>5} {f'decode {n} tok ms':<24} {a:>14.3f} {b:>10.3f} {a / b:>7.2f}x")
    print("per-head loop: one CudaQuantizer launch per head (decode step: plus the gather copy and the code copies "
          "of the old device cache); group: one CudaQuantizerGroup launch; speedup = loop / group.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
