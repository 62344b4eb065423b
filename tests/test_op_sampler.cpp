// Flow-matching sampling: Wan's shifted sigma schedule, Euler and UniPC on
// problems with closed-form solutions (a single data point: straight paths;
// Gaussian data: curved paths), a golden run of Wan's own
// FlowUniPCMultistepScheduler, CFG, seeds, the per-step attention schedule on a
// tiny WanModel, and smoke runs of `salad generate` / `salad bench-dit`
// (SALAD_CLI = the binary; skipped when unset).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <fstream>
#include <sstream>
#include <string>

#include "io/safetensors.h"
#include "temp_dir.h"
#include "salad/lora.h"
#include "salad/sampler.h"

using namespace salad;
namespace fs = std::filesystem;
namespace {

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Data = one point x0: the exact velocity is (x - x0) / sigma and every path is straight.
VelocityFn point_model(const at::Tensor& x0) {
  return [x0](const at::Tensor& x, const at::Tensor& t) { return (x - x0) / (t[0].item<double>() / 1000.0); };
}

// Data ~ N(mu, c^2) per element: the probability-flow ODE moves x along
// x(s) = (1 - s) mu + sd(s) z with sd(s) = sqrt((1 - s)^2 c^2 + s^2), z fixed.
struct Gaussian {
  double mu = 0.5, c = 0.3;
  double sd(double s) const { return std::sqrt((1 - s) * (1 - s) * c * c + s * s); }
  VelocityFn model() const {
    return [*this](const at::Tensor& x, const at::Tensor& t) {
      const double s = t[0].item<double>() / 1000.0;
      const at::Tensor z = (x - (1 - s) * mu) / sd(s);
      return -mu + z * ((s - (1 - s) * c * c) / sd(s));
    };
  }
  // The ODE's endpoint at s = 0 for a start x at s0.
  at::Tensor exact(const at::Tensor& x, double s0) const { return mu + c * (x - (1 - s0) * mu) / sd(s0); }
};

SamplerConfig config(Solver solver, int64_t steps, double shift) {
  SamplerConfig c;
  c.solver = solver, c.steps = steps, c.shift = shift;
  c.integer_timesteps = false;  // the closed-form models read sigma back from t
  return c;
}

struct TempDir : test::TempDir {
  TempDir() : test::TempDir("salad_sampler") {}
};

WanModel tiny_model(Mode m = Mode::Salad) {
  WanAttentionPlan plan = WanAttentionPlan::uniform(m);
  plan.base.attn.block_q = 4, plan.base.attn.block_k = 4, plan.base.attn.keep = 0.5;
  torch::manual_seed(3);
  WanModel model(WanConfig::preset("tiny"), plan);
  torch::NoGradGuard ng;
  for (auto& p : model->parameters()) p.normal_(0.0, 0.05);  // nonzero W_l, gate, modulations
  return model;
}

// --- schedule ------------------------------------------------------------------

TEST(SamplerSchedule, ShiftFormulaAndEndpoints) {
  EXPECT_DOUBLE_EQ(flow_shift(0.0, 5.0), 0.0);
  EXPECT_DOUBLE_EQ(flow_shift(1.0, 5.0), 1.0);
  EXPECT_DOUBLE_EQ(flow_shift(0.5, 1.0), 0.5);
  EXPECT_NEAR(flow_shift(0.5, 5.0), 2.5 / 3.0, 1e-15);
  for (double shift : {1.0, 3.0, 5.0}) {
    const std::vector<double> s = flow_sigmas(50, shift);
    ASSERT_EQ(s.size(), 51u);
    EXPECT_DOUBLE_EQ(s.back(), 0.0);
    EXPECT_NEAR(s.front(), shift * 0.999 / (1 + (shift - 1) * 0.999), 1e-15);
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const double u = 0.999 * (1.0 - static_cast<double>(i) / 50.0);
      EXPECT_NEAR(s[i], shift * u / (1 + (shift - 1) * u), 1e-15) << i;
      EXPECT_GT(s[i], s[i + 1]) << "not strictly decreasing at " << i;
    }
  }
  // Wan's timesteps for 10 steps at shift 5 (FlowUniPCMultistepScheduler.set_timesteps, int64).
  const std::vector<double> s = flow_sigmas(10, 5.0);
  const int64_t wan_t[10] = {999, 978, 952, 920, 882, 833, 768, 681, 555, 356};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(static_cast<int64_t>(std::floor(s[i] * 1000)), wan_t[i]) << i;
  EXPECT_THROW(flow_sigmas(0, 5.0), ArgumentError);
  EXPECT_THROW(flow_sigmas(10, 0.0), ArgumentError);
  EXPECT_THROW(parse_solver("ddim"), ArgumentError);
}

