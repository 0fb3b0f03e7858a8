// Device queries of the CUDA backend.
#include <cuda_runtime.h>

#include <string>

#include "check.cuh"
#include "rotorquant/cuda/rotation.hpp"
#include "rotorquant/error.hpp"

namespace rotorquant {
namespace cuda {

int device_count() noexcept {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the error so later calls start clean
    return 0;
  }
  return count;
}

namespace detail {

int resolve_device(int device, const char* context) {
  const int count = device_count();
  if (count == 0) {
    throw RuntimeError(std::string(context) + ": no CUDA device is available (cudaGetDeviceCount found none)");
  }
  if (device == -1) {
    ROTORQUANT_CUDA_CHECK(cudaGetDevice(&device), context);
  } else if (device < 0 || device >= count) {
    throw ValueError(rotorquant::detail::expected_got(std::string(context) + ": device",
                                                      "-1 (current) or an index in [0, " + std::to_string(count) + ")",
                                                      std::to_string(device)));
  }
  return device;
}

int multiprocessor_count(int device, const char* context) {
  int count = 0;
  ROTORQUANT_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), context);
  return count > 1 ? count : 1;
}

}  // namespace detail

std::string device_name(int device) {
  const int count = device_count();
  if (device < 0 || device >= count) {
    throw ValueError(rotorquant::detail::expected_got(
        "cuda::device_name: device", "an index in [0, " + std::to_string(count) + ")", std::to_string(device)));
  }
  cudaDeviceProp properties{};
  ROTORQUANT_CUDA_CHECK(cudaGetDeviceProperties(&properties, device), "cuda::device_name");
  return std::string(properties.name);
}

std::string runtime_version_string() {
  // CUDART_VERSION = 1000 * major + 10 * minor: the runtime linked into this library.
  const int version = CUDART_VERSION;
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

}  // namespace cuda
}  // namespace rotorquant
