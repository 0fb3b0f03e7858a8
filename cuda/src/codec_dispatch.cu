// codec::dispatch_chunks<Kind> (codec_launch.hpp): the general encode / decode launches of one rotation kind, given
// by the macro ROTORQUANT_CODEC_KIND (codec::kIdentity .. codec::kQuat): CMakeLists.txt compiles this file once per
// kind (6 translation units, compiled in parallel). Compiled with --fmad=false, as codec.cu. By hand:
// nvcc --fmad=false -DROTORQUANT_CODEC_KIND=2 ...
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "codec_kernels.cuh"
#include "codec_launch.hpp"
#include "resident_blocks.hpp"
#include "rotorquant/error.hpp"

#ifndef ROTORQUANT_CODEC_KIND
#error "codec_dispatch.cu is compiled once per rotation kind: define ROTORQUANT_CODEC_KIND"
#endif

namespace rotorquant {
namespace cuda {
namespace codec {

namespace {

constexpr int kBlocksPerMultiprocessor = 8;

// The grid of the general encode / decode kernels: one resident wave at most, shared among the heads and groups of
// a multi-head launch (codec_grid).
dim3 grid_for(std::int64_t warp_tiles, int multiprocessor_count, const CodecArgs& args) {
  const unsigned blocks = tile_grid(warp_tiles, kWarps, multiprocessor_count, kBlocksPerMultiprocessor);
  return codec_grid(blocks, static_cast<std::int64_t>(multiprocessor_count) * kBlocksPerMultiprocessor, args);
}

template <int C>
std::int64_t warp_tiles(std::int64_t n) {
  return (n + Tile<C>::kRows - 1) / Tile<C>::kRows;
}

template <int Kind, int C, int Bits>
void launch_encode_bits(const float* x, const CodecArgs& args, int sms, cudaStream_t stream) {
  encode_kernel<Kind, C, Bits><<<grid_for(warp_tiles<C>(args.n), sms, args), kThreads, 0, stream>>>(x, args);
}

// mse_bits 2, 3, 4 (levels 4, 8, 16) with C <= 8 get the kernels specialized on the bit-plane split.
template <int Kind, int C>
void launch_encode_typed(const float* x, const CodecArgs& args, int sms, cudaStream_t stream) {
  if (C <= 8) {
    switch (args.levels) {
      case 4: return launch_encode_bits<Kind, C, (C <= 8 ? 2 : 0)>(x, args, sms, stream);
      case 8: return launch_encode_bits<Kind, C, (C <= 8 ? 3 : 0)>(x, args, sms, stream);
      case 16: return launch_encode_bits<Kind, C, (C <= 8 ? 4 : 0)>(x, args, sms, stream);
      default: break;
    }
  }
  launch_encode_bits<Kind, C, 0>(x, args, sms, stream);
}

template <int Kind, int C>
void launch_decode_typed(const CodecArgs& args, void* out, OutputDtype dtype, int sms, cudaStream_t stream) {
  const dim3 grid = grid_for(warp_tiles<C>(args.n), sms, args);
  switch (dtype) {
    case OutputDtype::kFloat32:
      decode_kernel<Kind, C, float><<<grid, kThreads, 0, stream>>>(args, static_cast<float*>(out));
      break;
    case OutputDtype::kFloat16:
      decode_kernel<Kind, C, __half><<<grid, kThreads, 0, stream>>>(args, static_cast<__half*>(out));
      break;
    case OutputDtype::kBFloat16:
      decode_kernel<Kind, C, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(args, static_cast<__nv_bfloat16*>(out));
      break;
  }
}

}  // namespace

template <int Kind>
void dispatch_chunks(int chunks, const float* x, const CodecArgs& args, void* out, OutputDtype dtype, bool encode,
                     int sms, cudaStream_t stream) {
  switch (chunks) {
#define ROTORQUANT_CODEC_CASE(C)                                   \
  case C:                                                          \
    if (encode) {                                                  \
      launch_encode_typed<Kind, C>(x, args, sms, stream);          \
    } else {                                                       \
      launch_decode_typed<Kind, C>(args, out, dtype, sms, stream); \
    }                                                              \
    return;
    ROTORQUANT_CODEC_CASE(1)
    ROTORQUANT_CODEC_CASE(2)
    ROTORQUANT_CODEC_CASE(4)
    ROTORQUANT_CODEC_CASE(8)
    ROTORQUANT_CODEC_CASE(16)
#undef ROTORQUANT_CODEC_CASE
    default:
      throw ValueError(rotorquant::detail::expected_got("cuda::DeviceQuantizer: coordinates per lane",
                                                        "1, 2, 4, 8 or 16", std::to_string(chunks)));
  }
}

template void dispatch_chunks<ROTORQUANT_CODEC_KIND>(int, const float*, const CodecArgs&, void*, OutputDtype, bool, int,
                                                     cudaStream_t);

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
