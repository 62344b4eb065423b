// Wall-clock timing shared by the benchmarking subcommands.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

namespace salad::cli {

inline void sync_device(const at::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

inline double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median wall milliseconds of fn over `iters` runs after `warmup` runs, the device synchronised around each.
inline double median_ms(const std::function<void()>& fn, const at::Device& dev, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn();
  sync_device(dev);
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    sync_device(dev);
    t.push_back(ms_since(t0));
  }
  return median(t);
}

}  // namespace salad::cli
