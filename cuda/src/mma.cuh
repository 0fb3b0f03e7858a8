// Tensor-core helpers shared by the attention kernel (attention_mma.cuh) and the dense encode kernel
// (codec_encode_dense.cuh): mma.sync m16n8k16 with fp16 operands and fp32 accumulation, half2 packing.
#pragma once

#include <cuda_fp16.h>

namespace rotorquant {
namespace cuda {

// d += A (16 x 16, row) * B (16 x 8, col); fragment layouts of the PTX ISA for m16n8k16 (.f16 inputs):
// lane (g, r) = (lane / 4, lane % 4) holds A rows g, g + 8 at k-slots {2r, 2r + 1} (a0, a1) and {2r + 8, 2r + 9}
// (a2, a3), B column g at k-slots {2r, 2r + 1} (b0) and {2r + 8, 2r + 9} (b1), D rows g (d[0], d[1]) and g + 8
// (d[2], d[3]) at columns 2r, 2r + 1.
__device__ __forceinline__ void mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two floats rounded to fp16 (round to nearest even) in one register, `low` in the lower half.
__device__ __forceinline__ unsigned pack_half2(float low, float high) {
  const __half2 h = __floats2half2_rn(low, high);
  return *reinterpret_cast<const unsigned*>(&h);
}

}  // namespace cuda
}  // namespace rotorquant
