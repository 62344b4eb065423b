// The `salad` command line: `salad <subcommand> --help` for each.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>

#ifdef SALAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include "commands.h"
#include "timing.h"
#include "salad/kernels.h"
#include "salad/salad.h"

using namespace salad;
using salad::cli::median;
using salad::cli::median_ms;
using salad::cli::ms_since;
using salad::cli::sync_device;

namespace {

std::vector<int64_t> parse_ints(const std::string& s, size_t n, const char* what) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      v.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw ArgumentError(std::string(what) + ": expected " + std::to_string(n) + " comma-separated integers, got '" + s + "'");
    }
  }
  if (v.size() != n)
    throw ArgumentError(std::string(what) + ": expected " + std::to_string(n) + " comma-separated integers, got '" + s + "'");
  return v;
}

// Named benchmark shapes of ../shared/SALAD.md (token grids of Wan 2.1 at 81 frames).
struct Shape {
  int64_t heads, dim;
  Grid grid;
};
const std::map<std::string, Shape>& named_shapes() {
  static const std::map<std::string, Shape> m = {
      {"wan1.3b-480p", {12, 128, {21, 30, 52}}},
      {"wan14b-480p", {40, 128, {21, 30, 52}}},
      {"wan14b-720p", {40, 128, {21, 45, 80}}},
      {"cpu-small", {2, 64, {8, 32, 32}}},
  };
  return m;
}

// Options shared by the subcommands that build an attention call.
struct AttnArgs {
  std::string grid = "8,32,32", tile, window = "1,1,1", mode = "salad", pattern = "topk", feature = "relu";
  int64_t block_q = 128, block_k = 64;
  double keep = 0.10;
  bool no_linear_rope = false;

  void add(CLI::App* app) {
    app->add_option("--grid", grid, "token grid F,H,W (L = F*H*W)")->capture_default_str();
    app->add_option("--mode", mode, "dense | sparse | salad")->capture_default_str();
    app->add_option("--pattern", pattern, "topk | window")->capture_default_str();
    app->add_option("--keep", keep, "fraction of key blocks kept (topk)")->capture_default_str();
    app->add_option("--block-q", block_q, "query block size in tokens")->capture_default_str();
    app->add_option("--block-k", block_k, "key block size in tokens")->capture_default_str();
    app->add_option("--tile", tile, "token order of 3-D tiles ft,ht,wt (default: raster)");
    app->add_option("--window", window, "window radius wf,wh,ww in tiles (pattern window)")->capture_default_str();
    app->add_option("--feature", feature, "linear feature map: relu | elu1 | softmax")->capture_default_str();
    app->add_flag("--no-linear-rope", no_linear_rope, "drop the RoPE in the linear branch");
  }
  Grid to_grid() const {
    auto v = parse_ints(grid, 3, "--grid");
    return {v[0], v[1], v[2]};
  }
  Options to_options() const {
    Options o;
    o.mode = parse_mode(mode);
    o.pattern = parse_pattern(pattern);
    o.keep = keep, o.block_q = block_q, o.block_k = block_k;
    if (!tile.empty()) {
      auto t = parse_ints(tile, 3, "--tile");
      o.tile_order = true, o.tile = {t[0], t[1], t[2]};
    }
    auto w = parse_ints(window, 3, "--window");
    o.window = {w[0], w[1], w[2]};
    o.feature = parse_feature(feature);
    o.linear_rope = !no_linear_rope;
    return o;
  }
};

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "float32") return at::kFloat;
  if (s == "float64") return at::kDouble;
  if (s == "bfloat16") return at::kBFloat16;
  if (s == "float16") return at::kHalf;
  throw ArgumentError("--dtype: expected float32 | float64 | bfloat16 | float16, got '" + s + "'");
}

const char* sdpa_backend_name(int64_t b) {
  switch (b) {
    case 0: return "math";
    case 1: return "flash";
    case 2: return "efficient";
    case 3: return "cudnn";
    default: return "other";
  }
}

