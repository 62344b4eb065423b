// The Wan 2.1 DiT runtime: forward shapes, RoPE against Wan's complex
// rope_apply, checkpoint layouts (official / diffusers), architecture
// detection, load errors, SALAD-vs-sparse equivalence at W_l = 0, and (when
// SALAD_WAN_PARITY_DIR is set by tests/python/test_wan_parity.py) parity with
// diffusers' WanTransformer3DModel.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

#include "temp_dir.h"
#include "salad/fused.h"
#include "salad/layout.h"
#include "salad/wan.h"

using namespace salad;
namespace fs = std::filesystem;
namespace {

double rel(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor bd = b.to(at::kDouble);
  return ((a.to(at::kDouble) - bd).norm() / bd.norm().clamp_min(1e-300)).item<double>();
}

using test::remove_dir;
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("salad_wan") {}
};

WanConfig tiny(int64_t layers = 2) {
  WanConfig c = WanConfig::preset("tiny");
  c.num_layers = layers;
  return c;
}

// Small blocks so the sparse pattern actually drops blocks on a 24-token grid.
WanAttentionPlan small_plan(Mode m) {
  WanAttentionPlan p = WanAttentionPlan::uniform(m);
  p.base.attn.block_q = 4;
  p.base.attn.block_k = 4;
  p.base.attn.keep = 0.5;
  return p;
}

// Every parameter nonzero, including modulations, norms and the SALAD additions.
void randomize(WanModel& m, double std = 0.05) {
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.normal_(0.0, std);
}

struct Inputs {
  at::Tensor x, t, context;
};
Inputs make_inputs(const WanConfig& c, int64_t B = 2, int64_t F = 2, int64_t H = 6, int64_t W = 8, int64_t Lt = 5) {
  return {torch::randn({B, c.in_dim, F, H, W}), torch::tensor({999.0, 250.5}).slice(0, 0, B),
          torch::randn({B, Lt, c.text_dim})};
}

void expect_same_state(WanModel& a, WanModel& b) {
  auto pa = a->named_parameters(true), pb = b->named_parameters(true);
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& kv : pa) {
    const at::Tensor* other = pb.find(kv.key());
    ASSERT_NE(other, nullptr) << kv.key();
    EXPECT_TRUE(torch::equal(kv.value(), *other)) << kv.key();
  }
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(WanConfig, PresetsAndValidation) {
  const WanConfig s = WanConfig::preset("wan2.1-1.3b"), l = WanConfig::preset("wan2.1-14b");
  EXPECT_EQ(s.dim, 1536);
  EXPECT_EQ(s.ffn_dim, 8960);
  EXPECT_EQ(s.num_heads, 12);
  EXPECT_EQ(s.num_layers, 30);
  EXPECT_EQ(s.head_dim(), 128);
  EXPECT_EQ(l.dim, 5120);
  EXPECT_EQ(l.ffn_dim, 13824);
  EXPECT_EQ(l.num_heads, 40);
  EXPECT_EQ(l.num_layers, 40);
  EXPECT_EQ(l.head_dim(), 128);
  EXPECT_THROW(WanConfig::preset("wan9"), ArgumentError);
  WanConfig bad = tiny();
  bad.num_heads = 3;
  EXPECT_NE(error_of([&] { bad.validate(); }).find("num_heads"), std::string::npos);
}

TEST(WanPlan, PerLayerOverrides) {
  WanAttentionPlan p = small_plan(Mode::Salad);
  p.mode[1] = Mode::Dense;
  p.skip_linear.insert(2);
  WanModel m(tiny(3), p);
  EXPECT_EQ(m->block(0)->self_attn->config().attn.mode, Mode::Salad);
  EXPECT_FALSE(m->block(0)->self_attn->config().skip_linear);
  EXPECT_EQ(m->block(1)->self_attn->config().attn.mode, Mode::Dense);
  EXPECT_TRUE(m->block(2)->self_attn->config().skip_linear);
  EXPECT_EQ(m->block(2)->self_attn->config().dim, 64);
  EXPECT_EQ(m->block(2)->self_attn->config().heads, 2);
  p.mode[7] = Mode::Dense;
  EXPECT_THROW(WanModel(tiny(3), p), ArgumentError);
}

TEST(WanModel, ForwardShapesInEveryMode) {
  torch::manual_seed(0);
  const WanConfig c = tiny();
  const Inputs in = make_inputs(c);
  for (Mode mode : {Mode::Dense, Mode::Sparse, Mode::Salad}) {
    WanModel m(c, small_plan(mode));
    torch::NoGradGuard ng;
    const at::Tensor y = m->forward(in.x, in.t, in.context);
    EXPECT_EQ(y.sizes(), in.x.sizes()) << to_string(mode);
    EXPECT_EQ(y.scalar_type(), at::kFloat);
    EXPECT_TRUE(y.isfinite().all().item<bool>());
  }
  WanModel m(c, small_plan(Mode::Dense));
  EXPECT_NE(error_of([&] { m->forward(in.x.slice(3, 0, 5), in.t, in.context); }).find("patch"), std::string::npos);
  EXPECT_NE(error_of([&] { m->forward(in.x, in.t.slice(0, 0, 1), in.context); }).find("t: expected"),
            std::string::npos);
  EXPECT_NE(error_of([&] { m->forward(in.x, in.t, in.context.slice(2, 0, 8)); }).find("context"), std::string::npos);
}

