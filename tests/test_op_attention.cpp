// The SALAD operator on CPU through LibTorch: the float64 reference against a
// naive formula built from plain LibTorch ops, the fast path against the
// reference, and the analytic backward against central finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "naive.h"
#include "salad/layout.h"
#include "salad/salad.h"

using namespace salad;
using namespace salad::testing;
namespace {

at::Tensor rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm().clamp_min(1e-300);
}
double rel(const at::Tensor& a, const at::Tensor& b) { return rel_err(a, b).item<double>(); }

struct Case {
  int64_t B, H, D;
  Grid g;
  Options o;
};

std::vector<Case> forward_cases() {
  std::vector<Case> cs;
  auto add = [&](int64_t B, int64_t H, int64_t D, Grid g, Mode m, Pattern p, FeatureMap f, double keep, int64_t bq,
                 int64_t bk, bool tile, bool lrope = true) {
    Case c{B, H, D, g, {}};
    c.o.mode = m, c.o.pattern = p, c.o.feature = f, c.o.keep = keep, c.o.block_q = bq, c.o.block_k = bk;
    c.o.linear_rope = lrope;
    if (tile) c.o.tile_order = true, c.o.tile = {1, 2, 3};
    c.o.window = {1, 1, 1};
    cs.push_back(c);
  };
  const Grid g1{3, 5, 7};  // L = 105: not a multiple of any block size
  add(2, 3, 64, g1, Mode::Dense, Pattern::TopK, FeatureMap::Relu, 0.1, 16, 8, false);
  add(2, 3, 64, g1, Mode::Sparse, Pattern::TopK, FeatureMap::Relu, 0.05, 16, 8, false);
  add(2, 3, 64, g1, Mode::Sparse, Pattern::TopK, FeatureMap::Relu, 0.1, 16, 8, true);
  add(2, 3, 128, g1, Mode::Salad, Pattern::TopK, FeatureMap::Relu, 0.1, 16, 8, false);
  add(2, 3, 64, g1, Mode::Salad, Pattern::TopK, FeatureMap::Elu1, 0.5, 32, 16, true);
  add(2, 3, 128, g1, Mode::Salad, Pattern::TopK, FeatureMap::Softmax, 0.05, 16, 8, false);
  add(2, 3, 64, g1, Mode::Salad, Pattern::Window, FeatureMap::Relu, 0.1, 8, 8, true);
  add(2, 3, 64, g1, Mode::Sparse, Pattern::Window, FeatureMap::Relu, 0.1, 16, 8, false);
  add(1, 2, 64, g1, Mode::Salad, Pattern::TopK, FeatureMap::Relu, 0.1, 16, 8, false, false);
  return cs;
}

std::string name(const Case& c) {
  std::ostringstream s;
  s << to_string(c.o.mode) << "/" << to_string(c.o.pattern) << "/" << to_string(c.o.feature) << " keep " << c.o.keep
    << " D " << c.D << " tile " << c.o.tile_order << " lrope " << c.o.linear_rope;
  return s.str();
}

}  // namespace

