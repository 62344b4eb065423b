// `salad convert` (a fresh SALAD + LoRA adapter for a base checkpoint) and
// `salad merge` (base + adapter -> merged checkpoint, official layout).
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>

#include "commands.h"
#include "salad/lora.h"
#include "salad/wan.h"

using namespace salad;
namespace fs = std::filesystem;

namespace {

[[noreturn]] void arg_error(const std::string& arg, const std::string& msg) {
  throw ArgumentError(arg + ": " + msg);
}

// Runs f; an ArgumentError it throws is re-thrown prefixed with the argument's name.
// Throws `msg` prefixed with the argument; a leading "feature: " that repeats
// the argument's own name is dropped.
[[noreturn]] void rethrow_for(const std::string& arg, std::string msg) {
  std::string bare = arg.rfind("--", 0) == 0 ? arg.substr(2) : arg;
  for (char& ch : bare)
    if (ch == '-') ch = '_';
  if (msg.rfind(bare + ": ", 0) == 0) msg = msg.substr(bare.size() + 2);
  arg_error(arg, msg);
}

// Runs f; an exception it throws is re-thrown naming the argument.
template <class F>
auto for_arg(const std::string& arg, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {  // ArgumentError, io errors, c10::Error
    rethrow_for(arg, e.what());
  }
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) v.push_back(item);
  return v;
}

std::vector<int64_t> parse_int_list(const std::string& s, const std::string& arg, size_t want = 0) {
  std::vector<int64_t> v;
  for (const auto& item : split_list(s)) {
    try {
      size_t used = 0;
      v.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      arg_error(arg, "expected comma-separated integers, got '" + s + "'");
    }
  }
  if (want && v.size() != want)
    arg_error(arg, "expected " + std::to_string(want) + " comma-separated integers, got '" + s + "'");
  return v;
}

void need_input(const std::string& arg, const std::string& path) {
  if (path.empty()) arg_error(arg, "expected a path");
  if (!fs::exists(path)) arg_error(arg, "no such file or directory '" + path + "'");
}

void need_output(const std::string& arg, const std::string& path) {
  if (path.empty()) arg_error(arg, "expected a path");
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty() && !fs::is_directory(parent))
    arg_error(arg, "directory '" + parent.string() + "' does not exist");
  if (fs::is_directory(path)) arg_error(arg, "'" + path + "' is a directory; expected a .safetensors file path");
}

struct ConvertArgs {
  std::string model, out, feature = "relu", gate = "static_dynamic", pattern = "topk", targets = "q,k,v,o", skip_linear,
                          tile, window = "1,1,1";
  double keep = 0.10, alpha = 16.0;
  int64_t block_q = 128, block_k = 64, rank = 16, heads = 0;
  bool no_linear_rope = false, static_per_head = false;
  uint64_t seed = 0;

  SaladConvertOptions options() const {
    SaladConvertOptions o;
    o.attn.mode = Mode::Salad;
    o.attn.pattern = for_arg("--pattern", [&] { return parse_pattern(pattern); });
    o.attn.feature = for_arg("--feature", [&] { return parse_feature(feature); });
    o.gate = for_arg("--gate", [&] { return parse_gate(gate); });
    if (!(keep > 0.0 && keep <= 1.0)) arg_error("--keep", "expected a fraction in (0, 1], got " + std::to_string(keep));
    if (block_q <= 0) arg_error("--block-q", "expected a positive token count, got " + std::to_string(block_q));
    if (block_k <= 0) arg_error("--block-k", "expected a positive token count, got " + std::to_string(block_k));
    o.attn.keep = keep, o.attn.block_q = block_q, o.attn.block_k = block_k;
    if (!tile.empty()) {
      const auto t = parse_int_list(tile, "--tile", 3);
      o.attn.tile_order = true, o.attn.tile = {t[0], t[1], t[2]};
    }
    const auto w = parse_int_list(window, "--window", 3);
    o.attn.window = {w[0], w[1], w[2]};
    o.attn.linear_rope = !no_linear_rope;
    o.static_per_head = static_per_head;
    for (int64_t i : parse_int_list(skip_linear, "--skip-linear")) {
      if (i < 0) arg_error("--skip-linear", "expected non-negative layer indices, got " + std::to_string(i));
      o.skip_linear.insert(i);
    }
    if (rank < 0) arg_error("--lora-rank", "expected >= 0 (0: no LoRA), got " + std::to_string(rank));
    if (rank > 0 && !(alpha > 0)) arg_error("--lora-alpha", "expected a positive value, got " + std::to_string(alpha));
    o.lora.rank = rank, o.lora.alpha = alpha;
    o.lora.targets = split_list(targets);
    if (rank > 0 && o.lora.targets.empty()) arg_error("--lora-targets", "expected a comma list of patterns");
    for_arg("--tile/--window", [&] {
      o.validate();
      return 0;
    });
    return o;
  }
};

