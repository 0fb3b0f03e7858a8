// DeviceRotation: rotorquant::Rotation's parameters on a CUDA device and the launches of
// the rotation kernels (rotation_kernels.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "check.cuh"
#include "rotation_kernels.cuh"
#include "rotorquant/cuda/rotation.hpp"
#include "rotorquant/detail/rotor_network.hpp"
#include "rotorquant/error.hpp"

namespace rotorquant {
namespace cuda {

namespace {

constexpr int kBlockThreads = 256;
constexpr int kBlocksPerMultiprocessor = 32;  // grid cap; kernels loop (grid-stride) beyond it

using rotorquant::detail::expected_got;

// Number of floats rotorquant::Rotation::parameters() holds for a kind (the contract in rotation.hpp).
std::int64_t expected_parameter_count(RotationKind kind, std::int64_t padded_dim) {
  switch (kind) {
    case RotationKind::kIdentity: return 0;
    case RotationKind::kDense: return padded_dim * padded_dim;
    case RotationKind::kHadamard: return padded_dim;
    case RotationKind::kRotor3: return 4 * (padded_dim / 3);
    case RotationKind::kPlanar: return 2 * (padded_dim / 2);
    case RotationKind::kQuat: return 8 * (padded_dim / 4);
    case RotationKind::kRotorNetwork: return rotorquant::detail::rotor_network_plan(padded_dim).num_parameters;
  }
  return -1;
}

unsigned grid_size(std::int64_t work_items, std::int64_t items_per_block, int multiprocessor_count) {
  const std::int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  const std::int64_t cap = static_cast<std::int64_t>(multiprocessor_count) * kBlocksPerMultiprocessor;
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min(blocks, cap)));
}

int log2_exact(std::int64_t power_of_two) {
  int log2 = 0;
  while ((std::int64_t{1} << log2) < power_of_two) ++log2;
  return log2;
}

template <class Block, bool kInverse>
void launch_block_rotation(const float* in, float* out, const float* parameters, std::int64_t n, std::int64_t dim,
                           std::int64_t padded_dim, int multiprocessor_count, cudaStream_t stream) {
  const std::int64_t items = n * (padded_dim / Block::kSize);
  const unsigned blocks = grid_size(items, kBlockThreads, multiprocessor_count);
  kernels::block_rotation_kernel<Block, kInverse>
      <<<blocks, kBlockThreads, 0, stream>>>(in, out, parameters, n, dim, padded_dim);
}

template <bool kInverse>
void launch_dense_rotation(const float* in, float* out, const float* matrix, std::int64_t n, std::int64_t padded_dim,
                           int multiprocessor_count, cudaStream_t stream) {
  const std::int64_t row_tiles = (n + kernels::kDenseTile - 1) / kernels::kDenseTile;
  const std::int64_t column_tiles = (padded_dim + kernels::kDenseTile - 1) / kernels::kDenseTile;
  // Row tiles on x (grid-stride beyond the cap), column tiles on y (padded_dim <= 16384: <= 256 tiles).
  const std::int64_t row_cap = std::max<std::int64_t>(
      1, static_cast<std::int64_t>(multiprocessor_count) * kBlocksPerMultiprocessor * 8 / column_tiles);
  const dim3 grid(static_cast<unsigned>(std::min(row_tiles, row_cap)), static_cast<unsigned>(column_tiles));
  const dim3 block(kernels::kDenseThreadsSide, kernels::kDenseThreadsSide);
  // apply multiplies by M (reads M transposed as the B operand), inverse by M^T.
  kernels::dense_rotation_kernel<!kInverse>
      <<<grid, block, 0, stream>>>(in, out, matrix, n, static_cast<int>(padded_dim));
}

template <bool kInverse>
void launch_hadamard_rotation(const float* in, float* out, const float* signs, std::int64_t n, std::int64_t dim,
                              std::int64_t padded_dim, int multiprocessor_count, cudaStream_t stream) {
  const int rows_per_block =
      static_cast<int>(std::max<std::int64_t>(1, kernels::kHadamardBlockElements / padded_dim));
  const std::int64_t row_groups = (n + rows_per_block - 1) / rows_per_block;
  const unsigned blocks = grid_size(row_groups, 1, multiprocessor_count);
  const std::size_t shared_bytes = static_cast<std::size_t>(rows_per_block) * padded_dim * sizeof(float);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(padded_dim)));
  kernels::hadamard_rotation_kernel<kInverse><<<blocks, kernels::kHadamardThreads, shared_bytes, stream>>>(
      in, out, signs, n, static_cast<int>(dim), log2_exact(padded_dim), rows_per_block, scale);
}

