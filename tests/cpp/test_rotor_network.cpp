// Tests of the rotor_network rotation (detail/rotor_network.hpp, docs/rotor_network.md):
// padding rule, parameter layout, reduction to the randomized Hadamard transform for powers
// of two, the Kronecker structure against an independent construction, the blocks
// (orthogonal, det +1, B_3 is the Cl(3,0) rotor), the mixing-balance bound for every
// head_dim of the issue, and the canonical forward arithmetic against an independent
// scalar implementation of the specification (bit-exact).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "rotorquant/clifford.hpp"
#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/detail/rotor_network.hpp"
#include "rotorquant/random.hpp"
#include "rotorquant/rotation.hpp"
#include "test_harness.hpp"

using rotorquant::RandomPurpose;
using rotorquant::Rotation;
using rotorquant::RotationKind;

namespace {

const std::vector<std::int64_t> kIssueDims = {64, 80, 96, 112, 128, 160, 192, 256, 576};

int popcount(std::uint64_t v) {
  int c = 0;
  for (; v; v &= v - 1) ++c;
  return c;
}

const float* block_of(int r) {
  switch (r) {
    case 3: return rotorquant::detail::kRotorNetworkBlock3;
    case 5: return rotorquant::detail::kRotorNetworkBlock5;
    default: return rotorquant::detail::kRotorNetworkBlock7;
  }
}

// Kronecker product A (x) B of row-major square matrices.
std::vector<double> kron(const std::vector<double>& a, std::int64_t na, const std::vector<double>& b,
                         std::int64_t nb) {
  const std::int64_t n = na * nb;
  std::vector<double> out(static_cast<std::size_t>(n * n));
  for (std::int64_t i = 0; i < na; ++i)
    for (std::int64_t j = 0; j < na; ++j)
      for (std::int64_t k = 0; k < nb; ++k)
        for (std::int64_t l = 0; l < nb; ++l) out[(i * nb + k) * n + (j * nb + l)] = a[i * na + j] * b[k * nb + l];
  return out;
}

// Odd prime factors of p in ascending order (p / 2^a).
std::vector<int> odd_factors(std::int64_t p) {
  while (p % 2 == 0) p /= 2;
  std::vector<int> out;
  for (int r : {3, 5, 7}) {
    while (p % r == 0) {
      out.push_back(r);
      p /= r;
    }
  }
  return out;
}

std::int64_t power_of_two_part(std::int64_t p) {
  std::int64_t n = 1;
  while (p % 2 == 0) {
    p /= 2;
    n *= 2;
  }
  return n;
}

// r * min B^2 and r * max B^2 of a block.
void block_weight_range(int r, double& low, double& high) {
  const float* b = block_of(r);
  low = 1e9;
  high = 0.0;
  for (int i = 0; i < r * r; ++i) {
    const double w = r * static_cast<double>(b[i]) * b[i];
    low = std::min(low, w);
    high = std::max(high, w);
  }
}

// Independent scalar implementation of the canonical forward arithmetic (docs/rotor_network.md):
// signs, butterflies h = 1, 2, ..., 2^(a-1) on each segment, odd stages q = 1..Q (fma chains from +0),
// one float multiply by (float)(1/sqrt(2^a)).
std::vector<float> spec_forward(const std::vector<float>& params, std::int64_t dim, std::int64_t p,
                                const float* x) {
  std::vector<float> v(static_cast<std::size_t>(p), 0.0f);
  for (std::int64_t j = 0; j < dim; ++j) v[j] = x[j] * params[j];
  const std::int64_t n2 = power_of_two_part(p);
  for (std::int64_t h = 1; h < n2; h *= 2) {
    for (std::int64_t i = 0; i < p; ++i) {
      if ((i % n2) & h) continue;  // i is the low element of its pair
      const float a = v[i], b = v[i + h];
      v[i] = a + b;
      v[i + h] = a - b;
    }
  }
  std::int64_t stride = n2;
  std::int64_t offset = p;
  int previous = 0;
  for (int r : odd_factors(p)) {
    if (r != previous && previous != 0) offset += previous * previous;
    previous = r;
    const float* b = params.data() + offset;
    std::vector<float> w(v);
    for (std::int64_t i = 0; i < p; ++i) {
      const std::int64_t digit = (i / stride) % r;
      const std::int64_t base = i - digit * stride;
      float acc = 0.0f;
      for (int l = 0; l < r; ++l) acc = std::fma(b[digit * r + l], w[base + l * stride], acc);
      v[i] = acc;
    }
    stride *= r;
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n2)));
  if (n2 > 1) {
    for (auto& value : v) value *= scale;
  }
  return v;
}

}  // namespace

