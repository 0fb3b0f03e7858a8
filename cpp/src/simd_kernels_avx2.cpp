// AVX2 + FMA build of the CPU kernels (8 float lanes). Compiled for baseline x86-64 like the rest of the
// library: only the functions below carry the avx2/fma target, and simd_dispatch.cpp calls them only on a
// CPU that has both. On other architectures this file is empty.
#include <cmath>
#include <cstdint>

#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/detail/rotor_network.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ROTORQUANT_NO_X86_KERNELS)
#define ROTORQUANT_HAVE_AVX2_KERNELS 1
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace rotorquant {
namespace detail {
namespace avx2_kernels {

struct V {
  static constexpr int W = 8;
  static constexpr int kBigRows = 6;     // 6 x 2 accumulators + 2 columns + 1 broadcast <= 16 registers
  static constexpr int kBigVectors = 2;
  static constexpr int kSmallRows = 8;
  using T = __m256;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T load_partial(const float* p, std::int64_t count) {
    const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lane));
  }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static float hsum(T v) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  // Walsh-Hadamard stages h = 1, 2, 4 inside one vector: lane i pairs with lane i ^ h; the low lane of a pair
  // becomes a + b, the high lane a - b, as fmadd(v, +-1, partner): v * +-1 is exact, so each lane gets the float
  // sum or difference bit for bit. (The sign patterns live in registers across a kernel's loop.)
  struct Butterfly {
    T sign[3];
    Butterfly() {
      const T one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
      sign[0] = _mm256_blend_ps(one, minus_one, 0xAA);
      sign[1] = _mm256_blend_ps(one, minus_one, 0xCC);
      sign[2] = _mm256_blend_ps(one, minus_one, 0xF0);
    }
    T apply(T v) const {
      v = _mm256_fmadd_ps(v, sign[0], _mm256_permute_ps(v, 0xB1));
      v = _mm256_fmadd_ps(v, sign[1], _mm256_permute_ps(v, 0x4E));
      return _mm256_fmadd_ps(v, sign[2], _mm256_permute2f128_ps(v, v, 0x01));
    }
  };
  static constexpr int kRegisterVectors = 8;  // the largest Walsh-Hadamard size done in registers: 8 vectors
  static float fma1(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

#include "simd_kernels_impl.hpp"

// ---- normalize: simd_kernels_impl.hpp explains the arithmetic (multiply by 1 / norm, divide near midpoints).
// The 8 partial sums of squares are the lanes of two 4-double accumulators (the same order as the scalar
// code); the sum of four rows at a time hides the latency of the accumulator chains.
template <int R>
inline void norms_squared_rows(const float* x, std::int64_t dim, double* norm_sq) {
  __m256d lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_pd();
  std::int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    for (int r = 0; r < R; ++r) {
      const __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(x + r * dim + j));
      const __m256d b = _mm256_cvtps_pd(_mm_loadu_ps(x + r * dim + j + 4));
      lo[r] = _mm256_fmadd_pd(a, a, lo[r]);  // the product is exact in double: same as mul then add
      hi[r] = _mm256_fmadd_pd(b, b, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) double lanes[8];
    _mm256_store_pd(lanes, lo[r]);
    _mm256_store_pd(lanes + 4, hi[r]);
    norm_sq[r] = combine_partial_sums(lanes, tail_sum_of_squares(x + r * dim, j, dim));
  }
}

// 8 coordinates: u = (float)(x * inv_norm); when a lane is near a float midpoint or tiny (simd_kernels_impl.hpp)
// the 8 are redone one by one with unit_coordinate (exact). The midpoint test looks at the low 32 bits of the 8
// double products (gathered, in a permuted order, by one shuffle); the tiny test compares |x| with the per-row
// bound of tiny_input_bound_bits (0 < |x| < bound, unsigned: x = 0 wraps to the largest value).
struct UnitChunkConstants {
  __m256i window_start, window_mask, abs_mask, one;
  UnitChunkConstants()  // (an explicit constructor: it gets this file's target options)
      : window_start(_mm256_set1_epi32(static_cast<int>(kMidpointWindowStart))),
        window_mask(_mm256_set1_epi32(static_cast<int>(kMidpointWindowMask))),
        abs_mask(_mm256_set1_epi32(0x7FFFFFFF)),
        one(_mm256_set1_epi32(1)) {}
};

inline void unit_chunk8(const float* x, double norm, double inv, __m256d inv_norm, __m256i tiny_bound_less_one,
                        float* u, const UnitChunkConstants& c) {
  const __m256 xs = _mm256_loadu_ps(x);
  const __m256d lo = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xs)), inv_norm);
  const __m256d hi = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xs, 1)), inv_norm);
  const __m256i low_bits = _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castpd_ps(lo), _mm256_castpd_ps(hi), 0x88));
  const __m256i near_midpoint = _mm256_cmpeq_epi32(
      _mm256_and_si256(_mm256_sub_epi32(low_bits, c.window_start), c.window_mask), _mm256_setzero_si256());
  const __m256i magnitude_less_one = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(xs), c.abs_mask), c.one);
  // tiny: 0 < |x| < bound, i.e. a = |x| - 1 below c = bound - 1 as unsigned: min(a, c) == a and a != c
  const __m256i tiny = _mm256_andnot_si256(
      _mm256_cmpeq_epi32(magnitude_less_one, tiny_bound_less_one),
      _mm256_cmpeq_epi32(_mm256_min_epu32(magnitude_less_one, tiny_bound_less_one), magnitude_less_one));
  _mm_storeu_ps(u, _mm256_cvtpd_ps(lo));
  _mm_storeu_ps(u + 4, _mm256_cvtpd_ps(hi));
  const __m256i redo = _mm256_or_si256(near_midpoint, tiny);
  if (!_mm256_testz_si256(redo, redo)) {  // rare: about one chunk in 4e6 on random data
    for (int k = 0; k < 8; ++k) u[k] = unit_coordinate(x[k], norm, inv);
  }
}