template <bool kInverse>
void launch_rotor_network_rotation(const float* in, float* out, const float* parameters, std::int64_t n,
                                   std::int64_t dim, std::int64_t padded_dim, int multiprocessor_count,
                                   cudaStream_t stream) {
  const rotorquant::detail::RotorNetworkPlan plan = rotorquant::detail::rotor_network_plan(padded_dim);
  kernels::RotorNetworkStages stages{};
  stages.num_odd_stages = plan.num_odd_stages;
  for (int q = 0; q < plan.num_odd_stages; ++q) {
    stages.radix[q] = plan.radix[q];
    stages.stride[q] = static_cast<int>(plan.stride[q]);
    stages.block_offset[q] = static_cast<int>(plan.block_offset[q]);
  }
  const int rows_per_block =
      static_cast<int>(std::max<std::int64_t>(1, kernels::kRotorNetworkBlockElements / padded_dim));
  const std::int64_t row_groups = (n + rows_per_block - 1) / rows_per_block;
  const unsigned blocks = grid_size(row_groups, 1, multiprocessor_count);
  const std::size_t shared_bytes = static_cast<std::size_t>(rows_per_block) * padded_dim * sizeof(float);
  kernels::rotor_network_rotation_kernel<kInverse><<<blocks, kernels::kRotorNetworkThreads, shared_bytes, stream>>>(
      in, out, parameters, n, static_cast<int>(dim), static_cast<int>(padded_dim),
      static_cast<int>(plan.butterfly_size), rows_per_block, plan.scale, stages);
}

}  // namespace

DeviceRotation::DeviceRotation(const Rotation& rotation, int device)
    : kind_(rotation.kind()),
      dim_(rotation.dim()),
      padded_dim_(rotation.padded_dim()),
      num_parameters_(rotation.num_parameters()) {
  const char* context = "cuda::DeviceRotation";
  const std::int64_t expected = expected_parameter_count(kind_, padded_dim_);
  if (expected != num_parameters_) {
    throw RuntimeError(expected_got(std::string(context) + ": " + rotation.kind_name() + " parameter count",
                                    std::to_string(expected), std::to_string(num_parameters_)));
  }
  if ((kind_ == RotationKind::kDense || kind_ == RotationKind::kIdentity) && dim_ != padded_dim_) {
    throw RuntimeError(expected_got(std::string(context) + ": " + rotation.kind_name() + " padded_dim",
                                    "dim = " + std::to_string(dim_), std::to_string(padded_dim_)));
  }
  if (kind_ == RotationKind::kHadamard &&
      (padded_dim_ > kMaxDeviceHadamardPaddedDim || (padded_dim_ & (padded_dim_ - 1)) != 0)) {
    throw ValueError(expected_got(std::string(context) + ": hadamard padded_dim on the GPU",
                                  "a power of two <= " + std::to_string(kMaxDeviceHadamardPaddedDim) +
                                      " (one row's transform must fit in a thread block's shared memory)",
                                  std::to_string(padded_dim_)));
  }
  if (kind_ == RotationKind::kRotorNetwork && padded_dim_ > kMaxDeviceRotorNetworkPaddedDim) {
    throw ValueError(expected_got(std::string(context) + ": rotor_network padded_dim on the GPU",
                                  "<= " + std::to_string(kMaxDeviceRotorNetworkPaddedDim) +
                                      " (one row's transform must fit in a thread block's shared memory)",
                                  std::to_string(padded_dim_)));
  }

  device_ = detail::resolve_device(device, context);

  detail::ScopedDevice scoped_device(device_, context);
  multiprocessor_count_ = detail::multiprocessor_count(device_, context);
  if (num_parameters_ > 0) {
    const std::size_t bytes = static_cast<std::size_t>(num_parameters_) * sizeof(float);
    ROTORQUANT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&parameters_), bytes), context);
    const cudaError_t copy_error =
        cudaMemcpy(parameters_, rotation.parameters().data(), bytes, cudaMemcpyHostToDevice);
    if (copy_error != cudaSuccess) {
      cudaFree(parameters_);
      parameters_ = nullptr;
      detail::throw_cuda_error(copy_error, "cudaMemcpy(parameters)", context);
    }
  }
}

