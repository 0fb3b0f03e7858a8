#include "rotorquant/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace rotorquant {
namespace {

std::atomic<int> g_num_threads{0};  // 0: hardware concurrency

int default_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Below this much work (items x cost) a thread is not worth starting.
constexpr std::int64_t kMinWorkPerThread = 1 << 16;

}  // namespace

int num_threads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : default_threads();
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }

void parallel_for(std::int64_t n, std::int64_t cost_per_item,
                  const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (n <= 0) return;
  const std::int64_t cost = std::max<std::int64_t>(cost_per_item, 1);
  const std::int64_t by_work = std::max<std::int64_t>(1, (n * cost) / kMinWorkPerThread);
  const std::int64_t threads = std::min<std::int64_t>({static_cast<std::int64_t>(num_threads()), by_work, n});
  if (threads <= 1) {
    body(0, n);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<std::size_t>(threads - 1));
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](std::int64_t begin, std::int64_t end) {
    try {
      body(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  const std::int64_t chunk = (n + threads - 1) / threads;
  for (std::int64_t t = 1; t < threads; ++t) {
    const std::int64_t begin = t * chunk;
    const std::int64_t end = std::min(n, begin + chunk);
    if (begin >= end) break;
    workers.emplace_back(run, begin, end);
  }
  run(0, std::min(n, chunk));
  for (auto& worker : workers) worker.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace rotorquant
