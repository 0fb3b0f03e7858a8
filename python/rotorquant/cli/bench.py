"""``rotorquant bench``: the seed's seven tests, side by side, for every rotation x mode x bits.

Data: isotropic Gaussian vectors (seeded) and the real SmolLM2 KV sample shipped in the package
(``rotorquant.data.load_kv_sample``), so the benchmark runs offline. The seven tests and where they are:

1. MSE by bits (section ``synthetic`` and ``real_kv``): mean per-vector relative error
   ``||x - decode(encode(x))||^2 / ||x||^2``, beside the Lloyd-Max optimum ``codebook(padded_dim, bits).mse_total``
   and the paper's upper bound ``(sqrt(3) pi / 2) 4^-b`` (lower bound ``4^-b``). The optimum and bounds are those of
   unit vectors in mse mode; prod mode spends one bit on QJL, so its rows show no optimum.
2. Inner-product quality: estimates ``Quantizer.inner_product(codes, y)`` against exact ``<y, x>``: least-squares
   slope of estimate on truth (1 = unbiased scale), Pearson correlation, and the normalized squared error
   ``d * mean((est - true)^2 / (|x|^2 |y|^2))``, beside the paper's prod-mode bound ``sqrt(3) pi^2 4^-b``.
3. Needle retrieval with real queries (``real_kv``): for every query row (layer, query head, position t with
   t >= min_context, every ``query_stride``-th position) over the keys visible to it (causal):
   ``top1``: the key with the largest exact score is still the largest under quantized scores;
   ``needle``: a planted key ``k_r + c q`` (``k_r`` a random visible real key, ``c`` chosen so that its exact
   scaled score beats every real key by ``needle_margin`` logits) is the argmax of the quantized scores.
   On isotropic data (``synthetic``): recall@1 and recall@10 of the exact nearest key (max inner product) among n.
4. Parameters: stored floats of the quantizer (``num_parameters``: rotation + QJL matrix + centroids) and the
   real bytes of one code (``Codes.nbytes / len(codes)``) with the ratio to fp16.
5. Speed: encode and decode throughput (vectors/s) for several n on the CPU (and on CUDA tensors when
   ``rotorquant.has_cuda()`` and torch sees a GPU), against a numpy baseline measured in the same run
   (dense float32 rotation + ``searchsorted`` on the codebook boundaries, unpacked uint8 indices).
6. Equivariance: MSE of the real keys K and of ``K G^T`` for a Haar random orthogonal G (not the quantizer's):
   a dense Haar rotation makes the error distribution independent of G (gap within sampling noise), block
   rotations do not. Beside it, the quantizer's rotation matrix: orthogonality error and its distance from the
   identity (a no-op rotation, as in a published fused kernel, fails both the gap and the distance).
7. Real-model KV fidelity (``real_kv`` and ``per_layer``): value MSE, attention KL(p || p_hat) in nats, cosine of the
   attention output with keys and values both quantized, per layer and in total (GQA, causal, 1/sqrt(d)).
"""
from __future__ import annotations

import math
import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from .._codebook import codebook
from .._quantizer import MODES, Quantizer
from .._rotation import Rotation, rotation_kinds
from ._output import CliError

PAPER_MSE_BOUND = math.sqrt(3.0) * math.pi / 2.0      # D_mse <= this * 4^-b (TurboQuant, Theorem 1)
PAPER_PROD_BOUND = math.sqrt(3.0) * math.pi ** 2      # d * D_prod / |y|^2 <= this * 4^-b (Theorem 2)


