// Flow-matching training loop (see include/salad/train.h).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include "salad/lora.h"
#include "salad/train.h"
#include "model/text.h"

namespace salad {
namespace {

// The random stream of step `step` (batch choice and noise): a function of (seed, step) only.
uint64_t step_seed(uint64_t seed, int64_t step) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull + 1;
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 29);
}

struct Sample {
  at::Tensor latents, context;
};

Sample read_sample(const std::filesystem::path& f) {
  std::map<std::string, at::Tensor> t;
  try {
    t = read_tensor_file(f);
  } catch (const std::exception& e) {
    fail("sample ", f.string(), ": cannot be read (", e.what(), ")");
  }
  for (const char* name : {"latents", "context"})
    if (!t.count(name)) fail("sample ", f.string(), ": expected a tensor '", name, "', found none");
  Sample s{t["latents"].to(at::kFloat), t["context"].to(at::kFloat)};
  if (s.latents.dim() != 4) fail("sample ", f.string(), ": expected 'latents' (C, F, H, W), got shape ", shape_str(s.latents.sizes()));
  if (s.context.dim() != 2) fail("sample ", f.string(), ": expected 'context' (L_text, text_dim), got shape ", shape_str(s.context.sizes()));
  if (!at::isfinite(s.latents).all().item<bool>()) fail("sample ", f.string(), ": 'latents' holds NaN or Inf");
  if (!at::isfinite(s.context).all().item<bool>()) fail("sample ", f.string(), ": 'context' holds NaN or Inf");
  return s;
}

struct Adam {
  std::vector<at::Tensor> m, v;
};

// bf16 autocast on one device type for the extent of a forward, as torch.autocast
// does it. Above all, leaving the outermost scope clears autocast's cast cache:
// it keeps the bf16 copy of every float32 leaf that requires grad (the trained
// parameters an op takes as is: LoRA factors, conv weights, the biases of
// 2-D Linear inputs) until at::autocast::clear_cache(), so without the clear
// every later step would compute with step 1's values of those parameters
// while the optimizer moves the float32 masters the saved files hold.
class AutocastScope {
 public:
  AutocastScope(at::DeviceType type, bool on) : type_(type), on_(on) {
    if (!on_) return;
    was_enabled_ = at::autocast::is_autocast_enabled(type_);
    was_dtype_ = at::autocast::get_autocast_dtype(type_);
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!on_) return;
    at::autocast::set_autocast_enabled(type_, was_enabled_);
    at::autocast::set_autocast_dtype(type_, was_dtype_);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  at::DeviceType type_;
  bool on_, was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

// What training step `step` (0-based) draws: batch, sigmas, noise; a function of (seed, step) only.
struct StepBatch {
  at::Tensor xt, t, ctx, target;
};

StepBatch step_batch(const FlowDataset& data, const TrainConfig& cfg, int64_t step, const at::Device& dev) {
  std::mt19937_64 rng(step_seed(cfg.seed, step));
  std::vector<int64_t> idx(cfg.batch_size);
  for (auto& i : idx) i = static_cast<int64_t>(rng() % static_cast<uint64_t>(data.size()));
  auto [x0, ctx] = data.batch(idx);
  at::Generator gen = at::detail::createCPUGenerator(step_seed(cfg.seed, step) ^ 0x5A5A5A5Aull);
  const at::Tensor noise = at::randn(x0.sizes(), gen, at::kFloat);
  std::vector<double> sig(cfg.batch_size);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  for (auto& s : sig) s = shift_sigma(uni(rng), cfg.shift);
  const at::Tensor sigma = at::tensor(sig, at::kDouble).to(at::kFloat);
  const at::Tensor sb = sigma.view({-1, 1, 1, 1, 1});
  return {((1 - sb) * x0 + sb * noise).to(dev), (sigma * 1000).to(dev), ctx.to(dev), (noise - x0).to(dev)};
}

// The training forward and its loss (bf16 autocast on the model's device when asked).
at::Tensor step_loss(WanModel& model, const StepBatch& b, bool bf16_autocast, const at::Device& dev) {
  at::Tensor pred;
  {
    AutocastScope autocast(dev.type(), bf16_autocast);
    pred = model->forward(b.xt, b.t, b.ctx);
  }
  return at::mse_loss(pred.to(at::kFloat), b.target);
}

}  // namespace

double shift_sigma(double u, double shift) { return shift * u / (1.0 + (shift - 1.0) * u); }

