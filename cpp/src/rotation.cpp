// CPU implementation of the random rotations (rotation.hpp). Construction follows
// the random-number scheme of docs/random.md; batched maps run rows in parallel.
#include "rotorquant/rotation.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "rotorquant/clifford.hpp"
#include "rotorquant/detail/hadamard.hpp"
#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/detail/householder.hpp"
#include "rotorquant/detail/rotor_network.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/parallel.hpp"
#include "rotorquant/random.hpp"

namespace rotorquant {
namespace {

constexpr std::int64_t kMaxDenseDim = 4096;  // the O(d^3) QR takes about a minute at 4096
constexpr std::int64_t kMaxHadamardDim = std::int64_t{1} << 24;
constexpr std::int64_t kMaxMatrixDim = 16384;  // matrix() materializes P*P doubles
constexpr double kTwoPi = 6.283185307179586476925286766559;

bool is_valid_kind(RotationKind kind) {
  const int value = static_cast<int>(kind);
  return value >= static_cast<int>(RotationKind::kIdentity) && value <= static_cast<int>(RotationKind::kRotorNetwork);
}

void check_kind(RotationKind kind, const char* what) {
  if (!is_valid_kind(kind)) {
    throw TypeError(detail::expected_got(what, "a RotationKind (0..6)", std::to_string(static_cast<int>(kind))));
  }
}

// Rotated coordinates per block and stored floats per block for the block kinds.
int block_size(RotationKind kind) {
  switch (kind) {
    case RotationKind::kRotor3: return 3;
    case RotationKind::kPlanar: return 2;
    case RotationKind::kQuat: return 4;
    default: return 1;
  }
}

int parameters_per_block(RotationKind kind) {
  switch (kind) {
    case RotationKind::kRotor3: return 4;
    case RotationKind::kPlanar: return 2;
    case RotationKind::kQuat: return 8;
    default: return 0;
  }
}

bool is_block_kind(RotationKind kind) {
  return kind == RotationKind::kRotor3 || kind == RotationKind::kPlanar || kind == RotationKind::kQuat;
}

void check_dim(RotationKind kind, std::int64_t dim, const char* what) {
  if (dim < 1) throw ValueError(detail::expected_got(what, ">= 1", std::to_string(dim)));
  if (kind == RotationKind::kDense && dim > kMaxDenseDim) {
    throw ValueError(detail::expected_got(what, "<= 4096 for the dense rotation (its QR construction is O(d^3))", std::to_string(dim)));
  }
  if (kind == RotationKind::kHadamard && dim > kMaxHadamardDim) {
    throw ValueError(detail::expected_got(what, "<= 2^24 (16777216) for the hadamard rotation", std::to_string(dim)));
  }
  if (kind == RotationKind::kRotorNetwork && dim > detail::kRotorNetworkMaxDim) {
    throw ValueError(detail::expected_got(what, "<= 2^24 (16777216) for the rotor_network rotation", std::to_string(dim)));
  }
  // Keeps every padded size and n * padded_dim product far from int64 overflow.
  if (dim > (std::int64_t{1} << 40)) {
    throw ValueError(detail::expected_got(what, "<= 2^40", std::to_string(dim)));
  }
}

// Hamilton product p * q of quaternions stored (w, x, y, z).
void hamilton_product(const double p[4], const double q[4], double out[4]) {
  out[0] = p[0] * q[0] - p[1] * q[1] - p[2] * q[2] - p[3] * q[3];
  out[1] = p[0] * q[1] + p[1] * q[0] + p[2] * q[3] - p[3] * q[2];
  out[2] = p[0] * q[2] - p[1] * q[3] + p[2] * q[0] + p[3] * q[1];
  out[3] = p[0] * q[3] + p[1] * q[2] - p[2] * q[1] + p[3] * q[0];
}

// The k x k row-major matrix (y_block = B x_block) of one block, from its stored float parameters.
void block_matrix(RotationKind kind, const float* p, double* m) {
  switch (kind) {
    case RotationKind::kRotor3: {
      const clifford::Rotor<double> rotor{p[0], p[1], p[2], p[3]};
      clifford::rotor_to_matrix(rotor, m);
      break;
    }
    case RotationKind::kPlanar: {
      const double c = p[0], s = p[1];
      m[0] = c;
      m[1] = -s;
      m[2] = s;
      m[3] = c;
      break;
    }
    case RotationKind::kQuat: {
      const double left[4] = {p[0], p[1], p[2], p[3]};
      const double right[4] = {p[4], p[5], p[6], p[7]};
      for (int j = 0; j < 4; ++j) {
        double basis[4] = {0.0, 0.0, 0.0, 0.0};
        basis[j] = 1.0;
        double tmp[4], column[4];
        hamilton_product(left, basis, tmp);
        hamilton_product(tmp, right, column);
        for (int i = 0; i < 4; ++i) m[i * 4 + j] = column[i];
      }
      break;
    }
    default: break;
  }
}

void check_batch(const char* what, const float* in, const float* out, std::int64_t n) {
  const std::string name(what);
  if (n < 0) throw ValueError(detail::expected_got(name + ": n", ">= 0", std::to_string(n)));
  if (n > 0 && in == nullptr) {
    throw ValueError(detail::expected_got(name + ": in", "a non-null pointer when n > 0", "null"));
  }
  if (n > 0 && out == nullptr) {
    throw ValueError(detail::expected_got(name + ": out", "a non-null pointer when n > 0", "null"));
  }
}

}  // namespace

const std::vector<std::string>& rotation_kind_names() {
  static const std::vector<std::string> names = {"identity", "dense",  "hadamard",     "rotor3",
                                                 "planar",   "quat",   "rotor_network"};
  return names;
}

std::string rotation_kind_name(RotationKind kind) {
  check_kind(kind, "rotation_kind_name: kind");
  return rotation_kind_names()[static_cast<std::size_t>(kind)];
}

RotationKind parse_rotation_kind(const std::string& name) {
  const auto& names = rotation_kind_names();
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<RotationKind>(i);
  }
  std::string valid;
  for (std::size_t i = 0; i < names.size(); ++i) valid += (i ? ", " : "") + names[i];
  throw TypeError(detail::expected_got("rotation kind", "one of " + valid, "'" + name + "'"));
}