TEST(WanModel, PadsContextToTextLenLikeWan) {
  torch::manual_seed(1);
  WanConfig c = tiny();
  c.text_len = 8;
  WanModel padded(c, small_plan(Mode::Dense));
  c.text_len = 0;
  WanModel plain(c, small_plan(Mode::Dense));
  randomize(padded);
  {
    torch::NoGradGuard ng;
    auto src = padded->named_parameters(true);
    for (auto& p : plain->named_parameters(true)) p.value().copy_(src[p.key()]);
  }
  const Inputs in = make_inputs(c);
  const at::Tensor ctx8 = at::cat({in.context, at::zeros({2, 3, c.text_dim})}, 1);
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::allclose(padded->forward(in.x, in.t, in.context), plain->forward(in.x, in.t, ctx8), 1e-6, 1e-6));
  EXPECT_THROW(padded->forward(in.x, in.t, at::cat({ctx8, ctx8}, 1)), ArgumentError);
}

// Wan's rope_apply: channel pairs as complex numbers times exp(i * pos * freq),
// frequencies rope_params(1024, d) per axis with the pair split
// [c - 2(c/3), c/3, c/3], c = D/2. Our op takes q/k before RoPE and rotates
// them itself; dense attention must equal SDPA on Wan-rotated q/k.
TEST(WanRope, OperatorRotationMatchesWanRopeApply) {
  torch::manual_seed(2);
  for (int64_t D : {128, 36}) {
    const Grid g{2, 3, 4};
    const int64_t L = g.size(), c = D / 2, split[3] = {c - 2 * (c / 3), c / 3, c / 3};
    auto dbl = at::TensorOptions().dtype(at::kDouble);
    std::vector<at::Tensor> per_axis;  // (L, pairs of the axis) angles
    const at::Tensor tok = at::arange(L, dbl.dtype(at::kLong));
    const at::Tensor pos[3] = {at::div(tok, g.h * g.w, "floor"), at::div(tok, g.w, "floor").remainder(g.h),
                               tok.remainder(g.w)};
    for (int a = 0; a < 3; ++a) {
      const int64_t d = 2 * split[a];  // rope_params(1024, d) for this axis
      const at::Tensor inv = 1.0 / at::pow(10000.0, at::arange(0, d, 2, dbl) / static_cast<double>(d));
      per_axis.push_back(at::outer(pos[a].to(at::kDouble), inv));
    }
    const at::Tensor freqs = at::polar(at::ones({L, c}, dbl), at::cat(per_axis, 1));  // (L, c) complex
    auto rope_wan = [&](const at::Tensor& x) {                                        // x (B, H, L, D)
      const at::Tensor xc = at::view_as_complex(x.contiguous().view({x.size(0), x.size(1), L, c, 2}));
      return at::view_as_real(xc * freqs).flatten(-2);
    };
    const at::Tensor q = torch::randn({1, 2, L, D}, dbl), k = torch::randn({1, 2, L, D}, dbl),
                     v = torch::randn({1, 2, L, D}, dbl);
    Options o;
    o.mode = Mode::Dense;
    const at::Tensor ours = attention(q, k, v, g, o, Impl::Reference).o_s;
    const at::Tensor want = at::scaled_dot_product_attention(rope_wan(q), rope_wan(k), v);
    EXPECT_LT(rel(ours, want), 1e-12) << "D " << D;
  }
}

TEST(WanModel, SaladWithZeroLinearProjectionEqualsSparseBitForBit) {
  torch::manual_seed(3);
  const WanConfig c = tiny();
  WanModel salad_m(c, small_plan(Mode::Salad)), sparse_m(c, small_plan(Mode::Sparse));
  randomize(salad_m);
  {
    torch::NoGradGuard ng;
    auto src = salad_m->named_parameters(true);
    for (auto& p : sparse_m->named_parameters(true)) p.value().copy_(src[p.key()]);
    for (int64_t i = 0; i < c.num_layers; ++i) {  // a freshly converted model: W_l = 0
      salad_m->block(i)->self_attn->linear_o->weight.zero_();
      salad_m->block(i)->self_attn->linear_o->bias.zero_();
    }
  }
  const Inputs in = make_inputs(c);
  torch::NoGradGuard ng;
  const at::Tensor a = salad_m->forward(in.x, in.t, in.context), b = sparse_m->forward(in.x, in.t, in.context);
  EXPECT_TRUE(salad_m->block(0)->self_attn->last_attention().o_l.defined());
  EXPECT_TRUE(torch::equal(a, b));
}

TEST(WanModel, Bf16KeepsFloat32PartsAndStaysClose) {
  torch::manual_seed(4);
  const WanConfig c = tiny();
  WanModel m(c, small_plan(Mode::Dense));
  randomize(m);
  const Inputs in = make_inputs(c);
  torch::NoGradGuard ng;
  const at::Tensor ref = m->forward(in.x, in.t, in.context);
  m->set_dtype(at::kBFloat16);
  EXPECT_EQ(m->compute_dtype(), at::kBFloat16);
  EXPECT_EQ(m->block(0)->modulation.scalar_type(), at::kFloat);
  EXPECT_EQ(m->time_embedding->parameters()[0].scalar_type(), at::kFloat);
  EXPECT_EQ(m->block(0)->ffn->parameters()[0].scalar_type(), at::kBFloat16);
  const at::Tensor y = m->forward(in.x, in.t, in.context);
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  EXPECT_LT(rel(y, ref), 5e-2);
}

