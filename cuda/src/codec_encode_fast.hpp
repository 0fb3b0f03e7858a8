// Launcher of the fast encode kernel (codec_encode_fast.cuh; internal, used by codec.cu).
#pragma once

#include <cuda_runtime.h>

#include "codec_kernels.cuh"

namespace rotorquant {
namespace cuda {
namespace codec {

// Launches encode_fast_kernel when it covers the case: mse mode, levels 4 / 8 / 16, dim 64 / 128 / 256 with
// padded_dim = dim (identity, hadamard, planar, quat) or dim + 1 / 2 (rotor3), x 16-byte aligned. Returns false
// (and launches nothing) otherwise.
// boundaries: the codebook's levels - 1 float32 boundaries (host memory).
bool launch_encode_fast(int kind, const float* x, const CodecArgs& args, const float* boundaries,
                        int multiprocessor_count, cudaStream_t stream);

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
