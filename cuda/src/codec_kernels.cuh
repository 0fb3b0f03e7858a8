// CUDA kernels of the fused codec (internal; launched by codec.cu and codec_dispatch.cu).
//
// Layout: one warp owns kRows rows at a time (a "warp tile"); lane l holds coordinates
// j = 32 c + l (c < C) of each row in registers, so loads of x are coalesced, a 32-coordinate
// chunk of one bit plane is one shuffle-OR reduction and 32 sign bits are one ballot. Warps
// never synchronize with each other: the per-warp shared buffer (kRows x 32 C floats) holds rows
// for the cross-lane steps (block rotations, the dense / QJL products, which read the row by
// broadcast while each lane accumulates its own output coordinates against a matrix read
// coalesced from global memory / L1).
//
// Bit-exactness (docs/format.md, "Canonical encode arithmetic"): this file is compiled with
// --fmad=false, chains use fmaf() explicitly in ascending j from +0.0f, everything else is
// separate IEEE float operations in the canonical order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "warp_fwht.cuh"

namespace rotorquant {
namespace cuda {
namespace codec {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kWarps = 8;  // warps per thread block
constexpr int kThreads = kWarps * 32;

// Kinds as template values (same numbering as rotorquant::RotationKind).
constexpr int kIdentity = 0, kDense = 1, kHadamard = 2, kRotor3 = 3, kPlanar = 4, kQuat = 5;

template <int Kind>
struct BlockSize {
  static constexpr int value = Kind == kRotor3 ? 3 : Kind == kPlanar ? 2 : Kind == kQuat ? 4 : 1;
};

// Rows per warp tile: kRows * C <= 16 register values per row set, at most 8 rows.
template <int C>
struct Tile {
  static constexpr int kRows = (16 / C) < 8 ? (16 / C < 1 ? 1 : 16 / C) : 8;
  static constexpr int kWidth = 32 * C;
};
// encode: 3 blocks of 256 threads per SM (80 registers); at 64 registers it spilled to local memory.
constexpr int kEncodeMinBlocksPerSM = 3;
// decode: 3 blocks (80 registers, no spills) for dense / rotor3, 4 (64 registers) for the others, which measured
// faster at 4 despite a few spilled registers (H100).
template <int Kind>
struct DecodeMinBlocksPerSM {
  static constexpr int value = (Kind == kDense || Kind == kRotor3) ? 3 : 4;
};

struct PlaneInfo {
  int num_planes;
  int width[4];
  int shift[4];
  int offset[4];
  int bytes[4];
};

struct HeadTables;  // below

struct CodecArgs {
  std::int64_t n;
  int dim, padded_dim;
  // codes
  std::uint8_t* indices;
  std::uint8_t* norms;
  std::uint8_t* signs;
  std::uint8_t* residual_norms;
  int index_bytes, sign_bytes, norm_bytes;
  bool words_ok_indices, words_ok_signs;  // 4-byte word stores allowed
  PlaneInfo planes;
  // codebook: levels - 1 boundaries then levels centroids (levels = 0: no mse stage)
  const float* codebook;
  int levels;
  // rotation
  const float* rotation_parameters;  // hadamard signs (32 C floats, zero padded)
  const float* forward_matrix;       // dense: M^T (p x columns); blocks: k x k matrices per group
  const float* inverse_matrix;       // dense: M (p x columns)
  int columns;
  float hadamard_scale;
  // prod
  bool prod;
  int qjl_dim, qjl_columns;
  const float* qjl_transposed;  // S^T: p x qjl_columns
  const float* qjl_matrix;      // S: qjl_dim x columns
  bool norm_correction;
  unsigned long long* status;   // [0] non-finite input row, [1] norm overflow row, [2] bad stored norm row
  // Multi-head launches (DeviceQuantizerGroup): head_tables non-null, grid (x, launch_heads, launch_groups); block
  // (x, h, g) works on the n rows of head h, group g: rows of x (encode) / out (decode) at element offset
  // h * x_head_stride + g * x_group_stride (then dim elements per row), codes at row h * code_head_stride +
  // g * code_group_stride (then one row per vector) of every code array, with head h's rotation / QJL tables.
  // Single launches: head_tables null, the rest zero (select_head changes nothing).
  const HeadTables* head_tables;
  int launch_heads, launch_groups;
  std::int64_t x_head_stride, x_group_stride;
  std::int64_t code_head_stride, code_group_stride;
  std::int64_t row_base;  // added to the rows reported in status: (h * launch_groups + g) * n in a multi-head launch
};

// The per-head device data of a multi-head launch (one entry per head, in device memory; DeviceQuantizerGroup).
struct HeadTables {
  const float* rotation_parameters;
  const float* forward_matrix;
  const float* inverse_matrix;
  const float* qjl_transposed;
  const float* qjl_matrix;
  const std::uint32_t* dense_fragments;  // dense tensor-core encode (codec_encode_dense.cuh), null without a plan
  float dense_error_base, dense_error_slope;
};

// Points args at head blockIdx.y, group blockIdx.z of a multi-head launch and returns the row data `data` (x of
// encode, out of decode) offset likewise; changes nothing in a single launch. First statement of every codec
// kernel but scores.
template <typename T>
__device__ __forceinline__ T* select_head(CodecArgs& args, T* data) {
  if (args.head_tables == nullptr) return data;
  const std::int64_t head = blockIdx.y, group = blockIdx.z;
  const HeadTables tables = args.head_tables[head];
  args.rotation_parameters = tables.rotation_parameters;
  args.forward_matrix = tables.forward_matrix;
  args.inverse_matrix = tables.inverse_matrix;
  args.qjl_transposed = tables.qjl_transposed;
  args.qjl_matrix = tables.qjl_matrix;
  const std::int64_t row = head * args.code_head_stride + group * args.code_group_stride;
  if (args.indices != nullptr) args.indices += row * args.index_bytes;
  args.norms += row * args.norm_bytes;
  if (args.signs != nullptr) args.signs += row * args.sign_bytes;
  if (args.residual_norms != nullptr) args.residual_norms += row * args.norm_bytes;
  args.row_base = (head * gridDim.z + group) * args.n;
  return data + head * args.x_head_stride + group * args.x_group_stride;
}

// Reports `row` (of this launch's head and group) in status word `slot` (the smallest reported row wins).
__device__ __forceinline__ void flag_row(const CodecArgs& args, int slot, std::int64_t row) {
  atomicMin(args.status + slot, static_cast<unsigned long long>(args.row_base + row));
}

// The grid of a codec launch: `blocks` (the grid of one head and group: at most one resident wave of
// `wave` blocks) shared among the heads x groups of a multi-head launch (at least one block each), y = heads,
// z = groups.
inline dim3 codec_grid(unsigned blocks, std::int64_t wave, const CodecArgs& args) {
  const unsigned heads = args.launch_heads > 1 ? static_cast<unsigned>(args.launch_heads) : 1u;
  const unsigned groups = args.launch_groups > 1 ? static_cast<unsigned>(args.launch_groups) : 1u;
  const std::int64_t parts = static_cast<std::int64_t>(heads) * groups;
  const std::int64_t share = (wave + parts - 1) / parts;
  const std::int64_t x = std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, share));
  return dim3(static_cast<unsigned>(x), heads, groups);
}

// ---- small helpers -------------------------------------------------------------------------

__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// u = (float)((double)x / norm) of the canonical encode, correctly rounded, from the correctly rounded reciprocal
// r = RN(1 / norm) and one FMA correction (Markstein): q = RN(x r), e = fma(-q, norm, x) (exact),
// RN(x / norm) = fma(e, r, q), then one rounding to float; one division per row instead of one per coordinate.
// (norm 0 with reciprocal 0 gives +-0 for finite x.)
__device__ __forceinline__ float unit_quotient(float x, double norm, double reciprocal) {
  const double numerator = static_cast<double>(x);
  const double quotient = __dmul_rn(numerator, reciprocal);
  const double remainder = __fma_rn(-quotient, norm, numerator);
  return __double2float_rn(__fma_rn(remainder, reciprocal, quotient));
}

// Number of float32 boundaries b with b <= y (ties to the upper cell), the CPU's branch-free search.
__device__ __forceinline__ int quantize(const float* boundaries, int levels, float y) {
  int index = 0;
  for (int step = levels >> 1; step > 0; step >>= 1) {
    if (boundaries[index + step - 1] <= y) index += step;
  }
  return index;
}

// Compile-time bit-plane split of docs/format.md section 3 for Bits = 2, 3, 4 (Bits = 0: the runtime PlaneInfo).
__host__ __device__ constexpr int fixed_plane_count(int bits) { return bits == 3 ? 2 : 1; }
__host__ __device__ constexpr int fixed_plane_width(int bits, int plane) { return bits == 3 ? (plane == 0 ? 2 : 1) : bits; }
__host__ __device__ constexpr int fixed_plane_shift(int bits, int plane) { return bits == 3 && plane == 0 ? 1 : 0; }

// quantize() with a compile-time number of levels: the same search (the same comparisons b <= y), its first two
// steps on boundaries held in registers (top[0] = b[L/2 - 1], top[1] = b[L/4 - 1], top[2] = b[3L/4 - 1]), the
// remaining Bits - 2 steps from shared memory.
template <int Bits>
__device__ __forceinline__ int quantize_fixed(const float* boundaries, const float top[3], float y) {
  constexpr int kLevels = 1 << Bits;
  const bool upper = top[0] <= y;
  int index = upper ? kLevels / 2 : 0;
  if (upper ? top[2] <= y : top[1] <= y) index += kLevels / 4;
#pragma unroll
  for (int step = kLevels / 8; step > 0; step >>= 1) {
    if (boundaries[index + step - 1] <= y) index += step;
  }
  return index;
}

// Bits 0..15 of v to the even positions 0, 2, ..., 30.
__device__ __forceinline__ unsigned spread_by_2(unsigned v) {
  v &= 0xFFFFu;
  v = (v | (v << 8)) & 0x00FF00FFu;
  v = (v | (v << 4)) & 0x0F0F0F0Fu;
  v = (v | (v << 2)) & 0x33333333u;
  v = (v | (v << 1)) & 0x55555555u;
  return v;
}

// Bits 0..7 of v to positions 0, 4, ..., 28.
__device__ __forceinline__ unsigned spread_by_4(unsigned v) {
  v &= 0xFFu;
  v = (v | (v << 12)) & 0x000F000Fu;
  v = (v | (v << 6)) & 0x03030303u;
  v = (v | (v << 3)) & 0x11111111u;
  return v;
}

__device__ __forceinline__ void store_bytes(std::uint8_t* base, int word, unsigned value, int limit_bytes,
                                            bool words_ok) {
  if (words_ok) {
    if (4 * word < limit_bytes) reinterpret_cast<unsigned*>(base)[word] = value;
    return;
  }
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int byte = 4 * word + b;
    if (byte < limit_bytes) base[byte] = static_cast<std::uint8_t>(value >> (8 * b));
  }
}

