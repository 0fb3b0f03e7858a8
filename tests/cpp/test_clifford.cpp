// Tests of the Cl(3,0) algebra: basis relations, associativity, rotors, the general
// sandwich, the sparse vector fast path and the batched entry points.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "rotorquant/clifford.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/random.hpp"
#include "test_harness.hpp"

using namespace rotorquant;
using namespace rotorquant::clifford;

namespace {

template <class T>
Multivector<T> basis_blade(int index) {
  Multivector<T> m = zero_multivector<T>();
  m.c[index] = T(1);
  return m;
}

// Deterministic Gaussian multivector number `which` of a test stream.
Multivector<double> random_multivector(std::uint32_t sub_id, std::uint64_t which) {
  const RandomStream stream = make_stream(1234, RandomPurpose::kTest, sub_id);
  Multivector<double> m;
  for (int k = 0; k < 8; ++k) m.c[k] = stream.gaussian_at(8 * which + k);
  return m;
}

// Deterministic rotor from a random unit bivector and an angle in (-pi, pi).
Rotor<double> random_rotor(std::uint32_t sub_id, std::uint64_t which) {
  const RandomStream stream = make_stream(99, RandomPurpose::kTest, sub_id);
  double b[3];
  for (int k = 0; k < 3; ++k) b[k] = stream.gaussian_at(4 * which + k);
  const double length = std::sqrt(b[0] * b[0] + b[1] * b[1] + b[2] * b[2]);
  const double angle = (2.0 * stream.uniform_at(4 * which + 3) - 1.0) * 3.141592653589793;
  return rotor_from_bivector_angle(b[0] / length, b[1] / length, b[2] / length, angle);
}

template <class T>
T max_abs_difference(const Multivector<T>& a, const Multivector<T>& b) {
  T worst = T(0);
  for (int k = 0; k < 8; ++k) worst = std::fmax(worst, std::fabs(a.c[k] - b.c[k]));
  return worst;
}

Rotor<float> to_float(const Rotor<double>& r) {
  return Rotor<float>{static_cast<float>(r.s), static_cast<float>(r.b12), static_cast<float>(r.b13),
                      static_cast<float>(r.b23)};
}

}  // namespace

TEST(blade_masks_are_a_bijection) {
  for (int i = 0; i < 8; ++i) {
    CHECK(blade_index(blade_mask(i)) == i);
  }
  static_assert(blade_product_sign(2, 1) == -1, "e2 e1 = -e12");
  static_assert(blade_product_sign(1, 2) == 1, "e1 e2 = e12");
  static_assert(blade_product_sign(7, 7) == -1, "e123^2 = -1");
}

TEST(basis_vectors_square_to_one) {
  for (int i = kE1; i <= kE3; ++i) {
    const Multivector<double> sq = geometric_product(basis_blade<double>(i), basis_blade<double>(i));
    CHECK(max_abs_difference(sq, basis_blade<double>(kScalar)) == 0.0);
  }
}

TEST(basis_vectors_anticommute) {
  for (int i = kE1; i <= kE3; ++i) {
    for (int j = kE1; j <= kE3; ++j) {
      if (i == j) continue;
      const Multivector<double> ij = geometric_product(basis_blade<double>(i), basis_blade<double>(j));
      const Multivector<double> ji = geometric_product(basis_blade<double>(j), basis_blade<double>(i));
      CHECK(max_abs_difference(ij, scale(ji, -1.0)) == 0.0);
      CHECK(norm(ij) == 1.0);
      CHECK(grade_projection(ij, 2).c[kE12] + grade_projection(ij, 2).c[kE13] + grade_projection(ij, 2).c[kE23] != 0.0);
    }
  }
  // e1 e2 = e12, e1 e3 = e13, e2 e3 = e23 (ascending order is the stored orientation).
  CHECK(max_abs_difference(geometric_product(basis_blade<double>(kE1), basis_blade<double>(kE2)),
                           basis_blade<double>(kE12)) == 0.0);
  CHECK(max_abs_difference(geometric_product(basis_blade<double>(kE1), basis_blade<double>(kE3)),
                           basis_blade<double>(kE13)) == 0.0);
  CHECK(max_abs_difference(geometric_product(basis_blade<double>(kE2), basis_blade<double>(kE3)),
                           basis_blade<double>(kE23)) == 0.0);
}

