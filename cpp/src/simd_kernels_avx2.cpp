// AVX2 + FMA build of the CPU kernels (8 float lanes). Compiled for baseline x86-64 like the rest of the
// library: only the functions below carry the avx2/fma target, and simd_dispatch.cpp calls them only on a
// CPU that has both. On other architectures this file is empty.
#include <cmath>
#include <cstdint>

#include "rotorquant/detail/kernels.hpp"

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
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static float hsum(T v) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  // Stages h = 1, 2, 4 inside each 8-float vector: lane i pairs with lane i ^ h; the low lane of a pair takes
  // a + b, the high lane a - b (the same two float operations as the scalar butterfly).
  static std::int64_t hadamard_low_stages(float* x, std::int64_t n) {
    if (n < 8) return 1;
    const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    __m256i partner[3];
    __m256 high[3];
    for (int s = 0; s < 3; ++s) {
      const __m256i bit = _mm256_set1_epi32(1 << s);
      partner[s] = _mm256_xor_si256(lane, bit);
      high[s] = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lane, bit), bit));
    }
    for (std::int64_t i = 0; i < n; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      for (int s = 0; s < 3; ++s) {
        const __m256 t = _mm256_permutevar8x32_ps(v, partner[s]);
        v = _mm256_blendv_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), high[s]);
      }
      _mm256_storeu_ps(x + i, v);
    }
    return 8;
  }
  static float fma1(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

#include "simd_kernels_impl.hpp"

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
  static const Kernels table = {KernelIsa::kAvx2, gemm,      block_apply,  block_inverse, hadamard_apply,
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
const Kernels* avx2_kernel_table() { return nullptr; }
}  // namespace detail
}  // namespace rotorquant

#endif
