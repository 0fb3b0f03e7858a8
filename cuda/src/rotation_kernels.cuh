// CUDA kernels of the rotations (internal; launched by rotation.cu).
//
// Every kernel computes the map of rotorquant::Rotation from its float parameters
// (rotation.hpp, parameters()) in float32 with 64-bit row indexing:
//   block kinds (rotor3, planar, quat): one thread per (row, group), grid-stride loop;
//   dense: a tiled GEMM (64 x 64 output tiles, 16-deep k tiles in shared memory);
//   hadamard: a fast Walsh-Hadamard transform of whole rows in shared memory;
//   rotor_network: the same butterflies on segments of 2^a, then the odd-radix block stages,
//   on whole rows in shared memory (bit-identical to the CPU forward map).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rotorquant/clifford.hpp"

namespace rotorquant {
namespace cuda {
namespace kernels {

// ---- block rotations ---------------------------------------------------------------

// A rotation of R^kSize with kNumParameters floats per group.
//   forward(p, v):  v <- G v;   backward(p, v): v <- G^T v.
struct Rotor3Block {
  static constexpr int kSize = 3;
  static constexpr int kNumParameters = 4;  // [s, b12, b13, b23]
  static __device__ __forceinline__ void forward(const float* p, float v[3]) {
    const clifford::Rotor<float> rotor{p[0], p[1], p[2], p[3]};
    clifford::rotate_vector(rotor, v, v);  // R v R~
  }
  static __device__ __forceinline__ void backward(const float* p, float v[3]) {
    const clifford::Rotor<float> rotor{p[0], p[1], p[2], p[3]};
    clifford::rotate_vector_inverse(rotor, v, v);  // R~ v R
  }
};

struct PlanarBlock {
  static constexpr int kSize = 2;
  static constexpr int kNumParameters = 2;  // [cos t, sin t]
  static __device__ __forceinline__ void forward(const float* p, float v[2]) {
    const float c = p[0], s = p[1], x0 = v[0], x1 = v[1];
    v[0] = c * x0 - s * x1;
    v[1] = s * x0 + c * x1;
  }
  static __device__ __forceinline__ void backward(const float* p, float v[2]) {
    const float c = p[0], s = p[1], y0 = v[0], y1 = v[1];
    v[0] = c * y0 + s * y1;
    v[1] = -s * y0 + c * y1;
  }
};

struct Quaternion {
  float w, x, y, z;
};

// Hamilton product a b.
__device__ __forceinline__ Quaternion hamilton_product(const Quaternion& a, const Quaternion& b) {
  return Quaternion{a.w * b.w - a.x * b.x - a.y * b.y - a.z * b.z,
                    a.w * b.x + a.x * b.w + a.y * b.z - a.z * b.y,
                    a.w * b.y - a.x * b.z + a.y * b.w + a.z * b.x,
                    a.w * b.z + a.x * b.y - a.y * b.x + a.z * b.w};
}

struct QuaternionBlock {
  static constexpr int kSize = 4;
  static constexpr int kNumParameters = 8;  // left (w, x, y, z), right (w, x, y, z)
  // v = x0 + x1 i + x2 j + x3 k  ->  qL v qR
  static __device__ __forceinline__ void forward(const float* p, float v[4]) {
    const Quaternion left{p[0], p[1], p[2], p[3]}, right{p[4], p[5], p[6], p[7]};
    const Quaternion q = hamilton_product(hamilton_product(left, Quaternion{v[0], v[1], v[2], v[3]}), right);
    v[0] = q.w;
    v[1] = q.x;
    v[2] = q.y;
    v[3] = q.z;
  }
  // y -> conj(qL) y conj(qR)
  static __device__ __forceinline__ void backward(const float* p, float v[4]) {
    const Quaternion left{p[0], -p[1], -p[2], -p[3]}, right{p[4], -p[5], -p[6], -p[7]};
    const Quaternion q = hamilton_product(hamilton_product(left, Quaternion{v[0], v[1], v[2], v[3]}), right);
    v[0] = q.w;
    v[1] = q.x;
    v[2] = q.y;
    v[3] = q.z;
  }
};

// apply   (kInverse = false): in (n, dim) -> out (n, padded_dim), input coordinates >= dim read as 0.
// inverse (kInverse = true):  in (n, padded_dim) -> out (n, dim), output coordinates >= dim dropped.
template <class Block, bool kInverse>
__global__ void __launch_bounds__(256)
    block_rotation_kernel(const float* __restrict__ in, float* __restrict__ out,
                          const float* __restrict__ parameters, std::int64_t n, std::int64_t dim,
                          std::int64_t padded_dim) {
  constexpr int kSize = Block::kSize;
  const std::int64_t groups = padded_dim / kSize;
  const std::int64_t total = n * groups;
  const std::int64_t in_stride = kInverse ? padded_dim : dim;
  const std::int64_t out_stride = kInverse ? dim : padded_dim;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += step) {
    const std::int64_t row = item / groups;
    const std::int64_t group = item - row * groups;
    const std::int64_t first = group * kSize;

    float p[Block::kNumParameters];
#pragma unroll
    for (int k = 0; k < Block::kNumParameters; ++k) p[k] = __ldg(parameters + group * Block::kNumParameters + k);

    const float* source = in + row * in_stride + first;
    float v[kSize];
#pragma unroll
    for (int k = 0; k < kSize; ++k) v[k] = (kInverse || first + k < dim) ? source[k] : 0.0f;

    if (kInverse) {
      Block::backward(p, v);
    } else {
      Block::forward(p, v);
    }

    float* target = out + row * out_stride + first;
#pragma unroll
    for (int k = 0; k < kSize; ++k) {
      if (!kInverse || first + k < dim) target[k] = v[k];
    }
  }
}

// ---- dense: C = A B with A (n, p) row-major and B = M^T (apply) or M (inverse) -------

constexpr int kDenseTile = 64;         // output tile: kDenseTile rows x kDenseTile columns
constexpr int kDenseTileK = 16;        // depth of one shared-memory k tile
constexpr int kDenseThreadsSide = 16;  // 16 x 16 threads, each computing 4 x 4 outputs
constexpr int kDensePerThread = kDenseTile / kDenseThreadsSide;
constexpr int kDenseThreads = kDenseThreadsSide * kDenseThreadsSide;

// apply   (kTransposeM = true):  out[r][i] = sum_k in[r][k] M[i][k]   (y = M x)
// inverse (kTransposeM = false): out[r][j] = sum_k in[r][k] M[k][j]   (x = M^T y)
// blockIdx.x walks row tiles (grid-stride), blockIdx.y is the column tile.
template <bool kTransposeM>
__global__ void __launch_bounds__(kDenseThreads)
    dense_rotation_kernel(const float* __restrict__ in, float* __restrict__ out, const float* __restrict__ matrix,
                          std::int64_t n, int p) {
  __shared__ float a_tile[kDenseTileK][kDenseTile + 1];  // a_tile[k][row]
  __shared__ float b_tile[kDenseTileK][kDenseTile + 1];  // b_tile[k][column]

  const int tx = threadIdx.x;  // column within the tile (strided by 16)
  const int ty = threadIdx.y;  // row within the tile (strided by 16)
  const int thread = ty * kDenseThreadsSide + tx;
  const int column0 = blockIdx.y * kDenseTile;
  const std::int64_t row_tiles = (n + kDenseTile - 1) / kDenseTile;

  for (std::int64_t row_tile = blockIdx.x; row_tile < row_tiles; row_tile += gridDim.x) {
    const std::int64_t row0 = row_tile * kDenseTile;
    float accumulator[kDensePerThread][kDensePerThread];
#pragma unroll
    for (int i = 0; i < kDensePerThread; ++i)
#pragma unroll
      for (int j = 0; j < kDensePerThread; ++j) accumulator[i][j] = 0.0f;

    for (int k0 = 0; k0 < p; k0 += kDenseTileK) {
      // Each thread loads kDenseTile * kDenseTileK / kDenseThreads = 4 elements of each tile.
#pragma unroll
      for (int load = 0; load < kDenseTile * kDenseTileK / kDenseThreads; ++load) {
        const int index = thread + load * kDenseThreads;
        {  // A: consecutive threads read consecutive k of one row
          const int tile_row = index / kDenseTileK, tile_k = index % kDenseTileK;
          const std::int64_t row = row0 + tile_row;
          const int k = k0 + tile_k;
          a_tile[tile_k][tile_row] = (row < n && k < p) ? in[row * p + k] : 0.0f;
        }
        if (kTransposeM) {  // B[k][c] = M[c][k]: consecutive threads read consecutive k of one M row
          const int tile_column = index / kDenseTileK, tile_k = index % kDenseTileK;
          const int column = column0 + tile_column, k = k0 + tile_k;
          b_tile[tile_k][tile_column] =
              (column < p && k < p) ? __ldg(matrix + static_cast<std::int64_t>(column) * p + k) : 0.0f;
        } else {  // B[k][c] = M[k][c]: consecutive threads read consecutive columns of one M row
          const int tile_column = index % kDenseTile, tile_k = index / kDenseTile;
          const int column = column0 + tile_column, k = k0 + tile_k;
          b_tile[tile_k][tile_column] =
              (column < p && k < p) ? __ldg(matrix + static_cast<std::int64_t>(k) * p + column) : 0.0f;
        }
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kDenseTileK; ++k) {
        float a[kDensePerThread], b[kDensePerThread];
#pragma unroll
        for (int i = 0; i < kDensePerThread; ++i) a[i] = a_tile[k][ty + i * kDenseThreadsSide];
#pragma unroll
        for (int j = 0; j < kDensePerThread; ++j) b[j] = b_tile[k][tx + j * kDenseThreadsSide];
#pragma unroll
        for (int i = 0; i < kDensePerThread; ++i)
#pragma unroll
          for (int j = 0; j < kDensePerThread; ++j) accumulator[i][j] = fmaf(a[i], b[j], accumulator[i][j]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < kDensePerThread; ++i) {
      const std::int64_t row = row0 + ty + i * kDenseThreadsSide;
      if (row >= n) continue;
#pragma unroll
      for (int j = 0; j < kDensePerThread; ++j) {
        const int column = column0 + tx + j * kDenseThreadsSide;
        if (column < p) out[row * p + column] = accumulator[i][j];
      }
    }
  }
}

// ---- hadamard: y = H (s .* pad(x)) * scale, inverse x = (s .* (H y) * scale)[:dim] ---------

constexpr int kHadamardThreads = 256;
constexpr int kHadamardBlockElements = 2048;  // rows per block = max(1, 2048 / p) for small p

// One block transforms rows_per_block whole rows (p = 2^log2_p floats each) in dynamic
// shared memory of rows_per_block * p floats; blockIdx.x walks groups of rows (grid-stride).
template <bool kInverse>
__global__ void __launch_bounds__(kHadamardThreads)
    hadamard_rotation_kernel(const float* __restrict__ in, float* __restrict__ out, const float* __restrict__ signs,
                             std::int64_t n, int dim, int log2_p, int rows_per_block, float scale) {
  extern __shared__ float buffer[];
  const int p = 1 << log2_p;
  const int elements = rows_per_block * p;
  const std::int64_t row_groups = (n + rows_per_block - 1) / rows_per_block;

  for (std::int64_t row_group = blockIdx.x; row_group < row_groups; row_group += gridDim.x) {
    const std::int64_t first_row = row_group * rows_per_block;

    for (int e = threadIdx.x; e < elements; e += blockDim.x) {
      const std::int64_t row = first_row + (e >> log2_p);
      const int j = e & (p - 1);
      float value = 0.0f;
      if (row < n) {
        if (kInverse) {
          value = in[row * p + j];
        } else if (j < dim) {
          value = in[row * dim + j] * __ldg(signs + j);
        }
      }
      buffer[e] = value;
    }
    __syncthreads();

    // Butterflies (a, b) -> (a + b, a - b) on pairs (i, i + h), h = 1, 2, 4, ..., p / 2.
    // Pair q of a stage: i is q with a 0 bit inserted at position log2(h); rows are aligned
    // blocks of p, so a pair never straddles two rows.
    for (int h = 1; h < p; h <<= 1) {
      for (int q = threadIdx.x; q < elements / 2; q += blockDim.x) {
        const int i = ((q & ~(h - 1)) << 1) | (q & (h - 1));
        const float a = buffer[i], b = buffer[i + h];
        buffer[i] = a + b;
        buffer[i + h] = a - b;
      }
      __syncthreads();
    }

    for (int e = threadIdx.x; e < elements; e += blockDim.x) {
      const std::int64_t row = first_row + (e >> log2_p);
      const int j = e & (p - 1);
      if (row >= n) continue;
      if (kInverse) {
        if (j < dim) out[row * dim + j] = buffer[e] * scale * __ldg(signs + j);
      } else {
        out[row * p + j] = buffer[e] * scale;
      }
    }
    __syncthreads();  // the next row group overwrites the buffer
  }
}

// ---- rotor_network: y = (B_{r_Q} (x) ... (x) B_{r_1} (x) H_{2^a}) (s .* pad(x)) * scale -------------
// Stage plan of detail::RotorNetworkPlan, passed by value (kernel parameter space).
struct RotorNetworkStages {
  int num_odd_stages;
  int radix[16];
  int stride[16];
  int block_offset[16];
};

// One group of radix R at buffer[base + l * stride], l < R: v <- B v (forward, canonical fmaf chain
// from +0.0f over l ascending, as the CPU) or v <- B^T v (inverse).
template <int R, bool kTranspose>
__device__ __forceinline__ void rotor_network_group(float* buffer, int base, int stride,
                                                    const float* __restrict__ block) {
  float v[R], y[R];
#pragma unroll
  for (int l = 0; l < R; ++l) v[l] = buffer[base + l * stride];
#pragma unroll
  for (int k = 0; k < R; ++k) {
    float acc = 0.0f;
#pragma unroll
    for (int l = 0; l < R; ++l) acc = fmaf(__ldg(block + (kTranspose ? l * R + k : k * R + l)), v[l], acc);
    y[k] = acc;
  }
#pragma unroll
  for (int k = 0; k < R; ++k) buffer[base + k * stride] = y[k];
}

// One odd stage over the whole shared buffer (rows_per_block rows of p floats; r * stride divides p).
template <bool kTranspose>
__device__ __forceinline__ void rotor_network_odd_stage(float* buffer, int elements, int radix, int stride,
                                                        const float* __restrict__ block) {
  const int groups = elements / radix;
  for (int item = threadIdx.x; item < groups; item += blockDim.x) {
    const int outer = item / stride, t = item - outer * stride;
    const int base = outer * radix * stride + t;
    switch (radix) {
      case 3: rotor_network_group<3, kTranspose>(buffer, base, stride, block); break;
      case 5: rotor_network_group<5, kTranspose>(buffer, base, stride, block); break;
      default: rotor_network_group<7, kTranspose>(buffer, base, stride, block); break;
    }
  }
  __syncthreads();
}

// Butterflies (a, b) -> (a + b, a - b) on pairs (i, i + h), h = 1, ..., butterfly_size / 2: segments of
// butterfly_size are aligned in the buffer (it divides p), so pairs stay inside their segment.
__device__ __forceinline__ void rotor_network_butterflies(float* buffer, int elements, int butterfly_size) {
  for (int h = 1; h < butterfly_size; h <<= 1) {
    for (int q = threadIdx.x; q < elements / 2; q += blockDim.x) {
      const int i = ((q & ~(h - 1)) << 1) | (q & (h - 1));
      const float a = buffer[i], b = buffer[i + h];
      buffer[i] = __fadd_rn(a, b);
      buffer[i + h] = __fsub_rn(a, b);
    }
    __syncthreads();
  }
}

constexpr int kRotorNetworkThreads = 256;
constexpr int kRotorNetworkBlockElements = 2048;  // rows per block = max(1, 2048 / p)

// apply:   in (n, dim) -> out (n, p): s .* pad(x), butterflies, odd stages q = 1..Q, * scale.
// inverse: in (n, p) -> out (n, dim): odd stages q = Q..1 transposed, butterflies, * scale * s, [:dim].
// parameters: p signs then the blocks (rotation.hpp). blockIdx.x walks groups of rows (grid-stride).
template <bool kInverse>
__global__ void __launch_bounds__(kRotorNetworkThreads)
    rotor_network_rotation_kernel(const float* __restrict__ in, float* __restrict__ out,
                                  const float* __restrict__ parameters, std::int64_t n, int dim, int p,
                                  int butterfly_size, int rows_per_block, float scale, RotorNetworkStages stages) {
  extern __shared__ float buffer[];
  const int elements = rows_per_block * p;
  const std::int64_t row_groups = (n + rows_per_block - 1) / rows_per_block;

  for (std::int64_t row_group = blockIdx.x; row_group < row_groups; row_group += gridDim.x) {
    const std::int64_t first_row = row_group * rows_per_block;

    for (int e = threadIdx.x; e < elements; e += blockDim.x) {
      const int local_row = e / p, j = e - local_row * p;
      const std::int64_t row = first_row + local_row;
      float value = 0.0f;
      if (row < n) {
        if (kInverse) {
          value = in[row * p + j];
        } else if (j < dim) {
          value = __fmul_rn(in[row * dim + j], __ldg(parameters + j));
        }
      }
      buffer[e] = value;
    }
    __syncthreads();

    if (kInverse) {
      for (int q = stages.num_odd_stages - 1; q >= 0; --q) {
        rotor_network_odd_stage<true>(buffer, elements, stages.radix[q], stages.stride[q],
                                      parameters + stages.block_offset[q]);
      }
      rotor_network_butterflies(buffer, elements, butterfly_size);
    } else {
      rotor_network_butterflies(buffer, elements, butterfly_size);
      for (int q = 0; q < stages.num_odd_stages; ++q) {
        rotor_network_odd_stage<false>(buffer, elements, stages.radix[q], stages.stride[q],
                                       parameters + stages.block_offset[q]);
      }
    }

    for (int e = threadIdx.x; e < elements; e += blockDim.x) {
      const int local_row = e / p, j = e - local_row * p;
      const std::int64_t row = first_row + local_row;
      if (row >= n) continue;
      if (kInverse) {
        if (j < dim) out[row * dim + j] = buffer[e] * scale * __ldg(parameters + j);
      } else {
        out[row * p + j] = __fmul_rn(buffer[e], scale);
      }
    }
    __syncthreads();  // the next row group overwrites the buffer
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace rotorquant