TEST(SamplerSchedule, LatentShape) {
  EXPECT_EQ(wan_latent_shape(81, 480, 832), (std::vector<int64_t>{16, 21, 60, 104}));
  EXPECT_EQ(wan_latent_shape(81, 720, 1280), (std::vector<int64_t>{16, 21, 90, 160}));
  EXPECT_EQ(wan_latent_shape(1, 16, 32, 4), (std::vector<int64_t>{4, 1, 2, 4}));
  EXPECT_THROW(wan_latent_shape(80, 480, 832), ArgumentError);
  EXPECT_THROW(wan_latent_shape(81, 472, 832), ArgumentError);
}

// --- solvers ------------------------------------------------------------------

TEST(SamplerSolve, EulerAndUniPCExactOnStraightPaths) {
  torch::manual_seed(0);
  const at::Tensor x0 = torch::randn({4, 2, 3, 3}, torch::kDouble);
  const at::Tensor noise = torch::randn({4, 2, 3, 3}, torch::kDouble);
  for (Solver solver : {Solver::Euler, Solver::UniPC})
    for (int64_t steps : {1, 3, 7}) {
      const at::Tensor out = sample_flow(point_model(x0), noise, config(solver, steps, 5.0));
      EXPECT_LT(max_abs(out, x0), 1e-12) << to_string(solver) << " steps " << steps;
    }
}

TEST(SamplerSolve, UniPCBeatsEulerOnCurvedPaths) {
  const Gaussian g;
  const at::Tensor noise = torch::linspace(-2, 2, 8, torch::kDouble);
  // Both solvers end with the same first-order jump from the last sigma to 0 (the x0 prediction), which
  // dominates at few steps with a large shift; UniPC's lead shows once the last sigma is small.
  struct Case {
    int64_t steps;
    double shift, ratio;  // expected: unipc error < ratio * euler error
  };
  for (const Case& c : {Case{10, 1.0, 0.3}, Case{20, 1.0, 0.3}, Case{40, 1.0, 0.3}, Case{10, 5.0, 1.0},
                        Case{20, 5.0, 1.0}, Case{50, 5.0, 0.5}}) {
    const at::Tensor exact = g.exact(noise, flow_sigmas(1, c.shift)[0]);
    const double e_euler = max_abs(sample_flow(g.model(), noise, config(Solver::Euler, c.steps, c.shift)), exact);
    const double e_unipc = max_abs(sample_flow(g.model(), noise, config(Solver::UniPC, c.steps, c.shift)), exact);
    EXPECT_LT(e_unipc, c.ratio * e_euler)
        << "steps " << c.steps << " shift " << c.shift << ": unipc " << e_unipc << ", euler " << e_euler;
  }
  // Both converge as steps grow.
  const at::Tensor exact = g.exact(noise, flow_sigmas(1, 1.0)[0]);
  double prev_u = 1e9, prev_e = 1e9;
  for (int64_t steps : {10, 20, 40, 80}) {
    const double e = max_abs(sample_flow(g.model(), noise, config(Solver::Euler, steps, 1.0)), exact);
    const double u = max_abs(sample_flow(g.model(), noise, config(Solver::UniPC, steps, 1.0)), exact);
    EXPECT_LT(e, prev_e) << steps;
    EXPECT_LT(u, prev_u) << steps;
    prev_e = e, prev_u = u;
  }
}

