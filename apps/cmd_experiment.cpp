// `salad eval` (one row of the reproduction table) and `salad demo` (the
// README's main job: dense vs sparse vs SALAD on the shipped world model,
// an HTML report with GIFs, metrics, speed, block maps and loss curves).
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "salad/eval.h"
#include "salad/lora.h"
#include "salad/media.h"
#include "salad/sampler.h"
#include "salad/train.h"
#include "salad/wan.h"
#include "salad/world.h"

namespace salad::cli {
namespace {

namespace fs = std::filesystem;

at::Device parse_device(const std::string& d) {
  if (d != "cpu" && d != "cuda") throw ArgumentError("--device: expected cpu | cuda, got '" + d + "'");
  if (d == "cuda" && !torch::cuda::is_available()) throw ArgumentError("--device: cuda requested but no CUDA device is visible");
  return d == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
}

// Loads the base (and the adapter, whose attention options apply), then sets
// every layer to `mode` at `keep` (keep <= 0: leave the adapter's).
WanModel load_for_eval(const std::string& base, const std::string& adapter, Mode mode, double keep,
                       const at::Device& dev, const std::vector<int64_t>& skip_layers = {}) {
  const WanAttentionPlan plan =
      adapter.empty() ? WanAttentionPlan::uniform(mode) : read_adapter_options(adapter).plan();  // the adapter's gate layout
  WanModel m = load_wan_model(base, plan);  // text_len from the checkpoint
  if (!adapter.empty()) load_adapter(m, adapter);
  for (int64_t i = 0; i < m->config().num_layers; ++i) {
    LayerConfig& c = m->block(i)->self_attn->config();
    c.attn.mode = mode;
    if (keep > 0) c.attn.keep = keep;
    c.skip_linear = std::find(skip_layers.begin(), skip_layers.end(), i) != skip_layers.end();
  }
  m->to(dev);
  m->eval();
  return m;
}

struct Row {
  std::string label, mode;
  double keep = 0, sparsity = 0, heldout_loss = 0, sec_per_video = 0;
  eval::VideoMetrics metrics;
  std::vector<at::Tensor> videos;  // (3, F, H, W) on the CPU
  std::string to_json() const {
    std::ostringstream s;
    s << "{\"label\": \"" << label << "\", \"mode\": \"" << mode << "\", \"keep\": " << keep
      << ", \"sparsity\": " << sparsity << ", \"heldout_loss\": " << heldout_loss
      << ", \"sec_per_video\": " << sec_per_video << ", \"metrics\": " << metrics.to_json() << "}";
    return s.str();
  }
};

// Held-out loss on `heldout`, then one video per prompt sample (seeded noise),
// scored against its prompt; the wall time per video.
Row evaluate_model(WanModel& m, const FlowDataset& heldout, int64_t loss_samples,
                   const std::vector<world::Sample>& prompts, const SamplerConfig& sc, uint64_t seed,
                   const at::Device& dev) {
  torch::NoGradGuard ng;
  Row r;
  const Mode mode = m->block(0)->self_attn->config().attn.mode;
  r.mode = to_string(mode);
  r.keep = mode == Mode::Dense ? 1.0 : m->block(0)->self_attn->config().attn.keep;
  r.heldout_loss = flow_matching_loss(m, heldout, loss_samples, 4);
  if (mode != Mode::Dense) {
    const auto& last = m->block(0)->self_attn->last_attention();
    const Params p = [&] {
      Params q;
      q.L = last.o_s.size(2), q.opt = m->block(0)->self_attn->config().attn;
      return q;
    }();
    r.sparsity = 1.0 - last.block_cnt.to(at::kDouble).mean().item<double>() / static_cast<double>(p.blocks().n_k);
  }
  std::vector<eval::VideoMetrics> ms;
  double secs = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const world::Sample& s = prompts[i];
    const auto shape = s.latents.sizes().vec();
    const at::Tensor noise = seeded_noise({1, shape[0], shape[1], shape[2], shape[3]}, seed + i, dev);
    if (dev.is_cuda()) torch::cuda::synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor v = sample_flow(wan_velocity(m, s.context.unsqueeze(0).to(dev)), noise, sc);
    if (dev.is_cuda()) torch::cuda::synchronize();
    secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const at::Tensor video = v[0].to(at::kFloat).cpu().clamp(-1, 1);
    ms.push_back(eval::evaluate(video, s.scene, s.world));
    r.videos.push_back(video);
  }
  r.metrics = eval::mean(ms);
  r.sec_per_video = prompts.empty() ? 0 : secs / static_cast<double>(prompts.size());
  return r;
}

std::vector<world::Sample> load_prompts(const std::string& dir, int64_t n) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::vector<world::Sample> out;
  for (int64_t i = 0; i < n && i < static_cast<int64_t>(files.size()); ++i) out.push_back(world::read_sample(files[i]));
  if (out.empty()) throw ArgumentError("--data: expected world samples in '" + dir + "', found none");
  return out;
}

