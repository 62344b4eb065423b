// Naive formulas of the SALAD operator in plain LibTorch ops, shared by the
// CPU and CUDA tests (any dtype and device; differentiable through autograd).
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "salad/layout.h"
#include "salad/salad.h"

namespace salad::testing {

// Wan's 3-D RoPE written again with tensor ops (independent of RopeTable).
inline at::Tensor rope_naive(const at::Tensor& x, const Grid& g, double theta = 10000.0) {
  const int64_t D = x.size(-1), s = 2 * (D / 6), dims[3] = {D - 2 * s, s, s}, L = g.size();
  auto opts = at::TensorOptions().dtype(at::kDouble).device(x.device());
  const at::Tensor t = at::arange(L, opts.dtype(at::kLong));
  const at::Tensor pos[3] = {at::div(t, g.h * g.w, "floor"), at::div(t, g.w, "floor").remainder(g.h), t.remainder(g.w)};
  std::vector<at::Tensor> angles;
  for (int a = 0; a < 3; ++a) {
    const at::Tensor freq = 1.0 / at::pow(theta, at::arange(0, dims[a], 2, opts) / static_cast<double>(dims[a]));
    angles.push_back(at::outer(pos[a].to(at::kDouble), freq));
  }
  const at::Tensor ang = at::cat(angles, 1);  // (L, D/2)
  const at::Tensor c = ang.cos().to(x.scalar_type()), sn = ang.sin().to(x.scalar_type());
  const at::Tensor xp = x.unflatten(-1, {D / 2, 2});
  const at::Tensor x0 = xp.select(-1, 0), x1 = xp.select(-1, 1);
  return at::stack({x0 * c - x1 * sn, x0 * sn + x1 * c}, -1).flatten(-2);
}

inline at::Tensor phi_naive(const at::Tensor& x, FeatureMap f) {
  switch (f) {
    case FeatureMap::Relu: return at::relu(x);
    case FeatureMap::Elu1: return at::elu(x) + 1;
    case FeatureMap::Softmax: return at::softmax(x, -1);
  }
  return x;
}

// Mask (B, H, L, L) in raster token order from a block table.
inline at::Tensor mask_from_table(const at::Tensor& idx_any, const at::Tensor& cnt_any, const Grid& g, const Options& o) {
  const at::Tensor idx = idx_any.cpu(), cnt = cnt_any.cpu();
  const int64_t B = idx.size(0), H = idx.size(1), L = g.size(), max_k = idx.size(3);
  const std::vector<int64_t> order = token_order(g, o);
  at::Tensor m = at::zeros({B, H, L, L}, at::kBool);
  auto ia = idx.accessor<int32_t, 4>();
  auto ca = cnt.accessor<int32_t, 3>();
  auto ma = m.accessor<bool, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t p = 0; p < L; ++p)
        for (int32_t c = 0; c < ca[b][h][p / o.block_q]; ++c) {
          EXPECT_LT(c, max_k);
          const int64_t j = ia[b][h][p / o.block_q][c];
          for (int64_t pk = j * o.block_k; pk < std::min(L, (j + 1) * o.block_k); ++pk) ma[b][h][order[p]][order[pk]] = true;
        }
  return m.to(idx_any.device());
}

struct Naive {
  at::Tensor o_s, lse, o_l;
};
inline Naive naive(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Grid& g, const Options& o,
            const at::Tensor& mask) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const at::Tensor qr = rope_naive(q, g), kr = rope_naive(k, g);
  at::Tensor s = at::matmul(qr, kr.transpose(-1, -2)) * scale;
  if (mask.defined()) s = s.masked_fill(mask.logical_not(), -INFINITY);
  Naive n;
  n.o_s = at::matmul(at::softmax(s, -1), v);
  n.lse = at::logsumexp(s, -1);
  const at::Tensor pq = phi_naive(q, o.feature), pk = phi_naive(k, o.feature);
  const at::Tensor a = o.linear_rope ? rope_naive(pq, g) : pq, c = o.linear_rope ? rope_naive(pk, g) : pk;
  const at::Tensor den = at::matmul(pq, pk.sum(-2, true).transpose(-1, -2)) + o.eps;  // (B, H, L, 1)
  n.o_l = at::matmul(a, at::matmul(c.transpose(-1, -2), v)) / den;
  return n;
}


}  // namespace salad::testing
