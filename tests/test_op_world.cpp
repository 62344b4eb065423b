// The shapes world: generator determinism and physics, prompts, tokenizer,
// dataset files, the four metrics (ground truth scores high, each corruption
// lowers the metric it should), and the PNG / GIF encoders (decoded here by
// small independent readers).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "io/safetensors.h"
#include "temp_dir.h"
#include "salad/eval.h"
#include "salad/layout.h"
#include "salad/media.h"
#include "salad/world.h"

using namespace salad;
using namespace salad::world;
namespace fs = std::filesystem;
namespace {

struct TempDir : test::TempDir {
  TempDir() : test::TempDir("salad_world") {}
};

// A colour of the palette used by no object and not the background.
int unused_color(const Scene& s) {
  for (int c = 0; c < static_cast<int>(palette().size()); ++c) {
    bool used = c == s.background;
    for (const auto& o : s.objects) used |= o.color == c;
    if (!used) return c;
  }
  return -1;
}

Direction opposite(Direction d) {
  switch (d) {
    case Direction::Left:
      return Direction::Right;
    case Direction::Right:
      return Direction::Left;
    case Direction::Up:
      return Direction::Down;
    case Direction::Down:
      return Direction::Up;
    case Direction::UpLeft:
      return Direction::DownRight;
    case Direction::UpRight:
      return Direction::DownLeft;
    case Direction::DownLeft:
      return Direction::UpRight;
    case Direction::DownRight:
      return Direction::UpLeft;
  }
  return d;
}

std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A minimal GIF reader: the palette-index image of every frame (global palette only).
struct GifInfo {
  int64_t width = 0, height = 0;
  std::vector<std::vector<uint8_t>> frames;
  int loops = -1;
};
GifInfo decode_gif(const std::vector<uint8_t>& b) {
  GifInfo g;
  size_t p = 0;
  auto need = [&](size_t n) {
    if (p + n > b.size()) throw std::runtime_error("gif: truncated at byte " + std::to_string(p));
  };
  auto u16 = [&] {
    need(2);
    const int v = b[p] | (b[p + 1] << 8);
    p += 2;
    return v;
  };
  auto sub_blocks = [&] {
    std::vector<uint8_t> data;
    while (true) {
      need(1);
      const size_t n = b[p++];
      if (n == 0) return data;
      need(n);
      data.insert(data.end(), b.begin() + static_cast<std::ptrdiff_t>(p),
                  b.begin() + static_cast<std::ptrdiff_t>(p + n));
      p += n;
    }
  };
  need(13);
  if (std::string(b.begin(), b.begin() + 6) != "GIF89a") throw std::runtime_error("gif: bad signature");
  p = 6;
  g.width = u16(), g.height = u16();
  const uint8_t packed = b[p];
  p += 3;
  if (packed & 0x80) p += 3u * (1u << ((packed & 7) + 1));
  while (true) {
    need(1);
    const uint8_t tag = b[p++];
    if (tag == 0x3B) return g;
    if (tag == 0x21) {
      need(1);
      const uint8_t label = b[p++];
      const auto data = sub_blocks();
      if (label == 0xFF && data.size() >= 14 && std::string(data.begin(), data.begin() + 11) == "NETSCAPE2.0")
        g.loops = data[12] | (data[13] << 8);
      continue;
    }
    if (tag != 0x2C) throw std::runtime_error("gif: unexpected block " + std::to_string(tag));
    p += 4;
    const int w = u16(), h = u16();
    need(2);
    if (b[p++] & 0x80) throw std::runtime_error("gif: local tables not expected");
    const int min_code = b[p++];
    const auto data = sub_blocks();
    // LZW decode.
    const int clear = 1 << min_code, eoi = clear + 1;
    int width = min_code + 1, next = eoi + 1, prev = -1;
    std::vector<std::vector<uint8_t>> dict(4096);
    for (int i = 0; i < clear; ++i) dict[static_cast<size_t>(i)] = {static_cast<uint8_t>(i)};
    std::vector<uint8_t> out;
    size_t bit = 0;
    while (true) {
      if (bit + static_cast<size_t>(width) > 8 * data.size()) throw std::runtime_error("gif: LZW data ran out");
      int code = 0;
      for (int k = 0; k < width; ++k, ++bit) code |= ((data[bit / 8] >> (bit % 8)) & 1) << k;
      if (code == clear) {
        width = min_code + 1, next = eoi + 1, prev = -1;
        continue;
      }
      if (code == eoi) break;
      std::vector<uint8_t> entry;
      if (prev < 0) {
        if (code >= clear) throw std::runtime_error("gif: first code after clear is not a literal");
        entry = dict[static_cast<size_t>(code)];
      } else {
        if (code < next) {
          entry = dict[static_cast<size_t>(code)];
        } else if (code == next) {
          entry = dict[static_cast<size_t>(prev)];
          entry.push_back(entry[0]);
        } else {
          throw std::runtime_error("gif: code " + std::to_string(code) + " beyond the table (" + std::to_string(next) +
                                   ")");
        }
        if (next < 4096) {
          auto added = dict[static_cast<size_t>(prev)];
          added.push_back(entry[0]);
          dict[static_cast<size_t>(next++)] = added;
          if (next == (1 << width) && width < 12) ++width;
        }
      }
      out.insert(out.end(), entry.begin(), entry.end());
      prev = code;
    }
    if (out.size() != static_cast<size_t>(w * h)) throw std::runtime_error("gif: frame has the wrong pixel count");
    g.frames.push_back(out);
  }
}

// The raw scanlines of a PNG written with stored deflate blocks (what encode_png makes).
std::vector<uint8_t> png_scanlines(const std::vector<uint8_t>& b, int64_t* w, int64_t* h) {
  const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (b.size() < 8 || std::memcmp(b.data(), sig, 8) != 0) throw std::runtime_error("png: bad signature");
  size_t p = 8;
  std::vector<uint8_t> z;
  auto be32 = [&](size_t at) {
    return (uint32_t(b[at]) << 24) | (uint32_t(b[at + 1]) << 16) | (uint32_t(b[at + 2]) << 8) | b[at + 3];
  };
  while (p + 12 <= b.size()) {
    const uint32_t n = be32(p);
    const std::string type(b.begin() + static_cast<std::ptrdiff_t>(p + 4),
                           b.begin() + static_cast<std::ptrdiff_t>(p + 8));
    if (type == "IHDR") *w = be32(p + 8), *h = be32(p + 12);
    if (type == "IDAT")
      z.insert(z.end(), b.begin() + static_cast<std::ptrdiff_t>(p + 8),
               b.begin() + static_cast<std::ptrdiff_t>(p + 8 + n));
    p += 12 + n;
  }
  std::vector<uint8_t> raw;
  size_t q = 2;
  while (true) {
    const uint8_t hdr = z.at(q);
    const size_t len = z.at(q + 1) | (z.at(q + 2) << 8);
    if ((hdr >> 1) != 0) throw std::runtime_error("png: not a stored block");
    raw.insert(raw.end(), z.begin() + static_cast<std::ptrdiff_t>(q + 5),
               z.begin() + static_cast<std::ptrdiff_t>(q + 5 + len));
    q += 5 + len;
    if (hdr & 1) break;
  }
  return raw;
}

// Videos of several seeds for the metric tests: the first world (v1, flat
// background), the textured CPU world, two at the textured GPU size, and two
// with the strongest texture (0.5, cells of 3 pixels).
struct Case {
  WorldConfig cfg;
  Scene scene;
  at::Tensor video;
};
std::vector<Case> cases() {
  std::vector<Case> out;
  for (uint64_t seed = 0; seed < 26; ++seed) {
    Case c;
    c.cfg = WorldConfig::preset(seed < 10 ? "v1" : seed < 22 ? "cpu" : seed < 24 ? "gpu" : "cpu");
    if (seed >= 24) c.cfg.texture = 0.5, c.cfg.texture_cell = 3;
    c.scene = sample_scene(c.cfg, seed);
    c.video = render(c.cfg, c.scene);
    out.push_back(c);
  }
  return out;
}

// The scene's background alone (its texture included): the video without objects.
at::Tensor background_only(const WorldConfig& cfg, const Scene& s) {
  Scene empty = s;
  empty.objects.clear();
  return render(cfg, empty);
}

// FNV-1a of the video's bytes round((v + 1) * 127.5), in (c, t, i, j) order.
uint64_t video_hash(const at::Tensor& v) {
  const at::Tensor x = v.contiguous();
  const float* d = x.data_ptr<float>();
  uint64_t h = 0xcbf29ce484222325ull;
  for (int64_t k = 0; k < x.numel(); ++k) {
    h ^= static_cast<uint64_t>(std::lround((static_cast<double>(d[k]) + 1.0) * 127.5));
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace

// ---------------------------------------------------------------------------
// Generator

TEST(World, SameSeedSameVideoDifferentSeedsDiffer) {
  const WorldConfig cfg;
  for (uint64_t seed : {0ull, 7ull, 123456789ull}) {
    const Scene a = sample_scene(cfg, seed), b = sample_scene(cfg, seed);
    EXPECT_EQ(a.to_json(), b.to_json());
    EXPECT_TRUE(render(cfg, a).equal(render(cfg, b)));
  }
  const at::Tensor v0 = render(cfg, sample_scene(cfg, 1));
  int differ = 0;
  for (uint64_t seed = 2; seed < 12; ++seed) differ += !render(cfg, sample_scene(cfg, seed)).equal(v0);
  EXPECT_EQ(differ, 10);
  EXPECT_NE(sample_scene(cfg, 1).prompt(), sample_scene(cfg, 2).prompt());
  // The same dataset seed and index give the same sample; indices differ.
  const TextConfig text;
  EXPECT_TRUE(make_sample(cfg, text, 5, 3).latents.equal(make_sample(cfg, text, 5, 3).latents));
  EXPECT_NE(sample_seed(5, 3), sample_seed(5, 4));
  EXPECT_NE(sample_seed(5, 3), sample_seed(6, 3));
}

TEST(World, BackgroundIsIdenticalInEveryFrameAndObjectsHaveTheirColour) {
  for (const char* preset : {"v1", "cpu", "gpu"})
    for (uint64_t seed = 0; seed < 6; ++seed) {
      const WorldConfig cfg = WorldConfig::preset(preset);
      const Scene s = sample_scene(cfg, seed);
      const at::Tensor v = render(cfg, s);
      const at::Tensor tex = texture_offsets(cfg, seed);
      const float* off = tex.data_ptr<float>();
      ASSERT_EQ(v.sizes(), (std::vector<int64_t>{3, cfg.frames, cfg.height, cfg.width}));
      EXPECT_LE(v.max().item<float>(), 1.f);
      EXPECT_GE(v.min().item<float>(), -1.f);
      std::vector<std::vector<std::array<double, 2>>> paths;
      for (const auto& o : s.objects) paths.push_back(trajectory(cfg, o));
      const auto bg = color_value(s.background);
      const at::Tensor x = v.contiguous();
      const float* d = x.data_ptr<float>();
      const int64_t F = cfg.frames, N = cfg.height * cfg.width;
      int64_t bg_pixels = 0, object_pixels = 0;
      for (int64_t t = 0; t < F; ++t)
        for (int64_t i = 0; i < cfg.height; ++i)
          for (int64_t j = 0; j < cfg.width; ++j) {
            std::array<float, 3> want = bg;
            for (auto& w : want) w = std::clamp(w + off[i * cfg.width + j], -1.f, 1.f);  // exactly bg without texture
            bool covered = false;
            for (size_t k = 0; k < s.objects.size(); ++k) {
              const auto& q = paths[k][static_cast<size_t>(t)];
              if (inside_shape(s.objects[k].shape, q[0], q[1], cfg.half_extent_px(s.objects[k].size), j + 0.5, i + 0.5))
                want = color_value(s.objects[k].color), covered = true;
            }
            (covered ? object_pixels : bg_pixels) += 1;
            for (int64_t c = 0; c < 3; ++c)
              ASSERT_EQ(d[(c * F + t) * N + i * cfg.width + j], want[static_cast<size_t>(c)])
                  << preset << " seed " << seed << " frame " << t << " pixel " << i << "," << j;
          }
      EXPECT_GT(object_pixels, 0);
      EXPECT_GT(bg_pixels, object_pixels);
    }
}

TEST(World, TextureIsStaticPerSeedAndHiddenBehindObjects) {
  const WorldConfig cfg = WorldConfig::preset("cpu");
  ASSERT_GT(cfg.texture, 0);
  const float T = static_cast<float>(cfg.texture);
  for (uint64_t seed : {0ull, 3ull, 99ull}) {
    const Scene s = sample_scene(cfg, seed);
    EXPECT_EQ(s.texture_seed, seed);
    const at::Tensor tex = texture_offsets(cfg, seed);
    ASSERT_EQ(tex.sizes(), (std::vector<int64_t>{cfg.height, cfg.width}));
    EXPECT_TRUE(tex.equal(texture_offsets(cfg, seed)));
    // Values in {-T, 0, T}, each about a third of the cells, constant on cells.
    const int64_t n = tex.numel();
    for (float val : {-T, 0.f, T}) {
      const double share = (tex == val).sum().item<int64_t>() / static_cast<double>(n);
      EXPECT_GT(share, 0.2) << val;
      EXPECT_LT(share, 0.47) << val;
    }
    EXPECT_EQ(((tex == -T) | (tex == 0.f) | (tex == T)).sum().item<int64_t>(), n);
    const int64_t C = cfg.texture_cell;
    for (int64_t i = 0; i < cfg.height; ++i)
      for (int64_t j = 0; j < cfg.width; ++j)
        ASSERT_EQ(tex[i][j].item<float>(), tex[i / C * C][j / C * C].item<float>()) << i << "," << j;
    // Every frame shows the same background; objects cover it.
    const at::Tensor v = render(cfg, s), back = background_only(cfg, s);
    for (int64_t t = 1; t < cfg.frames; ++t) EXPECT_TRUE(back.select(1, t).equal(back.select(1, 0)));
    const auto bg = color_value(s.background);
    for (int64_t c = 0; c < 3; ++c) EXPECT_TRUE(back[c][0].equal((tex + bg[static_cast<size_t>(c)]).clamp(-1, 1))) << c;
    const at::Tensor covered = (v != back).any(0);  // (F, H, W)
    EXPECT_GT(covered.sum().item<int64_t>(), 0);
    // Where an object is, the video shows an exact palette colour; elsewhere the textured background.
    const at::Tensor x = v.contiguous(), cov = covered.contiguous();
    const float* d = x.data_ptr<float>();
    const bool* m = cov.data_ptr<bool>();
    const int64_t N = cfg.height * cfg.width, F = cfg.frames;
    for (int64_t t = 0; t < F; ++t)
      for (int64_t p = 0; p < N; ++p) {
        if (!m[t * N + p]) continue;
        int match = 0;
        for (const auto& o : s.objects) {
          const auto col = color_value(o.color);
          match +=
              d[(0 * F + t) * N + p] == col[0] && d[(1 * F + t) * N + p] == col[1] && d[(2 * F + t) * N + p] == col[2];
        }
        ASSERT_EQ(match, 1) << "frame " << t << " pixel " << p;
      }
  }
  // Different seeds, different textures; the scene itself does not depend on the texture.
  EXPECT_FALSE(texture_offsets(cfg, 1).equal(texture_offsets(cfg, 2)));
  WorldConfig flat = cfg;
  flat.texture = 0;
  EXPECT_EQ(sample_scene(flat, 5).to_json(), sample_scene(cfg, 5).to_json());
  EXPECT_EQ(texture_offsets(flat, 5).abs().sum().item<float>(), 0.f);
  // Texture 0: the background is exactly the palette colour.
  const Scene s = sample_scene(flat, 5);
  const auto bg = color_value(s.background);
  for (int64_t c = 0; c < 3; ++c)
    EXPECT_TRUE((background_only(flat, s)[c] == bg[static_cast<size_t>(c)]).all().item<bool>());
  // Larger cells: constant on 4 x 4 blocks.
  WorldConfig big = cfg;
  big.texture_cell = 4;
  const at::Tensor tb = texture_offsets(big, 7);
  EXPECT_TRUE(tb.slice(0, 4, 8).slice(1, 8, 12).eq(tb[4][8]).all().item<bool>());
  EXPECT_FALSE(tb.equal(texture_offsets(cfg, 7)));
}

TEST(World, FirstWorldIsBitIdenticalToTheOldGenerator) {
  // Hashes of samples 0..2 of `salad world --seed 5` written by the generator
  // before the texture existed (8 x 32 x 32, speed 0.06).
  const WorldConfig v1 = WorldConfig::preset("v1");
  EXPECT_EQ(v1.to_json(), WorldConfig().to_json());
  EXPECT_EQ(v1.frames, 8);
  EXPECT_EQ(v1.speed, 0.06);
  EXPECT_EQ(v1.texture, 0.0);
  const TextConfig text;
  const struct {
    uint64_t hash;
    const char* prompt;
  } golden[] = {
      {0x00e308c650311355ull, "a large black circle moving left on a yellow background"},
      {0x720dff4768e8f435ull, "a small purple square moving up-left on a orange background"},
      {0x41f3ce73aca805abull,
       "a small grey triangle moving right and a large cyan square moving left and a small white triangle moving down "
       "on a red background"},
  };
  for (int64_t i = 0; i < 3; ++i) {
    const Sample s = make_sample(v1, text, 5, i);
    EXPECT_EQ(s.prompt, golden[i].prompt);
    EXPECT_EQ(video_hash(s.latents), golden[i].hash) << i;
  }
}

TEST(World, ObjectsMoveAtConstantSpeedAndBounceInsideTheFrame) {
  WorldConfig cfg;
  cfg.frames = 40;  // long enough that every object meets a wall
  int bounces = 0;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    const Scene s = sample_scene(cfg, seed);
    ASSERT_GE(s.objects.size(), 1u);
    ASSERT_LE(s.objects.size(), 3u);
    std::vector<std::vector<std::array<double, 2>>> paths;
    for (const auto& o : s.objects) {
      EXPECT_NE(o.color, s.background);
      const double e = cfg.half_extent_px(o.size);
      const auto path = trajectory(cfg, o);
      const auto u = unit_velocity(o.direction);
      // First step follows the prompted direction unless it starts against a wall.
      const double step0x = path[1][0] - path[0][0], step0y = path[1][1] - path[0][1];
      if (path[0][0] - e > cfg.speed_px() && cfg.width - e - path[0][0] > cfg.speed_px() &&
          path[0][1] - e > cfg.speed_px() && cfg.height - e - path[0][1] > cfg.speed_px()) {
        EXPECT_NEAR(step0x, u[0] * cfg.speed_px(), 1e-9);
        EXPECT_NEAR(step0y, u[1] * cfg.speed_px(), 1e-9);
      }
      for (size_t t = 0; t < path.size(); ++t) {
        EXPECT_GE(path[t][0], e - 1e-9);
        EXPECT_LE(path[t][0], cfg.width - e + 1e-9);
        EXPECT_GE(path[t][1], e - 1e-9);
        EXPECT_LE(path[t][1], cfg.height - e + 1e-9);
        if (t >= 2) {
          const double ax = path[t][0] - path[t - 1][0], bx = path[t - 1][0] - path[t - 2][0];
          const double ay = path[t][1] - path[t - 1][1], by = path[t - 1][1] - path[t - 2][1];
          bounces += (ax * bx < 0) + (ay * by < 0);
          // Away from walls the velocity is unchanged.
          if (std::abs(ax) == std::abs(bx) && ax * bx > 0) EXPECT_DOUBLE_EQ(ax, bx);
        }
      }
      paths.push_back(path);
    }
    // Objects never overlap (their boxes stay apart).
    for (size_t a = 0; a < paths.size(); ++a)
      for (size_t b = 0; b < a; ++b)
        for (size_t t = 0; t < paths[a].size(); ++t) {
          const double gap = cfg.half_extent_px(s.objects[a].size) + cfg.half_extent_px(s.objects[b].size);
          EXPECT_TRUE(std::abs(paths[a][t][0] - paths[b][t][0]) >= gap ||
                      std::abs(paths[a][t][1] - paths[b][t][1]) >= gap);
        }
  }
  EXPECT_GT(bounces, 40);
  // A hand-made bounce: moving left from x = e + 1 reflects at the wall.
  const auto p = trajectory(5.0, 10.0, Direction::Left, 2.0, 4.0, 4, 32, 32);
  EXPECT_DOUBLE_EQ(p[1][0], 5.0);  // 3 -> reflected about 4 -> 5
  EXPECT_DOUBLE_EQ(p[2][0], 7.0);
  EXPECT_DOUBLE_EQ(p[3][1], 10.0);
}

TEST(World, PromptNamesEveryObjectAndParsesBack) {
  const WorldConfig cfg;
  for (uint64_t seed = 0; seed < 30; ++seed) {
    const Scene s = sample_scene(cfg, seed);
    const std::string prompt = s.prompt();
    for (const auto& o : s.objects) {
      const std::string phrase = std::string("a ") + to_string(o.size) + " " +
                                 palette()[static_cast<size_t>(o.color)].name + " " + to_string(o.shape) + " moving " +
                                 to_string(o.direction);
      EXPECT_NE(prompt.find(phrase), std::string::npos) << prompt;
    }
    EXPECT_NE(prompt.find(std::string("on a ") + palette()[static_cast<size_t>(s.background)].name + " background"),
              std::string::npos);
    const Scene back = parse_prompt(prompt);
    ASSERT_EQ(back.objects.size(), s.objects.size());
    EXPECT_EQ(back.background, s.background);
    for (size_t k = 0; k < s.objects.size(); ++k) {
      EXPECT_EQ(back.objects[k].color, s.objects[k].color);
      EXPECT_EQ(back.objects[k].shape, s.objects[k].shape);
      EXPECT_EQ(back.objects[k].size, s.objects[k].size);
      EXPECT_EQ(back.objects[k].direction, s.objects[k].direction);
    }
    EXPECT_EQ(back.prompt(), prompt);
    EXPECT_EQ(Scene::from_json(s.to_json()).to_json(), s.to_json());
  }
  EXPECT_EQ(
      parse_prompt("A small red circle moving left, and a large blue square moving down-right on a grey background.")
          .prompt(),
      "a small red circle moving left and a large blue square moving down-right on a grey background");
  EXPECT_THROW(parse_prompt("a small red blob moving left on a grey background"), ArgumentError);
  EXPECT_THROW(parse_prompt("a small red circle moving sideways on a grey background"), ArgumentError);
  EXPECT_THROW(parse_prompt("a small red circle moving left on a red background"), ArgumentError);
  EXPECT_THROW(parse_prompt("a small red circle moving left"), ArgumentError);
  EXPECT_THROW(parse_prompt("a small red circle moving left on a grey background please"), ArgumentError);
}

TEST(World, ConfigValidation) {
  WorldConfig c;
  EXPECT_NO_THROW(c.validate());
  EXPECT_NO_THROW(WorldConfig::preset("gpu").validate());
  c.max_objects = 4;
  EXPECT_THROW(c.validate(), ArgumentError);
  c = WorldConfig();
  c.height = 12;  // a large object (half-extent 2) fits, but ...
  c.width = 12;
  c.small_size = 0.05;  // ... a small one is under 1.5 px
  EXPECT_THROW(c.validate(), ArgumentError);
  c = WorldConfig();
  c.speed = -1;
  EXPECT_THROW(c.validate(), ArgumentError);
  EXPECT_THROW(WorldConfig::preset("tpu"), ArgumentError);
  for (const char* p : {"v1", "v2", "cpu", "gpu"})
    EXPECT_EQ(WorldConfig::from_json(WorldConfig::preset(p).to_json()).to_json(), WorldConfig::preset(p).to_json());
  // Presets.
  const WorldConfig cpu = WorldConfig::preset("cpu"), gpu = WorldConfig::preset("gpu"), v2 = WorldConfig::preset("v2");
  EXPECT_EQ(cpu.frames * cpu.height * cpu.width / 4, 6144);  // tokens of the 1x2x2 patch: 96 key blocks of 64
  EXPECT_EQ(v2.frames * v2.height * v2.width / 4, 4096);
  EXPECT_EQ(gpu.frames, 24);
  EXPECT_EQ(gpu.height, 64);
  EXPECT_EQ(cpu.texture, 0.35);
  EXPECT_EQ(v2.texture, 0.25);
  EXPECT_EQ(gpu.texture, cpu.texture);
  EXPECT_GT(cpu.speed, v2.speed);
  EXPECT_GT(v2.speed, WorldConfig().speed);
  // Texture fields: validated, with the field named.
  auto expect_error = [](const WorldConfig& w, const std::string& field) {
    try {
      w.validate();
      ADD_FAILURE() << "expected ArgumentError naming " << field;
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  for (double bad : {-0.1, 0.51, 2.0, std::nan("")}) {
    c = cpu;
    c.texture = bad;
    expect_error(c, "texture");
  }
  c = cpu;
  c.texture_cell = 0;
  expect_error(c, "texture_cell");
  c.texture_cell = 1, c.texture = 0.5;
  EXPECT_NO_THROW(c.validate());
  EXPECT_EQ(WorldConfig::from_json(c.to_json()).texture_cell, 1);
  EXPECT_EQ(WorldConfig::from_json(c.to_json()).texture, 0.5);
  EXPECT_THROW(WorldConfig::from_json(R"({"frames":8,"height":32,"width":32,"min_objects":1,"max_objects":3,)"
                                      R"("speed":0.06,"small_size":0.11,"large_size":0.17,"texture":0.7})"),
               ArgumentError);
  EXPECT_THROW(WorldConfig::from_json(R"({"frames":8,"height":32,"width":32,"min_objects":1,"max_objects":3,)"
                                      R"("speed":0.06,"small_size":0.11,"large_size":0.17,"texture":"x"})"),
               ArgumentError);
  // A document written before the texture existed loads as the flat world.
  const WorldConfig old = WorldConfig::from_json(
      R"({"frames":8,"height":32,"large_size":0.17,"max_objects":3,"min_objects":1,"small_size":0.11,"speed":0.06,"width":32})");
  EXPECT_EQ(old.texture, 0.0);
  EXPECT_EQ(old.texture_cell, 2);
  EXPECT_EQ(old.to_json(), WorldConfig::preset("v1").to_json());
  // Scenes keep their texture seed through JSON; old scene JSON has none (0).
  const Scene s = sample_scene(cpu, 12345);
  EXPECT_EQ(Scene::from_json(s.to_json()).texture_seed, 12345u);
  EXPECT_EQ(Scene::from_json(R"({"background": "grey", "objects": []})").texture_seed, 0u);
}

// ---------------------------------------------------------------------------
// Text

TEST(World, TokenizerRoundTripAndPadding) {
  const WorldConfig cfg;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    const std::string prompt = sample_scene(cfg, seed).prompt();
    const auto ids = Tokenizer::encode(prompt, 32);
    ASSERT_EQ(ids.size(), 32u);
    EXPECT_EQ(Tokenizer::decode(ids), prompt);
    size_t words = 1;
    for (char c : prompt) words += c == ' ';
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i < words) {
        EXPECT_GT(ids[i], Tokenizer::kUnknown);
      } else {
        EXPECT_EQ(ids[i], Tokenizer::kPad);
      }
    }
  }
  EXPECT_EQ(Tokenizer::encode("a zebra", 3), (std::vector<int64_t>{2, Tokenizer::kUnknown, Tokenizer::kPad}));
  EXPECT_THROW(Tokenizer::encode("a red circle", 2), ArgumentError);
  EXPECT_THROW(Tokenizer::decode({0, 999}), ArgumentError);
  // Three objects fit in the default text length.
  WorldConfig three = cfg;
  three.min_objects = 3;
  EXPECT_NO_THROW(Tokenizer::encode(sample_scene(three, 1).prompt(), TextConfig().text_len));

  const at::Tensor table = embedding_table(16);
  EXPECT_EQ(table.sizes(), (std::vector<int64_t>{Tokenizer::vocab_size(), 16}));
  EXPECT_EQ(table[0].abs().sum().item<float>(), 0.f);
  EXPECT_TRUE(table.equal(embedding_table(16)));
  EXPECT_FALSE(table.equal(embedding_table(16, 99)));
  EXPECT_NEAR(table.slice(0, 1).std().item<double>(), 1.0, 0.2);
  const at::Tensor ctx = embed_tokens({2, 5, 0}, 16);
  EXPECT_TRUE(ctx[0].equal(table[2]));
  EXPECT_TRUE(ctx[1].equal(table[5]));
  EXPECT_EQ(ctx[2].abs().sum().item<float>(), 0.f);
}

// ---------------------------------------------------------------------------
// Dataset files

TEST(World, SampleFileRoundTrip) {
  TempDir dir;
  const WorldConfig cfg;
  TextConfig text;
  text.text_dim = 24;
  const Sample s = make_sample(cfg, text, 11, 4);
  const fs::path path = dir.path / "one.safetensors";
  write_sample(path, s);
  const Sample r = read_sample(path);
  EXPECT_TRUE(r.latents.equal(s.latents));
  EXPECT_TRUE(r.context.equal(s.context));
  EXPECT_TRUE(r.tokens.equal(s.tokens));
  EXPECT_EQ(r.prompt, s.prompt);
  EXPECT_EQ(r.seed, s.seed);
  EXPECT_EQ(r.index, 4);
  EXPECT_EQ(r.scene.to_json(), s.scene.to_json());
  EXPECT_EQ(r.scene.texture_seed, s.seed);
  EXPECT_EQ(r.world.to_json(), cfg.to_json());
  EXPECT_EQ(r.context.sizes(), (std::vector<int64_t>{32, 24}));
  EXPECT_EQ(Tokenizer::decode(std::vector<int64_t>(r.tokens.data_ptr<int64_t>(), r.tokens.data_ptr<int64_t>() + 32)),
            s.prompt);
  // The file is plain safetensors: objects metadata is a JSON array.
  io::SafeTensorsFile f(path);
  const auto objs = nlohmann::json::parse(f.metadata().at("objects"));
  EXPECT_EQ(objs.size(), s.scene.objects.size());
  EXPECT_EQ(f.info("latents").shape, (std::vector<int64_t>{3, 8, 32, 32}));
  EXPECT_EQ(f.info("tokens").dtype, io::DType::I64);

  // A textured sample: the texture follows from the stored seed.
  const Sample ts = make_sample(WorldConfig::preset("cpu"), text, 11, 4);
  write_sample(dir.path / "tex.safetensors", ts);
  const Sample tr = read_sample(dir.path / "tex.safetensors");
  EXPECT_EQ(tr.world.texture, WorldConfig::preset("cpu").texture);
  EXPECT_TRUE(render(tr.world, tr.scene).equal(ts.latents));

  // A file written before the texture existed (world JSON without it) still loads, flat.
  {
    io::SafeTensorsFile g(path);
    auto meta = g.metadata();
    meta["world"] =
        R"({"frames":8,"height":32,"large_size":0.17,"max_objects":3,"min_objects":1,"small_size":0.11,"speed":0.06,"width":32})";
    auto shape_of = [](const at::Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); };
    const at::Tensor lat = s.latents.contiguous(), ctx = s.context.contiguous(), tok = s.tokens.contiguous();
    io::write_safetensors(dir.path / "old.safetensors",
                          {{"latents", io::DType::F32, shape_of(lat), lat.data_ptr()},
                           {"context", io::DType::F32, shape_of(ctx), ctx.data_ptr()},
                           {"tokens", io::DType::I64, shape_of(tok), tok.data_ptr()}},
                          meta);
  }
  const Sample old = read_sample(dir.path / "old.safetensors");
  EXPECT_EQ(old.world.texture, 0.0);
  EXPECT_EQ(old.world.to_json(), cfg.to_json());
  EXPECT_TRUE(render(old.world, old.scene).equal(s.latents));

