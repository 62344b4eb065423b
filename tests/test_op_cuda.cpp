// The CUDA kernels through torch.ops.salad.attention, against the float64
// formula (FlashAttention's rule: the kernel's error is at most twice that of
// the same naive math done in the kernel's precision, plus a small floor).
// Every test skips cleanly where no CUDA device (or no CUDA build) exists.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/cuda/CUDACachingAllocator.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "naive.h"
#include "salad/salad.h"

using namespace salad;
using namespace salad::testing;

namespace {

bool have_cuda() { return torch::cuda::is_available() && cuda_kernels_compiled(); }

// Sets environment variables for a scope and restores what was there before (set or unset), so a
// caller's own setting (e.g. of a kernel switch, for a control run) survives the test.
class ScopedEnv {
 public:
  explicit ScopedEnv(std::vector<std::pair<std::string, std::string>> vars) {
    for (auto& [k, v] : vars) {
      const char* old = std::getenv(k.c_str());
      saved_.push_back({k, old ? std::optional<std::string>(old) : std::nullopt});
      setenv(k.c_str(), v.c_str(), 1);
    }
  }
  ~ScopedEnv() {
    for (auto& [k, v] : saved_) v ? setenv(k.c_str(), v->c_str(), 1) : unsetenv(k.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};
using EnvVars = std::vector<std::pair<std::string, std::string>>;

double max_err(const at::Tensor& a, const at::Tensor& ref) {
  return (a.to(at::kDouble).cpu() - ref.to(at::kDouble).cpu()).abs().max().item<double>();
}

struct CudaCase {
  int64_t B, H, D;
  Grid g;
  Options o;
  at::ScalarType dt;
};

std::string label(const CudaCase& c) {
  std::ostringstream s;
  s << to_string(c.o.mode) << "/" << to_string(c.o.pattern) << "/" << to_string(c.o.feature) << " D" << c.D << " L"
    << c.g.size() << " keep " << c.o.keep << " tile " << c.o.tile_order << " lrope " << c.o.linear_rope << " "
    << c10::toString(c.dt);
  return s.str();
}

std::vector<CudaCase> cases() {
  std::vector<CudaCase> cs;
  const Grid g{4, 15, 17};  // L = 1020: partial last query and key blocks
  for (int64_t D : {64, 128}) {
    for (Mode m : {Mode::Dense, Mode::Sparse, Mode::Salad}) {
      CudaCase c{2, 3, D, g, {}, at::kBFloat16};
      c.o.mode = m, c.o.keep = 0.25;
      cs.push_back(c);
    }
    for (FeatureMap f : {FeatureMap::Elu1, FeatureMap::Softmax}) {
      CudaCase c{2, 3, D, g, {}, at::kBFloat16};
      c.o.feature = f, c.o.keep = 0.1;
      cs.push_back(c);
    }
  }
  CudaCase w{2, 3, 128, g, {}, at::kBFloat16};
  w.o.pattern = Pattern::Window, w.o.tile_order = true, w.o.tile = {2, 4, 8}, w.o.window = {1, 1, 1};
  cs.push_back(w);
  CudaCase nr{2, 3, 128, g, {}, at::kHalf};
  nr.o.linear_rope = false;
  cs.push_back(nr);
  CudaCase t{2, 3, 128, g, {}, at::kBFloat16};
  t.o.tile_order = true, t.o.tile = {1, 4, 4};
  cs.push_back(t);
  return cs;
}

}  // namespace

// One case against the float64 formula: outputs and the gradients of a random loss within twice the
// error of the same naive math in the case's precision (plus a small floor); the table as the CPU
// reference's up to near-ties. Callers poison the outputs (SALAD_POISON).
static void expect_matches_float64(const CudaCase& c) {
  SCOPED_TRACE(label(c));
  const int64_t L = c.g.size();
  auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  const at::Tensor q64 = at::randn({c.B, c.H, L, c.D}, f64), k64 = at::randn_like(q64), v64 = at::randn_like(q64);
  const at::Tensor gs = at::randn_like(q64), gl = at::randn_like(q64);
  at::Tensor q = q64.to(c.dt).requires_grad_(), k = k64.to(c.dt).requires_grad_(), v = v64.to(c.dt).requires_grad_();
  AttentionOutput out = attention(q, k, v, c.g, c.o);
  at::Tensor mask;
  if (c.o.mode != Mode::Dense) {
    mask = mask_from_table(out.block_idx, out.block_cnt, c.g, c.o);
    // The GPU's table equals the CPU reference's on the same (rounded) inputs, up to near-ties.
    const auto [ridx, rcnt] =
        select_blocks(q.detach().to(at::kDouble).cpu(), k.detach().to(at::kDouble).cpu(), c.g, c.o);
    const double same_rows = ridx.eq(out.block_idx.cpu()).all(-1).to(at::kDouble).mean().item<double>();
    EXPECT_GE(same_rows, 0.98);
    EXPECT_TRUE(at::equal(rcnt, out.block_cnt.cpu()));
  }
  // Reference in float64 (from the same rounded inputs) and the naive formula in c.dt.
  at::Tensor qr = q.detach().to(at::kDouble).requires_grad_(), kr = k.detach().to(at::kDouble).requires_grad_(),
             vr = v.detach().to(at::kDouble).requires_grad_();
  const Naive ref = naive(qr, kr, vr, c.g, c.o, mask);
  at::Tensor qn = q.detach().clone().requires_grad_(), kn = k.detach().clone().requires_grad_(),
             vn = v.detach().clone().requires_grad_();
  const Naive low = naive(qn, kn, vn, c.g, c.o, mask);
  const double floor = 2e-3;
  EXPECT_LE(max_err(out.o_s, ref.o_s), 2 * max_err(low.o_s, ref.o_s) + floor);
  EXPECT_LE(max_err(out.lse, ref.lse), 2 * max_err(low.lse.to(at::kFloat), ref.lse) + floor);
  EXPECT_FALSE(at::isnan(out.o_s).any().item<bool>());
  if (c.o.mode == Mode::Salad) {
    EXPECT_LE(max_err(out.o_l, ref.o_l), 2 * max_err(low.o_l, ref.o_l) + floor);
    EXPECT_FALSE(at::isnan(out.o_l).any().item<bool>());
  }
  // Gradients: our backward against autograd through the naive formulas.
  auto loss = [&](const at::Tensor& o_s, const at::Tensor& o_l) {
    at::Tensor l = (o_s.to(at::kDouble) * gs).sum();
    if (c.o.mode == Mode::Salad) l = l + (o_l.to(at::kDouble) * gl).sum();
    return l;
  };
  loss(out.o_s, out.o_l).backward();
  loss(ref.o_s, ref.o_l).backward();
  loss(low.o_s, low.o_l).backward();
  const at::Tensor got[3] = {q.grad(), k.grad(), v.grad()}, want[3] = {qr.grad(), kr.grad(), vr.grad()},
                   base[3] = {qn.grad(), kn.grad(), vn.grad()};
  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE(std::string("grad ") + "qkv"[i]);
    EXPECT_FALSE(at::isnan(got[i]).any().item<bool>());
    EXPECT_LE(max_err(got[i], want[i]), 2 * max_err(base[i], want[i]) + 4 * floor);
  }
}

TEST(SM90_Attention, ForwardAndBackwardMatchFloat64WithinTwiceNaiveError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const ScopedEnv poison(EnvVars{{"SALAD_POISON", "1"}});  // outputs start as NaN: unwritten elements fail
  torch::manual_seed(0);
  std::vector<CudaCase> all = cases();
  if (std::getenv("SALAD_TEST_QUICK")) all.resize(3);  // under compute-sanitizer: dense, sparse, salad at D 64
  for (const CudaCase& c : all) expect_matches_float64(c);
}

// The Hopper backward (attn_bwd_sm90.cu, wgmma/TMA) against the mma.sync one
// (SALAD_BWD_KERNEL=mma) on a Wan-like L = 4140 (partial last query and key
// blocks), with block sizes that exercise its edge paths: 128-row query items
// with an idle warpgroup (block_q 192, 64), 128-key spans inside one key block
// (block_k 128) and across two (block_k 192), and both dK/dV layouts (128-key
// spans, and one 64-key tile shared by both warpgroups, SALAD_BWD_DKV_SPLIT) on
// every block shape. Per-row relative difference, so a missing or doubled tile
// in any row fails; gradient buffers are pre-poisoned.
TEST(SM90_Attention, HopperBackwardMatchesMmaBackward) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const char* prev = std::getenv("SALAD_BWD_KERNEL");
  const std::string saved = prev ? prev : "";
  const char* prev_split = std::getenv("SALAD_BWD_DKV_SPLIT");
  const std::string saved_split = prev_split ? prev_split : "";
  const char* prev_tile = std::getenv("SALAD_BWD_DQ_TILE");
  const std::string saved_tile = prev_tile ? prev_tile : "";
  torch::manual_seed(3);
  const Grid g{3, 30, 46};  // L = 4140 = 64 * 64 + 44
  struct V {
    int64_t D;
    Mode m;
    at::ScalarType dt;
    int64_t bq, bk;
  };
  for (const V c : {V{128, Mode::Sparse, at::kBFloat16, 128, 64}, V{64, Mode::Salad, at::kHalf, 128, 64},
                    V{128, Mode::Dense, at::kBFloat16, 128, 64}, V{128, Mode::Sparse, at::kBFloat16, 192, 128},
                    V{64, Mode::Sparse, at::kBFloat16, 64, 192}}) {
    SCOPED_TRACE("D" + std::to_string(c.D) + " " + to_string(c.m) + " " + c10::toString(c.dt) + " block " +
                 std::to_string(c.bq) + "/" + std::to_string(c.bk));
    Options o;
    o.mode = c.m, o.keep = 0.1, o.block_q = c.bq, o.block_k = c.bk;
    auto opt = at::TensorOptions().dtype(c.dt).device(at::kCUDA);
    const at::Tensor q = at::randn({2, 3, g.size(), c.D}, opt), k = at::randn_like(q), v = at::randn_like(q);
    const at::Tensor gs = at::randn(q.sizes(), opt.dtype(at::kFloat)), gl = at::randn_like(gs);
    auto grads = [&](const char* kernel, const char* split, const char* tile, const char* ds = "1") {
      if (kernel) setenv("SALAD_BWD_KERNEL", kernel, 1);
      else unsetenv("SALAD_BWD_KERNEL");
      setenv("SALAD_BWD_DKV_SPLIT", split, 1);
      setenv("SALAD_BWD_DQ_TILE", tile, 1);
      const ScopedEnv env(EnvVars{{"SALAD_BWD_DS", ds}});
      at::Tensor qq = q.clone().requires_grad_(), kk = k.clone().requires_grad_(), vv = v.clone().requires_grad_();
      const AttentionOutput out = attention(qq, kk, vv, g, o);
      at::Tensor loss = (out.o_s.to(at::kFloat) * gs).sum();
      if (c.m == Mode::Salad) loss = loss + (out.o_l.to(at::kFloat) * gl).sum();
      {  // freed NaN blocks of the gradients' size: the caching allocator tends to hand them out again
        std::vector<at::Tensor> junk;
        for (int i = 0; i < 6; ++i) junk.push_back(at::full(q.sizes(), NAN, opt));
      }
      loss.backward();
      return std::array<at::Tensor, 3>{qq.grad(), kk.grad(), vv.grad()};
    };
    const std::array<at::Tensor, 3> mma = grads("mma", "0", "64");
    // Both dK/dV layouts with 64-key dQ tiles, the 128-key dQ tiles (two gathered halves), and the
    // split layout's stored dS (the default where the split layout is; not in mode dense).
    const std::array<std::tuple<const char*, const char*, const char*>, 4> variants{
        {{"0", "64", "1"}, {"1", "64", "0"}, {"1", "64", "1"}, {"1", "128", "1"}}};
    for (const auto& [split, tile, ds] : variants) {
      const std::array<at::Tensor, 3> sm90 = grads(nullptr, split, tile, ds);
      for (int i = 0; i < 3; ++i) {
        SCOPED_TRACE(std::string("split ") + split + " dq tile " + tile + " stored dS " + ds + " grad " + "qkv"[i]);
        const at::Tensor a = sm90[i].to(at::kDouble), b = mma[i].to(at::kDouble);
        EXPECT_TRUE(at::isfinite(a).all().item<bool>());
        const at::Tensor d = (a - b).norm(2, {-1}), n = b.norm(2, {-1});
        const double worst = (d / (n + 1e-2 * n.mean())).max().item<double>();
        EXPECT_LT(worst, 2e-2) << "worst per-row relative difference";
      }
    }
  }
  if (prev) setenv("SALAD_BWD_KERNEL", saved.c_str(), 1);
  else unsetenv("SALAD_BWD_KERNEL");
  if (prev_split) setenv("SALAD_BWD_DKV_SPLIT", saved_split.c_str(), 1);
  else unsetenv("SALAD_BWD_DKV_SPLIT");
  if (prev_tile) setenv("SALAD_BWD_DQ_TILE", saved_tile.c_str(), 1);
  else unsetenv("SALAD_BWD_DQ_TILE");
}

