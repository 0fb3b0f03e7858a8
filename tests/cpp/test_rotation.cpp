// Tests of the CPU rotations (rotation.hpp): orthogonality, apply/inverse against
// matrix(), non-triviality, determinism, the construction of each kind against an
// independent formula, threading, validation, and golden parameters.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "rotorquant/clifford.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/parallel.hpp"
#include "rotorquant/random.hpp"
#include "rotorquant/rotation.hpp"
#include "test_harness.hpp"

using rotorquant::RandomPurpose;
using rotorquant::Rotation;
using rotorquant::RotationKind;

namespace {

const std::vector<RotationKind> kAllKinds = {RotationKind::kIdentity, RotationKind::kDense,  RotationKind::kHadamard,
                                             RotationKind::kRotor3,   RotationKind::kPlanar, RotationKind::kQuat,
                                             RotationKind::kRotorNetwork};
const std::vector<std::int64_t> kDims = {1, 2, 3, 5, 7, 8, 63, 64, 96, 128, 130};

// n rows of dim floats, each a random unit vector (Gaussian then normalized).
std::vector<float> random_unit_rows(std::int64_t n, std::int64_t dim, std::uint64_t seed) {
  const auto stream = rotorquant::make_stream(seed, RandomPurpose::kTest, 7);
  std::vector<float> x(static_cast<std::size_t>(n * dim));
  for (std::int64_t r = 0; r < n; ++r) {
    double norm_sq = 0.0;
    std::vector<double> row(static_cast<std::size_t>(dim));
    for (std::int64_t j = 0; j < dim; ++j) {
      row[j] = stream.gaussian_at(static_cast<std::uint64_t>(r * dim + j));
      norm_sq += row[j] * row[j];
    }
    for (std::int64_t j = 0; j < dim; ++j) x[r * dim + j] = static_cast<float>(row[j] / std::sqrt(norm_sq));
  }
  return x;
}

double row_norm(const float* x, std::int64_t len) {
  double s = 0.0;
  for (std::int64_t i = 0; i < len; ++i) s += static_cast<double>(x[i]) * x[i];
  return std::sqrt(s);
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

std::int64_t expected_padded_dim(RotationKind kind, std::int64_t dim) {
  switch (kind) {
    case RotationKind::kHadamard: {
      std::int64_t p = 1;
      while (p < dim) p *= 2;
      return p;
    }
    case RotationKind::kRotor3: return 3 * ceil_div(dim, 3);
    case RotationKind::kPlanar: return 2 * ceil_div(dim, 2);
    case RotationKind::kQuat: return 4 * ceil_div(dim, 4);
    case RotationKind::kRotorNetwork: {  // smallest 2^a 3^i 5^j 7^k >= dim
      for (std::int64_t p = dim;; ++p) {
        std::int64_t rest = p;
        for (std::int64_t f : {2, 3, 5, 7}) {
          while (rest % f == 0) rest /= f;
        }
        if (rest == 1) return p;
      }
    }
    default: return dim;
  }
}

int block_size_of(RotationKind kind) {
  switch (kind) {
    case RotationKind::kRotor3: return 3;
    case RotationKind::kPlanar: return 2;
    case RotationKind::kQuat: return 4;
    default: return 0;
  }
}

// Frobenius norm of (M - I) on the square block [b, b+k) x [b, b+k) of a P x P matrix.
double block_distance_from_identity(const std::vector<double>& m, std::int64_t p, std::int64_t b, std::int64_t k) {
  double s = 0.0;
  for (std::int64_t i = b; i < b + k; ++i) {
    for (std::int64_t j = b; j < b + k; ++j) {
      const double d = m[i * p + j] - (i == j ? 1.0 : 0.0);
      s += d * d;
    }
  }
  return std::sqrt(s);
}

// Determinant of a small square matrix (row-major) by Gaussian elimination with pivoting.
double determinant(std::vector<double> a, int n) {
  double det = 1.0;
  for (int k = 0; k < n; ++k) {
    int pivot = k;
    for (int i = k + 1; i < n; ++i)
      if (std::fabs(a[i * n + k]) > std::fabs(a[pivot * n + k])) pivot = i;
    if (a[pivot * n + k] == 0.0) return 0.0;
    if (pivot != k) {
      for (int j = 0; j < n; ++j) std::swap(a[k * n + j], a[pivot * n + j]);
      det = -det;
    }
    det *= a[k * n + k];
    for (int i = k + 1; i < n; ++i) {
      const double f = a[i * n + k] / a[k * n + k];
      for (int j = k; j < n; ++j) a[i * n + j] -= f * a[k * n + j];
    }
  }
  return det;
}

// Hamilton product written independently of the library: (w, x, y, z).
void quaternion_product(const double a[4], const double b[4], double out[4]) {
  const double w1 = a[0], x1 = a[1], y1 = a[2], z1 = a[3];
  const double w2 = b[0], x2 = b[1], y2 = b[2], z2 = b[3];
  out[0] = w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2;
  out[1] = w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2;
  out[2] = w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2;
  out[3] = w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2;
}

int popcount(std::uint64_t v) {
  int c = 0;
  for (; v; v &= v - 1) ++c;
  return c;
}

}  // namespace

TEST(kind_names_and_parsing) {
  const std::vector<std::string> expected = {"identity", "dense", "hadamard", "rotor3", "planar", "quat",
                                             "rotor_network"};
  CHECK(rotorquant::rotation_kind_names() == expected);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    CHECK(rotorquant::parse_rotation_kind(expected[i]) == static_cast<RotationKind>(i));
    CHECK(rotorquant::rotation_kind_name(static_cast<RotationKind>(i)) == expected[i]);
  }
  CHECK_THROWS(rotorquant::parse_rotation_kind("rotor"), rotorquant::TypeError);
  CHECK_THROWS(rotorquant::parse_rotation_kind("Dense"), rotorquant::TypeError);
  try {
    rotorquant::parse_rotation_kind("butterfly");
    CHECK(false);
  } catch (const rotorquant::TypeError& e) {
    const std::string message = e.what();
    for (const auto& name : expected) CHECK(message.find(name) != std::string::npos);
    CHECK(message.find("butterfly") != std::string::npos);
    CHECK(message.find("expected") != std::string::npos);
  }
}

