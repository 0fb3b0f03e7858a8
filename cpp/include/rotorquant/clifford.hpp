// The Clifford algebra Cl(3,0): multivectors of R^3 with e1^2 = e2^2 = e3^2 = +1.
//
// A multivector has 8 components in the fixed order
//     [1, e1, e2, e3, e12, e13, e23, e123]
// (index constants kScalar .. kE123 below). The product of basis blades is derived
// from their bitmasks (e1 = 1, e2 = 2, e3 = 4; a blade's bits in ascending order):
// blade(A) * blade(B) = sign(A, B) * blade(A xor B), where sign(A, B) = (-1)^(number of
// transpositions needed to sort the concatenated basis vectors); squares are +1.
//
// A rotor is an even multivector R = s + b12 e12 + b13 e13 + b23 e23 with R R~ = 1.
// It rotates a vector v (grade 1) by the sandwich v -> R v R~. The rotor3 rotation
// uses the sparse fast path rotate_vector / rotor_to_matrix on the CPU and on the GPU,
// so every function marked ROTORQUANT_CLIFFORD_HD is plain arithmetic usable in CUDA
// kernels. Functions that validate and throw are host-only.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "rotorquant/error.hpp"

#if defined(__CUDACC__)
#define ROTORQUANT_CLIFFORD_HD __host__ __device__ __forceinline__
#else
#define ROTORQUANT_CLIFFORD_HD inline
#endif

