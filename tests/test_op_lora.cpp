// SALAD conversion, LoRA and adapter files: a fresh conversion equals the
// sparse model bit-for-bit, merge_lora equals the adapted model, adapter
// round trips, shape errors, trainable groups, and (with SALAD_CLI set) the
// `salad convert` / `salad merge` commands on a tiny checkpoint.
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "temp_dir.h"
#include "salad/lora.h"
#include "salad/wan.h"

using namespace salad;
namespace fs = std::filesystem;
namespace {

struct TempDir : test::TempDir {
  TempDir() : test::TempDir("salad_lora") {}
};

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// Small blocks so the sparse pattern drops blocks on the 2x6x8 latent (24 tokens).
SaladConvertOptions small_options(int64_t rank = 4) {
  SaladConvertOptions o;
  o.attn.block_q = 4;
  o.attn.block_k = 4;
  o.attn.keep = 0.5;
  o.lora.rank = rank;
  o.lora.alpha = 8.0;
  return o;
}

WanAttentionPlan sparse_plan() {
  WanAttentionPlan p = small_options().plan();
  p.base.attn.mode = Mode::Sparse;
  return p;
}

void randomize(WanModel& m, double std = 0.05) {
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.normal_(0.0, std);
}

void copy_state(WanModel& from, WanModel& to) {
  torch::NoGradGuard ng;
  auto src = from->named_parameters(true);
  for (auto& p : to->named_parameters(true)) p.value().copy_(src[p.key()]);
}

struct Inputs {
  at::Tensor x, t, context;
};
Inputs make_inputs(const WanConfig& c) {
  return {torch::randn({2, c.in_dim, 2, 6, 8}), torch::tensor({999.0, 250.5}), torch::randn({2, 5, c.text_dim})};
}

at::Tensor run(WanModel& m, const Inputs& in) {
  torch::NoGradGuard ng;
  return m->forward(in.x, in.t, in.context);
}

void randomize_lora_b(WanModel& m) {
  torch::NoGradGuard ng;
  for (const LoRALinear& l : find_lora(m)) l.B->weight.normal_(0.0, 0.05);
  refresh_lora(m);
}

}  // namespace

TEST(LoRA, TargetsByPattern) {
  WanModel m(WanConfig::preset("tiny"), small_options().plan());
  auto names = lora_target_names(m, {"q", "k", "v", "o"});
  ASSERT_EQ(names.size(), 8u);
  EXPECT_EQ(names[0], "blocks.0.self_attn.q");
  EXPECT_EQ(names[3], "blocks.0.self_attn.o");
  names = lora_target_names(m, {"cross_attn.*", "ffn.*", "blocks.1.self_attn.v"});
  EXPECT_EQ(names.size(), 13u);  // 2 x (4 + 2) + 1
  EXPECT_EQ(std::count(names.begin(), names.end(), "blocks.1.ffn.2"), 1);
  EXPECT_EQ(std::count(names.begin(), names.end(), "blocks.0.self_attn.linear_o"), 0);
  const std::string e = error_of([&] { lora_target_names(m, {"q", "mlp.fc1"}); });
  EXPECT_NE(e.find("'mlp.fc1'"), std::string::npos) << e;
  EXPECT_NE(e.find("self_attn.q"), std::string::npos) << e;  // lists the candidates
  LoRAOptions bad;
  bad.dropout = 0.1;
  EXPECT_NE(error_of([&] { apply_lora(m, bad); }).find("dropout"), std::string::npos);
}

