// A small thread pool-free parallel loop over row ranges, used by every batched
// CPU entry point. Threads are std::thread; the count is global and settable.
#pragma once

#include <cstdint>
#include <functional>

namespace rotorquant {

// Number of worker threads used by batched CPU calls (default: hardware concurrency).
int num_threads();
// n <= 0 restores the default.
void set_num_threads(int n);

// Calls body(begin, end) on disjoint chunks covering [0, n). Runs inline when the
// work is small (n * cost_per_item below a threshold) or one thread is configured.
// Exceptions thrown by body are rethrown in the caller.
void parallel_for(std::int64_t n, std::int64_t cost_per_item,
                  const std::function<void(std::int64_t, std::int64_t)>& body);

}  // namespace rotorquant
