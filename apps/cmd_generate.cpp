// `salad generate` (sample Wan 2.1 latents with dense / sparse / SALAD
// attention) and `salad bench-dit` (time one denoising step of the whole DiT
// per attention mode, and the share of self-attention in it).
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <sstream>

#ifdef SALAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "commands.h"
#include "salad/fused.h"
#include "salad/lora.h"
#include "salad/sampler.h"
#include "salad/wan.h"
#include "timing.h"

using namespace salad;
using salad::cli::median;
using salad::cli::median_ms;
using salad::cli::ms_since;
using salad::cli::sync_device;

namespace {

at::Device parse_device(const std::string& s) {
  if (s == "cpu") return at::kCPU;
  if (s == "cuda") {
    if (!torch::cuda::is_available()) throw ArgumentError("--device: cuda requested but no CUDA device is visible");
    return at::kCUDA;
  }
  throw ArgumentError("--device: expected cpu | cuda, got '" + s + "'");
}

// The compute dtype: `s` when given, else bfloat16 on CUDA and float32 on CPU.
at::ScalarType compute_dtype(const std::string& s, const at::Device& dev) {
  if (s.empty()) return dev.is_cuda() ? at::kBFloat16 : at::kFloat;
  if (s == "float32") return at::kFloat;
  if (s == "float64") return at::kDouble;
  if (s == "bfloat16") return at::kBFloat16;
  if (s == "float16") return at::kHalf;
  throw ArgumentError("--dtype: expected float32 | float64 | bfloat16 | float16, got '" + s + "'");
}

std::vector<int64_t> parse_int_list(const std::string& s, const char* what) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    try {
      size_t used = 0;
      out.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw ArgumentError(std::string(what) + ": expected comma-separated integers, got '" + s + "'");
    }
  }
  return out;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string device_name(const at::Device& dev) {
#ifdef SALAD_WITH_CUDA
  if (dev.is_cuda()) return at::cuda::getCurrentDeviceProperties()->name;
#endif
  return dev.is_cuda() ? "cuda" : "cpu, " + std::to_string(at::get_num_threads()) + " threads";
}

// CUDA caching-allocator bytes on `dev`: currently allocated, and the peak since the last reset_peak
// (zeros on CPU or without CUDA).
struct DeviceMemory {
  double allocated = 0, peak = 0, reserved_peak = 0;
};
DeviceMemory device_memory(const at::Device& dev) {
  DeviceMemory m;
#ifdef SALAD_WITH_CUDA
  if (dev.is_cuda()) {
    const auto idx = dev.has_index() ? dev.index() : c10::cuda::current_device();
    const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(idx);
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    m.allocated = static_cast<double>(st.allocated_bytes[agg].current);
    m.peak = static_cast<double>(st.allocated_bytes[agg].peak);
    m.reserved_peak = static_cast<double>(st.reserved_bytes[agg].peak);
  }
#endif
  return m;
}
void reset_peak(const at::Device& dev) {
#ifdef SALAD_WITH_CUDA
  if (dev.is_cuda())
    c10::cuda::CUDACachingAllocator::resetPeakStats(dev.has_index() ? dev.index() : c10::cuda::current_device());
#endif
}
double device_total_bytes(const at::Device& dev) {
#ifdef SALAD_WITH_CUDA
  if (dev.is_cuda()) return static_cast<double>(at::cuda::getCurrentDeviceProperties()->totalGlobalMem);
#endif
  return 0;
}
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Builds a model with `dtype` as the default dtype so a bf16 model never has a float32 copy.
WanModel build_random_model(const WanConfig& cfg, const WanAttentionPlan& plan, at::ScalarType dtype,
                            const at::Device& dev) {
  const caffe2::TypeMeta saved = at::get_default_dtype();
  at::set_default_dtype(c10::scalarTypeToTypeMeta(dtype == at::kDouble ? at::kDouble : dtype));
  WanModel model{nullptr};
  try {
    model = WanModel(cfg, plan);
  } catch (...) {
    at::set_default_dtype(saved);
    throw;
  }
  at::set_default_dtype(saved);
  model->set_dtype(dtype);
  model->to(dev);
  model->eval();
  return model;
}

