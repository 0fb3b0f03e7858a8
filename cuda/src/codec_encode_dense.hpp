// The dense-rotation encode on tensor cores (codec_encode_dense.cuh; internal, used by codec.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "codec_kernels.cuh"

namespace rotorquant {
namespace cuda {
namespace codec {

// What the dense encode kernel needs from a rotation matrix, built once on the host: the fp16 B fragments of M in
// the kernel's order and the error bound eps = base + slope * ||u - fp16(u)|| (codec_encode_dense.cuh).
struct DenseEncodePlan {
  std::vector<std::uint32_t> fragments;  // empty: the kernel does not cover this dim
  float base = 0.0f, slope = 0.0f;
};

// m: the p x p float rotation matrix, row-major (y = M x). Plans exist for p = 64 and 128.
DenseEncodePlan make_dense_encode_plan(const float* m, int p);

// Launches encode_dense_kernel when it covers the case: mse mode, levels 4 / 8 / 16, dim = padded_dim = 64 or 128,
// x 16-byte aligned, a plan (fragments: its device copy). Returns false (and launches nothing) otherwise.
// boundaries: the codebook's levels - 1 float32 boundaries (host memory).
bool launch_encode_dense(const float* x, const CodecArgs& args, const float* boundaries, const std::uint32_t* fragments,
                         float base, float slope, int multiprocessor_count, cudaStream_t stream);

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