// Bit planes of one row from its indices in registers (idx[c]: coordinate 32 c + lane), compile-time split:
// one ballot per (32-coordinate chunk, plane bit); lane w then builds packed word w of the plane by
// interleaving the ballots (a width-w plane word holds 32 / w consecutive coordinates, w bits each, LSB first)
// and consecutive lanes store consecutive words. Coordinates >= p give zero bits. Needs C * width <= 32.
template <int Bits, int C>
__device__ __forceinline__ void pack_planes_fixed(const int idx[C], int p, int lane, bool valid, std::uint8_t* out,
                                                  const PlaneInfo& planes, bool words_ok) {
  int masked[C];  // coordinates >= p contribute zero bits
#pragma unroll
  for (int c = 0; c < C; ++c) masked[c] = 32 * c + lane < p ? idx[c] : 0;
#pragma unroll
  for (int plane = 0; plane < fixed_plane_count(Bits); ++plane) {
    const int width = fixed_plane_width(Bits, plane), shift = fixed_plane_shift(Bits, plane);
    const int chunk = lane / width, part = lane - chunk * width;
    unsigned word = 0u;
#pragma unroll
    for (int b = 0; b < width; ++b) {
      unsigned chosen = 0u;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const unsigned ballot = __ballot_sync(kFullMask, (masked[c] >> (shift + b)) & 1);
        if (c == chunk) chosen = ballot;
      }
      if (width == 1) {
        word = chosen;
      } else if (width == 2) {
        word |= spread_by_2(chosen >> (16 * part)) << b;
      } else {
        word |= spread_by_4(chosen >> (8 * part)) << b;
      }
    }
    const int bytes = planes.bytes[plane];
    if (valid && 4 * lane < bytes) store_bytes(out + planes.offset[plane], lane, word, bytes, words_ok);
  }
}