// --- generate -------------------------------------------------------------------

struct GenerateArgs {
  std::string model, adapter, context, out, solver = "unipc", mode = "salad", dense_layers, device = "cpu", dtype,
                                            impl = "auto";
  int64_t frames = 81, height = 480, width = 832, steps = 50, dense_steps = 0, text_len = 512, heads = 0;
  int64_t block_q = 128, block_k = 64;
  double shift = 5.0, guidance = 5.0, keep = 0.10;
  uint64_t seed = 0;
  bool batch_cfg = false, no_progress = false, step_times = false;
  bool keep_given = false, block_q_given = false, block_k_given = false;  // set on the command line
};

int run_generate(const GenerateArgs& a) {
  const at::Device dev = parse_device(a.device);
  const at::ScalarType dt = compute_dtype(a.dtype, dev);
  SamplerConfig sc;
  sc.steps = a.steps, sc.shift = a.shift, sc.solver = parse_solver(a.solver), sc.progress = !a.no_progress;
  sc.validate();
  // With an adapter, the model is built with the adapter's plan (gate, scales, attention options) so
  // load_adapter can convert it; explicitly given --keep / --block-q / --block-k override its options.
  const Impl impl = parse_impl(a.impl);
  WanAttentionPlan plan = a.adapter.empty() ? WanAttentionPlan::uniform(parse_mode(a.mode), impl)
                                            : read_adapter_options(a.adapter).plan(impl);
  if (a.adapter.empty() || a.keep_given) plan.base.attn.keep = a.keep;
  if (a.adapter.empty() || a.block_q_given) plan.base.attn.block_q = a.block_q;
  if (a.adapter.empty() || a.block_k_given) plan.base.attn.block_k = a.block_k;

  auto t0 = std::chrono::steady_clock::now();
  WanModel model = load_wan_model(a.model, plan, a.heads, a.text_len, dt, dev);
  if (!a.adapter.empty()) {
    const AdapterLoadReport rep = load_adapter(model, a.adapter, /*convert=*/true);
    const int64_t merged = merge_lora(model);  // fold B A into W0: inference needs no separate adapter weights
    std::printf("adapter %s: %zu tensors loaded, %lld LoRA linears merged\n", a.adapter.c_str(), rep.loaded.size(),
                (long long)merged);
    for (int64_t i = 0; i < model->config().num_layers; ++i) {
      Options& o = model->block(i)->self_attn->config().attn;
      if (a.keep_given) o.keep = a.keep;
      if (a.block_q_given) o.block_q = a.block_q;
      if (a.block_k_given) o.block_k = a.block_k;
    }
  }
  model->eval();
  sync_device(dev);
  const double load_ms = ms_since(t0);
  const WanConfig& cfg = model->config();
  const Options& attn0 = model->block(0)->self_attn->config().attn;

  AttentionSchedule sched;
  sched.mode = parse_mode(a.mode);
  sched.dense_steps = a.dense_steps;
  for (int64_t l : parse_int_list(a.dense_layers, "--dense-layers")) sched.dense_layers.insert(l);
  sched.validate(cfg.num_layers);

  // Text context: 'context' (Lt, text_dim) and optional 'negative_context'.
  const auto tensors = read_tensor_file(a.context);
  auto ctx_it = tensors.find("context");
  if (ctx_it == tensors.end()) throw ArgumentError("--context: file " + a.context + " has no tensor 'context'");
  const at::Tensor context = ctx_it->second.to(at::kFloat);
  at::Tensor negative;
  if (auto it = tensors.find("negative_context"); it != tensors.end()) negative = it->second.to(at::kFloat);
  if (a.guidance != 1.0 && !negative.defined()) {
    std::fprintf(stderr, "note: %s has no 'negative_context'; the unconditional pass uses one zero token\n",
                 a.context.c_str());
    negative = at::zeros({1, cfg.text_dim});
  }
  const VelocityFn velocity = wan_velocity(model, context, negative, a.guidance, a.batch_cfg);

  const std::vector<int64_t> shape = wan_latent_shape(a.frames, a.height, a.width, cfg.in_dim);
  const at::Tensor noise = seeded_noise(shape, a.seed, dev);
  const Grid grid = model->grid_of({1, shape[0], shape[1], shape[2], shape[3]});
  std::printf(
      "generate: %lld layers, dim %lld, latent %lldx%lldx%lldx%lld, tokens %lld (grid %lldx%lldx%lld), "
      "device %s (%s), dtype %s, solver %s, %lld steps, shift %.2f, guidance %.2f%s, seed %llu\n",
      (long long)cfg.num_layers, (long long)cfg.dim, (long long)shape[0], (long long)shape[1], (long long)shape[2],
      (long long)shape[3], (long long)grid.size(), (long long)grid.f, (long long)grid.h, (long long)grid.w,
      a.device.c_str(), device_name(dev).c_str(), c10::toString(dt), a.solver.c_str(), (long long)a.steps, a.shift,
      a.guidance, a.guidance != 1.0 ? (a.batch_cfg ? " (batched)" : " (two passes)") : "", (unsigned long long)a.seed);
  std::printf("attention: %s, keep %.3f, blocks %lld/%lld, dense for the first %lld steps, dense layers [%s]\n",
              a.mode.c_str(), attn0.keep, (long long)attn0.block_q, (long long)attn0.block_k, (long long)a.dense_steps,
              a.dense_layers.c_str());
  std::printf("model loaded in %.1f ms\n", load_ms);

  std::vector<StepInfo> steps;
  std::vector<bool> dense_step;
  const at::Tensor latents = sample_flow(
      velocity, noise, sc,
      [&](const StepInfo& s) {
        apply_attention_schedule(model, sched, s.index);
        dense_step.push_back(s.index < sched.dense_steps);
      },
      [&](const StepInfo& s) {
        steps.push_back(s);
        if (a.step_times)
          std::printf("step %3lld/%lld sigma %.4f t %6.1f %s %9.1f ms\n", (long long)s.index + 1, (long long)s.steps,
                      s.sigma, s.timestep, dense_step.back() ? "dense" : a.mode.c_str(), s.elapsed_ms);
      });
  const double total_ms = steps.empty() ? 0 : steps.back().total_ms;

  std::map<std::string, std::string> md = {
      {"format", "salad.latents"},
      {"model", a.model},
      {"adapter", a.adapter},
      {"frames", std::to_string(a.frames)},
      {"height", std::to_string(a.height)},
      {"width", std::to_string(a.width)},
      {"steps", std::to_string(a.steps)},
      {"shift", std::to_string(a.shift)},
      {"guidance", std::to_string(a.guidance)},
      {"seed", std::to_string(a.seed)},
      {"solver", a.solver},
      {"mode", a.mode},
      {"keep", std::to_string(attn0.keep)},
      {"block_q", std::to_string(attn0.block_q)},
      {"block_k", std::to_string(attn0.block_k)},
      {"dense_steps", std::to_string(a.dense_steps)},
      {"dense_layers", a.dense_layers},
      {"device", a.device},
      {"dtype", c10::toString(dt)},
      {"context", a.context},
      {"sampling_ms", std::to_string(total_ms)},
  };
  write_tensor_file(a.out, {{"latents", latents.to(at::kCPU, at::kFloat)}}, md);

  std::vector<double> dense_ms, other_ms;
  for (size_t i = 0; i < steps.size(); ++i) (dense_step[i] ? dense_ms : other_ms).push_back(steps[i].elapsed_ms);
  std::printf("sampling: %.1f ms total, %.1f ms/step median", total_ms, median([&] {
                std::vector<double> all;
                for (const auto& s : steps) all.push_back(s.elapsed_ms);
                return all;
              }()));
  if (!dense_ms.empty() && !other_ms.empty())
    std::printf(" (dense steps %.1f ms, %s steps %.1f ms)", median(dense_ms), a.mode.c_str(), median(other_ms));
  std::printf("\nwrote %s: latents %lldx%lldx%lldx%lld float32, mean %.4f, std %.4f\n", a.out.c_str(),
              (long long)shape[0], (long long)shape[1], (long long)shape[2], (long long)shape[3],
              latents.mean().item<double>(), latents.std().item<double>());
  return 0;
}