TEST(pseudoscalar_and_bivector_squares) {
  const Multivector<double> e123 =
      geometric_product(geometric_product(basis_blade<double>(kE1), basis_blade<double>(kE2)), basis_blade<double>(kE3));
  CHECK(max_abs_difference(e123, basis_blade<double>(kE123)) == 0.0);
  const Multivector<double> minus_one = scale(basis_blade<double>(kScalar), -1.0);
  for (int i = kE12; i <= kE123; ++i) {
    CHECK(max_abs_difference(geometric_product(basis_blade<double>(i), basis_blade<double>(i)), minus_one) == 0.0);
  }
  // e12 e23 = e1 e2 e2 e3 = e13.
  CHECK(max_abs_difference(geometric_product(basis_blade<double>(kE12), basis_blade<double>(kE23)),
                           basis_blade<double>(kE13)) == 0.0);
}

TEST(geometric_product_is_associative) {
  for (std::uint64_t t = 0; t < 200; ++t) {
    const auto a = random_multivector(1, 3 * t), b = random_multivector(1, 3 * t + 1), c = random_multivector(1, 3 * t + 2);
    const auto left = geometric_product(geometric_product(a, b), c);
    const auto right = geometric_product(a, geometric_product(b, c));
    CHECK(max_abs_difference(left, right) <= 1e-12 * (1.0 + norm(left)));
  }
}

TEST(geometric_product_is_bilinear_and_not_commutative) {
  const auto a = random_multivector(2, 0), b = random_multivector(2, 1), c = random_multivector(2, 2);
  const auto lhs = geometric_product(a, add(b, scale(c, 2.5)));
  const auto rhs = add(geometric_product(a, b), scale(geometric_product(a, c), 2.5));
  CHECK(max_abs_difference(lhs, rhs) <= 1e-12);
  CHECK(max_abs_difference(geometric_product(a, b), geometric_product(b, a)) > 1e-3);
}

TEST(reverse_is_an_anti_automorphism) {
  for (std::uint64_t t = 0; t < 50; ++t) {
    const auto a = random_multivector(3, 2 * t), b = random_multivector(3, 2 * t + 1);
    const auto lhs = reverse(geometric_product(a, b));
    const auto rhs = geometric_product(reverse(b), reverse(a));
    CHECK(max_abs_difference(lhs, rhs) <= 1e-12);
    // <a a~>_0 = sum of squares in Cl(3,0).
    CHECK_NEAR(geometric_product(a, reverse(a)).c[kScalar], norm(a) * norm(a), 1e-12);
  }
}

TEST(grade_projections_partition_the_multivector) {
  const auto a = random_multivector(4, 0);
  Multivector<double> sum = zero_multivector<double>();
  for (int k = 0; k <= 3; ++k) {
    const auto part = grade_projection(a, k);
    for (int i = 0; i < 8; ++i) CHECK(part.c[i] == (blade_grade(i) == k ? a.c[i] : 0.0));
    sum = add(sum, part);
  }
  CHECK(max_abs_difference(sum, a) == 0.0);
  const auto inv = grade_involution(a);
  CHECK(inv.c[kE1] == -a.c[kE1] && inv.c[kE123] == -a.c[kE123] && inv.c[kE12] == a.c[kE12]);
}

TEST(rotor_times_reverse_is_one) {
  for (std::uint64_t t = 0; t < 200; ++t) {
    const Rotor<double> r = random_rotor(5, t);
    const auto product = geometric_product(to_multivector(r), to_multivector(reverse(r)));
    CHECK(max_abs_difference(product, basis_blade<double>(kScalar)) <= 1e-14);
    CHECK_NEAR(rotor_norm(r), 1.0, 1e-14);
  }
}

