// `salad world` (write a shapes-world dataset) and `salad eval-video` (the
// four world metrics of one video file).
#include <torch/torch.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <string>

#include "commands.h"
#include "salad/eval.h"
#include "salad/layout.h"
#include "salad/media.h"
#include "salad/world.h"

using namespace salad;
namespace fs = std::filesystem;

namespace {

// World options shared by both commands; a flag that is not given keeps the
// preset's value, a given one replaces it (and is validated with the rest).
struct WorldArgs {
  std::string preset = "cpu";
  int64_t frames = 0, height = 0, width = 0, min_objects = 0, max_objects = 0, texture_cell = 0;
  double speed = 0, texture = 0;
  CLI::Option *o_frames = nullptr, *o_height = nullptr, *o_width = nullptr, *o_min = nullptr, *o_max = nullptr,
              *o_speed = nullptr, *o_texture = nullptr, *o_cell = nullptr;

  static bool given(const CLI::Option* o) { return o && o->count() > 0; }
  void add(CLI::App* app) {
    app->add_option("--preset", preset,
                    "world: cpu (24x32x32, speed 0.12, texture 0.35) | gpu (24x64x64, same) | v2 (16x32x32, speed "
                    "0.09, texture 0.25) | v1 (8x32x32, speed 0.06, no texture: the first world)")
        ->capture_default_str();
    o_frames = app->add_option("--frames", frames, "frames per video (default: the preset's)");
    o_height = app->add_option("--height", height, "frame height in pixels (default: the preset's)");
    o_width = app->add_option("--width", width, "frame width in pixels (default: the preset's)");
    o_min = app->add_option("--min-objects", min_objects, "fewest objects per video, 1..3 (default 1)");
    o_max = app->add_option("--max-objects", max_objects, "most objects per video, 1..3 (default 3)");
    o_speed = app->add_option("--speed", speed,
                              "pixels per frame as a fraction of min(height, width) (default: the preset's)");
    o_texture = app->add_option("--texture", texture,
                                "static background texture amplitude, 0..0.5 (offsets in {-t, 0, t}; 0: flat; "
                                "default: the preset's)");
    o_cell =
        app->add_option("--texture-cell", texture_cell, "texture cell side in pixels, >= 1 (default: the preset's)");
  }
  world::WorldConfig config() const {
    world::WorldConfig c = world::WorldConfig::preset(preset);
    if (given(o_frames)) c.frames = frames;
    if (given(o_height)) c.height = height;
    if (given(o_width)) c.width = width;
    if (given(o_min)) c.min_objects = min_objects;
    if (given(o_max)) c.max_objects = max_objects;
    if (given(o_speed)) c.speed = speed;
    if (given(o_texture)) c.texture = texture;
    if (given(o_cell)) c.texture_cell = texture_cell;
    c.validate();
    return c;
  }
};

int world_cmd(const WorldArgs& wa, const std::string& out, int64_t count, uint64_t seed, int64_t text_len,
              int64_t text_dim, int64_t preview, int64_t scale) {
  const world::WorldConfig cfg = wa.config();
  world::TextConfig text;
  text.text_len = text_len, text.text_dim = text_dim;
  text.validate();
  if (count < 0) throw ArgumentError("--count must be >= 0, got " + std::to_string(count));
  const bool tty = ::isatty(2);
  const auto rep = world::write_dataset(out, cfg, text, count, seed, [tty](int64_t done, int64_t total) {
    if (tty && (done == total || done % 16 == 0))
      std::fprintf(stderr, "\rworld: %lld / %lld", (long long)done, (long long)total);
  });
  if (tty && count > 0) std::fprintf(stderr, "\n");
  std::printf(
      "world: %lld samples of 3 x %lld x %lld x %lld (text %lld x %lld) in %s: %lld written, %lld kept, %lld "
      "replaced\n",
      (long long)count, (long long)cfg.frames, (long long)cfg.height, (long long)cfg.width, (long long)text.text_len,
      (long long)text.text_dim, out.c_str(), (long long)rep.written, (long long)rep.kept, (long long)rep.replaced);
  std::printf("world config: %s\n", cfg.to_json().c_str());
  std::printf("index: %s\n", rep.index.c_str());
  for (int64_t i = 0; i < std::min(preview, count); ++i) {
    const world::Sample s = world::read_sample(fs::path(out) / world::sample_file_name(i));
    const fs::path gif = fs::path(out) / "preview" / ("sample_" + std::to_string(i) + ".gif");
    media::write_video_gif(gif, media::cfhw_to_fchw(s.latents), scale);
    std::printf("preview: %s  \"%s\"\n", gif.c_str(), s.prompt.c_str());
  }
  return 0;
}

int eval_video_cmd(const WorldArgs& wa, const std::string& file, const std::string& tensor_name,
                   const std::string& prompt_opt, const std::string& gif, int64_t scale) {
  const world::VideoFile vf = world::read_video_file(file, tensor_name);
  const at::Tensor& video = vf.video;
  const std::vector<int64_t> shape(video.sizes().begin(), video.sizes().end());
  world::WorldConfig cfg = wa.config();
  const auto& meta = vf.metadata;
  if (auto it = meta.find("world"); it != meta.end()) {  // the file's world; explicit flags still win
    const world::WorldConfig flags = cfg;
    cfg = world::WorldConfig::from_json(it->second);
    if (WorldArgs::given(wa.o_speed)) cfg.speed = flags.speed;
    if (WorldArgs::given(wa.o_texture)) cfg.texture = flags.texture;
    if (WorldArgs::given(wa.o_cell)) cfg.texture_cell = flags.texture_cell;
  }
  cfg.frames = shape[1], cfg.height = shape[2], cfg.width = shape[3];
  cfg.validate();
  std::string prompt = prompt_opt;
  if (prompt.empty()) {
    auto it = meta.find("prompt");
    if (it == meta.end()) throw ArgumentError("eval-video: " + file + " has no 'prompt' metadata; pass --prompt");
    prompt = it->second;
  }
  const world::Scene scene = world::parse_prompt(prompt);
  const eval::Report rep = eval::analyse(video, scene, cfg);
  const auto& m = rep.metrics;
  std::printf("prompt: %s\n", prompt.c_str());
  std::printf(
      "subject_consistency     %.4f\nbackground_consistency  %.4f\nimaging_quality         %.4f\n"
      "text_consistency        %.4f\nsum                     %.4f\n",
      m.subject_consistency, m.background_consistency, m.imaging_quality, m.text_consistency, m.sum());
  for (const auto& o : rep.objects)
    std::printf("  %-7s presence %.2f shape %.2f size %.2f motion %.2f -> %.3f\n",
                world::palette()[static_cast<size_t>(o.color)].name, o.presence, o.shape, o.size, o.motion, o.score);
  std::printf("json: %s\n", m.to_json().c_str());
  if (!gif.empty()) {
    media::write_video_gif(gif, media::cfhw_to_fchw(video), scale);
    std::printf("gif: %s\n", gif.c_str());
  }
  return 0;
}

}  // namespace