int run_convert(const ConvertArgs& a) {
  need_input("--model", a.model);
  need_output("--out", a.out);
  if (a.heads < 0) arg_error("--heads", "expected >= 0 (0: from the checkpoint), got " + std::to_string(a.heads));
  const SaladConvertOptions opt = a.options();
  const WanConfig cfg = for_arg("--model", [&] { return detect_wan_config(a.model, a.heads); });
  for (int64_t i : opt.skip_linear)
    if (i >= cfg.num_layers)
      arg_error("--skip-linear",
                "layer index " + std::to_string(i) + " outside [0, " + std::to_string(cfg.num_layers) + ")");
  try {
    create_adapter(cfg, opt, a.out, a.seed);
  } catch (const ArgumentError& e) {
    const std::string m = e.what();
    if (m.rfind("targets: ", 0) == 0) arg_error("--lora-targets", m.substr(9));
    if (m.rfind("rank: ", 0) == 0) arg_error("--lora-rank", m.substr(6));
    throw;
  }
  const SaladConvertOptions rec = read_adapter_options(a.out);
  std::string targets;
  for (const auto& t : rec.lora.targets) targets += (targets.empty() ? "" : ",") + t;
  std::printf(
      "adapter %s: %lld layers, dim %lld, heads %lld; mode salad, keep %.3f, blocks %lld/%lld, feature %s, "
      "gate %s; LoRA rank %lld alpha %g on %s\n",
      a.out.c_str(), (long long)cfg.num_layers, (long long)cfg.dim, (long long)cfg.num_heads, opt.attn.keep,
      (long long)opt.attn.block_q, (long long)opt.attn.block_k, to_string(opt.attn.feature), to_string(opt.gate),
      (long long)opt.lora.rank, opt.lora.alpha, targets.empty() ? "-" : targets.c_str());
  return 0;
}

struct MergeArgs {
  std::string model, adapter, out, dtype = "auto";
  int64_t heads = 0;
};

int run_merge(const MergeArgs& a) {
  need_input("--model", a.model);
  need_input("--adapter", a.adapter);
  need_output("--out", a.out);
  if (a.heads < 0) arg_error("--heads", "expected >= 0 (0: from the checkpoint), got " + std::to_string(a.heads));
  std::optional<at::ScalarType> dt;
  if (a.dtype == "float32")
    dt = at::kFloat;
  else if (a.dtype == "float64")
    dt = at::kDouble;
  else if (a.dtype == "bfloat16")
    dt = at::kBFloat16;
  else if (a.dtype == "float16")
    dt = at::kHalf;
  else if (a.dtype != "auto")
    arg_error("--dtype", "expected auto | float32 | float64 | bfloat16 | float16, got '" + a.dtype + "'");
  const SaladConvertOptions opt = for_arg("--adapter", [&] { return read_adapter_options(a.adapter); });
  for_arg("--model", [&] { return detect_wan_config(a.model, a.heads); });
  for_arg("--adapter (applied to --model)", [&] {
    merge_adapter_checkpoint(a.model, a.adapter, a.out, a.heads, dt);
    return 0;
  });
  std::printf("merged %s + %s (LoRA rank %lld) -> %s\n", a.model.c_str(), a.adapter.c_str(), (long long)opt.lora.rank,
              a.out.c_str());
  return 0;
}

// salad reset-params: copies named tensors of a freshly initialised model (the
// pretraining's torch seed) into a checkpoint. Repairs bases pretrained with
// the autocast cast-cache bug (fixed in finetune.cpp), whose forward used the
// initial values of a few tensors while the saved copies drifted.
struct ResetArgs {
  std::string model, out, config = "world", names;
  uint64_t seed = 0;
};