TEST(Reference, MatchesNaiveLibTorchFormulaInFloat64) {
  torch::manual_seed(0);
  for (const Case& c : forward_cases()) {
    SCOPED_TRACE(name(c));
    const int64_t L = c.g.size();
    auto opts = at::TensorOptions().dtype(at::kDouble);
    const at::Tensor q = at::randn({c.B, c.H, L, c.D}, opts), k = at::randn({c.B, c.H, L, c.D}, opts),
                     v = at::randn({c.B, c.H, L, c.D}, opts);
    const AttentionOutput out = attention(q, k, v, c.g, c.o, Impl::Reference);
    at::Tensor mask;
    if (c.o.mode != Mode::Dense) mask = mask_from_table(out.block_idx, out.block_cnt, c.g, c.o);
    const Naive n = naive(q, k, v, c.g, c.o, mask);
    EXPECT_LT(rel(out.o_s, n.o_s), 1e-10);
    EXPECT_LT(rel(out.lse, n.lse), 1e-6);  // lse is stored in float32
    if (c.o.mode == Mode::Salad) EXPECT_LT(rel(out.o_l, n.o_l), 1e-10);
    else EXPECT_EQ(out.o_l.numel(), 0);
    if (c.o.mode == Mode::Sparse || c.o.mode == Mode::Salad) {
      const BlockShape bs = [&] { Params p; p.L = L; p.opt = c.o; return p.blocks(); }();
      ASSERT_EQ(out.block_idx.sizes(), (std::vector<int64_t>{c.B, c.H, bs.n_q, bs.max_k}));
      if (c.o.pattern == Pattern::TopK) {
        EXPECT_TRUE(out.block_cnt.eq(bs.max_k).all().item<bool>());
        // The selected set equals the top-k of mean-pooled scores computed with tensor ops.
        const std::vector<int64_t> order = token_order(c.g, c.o);
        const at::Tensor ord = at::tensor(order, at::kLong);
        const at::Tensor qr = rope_naive(q, c.g).index_select(2, ord), kr = rope_naive(k, c.g).index_select(2, ord);
        auto pool = [&](const at::Tensor& x, int64_t bsz, int64_t nb) {
          std::vector<at::Tensor> m;
          for (int64_t i = 0; i < nb; ++i) m.push_back(x.slice(2, i * bsz, std::min(L, (i + 1) * bsz)).mean(2));
          return at::stack(m, 2);
        };
        const at::Tensor S = at::matmul(pool(qr, c.o.block_q, bs.n_q), pool(kr, c.o.block_k, bs.n_k).transpose(-1, -2));
        const at::Tensor want = std::get<0>(S.topk(bs.max_k, -1)).select(-1, bs.max_k - 1);  // k-th largest score
        const at::Tensor got_min = S.gather(-1, out.block_idx.to(at::kLong)).amin(-1);
        EXPECT_TRUE(at::allclose(got_min, want, 0, 1e-12));
      }
    }
  }
}

TEST(Reference, KeepOneSparseEqualsDense) {
  torch::manual_seed(1);
  const Grid g{2, 5, 7};
  for (bool tile : {false, true}) {
    Options o;
    o.block_q = 16, o.block_k = 8, o.keep = 1.0;
    if (tile) o.tile_order = true, o.tile = {2, 2, 2};
    auto opts = at::TensorOptions().dtype(at::kDouble);
    const at::Tensor q = at::randn({2, 3, 70, 64}, opts), k = at::randn_like(q), v = at::randn_like(q);
    o.mode = Mode::Sparse;
    const AttentionOutput s = attention(q, k, v, g, o, Impl::Reference);
    o.mode = Mode::Dense;
    const AttentionOutput d = attention(q, k, v, g, o, Impl::Reference);
    EXPECT_LT(rel(s.o_s, d.o_s), 1e-13);
    EXPECT_TRUE(at::allclose(s.lse, d.lse, 1e-6, 1e-6));
    const AttentionOutput fs = attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), g, o, Impl::Fast);
    EXPECT_LT(rel(fs.o_s, d.o_s), 1e-5);
  }
}

TEST(Fast, MatchesFloat32ReferenceOnRandomShapes) {
  torch::manual_seed(2);
  for (const Case& c : forward_cases()) {
    SCOPED_TRACE(name(c));
    const int64_t L = c.g.size();
    const at::Tensor q = at::randn({c.B, c.H, L, c.D}), k = at::randn_like(q), v = at::randn_like(q);
    const AttentionOutput r = attention(q, k, v, c.g, c.o, Impl::Reference);
    const AttentionOutput f = attention(q, k, v, c.g, c.o, Impl::Fast);
    if (c.o.mode != Mode::Dense) ASSERT_TRUE(at::equal(r.block_idx, f.block_idx));
    EXPECT_LT(rel(f.o_s, r.o_s), 1e-5);
    EXPECT_LT(rel(f.lse, r.lse), 1e-5);
    if (c.o.mode == Mode::Salad) EXPECT_LT(rel(f.o_l, r.o_l), 1e-5);
  }
}

