// Householder QR of a square matrix in double precision, used to build Haar
// orthogonal matrices (Q of a Gaussian matrix with the sign fix diag(R) > 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace rotorquant {
namespace detail {

// Given a d x d matrix A stored COLUMN-major (a[j*d + i] = A[i][j]), returns the
// orthogonal factor Q of A = Q R with every column k of Q multiplied by sign(R[k][k])
// (so that the implied R has a positive diagonal; a zero R[k][k] counts as +1),
// stored column-major. `a` is overwritten.
inline std::vector<double> householder_q_sign_fixed(std::vector<double>& a, std::int64_t d) {
  const std::size_t n = static_cast<std::size_t>(d);
  std::vector<double> reflectors(n * n, 0.0);  // column k holds v_k in rows k..d-1 (unit norm)
  std::vector<double> diag_sign(n, 1.0);
  for (std::size_t k = 0; k < n; ++k) {
    double* col = a.data() + k * n;
    double norm_sq = 0.0;
    for (std::size_t i = k; i < n; ++i) norm_sq += col[i] * col[i];
    const double norm = std::sqrt(norm_sq);
    double* v = reflectors.data() + k * n;
    if (norm == 0.0) {  // column already zero below the diagonal: H_k = I, R[k][k] = 0
      continue;
    }
    // alpha = -sign(a_kk) ||x||; v = x - alpha e_k avoids cancellation; R[k][k] = alpha.
    const double alpha = col[k] >= 0.0 ? -norm : norm;
    diag_sign[k] = alpha > 0.0 ? 1.0 : -1.0;
    for (std::size_t i = k; i < n; ++i) v[i] = col[i];
    v[k] -= alpha;
    double v_norm_sq = 0.0;
    for (std::size_t i = k; i < n; ++i) v_norm_sq += v[i] * v[i];
    const double inv_v_norm = 1.0 / std::sqrt(v_norm_sq);
    for (std::size_t i = k; i < n; ++i) v[i] *= inv_v_norm;
    // A[k:, j] -= 2 v (v . A[k:, j]) for the remaining columns.
    for (std::size_t j = k + 1; j < n; ++j) {
      double* cj = a.data() + j * n;
      double dot = 0.0;
      for (std::size_t i = k; i < n; ++i) dot += v[i] * cj[i];
      const double f = 2.0 * dot;
      for (std::size_t i = k; i < n; ++i) cj[i] -= f * v[i];
    }
  }
  // Q = H_0 H_1 ... H_{d-1} I: apply the reflectors to I from the last one back.
  // When H_k is applied, columns < k of rows >= k are still zero, so only columns >= k change.
  std::vector<double> q(n * n, 0.0);
  for (std::size_t i = 0; i < n; ++i) q[i * n + i] = 1.0;
  for (std::size_t kk = n; kk-- > 0;) {
    const double* v = reflectors.data() + kk * n;
    bool is_identity = true;
    for (std::size_t i = kk; i < n && is_identity; ++i) is_identity = v[i] == 0.0;
    if (is_identity) continue;
    for (std::size_t j = kk; j < n; ++j) {
      double* qj = q.data() + j * n;
      double dot = 0.0;
      for (std::size_t i = kk; i < n; ++i) dot += v[i] * qj[i];
      const double f = 2.0 * dot;
      for (std::size_t i = kk; i < n; ++i) qj[i] -= f * v[i];
    }
  }
  for (std::size_t k = 0; k < n; ++k) {
    if (diag_sign[k] < 0.0) {
      double* qk = q.data() + k * n;
      for (std::size_t i = 0; i < n; ++i) qk[i] = -qk[i];
    }
  }
  return q;
}

}  // namespace detail
}  // namespace rotorquant
