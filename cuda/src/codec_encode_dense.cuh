// The dense-rotation encode kernel of the fused codec (internal; launched by codec_encode_dense.cu): mse mode,
// mse_bits 2..4, dim = padded_dim = 64 or 128, rotation dense. The codes are bit-identical to the general
// encode_kernel and to the CPU core (docs/format.md section 8) although the rotation runs on tensor cores:
//
//   A filter, then an exact fallback. y_i = sum_j M_ij u_j is computed on tensor cores from fp16 roundings of M and
//   u (mma.sync m16n8k16, fp32 accumulation). With a proven bound eps (below) on |y_approx - y_canonical|, where
//   y_canonical is the canonical fmaf chain, the index count(b <= y_canonical) equals count(b <= y_approx - eps)
//   whenever no boundary lies in (y_approx - eps, y_approx + eps]. Coordinates with a boundary in that window
//   (about 1 / 2 / 3 % of them at 2 / 3 / 4 bits on Gaussian data) are recomputed with the canonical chain
//   acc = fmaf(M[i][j], u_j, acc), j ascending, from the exact float32 u and the float32 M, both staged in shared
//   memory (a fallback reading M from L2 measured 1.2-1.5x slower for the whole kernel). docs/cuda_codec.md
//   "Dense encode on tensor cores" has the proof and the measurements.
//
//   The bound, for output i of a row with normalized input u (||u|| <= 1 + 2^-23) and h() = fp16 rounding:
//     sum_j M_ij u_j - sum_j h(M_ij) h(u_j) = sum_j (M_ij - h(M_ij)) u_j + sum_j h(M_ij) (u_j - h(u_j))
//       <= ||M_i - h(M_i)|| ||u|| + ||h(M_i)|| ||u - h(u)||                       (Cauchy-Schwarz)
//     + the tensor cores' fp32 accumulation: <= 32 ulp-units (2^-23) of (|c| + sum_k |a_k b_k|) per mma, i.e.
//       (P / 16) 2^-17 ||h(M_i)|| ||h(u)|| in all (products of fp16 values are exact in fp32; the published
//       measurements of the adder, Volta..Ampere: addends aligned to the largest exponent and truncated, then one
//       normalization, i.e. < 1 unit of the largest addend per addend: <= 17 + 1 units for 16 products and c, and a
//       unit of the largest addend is <= 2^-23 (|c| + sum |a_k b_k|); 32 leaves a 1.8x margin; the tests on rows
//       sitting on the boundaries are the empirical check on this hardware)
//     + the canonical chain's own rounding: gamma_P ||M_i|| ||u||, gamma_P = P 2^-24 / (1 - P 2^-24)
//     + the roundings of y -+ eps (2^-23 for |y| < 2).
//   The host (codec_encode_dense.cu) takes the maxima over i in double and gives eps = base + slope ||u - h(u)||
//   with 6 % margin, rounded up; the kernel measures ||u - h(u)|| per row (u - h(u) is exact in float32).
//
// Layout. A warp takes 16-row tiles; lane (g, r) = (lane / 4, lane % 4) owns rows g and g + 8 of the tile. The
// product's reduction index is a permutation of the input coordinates (A and B fragments use the same one): at
// step s, k-slots 2r, 2r + 1, 2r + 8, 2r + 9 <-> coordinates 16 s + 4 r + 0, 1, 2, 3, so the lane's A operand for
// step s is one float4 of each of its rows (the 4 lanes of a row read 64 contiguous bytes). The output index is
// permuted too: n-tile t, column n <-> output (n / 2) P / 4 + 2 t + n % 2, so lane r's accumulators hold the
// contiguous outputs [r P / 4, (r + 1) P / 4) of its two rows and it packs their bit planes in registers (no
// shuffles, one 4..16-byte store per plane). The B fragments (fp16 pairs of M in this order) are built on the host
// and copied to shared memory once per block.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "codec_encode_fast.cuh"
#include "codec_kernels.cuh"
#include "mma.cuh"

