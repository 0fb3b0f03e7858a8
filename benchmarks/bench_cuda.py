"""Throughput of the fused CUDA codec (encode / decode / scores) on one GPU, with baselines measured in the same run.

    python benchmarks/bench_cuda.py [--quick] [--kinds dense,hadamard] [--sizes 1M,4M] [--no-scores]

GB/s counts the bytes a kernel must move: encode reads n*d*4 (float32 input) and writes the codes
(n * bytes_per_vector); decode reads the codes and writes n*d*4. "copy" is a device-to-device copy of the
input array (torch copy_, read + write counted), measured for each n in the same run; "of copy" is
GB/s / copy GB/s. Kernel timings call the launchers directly (check=False: no stream synchronization, the
NaN/overflow check needs one); "api" rows time Quantizer.encode/decode (check=True, allocation included).
Baseline "torch matmul+bucketize": normalize, y = u @ M^T (fp32, TF32 off), torch.bucketize(y, boundaries)
into uint8 indices (no bit packing, so it writes n*d bytes); its decode is centroids[idx] @ M * norm.
"""
from __future__ import annotations

import argparse
import sys

import torch

import rotorquant as rq
from rotorquant import _core

KINDS = ["identity", "dense", "hadamard", "rotor3", "planar", "quat"]
FIELDS = ("indices", "norms", "qjl_signs", "residual_norms")


