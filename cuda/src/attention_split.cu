// launch_splits<P, KB> (attention_launch.cuh) for one (head_dim, key bits) pair, given by the macros
// ROTORQUANT_SPLIT_P and ROTORQUANT_SPLIT_KEY_BITS: CMakeLists.txt compiles this file once per pair (9 translation
// units, compiled in parallel). By hand: nvcc -DROTORQUANT_SPLIT_P=128 -DROTORQUANT_SPLIT_KEY_BITS=3 ...
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "attention_kernels.cuh"
#include "attention_launch.cuh"
#include "attention_mma.cuh"
#include "resident_blocks.hpp"
#include "rotorquant/error.hpp"

#if !defined(ROTORQUANT_SPLIT_P) || !defined(ROTORQUANT_SPLIT_KEY_BITS)
#error "attention_split.cu is compiled per (head_dim, key bits): define ROTORQUANT_SPLIT_P, ROTORQUANT_SPLIT_KEY_BITS"
#endif

namespace rotorquant {
namespace cuda {
namespace attention {

namespace {

// float16 / bfloat16 queries: the code splits on tensor cores (attention_mma.cuh) and, when there is a full-precision
// window, its slots (split >= num_splits) on the SIMT kernel in a second launch; float32 queries: the SIMT kernel for
// every slot (its float32 products keep the 1e-4 contract of float32 results). grid.x: every slot.
template <int P, int G, int KB, int VB>
void launch_split(const KernelArgs& a, dim3 grid, cudaStream_t stream) {
  if (a.queries_dtype == kF32) {
    split_kernel<P, G, KB, VB><<<grid, kSplitWarps * 32, 0, stream>>>(a);
    return;
  }
  constexpr bool kTokenRows = G <= 4;  // the score product's layout (attention_mma.cuh)
  auto kernel = split_mma_kernel<P, KB, VB, kTokenRows>;
  constexpr int kShared = SplitMmaShared<P, KB, VB, kTokenRows>::kBytes;
  if constexpr (kShared > 48 * 1024) {  // raises the kernel's dynamic shared-memory limit, once per device
    static std::atomic<int> cache[kCachedDevices] = {};
    resident_blocks(kernel, kSplitWarps * 32, kShared, 1, cache);
  }
  // a programmatic dependent of prepare, or else of the stream's previous kernel, whatever it is (split_mma_kernel
  // waits for it before it reads the call's inputs)
  launch_dependent(kernel, dim3(a.num_splits, grid.y, grid.z), kSplitWarps * 32, kShared, stream, a);
  if (a.fp_lengths) {
    KernelArgs window = a;
    window.split_offset = a.num_splits;
    split_kernel<P, G, KB, VB><<<dim3(a.window_slots, grid.y, grid.z), kSplitWarps * 32, 0, stream>>>(window);
  }
}

template <int P, int G, int KB>
void launch_value_bits(int value_bits, const KernelArgs& a, dim3 grid, cudaStream_t stream) {
  switch (value_bits) {
    case 2: return launch_split<P, G, KB, 2>(a, grid, stream);
    case 3: return launch_split<P, G, KB, 3>(a, grid, stream);
    case 4: return launch_split<P, G, KB, 4>(a, grid, stream);
    default:
      throw ValueError(rotorquant::detail::expected_got(std::string(kLaunchContext) + ": value bits", "2, 3 or 4",
                                                        std::to_string(value_bits)));
  }
}

}  // namespace

template <int P, int KB>
void launch_splits(int heads, int value_bits, const KernelArgs& a, dim3 grid, cudaStream_t stream) {
  switch (heads) {
    case 1: return launch_value_bits<P, 1, KB>(value_bits, a, grid, stream);
    case 2: return launch_value_bits<P, 2, KB>(value_bits, a, grid, stream);
    case 4: return launch_value_bits<P, 4, KB>(value_bits, a, grid, stream);
    case 8: return launch_value_bits<P, 8, KB>(value_bits, a, grid, stream);
    default:
      throw ValueError(rotorquant::detail::expected_got(std::string(kLaunchContext) + ": heads per block",
                                                        "1, 2, 4 or 8", std::to_string(heads)));
  }
}

template void launch_splits<ROTORQUANT_SPLIT_P, ROTORQUANT_SPLIT_KEY_BITS>(int, int, const KernelArgs&, dim3,
                                                                          cudaStream_t);

}  // namespace attention
}  // namespace cuda
}  // namespace rotorquant