namespace rotorquant {
namespace cuda {
namespace codec {

constexpr int kDenseWarps = 12;  // one block per SM at d = 128 (shared memory), two at d = 64
constexpr int kDenseThreads = kDenseWarps * 32;
constexpr int kDenseTileRows = 16;
// Independent fmaf chains per lane in a round of the exact fallback: 4 at 4 bits (~3 % of the outputs flagged, ~67
// per 16-row tile: one round), 2 otherwise.
template <int Bits>
struct DenseFallback {
  static constexpr int kChains = Bits == 4 ? 4 : 2;
  static constexpr int kRound = 32 * kChains;  // flagged outputs per round
};
constexpr int kMaxFallbackRound = 128;

template <int P>
struct DenseLayout {
  static constexpr int kSteps = P / 16;        // k-steps of the product = float4 loads per row and lane
  static constexpr int kTiles = P / 8;         // n-tiles (8 outputs each)
  static constexpr int kOutputs = P / 4;       // outputs per lane and row
  static constexpr int kStageStride = P + 16;  // floats per staged row of u (conflict-free float4 stores)
  static constexpr int kMatrixStride = P + 4;  // floats per row of the float32 M (rows 4 banks apart)
  static constexpr int kFragmentWords = kSteps * kTiles * 32 * 2;  // B fragments: 2 half2 per (step, tile, lane)
  static constexpr int kFragmentBytes = kFragmentWords * 4;
  static constexpr int kMatrixBytes = P * kMatrixStride * 4;
  static constexpr int kStageFloats = kDenseWarps * kDenseTileRows * kStageStride;
  static constexpr int kSharedBytes = kFragmentBytes + kMatrixBytes + kStageFloats * 4;
};

// eps of a row = base + slope * ||u - h(u)|| (float32, rounded up on the host).
struct DenseBound {
  float base, slope;
};

// Bit planes of one row's kOutputs indices held by a lane: `high` = the 2-bit plane (bits 2, and the high bits of
// 3) or the 4-bit plane, `low` = the 1-bit plane of 3 bits (docs/format.md section 3: index j of a w-bit plane at
// bit w j of the plane's little-endian bit string).
template <int P, int Bits>
struct DensePlanes {
  static constexpr int kHighWidth = Bits == 3 ? 2 : Bits;
  static constexpr int kHighBytes = kHighWidth * DenseLayout<P>::kOutputs / 8;
  static constexpr int kLowBytes = Bits == 3 ? DenseLayout<P>::kOutputs / 8 : 0;
  static constexpr int kHighWords = (kHighBytes + 3) / 4;
  static constexpr int kLowWords = kLowBytes > 0 ? (kLowBytes + 3) / 4 : 1;
  unsigned high[kHighWords];
  unsigned low[kLowWords];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int w = 0; w < kHighWords; ++w) high[w] = 0u;
#pragma unroll
    for (int w = 0; w < kLowWords; ++w) low[w] = 0u;
  }
  // Index `index` at position p (0 <= p < kOutputs); p may be a run-time value (the words stay in registers).
  __device__ __forceinline__ void insert(int p, unsigned index) {
    const unsigned field = Bits == 3 ? index >> 1 : index;
    const int bit = kHighWidth * p;
#pragma unroll
    for (int w = 0; w < kHighWords; ++w) {
      if ((bit >> 5) == w) high[w] |= field << (bit & 31);
    }
    if (Bits == 3) {
#pragma unroll
      for (int w = 0; w < kLowWords; ++w) {
        if ((p >> 5) == w) low[w] |= (index & 1u) << (p & 31);
      }
    }
  }
};

// `Bytes` (2, 4, 8 or 16) bytes of `words` to dst, with the widest stores its alignment allows.
template <int Bytes>
__device__ __forceinline__ void store_plane_bytes(std::uint8_t* dst, const unsigned* words) {
  const auto address = reinterpret_cast<std::uintptr_t>(dst);
  if constexpr (Bytes == 16) {
    if (address % 16 == 0) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
      return;
    }
  }
  if constexpr (Bytes >= 8) {
    if (address % 8 == 0) {
#pragma unroll
      for (int k = 0; k < Bytes / 8; ++k) reinterpret_cast<uint2*>(dst)[k] = make_uint2(words[2 * k], words[2 * k + 1]);
      return;
    }
  }
  if constexpr (Bytes >= 4) {
    if (address % 4 == 0) {
#pragma unroll
      for (int k = 0; k < Bytes / 4; ++k) reinterpret_cast<unsigned*>(dst)[k] = words[k];
      return;
    }
  }
  if constexpr (Bytes == 2) {
    if (address % 2 == 0) {
      *reinterpret_cast<unsigned short*>(dst) = static_cast<unsigned short>(words[0]);
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < Bytes; ++k) dst[k] = static_cast<std::uint8_t>(words[k / 4] >> (8 * (k % 4)));
}

template <int P, int Bits, bool NormCorrection>
__global__ void __launch_bounds__(kDenseThreads, 1)
    encode_dense_kernel(const float* __restrict__ x, CodecArgs args, FastBoundaries boundary, DenseBound bound,
                        const uint4* __restrict__ fragments) {
  x = select_head(args, x);
  if (args.head_tables != nullptr) {  // head blockIdx.y's B fragments and error bound
    const HeadTables& tables = args.head_tables[blockIdx.y];
    fragments = reinterpret_cast<const uint4*>(tables.dense_fragments);
    bound.base = tables.dense_error_base;
    bound.slope = tables.dense_error_slope;
  }
  using L = DenseLayout<P>;
  using Planes = DensePlanes<P, Bits>;
  constexpr int S = L::kSteps, T = L::kTiles, OUT = L::kOutputs, STRIDE = L::kStageStride;
  constexpr int kLevels = 1 << Bits;

  extern __shared__ __align__(16) unsigned char dense_shared[];
  uint4* fragment_shared = reinterpret_cast<uint4*>(dense_shared);  // [(s * T / 2 + t / 2) * 32 + lane]
  float* matrix_shared = reinterpret_cast<float*>(dense_shared + L::kFragmentBytes);  // M[i][j] at i MS + j
  float* stage_all = reinterpret_cast<float*>(dense_shared + L::kFragmentBytes + L::kMatrixBytes);
  __shared__ double centroid_squares[kLevels];  // (double)c * (double)c, exact (norm correction)
  __shared__ float boundary_table[kLevels];     // the boundaries, then +inf
  constexpr int kChains = DenseFallback<Bits>::kChains, kFallbackRound = DenseFallback<Bits>::kRound;
  __shared__ unsigned short fallback_queue[kDenseWarps][kFallbackRound];  // row (8 bits), output (8 bits)
  __shared__ unsigned char fallback_result[kDenseWarps][kFallbackRound];  // its index

  for (int k = threadIdx.x; k < L::kFragmentBytes / 16; k += kDenseThreads) fragment_shared[k] = fragments[k];
  for (int k = threadIdx.x; k < P * P / 4; k += kDenseThreads) {  // the float32 M of the exact fallback
    const int i = k / (P / 4), j = 4 * (k % (P / 4));
    *reinterpret_cast<float4*>(matrix_shared + i * L::kMatrixStride + j) =
        __ldg(reinterpret_cast<const float4*>(args.inverse_matrix + static_cast<std::int64_t>(i) * args.columns + j));
  }
  if (threadIdx.x < kLevels) {
    const double centroid = static_cast<double>(args.codebook[kLevels - 1 + threadIdx.x]);
    centroid_squares[threadIdx.x] = centroid * centroid;
    boundary_table[threadIdx.x] = threadIdx.x < kLevels - 1 ? args.codebook[threadIdx.x] : __int_as_float(0x7f800000);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, r = lane & 3;
  float* stage = stage_all + warp * kDenseTileRows * STRIDE;
  unsigned short* queue = fallback_queue[warp];
  unsigned char* result = fallback_result[warp];
  const std::int64_t n = args.n;
  const int plane1_offset = args.planes.offset[1];
  const std::int64_t tiles = (n + kDenseTileRows - 1) / kDenseTileRows;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kDenseWarps;

  for (std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kDenseWarps + warp; tile < tiles; tile += stride) {
    const std::int64_t row0 = tile * kDenseTileRows;
    const std::int64_t row_a = row0 + g, row_b = row0 + g + 8;
    // 1. loads: step s of row a / b is the float4 at coordinate 16 s + 4 r (zeros beyond n)
    float4 xa[S], xb[S];
    {
      const float4* source_a = reinterpret_cast<const float4*>(x + row_a * P) + r;
      const float4* source_b = reinterpret_cast<const float4*>(x + row_b * P) + r;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        xa[s] = row_a < n ? __ldcs(source_a + 4 * s) : make_float4(0.f, 0.f, 0.f, 0.f);
        xb[s] = row_b < n ? __ldcs(source_b + 4 * s) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      // the next tile of this warp into L2 (one 128-byte line per lane and pass)
      const std::int64_t next0 = (tile + stride) * kDenseTileRows;
      if (next0 < n) {
        const char* next_bytes = reinterpret_cast<const char*>(x + next0 * P);
        const std::int64_t next_rows = n - next0 < kDenseTileRows ? n - next0 : kDenseTileRows;
        const std::int64_t next_lines = (next_rows * P * 4 + 127) / 128;
#pragma unroll
        for (int k = 0; k < (kDenseTileRows * P * 4 / 128 + 31) / 32; ++k) {
          const std::int64_t line = lane + 32 * k;
          if (line < next_lines) asm volatile("prefetch.global.L2 [%0];" ::"l"(next_bytes + 128 * line));
        }
      }
    }
    // 2. norms: the double sum of squares over the row's 4 lanes (any order is canonical)
    double sum_a = 0.0, sum_b = 0.0;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const float va[4] = {xa[s].x, xa[s].y, xa[s].z, xa[s].w};
      const float vb[4] = {xb[s].x, xb[s].y, xb[s].z, xb[s].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        sum_a = __fma_rn(static_cast<double>(va[q]), static_cast<double>(va[q]), sum_a);
        sum_b = __fma_rn(static_cast<double>(vb[q]), static_cast<double>(vb[q]), sum_b);
      }
    }
    sum_a += __shfl_xor_sync(kFullMask, sum_a, 1);
    sum_b += __shfl_xor_sync(kFullMask, sum_b, 1);
    sum_a += __shfl_xor_sync(kFullMask, sum_a, 2);
    sum_b += __shfl_xor_sync(kFullMask, sum_b, 2);
    const bool finite_a = isfinite(sum_a), finite_b = isfinite(sum_b);
    if (r == 0 && !finite_a && row_a < n) flag_row(args, 0, row_a);
    if (r == 0 && !finite_b && row_b < n) flag_row(args, 0, row_b);
    if (!finite_a) {  // reported above; coded as zero rows (u = 0 rather than NaN)
#pragma unroll
      for (int s = 0; s < S; ++s) xa[s] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (!finite_b) {
#pragma unroll
      for (int s = 0; s < S; ++s) xb[s] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const double norm_a = finite_a ? sqrt(sum_a) : 0.0, norm_b = finite_b ? sqrt(sum_b) : 0.0;
    const double reciprocal_a = norm_a == 0.0 ? 0.0 : __drcp_rn(norm_a);
    const double reciprocal_b = norm_b == 0.0 ? 0.0 : __drcp_rn(norm_b);

    // 3. u (exact), staged for the fallback; its fp16 roundings as A fragments; ||u - h(u)||^2
    unsigned a_frag[S][4];
    float residual_a = 0.0f, residual_b = 0.0f;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      float4 ua, ub;
      ua.x = unit_quotient(xa[s].x, norm_a, reciprocal_a);
      ua.y = unit_quotient(xa[s].y, norm_a, reciprocal_a);
      ua.z = unit_quotient(xa[s].z, norm_a, reciprocal_a);
      ua.w = unit_quotient(xa[s].w, norm_a, reciprocal_a);
      ub.x = unit_quotient(xb[s].x, norm_b, reciprocal_b);
      ub.y = unit_quotient(xb[s].y, norm_b, reciprocal_b);
      ub.z = unit_quotient(xb[s].z, norm_b, reciprocal_b);
      ub.w = unit_quotient(xb[s].w, norm_b, reciprocal_b);
      *reinterpret_cast<float4*>(stage + g * STRIDE + 16 * s + 4 * r) = ua;
      *reinterpret_cast<float4*>(stage + (g + 8) * STRIDE + 16 * s + 4 * r) = ub;
      a_frag[s][0] = pack_half2(ua.x, ua.y);  // row g, k-slots 2r, 2r + 1
      a_frag[s][1] = pack_half2(ub.x, ub.y);  // row g + 8
      a_frag[s][2] = pack_half2(ua.z, ua.w);  // row g, k-slots 2r + 8, 2r + 9
      a_frag[s][3] = pack_half2(ub.z, ub.w);  // row g + 8
      const float2 ha0 = __half22float2(*reinterpret_cast<const __half2*>(&a_frag[s][0]));
      const float2 hb0 = __half22float2(*reinterpret_cast<const __half2*>(&a_frag[s][1]));
      const float2 ha1 = __half22float2(*reinterpret_cast<const __half2*>(&a_frag[s][2]));
      const float2 hb1 = __half22float2(*reinterpret_cast<const __half2*>(&a_frag[s][3]));
      float d;
      d = __fsub_rn(ua.x, ha0.x); residual_a = __fmaf_rn(d, d, residual_a);
      d = __fsub_rn(ua.y, ha0.y); residual_a = __fmaf_rn(d, d, residual_a);
      d = __fsub_rn(ua.z, ha1.x); residual_a = __fmaf_rn(d, d, residual_a);
      d = __fsub_rn(ua.w, ha1.y); residual_a = __fmaf_rn(d, d, residual_a);
      d = __fsub_rn(ub.x, hb0.x); residual_b = __fmaf_rn(d, d, residual_b);
      d = __fsub_rn(ub.y, hb0.y); residual_b = __fmaf_rn(d, d, residual_b);
      d = __fsub_rn(ub.z, hb1.x); residual_b = __fmaf_rn(d, d, residual_b);
      d = __fsub_rn(ub.w, hb1.y); residual_b = __fmaf_rn(d, d, residual_b);
    }
    residual_a = __fadd_rn(residual_a, __shfl_xor_sync(kFullMask, residual_a, 1));
    residual_b = __fadd_rn(residual_b, __shfl_xor_sync(kFullMask, residual_b, 1));
    residual_a = __fadd_rn(residual_a, __shfl_xor_sync(kFullMask, residual_a, 2));
    residual_b = __fadd_rn(residual_b, __shfl_xor_sync(kFullMask, residual_b, 2));
    // the float sums of P squares are within P 2^-24 (relative) of the exact ones: 2^-14 covers it
    const bool zero_a = norm_a == 0.0, zero_b = norm_b == 0.0;  // zero (or non-finite) rows: the index of 0.0f
    const float eps_a = zero_a ? 0.0f : __fmaf_rn(bound.slope, sqrtf(__fmul_rn(residual_a, 1.00006104f)), bound.base);
    const float eps_b = zero_b ? 0.0f : __fmaf_rn(bound.slope, sqrtf(__fmul_rn(residual_b, 1.00006104f)), bound.base);

    // 4. y on tensor cores, two n-tiles at a time; indices of the decided outputs, flags of the others
    Planes planes_a, planes_b;
    planes_a.clear();
    planes_b.clear();
    unsigned flags_a = 0u, flags_b = 0u;  // bit p: output r OUT + p needs the exact chain
    double centroid_a = 0.0, centroid_b = 0.0;
    // branch-free: a flagged output inserts index 0 (nothing) and adds 0 to the centroid sum (nothing); zero and
    // non-finite rows have eps = 0 and y = +-0 (u = +-0): the index of 0.0f, never flagged
    auto decide = [&](float y, float eps, int p, Planes& planes, unsigned& flags, double& centroid) {
      const int low = symmetric_index<Bits>(boundary, __fsub_rn(y, eps));
      // the first boundary above y - eps lies above y + eps too: no boundary in the window, the index is `low`
      const bool flagged = boundary_table[low] <= __fadd_rn(y, eps);
      flags |= static_cast<unsigned>(flagged) << p;
      planes.insert(p, flagged ? 0u : static_cast<unsigned>(low));
      if (NormCorrection) {
        const double square = centroid_squares[low];
        centroid += flagged ? 0.0 : square;
      }
    };
#pragma unroll
    for (int tp = 0; tp < T / 2; ++tp) {
      float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const uint4 b = fragment_shared[(s * (T / 2) + tp) * 32 + lane];
        mma_16816(d0, a_frag[s][0], a_frag[s][1], a_frag[s][2], a_frag[s][3], b.x, b.y);
        mma_16816(d1, a_frag[s][0], a_frag[s][1], a_frag[s][2], a_frag[s][3], b.z, b.w);
      }
      // tile t = 2 tp (d0) and 2 tp + 1 (d1): d[0], d[1] -> row g outputs 2t, 2t + 1; d[2], d[3] -> row g + 8
      decide(d0[0], eps_a, 4 * tp + 0, planes_a, flags_a, centroid_a);
      decide(d0[1], eps_a, 4 * tp + 1, planes_a, flags_a, centroid_a);
      decide(d0[2], eps_b, 4 * tp + 0, planes_b, flags_b, centroid_b);
      decide(d0[3], eps_b, 4 * tp + 1, planes_b, flags_b, centroid_b);
      decide(d1[0], eps_a, 4 * tp + 2, planes_a, flags_a, centroid_a);
      decide(d1[1], eps_a, 4 * tp + 3, planes_a, flags_a, centroid_a);
      decide(d1[2], eps_b, 4 * tp + 2, planes_b, flags_b, centroid_b);
      decide(d1[3], eps_b, 4 * tp + 3, planes_b, flags_b, centroid_b);
    }

    // 5. the flagged outputs: the canonical chain over the staged u. The warp's flagged outputs are ranked (lane
    //    order, then row a before b, then position) and taken 32 kChains per round, kChains independent chains
    //    per lane (the chain is a dependent fmaf sequence: they hide each other's latency): lane l of round R runs
    //    ranks R + l, R + 32 + l, ... The owner of a rank posts it to queue[rank - R] and reads its index back from
    //    result[rank - R], walking its flags in rank order both times.
    {
      const int count = __popc(flags_a) + __popc(flags_b);
      int inclusive = count;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int before = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += before;
      }
      const int total = __shfl_sync(kFullMask, inclusive, 31);
      int next = inclusive - count;  // this lane's next rank to post
      for (int round = 0; round < total; round += kFallbackRound) {
        unsigned post_a = flags_a, post_b = flags_b;
        for (int rank = next; rank < inclusive && rank < round + kFallbackRound; ++rank) {
          const bool take_a = post_a != 0u;
          const int p = __ffs(take_a ? post_a : post_b) - 1;
          if (take_a) post_a &= post_a - 1u; else post_b &= post_b - 1u;
          queue[rank - round] = static_cast<unsigned short>(((take_a ? g : g + 8) << 8) | (r * OUT + p));
        }
        __syncwarp();
        const int items = total - round;
        if (lane < items) {
          const float* m_row[kChains];
          const float* u_row[kChains];
#pragma unroll
          for (int c = 0; c < kChains; ++c) {  // chains beyond the round's items repeat the first one
            const unsigned item = queue[lane + 32 * c < items ? lane + 32 * c : lane];
            m_row[c] = matrix_shared + (item & 255u) * L::kMatrixStride;
            u_row[c] = stage + (item >> 8) * STRIDE;
          }
          float acc[kChains];
#pragma unroll
          for (int c = 0; c < kChains; ++c) acc[c] = 0.0f;
#pragma unroll 2
          for (int j = 0; j < P; j += 4) {
            float4 m[kChains], u[kChains];
#pragma unroll
            for (int c = 0; c < kChains; ++c) {
              m[c] = *reinterpret_cast<const float4*>(m_row[c] + j);
              u[c] = *reinterpret_cast<const float4*>(u_row[c] + j);
            }
#pragma unroll
            for (int c = 0; c < kChains; ++c) acc[c] = __fmaf_rn(m[c].x, u[c].x, acc[c]);
#pragma unroll
            for (int c = 0; c < kChains; ++c) acc[c] = __fmaf_rn(m[c].y, u[c].y, acc[c]);
#pragma unroll
            for (int c = 0; c < kChains; ++c) acc[c] = __fmaf_rn(m[c].z, u[c].z, acc[c]);
#pragma unroll
            for (int c = 0; c < kChains; ++c) acc[c] = __fmaf_rn(m[c].w, u[c].w, acc[c]);
          }
#pragma unroll
          for (int c = 0; c < kChains; ++c) {
            if (lane + 32 * c < items) {
              result[lane + 32 * c] = static_cast<unsigned char>(count_boundaries<Bits>(boundary, acc[c]));
            }
          }
        }
        __syncwarp();
        for (; next < inclusive && next < round + kFallbackRound; ++next) {
          const bool take_a = flags_a != 0u;
          const int p = __ffs(take_a ? flags_a : flags_b) - 1;
          if (take_a) flags_a &= flags_a - 1u; else flags_b &= flags_b - 1u;
          const unsigned index = result[next - round];
          if (take_a) {
            planes_a.insert(p, index);
            if (NormCorrection) centroid_a += centroid_squares[index];
          } else {
            planes_b.insert(p, index);
            if (NormCorrection) centroid_b += centroid_squares[index];
          }
        }
        __syncwarp();
      }
    }
    __syncwarp();  // the stage is rewritten by the next tile

    // 6. planes: lane r writes its bytes of each plane of rows a and b
    const auto store_row = [&](std::int64_t row, const Planes& planes) {
      std::uint8_t* out = args.indices + row * args.index_bytes;
      store_plane_bytes<Planes::kHighBytes>(out + r * Planes::kHighBytes, planes.high);
      if constexpr (Bits == 3) store_plane_bytes<Planes::kLowBytes>(out + plane1_offset + r * Planes::kLowBytes, planes.low);
    };
    if (row_a < n) store_row(row_a, planes_a);
    if (row_b < n) store_row(row_b, planes_b);

    // 7. stored norms: lane r = 0 writes row a's, r = 1 row b's
    if (NormCorrection) {
      centroid_a += __shfl_xor_sync(kFullMask, centroid_a, 1);
      centroid_b += __shfl_xor_sync(kFullMask, centroid_b, 1);
      centroid_a += __shfl_xor_sync(kFullMask, centroid_a, 2);
      centroid_b += __shfl_xor_sync(kFullMask, centroid_b, 2);
    }
    if (r < 2) {
      const std::int64_t row = r == 0 ? row_a : row_b;
      double stored = r == 0 ? norm_a : norm_b;
      const double centroid_sq = r == 0 ? centroid_a : centroid_b;
      if (NormCorrection && stored != 0.0 && centroid_sq > 0.0) stored = stored / sqrt(centroid_sq);
      if (row < n && !store_norm(args.norms, row, args.norm_bytes, stored)) {
        flag_row(args, 1, row);
      }
    }
  }
}

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