TEST(validation) {
  for (RotationKind kind : kAllKinds) {
    CHECK_THROWS(Rotation(kind, 0, 1), rotorquant::ValueError);
    CHECK_THROWS(Rotation(kind, -3, 1), rotorquant::ValueError);
    CHECK_THROWS(rotorquant::rotation_padded_dim(kind, 0), rotorquant::ValueError);
    const Rotation rotation(kind, 8, 1);
    std::vector<float> buffer(64, 0.0f);
    CHECK_THROWS(rotation.apply(buffer.data(), buffer.data() + 32, -1), rotorquant::ValueError);
    CHECK_THROWS(rotation.apply(nullptr, buffer.data(), 1), rotorquant::ValueError);
    CHECK_THROWS(rotation.apply(buffer.data(), nullptr, 1), rotorquant::ValueError);
    CHECK_THROWS(rotation.inverse(nullptr, buffer.data(), 1), rotorquant::ValueError);
    CHECK_THROWS(rotation.inverse(buffer.data(), buffer.data() + 32, -2), rotorquant::ValueError);
    rotation.apply(nullptr, nullptr, 0);  // an empty batch is fine
    rotation.inverse(nullptr, nullptr, 0);
  }
  CHECK_THROWS(Rotation(RotationKind::kDense, 16385, 0), rotorquant::ValueError);
  CHECK_THROWS(Rotation(RotationKind::kHadamard, (std::int64_t{1} << 24) + 1, 0), rotorquant::ValueError);
  CHECK_THROWS(Rotation(RotationKind::kRotorNetwork, (std::int64_t{1} << 24) + 1, 0), rotorquant::ValueError);
  CHECK_THROWS(Rotation(static_cast<RotationKind>(17), 8, 0), rotorquant::TypeError);
  try {
    Rotation(RotationKind::kRotor3, 0, 0);
  } catch (const rotorquant::ValueError& e) {
    const std::string message = e.what();
    CHECK(message.find("expected") != std::string::npos);
    CHECK(message.find("got 0") != std::string::npos);
  }
}