// Stores a norm (double -> float -> optional fp16, round to nearest even). Returns false on overflow.
__device__ __forceinline__ bool store_norm(std::uint8_t* norms, std::int64_t row, int norm_bytes, double value) {
  const float as_float = static_cast<float>(value);
  if (norm_bytes == 2) {
    const __half half = __float2half_rn(as_float);
    reinterpret_cast<__half*>(norms)[row] = half;
    return !__hisinf(half) && !__hisnan(half);
  }
  reinterpret_cast<float*>(norms)[row] = as_float;
  return isfinite(as_float);
}

// A stored norm, or -1 when it is not a finite value >= 0 (corrupted codes).
__device__ __forceinline__ float load_norm(const std::uint8_t* norms, std::int64_t row, int norm_bytes) {
  const float value = norm_bytes == 2 ? __half2float(reinterpret_cast<const __half*>(norms)[row])
                                      : reinterpret_cast<const float*>(norms)[row];
  return (isfinite(value) && value >= 0.0f) ? value : -1.0f;
}

// acc[k][c] = sum_{j < depth} W[j * ldw + col0 + 32 c + lane] * A[k * lda + j], each a fmaf chain in
// ascending j from +0.0f (A: this warp's rows in shared memory, W: global, read coalesced).
template <int R, int C>
__device__ __forceinline__ void warp_gemm_accumulate(const float* A, int lda, int depth, const float* __restrict__ W,
                                                     std::int64_t ldw, int col0, int lane, float acc[R][C]) {
  const float* w_base = W + col0 + lane;
  int j = 0;
  for (; j + 4 <= depth; j += 4) {
    float w[4][C];
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int c = 0; c < C; ++c) w[t][c] = __ldg(w_base + static_cast<std::int64_t>(j + t) * ldw + 32 * c);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(A + k * lda + j);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        acc[k][c] = fmaf(w[0][c], a.x, acc[k][c]);
        acc[k][c] = fmaf(w[1][c], a.y, acc[k][c]);
        acc[k][c] = fmaf(w[2][c], a.z, acc[k][c]);
        acc[k][c] = fmaf(w[3][c], a.w, acc[k][c]);
      }
    }
  }
  for (; j < depth; ++j) {
    float w[C];
#pragma unroll
    for (int c = 0; c < C; ++c) w[c] = __ldg(w_base + static_cast<std::int64_t>(j) * ldw + 32 * c);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const float a = A[k * lda + j];
#pragma unroll
      for (int c = 0; c < C; ++c) acc[k][c] = fmaf(w[c], a, acc[k][c]);
    }
  }
}