// The linear branch's forward on wgmma (default: the state kernel with the k rotation fused in, the
// apply kernel with the q rotation) against the mma.sync kernels and the separate k rotation pass
// (SALAD_LINEAR_APPLY=mma, SALAD_FUSE_K=0): every feature map, with and without RoPE on the
// features, D 64 and 128, block_k 64 and 128, token-major q (the DiT's layout) and L = 4140 (partial
// last 64-token tiles, chunks and spans). The kernels also write qr / kr and their tile sums, so the
// block tables and o_s must agree too (up to near-ties of the block means, whose fp32 sums run in
// another order). Poisoned outputs.
TEST(SM90_Attention, WgmmaLinearForwardMatchesMmaForward) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const char* prev = std::getenv("SALAD_LINEAR_APPLY");
  const std::string saved = prev ? prev : "";
  setenv("SALAD_POISON", "1", 1);
  torch::manual_seed(7);
  torch::NoGradGuard ng;
  const Grid g{3, 30, 46};
  const int64_t L = g.size();
  for (int64_t D : {64, 128})
    for (FeatureMap f : {FeatureMap::Relu, FeatureMap::Elu1, FeatureMap::Softmax})
      for (bool lrope : {true, false}) {
        // under compute-sanitizer: the Wan configuration (D 128, relu, RoPE) and D 64 softmax
        if (std::getenv("SALAD_TEST_QUICK") && !(D == 128 && f == FeatureMap::Relu && lrope) &&
            !(D == 64 && f == FeatureMap::Softmax && !lrope))
          continue;
        SCOPED_TRACE("D" + std::to_string(D) + " " + to_string(f) + " lrope " + std::to_string(lrope) +
                     (f == FeatureMap::Elu1 ? " block_k 128" : " block_k 64"));
        Options o;
        o.mode = Mode::Salad, o.feature = f, o.linear_rope = lrope, o.keep = 0.1;
        o.block_k = f == FeatureMap::Elu1 ? 128 : 64;
        auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
        const at::Tensor q = at::randn({2, L, 3, D}, opt).transpose(1, 2), k = at::randn({2, 3, L, D}, opt),
                         v = at::randn_like(k);
        setenv("SALAD_LINEAR_APPLY", "mma", 1);
        setenv("SALAD_FUSE_K", "0", 1);
        const AttentionOutput ref = attention(q, k, v, g, o);
        unsetenv("SALAD_LINEAR_APPLY");
        unsetenv("SALAD_FUSE_K");
        const AttentionOutput got = attention(q, k, v, g, o);
        EXPECT_FALSE(at::isnan(got.o_l).any().item<bool>());
        EXPECT_LE(max_err(got.o_l, ref.o_l), 1e-2 * ref.o_l.abs().max().item<double>() + 1e-3);
        const at::Tensor same = got.block_idx.eq(ref.block_idx).all(-1);  // (B, H, n_q)
        EXPECT_GE(same.to(at::kDouble).mean().item<double>(), 0.99);
        const at::Tensor rows = same.repeat_interleave(o.block_q, 2).narrow(2, 0, L);  // (B, H, L)
        const at::Tensor d = (got.o_s.to(at::kFloat) - ref.o_s.to(at::kFloat)).abs().amax(-1);
        EXPECT_FALSE(at::isnan(got.o_s).any().item<bool>());
        EXPECT_LE(d.masked_select(rows).max().item<double>(), 1e-2 * ref.o_s.abs().max().item<double>() + 1e-3);
      }
  // Backward: the state recomputation writes kr too (SALAD_FUSE_K) and the query- and key-side kernels
  // run on wgmma (SALAD_LINEAR_BWD_Q / _K=mma: the mma.sync ones); the rotation pass must still rotate k when the
  // linear branch gets no gradient (loss on o_s only: that branch does not run).
  for (const auto& [D, f, lrope] : {std::tuple<int64_t, FeatureMap, bool>{128, FeatureMap::Relu, true},
                                    std::tuple<int64_t, FeatureMap, bool>{64, FeatureMap::Softmax, false},
                                    std::tuple<int64_t, FeatureMap, bool>{128, FeatureMap::Elu1, true}}) {
    torch::AutoGradMode ag(true);
    Options o;
    o.mode = Mode::Salad, o.keep = 0.1, o.feature = f, o.linear_rope = lrope;
    auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    const at::Tensor q = at::randn({2, 3, L, D}, opt), k = at::randn_like(q), v = at::randn_like(q);
    const at::Tensor gs = at::randn(q.sizes(), opt.dtype(at::kFloat)), gl = at::randn_like(gs);
    for (bool with_l : {true, false}) {
      SCOPED_TRACE(std::string(with_l ? "backward, loss on o_s and o_l" : "backward, loss on o_s only") + " D" +
                   std::to_string(D) + " " + to_string(f));
      auto grads = [&](const char* fuse) {
        setenv("SALAD_FUSE_K", fuse, 1);
        if (fuse[0] == '0') setenv("SALAD_LINEAR_BWD_K", "mma", 1), setenv("SALAD_LINEAR_BWD_Q", "mma", 1);
        at::Tensor qq = q.clone().requires_grad_(), kk = k.clone().requires_grad_(), vv = v.clone().requires_grad_();
        const AttentionOutput out = attention(qq, kk, vv, g, o);
        at::Tensor loss = (out.o_s.to(at::kFloat) * gs).sum();
        if (with_l) loss = loss + (out.o_l.to(at::kFloat) * gl).sum();
        loss.backward();
        unsetenv("SALAD_FUSE_K");
        unsetenv("SALAD_LINEAR_BWD_K");
        unsetenv("SALAD_LINEAR_BWD_Q");
        return std::array<at::Tensor, 3>{qq.grad(), kk.grad(), vv.grad()};
      };
      const auto ref = grads("0"), got = grads("1");
      for (int i = 0; i < 3; ++i) {
        SCOPED_TRACE(std::string("grad ") + "qkv"[i]);
        EXPECT_FALSE(at::isnan(got[i]).any().item<bool>());
        EXPECT_LE(max_err(got[i], ref[i]), 1e-2 * ref[i].abs().max().item<double>() + 1e-3);
      }
    }
  }
  unsetenv("SALAD_POISON");
  if (prev) setenv("SALAD_LINEAR_APPLY", saved.c_str(), 1);
  else unsetenv("SALAD_LINEAR_APPLY");
}