TEST(padded_dim_rule) {
  const std::int64_t cases[][2] = {{1, 1},     {2, 2},     {3, 3},     {11, 12},   {13, 14},   {17, 18},
                                   {64, 64},   {80, 80},   {96, 96},   {97, 98},   {112, 112}, {127, 128},
                                   {130, 135}, {160, 160}, {192, 192}, {576, 576}, {1000, 1000}};
  for (const auto& c : cases) {
    CHECK(rotorquant::rotation_padded_dim(RotationKind::kRotorNetwork, c[0]) == c[1]);
    CHECK(Rotation(RotationKind::kRotorNetwork, c[0], 0).padded_dim() == c[1]);
  }
}

TEST(parameter_layout_and_budget) {
  for (std::int64_t dim : kIssueDims) {
    const Rotation rotation(RotationKind::kRotorNetwork, dim, 17);
    const std::int64_t p = rotation.padded_dim();
    CHECK(p == dim);  // every head_dim of the issue is 7-smooth: no padding
    const auto& params = rotation.parameters();
    const auto stream = rotorquant::make_stream(17, RandomPurpose::kRotorNetworkSigns);
    for (std::int64_t i = 0; i < p; ++i) CHECK(params[i] == stream.sign_at(i));
    std::int64_t offset = p;
    for (int r : {3, 5, 7}) {
      if (p % r != 0) continue;
      for (int i = 0; i < r * r; ++i) CHECK(params[offset + i] == block_of(r)[i]);
      offset += r * r;
    }
    CHECK(rotation.num_parameters() == offset);
    CHECK(rotation.num_parameters() <= 4 * dim);  // the issue's budget
  }
}

TEST(blocks_are_rotations_and_b3_is_the_cl3_rotor) {
  for (int r : {3, 5, 7}) {
    const float* b = block_of(r);
    double worst = 0.0;
    for (int i = 0; i < r; ++i) {
      for (int j = 0; j < r; ++j) {
        double dot = 0.0;
        for (int k = 0; k < r; ++k) dot += static_cast<double>(b[i * r + k]) * b[j * r + k];
        worst = std::max(worst, std::fabs(dot - (i == j ? 1.0 : 0.0)));
      }
    }
    CHECK_NEAR(worst, 0.0, 2e-7);  // float rounding of an exactly orthogonal matrix
    // det +1 (a rotation, reachable by rotors): Gaussian elimination in double.
    std::vector<double> a(b, b + r * r);
    double det = 1.0;
    for (int k = 0; k < r; ++k) {
      int pivot = k;
      for (int i = k + 1; i < r; ++i)
        if (std::fabs(a[i * r + k]) > std::fabs(a[pivot * r + k])) pivot = i;
      if (pivot != k) {
        for (int j = 0; j < r; ++j) std::swap(a[k * r + j], a[pivot * r + j]);
        det = -det;
      }
      det *= a[k * r + k];
      for (int i = k + 1; i < r; ++i) {
        const double f = a[i * r + k] / a[k * r + k];
        for (int j = k; j < r; ++j) a[i * r + j] -= f * a[k * r + j];
      }
    }
    CHECK_NEAR(det, 1.0, 1e-6);
  }
  // B_3 = R v R~ with R = (e12 - e13 + e23) / sqrt(3): the rotation by pi about (1, 1, 1) / sqrt(3).
  const double c = 1.0 / std::sqrt(3.0);
  const rotorquant::clifford::Rotor<double> rotor{0.0, c, -c, c};
  double m[9];
  rotorquant::clifford::rotor_to_matrix(rotor, m);
  for (int i = 0; i < 9; ++i) {
    CHECK_NEAR(m[i], rotorquant::detail::kRotorNetworkBlock3[i], 3e-8);
    CHECK_NEAR(m[i], (i % 4 == 0) ? -1.0 / 3.0 : 2.0 / 3.0, 1e-15);
  }
  // The documented balance of each block.
  double low, high;
  block_weight_range(3, low, high);
  CHECK_NEAR(low, 1.0 / 3.0, 1e-6);
  CHECK_NEAR(high, 4.0 / 3.0, 1e-6);
  block_weight_range(5, low, high);
  CHECK_NEAR(low, 0.5709, 1e-4);
  CHECK_NEAR(high, 1.7562, 1e-4);
  block_weight_range(7, low, high);
  CHECK_NEAR(low, 0.4504, 1e-4);
  CHECK_NEAR(high, 2.2324, 1e-4);
}

