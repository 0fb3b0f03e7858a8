// Host-side API of the CUDA rotation kernels (library target rotorquant::cuda).
//
// No CUDA type appears here: streams are passed as `void*` (a cudaStream_t; nullptr is
// the legacy default stream), data as raw device pointers. A DeviceRotation computes
// exactly the maps of rotorquant::Rotation (rotation.hpp) from its parameters():
//   apply:   in (n, dim)        -> out (n, padded_dim)   (padded input coordinates are 0)
//   inverse: in (n, padded_dim) -> out (n, dim)
// on row-major contiguous float32 arrays in the memory of the object's device, in float32
// arithmetic (results equal the CPU core to ~1e-6 relative).
//
// Calls are asynchronous on the given stream: no host synchronization and no allocation per
// call. Launch errors throw rotorquant::RuntimeError; invalid arguments throw ValueError.
#pragma once

#include <cstdint>
#include <string>

#include "rotorquant/rotation.hpp"

namespace rotorquant {
namespace cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device (never throws).
int device_count() noexcept;

// The device's name (e.g. "NVIDIA H100 80GB HBM3"). Throws ValueError for an index outside
// [0, device_count()), RuntimeError when the query fails.
std::string device_name(int device);

// The CUDA runtime version the library was built with, as "major.minor" (e.g. "13.0").
std::string runtime_version_string();

// Largest padded_dim of a hadamard rotation on the GPU (one row's transform lives in the
// shared memory of one thread block).
constexpr std::int64_t kMaxDeviceHadamardPaddedDim = 8192;
// Largest padded_dim of a rotor_network rotation on the GPU (same reason).
constexpr std::int64_t kMaxDeviceRotorNetworkPaddedDim = 8192;

// A rotation whose parameters live in the memory of one CUDA device.
class DeviceRotation {
 public:
  // Uploads rotation.parameters() to `device` (-1: the caller's current device); the caller's
  // current device is unchanged afterwards. Throws ValueError for a device index outside
  // [0, device_count()) or a hadamard rotation with padded_dim > kMaxDeviceHadamardPaddedDim,
  // RuntimeError when CUDA fails (no device, out of memory...).
  explicit DeviceRotation(const Rotation& rotation, int device = -1);
  ~DeviceRotation();
  DeviceRotation(const DeviceRotation&) = delete;
  DeviceRotation& operator=(const DeviceRotation&) = delete;

  RotationKind kind() const { return kind_; }
  int device() const { return device_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t padded_dim() const { return padded_dim_; }
  std::int64_t num_parameters() const { return num_parameters_; }

  // in: n x dim floats, out: n x padded_dim floats (device pointers, must not overlap).
  // n == 0 is a no-op (null pointers allowed then). `stream` is a cudaStream_t or nullptr.
  void apply(const float* in, float* out, std::int64_t n, void* stream) const;
  // in: n x padded_dim floats, out: n x dim floats (device pointers, must not overlap).
  void inverse(const float* in, float* out, std::int64_t n, void* stream) const;

 private:
  void check_call(const char* what, const float* in, float* out, std::int64_t n) const;

  RotationKind kind_;
  int device_ = 0;
  std::int64_t dim_ = 0;
  std::int64_t padded_dim_ = 0;
  std::int64_t num_parameters_ = 0;
  float* parameters_ = nullptr;  // device memory, num_parameters_ floats (null when there are none)
  int multiprocessor_count_ = 1;
};

}  // namespace cuda
}  // namespace rotorquant