  // Wrong shapes are reported with the tensor's name.
  Sample bad = s;
  bad.context = s.context.slice(0, 0, 5);
  write_sample(dir.path / "bad.safetensors", bad);
  try {
    read_sample(dir.path / "bad.safetensors");
    FAIL() << "expected ArgumentError";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("'context'"), std::string::npos) << e.what();
  }
}

TEST(World, DatasetIsResumable) {
  TempDir dir;
  WorldConfig cfg;
  cfg.frames = 4, cfg.height = 16, cfg.width = 16;
  cfg.small_size = 0.15, cfg.large_size = 0.22;
  const TextConfig text;
  auto rep = write_dataset(dir.path, cfg, text, 3, 42);
  EXPECT_EQ(rep.written, 3);
  EXPECT_EQ(rep.kept, 0);
  const auto index = nlohmann::json::parse(std::ifstream(dir.path / "index.json"));
  EXPECT_EQ(index.at("count"), 3);
  EXPECT_EQ(index.at("samples").size(), 3u);
  EXPECT_EQ(index.at("samples")[1].at("file"), sample_file_name(1));
  EXPECT_EQ(index.at("samples")[1].at("prompt"), make_sample(cfg, text, 42, 1).prompt);
  // Truncate one file, then extend to 4: 2 kept, 1 replaced, 1 new.
  {
    std::ofstream f(dir.path / sample_file_name(1), std::ios::binary | std::ios::trunc);
    f << "junk";
  }
  rep = write_dataset(dir.path, cfg, text, 4, 42);
  EXPECT_EQ(rep.kept, 2);
  EXPECT_EQ(rep.replaced, 1);
  EXPECT_EQ(rep.written, 1);
  EXPECT_TRUE(read_sample(dir.path / sample_file_name(1)).latents.equal(make_sample(cfg, text, 42, 1).latents));
  // A different seed replaces everything.
  rep = write_dataset(dir.path, cfg, text, 4, 43);
  EXPECT_EQ(rep.replaced, 4);
}