// Attended (query, key) token pairs of a block table, partial blocks counted exactly, summed over
// the leading dims: idx (..., n_q, max_k), cnt (..., n_q).
double kept_pairs(const at::Tensor& idx_any, const at::Tensor& cnt_any, int64_t L, const Options& o) {
  const at::Tensor cnt = cnt_any.cpu().contiguous().view({-1, cnt_any.size(-1)});
  const at::Tensor idx = idx_any.cpu().contiguous().view({cnt.size(0), cnt.size(1), -1});
  auto ia = idx.accessor<int32_t, 3>();
  auto ca = cnt.accessor<int32_t, 2>();
  double pairs = 0;
  for (int64_t h = 0; h < cnt.size(0); ++h)
    for (int64_t i = 0; i < cnt.size(1); ++i) {
      const int64_t rows = std::min(L, (i + 1) * o.block_q) - i * o.block_q;
      for (int32_t c = 0; c < ca[h][i]; ++c) {
        const int64_t j = ia[h][i][c];
        pairs += static_cast<double>(rows) * static_cast<double>(std::min(L, (j + 1) * o.block_k) - j * o.block_k);
      }
    }
  return pairs;
}

int bench_attn(const AttnArgs& a, const std::string& shape, int64_t batch, int64_t heads, int64_t dim,
               const std::string& device, const std::string& dtype_s, int iters, int warmup, bool backward,
               const std::string& variants_s, int queued, const std::string& bwd_grad, const std::string& order) {
  Grid grid = a.to_grid();
  if (!shape.empty()) {
    auto it = named_shapes().find(shape);
    if (it == named_shapes().end()) {
      std::string names;
      for (auto& kv : named_shapes()) names += (names.empty() ? "" : " | ") + kv.first;
      throw ArgumentError("--shape: expected one of " + names + ", got '" + shape + "'");
    }
    heads = it->second.heads, dim = it->second.dim, grid = it->second.grid;
  }
  if (device != "cpu" && device != "cuda") throw ArgumentError("--device: expected cpu | cuda, got '" + device + "'");
  if (bwd_grad != "output" && bwd_grad != "loss")
    throw ArgumentError("--bwd-grad: expected output | loss, got '" + bwd_grad + "'");
  if (order != "interleaved" && order != "blocked")
    throw ArgumentError("--order: expected interleaved | blocked, got '" + order + "'");
  if (device == "cuda" && !torch::cuda::is_available())
    throw ArgumentError("--device: cuda requested but no CUDA device is visible");
  const at::Device dev(device == "cuda" ? at::kCUDA : at::kCPU);
  const at::ScalarType dt = dtype_s.empty() ? (dev.is_cuda() ? at::kBFloat16 : at::kFloat) : parse_dtype(dtype_s);
  Options opt = a.to_options();
  const int64_t L = grid.size();
  torch::manual_seed(0);
  auto topt = at::TensorOptions().dtype(dt).device(dev);
  at::Tensor q = at::randn({batch, heads, L, dim}, topt), k = at::randn({batch, heads, L, dim}, topt),
             v = at::randn({batch, heads, L, dim}, topt);
  if (backward) q.requires_grad_(), k.requires_grad_(), v.requires_grad_();
  const at::Tensor go = at::randn({batch, heads, L, dim}, topt);

  std::vector<std::string> variants;
  {
    std::stringstream ss(variants_s);
    std::string v_;
    while (std::getline(ss, v_, ',')) variants.push_back(v_);
  }
  std::printf("bench-attn: device %s, dtype %s, B %lld, H %lld, L %lld (grid %lldx%lldx%lld), D %lld, keep %.3f, "
              "blocks %lld/%lld, threads %d, %d iters (median)\n",
              device.c_str(), c10::toString(dt), (long long)batch, (long long)heads, (long long)L, (long long)grid.f,
              (long long)grid.h, (long long)grid.w, (long long)dim, opt.keep, (long long)opt.block_q,
              (long long)opt.block_k, at::get_num_threads(), iters);
#ifdef SALAD_WITH_CUDA
  if (dev.is_cuda()) {  // the UUID's first bytes tell cards of one model apart (their speeds differ: docs/PERF.md)
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    std::printf("card: %s (uuid %02x%02x%02x%02x, %d SMs)\n", prop->name, prop->uuid.bytes[0] & 0xff,
                prop->uuid.bytes[1] & 0xff, prop->uuid.bytes[2] & 0xff, prop->uuid.bytes[3] & 0xff,
                prop->multiProcessorCount);
  }
#endif

  if (backward)
    std::printf("backward: %s\n", bwd_grad == "loss" ? "of the loss sum(o * dO) over the outputs"
                                                      : "autograd from a given dO for every output");
  std::printf("order: %s\n", order == "blocked" ? "blocked (each variant's iterations back to back)"
                                                : "interleaved (the variants take turns within each iteration)");
  struct Row {
    std::string name;
    double fwd = 0, fb = 0;
    double sparsity = 0;
    double pairs = 0;  // attended (query, key) pairs, all batches and heads
    double q_fwd = 0, q_fb = 0, h_fwd = 0, h_fb = 0;  // --queued: per call, calls back to back; host enqueue
  };
  std::vector<Row> rows;
  std::vector<std::function<std::vector<at::Tensor>()>> fwds;
  for (const std::string& name : variants) {
    Row r{name};
    r.pairs = static_cast<double>(batch * heads) * static_cast<double>(L) * static_cast<double>(L);
    if (name == "sdpa") {
      const int64_t choice = dev.is_cuda() ? at::_fused_sdp_choice(q, k, v) : 0;
      r.name = std::string("sdpa(") + (dev.is_cuda() ? sdpa_backend_name(choice) : "cpu") + ")";
      fwds.push_back([&] { return std::vector<at::Tensor>{at::scaled_dot_product_attention(q, k, v)}; });
    } else {
      Options o = opt;
      o.mode = parse_mode(name);
      if (o.mode != Mode::Dense) {
        at::NoGradGuard ng;
        const AttentionOutput out = attention(q.detach(), k.detach(), v.detach(), grid, o);
        const BlockShape bs = [&] { Params p; p.L = L; p.opt = o; return p.blocks(); }();
        r.sparsity = 1.0 - out.block_cnt.to(at::kDouble).mean().item<double>() / static_cast<double>(bs.n_k);
        r.pairs = kept_pairs(out.block_idx, out.block_cnt, L, o);
      }
      fwds.push_back([&, o] {
        AttentionOutput out = attention(q, k, v, grid, o);
        return o.mode == Mode::Salad ? std::vector<at::Tensor>{out.o_s, out.o_l} : std::vector<at::Tensor>{out.o_s};
      });
    }
    rows.push_back(r);
  }
  // interleaved: the variants take turns within each iteration, so a busy machine slows all of them
  // alike (and each runs right after the others, in the power and clock state they leave). blocked:
  // each variant's warm-up and iterations back to back, as FlashAttention-style benchmarks time one
  // function at a time.
  const bool blocked = order == "blocked";
  auto for_each_call = [&](int n, const std::function<void(size_t)>& body) {
    if (blocked) {
      for (size_t i = 0; i < rows.size(); ++i)
        for (int it = 0; it < n; ++it) body(i);
    } else {
      for (int it = 0; it < n; ++it)
        for (size_t i = 0; i < rows.size(); ++i) body(i);
    }
  };
  auto time_all = [&](const std::function<void(size_t)>& fn, double Row::*field) {
    std::vector<std::vector<double>> t(rows.size());
    if (blocked) {
      for (size_t i = 0; i < rows.size(); ++i) {
        for (int w = 0; w < warmup; ++w) fn(i);
        for (int it = 0; it < iters; ++it) t[i].push_back(median_ms([&] { fn(i); }, dev, 0, 1));
      }
    } else {
      for (int w = 0; w < warmup; ++w)
        for (size_t i = 0; i < rows.size(); ++i) fn(i);
      for_each_call(iters, [&](size_t i) { t[i].push_back(median_ms([&] { fn(i); }, dev, 0, 1)); });
    }
    for (size_t i = 0; i < rows.size(); ++i) {
      std::sort(t[i].begin(), t[i].end());
      rows[i].*field = t[i][t[i].size() / 2];
    }
    if (queued <= 0) return;
    // The same calls `queued` at a time with one synchronisation: the device's time per call
    // when the host runs ahead (as in a model), and the host's time to enqueue one call.
    const bool fwd_field = field == &Row::fwd;
    std::vector<std::vector<double>> tq(rows.size()), th(rows.size());
    for_each_call(iters, [&](size_t i) {
      sync_device(dev);
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < queued; ++r) fn(i);
      th[i].push_back(ms_since(t0) / queued);
      sync_device(dev);
      tq[i].push_back(ms_since(t0) / queued);
    });
    for (size_t i = 0; i < rows.size(); ++i) {
      (fwd_field ? rows[i].q_fwd : rows[i].q_fb) = median(tq[i]);
      (fwd_field ? rows[i].h_fwd : rows[i].h_fb) = median(th[i]);
    }
  };
  {
    at::NoGradGuard ng;
    time_all([&](size_t i) { fwds[i](); }, &Row::fwd);
  }
  if (backward)
    time_all(
        [&](size_t i) {
          auto outs = fwds[i]();
          if (bwd_grad == "loss") {
            at::Tensor l = (outs[0] * go).sum();
            if (outs.size() > 1) l = l + (outs[1] * go).sum();
            l.backward();
          } else {  // dO given for every output, as FlashAttention's benchmarks call o.backward(dO)
            torch::autograd::backward(outs, std::vector<at::Tensor>(outs.size(), go));
          }
          q.mutable_grad().reset(), k.mutable_grad().reset(), v.mutable_grad().reset();
        },
        &Row::fb);
  const double base_f = rows.empty() ? 1 : rows[0].fwd, base_b = rows.empty() ? 1 : rows[0].fb - rows[0].fwd;
  std::printf("\n%-16s %9s %9s %12s", "variant", "sparsity", "fwd ms", "fwd speed-up");
  if (backward) std::printf(" %9s %12s", "bwd ms", "bwd speed-up");
  std::printf(" %11s", "fwd TFLOP/s");
  if (backward) std::printf(" %11s", "bwd TFLOP/s");
  std::printf("   (speed-up vs %s, same run)\n", rows.empty() ? "-" : rows[0].name.c_str());
  // Attention FLOPs of the attended pairs as FlashAttention counts them: 4 D per pair forward (two
  // GEMMs), 2.5x that backward; the linear branch is not counted.
  const double fpp = 4.0 * static_cast<double>(dim);
  for (const Row& r : rows) {
    std::printf("%-16s %8.1f%% %9.3f %11.2fx", r.name.c_str(), 100 * r.sparsity, r.fwd, base_f / r.fwd);
    if (backward) std::printf(" %9.3f %11.2fx", r.fb - r.fwd, base_b / (r.fb - r.fwd));
    std::printf(" %11.4g", fpp * r.pairs / (r.fwd * 1e9));
    if (backward) std::printf(" %11.4g", 2.5 * fpp * r.pairs / ((r.fb - r.fwd) * 1e9));
    std::printf("\n");
  }
  std::printf("(TFLOP/s: attention FLOPs of the attended token pairs, 4 D each forward and 10 D backward; the "
              "linear branch is not counted)\n");
  if (queued > 0) {
    const double qf = rows.empty() ? 1 : rows[0].q_fwd, qb = rows.empty() ? 1 : rows[0].q_fb - rows[0].q_fwd;
    std::printf("\n%d calls queued per synchronisation (ms per call; host = time to enqueue one call)\n", queued);
    std::printf("%-16s %9s %12s %9s", "variant", "fwd ms", "fwd speed-up", "host ms");
    if (backward) std::printf(" %9s %12s %9s", "bwd ms", "bwd speed-up", "host ms");
    std::printf("\n");
    for (const Row& r : rows) {
      std::printf("%-16s %9.3f %11.2fx %9.3f", r.name.c_str(), r.q_fwd, qf / r.q_fwd, r.h_fwd);
      if (backward)
        std::printf(" %9.3f %11.2fx %9.3f", r.q_fb - r.q_fwd, qb / (r.q_fb - r.q_fwd), r.h_fb - r.h_fwd);
      std::printf("\n");
    }
  }
  return 0;
}

