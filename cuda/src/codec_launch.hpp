// The general encode / decode launches of DeviceQuantizer (internal), one rotation kind per translation unit:
// dispatch_chunks<Kind> is defined in codec_dispatch.cu, which the build compiles once per kind (CMakeLists.txt:
// ROTORQUANT_CODEC_KIND), so the kinds' kernels compile in parallel instead of in codec.cu.
#pragma once

#include <cuda_runtime.h>

#include "codec_kernels.cuh"
#include "rotorquant/cuda/codec.hpp"

namespace rotorquant {
namespace cuda {
namespace codec {

// encode (x -> args' codes) or decode (args' codes -> out as dtype) with the general kernels, `chunks` (1, 2, 4, 8 or
// 16) coordinates per lane; ValueError on another chunk count.
template <int Kind>
void dispatch_chunks(int chunks, const float* x, const CodecArgs& args, void* out, OutputDtype dtype, bool encode,
                     int sms, cudaStream_t stream);

#define ROTORQUANT_DECLARE_CHUNKS(KIND) \
  extern template void dispatch_chunks<KIND>(int, const float*, const CodecArgs&, void*, OutputDtype, bool, int, \
                                             cudaStream_t);
ROTORQUANT_DECLARE_CHUNKS(kIdentity)
ROTORQUANT_DECLARE_CHUNKS(kDense)
ROTORQUANT_DECLARE_CHUNKS(kHadamard)
ROTORQUANT_DECLARE_CHUNKS(kRotor3)
ROTORQUANT_DECLARE_CHUNKS(kPlanar)
ROTORQUANT_DECLARE_CHUNKS(kQuat)
#undef ROTORQUANT_DECLARE_CHUNKS

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
