// AVX-512 (F, BW, VL; with BMI2) build of the CPU kernels (16 float lanes). Compiled for baseline x86-64 like
// the rest of the library: only the functions below carry the avx512f/bw/vl (+ bmi2) target, and
// simd_dispatch.cpp calls them only on a CPU that has them. On other architectures this file is empty.
#include <cmath>
#include <cstdint>

#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/detail/rotor_network.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ROTORQUANT_NO_X86_KERNELS)
#define ROTORQUANT_HAVE_AVX512_KERNELS 1
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,bmi2")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 avx512fintrin.h _mm512_undefined_* false positive
#pragma GCC diagnostic ignored "-Wuninitialized"        // (the same, for _mm512_permute_ps / _mm512_shuffle_f32x4)
#endif

namespace rotorquant {
namespace detail {
namespace avx512_kernels {

struct V {
  static constexpr int W = 16;
  static constexpr int kBigRows = 4;     // 4 x 4 accumulators (64 columns) of 32 registers
  static constexpr int kBigVectors = 4;
  static constexpr int kSmallRows = 8;
  using T = __m512;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T load_partial(const float* p, std::int64_t count) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
  }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  // Walsh-Hadamard stages h = 1, 2, 4, 8 inside one vector: lane i pairs with lane i ^ h; the low lane of a pair
  // becomes a + b, the high lane a - b, as fmadd(v, +-1, partner): v * +-1 is exact, so each lane gets the float
  // sum or difference bit for bit. (The sign patterns live in registers across a kernel's loop.)
  struct Butterfly {
    T sign[4];
    Butterfly() {
      const T one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
      sign[0] = _mm512_mask_blend_ps(0xAAAA, one, minus_one);
      sign[1] = _mm512_mask_blend_ps(0xCCCC, one, minus_one);
      sign[2] = _mm512_mask_blend_ps(0xF0F0, one, minus_one);
      sign[3] = _mm512_mask_blend_ps(0xFF00, one, minus_one);
    }
    T apply(T v) const {
      v = _mm512_fmadd_ps(v, sign[0], _mm512_permute_ps(v, 0xB1));
      v = _mm512_fmadd_ps(v, sign[1], _mm512_permute_ps(v, 0x4E));
      v = _mm512_fmadd_ps(v, sign[2], _mm512_shuffle_f32x4(v, v, 0xB1));
      return _mm512_fmadd_ps(v, sign[3], _mm512_shuffle_f32x4(v, v, 0x4E));
    }
  };
  static constexpr int kRegisterVectors = 16;  // the largest Walsh-Hadamard size done in registers: 16 vectors
  static float fma1(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

#include "simd_kernels_impl.hpp"

// ---- normalize: simd_kernels_impl.hpp explains the arithmetic (multiply by 1 / norm, divide near midpoints).
// The 8 partial sums of squares are the 8 double lanes of one accumulator (the same order as the scalar
// code); the sum of four rows at a time hides the latency of the accumulator chain.
template <int R>
inline void norms_squared_rows(const float* x, std::int64_t dim, double* norm_sq) {
  __m512d acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_pd();
  std::int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    for (int r = 0; r < R; ++r) {
      const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(x + r * dim + j));
      acc[r] = _mm512_fmadd_pd(v, v, acc[r]);  // the product is exact in double: same as mul then add
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) double lanes[8];
    _mm512_store_pd(lanes, acc[r]);
    norm_sq[r] = combine_partial_sums(lanes, tail_sum_of_squares(x + r * dim, j, dim));
  }
}

// 16 coordinates (the lanes of `lanes`): u = (float)(x * inv_norm); lanes near a float midpoint or tiny are redone
// with the division. The midpoint test looks at the low 32 bits of the 16 double products (gathered into one
// vector); the tiny test compares |x| with a per-row bound: 0 < |x| < tiny_bound covers every lane whose product
// is below 2^-125 (integer order of non-negative floats is their order; x = 0 wraps to the largest unsigned).
struct UnitChunkConstants {
  __m512i window_start, window_mask, low_dwords, abs_mask, one;
  UnitChunkConstants()  // (an explicit constructor: it gets this file's target options)
      : window_start(_mm512_set1_epi32(static_cast<int>(kMidpointWindowStart))),
        window_mask(_mm512_set1_epi32(static_cast<int>(kMidpointWindowMask))),
        low_dwords(_mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0)),
        abs_mask(_mm512_set1_epi32(0x7FFFFFFF)),
        one(_mm512_set1_epi32(1)) {}
};

inline void unit_chunk(const float* x, double norm, __m512d inv_norm, __m512i tiny_bound, float* u, __mmask16 lanes,
                       const UnitChunkConstants& c) {
  const __m512i xs = _mm512_castps_si512(_mm512_maskz_loadu_ps(lanes, x));
  const __m512d lo = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(static_cast<__mmask8>(lanes), x)), inv_norm);
  const __m512d hi =
      _mm512_mul_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(static_cast<__mmask8>(lanes >> 8), x + 8)), inv_norm);
  const __m512i low_bits = _mm512_permutex2var_epi32(_mm512_castpd_si512(lo), c.low_dwords, _mm512_castpd_si512(hi));
  const __mmask16 near_midpoint =
      _mm512_testn_epi32_mask(_mm512_sub_epi32(low_bits, c.window_start), c.window_mask);
  const __mmask16 tiny =
      _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_and_si512(xs, c.abs_mask), c.one), tiny_bound);
  _mm256_mask_storeu_ps(u, static_cast<__mmask8>(lanes), _mm512_cvtpd_ps(lo));
  _mm256_mask_storeu_ps(u + 8, static_cast<__mmask8>(lanes >> 8), _mm512_cvtpd_ps(hi));
  unsigned redo = static_cast<unsigned>((near_midpoint | tiny) & lanes);
  while (redo != 0) {  // rare: about one coordinate in 3e7 on random data
    const int k = __builtin_ctz(redo);
    redo &= redo - 1;
    u[k] = static_cast<float>(static_cast<double>(x[k]) / norm);
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
    const __m512d inv_norm = _mm512_set1_pd(1.0 / norm);
    const __m512i tiny_bound = _mm512_set1_epi32(static_cast<int>(tiny_input_bound_bits(norm) - 1u));
    std::int64_t j = 0;
    for (; j + 16 <= dim; j += 16) unit_chunk(row + j, norm, inv_norm, tiny_bound, u + j, 0xFFFF, constants);
    if (j < dim) {
      unit_chunk(row + j, norm, inv_norm, tiny_bound, u + j, static_cast<__mmask16>((1u << (dim - j)) - 1u), constants);
    }
  }
  for (r = rows; r < next_rows; ++r) prefetch_row(next + r * dim, dim);
}