template <int R, int C>
__device__ __forceinline__ void warp_gemm(const float* A, int lda, int depth, const float* __restrict__ W,
                                          std::int64_t ldw, int col0, int lane, float acc[R][C]) {
#pragma unroll
  for (int k = 0; k < R; ++k)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[k][c] = 0.0f;
  warp_gemm_accumulate<R, C>(A, lda, depth, W, ldw, col0, lane, acc);
}

// Block kinds: y_i = sum_jj B[g][ii][jj] * v[g K + jj] (i = g K + ii), fmaf chain from +0.0f.
// v: the row in shared memory (zero padded), out for coordinates i = 32 c + lane < p.
template <int K, int C, bool kTranspose>
__device__ __forceinline__ void warp_block_rotation(const float* v, const float* __restrict__ blocks, int p,
                                                    int lane, float out[C]) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int i = 32 * c + lane;
    float acc = 0.0f;
    if (i < p) {
      const int g = i / K, ii = i - g * K;
      const float* b = blocks + g * K * K;
#pragma unroll
      for (int jj = 0; jj < K; ++jj) {
        const float m = kTranspose ? __ldg(b + jj * K + ii) : __ldg(b + ii * K + jj);
        acc = fmaf(m, v[g * K + jj], acc);
      }
    }
    out[c] = acc;
  }
}

// ---- encode ---------------------------------------------------------------------------------

// Bits = 2, 3, 4: compile-time quantization and plane packing (C <= 8); Bits = 0: any mse_bits, runtime tables.
template <int Kind, int C, int Bits>
__global__ void __launch_bounds__(kThreads, kEncodeMinBlocksPerSM) encode_kernel(const float* __restrict__ x, CodecArgs args) {
  x = select_head(args, x);
  constexpr int R = Tile<C>::kRows;
  constexpr int W = Tile<C>::kWidth;
  __shared__ __align__(16) float shared[kWarps][R * W];
  __shared__ float codebook[2 * 256];
  __shared__ __align__(16) std::uint8_t index_shared[kWarps][W];
  __shared__ double norm_shared[kWarps][R];
  __shared__ double centroid_squares[256];  // (double)c * (double)c, exact (norm correction)
  for (int t = threadIdx.x; t < 2 * args.levels - 1; t += blockDim.x) codebook[t] = args.codebook[t];
  for (int t = threadIdx.x; t < args.levels; t += blockDim.x) {
    const double centroid = static_cast<double>(args.codebook[args.levels - 1 + t]);
    centroid_squares[t] = centroid * centroid;
  }
  __syncthreads();
  const float* boundaries = codebook;
  const float* centroids = codebook + (args.levels > 0 ? args.levels - 1 : 0);
  float top_boundaries[3] = {0.0f, 0.0f, 0.0f};  // Bits >= 2: see quantize_fixed
  if constexpr (Bits >= 2) {
    constexpr int kLevels = 1 << Bits;
    top_boundaries[0] = boundaries[kLevels / 2 - 1];
    top_boundaries[1] = boundaries[kLevels / 4 - 1];
    top_boundaries[2] = boundaries[3 * kLevels / 4 - 1];
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* buffer = shared[warp];
  std::uint8_t* index_bytes = index_shared[warp];
  double* row_norms = norm_shared[warp];
  const int dim = args.dim, p = args.padded_dim;
  const std::int64_t n = args.n;
  const std::int64_t tiles = (n + R - 1) / R;

  float signs[C];
  if (Kind == kHadamard) {
#pragma unroll
    for (int c = 0; c < C; ++c) signs[c] = __ldg(args.rotation_parameters + 32 * c + lane);
  }

  for (std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp; tile < tiles;
       tile += static_cast<std::int64_t>(gridDim.x) * kWarps) {
    const std::int64_t row0 = tile * R;
    float v[R][C];
    // 1. load the tile (all loads issued before any use)
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const std::int64_t row = row0 + k;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int j = 32 * c + lane;
        v[k][c] = (row < n && j < dim) ? __ldg(x + row * dim + j) : 0.0f;
      }
    }
    // 2. norms (double), finite check, unit vectors u_j = (float)((double)x_j / norm)
    //    The R row sums are reduced in turn; then lane l computes sqrt and the reciprocal of row l % R only
    //    (one double sqrt / reciprocal per tile instead of one per row) and the results are broadcast.
    //    x_j^2 is exact in double, so fma(x, x, sum) is the canonical double sum of squares.
    double norm[R];
    bool all_finite[R];
    double lane_sum = 0.0;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      bool finite = true;
      double sum = 0.0;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        finite = finite && isfinite(v[k][c]);
        const double value = static_cast<double>(v[k][c]);
        sum = fma(value, value, sum);
      }
      all_finite[k] = __all_sync(kFullMask, finite);
      sum = warp_sum(sum);
      if (lane % R == k) lane_sum = sum;
      if (!all_finite[k] && lane == 0 && row0 + k < n) {
        flag_row(args, 0, row0 + k);
      }
    }
    const double lane_norm = sqrt(lane_sum);
    const double lane_reciprocal = __drcp_rn(lane_norm);  // correctly rounded 1 / norm (as 1.0 / norm)
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const double row_norm = __shfl_sync(kFullMask, lane_norm, k);
      const double row_reciprocal = __shfl_sync(kFullMask, lane_reciprocal, k);
      const double value = all_finite[k] ? row_norm : 0.0;
      norm[k] = value;
      // u_j = (float)((double)x_j / norm) (unit_quotient)
      const double reciprocal = value == 0.0 ? 0.0 : row_reciprocal;