TEST(rotor_product_matches_geometric_product) {
  for (std::uint64_t t = 0; t < 50; ++t) {
    const Rotor<double> a{0.3, -1.2, 0.7, 2.0}, b = random_rotor(6, t);
    const auto expected = geometric_product(to_multivector(a), to_multivector(b));
    const auto got = to_multivector(rotor_product(a, b));
    CHECK(max_abs_difference(expected, got) <= 1e-14);
  }
}

TEST(sandwich_of_vector_is_vector_with_same_norm) {
  for (std::uint64_t t = 0; t < 200; ++t) {
    const Rotor<double> r = random_rotor(7, t);
    const auto m = random_multivector(7, t);
    const auto v = vector_multivector(m.c[0], m.c[1], m.c[2]);
    const auto y = sandwich(to_multivector(r), v);
    for (int i = 0; i < 8; ++i) {
      if (blade_grade(i) != 1) CHECK(std::fabs(y.c[i]) <= 1e-14 * (1.0 + norm(v)));
    }
    CHECK_NEAR(norm(y), norm(v), 1e-12 * (1.0 + norm(v)));
  }
}

TEST(sandwich_composition_equals_rotor_product) {
  for (std::uint64_t t = 0; t < 100; ++t) {
    const Rotor<double> r1 = random_rotor(8, 2 * t), r2 = random_rotor(8, 2 * t + 1);
    const auto x = random_multivector(8, t);  // the identity holds for any multivector x
    const auto twice = sandwich(to_multivector(r2), sandwich(to_multivector(r1), x));
    const auto once = sandwich(to_multivector(rotor_product(r2, r1)), x);
    CHECK(max_abs_difference(twice, once) <= 1e-12 * (1.0 + norm(x)));
  }
}

TEST(fast_path_matches_general_sandwich_double) {
  for (std::uint64_t t = 0; t < 200; ++t) {
    // Unit rotors and one non-unit even element: the fast path is exact for both.
    const Rotor<double> unit = random_rotor(9, t);
    const Rotor<double> general{0.5, -0.25, 1.5, 0.75};
    const auto m = random_multivector(9, t);
    const double v[3] = {m.c[0], m.c[1], m.c[2]};
    for (const Rotor<double>& r : {unit, general}) {
      const auto y = sandwich(to_multivector(r), vector_multivector(v[0], v[1], v[2]));
      double fast[3];
      rotate_vector(r, v, fast);
      for (int k = 0; k < 3; ++k) CHECK_NEAR(fast[k], y.c[kE1 + k], 1e-12 * (1.0 + norm(y)));
      const auto y_inverse = sandwich(to_multivector(reverse(r)), vector_multivector(v[0], v[1], v[2]));
      double fast_inverse[3];
      rotate_vector_inverse(r, v, fast_inverse);
      for (int k = 0; k < 3; ++k) CHECK_NEAR(fast_inverse[k], y_inverse.c[kE1 + k], 1e-12 * (1.0 + norm(y)));
    }
    // Inverse undoes the rotation, in place (out aliases v).
    double round_trip[3] = {v[0], v[1], v[2]};
    rotate_vector(unit, round_trip, round_trip);
    rotate_vector_inverse(unit, round_trip, round_trip);
    for (int k = 0; k < 3; ++k) CHECK_NEAR(round_trip[k], v[k], 1e-12);
  }
}