// With 64-key blocks the wgmma state kernel stores the key block means itself (its 64-token sums of
// kr divided as tile_means_kernel divides them), so the forward skips the key tile_means launch:
// the same tables and outputs bit for bit as with that launch (SALAD_KMEAN=kernel), L with a short
// last block, both D, with and without the linear branch's RoPE.
TEST(SM90_Attention, KeyMeansFromStateKernelEqualTileMeans) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(12);
  torch::NoGradGuard ng;
  const Grid g{3, 30, 46};  // L = 4140 = 64 * 64 + 44
  for (int64_t D : {64, 128})
    for (bool rope : {true, false}) {
      SCOPED_TRACE("D" + std::to_string(D) + (rope ? " rope" : " no rope"));
      Options o;
      o.mode = Mode::Salad, o.keep = 0.1, o.block_q = 128, o.block_k = 64, o.linear_rope = rope;
      auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
      const at::Tensor q = at::randn({2, 3, g.size(), D}, opt), k = at::randn_like(q), v = at::randn_like(q);
      setenv("SALAD_KMEAN", "kernel", 1);
      const AttentionOutput ref = attention(q, k, v, g, o);
      unsetenv("SALAD_KMEAN");
      const AttentionOutput got = attention(q, k, v, g, o);
      EXPECT_TRUE(got.block_idx.equal(ref.block_idx));
      EXPECT_TRUE(got.block_cnt.equal(ref.block_cnt));
      EXPECT_TRUE(got.o_s.equal(ref.o_s));
      EXPECT_TRUE(got.o_l.equal(ref.o_l));
    }
}