TEST(LoRA, FreshConversionEqualsSparseBitForBit) {
  torch::manual_seed(10);
  const WanConfig c = WanConfig::preset("tiny");
  WanModel sparse(c, sparse_plan());
  randomize(sparse);
  // A base model of another plan (dense, no gate) converted in place.
  WanAttentionPlan dense = WanAttentionPlan::uniform(Mode::Dense);
  dense.base.gate = Gate::None;
  WanModel conv(c, dense);
  copy_state(sparse, conv);  // the base names are unchanged; SALAD extras too
  SaladConvertOptions o = small_options();
  o.lora.targets = {"q", "k", "v", "o", "ffn.*", "cross_attn.q"};
  o.gate = Gate::Dynamic;
  convert_to_salad(conv, o);
  EXPECT_EQ(conv->block(1)->self_attn->config().attn.mode, Mode::Salad);
  EXPECT_EQ(conv->block(1)->self_attn->config().attn.block_k, 4);
  EXPECT_TRUE(conv->block(0)->self_attn->gate);
  EXPECT_EQ(find_lora(conv).size(), 14u);
  EXPECT_TRUE(torch::equal(conv->block(0)->self_attn->linear_o->weight, torch::zeros({64, 64})));
  const auto params = conv->named_parameters(true);
  ASSERT_NE(params.find("blocks.1.self_attn.q.lora_A.weight"), nullptr);
  EXPECT_EQ(params["blocks.1.ffn.0.lora_B.weight"].sizes(), (std::vector<int64_t>{128, 4}));
  EXPECT_EQ(params["blocks.1.ffn.0.lora_A.weight"].sizes(), (std::vector<int64_t>{4, 64}));
  EXPECT_TRUE(params["blocks.1.ffn.0.lora_A.weight"].abs().sum().item<double>() > 0);

  const Inputs in = make_inputs(c);
  const at::Tensor want = run(sparse, in), got = run(conv, in);
  EXPECT_TRUE(conv->block(0)->self_attn->last_attention().o_l.defined());
  EXPECT_TRUE(torch::equal(got, want));

  // Adding a static scale to a model built without one works; removing one cannot.
  SaladConvertOptions again = small_options(0);
  again.gate = Gate::StaticDynamic;
  convert_to_salad(conv, again);
  EXPECT_TRUE(conv->block(0)->self_attn->static_scale.defined());
  again.gate = Gate::Dynamic;
  EXPECT_NE(error_of([&] { convert_to_salad(conv, again); }).find("gate"), std::string::npos);
  EXPECT_NE(error_of([&] { convert_to_salad(conv, small_options()); }).find("already has a LoRA"), std::string::npos);
}

TEST(LoRA, RandomBChangesOutputAndMergeMatches) {
  torch::manual_seed(11);
  const WanConfig c = WanConfig::preset("tiny");
  WanModel m(c, small_options().plan());
  randomize(m);
  SaladConvertOptions o = small_options();
  o.reinit = false;  // keep the random W_l and gates: a trained model
  o.lora.targets = {"q", "k", "v", "o", "cross_attn.v", "ffn.2"};
  convert_to_salad(m, o);
  const Inputs in = make_inputs(c);
  const at::Tensor before = run(m, in);
  randomize_lora_b(m);
  const at::Tensor adapted = run(m, in);
  EXPECT_FALSE(torch::allclose(adapted, before, 1e-4, 1e-4));
  // The weight-space adapter equals the activation-space formula.
  const LoRALinear l = find_lora(m).front();
  const at::Tensor x = torch::randn({3, 64});
  EXPECT_TRUE(torch::allclose(l.forward(x), at::linear(x, l.linear->weight, l.linear->bias), 1e-5, 1e-5));

  EXPECT_EQ(merge_lora(m), 12);
  EXPECT_TRUE(find_lora(m).empty());
  for (const auto& p : m->named_parameters(true)) EXPECT_NE(parameter_group(p.key()), "lora") << p.key();
  const at::Tensor merged = run(m, in);
  EXPECT_TRUE(torch::allclose(merged, adapted, 1e-5, 1e-5));
}

// A training loop that turns bf16 autocast on and off around its forward, as
// C++ code does (at::autocast::set_autocast_enabled, no clear_cache()): the
// "lora" pre-forward hook must still give every forward the current A and B.
// It once composed W0 + s B A under autocast, so A and B (float32 leaves that
// require grad) went into autocast's cast cache and every later forward reused
// step 1's copies (B = 0): GPU-tuned adapters trained blind, eval was garbage.
TEST(LoRA, AdaptersUnderAutocastUseTheCurrentFactors) {
  torch::manual_seed(13);
  const WanConfig c = WanConfig::preset("tiny");
  WanModel m(c, small_options().plan());
  randomize(m);
  SaladConvertOptions o = small_options();
  o.reinit = false;
  convert_to_salad(m, o);
  trainable_parameters(m, {"lora", "linear_o", "gate", "static_scale"});
  const Inputs in = make_inputs(c);
  auto autocast_forward = [&] {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    at::Tensor y;
    try {
      y = m->forward(in.x, in.t, in.context).to(at::kFloat);  // with grad, as a training step
    } catch (...) {
      at::autocast::set_autocast_enabled(at::kCPU, false);
      throw;
    }
    at::autocast::set_autocast_enabled(at::kCPU, false);
    return y.detach();
  };
  auto rel = [](const at::Tensor& a, const at::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); };
  const at::Tensor first = autocast_forward();  // B = 0: the sparse model
  EXPECT_LT(rel(first, run(m, in)), 0.03) << "bf16 autocast vs float32";
  {  // an optimizer step: in place, the same tensors
    torch::NoGradGuard ng;
    for (const LoRALinear& l : find_lora(m)) l.B->weight.normal_(0.0, 0.5);
  }
  const at::Tensor fp32 = run(m, in);
  ASSERT_GT(rel(fp32, first), 0.1) << "the new B must change the output";
  const at::Tensor second = autocast_forward();
  at::autocast::clear_cache();
  EXPECT_LT(rel(second, fp32), 0.03) << "the autocast forward must see the updated B (not a cached bf16 copy of B = 0)";
  for (const LoRALinear& l : find_lora(m)) EXPECT_EQ(l.linear->weight.scalar_type(), at::kFloat) << l.name;
}

