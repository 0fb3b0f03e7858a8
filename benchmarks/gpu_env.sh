# Sourced by gpu_build.sh (and gpu_ab_attention.sh, before it starts a second build), from the repository root: sets
# REPO, OUT, SUMMARY and note(), installs the carried wheels of .whl/ (scikit-build-core, pybind11, ...) to /tmp/site
# and exports the CUDA build environment (ROTORQUANT_CUDA_ARCHS, default 90). Once per shell: a second source returns
# at once (the wheels are not reinstalled under a build that is using them).
if [ -n "${RQ_GPU_ENV:-}" ]; then return 0; fi
RQ_GPU_ENV=1
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