std::int64_t rotation_padded_dim(RotationKind kind, std::int64_t dim) {
  check_kind(kind, "rotation_padded_dim: kind");
  check_dim(kind, dim, "rotation_padded_dim: dim");
  if (kind == RotationKind::kHadamard) return detail::next_power_of_two(dim);
  if (kind == RotationKind::kRotorNetwork) return detail::rotor_network_padded_dim(dim);
  const std::int64_t k = block_size(kind);
  return (dim + k - 1) / k * k;
}

Rotation::Rotation(RotationKind kind, std::int64_t dim, std::uint64_t seed)
    : kind_(kind), dim_(dim), padded_dim_(0), seed_(seed) {
  check_kind(kind, "Rotation: kind");
  check_dim(kind, dim, "Rotation: dim");
  padded_dim_ = rotation_padded_dim(kind, dim);
  const std::int64_t p = padded_dim_;
  switch (kind) {
    case RotationKind::kIdentity: break;
    case RotationKind::kDense: {
      // G[i][j] = gaussian_at(i*d + j); QR in double (column-major working copy).
      const RandomStream stream = make_stream(seed, RandomPurpose::kDenseRotation);
      const std::size_t d = static_cast<std::size_t>(p);
      std::vector<double> a(d * d);
      for (std::size_t i = 0; i < d; ++i) {
        for (std::size_t j = 0; j < d; ++j) a[j * d + i] = stream.gaussian_at(i * d + j);
      }
      const std::vector<double> q = detail::householder_q_sign_fixed(a, p);  // column-major
      parameters_.resize(d * d);
      fast_matrices_.resize(d * d);
      for (std::size_t i = 0; i < d; ++i) {
        for (std::size_t j = 0; j < d; ++j) {
          const float value = static_cast<float>(q[j * d + i]);  // M[i][j]
          parameters_[i * d + j] = value;
          fast_matrices_[j * d + i] = value;  // M^T
        }
      }
      break;
    }
    case RotationKind::kHadamard: {
      const RandomStream stream = make_stream(seed, RandomPurpose::kHadamardSigns);
      parameters_.resize(static_cast<std::size_t>(p));
      for (std::int64_t i = 0; i < p; ++i) parameters_[static_cast<std::size_t>(i)] = stream.sign_at(i);
      break;
    }
    case RotationKind::kRotor3: {
      const RandomStream stream = make_stream(seed, RandomPurpose::kRotor3);
      const std::int64_t groups = p / 3;
      parameters_.resize(static_cast<std::size_t>(groups * 4));
      for (std::int64_t g = 0; g < groups; ++g) {
        const clifford::Rotor<double> raw{stream.gaussian_at(4 * g), stream.gaussian_at(4 * g + 1),
                                          stream.gaussian_at(4 * g + 2), stream.gaussian_at(4 * g + 3)};
        const clifford::Rotor<double> unit = clifford::normalize(raw);
        float* out = parameters_.data() + 4 * g;
        out[0] = static_cast<float>(unit.s);
        out[1] = static_cast<float>(unit.b12);
        out[2] = static_cast<float>(unit.b13);
        out[3] = static_cast<float>(unit.b23);
      }
      break;
    }
    case RotationKind::kPlanar: {
      const RandomStream stream = make_stream(seed, RandomPurpose::kPlanar);
      const std::int64_t groups = p / 2;
      parameters_.resize(static_cast<std::size_t>(groups * 2));
      for (std::int64_t g = 0; g < groups; ++g) {
        const double theta = kTwoPi * stream.uniform_at(g);
        parameters_[static_cast<std::size_t>(2 * g)] = static_cast<float>(std::cos(theta));
        parameters_[static_cast<std::size_t>(2 * g + 1)] = static_cast<float>(std::sin(theta));
      }
      break;
    }
    case RotationKind::kQuat: {
      const RandomStream stream = make_stream(seed, RandomPurpose::kQuaternion);
      const std::int64_t groups = p / 4;
      parameters_.resize(static_cast<std::size_t>(groups * 8));
      for (std::int64_t g = 0; g < groups; ++g) {
        for (int half = 0; half < 2; ++half) {  // 0: left quaternion, 1: right quaternion
          double q[4];
          double norm_sq = 0.0;
          for (int k = 0; k < 4; ++k) {
            q[k] = stream.gaussian_at(8 * g + 4 * half + k);
            norm_sq += q[k] * q[k];
          }
          const double inv_norm = 1.0 / std::sqrt(norm_sq);
          for (int k = 0; k < 4; ++k) {
            parameters_[static_cast<std::size_t>(8 * g + 4 * half + k)] = static_cast<float>(q[k] * inv_norm);
          }
        }
      }
      break;
    }
    case RotationKind::kRotorNetwork:
      parameters_ = detail::rotor_network_parameters(p, seed);
      break;
  }
  if (is_block_kind(kind)) fast_matrices_ = detail::rotation_block_matrices(kind, parameters_, p);
}