int run_reset(const ResetArgs& a) {
  WanAttentionPlan plan = WanAttentionPlan::uniform(Mode::Dense);
  plan.base.gate = Gate::None;  // as `salad pretrain` builds it
  WanModel m = load_wan_model(a.model, plan);
  torch::manual_seed(a.seed);
  WanModel fresh(WanConfig::preset(a.config), plan);
  auto dst = m->named_parameters(true), src = fresh->named_parameters(true);
  std::stringstream ss(a.names);
  int n = 0;
  torch::NoGradGuard ng;
  for (std::string name; std::getline(ss, name, ',');) {
    if (name.empty()) continue;
    const at::Tensor* d = dst.find(name);
    const at::Tensor* f = src.find(name);
    if (!d || !f) throw ArgumentError("--names: '" + name + "' is not a parameter of the model");
    if (d->sizes() != f->sizes())
      throw ArgumentError("--names: '" + name + "' has another shape in --config " + a.config);
    d->copy_(*f);
    ++n;
  }
  if (n == 0) throw ArgumentError("--names: expected a comma list of parameter names, got none");
  save_wan_weights(m, a.out);
  std::printf("reset %d tensors of %s to their seed-%llu initial values -> %s\n", n, a.model.c_str(),
              static_cast<unsigned long long>(a.seed), a.out.c_str());
  return 0;
}

}  // namespace

namespace salad::cli {
void add_model_commands(CLI::App& app, Commands& cmds) {
  static ConvertArgs conv;
  auto* c =
      app.add_subcommand("convert", "write a fresh (zero-initialised) SALAD + LoRA adapter for a base checkpoint");
  c->add_option("--model", conv.model, "base checkpoint: .safetensors, index or directory")->required();
  c->add_option("--out", conv.out, "adapter file to write (.safetensors)")->required();
  c->add_option("--keep", conv.keep, "fraction of key blocks kept (topk)")->capture_default_str();
  c->add_option("--block-q", conv.block_q, "query block size in tokens")->capture_default_str();
  c->add_option("--block-k", conv.block_k, "key block size in tokens")->capture_default_str();
  c->add_option("--pattern", conv.pattern, "topk | window")->capture_default_str();
  c->add_option("--tile", conv.tile, "token order of 3-D tiles ft,ht,wt (default: raster)");
  c->add_option("--window", conv.window, "window radius wf,wh,ww in tiles (pattern window)")->capture_default_str();
  c->add_option("--feature", conv.feature, "linear feature map: relu | elu1 | softmax")->capture_default_str();
  c->add_flag("--no-linear-rope", conv.no_linear_rope, "drop the RoPE in the linear branch");
  c->add_option("--gate", conv.gate, "none | static | dynamic | static_dynamic")->capture_default_str();
  c->add_flag("--static-per-head", conv.static_per_head, "one static scale per head instead of per layer");
  c->add_option("--skip-linear", conv.skip_linear, "comma list of layers without the linear branch");
  c->add_option("--lora-rank", conv.rank, "LoRA rank (0: no LoRA)")->capture_default_str();
  c->add_option("--lora-alpha", conv.alpha, "LoRA alpha (scale alpha / rank)")->capture_default_str();
  c->add_option("--lora-targets", conv.targets, "comma list of module patterns: q,k,v,o, cross_attn.*, ffn.0, ...")
      ->capture_default_str();
  c->add_option("--heads", conv.heads, "attention heads (0: metadata, config.json, or dim / 128)")
      ->capture_default_str();
  c->add_option("--seed", conv.seed, "seed of the LoRA A initialisation")->capture_default_str();
  cmds.push_back({c, [] { return run_convert(conv); }});

  static MergeArgs mer;
  auto* m = app.add_subcommand("merge", "fold an adapter into its base checkpoint (official layout)");
  m->add_option("--model", mer.model, "base checkpoint: .safetensors, index or directory")->required();
  m->add_option("--adapter", mer.adapter, "adapter file (salad convert / training)")->required();
  m->add_option("--out", mer.out, "merged checkpoint to write (.safetensors)")->required();
  m->add_option("--heads", mer.heads, "attention heads (0: metadata, config.json, or dim / 128)")
      ->capture_default_str();
  m->add_option("--dtype", mer.dtype, "auto (the base's) | float32 | float64 | bfloat16 | float16")
      ->capture_default_str();
  cmds.push_back({m, [] { return run_merge(mer); }});

  static ResetArgs rs;
  auto* r = app.add_subcommand("reset-params", "copy named tensors of a fresh seeded model into a checkpoint");
  r->add_option("--model", rs.model, "checkpoint to repair")->required();
  r->add_option("--out", rs.out, "checkpoint to write (.safetensors, atomic)")->required();
  r->add_option("--names", rs.names, "comma list of parameter names")->required();
  r->add_option("--config", rs.config, "preset the checkpoint was pretrained from")->capture_default_str();
  r->add_option("--seed", rs.seed, "the pretraining's --seed")->capture_default_str();
  cmds.push_back({r, [] { return run_reset(rs); }});
}
}  // namespace salad::cli
