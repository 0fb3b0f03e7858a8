#!/usr/bin/env bash
# Device script of the fused decode attention (issue 6): build with CUDA sm_90, the attention tests,
# benchmarks/bench_attention.py, optionally ncu on one shape and compute-sanitizer memcheck / racecheck on a small
# script. Logs go to $OUT: build.log  attention_tests.log  bench_attention.txt  ncu_attention.txt  memcheck.log ...
# Stages: SKIP_TESTS=1 SKIP_BENCH=1 TIMELINE=1 PROFILE=1 STALLS=1 SOURCE=1 DURATIONS=1 SASS=1 SANITIZE=1; BENCH_ARGS / PYTEST_ARGS / EXTRA_TESTS
# / SANITIZE_ARGS ("batch context" of the sanitized script) / SANITIZE_TIMEOUT pass options.
set -euo pipefail

# shellcheck source=benchmarks/gpu_build.sh
. "$(dirname "$0")/gpu_build.sh"
cd /tmp

set +e
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${CUDA_TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider --maxfail=20 --tb=short \
    "$REPO/tests/python/test_decode_attention.py" ${EXTRA_TESTS:-} -rs ${PYTEST_ARGS:-} > "$OUT/attention_tests.log" 2>&1
  note "attention tests: $(tail -1 "$OUT/attention_tests.log")"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 "$REPO/benchmarks/bench_attention.py" ${BENCH_ARGS:-} \
    > "$OUT/bench_attention.txt" 2>&1
  note "bench exit: $?"
fi

if [ -n "${TIMELINE:-}" ]; then  # the launches' durations and gaps at real clocks (CUPTI trace)
  timeout "${TIMELINE_TIMEOUT:-120}" python3 "$REPO/benchmarks/attention_timeline.py" ${TIMELINE_ARGS:-} \
    > "$OUT/timeline.txt" 2>&1
  note "timeline exit: $?"
fi

cat > /tmp/rq_attention_small.py <<'PY'
import sys
import torch
import rotorquant as rq

# A few small calls over every head-chunk width and bit pair (for the sanitizers and the profiler).
device = torch.device("cuda", 0)
batch, context = int(sys.argv[1]), int(sys.argv[2])
for group, (kb, vb) in ((1, (2, 2)), (3, (3, 3)), (4, (4, 3)), (8, (3, 4)), (4, (4, 4)), (8, (3, 3))):
    kq = [rq.Quantizer(128, kb, rotation="hadamard", seed=h) for h in range(8)]
    vq = [rq.Quantizer(128, vb, rotation="hadamard", seed=100 + h) for h in range(8)]
    att = rq.DecodeAttention(kq, vq)
    ki = torch.randint(0, 256, (batch, 8, context, kq[0]._native.index_bytes), dtype=torch.uint8, device=device)
    vi = torch.randint(0, 256, (batch, 8, context, vq[0]._native.index_bytes), dtype=torch.uint8, device=device)
    norms = torch.rand(batch, 8, context, device=device).half().view(torch.uint8).view(batch, 8, context, 2)
    lengths = torch.randint(0, context + 1, (batch,), dtype=torch.int32, device=device)
    fp_k = torch.randn(batch, 8, 20, 128, device=device)
    fp_len = torch.randint(0, 21, (batch,), dtype=torch.int32, device=device)
    q = torch.randn(batch, 8 * group, 128, device=device, dtype=torch.float16)
    out = att(q, ki, norms, vi, norms, lengths, fp_keys=fp_k, fp_values=fp_k, fp_lengths=fp_len)
    # without a window: the split kernel rotates the queries and no prepare is launched
    bare = att(q, ki, norms, vi, norms, lengths)
    torch.cuda.synchronize()
    print(group, kb, vb, float(out.float().abs().mean()), float(bare.float().abs().mean()), flush=True)
print("done")
PY

if [ -n "${PROFILE:-}" ]; then
  NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
  if [ -n "$NCU" ]; then
    timeout "${PROFILE_TIMEOUT:-120}" "$NCU" --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section InstructionStats -k regex:"split" -c 4 \
      python3 /tmp/rq_attention_small.py 32 8192 > "$OUT/ncu_attention.txt" 2>&1
    note "ncu exit: $?"
  else
    note "ncu not found"
  fi
fi

# One call per K/V bit pair given as arguments ("3/3"), GQA 4, B = 32, 8K tokens or STALL_SHAPE ("1 4096"; STALLS and
# SOURCE profile it), STALL_CALLS times; NCU_FLAGS adds ncu options, e.g. "--cache-control none --launch-skip 2".
cat > /tmp/rq_attention_one.py <<'PY'
import os
import sys
import torch
import rotorquant as rq

device = torch.device("cuda", 0)
batch, context = (int(x) for x in os.environ.get("STALL_SHAPE", "32 8192").split())
group = 4
for pair in sys.argv[1:]:
    kb, vb = (int(x) for x in pair.split("/"))
    kq = [rq.Quantizer(128, kb, rotation="hadamard", seed=h) for h in range(8)]
    vq = [rq.Quantizer(128, vb, rotation="hadamard", seed=100 + h) for h in range(8)]
    att = rq.DecodeAttention(kq, vq)
    ki = torch.randint(0, 256, (batch, 8, context, kq[0]._native.index_bytes), dtype=torch.uint8, device=device)
    vi = torch.randint(0, 256, (batch, 8, context, vq[0]._native.index_bytes), dtype=torch.uint8, device=device)
    norms = (torch.rand(batch, 8, context, device=device) + 1).half().view(torch.uint8).view(batch, 8, context, 2)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, 8 * group, 128, device=device, dtype=torch.float16)
    for _ in range(int(os.environ.get("STALL_CALLS", "1"))):  # with ncu --launch-skip: a warm call
        out = att(q, ki, norms, vi, norms, lengths)
    torch.cuda.synchronize()
    print(pair, float(out.float().abs().mean()), flush=True)
