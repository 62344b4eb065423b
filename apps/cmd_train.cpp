// `salad finetune` and `salad pretrain`: one flow-matching code path.
#include <torch/torch.h>

#include <cstdio>
#include <sstream>

#include "commands.h"
#include "salad/lora.h"
#include "salad/train.h"
#include "salad/wan.h"

namespace salad::cli {
namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

struct TrainArgs {
  std::string data, out = "salad-run", device = "cpu", trainable;
  int64_t steps = 100, batch = 8, save_every = 100, warmup = 0;
  double lr = 1e-4, weight_decay = 0.01, clip = 1.0, shift = 5.0;
  uint64_t seed = 0;
  bool resume = false, bf16 = false, quiet = false, no_linear_rope = false;
  // attention
  std::string mode, feature = "relu", gate = "static_dynamic", lora_targets = "q,k,v,o", adapter;
  double keep = 0.10, lora_alpha = 16;
  int64_t block_q = 128, block_k = 64, lora_rank = 0;

  void add(CLI::App* app, const std::string& default_mode, const std::string& default_trainable) {
    mode = default_mode, trainable = default_trainable;
    app->add_option("--data", data, "directory of .safetensors samples (latents + context)")->required();
    app->add_option("--out", out, "run directory: checkpoint.safetensors, metrics.jsonl, the result")->capture_default_str();
    app->add_option("--steps", steps, "optimizer steps")->capture_default_str();
    app->add_option("--batch", batch, "batch size")->capture_default_str();
    app->add_option("--lr", lr, "AdamW learning rate")->capture_default_str();
    app->add_option("--weight-decay", weight_decay, "AdamW decoupled weight decay")->capture_default_str();
    app->add_option("--clip", clip, "gradient clipping: max global L2 norm (0: off)")->capture_default_str();
    app->add_option("--warmup", warmup, "linear learning-rate warm-up steps")->capture_default_str();
    app->add_option("--shift", shift, "Wan's timestep shift for the training sigmas")->capture_default_str();
    app->add_option("--seed", seed, "seed of batches and noise")->capture_default_str();
    app->add_option("--save-every", save_every, "checkpoint period in steps")->capture_default_str();
    app->add_flag("--resume", resume, "continue from <out>/checkpoint.safetensors");
    app->add_option("--device", device, "cpu | cuda")->capture_default_str();
    app->add_flag("--bf16", bf16, "bf16 autocast, float32 master weights (CUDA; on the CPU: the GPU numerics)");
    app->add_flag("--quiet", quiet, "no progress bar");
    app->add_option("--trainable", trainable, "groups: all | lora,linear_o,gate,static_scale")->capture_default_str();
    app->add_option("--mode", mode, "attention while training: dense | sparse | salad")->capture_default_str();
    app->add_option("--keep", keep, "Top-K keep fraction")->capture_default_str();
    app->add_option("--block-q", block_q, "query block size")->capture_default_str();
    app->add_option("--block-k", block_k, "key block size")->capture_default_str();
    app->add_option("--feature", feature, "linear feature map: relu | elu1 | softmax")->capture_default_str();
    app->add_option("--gate", gate, "none | static | dynamic | static_dynamic")->capture_default_str();
    app->add_flag("--no-linear-rope", no_linear_rope, "drop the RoPE in the linear branch");
  }
  void add_lora(CLI::App* app) {
    app->add_option("--lora-rank", lora_rank, "LoRA rank on the targets (0: none)")->capture_default_str();
    app->add_option("--lora-alpha", lora_alpha, "LoRA alpha (scale alpha/rank)")->capture_default_str();
    app->add_option("--lora-targets", lora_targets, "LoRA target modules")->capture_default_str();
    app->add_option("--adapter", adapter, "start from this adapter file instead of a fresh conversion");
  }
  SaladConvertOptions convert_options() const {
    SaladConvertOptions c;
    c.attn.keep = keep, c.attn.block_q = block_q, c.attn.block_k = block_k, c.attn.feature = parse_feature(feature);
    c.attn.linear_rope = !no_linear_rope;
    c.gate = parse_gate(gate);
    c.lora.rank = lora_rank, c.lora.alpha = lora_alpha, c.lora.targets = split(lora_targets);
    return c;
  }