class BenchSettings:
    """Sizes of one benchmark run; ``quick`` picks the small set."""

    def __init__(self, quick: bool = False, rotations: Optional[Sequence[str]] = None,
                 modes: Optional[Sequence[str]] = None, bits: Optional[Sequence[int]] = None,
                 dim: int = 128, n: Optional[int] = None, seed: int = 0, speed_sizes: Optional[Sequence[int]] = None,
                 query_stride: Optional[int] = None, min_context: int = 32, needle_margin: float = 1.0,
                 skip_speed: bool = False):
        self.quick = bool(quick)
        self.rotations = list(rotations or rotation_kinds())
        self.modes = list(modes or MODES)
        self.bits = sorted(set(bits or ((2, 3, 4) if quick else (1, 2, 3, 4))))
        self.dim = int(dim)
        self.n = int(n if n is not None else (1024 if quick else 4096))
        self.num_queries = 64 if quick else 128
        self.seed = int(seed)
        self.speed_sizes = sorted(set(speed_sizes or ((1024, 8192) if quick else (256, 1024, 4096, 16384))))
        self.speed_repeats = 2 if quick else 3
        self.query_stride = int(query_stride if query_stride is not None else (32 if quick else 4))
        self.min_context = int(min_context)
        self.needle_margin = float(needle_margin)
        self.skip_speed = bool(skip_speed)
        self.equivariance_seeds = 4 if quick else 8
        self.validate()

    def validate(self) -> None:
        kinds = rotation_kinds()
        for kind in self.rotations:
            if kind not in kinds:
                raise CliError(f"--rotations: expected some of {', '.join(kinds)}, got {kind!r}", 2)
        for mode in self.modes:
            if mode not in MODES:
                raise CliError(f"--modes: expected some of {', '.join(MODES)}, got {mode!r}", 2)
        for b in self.bits:
            if not 1 <= b <= 8:
                raise CliError(f"--bits: expected values in 1..8, got {b}", 2)
        if not 2 <= self.dim <= 4096:
            raise CliError(f"--dim: expected 2..4096, got {self.dim}", 2)
        if not 16 <= self.n <= 1_000_000:
            raise CliError(f"--n: expected 16..1000000, got {self.n}", 2)
        for size in self.speed_sizes:
            if not 1 <= size <= 1_000_000:
                raise CliError(f"--speed-sizes: expected values in 1..1000000, got {size}", 2)
        if self.query_stride < 1:
            raise CliError(f"--query-stride: expected >= 1, got {self.query_stride}", 2)
        if self.min_context < 0:
            raise CliError(f"--min-context: expected >= 0, got {self.min_context}", 2)
        if not 0.0 < self.needle_margin <= 100.0:
            raise CliError(f"--needle-margin: expected a value in (0, 100], got {self.needle_margin}", 2)

    def focus_bits(self) -> int:
        """The bit width of the per-layer, equivariance and speed sections (3 when run, else the middle one)."""
        return 3 if 3 in self.bits else self.bits[len(self.bits) // 2]

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


# -- small statistics ----------------------------------------------------------------------
class Moments:
    """Running sums for slope and correlation of estimates e on truths t."""

    def __init__(self):
        self.n = 0
        self.st = self.se = self.stt = self.see = self.ste = 0.0

    def add(self, t: np.ndarray, e: np.ndarray) -> None:
        t = np.asarray(t, dtype=np.float64).ravel()
        e = np.asarray(e, dtype=np.float64).ravel()
        self.n += t.size
        self.st += float(t.sum())
        self.se += float(e.sum())
        self.stt += float((t * t).sum())   # elementwise sums: BLAS dot products stall on busy machines
        self.see += float((e * e).sum())
        self.ste += float((t * e).sum())

    def slope(self) -> float:
        var_t = self.stt - self.st ** 2 / self.n
        return (self.ste - self.st * self.se / self.n) / var_t

    def correlation(self) -> float:
        var_t = self.stt - self.st ** 2 / self.n
        var_e = self.see - self.se ** 2 / self.n
        return (self.ste - self.st * self.se / self.n) / math.sqrt(var_t * var_e)


def per_vector_relative_mse(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    err = ((x - np.asarray(x_hat, dtype=np.float64)) ** 2).sum(axis=-1)
    return err / (x * x).sum(axis=-1)


def log_softmax_rows(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    s = np.where(mask, scores, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def haar_orthogonal(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar random orthogonal matrix (QR with the sign fix), from numpy: independent of the library."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


# -- synthetic (isotropic) -------------------------------------------------------------------
class SyntheticData:
    def __init__(self, settings: BenchSettings):
        rng = np.random.default_rng(settings.seed)
        self.x = rng.standard_normal((settings.n, settings.dim)).astype(np.float32)
        self.y = rng.standard_normal((settings.num_queries, settings.dim)).astype(np.float32)
        x64, y64 = self.x.astype(np.float64), self.y.astype(np.float64)
        self.true = y64 @ x64.T
        self.norm2 = np.outer((y64 ** 2).sum(-1), (x64 ** 2).sum(-1))
        self.best = np.argmax(self.true, axis=1)


def synthetic_row(data: SyntheticData, settings: BenchSettings, rotation: str, mode: str, bits: int) -> Dict:
    dim = settings.dim
    quantizer = Quantizer(dim, bits, rotation=rotation, mode=mode, seed=settings.seed)
    codes = quantizer.encode(data.x)
    mse = float(per_vector_relative_mse(data.x, quantizer.decode(codes)).mean())
    est = np.asarray(quantizer.inner_product(codes, data.y), dtype=np.float64)
    moments = Moments()
    moments.add(data.true, est)
    ip_err = float((dim * (est - data.true) ** 2 / data.norm2).mean())
    order = np.argsort(-est, axis=1)[:, :10]
    recall1 = float((order[:, 0] == data.best).mean())
    recall10 = float((order == data.best[:, None]).any(axis=1).mean())
    optimum = codebook(quantizer.padded_dim, bits).mse_total if mode == "mse" and quantizer.padded_dim >= 2 else None
    return {
        "rotation": rotation, "mode": mode, "bits": bits, "dim": dim, "padded_dim": quantizer.padded_dim,
        "bytes_per_vector": codes.nbytes / len(codes), "compression_vs_fp16": 2.0 * dim * len(codes) / codes.nbytes,
        "num_parameters": quantizer.num_parameters,
        "mse": mse, "mse_optimum": optimum,
        "mse_paper_bound": PAPER_MSE_BOUND * 4.0 ** -bits if mode == "mse" else None,
        "mse_lower_bound": 4.0 ** -bits if mode == "mse" else None,
        "ip_slope": moments.slope(), "ip_correlation": moments.correlation(), "ip_error_d": ip_err,
        "ip_paper_bound": PAPER_PROD_BOUND * 4.0 ** -bits if mode == "prod" else None,
        "recall_at_1": recall1, "recall_at_10": recall10,
    }


# -- real KV sample ----------------------------------------------------------------------------
class RealBlock:
    """One (layer, KV head) of the sample with everything exact precomputed once for all configurations."""

    def __init__(self, layer: int, kv_head: int, keys, values, queries, positions, scale, margin, rng):
        self.layer, self.kv_head = layer, kv_head
        self.keys, self.values, self.queries = keys, values, queries   # queries (rows, d)
        tokens = keys.shape[0]
        self.mask = np.arange(tokens)[None, :] <= positions[:, None]
        k64, q64 = keys.astype(np.float64), queries.astype(np.float64)
        self.true = (q64 @ k64.T) * scale
        log_p = log_softmax_rows(self.true, self.mask)
        self.p = np.exp(log_p)
        self.log_p = np.where(self.mask, log_p, 0.0)   # finite everywhere: masked entries have p = 0
        self.exact_out = np.einsum("rt,td->rd", self.p, values.astype(np.float64))
        masked_true = np.where(self.mask, self.true, -np.inf)
        self.top1 = np.argmax(masked_true, axis=1)
        self.norm2 = np.outer((q64 ** 2).sum(-1), (k64 ** 2).sum(-1))
        # planted needle per row: k_r + c q with scaled score = best real score + margin
        pick = (rng.random(len(positions)) * (positions + 1)).astype(np.int64)
        base = k64[pick]
        best = masked_true.max(axis=1)
        base_score = (q64 * base).sum(-1) * scale
        c = (best + margin - base_score) / (scale * (q64 ** 2).sum(-1))
        self.needles = (base + c[:, None] * q64).astype(np.float32)
        self.masked_rows = self.mask.sum()


class RealData:
    def __init__(self, settings: BenchSettings, sample: Optional[dict] = None):
        if sample is None:
            from ..data import load_kv_sample

            sample = load_kv_sample()
        meta = sample["metadata"]
        self.meta = meta
        self.layers = list(sample["layers"])
        self.dim = int(meta["head_dim"])
        tokens = int(meta["tokens"])
        group = int(meta["num_heads"]) // int(meta["num_kv_heads"])
        scale = 1.0 / math.sqrt(self.dim)
        positions = np.arange(min(settings.min_context, tokens - 1), tokens, settings.query_stride)
        self.positions = positions
        rng = np.random.default_rng(settings.seed + 1)
        self.blocks: List[RealBlock] = []
        for layer in self.layers:
            q_all, k_all, v_all = sample["q"][layer], sample["k"][layer], sample["v"][layer]
            for kv_head in range(k_all.shape[0]):
                heads = list(range(kv_head * group, (kv_head + 1) * group))
                queries = np.ascontiguousarray(q_all[heads][:, positions].reshape(-1, self.dim))
                rows = np.tile(positions, len(heads))
                self.blocks.append(RealBlock(layer, kv_head, np.ascontiguousarray(k_all[kv_head]),
                                             np.ascontiguousarray(v_all[kv_head]), queries, rows, scale,
                                             settings.needle_margin, rng))
        self.all_keys = np.concatenate([b.keys for b in self.blocks])
        self.all_values = np.concatenate([b.values for b in self.blocks])
        self.all_needles = np.concatenate([b.needles for b in self.blocks])
        # row ranges of each block in the concatenated arrays (one encode call per array, not per block)
        self.key_slices, self.needle_slices = [], []
        key_start = needle_start = 0
        for block in self.blocks:
            self.key_slices.append(slice(key_start, key_start + block.keys.shape[0]))
            self.needle_slices.append(slice(needle_start, needle_start + block.needles.shape[0]))
            key_start += block.keys.shape[0]
            needle_start += block.needles.shape[0]
        self.scale = scale

    def description(self) -> Dict[str, Any]:
        m = self.meta
        return {"model": m.get("model"), "text_source": m.get("text_source"), "tokens": int(m["tokens"]),
                "layers": self.layers, "head_dim": self.dim, "num_heads": int(m["num_heads"]),
                "num_kv_heads": int(m["num_kv_heads"]), "query_positions": [int(self.positions[0]),
                                                                             int(self.positions[-1])],
                "query_rows": int(sum(b.queries.shape[0] for b in self.blocks))}


def real_row(data: RealData, settings: BenchSettings, rotation: str, mode: str, bits: int) -> Dict:
    quantizer = Quantizer(data.dim, bits, rotation=rotation, mode=mode, seed=settings.seed)
    key_mse: List[np.ndarray] = []
    value_mse: List[np.ndarray] = []
    moments = Moments()
    ip_err_sum = 0.0
    kl_sum = top1_sum = needle_sum = cos_sum = 0.0
    rows = 0
    per_layer: Dict[int, Dict[str, float]] = {}
    all_key_codes = quantizer.encode(data.all_keys)
    all_values_hat = np.asarray(quantizer.decode(quantizer.encode(data.all_values)), dtype=np.float64)
    all_keys_hat = quantizer.decode(all_key_codes)
    all_needle_codes = quantizer.encode(data.all_needles)
    bytes_per_vector = all_key_codes.nbytes / len(all_key_codes)
    for block, key_rows, needle_rows in zip(data.blocks, data.key_slices, data.needle_slices):
        key_codes = all_key_codes[key_rows]
        values_hat = all_values_hat[key_rows]
        k_err = per_vector_relative_mse(block.keys, all_keys_hat[key_rows])
        key_mse.append(k_err)
        value_mse.append(per_vector_relative_mse(block.values, values_hat))
        est = np.asarray(quantizer.inner_product(key_codes, block.queries), dtype=np.float64) * data.scale
        mask = block.mask
        moments.add(block.true[mask], est[mask])
        ip_err_sum += float((data.dim * ((est - block.true)[mask] / data.scale) ** 2 / block.norm2[mask]).sum())
        log_p_hat = log_softmax_rows(est, mask)
        p_hat = np.exp(log_p_hat)
        kl = (block.p * (block.log_p - np.where(mask, log_p_hat, 0.0))).sum(axis=-1)
        masked_est = np.where(mask, est, -np.inf)
        top1 = np.argmax(masked_est, axis=1) == block.top1
        needle_codes = all_needle_codes[needle_rows]
        needle_scores = np.einsum("ii->i", np.asarray(quantizer.inner_product(needle_codes, block.queries),
                                                      dtype=np.float64)) * data.scale
        found = needle_scores > masked_est.max(axis=1)
        out = np.einsum("rt,td->rd", p_hat, values_hat)   # not BLAS: its threads spin on busy machines
        cos = (block.exact_out * out).sum(-1) / (np.linalg.norm(block.exact_out, axis=-1) *
                                                 np.linalg.norm(out, axis=-1) + 1e-30)
        kl_sum += float(kl.sum())
        top1_sum += float(top1.sum())
        needle_sum += float(found.sum())
        cos_sum += float(cos.sum())
        rows += kl.size
        entry = per_layer.setdefault(block.layer, {"kl": 0.0, "top1": 0.0, "cos": 0.0, "rows": 0, "key_err": []})
        entry["kl"] += float(kl.sum())
        entry["top1"] += float(top1.sum())
        entry["cos"] += float(cos.sum())
        entry["rows"] += kl.size
        entry["key_err"].append(k_err)
    layers = []
    for layer, entry in per_layer.items():
        layers.append({"layer": layer, "attention_kl": entry["kl"] / entry["rows"], "top1": entry["top1"] / entry["rows"],
                       "output_cosine": entry["cos"] / entry["rows"],
                       "key_mse": float(np.concatenate(entry["key_err"]).mean())})
    masked = sum(int(b.masked_rows) for b in data.blocks)
    return {
        "rotation": rotation, "mode": mode, "bits": bits, "dim": data.dim, "padded_dim": quantizer.padded_dim,
        "bytes_per_vector": bytes_per_vector, "compression_vs_fp16": 2.0 * data.dim / bytes_per_vector,
        "num_parameters": quantizer.num_parameters,
        "key_mse": float(np.concatenate(key_mse).mean()), "value_mse": float(np.concatenate(value_mse).mean()),
        "mse_optimum": codebook(quantizer.padded_dim, bits).mse_total if mode == "mse" else None,
        "ip_slope": moments.slope(), "ip_correlation": moments.correlation(), "ip_error_d": ip_err_sum / masked,
        "top1": top1_sum / rows, "needle": needle_sum / rows,
        "attention_kl": kl_sum / rows, "output_cosine": cos_sum / rows,
        "per_layer": layers,
    }


# -- equivariance -----------------------------------------------------------------------------
def equivariance_row(data: RealData, settings: BenchSettings, rotation: str, bits: int) -> Dict:
    """MSE on the real keys K and on K G^T for an independent Haar G (mse mode), each averaged over
    ``equivariance_seeds`` quantizer seeds, with the z-score of the difference of the two means."""
    keys = data.all_keys
    g = haar_orthogonal(data.dim, np.random.default_rng(settings.seed + 2))
    rotated = np.ascontiguousarray((keys.astype(np.float64) @ g.T).astype(np.float32))
    plain, turned = [], []
    for offset in range(settings.equivariance_seeds):
        quantizer = Quantizer(data.dim, bits, rotation=rotation, mode="mse", seed=settings.seed + offset)
        plain.append(float(per_vector_relative_mse(keys, quantizer.decode(quantizer.encode(keys))).mean()))
        turned.append(float(per_vector_relative_mse(rotated, quantizer.decode(quantizer.encode(rotated))).mean()))
    plain_a, turned_a = np.array(plain), np.array(turned)
    count = len(plain)
    spread = math.sqrt((plain_a.var(ddof=1) + turned_a.var(ddof=1)) / count) if count > 1 else 0.0
    difference = float(turned_a.mean() - plain_a.mean())
    matrix = Rotation(rotation, data.dim, seed=settings.seed).matrix().astype(np.float64)
    eye = np.eye(matrix.shape[0])
    return {
        "rotation": rotation, "bits": bits, "seeds": count, "mse_keys": float(plain_a.mean()),
        "mse_rotated_keys": float(turned_a.mean()), "gap": difference / float(plain_a.mean()),
        "gap_z": difference / spread if spread > 0 else None,
        "orthogonality_error": float(np.abs(matrix @ matrix.T - eye).max()),
        "distance_from_identity": float(np.linalg.norm(matrix - eye) / math.sqrt(matrix.shape[0])),
    }


# -- speed ----------------------------------------------------------------------------------
def _best_time(function: Callable[[], Any], repeats: int, synchronize: Callable[[], None] = lambda: None,
               min_total_s: float = 0.05, max_repeats: int = 50) -> float:
    """Best time of at least ``repeats`` calls after a warm-up; short calls repeat until ``min_total_s`` has
    passed (up to ``max_repeats``), so that one scheduling hiccup of a busy machine does not set the result."""
    function()  # warm-up (caches, thread pool, first CUDA upload)
    synchronize()
    best, total, count = float("inf"), 0.0, 0
    while count < repeats or (total < min_total_s and count < max_repeats):
        start = time.perf_counter()
        function()
        synchronize()
        elapsed = time.perf_counter() - start
        best, total, count = min(best, elapsed), total + elapsed, count + 1
    return max(best, 1e-9)


class NumpyBaseline:
    """The same pipeline written plainly in numpy for timing only: normalize, dense float32 rotation,
    ``searchsorted`` on the codebook boundaries (uint8 indices, not bit-packed); decode: centroids, inverse
    rotation, rescale. Not used for any result."""

    def __init__(self, dim: int, bits: int, seed: int):
        self.matrix = Rotation("dense", dim, seed=seed).matrix().astype(np.float32)
        book = codebook(dim, bits)
        self.boundaries = book.boundaries.astype(np.float32)
        self.centroids = book.centroids.astype(np.float32)

    def encode(self, x: np.ndarray):
        norms = np.linalg.norm(x, axis=1)
        unit = x / np.maximum(norms, 1e-30)[:, None]
        rotated = unit @ self.matrix.T
        return np.searchsorted(self.boundaries, rotated, side="right").astype(np.uint8), norms.astype(np.float16)

    def decode(self, codes) -> np.ndarray:
        indices, norms = codes
        return (self.centroids[indices] @ self.matrix) * norms.astype(np.float32)[:, None]


def speed_rows(settings: BenchSettings, rotations: Sequence[str], bits: int, step: Callable[[str], None]) -> List[Dict]:
    rows: List[Dict] = []
    dim = settings.dim
    rng = np.random.default_rng(settings.seed + 3)
    baseline = NumpyBaseline(dim, bits, settings.seed)
    devices = [("cpu", None)]
    cuda = _cuda_torch()
    if cuda is not None:
        devices.append(("cuda", cuda))
    for n in settings.speed_sizes:
        x = rng.standard_normal((n, dim)).astype(np.float32)
        base_codes = baseline.encode(x)
        base_encode = _best_time(lambda: baseline.encode(x), settings.speed_repeats)
        base_decode = _best_time(lambda: baseline.decode(base_codes), settings.speed_repeats)
        rows.append({"device": "cpu", "rotation": "numpy baseline (dense)", "n": n, "bits": bits,
                     "encode_vectors_per_s": n / base_encode, "decode_vectors_per_s": n / base_decode,
                     "encode_vs_baseline": 1.0, "decode_vs_baseline": 1.0})
        for device, torch in devices:
            data = x if torch is None else torch.from_numpy(x).to("cuda")
            sync = (lambda: None) if torch is None else torch.cuda.synchronize
            for rotation in rotations:
                quantizer = Quantizer(dim, bits, rotation=rotation, mode="mse", seed=settings.seed)
                codes = quantizer.encode(data)
                t_encode = _best_time(lambda: quantizer.encode(data), settings.speed_repeats, sync)
                t_decode = _best_time(lambda: quantizer.decode(codes), settings.speed_repeats, sync)
                rows.append({"device": device, "rotation": rotation, "n": n, "bits": bits,
                             "encode_vectors_per_s": n / t_encode, "decode_vectors_per_s": n / t_decode,
                             "encode_vs_baseline": base_encode / t_encode, "decode_vs_baseline": base_decode / t_decode})
            step(f"speed n={n}")
    return rows


def _cuda_torch():
    """torch when rotorquant has CUDA and torch sees a GPU, else None (imports torch only in that case)."""
    from .. import has_cuda

    if not has_cuda():
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# -- the run --------------------------------------------------------------------------------
def machine_description() -> Dict[str, Any]:
    from .. import config

    info = config()
    return {"platform": info["platform"], "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "num_threads": info["num_threads"], "has_cuda": info["has_cuda"],
            "cuda_devices": info["cuda_devices"], "python": info["python"]}


def run_bench(settings: BenchSettings, progress_factory=None) -> Dict[str, Any]:
    """Runs every section and returns the JSON-ready result dict (see the module docstring)."""
    from ._output import Progress

    started = time.perf_counter()
    configs = [(r, m, b) for m in settings.modes for b in settings.bits for r in settings.rotations]
    speed_steps = 0 if settings.skip_speed else len(settings.speed_sizes)
    total = 2 * len(configs) + len(settings.rotations) + speed_steps + 1
    progress = (progress_factory or Progress)(total, "bench")
    try:
        synthetic = SyntheticData(settings)
        real = RealData(settings)
        progress.step("data")
        synthetic_rows, real_rows = [], []
        for rotation, mode, bits in configs:
            synthetic_rows.append(synthetic_row(synthetic, settings, rotation, mode, bits))
            progress.step(f"synthetic {rotation} {mode} {bits}b")
        for rotation, mode, bits in configs:
            real_rows.append(real_row(real, settings, rotation, mode, bits))
            progress.step(f"real KV {rotation} {mode} {bits}b")
        focus = settings.focus_bits()
        equivariance = []
        for rotation in settings.rotations:
            equivariance.append(equivariance_row(real, settings, rotation, focus))
            progress.step(f"equivariance {rotation}")
        speed = [] if settings.skip_speed else speed_rows(settings, settings.rotations, focus, progress.step)
    finally:
        progress.close()
    per_layer = []
    for row in real_rows:
        for entry in row.pop("per_layer"):
            per_layer.append({"rotation": row["rotation"], "mode": row["mode"], "bits": row["bits"], **entry})
    return {
        "command": "bench",
        "rotorquant_version": __version__,
        "schema_version": 1,
        "settings": settings.as_dict(),
        "machine": machine_description(),
        "real_kv_sample": real.description(),
        "focus_bits": focus,
        "elapsed_s": time.perf_counter() - started,
        "synthetic": synthetic_rows,
        "real_kv": real_rows,
        "per_layer": per_layer,
        "equivariance": equivariance,
        "speed": speed,
    }


# -- the command ------------------------------------------------------------------------------
def _int_list(text: str) -> List[int]:
    import argparse

    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _word_list(text: str) -> List[str]:
    import argparse

    values = [v for v in text.replace(",", " ").split() if v]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "bench", help="the seven tests for every rotation x mode x bits, isotropic + real KV data (offline)",
        description="The seed's seven tests side by side for every rotation x mode x bits: MSE by bits (with the "
                    "Lloyd-Max optimum and the paper's bound), inner-product quality, needle retrieval with real "
                    "queries, parameters, encode/decode speed, equivariance, real-model KV fidelity. Data: isotropic "
                    "Gaussian vectors and the SmolLM2 KV sample shipped in the package (no downloads). Defaults "
                    "take about a minute on 2 cores; --quick about 10 s.")
    parser.add_argument("--quick", action="store_true", help="small sizes (bits 2,3,4, fewer vectors and queries)")
    parser.add_argument("--rotations", type=_word_list, default=None, metavar="A,B",
                        help="rotation kinds (default: all of rotorquant.rotation_kinds())")
    parser.add_argument("--modes", type=_word_list, default=None, metavar="A,B", help="mse, prod (default both)")
    parser.add_argument("--bits", type=_int_list, default=None, metavar="B,B",
                        help="bits per coordinate (default 1,2,3,4; --quick 2,3,4)")
    parser.add_argument("--dim", type=int, default=128, help="dimension of the isotropic vectors (default 128)")
    parser.add_argument("--n", type=int, default=None, help="isotropic vectors (default 4096; --quick 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and quantizers (default 0)")
    parser.add_argument("--query-stride", type=int, default=None,
                        help="real KV: every k-th query position (default 4; --quick 32)")
    parser.add_argument("--min-context", type=int, default=32,
                        help="real KV: first query position used, i.e. at least this many earlier keys (default 32)")
    parser.add_argument("--needle-margin", type=float, default=1.0,
                        help="logits by which the planted needle beats every real key (default 1.0)")
    parser.add_argument("--speed-sizes", type=_int_list, default=None, metavar="N,N",
                        help="batch sizes of the speed test (default 256,1024,4096,16384; --quick 1024,8192)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed test")
    parser.add_argument("--json", metavar="FILE", default=None, help="write all results as JSON")
    parser.add_argument("--plot", metavar="DIR", default=None,
                        help="write PNG figures (needs matplotlib: pip install \"rotorquant[cli]\")")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--plain", action="store_true", help="plain-text tables even when rich is installed")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ._output import Progress, check_output_file, print_report_header
    from . import plots

    settings = BenchSettings(quick=args.quick, rotations=args.rotations, modes=args.modes, bits=args.bits,
                             dim=args.dim, n=args.n, seed=args.seed, speed_sizes=args.speed_sizes,
                             query_stride=args.query_stride, min_context=args.min_context,
                             needle_margin=args.needle_margin,
                             skip_speed=args.no_speed)
    if args.json:
        check_output_file(args.json, "--json")
    if args.plot:
        plots.prepare(args.plot)   # fails before the work when matplotlib is missing or DIR is unusable
    enabled = not args.no_progress
    result = run_bench(settings, lambda total, label: Progress(total, label, enabled))
    print_report_header(f"rotorquant bench {__version__}: {result['elapsed_s']:.1f} s on "
                        f"{result['machine']['cpu_count']} CPU cores"
                        + (f" + {', '.join(result['machine']['cuda_devices'])}" if result["machine"]["has_cuda"]
                           else ""))
    print_bench_tables(result, plain=args.plain)
    if args.json:
        from ._output import write_json

        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plots.bench_figures(result, args.plot):
            print(f"wrote {path}")
    return 0


def print_bench_tables(result: Dict[str, Any], plain: bool = False) -> None:
    from ._output import Column as C, print_table

    s = result["settings"]
    sample = result["real_kv_sample"]
    print_table(
        f"1-4. Isotropic Gaussian vectors: n={s['n']}, d={s['dim']}, {s['num_queries']} queries",
        [C("rotation"), C("mode"), C("bits"), C("bytes_per_vector", "B/vec", 1), C("num_parameters", "params"),
         C("mse", "MSE"), C("mse_optimum", "optimum"), C("mse_paper_bound", "bound"), C("ip_slope", "IP slope", 3),
         C("ip_correlation", "IP corr", 4), C("ip_error_d", "IP err*d"), C("ip_paper_bound", "IP bound"),
         C("recall_at_1", "R@1", 3), C("recall_at_10", "R@10", 3)],
        result["synthetic"], plain=plain,
        note="MSE: mean ||x - x^||^2/||x||^2; optimum: Lloyd-Max codebook(padded_dim, bits).mse_total; bound: "
             "sqrt(3)pi/2 4^-b (mse mode). IP: inner_product on the codes vs exact <y,x>; IP err*d: "
             "d*mean(err^2/(|x|^2|y|^2)), bound sqrt(3)pi^2 4^-b (prod mode). R@k: exact best key in the top k.")
    print_table(
        f"2-3, 7. Real KV: {sample['model']}, layers {sample['layers']}, {sample['tokens']} tokens, "
        f"{sample['query_rows']} query rows",
        [C("rotation"), C("mode"), C("bits"), C("bytes_per_vector", "B/vec", 1), C("key_mse", "key MSE"),
         C("value_mse", "value MSE"), C("mse_optimum", "optimum"), C("ip_slope", "IP slope", 3),
         C("ip_correlation", "IP corr"), C("top1", "top-1", 3), C("needle", "needle", 3),
         C("attention_kl", "attn KL"), C("output_cosine", "out cos")],
        result["real_kv"], plain=plain,
        note="top-1: the exact best visible key stays best under quantized scores; needle: a planted key that "
             f"beats every real key by {s['needle_margin']} logit is found (argmax); attn KL in nats; out cos: "
             "attention output with K and V quantized vs exact.")
    focus = result["focus_bits"]
    layers = sample["layers"]
    by_rotation: Dict[str, Dict[str, Any]] = {}
    for entry in result["per_layer"]:
        if entry["mode"] == "mse" and entry["bits"] == focus:
            row = by_rotation.setdefault(entry["rotation"], {"rotation": entry["rotation"]})
            row[f"kl_{entry['layer']}"] = entry["attention_kl"]
            row[f"cos_{entry['layer']}"] = entry["output_cosine"]
    print_table(f"7. Attention fidelity per layer (mse, {focus} bits): KL (nats) and output cosine",
                [C("rotation")] + [C(f"kl_{layer}", f"KL L{layer}") for layer in layers]
                + [C(f"cos_{layer}", f"cos L{layer}") for layer in layers],
                by_rotation.values(), plain=plain)
    print_table(
        f"6. Equivariance on the real keys (mse, {focus} bits, mean over {s['equivariance_seeds']} seeds)",
        [C("rotation"), C("mse_keys", "MSE(K)"), C("mse_rotated_keys", "MSE(K G^T)"), C("gap", "gap", 3),
         C("gap_z", "gap z", 2), C("orthogonality_error", "|M M^T - I|max"),
         C("distance_from_identity", "|M - I|/sqrt(p)", 3)],
        result["equivariance"], plain=plain,
        note="G: an independent Haar orthogonal matrix. dense must show |gap z| < ~3 (same MSE distribution); "
             "block rotations and identity depend on the basis. M: the quantizer's rotation matrix (identity: 0).")
    if result["speed"]:
        print_table(
            f"5. Speed (mse, {focus} bits, d={s['dim']}, best of >= {s['speed_repeats']} calls): vectors/s and ratio to the "
            "numpy baseline of the same run",
            [C("device"), C("rotation"), C("n"), C("encode_vectors_per_s", "encode/s", 0),
             C("encode_vs_baseline", "x numpy", 2), C("decode_vectors_per_s", "decode/s", 0),
             C("decode_vs_baseline", "x numpy", 2)],
            result["speed"], plain=plain,
            note="numpy baseline: normalize, dense float32 rotation (BLAS), searchsorted, unpacked indices.")