// The linear kernels' index arithmetic on grids whose rows and frames are short against the state
// kernel's 16-token rope-cursor step (carries into two digits at once), against float64 as above: each
// feature map, both D, with and without the linear branch's RoPE, short last blocks. (Sessions 12-13
// compared the linear kernels bit for bit with their earlier versions on such grids, on the GPU, before
// those versions were removed.)
static void expect_linear_matches_float64_on(const Grid& g) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const ScopedEnv poison(EnvVars{{"SALAD_POISON", "1"}});
  torch::manual_seed(13);
  for (const auto& [D, f, rope] : {std::tuple<int64_t, FeatureMap, bool>{128, FeatureMap::Relu, true},
                                   std::tuple<int64_t, FeatureMap, bool>{128, FeatureMap::Elu1, false},
                                   std::tuple<int64_t, FeatureMap, bool>{64, FeatureMap::Softmax, true},
                                   std::tuple<int64_t, FeatureMap, bool>{64, FeatureMap::Relu, false}}) {
    CudaCase c{2, 3, D, g, {}, at::kBFloat16};
    c.o.mode = Mode::Salad, c.o.keep = 0.2, c.o.feature = f, c.o.linear_rope = rope;
    expect_matches_float64(c);
  }
}

TEST(SM90_Attention, LinearMatchesFloat64OnWanLikeGrid) { expect_linear_matches_float64_on(Grid{3, 30, 46}); }
// Rows of 7 tokens: a 16-token step of the rope cursor is 2 rows and 2 columns (L 245, odd).
TEST(SM90_Attention, LinearMatchesFloat64OnShortRows) { expect_linear_matches_float64_on(Grid{7, 5, 7}); }
// Frames of 6 tokens: a 16-token step crosses two frames.
TEST(SM90_Attention, LinearMatchesFloat64OnShortFrames) { expect_linear_matches_float64_on(Grid{40, 2, 3}); }

