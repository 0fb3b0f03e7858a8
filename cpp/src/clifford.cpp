// Batched double-precision Cl(3,0) operations on contiguous arrays of multivectors
// (the entry points behind rotorquant.clifford in Python).
#include "rotorquant/clifford.hpp"

#include <cmath>
#include <cstring>
#include <string>

#include "rotorquant/error.hpp"
#include "rotorquant/parallel.hpp"

namespace rotorquant {
namespace clifford {

namespace {

void check_count(const char* function, std::int64_t n) {
  if (n < 0) {
    throw ValueError(detail::expected_got(std::string("clifford::") + function + ": n", ">= 0", std::to_string(n)));
  }
}

Multivector<double> load(const double* p) {
  Multivector<double> m;
  std::memcpy(m.c, p, sizeof m.c);
  return m;
}

void store(const Multivector<double>& m, double* p) { std::memcpy(p, m.c, sizeof m.c); }

// Approximate flops per row, for parallel_for's inline-or-split decision.
constexpr std::int64_t kProductCost = 128;
constexpr std::int64_t kElementwiseCost = 8;

}  // namespace

void geometric_product_batch(const double* a, const double* b, double* out, std::int64_t n) {
  check_count("geometric_product_batch", n);
  parallel_for(n, kProductCost, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) store(geometric_product(load(a + 8 * i), load(b + 8 * i)), out + 8 * i);
  });
}

void reverse_batch(const double* a, double* out, std::int64_t n) {
  check_count("reverse_batch", n);
  parallel_for(n, kElementwiseCost, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) store(reverse(load(a + 8 * i)), out + 8 * i);
  });
}

void grade_projection_batch(const double* a, double* out, std::int64_t n, int grade) {
  check_count("grade_projection_batch", n);
  if (grade < 0 || grade > 3) {
    throw ValueError(detail::expected_got("clifford::grade_projection: grade", "0, 1, 2 or 3", std::to_string(grade)));
  }
  parallel_for(n, kElementwiseCost, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) store(grade_projection(load(a + 8 * i), grade), out + 8 * i);
  });
}

void norm_batch(const double* a, double* out, std::int64_t n) {
  check_count("norm_batch", n);
  parallel_for(n, kElementwiseCost, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) out[i] = norm(load(a + 8 * i));
  });
}

void sandwich_batch(const double* rotors, const double* x, double* out, std::int64_t n) {
  check_count("sandwich_batch", n);
  parallel_for(n, 2 * kProductCost, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) store(sandwich(load(rotors + 8 * i), load(x + 8 * i)), out + 8 * i);
  });
}

void rotor_from_bivector_angle_batch(const double* bivectors, const double* angles, double* out, std::int64_t n) {
  check_count("rotor_from_bivector_angle_batch", n);
  parallel_for(n, 64, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      const double* b = bivectors + 3 * i;
      Rotor<double> r;
      try {
        r = rotor_from_bivector_angle(b[0], b[1], b[2], angles[i]);
      } catch (const ValueError& e) {
        throw ValueError(std::string(e.what()) + " (row " + std::to_string(i) + ")");
      }
      store(to_multivector(r), out + 8 * i);
    }
  });
}

}  // namespace clifford
}  // namespace rotorquant