namespace rotorquant {
namespace clifford {

// Component indices of a Multivector.
constexpr int kScalar = 0;
constexpr int kE1 = 1;
constexpr int kE2 = 2;
constexpr int kE3 = 3;
constexpr int kE12 = 4;
constexpr int kE13 = 5;
constexpr int kE23 = 6;
constexpr int kE123 = 7;
constexpr int kNumComponents = 8;

template <class T>
struct Multivector {
  T c[8];  // [1, e1, e2, e3, e12, e13, e23, e123]
};

// An even element s + b12 e12 + b13 e13 + b23 e23 (a rotor when s^2 + |b|^2 = 1).
template <class T>
struct Rotor {
  T s, b12, b13, b23;
};

// ---- blade bookkeeping (compile-time constants folded by the compiler) ----------

// Bitmask of the blade stored at component index (0..7).
ROTORQUANT_CLIFFORD_HD constexpr int blade_mask(int index) {
  switch (index) {
    case kScalar: return 0;
    case kE1: return 1;
    case kE2: return 2;
    case kE3: return 4;
    case kE12: return 3;
    case kE13: return 5;
    case kE23: return 6;
    default: return 7;  // kE123
  }
}

// Component index of the blade with a bitmask (0..7).
ROTORQUANT_CLIFFORD_HD constexpr int blade_index(int mask) {
  switch (mask) {
    case 0: return kScalar;
    case 1: return kE1;
    case 2: return kE2;
    case 4: return kE3;
    case 3: return kE12;
    case 5: return kE13;
    case 6: return kE23;
    default: return kE123;  // 7
  }
}

// Grade (number of basis vectors) of the blade at component index.
ROTORQUANT_CLIFFORD_HD constexpr int blade_grade(int index) {
  return index == 0 ? 0 : (index <= 3 ? 1 : (index <= 6 ? 2 : 3));
}

// Sign of blade(mask_a) * blade(mask_b) in a Euclidean metric: each basis vector of b
// moves left past every basis vector of a with a larger index.
ROTORQUANT_CLIFFORD_HD constexpr int blade_product_sign(int mask_a, int mask_b) {
  int swaps = 0;
  for (int shifted = mask_a >> 1; shifted != 0; shifted >>= 1) {
    const int common = shifted & mask_b;
    swaps += (common & 1) + ((common >> 1) & 1) + ((common >> 2) & 1);
  }
  return (swaps & 1) ? -1 : 1;
}

// ---- multivector operations ------------------------------------------------------

template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> zero_multivector() {
  Multivector<T> r{};
  for (int i = 0; i < 8; ++i) r.c[i] = T(0);
  return r;
}

namespace product_detail {
// One term a[I] b[J] of the product, with its target index and sign fixed at compile time.
template <class T, int I, int J>
ROTORQUANT_CLIFFORD_HD void accumulate_blade_product(const T* a, const T* b, T* r) {
  constexpr int kTarget = blade_index(blade_mask(I) ^ blade_mask(J));
  constexpr int kSign = blade_product_sign(blade_mask(I), blade_mask(J));
  if (kSign > 0) {
    r[kTarget] += a[I] * b[J];
  } else {
    r[kTarget] -= a[I] * b[J];
  }
}

template <class T, int I, int... J>
ROTORQUANT_CLIFFORD_HD void accumulate_product_row(const T* a, const T* b, T* r, std::integer_sequence<int, J...>) {
  (accumulate_blade_product<T, I, J>(a, b, r), ...);
}

template <class T, int... I>
ROTORQUANT_CLIFFORD_HD void accumulate_product(const T* a, const T* b, T* r, std::integer_sequence<int, I...>) {
  (accumulate_product_row<T, I>(a, b, r, std::make_integer_sequence<int, 8>{}), ...);
}
}  // namespace product_detail

// Full 8x8 geometric product a b (64 terms, signs and targets from the blade bitmasks,
// unrolled at compile time).
template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> geometric_product(const Multivector<T>& a, const Multivector<T>& b) {
  Multivector<T> r = zero_multivector<T>();
  product_detail::accumulate_product<T>(a.c, b.c, r.c, std::make_integer_sequence<int, 8>{});
  return r;
}

// Reverse a~: reverses the order of basis vectors; negates grades 2 and 3.
template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> reverse(const Multivector<T>& a) {
  Multivector<T> r = a;
  for (int i = kE12; i <= kE123; ++i) r.c[i] = -a.c[i];
  return r;
}

// Grade involution: negates the odd grades 1 and 3.
template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> grade_involution(const Multivector<T>& a) {
  Multivector<T> r = a;
  for (int i = kE1; i <= kE3; ++i) r.c[i] = -a.c[i];
  r.c[kE123] = -a.c[kE123];
  return r;
}

// Part of grade k (0..3); any other k gives zero (host callers validate first).
template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> grade_projection(const Multivector<T>& a, int k) {
  Multivector<T> r = zero_multivector<T>();
  for (int i = 0; i < 8; ++i)
    if (blade_grade(i) == k) r.c[i] = a.c[i];
  return r;
}

// Euclidean norm of the 8 components (= sqrt(<a a~>_0) in Cl(3,0)).
template <class T>
ROTORQUANT_CLIFFORD_HD T norm(const Multivector<T>& a) {
  T sum = T(0);
  for (int i = 0; i < 8; ++i) sum += a.c[i] * a.c[i];
  return std::sqrt(sum);
}

template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> add(const Multivector<T>& a, const Multivector<T>& b) {
  Multivector<T> r;
  for (int i = 0; i < 8; ++i) r.c[i] = a.c[i] + b.c[i];
  return r;
}

template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> subtract(const Multivector<T>& a, const Multivector<T>& b) {
  Multivector<T> r;
  for (int i = 0; i < 8; ++i) r.c[i] = a.c[i] - b.c[i];
  return r;
}

template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> scale(const Multivector<T>& a, T factor) {
  Multivector<T> r;
  for (int i = 0; i < 8; ++i) r.c[i] = a.c[i] * factor;
  return r;
}

// The multivector x e1 + y e2 + z e3.
template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> vector_multivector(T x, T y, T z) {
  Multivector<T> r = zero_multivector<T>();
  r.c[kE1] = x;
  r.c[kE2] = y;
  r.c[kE3] = z;
  return r;
}

// General sandwich R x R~ by two geometric products (any R, any x).
template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> sandwich(const Multivector<T>& rotor, const Multivector<T>& x) {
  return geometric_product(geometric_product(rotor, x), reverse(rotor));
}

// ---- rotors ------------------------------------------------------------------------

template <class T>
ROTORQUANT_CLIFFORD_HD Rotor<T> identity_rotor() {
  return Rotor<T>{T(1), T(0), T(0), T(0)};
}

template <class T>
ROTORQUANT_CLIFFORD_HD Multivector<T> to_multivector(const Rotor<T>& r) {
  Multivector<T> m = zero_multivector<T>();
  m.c[kScalar] = r.s;
  m.c[kE12] = r.b12;
  m.c[kE13] = r.b13;
  m.c[kE23] = r.b23;
  return m;
}

// The even part of a multivector (grades 0 and 2) as a Rotor; odd parts are dropped.
template <class T>
ROTORQUANT_CLIFFORD_HD Rotor<T> even_part(const Multivector<T>& m) {
  return Rotor<T>{m.c[kScalar], m.c[kE12], m.c[kE13], m.c[kE23]};
}

template <class T>
ROTORQUANT_CLIFFORD_HD Rotor<T> reverse(const Rotor<T>& r) {
  return Rotor<T>{r.s, -r.b12, -r.b13, -r.b23};
}

// Geometric product a b of two even elements (closed in the even subalgebra).
// As rotations: rotor_product(second, first) applies `first`, then `second`.
template <class T>
ROTORQUANT_CLIFFORD_HD Rotor<T> rotor_product(const Rotor<T>& a, const Rotor<T>& b) {
  return Rotor<T>{a.s * b.s - a.b12 * b.b12 - a.b13 * b.b13 - a.b23 * b.b23,
                  a.s * b.b12 + a.b12 * b.s - a.b13 * b.b23 + a.b23 * b.b13,
                  a.s * b.b13 + a.b13 * b.s + a.b12 * b.b23 - a.b23 * b.b12,
                  a.s * b.b23 + a.b23 * b.s - a.b12 * b.b13 + a.b13 * b.b12};
}

// sqrt(s^2 + b12^2 + b13^2 + b23^2) = sqrt(R R~).
template <class T>
ROTORQUANT_CLIFFORD_HD T rotor_norm(const Rotor<T>& r) {
  return std::sqrt(r.s * r.s + r.b12 * r.b12 + r.b13 * r.b13 + r.b23 * r.b23);
}

// R / |R|. Throws ValueError when |R| is zero or not finite.
template <class T>
inline Rotor<T> normalize(const Rotor<T>& r) {
  const T n = rotor_norm(r);
  if (!(n > T(0)) || !std::isfinite(n)) {
    throw ValueError(detail::expected_got("clifford::normalize: rotor norm", "finite and > 0",
                                          std::to_string(static_cast<double>(n))));
  }
  const T inv = T(1) / n;
  return Rotor<T>{r.s * inv, r.b12 * inv, r.b13 * inv, r.b23 * inv};
}

// R = exp(-angle/2 B) = cos(angle/2) - sin(angle/2) B for the unit bivector
// B = b12 e12 + b13 e13 + b23 e23 (B^2 = -1). With B = e12, R e1 R~ = cos(angle) e1 +
// sin(angle) e2: the sandwich rotates e1 toward e2 by +angle in the plane of B.
// Throws ValueError if a component or the angle is not finite, or if |B| differs
// from 1 by more than 1e-6 (relative).
template <class T>
inline Rotor<T> rotor_from_bivector_angle(T b12, T b13, T b23, T angle) {
  if (!std::isfinite(b12) || !std::isfinite(b13) || !std::isfinite(b23)) {
    throw ValueError(detail::expected_got("clifford::rotor_from_bivector_angle: bivector", "finite components",
                                          "(" + std::to_string(static_cast<double>(b12)) + ", " +
                                              std::to_string(static_cast<double>(b13)) + ", " +
                                              std::to_string(static_cast<double>(b23)) + ")"));
  }
  if (!std::isfinite(angle)) {
    throw ValueError(detail::expected_got("clifford::rotor_from_bivector_angle: angle", "a finite number",
                                          std::to_string(static_cast<double>(angle))));
  }
  const double length = std::sqrt(static_cast<double>(b12) * b12 + static_cast<double>(b13) * b13 +
                                  static_cast<double>(b23) * b23);
  if (!(std::fabs(length - 1.0) <= 1e-6)) {
    throw ValueError(detail::expected_got("clifford::rotor_from_bivector_angle: bivector norm",
                                          "1 (unit bivector, tolerance 1e-6)", std::to_string(length)));
  }
  const T half = angle / T(2);
  const T c = std::cos(half), s = std::sin(half);
  return Rotor<T>{c, -s * b12, -s * b13, -s * b23};
}

// ---- fast path for vectors (used by the rotor3 rotation on CPU and GPU) -------------

// Row-major 3x3 matrix m with R v R~ = m v for every grade-1 v (v = v0 e1 + v1 e2 + v2 e3).
// Exact for any even R (no unit assumption): for a non-unit R the matrix is |R|^2 times a rotation.
template <class T>
ROTORQUANT_CLIFFORD_HD void rotor_to_matrix(const Rotor<T>& r, T m[9]) {
  const T s = r.s, b12 = r.b12, b13 = r.b13, b23 = r.b23;
  const T ss = s * s, p12 = b12 * b12, p13 = b13 * b13, p23 = b23 * b23;
  m[0] = ss - p12 - p13 + p23;
  m[1] = T(2) * (s * b12 - b13 * b23);
  m[2] = T(2) * (s * b13 + b12 * b23);
  m[3] = -T(2) * (s * b12 + b13 * b23);
  m[4] = ss - p12 + p13 - p23;
  m[5] = T(2) * (s * b23 - b12 * b13);
  m[6] = T(2) * (b12 * b23 - s * b13);
  m[7] = -T(2) * (s * b23 + b12 * b13);
  m[8] = ss + p12 - p13 - p23;
}

// out = R v R~ for the vector v = v[0] e1 + v[1] e2 + v[2] e3. out may alias v.
template <class T>
ROTORQUANT_CLIFFORD_HD void rotate_vector(const Rotor<T>& r, const T v[3], T out[3]) {
  T m[9];
  rotor_to_matrix(r, m);
  const T x = v[0], y = v[1], z = v[2];
  out[0] = m[0] * x + m[1] * y + m[2] * z;
  out[1] = m[3] * x + m[4] * y + m[5] * z;
  out[2] = m[6] * x + m[7] * y + m[8] * z;
}

// out = R~ v R (the inverse rotation for a unit R: the transpose of rotor_to_matrix). out may alias v.
template <class T>
ROTORQUANT_CLIFFORD_HD void rotate_vector_inverse(const Rotor<T>& r, const T v[3], T out[3]) {
  T m[9];
  rotor_to_matrix(r, m);
  const T x = v[0], y = v[1], z = v[2];
  out[0] = m[0] * x + m[3] * y + m[6] * z;
  out[1] = m[1] * x + m[4] * y + m[7] * z;
  out[2] = m[2] * x + m[5] * y + m[8] * z;
}

// ---- batched double-precision entry points (cpp/src/clifford.cpp) -------------------
// Arrays are C-contiguous; a multivector is 8 doubles, a bivector 3 doubles [b12, b13, b23].
// n >= 0 (n < 0 throws ValueError); null pointers are allowed only when n == 0.

// out[i] = a[i] b[i]. out may not alias a or b.
void geometric_product_batch(const double* a, const double* b, double* out, std::int64_t n);
// out[i] = a[i]~. out may alias a.
void reverse_batch(const double* a, double* out, std::int64_t n);
// out[i] = <a[i]>_grade; grade in 0..3 (ValueError otherwise). out may alias a.
void grade_projection_batch(const double* a, double* out, std::int64_t n, int grade);
// out[i] = norm(a[i]) (n doubles).
void norm_batch(const double* a, double* out, std::int64_t n);
// out[i] = rotors[i] x[i] rotors[i]~ (general sandwich, any multivectors). out may not alias inputs.
void sandwich_batch(const double* rotors, const double* x, double* out, std::int64_t n);
// out[i] = rotor_from_bivector_angle(bivectors[i], angles[i]) as a multivector (8 doubles).
// Throws ValueError (naming the row) on a non-unit or non-finite bivector or a non-finite angle.
void rotor_from_bivector_angle_batch(const double* bivectors, const double* angles, double* out, std::int64_t n);

}  // namespace clifford
}  // namespace rotorquant