TEST(WanCheckpoint, KeyMappingBothWays) {
  EXPECT_EQ(wan_official_to_diffusers("blocks.3.self_attn.o.weight"), "blocks.3.attn1.to_out.0.weight");
  EXPECT_EQ(wan_official_to_diffusers("blocks.3.self_attn.norm_q.weight"), "blocks.3.attn1.norm_q.weight");
  EXPECT_EQ(wan_official_to_diffusers("blocks.0.cross_attn.k.bias"), "blocks.0.attn2.to_k.bias");
  EXPECT_EQ(wan_official_to_diffusers("blocks.0.norm3.weight"), "blocks.0.norm2.weight");
  EXPECT_EQ(wan_official_to_diffusers("blocks.0.ffn.0.weight"), "blocks.0.ffn.net.0.proj.weight");
  EXPECT_EQ(wan_official_to_diffusers("blocks.0.ffn.2.bias"), "blocks.0.ffn.net.2.bias");
  EXPECT_EQ(wan_official_to_diffusers("blocks.12.modulation"), "blocks.12.scale_shift_table");
  EXPECT_EQ(wan_official_to_diffusers("head.modulation"), "scale_shift_table");
  EXPECT_EQ(wan_official_to_diffusers("head.head.weight"), "proj_out.weight");
  EXPECT_EQ(wan_official_to_diffusers("time_projection.1.weight"), "condition_embedder.time_proj.weight");
  EXPECT_EQ(wan_official_to_diffusers("text_embedding.2.bias"), "condition_embedder.text_embedder.linear_2.bias");
  EXPECT_EQ(wan_official_to_diffusers("time_embedding.0.weight"), "condition_embedder.time_embedder.linear_1.weight");
  EXPECT_EQ(wan_official_to_diffusers("patch_embedding.weight"), "patch_embedding.weight");
  // Every parameter of the model maps to a distinct key and back to itself.
  WanModel m(tiny(), small_plan(Mode::Salad));
  std::set<std::string> seen;
  for (const auto& p : m->named_parameters(true)) {
    const std::string d = wan_official_to_diffusers(p.key());
    EXPECT_TRUE(seen.insert(d).second) << d;
    EXPECT_EQ(wan_diffusers_to_official(d), p.key());
  }
}

TEST(WanCheckpoint, SaveLoadRoundTripBothLayouts) {
  TempDir dir;
  torch::manual_seed(5);
  const WanConfig c = tiny();
  WanModel a(c, small_plan(Mode::Salad));
  randomize(a);
  for (WanLayout layout : {WanLayout::Official, WanLayout::Diffusers}) {
    const fs::path f = dir.path / (std::string(to_string(layout)) + ".safetensors");
    save_wan_weights(a, f, layout);
    const auto names = [&] {
      std::vector<std::string> n;
      for (const auto& kv : read_tensor_file(f)) n.push_back(kv.first);
      return n;
    }();
    EXPECT_EQ(detect_wan_layout(names), layout);
    WanModel b(c, small_plan(Mode::Salad));
    const WanLoadReport rep = load_wan_weights(b, f);
    EXPECT_EQ(rep.layout, layout);
    EXPECT_TRUE(rep.kept_default.empty());
    EXPECT_TRUE(rep.unexpected.empty());
    expect_same_state(a, b);
  }
  // A sharded checkpoint (index + shards), opened by index path and by directory.
  const fs::path shard_dir = dir.path / "sharded";
  fs::create_directories(shard_dir);
  const fs::path index = save_wan_weights_sharded(a, shard_dir, 64 * 1024, WanLayout::Diffusers);
  EXPECT_GT(std::distance(fs::directory_iterator(shard_dir), fs::directory_iterator()), 2);
  for (const fs::path& src : {index, shard_dir}) {
    WanModel b(c, small_plan(Mode::Salad));
    EXPECT_EQ(load_wan_weights(b, src).layout, WanLayout::Diffusers);
    expect_same_state(a, b);
  }
  EXPECT_EQ(detect_wan_config(shard_dir).num_heads, c.num_heads);
  remove_dir(shard_dir);

  // bf16 on disk loads into a float32 model with bf16 rounding.
  const fs::path f16 = dir.path / "bf16.safetensors";
  save_wan_weights(a, f16, WanLayout::Official, at::kBFloat16);
  WanModel b(c, small_plan(Mode::Salad));
  load_wan_weights(b, f16);
  EXPECT_TRUE(torch::equal(b->patch_embedding->weight, a->patch_embedding->weight.to(at::kBFloat16).to(at::kFloat)));
}