void normalize_vec(const float* x, std::int64_t dim, std::int64_t rows, double* norms, float* unit,
                   std::int64_t unit_stride, const float* next, std::int64_t next_rows) {
  row_norms<norms_squared_rows<4>, norms_squared_rows<1>>(x, dim, rows, norms);
  const UnitChunkConstants constants;
  std::int64_t r = 0;
  for (; r < rows; ++r) {
    const float* row = x + r * dim;
    float* u = unit + r * unit_stride;
    const double norm = norms[r];
    if (r < next_rows) prefetch_row(next + r * dim, dim);
    if (norm == 0.0) {
      for (std::int64_t i = 0; i < dim; ++i) u[i] = 0.0f;
      continue;
    }
    const double inv = 1.0 / norm;
    const __m256d inv_norm = _mm256_set1_pd(inv);
    const __m256i tiny_bound_less_one = _mm256_set1_epi32(static_cast<int>(tiny_input_bound_bits(norm) - 1u));
    std::int64_t j = 0;
    for (; j + 8 <= dim; j += 8) unit_chunk8(row + j, norm, inv, inv_norm, tiny_bound_less_one, u + j, constants);
    unit_row_scalar(row, j, dim, norm, inv, u);
  }
  for (r = rows; r < next_rows; ++r) prefetch_row(next + r * dim, dim);
}

// Compare-count over up to 31 boundaries, 8 values at a time (boundaries strictly ascending, so the count
// equals the binary search's cell).
void quantize_vec(const float* y, std::int64_t count, const float* boundaries, int num_boundaries, std::uint8_t* idx) {
  if (num_boundaries > 31) {
    quantize_scalar(y, count, boundaries, num_boundaries, idx);
    return;
  }
  __m256 b[31];
  for (int k = 0; k < num_boundaries; ++k) b[k] = _mm256_set1_ps(boundaries[k]);
  std::int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 v = _mm256_loadu_ps(y + j);
    __m256i c = _mm256_setzero_si256();
    for (int k = 0; k < num_boundaries; ++k) {
      c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(v, b[k], _CMP_GE_OQ)));
    }
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(idx + j), _mm_packus_epi16(words, words));
  }
  quantize_scalar(y + j, count - j, boundaries, num_boundaries, idx + j);
}