  WanAttentionPlan plan() const {
    WanAttentionPlan p = WanAttentionPlan::uniform(parse_mode(mode));
    p.base.attn.keep = keep, p.base.attn.block_q = block_q, p.base.attn.block_k = block_k;
    p.base.attn.feature = parse_feature(feature);
    p.base.attn.linear_rope = !no_linear_rope;
    p.base.gate = parse_gate(gate);
    return p;
  }
  TrainConfig config() const {
    TrainConfig c;
    c.steps = steps, c.batch_size = batch, c.lr = lr, c.weight_decay = weight_decay, c.grad_clip = clip;
    c.warmup_steps = warmup, c.shift = shift, c.seed = seed, c.save_every = save_every, c.resume = resume;
    c.bf16_autocast = bf16, c.progress = !quiet, c.trainable = split(trainable), c.out_dir = out;
    return c;
  }
  at::Device dev() const {
    if (device != "cpu" && device != "cuda") throw ArgumentError("--device: expected cpu | cuda, got '" + device + "'");
    if (device == "cuda" && !torch::cuda::is_available()) throw ArgumentError("--device: cuda requested but no CUDA device is visible");
    return device == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  }
};

int run_training(WanModel& model, const TrainArgs& a, bool full_model) {
  model->to(a.dev());
  const FlowDataset data(a.data, model->config().in_dim, model->config().text_dim);
  std::fprintf(stderr, "data: %lld samples in %s\n", (long long)data.size(), a.data.c_str());
  const TrainResult r = train_flow_matching(model, data, a.config());
  const std::filesystem::path out = std::filesystem::path(a.out) / (full_model ? "model.safetensors" : "adapter.safetensors");
  if (full_model) {
    save_wan_weights(model, out);
  } else {
    save_adapter(model, out);
  }
  std::printf("trained %zu tensors for steps %lld..%lld, last loss %.6f\nwrote %s\n", r.trained.size(),
              (long long)r.start_step, (long long)r.final_step, r.last_loss, out.string().c_str());
  return 0;
}

}  // namespace

void add_train_commands(CLI::App& app, Commands& cmds) {
  static TrainArgs ft;
  static std::string ft_model;
  static int64_t ft_heads = 0;
  auto* f = app.add_subcommand("finetune", "SALAD fine-tuning: frozen base, train W_l, gates, scales (and LoRA)");
  ft.add(f, "salad", "lora,linear_o,gate,static_scale");
  ft.add_lora(f);
  f->add_option("--model", ft_model, "base checkpoint (file, index or directory)")->required();
  f->add_option("--heads", ft_heads, "attention heads (default: from the checkpoint)");
  cmds.push_back({f, [] {
                    const SaladConvertOptions conv = ft.convert_options();
                    WanModel m = load_wan_model(ft_model, conv.plan(), ft_heads);
                    if (!ft.adapter.empty())
                      load_adapter(m, ft.adapter);
                    else
                      convert_to_salad(m, conv);
                    // --mode sparse: the "sparse + LoRA" baseline (no linear branch).
                    const Mode mode = parse_mode(ft.mode);
                    for (int64_t i = 0; i < m->config().num_layers; ++i) m->block(i)->self_attn->config().attn.mode = mode;
                    return run_training(m, ft, false);
                  }});

  static TrainArgs pt;
  static std::string pt_config = "world";
  auto* p = app.add_subcommand("pretrain", "train every weight of a fresh model (the recipe of the shipped base)");
  pt.add(p, "dense", "all");
  pt.gate = "none";  // a base carries no gates: any SALAD gate variant can be fine-tuned from it
  p->add_option("--config", pt_config, "model preset: world | tiny | wan2.1-1.3b | wan2.1-14b")->capture_default_str();
  cmds.push_back({p, [] {
                    torch::manual_seed(pt.seed);
                    WanModel m(WanConfig::preset(pt_config), pt.plan());
                    return run_training(m, pt, true);
                  }});
}

}  // namespace salad::cli