namespace salad::cli {
void add_world_commands(CLI::App& app, Commands& cmds) {
  static WorldArgs world_args;
  static std::string out;
  static int64_t count = 64, text_len = 32, text_dim = 64, preview = 0, scale = 4;
  static uint64_t seed = 0;
  auto* w = app.add_subcommand("world", "write a shapes-world dataset (per-sample safetensors + index.json)");
  world_args.add(w);
  w->add_option("--out", out, "output directory")->required();
  w->add_option("--count", count, "number of samples")->capture_default_str();
  w->add_option("--seed", seed, "dataset seed")->capture_default_str();
  w->add_option("--text-len", text_len, "tokens per prompt (padded); 3 objects take 24")->capture_default_str();
  w->add_option("--text-dim", text_dim, "width of the context embedding")->capture_default_str();
  w->add_option("--preview", preview, "also write GIFs of the first N samples to <out>/preview")->capture_default_str();
  w->add_option("--scale", scale, "preview magnification")->capture_default_str();
  cmds.push_back({w, [] { return world_cmd(world_args, out, count, seed, text_len, text_dim, preview, scale); }});

  static WorldArgs eval_args;
  static std::string file, tensor_name = "latents", prompt, gif;
  static int64_t eval_scale = 4;
  auto* e = app.add_subcommand("eval-video", "the four shapes-world metrics of one video (.safetensors)");
  e->add_option("file", file, "a .safetensors file with a (3, F, H, W) video in [-1, 1]")->required();
  e->add_option("--tensor", tensor_name, "name of the video tensor")->capture_default_str();
  e->add_option("--prompt", prompt, "the prompt (default: the file's 'prompt' metadata)");
  e->add_option("--gif", gif, "also write the video as an animated GIF");
  e->add_option("--scale", eval_scale, "GIF magnification")->capture_default_str();
  eval_args.add(e);
  cmds.push_back({e, [] { return eval_video_cmd(eval_args, file, tensor_name, prompt, gif, eval_scale); }});
}
}  // namespace salad::cli
