// Flow-matching training of a Wan DiT (SALAD fine-tuning and pretraining share
// this code path): dataset of per-sample safetensors files, AdamW, gradient
// clipping, atomic checkpoints, exact resume, JSONL metrics, a progress bar.
#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "salad/wan.h"

namespace salad {

// A directory of samples, one safetensors file each: 'latents' (C, F, H, W)
// float, 'context' (L_text, text_dim) float (the format `salad world` writes
// and Wan latents use). Every file is checked when the dataset opens: a bad
// file (truncated, wrong shapes, NaN/Inf) is an error naming it.
class FlowDataset {
 public:
  explicit FlowDataset(const std::filesystem::path& dir, int64_t expect_channels = -1, int64_t expect_text_dim = -1);
  int64_t size() const { return static_cast<int64_t>(files_.size()); }
  const std::filesystem::path& file(int64_t i) const { return files_.at(static_cast<size_t>(i)); }
  // (latents (B, C, F, H, W), context (B, L_text, text_dim)) for the given indices.
  std::pair<at::Tensor, at::Tensor> batch(const std::vector<int64_t>& indices) const;
  std::vector<int64_t> latent_shape() const { return latent_shape_; }

 private:
  std::vector<std::filesystem::path> files_;
  std::vector<int64_t> latent_shape_, context_shape_;
};

// Wan's timestep shift: sigma = shift * u / (1 + (shift - 1) * u).
double shift_sigma(double u, double shift);

struct TrainConfig {
  int64_t steps = 100;
  int64_t batch_size = 8;
  double lr = 1e-4;
  double weight_decay = 0.01;
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  double grad_clip = 1.0;        // max global L2 norm; <= 0 disables
  int64_t warmup_steps = 0;      // linear warm-up of the learning rate
  double shift = 5.0;            // Wan's timestep shift for the training sigmas
  uint64_t seed = 0;
  int64_t save_every = 100;      // checkpoint period in steps (and always at the end)
  int64_t log_every = 1;
  bool progress = true;          // progress bar on stderr
  bool resume = false;           // continue from out_dir/checkpoint.safetensors if present
  // bf16 autocast of the forward on the model's device (CUDA; on the CPU it
  // reproduces the GPU recipe's numerics), float32 master weights and optimizer.
  bool bf16_autocast = false;
  // Parameter groups to train: "all", or any of "lora", "linear_o", "gate", "static_scale".
  std::vector<std::string> trainable = {"lora", "linear_o", "gate", "static_scale"};
  std::filesystem::path out_dir = "salad-run";
};

struct TrainStepInfo {
  int64_t step;  // 1-based, after the update
  double loss, grad_norm, lr, it_per_s;
};

struct TrainResult {
  int64_t start_step = 0, final_step = 0;
  double last_loss = 0;
  std::vector<std::string> trained;  // parameter names that were trained
};

// Names of the parameters that `groups` selects (see TrainConfig::trainable).
std::vector<std::string> select_trainable(WanModel& model, const std::vector<std::string>& groups);

// Trains `model` in place. Files in cfg.out_dir: checkpoint.safetensors (trainable
// parameters, AdamW moments, step; written atomically every save_every steps),
// metrics.jsonl (one line per logged step). The batch indices and the noise of
// step s depend only on (seed, s), so a resumed run ends with the same weights
// as an uninterrupted one. `on_step` runs after every update (tests stop runs there).
TrainResult train_flow_matching(WanModel& model, const FlowDataset& data, const TrainConfig& cfg,
                                const std::function<void(const TrainStepInfo&)>& on_step = nullptr);

// The loss the forward of training step `step` (0-based: the batch, sigmas and
// noise that step draws from cfg.seed; cfg.batch_size, cfg.shift and
// cfg.bf16_autocast apply) computes for `model` as it is, without gradient. After
// train_flow_matching ran k steps, training_loss(model, data, cfg, k) is what its
// next step would see: a model loaded from the saved files must give the same
// value with bf16_autocast off, up to bf16 rounding.
double training_loss(WanModel& model, const FlowDataset& data, const TrainConfig& cfg, int64_t step);

// Mean flow-matching loss over `samples` dataset items at `n_sigmas` fixed,
// evenly spaced sigmas (no randomness but the seeded noise): the held-out loss.
double flow_matching_loss(WanModel& model, const FlowDataset& data, int64_t samples, int64_t n_sigmas = 8,
                          uint64_t seed = 1234, int64_t batch_size = 4);

}  // namespace salad