#pragma unroll
      for (int c = 0; c < C; ++c) v[k][c] = value == 0.0 ? 0.0f : unit_quotient(v[k][c], value, reciprocal);
    }
    // 3. rotation y = Pi u; the rotated rows end in the warp's shared buffer (row k at buffer + k * W)
    if (Kind == kHadamard) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
#pragma unroll
        for (int c = 0; c < C; ++c) v[k][c] = __fmul_rn(v[k][c], signs[c]);
        warp_fwht<C>(v[k], p, lane);
#pragma unroll
        for (int c = 0; c < C; ++c) v[k][c] = __fmul_rn(v[k][c], args.hadamard_scale);
      }
    } else if (Kind != kIdentity) {
#pragma unroll
      for (int k = 0; k < R; ++k)
#pragma unroll
        for (int c = 0; c < C; ++c) buffer[k * W + 32 * c + lane] = v[k][c];
      __syncwarp();
      if (Kind == kDense) {
        warp_gemm<R, C>(buffer, W, p, args.forward_matrix, args.columns, 0, lane, v);
      } else {
#pragma unroll
        for (int k = 0; k < R; ++k)
          warp_block_rotation<BlockSize<Kind>::value, C, false>(buffer + k * W, args.forward_matrix, p, lane, v[k]);
      }
      __syncwarp();
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
#pragma unroll
      for (int c = 0; c < C; ++c) buffer[k * W + 32 * c + lane] = v[k][c];
      if (lane == 0) row_norms[k] = norm[k];
    }
    __syncwarp();
    // 4. per row (a runtime loop: no register array indexed by the row): indices, planes, stored norms,
    //    residuals (written back over the row in the buffer for the QJL product)
