// The fast encode kernel of the fused codec (internal; launched by codec_encode_fast.cu): mse mode, mse_bits 2..4,
// dim = 64, 128 or 256 (padded_dim = dim; rotor3: dim + 1 or 2), rotation identity / hadamard / planar / quat /
// rotor3. Every other case uses encode_kernel (codec_kernels.cuh). The codes are bit-identical to it and to the
// CPU core (docs/format.md section 8, "Canonical encode arithmetic").
//
// Layout. Lane l of a row's lane group (LPR = min(32, P / 4) lanes per row; 16 at P = 128, variant 2) holds the
// coordinates j = 4 q + t, t = 0..3, of the quads q = c LPR + l (c < CH = P / (4 LPR) chunks): one float4 load per
// (row, chunk), coalesced.
// A warp tile is S "slots" of RPS = 32 / LPR rows each (S RPS consecutive rows); the tile's loads are all issued
// before any use and the next tile's loads are issued before the current tile is processed (software prefetch
// into registers), so each warp keeps 2 S CH float4 loads in flight.
//   - Norms: per lane the double sum of its squares (x^2 is exact in double: fma(x, x, s) is the canonical sum),
//     then a reduce-scatter over the lane group: after log2(S) halving exchanges each lane holds the partial sum
//     of one slot, the remaining xor stages complete it. One sqrt and one correctly rounded reciprocal per lane
//     serve S rows; slot k's norm and reciprocal are then broadcast from a lane that holds it. (Any order of the
//     double sum is canonical.)
//   - u_j = (float)((double)x_j / norm): the correctly rounded double quotient from the correctly rounded
//     reciprocal r = RN(1 / norm) and one FMA correction (Markstein): q = RN(x r), e = fma(-q, norm, x) (exact),
//     RN(x / norm) = fma(e, r, q); then one rounding to float. Exact for every finite x (no intermediate
//     underflows: |x| >= 2^-149, norm < 2^132, so |q| >= 2^-282 and |e| >= 2^-335 are normal doubles).
//   - hadamard: butterflies of stride 1, 2 inside the lane's quad (registers), 4 .. 2 LPR by xor shuffles, 4 LPR ..
//     P / 2 between the chunks (registers): the canonical order h = 1, 2, 4, ..., P / 2. A shuffle stage is
//     fmaf(+-1, own, partner): one rounding of own + partner (lower lane) or partner - own (upper lane), i.e.
//     exactly the canonical a + b / a - b.
//   - planar / quat: the lane's quad holds whole groups (2 or 1): fmaf chains over the lane's own values with the
//     block coefficients held in registers (loaded once per thread).
//   - rotor3: groups of 3 straddle quads; each lane gets the two coordinates on either side of its quad by
//     shuffles (window positions -2 .. 5) and output t is a fmaf chain over window positions t - 2 .. t + 2 whose
//     coefficients are the block row B_g[ii][.] at the three positions of the group and 0 elsewhere. Zero
//     coefficients only come before the group's first position (acc stays +0: fmaf(0, w, +0) = +0 for finite w)
//     or after its last (acc + (+-0) = acc, except that a zero acc may change its sign, which no index can see:
//     -0 and +0 fall into the same cell). The padded outputs dim .. p - 1 (last group) are "extra" outputs of
//     every lane over window positions 2 .. 5; only the row's last quad uses them.
//   - Indices: the count of float32 boundaries b_k <= y (ties to the upper cell), by symmetric_quad: integer
//     compares of the bits of |y| with the positive boundaries' bits, one binary-search step shorter than a search
//     over all boundaries, the quad's indices packed as they are found (exactly antisymmetric codebooks only; the
//     launch sends any other to encode_kernel).
//   - Planes: the quad's 4 indices are one byte of a 2-bit plane, a nibble of a 1-bit plane (two lanes -> one
//     byte by one shuffle), two bytes of a 4-bit plane; byte stores, consecutive lanes -> consecutive bytes.
//   - Norm correction (runtime flag): a double table of exact c^2 in shared memory, reduce-scattered like the norm.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "codec_kernels.cuh"