// Golden: Wan's FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py;
// shift=1 at construction, set_timesteps(steps, shift)) driven by the same
// Gaussian model (sigma read from the scheduler) from the same start. It keeps
// sigmas in float32, hence the 1e-5 tolerance.
TEST(SamplerSolve, UniPCMatchesWanScheduler) {
  const Gaussian g;
  const at::Tensor noise = torch::linspace(-2, 2, 8, torch::kDouble);
  struct Case {
    int64_t steps;
    double shift;
    std::vector<double> x;
  };
  const Case cases[] = {
      {10,
       5.0,
       {0.218824914, 0.299156632, 0.379488350, 0.459820069, 0.540151787, 0.620483505, 0.700815224, 0.781146942}},
      {6,
       3.0,
       {0.236173779, 0.311546416, 0.386919053, 0.462291690, 0.537664327, 0.613036964, 0.688409601, 0.763782237}},
  };
  for (const Case& c : cases) {
    const at::Tensor out = sample_flow(g.model(), noise, config(Solver::UniPC, c.steps, c.shift));
    EXPECT_LT(max_abs(out, torch::tensor(c.x, torch::kDouble)), 1e-5) << "steps " << c.steps << " shift " << c.shift;
  }
}

TEST(SamplerSolve, CallbacksTimestepsAndBadModel) {
  SamplerConfig c;  // integer timesteps, as Wan
  c.steps = 10, c.shift = 5.0, c.solver = Solver::Euler;
  std::vector<double> seen_t, before_idx, after_idx;
  const VelocityFn zero = [&](const at::Tensor& x, const at::Tensor& t) {
    seen_t.push_back(t[0].item<double>());
    return torch::zeros_like(x);
  };
  double last_total = -1;
  sample_flow(
      zero, torch::zeros({2, 1, 2, 2}), c,
      [&](const StepInfo& s) { before_idx.push_back(static_cast<double>(s.index)); },
      [&](const StepInfo& s) {
        after_idx.push_back(static_cast<double>(s.index));
        EXPECT_GE(s.elapsed_ms, 0);
        EXPECT_GE(s.total_ms, last_total);
        last_total = s.total_ms;
        EXPECT_EQ(s.steps, 10);
      });
  EXPECT_EQ(seen_t, (std::vector<double>{999, 978, 952, 920, 882, 833, 768, 681, 555, 356}));
  EXPECT_EQ(before_idx.size(), 10u);
  EXPECT_EQ(after_idx, before_idx);
  const VelocityFn bad = [](const at::Tensor& x, const at::Tensor&) { return x.flatten(); };
  EXPECT_THROW(sample_flow(bad, torch::zeros({2, 1, 2, 2}), c), ArgumentError);
}

// --- guidance and seeds ---------------------------------------------------------

TEST(SamplerGuidance, CombineFormula) {
  torch::manual_seed(1);
  const at::Tensor c = torch::randn({3, 4}, torch::kDouble), u = torch::randn({3, 4}, torch::kDouble);
  EXPECT_LT(max_abs(cfg_combine(c, u, 5.0), u + 5.0 * (c - u)), 1e-14);
  EXPECT_LT(max_abs(cfg_combine(c, u, 1.0), c), 1e-14);
  EXPECT_LT(max_abs(cfg_combine(c, u, 0.0), u), 1e-14);
  EXPECT_THROW(cfg_combine(c, u.t(), 2.0), ArgumentError);
}

TEST(SamplerGuidance, WanVelocityBatchedEqualsTwoPasses) {
  WanModel model = tiny_model(Mode::Sparse);
  torch::manual_seed(2);
  const at::Tensor x = torch::randn({4, 2, 4, 4}), t = torch::full({1}, 700.0, torch::kDouble);
  const at::Tensor ctx = torch::randn({5, 32}), neg = torch::randn({5, 32});
  torch::NoGradGuard ng;
  const at::Tensor vc = model->forward(x.unsqueeze(0), t, ctx.unsqueeze(0)).squeeze(0);
  const at::Tensor vu = model->forward(x.unsqueeze(0), t, neg.unsqueeze(0)).squeeze(0);
  const at::Tensor two = wan_velocity(model, ctx, neg, 4.0, false)(x, t);
  const at::Tensor batched = wan_velocity(model, ctx, neg, 4.0, true)(x, t);
  EXPECT_LT(max_abs(two, vu + 4.0 * (vc - vu)), 1e-6);
  EXPECT_LT(max_abs(batched, two), 1e-5);
  EXPECT_LT(max_abs(wan_velocity(model, ctx)(x, t), vc), 1e-6);    // guidance 1: conditional pass only
  EXPECT_THROW(wan_velocity(model, ctx, {}, 5.0), ArgumentError);  // guidance needs a negative context
  EXPECT_THROW(wan_velocity(model, torch::randn({5, 31})), ArgumentError);
}