TEST(padded_dim_and_parameter_count) {
  for (RotationKind kind : kAllKinds) {
    for (std::int64_t dim : kDims) {
      const Rotation rotation(kind, dim, 3);
      const std::int64_t p = expected_padded_dim(kind, dim);
      CHECK(rotation.padded_dim() == p);
      CHECK(rotorquant::rotation_padded_dim(kind, dim) == p);
      CHECK(rotation.dim() == dim);
      CHECK(rotation.seed() == 3u);
      CHECK(rotation.kind() == kind);
      std::int64_t count = 0;
      switch (kind) {
        case RotationKind::kIdentity: count = 0; break;
        case RotationKind::kDense: count = dim * dim; break;
        case RotationKind::kHadamard: count = p; break;
        case RotationKind::kRotor3: count = 4 * ceil_div(dim, 3); break;
        case RotationKind::kPlanar: count = 2 * ceil_div(dim, 2); break;
        case RotationKind::kQuat: count = 8 * ceil_div(dim, 4); break;
        case RotationKind::kRotorNetwork:  // signs, then one r x r block per distinct odd prime factor
          count = p + (p % 3 == 0 ? 9 : 0) + (p % 5 == 0 ? 25 : 0) + (p % 7 == 0 ? 49 : 0);
          break;
      }
      CHECK(rotation.num_parameters() == count);
      CHECK(static_cast<std::int64_t>(rotation.parameters().size()) == count);
    }
  }
  CHECK(rotorquant::rotation_padded_dim(RotationKind::kHadamard, 1 << 24) == (1 << 24));
  CHECK(rotorquant::rotation_padded_dim(RotationKind::kHadamard, 129) == 256);
}

TEST(matrix_is_orthogonal) {
  for (RotationKind kind : kAllKinds) {
    for (std::int64_t dim : kDims) {
      const Rotation rotation(kind, dim, 11);
      const std::int64_t p = rotation.padded_dim();
      const std::vector<double> m = rotation.matrix();
      CHECK(static_cast<std::int64_t>(m.size()) == p * p);
      double worst = 0.0;
      for (std::int64_t i = 0; i < p; ++i) {
        for (std::int64_t j = 0; j < p; ++j) {
          double dot = 0.0;
          for (std::int64_t k = 0; k < p; ++k) dot += m[i * p + k] * m[j * p + k];
          worst = std::fmax(worst, std::fabs(dot - (i == j ? 1.0 : 0.0)));
        }
      }
      if (!(worst <= 1e-5)) std::fprintf(stderr, "kind %d dim %lld\n", static_cast<int>(kind), static_cast<long long>(dim));
      CHECK_NEAR(worst, 0.0, 1e-5);
    }
  }
}

TEST(apply_and_inverse_match_matrix_and_round_trip) {
  const std::int64_t n = 5;
  for (RotationKind kind : kAllKinds) {
    for (std::int64_t dim : kDims) {
      const Rotation rotation(kind, dim, 5);
      const std::int64_t p = rotation.padded_dim();
      const std::vector<double> m = rotation.matrix();
      const std::vector<float> x = random_unit_rows(n, dim, 100 + dim);
      std::vector<float> y(static_cast<std::size_t>(n * p), -7.0f);
      rotation.apply(x.data(), y.data(), n);
      std::vector<float> back(static_cast<std::size_t>(n * dim), -7.0f);
      rotation.inverse(y.data(), back.data(), n);
      double worst_apply = 0.0, worst_round_trip = 0.0, worst_norm = 0.0;
      for (std::int64_t r = 0; r < n; ++r) {
        for (std::int64_t i = 0; i < p; ++i) {
          double ref = 0.0;
          for (std::int64_t j = 0; j < dim; ++j) ref += m[i * p + j] * x[r * dim + j];  // M pad(x)
          worst_apply = std::fmax(worst_apply, std::fabs(ref - y[r * p + i]));
        }
        for (std::int64_t j = 0; j < dim; ++j) {
          worst_round_trip = std::fmax(worst_round_trip, std::fabs(back[r * dim + j] - x[r * dim + j]));
        }
        worst_norm = std::fmax(worst_norm, std::fabs(row_norm(&y[r * p], p) - row_norm(&x[r * dim], dim)));
      }
      CHECK_NEAR(worst_apply, 0.0, 1e-5);
      CHECK_NEAR(worst_round_trip, 0.0, 1e-5);
      CHECK_NEAR(worst_norm, 0.0, 1e-5);

      // inverse(z) == (M^T z)[:dim] for an arbitrary z on the padded space (not in the range of apply).
      const std::vector<float> z = random_unit_rows(n, p, 900 + dim);
      std::vector<float> xz(static_cast<std::size_t>(n * dim));
      rotation.inverse(z.data(), xz.data(), n);
      double worst_inverse = 0.0;
      for (std::int64_t r = 0; r < n; ++r) {
        for (std::int64_t j = 0; j < dim; ++j) {
          double ref = 0.0;
          for (std::int64_t i = 0; i < p; ++i) ref += m[i * p + j] * z[r * p + i];
          worst_inverse = std::fmax(worst_inverse, std::fabs(ref - xz[r * dim + j]));
        }
      }
      CHECK_NEAR(worst_inverse, 0.0, 1e-5);
    }
  }
}