namespace rotorquant {
namespace cuda {
namespace codec {

// Tuning variants of encode_fast_kernel: slots per tile (rows per lane group and tile; divided by the chunks per
// row), the minimum number of 256-thread blocks per SM (register bound: 2 -> 128, 3 -> 80 registers) and the most
// lanes per row (variant 2: 16, so a row of 128 takes two chunks per lane; the launch uses it at P = 128).
template <int Variant>
struct FastVariant {
  static constexpr int kSlots = Variant == 1 ? 2 : 4;
  static constexpr int kMinBlocksPerSM = Variant == 1 ? 3 : 2;
  static constexpr int kMaxLanesPerRow = Variant == 2 ? 16 : 32;
};

template <int P, int Variant>
struct FastLayout {
  static constexpr int kMaxLanes = FastVariant<Variant>::kMaxLanesPerRow;
  static constexpr int kLanesPerRow = P / 4 < kMaxLanes ? P / 4 : kMaxLanes;  // LPR (variants 0 / 2): 16, 32 / 16, 32
  static constexpr int kRowsPerSlot = 32 / kLanesPerRow;                      // RPS: 2, 1 / 2, 1
  static constexpr int kChunks = P / (4 * kLanesPerRow);                      // CH: 1, 1 / 2, 2
  static constexpr int kSlots = FastVariant<Variant>::kSlots / kChunks;       // S: 4, 4 / 2, 2
  static constexpr int kRowsPerTile = kSlots * kRowsPerSlot;
};

// Padded outputs of rotor3 (p = dim rounded up to a multiple of 3): 64 -> 66, 128 -> 129, 256 -> 258.
template <int Kind, int P>
struct FastExtraOutputs {
  static constexpr int value = Kind == kRotor3 ? (3 - P % 3) % 3 : 0;
};

// Window coefficients per output t (planar: 2, quat: 4, rotor3: 5 window positions; identity / hadamard: none).
template <int Kind>
struct FastTaps {
  static constexpr int value = Kind == kPlanar ? 2 : Kind == kQuat ? 4 : Kind == kRotor3 ? 5 : 1;
};

// Reduce-scatter of S per-lane values over a lane group of LPR lanes (xor masks LPR / 2, LPR / 4, ...): returns
// the group's sum of slot slot_of_lane (all S sums are spread over the lanes; lanes holding the same slot get the
// same bits). Halving stage with mask m: the lanes with (lane & m) keep the upper half of their values.
template <int S, int LPR>
__device__ __forceinline__ double reduce_scatter(double (&value)[S], int lane) {
  static_assert(S <= LPR, "more slots than lanes");
  double v[S];
#pragma unroll
  for (int i = 0; i < S; ++i) v[i] = value[i];
  int m = LPR / 2;
#pragma unroll
  for (int half = S / 2; half >= 1; half >>= 1, m >>= 1) {
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const double send = upper ? v[i] : v[i + half];
      const double keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, m);
    }
  }
  double sum = v[0];
#pragma unroll
  for (; m >= 1; m >>= 1) sum += __shfl_xor_sync(kFullMask, sum, m);
  return sum;
}

// The slot whose sum reduce_scatter leaves in lane (lane within its group), and the group lane that holds slot k
// with all other bits 0.
template <int S, int LPR>
__device__ __forceinline__ int reduce_scatter_slot(int lane) {
  int slot = 0, m = LPR / 2;
#pragma unroll
  for (int half = S / 2; half >= 1; half >>= 1, m >>= 1) {
    if (lane & m) slot += half;
  }
  return slot;
}
template <int S, int LPR>
__host__ __device__ constexpr int reduce_scatter_source(int slot) {
  int source = 0, m = LPR / 2;
  for (int half = S / 2; half >= 1; half >>= 1, m >>= 1) {
    if (slot & half) source += m;
  }
  return source;
}

// The codebook's float32 boundaries as a kernel parameter: warp-uniform constants that the compares read from the
// constant bank (no registers, no shared-memory loads). positive[i] = the bits of the positive boundary
// b[L / 2 + i] (i < L / 2 - 1) as an int, for symmetric_index; set by set_symmetric_boundaries.
struct FastBoundaries {
  float value[15];
  int positive[7];
};

// Fills boundary with the levels - 1 float32 boundaries b and returns whether they are exactly antisymmetric, the
// condition of symmetric_index: b[L / 2 - 1] == 0 (+0 or -0) and bits(b[k]) == bits(-b[L - 2 - k]) for every k.
// (The Lloyd-Max codebooks are: their centroids are negated exactly and b_k = (c_k + c_{k+1}) / 2 rounds
// symmetrically, so this always holds for them; a codebook that fails it goes to the generic encode_kernel.)
inline bool set_symmetric_boundaries(const float* b, int levels, FastBoundaries* boundary) {
  if (levels < 2 || levels > 16) return false;
  const int half = levels / 2;
  bool symmetric = levels % 2 == 0 && b[half - 1] == 0.0f;
  for (int k = 0; k < levels - 1; ++k) {
    boundary->value[k] = b[k];
    const float mirrored = -b[levels - 2 - k];
    std::uint32_t bits = 0, mirrored_bits = 0;
    std::memcpy(&bits, b + k, sizeof bits);
    std::memcpy(&mirrored_bits, &mirrored, sizeof mirrored_bits);
    if (k != half - 1 && bits != mirrored_bits) symmetric = false;
    if (k >= half) boundary->positive[k - half] = static_cast<int>(bits);
  }
  // the positive boundaries must be positive finite floats (their bits then order like their values), ascending
  for (int i = 0; symmetric && i < half - 1; ++i) {
    if (!(b[half + i] > 0.0f) || !(b[half + i] < INFINITY)) symmetric = false;
    if (i > 0 && !(b[half + i - 1] < b[half + i])) symmetric = false;
  }
  return symmetric;
}

// The index of y (the number of boundaries b_k <= y, ties to the upper cell, -0 and +0 -> L / 2) for exactly
// antisymmetric boundaries (set_symmetric_boundaries): p_1 < ... < p_m (m = L / 2 - 1) the positive ones, P_i their
// bits as ints (positive, ordered like the values), and the boundaries -p_m < ... < -p_1 < 0 < p_1 < ... < p_m.
//   y >= +0 or y = -0: every -p_i and 0 are <= y, so idx = L / 2 + #{p_i <= y} = L / 2 + #{P_i <= bits(|y|)}
//     (for finite y >= 0 and p > 0, p <= y iff bits(p) <= bits(y); for y = -0 the count is 0: every P_i >= 1).
//   y < 0 (strictly): no p_i and not 0 are <= y; -p_i <= y iff p_i >= |y|, so idx = m - #{p_i < |y|}
//     = m - #{P_i <= bits(|y|) - 1} (integers; bits(|y|) >= 1), and m - c = (L / 2 + c) ^ (L - 1) for 0 <= c <= m.
// So with key = bits(y) for y >= +0, bits(|y|) - 1 = bits(y) - 0x80000001 for y < 0, and INT_MIN for -0 (bits
// 0x80000000 taken as a signed int: below every P_i, count 0, and not negative: L / 2), idx = (L / 2 + c) ^ (neg ?
// L - 1 : 0) with c = #{P_i <= key} (signed compares), by a binary search one step shorter than the full one.
// NaN cannot reach it (non-finite rows are flagged and their codes are unspecified).
template <int Bits>
__device__ __forceinline__ int symmetric_index(const FastBoundaries& boundary, float y) {
  const int* p = boundary.positive;
  const unsigned bits = __float_as_uint(y);
  const bool neg = bits > 0x80000000u;
  const int key = static_cast<int>(neg ? bits + 0x7fffffffu : bits);
  int count;
  if (Bits == 2) {
    count = p[0] <= key ? 1 : 0;
  } else if (Bits == 3) {
    const bool p1 = p[1] <= key;
    const bool p2 = (p1 ? p[2] : p[0]) <= key;
    count = (p1 ? 2 : 0) + (p2 ? 1 : 0);
  } else {
    const bool p1 = p[3] <= key;
    const bool p2 = (p1 ? p[5] : p[1]) <= key;
    const int low = p1 ? p[4] : p[0], high = p1 ? p[6] : p[2];
    const bool p3 = (p2 ? high : low) <= key;
    count = (p1 ? 4 : 0) + (p2 ? 2 : 0) + (p3 ? 1 : 0);
  }
  constexpr int kHalf = 1 << (Bits - 1), kMask = (1 << Bits) - 1;
  return (kHalf + count) ^ (neg ? kMask : 0);
}

// The packed indices of 4 consecutive coordinates y[0..3] (symmetric_index of each), in the planes' bit order:
// Bits 2: the 2-bit plane byte; Bits 3: the 2-bit plane byte (idx >> 1) | the 1-bit plane nibble (idx & 1) << 8;
// Bits 4: the 16 bits of the 4-bit plane. Built as (L / 2 + c_t) packed, xor the packed neg masks: the same bits
// as packing symmetric_index(y[t]) one by one, with fewer operations.
template <int Bits>
__device__ __forceinline__ unsigned symmetric_quad(const FastBoundaries& boundary, const float (&y)[4]) {
  const int* p = boundary.positive;
  unsigned count = 0, flip = 0;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const unsigned bits = __float_as_uint(y[t]);
    const bool neg = bits > 0x80000000u;
    const int key = static_cast<int>(neg ? bits + 0x7fffffffu : bits);
    if (Bits == 2) {
      if (p[0] <= key) count |= 1u << (2 * t);
      if (neg) flip |= 3u << (2 * t);
    } else if (Bits == 3) {
      const bool p1 = p[1] <= key;
      const bool p2 = (p1 ? p[2] : p[0]) <= key;
      if (p1) count |= 1u << (2 * t);
      if (p2) count |= 1u << (8 + t);
      if (neg) flip |= (3u << (2 * t)) | (1u << (8 + t));
    } else {
      const bool p1 = p[3] <= key;
      const bool p2 = (p1 ? p[5] : p[1]) <= key;
      const int low = p1 ? p[4] : p[0], high = p1 ? p[6] : p[2];
      const bool p3 = (p2 ? high : low) <= key;
      if (p1) count |= 4u << (4 * t);
      if (p2) count |= 2u << (4 * t);
      if (p3) count |= 1u << (4 * t);
      if (neg) flip |= 15u << (4 * t);
    }
  }
  // L / 2 in every field: b = 2: 2 per 2-bit field; b = 3: 2 in the 2-bit fields (4 >> 1), 0 in the nibble; b = 4: 8
  constexpr unsigned kHalves = Bits == 2 ? 0xAAu : Bits == 3 ? 0xAAu : 0x8888u;
  return (kHalves | count) ^ flip;
}