// The backward's q rotation written by the query-side linear kernel (fuse_q_backward, default) instead
// of the rotation pass (SALAD_FUSE_Q_BWD=0): the same arithmetic on the same values, so every gradient
// is bit-identical; relu and elu+1 (where it applies), softmax (where it does not), both D, on a Wan-like
// grid and on an odd L with short rows, B 2 and H 3.
TEST(SM90_Attention, FusedBackwardQRotationEqualsRotationPass) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const ScopedEnv poison(EnvVars{{"SALAD_POISON", "1"}});
  torch::manual_seed(15);
  for (const Grid& g : {Grid{3, 30, 46}, Grid{7, 5, 7}})
    for (const auto& [D, f] : {std::pair<int64_t, FeatureMap>{128, FeatureMap::Relu},
                               std::pair<int64_t, FeatureMap>{128, FeatureMap::Elu1},
                               std::pair<int64_t, FeatureMap>{64, FeatureMap::Relu},
                               std::pair<int64_t, FeatureMap>{64, FeatureMap::Softmax}}) {
      SCOPED_TRACE("L" + std::to_string(g.size()) + " D" + std::to_string(D) + " " + to_string(f));
      Options o;
      o.mode = Mode::Salad, o.keep = 0.2, o.feature = f;
      auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
      const at::Tensor q = at::randn({2, 3, g.size(), D}, opt), k = at::randn_like(q), v = at::randn_like(q);
      const at::Tensor gs = at::randn(q.sizes(), opt), gl = at::randn_like(gs);
      auto run = [&](const char* fuse) {
        const ScopedEnv env(EnvVars{{"SALAD_FUSE_Q_BWD", fuse}});
        at::Tensor qq = q.clone().requires_grad_(), kk = k.clone().requires_grad_(), vv = v.clone().requires_grad_();
        const AttentionOutput out = attention(qq, kk, vv, g, o);
        torch::autograd::backward({out.o_s, out.o_l}, {gs, gl});
        torch::cuda::synchronize();  // a fault names its pass
        return std::vector<at::Tensor>{qq.grad(), kk.grad(), vv.grad()};
      };
      const std::vector<at::Tensor> ref = run("0"), got = run("1");
      for (size_t i = 0; i < ref.size(); ++i) {
        SCOPED_TRACE(std::string("grad ") + "qkv"[i]);
        EXPECT_FALSE(at::isnan(got[i]).any().item<bool>());
        EXPECT_TRUE(got[i].equal(ref[i]));
      }
    }
}

// The tensor-core selection (select_mma_kernel, default: 3xTF32 scores, another sum order) against
// the fp32 FMA kernel (SALAD_SELECT_KERNEL=fast) and the float64 reference: both tables equal the
// reference's on at least 99% of rows (a single TF32 product would miss about a tenth) and the
// tensor-core one does not agree less than the FMA one. Grids: Wan 1.3B 480p (512 key blocks, the
// 16-keys-per-lane select), an odd small L (4 key blocks, short last blocks) and L 83025 at D 64
// (1298 key blocks: the shared-memory select).
TEST(SM90_Attention, TensorCoreSelectionMatchesFloat64) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(16);
  torch::NoGradGuard ng;
  for (const auto& [g, D, H] : {std::tuple<Grid, int64_t, int64_t>{Grid{21, 30, 52}, 128, 2},
                                std::tuple<Grid, int64_t, int64_t>{Grid{7, 5, 7}, 64, 3},
                                std::tuple<Grid, int64_t, int64_t>{Grid{41, 45, 45}, 64, 1}}) {
    SCOPED_TRACE("L" + std::to_string(g.size()) + " D" + std::to_string(D));
    Options o;
    auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    const at::Tensor q = at::randn({1, H, g.size(), D}, opt), k = at::randn_like(q);
    const auto [idx, cnt] = select_blocks(q, k, g, o);
    at::Tensor fidx, fcnt;
    {
      const ScopedEnv env(EnvVars{{"SALAD_SELECT_KERNEL", "fast"}});
      std::tie(fidx, fcnt) = select_blocks(q, k, g, o);
    }
    const auto [ridx, rcnt] = select_blocks(q.to(at::kDouble).cpu(), k.to(at::kDouble).cpu(), g, o);
    auto same = [](const at::Tensor& a, const at::Tensor& b) {
      return a.cpu().eq(b.cpu()).all(-1).to(at::kDouble).mean().item<double>();
    };
    const double mma = same(idx, ridx), fma = same(fidx, ridx);
    std::printf("rows equal to float64: tensor cores %.4f, fp32 FMA %.4f\n", mma, fma);
    EXPECT_GE(mma, 0.99);
    EXPECT_GE(fma, 0.99);
    EXPECT_GE(mma, fma - 0.005);
    EXPECT_TRUE(at::equal(cnt.cpu(), rcnt));
    EXPECT_TRUE(at::equal(fcnt.cpu(), rcnt));
    // The reference kernel (SALAD_SELECT_KERNEL=old) adds the same products in the same tree as the
    // FMA kernel: the same table bit for bit.
    {
      const ScopedEnv env(EnvVars{{"SALAD_SELECT_KERNEL", "old"}});
      const auto [oidx, ocnt] = select_blocks(q, k, g, o);
      EXPECT_TRUE(at::equal(oidx, fidx));
    }
  }
}