FlowDataset::FlowDataset(const std::filesystem::path& dir, int64_t expect_channels, int64_t expect_text_dim) {
  if (!std::filesystem::is_directory(dir)) fail("data: expected a directory of .safetensors samples, got '", dir.string(), "'");
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") files_.push_back(e.path());
  std::sort(files_.begin(), files_.end());
  if (files_.empty()) fail("data: expected .safetensors samples in '", dir.string(), "', found none");
  for (const auto& f : files_) {
    const Sample s = read_sample(f);
    if (latent_shape_.empty()) latent_shape_ = s.latents.sizes().vec(), context_shape_ = s.context.sizes().vec();
    if (s.latents.sizes().vec() != latent_shape_)
      fail("sample ", f.string(), ": expected 'latents' of shape ", shape_str(latent_shape_), " like ",
           files_[0].string(), ", got ", shape_str(s.latents.sizes()));
    if (s.context.sizes().vec() != context_shape_)
      fail("sample ", f.string(), ": expected 'context' of shape ", shape_str(context_shape_), ", got ",
           shape_str(s.context.sizes()));
  }
  if (expect_channels > 0 && latent_shape_[0] != expect_channels)
    fail("data: expected latents with ", expect_channels, " channels (the model's in_dim), got ", latent_shape_[0]);
  if (expect_text_dim > 0 && context_shape_[1] != expect_text_dim)
    fail("data: expected context of width ", expect_text_dim, " (the model's text_dim), got ", context_shape_[1]);
}

std::pair<at::Tensor, at::Tensor> FlowDataset::batch(const std::vector<int64_t>& indices) const {
  std::vector<at::Tensor> x, c;
  for (int64_t i : indices) {
    Sample s = read_sample(file(i));
    x.push_back(s.latents), c.push_back(s.context);
  }
  return {at::stack(x), at::stack(c)};
}

std::vector<std::string> select_trainable(WanModel& model, const std::vector<std::string>& groups) {
  std::vector<std::string> names;
  for (const auto& kv : trainable_parameters(model, groups)) names.push_back(kv.key());  // src/model/lora.cpp
  if (names.empty()) fail("trainable: the groups selected no parameter of this model");
  return names;
}

TrainResult train_flow_matching(WanModel& model, const FlowDataset& data, const TrainConfig& cfg,
                                const std::function<void(const TrainStepInfo&)>& on_step) {
  if (cfg.steps <= 0) fail("steps: expected a positive count, got ", cfg.steps);
  if (cfg.batch_size <= 0) fail("batch: expected a positive size, got ", cfg.batch_size);
  if (!(cfg.lr > 0)) fail("lr: expected a positive learning rate, got ", cfg.lr);
  if (cfg.save_every <= 0) fail("save-every: expected a positive step count, got ", cfg.save_every);
  std::filesystem::create_directories(cfg.out_dir);
  const std::filesystem::path ckpt = cfg.out_dir / "checkpoint.safetensors", log = cfg.out_dir / "metrics.jsonl";

  TrainResult res;
  res.trained = select_trainable(model, cfg.trainable);
  auto named = model->named_parameters();
  std::vector<at::Tensor> params;
  for (const auto& n : res.trained) params.push_back(named[n]);
  const at::Device dev = params[0].device();
  Adam adam;
  for (const auto& p : params) adam.m.push_back(at::zeros_like(p, at::kFloat)), adam.v.push_back(at::zeros_like(p, at::kFloat));

  int64_t step = 0;
  if (cfg.resume && std::filesystem::exists(ckpt)) {
    std::map<std::string, at::Tensor> t = read_tensor_file(ckpt);
    if (!t.count("step")) fail("resume: ", ckpt.string(), " has no 'step' tensor");
    step = t["step"].item<int64_t>();
    torch::NoGradGuard ng;
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string& n = res.trained[i];
      for (const char* kind : {"param/", "adam_m/", "adam_v/"})
        if (!t.count(kind + n)) fail("resume: ", ckpt.string(), " lacks '", kind, n, "' (trained with other groups?)");
      params[i].copy_(t["param/" + n]);
      adam.m[i].copy_(t["adam_m/" + n]);
      adam.v[i].copy_(t["adam_v/" + n]);
    }
    // Keep the metrics of the steps the checkpoint covers, drop the rest.
    std::ifstream in(log);
    std::vector<std::string> keep;
    for (std::string line; std::getline(in, line);) {
      const auto pos = line.find("\"step\":");
      if (pos != std::string::npos && std::stoll(line.substr(pos + 7)) <= step) keep.push_back(line);
    }
    in.close();
    std::ofstream out(log, std::ios::trunc);
    for (const auto& l : keep) out << l << "\n";
  } else if (!cfg.resume) {
    std::ofstream(log, std::ios::trunc);
  }
  res.start_step = step;

  auto save = [&](int64_t s) {
    std::map<std::string, at::Tensor> t;
    for (size_t i = 0; i < params.size(); ++i) {
      t["param/" + res.trained[i]] = params[i].detach().cpu();
      t["adam_m/" + res.trained[i]] = adam.m[i].cpu();
      t["adam_v/" + res.trained[i]] = adam.v[i].cpu();
    }
    t["step"] = at::tensor({s}, at::kLong);
    write_tensor_file(ckpt, t, {{"format", "salad.train.checkpoint"}, {"step", std::to_string(s)}});
  };

  std::ofstream metrics(log, std::ios::app);
  const auto t0 = std::chrono::steady_clock::now();
  while (step < cfg.steps) {
    const auto ts = std::chrono::steady_clock::now();
    const at::Tensor loss = step_loss(model, step_batch(data, cfg, step, dev), cfg.bf16_autocast, dev);
    for (auto& p : params) p.mutable_grad().reset();
    loss.backward();
    double gn2 = 0;
    for (auto& p : params)
      if (p.grad().defined()) gn2 += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    const double grad_norm = std::sqrt(gn2);
    const double clip = cfg.grad_clip > 0 && grad_norm > cfg.grad_clip ? cfg.grad_clip / (grad_norm + 1e-12) : 1.0;
    const double lr = cfg.warmup_steps > 0 ? cfg.lr * std::min(1.0, static_cast<double>(step + 1) / cfg.warmup_steps) : cfg.lr;
    ++step;
    {
      // AdamW with decoupled weight decay; moments in float32.
      torch::NoGradGuard ng;
      const double bc1 = 1 - std::pow(cfg.beta1, static_cast<double>(step)), bc2 = 1 - std::pow(cfg.beta2, static_cast<double>(step));
      for (size_t i = 0; i < params.size(); ++i) {
        if (!params[i].grad().defined()) continue;
        const at::Tensor g = params[i].grad().to(at::kFloat) * clip;
        adam.m[i].mul_(cfg.beta1).add_(g, 1 - cfg.beta1);
        adam.v[i].mul_(cfg.beta2).addcmul_(g, g, 1 - cfg.beta2);
        const at::Tensor upd = (adam.m[i] / bc1) / ((adam.v[i] / bc2).sqrt() + cfg.adam_eps);
        at::Tensor pf = params[i].to(at::kFloat) * (1 - lr * cfg.weight_decay) - lr * upd;
        params[i].copy_(pf);
      }
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double ips = static_cast<double>(step - res.start_step) / std::max(elapsed, 1e-9);
    res.last_loss = loss.item<double>();
    if (step % cfg.log_every == 0 || step == cfg.steps) {
      metrics << "{\"step\": " << step << ", \"loss\": " << res.last_loss << ", \"grad_norm\": " << grad_norm
              << ", \"lr\": " << lr << ", \"step_s\": " << secs << ", \"elapsed_s\": " << elapsed << "}\n";
      metrics.flush();
    }
    if (cfg.progress) {
      const double eta = static_cast<double>(cfg.steps - step) / std::max(ips, 1e-9);
      std::fprintf(stderr, "\rstep %lld/%lld  loss %.5f  %.2f it/s  ETA %02d:%02d:%02d   ", (long long)step,
                   (long long)cfg.steps, res.last_loss, ips, int(eta / 3600), int(eta / 60) % 60, int(eta) % 60);
      if (step == cfg.steps) std::fprintf(stderr, "\n");
    }
    if (step % cfg.save_every == 0 || step == cfg.steps) save(step);
    if (on_step) on_step({step, res.last_loss, grad_norm, lr, ips});
  }
  res.final_step = step;
  return res;
}