// Quantize + pack for 1..4 bits straight from the comparison masks (simd_kernels_impl.hpp, "packing index bits
// straight from boundary comparisons"): 8 values per step, `width` bytes of every plane. The plane layouts
// (format.hpp): 1 bit [1], 2 bits [2], 3 bits [2 (bits 1-2), 1 (bit 0)], 4 bits [4]. Bits are spread with
// tables (no BMI2 needed).
template <int B>
inline void pack_index_bits8(const unsigned* bit, std::int64_t count, const PlaneLayout& layout, std::uint8_t* dst,
                             std::int64_t first) {
  const bool full = count == 8;
  if constexpr (B == 1) {
    const std::uint8_t plane = static_cast<std::uint8_t>(bit[0]);
    if (full) dst[first / 8] = plane; else store_plane_chunk(plane, count, 1, dst + first / 8);
  } else if constexpr (B == 2) {
    const std::uint16_t plane = static_cast<std::uint16_t>(kBitSpread.two[bit[0]] | (kBitSpread.two[bit[1]] << 1));
    if (full) __builtin_memcpy(dst + first / 4, &plane, 2); else store_plane_chunk(plane, count, 2, dst + first / 4);
  } else if constexpr (B == 3) {
    const std::uint16_t high = static_cast<std::uint16_t>(kBitSpread.two[bit[1]] | (kBitSpread.two[bit[2]] << 1));
    std::uint8_t* low_plane = dst + layout.plane_offset[1];
    if (full) {
      __builtin_memcpy(dst + first / 4, &high, 2);
      low_plane[first / 8] = static_cast<std::uint8_t>(bit[0]);
    } else {
      store_plane_chunk(high, count, 2, dst + first / 4);
      store_plane_chunk(bit[0], count, 1, low_plane + first / 8);
    }
  } else {
    const std::uint32_t plane = kBitSpread.four[bit[0]] | (kBitSpread.four[bit[1]] << 1) |
                                (kBitSpread.four[bit[2]] << 2) | (kBitSpread.four[bit[3]] << 3);
    if (full) __builtin_memcpy(dst + first / 2, &plane, 4); else store_plane_chunk(plane, count, 4, dst + first / 2);
  }
}

// The B index bits of 8 values as 8-bit masks (bit[i] = bit i of each lane's index), by binary search.
template <int B>
inline void index_bit_masks(__m256 v, const __m256* b, unsigned lanes, unsigned* bit) {
  __m256 found[B];  // found[k]: the k-th bit found (bit B-1-k), as all-ones lanes
  found[0] = _mm256_cmp_ps(v, b[BinarySearchThresholds<B>::index(0, 0)], _CMP_GE_OQ);
#pragma GCC unroll 4
  for (int i = 1; i < B; ++i) {
    __m256 candidates[1 << (B - 1)];
#pragma GCC unroll 8
    for (int prefix = 0; prefix < (1 << i); ++prefix) {
      candidates[prefix] = b[BinarySearchThresholds<B>::index(i, prefix)];
    }
#pragma GCC unroll 4
    for (int level = 0, count = 1 << i; level < i; ++level, count >>= 1) {
      const __m256 select = found[i - 1 - level];  // bit `level` of the prefix
#pragma GCC unroll 8
      for (int j = 0; j < count / 2; ++j) {
        candidates[j] = _mm256_blendv_ps(candidates[2 * j], candidates[2 * j + 1], select);
      }
    }
    found[i] = _mm256_cmp_ps(v, candidates[0], _CMP_GE_OQ);
  }
  for (int k = 0; k < B; ++k) bit[B - 1 - k] = static_cast<unsigned>(_mm256_movemask_ps(found[k])) & lanes;
}