// ---------------------------------------------------------------------------
// Metrics

TEST(WorldEval, GroundTruthScoresHigh) {
  eval::VideoMetrics lowest{1, 1, 1, 1};
  for (const auto& c : cases()) {
    const auto rep = eval::analyse(c.video, c.scene, c.cfg);
    const auto& m = rep.metrics;
    if (c.cfg.texture > 0) {  // textured ground truth scores as high as flat
      lowest.subject_consistency = std::min(lowest.subject_consistency, m.subject_consistency);
      lowest.background_consistency = std::min(lowest.background_consistency, m.background_consistency);
      lowest.imaging_quality = std::min(lowest.imaging_quality, m.imaging_quality);
      lowest.text_consistency = std::min(lowest.text_consistency, m.text_consistency);
    }
    EXPECT_GE(m.subject_consistency, 0.95) << c.scene.prompt();
    EXPECT_GE(m.background_consistency, 0.95) << c.scene.prompt();
    EXPECT_GE(m.imaging_quality, 0.95) << c.scene.prompt();
    EXPECT_GE(m.text_consistency, 0.95) << c.scene.prompt();
    EXPECT_NEAR(m.sum(), m.subject_consistency + m.background_consistency + m.imaging_quality + m.text_consistency,
                1e-12);
    for (const auto& o : rep.objects) {
      EXPECT_EQ(o.presence, 1.0);
      EXPECT_GE(o.shape, 0.85) << c.scene.prompt();
      EXPECT_EQ(o.size, 1.0) << c.scene.prompt();
    }
    EXPECT_EQ(rep.extra_tracks, 0);
  }
  EXPECT_GE(lowest.subject_consistency, 0.98);
  EXPECT_GE(lowest.background_consistency, 0.98);
  EXPECT_GE(lowest.imaging_quality, 0.98);
  EXPECT_GE(lowest.text_consistency, 0.98);
  EXPECT_THROW(eval::evaluate(at::zeros({3, 4, 32, 32}), Scene(), WorldConfig()), ArgumentError);
  EXPECT_THROW(eval::evaluate(at::zeros({8, 3, 32, 32}), Scene(), WorldConfig()), ArgumentError);
}

