// The SaladSelfAttention layer (gates, W_l, skipping) and the operator's
// handling of bad input, through LibTorch on CPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

#include "salad/fused.h"
#include "salad/salad.h"

using namespace salad;
namespace {

LayerConfig small_config(Gate gate, bool per_head = false) {
  LayerConfig c;
  c.dim = 16, c.heads = 2;
  c.attn.block_q = 8, c.attn.block_k = 4, c.attn.keep = 0.5;
  c.gate = gate, c.static_per_head = per_head;
  return c;
}

void randomize(torch::nn::Module& m, double std = 0.3) {
  torch::NoGradGuard ng;
  for (auto& p : m.parameters()) p.normal_(0, std);
}

}  // namespace

TEST(Layer, ZeroLinearProjectionEqualsSparseBitForBit) {
  torch::manual_seed(0);
  const Grid g{2, 3, 4};
  for (Gate gate : {Gate::None, Gate::Static, Gate::Dynamic, Gate::StaticDynamic}) {
    SaladSelfAttention layer(small_config(gate));
    {
      torch::NoGradGuard ng;
      for (auto& kv : layer->named_parameters())
        if (kv.key().rfind("linear_o", 0) != 0) kv.value().normal_(0, 0.3);  // everything but W_l (zero-init)
    }
    const at::Tensor x = torch::randn({2, 24, 16});
    layer->config().attn.mode = Mode::Salad;
    const at::Tensor y_salad = layer->forward(x, g);
    layer->config().attn.mode = Mode::Sparse;
    const at::Tensor y_sparse = layer->forward(x, g);
    EXPECT_TRUE(torch::equal(y_salad, y_sparse)) << to_string(gate);
    layer->config().attn.mode = Mode::Dense;
    EXPECT_FALSE(torch::equal(layer->forward(x, g), y_sparse)) << "dense must differ from 50% sparse";
  }
}

TEST(Layer, SkippedLinearBranchIsSparseAndGateShapesFollowTheConfig) {
  torch::manual_seed(1);
  const Grid g{2, 3, 4};
  SaladSelfAttention layer(small_config(Gate::StaticDynamic, true));
  randomize(*layer);
  const at::Tensor x = torch::randn({3, 24, 16});
  EXPECT_EQ(layer->scale(x).sizes(), (std::vector<int64_t>{3, 2}));
  const at::Tensor with = layer->forward(x, g);
  layer->config().skip_linear = true;
  const at::Tensor skipped = layer->forward(x, g);
  EXPECT_EQ(layer->last_attention().o_l.numel(), 0) << "a skipped layer computes no linear branch";
  layer->config().skip_linear = false;
  layer->config().attn.mode = Mode::Sparse;
  EXPECT_TRUE(torch::equal(skipped, layer->forward(x, g)));
  EXPECT_FALSE(torch::allclose(with, skipped));
  SaladSelfAttention dyn(small_config(Gate::Dynamic));
  EXPECT_EQ(dyn->scale(x).sizes(), (std::vector<int64_t>{3}));
  EXPECT_FALSE(dyn->static_scale.defined());
  SaladSelfAttention none(small_config(Gate::None));
  EXPECT_TRUE(torch::equal(none->scale(x), torch::ones({3})));
}

