// CPU implementation of the rotor_network rotation (detail/rotor_network.hpp,
// docs/rotor_network.md): random signs, Hadamard butterflies on contiguous segments of
// 2^a coordinates, then one balanced odd-radix block stage per odd prime factor of p.
//
// Forward arithmetic is canonical (bit-exact across backends): sign multiply (exact),
// butterflies (a, b) -> (a + b, a - b) with strides 1, 2, ..., 2^(a-1) (float adds),
// odd stages as fmaf chains from +0.0f over the block row in ascending order, then one
// multiply by the float scale. The float forward map runs in the CPU kernels
// (detail/kernels.hpp: Kernels::rotor_network_apply, cpp/src/simd_kernels_impl.hpp); this file
// holds the plan, the parameters, the inverse and matrix() (the same stages in double), which
// are free to differ in rounding.
#include "rotorquant/detail/rotor_network.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

#include "rotorquant/detail/hadamard.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/random.hpp"

namespace rotorquant {
namespace detail {

// B_3 = (2/3) J - I = rotor_to_matrix((e12 - e13 + e23) / sqrt(3)): the rotation by pi about (1, 1, 1) / sqrt(3).
const float kRotorNetworkBlock3[9] = {
    -0.333333343f, 0.666666687f,  0.666666687f,   //
    0.666666687f,  -0.333333343f, 0.666666687f,   //
    0.666666687f,  0.666666687f,  -0.333333343f,  //
};

// B_5, B_7: found by benchmarks/rotor_network_blocks.py (minimize the worst ratio of r B_ij^2 to 1 over SO(r)),
// orthonormalized in double and rounded to float. Frozen.
// r = 5: worst ratio rho = 1.7562 (r B_ij^2 in [0.5709, 1.7562])
const float kRotorNetworkBlock5[25] = {
    0.5926489f,  -0.45061925f,  -0.33793816f,  -0.4661773f,  0.33791423f,  //
    -0.33791423f,  -0.4661773f,  -0.45061925f,  0.592649f,  0.33793816f,  //
    -0.4661773f,  -0.33793816f,  -0.33791423f,  -0.45061925f,  -0.592649f,  //
    -0.33793816f,  0.5926489f,  -0.4661773f,  -0.33791426f,  0.45061925f,  //
    -0.45061925f,  -0.33791426f,  0.5926489f,  -0.33793813f,  0.4661773f,  //
};

// r = 7: worst ratio rho = 2.2324 (r B_ij^2 in [0.4504, 2.2324])
const float kRotorNetworkBlock7[49] = {
    0.5647273f,  0.25366887f,  0.25366887f,  -0.3482102f,  0.2538643f,  0.5498563f,  0.2536689f,  //
    0.25366887f,  0.56472725f,  -0.5498563f,  -0.34821025f,  -0.25366887f,  -0.25366887f,  -0.25386432f,  //
    0.25366887f,  -0.25386432f,  0.56472725f,  -0.34821025f,  -0.25366887f,  -0.25366887f,  -0.5498563f,  //
    0.34821016f,  0.34821025f,  0.34821025f,  0.52201325f,  -0.34821025f,  -0.34821028f,  0.34821016f,  //
    -0.25366887f,  0.5498563f,  0.2538643f,  0.3482102f,  0.2536689f,  0.2536689f,  -0.5647273f,  //
    -0.5498563f,  0.25366887f,  0.25366887f,  -0.34821025f,  -0.56472725f,  0.25386432f,  0.25366887f,  //
    -0.2538643f,  0.25366887f,  0.25366887f,  -0.34821025f,  0.54985636f,  -0.56472725f,  0.25366887f,  //
};

namespace {

const float* block_constants(int radix) {
  switch (radix) {
    case 3: return kRotorNetworkBlock3;
    case 5: return kRotorNetworkBlock5;
    default: return kRotorNetworkBlock7;
  }
}

// Odd part of n after removing 3, 5, 7 (1 when n is 7-smooth after removing 2s).
std::int64_t rough_part(std::int64_t n) {
  while (n % 2 == 0) n /= 2;
  for (const std::int64_t r : {3, 5, 7}) {
    while (n % r == 0) n /= r;
  }
  return n;
}

// v <- B_r v on every group {base + l * stride + t : l < R} (forward), or B_r^T v (transpose).
// Forward: out_k = fma chain over l ascending of B[k][l] * v_l from +0.0f (canonical). The loop over t
// is contiguous and vectorizes where the target has FMA; std::fma is one rounding on every path.
template <int R, bool kTranspose, class T>
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void odd_stage_body(const float* __restrict block, std::int64_t p, std::int64_t stride, T* __restrict v,
                           T* __restrict tmp) {
  const std::int64_t span = R * stride;
  for (std::int64_t base = 0; base < p; base += span) {
    std::memcpy(tmp, v + base, static_cast<std::size_t>(span) * sizeof(T));
    for (int k = 0; k < R; ++k) {
      T* __restrict y = v + base + k * stride;
      for (std::int64_t t = 0; t < stride; ++t) {
        T acc = T(0);
        for (int l = 0; l < R; ++l) {
          const T b = static_cast<T>(kTranspose ? block[l * R + k] : block[k * R + l]);
          acc = std::fma(b, tmp[l * stride + t], acc);
        }
        y[t] = acc;
      }
    }
  }
}

template <int R, bool kTranspose, class T>
void odd_stage_portable(const float* block, std::int64_t p, std::int64_t stride, T* v, T* tmp) {
  odd_stage_body<R, kTranspose>(block, p, stride, v, tmp);
}

// x86-64 without -mfma: std::fma would be a libm call per element. A clone compiled for AVX2+FMA
// (chosen at run time) inlines it as vfmadd — the same correctly rounded fused operation, so the
// results are bit-identical to the portable path.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__FMA__)
#define ROTORQUANT_ROTOR_NETWORK_FMA_CLONE 1
template <int R, bool kTranspose>
__attribute__((target("avx2,fma"))) void odd_stage_fma(const float* block, std::int64_t p, std::int64_t stride,
                                                       float* v, float* tmp) {
  odd_stage_body<R, kTranspose>(block, p, stride, v, tmp);
}

bool cpu_has_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <int R, bool kTranspose, class T>
void odd_stage(const float* block, std::int64_t p, std::int64_t stride, T* v, T* tmp) {
#if defined(ROTORQUANT_ROTOR_NETWORK_FMA_CLONE)
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_fma()) {
      odd_stage_fma<R, kTranspose>(block, p, stride, v, tmp);
      return;
    }
  }
#endif
  odd_stage_portable<R, kTranspose>(block, p, stride, v, tmp);
}

template <bool kTranspose, class T>
void run_odd_stage(int radix, const float* block, std::int64_t p, std::int64_t stride, T* v, T* tmp) {
  switch (radix) {
    case 3: odd_stage<3, kTranspose>(block, p, stride, v, tmp); break;
    case 5: odd_stage<5, kTranspose>(block, p, stride, v, tmp); break;
    default: odd_stage<7, kTranspose>(block, p, stride, v, tmp); break;
  }
}

// The butterfly normalization: the canonical float scale, or 1/sqrt(2^a) in double for matrix().
template <class T>
T scale_of(const RotorNetworkPlan& plan) {
  if (std::is_same<T, double>::value) return static_cast<T>(1.0 / std::sqrt(static_cast<double>(plan.butterfly_size)));
  return static_cast<T>(plan.scale);
}

// v (p values, already sign-flipped and padded) <- the forward stages and the scale.
template <class T>
void forward_stages(const RotorNetworkPlan& plan, const float* parameters, T* v, T* tmp) {
  const std::int64_t p = plan.padded_dim, n2 = plan.butterfly_size;
  if (n2 > 1) {
    for (std::int64_t segment = 0; segment < p; segment += n2) fast_walsh_hadamard_inplace(v + segment, n2);
  }
  for (int q = 0; q < plan.num_odd_stages; ++q) {
    run_odd_stage<false>(plan.radix[q], parameters + plan.block_offset[q], p, plan.stride[q], v, tmp);
  }
  if (n2 > 1) {
    const T scale = scale_of<T>(plan);
    for (std::int64_t i = 0; i < p; ++i) v[i] *= scale;
  }
}

// v (p values) <- M^T v without the signs: scale, transposed odd stages in reverse, butterflies.
template <class T>
void transpose_stages(const RotorNetworkPlan& plan, const float* parameters, T* v, T* tmp) {
  const std::int64_t p = plan.padded_dim, n2 = plan.butterfly_size;
  for (int q = plan.num_odd_stages - 1; q >= 0; --q) {
    run_odd_stage<true>(plan.radix[q], parameters + plan.block_offset[q], p, plan.stride[q], v, tmp);
  }
  if (n2 > 1) {
    for (std::int64_t segment = 0; segment < p; segment += n2) fast_walsh_hadamard_inplace(v + segment, n2);
    const T scale = scale_of<T>(plan);
    for (std::int64_t i = 0; i < p; ++i) v[i] *= scale;
  }
}

}  // namespace