TEST(fast_path_matches_general_sandwich_float) {
  for (std::uint64_t t = 0; t < 200; ++t) {
    const Rotor<float> r = to_float(random_rotor(10, t));
    const auto m = random_multivector(10, t);
    const float v[3] = {static_cast<float>(m.c[0]), static_cast<float>(m.c[1]), static_cast<float>(m.c[2])};
    const auto y = sandwich(to_multivector(r), vector_multivector(v[0], v[1], v[2]));
    float fast[3];
    rotate_vector(r, v, fast);
    const double scale_of_v = std::sqrt(double(v[0]) * v[0] + double(v[1]) * v[1] + double(v[2]) * v[2]);
    for (int k = 0; k < 3; ++k) CHECK_NEAR(fast[k], y.c[kE1 + k], 1e-6 * (1.0 + scale_of_v));
  }
}

TEST(rotor_matrix_is_a_proper_rotation) {
  for (std::uint64_t t = 0; t < 200; ++t) {
    double m[9];
    rotor_to_matrix(random_rotor(11, t), m);
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        double dot = 0.0;
        for (int k = 0; k < 3; ++k) dot += m[3 * i + k] * m[3 * j + k];
        CHECK_NEAR(dot, i == j ? 1.0 : 0.0, 1e-13);
      }
    }
    const double det = m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) +
                       m[2] * (m[3] * m[7] - m[4] * m[6]);
    CHECK_NEAR(det, 1.0, 1e-13);
  }
}

TEST(e12_rotor_turns_e1_toward_e2) {
  const double angle = 0.7;
  const Rotor<double> r = rotor_from_bivector_angle(1.0, 0.0, 0.0, angle);
  CHECK_NEAR(r.s, std::cos(angle / 2), 1e-15);
  CHECK_NEAR(r.b12, -std::sin(angle / 2), 1e-15);
  const double e1[3] = {1.0, 0.0, 0.0};
  double out[3];
  rotate_vector(r, e1, out);
  CHECK_NEAR(out[0], std::cos(angle), 1e-15);
  CHECK_NEAR(out[1], std::sin(angle), 1e-15);
  CHECK_NEAR(out[2], 0.0, 1e-15);
  // e3 is orthogonal to the plane e12: fixed.
  const double e3[3] = {0.0, 0.0, 1.0};
  rotate_vector(r, e3, out);
  CHECK_NEAR(out[2], 1.0, 1e-15);
  // Same answer from the general sandwich.
  const auto y = sandwich(to_multivector(r), basis_blade<double>(kE1));
  CHECK_NEAR(y.c[kE1], std::cos(angle), 1e-15);
  CHECK_NEAR(y.c[kE2], std::sin(angle), 1e-15);
  // A quarter turn in e23 takes e2 to e3.
  double turned[3];
  const double e2[3] = {0.0, 1.0, 0.0};
  rotate_vector(rotor_from_bivector_angle(0.0, 0.0, 1.0, 1.5707963267948966), e2, turned);
  CHECK_NEAR(turned[2], 1.0, 1e-15);
  CHECK_NEAR(turned[1], 0.0, 1e-15);
}

TEST(bad_bivector_is_a_value_error) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  CHECK_THROWS(rotor_from_bivector_angle(1.0, 1.0, 0.0, 0.3), ValueError);
  CHECK_THROWS(rotor_from_bivector_angle(0.0, 0.0, 0.0, 0.3), ValueError);
  CHECK_THROWS(rotor_from_bivector_angle(1.0 + 1e-5, 0.0, 0.0, 0.3), ValueError);
  CHECK_THROWS(rotor_from_bivector_angle(nan, 0.0, 0.0, 0.3), ValueError);
  CHECK_THROWS(rotor_from_bivector_angle(inf, 0.0, 0.0, 0.3), ValueError);
  CHECK_THROWS(rotor_from_bivector_angle(1.0, 0.0, 0.0, nan), ValueError);
  CHECK_THROWS(rotor_from_bivector_angle(1.0f, 0.0f, 0.0f, std::numeric_limits<float>::infinity()), ValueError);
  // Within tolerance is accepted.
  const Rotor<double> r = rotor_from_bivector_angle(1.0 + 1e-7, 0.0, 0.0, 0.3);
  CHECK_NEAR(r.s, std::cos(0.15), 1e-15);
  CHECK_THROWS(normalize(Rotor<double>{0.0, 0.0, 0.0, 0.0}), ValueError);
  const Rotor<double> n = normalize(Rotor<double>{3.0, 0.0, 4.0, 0.0});
  CHECK_NEAR(n.s, 0.6, 1e-15);
  CHECK_NEAR(n.b13, 0.8, 1e-15);
}

