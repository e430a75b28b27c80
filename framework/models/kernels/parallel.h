// The kernels' one way to use the cores (framework/models/kernels/__init__.py builds them): plain threads started
// per call (~0.1 ms each). Not OpenMP, whose idle threads spin and took the cores from MindSpore's own kernels
// (EfficientNet-B2: 38-42 img/s against 52 with these), nor OpenBLAS's pool, whose threads spin after each product.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

// body(first, last) over [0, count) in contiguous slices, one per core, each at least `grain` long
template <typename Body>
void parallel_slices(int64_t count, int64_t grain, Body body) {
  const int64_t cores = std::thread::hardware_concurrency();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(cores, count / grain));
  std::vector<std::thread> threads;
  for (int64_t worker = 1; worker < workers; ++worker) {
    threads.emplace_back(body, worker * count / workers, (worker + 1) * count / workers);
  }
  body(0, count / workers);
  for (auto &thread : threads) thread.join();
}

// body(i) for every i in [0, count), split as parallel_slices does
template <typename Body>
void parallel_for(int64_t count, Body body) {
  parallel_slices(count, 1, [&body](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) body(i);
  });
}