def time_ms(fn, repeats=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


def code_buffers(q, n, device):
    nat = q._native
    sizes = (nat.index_bytes, nat.norm_bytes, nat.sign_bytes, nat.residual_norm_bytes)
    return [torch.empty((n, s), dtype=torch.uint8, device=device) for s in sizes]


def ptr(t):
    return t.data_ptr() if t.numel() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n in {16K, 1M} only, bits 3 only")
    parser.add_argument("--kinds", default=",".join(KINDS), help="rotation kinds, comma-separated (default: all)")
    parser.add_argument("--sizes", default=None, help="n values, comma-separated, K / M suffixes allowed")
    parser.add_argument("--no-scores", action="store_true", help="skip the scores table")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: expected some of {KINDS}, got {unknown}")
    if not (torch.cuda.is_available() and rq.has_cuda()):
        print("bench_cuda: needs a CUDA device and a CUDA build of rotorquant", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0)
    stream = torch.cuda.current_stream(device).cuda_stream
    dim = 128
    # 1K / 4K: the seed's table sizes (bits 3 only); 16K, 1M, 4M: every bit width.
    sizes = [1 << 14, 1 << 20] if args.quick else [1 << 10, 1 << 12, 1 << 14, 1 << 20, 1 << 22]
    if args.sizes:
        units = {"K": 1 << 10, "M": 1 << 20}
        sizes = [int(v[:-1]) * units[v[-1].upper()] if v[-1].upper() in units else int(v)
                 for v in args.sizes.split(",") if v]
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; rotorquant {rq.__version__}; d = {dim}")
    header = f"{'n':>8s} {'what':44s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s}"
    print(header)
    print("-" * len(header))

    def row(n, what, ms, moved, copy_gbs):
        gbs = moved / ms / 1e6
        print(f"{n:8d} {what:44s} {ms:9.4f} {gbs:8.1f} {gbs / copy_gbs:8.1%}", flush=True)

    for n in sizes:
        x = torch.randn(n, dim, device=device)
        scratch = torch.empty_like(x)
        copy_ms = time_ms(lambda: scratch.copy_(x))
        copy_gbs = 2 * x.numel() * 4 / copy_ms / 1e6
        print(f"{n:8d} {'copy (torch copy_, d2d)':44s} {copy_ms:9.4f} {copy_gbs:8.1f} {1:8.1%}")
        for bits in ([3] if args.quick or n < (1 << 14) else [2, 3, 4]):
            modes = ["mse", "prod"] if bits == 3 and n == (1 << 20) else ["mse"]
            for mode in modes:
                for kind in kinds:
                    q = rq.Quantizer(dim, bits, rotation=kind, mode=mode, seed=1)
                    native = q._device_native("cuda", 0)
                    buffers = code_buffers(q, n, device)
                    code_bytes = n * q.bytes_per_vector
                    label = f"{kind} b={bits} {mode}"
                    ms = time_ms(lambda: native.encode(x.data_ptr(), n, *(ptr(b) for b in buffers), stream, False))
                    row(n, f"encode {label}", ms, x.numel() * 4 + code_bytes, copy_gbs)
                    out = torch.empty_like(x)
                    ms = time_ms(lambda: native.decode(*(ptr(b) for b in buffers), n, out.data_ptr(), 0, stream, False))
                    row(n, f"decode {label} -> fp32", ms, x.numel() * 4 + code_bytes, copy_gbs)
                    if n == (1 << 20) and bits == 3 and mode == "mse" and kind in ("dense", "rotor3"):
                        half = torch.empty_like(x, dtype=torch.float16)
                        ms = time_ms(lambda: native.decode(*(ptr(b) for b in buffers), n, half.data_ptr(), 1, stream,
                                                           False))
                        row(n, f"decode {label} -> fp16", ms, x.numel() * 2 + code_bytes, copy_gbs)
                        ms = time_ms(lambda: q.encode(x), repeats=5)
                        row(n, f"api Quantizer.encode {label}", ms, x.numel() * 4 + code_bytes, copy_gbs)
                    del buffers
                # baseline: torch matmul rotation + bucketize (uint8 indices, no packing)
                q = rq.Quantizer(dim, bits, rotation="dense", seed=1)
                matrix = torch.from_numpy(rq.Rotation("dense", dim, seed=1).parameters().reshape(dim, dim)).to(device)
                book = _core.codebook(dim, bits, "sphere")
                boundaries = torch.tensor(book["boundaries_f32"], dtype=torch.float32, device=device)
                centroids = torch.tensor(book["centroids_f32"], dtype=torch.float32, device=device)

                def torch_encode():
                    norm = x.norm(dim=1, keepdim=True)
                    y = (x / norm) @ matrix.T
                    return torch.bucketize(y, boundaries, right=True).to(torch.uint8), norm.half()

                idx, norm = torch_encode()
                ms = time_ms(torch_encode)
                row(n, f"torch matmul+bucketize encode b={bits}", ms, x.numel() * 4 + idx.numel() + n * 2, copy_gbs)
                ms = time_ms(lambda: (centroids[idx.long()] @ matrix) * norm.float())
                row(n, f"torch gather+matmul decode b={bits}", ms, x.numel() * 4 + idx.numel() + n * 2, copy_gbs)
        del x, scratch
        torch.cuda.empty_cache()

    if args.no_scores:
        return 0
    # scores: one KV head of n codes, GQA group of 8 query heads (and 32)
    print()
    print(f"{'n':>8s} {'scores (heads=1)':44s} {'ms':>9s} {'Gcode/s':>8s}")
    for n in ([1 << 14, 1 << 20] if not args.quick else [1 << 20]):
        x = torch.randn(n, dim, device=device)
        for mode in ("mse", "prod"):
            q = rq.Quantizer(dim, 3, rotation="rotor3", mode=mode, seed=1)
            codes = q.encode(x)
            for group in (8, 32):
                y = torch.randn(group, dim, device=device)
                ms = time_ms(lambda: q.inner_product(codes, y), repeats=5)
                print(f"{n:8d} {f'rotor3 b=3 {mode} group={group}':44s} {ms:9.4f} {n * group / ms / 1e6:8.2f}")
        decoded = q.decode(q.encode(x, check=False))
        y = torch.randn(8, dim, device=device)
        ms = time_ms(lambda: y @ decoded.T, repeats=5)
        print(f"{n:8d} {'torch fp32 y @ X^T on decoded (group=8)':44s} {ms:9.4f} {n * 8 / ms / 1e6:8.2f}")
        del x
    return 0


if __name__ == "__main__":
    sys.exit(main())