// The number of boundaries b_k <= y (ties to the upper cell), as the branch-free binary search of the CPU:
// step k compares y with the boundary the previous steps selected (selects between registers; this measured
// fewer instructions than a compare-and-count over all boundaries).
template <int Bits>
__device__ __forceinline__ int count_boundaries(const FastBoundaries& boundary, float y) {
  const float* b = boundary.value;
  if (Bits == 2) {
    const bool p1 = b[1] <= y;
    const bool p2 = (p1 ? b[2] : b[0]) <= y;
    return (p1 ? 2 : 0) + (p2 ? 1 : 0);
  } else if (Bits == 3) {
    const bool p1 = b[3] <= y;
    const bool p2 = (p1 ? b[5] : b[1]) <= y;
    const float low = p1 ? b[4] : b[0], high = p1 ? b[6] : b[2];
    const bool p3 = (p2 ? high : low) <= y;
    return (p1 ? 4 : 0) + (p2 ? 2 : 0) + (p3 ? 1 : 0);
  } else {
    const bool p1 = b[7] <= y;
    const bool p2 = (p1 ? b[11] : b[3]) <= y;
    const float c0 = p1 ? b[9] : b[1], c1 = p1 ? b[13] : b[5];
    const bool p3 = (p2 ? c1 : c0) <= y;
    float d[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) d[q] = p1 ? b[8 + 2 * q] : b[2 * q];
    const float e0 = p2 ? d[2] : d[0], e1 = p2 ? d[3] : d[1];
    const bool p4 = (p3 ? e1 : e0) <= y;
    return (p1 ? 8 : 0) + (p2 ? 4 : 0) + (p3 ? 2 : 0) + (p4 ? 1 : 0);
  }
}