// --- bench-dit --------------------------------------------------------------------

struct BenchDitArgs {
  std::string config = "wan2.1-1.3b", device = "cpu", dtype, modes = "dense,sparse,salad", impl = "auto",
              fused = "both";
  int64_t frames = 81, height = 480, width = 832, layers = 0, text_len = -1, block_q = 128, block_k = 64;
  double keep = 0.10, timestep = 500.0;
  int iters = 5, warmup = 1, threads = 0;
  uint64_t seed = 0;
};

int run_bench_dit(const BenchDitArgs& a) {
  const at::Device dev = parse_device(a.device);
  if (a.threads > 0) at::set_num_threads(a.threads);
  const at::ScalarType dt = compute_dtype(a.dtype, dev);
  const at::ScalarType hp = dt == at::kDouble ? at::kDouble : at::kFloat;
  WanConfig cfg = WanConfig::preset(a.config);
  if (a.text_len >= 0) cfg.text_len = a.text_len;
  const int64_t total_layers = cfg.num_layers;
  if (a.layers < 0 || a.layers > total_layers)
    throw ArgumentError("--layers: expected 0 (all) or a count in [1, " + std::to_string(total_layers) + "], got " +
                        std::to_string(a.layers));
  if (a.layers > 0) cfg.num_layers = a.layers;
  std::vector<Mode> modes;
  for (const auto& m : split(a.modes)) modes.push_back(parse_mode(m));
  if (modes.empty()) throw ArgumentError("--modes: expected a comma list of dense,sparse,salad, got '" + a.modes + "'");
  std::vector<bool> fused_variants;
  if (a.fused == "off") fused_variants = {false};
  else if (a.fused == "on") fused_variants = {true};
  else if (a.fused == "both") fused_variants = {false, true};
  else throw ArgumentError("--fused: expected on | off | both, got '" + a.fused + "'");
  const bool fused_prev = fused::enabled();

  WanAttentionPlan plan = WanAttentionPlan::uniform(modes[0], parse_impl(a.impl));
  plan.base.attn.keep = a.keep, plan.base.attn.block_q = a.block_q, plan.base.attn.block_k = a.block_k;
  torch::manual_seed(a.seed);
  auto t0 = std::chrono::steady_clock::now();
  WanModel model = build_random_model(cfg, plan, dt, dev);
  sync_device(dev);
  const double build_ms = ms_since(t0);
  const double weights_bytes = device_memory(dev).allocated;

  const std::vector<int64_t> shape = wan_latent_shape(a.frames, a.height, a.width, cfg.in_dim);
  const at::Tensor x = at::randn({1, shape[0], shape[1], shape[2], shape[3]}, at::TensorOptions().device(dev));
  const Grid grid = model->grid_of(x.sizes());
  const int64_t L = grid.size(), C = cfg.dim, H = cfg.num_heads, D = cfg.head_dim();
  const int64_t Lt = cfg.text_len > 0 ? cfg.text_len : 16;
  const auto copt = at::TensorOptions().device(dev).dtype(dt);
  const at::Tensor context = at::randn({1, Lt, cfg.text_dim}, copt);
  const at::Tensor t = at::full({1}, a.timestep, at::TensorOptions().device(dev).dtype(at::kDouble));

  std::printf(
      "bench-dit: config %s (dim %lld, %lld heads of %lld, ffn %lld, %lld layers%s), latent %lldx%lldx%lldx%lld "
      "-> tokens %lldx%lldx%lld = %lld, text %lld tokens\n",
      a.config.c_str(), (long long)C, (long long)H, (long long)D, (long long)cfg.ffn_dim, (long long)total_layers,
      cfg.num_layers < total_layers ? (", " + std::to_string(cfg.num_layers) + " built").c_str() : "",
      (long long)shape[0], (long long)shape[1], (long long)shape[2], (long long)shape[3], (long long)grid.f,
      (long long)grid.h, (long long)grid.w, (long long)L, (long long)Lt);
  std::printf(
      "device %s (%s), dtype %s, keep %.3f, blocks %lld/%lld, impl %s, fused %s (%s), random weights (built in "
      "%.0f ms), B 1, no CFG, %d iters (median) after %d warmup\n",
      a.device.c_str(), device_name(dev).c_str(), c10::toString(dt), a.keep, (long long)a.block_q, (long long)a.block_k,
      a.impl.c_str(), a.fused.c_str(),
      dev.is_cuda() && fused::kernels_compiled() ? "CUDA kernels" : "no CUDA kernels here: fused = eager", build_ms,
      a.iters, a.warmup);
  if (dev.is_cuda())
    std::printf("device memory: weights %.2f GiB of %.2f GiB\n", weights_bytes / kGiB, device_total_bytes(dev) / kGiB);

  // Block 0 stands for every block (same shapes); its inputs and its self-attention's are made per row.
  WanBlock blk = model->block(0);
  struct Row {
    Mode mode;
    bool fused;
    double step = 0, step_built = 0, attn = 0, self_attn = 0, block = 0, sparsity = 0, peak = 0, reserved_peak = 0;
  };
  std::vector<Row> rows;
  torch::NoGradGuard ng;
  for (Mode m : modes) {
    set_attention_mode(model, m);
    const LayerConfig& lc = blk->self_attn->config();
    double attn_ms = -1;  // the op alone does not depend on fusion: timed once per mode
    for (bool fz : fused_variants) {
      Row r{m, fz};
      fused::set_enabled(fz);
      sync_device(dev);
      reset_peak(dev);
      r.step_built = median_ms([&] { model->forward(x, t, context); }, dev, a.warmup, a.iters);
      const DeviceMemory mem = device_memory(dev);
      r.peak = mem.peak, r.reserved_peak = mem.reserved_peak;
      if (m != Mode::Dense) {
        const AttentionOutput& out = blk->self_attn->last_attention();
        Params p;
        p.L = L, p.opt = lc.attn;
        r.sparsity = 1.0 - out.block_cnt.to(at::kDouble).mean().item<double>() / static_cast<double>(p.blocks().n_k);
      }
      if (attn_ms < 0) {
        // q, k, v as the layer hands them to the op: (B, H, L, D) views of (B, L, H, D) projections.
        const at::Tensor q = at::randn({1, L, H, D}, copt).transpose(1, 2),
                         k = at::randn({1, L, H, D}, copt).transpose(1, 2),
                         v = at::randn({1, L, H, D}, copt).transpose(1, 2);
        Options opt = lc.attn;
        if (lc.skip_linear && opt.mode == Mode::Salad) opt.mode = Mode::Sparse;
        attn_ms = median_ms([&] { attention(q, k, v, grid, opt, lc.impl); }, dev, a.warmup, a.iters);
      }
      r.attn = attn_ms;
      {
        const at::Tensor xa = at::randn({1, L, C}, copt);
        r.self_attn = median_ms([&] { blk->self_attn->forward(xa, grid); }, dev, a.warmup, a.iters);
      }
      if (cfg.num_layers < total_layers) {
        const at::Tensor h_in = at::randn({1, L, C}, at::TensorOptions().device(dev).dtype(hp));
        const at::Tensor e0 = at::randn({1, 6, C}, at::TensorOptions().device(dev).dtype(hp)) * 0.1;
        const at::Tensor ctx_emb = at::randn({1, Lt, C}, copt);
        r.block = median_ms([&] { blk->forward(h_in, e0, grid, ctx_emb); }, dev, a.warmup, a.iters);
        r.step = r.step_built + static_cast<double>(total_layers - cfg.num_layers) * r.block;
      } else {
        r.step = r.step_built;
      }
      rows.push_back(r);
    }
  }
  fused::set_enabled(fused_prev);

  auto label = [&](const Row& r) {
    return std::string(to_string(r.mode)) + (fused_variants.size() > 1 || r.fused ? (r.fused ? "/fused" : "/eager") : "");
  };
  const double nl = static_cast<double>(total_layers);
  std::printf(
      "\nmethod: step = one WanModel forward, median%s. attention core = salad::attention alone on random "
      "q/k/v of this shape (block 0's options), median, x %lld layers. self-attn = the whole "
      "SaladSelfAttention module alone (q/k/v/o projections, qk-norms, both branches, gate), x %lld layers. "
      "rest = step - self-attn (cross-attention, FFN, norms, embeddings, head); per block = rest / layers. "
      "eager = the LibTorch ops, fused = the fused norm / residual kernels and inference glue (salad::fused, "
      "SALAD_FUSED). peak = CUDA caching-allocator peak during the step (allocated, reserved).\n",
      cfg.num_layers < total_layers
          ? (" of the " + std::to_string(cfg.num_layers) + " built blocks + (" +
             std::to_string(total_layers - cfg.num_layers) + " missing blocks x one block alone, median)")
                .c_str()
          : "",
      (long long)total_layers, (long long)total_layers);
  std::printf("\n%-13s %9s %11s %9s %20s %20s %11s %9s %17s\n", "mode", "sparsity", "step ms", "speed-up",
              "attn core ms (share)", "self-attn ms (share)", "rest ms", "per block", "peak GiB (resv)");
  const double base = rows[0].step;
  for (const Row& r : rows) {
    const double attn = nl * r.attn, sa = nl * r.self_attn;
    char a1[40], a2[40], pk[40];
    std::snprintf(a1, sizeof a1, "%.2f (%.1f%%)", attn, 100 * attn / r.step);
    std::snprintf(a2, sizeof a2, "%.2f (%.1f%%)", sa, 100 * sa / r.step);
    if (dev.is_cuda())
      std::snprintf(pk, sizeof pk, "%.2f (%.2f)", r.peak / kGiB, r.reserved_peak / kGiB);
    else
      std::snprintf(pk, sizeof pk, "-");
    std::printf("%-13s %8.1f%% %11.2f %8.2fx %20s %20s %11.2f %9.2f %17s\n", label(r).c_str(), 100 * r.sparsity,
                r.step, base / r.step, a1, a2, r.step - sa, (r.step - sa) / nl, pk);
  }
  if (cfg.num_layers < total_layers) {
    std::printf("\nmeasured (%lld of %lld blocks built):", (long long)cfg.num_layers, (long long)total_layers);
    for (const Row& r : rows)
      std::printf("  %s step %.2f ms, one block %.2f ms;", label(r).c_str(), r.step_built, r.block);
    std::printf("\n");
  }
  std::printf("speed-up vs %s, measured in this run; a sample costs about steps x step, twice that with CFG.\n",
              label(rows[0]).c_str());
  return 0;
}

}  // namespace

