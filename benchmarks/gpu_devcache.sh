#!/usr/bin/env bash
# Device script of the device-resident KV cache (issue 6): build with CUDA sm_90, the device-cache tests (CUDA and
# CPU parts), the Hugging Face tests, optionally a compute-sanitizer memcheck of a device-cache run, and
# benchmarks/bench_hf_decode.py. Run from the repository root; logs go to $OUT:
#   build.log  devcache_tests.log  memcheck.log  codec_group.txt  profile[_baseline].txt
#   bench_hf_decode[_2][_baseline].txt  summary.txt (at most 8 files come back from a device run: choose stages)
# Stages can be skipped: SKIP_TESTS=1 SKIP_BENCH=1; SANITIZE=1 adds the memcheck; BENCH_ARGS passes options to
# bench_hf_decode.py; BENCH2_ARGS runs it a second time with those options; PYTEST_ARGS to pytest; EXTRA_TESTS
# (paths relative to the repository root) are added to the tests; CODEC_BENCH=1 runs bench_codec_group.py
# (codec_group.txt); PROFILE_ARGS runs profile_hf_decode.py with them (profile.txt; PROFILE_BASELINE=0: not the
# baseline's).
# BASELINE_PY=<folder of .py files> runs each bench_hf_decode.py configuration (and the profile) a second time with
# the installed package's Python files replaced by those (e.g. the previous python/rotorquant/*.py: an A/B of the
# Python layer on the same build, machine and run): bench_hf_decode_baseline.txt, bench_hf_decode_2_baseline.txt.
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
    "$REPO/tests/python/test_cuda_codec_group.py" "$REPO/tests/python/test_kv_cache_decode_step.py" \
    $(for t in ${EXTRA_TESTS:-}; do echo "$REPO/$t"; done) ${PYTEST_ARGS:-} > "$OUT/devcache_tests.log" 2>&1
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

if [ -n "${CODEC_BENCH:-}" ]; then
  timeout "${CODEC_BENCH_TIMEOUT:-90}" python3 "$REPO/benchmarks/bench_codec_group.py" > "$OUT/codec_group.txt" 2>&1
  note "codec group bench exit: $?"
  cat "$OUT/codec_group.txt"
fi

baseline_path=""
if [ -n "${BASELINE_PY:-}" ]; then  # the installed package with the baseline's Python files
  installed="$(python3 -c 'import os, rotorquant; print(os.path.dirname(rotorquant.__file__))')"
  rm -rf /tmp/rq_baseline && mkdir -p /tmp/rq_baseline && cp -r "$installed" /tmp/rq_baseline/rotorquant
  cp "$REPO/$BASELINE_PY"/*.py /tmp/rq_baseline/rotorquant/
  baseline_path="/tmp/rq_baseline${PYTHONPATH:+:$PYTHONPATH}"
fi

hf_bench() {  # name, options
  timeout "${BENCH_TIMEOUT:-240}" python3 "$REPO/benchmarks/bench_hf_decode.py" $2 > "$OUT/$1.txt" 2>&1
  note "$1 exit: $?"
  tail -25 "$OUT/$1.txt"
  if [ -n "$baseline_path" ]; then
    PYTHONPATH="$baseline_path" timeout "${BENCH_TIMEOUT:-240}" python3 "$REPO/benchmarks/bench_hf_decode.py" $2 \
      > "$OUT/$1_baseline.txt" 2>&1
    note "$1 baseline exit: $?"
    tail -16 "$OUT/$1_baseline.txt"
  fi
}

if [ -n "${PROFILE_ARGS:-}" ]; then  # kernels and host time per decode step (profile[_baseline].txt)
  timeout "${PROFILE_TIMEOUT:-120}" python3 "$REPO/benchmarks/profile_hf_decode.py" $PROFILE_ARGS > "$OUT/profile.txt" 2>&1
  note "profile exit: $?"
  tail -6 "$OUT/profile.txt"
  if [ -n "$baseline_path" ] && [ "${PROFILE_BASELINE:-1}" != 0 ]; then
    PYTHONPATH="$baseline_path" timeout "${PROFILE_TIMEOUT:-120}" python3 "$REPO/benchmarks/profile_hf_decode.py" \
      $PROFILE_ARGS > "$OUT/profile_baseline.txt" 2>&1
    note "profile baseline exit: $?"
    tail -6 "$OUT/profile_baseline.txt"
  fi
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  hf_bench bench_hf_decode "${BENCH_ARGS:-}"
  if [ -n "${BENCH2_ARGS:-}" ]; then  # a second configuration (e.g. a larger batch)
    hf_bench bench_hf_decode_2 "${BENCH2_ARGS}"
  fi
fi
set -e
cat "$SUMMARY"