template <int Kind, int P, int Bits, int Variant>
__global__ void __launch_bounds__(kThreads, FastVariant<Variant>::kMinBlocksPerSM)
    encode_fast_kernel(const float* __restrict__ x, CodecArgs args, FastBoundaries boundary) {
  x = select_head(args, x);
  using L = FastLayout<P, Variant>;
  constexpr int LPR = L::kLanesPerRow, RPS = L::kRowsPerSlot, CH = L::kChunks, S = L::kSlots;
  constexpr int RPT = L::kRowsPerTile;
  constexpr int kLevels = 1 << Bits;
  constexpr int E = FastExtraOutputs<Kind, P>::value;
  constexpr int kTaps = FastTaps<Kind>::value;

  __shared__ double centroid_squares[kLevels];  // (double)c * (double)c, exact (norm correction)
  // rotor3: window coefficients per lane, float4 [c * 5 + t][lane] = taps 0..3 of output t, [c * 5 + 4][lane] = tap 4
  // of outputs 0..3, [CH * 5 + e][lane] = taps of padded output e (conflict-free 16-byte loads)
  constexpr int kRotorRows = Kind == kRotor3 ? CH * 5 + E : 1;
  __shared__ float4 rotor_coefficients[kRotorRows][32];
  if (threadIdx.x < kLevels) {
    const double centroid = static_cast<double>(args.codebook[kLevels - 1 + threadIdx.x]);
    centroid_squares[threadIdx.x] = centroid * centroid;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int lr = lane & (LPR - 1);  // lane within the row's lane group
  const int row_in_slot = lane / LPR;
  const std::int64_t n = args.n;
  if (Kind == kRotor3 && warp == 0) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      float taps[4][5];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int j = 4 * (c * LPR + lr) + t, g = j / 3, ii = j % 3;
#pragma unroll
        for (int m = 0; m < 5; ++m) {
          const int jj = m - 2 + ii;  // window position t - 2 + m holds group input jj
          taps[t][m] = (jj >= 0 && jj < 3) ? __ldg(args.forward_matrix + g * 9 + ii * 3 + jj) : 0.0f;
        }
        rotor_coefficients[c * 5 + t][lane] = make_float4(taps[t][0], taps[t][1], taps[t][2], taps[t][3]);
      }
      rotor_coefficients[c * 5 + 4][lane] = make_float4(taps[0][4], taps[1][4], taps[2][4], taps[3][4]);
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int j = P + e, g = j / 3, ii = j % 3;
      float taps[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int jj = (P - 2 + m) - 3 * g;  // window position 2 + m of the last quad is coordinate P - 2 + m
        taps[m] = (jj >= 0 && jj < 3) ? __ldg(args.forward_matrix + g * 9 + ii * 3 + jj) : 0.0f;
      }
      rotor_coefficients[CH * 5 + e][lane] = make_float4(taps[0], taps[1], taps[2], taps[3]);
    }
  }
  __syncthreads();

  // Rotation constants of this lane's coordinates (loaded once).
  float sign[CH][4];                  // hadamard: +-1 per coordinate
  float stage_sign[5];                // hadamard: -1 in the upper lane of shuffle stage s (mask 1 << s)
  constexpr int kTapsInRegisters = Kind == kRotor3 ? 1 : kTaps;
  float coef[CH][4][kTapsInRegisters];  // planar / quat: block row of output t
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int quad = c * LPR + lr;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int j = 4 * quad + t;
      if (Kind == kHadamard) sign[c][t] = __ldg(args.rotation_parameters + j);
      if (Kind == kPlanar || Kind == kQuat) {
        constexpr int K = Kind == kPlanar ? 2 : 4;
        const int g = j / K, ii = j % K;
#pragma unroll
        for (int m = 0; m < kTapsInRegisters; ++m) coef[c][t][m] = __ldg(args.forward_matrix + g * K * K + ii * K + m);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < 5; ++s) stage_sign[s] = (lane >> s) & 1 ? -1.0f : 1.0f;
  const float hadamard_scale = args.hadamard_scale;
  const bool norm_correction = args.norm_correction;
  const bool pairs_aligned = ((reinterpret_cast<std::uintptr_t>(args.indices) | args.index_bytes) & 1) == 0;
  const int plane1_offset = args.planes.offset[1];

  const int my_slot = reduce_scatter_slot<S, LPR>(lr);
  const bool representative = lr == reduce_scatter_source<S, LPR>(my_slot) ? true : false;

  const std::int64_t tiles = (n + RPT - 1) / RPT;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kWarps;
  std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp;

  // loads of one tile: slot s, chunk c of this lane's row (zeros beyond n)
  auto load_tile = [&](std::int64_t t, float4 (&out)[S][CH]) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const std::int64_t row = t * RPT + s * RPS + row_in_slot;
      const float4* source = reinterpret_cast<const float4*>(x + row * P) + lr;