TEST(SM90_Attention, DeterministicRepeatsAndNoQuadraticMemory) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(1);
  const Grid g{21, 30, 52};  // Wan 1.3B 480p token grid, L = 32760
  auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const at::Tensor q = at::randn({1, 2, g.size(), 128}, bf), k = at::randn_like(q), v = at::randn_like(q);
  Options o;
  torch::cuda::synchronize();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  const size_t before = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
  const AttentionOutput a = attention(q, k, v, g, o);
  torch::cuda::synchronize();
  const size_t peak = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak;
  const AttentionOutput b = attention(q, k, v, g, o);
  EXPECT_TRUE(at::equal(a.o_s, b.o_s));
  EXPECT_TRUE(at::equal(a.block_idx, b.block_idx));
  {  // the RoPE table kept across calls (select.cu, cached_rope_table) equals the one built per call
    const ScopedEnv env(EnvVars{{"SALAD_ROPE_CACHE", "0"}});
    const AttentionOutput c = attention(q, k, v, g, o);
    EXPECT_TRUE(at::equal(a.o_s, c.o_s));
    EXPECT_TRUE(at::equal(a.o_l, c.o_l));
  }
  // An L^2 float tensor of 2 heads would be 8.6 GB; allow 64x the inputs.
  EXPECT_LT(peak - before, 64 * q.numel() * 2) << "peak extra bytes " << (peak - before);
}

// The sparse forward's split tail (attn_fwd_sm90.cu, tail_split): the items of the persistent grid's
// last, partial round run as pieces of their key tiles, merged by fwd_combine_kernel. Against whole
// items (SALAD_SM90_SPLIT=0) on the same grid: equal tables, lse within fp32 rounding, o_s within a
// bf16 step per row; and the outputs differ somewhere (the split path ran). Grid caps of 50 CTAs (50
// whole items, then 16 items in 3 pieces) and 200 (every item in 2 pieces, one slot per SM); L 4140
// has a 44-row last query block and a 44-key last key block; poisoned outputs; token-major stores
// equal head-major ones bit for bit.
TEST(SM90_Attention, SplitTailMatchesWholeItems) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const ScopedEnv poison(EnvVars{{"SALAD_POISON", "1"}});
  torch::manual_seed(6);
  torch::NoGradGuard ng;
  const Grid g{3, 30, 46};
  for (int64_t D : {64, 128}) {
    for (Mode m : {Mode::Sparse, Mode::Dense}) {
      for (const char* cap : {"50", "200"}) {
        SCOPED_TRACE("D " + std::to_string(D) + " " + to_string(m) + " grid " + cap);
        auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
        const at::Tensor q = at::randn({1, 2, g.size(), D}, bf), k = at::randn_like(q), v = at::randn_like(q);
        Options o;
        o.mode = m, o.keep = 0.25;
        std::optional<AttentionOutput> whole, split, split_tm;
        {
          const ScopedEnv e({{"SALAD_SM90_GRID", cap}, {"SALAD_SM90_SPLIT", "0"}});
          whole = attention(q, k, v, g, o);
        }
        {
          const ScopedEnv e(EnvVars{{"SALAD_SM90_GRID", cap}});
          split = attention(q, k, v, g, o);
          split_tm = attention(q, k, v, g, o, Impl::Auto, /*token_major=*/true);
        }
        const at::Tensor a = whole->o_s.to(at::kFloat), b = split->o_s.to(at::kFloat);
        EXPECT_FALSE(at::isnan(b).any().item<bool>());
        EXPECT_FALSE(at::isnan(split->lse).any().item<bool>());
        if (m != Mode::Dense) EXPECT_TRUE(at::equal(split->block_idx, whole->block_idx));
        EXPECT_LE((split->lse - whole->lse).abs().max().item<double>(), 1e-4);
        const at::Tensor rel = (b - a).abs().amax(-1) / a.abs().amax(-1).clamp_min(1e-6);
        EXPECT_LE(rel.max().item<double>(), 1.0 / 64);
        EXPECT_FALSE(at::equal(split->o_s, whole->o_s)) << "no output differs: the split path did not run";
        EXPECT_TRUE(at::equal(split_tm->o_s, split->o_s));
        EXPECT_TRUE(at::equal(split_tm->lse, split->lse));
      }
    }
  }
}