TEST(WorldEval, GaussianNoiseLowersImagingQuality) {
  at::manual_seed(0);
  for (const auto& c : cases()) {
    const auto clean = eval::evaluate(c.video, c.scene, c.cfg);
    const at::Tensor noisy = (c.video + 0.2 * at::randn_like(c.video)).clamp(-1, 1);
    const auto m = eval::evaluate(noisy, c.scene, c.cfg);
    EXPECT_LT(m.imaging_quality, clean.imaging_quality - 0.4) << c.scene.prompt();
  }
}

TEST(WorldEval, BackgroundFlickerLowersBackgroundConsistency) {
  at::manual_seed(1);
  for (const auto& c : cases()) {
    const auto clean = eval::evaluate(c.video, c.scene, c.cfg);
    // Each frame's background (textured or not) shifts by its own random colour offset.
    const at::Tensor is_bg = (c.video == background_only(c.cfg, c.scene)).all(0, true);
    const at::Tensor offset = at::empty({3, c.cfg.frames, 1, 1}).uniform_(-0.35, 0.35);
    const at::Tensor flicker = at::where(is_bg, (c.video + offset).clamp(-1, 1), c.video);
    const auto m = eval::evaluate(flicker, c.scene, c.cfg);
    EXPECT_LT(m.background_consistency, clean.background_consistency - 0.3) << c.scene.prompt();
  }
}