PY

if [ -n "${STALLS:-}" ]; then  # stall reasons and shared-memory wavefronts of the tensor-core split kernel, K/V bits
  # from STALL_BITS (default "3/3")
  NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
  reasons="long_scoreboard short_scoreboard mio_throttle math_pipe_throttle wait barrier not_selected selected \
    dispatch_stall lg_throttle tex_throttle no_instruction branch_resolving drain membar sleeping imc_miss misc"
  metrics="smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active"
  metrics="$metrics,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum"
  metrics="$metrics,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,sm__cycles_elapsed.avg,gpu__time_duration.sum"
  metrics="$metrics,sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active,l1tex__throughput.avg.pct_of_peak_sustained_active"
  metrics="$metrics,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,smsp__inst_executed_op_shfl.sum"
  metrics="$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed"
  metrics="$metrics,launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers,launch__shared_mem_per_block_dynamic"
  for reason in $reasons; do metrics="$metrics,smsp__average_warps_issue_stalled_${reason}_per_issue_active.ratio"; done
  if [ -n "$NCU" ]; then
    timeout "${PROFILE_TIMEOUT:-150}" "$NCU" ${NCU_FLAGS:-} --metrics "$metrics" -k regex:"split_mma" \
      python3 /tmp/rq_attention_one.py ${STALL_BITS:-3/3} > "$OUT/ncu_stalls.txt" 2>&1
    note "ncu stalls exit: $?"
  fi
fi

if [ -n "${SOURCE:-}" ]; then  # warp-state samples per SASS instruction of one split_mma launch (K/V from STALL_BITS)
  NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
  if [ -n "$NCU" ]; then
    timeout "${PROFILE_TIMEOUT:-150}" "$NCU" ${NCU_FLAGS:-} --section SourceCounters --section WarpStateStats -k regex:"split_mma" -c 1 \
      -f -o /tmp/rq_source python3 /tmp/rq_attention_one.py ${STALL_BITS:-3/3} > "$OUT/ncu_source.log" 2>&1
    note "ncu source exit: $?"
    "$NCU" --import /tmp/rq_source.ncu-rep --page source --csv --print-source sass > "$OUT/source_sass.csv" 2>&1
    note "source page exit: $? ($(wc -l < "$OUT/source_sass.csv") lines)"
    "$NCU" --import /tmp/rq_source.ncu-rep --page details > "$OUT/source_details.txt" 2>&1 || true
  fi