#pragma unroll 1
    for (int k = 0; k < R; ++k) {
      const std::int64_t row = row0 + k;
      const bool valid = row < n;
      const double row_norm = row_norms[k];
      float y[C];
#pragma unroll
      for (int c = 0; c < C; ++c) y[c] = buffer[k * W + 32 * c + lane];
      double centroid_sq = 0.0, residual_sq = 0.0;
      int idx[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if constexpr (Bits > 0) {
          idx[c] = quantize_fixed<Bits>(boundaries, top_boundaries, y[c]);
        } else {
          idx[c] = args.levels > 0 ? quantize(boundaries, args.levels, y[c]) : 0;
        }
      }
      if (args.norm_correction && args.levels > 0) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          if (32 * c + lane < p) centroid_sq += centroid_squares[idx[c]];
        }
      }
      if (args.prod) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int j = 32 * c + lane;
          float residual = 0.0f;
          if (j < p) residual = args.levels > 0 ? __fsub_rn(y[c], centroids[idx[c]]) : y[c];
          if (row_norm == 0.0) residual = 0.0f;  // zero vector: signs +, residual norm 0
          const double residual_value = static_cast<double>(residual);
          residual_sq = fma(residual_value, residual_value, residual_sq);  // exact square: = the double sum
          buffer[k * W + j] = residual;
        }
      }
      if constexpr (Bits > 0) {
        pack_planes_fixed<Bits, C>(idx, p, lane, valid, args.indices + row * args.index_bytes, args.planes,
                                   args.words_ok_indices);
      } else if (args.levels > 0) {
        // Bit planes: the row's indices as bytes in shared memory, then lane t builds packed words t, t + 32, ...
        // (consecutive lanes write consecutive words; no shuffles).
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int j = 32 * c + lane;
          index_bytes[j] = j < p ? static_cast<std::uint8_t>(idx[c]) : std::uint8_t{0};
        }
        __syncwarp();
        std::uint8_t* out = args.indices + row * args.index_bytes;
        for (int plane = 0; plane < args.planes.num_planes; ++plane) {
          const int width = args.planes.width[plane], shift = args.planes.shift[plane];
          if (width == 1) {  // one ballot per 32 coordinates is the packed word
#pragma unroll
            for (int c = 0; c < C; ++c) {
              const unsigned bits = __ballot_sync(kFullMask, 32 * c + lane < p && ((idx[c] >> shift) & 1));
              if (valid && lane == 0) {
                store_bytes(out + args.planes.offset[plane], c, bits, args.planes.bytes[plane], args.words_ok_indices);
              }
            }
            continue;
          }
          if (!valid) continue;
          const int per_word = 32 / width;
          const int words = (args.planes.bytes[plane] + 3) >> 2;
          const unsigned byte_mask = width == 8 ? 0xFFFFFFFFu : width == 4 ? 0x0F0F0F0Fu : 0x03030303u;
          for (int word = lane; word < words; word += 32) {
            const int first = word * per_word;
            unsigned bits = 0u;
            for (int t = 0; t < per_word; t += 4) {
              // four indices (one per byte) -> their 4 * width plane bits, coordinate t first
              const unsigned v = (*reinterpret_cast<const unsigned*>(index_bytes + first + t) >> shift) & byte_mask;
              unsigned packed;
              if (width == 8) {
                packed = v;
              } else if (width == 4) {
                packed = (v | (v >> 4)) & 0x00FF00FFu;
                packed = (packed | (packed >> 8)) & 0xFFFFu;
              } else {
                packed = (v | (v >> 6)) & 0x000F000Fu;
                packed = (packed | (packed >> 12)) & 0xFFu;
              }
              bits |= packed << (t * width);
            }
            store_bytes(out + args.planes.offset[plane], word, bits, args.planes.bytes[plane], args.words_ok_indices);
          }
        }
        __syncwarp();
      }
      double stored = row_norm;
      if (args.norm_correction && args.levels > 0) {
        centroid_sq = warp_sum(centroid_sq);
        if (stored != 0.0 && centroid_sq > 0.0) stored = stored / sqrt(centroid_sq);
      }
      if (args.prod) residual_sq = warp_sum(residual_sq);
      if (valid && lane == 0) {
        bool ok = store_norm(args.norms, row, args.norm_bytes, stored);
        if (args.prod) ok = store_norm(args.residual_norms, row, args.norm_bytes, sqrt(residual_sq)) && ok;
        if (!ok) flag_row(args, 1, row);
      }
    }
    // 5. prod: QJL signs of S r, 32 C outputs per pass
    if (args.prod) {
      __syncwarp();
      for (int col0 = 0; col0 < args.qjl_dim; col0 += W) {
        float acc[R][C];
        warp_gemm<R, C>(buffer, W, p, args.qjl_transposed, args.qjl_columns, col0, lane, acc);
#pragma unroll
        for (int k = 0; k < R; ++k) {
          const std::int64_t row = row0 + k;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            const int i = col0 + 32 * c + lane;
            const unsigned bits = __ballot_sync(kFullMask, i < args.qjl_dim && acc[k][c] >= 0.0f);
            if (lane == 0 && row < n && col0 + 32 * c < args.qjl_dim) {
              store_bytes(args.signs + row * args.sign_bytes, (col0 >> 5) + c, bits, args.sign_bytes,
                          args.words_ok_signs);
            }
          }
        }
      }
      __syncwarp();
    }
  }
}

// ---- decode ---------------------------------------------------------------------------------

// Index of coordinate j from the bit planes of one code.
__device__ __forceinline__ int unpack_index(const std::uint8_t* code, const PlaneInfo& planes, int j) {
  int idx = 0;
  for (int plane = 0; plane < planes.num_planes; ++plane) {
    const int width = planes.width[plane];
    const int bit = j * width;
    const unsigned byte = code[planes.offset[plane] + (bit >> 3)];
    idx |= static_cast<int>((byte >> (bit & 7)) & ((1u << width) - 1u)) << planes.shift[plane];
  }
  return idx;
}

constexpr double kSqrtHalfPi = 1.2533141373155002512078826424055;

template <typename T>
__device__ __forceinline__ T convert_out(float value);
template <>
__device__ __forceinline__ float convert_out<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half convert_out<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 convert_out<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