void Rotation::apply_rows(const float* in, float* out, std::int64_t rows) const {
  const std::int64_t p = padded_dim_;
  const detail::Kernels& kernels = detail::kernels();
  switch (kind_) {
    case RotationKind::kIdentity:
      std::memcpy(out, in, static_cast<std::size_t>(rows * dim_) * sizeof(float));
      break;
    case RotationKind::kDense: kernels.gemm(fast_matrices_.data(), dim_, p, in, dim_, out, p, rows); break;
    case RotationKind::kHadamard: kernels.hadamard_apply(parameters_.data(), dim_, p, in, out, rows); break;
    case RotationKind::kRotorNetwork: {
      const detail::RotorNetworkPlan plan = detail::rotor_network_plan(p);
      if (plan.num_odd_stages == 0) {  // p = 2^a: exactly the randomized Hadamard transform, same arithmetic
        kernels.hadamard_apply(parameters_.data(), dim_, p, in, out, rows);
      } else {
        kernels.rotor_network_apply(plan, parameters_.data(), dim_, in, out, rows);
      }
      break;
    }
    default: {
      const int k = block_size(kind_);
      kernels.block_apply(k, fast_matrices_.data(), p / k, dim_, in, out, rows);
      break;
    }
  }
}

void Rotation::inverse_rows(const float* in, float* out, std::int64_t rows, float* scratch) const {
  const std::int64_t p = padded_dim_;
  const detail::Kernels& kernels = detail::kernels();
  switch (kind_) {
    case RotationKind::kIdentity:
      std::memcpy(out, in, static_cast<std::size_t>(rows * dim_) * sizeof(float));
      break;
    case RotationKind::kDense: kernels.gemm(parameters_.data(), p, dim_, in, p, out, dim_, rows); break;
    case RotationKind::kHadamard: kernels.hadamard_inverse(parameters_.data(), dim_, p, in, out, rows, scratch); break;
    case RotationKind::kRotorNetwork: {
      const detail::RotorNetworkPlan plan = detail::rotor_network_plan(p);
      if (plan.num_odd_stages == 0) {
        kernels.hadamard_inverse(parameters_.data(), dim_, p, in, out, rows, scratch);
      } else {
        detail::rotor_network_inverse(plan, parameters_.data(), dim_, in, out, rows);
      }
      break;
    }
    default: {
      const int k = block_size(kind_);
      kernels.block_inverse(k, fast_matrices_.data(), p / k, dim_, in, out, rows);
      break;
    }
  }
}