fi

if [ -n "${DURATIONS:-}" ]; then  # GPU time of each launch (prepare, split, combine) at K3/V3, GQA 4, B/context pairs
  cat > /tmp/rq_attention_durations.py <<'PY'
import sys
import torch
import rotorquant as rq

device = torch.device("cuda", 0)
for shape in sys.argv[1:]:
    batch, context = (int(x) for x in shape.split("/"))
    kq = [rq.Quantizer(128, 3, rotation="hadamard", seed=h) for h in range(8)]
    vq = [rq.Quantizer(128, 3, rotation="hadamard", seed=100 + h) for h in range(8)]
    att = rq.DecodeAttention(kq, vq)
    ki = torch.randint(0, 256, (batch, 8, context, kq[0]._native.index_bytes), dtype=torch.uint8, device=device)
    norms = (torch.rand(batch, 8, context, device=device) + 1).half().view(torch.uint8).view(batch, 8, context, 2)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        out = att(q, ki, norms, ki, norms, lengths)
    torch.cuda.synchronize()
    print(shape, att.num_splits(batch, 32, context), float(out.float().abs().mean()), flush=True)
PY
  NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
  if [ -n "$NCU" ]; then
    timeout "${PROFILE_TIMEOUT:-150}" "$NCU" --metrics gpu__time_duration.sum -k regex:"prepare_queries|split|combine" \
      python3 /tmp/rq_attention_durations.py ${DURATION_SHAPES:-1/32768 1/131072 32/32768} > "$OUT/ncu_durations.txt" 2>&1
    note "ncu durations exit: $?"
    grep -E "^[0-9]+/|_kernel|gpu__time_duration" "$OUT/ncu_durations.txt" | sed -E "s/\(KernelArgs\).*//; s/ +/ /g" \
      > "$OUT/durations.txt" || true
  fi
fi

if [ -n "${SASS:-}" ]; then  # opcode histogram of one tensor-core split kernel (<128, 3, 3>)
  CUOBJDUMP="$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null || true)"
  LIB="$(python3 -c 'import rotorquant._core as c; print(c.__file__)')"
  if [ -n "$CUOBJDUMP" ]; then
    "$CUOBJDUMP" -sass -fun '_ZN10rotorquant4cuda9attention16split_mma_kernelILi128ELi3ELi3EEEvNS1_10KernelArgsE' "$LIB" \
      > "$OUT/sass_mma_128_3_3.txt" 2>&1
    grep -oE '^ +/\*[0-9a-f]+\*/ +[A-Z0-9_.]+' "$OUT/sass_mma_128_3_3.txt" | awk '{print $2}' | sed 's/\..*//' \
      | sort | uniq -c | sort -rn > "$OUT/sass_histogram.txt"
    note "sass: $(wc -l < "$OUT/sass_mma_128_3_3.txt") lines"
  fi
fi

if [ -n "${SANITIZE:-}" ] && command -v compute-sanitizer > /dev/null; then
  timeout "${SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool memcheck --error-exitcode 3 python3 /tmp/rq_attention_small.py ${SANITIZE_ARGS:-3 700} \
    > "$OUT/memcheck.log" 2>&1
  note "memcheck exit: $? ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1))"
  timeout "${SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool racecheck --error-exitcode 3 python3 /tmp/rq_attention_small.py ${SANITIZE_ARGS:-3 700} \
    > "$OUT/racecheck.log" 2>&1
  note "racecheck exit: $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/racecheck.log" | tail -1))"
fi

set -e
cat "$SUMMARY"
