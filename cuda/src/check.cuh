// Error checking and device switching for the CUDA host code (internal).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "rotorquant/error.hpp"

namespace rotorquant {
namespace cuda {
namespace detail {

// Throws RuntimeError "<context>: <expression> failed: <error name>: <error string>".
inline void throw_cuda_error(cudaError_t error, const char* expression, const char* context) {
  throw RuntimeError(std::string(context) + ": " + expression + " failed: " + cudaGetErrorName(error) + ": " +
                     cudaGetErrorString(error));
}

// Checks a launch: cudaGetLastError() after the kernel launch (clears a non-sticky error).
inline void check_launch(const char* context) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw_cuda_error(error, "kernel launch", context);
}

// The device a constructor works on: `device`, or the current one for -1. RuntimeError without any device,
// ValueError for an index out of range (device.cu).
int resolve_device(int device, const char* context);
// The device's streaming multiprocessor count (at least 1), for grid sizing (device.cu).
int multiprocessor_count(int device, const char* context);

// Makes `device` current for its lifetime and restores the caller's device afterwards.
class ScopedDevice {
 public:
  ScopedDevice(int device, const char* context) {
    const cudaError_t get_error = cudaGetDevice(&previous_);
    if (get_error != cudaSuccess) throw_cuda_error(get_error, "cudaGetDevice", context);
    if (previous_ != device) {
      const cudaError_t set_error = cudaSetDevice(device);
      if (set_error != cudaSuccess) throw_cuda_error(set_error, "cudaSetDevice", context);
      switched_ = true;
    }
  }
  ~ScopedDevice() {
    if (switched_) cudaSetDevice(previous_);  // best effort: destructors must not throw
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// The non-throwing counterpart for releasing device memory (destructors, release() noexcept): runs `free_buffers`
// with `device` current, restores the caller's device and clears any error, so none is left to the caller's next
// check. Does nothing when the runtime is unusable (e.g. shutting down): nothing can be freed then.
template <typename FreeBuffers>
void release_on_device(int device, FreeBuffers&& free_buffers) noexcept {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  if (previous != device) cudaSetDevice(device);
  free_buffers();
  if (previous != device) cudaSetDevice(previous);
  cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace rotorquant

// Evaluates a cudaError_t expression and throws rotorquant::RuntimeError naming `context`
// (a C string, e.g. the calling function) when it is not cudaSuccess.
#define ROTORQUANT_CUDA_CHECK(expression, context)                                              \
  do {                                                                                         \
    const cudaError_t rotorquant_cuda_error_ = (expression);                                   \
    if (rotorquant_cuda_error_ != cudaSuccess)                                                 \
      ::rotorquant::cuda::detail::throw_cuda_error(rotorquant_cuda_error_, #expression, (context)); \
  } while (0)