#pragma unroll
      for (int c = 0; c < CH; ++c) out[s][c] = row < n ? __ldcs(source + c * LPR) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };

  // the index bytes of this lane's row in slot 0 of the current tile (a 64-bit add per tile instead of a 64-bit
  // row * index_bytes product per row)
  std::uint8_t* lane_out = args.indices + (tile * RPT + row_in_slot) * args.index_bytes;
  const std::int64_t lane_out_step = stride * RPT * args.index_bytes;

  float4 current[S][CH];
  load_tile(tile, current);
  for (; tile < tiles; tile += stride) {
    float4 next[S][CH];
    load_tile(tile + stride, next);

    const std::int64_t row0 = tile * RPT;
    const int tile_rows = n - row0 < RPT ? static_cast<int>(n - row0) : RPT;  // rows of the tile below n (>= 1)
    // 1. norms: per-lane partial sums, reduce-scatter, one sqrt / reciprocal per lane
    double partial[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      double sum = 0.0;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const float4 v = current[s][c];
        const double a = v.x, b = v.y, cc = v.z, d = v.w;
        sum = __fma_rn(a, a, sum);
        sum = __fma_rn(b, b, sum);
        sum = __fma_rn(cc, cc, sum);
        sum = __fma_rn(d, d, sum);
      }
      partial[s] = sum;
    }
    const double norm_sq = reduce_scatter<S, LPR>(partial, lr);
    const std::int64_t my_row = row0 + my_slot * RPS + row_in_slot;
    const bool finite = isfinite(norm_sq);  // a NaN / Inf coordinate gives a non-finite sum, finite rows never do
    if (!finite && representative && my_row < n) flag_row(args, 0, my_row);
    const double my_norm = finite ? sqrt(norm_sq) : 0.0;
    const double my_reciprocal = my_norm == 0.0 ? 0.0 : __drcp_rn(my_norm);

    double centroid_partial[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int source = reduce_scatter_source<S, LPR>(s);
      const double norm = __shfl_sync(kFullMask, my_norm, source, LPR);
      const double reciprocal = __shfl_sync(kFullMask, my_reciprocal, source, LPR);
      // 2. u = (float)((double)x / norm) (Markstein; norm 0 -> reciprocal 0 -> u = +-0)
      float u[CH][4];
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const float in[4] = {current[s][c].x, current[s][c].y, current[s][c].z, current[s][c].w};
#pragma unroll
        for (int t = 0; t < 4; ++t) u[c][t] = unit_quotient(in[t], norm, reciprocal);
      }
      // 3. rotation
      float y[CH][4];
      float y_extra[E > 0 ? E : 1];
      if (Kind == kIdentity) {
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int t = 0; t < 4; ++t) y[c][t] = u[c][t];
      } else if (Kind == kHadamard) {
#pragma unroll
        for (int c = 0; c < CH; ++c) {
#pragma unroll
          for (int t = 0; t < 4; ++t) y[c][t] = __fmul_rn(u[c][t], sign[c][t]);
          // h = 1
          float a = y[c][0], b = y[c][1];
          y[c][0] = __fadd_rn(a, b);
          y[c][1] = __fsub_rn(a, b);
          a = y[c][2], b = y[c][3];
          y[c][2] = __fadd_rn(a, b);
          y[c][3] = __fsub_rn(a, b);
          // h = 2
          a = y[c][0], b = y[c][2];
          y[c][0] = __fadd_rn(a, b);
          y[c][2] = __fsub_rn(a, b);
          a = y[c][1], b = y[c][3];
          y[c][1] = __fadd_rn(a, b);
          y[c][3] = __fsub_rn(a, b);
        }
        // h = 4 .. 2 LPR: lanes xor 1 .. LPR / 2
#pragma unroll
        for (int s2 = 0; (1 << s2) < LPR; ++s2) {
#pragma unroll
          for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              const float partner = __shfl_xor_sync(kFullMask, y[c][t], 1 << s2);
              y[c][t] = __fmaf_rn(stage_sign[s2], y[c][t], partner);
            }
        }
        // h = 4 LPR, 8 LPR, ..., P / 2: between the chunks c and c + h / (4 LPR)