TEST(WanCheckpoint, DetectsArchitectureFromWeights) {
  TempDir dir;
  WanConfig c = tiny(3);
  c.in_dim = 5, c.out_dim = 3, c.ffn_dim = 96, c.text_dim = 24, c.num_heads = 4;
  WanModel m(c, small_plan(Mode::Sparse));
  const fs::path f = dir.path / "m.safetensors";
  save_wan_weights(m, f, WanLayout::Diffusers);
  const WanConfig d = detect_wan_config(f);  // heads from the file metadata
  EXPECT_EQ(d.dim, 64);
  EXPECT_EQ(d.in_dim, 5);
  EXPECT_EQ(d.out_dim, 3);
  EXPECT_EQ(d.ffn_dim, 96);
  EXPECT_EQ(d.text_dim, 24);
  EXPECT_EQ(d.freq_dim, c.freq_dim);
  EXPECT_EQ(d.num_layers, 3);
  EXPECT_EQ(d.num_heads, 4);
  EXPECT_EQ(d.patch, c.patch);
  EXPECT_TRUE(d.qk_norm && d.cross_attn_norm);
  EXPECT_EQ(detect_wan_config(f, 8).num_heads, 8);
  WanModel loaded = load_wan_model(f, small_plan(Mode::Sparse), 0, 0);
  expect_same_state(m, loaded);
  WanModel half = load_wan_model(f, small_plan(Mode::Sparse), 0, 0, at::kBFloat16);
  EXPECT_EQ(at::get_default_dtype(), caffe2::TypeMeta::Make<float>());  // restored
  EXPECT_EQ(half->compute_dtype(), at::kBFloat16);
  EXPECT_EQ(half->block(2)->modulation.scalar_type(), at::kFloat);
  EXPECT_TRUE(torch::equal(half->block(2)->modulation, m->block(2)->modulation));
  EXPECT_TRUE(torch::equal(half->block(1)->ffn->parameters()[0], m->block(1)->ffn->parameters()[0].to(at::kBFloat16)));

  // Real sizes from shapes alone, official layout with a ComfyUI-style prefix and diffusers.
  for (const char* preset : {"wan2.1-1.3b", "wan2.1-14b"}) {
    const WanConfig p = WanConfig::preset(preset);
    std::map<std::string, std::vector<int64_t>> off, diff;
    auto add = [&](const std::string& k, std::vector<int64_t> s) {
      off["model.diffusion_model." + k] = s;
      diff[wan_official_to_diffusers(k)] = s;
    };
    add("patch_embedding.weight", {p.dim, 16, 1, 2, 2});
    add("text_embedding.0.weight", {p.dim, 4096});
    add("time_embedding.0.weight", {p.dim, 256});
    add("head.head.weight", {64, p.dim});
    add("blocks.0.ffn.0.weight", {p.ffn_dim, p.dim});
    add("blocks.0.norm3.weight", {p.dim});
    add("blocks.0.self_attn.norm_q.weight", {p.dim});
    add("blocks." + std::to_string(p.num_layers - 1) + ".ffn.2.weight", {p.dim, p.ffn_dim});
    for (const auto* shapes : {&off, &diff}) {
      const WanConfig d2 = detect_wan_config(*shapes);
      EXPECT_EQ(d2.dim, p.dim) << preset;
      EXPECT_EQ(d2.num_heads, p.num_heads) << preset;
      EXPECT_EQ(d2.num_layers, p.num_layers) << preset;
      EXPECT_EQ(d2.ffn_dim, p.ffn_dim) << preset;
      EXPECT_EQ(d2.out_dim, 16) << preset;
    }
  }
  std::map<std::string, std::vector<int64_t>> no_pe = {{"blocks.0.ffn.0.weight", {8, 4}}};
  EXPECT_NE(error_of([&] { detect_wan_config(no_pe); }).find("patch_embedding.weight"), std::string::npos);
}

TEST(WanCheckpoint, MissingOrMisshapedTensorNamesItAndTheShapes) {
  TempDir dir;
  torch::manual_seed(6);
  const WanConfig c = tiny();
  WanModel m(c, small_plan(Mode::Salad));
  std::map<std::string, at::Tensor> state;
  for (const auto& p : m->named_parameters(true)) state[p.key()] = p.value().detach();

  auto base = state;  // a base (non-SALAD) checkpoint: the new parameters stay at init
  for (auto it = base.begin(); it != base.end();)
    it = (it->first.find("linear_o") != std::string::npos || it->first.find("self_attn.gate") != std::string::npos ||
          it->first.find("static_scale") != std::string::npos)
             ? base.erase(it)
             : std::next(it);
  write_tensor_file(dir.path / "base.safetensors", base);
  WanModel b(c, small_plan(Mode::Salad));
  const WanLoadReport rep = load_wan_weights(b, dir.path / "base.safetensors");
  EXPECT_EQ(rep.kept_default.size(), static_cast<size_t>(c.num_layers * 5));  // linear_o w/b, gate w/b, static_scale
  EXPECT_TRUE(torch::equal(b->block(0)->self_attn->linear_o->weight, torch::zeros({64, 64})));

  auto missing = state;
  missing.erase("blocks.1.cross_attn.v.weight");
  write_tensor_file(dir.path / "missing.safetensors", missing);
  std::string e = error_of([&] { load_wan_weights(b, dir.path / "missing.safetensors"); });
  EXPECT_NE(e.find("missing tensor 'blocks.1.cross_attn.v.weight'"), std::string::npos) << e;
  EXPECT_NE(e.find("expected shape [64, 64]"), std::string::npos) << e;

  auto bad = state;
  bad["blocks.0.ffn.0.weight"] = torch::zeros({128, 32});
  std::map<std::string, at::Tensor> bad_diff;
  for (const auto& kv : bad) bad_diff[wan_official_to_diffusers(kv.first)] = kv.second;
  write_tensor_file(dir.path / "bad.safetensors", bad_diff);
  e = error_of([&] { load_wan_weights(b, dir.path / "bad.safetensors"); });
  EXPECT_NE(e.find("'blocks.0.ffn.0.weight'"), std::string::npos) << e;
  EXPECT_NE(e.find("'blocks.0.ffn.net.0.proj.weight'"), std::string::npos) << e;
  EXPECT_NE(e.find("expected shape [128, 64], got [128, 32]"), std::string::npos) << e;

  auto extra = state;
  extra["blocks.0.surprise"] = torch::zeros({2});
  write_tensor_file(dir.path / "extra.safetensors", extra);
  e = error_of([&] { load_wan_weights(b, dir.path / "extra.safetensors"); });
  EXPECT_NE(e.find("'blocks.0.surprise'"), std::string::npos) << e;
  EXPECT_EQ(load_wan_weights(b, dir.path / "extra.safetensors", false).unexpected.size(), 1u);
}