// Kept-block map of one head: n_q rows x n_k columns, white = kept.
media::Image block_map(const AttentionOutput& a, int64_t head, int64_t scale) {
  const at::Tensor idx = a.block_idx[0][head].cpu(), cnt = a.block_cnt[0][head].cpu();
  const int64_t n_q = idx.size(0), n_k = a.block_idx.size(3) > 0 ? idx.size(1) : 0;
  int64_t width = 0;
  for (int64_t i = 0; i < n_q; ++i)
    for (int32_t c = 0; c < cnt[i].item<int32_t>(); ++c) width = std::max<int64_t>(width, idx[i][c].item<int32_t>() + 1);
  width = std::max(width, n_k);
  media::Image img(width * scale, n_q * scale, 20, 20, 28);
  for (int64_t i = 0; i < n_q; ++i)
    for (int32_t c = 0; c < cnt[i].item<int32_t>(); ++c) {
      const int64_t j = idx[i][c].item<int32_t>();
      for (int64_t y = 0; y < scale; ++y)
        for (int64_t x = 0; x < scale; ++x) {
          uint8_t* px = img.at(j * scale + x, i * scale + y);
          px[0] = 240, px[1] = 240, px[2] = 240;
        }
    }
  return img;
}

// Loss curve from a metrics.jsonl as a small PNG (log-scaled y).
media::Image loss_curve(const fs::path& jsonl, int64_t w = 480, int64_t h = 200) {
  std::vector<double> loss;
  std::ifstream in(jsonl);
  for (std::string line; std::getline(in, line);) {
    const auto p = line.find("\"loss\":");
    if (p != std::string::npos) loss.push_back(std::stod(line.substr(p + 7)));
  }
  media::Image img(w, h, 250, 250, 250);
  if (loss.size() < 2) return img;
  double lo = 1e30, hi = -1e30;
  for (double l : loss) lo = std::min(lo, std::log(l)), hi = std::max(hi, std::log(l));
  if (hi - lo < 1e-9) hi = lo + 1;
  auto ypix = [&](double l) { return static_cast<int64_t>((1.0 - (std::log(l) - lo) / (hi - lo)) * (h - 12)) + 6; };
  auto xpix = [&](size_t i) {
    return static_cast<int64_t>(static_cast<double>(i) / static_cast<double>(loss.size() - 1) * (w - 1));
  };
  for (size_t i = 0; i < loss.size(); ++i) {  // every step, light
    uint8_t* px = img.at(xpix(i), std::clamp<int64_t>(ypix(loss[i]), 0, h - 1));
    px[0] = 170, px[1] = 190, px[2] = 235;
  }
  double ema = loss[0];  // exponential moving average (0.05), dark, connected
  int64_t prev_y = ypix(ema);
  for (size_t i = 1; i < loss.size(); ++i) {
    ema = 0.95 * ema + 0.05 * loss[i];
    const int64_t y = ypix(ema);
    for (int64_t yy = std::min(prev_y, y); yy <= std::max(prev_y, y); ++yy)
      for (int64_t d = 0; d <= 1; ++d) {
        uint8_t* px = img.at(xpix(i), std::clamp<int64_t>(yy + d, 0, h - 1));
        px[0] = 20, px[1] = 50, px[2] = 160;
      }
    prev_y = y;
  }
  media::draw_text(img, 4, 4, "LOSS (LOG), " + std::to_string(loss.size()) + " STEPS", 1, {40, 40, 40});
  return img;
}