// A rotation that silently does nothing must fail here (see DESIGN.md "things known" 7).
TEST(non_identity_kinds_really_rotate) {
  for (RotationKind kind : kAllKinds) {
    if (kind == RotationKind::kIdentity) continue;
    for (std::int64_t dim : kDims) {
      // dense/hadamard/rotor_network of dim 1 is a 1x1 matrix +-1, which may be the identity.
      if (dim == 1 && (kind == RotationKind::kDense || kind == RotationKind::kHadamard ||
                       kind == RotationKind::kRotorNetwork)) {
        continue;
      }
      const Rotation rotation(kind, dim, 2024);
      const std::int64_t p = rotation.padded_dim();
      const std::vector<double> m = rotation.matrix();
      const double whole = block_distance_from_identity(m, p, 0, p);
      // E||M - I||_F^2 = 2P - 2E[tr M] ~ 2P for a random rotation; tiny P may have a small angle.
      const double threshold = p >= 8 ? 0.5 * std::sqrt(static_cast<double>(p)) : 0.1;
      if (!(whole > threshold)) {
        std::fprintf(stderr, "kind %d dim %lld: ||M - I|| = %g\n", static_cast<int>(kind), static_cast<long long>(dim), whole);
      }
      CHECK(whole > threshold);
      const int k = block_size_of(kind);
      if (k > 0) {
        for (std::int64_t b = 0; b < p; b += k) CHECK(block_distance_from_identity(m, p, b, k) > 1e-3);
        // Through apply() too: a unit vector inside each block (within dim) moves.
        for (std::int64_t b = 0; b < dim; b += k) {
          std::vector<float> x(static_cast<std::size_t>(dim), 0.0f);
          const std::int64_t width = std::min<std::int64_t>(k, dim - b);
          for (std::int64_t j = 0; j < width; ++j) x[b + j] = 1.0f / std::sqrt(static_cast<float>(width));
          std::vector<float> y(static_cast<std::size_t>(p));
          rotation.apply(x.data(), y.data(), 1);
          double moved = 0.0;
          for (std::int64_t i = 0; i < p; ++i) {
            const double d = y[i] - (i < dim ? x[i] : 0.0f);
            moved += d * d;
          }
          CHECK(std::sqrt(moved) > 1e-4);
        }
      } else {
        const std::vector<float> x = random_unit_rows(1, dim, 77);
        std::vector<float> y(static_cast<std::size_t>(p));
        rotation.apply(x.data(), y.data(), 1);
        double moved = 0.0;
        for (std::int64_t i = 0; i < p; ++i) {
          const double d = y[i] - (i < dim ? x[i] : 0.0f);
          moved += d * d;
        }
        CHECK(std::sqrt(moved) > 0.1);
      }
    }
  }
}

TEST(identity_is_a_copy) {
  const Rotation rotation(RotationKind::kIdentity, 7, 0);
  const std::vector<float> x = random_unit_rows(3, 7, 1);
  std::vector<float> y(21), back(21);
  rotation.apply(x.data(), y.data(), 3);
  rotation.inverse(y.data(), back.data(), 3);
  CHECK(y == x);
  CHECK(back == x);
}

