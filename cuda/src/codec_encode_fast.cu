// Launches of the fast encode kernel (codec_encode_fast.cuh). Compiled with --fmad=false (see CMakeLists.txt).
#include "codec_encode_fast.hpp"

#include <cstdint>

#include "codec_encode_fast.cuh"
#include "resident_blocks.hpp"

namespace rotorquant {
namespace cuda {
namespace codec {

namespace {

template <int Kind, int P, int Bits, int Variant>
void launch_variant(const float* x, const CodecArgs& args, const FastBoundaries& boundaries, int multiprocessor_count,
            cudaStream_t stream) {
  auto kernel = encode_fast_kernel<Kind, P, Bits, Variant>;
  static std::atomic<int> cache[kCachedDevices] = {};
  const int blocks_per_multiprocessor = resident_blocks(kernel, kThreads, 0, FastVariant<Variant>::kMinBlocksPerSM, cache);
  // persistent grid: one resident wave, warps loop over tiles
  const std::int64_t tiles = (args.n + FastLayout<P, Variant>::kRowsPerTile - 1) / FastLayout<P, Variant>::kRowsPerTile;
  const unsigned grid = tile_grid(tiles, kWarps, multiprocessor_count, blocks_per_multiprocessor);
  const std::int64_t wave = static_cast<std::int64_t>(multiprocessor_count) * blocks_per_multiprocessor;
  kernel<<<codec_grid(grid, wave, args), kThreads, 0, stream>>>(x, args, boundaries);
}

// Variant 0 (4 slots, <= 128 registers, 2 blocks per SM) measured 5-10 % faster than variant 1 (2 slots, 80
// registers, 3 blocks) for every kind on an H100 (n = 1M, d = 128, b = 3). At d = 128, variant 2 (16 lanes per row:
// two float4 chunks per row and lane, 2 slots of 2 rows) needs 8-18 % fewer instructions than variant 0 (the
// per-row shuffles, broadcasts and store addressing are shared by two rows); at d = 256 it needs more (4 chunks,
// one slot). Only these variants are instantiated.
template <int Kind, int P, int Bits>
void launch(const float* x, const CodecArgs& args, const FastBoundaries& boundaries, int multiprocessor_count,
            cudaStream_t stream) {
  launch_variant<Kind, P, Bits, P == 128 ? 2 : 0>(x, args, boundaries, multiprocessor_count, stream);
}

template <int Kind, int P>
bool launch_bits(const float* x, const CodecArgs& args, const FastBoundaries& boundaries, int multiprocessor_count,
                 cudaStream_t stream) {
  switch (args.levels) {
    case 4: launch<Kind, P, 2>(x, args, boundaries, multiprocessor_count, stream); return true;
    case 8: launch<Kind, P, 3>(x, args, boundaries, multiprocessor_count, stream); return true;
    case 16: launch<Kind, P, 4>(x, args, boundaries, multiprocessor_count, stream); return true;
    default: return false;
  }
}

template <int Kind>
bool launch_dim(const float* x, const CodecArgs& args, const FastBoundaries& boundaries, int multiprocessor_count,
                cudaStream_t stream) {
  switch (args.dim) {
#define ROTORQUANT_FAST_CASE(P)                                                    \
  case P:                                                                          \
    if (args.padded_dim != P + FastExtraOutputs<Kind, P>::value) return false;     \
    return launch_bits<Kind, P>(x, args, boundaries, multiprocessor_count, stream);
    ROTORQUANT_FAST_CASE(64)
    ROTORQUANT_FAST_CASE(128)
    ROTORQUANT_FAST_CASE(256)
#undef ROTORQUANT_FAST_CASE
    default: return false;
  }
}

}  // namespace

bool launch_encode_fast(int kind, const float* x, const CodecArgs& args, const float* boundaries,
                        int multiprocessor_count, cudaStream_t stream) {
  if (args.prod || args.n <= 0 || reinterpret_cast<std::uintptr_t>(x) % 16 != 0) return false;
  if (((args.x_head_stride | args.x_group_stride) & 3) != 0) return false;  // every head's rows 16-byte aligned
  if (args.levels != 4 && args.levels != 8 && args.levels != 16) return false;
  FastBoundaries table{};
  // the kernel's index search needs exactly antisymmetric boundaries (always the case for the Lloyd-Max codebooks);
  // anything else goes to the generic encode_kernel
  if (!set_symmetric_boundaries(boundaries, args.levels, &table)) return false;
  switch (kind) {
    case kIdentity: return launch_dim<kIdentity>(x, args, table, multiprocessor_count, stream);
    case kHadamard: return launch_dim<kHadamard>(x, args, table, multiprocessor_count, stream);
    case kRotor3: return launch_dim<kRotor3>(x, args, table, multiprocessor_count, stream);
    case kPlanar: return launch_dim<kPlanar>(x, args, table, multiprocessor_count, stream);
    case kQuat: return launch_dim<kQuat>(x, args, table, multiprocessor_count, stream);
    default: return false;
  }
}

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