template <int Kind, int C, typename T>
__global__ void __launch_bounds__(kThreads, DecodeMinBlocksPerSM<Kind>::value) decode_kernel(CodecArgs args, T* __restrict__ out) {
  out = select_head(args, out);
  constexpr int R = Tile<C>::kRows;
  constexpr int W = Tile<C>::kWidth;
  __shared__ __align__(16) float shared[kWarps][R * W];
  __shared__ float centroids[256];
  __shared__ float norm_shared[kWarps][R];
  __shared__ float coefficient_shared[kWarps][R];
  for (int t = threadIdx.x; t < args.levels; t += blockDim.x) centroids[t] = args.codebook[args.levels - 1 + t];
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* buffer = shared[warp];
  float* row_norms = norm_shared[warp];
  float* row_coefficients = coefficient_shared[warp];
  const int dim = args.dim, p = args.padded_dim, m = args.qjl_dim;
  const std::int64_t n = args.n;
  const std::int64_t tiles = (n + R - 1) / R;
  float signs[C];
  if (Kind == kHadamard) {
#pragma unroll
    for (int c = 0; c < C; ++c) signs[c] = __ldg(args.rotation_parameters + 32 * c + lane);
  }

  for (std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp; tile < tiles;
       tile += static_cast<std::int64_t>(gridDim.x) * kWarps) {
    const std::int64_t row0 = tile * R;
    // (a) prod: t = S^T sign for the tile (sign vectors as +-1 rows in the buffer, a product with S)
    float qjl[R][C];
    if (args.prod) {
#pragma unroll
      for (int k = 0; k < R; ++k)
#pragma unroll
        for (int c = 0; c < C; ++c) qjl[k][c] = 0.0f;
      for (int i0 = 0; i0 < m; i0 += W) {
#pragma unroll
        for (int k = 0; k < R; ++k) {
          const std::int64_t row = row0 + k;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            const int i = i0 + 32 * c + lane;
            float sign = 0.0f;
            if (row < n && i < m) sign = ((args.signs[row * args.sign_bytes + (i >> 3)] >> (i & 7)) & 1u) ? 1.0f : -1.0f;
            buffer[k * W + 32 * c + lane] = sign;
          }
        }
        __syncwarp();
        const int depth = m - i0 < W ? m - i0 : W;
        warp_gemm_accumulate<R, C>(buffer, W, depth, args.qjl_matrix + static_cast<std::int64_t>(i0) * args.columns,
                                   args.columns, 0, lane, qjl);
        __syncwarp();
      }
    }
    // (b) per row: stored norms, QJL coefficient, centroid values into the buffer
#pragma unroll 1
    for (int k = 0; k < R; ++k) {
      const std::int64_t row = row0 + k;
      const bool valid = row < n;
      float norm = valid ? load_norm(args.norms, row, args.norm_bytes) : 0.0f;
      float coefficient = 0.0f;
      if (valid && args.prod) {
        const float residual_norm = load_norm(args.residual_norms, row, args.norm_bytes);
        if (residual_norm < 0.0f) norm = -1.0f;
        coefficient = static_cast<float>(static_cast<double>(residual_norm) * kSqrtHalfPi / m);
      }
      if (norm < 0.0f && lane == 0) flag_row(args, 2, row);
      if (lane == 0) {
        row_norms[k] = norm;
        row_coefficients[k] = coefficient;
      }
      const std::uint8_t* code = args.indices + (valid ? row : 0) * args.index_bytes;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int j = 32 * c + lane;
        buffer[k * W + j] = (valid && j < p && args.levels > 0) ? centroids[unpack_index(code, args.planes, j)] : 0.0f;
      }
    }
    __syncwarp();
    if (args.prod) {
#pragma unroll
      for (int k = 0; k < R; ++k)
#pragma unroll
        for (int c = 0; c < C; ++c) buffer[k * W + 32 * c + lane] += row_coefficients[k] * qjl[k][c];
      __syncwarp();
    }
    // (c) inverse rotation, scale, store
    if (Kind == kDense) {
      float x[R][C];
      warp_gemm<R, C>(buffer, W, p, args.inverse_matrix, args.columns, 0, lane, x);
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const std::int64_t row = row0 + k;
        const float norm = row_norms[k];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int j = 32 * c + lane;
          if (row < n && j < dim) out[row * dim + j] = convert_out<T>(x[k][c] * norm);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const std::int64_t row = row0 + k;
        float z[C];
        if (Kind == kIdentity || Kind == kHadamard) {
#pragma unroll
          for (int c = 0; c < C; ++c) z[c] = buffer[k * W + 32 * c + lane];
          if (Kind == kHadamard) {
            warp_fwht<C>(z, p, lane);
#pragma unroll
            for (int c = 0; c < C; ++c) z[c] = z[c] * args.hadamard_scale * signs[c];
          }
        } else {
          warp_block_rotation<BlockSize<Kind>::value, C, true>(buffer + k * W, args.forward_matrix, p, lane, z);
        }
        const float norm = row_norms[k];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int j = 32 * c + lane;
          if (row < n && j < dim) out[row * dim + j] = convert_out<T>(z[c] * norm);
        }
      }
    }
    __syncwarp();
  }
}

// ---- scores ---------------------------------------------------------------------------------

constexpr int kScoreCodes = 32;   // codes per block (lane = code)
constexpr int kScoreWarps = 4;