TEST(determinism_by_seed) {
  for (RotationKind kind : kAllKinds) {
    for (std::int64_t dim : kDims) {
      const Rotation a(kind, dim, 42), b(kind, dim, 42), c(kind, dim, 43);
      CHECK(a.parameters() == b.parameters());
      CHECK(a.matrix() == b.matrix());
      if (kind != RotationKind::kIdentity && dim >= 8) CHECK(a.parameters() != c.parameters());
    }
  }
  // A large seed uses the high key word too.
  const Rotation low(RotationKind::kHadamard, 64, 5), high(RotationKind::kHadamard, 64, 5 + (std::uint64_t{1} << 32));
  CHECK(low.parameters() != high.parameters());
}

TEST(hadamard_matches_explicit_sylvester_matrix) {
  for (std::int64_t dim : {1, 2, 5, 8, 63, 64, 96, 130}) {
    const Rotation rotation(RotationKind::kHadamard, dim, 9);
    const std::int64_t p = rotation.padded_dim();
    const auto stream = rotorquant::make_stream(9, RandomPurpose::kHadamardSigns);
    const std::vector<float>& signs = rotation.parameters();
    for (std::int64_t i = 0; i < p; ++i) CHECK(signs[i] == stream.sign_at(i));
    const std::vector<double> m = rotation.matrix();
    double worst = 0.0;
    for (std::int64_t i = 0; i < p; ++i) {
      for (std::int64_t j = 0; j < p; ++j) {
        const double h = (popcount(static_cast<std::uint64_t>(i & j)) & 1) ? -1.0 : 1.0;
        worst = std::fmax(worst, std::fabs(m[i * p + j] - h * signs[j] / std::sqrt(static_cast<double>(p))));
      }
    }
    CHECK_NEAR(worst, 0.0, 1e-12);
  }
}

TEST(rotor3_matches_general_sandwich) {
  namespace cl = rotorquant::clifford;
  const std::int64_t dim = 13;  // 5 groups, the last padded with two zeros
  const Rotation rotation(RotationKind::kRotor3, dim, 31);
  const std::vector<float>& params = rotation.parameters();
  const auto stream = rotorquant::make_stream(31, RandomPurpose::kRotor3);
  const std::vector<float> x = random_unit_rows(1, dim, 5);
  std::vector<float> y(static_cast<std::size_t>(rotation.padded_dim()));
  rotation.apply(x.data(), y.data(), 1);
  for (std::int64_t g = 0; g < 5; ++g) {
    // Parameters are the normalized Gaussian 4-vector of the stream.
    double raw[4], norm_sq = 0.0;
    for (int k = 0; k < 4; ++k) {
      raw[k] = stream.gaussian_at(4 * g + k);
      norm_sq += raw[k] * raw[k];
    }
    for (int k = 0; k < 4; ++k) CHECK_NEAR(params[4 * g + k], raw[k] / std::sqrt(norm_sq), 1e-7);
    const cl::Rotor<double> rotor{params[4 * g], params[4 * g + 1], params[4 * g + 2], params[4 * g + 3]};
    double v[3];
    for (int k = 0; k < 3; ++k) v[k] = (3 * g + k < dim) ? x[3 * g + k] : 0.0;
    const cl::Multivector<double> out =
        cl::sandwich(cl::to_multivector(rotor), cl::vector_multivector(v[0], v[1], v[2]));
    CHECK_NEAR(out.c[cl::kE1], y[3 * g], 1e-6);
    CHECK_NEAR(out.c[cl::kE2], y[3 * g + 1], 1e-6);
    CHECK_NEAR(out.c[cl::kE3], y[3 * g + 2], 1e-6);
    CHECK_NEAR(out.c[cl::kScalar], 0.0, 1e-6);
    CHECK_NEAR(out.c[cl::kE123], 0.0, 1e-6);
  }
}

TEST(planar_construction_and_formula) {
  const std::int64_t dim = 9;
  const Rotation rotation(RotationKind::kPlanar, dim, 4);
  const std::vector<float>& params = rotation.parameters();
  const auto stream = rotorquant::make_stream(4, RandomPurpose::kPlanar);
  const std::vector<float> x = random_unit_rows(1, dim, 8);
  std::vector<float> y(10);
  rotation.apply(x.data(), y.data(), 1);
  for (std::int64_t g = 0; g < 5; ++g) {
    const double theta = 6.283185307179586 * stream.uniform_at(g);
    const double c = params[2 * g], s = params[2 * g + 1];
    CHECK_NEAR(c, std::cos(theta), 1e-7);
    CHECK_NEAR(s, std::sin(theta), 1e-7);
    const double x0 = x[2 * g], x1 = (2 * g + 1 < dim) ? x[2 * g + 1] : 0.0;
    CHECK_NEAR(y[2 * g], c * x0 - s * x1, 1e-6);
    CHECK_NEAR(y[2 * g + 1], s * x0 + c * x1, 1e-6);
  }
}