// FA4's conditional rescale (the default; SALAD_SM90_LAZY=0 turns it off: the running row max moves only when a
// tile's exceeds it by more than 2^8, O rescaled only when some row of the warp moved): the same math with another
// reference point, so o_s within a bf16 step per row and lse within fp32 rounding of the default,
// with peaked scores (q scaled by 4) so that row maxima keep moving, plain ones, and split pieces.
TEST(SM90_Attention, LazyRescaleMatchesDefault) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const ScopedEnv poison(EnvVars{{"SALAD_POISON", "1"}});
  torch::manual_seed(8);
  torch::NoGradGuard ng;
  const Grid g{3, 30, 46};
  bool differ = false;  // the switch takes effect: P against a stale max rounds differently somewhere
  for (int64_t D : {64, 128}) {
    for (double qs : {1.0, 4.0}) {
      for (const char* cap : {"50", "132"}) {
        SCOPED_TRACE("D " + std::to_string(D) + " q scale " + std::to_string(qs) + " grid " + cap);
        auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
        const at::Tensor q = (at::randn({1, 2, g.size(), D}, bf) * qs).to(at::kBFloat16), k = at::randn_like(q),
                         v = at::randn_like(q);
        Options o;
        o.mode = Mode::Sparse, o.keep = 0.25;
        std::optional<AttentionOutput> base, lazy;
        {
          const ScopedEnv e({{"SALAD_SM90_GRID", cap}, {"SALAD_SM90_LAZY", "0"}});
          base = attention(q, k, v, g, o);
        }
        {
          const ScopedEnv e(EnvVars{{"SALAD_SM90_GRID", cap}});
          lazy = attention(q, k, v, g, o);
        }
        const at::Tensor a = base->o_s.to(at::kFloat), b = lazy->o_s.to(at::kFloat);
        EXPECT_FALSE(at::isnan(b).any().item<bool>());
        differ = differ || !at::equal(a, b);
        EXPECT_LE((lazy->lse - base->lse).abs().max().item<double>(), 1e-4);
        const at::Tensor rel = (b - a).abs().amax(-1) / a.abs().amax(-1).clamp_min(1e-6);
        EXPECT_LE(rel.max().item<double>(), 1.0 / 64);
      }
    }
  }
  EXPECT_TRUE(differ) << "SALAD_SM90_LAZY=0 gave the default's o_s bit for bit everywhere";
}

// The backward's stored dS (attn_bwd_sm90.cu, attn_dq_ds_sm90_kernel; the default for the split dK/dV
// layout): the dK/dV kernel also stores each kept pair's dS^T and dQ is one GEMM per pair. Its dS^T
// sums the same products in the same order as the dQ kernel's dS (and dQ runs over the same tiles
// in the same order), so against the two-kernel backward (SALAD_BWD_DS=0) all three gradients are
// equal bit for bit, also in groups of one head (SALAD_BWD_DS_MB=8) and without the L2 hints
// (SALAD_BWD_DS_HINT=0); the backward's peak memory grows by the scratch, 16 KB per kept (128-query,
// 64-key) pair (the path ran). Modes sparse and salad, D 64 and 128, L 4140 (a 44-row last query
// block, a 44-key last key block), poisoned workspace.
TEST(SM90_Attention, StoredDsBackwardEqualsTwoKernelBackward) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const ScopedEnv poison(EnvVars{{"SALAD_POISON", "1"}});
  torch::manual_seed(17);
  const Grid g{3, 30, 46};
  for (const auto& [D, m] : {std::pair<int64_t, Mode>{128, Mode::Sparse}, std::pair<int64_t, Mode>{64, Mode::Salad},
                             std::pair<int64_t, Mode>{128, Mode::Salad}}) {
    SCOPED_TRACE("D " + std::to_string(D) + " " + to_string(m));
    Options o;
    o.mode = m, o.keep = 0.2;
    auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    const at::Tensor q = at::randn({2, 3, g.size(), D}, bf), k = at::randn_like(q), v = at::randn_like(q);
    const at::Tensor gs = at::randn(q.sizes(), bf.dtype(at::kFloat)), gl = at::randn_like(gs);
    int64_t max_k = 0;
    auto grads = [&](const EnvVars& env, int64_t* peak) {
      const ScopedEnv e(env);
      at::Tensor qq = q.clone().requires_grad_(), kk = k.clone().requires_grad_(), vv = v.clone().requires_grad_();
      const AttentionOutput out = attention(qq, kk, vv, g, o);
      max_k = out.block_idx.size(-1);
      at::Tensor loss = (out.o_s.to(at::kFloat) * gs).sum();
      if (m == Mode::Salad) loss = loss + (out.o_l.to(at::kFloat) * gl).sum();
      torch::cuda::synchronize();
      c10::cuda::CUDACachingAllocator::resetPeakStats(0);
      const int64_t before = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
      loss.backward();
      torch::cuda::synchronize();
      *peak = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak - before;
      return std::array<at::Tensor, 3>{qq.grad(), kk.grad(), vv.grad()};
    };
    int64_t peak_two = 0, peak_ds = 0, peak_grouped = 0;
    const auto two = grads({{"SALAD_BWD_DS", "0"}}, &peak_two);
    const auto ds = grads({{"SALAD_BWD_DS", "1"}}, &peak_ds);
    // 8 MB: one head's scratch (33 query blocks x 13 kept x 16 KB = 6.9 MB) per group.
    const auto grouped = grads({{"SALAD_BWD_DS", "1"}, {"SALAD_BWD_DS_MB", "8"}}, &peak_grouped);
    int64_t peak_hint = 0;  // L2 eviction hints on the dS^T stores and loads (default on) change no value
    const auto unhinted = grads({{"SALAD_BWD_DS", "1"}, {"SALAD_BWD_DS_HINT", "0"}}, &peak_hint);
    for (int i = 0; i < 3; ++i) {
      SCOPED_TRACE(std::string("grad ") + "qkv"[i]);
      EXPECT_TRUE(at::isfinite(ds[i]).all().item<bool>());
      EXPECT_TRUE(at::equal(ds[i], two[i]));
      EXPECT_TRUE(at::equal(grouped[i], ds[i])) << "in head groups";
      EXPECT_TRUE(at::equal(unhinted[i], ds[i])) << "without L2 hints";
    }
    const int64_t n_q = (g.size() + 127) / 128, scratch = 2 * 3 * n_q * max_k * 16384;
    // (1 MB of slack: the peaks moved by ~19 KB with the tests that ran before, on the allocator's state.)
    EXPECT_GE(peak_ds - peak_two, scratch - (1 << 20)) << "the stored-dS scratch was not allocated";
    EXPECT_GE(peak_grouped - peak_two, scratch / 6 - (1 << 20)) << "one head's scratch";
    EXPECT_LT(peak_grouped - peak_two, scratch / 3) << "one head's scratch";
  }
}