// One block: kScoreCodes codes of one head, every query of the head's group.
// centroid vectors (and +-1 sign vectors) of the codes are staged in shared memory, padded rows.
template <int C>
__global__ void __launch_bounds__(kScoreWarps * 32)
    scores_kernel(CodecArgs args, std::int64_t codes_per_head, const float* __restrict__ queries,
                  const float* __restrict__ projected, int group, float* __restrict__ out) {
  constexpr int W = Tile<C>::kWidth;
  extern __shared__ float dynamic[];
  const int p = args.padded_dim, m = args.qjl_dim;
  const int stride = p + 1, sign_stride = m + 1;
  float* values = dynamic;                                  // kScoreCodes x stride
  float* sign_values = values + kScoreCodes * stride;       // kScoreCodes x sign_stride (prod)
  float* scale = sign_values + (args.prod ? kScoreCodes * sign_stride : 0);  // norms
  float* coefficient = scale + kScoreCodes;
  __shared__ float centroids[256];
  for (int t = threadIdx.x; t < args.levels; t += blockDim.x) centroids[t] = args.codebook[args.levels - 1 + t];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::int64_t code_tiles = (codes_per_head + kScoreCodes - 1) / kScoreCodes;
  const std::int64_t head = blockIdx.y;
  const float* head_queries = queries + head * group * p;
  const float* head_projected = args.prod ? projected + head * group * m : nullptr;
  __syncthreads();

  for (std::int64_t tile = blockIdx.x; tile < code_tiles; tile += gridDim.x) {
    const std::int64_t first = tile * kScoreCodes;
    for (int t = warp; t < kScoreCodes; t += kScoreWarps) {
      const std::int64_t code = first + t;
      const bool valid = code < codes_per_head;
      const std::int64_t row = head * codes_per_head + (valid ? code : 0);
      const std::uint8_t* packed = args.indices + row * args.index_bytes;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int j = 32 * c + lane;
        if (j < p) values[t * stride + j] = (valid && args.levels > 0) ? centroids[unpack_index(packed, args.planes, j)] : 0.0f;
      }
      if (args.prod) {
        for (int i = lane; i < m; i += 32) {
          const unsigned byte = valid ? args.signs[row * args.sign_bytes + (i >> 3)] : 0u;
          sign_values[t * sign_stride + i] = ((byte >> (i & 7)) & 1u) ? 1.0f : -1.0f;
        }
      }
      if (lane == 0) {
        float norm = valid ? load_norm(args.norms, row, args.norm_bytes) : 0.0f;
        float coef = 0.0f;
        if (valid && args.prod) {
          const float residual_norm = load_norm(args.residual_norms, row, args.norm_bytes);
          if (residual_norm < 0.0f) norm = -1.0f;
          coef = static_cast<float>(static_cast<double>(residual_norm) * kSqrtHalfPi / m);
        }
        if (norm < 0.0f) atomicMin(args.status + 2, static_cast<unsigned long long>(row));
        scale[t] = norm;
        coefficient[t] = coef;
      }
    }
    __syncthreads();
    const std::int64_t code = first + lane;
    // each warp: 4 queries at a time (q0 + t * kScoreWarps), sharing the loads of the code's values
    for (int q0 = warp; q0 < group; q0 += 4 * kScoreWarps) {
      const float* query[4];
      bool active[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int q = q0 + t * kScoreWarps;
        active[t] = q < group;
        query[t] = head_queries + static_cast<std::int64_t>(active[t] ? q : q0) * p;
      }
      float score[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (args.levels > 0) {
        const float* value = values + lane * stride;
        for (int j = 0; j < p; ++j) {
          const float v = value[j];
#pragma unroll
          for (int t = 0; t < 4; ++t) score[t] = fmaf(v, __ldg(query[t] + j), score[t]);
        }
      }
      if (args.prod) {
        const float* sign = sign_values + lane * sign_stride;
        const float* projected_query[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          projected_query[t] = head_projected + static_cast<std::int64_t>(active[t] ? q0 + t * kScoreWarps : q0) * m;
        }
        float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int i = 0; i < m; ++i) {
          const float sv = sign[i];
#pragma unroll
          for (int t = 0; t < 4; ++t) dot[t] = fmaf(sv, __ldg(projected_query[t] + i), dot[t]);
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) score[t] += coefficient[lane] * dot[t];
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int q = q0 + t * kScoreWarps;
        if (active[t] && code < codes_per_head) out[(head * group + q) * codes_per_head + code] = scale[lane] * score[t];
      }
    }
    __syncthreads();
  }
  (void)W;
}

// t[q][i] = sum_j S[i][j] * queries[q][j] (S^T stored p x qjl_columns), one thread per (q, i).
static __global__ void project_queries_kernel(const float* __restrict__ queries, std::int64_t count, int p,
                                       const float* __restrict__ qjl_transposed, int qjl_columns, int m,
                                       float* __restrict__ projected) {
  const std::int64_t total = count * m;
  for (std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t q = item / m;
    const int i = static_cast<int>(item - q * m);
    const float* query = queries + q * p;
    float acc = 0.0f;
    for (int j = 0; j < p; ++j) acc = fmaf(__ldg(qjl_transposed + static_cast<std::int64_t>(j) * qjl_columns + i), query[j], acc);
    projected[item] = acc;
  }
}

// status[0] = min row of `data` (rows x cols) holding a NaN or Inf.
static __global__ void find_nonfinite_rows_kernel(const float* __restrict__ data, std::int64_t rows, std::int64_t cols,
                                           unsigned long long* status) {
  const std::int64_t total = rows * cols;
  for (std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    if (!isfinite(data[item])) atomicMin(status, static_cast<unsigned long long>(item / cols));
  }
}

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