TEST(quat_construction_formula_and_determinant) {
  const std::int64_t dim = 14;  // 4 groups, the last padded
  const Rotation rotation(RotationKind::kQuat, dim, 6);
  const std::vector<float>& params = rotation.parameters();
  const auto stream = rotorquant::make_stream(6, RandomPurpose::kQuaternion);
  const std::vector<float> x = random_unit_rows(1, dim, 2);
  std::vector<float> y(16);
  rotation.apply(x.data(), y.data(), 1);
  const std::vector<double> m = rotation.matrix();
  for (std::int64_t g = 0; g < 4; ++g) {
    for (int half = 0; half < 2; ++half) {
      double raw[4], norm_sq = 0.0;
      for (int k = 0; k < 4; ++k) {
        raw[k] = stream.gaussian_at(8 * g + 4 * half + k);
        norm_sq += raw[k] * raw[k];
      }
      for (int k = 0; k < 4; ++k) CHECK_NEAR(params[8 * g + 4 * half + k], raw[k] / std::sqrt(norm_sq), 1e-7);
    }
    const double left[4] = {params[8 * g], params[8 * g + 1], params[8 * g + 2], params[8 * g + 3]};
    const double right[4] = {params[8 * g + 4], params[8 * g + 5], params[8 * g + 6], params[8 * g + 7]};
    double v[4];
    for (int k = 0; k < 4; ++k) v[k] = (4 * g + k < dim) ? x[4 * g + k] : 0.0;
    double tmp[4], ref[4];
    quaternion_product(left, v, tmp);
    quaternion_product(tmp, right, ref);
    for (int k = 0; k < 4; ++k) CHECK_NEAR(y[4 * g + k], ref[k], 1e-6);
    std::vector<double> block(16);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) block[i * 4 + j] = m[(4 * g + i) * 16 + 4 * g + j];
    CHECK_NEAR(determinant(block, 4), 1.0, 1e-6);
  }
  // Rotor blocks are proper rotations too.
  const Rotation rotor(RotationKind::kRotor3, 12, 6);
  const std::vector<double> rm = rotor.matrix();
  for (int g = 0; g < 4; ++g) {
    std::vector<double> block(9);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) block[i * 3 + j] = rm[(3 * g + i) * 12 + 3 * g + j];
    CHECK_NEAR(determinant(block, 3), 1.0, 1e-6);
  }
}

TEST(dense_is_sign_fixed_qr_of_the_gaussian_matrix) {
  // R = M^T G must be upper triangular with a positive diagonal.
  for (std::int64_t d : {2, 5, 16, 64}) {
    const Rotation rotation(RotationKind::kDense, d, 12);
    const std::vector<double> m = rotation.matrix();
    const auto stream = rotorquant::make_stream(12, RandomPurpose::kDenseRotation);
    double worst_lower = 0.0, min_diag = 1e300;
    for (std::int64_t i = 0; i < d; ++i) {
      for (std::int64_t j = 0; j <= i; ++j) {
        double r = 0.0;
        for (std::int64_t k = 0; k < d; ++k) r += m[k * d + i] * stream.gaussian_at(k * d + j);
        if (j < i) worst_lower = std::fmax(worst_lower, std::fabs(r));
        else min_diag = std::fmin(min_diag, r);
      }
    }
    CHECK_NEAR(worst_lower, 0.0, 1e-4);
    CHECK(min_diag > 1e-3);
  }
}