TEST(Fast, AcceptsStridedHeadsLikeTheLayerPasses) {
  torch::manual_seed(3);
  const Grid g{2, 4, 6};
  const at::Tensor x = at::randn({2, 48, 3, 64});  // (B, L, H, D) as a projection gives it
  const at::Tensor q = x.transpose(1, 2), k = (x * 0.5).transpose(1, 2), v = (x + 1).transpose(1, 2);
  Options o;
  o.block_q = 16, o.block_k = 8;
  const AttentionOutput a = attention(q, k, v, g, o, Impl::Fast);
  const AttentionOutput b = attention(q.contiguous(), k.contiguous(), v.contiguous(), g, o, Impl::Reference);
  EXPECT_LT(rel(a.o_s, b.o_s), 1e-5);
  EXPECT_LT(rel(a.o_l, b.o_l), 1e-5);
}

// The token-major hint is for the CUDA kernels: on the CPU the outputs stay contiguous and equal.
TEST(Fast, TokenMajorHintLeavesCpuOutputsContiguous) {
  torch::manual_seed(4);
  const Grid g{2, 4, 6};
  const at::Tensor q = at::randn({2, 3, 48, 64}), k = at::randn_like(q), v = at::randn_like(q);
  Options o;
  o.block_q = 16, o.block_k = 8;
  torch::NoGradGuard ng;
  const AttentionOutput a = attention(q, k, v, g, o, Impl::Auto, /*token_major=*/true);
  const AttentionOutput b = attention(q, k, v, g, o);
  EXPECT_TRUE(a.o_s.is_contiguous() && a.o_l.is_contiguous());
  EXPECT_TRUE(at::equal(a.o_s, b.o_s) && at::equal(a.o_l, b.o_l));
}

namespace {
// Loss = <o_s, w_s> + <o_l, w_l>; analytic gradients through autograd.
struct GradCase {
  Options o;
  const char* label;
};

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> cs;
  auto base = [] {
    Options o;
    o.block_q = 8, o.block_k = 4, o.keep = 0.5;
    return o;
  };
  Options o = base();
  o.mode = Mode::Dense;
  cs.push_back({o, "dense"});
  for (Pattern p : {Pattern::TopK, Pattern::Window}) {
    o = base();
    o.mode = Mode::Sparse, o.pattern = p;
    cs.push_back({o, p == Pattern::TopK ? "sparse topk" : "sparse window"});
    for (FeatureMap f : {FeatureMap::Relu, FeatureMap::Elu1, FeatureMap::Softmax}) {
      o.mode = Mode::Salad, o.feature = f;
      cs.push_back({o, "salad"});
    }
  }
  o = base();
  o.linear_rope = false, o.feature = FeatureMap::Elu1;
  cs.push_back({o, "salad no linear rope"});
  o = base();
  o.tile_order = true, o.tile = {1, 2, 2}, o.feature = FeatureMap::Softmax;
  cs.push_back({o, "salad tile order"});
  return cs;
}
}  // namespace

TEST(Backward, AnalyticMatchesCentralFiniteDifferencesInFloat64) {
  torch::manual_seed(4);
  const Grid g{2, 3, 4};
  const int64_t B = 1, H = 2, L = 24, D = 8;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  for (const GradCase& gc : grad_cases()) {
    SCOPED_TRACE(std::string(gc.label) + " " + to_string(gc.o.feature));
    at::Tensor q = at::randn({B, H, L, D}, opts).requires_grad_(), k = at::randn({B, H, L, D}, opts).requires_grad_(),
               v = at::randn({B, H, L, D}, opts).requires_grad_();
    const at::Tensor ws = at::randn({B, H, L, D}, opts), wl = at::randn({B, H, L, D}, opts);
    auto loss = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
      AttentionOutput out = attention(a, b, c, g, gc.o, Impl::Reference);
      at::Tensor l = (out.o_s * ws).sum();
      if (gc.o.mode == Mode::Salad) l = l + (out.o_l * wl).sum();
      return l;
    };
    loss(q, k, v).backward();
    at::Tensor* ins[3] = {&q, &k, &v};
    for (int which = 0; which < 3; ++which) {
      at::NoGradGuard ng;
      const at::Tensor analytic = ins[which]->grad().clone();
      at::Tensor fd = at::zeros_like(analytic);
      at::Tensor x = ins[which]->detach().clone();
      auto xa = x.accessor<double, 4>();
      auto fa = fd.accessor<double, 4>();
      const double h = 1e-6;
      for (int64_t hh = 0; hh < H; ++hh)
        for (int64_t t = 0; t < L; ++t)
          for (int64_t d = 0; d < D; ++d) {
            const double x0 = xa[0][hh][t][d];
            at::Tensor a = q.detach(), b = k.detach(), c = v.detach();
            at::Tensor* slot = which == 0 ? &a : which == 1 ? &b : &c;
            xa[0][hh][t][d] = x0 + h;
            *slot = x;
            const double lp = loss(a, b, c).item<double>();
            xa[0][hh][t][d] = x0 - h;
            const double lm = loss(a, b, c).item<double>();
            xa[0][hh][t][d] = x0;
            fa[0][hh][t][d] = (lp - lm) / (2 * h);
          }
      EXPECT_LT(rel(analytic, fd), 1e-6) << "input " << "qkv"[which];
    }
  }
}