TEST(WorldEval, TextureThatChangesAcrossFramesLowersBackgroundConsistency) {
  int textured = 0;
  for (const auto& c : cases()) {
    if (c.cfg.texture == 0) continue;
    ++textured;
    const auto clean = eval::evaluate(c.video, c.scene, c.cfg);
    // Every frame draws a texture of its own (same amplitude and cells): each frame alone looks right.
    const at::Tensor covered = (c.video != background_only(c.cfg, c.scene)).any(0, true);
    at::Tensor v = c.video.clone();
    for (int64_t t = 0; t < c.cfg.frames; ++t) {
      Scene other = c.scene;
      other.texture_seed = c.scene.texture_seed + 1000 + static_cast<uint64_t>(t);
      v.select(1, t).copy_(
          at::where(covered.select(1, t), c.video.select(1, t), background_only(c.cfg, other).select(1, t)));
    }
    const auto m = eval::evaluate(v, c.scene, c.cfg);
    EXPECT_LT(m.background_consistency, clean.background_consistency - 0.5) << c.scene.prompt();
    EXPECT_GE(m.imaging_quality, 0.95) << c.scene.prompt();  // every frame is still a clean world frame
    EXPECT_GE(m.text_consistency, 0.95) << c.scene.prompt();
  }
  EXPECT_GE(textured, 10);
}

