// Flow-matching training: it learns, a killed run resumes to the same weights,
// only the chosen groups move, and bad samples stop it with a named error.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "salad/lora.h"
#include "salad/train.h"

using namespace salad;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("salad_train_" + name + "_" + std::to_string(std::random_device{}()));
  fs::create_directories(d);
  return d;
}

// Tiny samples: latents (4, 2, 8, 8) = a 2x4x4 token grid, context (3, 32).
fs::path make_data(const std::string& name, int n) {
  const fs::path d = fresh_dir(name);
  torch::manual_seed(42);
  for (int i = 0; i < n; ++i) {
    const at::Tensor base = torch::linspace(-1, 1, 8).view({1, 1, 1, 8}).expand({4, 2, 8, 8});
    write_tensor_file(d / ("s" + std::to_string(i) + ".safetensors"),
                      {{"latents", (base * (i % 3 - 1) + 0.1 * torch::randn({4, 2, 8, 8})).contiguous()},
                       {"context", torch::randn({3, 32})}});
  }
  return d;
}

WanModel tiny_model() {
  torch::manual_seed(7);
  WanAttentionPlan plan = WanAttentionPlan::uniform(Mode::Salad);
  plan.base.attn.block_q = 8, plan.base.attn.block_k = 4, plan.base.attn.keep = 0.5;
  WanModel m(WanConfig::preset("tiny"), plan);
  return m;
}

TrainConfig small_config(const fs::path& out) {
  TrainConfig c;
  c.steps = 6, c.batch_size = 2, c.lr = 1e-3, c.save_every = 2, c.progress = false, c.out_dir = out;
  return c;
}

std::map<std::string, at::Tensor> snapshot(WanModel& m) {
  std::map<std::string, at::Tensor> s;
  for (auto& kv : m->named_parameters()) s[kv.key()] = kv.value().detach().clone();
  return s;
}

}  // namespace

TEST(Train, KilledRunResumesToTheSameWeights) {
  const fs::path data_dir = make_data("resume", 5);
  const FlowDataset data(data_dir);
  WanModel a = tiny_model();
  TrainConfig ca = small_config(fresh_dir("a"));
  ca.trainable = {"all"};
  train_flow_matching(a, data, ca);

  WanModel b = tiny_model();
  TrainConfig cb = small_config(fresh_dir("b"));
  cb.trainable = {"all"};
  struct Killed {};
  EXPECT_THROW(train_flow_matching(b, data, cb, [](const TrainStepInfo& s) { if (s.step == 3) throw Killed{}; }), Killed);
  WanModel b2 = tiny_model();  // a fresh process: only the checkpoint (step 2) survives
  cb.resume = true;
  const TrainResult r = train_flow_matching(b2, data, cb);
  EXPECT_EQ(r.start_step, 2);
  EXPECT_EQ(r.final_step, 6);
  const auto sa = snapshot(a), sb = snapshot(b2);
  for (const auto& [name, t] : sa) EXPECT_TRUE(torch::equal(t, sb.at(name))) << name;
  std::ifstream log(cb.out_dir / "metrics.jsonl");
  int lines = 0;
  for (std::string l; std::getline(log, l);) ++lines;
  EXPECT_EQ(lines, 6) << "steps 1-2 kept from the first run, 3-6 from the resumed one";
}

TEST(Train, OnlyTheChosenGroupsMoveAndTheLossFalls) {
  const FlowDataset data(make_data("groups", 6));
  WanModel m = tiny_model();
  const auto before = snapshot(m);
  const double loss0 = flow_matching_loss(m, data, 6, 4);
  TrainConfig c = small_config(fresh_dir("groups_out"));
  c.steps = 40, c.lr = 3e-3, c.save_every = 40, c.trainable = {"linear_o", "gate", "static_scale"};
  const TrainResult r = train_flow_matching(m, data, c);
  const auto after = snapshot(m);
  int moved = 0;
  for (const auto& [name, t] : before) {
    const bool trained = std::find(r.trained.begin(), r.trained.end(), name) != r.trained.end();
    const bool same = torch::equal(t, after.at(name));
    if (!trained) EXPECT_TRUE(same) << name << " is frozen and must not change";
    if (trained && !same) ++moved;
    EXPECT_EQ(trained, name.find(".linear_o.") != std::string::npos || name.find(".gate.") != std::string::npos ||
                           name.find("static_scale") != std::string::npos)
        << name;
  }
  EXPECT_GT(moved, 0);
  EXPECT_LT(flow_matching_loss(m, data, 6, 4), loss0) << "W_l, gates and scales alone must lower the loss";
}

