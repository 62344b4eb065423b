// Small helpers shared by the CPU reference and the fast CPU path.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "salad/layout.h"
#include "salad/params.h"

namespace salad::cpu {

// cos/sin of every (token, channel pair) of the 3-D RoPE, in raster order.
struct RopeTable {
  int64_t L = 0, half = 0;
  std::vector<double> cos, sin;  // (L, D/2)

  RopeTable(const Grid& g, int64_t D, double theta) : L(g.size()), half(D / 2) {
    RopePairs pairs = rope_pairs(D, theta);
    cos.resize(static_cast<size_t>(L * half));
    sin.resize(cos.size());
    for (int64_t t = 0; t < L; ++t) {
      int64_t pos[3];
      token_coords(g, t, &pos[0], &pos[1], &pos[2]);
      for (int64_t m = 0; m < half; ++m) {
        double a = static_cast<double>(pos[pairs.axis[m]]) * pairs.freq[m];
        cos[t * half + m] = std::cos(a);
        sin[t * half + m] = std::sin(a);
      }
    }
  }

  // x <- R_t x (inverse: R_t^T x), consecutive channel pairs rotated.
  template <class T>
  void apply(int64_t t, T* x, bool inverse = false) const {
    const double* c = &cos[t * half];
    const double* s = &sin[t * half];
    for (int64_t m = 0; m < half; ++m) {
      T sn = static_cast<T>(inverse ? -s[m] : s[m]), cs = static_cast<T>(c[m]);
      T x0 = x[2 * m], x1 = x[2 * m + 1];
      x[2 * m] = x0 * cs - x1 * sn;
      x[2 * m + 1] = x0 * sn + x1 * cs;
    }
  }
};

// Linear-attention feature map phi over the D channels of one row (torch:
// relu / elu(x)+1 / softmax(x, -1)).
template <class T>
void feature_map(FeatureMap f, const T* x, T* y, int64_t D) {
  switch (f) {
    case FeatureMap::Relu:
      for (int64_t d = 0; d < D; ++d) y[d] = x[d] > T(0) || x[d] != x[d] ? x[d] : T(0);  // NaN stays NaN, as torch.relu
      break;
    case FeatureMap::Elu1:
      for (int64_t d = 0; d < D; ++d) y[d] = x[d] > T(0) ? x[d] + T(1) : std::exp(x[d]);
      break;
    case FeatureMap::Softmax: {
      T m = x[0];
      for (int64_t d = 1; d < D; ++d) m = x[d] > m ? x[d] : m;
      T sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += (y[d] = std::exp(x[d] - m));
      for (int64_t d = 0; d < D; ++d) y[d] /= sum;
      break;
    }
  }
}

// Given x, phi(x) = y and g = dL/dy, writes dL/dx into dx.
template <class T>
void feature_map_backward(FeatureMap f, const T* x, const T* y, const T* g, T* dx, int64_t D) {
  switch (f) {
    case FeatureMap::Relu:
      for (int64_t d = 0; d < D; ++d) dx[d] = x[d] > T(0) ? g[d] : T(0);
      break;
    case FeatureMap::Elu1:
      for (int64_t d = 0; d < D; ++d) dx[d] = x[d] > T(0) ? g[d] : g[d] * y[d];
      break;
    case FeatureMap::Softmax: {
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += y[d] * g[d];
      for (int64_t d = 0; d < D; ++d) dx[d] = y[d] * (g[d] - dot);
      break;
    }
  }
}

// Strided row of a (B, H, L, D) input.
template <class T>
inline const T* row(const void* base, const int64_t* st, int64_t b, int64_t h, int64_t t) {
  return static_cast<const T*>(base) + b * st[0] + h * st[1] + t * st[2];
}

}  // namespace salad::cpu