#pragma unroll
        for (int step = 1; step < CH; step *= 2) {
#pragma unroll
          for (int c = 0; c < CH; ++c) {
            if (c & step) continue;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              const float a = y[c][t], b = y[c + step][t];
              y[c][t] = __fadd_rn(a, b);
              y[c + step][t] = __fsub_rn(a, b);
            }
          }
        }
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int t = 0; t < 4; ++t) y[c][t] = __fmul_rn(y[c][t], hadamard_scale);
      } else if (Kind == kPlanar) {
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const int first = t & ~1;
            float acc = 0.0f;
#pragma unroll
            for (int m = 0; m < 2; ++m) acc = __fmaf_rn(coef[c][t][m], u[c][first + m], acc);
            y[c][t] = acc;
          }
      } else if (Kind == kQuat) {
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            float acc = 0.0f;
#pragma unroll
            for (int m = 0; m < 4; ++m) acc = __fmaf_rn(coef[c][t][m], u[c][m], acc);
            y[c][t] = acc;
          }
      } else if (Kind == kRotor3) {
        // window[c][p + 2] = coordinate 4 quad + p, p = -2 .. 5
        float window[CH][8];
        const int left = (lr - 1) & (LPR - 1), right = (lr + 1) & (LPR - 1);
        float from_left[CH][2], from_right[CH][2];
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          from_left[c][0] = __shfl_sync(kFullMask, u[c][2], left, LPR);
          from_left[c][1] = __shfl_sync(kFullMask, u[c][3], left, LPR);
          from_right[c][0] = __shfl_sync(kFullMask, u[c][0], right, LPR);
          from_right[c][1] = __shfl_sync(kFullMask, u[c][1], right, LPR);
        }
