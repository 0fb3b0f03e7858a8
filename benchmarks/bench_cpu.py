"""CPU throughput of rotorquant's quantizers next to faiss's TurboQuant scalar quantizer and plain numpy.

For d=128 (``--dim``), bits in {2, 3, 4}, every rotation kind and both modes (mse, prod), all cores:
encode, decode and inner-product throughput of ``rotorquant.Quantizer`` on n vectors (default 1M), in
vectors/s and GB/s of float32 input (n * dim * 4 bytes / seconds), printed with the relative MSE of the
round trip so that equal work is visible. In the same run:

(a) faiss: ``IndexPreTransform(RandomRotationMatrix(d, d), IndexScalarQuantizer(d, QT_<b>bit_tqmse))`` for
    mode mse and ``QT_<b>bit_tq`` (TurboQuant-prod: (b-1)-bit MSE + QJL) for mode prod, when this faiss has
    them (encode = sa_encode, decode = sa_decode, inner product = search with k=1 over the added codes,
    METRIC_INNER_PRODUCT); otherwise the closest classic scalar quantizer (QT_4bit / QT_8bit), said so.
    faiss's tqmse codes hold no norm: all methods get the same unit-norm input so MSEs are comparable.
(b) numpy TurboQuant-mse: dense rotation matmul + searchsorted on the rotorquant codebook boundaries +
    fp16 norms (indices kept as one uint8 per coordinate, not bit-packed); decode = centroid gather, inverse
    matmul, scale; inner product = rotate queries, gather centroids, matmul, scale by norms.

Inner product: ``--queries`` queries (default 16) against all n codes. Its "vectors/s" is code vectors scored
per second per query (n * queries / s); GB/s is the float32 bytes those vectors stand for per second.

    python benchmarks/bench_cpu.py [--n 1000000] [--quick] [--bits 2 3 4] [--rotations ...] [--modes ...]
                                   [--repeat 2] [--threads N]

rotorquant's CPU kernels are picked at run time (AVX-512, AVX2+FMA or portable); ROTORQUANT_CPU_KERNELS=avx2 (or
portable) forces one. The machine line prints which build the CPU flags select.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import rotorquant


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kernel_build() -> str:
    """The kernel build rotorquant's dispatcher picks (cpp/src/simd_dispatch.cpp), from the CPU flags."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "unknown"
    supported = ["portable"]
    if {"avx2", "fma"} <= flags:
        supported.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl"} <= flags:
            supported.append("avx512")
    forced = os.environ.get("ROTORQUANT_CPU_KERNELS")
    return forced if forced in supported else supported[-1]


