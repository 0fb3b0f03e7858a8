#!/usr/bin/env bash
# Device script: several variants of the working tree measured in one run. Each variant is a patch against the
# working tree, VARIANTS_DIR/NAME.patch (default .variants/, ignored; carry it): the tree is copied to /tmp/v_NAME,
# the patch applied, and it is built and installed to /tmp/var/NAME in parallel with the others and with the working
# tree itself ("base", installed as gpu_build.sh does). Then, ROUNDS times (default 2), every variant in turn (the
# order rotated each round, so a drift of the clocks does not favour one) runs benchmarks/attention_timeline.py
# TIMELINE_ARGS and, if BENCH_ARGS is set, benchmarks/bench_attention.py BENCH_ARGS.
# Output: $OUT/variants.txt.
#   git diff > .variants/late_trigger.patch; git checkout -p ...;  OUT=$OUT bash benchmarks/gpu_variants.sh
set -uo pipefail
VARIANTS_DIR="${VARIANTS_DIR:-.variants}"
# shellcheck source=benchmarks/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
names=()
pids=()
for patch in "$VARIANTS_DIR"/*.patch; do
  [ -e "$patch" ] || continue
  name="$(basename "$patch" .patch)"
  rm -rf "/tmp/v_$name" "/tmp/var/$name"
  mkdir -p "/tmp/v_$name" /tmp/var
  tar -c --exclude=./build --exclude=./.git --exclude=./old_tree --exclude=./.whl --exclude="./$VARIANTS_DIR" . |
    tar -x -C "/tmp/v_$name"
  if ! (cd "/tmp/v_$name" && patch -s -p1 < "$REPO/$patch"); then
    note "PATCH FAILED: $patch"
    exit 1
  fi
  python3 -m pip install --no-build-isolation --no-deps --target "/tmp/var/$name" "/tmp/v_$name" \
    > "/tmp/rq_build_$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done
# shellcheck source=benchmarks/gpu_build.sh
. "$(dirname "$0")/gpu_build.sh"
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    tail -40 "/tmp/rq_build_${names[$i]}.log" | tee "$OUT/build_${names[$i]}.log"
    note "BUILD FAILED: ${names[$i]}"
    exit 1
  fi
done
note "variants built: base ${names[*]}"
all=(base "${names[@]}")
cd /tmp
for ((round = 0; round < ${ROUNDS:-2}; round++)); do
  for ((k = 0; k < ${#all[@]}; k++)); do
    name="${all[$(( (k + round) % ${#all[@]} ))]}"
    path="${PYTHONPATH:-}"
    [ "$name" = base ] || path="/tmp/var/$name:$path"
    # shellcheck disable=SC2086
    {
      echo "== round $round: $name"
      PYTHONPATH="$path" timeout 120 python3 "$REPO/benchmarks/attention_timeline.py" ${TIMELINE_ARGS:-} 2>&1 |
        grep -v -i warn | tail -n +3
      if [ -n "${BENCH_ARGS:-}" ]; then
        PYTHONPATH="$path" timeout "${BENCH_TIMEOUT:-150}" python3 "$REPO/benchmarks/bench_attention.py" $BENCH_ARGS |
          tail -n +4
      fi
    } >> "$OUT/variants.txt" 2>&1
  done
done
cat "$OUT/variants.txt"
