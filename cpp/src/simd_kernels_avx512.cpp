// AVX-512 (F, BW, VL) build of the CPU kernels (16 float lanes). Compiled for baseline x86-64 like the rest of the
// library: only the functions below carry the avx512f/bw/vl target, and simd_dispatch.cpp calls them only on a
// CPU that has them. On other architectures this file is empty.
#include <cmath>
#include <cstdint>

#include "rotorquant/detail/kernels.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ROTORQUANT_NO_X86_KERNELS)
#define ROTORQUANT_HAVE_AVX512_KERNELS 1
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 avx512fintrin.h _mm512_undefined_* false positive
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
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  // Stages h = 1, 2, 4, 8 inside each 16-float vector: lane i pairs with lane i ^ h; the low lane of a pair
  // takes a + b, the high lane a - b (the same two float operations as the scalar butterfly).
  static std::int64_t hadamard_low_stages(float* x, std::int64_t n) {
    if (n < 16) return 1;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i partner[4];
    __mmask16 high[4];
    for (int s = 0; s < 4; ++s) {
      partner[s] = _mm512_xor_si512(lane, _mm512_set1_epi32(1 << s));
      high[s] = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(1 << s));
    }
    for (std::int64_t i = 0; i < n; i += 16) {
      __m512 v = _mm512_loadu_ps(x + i);
      for (int s = 0; s < 4; ++s) {
        const __m512 t = _mm512_permutexvar_ps(partner[s], v);
        v = _mm512_mask_blend_ps(high[s], _mm512_add_ps(v, t), _mm512_sub_ps(t, v));
      }
      _mm512_storeu_ps(x + i, v);
    }
    return 16;
  }
  static float fma1(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

#include "simd_kernels_impl.hpp"

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
  static const Kernels table = {KernelIsa::kAvx512, gemm,      block_apply,  block_inverse, hadamard_apply,
                                hadamard_inverse, normalize, quantize_vec, lookup_vec, dots, nibble_lut_sum};
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