TEST(WorldEval, WrongColourLowersTextConsistency) {
  for (const auto& c : cases()) {
    const auto clean = eval::evaluate(c.video, c.scene, c.cfg);
    Scene wrong = c.scene;
    wrong.objects[0].color = unused_color(c.scene);
    const auto m = eval::evaluate(render(c.cfg, wrong), c.scene, c.cfg);
    EXPECT_LT(m.text_consistency, clean.text_consistency - 0.2) << c.scene.prompt();
    EXPECT_GE(m.subject_consistency, 0.95);  // still a consistent video, just not the prompted one
  }
}

TEST(WorldEval, FrozenOrReversedMotionLowersTextConsistency) {
  for (const auto& c : cases()) {
    const auto clean = eval::evaluate(c.video, c.scene, c.cfg);
    WorldConfig frozen = c.cfg;
    frozen.speed = 0;
    const auto mf = eval::evaluate(render(frozen, c.scene), c.scene, c.cfg);
    Scene reversed = c.scene;
    for (auto& o : reversed.objects) o.direction = opposite(o.direction);
    const auto mr = eval::evaluate(render(c.cfg, reversed), c.scene, c.cfg);
    const double n = static_cast<double>(c.scene.objects.size());
    // Every object loses most of its motion term (weight 0.6 of each of n objects + 0.5 for the background).
    const double margin = 0.25 * n / (n + 0.5);
    EXPECT_LT(mf.text_consistency, clean.text_consistency - margin) << "frozen: " << c.scene.prompt();
    EXPECT_LT(mr.text_consistency, clean.text_consistency - margin) << "reversed: " << c.scene.prompt();
    EXPECT_GE(mf.subject_consistency, 0.95);
    EXPECT_GE(mr.imaging_quality, 0.95);
  }
}