TEST(SamplerSeeds, SameSeedSameLatentsDifferentSeedDifferent) {
  EXPECT_TRUE(seeded_noise({4, 2, 4, 4}, 7).equal(seeded_noise({4, 2, 4, 4}, 7)));
  EXPECT_FALSE(seeded_noise({4, 2, 4, 4}, 7).equal(seeded_noise({4, 2, 4, 4}, 8)));
  WanModel model = tiny_model();
  const at::Tensor ctx = torch::randn({5, 32}), neg = torch::randn({3, 32});
  SamplerConfig c;
  c.steps = 2;
  auto run = [&](uint64_t seed) {
    return sample_flow(wan_velocity(model, ctx, neg, 5.0), seeded_noise({4, 2, 4, 4}, seed), c);
  };
  const at::Tensor a = run(11), b = run(11), d = run(12);
  EXPECT_TRUE(a.equal(b));
  EXPECT_GT(max_abs(a, d), 1e-3);
  EXPECT_TRUE(torch::isfinite(a).all().item<bool>());
}

// --- attention schedule ----------------------------------------------------------

TEST(SamplerAttention, DenseFirstStepsAndDenseLayers) {
  WanModel model = tiny_model(Mode::Sparse);
  AttentionSchedule sched;
  sched.mode = Mode::Sparse, sched.dense_steps = 2, sched.dense_layers = {1};
  std::vector<std::vector<Mode>> seen;
  const at::Tensor ctx = torch::randn({5, 32});
  const VelocityFn inner = wan_velocity(model, ctx);
  const VelocityFn observed = [&](const at::Tensor& x, const at::Tensor& t) {
    seen.push_back(attention_modes(model));  // the modes the forward below runs with
    return inner(x, t);
  };
  SamplerConfig c;
  c.steps = 4;
  sample_flow(observed, seeded_noise({4, 2, 4, 4}, 0), c,
              [&](const StepInfo& s) { apply_attention_schedule(model, sched, s.index); });
  ASSERT_EQ(seen.size(), 4u);
  const std::vector<Mode> all_dense{Mode::Dense, Mode::Dense}, mixed{Mode::Sparse, Mode::Dense};
  EXPECT_EQ(seen[0], all_dense);
  EXPECT_EQ(seen[1], all_dense);
  EXPECT_EQ(seen[2], mixed);
  EXPECT_EQ(seen[3], mixed);
  // The switch is real: a sparse layer drops blocks (keep 0.5 of 8 tokens in blocks of 4).
  EXPECT_TRUE(model->block(0)->self_attn->last_attention().block_cnt.defined());
  sched.dense_layers = {2};
  EXPECT_THROW(apply_attention_schedule(model, sched, 0), ArgumentError);
}

// --- CLI smoke runs -----------------------------------------------------------------