namespace {

// Work per row, in rough multiply-adds, for the parallel_for threshold.
std::int64_t row_cost(RotationKind kind, std::int64_t dim, std::int64_t padded_dim) {
  switch (kind) {
    case RotationKind::kDense: return dim * padded_dim;
    case RotationKind::kHadamard: {
      std::int64_t log2 = 0;
      while ((std::int64_t{1} << log2) < padded_dim) ++log2;
      return padded_dim * (log2 + 2);
    }
    case RotationKind::kIdentity: return dim / 4 + 1;
    case RotationKind::kRotorNetwork: return detail::rotor_network_row_cost(detail::rotor_network_plan(padded_dim));
    default: return padded_dim * 4;
  }
}

}  // namespace

// Rows are independent and every kernel computes each row on its own, so the result does not depend on
// the thread count or the batch split.
void Rotation::apply(const float* in, float* out, std::int64_t n) const {
  check_batch("Rotation.apply", in, out, n);
  if (n == 0) return;
  const std::int64_t dim = dim_, p = padded_dim_;
  parallel_for(n, row_cost(kind_, dim, p), [&](std::int64_t begin, std::int64_t end) {
    apply_rows(in + begin * dim, out + begin * p, end - begin);
  });
}

void Rotation::inverse(const float* in, float* out, std::int64_t n) const {
  check_batch("Rotation.inverse", in, out, n);
  if (n == 0) return;
  const std::int64_t dim = dim_, p = padded_dim_;
  parallel_for(n, row_cost(kind_, dim, p), [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> scratch(static_cast<std::size_t>(p));
    inverse_rows(in + begin * p, out + begin * dim, end - begin, scratch.data());
  });
}

std::vector<double> Rotation::matrix() const {
  const std::int64_t p = padded_dim_;
  if (p > kMaxMatrixDim) {
    throw ValueError(detail::expected_got("Rotation.matrix: padded_dim", "<= 16384 (the matrix is padded_dim^2 doubles)",
                                          std::to_string(p)));
  }
  const std::size_t np = static_cast<std::size_t>(p);
  std::vector<double> m(np * np, 0.0);
  switch (kind_) {
    case RotationKind::kIdentity:
      for (std::size_t i = 0; i < np; ++i) m[i * np + i] = 1.0;
      break;
    case RotationKind::kDense:
      for (std::size_t i = 0; i < np * np; ++i) m[i] = parameters_[i];
      break;
    case RotationKind::kHadamard: {
      // Column j = H (s_j e_j) / sqrt(P), by the same transform as apply(), in double.
      std::vector<double> column(np);
      const double scale = 1.0 / std::sqrt(static_cast<double>(p));
      for (std::size_t j = 0; j < np; ++j) {
        std::fill(column.begin(), column.end(), 0.0);
        column[j] = parameters_[j];
        detail::fast_walsh_hadamard_inplace(column.data(), p);
        for (std::size_t i = 0; i < np; ++i) m[i * np + j] = column[i] * scale;
      }
      break;
    }
    case RotationKind::kRotorNetwork:
      detail::rotor_network_matrix(detail::rotor_network_plan(p), parameters_.data(), m.data());
      break;
    default: {  // block kinds
      const int k = block_size(kind_), per_block = parameters_per_block(kind_);
      const std::int64_t groups = p / k;
      double block[16];
      for (std::int64_t g = 0; g < groups; ++g) {
        block_matrix(kind_, parameters_.data() + g * per_block, block);
        for (int i = 0; i < k; ++i) {
          for (int j = 0; j < k; ++j) {
            m[static_cast<std::size_t>(g * k + i) * np + static_cast<std::size_t>(g * k + j)] = block[i * k + j];
          }
        }
      }
      break;
    }
  }
  return m;
}

namespace detail {

std::vector<float> rotation_block_matrices(RotationKind kind, const std::vector<float>& parameters,
                                           std::int64_t padded_dim) {
  if (!is_block_kind(kind)) return {};
  const int k = block_size(kind), per_block = parameters_per_block(kind);
  const std::int64_t groups = padded_dim / k;
  if (static_cast<std::int64_t>(parameters.size()) != groups * per_block) {
    throw ValueError(expected_got("rotation_block_matrices: parameters", std::to_string(groups * per_block) + " floats",
                                  std::to_string(parameters.size())));
  }
  std::vector<float> blocks(static_cast<std::size_t>(groups * k * k));
  double m[16];
  for (std::int64_t g = 0; g < groups; ++g) {
    block_matrix(kind, parameters.data() + g * per_block, m);
    for (int i = 0; i < k * k; ++i) blocks[static_cast<std::size_t>(g * k * k + i)] = static_cast<float>(m[i]);
  }
  return blocks;
}

}  // namespace detail
}  // namespace rotorquant