TEST(LoRA, TrainableGroupsAndFrozenBase) {
  torch::manual_seed(12);
  const WanConfig c = WanConfig::preset("tiny");
  WanModel m(c, small_options().plan());
  convert_to_salad(m, small_options());
  auto count = [&](const std::string& g) {
    int n = 0;
    for (const auto& p : m->named_parameters(true)) n += parameter_group(p.key()) == g;
    return n;
  };
  EXPECT_EQ(count("lora"), 2 * 4 * 2);
  EXPECT_EQ(count("linear_o"), 2 * 2);
  EXPECT_EQ(count("gate"), 2 * 2);
  EXPECT_EQ(count("static_scale"), 2);
  for (const std::vector<std::string>& groups : {std::vector<std::string>{"lora"},
                                                 {"linear_o", "gate"},
                                                 {"static_scale"},
                                                 {"lora", "linear_o", "gate", "static_scale"}}) {
    const auto sel = trainable_parameters(m, groups);
    size_t want = 0;
    for (const auto& g : groups) want += static_cast<size_t>(count(g));
    EXPECT_EQ(sel.size(), want);
    for (const auto& p : m->named_parameters(true)) {
      const std::string g = parameter_group(p.key());
      const bool on = std::find(groups.begin(), groups.end(), g) != groups.end();
      EXPECT_EQ(p.value().requires_grad(), on) << p.key();
      EXPECT_EQ(sel.find(p.key()) != nullptr, on) << p.key();
    }
  }
  EXPECT_NE(error_of([&] { trainable_parameters(m, {"lora", "bias"}); }).find("'bias'"), std::string::npos);

  // A training step: only the selected groups get gradients; every forward
  // re-composes the adapted weights (the model's "lora" pre-forward hook), so
  // consecutive steps need no explicit refresh.
  trainable_parameters(m, {"lora", "linear_o"});
  randomize_lora_b(m);
  const Inputs in = make_inputs(c);
  m->forward(in.x, in.t, in.context).square().mean().backward();
  for (const auto& p : m->named_parameters(true)) {
    const std::string g = parameter_group(p.key());
    EXPECT_EQ(p.value().grad().defined(), g == "lora" || g == "linear_o") << p.key();
  }
  EXPECT_EQ(error_of([&] { m->forward(in.x, in.t, in.context).square().mean().backward(); }), "");
  // Without the hook, a second backward through stale weights says what to do.
  auto hook = m->pre_forward.at("lora");
  m->pre_forward.erase("lora");
  const std::string e = error_of([&] { m->forward(in.x, in.t, in.context).square().mean().backward(); });
  EXPECT_NE(e.find("refresh_lora"), std::string::npos) << e;
  m->pre_forward["lora"] = hook;
  m->forward(in.x, in.t, in.context).square().mean().backward();  // fine again
}