namespace salad::cli {
void add_generate_commands(CLI::App& app, Commands& cmds) {
  static GenerateArgs g;
  auto* gen = app.add_subcommand("generate", "sample Wan 2.1 latents (flow matching, UniPC or Euler, CFG)");
  gen->add_option("--model", g.model, "checkpoint: .safetensors file, sharded index or directory")->required();
  gen->add_option("--adapter", g.adapter, "adapter .safetensors (LoRA + SALAD branches; its attention options apply)");
  gen->add_option("--context", g.context, "safetensors with 'context' (Lt, 4096) and optional 'negative_context'")
      ->required();
  gen->add_option("--out", g.out, "output latents .safetensors (written atomically)")->required();
  gen->add_option("--frames", g.frames, "video frames (4n + 1)")->capture_default_str();
  gen->add_option("--height", g.height, "pixels (multiple of 16)")->capture_default_str();
  gen->add_option("--width", g.width, "pixels (multiple of 16)")->capture_default_str();
  gen->add_option("--steps", g.steps, "sampling steps")->capture_default_str();
  gen->add_option("--shift", g.shift, "sigma shift (Wan: 5 for T2V, 3 for I2V 480p)")->capture_default_str();
  gen->add_option("--guidance", g.guidance, "classifier-free guidance scale (1: no unconditional pass)")
      ->capture_default_str();
  gen->add_option("--seed", g.seed, "noise seed (CPU generator: same latents on every device)")->capture_default_str();
  gen->add_option("--solver", g.solver, "unipc | euler")->capture_default_str();
  gen->add_option("--mode", g.mode, "attention: dense | sparse | salad")->capture_default_str();
  auto* keep = gen->add_option("--keep", g.keep, "fraction of key blocks kept")->capture_default_str();
  auto* bq = gen->add_option("--block-q", g.block_q, "query block size")->capture_default_str();
  auto* bk = gen->add_option("--block-k", g.block_k, "key block size")->capture_default_str();
  gen->add_option("--dense-steps", g.dense_steps, "dense attention for the first N steps")->capture_default_str();
  gen->add_option("--dense-layers", g.dense_layers, "comma list of layers that always use dense attention");
  gen->add_option("--device", g.device, "cpu | cuda")->capture_default_str();
  gen->add_option("--dtype", g.dtype, "compute dtype (default: bfloat16 on cuda, float32 on cpu)");
  gen->add_option("--impl", g.impl, "auto | reference | fast")->capture_default_str();
  gen->add_option("--text-len", g.text_len, "context padded to this many tokens (Wan: 512; 0: none)")
      ->capture_default_str();
  gen->add_option("--heads", g.heads, "attention heads (0: from the checkpoint or dim / 128)")->capture_default_str();
  gen->add_flag("--batch-cfg", g.batch_cfg, "run the conditional and unconditional passes as one batch of 2");
  gen->add_flag("--no-progress", g.no_progress, "no progress bar on stderr");
  gen->add_flag("--step-times", g.step_times, "print every step's time");
  cmds.push_back({gen, [keep, bq, bk] {
                    g.keep_given = keep->count() > 0, g.block_q_given = bq->count() > 0,
                    g.block_k_given = bk->count() > 0;
                    return run_generate(g);
                  }});

  static BenchDitArgs b;
  auto* bench = app.add_subcommand(
      "bench-dit", "time one DiT denoising step (random weights) with dense, sparse and SALAD attention in one run");
  bench->add_option("--config", b.config, "wan2.1-1.3b | wan2.1-14b | tiny")->capture_default_str();
  bench->add_option("--frames", b.frames, "video frames (4n + 1)")->capture_default_str();
  bench->add_option("--height", b.height, "pixels (multiple of 16)")->capture_default_str();
  bench->add_option("--width", b.width, "pixels (multiple of 16)")->capture_default_str();
  bench->add_option("--device", b.device, "cpu | cuda")->capture_default_str();
  bench->add_option("--dtype", b.dtype, "compute dtype (default: bfloat16 on cuda, float32 on cpu)");
  bench->add_option("--keep", b.keep, "fraction of key blocks kept")->capture_default_str();
  bench->add_option("--block-q", b.block_q, "query block size")->capture_default_str();
  bench->add_option("--block-k", b.block_k, "key block size")->capture_default_str();
  bench->add_option("--modes", b.modes, "comma list of dense,sparse,salad; the first is the baseline")
      ->capture_default_str();
  bench->add_option("--impl", b.impl, "auto | reference | fast")->capture_default_str();
  bench->add_option("--fused", b.fused,
                    "on | off | both: the fused norm/residual kernels and inference glue (salad::fused); both: an "
                    "eager and a fused row per mode")
      ->capture_default_str();
  bench->add_option("--iters", b.iters, "timed iterations (median)")->capture_default_str()->check(CLI::PositiveNumber);
  bench->add_option("--warmup", b.warmup, "untimed iterations first")->capture_default_str();
  bench->add_option("--layers", b.layers, "build only N blocks; the rest are timed as one block alone x count (0: all)")
      ->capture_default_str();
  bench->add_option("--text-len", b.text_len, "text tokens (default: the config's, 16 when it has none)");
  bench->add_option("--timestep", b.timestep, "timestep fed to the model")->capture_default_str();
  bench->add_option("--seed", b.seed, "weight seed")->capture_default_str();
  bench->add_option("--threads", b.threads, "CPU threads (0: LibTorch's default; 1 is steadier on a busy machine)")
      ->capture_default_str();
  cmds.push_back({bench, [] { return run_bench_dit(b); }});
}
}  // namespace salad::cli
