// Division of non-negative 32-bit integers below 2^31 by a divisor fixed at launch, as one
// multiply-high and a shift: mul = ceil(2^p / d) with p = 31 + ceil(log2 d), so that
// floor(n / d) = floor(n * mul / 2^p) for every n < 2^31 (the error n * (mul - 2^p / d) / 2^p
// stays below 1 / d). Host and device (the CUDA kernels' token -> (frame, row, column) maps);
// tests/test_layout.cpp (FastDiv.*) checks it against `/`.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SALAD_HD __host__ __device__ __forceinline__
#else
#define SALAD_HD inline
#endif

namespace salad {

struct FastDiv {
  uint32_t d = 1, mul = 0, shr = 0;  // d == 1: n itself

  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor < 1 ? 1 : divisor) {
    if (d == 1) return;
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    const uint32_t p = 31 + l;
    mul = static_cast<uint32_t>(((uint64_t(1) << p) + d - 1) / d);
    shr = p - 32;
  }

  SALAD_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * mul) >> 32);
#endif
    return d == 1 ? n : hi >> shr;
  }
};

}  // namespace salad
