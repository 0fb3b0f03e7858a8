// The launches of DeviceDecodeAttention (internal): programmatic dependent launch, and the split launches for one
// (head_dim P, key bits KB) pair. launch_splits<P, KB> is defined in attention_split.cu, which the build compiles
// once per pair (CMakeLists.txt: ROTORQUANT_SPLIT_P, ROTORQUANT_SPLIT_KEY_BITS), so the 9 pairs' kernels compile in
// parallel instead of in one translation unit.
#pragma once

#include <cuda_runtime.h>

#include "attention_kernels.cuh"
#include "check.cuh"

namespace rotorquant {
namespace cuda {
namespace attention {

constexpr const char* kLaunchContext = "cuda::DeviceDecodeAttention";

// Programmatic dependent launch (sm_90): the kernel may start while the previous one in the stream finishes; it waits
// for that kernel's results with griddepcontrol.wait where it first reads them (split_mma_kernel after its pair
// tables: prepare's rotated queries, or without prepare the call's inputs, whatever kernel precedes the call;
// combine_kernel: the partials, at once). Captured into CUDA graphs as programmatic edges.
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, unsigned threads, std::size_t shared, cudaStream_t stream,
                      Args... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  ROTORQUANT_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...), kLaunchContext);
}

// The split kernels for `heads` (1, 2, 4 or 8) query heads per block and `value_bits` (2, 3 or 4): the code splits
// and, with a full-precision window, its slot (grid.x = num_splits + 1). ValueError on other values.
template <int P, int KB>
void launch_splits(int heads, int value_bits, const KernelArgs& a, dim3 grid, cudaStream_t stream);

#define ROTORQUANT_DECLARE_SPLITS(P, KB) \
  extern template void launch_splits<P, KB>(int, int, const KernelArgs&, dim3, cudaStream_t);
ROTORQUANT_DECLARE_SPLITS(64, 2)
ROTORQUANT_DECLARE_SPLITS(64, 3)
ROTORQUANT_DECLARE_SPLITS(64, 4)
ROTORQUANT_DECLARE_SPLITS(128, 2)
ROTORQUANT_DECLARE_SPLITS(128, 3)
ROTORQUANT_DECLARE_SPLITS(128, 4)
ROTORQUANT_DECLARE_SPLITS(256, 2)
ROTORQUANT_DECLARE_SPLITS(256, 3)
ROTORQUANT_DECLARE_SPLITS(256, 4)
#undef ROTORQUANT_DECLARE_SPLITS

}  // namespace attention
}  // namespace cuda
}  // namespace rotorquant
