// The Wan 2.1 DiT runtime: forward shapes, RoPE against Wan's complex
// rope_apply, checkpoint layouts (official / diffusers), architecture
// detection, load errors, SALAD-vs-sparse equivalence at W_l = 0, and (when
// SALAD_WAN_PARITY_DIR is set by tests/python/test_wan_parity.py) parity with
// diffusers' WanTransformer3DModel.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "salad/layout.h"
#include "salad/wan.h"

using namespace salad;
namespace fs = std::filesystem;
namespace {

double rel(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor bd = b.to(at::kDouble);
  return ((a.to(at::kDouble) - bd).norm() / bd.norm().clamp_min(1e-300)).item<double>();
}

// Removes a directory of plain files. Not fs::remove_all, which binds to a
// broken copy exported by the pip libtorch.so (segfaults).
void remove_flat_dir(const fs::path& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().string());
  for (const auto& f : files) std::remove(f.c_str());
  ::rmdir(dir.c_str());
}

// A fresh directory under the temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("salad_wan_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { remove_flat_dir(path); }
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
  remove_flat_dir(shard_dir);

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