def timed(fn, repeat: int):
    """Best wall time of ``repeat`` calls and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def relative_mse(x: np.ndarray, x_hat: np.ndarray, chunk: int = 1 << 16) -> float:
    err = energy = 0.0
    for start in range(0, len(x), chunk):
        a = x[start:start + chunk].astype(np.float64)
        b = np.asarray(x_hat[start:start + chunk], dtype=np.float64)
        err += float(((a - b) ** 2).sum())
        energy += float((a * a).sum())
    return err / energy


# ---------------------------------------------------------------------------------------------------
# (b) plain numpy TurboQuant-mse
class NumpyTurboQuantMSE:
    chunk = 1 << 15

    def __init__(self, dim: int, bits: int, seed: int = 0):
        self.matrix = rotorquant.Rotation("dense", dim, seed).matrix().astype(np.float32)  # apply(x) = M @ x
        book = rotorquant.codebook(dim, bits)
        self.centroids = np.asarray(book.centroids, dtype=np.float32)
        self.boundaries = np.asarray(book.boundaries, dtype=np.float32)
        self.bytes_per_vector = dim + 2  # uint8 per coordinate + fp16 norm

    def encode(self, x):
        indices = np.empty(x.shape, dtype=np.uint8)
        norms = np.empty(len(x), dtype=np.float16)
        for s in range(0, len(x), self.chunk):
            block = x[s:s + self.chunk]
            n = np.linalg.norm(block, axis=1)
            rotated = (block / np.maximum(n, 1e-30)[:, None]) @ self.matrix.T
            indices[s:s + self.chunk] = np.searchsorted(self.boundaries, rotated)
            norms[s:s + self.chunk] = n
        return indices, norms

    def decode(self, codes):
        indices, norms = codes
        out = np.empty(indices.shape, dtype=np.float32)
        for s in range(0, len(indices), self.chunk):
            block = self.centroids[indices[s:s + self.chunk]] @ self.matrix
            out[s:s + self.chunk] = block * norms[s:s + self.chunk, None].astype(np.float32)
        return out

    def inner_product(self, codes, y):
        indices, norms = codes
        rotated = y @ self.matrix.T
        out = np.empty((len(y), len(indices)), dtype=np.float32)
        for s in range(0, len(indices), self.chunk):
            block = self.centroids[indices[s:s + self.chunk]]
            out[:, s:s + self.chunk] = (rotated @ block.T) * norms[s:s + self.chunk].astype(np.float32)
        return out


# ---------------------------------------------------------------------------------------------------
# (a) faiss
def faiss_quantizer_name(faiss, bits: int, mode: str):
    names = [f"QT_{bits}bit_tqmse"] if mode == "mse" else [f"QT_{bits}bit_tq"]
    for name in names:
        if hasattr(faiss.ScalarQuantizer, name):
            return name, True
    fallback = "QT_4bit" if bits <= 4 else "QT_8bit"
    return fallback, False


def bench_faiss(faiss, x, queries, bits, mode, repeat, seed):
    d = x.shape[1]
    name, is_turboquant = faiss_quantizer_name(faiss, bits, mode)
    scalar = faiss.IndexScalarQuantizer(d, getattr(faiss.ScalarQuantizer, name), faiss.METRIC_INNER_PRODUCT)
    rotation = faiss.RandomRotationMatrix(d, d)
    rotation.init(seed)
    index = faiss.IndexPreTransform(rotation, scalar)
    index.train(x[: min(len(x), 65536)])
    index.sa_decode(index.sa_encode(x[:1024]))  # warm-up (OpenMP pool)
    t_enc, codes = timed(lambda: index.sa_encode(x), repeat)
    t_dec, x_hat = timed(lambda: index.sa_decode(codes), repeat)
    mse = relative_mse(x, x_hat)
    del x_hat
    index.add(x)
    t_ip, _ = timed(lambda: index.search(queries, 1), repeat)
    label = f"faiss {name}" + ("" if is_turboquant else " (no TurboQuant SQ in this faiss: closest classic SQ)")
    return dict(method=label, rotation="faiss random", mode=mode, bits=bits, bytes=codes.shape[1], mse=mse,
                t_enc=t_enc, t_dec=t_dec, t_ip=t_ip)


def bench_rotorquant(x, queries, bits, rotation, mode, repeat, seed):
    quantizer = rotorquant.Quantizer(x.shape[1], bits, rotation=rotation, mode=mode, seed=seed)
    quantizer.decode(quantizer.encode(x[:1024]))  # warm-up (codebook, thread pool)
    t_enc, codes = timed(lambda: quantizer.encode(x), repeat)
    t_dec, x_hat = timed(lambda: quantizer.decode(codes), repeat)
    mse = relative_mse(x, x_hat)
    del x_hat
    t_ip, _ = timed(lambda: quantizer.inner_product(codes, queries), repeat)
    return dict(method="rotorquant", rotation=rotation, mode=mode, bits=bits, bytes=codes.nbytes / len(codes),
                mse=mse, t_enc=t_enc, t_dec=t_dec, t_ip=t_ip)


def bench_numpy(x, queries, bits, repeat, seed):
    quantizer = NumpyTurboQuantMSE(x.shape[1], bits, seed)
    quantizer.decode(quantizer.encode(x[:1024]))  # warm-up (BLAS threads)
    t_enc, codes = timed(lambda: quantizer.encode(x), repeat)
    t_dec, x_hat = timed(lambda: quantizer.decode(codes), repeat)
    mse = relative_mse(x, x_hat)
    del x_hat
    t_ip, _ = timed(lambda: quantizer.inner_product(codes, queries), repeat)
    return dict(method="numpy TurboQuant-mse", rotation="dense", mode="mse", bits=bits,
                bytes=quantizer.bytes_per_vector, mse=mse, t_enc=t_enc, t_dec=t_dec, t_ip=t_ip)


def format_rows(rows, n, d, m):
    gb = n * d * 4 / 1e9
    faiss_ref = {(r["mode"], r["bits"]): r for r in rows if r["method"].startswith("faiss")}
    lines = ["| method | rotation | mode | bits | B/vec | rel. MSE | encode Mvec/s (GB/s) | decode Mvec/s (GB/s) | "
             f"inner product Mvec/s/query (GB/s), {m} queries | vs faiss enc / dec / IP |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        enc, dec, ip = n / r["t_enc"] / 1e6, n / r["t_dec"] / 1e6, n * m / r["t_ip"] / 1e6
        ref = faiss_ref.get((r["mode"], r["bits"]))
        if ref is None or r is ref:
            ratio = "—"
        else:
            ratio = " / ".join(f"{ref[k] / r[k]:.2f}x" for k in ("t_enc", "t_dec", "t_ip"))
        lines.append(f"| {r['method']} | {r['rotation']} | {r['mode']} | {r['bits']} | {r['bytes']:.0f} | "
                     f"{r['mse']:.4f} | {enc:.2f} ({gb / r['t_enc']:.2f}) | {dec:.2f} ({gb / r['t_dec']:.2f}) | "
                     f"{ip:.2f} ({gb * m / r['t_ip']:.2f}) | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rotations", nargs="+", default=None, help="default: rotorquant.rotation_kinds()")
    parser.add_argument("--modes", nargs="+", default=["mse", "prod"])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many timed calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for rotorquant AND faiss (default 0: all cores); 1 gives a comparison that "
                             "a loaded machine disturbs less (OpenMP suffers most from oversubscription)")
    parser.add_argument("--quick", action="store_true",
                        help="n=50k, bits 3 only, rotations dense/hadamard/rotor3, best of 2 (< 1 minute)")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--no-numpy", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.n, args.bits, args.repeat = 50_000, [3], 2
        args.rotations = args.rotations or ["dense", "hadamard", "rotor3"]
    rotations = args.rotations or rotorquant.rotation_kinds()

    cores = args.threads if args.threads > 0 else os.cpu_count()
    rotorquant.set_num_threads(args.threads)  # 0: all cores
    faiss = None
    if not args.no_faiss:
        try:
            import faiss  # noqa: F811
            faiss.omp_set_num_threads(cores)
        except ImportError:
            print("faiss not installed (pip install faiss-cpu): skipping the faiss baseline")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores; rotorquant threads {rotorquant.num_threads()}, "
          f"{cpu_kernel_build()} kernels"
          + (f", faiss {faiss.__version__} threads {faiss.omp_get_max_threads()}" if faiss else "")
          + f"; numpy {np.__version__}")
    print(f"n={args.n} vectors, d={args.dim}, {args.queries} queries for inner product, best of {args.repeat}; "
          "input: isotropic Gaussian vectors normalized to unit norm (faiss tqmse stores no norm)")

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)

    rows = []
    started = time.perf_counter()
    for mode in args.modes:
        for bits in args.bits:
            if faiss is not None:
                rows.append(bench_faiss(faiss, x, queries, bits, mode, args.repeat, args.seed))
                print(f"  done {rows[-1]['method']} {mode} b={bits}", flush=True)
            if mode == "mse" and not args.no_numpy:
                rows.append(bench_numpy(x, queries, bits, args.repeat, args.seed))
                print(f"  done numpy b={bits}", flush=True)
            for rotation in rotations:
                rows.append(bench_rotorquant(x, queries, bits, rotation, mode, args.repeat, args.seed))
                print(f"  done rotorquant {rotation} {mode} b={bits}", flush=True)
    print()
    print(format_rows(rows, args.n, args.dim, args.queries))
    print(f"\n'vs faiss' = faiss time / this time (> 1: faster than faiss at the same bits and mode). "
          f"Total {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