// For p = 2^a the map is exactly the randomized Hadamard transform: M = H diag(s) / sqrt(p).
TEST(power_of_two_is_the_randomized_hadamard_transform) {
  for (std::int64_t dim : {1, 2, 4, 8, 64, 128, 256}) {
    const Rotation rotation(RotationKind::kRotorNetwork, dim, 5);
    const std::int64_t p = rotation.padded_dim();
    CHECK(p == dim);
    CHECK(rotation.num_parameters() == p);
    const std::vector<double> m = rotation.matrix();
    const auto& s = rotation.parameters();
    double worst = 0.0;
    for (std::int64_t i = 0; i < p; ++i) {
      for (std::int64_t j = 0; j < p; ++j) {
        const double sylvester = (popcount(static_cast<std::uint64_t>(i & j)) % 2) ? -1.0 : 1.0;
        worst = std::max(worst, std::fabs(m[i * p + j] * std::sqrt(static_cast<double>(p)) - sylvester * s[j]));
      }
    }
    CHECK_NEAR(worst, 0.0, 1e-12);
    // and apply() is bit-identical to a hadamard rotation that has the same signs.
    const Rotation hadamard(RotationKind::kHadamard, dim, 5);
    std::vector<float> x(static_cast<std::size_t>(dim)), xs(static_cast<std::size_t>(dim));
    const auto stream = rotorquant::make_stream(3, RandomPurpose::kTest);
    for (std::int64_t j = 0; j < dim; ++j) {
      x[j] = static_cast<float>(stream.gaussian_at(j));
      xs[j] = x[j] * s[j] * hadamard.parameters()[j];  // so that hadamard sees the rotor_network signs
    }
    std::vector<float> y(static_cast<std::size_t>(p)), yh(static_cast<std::size_t>(p));
    rotation.apply(x.data(), y.data(), 1);
    hadamard.apply(xs.data(), yh.data(), 1);
    CHECK(y == yh);
  }
}

// M = (B_{r_Q} (x) ... (x) B_{r_1} (x) H_{2^a} / sqrt(2^a)) diag(s), built independently.
TEST(matrix_is_the_documented_kronecker_product) {
  for (std::int64_t dim : {3, 6, 15, 45, 63, 80, 96, 105, 112}) {
    const Rotation rotation(RotationKind::kRotorNetwork, dim, 23);
    const std::int64_t p = rotation.padded_dim();
    const std::int64_t n2 = power_of_two_part(p);
    std::vector<double> k(static_cast<std::size_t>(n2 * n2));
    for (std::int64_t i = 0; i < n2; ++i)
      for (std::int64_t j = 0; j < n2; ++j)
        k[i * n2 + j] = ((popcount(static_cast<std::uint64_t>(i & j)) % 2) ? -1.0 : 1.0) / std::sqrt(double(n2));
    std::int64_t size = n2;
    for (int r : odd_factors(p)) {
      std::vector<double> b(block_of(r), block_of(r) + r * r);
      k = kron(b, r, k, size);
      size *= r;
    }
    CHECK(size == p);
    const std::vector<double> m = rotation.matrix();
    const auto& s = rotation.parameters();
    double worst = 0.0;
    for (std::int64_t i = 0; i < p; ++i)
      for (std::int64_t j = 0; j < p; ++j) worst = std::max(worst, std::fabs(m[i * p + j] - k[i * p + j] * s[j]));
    CHECK_NEAR(worst, 0.0, 1e-12);
  }
}