std::string read_all(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

int run_cli(const std::string& args, const fs::path& log) {
  const char* cli = std::getenv("SALAD_CLI");
  const std::string cmd = std::string(cli) + " " + args + " >" + log.string() + " 2>&1";
  return std::system(cmd.c_str());
}

TEST(SamplerCli, GenerateTinyTwoSteps) {
  if (!std::getenv("SALAD_CLI")) GTEST_SKIP() << "SALAD_CLI not set";
  TempDir dir;
  WanModel model = tiny_model();
  save_wan_weights(model, dir.path / "model.safetensors");
  torch::manual_seed(4);
  write_tensor_file(dir.path / "ctx.safetensors",
                    {{"context", torch::randn({5, 32})}, {"negative_context", torch::randn({3, 32})}});
  const fs::path out = dir.path / "latents.safetensors", log = dir.path / "log.txt";
  const std::string args = "generate --model " + (dir.path / "model.safetensors").string() + " --context " +
                           (dir.path / "ctx.safetensors").string() + " --out " + out.string() +
                           " --frames 5 --height 32 --width 32 --steps 2 --text-len 0 --mode salad --block-q 4"
                           " --block-k 4 --keep 0.5 --dense-steps 1 --dense-layers 1 --seed 3 --no-progress";
  ASSERT_EQ(run_cli(args, log), 0) << read_all(log);
  const auto t = read_tensor_file(out);
  ASSERT_EQ(t.count("latents"), 1u);
  EXPECT_EQ(t.at("latents").sizes().vec(), (std::vector<int64_t>{4, 2, 4, 4}));
  EXPECT_TRUE(torch::isfinite(t.at("latents")).all().item<bool>());
  const io::SafeTensorsFile f(out);
  EXPECT_EQ(f.metadata().at("steps"), "2");
  EXPECT_EQ(f.metadata().at("solver"), "unipc");
  EXPECT_EQ(f.metadata().at("dense_layers"), "1");
  EXPECT_NE(read_all(log).find("sampling:"), std::string::npos) << read_all(log);
  // Same seed, same latents (a second run through the CLI).
  const fs::path out2 = dir.path / "latents2.safetensors";
  std::string args2 = args;
  args2.replace(args2.find(out.string()), out.string().size(), out2.string());
  ASSERT_EQ(run_cli(args2, log), 0) << read_all(log);
  EXPECT_TRUE(read_tensor_file(out2).at("latents").equal(t.at("latents")));
}

TEST(SamplerCli, GenerateWithAdapter) {
  if (!std::getenv("SALAD_CLI")) GTEST_SKIP() << "SALAD_CLI not set";
  TempDir dir;
  WanModel model = tiny_model();
  save_wan_weights(model, dir.path / "model.safetensors");
  SaladConvertOptions opt;
  opt.attn.block_q = 4, opt.attn.block_k = 4, opt.attn.keep = 0.5;
  opt.lora.rank = 2, opt.lora.alpha = 2;
  create_adapter(model->config(), opt, dir.path / "adapter.safetensors", 5);
  write_tensor_file(dir.path / "ctx.safetensors", {{"context", torch::randn({5, 32})}});
  const fs::path out = dir.path / "latents.safetensors", log = dir.path / "log.txt";
  ASSERT_EQ(run_cli("generate --model " + (dir.path / "model.safetensors").string() + " --adapter " +
                        (dir.path / "adapter.safetensors").string() + " --context " +
                        (dir.path / "ctx.safetensors").string() + " --out " + out.string() +
                        " --frames 5 --height 32 --width 32 --steps 2 --text-len 0 --guidance 1 --solver euler"
                        " --no-progress",
                    log),
            0)
      << read_all(log);
  const std::string s = read_all(log);
  EXPECT_NE(s.find("LoRA linears merged"), std::string::npos) << s;
  EXPECT_NE(s.find("keep 0.500, blocks 4/4"), std::string::npos) << s;  // the adapter's attention options
  EXPECT_EQ(read_tensor_file(out).at("latents").sizes().vec(), (std::vector<int64_t>{4, 2, 4, 4}));
}

TEST(SamplerCli, BenchDitTiny) {
  if (!std::getenv("SALAD_CLI")) GTEST_SKIP() << "SALAD_CLI not set";
  TempDir dir;
  const fs::path log = dir.path / "log.txt";
  ASSERT_EQ(
      run_cli(
          "bench-dit --config tiny --frames 9 --height 128 --width 128 --device cpu --iters 1 --warmup 0 --threads 1",
          log),
      0)
      << read_all(log);
  const std::string s = read_all(log);
  for (const char* want : {"dense", "sparse", "salad", "speed-up", "method:"})
    EXPECT_NE(s.find(want), std::string::npos) << want << "\n" << s;
  ASSERT_EQ(
      run_cli("bench-dit --config tiny --frames 5 --height 64 --width 64 --layers 1 --iters 1 --warmup 0 --threads 1",
              log),
      0)
      << read_all(log);
  EXPECT_NE(read_all(log).find("1 built"), std::string::npos) << read_all(log);
}

}  // namespace