#pragma unroll
        for (int c = 0; c < CH; ++c) {
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            // the quad before lane 0 of chunk c is the last quad of chunk c - 1 (zero before the row);
            // the quad after the group's last lane is the first of chunk c + 1 (the zero padding after the row)
            const float before = c > 0 ? from_left[c > 0 ? c - 1 : 0][k] : 0.0f;
            const float after = c + 1 < CH ? from_right[c + 1 < CH ? c + 1 : 0][k] : 0.0f;
            window[c][k] = lr == 0 ? before : from_left[c][k];
            window[c][6 + k] = lr == LPR - 1 ? after : from_right[c][k];
          }
#pragma unroll
          for (int t = 0; t < 4; ++t) window[c][2 + t] = u[c][t];
          const float4 last_taps = rotor_coefficients[c * 5 + 4][lane];
          const float tap4[4] = {last_taps.x, last_taps.y, last_taps.z, last_taps.w};
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const float4 taps = rotor_coefficients[c * 5 + t][lane];
            float acc = 0.0f;
            acc = __fmaf_rn(taps.x, window[c][t], acc);
            acc = __fmaf_rn(taps.y, window[c][t + 1], acc);
            acc = __fmaf_rn(taps.z, window[c][t + 2], acc);
            acc = __fmaf_rn(taps.w, window[c][t + 3], acc);
            acc = __fmaf_rn(tap4[t], window[c][t + 4], acc);
            y[c][t] = acc;
          }
        }
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const float4 taps = rotor_coefficients[CH * 5 + e][lane];
          float acc = 0.0f;
          acc = __fmaf_rn(taps.x, window[CH - 1][4], acc);
          acc = __fmaf_rn(taps.y, window[CH - 1][5], acc);
          acc = __fmaf_rn(taps.z, window[CH - 1][6], acc);
          acc = __fmaf_rn(taps.w, window[CH - 1][7], acc);
          y_extra[e] = acc;
        }
      }
      // 4. indices, planes
      const bool valid = s * RPS + row_in_slot < tile_rows;
      std::uint8_t* out = lane_out + s * RPS * args.index_bytes;
      double centroid_sum = 0.0;
      int extra_index[E > 0 ? E : 1];