// The sparse forward's item hand-over (SALAD_SM90_HANDOVER=1: the next item's first QK^T issued with
// this item's last PV) runs the same arithmetic in another order of issue: the same o_s and lse bit
// for bit, with whole items and with split pieces (grid caps 50 and 200 as above), D 64 and 128, a
// partial last key block (L 4140), poisoned outputs.
TEST(SM90_Attention, ItemHandOverEqualsDefaultBitForBit) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const ScopedEnv poison(EnvVars{{"SALAD_POISON", "1"}});
  torch::manual_seed(7);
  torch::NoGradGuard ng;
  const Grid g{3, 30, 46};
  for (int64_t D : {64, 128}) {
    for (Mode m : {Mode::Sparse, Mode::Dense}) {
      for (const char* cap : {"50", "200", "132"}) {
        SCOPED_TRACE("D " + std::to_string(D) + " " + to_string(m) + " grid " + cap);
        auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
        const at::Tensor q = at::randn({1, 2, g.size(), D}, bf), k = at::randn_like(q), v = at::randn_like(q);
        Options o;
        o.mode = m, o.keep = 0.25;
        std::optional<AttentionOutput> base, ho;
        {
          const ScopedEnv e(EnvVars{{"SALAD_SM90_GRID", cap}});
          base = attention(q, k, v, g, o);
        }
        {
          const ScopedEnv e({{"SALAD_SM90_GRID", cap}, {"SALAD_SM90_HANDOVER", "1"}});
          ho = attention(q, k, v, g, o);
        }
        EXPECT_FALSE(at::isnan(ho->o_s.to(at::kFloat)).any().item<bool>());
        EXPECT_TRUE(at::equal(ho->o_s, base->o_s));
        EXPECT_TRUE(at::equal(ho->lse, base->lse));
      }
    }
  }
}

// token_major: the same kernels store o_s / o_l into (B, L, H, D) memory, so the values equal the
// default (B, H, L, D) outputs bit for bit, on every case (Hopper, mma.sync tile order, fp16, the
// generic and mma linear kernels), and the projection rows are a view. Poisoned outputs: a row the
// strided stores miss stays NaN.
TEST(SM90_Attention, TokenMajorOutputsEqualHeadMajorBitForBit) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  setenv("SALAD_POISON", "1", 1);
  torch::manual_seed(5);
  torch::NoGradGuard ng;
  for (const CudaCase& c : cases()) {
    SCOPED_TRACE(label(c));
    const int64_t L = c.g.size();
    const at::Tensor x = at::randn({c.B, L, c.H, c.D}, at::TensorOptions().dtype(c.dt).device(at::kCUDA));
    const at::Tensor q = x.transpose(1, 2), k = (x * 0.5).transpose(1, 2), v = (x - 1).transpose(1, 2);
    const AttentionOutput a = attention(q, k, v, c.g, c.o);
    const AttentionOutput t = attention(q, k, v, c.g, c.o, Impl::Auto, /*token_major=*/true);
    EXPECT_EQ(t.o_s.sizes(), a.o_s.sizes());
    EXPECT_EQ(t.o_s.strides(), (std::vector<int64_t>{L * c.H * c.D, c.D, c.H * c.D, 1}));
    EXPECT_EQ(t.o_s.transpose(1, 2).reshape({c.B * L, c.H * c.D}).data_ptr(), t.o_s.data_ptr());
    EXPECT_TRUE(at::equal(t.o_s, a.o_s));
    EXPECT_TRUE(at::equal(t.lse, a.lse));
    if (c.o.mode == Mode::Salad) {
      EXPECT_EQ(t.o_l.strides(), t.o_s.strides());
      EXPECT_TRUE(at::equal(t.o_l, a.o_l));
    }
  }
  unsetenv("SALAD_POISON");
}

TEST(SM90_Attention, Float32InputsRunInBf16AndReturnFloat32) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(2);
  const Grid g{4, 15, 17};
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  at::Tensor q = at::randn({1, 2, g.size(), 64}, f32).requires_grad_(), k = at::randn_like(q).requires_grad_(),
             v = at::randn_like(q).requires_grad_();
  const AttentionOutput a = attention(q, k, v, g, Options{});
  EXPECT_EQ(a.o_s.scalar_type(), at::kFloat);
  EXPECT_EQ(a.o_l.scalar_type(), at::kFloat);
  const AttentionOutput b = attention(q.detach().to(at::kBFloat16), k.detach().to(at::kBFloat16),
                                      v.detach().to(at::kBFloat16), g, Options{});
  EXPECT_TRUE(at::equal(a.o_s, b.o_s.to(at::kFloat)));
  (a.o_s.sum() + a.o_l.sum()).backward();
  EXPECT_EQ(q.grad().scalar_type(), at::kFloat);
  EXPECT_TRUE(at::isfinite(q.grad()).all().item<bool>());
}