// `salad generate --device cuda` end to end (issue 4): a world-sized model (2 heads of 64, so the
// CUDA kernels apply) in SALAD mode, bf16 on the GPU vs float32 on the CPU from the same seeded
// noise. Skips without a GPU.
TEST(SM90_Generate, CliOnCudaMatchesCpu) {
  if (!std::getenv("SALAD_CLI")) GTEST_SKIP() << "SALAD_CLI not set";
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  TempDir dir;
  WanAttentionPlan plan = WanAttentionPlan::uniform(Mode::Salad);
  plan.base.attn.block_q = 64, plan.base.attn.block_k = 64, plan.base.attn.keep = 0.5;
  torch::manual_seed(5);
  WanModel model(WanConfig::preset("world"), plan);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.normal_(0.0, 0.05);  // nonzero W_l, gate, modulations
  }
  save_wan_weights(model, dir.path / "model.safetensors");
  write_tensor_file(dir.path / "ctx.safetensors",
                    {{"context", torch::randn({5, 64})}, {"negative_context", torch::randn({3, 64})}});
  std::map<std::string, at::Tensor> out;
  for (const std::string dev : {"cpu", "cuda"}) {
    const fs::path o = dir.path / ("latents_" + dev + ".safetensors"), log = dir.path / "log.txt";
    // 17 x 128 x 128 pixels -> latents (3, 5, 16, 16) -> 5 x 8 x 8 = 320 tokens, 5 key blocks of 64.
    ASSERT_EQ(run_cli("generate --model " + (dir.path / "model.safetensors").string() + " --context " +
                          (dir.path / "ctx.safetensors").string() + " --out " + o.string() +
                          " --frames 17 --height 128 --width 128 --steps 3 --text-len 0 --mode salad --block-q 64"
                          " --block-k 64 --keep 0.5 --seed 11 --no-progress --device " + dev,
                      log),
              0)
        << read_all(log);
    out[dev] = read_tensor_file(o).at("latents").to(at::kFloat);
  }
  ASSERT_EQ(out["cpu"].sizes().vec(), out["cuda"].sizes().vec());
  ASSERT_TRUE(torch::isfinite(out["cuda"]).all().item<bool>());
  const double rel = ((out["cuda"] - out["cpu"]).norm() / out["cpu"].norm()).item<double>();
  EXPECT_LT(rel, 0.05) << "bf16 CUDA vs float32 CPU latents, relative L2";
  EXPECT_GT(out["cpu"].std().item<double>(), 0.1);  // a real sample, not a constant
}

// `salad reset-params` puts back the seeded initial values of the named tensors and nothing else.
TEST(ModelCli, ResetParamsRestoresSeededInitialValues) {
  if (!std::getenv("SALAD_CLI")) GTEST_SKIP() << "SALAD_CLI not set";
  TempDir dir;
  WanAttentionPlan plan = WanAttentionPlan::uniform(Mode::Dense);
  plan.base.gate = Gate::None;
  torch::manual_seed(7);
  WanModel init(WanConfig::preset("tiny"), plan);
  const at::Tensor bias0 = init->named_parameters()["patch_embedding.bias"].clone();
  {
    torch::NoGradGuard ng;
    for (auto& p : init->parameters()) p.add_(0.5);  // "trained": every tensor moved
  }
  const at::Tensor head_moved = init->named_parameters()["head.head.weight"].clone();
  save_wan_weights(init, dir.path / "model.safetensors");
  const fs::path out = dir.path / "fixed.safetensors", log = dir.path / "log.txt";
  ASSERT_EQ(run_cli("reset-params --model " + (dir.path / "model.safetensors").string() + " --out " + out.string() +
                        " --config tiny --seed 7 --names patch_embedding.bias",
                    log),
            0)
      << read_all(log);
  const auto t = read_tensor_file(out);
  EXPECT_TRUE(t.at("patch_embedding.bias").equal(bias0));
  EXPECT_TRUE(t.at("head.head.weight").equal(head_moved));
  // A name that is not a parameter is an error naming it.
  EXPECT_NE(run_cli("reset-params --model " + (dir.path / "model.safetensors").string() + " --out " + out.string() +
                        " --config tiny --names no.such.tensor",
                    log),
            0);
  EXPECT_NE(read_all(log).find("no.such.tensor"), std::string::npos) << read_all(log);
}