// gradcheck of the whole layer in float64: autograd (our backward + LibTorch's
// for projections, norms, gate, static scale and W_l) against central differences.
TEST(Layer, GradientsMatchFiniteDifferencesIncludingGateAndLinearProjection) {
  torch::manual_seed(2);
  const Grid g{2, 3, 4};
  for (Gate gate : {Gate::Static, Gate::StaticDynamic}) {
    for (FeatureMap f : {FeatureMap::Relu, FeatureMap::Softmax}) {
      LayerConfig c = small_config(gate, gate == Gate::Static);
      c.attn.feature = f;
      SaladSelfAttention layer(c);
      randomize(*layer);
      layer->to(torch::kDouble);
      const at::Tensor x = torch::randn({2, 24, 16}, torch::kDouble).requires_grad_();
      const at::Tensor w = torch::randn({2, 24, 16}, torch::kDouble);
      auto loss = [&] { return (layer->forward(x, g) * w).sum(); };
      layer->zero_grad();
      loss().backward();
      std::vector<std::pair<std::string, at::Tensor>> checks;
      for (auto& kv : layer->named_parameters()) checks.push_back({kv.key(), kv.value()});
      checks.push_back({"x", x});
      for (auto& [name, p] : checks) {
        SCOPED_TRACE(name + " gate " + to_string(gate) + " feature " + to_string(f));
        const at::Tensor analytic = p.grad().clone();
        at::Tensor flat = p.detach().view(-1);
        const int64_t n = flat.numel(), step = std::max<int64_t>(1, n / 12);  // a spread of entries
        double num = 0, den = 0;
        for (int64_t i = 0; i < n; i += step) {
          torch::NoGradGuard ng;
          const double x0 = flat[i].item<double>(), h = 1e-6;
          flat[i] = x0 + h;
          const double lp = loss().item<double>();
          flat[i] = x0 - h;
          const double lm = loss().item<double>();
          flat[i] = x0;
          const double fd = (lp - lm) / (2 * h), an = analytic.view(-1)[i].item<double>();
          num += (fd - an) * (fd - an), den += an * an;
        }
        EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), 1e-6);
        EXPECT_GT(den, 0.0) << "gradient must reach " << name;
      }
    }
  }
}

namespace {
void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error, expected one containing '" << needle << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(BadInput, EveryCaseNamesTheArgumentExpectedAndActual) {
  const Grid g{2, 3, 4};
  const at::Tensor q = torch::randn({1, 2, 24, 8});
  Options o;
  o.block_q = 8, o.block_k = 4;
  expect_error([&] { attention(q, q, torch::randn({1, 2, 23, 8}), g, o); },
               "v: expected the shape of q [1, 2, 24, 8], got [1, 2, 23, 8]");
  expect_error([&] { attention(q.view({2, 24, 8}), q, q, g, o); }, "q: expected a 4-D tensor (B, H, L, D), got shape [2, 24, 8]");
  expect_error([&] { attention(q, q, q, Grid{2, 3, 5}, o); }, "grid: expected positive (F, H, W) with F*H*W equal to the token count L=24");
  const at::Tensor odd = torch::randn({1, 2, 24, 7});
  expect_error([&] { attention(odd, odd, odd, g, o); }, "D: expected a positive even head width, got 7");
  Options bad = o;
  bad.keep = 0;
  expect_error([&] { attention(q, q, q, g, bad); }, "keep: expected a fraction in (0, 1], got 0");
  bad.keep = 1.01;
  expect_error([&] { attention(q, q, q, g, bad); }, "keep: expected a fraction in (0, 1], got 1.01");
  bad = o;
  bad.block_q = 0;
  expect_error([&] { attention(q, q, q, g, bad); }, "block_q: expected a positive token count, got 0");
  bad = o;
  bad.block_k = 0;
  expect_error([&] { attention(q, q, q, g, bad); }, "block_k: expected a positive token count, got 0");
  const at::Tensor qi = torch::ones({1, 2, 24, 8}, torch::kLong);
  expect_error([&] { attention(qi, qi, qi, g, o); }, "dtype: expected float64, float32, bfloat16 or float16, got Long");
  expect_error([&] { attention(q, q.to(torch::kDouble), q, g, o); }, "k: expected the dtype of q (Float), got Double");
  expect_error([&] { attention(q.to(torch::kDouble), q.to(torch::kDouble), q.to(torch::kDouble), g, o, Impl::Fast); },
               "impl: 'fast' runs float32 only");
  expect_error([&] { parse_gate("sometimes"); }, "gate: expected one of none|static|dynamic|static_dynamic, got 'sometimes'");
}

TEST(BadInput, MixedDevicesAreNamed) {
  const Grid g{2, 3, 4};
  const at::Tensor q = torch::randn({1, 2, 24, 8});
  Options o;
  o.block_q = 8, o.block_k = 4;
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: the wrong-device case needs one";
  const at::Tensor qc = q.to(torch::kCUDA).to(torch::kBFloat16);
  expect_error([&] { attention(qc, q.to(torch::kBFloat16), qc, g, o); }, "k: expected the device of q");
}