TEST(Adapter, SaveLoadRoundTripIsExact) {
  TempDir dir;
  torch::manual_seed(13);
  const WanConfig c = WanConfig::preset("tiny");
  WanModel a(c, small_options().plan());
  SaladConvertOptions o = small_options();
  o.attn.feature = FeatureMap::Elu1;
  o.attn.linear_rope = false;
  o.attn.keep = 0.3;
  o.skip_linear = {1};
  o.lora.targets = {"q", "v", "ffn.0"};
  convert_to_salad(a, o);
  randomize(a);  // a trained adapter (and base)
  refresh_lora(a);
  const fs::path f = dir.path / "adapter.safetensors";
  save_adapter(a, f);

  const auto tensors = read_tensor_file(f);
  EXPECT_EQ(tensors.size(), adapter_state(a).size());
  EXPECT_EQ(tensors.count("blocks.0.self_attn.q.lora_A.weight"), 1u);
  EXPECT_EQ(tensors.count("blocks.0.self_attn.q.weight"), 0u);  // no base weights
  const SaladConvertOptions r = read_adapter_options(f);
  EXPECT_EQ(r.lora.rank, 4);
  EXPECT_EQ(r.lora.alpha, 8.0);
  EXPECT_EQ(r.lora.targets, (std::vector<std::string>{"self_attn.q", "self_attn.v", "ffn.0"}));
  EXPECT_EQ(r.attn.feature, FeatureMap::Elu1);
  EXPECT_FALSE(r.attn.linear_rope);
  EXPECT_EQ(r.attn.keep, 0.3);
  EXPECT_EQ(r.attn.block_q, 4);
  EXPECT_EQ(r.attn.block_k, 4);
  EXPECT_EQ(r.gate, Gate::StaticDynamic);
  EXPECT_EQ(r.skip_linear, (std::set<int64_t>{1}));

  // Same base, fresh model: load converts it with the file's options.
  WanModel b(c, small_options().plan());
  {
    torch::NoGradGuard ng;
    auto src = a->named_parameters(true);
    for (auto& p : b->named_parameters(true)) p.value().copy_(src[p.key()]);
  }
  const AdapterLoadReport rep = load_adapter(b, f);
  EXPECT_TRUE(rep.kept_default.empty());
  EXPECT_EQ(rep.loaded.size(), tensors.size());
  EXPECT_TRUE(b->block(1)->self_attn->config().skip_linear);
  EXPECT_EQ(b->block(0)->self_attn->config().attn.feature, FeatureMap::Elu1);
  const auto pa = a->named_parameters(true), pb = b->named_parameters(true);
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& kv : pa) EXPECT_TRUE(torch::equal(kv.value(), pb[kv.key()])) << kv.key();
  const Inputs in = make_inputs(c);
  EXPECT_TRUE(torch::equal(run(a, in), run(b, in)));

  // PEFT names are accepted on load (convert=false: the model already has the adapters).
  std::map<std::string, at::Tensor> peft;
  for (const auto& [k, v] : tensors) peft["base_model.model." + k] = v * 2;
  write_tensor_file(dir.path / "peft.safetensors", peft);
  load_adapter(b, dir.path / "peft.safetensors", false);
  EXPECT_TRUE(torch::equal(b->named_parameters(true)["blocks.1.ffn.0.lora_B.weight"],
                           tensors.at("blocks.1.ffn.0.lora_B.weight") * 2));
}

TEST(Adapter, OtherModelSizeNamesTensorAndShapes) {
  TempDir dir;
  WanConfig big = WanConfig::preset("tiny");
  big.dim = 96, big.num_heads = 3;
  WanModel a(big, small_options().plan());
  convert_to_salad(a, small_options());
  save_adapter(a, dir.path / "big.safetensors");
  WanModel b(WanConfig::preset("tiny"), small_options().plan());
  const std::string e = error_of([&] { load_adapter(b, dir.path / "big.safetensors"); });
  EXPECT_NE(e.find("tensor 'blocks.0.self_attn.q.lora_A.weight'"), std::string::npos) << e;
  EXPECT_NE(e.find("expected shape [4, 64]"), std::string::npos) << e;
  EXPECT_NE(e.find("got [4, 96]"), std::string::npos) << e;

  // More layers in the file than in the model: the extra tensor is named.
  WanConfig deep = WanConfig::preset("tiny");
  deep.num_layers = 3;
  WanModel d(deep, small_options().plan());
  convert_to_salad(d, small_options());
  save_adapter(d, dir.path / "deep.safetensors");
  WanModel b2(WanConfig::preset("tiny"), small_options().plan());
  const std::string e2 = error_of([&] { load_adapter(b2, dir.path / "deep.safetensors"); });
  EXPECT_NE(e2.find("unexpected tensor 'blocks.2."), std::string::npos) << e2;
}

TEST(Adapter, CreateWithoutTheModelMatchesConversion) {
  TempDir dir;
  WanConfig c = WanConfig::preset("tiny");
  c.num_layers = 3;
  SaladConvertOptions o = small_options();
  o.lora.targets = {"q", "k", "v", "o", "blocks.2.ffn.0"};
  create_adapter(c, o, dir.path / "fresh.safetensors", 7);
  const auto t = read_tensor_file(dir.path / "fresh.safetensors");
  EXPECT_EQ(t.count("blocks.2.ffn.0.lora_A.weight"), 1u);
  EXPECT_EQ(t.count("blocks.1.ffn.0.lora_A.weight"), 0u);
  EXPECT_FALSE(torch::equal(t.at("blocks.0.self_attn.q.lora_A.weight"), t.at("blocks.1.self_attn.q.lora_A.weight")));
  EXPECT_TRUE(torch::equal(t.at("blocks.1.self_attn.q.lora_B.weight"), torch::zeros({64, 4})));
  EXPECT_TRUE(torch::equal(t.at("blocks.2.self_attn.linear_o.weight"), torch::zeros({64, 64})));
  EXPECT_TRUE(torch::equal(t.at("blocks.2.self_attn.static_scale"), torch::ones({1})));
  WanModel m(c, o.plan());
  load_adapter(m, dir.path / "fresh.safetensors");  // the recorded targets reproduce the tensor set
  EXPECT_EQ(find_lora(m).size(), 13u);
}

