// Internal CPU kernels of the encode / decode / inner-product paths (not a public API).
//
// Every kernel exists in up to three builds of one source (cpp/src/simd_kernels_impl.hpp):
// portable C++ (any CPU, std::fma), AVX2+FMA and AVX-512 (F/BW/VL, with BMI2), the latter two compiled with
// per-function target attributes only (the library itself is built for baseline x86-64) and chosen
// at run time from what the CPU supports. All builds give bit-identical results for the kernels
// marked "canonical": they follow docs/format.md, "Canonical encode arithmetic". Defining
// ROTORQUANT_NO_X86_KERNELS when building the library leaves only the portable build (as on non-x86 hosts).
#pragma once

#include <cstdint>
#include <vector>

#include "rotorquant/format.hpp"
#include "rotorquant/rotation.hpp"

namespace rotorquant {
namespace detail {

struct RotorNetworkPlan;  // detail/rotor_network.hpp

enum class KernelIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// "portable" | "avx2" | "avx512"
const char* kernel_isa_name(KernelIsa isa);
// True when this build has the kernels of `isa` and this CPU can run them.
bool kernel_isa_supported(KernelIsa isa);
// The kernels in use: the widest supported ISA, unless the environment variable ROTORQUANT_CPU_KERNELS
// (portable | avx2 | avx512) or set_kernel_isa chose another.
KernelIsa kernel_isa();
// For tests and benchmarks. Throws ValueError for an unsupported ISA.
void set_kernel_isa(KernelIsa isa);

struct Kernels {
  KernelIsa isa;
  // canonical: out[r*out_stride + i] = chain over j = 0..in_dim-1 ascending: acc = fmaf(mat[j*out_dim + i],
  // in[r*in_stride + j], acc) from acc = +0.0f. (mat holds in_dim rows of out_dim floats: M^T for y = M x.)
  void (*gemm)(const float* mat, std::int64_t in_dim, std::int64_t out_dim, const float* in, std::int64_t in_stride,
               float* out, std::int64_t out_stride, std::int64_t rows);
  // canonical: block kinds (k = 2, 3, 4), y_{gk+i} = fma chain over j of B_g[i][j] * v_j (v zero padded);
  // in rows of dim floats, out rows of groups*k floats.
  void (*block_apply)(int k, const float* blocks, std::int64_t groups, std::int64_t dim, const float* in, float* out,
                      std::int64_t rows);
  // x = (blockdiag(B_g)^T y)[:dim] (not canonical).
  void (*block_inverse)(int k, const float* blocks, std::int64_t groups, std::int64_t dim, const float* in,
                        float* out, std::int64_t rows);
  // canonical: v = s .* pad(x), butterflies h = 1, 2, ..., p/2 ((a, b) -> (a + b, a - b)), times
  // (float)(1 / sqrt(p)); in rows of dim floats, out rows of p floats.
  void (*hadamard_apply)(const float* signs, std::int64_t dim, std::int64_t p, const float* in, float* out,
                         std::int64_t rows);
  // x = (s .* H y / sqrt(p))[:dim]; scratch holds p floats.
  void (*hadamard_inverse)(const float* signs, std::int64_t dim, std::int64_t p, const float* in, float* out,
                           std::int64_t rows, float* scratch);
  // canonical: the rotor_network forward map (detail/rotor_network.hpp, docs/rotor_network.md section 5) of rows
  // of dim floats into rows of plan.padded_dim floats.
  void (*rotor_network_apply)(const RotorNetworkPlan& plan, const float* parameters, std::int64_t dim,
                              const float* in, float* out, std::int64_t rows);
  // canonical: norms[r] = sqrt(sum (double)x^2) (the order of simd_kernels_impl.hpp, the same in every build),
  // unit[r*unit_stride + j] = (float)((double)x_j / norm), zeros when the norm is 0. A row with a NaN or Inf gets
  // a NaN or Inf norm (the sum of squares of finite floats cannot overflow a double) and unspecified unit values.
  // next (may be nullptr): next_rows rows of dim floats that the caller processes after these; their cache
  // lines are prefetched meanwhile (a hint: no effect on any result, never dereferenced).
  void (*normalize)(const float* x, std::int64_t dim, std::int64_t rows, double* norms, float* unit,
                    std::int64_t unit_stride, const float* next, std::int64_t next_rows);
  // canonical: idx[j] = number of boundaries b_k with y[j] >= b_k (boundaries strictly ascending, <= 255 of them).
  void (*quantize)(const float* y, std::int64_t count, const float* boundaries, int num_boundaries,
                   std::uint8_t* idx);
  // canonical: quantize then pack_indices, row by row: rows of p values in y, the packed planes of row r at
  // out + r * out_stride (layout = plane_layout(p, bits) with num_boundaries = 2^bits - 1). idx_scratch holds
  // rows * p bytes (used by the builds that go through the index bytes; its contents are unspecified after).
  void (*quantize_pack)(const float* y, std::int64_t p, std::int64_t rows, const float* boundaries,
                        int num_boundaries, const PlaneLayout& layout, std::uint8_t* idx_scratch, std::uint8_t* out,
                        std::int64_t out_stride);
  // out[j] = table[idx[j]] * scale (idx[j] < table_size <= 256; not canonical).
  void (*lookup)(const std::uint8_t* idx, std::int64_t count, const float* table, int table_size, float scale,
                 float* out);
  // out[j*out_stride + i] = <a_i, b_j> for i < count_a, j < count_b, rows of len floats (any summation order;
  // for inner products with few queries, where gemm's 16-column blocks would be mostly padding).
  void (*dots)(const float* a, std::int64_t count_a, const float* b, std::int64_t count_b, std::int64_t len,
               float* out, std::int64_t out_stride);
  // acc[q] = sum over nibbles b < ceil(m/4) of lut[(16*b + nibble_b(bits))*width + q], q < width (a multiple of
  // 16); nibble b of the sign bits is bits 4b..4b+3 (not canonical).
  void (*nibble_lut_sum)(const std::uint8_t* bits, std::int64_t m, const float* lut, std::int64_t width, float* acc);
};

// The kernels of kernel_isa(), or of a given ISA (ValueError when unsupported).
const Kernels& kernels();
const Kernels& kernels_for(KernelIsa isa);

// Bit-plane packing (format.hpp's pack_indices / unpack_indices, same bytes) with 64-bit word tricks.
void pack_indices_fast(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* idx, std::uint8_t* out);
void unpack_indices_fast(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* in,
                         std::uint8_t* idx);

// The k x k block matrices (row-major, one per group, float) that the block kinds apply: computed in
// double from parameters() and rounded to float. The canonical encode uses exactly these floats (every
// backend must receive them, not recompute them). Empty for non-block kinds.
std::vector<float> rotation_block_matrices(RotationKind kind, const std::vector<float>& parameters,
                                           std::int64_t padded_dim);

}  // namespace detail
}  // namespace rotorquant