// NaN in the inputs is not an error: it propagates to the rows that touch it
// (and ranks last in block selection); other heads and batches are unaffected.
TEST(BadInput, NaNPropagatesOnlyWhereItIsUsed) {
  torch::manual_seed(3);
  const Grid g{2, 3, 4};
  Options o;
  o.block_q = 8, o.block_k = 4, o.keep = 0.5;
  const at::Tensor q = torch::randn({2, 2, 24, 8}), k = torch::randn_like(q), v = torch::randn_like(q);
  const AttentionOutput clean = attention(q, k, v, g, o);
  at::Tensor kn = k.clone();
  kn[0][1][5][3] = NAN;
  const AttentionOutput dirty = attention(q, kn, v, g, o);
  EXPECT_TRUE(torch::equal(dirty.o_s[1], clean.o_s[1]));
  EXPECT_TRUE(torch::equal(dirty.o_s[0][0], clean.o_s[0][0]));
  EXPECT_TRUE(torch::isnan(dirty.o_l[0][1]).any().item<bool>()) << "the linear branch sums over every key";
  EXPECT_TRUE(torch::equal(dirty.o_l[0][0], clean.o_l[0][0]));
}

// The CUDA inference path (token-major attention outputs as the projections' rows, s(x) folded
// into W_l at batch 1) against the layer's eager path, same bf16 weights, for per-layer and
// per-head static scales and batch 1 and 2.
TEST(SM90_Layer, InferencePathMatchesEagerPath) {
  if (!torch::cuda::is_available() || !cuda_kernels_compiled() || !fused::kernels_compiled())
    GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(6);
  const Grid g{3, 8, 12};
  for (bool per_head : {false, true})
    for (int64_t B : {1, 2}) {
      SCOPED_TRACE(std::string(per_head ? "per-head" : "per-layer") + " scale, B " + std::to_string(B));
      LayerConfig cfg = small_config(Gate::StaticDynamic, per_head);
      cfg.dim = 128, cfg.heads = 2;  // head width 64
      cfg.attn.block_q = 128, cfg.attn.block_k = 64, cfg.attn.keep = 1.0;  // no top-k ties to flip
      SaladSelfAttention layer(cfg);
      randomize(*layer, 0.1);
      {
        torch::NoGradGuard ng;  // distinct scales per head: a head scaled by the other's s would fail
        layer->static_scale.copy_(per_head ? torch::tensor({0.5, 2.0}) : torch::tensor({1.5}));
      }
      layer->to(at::kCUDA, at::kBFloat16);
      const at::Tensor x = at::randn({B, g.size(), cfg.dim}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
      torch::NoGradGuard ng;
      at::Tensor on, off;
      {
        fused::EnabledGuard e(false);
        off = layer->forward(x, g).to(at::kFloat);
      }
      {
        fused::EnabledGuard e(true);
        on = layer->forward(x, g).to(at::kFloat);
      }
      const double r = ((on - off).norm() / off.norm()).item<double>();
      EXPECT_LT(r, 1e-2);
      EXPECT_GT(off.norm().item<double>(), 0.0);
    }
}

// salad::linear is at::linear on a torch::nn::Linear: the module's own forward, value for value
// (one GEMM with the bias in its epilogue instead of a GEMM and a separate add), with the same
// autograd.
TEST(Layer, LinearHelperEqualsTheModuleForward) {
  torch::manual_seed(7);
  torch::nn::Linear l(torch::nn::LinearOptions(24, 40).bias(true));
  const at::Tensor x = torch::randn({2, 5, 24}, torch::requires_grad());
  const at::Tensor a = linear(l, x), b = l->forward(x);
  EXPECT_EQ(a.sizes(), b.sizes());
  EXPECT_LT((a - b).abs().max().item<double>(), 1e-5);
  a.sum().backward();
  const at::Tensor gw = l->weight.grad().clone(), gx = x.grad().clone();
  l->weight.mutable_grad().zero_(), x.mutable_grad().zero_();
  b.sum().backward();
  EXPECT_LT((gw - l->weight.grad()).abs().max().item<double>(), 1e-5);
  EXPECT_LT((gx - x.grad()).abs().max().item<double>(), 1e-5);
  EXPECT_GT(gw.abs().sum().item<double>(), 0.0);
}