TEST(batched_functions_match_single_calls) {
  const std::int64_t n = 5000;  // large enough for parallel_for to split
  std::vector<double> a(8 * n), b(8 * n), out(8 * n), bivectors(3 * n), angles(n), rotors(8 * n), norms(n);
  for (std::int64_t i = 0; i < n; ++i) {
    const auto ma = random_multivector(12, 2 * i), mb = random_multivector(12, 2 * i + 1);
    for (int k = 0; k < 8; ++k) {
      a[8 * i + k] = ma.c[k];
      b[8 * i + k] = mb.c[k];
    }
    const double length = std::sqrt(mb.c[0] * mb.c[0] + mb.c[1] * mb.c[1] + mb.c[2] * mb.c[2]);
    for (int k = 0; k < 3; ++k) bivectors[3 * i + k] = mb.c[k] / length;
    angles[i] = ma.c[0];
  }
  auto row = [](const std::vector<double>& data, std::int64_t i) {
    Multivector<double> m;
    for (int k = 0; k < 8; ++k) m.c[k] = data[8 * i + k];
    return m;
  };

  geometric_product_batch(a.data(), b.data(), out.data(), n);
  for (std::int64_t i = 0; i < n; i += 97) CHECK(max_abs_difference(row(out, i), geometric_product(row(a, i), row(b, i))) == 0.0);

  reverse_batch(a.data(), out.data(), n);
  for (std::int64_t i = 0; i < n; i += 97) CHECK(max_abs_difference(row(out, i), reverse(row(a, i))) == 0.0);

  for (int g = 0; g <= 3; ++g) {
    grade_projection_batch(a.data(), out.data(), n, g);
    for (std::int64_t i = 0; i < n; i += 97) CHECK(max_abs_difference(row(out, i), grade_projection(row(a, i), g)) == 0.0);
  }
  CHECK_THROWS(grade_projection_batch(a.data(), out.data(), n, 4), ValueError);
  CHECK_THROWS(grade_projection_batch(a.data(), out.data(), n, -1), ValueError);

  norm_batch(a.data(), norms.data(), n);
  for (std::int64_t i = 0; i < n; i += 97) CHECK(norms[i] == norm(row(a, i)));

  rotor_from_bivector_angle_batch(bivectors.data(), angles.data(), rotors.data(), n);
  for (std::int64_t i = 0; i < n; i += 97) {
    const auto expected = to_multivector(
        rotor_from_bivector_angle(bivectors[3 * i], bivectors[3 * i + 1], bivectors[3 * i + 2], angles[i]));
    CHECK(max_abs_difference(row(rotors, i), expected) == 0.0);
  }

  sandwich_batch(rotors.data(), a.data(), out.data(), n);
  for (std::int64_t i = 0; i < n; i += 97) CHECK(max_abs_difference(row(out, i), sandwich(row(rotors, i), row(a, i))) == 0.0);

  // A bad row is reported with its index.
  bivectors[3 * 4321] = 5.0;
  bool thrown = false;
  try {
    rotor_from_bivector_angle_batch(bivectors.data(), angles.data(), rotors.data(), n);
  } catch (const ValueError& e) {
    thrown = std::string(e.what()).find("row 4321") != std::string::npos;
  }
  CHECK(thrown);

  // Empty batches are fine (null pointers allowed), negative counts are not.
  geometric_product_batch(nullptr, nullptr, nullptr, 0);
  rotor_from_bivector_angle_batch(nullptr, nullptr, nullptr, 0);
  CHECK_THROWS(norm_batch(a.data(), norms.data(), -1), ValueError);
}