TEST(WorldEval, ShapeOrColourChangingMidVideoLowersSubjectConsistency) {
  for (const auto& c : cases()) {
    const auto clean = eval::evaluate(c.video, c.scene, c.cfg);
    const int64_t half = c.cfg.frames / 2;
    for (int variant = 0; variant < 2; ++variant) {
      Scene changed = c.scene;
      for (auto& o : changed.objects) {
        if (variant == 0) o.shape = o.shape == Shape::Square ? Shape::Triangle : Shape::Square;
      }
      if (variant == 1) changed.objects[0].color = unused_color(c.scene);
      at::Tensor v = c.video.clone();
      v.slice(1, half) = render(c.cfg, changed).slice(1, half);
      const auto m = eval::evaluate(v, c.scene, c.cfg);
      const double n = static_cast<double>(c.scene.objects.size());
      const double margin = variant == 0 ? 0.2 : 0.3 / n;  // a colour change splits one of n tracks in two
      EXPECT_LT(m.subject_consistency, clean.subject_consistency - margin)
          << (variant ? "colour" : "shape") << ": " << c.scene.prompt();
    }
  }
}

TEST(WorldEval, TimeReversedVideoWithoutBouncesLowersTextConsistency) {
  WorldConfig cfg;
  Scene s;
  s.background = color_id("grey");
  s.objects.push_back({Shape::Circle, color_id("red"), Size::Small, Direction::Right, 6, 16});
  const at::Tensor v = render(cfg, s);
  const auto clean = eval::evaluate(v, s, cfg);
  const auto m = eval::evaluate(v.flip({1}), s, cfg);
  EXPECT_GE(clean.text_consistency, 0.95);
  EXPECT_LT(m.text_consistency, clean.text_consistency - 0.15);
  EXPECT_GE(m.subject_consistency, 0.95);
  EXPECT_GE(m.background_consistency, 0.95);
}