int select_cmd(const AttnArgs& a, int64_t heads, int64_t dim, uint64_t seed) {
  const Grid grid = a.to_grid();
  Options o = a.to_options();
  o.mode = Mode::Sparse;
  torch::manual_seed(seed);
  const at::Tensor q = at::randn({1, heads, grid.size(), dim}), k = at::randn({1, heads, grid.size(), dim});
  auto [idx, cnt] = select_blocks(q, k, grid, o);
  Params p;
  p.L = grid.size(), p.opt = o;
  const BlockShape bs = p.blocks();
  std::printf("grid %lldx%lldx%lld (L %lld), order %s, pattern %s, blocks %lld/%lld: %lld query blocks x %lld key blocks\n",
              (long long)grid.f, (long long)grid.h, (long long)grid.w, (long long)grid.size(),
              o.tile_order ? "tile" : "raster", to_string(o.pattern), (long long)o.block_q, (long long)o.block_k,
              (long long)bs.n_q, (long long)bs.n_k);
  // Token-level sparsity: attended (query, key) pairs over L^2, partial blocks counted exactly.
  double pairs = 0;
  for (int64_t h = 0; h < heads; ++h) {
    const double ph = kept_pairs(idx[0][h], cnt[0][h], p.L, o);
    std::printf("head %lld: mean kept blocks %.2f of %lld, block sparsity %.2f%%, token sparsity %.2f%%\n",
                (long long)h, cnt[0][h].to(at::kDouble).mean().item<double>(), (long long)bs.n_k,
                100.0 * (1.0 - cnt[0][h].to(at::kDouble).mean().item<double>() / static_cast<double>(bs.n_k)),
                100.0 * (1.0 - ph / (static_cast<double>(p.L) * static_cast<double>(p.L))));
    pairs += ph;
  }
  std::printf("sparsity: %.2f%% (token pairs, all heads); keep %.3f -> k = %lld\n",
              100.0 * (1.0 - pairs / (static_cast<double>(heads) * p.L * p.L)), o.keep, (long long)bs.max_k);
  return 0;
}

}  // namespace