// Every output mixes every input with weight p M_ij^2 inside the product of the stage bounds:
// radix 2 contributes exactly 1, radix r the block's [r min B^2, r max B^2].
TEST(mixing_balance_bound_for_every_issue_dim) {
  for (std::int64_t dim : kIssueDims) {
    const Rotation rotation(RotationKind::kRotorNetwork, dim, 1);
    const std::int64_t p = rotation.padded_dim();
    double bound_low = 1.0, bound_high = 1.0;
    for (int r : odd_factors(p)) {
      double low, high;
      block_weight_range(r, low, high);
      bound_low *= low;
      bound_high *= high;
    }
    const std::vector<double> m = rotation.matrix();
    double low = 1e9, high = 0.0;
    for (double v : m) {
      low = std::min(low, p * v * v);
      high = std::max(high, p * v * v);
    }
    std::printf("rotor_network dim %lld: p M_ij^2 in [%.4f, %.4f], bound [%.4f, %.4f]\n", static_cast<long long>(dim),
                low, high, bound_low, bound_high);
    CHECK(low >= bound_low * (1 - 1e-6));
    CHECK(high <= bound_high * (1 + 1e-6));
    CHECK(low > 0.0);  // every output depends on every input
    // The bounds are attained (the stages are exact Kronecker factors).
    CHECK_NEAR(low, bound_low, 1e-6);
    CHECK_NEAR(high, bound_high, 1e-6);
  }
}

// apply() follows the canonical arithmetic bit-exactly (an independent scalar implementation).
TEST(forward_arithmetic_is_canonical) {
  // Every CPU kernel build this machine runs (portable, AVX2, AVX-512), bit for bit (memcmp: signed zeros too).
  // The sizes cover the paths of the kernels: butterfly segments of 1..256 values (in registers or in memory,
  // full or zero padded), odd stages of stride 1..192 (vector bodies and scalar tails), and p with no
  // butterflies (a = 0).
  using rotorquant::detail::KernelIsa;
  const KernelIsa saved = rotorquant::detail::kernel_isa();
  for (KernelIsa isa : {KernelIsa::kPortable, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
    if (!rotorquant::detail::kernel_isa_supported(isa)) continue;
    rotorquant::detail::set_kernel_isa(isa);
    for (std::int64_t dim : {1, 2, 3, 5, 7, 13, 20, 24, 45, 48, 63, 64, 80, 96, 97, 112, 130, 135, 160, 176, 192, 250,
                             256, 384, 576, 1000}) {
      const Rotation rotation(RotationKind::kRotorNetwork, dim, 99);
      const std::int64_t p = rotation.padded_dim(), n = 9;
      std::vector<float> x(static_cast<std::size_t>(n * dim));
      const auto stream = rotorquant::make_stream(dim, RandomPurpose::kTest, 1);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(stream.gaussian_at(i));
      x[0] = 0.0f;  // a zero input (signed zeros through the stages)
      std::vector<float> y(static_cast<std::size_t>(n * p));
      rotation.apply(x.data(), y.data(), n);
      int mismatches = 0;
      for (std::int64_t r = 0; r < n; ++r) {
        const std::vector<float> ref = spec_forward(rotation.parameters(), dim, p, &x[r * dim]);
        for (std::int64_t i = 0; i < p; ++i) mismatches += std::memcmp(&ref[i], &y[r * p + i], 4) != 0 ? 1 : 0;
      }
      if (mismatches) {
        std::fprintf(stderr, "%s dim %lld: %d mismatches\n", rotorquant::detail::kernel_isa_name(isa),
                     static_cast<long long>(dim), mismatches);
      }
      CHECK(mismatches == 0);
    }
  }
  rotorquant::detail::set_kernel_isa(saved);
}

// Pins the generator and the layout across platforms.
TEST(golden_signs_seed0) {
  const Rotation rotation(RotationKind::kRotorNetwork, 96, 0);
  const auto& s = rotation.parameters();
  std::printf("golden rotor_network signs %g %g %g %g %g %g %g %g\n", s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
  const float golden[8] = {-1, -1, -1, 1, -1, 1, -1, -1};
  for (int i = 0; i < 8; ++i) CHECK(s[i] == golden[i]);
  CHECK(s[96] == rotorquant::detail::kRotorNetworkBlock3[0]);
}
