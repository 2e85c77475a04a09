// Splits [0, n) into contiguous ranges run on short-lived std::threads.
// Not OpenMP: torch ships its own OpenMP runtime, and two runtimes in one
// process spin against each other (a 1x256 quantize took 5 ms instead of 30 us).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace convrot::cpu {

// Work below this many element-operations per thread is not worth a thread start.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;

// Calls body(begin, end) over disjoint ranges covering [0, n); work_per_item
// estimates the cost of one item, to decide how many threads pay off.
template <class Body>
void parallel_for(int64_t n, int64_t work_per_item, const Body& body) {
  if (n <= 0) return;
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(1, work_per_item) / kMinWorkPerThread);
  const int64_t threads = std::min({hardware, by_work, n});
  if (threads == 1) {
    body(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads - 1));
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t begin = chunk; begin < n; begin += chunk) {
    pool.emplace_back([&body, begin, end = std::min(n, begin + chunk)] { body(begin, end); });
  }
  body(int64_t(0), std::min(n, chunk));
  for (std::thread& t : pool) t.join();
}

}  // namespace convrot::cpu