// ---------------------------------------------------------------------------
// Media

TEST(WorldMedia, GifDecodesToTheFramesAndPngToThePixels) {
  TempDir dir;
  WorldConfig cfg = WorldConfig::preset("gpu");
  cfg.texture = 0;  // palette colours only (checked against the GIF palette below)
  const Scene s = sample_scene(cfg, 3);
  const at::Tensor v = media::cfhw_to_fchw(render(cfg, s));
  const fs::path gif = dir.path / "v.gif";
  media::write_video_gif(gif, v, 2, 10);
  const auto bytes = read_bytes(gif);
  ASSERT_GE(bytes.size(), 6u);
  EXPECT_EQ(std::string(bytes.begin(), bytes.begin() + 6), "GIF89a");
  const GifInfo g = decode_gif(bytes);
  EXPECT_EQ(g.width, 128);
  EXPECT_EQ(g.height, 128);
  EXPECT_EQ(g.loops, 0);
  ASSERT_EQ(g.frames.size(), static_cast<size_t>(cfg.frames));
  const auto frames = media::video_frames(v, 2);
  for (size_t t = 0; t < frames.size(); ++t)
    for (size_t p = 0; p < g.frames[t].size(); ++p) {
      const uint8_t* px = frames[t].rgb.data() + 3 * p;
      ASSERT_EQ(g.frames[t][p], media::gif_index(px[0], px[1], px[2])) << "frame " << t << " pixel " << p;
      // World colours are in the GIF palette exactly.
      const auto& pal = media::gif_palette()[g.frames[t][p]];
      ASSERT_TRUE(pal[0] == px[0] && pal[1] == px[1] && pal[2] == px[2]);
    }
  // Random pixels exercise the LZW table reset (far more than 4096 codes).
  at::manual_seed(0);
  const at::Tensor noise = at::rand({3, 3, 70, 90}) * 2 - 1;
  const auto nframes = media::video_frames(noise, 1);
  const GifInfo gn = decode_gif(media::encode_gif(nframes));
  ASSERT_EQ(gn.frames.size(), 3u);
  for (size_t t = 0; t < 3; ++t)
    for (size_t p = 0; p < gn.frames[t].size(); ++p) {
      const uint8_t* px = nframes[t].rgb.data() + 3 * p;
      ASSERT_EQ(gn.frames[t][p], media::gif_index(px[0], px[1], px[2]));
    }

  const auto pngs = media::write_video_pngs(dir.path / "png", v, 3);
  ASSERT_EQ(pngs.size(), static_cast<size_t>(cfg.frames));
  int64_t w = 0, h = 0;
  const auto raw = png_scanlines(read_bytes(pngs[2]), &w, &h);
  EXPECT_EQ(w, 192);
  EXPECT_EQ(h, 192);
  const auto f2 = media::video_frames(v, 3)[2];
  ASSERT_EQ(raw.size(), static_cast<size_t>(h * (1 + 3 * w)));
  for (int64_t y = 0; y < h; ++y) {
    ASSERT_EQ(raw[static_cast<size_t>(y * (1 + 3 * w))], 0);
    ASSERT_EQ(std::memcmp(raw.data() + y * (1 + 3 * w) + 1, f2.at(0, y), static_cast<size_t>(3 * w)), 0);
  }
}

TEST(WorldMedia, SideBySideLaysOutPanelsWithLabels) {
  const WorldConfig cfg;
  const at::Tensor a = media::cfhw_to_fchw(render(cfg, sample_scene(cfg, 1)));
  const at::Tensor b = media::cfhw_to_fchw(render(cfg, sample_scene(cfg, 2))).slice(0, 0, 5);
  const auto frames = media::side_by_side({a, b}, {"dense", "salad"}, 4, 4);
  ASSERT_EQ(frames.size(), 8u);  // the longer video; the shorter holds its last frame
  EXPECT_EQ(frames[0].width, 4 + 128 + 4 + 128 + 4);
  EXPECT_EQ(frames[0].height, 4 + 14 + 128 + 4);
  // The panels are the scaled frames.
  const auto fa = media::video_frames(a, 4);
  const auto fb = media::video_frames(b, 4);
  EXPECT_EQ(std::memcmp(frames[3].at(4, 4 + 14 + 10), fa[3].at(0, 10), 3 * 128), 0);
  EXPECT_EQ(std::memcmp(frames[7].at(4 + 128 + 4, 4 + 14 + 10), fb[4].at(0, 10), 3 * 128), 0);
  // Label ink in the strip above the first panel, none above the gap.
  int ink = 0;
  for (int64_t y = 4; y < 4 + 10; ++y)
    for (int64_t x = 4; x < 4 + media::text_width("dense", 2); ++x) ink += frames[0].at(x, y)[0] == 240;
  EXPECT_GT(ink, 20);
  EXPECT_THROW(media::side_by_side({}, {}), ArgumentError);
  EXPECT_THROW(media::side_by_side({a}, {"x", "y"}), ArgumentError);
  EXPECT_THROW(media::video_frames(at::zeros({3, 8, 32, 32}).slice(0, 0, 2), 1), ArgumentError);
}