// Files written by tests/python/test_wan_parity.py: diffusers.safetensors and
// official.safetensors (same random weights, metadata num_heads),
// inputs.safetensors (x, t, context) and expected.safetensors (out, computed by
// diffusers in float64).
TEST(WanParity, MatchesDiffusersInBothLayouts) {
  const char* env = std::getenv("SALAD_WAN_PARITY_DIR");
  if (!env || !*env) GTEST_SKIP() << "SALAD_WAN_PARITY_DIR not set (run tests/python/test_wan_parity.py)";
  const fs::path dir(env);
  auto in = read_tensor_file(dir / "inputs.safetensors");
  const at::Tensor want = read_tensor_file(dir / "expected.safetensors").at("out");
  for (const char* file : {"diffusers.safetensors", "official.safetensors"}) {
    for (Impl impl : {Impl::Reference, Impl::Fast}) {
      WanModel m = load_wan_model(dir / file, WanAttentionPlan::uniform(Mode::Dense, impl), 0, 0);
      torch::NoGradGuard ng;
      const at::Tensor y = m->forward(in.at("x").to(at::kFloat), in.at("t"), in.at("context").to(at::kFloat));
      ASSERT_EQ(y.sizes(), want.sizes());
      const double r = rel(y, want);
      std::printf("parity %s impl %s: relative error %.3e\n", file, to_string(impl), r);
      EXPECT_LE(r, 1e-5) << file << " " << to_string(impl);
    }
  }
}

// --- fused block glue (salad::fused) and what the layers keep --------------------------

namespace {

// The eager expressions fused.h documents, written out here independently.
at::Tensor ref_modulated(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                         at::ScalarType out) {
  return (at::layer_norm(x, {x.size(-1)}, {}, {}, eps) * (1 + scale) + shift).to(out);
}
at::Tensor ref_residual(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate) {
  return gate.defined() ? x + y.to(x.scalar_type()) * gate : x + y.to(x.scalar_type());
}
at::Tensor ref_rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xf = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  return (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type()) * w;
}
at::Tensor ref_ln_affine(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::ScalarType out) {
  return at::layer_norm(x.to(w.scalar_type()), {x.size(-1)}, w, b, eps).to(out);
}

// A residual stream (B, L, C) with a nonzero mean, a (B, 6, C) modulation (chunks as the block takes them),
// a bf16 branch output and affine weights.
struct GlueInputs {
  at::Tensor x, y, mod, w, b;
  std::vector<at::Tensor> m;
};
GlueInputs glue_inputs(int64_t B, int64_t L, int64_t C, const at::Device& dev, at::ScalarType ydt = at::kBFloat16) {
  auto f = at::TensorOptions().dtype(at::kFloat);
  GlueInputs g;
  g.x = (torch::randn({B, L, C}, f) * 3 + 0.5).to(dev);
  g.y = torch::randn({B, L, C}, f).to(dev, ydt);
  g.mod = (torch::randn({B, 6, C}, f) * 0.3).to(dev);
  g.m = g.mod.chunk(6, 1);
  g.w = (1 + 0.2 * torch::randn({C}, f)).to(dev);
  g.b = (0.1 * torch::randn({C}, f)).to(dev);
  return g;
}

// Max over elements of |a - ref| / (|ref| + floor), in float64.
double max_rel(const at::Tensor& a, const at::Tensor& ref, double floor = 1e-3) {
  const at::Tensor r = ref.to(at::kCPU, at::kDouble);
  return ((a.to(at::kCPU, at::kDouble) - r).abs() / (r.abs() + floor)).max().item<double>();
}

}  // namespace

TEST(WanFused, FallbackEqualsEagerMathOnCpu) {
  torch::manual_seed(11);
  fused::EnabledGuard on(true);
  for (const bool grad : {false, true}) {
    GlueInputs g = glue_inputs(2, 37, 24, at::kCPU);
    if (grad) g.x.requires_grad_(true), g.mod.requires_grad_(true);
    std::optional<torch::NoGradGuard> ng;
    if (!grad) ng.emplace();
    const double eps = 1e-6;
    for (at::ScalarType out : {at::kBFloat16, at::kFloat}) {
      EXPECT_TRUE(torch::equal(fused::modulated_norm(g.x, g.m[0], g.m[1], eps, out),
                               ref_modulated(g.x, g.m[0], g.m[1], eps, out)));
      EXPECT_TRUE(torch::equal(fused::layer_norm_affine(g.x, g.w, g.b, eps, out), ref_ln_affine(g.x, g.w, g.b, eps, out)));
      EXPECT_TRUE(torch::equal(fused::layer_norm_affine(g.x, {}, {}, eps, out), g.x.to(out)));
    }
    EXPECT_TRUE(torch::equal(fused::gated_residual(g.x, g.y, g.m[2]), ref_residual(g.x, g.y, g.m[2])));
    EXPECT_TRUE(torch::equal(fused::gated_residual(g.x, g.y, {}), ref_residual(g.x, g.y, {})));
    const at::Tensor x0 = g.x.detach().clone();
    const at::Tensor r_reuse = fused::gated_residual(g.x, g.y, g.m[2], /*reuse_x=*/true);
    EXPECT_TRUE(torch::equal(g.x, x0)) << "the eager path never writes into x";
    EXPECT_TRUE(torch::equal(r_reuse, ref_residual(g.x, g.y, g.m[2])));
    auto [r1, h1] = fused::residual_modulated_norm(g.x, g.y, {}, g.m[3], g.m[4], eps, at::kBFloat16, true);
    const at::Tensor r1_ref = ref_residual(g.x, g.y, {});
    EXPECT_TRUE(torch::equal(r1, r1_ref));
    EXPECT_TRUE(torch::equal(h1, ref_modulated(r1_ref, g.m[3], g.m[4], eps, at::kBFloat16)));
    auto [r2, h2] = fused::residual_layer_norm(g.x, g.y, g.m[2], g.w, g.b, eps, at::kBFloat16);
    const at::Tensor r2_ref = ref_residual(g.x, g.y, g.m[2]);
    EXPECT_TRUE(torch::equal(r2, r2_ref));
    EXPECT_TRUE(torch::equal(h2, ref_ln_affine(r2_ref, g.w, g.b, eps, at::kBFloat16)));
    auto [r3, h3] = fused::residual_layer_norm(g.x, g.y, g.m[2], {}, {}, eps, at::kBFloat16);
    EXPECT_TRUE(torch::equal(h3, r2_ref.to(at::kBFloat16)));
    if (grad) EXPECT_TRUE(r2.requires_grad() && h2.requires_grad()) << "the eager path keeps autograd";
    for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kDouble}) {
      const at::Tensor q = torch::randn({2, 37, 24}).to(dt), w = (1 + 0.2 * torch::randn({24})).to(dt);
      EXPECT_TRUE(torch::equal(fused::rms_norm(q, w, eps), ref_rms(q, w, eps))) << dt;
      EXPECT_TRUE(torch::equal(fused::rms_norm(q.clone(), w, eps, /*reuse_x=*/true), ref_rms(q, w, eps))) << dt;
      RMSNorm n(24, eps);
      {
        torch::NoGradGuard ng2;
        n->weight.set_data(w.clone());
      }
      EXPECT_TRUE(torch::equal(n->forward(q), ref_rms(q, w, eps))) << dt;
    }
  }
}