double training_loss(WanModel& model, const FlowDataset& data, const TrainConfig& cfg, int64_t step) {
  if (step < 0) fail("step: expected a 0-based step index >= 0, got ", step);
  if (cfg.batch_size <= 0) fail("batch: expected a positive size, got ", cfg.batch_size);
  torch::NoGradGuard ng;
  const at::Device dev = model->parameters()[0].device();
  return step_loss(model, step_batch(data, cfg, step, dev), cfg.bf16_autocast, dev).item<double>();
}

double flow_matching_loss(WanModel& model, const FlowDataset& data, int64_t samples, int64_t n_sigmas, uint64_t seed,
                          int64_t batch_size) {
  torch::NoGradGuard ng;
  const at::Device dev = model->parameters()[0].device();
  const int64_t n = std::min(samples, data.size());
  double total = 0;
  int64_t count = 0;
  for (int64_t i0 = 0; i0 < n; i0 += batch_size) {
    std::vector<int64_t> idx;
    for (int64_t i = i0; i < std::min(n, i0 + batch_size); ++i) idx.push_back(i);
    auto [x0, ctx] = data.batch(idx);
    for (int64_t s = 0; s < n_sigmas; ++s) {
      const double sigma = (s + 0.5) / static_cast<double>(n_sigmas);
      at::Generator gen = at::detail::createCPUGenerator(step_seed(seed, i0 * n_sigmas + s));
      const at::Tensor noise = at::randn(x0.sizes(), gen, at::kFloat);
      const at::Tensor xt = ((1 - sigma) * x0 + sigma * noise).to(dev);
      const at::Tensor t = at::full({static_cast<int64_t>(idx.size())}, sigma * 1000, at::kFloat).to(dev);
      const at::Tensor pred = model->forward(xt, t, ctx.to(dev));
      total += at::mse_loss(pred.to(at::kFloat).cpu(), noise - x0).item<double>() * static_cast<double>(idx.size());
      count += static_cast<int64_t>(idx.size());
    }
  }
  return total / static_cast<double>(count);
}

}  // namespace salad