std::int64_t rotor_network_padded_dim(std::int64_t dim) {
  if (dim < 1) throw ValueError(expected_got("rotor_network_padded_dim: dim", ">= 1", std::to_string(dim)));
  std::int64_t p = dim;
  while (rough_part(p) != 1) ++p;
  return p;
}

RotorNetworkPlan rotor_network_plan(std::int64_t padded_dim) {
  if (padded_dim < 1 || padded_dim > 2 * kRotorNetworkMaxDim || rough_part(padded_dim) != 1) {
    throw ValueError(expected_got("rotor_network_plan: padded_dim", "a 7-smooth integer in [1, 2^25]",
                                  std::to_string(padded_dim)));
  }
  RotorNetworkPlan plan;
  plan.padded_dim = padded_dim;
  std::int64_t odd = padded_dim;
  while (odd % 2 == 0) {
    odd /= 2;
    plan.butterfly_size *= 2;
  }
  plan.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(plan.butterfly_size)));
  std::int64_t stride = plan.butterfly_size;
  std::int64_t offset = padded_dim;
  for (const int r : {3, 5, 7}) {
    bool present = false;
    while (odd % r == 0) {
      odd /= r;
      if (!present) {
        present = true;
      }
      const int q = plan.num_odd_stages++;
      plan.radix[q] = r;
      plan.stride[q] = stride;
      plan.block_offset[q] = offset;
      stride *= r;
    }
    if (present) offset += r * r;
  }
  plan.num_parameters = offset;
  return plan;
}