template <int B>
void quantize_pack_search(const float* y, std::int64_t p, std::int64_t rows, const float* boundaries,
                          const PlaneLayout& layout, std::uint8_t* out, std::int64_t out_stride) {
  constexpr int kBoundaries = (1 << B) - 1;
  __m256 b[kBoundaries];
  for (int k = 0; k < kBoundaries; ++k) b[k] = _mm256_set1_ps(boundaries[k]);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = y + r * p;
    std::uint8_t* dst = out + r * out_stride;
    std::int64_t c = 0;
    for (; c + 8 <= p; c += 8) {
      unsigned bits[B];
      index_bit_masks<B>(_mm256_loadu_ps(row + c), b, 0xFFu, bits);
      pack_index_bits8<B>(bits, 8, layout, dst, c);
    }
    if (c < p) {
      unsigned bits[B];
      index_bit_masks<B>(V::load_partial(row + c, p - c), b, (1u << (p - c)) - 1u, bits);
      pack_index_bits8<B>(bits, p - c, layout, dst, c);
    }
  }
}

void quantize_pack_vec(const float* y, std::int64_t p, std::int64_t rows, const float* boundaries, int num_boundaries,
                       const PlaneLayout& layout, std::uint8_t* idx_scratch, std::uint8_t* out,
                       std::int64_t out_stride) {
  switch (num_boundaries) {
    case 1: quantize_pack_search<1>(y, p, rows, boundaries, layout, out, out_stride); return;
    case 3: quantize_pack_search<2>(y, p, rows, boundaries, layout, out, out_stride); return;
    case 7: quantize_pack_search<3>(y, p, rows, boundaries, layout, out, out_stride); return;
    case 15: quantize_pack_search<4>(y, p, rows, boundaries, layout, out, out_stride); return;
    default: break;
  }
  quantize_vec(y, rows * p, boundaries, num_boundaries, idx_scratch);
  for (std::int64_t r = 0; r < rows; ++r) pack_indices_fast(layout, p, idx_scratch + r * p, out + r * out_stride);
}

void lookup_vec(const std::uint8_t* idx, std::int64_t count, const float* table, int table_size, float scale,
                float* out) {
  const __m256 s = _mm256_set1_ps(scale);
  std::int64_t j = 0;
  if (table_size <= 16) {
    float padded[16] = {};
    for (int k = 0; k < table_size; ++k) padded[k] = table[k];
    const __m256 lo = _mm256_loadu_ps(padded), hi = _mm256_loadu_ps(padded + 8);
    for (; j + 8 <= count; j += 8) {
      const __m256i ix = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx + j)));
      const __m256 a = _mm256_permutevar8x32_ps(lo, ix), b = _mm256_permutevar8x32_ps(hi, ix);
      const __m256 v = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(ix, 28)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(v, s));
    }
  } else {
    for (; j + 8 <= count; j += 8) {
      const __m256i ix = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx + j)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(table, ix, 4), s));
    }
  }
  lookup_scalar(idx + j, count - j, table, table_size, scale, out + j);
}

}  // namespace avx2_kernels

const Kernels* avx2_kernel_table() {
  using namespace avx2_kernels;
  static const Kernels table = {KernelIsa::kAvx2, gemm,          block_apply,       block_inverse,
                                hadamard_apply,   hadamard_inverse, rotor_network_apply_rows, normalize_vec,
                                quantize_vec,     quantize_pack_vec, lookup_vec,       dots,
                                nibble_lut_sum};
  return &table;
}

}  // namespace detail
}  // namespace rotorquant

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64 GCC/Clang

namespace rotorquant {
namespace detail {
const Kernels* avx2_kernel_table() { return nullptr; }
}  // namespace detail
}  // namespace rotorquant

#endif
