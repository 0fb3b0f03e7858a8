#!/usr/bin/env bash
# Device script: A/B of the fused attention against an older tree in the same run. The older tree is a
# `git archive REV` unpacked to old_tree/ (ignored; carried with the call), installed to /tmp/old in the environment
# of gpu_env.sh; the working tree is built and installed as in gpu_build.sh (SKIP_BUILD=1 reuses an installed one).
# Each argument is one argument list of benchmarks/bench_attention.py, run for the old then the new build.
# Output: $OUT/ab_attention.txt (TIMELINE=1 adds benchmarks/attention_timeline.py, TIMELINE_ARGS, for both). TESTS=1 then runs the attention tests on the new build ($OUT/attention_tests.log).
#   git archive REV | tar -x -C old_tree;  OUT=$OUT bash benchmarks/gpu_ab_attention.sh "--batches 32 --bits 3/3"
set -uo pipefail
if [ ! -d old_tree ]; then
  echo "no old_tree/ (git archive REV | tar -x -C old_tree, and carry it)"
  exit 1
fi
# shellcheck source=benchmarks/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
# the old tree builds in the background while gpu_build.sh builds the working tree
old_start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps --target /tmp/old ./old_tree > /tmp/rq_old_build.log 2>&1 &
old_pid=$!
# shellcheck source=benchmarks/gpu_build.sh
. "$(dirname "$0")/gpu_build.sh"
if ! wait "$old_pid"; then
  tail -40 /tmp/rq_old_build.log | tee "$OUT/old_build.log"
  note "OLD BUILD FAILED"
  exit 1
fi
note "old build+install (in parallel): $(( $(date +%s) - old_start )) s"
cd /tmp
for args in "$@"; do
  # shellcheck disable=SC2086
  {
    echo "== old: $args"
    PYTHONPATH="/tmp/old:${PYTHONPATH:-}" timeout "${BENCH_TIMEOUT:-150}" python3 "$REPO/benchmarks/bench_attention.py" $args | tail -n +4
    echo "== new: $args"
    timeout "${BENCH_TIMEOUT:-150}" python3 "$REPO/benchmarks/bench_attention.py" $args | tail -n +4
  } >> "$OUT/ab_attention.txt" 2>&1
done
if [ -n "${TIMELINE:-}" ]; then  # the launches' durations and gaps (benchmarks/attention_timeline.py), old then new
  # shellcheck disable=SC2086
  {
    echo "== old timeline"
    PYTHONPATH="/tmp/old:${PYTHONPATH:-}" timeout 120 python3 "$REPO/benchmarks/attention_timeline.py" ${TIMELINE_ARGS:-} 2>&1 | grep -v -i warn
    echo "== new timeline"
    timeout 120 python3 "$REPO/benchmarks/attention_timeline.py" ${TIMELINE_ARGS:-} 2>&1 | grep -v -i warn
  } >> "$OUT/ab_attention.txt" 2>&1
fi
cat "$OUT/ab_attention.txt"
if [ -n "${TESTS:-}" ]; then
  timeout "${CUDA_TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider --maxfail=20 --tb=short \
    "$REPO/tests/python/test_decode_attention.py" -rs > "$OUT/attention_tests.log" 2>&1
  note "attention tests: $(tail -1 "$OUT/attention_tests.log")"
fi
