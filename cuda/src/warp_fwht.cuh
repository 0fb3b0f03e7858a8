// In-register Walsh-Hadamard transform of one row held by a warp (internal; shared by the codec and the
// attention kernels). Its arithmetic is part of the canonical encode order (docs/format.md section 8).
#pragma once

#include <cuda_runtime.h>

namespace rotorquant {
namespace cuda {
namespace codec {

// In-register Walsh-Hadamard butterflies over p = 2^k coordinates held as j = 32 c + lane:
// strides h = 1, 2, ..., p / 2 in that order, (a, b) -> (a + b, a - b).
template <int C>
__device__ __forceinline__ void warp_fwht(float v[C], int p, int lane) {
#pragma unroll
  for (int h = 1; h < 32; h <<= 1) {
    if (h >= p) break;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float partner = __shfl_xor_sync(0xFFFFFFFFu, v[c], h);
      v[c] = (lane & h) ? __fsub_rn(partner, v[c]) : __fadd_rn(v[c], partner);
    }
  }
#pragma unroll
  for (int hc = 1; hc < C; hc <<= 1) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if ((c & hc) == 0) {
        const float a = v[c], b = v[c + hc];
        v[c] = __fadd_rn(a, b);
        v[c + hc] = __fsub_rn(a, b);
      }
    }
  }
}

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