// Compare-count over up to 31 boundaries, 16 values at a time (boundaries strictly ascending, so the count
// equals the binary search's cell).
void quantize_vec(const float* y, std::int64_t count, const float* boundaries, int num_boundaries, std::uint8_t* idx) {
  if (num_boundaries > 31) {
    quantize_scalar(y, count, boundaries, num_boundaries, idx);
    return;
  }
  __m512 b[31];
  for (int k = 0; k < num_boundaries; ++k) b[k] = _mm512_set1_ps(boundaries[k]);
  const __m512i one = _mm512_set1_epi32(1);
  std::int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const __m512 v = _mm512_loadu_ps(y + j);
    __m512i c = _mm512_setzero_si512();
    for (int k = 0; k < num_boundaries; ++k) c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, b[k], _CMP_GE_OQ), c, one);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(idx + j), _mm512_cvtepi32_epi8(c));
  }
  quantize_scalar(y + j, count - j, boundaries, num_boundaries, idx + j);
}

// Quantize + pack for 1..4 bits straight from the comparison masks (simd_kernels_impl.hpp, "packing index bits
// straight from boundary comparisons"): 16 values per step, 2 * width bytes of every plane. The plane layouts
// (format.hpp): 1 bit [1], 2 bits [2], 3 bits [2 (bits 1-2), 1 (bit 0)], 4 bits [4].
inline std::uint64_t interleave2(unsigned low_bit, unsigned high_bit) {  // 16 + 16 bits -> 32 bits
  return _pdep_u64(low_bit, 0x55555555ull) | _pdep_u64(high_bit, 0xAAAAAAAAull);
}

template <int B>
inline void pack_index_bits16(const unsigned* bit, std::int64_t count, const PlaneLayout& layout, std::uint8_t* dst,
                              std::int64_t first) {
  const bool full = count == 16;
  if constexpr (B == 1) {
    const std::uint16_t plane = static_cast<std::uint16_t>(bit[0]);
    if (full) __builtin_memcpy(dst + first / 8, &plane, 2); else store_plane_chunk(plane, count, 1, dst + first / 8);
  } else if constexpr (B == 2) {
    const std::uint32_t plane = static_cast<std::uint32_t>(interleave2(bit[0], bit[1]));
    if (full) __builtin_memcpy(dst + first / 4, &plane, 4); else store_plane_chunk(plane, count, 2, dst + first / 4);
  } else if constexpr (B == 3) {
    const std::uint32_t high = static_cast<std::uint32_t>(interleave2(bit[1], bit[2]));
    const std::uint16_t low = static_cast<std::uint16_t>(bit[0]);
    std::uint8_t* low_plane = dst + layout.plane_offset[1];
    if (full) {
      __builtin_memcpy(dst + first / 4, &high, 4);
      __builtin_memcpy(low_plane + first / 8, &low, 2);
    } else {
      store_plane_chunk(high, count, 2, dst + first / 4);
      store_plane_chunk(low, count, 1, low_plane + first / 8);
    }
  } else {
    const std::uint64_t plane = _pdep_u64(bit[0], 0x1111111111111111ull) | _pdep_u64(bit[1], 0x2222222222222222ull) |
                                _pdep_u64(bit[2], 0x4444444444444444ull) | _pdep_u64(bit[3], 0x8888888888888888ull);
    if (full) __builtin_memcpy(dst + first / 2, &plane, 8); else store_plane_chunk(plane, count, 4, dst + first / 2);
  }
}