// `salad convert` + `salad merge` on a tiny checkpoint (needs SALAD_CLI, set by ctest's python test env or by hand).
TEST(AdapterCli, ConvertThenMerge) {
  const char* cli = std::getenv("SALAD_CLI");
  if (!cli || !*cli) GTEST_SKIP() << "SALAD_CLI not set (path of the salad binary)";
  TempDir dir;
  torch::manual_seed(14);
  const WanConfig c = WanConfig::preset("tiny");
  WanModel base(c, sparse_plan());
  randomize(base);
  const fs::path base_f = dir.path / "base.safetensors", ad = dir.path / "ad.safetensors",
                 merged_f = dir.path / "merged.safetensors", log = dir.path / "log.txt";
  {
    std::map<std::string, at::Tensor> st;  // a plain (non-SALAD) base checkpoint
    for (const auto& p : base->named_parameters(true))
      if (parameter_group(p.key()).empty()) st[p.key()] = p.value().detach();
    write_tensor_file(base_f, st, {{"num_heads", "2"}});
  }
  auto sh = [&](const std::string& args) {
    return std::system((std::string(cli) + " " + args + " > " + log.string() + " 2>&1").c_str());
  };
  ASSERT_EQ(sh("convert --model " + base_f.string() + " --out " + ad.string() +
               " --keep 0.5 --block-q 4 --block-k 4 --lora-rank 4 --lora-alpha 8 --lora-targets q,k,v,o,ffn.2"),
            0);
  const SaladConvertOptions o = read_adapter_options(ad);
  EXPECT_EQ(o.lora.rank, 4);
  EXPECT_EQ(o.attn.block_q, 4);
  // A "trained" adapter: random B, then merge with the CLI and compare with the library.
  auto st = read_tensor_file(ad);
  for (auto& [k, v] : st)
    if (k.find("lora_B") != std::string::npos) v = torch::randn(v.sizes()) * 0.05;
  WanModel shape_of_ad(c, o.plan());
  convert_to_salad(shape_of_ad, o);
  write_tensor_file(ad, st, adapter_metadata(shape_of_ad));
  ASSERT_EQ(sh("merge --model " + base_f.string() + " --adapter " + ad.string() + " --out " + merged_f.string()), 0);
  WanModel adapted = load_wan_model(base_f, o.plan(), 0, 0);
  load_adapter(adapted, ad);
  WanModel merged = load_wan_model(merged_f, o.plan(), 0, 0);
  EXPECT_TRUE(find_lora(merged).empty());
  const Inputs in = make_inputs(c);
  EXPECT_TRUE(torch::allclose(run(merged, in), run(adapted, in), 1e-5, 1e-5));

  // Errors name the argument.
  EXPECT_NE(sh("convert --model " + (dir.path / "nope.safetensors").string() + " --out " + ad.string()), 0);
  auto log_text = [&] {
    std::string s;
    if (FILE* fp = std::fopen(log.c_str(), "r")) {
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, fp)) > 0) s.append(buf, n);
      std::fclose(fp);
    }
    return s;
  };
  EXPECT_NE(log_text().find("--model"), std::string::npos) << log_text();
  EXPECT_NE(sh("convert --model " + base_f.string() + " --out " + ad.string() + " --feature cubic"), 0);
  EXPECT_NE(log_text().find("--feature"), std::string::npos) << log_text();
  EXPECT_NE(sh("convert --model " + base_f.string() + " --out " + ad.string() + " --lora-targets q,zz"), 0);
  EXPECT_NE(log_text().find("--lora-targets"), std::string::npos) << log_text();
  WanConfig other = c;
  other.dim = 96, other.num_heads = 3;
  WanModel o96(other, sparse_plan());
  save_wan_weights(o96, dir.path / "other.safetensors");
  EXPECT_NE(sh("merge --model " + (dir.path / "other.safetensors").string() + " --adapter " + ad.string() + " --out " +
               merged_f.string()),
            0);
  EXPECT_NE(log_text().find("--adapter"), std::string::npos) << log_text();
  EXPECT_NE(log_text().find("lora_A.weight"), std::string::npos) << log_text();
}