TEST(WanFused, SwitchAndCpuModelOutputIdenticalOnAndOff) {
  {
    fused::EnabledGuard off(false);
    EXPECT_FALSE(fused::enabled());
    {
      fused::EnabledGuard on(true);
      EXPECT_TRUE(fused::enabled());
    }
    EXPECT_FALSE(fused::enabled());
  }
  torch::manual_seed(12);
  const WanConfig c = tiny();
  for (Mode mode : {Mode::Dense, Mode::Salad}) {
    WanModel m(c, small_plan(mode));
    randomize(m);
    const Inputs in = make_inputs(c);
    torch::NoGradGuard ng;
    at::Tensor on, off;
    {
      fused::EnabledGuard g(true);
      on = m->forward(in.x, in.t, in.context);
    }
    {
      fused::EnabledGuard g(false);
      off = m->forward(in.x, in.t, in.context);
    }
    EXPECT_TRUE(torch::equal(on, off)) << to_string(mode);
  }
  // float64 and bf16 (CPU) models take the eager path too.
  WanModel m(c, small_plan(Mode::Salad));
  randomize(m);
  const Inputs in = make_inputs(c);
  torch::NoGradGuard ng;
  for (at::ScalarType dt : {at::kDouble, at::kBFloat16}) {
    m->set_dtype(dt);
    at::Tensor on, off;
    {
      fused::EnabledGuard g(true);
      on = m->forward(in.x, in.t, in.context);
    }
    {
      fused::EnabledGuard g(false);
      off = m->forward(in.x, in.t, in.context);
    }
    EXPECT_TRUE(torch::equal(on, off)) << dt;
  }
}

TEST(WanKeepLast, InferenceKeepsOnlyTheBlockTable) {
  torch::manual_seed(13);
  const WanConfig c = tiny();
  WanModel m(c, small_plan(Mode::Salad));
  randomize(m);
  const Inputs in = make_inputs(c);
  auto sa = [&](int64_t i) { return m->block(i)->self_attn; };
  {
    torch::NoGradGuard ng;  // Auto under no-grad: Small
    m->forward(in.x, in.t, in.context);
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const AttentionOutput& o = sa(i)->last_attention();
      EXPECT_TRUE(o.o_s.is_meta() && o.o_l.is_meta() && o.lse.is_meta()) << "layer " << i;
      EXPECT_EQ(o.o_s.size(2), 24) << "shapes stay readable";
      EXPECT_FALSE(o.block_cnt.is_meta());
      EXPECT_TRUE(o.block_cnt.defined() && o.block_idx.defined());
      EXPECT_TRUE(sa(i)->last_scale().defined());
    }
  }
  {
    torch::NoGradGuard ng;
    m->keep_last(KeepLast::All);
    m->forward(in.x, in.t, in.context);
    EXPECT_FALSE(sa(0)->last_attention().o_s.is_meta());
    EXPECT_TRUE(sa(0)->last_attention().o_l.isfinite().all().item<bool>());
    m->keep_last(KeepLast::None);
    m->forward(in.x, in.t, in.context);
    EXPECT_FALSE(sa(0)->last_attention().o_s.defined());
    EXPECT_FALSE(sa(0)->last_attention().block_cnt.defined());
    EXPECT_FALSE(sa(0)->last_scale().defined());
  }
  m->keep_last(KeepLast::Auto);
  const at::Tensor y = m->forward(in.x, in.t, in.context);  // grad mode on: everything kept
  EXPECT_TRUE(y.requires_grad());
  EXPECT_FALSE(sa(1)->last_attention().o_s.is_meta());
  EXPECT_EQ(sa(1)->last_attention().o_s.device(), at::Device(at::kCPU));
}

// --- the fused CUDA kernels (skip without a CUDA device) ----------------------------------