TEST(Backward, FastMatchesFloat32Reference) {
  torch::manual_seed(5);
  const Grid g{3, 5, 7};
  for (const GradCase& gc : grad_cases()) {
    SCOPED_TRACE(gc.label);
    Options o = gc.o;
    o.block_q = 16, o.block_k = 8, o.keep = 0.2;
    std::vector<at::Tensor> grads[2];
    for (int impl = 0; impl < 2; ++impl) {
      torch::manual_seed(6);
      at::Tensor q = at::randn({2, 3, 105, 64}).requires_grad_(), k = at::randn({2, 3, 105, 64}).requires_grad_(),
                 v = at::randn({2, 3, 105, 64}).requires_grad_();
      const at::Tensor ws = at::randn({2, 3, 105, 64}), wl = at::randn({2, 3, 105, 64});
      AttentionOutput out = attention(q, k, v, g, o, impl ? Impl::Fast : Impl::Reference);
      at::Tensor l = (out.o_s * ws).sum();
      if (o.mode == Mode::Salad) l = l + (out.o_l * wl).sum();
      l.backward();
      grads[impl] = {q.grad(), k.grad(), v.grad()};
    }
    for (int i = 0; i < 3; ++i) EXPECT_LT(rel(grads[1][i], grads[0][i]), 1e-5) << "input " << "qkv"[i];
  }
}

// An output the loss does not use reaches the backward as an undefined gradient (the autograd
// function does not materialise zeros): the gradients equal those with that output's gradient an
// explicit zero, for o_l unused and for o_s unused.
TEST(Backward, UnusedOutputEqualsZeroGradient) {
  torch::manual_seed(9);
  const Grid g{3, 5, 7};
  Options o;
  o.mode = Mode::Salad, o.block_q = 16, o.block_k = 8, o.keep = 0.2;
  const at::Tensor q0 = at::randn({1, 2, 105, 64}), k0 = at::randn_like(q0), v0 = at::randn_like(q0);
  const at::Tensor w = at::randn_like(q0);
  for (int unused = 0; unused < 2; ++unused) {  // 0: o_l unused, 1: o_s unused
    SCOPED_TRACE(unused ? "o_s unused" : "o_l unused");
    std::vector<at::Tensor> grads[2];
    for (int explicit_zero = 0; explicit_zero < 2; ++explicit_zero) {
      at::Tensor q = q0.clone().requires_grad_(), k = k0.clone().requires_grad_(), v = v0.clone().requires_grad_();
      AttentionOutput out = attention(q, k, v, g, o);
      const at::Tensor& used = unused ? out.o_l : out.o_s;
      const at::Tensor& other = unused ? out.o_s : out.o_l;
      at::Tensor l = (used * w).sum();
      if (explicit_zero) l = l + (other * 0).sum();
      l.backward();
      grads[explicit_zero] = {q.grad(), k.grad(), v.grad()};
    }
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(grads[0][i].defined());
      EXPECT_GT(grads[0][i].abs().max().item<double>(), 0.0) << "input " << "qkv"[i];
      EXPECT_LT(rel(grads[0][i], grads[1][i]), 1e-6) << "input " << "qkv"[i];
    }
  }
}