namespace salad::cli {
void add_attention_commands(CLI::App& app, Commands& cmds) {
  auto* info = app.add_subcommand("info", "what this build has (CUDA kernels, LibTorch, threads)");
  cmds.push_back({info, [] {
                    std::printf("salad 0.1.0\nCUDA kernels compiled: %s\nCUDA device visible: %s\nLibTorch: %s\nCPU threads: %d\n",
                                cuda_kernels_compiled() ? "yes" : "no", torch::cuda::is_available() ? "yes" : "no",
                                TORCH_VERSION, at::get_num_threads());
                    return 0;
                  }});

  static AttnArgs bench_args;
  static std::string shape, device = "cpu", dtype, bwd_grad = "output", order = "interleaved";
  static int64_t batch = 1, heads = 2, dim = 64;
  static int iters = 10, warmup = 2, queued = 0;
  static bool backward = false;
  static std::string variants = "sdpa,dense,sparse,salad";
  auto* bench = app.add_subcommand("bench-attn", "time SDPA, dense, sparse and SALAD attention in one run");
  bench_args.add(bench);
  bench->add_option("--shape", shape, "named shape: wan1.3b-480p | wan14b-480p | wan14b-720p | cpu-small");
  bench->add_option("--batch", batch, "batch size")->capture_default_str();
  bench->add_option("--heads", heads, "heads")->capture_default_str();
  bench->add_option("--dim", dim, "head width D")->capture_default_str();
  bench->add_option("--device", device, "cpu | cuda")->capture_default_str();
  bench->add_option("--dtype", dtype, "float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on cuda)");
  bench->add_option("--iters", iters, "timed iterations (median)")->capture_default_str()->check(CLI::PositiveNumber);
  bench->add_option("--warmup", warmup, "untimed iterations first")->capture_default_str();
  bench->add_option("--queued", queued,
                    "also time N calls enqueued back to back per synchronisation (device time per call when the "
                    "host runs ahead, and the host's enqueue time); 0: off")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& v) {
            return !v.empty() && v.find_first_not_of("0123456789") == std::string::npos
                       ? std::string()
                       : "expected a count >= 0 (0: off), got '" + v + "'";
          },
          "N >= 0"));
  bench->add_flag("--backward", backward, "also time forward+backward (bwd ms = forward+backward - forward)");
  bench->add_option("--bwd-grad", bwd_grad,
                    "output: autograd backward from a given dO for every output (the attention's own backward); "
                    "loss: backward of sum(o * dO) over the outputs, which adds two elementwise passes per output")
      ->capture_default_str();
  bench->add_option("--order", order,
                    "interleaved: the variants take turns within each iteration; blocked: each variant's warm-up "
                    "and iterations back to back")
      ->capture_default_str();
  bench->add_option("--variants", variants, "comma list of sdpa,dense,sparse,salad; the first is the baseline")
      ->capture_default_str();
  cmds.push_back({bench, [] {
                    return bench_attn(bench_args, shape, batch, heads, dim, device, dtype, iters, warmup, backward,
                                      variants, queued, bwd_grad, order);
                  }});

  static AttnArgs sel_args;
  static int64_t sel_heads = 2, sel_dim = 64;
  static uint64_t seed = 0;
  auto* sel = app.add_subcommand("select", "block selection on random q/k: the sparsity actually achieved");
  sel_args.add(sel);
  sel->add_option("--heads", sel_heads, "heads")->capture_default_str();
  sel->add_option("--dim", sel_dim, "head width D")->capture_default_str();
  sel->add_option("--seed", seed, "random seed")->capture_default_str();
  cmds.push_back({sel, [] { return select_cmd(sel_args, sel_heads, sel_dim, seed); }});
}
}  // namespace salad::cli
