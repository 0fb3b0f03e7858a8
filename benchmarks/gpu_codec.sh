#!/usr/bin/env bash
# Device script of the fused CUDA codec (issue 5): build with CUDA sm_90, the CUDA tests, compute-sanitizer
# memcheck + racecheck over encode/decode/scores, and benchmarks/bench_cuda.py. Logs go to $OUT:
#   build.log  cuda_tests.log  memcheck.log  racecheck.log  bench_cuda.txt  summary.txt
# Stages can be skipped: SKIP_TESTS=1 SKIP_SANITIZERS=1 SKIP_BENCH=1; BENCH_ARGS passes options to bench_cuda.py.
set -euo pipefail

# shellcheck source=benchmarks/gpu_build.sh
. "$(dirname "$0")/gpu_build.sh"
cd /tmp

set +e
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${CUDA_TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider --maxfail=30 --tb=short \
    "$REPO/tests/python/test_cuda_codec.py" ${EXTRA_TESTS:-} \
    "$REPO/tests/python/test_quantizer.py" -m cuda -rs ${PYTEST_ARGS:-} > "$OUT/cuda_tests.log" 2>&1
  note "cuda tests: $(tail -1 "$OUT/cuda_tests.log")"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-140}" python3 "$REPO/benchmarks/bench_cuda.py" ${BENCH_ARGS:-} > "$OUT/bench_cuda.txt" 2>&1
  note "bench exit: $?"
fi
if [ -n "${PROFILE:-}" ]; then
  NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
  if [ -n "$NCU" ]; then
    cat > /tmp/rq_codec_profile.py <<'PY'
import torch
import rotorquant as rq

x = torch.randn(1 << 20, 128, device="cuda")
for kind, bits in (("identity", 2), ("hadamard", 3), ("dense", 3)):
    q = rq.Quantizer(128, bits, rotation=kind, seed=1)
    codes = q.encode(x, check=False)
    q.decode(codes)
torch.cuda.synchronize()
PY
    timeout "${PROFILE_TIMEOUT:-90}" "$NCU" --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats -k regex:"encode_kernel|encode_fast_kernel|encode_dense_kernel|decode_kernel" python3 /tmp/rq_codec_profile.py \
      > "$OUT/ncu.txt" 2>&1
    note "ncu exit: $?"
  else
    note "ncu not found"
  fi
fi

if [ -z "${SKIP_SANITIZERS:-}" ] && command -v compute-sanitizer > /dev/null; then
  cat > /tmp/rq_codec_sanitize.py <<'PY'
import torch
import rotorquant as rq

device = torch.device("cuda", 0)
for kind in ("identity", "dense", "hadamard", "rotor3", "planar", "quat"):
    for dim, bits, mode in ((128, 3, "mse"), (64, 4, "mse"), (100, 4, "prod"), (5, 2, "prod")):
        q = rq.Quantizer(dim, bits, rotation=kind, mode=mode, seed=1)
        for n in (0, 37):
            x = torch.randn(n, dim, device=device)
            codes = q.encode(x)
            out = q.decode(codes, dtype=torch.float16)
            s = q.inner_product(codes, torch.randn(3, dim, device=device))
            torch.cuda.synchronize()
    print(kind, "ok", flush=True)
print("sanitizer script done")
PY
  timeout "${MEMCHECK_TIMEOUT:-90}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 /tmp/rq_codec_sanitize.py > "$OUT/memcheck.log" 2>&1
  note "memcheck exit: $? ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1))"
  timeout "${RACECHECK_TIMEOUT:-90}" compute-sanitizer --tool racecheck --error-exitcode 3 \
    python3 /tmp/rq_codec_sanitize.py > "$OUT/racecheck.log" 2>&1
  note "racecheck exit: $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/racecheck.log" | tail -1))"
fi

set -e
cat "$SUMMARY"