TEST(dense_haar_statistics) {
  // For Haar M in O(d): M[0][0]^2 ~ Beta(1/2, (d-1)/2), mean 1/d, sd ~0.08 at d = 16;
  // M[0][0] is symmetric about 0 (a missing sign fix makes it always negative or positive).
  const std::int64_t d = 16;
  const int seeds = 400;
  double sum_sq = 0.0, sum = 0.0, sum_last_sq = 0.0;
  int positive = 0;
  for (int seed = 0; seed < seeds; ++seed) {
    const Rotation rotation(RotationKind::kDense, d, static_cast<std::uint64_t>(seed));
    const std::vector<float>& m = rotation.parameters();
    sum_sq += static_cast<double>(m[0]) * m[0];
    sum += m[0];
    sum_last_sq += static_cast<double>(m[d * d - 1]) * m[d * d - 1];
    positive += m[0] > 0.0f ? 1 : 0;
  }
  CHECK_NEAR(sum_sq / seeds, 1.0 / d, 0.02);
  CHECK_NEAR(sum_last_sq / seeds, 1.0 / d, 0.02);
  CHECK_NEAR(sum / seeds, 0.0, 0.06);
  CHECK(positive > 150 && positive < 250);
}

TEST(batch_equals_row_by_row) {
  const std::int64_t n = 37;
  for (RotationKind kind : kAllKinds) {
    for (std::int64_t dim : {5, 64, 130}) {
      const Rotation rotation(kind, dim, 8);
      const std::int64_t p = rotation.padded_dim();
      const std::vector<float> x = random_unit_rows(n, dim, 3);
      std::vector<float> y(static_cast<std::size_t>(n * p)), y_rows(static_cast<std::size_t>(n * p));
      rotation.apply(x.data(), y.data(), n);
      for (std::int64_t r = 0; r < n; ++r) rotation.apply(&x[r * dim], &y_rows[r * p], 1);
      CHECK(y == y_rows);
      std::vector<float> back(static_cast<std::size_t>(n * dim)), back_rows(static_cast<std::size_t>(n * dim));
      rotation.inverse(y.data(), back.data(), n);
      for (std::int64_t r = 0; r < n; ++r) rotation.inverse(&y[r * p], &back_rows[r * dim], 1);
      CHECK(back == back_rows);
    }
  }
}

TEST(multi_threaded_equals_single_threaded) {
  const std::int64_t n = 3000;  // enough work that parallel_for really splits
  for (RotationKind kind : kAllKinds) {
    for (std::int64_t dim : {63, 128}) {
      const Rotation rotation(kind, dim, 21);
      const std::int64_t p = rotation.padded_dim();
      const std::vector<float> x = random_unit_rows(n, dim, 4);
      std::vector<float> y1(static_cast<std::size_t>(n * p)), y2(static_cast<std::size_t>(n * p));
      std::vector<float> b1(static_cast<std::size_t>(n * dim)), b2(static_cast<std::size_t>(n * dim));
      rotorquant::set_num_threads(1);
      rotation.apply(x.data(), y1.data(), n);
      rotation.inverse(y1.data(), b1.data(), n);
      rotorquant::set_num_threads(2);
      rotation.apply(x.data(), y2.data(), n);
      rotation.inverse(y1.data(), b2.data(), n);
      rotorquant::set_num_threads(0);
      CHECK(y1 == y2);
      CHECK(b1 == b2);
    }
  }
}

// Pins the generator, the construction and the float rounding across platforms.
TEST(golden_parameters_seed0_dim8) {
  const Rotation dense(RotationKind::kDense, 8, 0);
  const Rotation hadamard(RotationKind::kHadamard, 8, 0);
  const Rotation rotor3(RotationKind::kRotor3, 8, 0);
  std::printf("golden dense %.9g %.9g %.9g\n", dense.parameters()[0], dense.parameters()[1], dense.parameters()[2]);
  std::printf("golden hadamard %.9g %.9g %.9g\n", hadamard.parameters()[0], hadamard.parameters()[1],
              hadamard.parameters()[2]);
  std::printf("golden rotor3 %.9g %.9g %.9g\n", rotor3.parameters()[0], rotor3.parameters()[1],
              rotor3.parameters()[2]);
  const float dense_golden[3] = {-0.550555408f, -0.333225369f, -0.348327011f};
  const float hadamard_golden[3] = {1.0f, 1.0f, -1.0f};
  const float rotor3_golden[3] = {0.042877987f, 0.603838027f, 0.707345009f};
  for (int i = 0; i < 3; ++i) {
    CHECK_NEAR(dense.parameters()[i], dense_golden[i], 1e-6);
    CHECK(hadamard.parameters()[i] == hadamard_golden[i]);
    CHECK_NEAR(rotor3.parameters()[i], rotor3_golden[i], 1e-6);
  }
}
