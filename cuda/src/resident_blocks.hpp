// Launch geometry of the codec kernels (internal): resident blocks per multiprocessor of a kernel, queried once per
// (kernel, device) and cached (the encode launchers run per decode step and per KV head, and an occupancy query is
// host work on that path), and the size of a grid whose warps loop over tiles.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace rotorquant {
namespace cuda {

constexpr int kCachedDevices = 64;

// Blocks of `threads` threads with `dynamic_shared` bytes of dynamic shared memory that fit on one multiprocessor
// of the current device, or `fallback` when the query fails (not cached then: asked again next time). A kernel
// needing more than 48 KB of dynamic shared memory gets its limit raised first (once per device, with the query).
// `cache` is the caller's table for this kernel (0 = not queried yet).
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, int dynamic_shared, int fallback,
                    std::atomic<int> (&cache)[kCachedDevices]) {
  int device = 0;
  const bool cacheable = cudaGetDevice(&device) == cudaSuccess && device >= 0 && device < kCachedDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int blocks = 0;
  if ((dynamic_shared > 48 * 1024 &&
       cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_shared) != cudaSuccess) ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, dynamic_shared) != cudaSuccess ||
      blocks < 1) {
    cudaGetLastError();
    return fallback;
  }
  if (cacheable) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// Blocks of a grid whose warps each take `warp_tiles` / (blocks * warps_per_block) tiles in turn: enough blocks for
// one tile per warp, at most blocks_per_multiprocessor per multiprocessor, at least one.
inline unsigned tile_grid(std::int64_t warp_tiles, int warps_per_block, int multiprocessor_count,
                          int blocks_per_multiprocessor) {
  const std::int64_t blocks = (warp_tiles + warps_per_block - 1) / warps_per_block;
  const std::int64_t cap = static_cast<std::int64_t>(multiprocessor_count) * blocks_per_multiprocessor;
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min(blocks, cap)));
}

}  // namespace cuda
}  // namespace rotorquant
