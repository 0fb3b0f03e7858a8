// The dense-rotation encode on tensor cores: the host plan (B fragments, error bound) and the launches of
// encode_dense_kernel (codec_encode_dense.cuh). Compiled with --fmad=false (see CMakeLists.txt).
#include "codec_encode_dense.hpp"

#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "codec_encode_dense.cuh"
#include "resident_blocks.hpp"

namespace rotorquant {
namespace cuda {
namespace codec {

namespace {

float half_value(float v) { return __half2float(__float2half_rn(v)); }

std::uint32_t half_pair(float low, float high) {
  const __half_raw lo = __float2half_rn(low), hi = __float2half_rn(high);
  return static_cast<std::uint32_t>(lo.x) | (static_cast<std::uint32_t>(hi.x) << 16);
}

// v rounded to a float that is >= v.
float round_up(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, INFINITY);
  return f;
}

template <int P>
DenseEncodePlan make_plan(const float* m) {
  using L = DenseLayout<P>;
  constexpr int T = L::kTiles, OUT = L::kOutputs;
  DenseEncodePlan plan;
  plan.fragments.assign(L::kFragmentWords, 0u);
  // [(s * T / 2 + t / 2) * 32 + lane] = {b0, b1 of tile 2 (t / 2), b0, b1 of tile 2 (t / 2) + 1} (uint4)
  for (int s = 0; s < L::kSteps; ++s) {
    for (int t = 0; t < T; ++t) {
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, r = lane & 3;
        const int output = (g >> 1) * OUT + 2 * t + (g & 1);  // column n = g of n-tile t
        const float* row = m + static_cast<std::size_t>(output) * P + 16 * s + 4 * r;  // k-slots 2r.., 2r + 8..
        const std::size_t word = (static_cast<std::size_t>(s * (T / 2) + t / 2) * 32 + lane) * 4 + 2 * (t & 1);
        plan.fragments[word] = half_pair(row[0], row[1]);
        plan.fragments[word + 1] = half_pair(row[2], row[3]);
      }
    }
  }
  // the bound of codec_encode_dense.cuh, maxima over the outputs, in double
  double residual_sq = 0.0, half_sq = 0.0, full_sq = 0.0;
  for (int i = 0; i < P; ++i) {
    double residual = 0.0, half = 0.0, full = 0.0;
    for (int j = 0; j < P; ++j) {
      const double value = m[static_cast<std::size_t>(i) * P + j];
      const double rounded = half_value(m[static_cast<std::size_t>(i) * P + j]);
      residual += (value - rounded) * (value - rounded);
      half += rounded * rounded;
      full += value * value;
    }
    residual_sq = std::max(residual_sq, residual);
    half_sq = std::max(half_sq, half);
    full_sq = std::max(full_sq, full);
  }
  const double margin = 1.0 + 1.0 / 1024;                      // the sums and square roots above
  const double residual_norm = std::sqrt(residual_sq) * margin;  // max ||M_i - h(M_i)||
  const double half_norm = std::sqrt(half_sq) * margin;          // max ||h(M_i)||
  const double full_norm = std::sqrt(full_sq) * margin;          // max ||M_i||
  const double unit = 1.0 + std::ldexp(1.0, -22);                // ||u||
  const double half_unit = 1.0 + std::ldexp(1.0, -10);           // ||h(u)|| <= ||u|| + ||u - h(u)||
  const double accumulation = (P / 16) * std::ldexp(1.0, -17) * half_norm * half_unit;
  const double chain = P * std::ldexp(1.0, -24) / (1.0 - P * std::ldexp(1.0, -24)) * full_norm * unit;
  const double rounding = std::ldexp(1.0, -23);
  plan.base = round_up((residual_norm * unit + accumulation + chain + rounding) * 1.0625);
  plan.slope = round_up(half_norm * 1.0625);
  return plan;
}

template <int P, int Bits, bool NormCorrection>
bool launch(const float* x, const CodecArgs& args, const FastBoundaries& boundaries, const std::uint32_t* fragments,
            DenseBound bound, int multiprocessor_count, cudaStream_t stream) {
  auto kernel = encode_dense_kernel<P, Bits, NormCorrection>;
  constexpr int kShared = DenseLayout<P>::kSharedBytes;
  static std::atomic<int> cache[kCachedDevices] = {};
  const int blocks_per_multiprocessor = resident_blocks(kernel, kDenseThreads, kShared, 0, cache);
  if (blocks_per_multiprocessor < 1) return false;  // the shared memory does not fit: the general kernel runs
  const std::int64_t tiles = (args.n + kDenseTileRows - 1) / kDenseTileRows;
  const unsigned grid = tile_grid(tiles, kDenseWarps, multiprocessor_count, blocks_per_multiprocessor);
  const std::int64_t wave = static_cast<std::int64_t>(multiprocessor_count) * blocks_per_multiprocessor;
  kernel<<<codec_grid(grid, wave, args), kDenseThreads, kShared, stream>>>(x, args, boundaries, bound, reinterpret_cast<const uint4*>(fragments));
  return true;
}

template <int P, int Bits>
bool launch_correction(const float* x, const CodecArgs& args, const FastBoundaries& boundaries,
                       const std::uint32_t* fragments, DenseBound bound, int multiprocessor_count, cudaStream_t stream) {
  return args.norm_correction
             ? launch<P, Bits, true>(x, args, boundaries, fragments, bound, multiprocessor_count, stream)
             : launch<P, Bits, false>(x, args, boundaries, fragments, bound, multiprocessor_count, stream);
}

template <int P>
bool launch_bits(const float* x, const CodecArgs& args, const FastBoundaries& boundaries, const std::uint32_t* fragments,
                 DenseBound bound, int multiprocessor_count, cudaStream_t stream) {
  switch (args.levels) {
    case 4: return launch_correction<P, 2>(x, args, boundaries, fragments, bound, multiprocessor_count, stream);
    case 8: return launch_correction<P, 3>(x, args, boundaries, fragments, bound, multiprocessor_count, stream);
    case 16: return launch_correction<P, 4>(x, args, boundaries, fragments, bound, multiprocessor_count, stream);
    default: return false;
  }
}

}  // namespace

DenseEncodePlan make_dense_encode_plan(const float* m, int p) {
  switch (p) {
    case 64: return make_plan<64>(m);
    case 128: return make_plan<128>(m);
    default: return DenseEncodePlan{};
  }
}

bool launch_encode_dense(const float* x, const CodecArgs& args, const float* boundaries, const std::uint32_t* fragments,
                         float base, float slope, int multiprocessor_count, cudaStream_t stream) {
  if (fragments == nullptr || args.prod || args.n <= 0 || reinterpret_cast<std::uintptr_t>(x) % 16 != 0) return false;
  if (((args.x_head_stride | args.x_group_stride) & 3) != 0) return false;  // every head's rows 16-byte aligned
  if (args.levels != 4 && args.levels != 8 && args.levels != 16) return false;
  if (args.dim != args.padded_dim) return false;
  FastBoundaries table{};
  if (!set_symmetric_boundaries(boundaries, args.levels, &table)) return false;  // the decision's index search
  const DenseBound bound{base, slope};
  switch (args.dim) {
    case 64: return launch_bits<64>(x, args, table, fragments, bound, multiprocessor_count, stream);
    case 128: return launch_bits<128>(x, args, table, fragments, bound, multiprocessor_count, stream);
    default: return false;
  }
}

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