DeviceRotation::~DeviceRotation() {
  if (parameters_ == nullptr) return;
  // Best effort, never throws: cudaFree waits for kernels still reading the parameters.
  detail::release_on_device(device_, [this] { cudaFree(parameters_); });
}

void DeviceRotation::check_call(const char* what, const float* in, float* out, std::int64_t n) const {
  if (n < 0) throw ValueError(expected_got(std::string(what) + ": n", ">= 0", std::to_string(n)));
  if (n > 0 && (in == nullptr || out == nullptr)) {
    throw ValueError(expected_got(std::string(what) + ": device pointers", "non-null when n > 0",
                                  in == nullptr ? "a null input pointer" : "a null output pointer"));
  }
}

namespace {

// One launch of the kind's kernel, forward (apply) or transposed (inverse); the identity is a copy.
template <bool kInverse>
void launch_rotation(RotationKind kind, const float* parameters, const float* in, float* out, std::int64_t n,
                     std::int64_t dim, std::int64_t padded_dim, int multiprocessor_count, cudaStream_t stream,
                     const char* context) {
  switch (kind) {
    case RotationKind::kIdentity:
      ROTORQUANT_CUDA_CHECK(cudaMemcpyAsync(out, in, static_cast<std::size_t>(n * dim) * sizeof(float),
                                            cudaMemcpyDeviceToDevice, stream),
                            context);
      return;
    case RotationKind::kDense:
      launch_dense_rotation<kInverse>(in, out, parameters, n, padded_dim, multiprocessor_count, stream);
      break;
    case RotationKind::kHadamard:
      launch_hadamard_rotation<kInverse>(in, out, parameters, n, dim, padded_dim, multiprocessor_count, stream);
      break;
    case RotationKind::kRotor3:
      launch_block_rotation<kernels::Rotor3Block, kInverse>(in, out, parameters, n, dim, padded_dim,
                                                            multiprocessor_count, stream);
      break;
    case RotationKind::kPlanar:
      launch_block_rotation<kernels::PlanarBlock, kInverse>(in, out, parameters, n, dim, padded_dim,
                                                            multiprocessor_count, stream);
      break;
    case RotationKind::kQuat:
      launch_block_rotation<kernels::QuaternionBlock, kInverse>(in, out, parameters, n, dim, padded_dim,
                                                                multiprocessor_count, stream);
      break;
    case RotationKind::kRotorNetwork:
      launch_rotor_network_rotation<kInverse>(in, out, parameters, n, dim, padded_dim, multiprocessor_count, stream);
      break;
  }
  detail::check_launch(context);
}

}  // namespace

void DeviceRotation::apply(const float* in, float* out, std::int64_t n, void* stream) const {
  const char* context = "cuda::DeviceRotation::apply";
  check_call(context, in, out, n);
  if (n == 0) return;
  detail::ScopedDevice scoped_device(device_, context);
  launch_rotation<false>(kind_, parameters_, in, out, n, dim_, padded_dim_, multiprocessor_count_,
                         static_cast<cudaStream_t>(stream), context);
}

void DeviceRotation::inverse(const float* in, float* out, std::int64_t n, void* stream) const {
  const char* context = "cuda::DeviceRotation::inverse";
  check_call(context, in, out, n);
  if (n == 0) return;
  detail::ScopedDevice scoped_device(device_, context);
  launch_rotation<true>(kind_, parameters_, in, out, n, dim_, padded_dim_, multiprocessor_count_,
                        static_cast<cudaStream_t>(stream), context);
}

}  // namespace cuda
}  // namespace rotorquant
