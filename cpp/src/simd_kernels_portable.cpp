// Portable build of the CPU kernels (any CPU): scalar code, fused multiply-adds through std::fma
// (one rounding, so the canonical results equal the vector builds'; slow without hardware FMA).
#include <cmath>
#include <cstdint>

#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/detail/rotor_network.hpp"

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
  static T load_partial(const float* p, std::int64_t count) { return count > 0 ? *p : 0.0f; }
  static T set1(float x) { return x; }
  static T add(T a, T b) { return a + b; }
  static float hsum(T v) { return v; }
  static T fmadd(T a, T b, T c) { return std::fma(a, b, c); }
  static T sub(T a, T b) { return a - b; }
  static T mul(T a, T b) { return a * b; }
  struct Butterfly {  // W = 1: no stage inside a vector
    T apply(T v) const { return v; }
  };
  static constexpr int kRegisterVectors = 0;  // the scalar Walsh-Hadamard transform works in memory
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }
};

#include "simd_kernels_impl.hpp"

}  // namespace portable_kernels

const Kernels& portable_kernel_table() {
  using namespace portable_kernels;
  static const Kernels table = {KernelIsa::kPortable, gemm,           block_apply,         block_inverse,
                                hadamard_apply,       hadamard_inverse, rotor_network_apply_rows, normalize,
                                quantize_scalar,      quantize_pack_bytes, lookup_scalar,    dots,
                                nibble_lut_sum};
  return table;
}

}  // namespace detail
}  // namespace rotorquant