std::vector<float> rotor_network_parameters(std::int64_t padded_dim, std::uint64_t seed) {
  const RotorNetworkPlan plan = rotor_network_plan(padded_dim);
  std::vector<float> parameters(static_cast<std::size_t>(plan.num_parameters));
  const RandomStream stream = make_stream(seed, RandomPurpose::kRotorNetworkSigns);
  for (std::int64_t i = 0; i < padded_dim; ++i) parameters[static_cast<std::size_t>(i)] = stream.sign_at(i);
  int previous = 0;
  for (int q = 0; q < plan.num_odd_stages; ++q) {
    const int r = plan.radix[q];
    if (r == previous) continue;
    previous = r;
    std::copy(block_constants(r), block_constants(r) + r * r,
              parameters.begin() + static_cast<std::ptrdiff_t>(plan.block_offset[q]));
  }
  return parameters;
}

void rotor_network_inverse(const RotorNetworkPlan& plan, const float* parameters, std::int64_t dim,
                           const float* in, float* out, std::int64_t rows) {
  const std::int64_t p = plan.padded_dim;
  std::vector<float> scratch(static_cast<std::size_t>(2 * p));
  float* v = scratch.data();
  for (std::int64_t r = 0; r < rows; ++r) {
    std::memcpy(v, in + r * p, static_cast<std::size_t>(p) * sizeof(float));
    transpose_stages(plan, parameters, v, v + p);
    float* x = out + r * dim;
    for (std::int64_t i = 0; i < dim; ++i) x[i] = v[i] * parameters[i];
  }
}

void rotor_network_matrix(const RotorNetworkPlan& plan, const float* parameters, double* m) {
  const std::int64_t p = plan.padded_dim;
  const std::size_t np = static_cast<std::size_t>(p);
  std::vector<double> column(np), tmp(np);
  for (std::size_t j = 0; j < np; ++j) {
    std::fill(column.begin(), column.end(), 0.0);
    column[j] = parameters[j];
    forward_stages(plan, parameters, column.data(), tmp.data());
    for (std::size_t i = 0; i < np; ++i) m[i * np + j] = column[i];
  }
}

std::int64_t rotor_network_row_cost(const RotorNetworkPlan& plan) {
  std::int64_t cost = 2 * plan.padded_dim;
  for (std::int64_t n = plan.butterfly_size; n > 1; n >>= 1) cost += plan.padded_dim;
  for (int q = 0; q < plan.num_odd_stages; ++q) cost += plan.radix[q] * plan.padded_dim;
  return cost;
}

}  // namespace detail
}  // namespace rotorquant
