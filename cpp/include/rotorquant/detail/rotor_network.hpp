// The rotor_network rotation (RotationKind::kRotorNetwork): a randomized mixed-radix
// transform built from balanced ("flat") block rotors. docs/rotor_network.md has the
// construction, the proofs of the balance bounds and the exact arithmetic.
//
//   padded_dim p = the smallest integer >= dim of the form 2^a * 3^i * 5^j * 7^k
//   index      i = t + 2^a * (d_1 + r_1 * (d_2 + r_2 * (...)))     t < 2^a, d_q < r_q
//   M          = B_{r_Q} (x) ... (x) B_{r_1} (x) (H_{2^a} / sqrt(2^a))  *  diag(s)
//
// with s the p random signs, H the Sylvester Hadamard matrix (a butterfly of 2-D rotors at
// pi/4 with a reflection), r_1 <= ... <= r_Q the odd prime factors of p / 2^a (each 3, 5 or
// 7) and B_r a fixed r x r orthogonal block whose entries all have magnitude close to
// 1/sqrt(r) (B_3 is the Cl(3,0) rotor (e12 - e13 + e23)/sqrt(3), a rotation by pi about
// (1,1,1)/sqrt(3)). For a power of two p = 2^a the map is exactly the randomized Hadamard
// transform H diag(s) / sqrt(p).
//
// parameters(): the p signs (+1/-1), then one r x r row-major block for every distinct odd
// radix of p in ascending order (3, 5, 7) — exactly the floats every backend uses.
//
// Internal header: the core (rotation.cpp, rotor_network.cpp) and the CUDA launcher use it.
#pragma once

#include <cstdint>
#include <vector>

namespace rotorquant {
namespace detail {

// Largest supported dim (as for hadamard); keeps p < 2^25.
constexpr std::int64_t kRotorNetworkMaxDim = std::int64_t{1} << 24;
// p < 2^25 has at most 15 odd prime factors (3^16 > 2^25).
constexpr int kRotorNetworkMaxOddStages = 16;

// The fixed balanced blocks, row-major, y = B v. Exact float values (part of the format:
// changing one changes every rotor_network rotation).
//   B_3 = (2/3) J - I: |entries|^2 in {1/9, 4/9}, 3 |entries|^2 in [1/3, 4/3] (optimal for r = 3).
//   B_5, B_7: numerically optimized for the flattest magnitudes (docs/rotor_network.md).
extern const float kRotorNetworkBlock3[9];
extern const float kRotorNetworkBlock5[25];
extern const float kRotorNetworkBlock7[49];

// Smallest 7-smooth integer >= dim (dim >= 1).
std::int64_t rotor_network_padded_dim(std::int64_t dim);

// The stage structure of a padded size p (p must be 7-smooth).
struct RotorNetworkPlan {
  std::int64_t padded_dim = 0;
  std::int64_t butterfly_size = 1;  // 2^a: p is cut into p / 2^a contiguous butterfly segments
  float scale = 1.0f;               // (float)(1 / sqrt((double)2^a))
  int num_odd_stages = 0;           // Q
  int radix[kRotorNetworkMaxOddStages] = {};              // r_1 <= ... <= r_Q, each 3, 5 or 7
  std::int64_t stride[kRotorNetworkMaxOddStages] = {};    // 2^a * r_1 * ... * r_{q-1}
  std::int64_t block_offset[kRotorNetworkMaxOddStages] = {};  // float offset of B_{r_q} in parameters()
  std::int64_t num_parameters = 0;  // p + sum over distinct radices of r^2
};
RotorNetworkPlan rotor_network_plan(std::int64_t padded_dim);

// parameters() of a rotor_network rotation of padded size p built from seed.
std::vector<float> rotor_network_parameters(std::int64_t padded_dim, std::uint64_t seed);

// The forward map rows x (out (p floats) = M pad(in)) with the canonical arithmetic
// (docs/rotor_network.md section 5) is a CPU kernel: detail::kernels().rotor_network_apply (kernels.hpp).
// rows x (out (dim floats) = (M^T in)[:dim]): in (rows, p), out (rows, dim), serial.
void rotor_network_inverse(const RotorNetworkPlan& plan, const float* parameters, std::int64_t dim,
                           const float* in, float* out, std::int64_t rows);
// The p x p matrix M, row-major, in double (the same stages applied to basis vectors).
void rotor_network_matrix(const RotorNetworkPlan& plan, const float* parameters, double* m);
// Rough multiply-adds per row (parallel_for threshold).
std::int64_t rotor_network_row_cost(const RotorNetworkPlan& plan);

}  // namespace detail
}  // namespace rotorquant