#pragma unroll
      for (int e = 0; e < E; ++e) extra_index[e] = symmetric_index<Bits>(boundary, y_extra[e]);
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const int quad = c * LPR + lr;
        const unsigned packed = symmetric_quad<Bits>(boundary, y[c]);
        if (norm_correction) {
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const unsigned idx = Bits == 2   ? (packed >> (2 * t)) & 3u
                                 : Bits == 3 ? (((packed >> (2 * t)) & 3u) << 1) | ((packed >> (8 + t)) & 1u)
                                             : (packed >> (4 * t)) & 15u;
            centroid_sum += centroid_squares[idx];
          }
        }
        const bool last_quad = c == CH - 1 && lr == LPR - 1;
        if (Bits == 2) {
          const unsigned byte = packed;
          if (valid) out[quad] = static_cast<std::uint8_t>(byte);
          if (E > 0 && valid && last_quad) {
            unsigned tail = 0u;
#pragma unroll
            for (int e = 0; e < E; ++e) tail |= static_cast<unsigned>(extra_index[e]) << (2 * e);
            out[quad + 1] = static_cast<std::uint8_t>(tail);
          }
        } else if (Bits == 3) {
          const unsigned byte = packed & 0xFFu;
          const unsigned nibble = packed >> 8;
          const unsigned partner = __shfl_down_sync(kFullMask, nibble, 1);
          if (valid) {
            out[quad] = static_cast<std::uint8_t>(byte);
            if ((lr & 1) == 0) out[plane1_offset + (quad >> 1)] = static_cast<std::uint8_t>(nibble | (partner << 4));
          }
          if (E > 0 && valid && last_quad) {
            unsigned tail0 = 0u, tail1 = 0u;
#pragma unroll
            for (int e = 0; e < E; ++e) {
              tail0 |= static_cast<unsigned>(extra_index[e] >> 1) << (2 * e);
              tail1 |= static_cast<unsigned>(extra_index[e] & 1) << e;
            }
            out[quad + 1] = static_cast<std::uint8_t>(tail0);
            out[plane1_offset + (quad >> 1) + 1] = static_cast<std::uint8_t>(tail1);
          }
        } else {  // Bits == 4
          const unsigned pair = packed;
          if (valid) {
            if (pairs_aligned) {
              reinterpret_cast<unsigned short*>(out)[quad] = static_cast<unsigned short>(pair);
            } else {
              out[2 * quad] = static_cast<std::uint8_t>(pair);
              out[2 * quad + 1] = static_cast<std::uint8_t>(pair >> 8);
            }
          }
          if (E > 0 && valid && last_quad) {
            unsigned tail = 0u;
#pragma unroll
            for (int e = 0; e < E; ++e) tail |= static_cast<unsigned>(extra_index[e]) << (4 * e);
            out[2 * quad + 2] = static_cast<std::uint8_t>(tail);
          }
        }
      }
      if (norm_correction && E > 0 && lr == LPR - 1) {
#pragma unroll
        for (int e = 0; e < E; ++e) centroid_sum += centroid_squares[extra_index[e]];
      }
      centroid_partial[s] = centroid_sum;
    }
    // 5. stored norms (one lane per row)
    double stored = my_norm;
    if (norm_correction) {
      const double centroid_sq = reduce_scatter<S, LPR>(centroid_partial, lr);
      if (stored != 0.0 && centroid_sq > 0.0) stored = stored / sqrt(centroid_sq);
    }
    if (representative && my_row < n) {
      if (!store_norm(args.norms, my_row, args.norm_bytes, stored)) {
        flag_row(args, 1, my_row);
      }
    }
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
      for (int c = 0; c < CH; ++c) current[s][c] = next[s][c];
    lane_out += lane_out_step;
  }
}

}  // namespace codec
}  // namespace cuda
}  // namespace rotorquant