namespace {
bool have_fused_cuda() { return torch::cuda::is_available() && fused::kernels_compiled(); }
}  // namespace

TEST(SM90_Fused, KernelsMatchEagerMathWithinBf16Rounding) {
  if (!have_fused_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(21);
  torch::NoGradGuard ng;
  const at::Device dev(at::kCUDA);
  const double eps = 1e-6, bf16_ulp = 1.0 / 128;  // one bf16 ulp, relative
  for (int64_t C : {1536, 5120}) {
    const int64_t B = 2, L = 1237;
    const GlueInputs g = glue_inputs(B, L, C, dev);
    const std::string at_c = "C " + std::to_string(C);
    // float64 references on the host.
    const at::Tensor x64 = g.x.to(at::kCPU, at::kDouble), y64 = g.y.to(at::kCPU, at::kDouble);
    const at::Tensor m64 = g.mod.to(at::kCPU, at::kDouble);
    const auto mm = m64.chunk(6, 1);
    auto ln64 = [&](const at::Tensor& t) {
      const at::Tensor mu = t.mean(-1, true);
      return (t - mu) / at::sqrt((t - mu).pow(2).mean(-1, true) + eps);
    };
    at::Tensor eager_h, fused_h;

    // (a) modulated norm, bf16 / fp16 / float32 out.
    const at::Tensor want_a = ln64(x64) * (1 + mm[1]) + mm[0];
    for (at::ScalarType out : {at::kBFloat16, at::kHalf, at::kFloat}) {
      fused_h = fused::modulated_norm(g.x, g.m[0], g.m[1], eps, out);
      {
        fused::EnabledGuard off(false);
        eager_h = fused::modulated_norm(g.x, g.m[0], g.m[1], eps, out);
      }
      ASSERT_EQ(fused_h.scalar_type(), out);
      // float32: absolute-ish (floor 1), the low-precision outputs: within one ulp of the value.
      const double tol = out == at::kFloat ? 1e-5 : out == at::kHalf ? 1.0 / 1024 : bf16_ulp;
      const double floor = out == at::kFloat ? 1.0 : 1e-3;
      EXPECT_LE(max_rel(fused_h, want_a, floor), tol) << at_c << " " << out;
      EXPECT_LE(max_rel(fused_h, eager_h, floor), tol) << at_c << " " << out;
    }

    // (b) gated residual: the same two float32 roundings as eager, so bit for bit; in place too.
    at::Tensor r_eager;
    {
      fused::EnabledGuard off(false);
      r_eager = fused::gated_residual(g.x, g.y, g.m[2]);
    }
    EXPECT_TRUE(torch::equal(fused::gated_residual(g.x, g.y, g.m[2]), r_eager)) << at_c;
    EXPECT_TRUE(torch::equal(fused::gated_residual(g.x, g.y, {}), g.x + g.y.to(at::kFloat))) << at_c;
    at::Tensor xin = g.x.clone();
    const at::Tensor r_in = fused::gated_residual(xin, g.y, g.m[2], /*reuse_x=*/true);
    EXPECT_EQ(r_in.data_ptr(), xin.data_ptr()) << "reuse_x writes in place";
    EXPECT_TRUE(torch::equal(r_in, r_eager)) << at_c;
    EXPECT_LE(max_rel(r_eager, x64 + y64 * mm[2], 1.0), 1e-6) << at_c;

    // (b) + (d): residual then norm3 (affine), and (d) alone.
    const at::Tensor w64 = g.w.to(at::kCPU, at::kDouble), b64 = g.b.to(at::kCPU, at::kDouble);
    auto [r2, h2] = fused::residual_layer_norm(g.x, g.y, g.m[2], g.w, g.b, eps, at::kBFloat16);
    EXPECT_TRUE(torch::equal(r2, r_eager)) << at_c;
    EXPECT_LE(max_rel(h2, ln64(r_eager.to(at::kCPU, at::kDouble)) * w64 + b64), bf16_ulp) << at_c;
    EXPECT_LE(max_rel(fused::layer_norm_affine(g.x, g.w, g.b, eps, at::kBFloat16), ln64(x64) * w64 + b64), bf16_ulp)
        << at_c;
    EXPECT_LE(max_rel(fused::layer_norm_affine(g.x, g.w, {}, eps, at::kFloat), ln64(x64) * w64, 1.0), 1e-5) << at_c;
    auto [r3, h3] = fused::residual_layer_norm(g.x, g.y, g.m[2], {}, {}, eps, at::kBFloat16);
    EXPECT_TRUE(torch::equal(h3, r_eager.to(at::kBFloat16))) << at_c;

    // (b) + (a): plain residual then the modulated norm, in place.
    at::Tensor xin2 = g.x.clone();
    auto [r4, h4] = fused::residual_modulated_norm(xin2, g.y, {}, g.m[3], g.m[4], eps, at::kBFloat16, true);
    EXPECT_TRUE(torch::equal(r4, g.x + g.y.to(at::kFloat))) << at_c;
    EXPECT_LE(max_rel(h4, ln64(r4.to(at::kCPU, at::kDouble)) * (1 + mm[4]) + mm[3]), bf16_ulp) << at_c;

    // (c) RMSNorm in bf16 / fp16 (two roundings: the normalised value, then the product) and float32.
    for (at::ScalarType dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
      const at::Tensor q = (torch::randn({B, L, C}) * 2).to(dev, dt), w = (1 + 0.2 * torch::randn({C})).to(dev, dt);
      const at::Tensor q64 = q.to(at::kCPU, at::kDouble), w64r = w.to(at::kCPU, at::kDouble);
      const at::Tensor want = q64 * at::rsqrt(q64.pow(2).mean(-1, true) + eps) * w64r;
      const at::Tensor got = fused::rms_norm(q, w, eps);
      at::Tensor eager;
      {
        fused::EnabledGuard off(false);
        eager = fused::rms_norm(q, w, eps);
      }
      const double tol = dt == at::kFloat ? 1e-5 : dt == at::kHalf ? 3.0 / 1024 : 3 * bf16_ulp;
      const double floor = dt == at::kFloat ? 1.0 : 1e-3;
      EXPECT_LE(max_rel(got, want, floor), tol) << at_c << " " << dt;
      EXPECT_LE(max_rel(got, eager, floor), tol) << at_c << " " << dt;
      // In bf16 / fp16 nearly every element rounds exactly as eager does.
      if (dt != at::kFloat) EXPECT_GT(got.eq(eager).to(at::kDouble).mean().item<double>(), 0.99) << at_c << " " << dt;
      const at::Tensor qc = q.clone();
      EXPECT_TRUE(torch::equal(fused::rms_norm(qc, w, eps, /*reuse_x=*/true), got)) << at_c << " " << dt;
    }
  }
}

TEST(SM90_Fused, UnsupportedInputsFallBackToEagerBitForBit) {
  if (!have_fused_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(23);
  torch::NoGradGuard ng;
  const at::Device dev(at::kCUDA);
  GlueInputs g20 = glue_inputs(2, 33, 20, dev);  // C = 20: not a multiple of 8
  GlueInputs g24 = glue_inputs(2, 33, 24, dev);
  g24.x = g24.x.transpose(0, 1).contiguous().transpose(0, 1);  // a supported C, but not contiguous
  g24.y = g24.y.transpose(0, 1).contiguous().transpose(0, 1);
  for (const GlueInputs* g : {&g20, &g24}) {
    const at::Tensor wb = g->w.to(at::kBFloat16);
    const at::Tensor h_on = fused::modulated_norm(g->x, g->m[0], g->m[1], 1e-6, at::kBFloat16);
    const at::Tensor r_on = fused::gated_residual(g->x, g->y, g->m[2]);
    const at::Tensor n_on = fused::rms_norm(g->y, wb, 1e-6);
    fused::EnabledGuard off(false);
    EXPECT_TRUE(torch::equal(h_on, fused::modulated_norm(g->x, g->m[0], g->m[1], 1e-6, at::kBFloat16)));
    EXPECT_TRUE(torch::equal(r_on, fused::gated_residual(g->x, g->y, g->m[2])));
    EXPECT_TRUE(torch::equal(n_on, fused::rms_norm(g->y, wb, 1e-6)));
  }
  // Autograd needed: the eager path, so gradients flow.
  torch::AutoGradMode grad(true);
  const at::Tensor x = g20.x.clone().requires_grad_(true);
  EXPECT_TRUE(fused::modulated_norm(x, g20.m[0], g20.m[1], 1e-6, at::kFloat).requires_grad());
  const at::Tensor x24 = glue_inputs(2, 33, 24, dev).x.requires_grad_(true);
  EXPECT_TRUE(fused::gated_residual(x24, g24.y.contiguous(), g24.m[2]).requires_grad());
}

TEST(SM90_Fused, TinyWanForwardFusedMatchesEagerOnCudaBf16) {
  if (!have_fused_cuda()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  torch::manual_seed(22);
  WanConfig c = tiny();
  c.dim = 128, c.ffn_dim = 256, c.num_heads = 2;  // head width 64 (the CUDA kernels take 64 and 128)
  for (Mode mode : {Mode::Dense, Mode::Salad}) for (int64_t B : {1, 2}) {  // B 1: s(x) folded into W_l
    SCOPED_TRACE("B " + std::to_string(B));
    WanAttentionPlan plan = WanAttentionPlan::uniform(mode);
    plan.base.attn.keep = 1.0;  // every key block: no top-k ties that a rounding difference could flip
    WanModel m(c, plan);
    randomize(m);
    const Inputs in = make_inputs(c, B, 3, 16, 24, 7);  // 3 x 8 x 12 = 288 tokens
    torch::NoGradGuard ng;
    const at::Tensor ref32 = m->forward(in.x, in.t, in.context);  // float32 on the CPU
    m->set_dtype(at::kBFloat16);
    m->to(at::kCUDA);
    at::Tensor on, off;
    {
      fused::EnabledGuard g(false);
      off = m->forward(in.x, in.t, in.context).cpu();
    }
    {
      fused::EnabledGuard g(true);
      on = m->forward(in.x, in.t, in.context).cpu();
    }
    EXPECT_EQ(on.scalar_type(), at::kFloat);
    EXPECT_TRUE(on.isfinite().all().item<bool>());
    const double r_eager = rel(off, ref32), r_fused = rel(on, ref32), r_pair = rel(on, off);
    std::printf("tiny wan %s on CUDA bf16: rel err eager %.3e, fused %.3e, fused vs eager %.3e\n", to_string(mode),
                r_eager, r_fused, r_pair);
    EXPECT_LT(r_pair, 1e-2) << to_string(mode);
    EXPECT_LT(r_fused, std::max(5e-2, 1.5 * r_eager)) << to_string(mode);
    EXPECT_FALSE(torch::equal(on, off)) << "the fused path should have run (GELU epilogue, fused GEMMs)";
    EXPECT_TRUE(m->block(0)->self_attn->last_attention().o_s.is_meta()) << "inference keeps no attention output";
  }
}
