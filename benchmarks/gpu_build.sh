# Sourced by the device scripts (gpu_run.sh, gpu_codec.sh), from the repository root: sets REPO, OUT,
# SUMMARY and note(), installs the carried wheels of .whl/ (scikit-build-core, pybind11, ...) to /tmp/site,
# then builds and installs rotorquant with CUDA (ROTORQUANT_CUDA_ARCHS, default 90; SKIP_BUILD=1 reuses an installed
# one, e.g. a second device script in the same call). Build log: $OUT/build.log;
# on a failed build it writes the log's tail there and exits 1.
REPO="$(pwd)"
OUT="${OUT:-/tmp/rq_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
export CUDACXX="${CUDACXX:-$(command -v nvcc || true)}"
export ROTORQUANT_CUDA=ON ROTORQUANT_CUDA_ARCHS="${ROTORQUANT_CUDA_ARCHS:-90}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
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