TEST(Train, BadSamplesStopWithTheirNameAndNothingSavedIsLost) {
  const fs::path d = make_data("bad", 3);
  const fs::path out = fresh_dir("bad_out");
  {
    WanModel m = tiny_model();
    TrainConfig c = small_config(out);
    c.steps = 2;
    train_flow_matching(m, FlowDataset(d), c);
  }
  std::ifstream before_f(out / "checkpoint.safetensors", std::ios::binary);
  const std::string before((std::istreambuf_iterator<char>(before_f)), {});
  auto expect_error = [&](const std::string& needle) {
    try {
      FlowDataset bad(d);
      ADD_FAILURE() << "no error, expected one containing '" << needle << "'";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  at::Tensor nan_lat = torch::zeros({4, 2, 8, 8});
  nan_lat[0][0][0][0] = NAN;
  write_tensor_file(d / "s1.safetensors", {{"latents", nan_lat}, {"context", torch::zeros({3, 32})}});
  expect_error("s1.safetensors: 'latents' holds NaN or Inf");
  write_tensor_file(d / "s1.safetensors", {{"latents", torch::zeros({4, 2, 8, 6})}, {"context", torch::zeros({3, 32})}});
  expect_error("s1.safetensors: expected 'latents' of shape [4, 2, 8, 8]");
  {
    std::ofstream trunc(d / "s1.safetensors", std::ios::binary | std::ios::trunc);
    trunc << "\x10\x00\x00";
  }
  expect_error("s1.safetensors: cannot be read");
  std::ifstream after_f(out / "checkpoint.safetensors", std::ios::binary);
  const std::string after((std::istreambuf_iterator<char>(after_f)), {});
  EXPECT_EQ(before, after);
  EXPECT_THROW(FlowDataset(d / "missing"), ArgumentError);
  EXPECT_NEAR(shift_sigma(0.5, 5.0), 2.5 / 3.0, 1e-12);
  EXPECT_DOUBLE_EQ(shift_sigma(1.0, 5.0), 1.0);
}

// bf16 autocast training (the GPU recipe, run on the CPU): what the trainer's
// forward computes must be what the saved files give a fresh model. Autocast
// caches bf16 copies of float32 leaves that require grad until the cache is
// cleared; the trainer never cleared it, so on the GPU every step reused step 1's
// LoRA factors (B = 0), patch embedding and 2-D-input biases: training losses
// looked normal, A never moved, B drifted blind, and the saved adapters were
// garbage in `salad eval` (held-out loss 1.33 vs 0.30 untuned).
TEST(Train, Bf16AutocastTrainsWhatIsSaved) {
  const FlowDataset data(make_data("autocast", 6));
  // (a) SALAD + LoRA fine-tuning: the reloaded adapter gives the loss the trainer sees.
  WanModel m = tiny_model();
  SaladConvertOptions conv;
  conv.attn = m->block(0)->self_attn->config().attn;
  conv.lora.rank = 4, conv.lora.alpha = 8;
  convert_to_salad(m, conv);
  const auto before = snapshot(m);
  TrainConfig c = small_config(fresh_dir("autocast_ft"));
  c.steps = 12, c.lr = 3e-3, c.save_every = 12, c.bf16_autocast = true;
  train_flow_matching(m, data, c);
  const auto after = snapshot(m);
  for (const auto& [name, t] : before)
    if (name.find(".lora_A.") != std::string::npos)
      EXPECT_GT((after.at(name) - t).abs().max().item<double>(), 1e-3) << name << " never trained (only weight decay)";
  const fs::path file = c.out_dir / "adapter.safetensors";
  save_adapter(m, file);
  WanModel fresh = tiny_model();
  load_adapter(fresh, file);
  TrainConfig fp32 = c;
  fp32.bf16_autocast = false;
  const double seen = training_loss(m, data, c, c.steps), reloaded = training_loss(fresh, data, fp32, c.steps);
  EXPECT_NEAR(seen, reloaded, 0.02 * reloaded) << "next training step's loss (bf16 autocast) vs the saved adapter (float32)";

  // (b) Every weight trained (pretrain): the patch embedding (a conv) and the biases of
  // the 2-D time-embedding inputs are cast from the leaves as they are.
  WanModel p = tiny_model();
  TrainConfig cp = small_config(fresh_dir("autocast_pt"));
  cp.steps = 12, cp.lr = 3e-3, cp.save_every = 12, cp.bf16_autocast = true, cp.trainable = {"all"};
  train_flow_matching(p, data, cp);
  TrainConfig cp32 = cp;
  cp32.bf16_autocast = false;
  const double seen_p = training_loss(p, data, cp, cp.steps), fp32_p = training_loss(p, data, cp32, cp.steps);
  EXPECT_NEAR(seen_p, fp32_p, 0.02 * fp32_p) << "bf16 autocast vs float32 forward of the trained weights";
}
