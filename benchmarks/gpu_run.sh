#!/usr/bin/env bash
# The one script run on a GPU machine (H100): builds and installs rotorquant with CUDA,
# runs the CUDA tests, a rotation throughput table, a compute-sanitizer memcheck and the
# whole Python suite (timeouts: CUDA_TESTS_TIMEOUT=240, MEMCHECK_TIMEOUT=180, ALL_TESTS_TIMEOUT=150 s,
# so that a device call of 10 minutes ends in time). Run from the repository root; results go to $OUT (default /tmp/rq_out):
#   build.log  cuda_tests.log  rotation_bench.txt  memcheck.log  all_tests.log  summary.txt
# Carried wheels in .whl/ (scikit-build-core, pybind11, ...) are installed to /tmp/site first.
set -euo pipefail

# shellcheck source=benchmarks/gpu_build.sh
. "$(dirname "$0")/gpu_build.sh"

cd /tmp  # import the installed package, never the source tree
python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import rotorquant, torch
from rotorquant import _core
print("rotorquant", rotorquant.__version__, "from", rotorquant.__file__)
print("built_with_cuda:", _core.built_with_cuda, "has_cuda:", rotorquant.has_cuda(),
      "devices:", _core.cuda_device_count(), "runtime:", _core.cuda_runtime_version())
if _core.cuda_device_count():
    print("device 0:", _core.cuda_device_name(0))
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
EOF

# ---- CUDA tests ----------------------------------------------------------------------
set +e
timeout "${CUDA_TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider "$REPO/tests/python" -m cuda -rs 2>&1 \
  | tee "$OUT/cuda_tests.log"
rc=${PIPESTATUS[0]}
note "cuda tests exit: $rc ($(tail -1 "$OUT/cuda_tests.log"))"
set -e

# ---- throughput table ------------------------------------------------------------------
set +e
python3 - <<'EOF' 2>&1 | tee "$OUT/rotation_bench.txt"
import torch
import rotorquant
from rotorquant import _core

n, dim = 1 << 20, 128
device = torch.device("cuda", 0)
print(f"device: {torch.cuda.get_device_name(0)}; n = {n} rows, dim = {dim}, float32")
print("GB/s counts bytes read (n*dim*4) + written (n*padded_dim*4); parameters not counted.")


def time_ms(fn, repeats=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


x = torch.randn(n, dim, device=device)
print(f"{'what':42s} {'ms':>8s} {'GB/s':>8s}")


def row(name, ms, bytes_moved):
    print(f"{name:42s} {ms:8.3f} {bytes_moved / ms / 1e6:8.1f}")


row("torch clone (copy baseline)", time_ms(lambda: x.clone()), 2 * n * dim * 4)
matrix = torch.linalg.qr(torch.randn(dim, dim, device=device))[0]
torch.backends.cuda.matmul.allow_tf32 = False
row("torch x @ M.T (fp32, no TF32)", time_ms(lambda: x @ matrix.T), 2 * n * dim * 4)
torch.backends.cuda.matmul.allow_tf32 = True
row("torch x @ M.T (TF32)", time_ms(lambda: x @ matrix.T), 2 * n * dim * 4)
torch.backends.cuda.matmul.allow_tf32 = False
for kind in rotorquant.rotation_kinds():
    rotation = rotorquant.Rotation(kind, dim, seed=1)
    padded = rotation.padded_dim
    cuda_rotation = _core.CudaRotation(_core.Rotation(kind, rotation.dim, rotation.seed), 0)
    out = torch.empty(n, padded, device=device)
    back = torch.empty(n, dim, device=device)
    stream = torch.cuda.current_stream().cuda_stream
    moved = n * (dim + padded) * 4
    row(f"{kind}: kernel apply (CudaRotation)",
        time_ms(lambda: cuda_rotation.apply(x.data_ptr(), out.data_ptr(), n, stream)), moved)
    row(f"{kind}: kernel inverse (CudaRotation)",
        time_ms(lambda: cuda_rotation.inverse(out.data_ptr(), back.data_ptr(), n, stream)), moved)
    row(f"{kind}: rotorquant.Rotation.apply", time_ms(lambda: rotation.apply(x)), moved)
    if kind == "dense":
        flops = 2.0 * n * dim * padded
        ms = time_ms(lambda: cuda_rotation.apply(x.data_ptr(), out.data_ptr(), n, stream))
        print(f"{'  dense kernel TFLOP/s':42s} {flops / ms / 1e9:8.2f}")
EOF
rc=${PIPESTATUS[0]}
note "bench exit: $rc"
set -e

# ---- compute-sanitizer memcheck over every kind ------------------------------------------
cat > /tmp/rq_memcheck.py <<'EOF'
import torch
import rotorquant
from rotorquant import _core

device = torch.device("cuda", 0)
for kind in rotorquant.rotation_kinds():
    for dim in (1, 5, 63, 130) + ((1000,) if kind == "hadamard" else ()):
        for n in (0, 1, 7, 70):
            rotation = rotorquant.Rotation(kind, dim, seed=dim + n)
            x = torch.randn(n, dim, device=device)
            y = rotation.apply(x)
            back = rotation.inverse(y)
            torch.cuda.synchronize()
            if n:
                error = (back - x).abs().max().item()
                assert error < 1e-4, (kind, dim, n, error)
    cuda_rotation = _core.CudaRotation(_core.Rotation(kind, rotation.dim, rotation.seed), 0)
    x = torch.randn(3, rotation.dim, device=device)
    y = torch.empty(3, rotation.padded_dim, device=device)
    cuda_rotation.apply(x.data_ptr(), y.data_ptr(), 3, 0)
    torch.cuda.synchronize()
    print(kind, "ok")
print("memcheck script done")
EOF
set +e
if command -v compute-sanitizer > /dev/null; then
  timeout "${MEMCHECK_TIMEOUT:-180}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 /tmp/rq_memcheck.py > "$OUT/memcheck.log" 2>&1
  rc=$?
  note "memcheck exit: $rc ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1))"
else
  note "compute-sanitizer not found; memcheck skipped"
fi
set -e

# ---- compute-sanitizer racecheck (shared-memory kernels: dense tiles, hadamard FWHT) -------
set +e
if command -v compute-sanitizer > /dev/null; then
  cat > /tmp/rq_racecheck.py <<'EOF'
import torch
import rotorquant

for kind in ("dense", "hadamard"):
    for dim in (5, 64, 130, 1000):
        rotation = rotorquant.Rotation(kind, dim, seed=dim)
        x = torch.randn(37, dim, device="cuda")
        back = rotation.inverse(rotation.apply(x))
        torch.cuda.synchronize()
        assert (back - x).abs().max().item() < 1e-4, (kind, dim)
print("racecheck script done")
EOF
  timeout "${RACECHECK_TIMEOUT:-120}" compute-sanitizer --tool racecheck --error-exitcode 3 \
    python3 /tmp/rq_racecheck.py > "$OUT/racecheck.log" 2>&1
  rc=$?
  note "racecheck exit: $rc ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/racecheck.log" | tail -1))"
fi
set -e

# ---- the whole Python suite (CPU + CUDA) ----------------------------------------------------
set +e
timeout "${ALL_TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider "$REPO/tests/python" -rs 2>&1 \
  | tee "$OUT/all_tests.log"
rc=${PIPESTATUS[0]}
note "whole suite exit: $rc ($(tail -1 "$OUT/all_tests.log"))"
set -e
cat "$SUMMARY"