std::string fmt(double v, int prec = 4) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(prec);
  s << v;
  return s.str();
}

}  // namespace

void add_experiment_commands(CLI::App& app, Commands& cmds) {
  // salad eval ---------------------------------------------------------------
  struct EvalArgs {
    std::string model, adapter, data, device = "cpu", out, label, mode = "salad", gif_dir, skip;
    double keep = 0, drop_linear = 0;
    int64_t videos = 8, loss_samples = 64, steps = 20;
    uint64_t seed = 1000;
  };
  static EvalArgs e;
  auto* ev = app.add_subcommand("eval", "held-out loss, the four world metrics and time per video of one model");
  ev->add_option("--model", e.model, "base checkpoint")->required();
  ev->add_option("--adapter", e.adapter, "SALAD adapter (its attention options apply)");
  ev->add_option("--data", e.data, "held-out world samples (salad world)")->required();
  ev->add_option("--mode", e.mode, "dense | sparse | salad")->capture_default_str();
  ev->add_option("--keep", e.keep, "Top-K keep fraction (0: the adapter's or 0.1)");
  ev->add_option("--skip-linear", e.skip, "comma list of layers whose linear branch is dropped");
  ev->add_option("--drop-linear", e.drop_linear,
                 "drop the linear branch of this fraction of layers, those with the smallest mean |s(x)| on held-out data");
  ev->add_option("--videos", e.videos, "videos generated and scored")->capture_default_str();
  ev->add_option("--loss-samples", e.loss_samples, "held-out samples for the loss")->capture_default_str();
  ev->add_option("--steps", e.steps, "sampling steps (UniPC)")->capture_default_str();
  ev->add_option("--seed", e.seed, "noise seed of the first video")->capture_default_str();
  ev->add_option("--device", e.device, "cpu | cuda")->capture_default_str();
  ev->add_option("--label", e.label, "row label");
  ev->add_option("--out", e.out, "append the row as a JSON line to this file");
  ev->add_option("--gif-dir", e.gif_dir, "write each generated video as a GIF here");
  cmds.push_back({ev, [] {
                    const at::Device dev = parse_device(e.device);
                    std::vector<int64_t> skip;
                    std::stringstream ss(e.skip);
                    for (std::string t; std::getline(ss, t, ',');)
                      if (!t.empty()) skip.push_back(std::stoll(t));
                    const Mode mode = parse_mode(e.mode);
                    const double keep = e.keep > 0 ? e.keep : (e.adapter.empty() ? 0.1 : 0.0);
                    WanModel m = load_for_eval(e.model, e.adapter, mode, keep, dev, skip);
                    const FlowDataset held(e.data);
                    std::string dropped;
                    if (e.drop_linear > 0) {
                      flow_matching_loss(m, held, 8, 1);  // one pass records every layer's s(x)
                      std::vector<std::pair<double, int64_t>> by_scale;
                      for (int64_t i = 0; i < m->config().num_layers; ++i)
                        by_scale.push_back({m->block(i)->self_attn->last_scale().abs().mean().item<double>(), i});
                      std::sort(by_scale.begin(), by_scale.end());
                      const auto n = static_cast<size_t>(std::llround(e.drop_linear * static_cast<double>(by_scale.size())));
                      for (size_t j = 0; j < n && j < by_scale.size(); ++j) {
                        m->block(by_scale[j].second)->self_attn->config().skip_linear = true;
                        dropped += (dropped.empty() ? "" : ",") + std::to_string(by_scale[j].second);
                      }
                      std::fprintf(stderr, "eval: dropped the linear branch of layers %s\n", dropped.c_str());
                    }
                    SamplerConfig sc;
                    sc.steps = e.steps;
                    Row r = evaluate_model(m, held, e.loss_samples, load_prompts(e.data, e.videos), sc, e.seed, dev);
                    r.label = e.label.empty() ? r.mode : e.label;
                    std::printf("%s\n", r.to_json().c_str());
                    if (!e.out.empty()) {
                      std::ofstream o(e.out, std::ios::app);
                      o << r.to_json() << "\n";
                    }
                    if (!e.gif_dir.empty()) {
                      fs::create_directories(e.gif_dir);
                      for (size_t i = 0; i < r.videos.size(); ++i)
                        media::write_video_gif(fs::path(e.gif_dir) / (r.label + "_" + std::to_string(i) + ".gif"),
                                               media::cfhw_to_fchw(r.videos[i]), 4);
                    }
                    return 0;
                  }});

  // salad demo ---------------------------------------------------------------
  struct DemoArgs {
    std::string assets = "assets", out = "salad-demo", device = "cpu";
    std::string world = "cpu";  // the world preset the shipped checkpoints were trained on
    int64_t prompts = 3, steps = 12;
    uint64_t seed = 7;
  };
  static DemoArgs d;
  auto* demo = app.add_subcommand("demo", "dense vs sparse vs SALAD on the shipped world model: an HTML report");
  demo->add_option("--assets", d.assets, "directory with base.safetensors, adapter.safetensors, tuning.jsonl")
      ->capture_default_str();
  demo->add_option("--out", d.out, "report directory")->capture_default_str();
  demo->add_option("--prompts", d.prompts, "prompts (held-out world samples) to generate")->capture_default_str();
  demo->add_option("--steps", d.steps, "sampling steps (UniPC)")->capture_default_str();
  demo->add_option("--seed", d.seed, "seed of the prompts and the noise")->capture_default_str();
  demo->add_option("--device", d.device, "cpu | cuda")->capture_default_str();
  demo->add_option("--world", d.world, "world preset of the prompts: the one the assets were trained on (cpu | gpu | v2 | v1)")
      ->capture_default_str();
  cmds.push_back({demo, [] {
                    const at::Device dev = parse_device(d.device);
                    const fs::path assets(d.assets), out(d.out);
                    for (const char* f : {"base.safetensors", "adapter.safetensors"})
                      if (!fs::exists(assets / f))
                        throw ArgumentError("--assets: expected " + (assets / f).string() + " (the shipped checkpoints)");
                    fs::create_directories(out);
                    // Held-out prompts: a world dataset seed the training never used.
                    const world::WorldConfig wc = world::WorldConfig::preset(d.world);
                    world::TextConfig tc;
                    const fs::path held = out / "heldout";
                    world::write_dataset(held, wc, tc, std::max<int64_t>(d.prompts, 8), 900000 + d.seed);
                    const FlowDataset held_data(held);
                    const auto prompts = load_prompts(held.string(), d.prompts);
                    SamplerConfig sc;
                    sc.steps = d.steps;
                    struct Variant {
                      const char* label;
                      Mode mode;
                      bool adapter;
                    };
                    const Variant variants[] = {{"dense", Mode::Dense, false},
                                                {"sparse (no tuning)", Mode::Sparse, false},
                                                {"SALAD", Mode::Salad, true}};
                    std::vector<Row> rows;
                    std::vector<AttentionOutput> maps;
                    for (const Variant& v : variants) {
                      std::fprintf(stderr, "demo: %s ...\n", v.label);
                      WanModel m = load_for_eval((assets / "base.safetensors").string(),
                                                 v.adapter ? (assets / "adapter.safetensors").string() : "", v.mode,
                                                 v.adapter ? 0.0 : 0.1, dev);
                      Row r = evaluate_model(m, held_data, 8, prompts, sc, d.seed, dev);
                      r.label = v.label;
                      if (v.mode == Mode::Salad) maps.push_back(m->block(0)->self_attn->last_attention());
                      rows.push_back(std::move(r));
                    }
                    // Pictures.
                    for (size_t i = 0; i < prompts.size(); ++i) {
                      std::vector<at::Tensor> vids = {media::cfhw_to_fchw(prompts[i].latents)};
                      std::vector<std::string> labels = {"REAL"};
                      for (const Row& r : rows)
                        vids.push_back(media::cfhw_to_fchw(r.videos[i])), labels.push_back(r.mode);  // short: fits the panel
                      media::write_side_by_side_gif(out / ("prompt_" + std::to_string(i) + ".gif"), vids, labels, 4);
                    }
                    if (!maps.empty())
                      for (int64_t h = 0; h < maps[0].block_idx.size(1); ++h)
                        media::write_png(out / ("blocks_head" + std::to_string(h) + ".png"), block_map(maps[0], h, 6));
                    const bool have_log = fs::exists(assets / "tuning.jsonl");
                    if (have_log) media::write_png(out / "tuning_loss.png", loss_curve(assets / "tuning.jsonl"));
                    // Report.
                    std::ofstream html(out / "index.html");
                    html << "<!doctype html><html><head><meta charset='utf-8'><title>salad demo</title>"
                            "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}td,th{padding:4px 10px;"
                            "border-bottom:1px solid #ddd;text-align:right}th:first-child,td:first-child{text-align:left}"
                            "img{image-rendering:pixelated;margin:4px}</style></head><body>\n"
                         << "<h1>SALAD on the shapes world</h1><p>Device: " << d.device << ", " << d.steps
                         << " UniPC steps, " << prompts.size() << " held-out prompts, world " << wc.frames << "x"
                         << wc.height << "x" << wc.width << ".</p>\n<table><tr><th>variant</th><th>sparsity</th>"
                         << "<th>held-out loss</th><th>subject</th><th>background</th><th>imaging</th><th>text</th>"
                         << "<th>sum</th><th>s / video</th><th>speed-up vs dense</th></tr>\n";
                    for (const Row& r : rows)
                      html << "<tr><td>" << r.label << "</td><td>" << fmt(100 * r.sparsity, 1) << "%</td><td>"
                           << fmt(r.heldout_loss) << "</td><td>" << fmt(r.metrics.subject_consistency, 3) << "</td><td>"
                           << fmt(r.metrics.background_consistency, 3) << "</td><td>"
                           << fmt(r.metrics.imaging_quality, 3) << "</td><td>" << fmt(r.metrics.text_consistency, 3)
                           << "</td><td>" << fmt(r.metrics.sum(), 3) << "</td><td>" << fmt(r.sec_per_video, 3)
                           << "</td><td>" << fmt(rows[0].sec_per_video / r.sec_per_video, 2) << "x</td></tr>\n";
                    html << "</table>\n<h2>Videos (real | dense | sparse | SALAD)</h2>\n";
                    for (size_t i = 0; i < prompts.size(); ++i)
                      html << "<p>" << prompts[i].prompt << "<br><img src='prompt_" << i << ".gif'></p>\n";
                    html << "<h2>Selected key blocks (layer 0, SALAD; rows: query blocks, white: kept)</h2><p>";
                    if (!maps.empty())
                      for (int64_t h = 0; h < maps[0].block_idx.size(1); ++h) html << "<img src='blocks_head" << h << ".png'>";
                    html << "</p>\n";
                    if (have_log) html << "<h2>Tuning loss</h2><img src='tuning_loss.png'>\n";
                    html << "</body></html>\n";
                    html.close();
                    for (const Row& r : rows) std::printf("%s\n", r.to_json().c_str());
                    std::printf("report: %s\n", fs::absolute(out / "index.html").string().c_str());
                    return 0;
                  }});
}

}  // namespace salad::cli
