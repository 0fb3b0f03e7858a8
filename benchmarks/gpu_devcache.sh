#!/usr/bin/env bash
# Device script of the device-resident KV cache (issue 6): build with CUDA sm_90, the device-cache tests (CUDA and
# CPU parts), the Hugging Face tests, optionally a compute-sanitizer memcheck of a device-cache run, and
# benchmarks/bench_hf_decode.py. Run from the repository root; logs go to $OUT:
#   build.log  devcache_tests.log  memcheck.log  bench_hf_decode.txt  bench_hf_decode_2.txt  summary.txt
# Stages can be skipped: SKIP_TESTS=1 SKIP_BENCH=1; SANITIZE=1 adds the memcheck; BENCH_ARGS passes options to
# bench_hf_decode.py; BENCH2_ARGS runs it a second time with those options; PYTEST_ARGS to pytest.
set -euo pipefail

# shellcheck source=benchmarks/gpu_build.sh
. "$(dirname "$0")/gpu_build.sh"
cd /tmp  # import the installed package, never the source tree

python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import rotorquant, torch
print("rotorquant", rotorquant.__version__, "has_cuda:", rotorquant.has_cuda(), "torch", torch.__version__)
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError as error:
    print("transformers missing:", error)
try:
    from rotorquant import DecodeAttention  # noqa: F401
    print("DecodeAttention: present")
except ImportError:
    print("DecodeAttention: absent (fused path not merged; decode uses the dequantized path)")
EOF

set +e
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${DEVCACHE_TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider --maxfail=40 --tb=short -rs \
    "$REPO/tests/python/test_kv_cache_device.py" "$REPO/tests/python/test_hf.py" "$REPO/tests/python/test_kv_cache.py" \
    ${PYTEST_ARGS:-} > "$OUT/devcache_tests.log" 2>&1
  note "devcache tests exit: $? ($(tail -1 "$OUT/devcache_tests.log"))"
fi

if [ -n "${SANITIZE:-}" ] && command -v compute-sanitizer > /dev/null; then
  cat > /tmp/rq_devcache_sanitize.py <<'PY'
import torch
import rotorquant as rq

for options in (dict(), dict(mode="prod"), dict(center_values=True, key_channel_scaling=0.5, sink_tokens=0)):
    cache = rq.KVCache(2, 2, 128, residual_window=8, device="cuda", **options)
    for tokens in (37, 1, 1, 300, 1):
        k = torch.randn(3, 2, tokens, 128, device="cuda")
        for layer in range(2):
            cache.append(layer, k, k * 0.5)
            cache.attend(layer, torch.randn(3, 8, 1, 128, device="cuda"))
    cache.attend(0, torch.randn(3, 8, 5, 128, device="cuda"))
    cache.reorder(torch.tensor([2, 0], device="cuda"))
    cache.crop(100)
    cache.dequantize(1)
    torch.cuda.synchronize()
print("sanitizer script done")
PY
  timeout "${MEMCHECK_TIMEOUT:-120}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 /tmp/rq_devcache_sanitize.py > "$OUT/memcheck.log" 2>&1
  note "memcheck exit: $? ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1))"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 "$REPO/benchmarks/bench_hf_decode.py" ${BENCH_ARGS:-} \
    > "$OUT/bench_hf_decode.txt" 2>&1
  note "bench exit: $?"
  tail -25 "$OUT/bench_hf_decode.txt"
  if [ -n "${BENCH2_ARGS:-}" ]; then  # a second configuration (e.g. a larger batch)
    timeout "${BENCH2_TIMEOUT:-240}" python3 "$REPO/benchmarks/bench_hf_decode.py" ${BENCH2_ARGS} \
      > "$OUT/bench_hf_decode_2.txt" 2>&1
    note "bench 2 exit: $?"
    tail -25 "$OUT/bench_hf_decode_2.txt"
  fi
fi
set -e
cat "$SUMMARY"
