// Portable build of the CPU kernels (any CPU): scalar code, fused multiply-adds through std::fma
// (one rounding, so the canonical results equal the vector builds'; slow without hardware FMA).
#include <cmath>
#include <cstdint>

#include "rotorquant/detail/kernels.hpp"

namespace rotorquant {
namespace detail {
namespace portable_kernels {

struct V {
  static constexpr int W = 1;
  static constexpr int kBigRows = 4;
  static constexpr int kBigVectors = 4;
  static constexpr int kSmallRows = 4;
  using T = float;
  static T zero() { return 0.0f; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T set1(float x) { return x; }
  static T add(T a, T b) { return a + b; }
  static float hsum(T v) { return v; }
  static T fmadd(T a, T b, T c) { return std::fma(a, b, c); }
  static std::int64_t hadamard_low_stages(float*, std::int64_t) { return 1; }
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }
};

#include "simd_kernels_impl.hpp"

}  // namespace portable_kernels

const Kernels& portable_kernel_table() {
  using namespace portable_kernels;
  static const Kernels table = {KernelIsa::kPortable, gemm,          block_apply, block_inverse, hadamard_apply,
                                hadamard_inverse,     normalize,     quantize_scalar, lookup_scalar, dots, nibble_lut_sum};
  return table;
}

}  // namespace detail
}  // namespace rotorquant
