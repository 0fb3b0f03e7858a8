# Sourced by the device scripts (gpu_run.sh, gpu_codec.sh, ...), from the repository root: gpu_env.sh (REPO, OUT,
# SUMMARY, note(), the carried wheels and the CUDA build environment), then builds and installs rotorquant with CUDA
# (SKIP_BUILD=1 reuses an installed one, e.g. a second device script in the same call). Build log: $OUT/build.log;
# on a failed build it writes the log's tail there and exits 1.
# shellcheck source=benchmarks/gpu_env.sh
. "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
build_start=$(date +%s)
if [ -n "${SKIP_BUILD:-}" ] && python3 -c "import rotorquant" 2> /dev/null; then
  note "build skipped (SKIP_BUILD): the installed rotorquant is used"
elif ! python3 -m pip install --no-build-isolation --no-deps -v . > /tmp/rq_build_full.log 2>&1; then
  tail -80 /tmp/rq_build_full.log | tee "$OUT/build.log"
  note "BUILD FAILED (see build.log)"
  exit 1
else
  tail -30 /tmp/rq_build_full.log > "$OUT/build.log"
fi
note "build+install: $(( $(date +%s) - build_start )) s"