// The B index bits of 16 values as masks (bit[i] = bit i of each lane's index), by binary search.
template <int B>
inline void index_bit_masks(__m512 v, const __m512* b, __mmask16 lanes, unsigned* bit) {
  __mmask16 found[B];  // found[k]: the k-th bit found (bit B-1-k)
  found[0] = _mm512_mask_cmp_ps_mask(lanes, v, b[BinarySearchThresholds<B>::index(0, 0)], _CMP_GE_OQ);
#pragma GCC unroll 4
  for (int i = 1; i < B; ++i) {
    // candidates[P] = the threshold of prefix P; fold the tree from the last bit found to the first
    __m512 candidates[1 << (B - 1)];
#pragma GCC unroll 8
    for (int prefix = 0; prefix < (1 << i); ++prefix) {
      candidates[prefix] = b[BinarySearchThresholds<B>::index(i, prefix)];
    }
#pragma GCC unroll 4
    for (int level = 0, count = 1 << i; level < i; ++level, count >>= 1) {
      const __mmask16 select = found[i - 1 - level];  // bit `level` of the prefix
#pragma GCC unroll 8
      for (int j = 0; j < count / 2; ++j) {
        candidates[j] = _mm512_mask_blend_ps(select, candidates[2 * j], candidates[2 * j + 1]);
      }
    }
    found[i] = _mm512_mask_cmp_ps_mask(lanes, v, candidates[0], _CMP_GE_OQ);
  }
  for (int k = 0; k < B; ++k) bit[B - 1 - k] = found[k];
}

template <int B>
void quantize_pack_search(const float* y, std::int64_t p, std::int64_t rows, const float* boundaries,
                          const PlaneLayout& layout, std::uint8_t* out, std::int64_t out_stride) {
  constexpr int kBoundaries = (1 << B) - 1;
  __m512 b[kBoundaries];
  for (int k = 0; k < kBoundaries; ++k) b[k] = _mm512_set1_ps(boundaries[k]);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = y + r * p;
    std::uint8_t* dst = out + r * out_stride;
    std::int64_t c = 0;
    for (; c + 16 <= p; c += 16) {
      unsigned bits[B];
      index_bit_masks<B>(_mm512_loadu_ps(row + c), b, static_cast<__mmask16>(0xFFFF), bits);
      pack_index_bits16<B>(bits, 16, layout, dst, c);
    }
    if (c < p) {
      const __mmask16 lanes = static_cast<__mmask16>((1u << (p - c)) - 1u);
      unsigned bits[B];
      index_bit_masks<B>(_mm512_maskz_loadu_ps(lanes, row + c), b, lanes, bits);
      pack_index_bits16<B>(bits, p - c, layout, dst, c);
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
  const __m512 s = _mm512_set1_ps(scale);
  std::int64_t j = 0;
  if (table_size <= 32) {
    float padded[32] = {};
    for (int k = 0; k < table_size; ++k) padded[k] = table[k];
    const __m512 lo = _mm512_loadu_ps(padded), hi = _mm512_loadu_ps(padded + 16);
    for (; j + 16 <= count; j += 16) {
      const __m512i ix = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + j)));
      _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_permutex2var_ps(lo, ix, hi), s));
    }
  } else {
    for (; j + 16 <= count; j += 16) {
      const __m512i ix = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + j)));
      _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_i32gather_ps(ix, table, 4), s));
    }
  }
  lookup_scalar(idx + j, count - j, table, table_size, scale, out + j);
}

}  // namespace avx512_kernels

const Kernels* avx512_kernel_table() {
  using namespace avx512_kernels;
  static const Kernels table = {KernelIsa::kAvx512, gemm,          block_apply,       block_inverse,
                                hadamard_apply,     hadamard_inverse, rotor_network_apply_rows, normalize_vec,
                                quantize_vec,       quantize_pack_vec, lookup_vec,       dots,
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
const Kernels* avx512_kernel_table() { return nullptr; }
}  // namespace detail
}  // namespace rotorquant

#endif
