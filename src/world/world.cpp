// The shapes world: scene sampling, rendering, prompts, tokenizer, dataset files.
#include "salad/world.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/safetensors.h"
#include "salad/layout.h"

namespace salad::world {
namespace {

using nlohmann::json;

// splitmix64: a portable, seedable generator, so scenes are identical across
// compilers and standard libraries (std::*_distribution is not).
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  double normal() {  // Box-Muller
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

uint64_t mix(uint64_t a, uint64_t b) {
  Rng r(a ^ (b * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull));
  r.next();
  return r.next();
}

const char* const kShapeNames[kNumShapes] = {"circle", "square", "triangle"};
const char* const kSizeNames[kNumSizes] = {"small", "large"};
const char* const kDirectionNames[kNumDirections] = {"left",    "right",    "up",        "down",
                                                     "up-left", "up-right", "down-left", "down-right"};

template <class E, int N>
E parse_name(const std::string& s, const char* const (&names)[N], const char* what) {
  for (int i = 0; i < N; ++i)
    if (s == names[i]) return static_cast<E>(i);
  std::string all;
  for (int i = 0; i < N; ++i) all += (i ? " | " : "") + std::string(names[i]);
  throw ArgumentError(std::string(what) + ": expected " + all + ", got '" + s + "'");
}

int checked_color(const std::string& name, const char* what) {
  const int id = color_id(name);
  if (id < 0) {
    std::string all;
    for (const auto& c : palette()) all += (all.empty() ? "" : " | ") + std::string(c.name);
    throw ArgumentError(std::string(what) + ": expected a palette colour (" + all + "), got '" + name + "'");
  }
  return id;
}

std::vector<std::string> split_words(const std::string& text) {
  std::vector<std::string> words;
  std::string w;
  for (char ch : text) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (std::isspace(c) || ch == ',' || ch == '.') {
      if (!w.empty()) words.push_back(w), w.clear();
    } else {
      w.push_back(static_cast<char>(std::tolower(c)));
    }
  }
  if (!w.empty()) words.push_back(w);
  return words;
}

// Writes `text` to `path` atomically: a temp file beside it, fsync, rename.
void write_text_atomic(const std::filesystem::path& path, const std::string& text) {
  const std::string tmp = path.string() + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw io::IoError("open " + tmp + ": " + std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string err = std::strerror(errno);
      ::close(fd);
      std::remove(tmp.c_str());
      throw io::IoError("write " + tmp + ": " + err);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    std::remove(tmp.c_str());
    throw io::IoError("fsync/close " + tmp + ": " + std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = std::strerror(errno);
    std::remove(tmp.c_str());
    throw io::IoError("rename " + tmp + " -> " + path.string() + ": " + err);
  }
}

json object_to_json(const WorldObject& o) {
  return json{{"shape", to_string(o.shape)},
              {"color", palette()[static_cast<size_t>(o.color)].name},
              {"size", to_string(o.size)},
              {"direction", to_string(o.direction)},
              {"x", o.x},
              {"y", o.y}};
}

template <class T>
T get_field(const json& j, const char* key, const char* what) {
  if (!j.is_object() || !j.contains(key)) throw ArgumentError(std::string(what) + ": missing field '" + key + "'");
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    throw ArgumentError(std::string(what) + ": field '" + key + "' has the wrong type: " + j.at(key).dump());
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Palette and names

const std::vector<PaletteColor>& palette() {
  // Pairwise distances are at least 0.78 in [-1, 1] units (yellow-orange), so
  // a pixel within 0.35 of a colour cannot be near another.
  static const std::vector<PaletteColor> p = {
      {"red", 220, 30, 30},     {"green", 30, 170, 50},  {"blue", 30, 70, 230},  {"yellow", 245, 225, 30},
      {"purple", 140, 50, 190}, {"orange", 250, 130, 0}, {"cyan", 30, 200, 220}, {"white", 245, 245, 245},
      {"grey", 128, 128, 128},  {"black", 10, 10, 10}};
  return p;
}

int color_id(const std::string& name) {
  const auto& p = palette();
  for (size_t i = 0; i < p.size(); ++i)
    if (name == p[i].name) return static_cast<int>(i);
  return -1;
}

std::array<float, 3> color_value(int id) {
  if (id < 0 || id >= static_cast<int>(palette().size()))
    throw ArgumentError("color_value: id must be in [0, " + std::to_string(palette().size()) + "), got " +
                        std::to_string(id));
  const auto& c = palette()[static_cast<size_t>(id)];
  return {c.r / 127.5f - 1.f, c.g / 127.5f - 1.f, c.b / 127.5f - 1.f};
}

const char* to_string(Shape s) {
  return kShapeNames[static_cast<int>(s)];
}
const char* to_string(Size s) {
  return kSizeNames[static_cast<int>(s)];
}
const char* to_string(Direction d) {
  return kDirectionNames[static_cast<int>(d)];
}
Shape parse_shape(const std::string& s) {
  return parse_name<Shape>(s, kShapeNames, "shape");
}
Size parse_size(const std::string& s) {
  return parse_name<Size>(s, kSizeNames, "size");
}
Direction parse_direction(const std::string& s) {
  return parse_name<Direction>(s, kDirectionNames, "direction");
}

std::array<double, 2> unit_velocity(Direction d) {
  const double k = 1.0 / std::sqrt(2.0);
  switch (d) {
    case Direction::Left:
      return {-1, 0};
    case Direction::Right:
      return {1, 0};
    case Direction::Up:
      return {0, -1};
    case Direction::Down:
      return {0, 1};
    case Direction::UpLeft:
      return {-k, -k};
    case Direction::UpRight:
      return {k, -k};
    case Direction::DownLeft:
      return {-k, k};
    case Direction::DownRight:
      return {k, k};
  }
  return {0, 0};
}

// ---------------------------------------------------------------------------
// WorldConfig

void WorldConfig::validate() const {
  auto fail = [](const std::string& m) { throw ArgumentError("WorldConfig: " + m); };
  if (frames < 1) fail("frames must be >= 1, got " + std::to_string(frames));
  if (height < 8 || width < 8)
    fail("height and width must be >= 8, got " + std::to_string(height) + " x " + std::to_string(width));
  if (min_objects < 1 || max_objects > 3 || min_objects > max_objects)
    fail("objects must satisfy 1 <= min_objects <= max_objects <= 3, got min " + std::to_string(min_objects) +
         ", max " + std::to_string(max_objects));
  if (!(speed >= 0) || !std::isfinite(speed)) fail("speed must be finite and >= 0, got " + std::to_string(speed));
  if (!(small_size > 0) || !(large_size > small_size))
    fail("sizes must satisfy 0 < small_size < large_size, got " + std::to_string(small_size) + ", " +
         std::to_string(large_size));
  const double side = static_cast<double>(std::min(height, width));
  if (2 * half_extent_px(Size::Large) + 2 > side)
    fail("a large object (half-extent " + std::to_string(half_extent_px(Size::Large)) +
         " px) leaves no room to move in a " + std::to_string(height) + " x " + std::to_string(width) + " frame");
  if (half_extent_px(Size::Small) < 1.5)
    fail("a small object must have a half-extent >= 1.5 px, got " + std::to_string(half_extent_px(Size::Small)) +
         " (raise small_size or the frame size)");
  if (!(texture >= 0 && texture <= 0.5))
    fail("texture must be in [0, 0.5] (an offset in [-1, 1] pixel units), got " + std::to_string(texture));
  if (texture_cell < 1) fail("texture_cell must be >= 1 (pixels), got " + std::to_string(texture_cell));
}

double WorldConfig::speed_px() const {
  return speed * static_cast<double>(std::min(height, width));
}

double WorldConfig::half_extent_px(Size s) const {
  return (s == Size::Small ? small_size : large_size) * static_cast<double>(std::min(height, width));
}

WorldConfig WorldConfig::preset(const std::string& name) {
  WorldConfig c;  // "v1"
  if (name == "v1") return c;
  c.frames = 16, c.speed = 0.09, c.texture = 0.25, c.texture_cell = 2;
  if (name == "v2") return c;
  c.frames = 24, c.speed = 0.12, c.texture = 0.35;
  if (name == "cpu") return c;
  if (name == "gpu") {
    c.height = 64, c.width = 64;
    return c;
  }
  throw ArgumentError("world preset: expected cpu | gpu | v2 | v1, got '" + name + "'");
}

std::string WorldConfig::to_json() const {
  return json{{"frames", frames},
              {"height", height},
              {"width", width},
              {"min_objects", min_objects},
              {"max_objects", max_objects},
              {"speed", speed},
              {"small_size", small_size},
              {"large_size", large_size},
              {"texture", texture},
              {"texture_cell", texture_cell}}
      .dump();
}

WorldConfig WorldConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw ArgumentError(std::string("WorldConfig JSON: ") + e.what());
  }
  WorldConfig c;
  const char* w = "WorldConfig JSON";
  c.frames = get_field<int64_t>(j, "frames", w);
  c.height = get_field<int64_t>(j, "height", w);
  c.width = get_field<int64_t>(j, "width", w);
  c.min_objects = get_field<int64_t>(j, "min_objects", w);
  c.max_objects = get_field<int64_t>(j, "max_objects", w);
  c.speed = get_field<double>(j, "speed", w);
  c.small_size = get_field<double>(j, "small_size", w);
  c.large_size = get_field<double>(j, "large_size", w);
  // Absent from documents written before the texture existed: a flat background.
  if (j.contains("texture")) c.texture = get_field<double>(j, "texture", w);
  if (j.contains("texture_cell")) c.texture_cell = get_field<int64_t>(j, "texture_cell", w);
  c.validate();
  return c;
}

// ---------------------------------------------------------------------------
// Scenes

std::string Scene::prompt() const {
  std::string s;
  for (size_t i = 0; i < objects.size(); ++i) {
    const auto& o = objects[i];
    if (i) s += " and ";
    s += std::string("a ") + to_string(o.size) + " " + palette()[static_cast<size_t>(o.color)].name + " " +
         to_string(o.shape) + " moving " + to_string(o.direction);
  }
  s += std::string(objects.empty() ? "" : " ") + "on a " + palette()[static_cast<size_t>(background)].name +
       " background";
  return s;
}

std::string Scene::objects_json() const {
  json a = json::array();
  for (const auto& o : objects) a.push_back(object_to_json(o));
  return a.dump();
}

std::string Scene::to_json() const {
  json a = json::array();
  for (const auto& o : objects) a.push_back(object_to_json(o));
  return json{
      {"background", palette()[static_cast<size_t>(background)].name}, {"objects", a}, {"texture_seed", texture_seed}}
      .dump();
}

Scene Scene::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw ArgumentError(std::string("scene JSON: ") + e.what());
  }
  const char* w = "scene JSON";
  Scene s;
  s.background = checked_color(get_field<std::string>(j, "background", w), "scene JSON background");
  const json objs = j.contains("objects") ? j.at("objects") : json();
  if (!objs.is_array()) throw ArgumentError("scene JSON: 'objects' must be an array");
  for (const auto& oj : objs) {
    WorldObject o;
    o.shape = parse_shape(get_field<std::string>(oj, "shape", w));
    o.color = checked_color(get_field<std::string>(oj, "color", w), "scene JSON object color");
    o.size = parse_size(get_field<std::string>(oj, "size", w));
    o.direction = parse_direction(get_field<std::string>(oj, "direction", w));
    o.x = oj.contains("x") ? get_field<double>(oj, "x", w) : 0.0;
    o.y = oj.contains("y") ? get_field<double>(oj, "y", w) : 0.0;
    s.objects.push_back(o);
  }
  if (j.contains("texture_seed")) s.texture_seed = get_field<uint64_t>(j, "texture_seed", w);
  return s;
}

Scene parse_prompt(const std::string& prompt) {
  const auto words = split_words(prompt);
  size_t i = 0;
  auto expect_word = [&](const char* what) -> const std::string& {
    if (i >= words.size()) throw ArgumentError("prompt '" + prompt + "': ended where " + what + " was expected");
    return words[i++];
  };
  auto expect_exact = [&](const char* w) {
    const std::string& got = expect_word(w);
    if (got != w)
      throw ArgumentError("prompt '" + prompt + "': expected '" + w + "' at word " + std::to_string(i) + ", got '" +
                          got + "'");
  };
  Scene s;
  for (bool first = true;; first = false) {
    if (i < words.size() && words[i] == "on") break;  // the background clause
    if (!first) expect_exact("and");
    expect_exact("a");
    WorldObject o;
    try {
      o.size = parse_size(expect_word("a size"));
      o.color = checked_color(expect_word("a colour"), "colour");
      o.shape = parse_shape(expect_word("a shape"));
      expect_exact("moving");
      o.direction = parse_direction(expect_word("a direction"));
    } catch (const ArgumentError& e) {
      const std::string what = e.what();
      if (what.rfind("prompt '", 0) == 0) throw;
      throw ArgumentError("prompt '" + prompt + "': " + what);
    }
    s.objects.push_back(o);
  }
  expect_exact("on");
  expect_exact("a");
  s.background = checked_color(expect_word("the background colour"), "prompt background");
  expect_exact("background");
  if (i != words.size())
    throw ArgumentError("prompt '" + prompt + "': unexpected word '" + words[i] + "' after the background");
  for (size_t a = 0; a < s.objects.size(); ++a) {
    if (s.objects[a].color == s.background)
      throw ArgumentError("prompt '" + prompt + "': an object has the background colour");
    for (size_t b = 0; b < a; ++b)
      if (s.objects[a].color == s.objects[b].color)
        throw ArgumentError("prompt '" + prompt + "': two objects share a colour (colours identify objects)");
  }
  return s;
}

std::vector<std::array<double, 2>> trajectory(double x, double y, Direction d, double speed_px, double half_extent,
                                              int64_t frames, int64_t height, int64_t width) {
  const auto u = unit_velocity(d);
  double vx = u[0] * speed_px, vy = u[1] * speed_px;
  const double xlo = half_extent, xhi = static_cast<double>(width) - half_extent;
  const double ylo = half_extent, yhi = static_cast<double>(height) - half_extent;
  // Reflects at the walls; a loop because a fast object may cross a wall more than once per step.
  auto reflect = [](double& c, double& v, double lo, double hi) {
    if (hi <= lo) return;
    for (int k = 0; k < 64 && (c < lo || c > hi); ++k) {
      if (c < lo) c = 2 * lo - c, v = -v;
      if (c > hi) c = 2 * hi - c, v = -v;
    }
  };
  std::vector<std::array<double, 2>> out;
  out.reserve(static_cast<size_t>(std::max<int64_t>(frames, 0)));
  for (int64_t t = 0; t < frames; ++t) {
    if (t > 0) {
      x += vx, y += vy;
      reflect(x, vx, xlo, xhi);
      reflect(y, vy, ylo, yhi);
    }
    out.push_back({x, y});
  }
  return out;
}

std::vector<std::array<double, 2>> trajectory(const WorldConfig& cfg, const WorldObject& obj) {
  return trajectory(obj.x, obj.y, obj.direction, cfg.speed_px(), cfg.half_extent_px(obj.size), cfg.frames, cfg.height,
                    cfg.width);
}

bool inside_shape(Shape s, double cx, double cy, double e, double px, double py) {
  const double dx = px - cx, dy = py - cy;
  switch (s) {
    case Shape::Circle:
      return dx * dx + dy * dy <= e * e;
    case Shape::Square:
      return std::abs(dx) <= e && std::abs(dy) <= e;
    case Shape::Triangle:
      return dy >= -e && dy <= e && std::abs(dx) <= 0.5 * (dy + e);
  }
  return false;
}

Scene sample_scene(const WorldConfig& cfg, uint64_t seed) {
  cfg.validate();
  Rng rng(mix(seed, 0x5CE4E));
  const int ncolors = static_cast<int>(palette().size());
  Scene s;
  s.texture_seed = seed;
  s.background = static_cast<int>(rng.below(ncolors));
  const int64_t n = cfg.min_objects + rng.below(cfg.max_objects - cfg.min_objects + 1);
  std::vector<int> free_colors;
  for (int c = 0; c < ncolors; ++c)
    if (c != s.background) free_colors.push_back(c);
  std::vector<std::vector<std::array<double, 2>>> paths;
  for (int64_t k = 0; k < n; ++k) {
    const size_t pick = static_cast<size_t>(rng.below(static_cast<int64_t>(free_colors.size())));
    const int color = free_colors[pick];
    free_colors.erase(free_colors.begin() + static_cast<std::ptrdiff_t>(pick));
    // Colour, shape and size are drawn once; a collision redraws the direction and
    // start, and after 100 collisions a large object becomes small (3 objects
    // rarely fit on small frames otherwise).
    WorldObject o;
    o.color = color;
    o.shape = static_cast<Shape>(rng.below(kNumShapes));
    o.size = static_cast<Size>(rng.below(kNumSizes));
    for (int attempt = 0; attempt < 200; ++attempt) {
      o.direction = static_cast<Direction>(rng.below(kNumDirections));
      if (attempt == 100) o.size = Size::Small;
      const double e = cfg.half_extent_px(o.size);
      // Along each axis it moves on, start two steps clear of both walls (when the
      // frame allows): the first frames then show the prompted direction, not an
      // immediate bounce, and the reversed motion could not produce the same video.
      const auto u = unit_velocity(o.direction);
      auto draw = [&](double v, double lo, double hi) {
        const double lead = 2.0 * std::abs(v) * cfg.speed_px();
        double a = lo + lead, b = hi - lead;
        if (a > b) a = lo, b = hi;
        return rng.uniform(a, b);
      };
      o.x = draw(u[0], e, static_cast<double>(cfg.width) - e);
      o.y = draw(u[1], e, static_cast<double>(cfg.height) - e);
      auto path = trajectory(cfg, o);
      // Boxes of two objects stay at least 1.5 px apart in every frame.
      bool clear = true;
      for (size_t j = 0; j < paths.size() && clear; ++j) {
        const double gap = e + cfg.half_extent_px(s.objects[j].size) + 1.5;
        for (size_t t = 0; t < path.size(); ++t)
          if (std::abs(path[t][0] - paths[j][t][0]) < gap && std::abs(path[t][1] - paths[j][t][1]) < gap) {
            clear = false;
            break;
          }
      }
      if (clear) {
        s.objects.push_back(o);
        paths.push_back(std::move(path));
        break;
      }
    }
  }
  return s;
}

at::Tensor texture_offsets(const WorldConfig& cfg, uint64_t texture_seed) {
  cfg.validate();
  const int64_t H = cfg.height, W = cfg.width, C = cfg.texture_cell;
  at::Tensor out = at::zeros({H, W}, at::kFloat);
  if (cfg.texture == 0) return out;
  float* o = out.data_ptr<float>();
  const int64_t rows = (H + C - 1) / C, cols = (W + C - 1) / C;
  const float amp = static_cast<float>(cfg.texture);
  // Its own stream (not the scene's): the scene of a seed does not depend on the texture.
  Rng rng(mix(texture_seed, 0x7E47u));
  for (int64_t ci = 0; ci < rows; ++ci)
    for (int64_t cj = 0; cj < cols; ++cj) {
      const float val = static_cast<float>(rng.below(3) - 1) * amp;
      for (int64_t i = ci * C; i < std::min(H, (ci + 1) * C); ++i)
        for (int64_t j = cj * C; j < std::min(W, (cj + 1) * C); ++j) o[i * W + j] = val;
    }
  return out;
}

at::Tensor render(const WorldConfig& cfg, const Scene& scene) {
  cfg.validate();
  const int64_t F = cfg.frames, H = cfg.height, W = cfg.width, plane = H * W;
  at::Tensor video = at::empty({3, F, H, W}, at::kFloat);
  float* v = video.data_ptr<float>();
  const auto bg = color_value(scene.background);
  std::vector<std::vector<std::array<double, 2>>> paths;
  for (const auto& o : scene.objects) {
    color_value(o.color);  // validates the id
    paths.push_back(trajectory(cfg, o));
  }
  // The background frame, the same in every frame: flat, or textured.
  std::vector<float> back(static_cast<size_t>(3 * plane));
  for (int64_t c = 0; c < 3; ++c) std::fill_n(back.begin() + c * plane, plane, bg[static_cast<size_t>(c)]);
  if (cfg.texture > 0) {
    const at::Tensor tex = texture_offsets(cfg, scene.texture_seed);
    const float* d = tex.data_ptr<float>();
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t p = 0; p < plane; ++p)
        back[static_cast<size_t>(c * plane + p)] = std::clamp(bg[static_cast<size_t>(c)] + d[p], -1.f, 1.f);
  }
  for (int64_t t = 0; t < F; ++t) {
    for (int64_t c = 0; c < 3; ++c) std::copy_n(back.begin() + c * plane, plane, v + (c * F + t) * plane);
    for (size_t k = 0; k < scene.objects.size(); ++k) {
      const auto& o = scene.objects[k];
      const auto col = color_value(o.color);
      const double e = cfg.half_extent_px(o.size), cx = paths[k][static_cast<size_t>(t)][0],
                   cy = paths[k][static_cast<size_t>(t)][1];
      const int64_t i0 = std::max<int64_t>(0, static_cast<int64_t>(std::floor(cy - e)) - 1);
      const int64_t i1 = std::min<int64_t>(H - 1, static_cast<int64_t>(std::ceil(cy + e)) + 1);
      const int64_t j0 = std::max<int64_t>(0, static_cast<int64_t>(std::floor(cx - e)) - 1);
      const int64_t j1 = std::min<int64_t>(W - 1, static_cast<int64_t>(std::ceil(cx + e)) + 1);
      for (int64_t i = i0; i <= i1; ++i)
        for (int64_t j = j0; j <= j1; ++j)
          if (inside_shape(o.shape, cx, cy, e, static_cast<double>(j) + 0.5, static_cast<double>(i) + 0.5))
            for (int64_t c = 0; c < 3; ++c) v[(c * F + t) * plane + i * W + j] = col[static_cast<size_t>(c)];
    }
  }
  return video;
}

// ---------------------------------------------------------------------------
// Tokenizer and embeddings

const std::vector<std::string>& Tokenizer::vocab() {
  static const std::vector<std::string> v = [] {
    std::vector<std::string> w = {"<pad>", "<unk>", "a", "and", "on", "background", "moving"};
    for (const auto& c : palette()) w.push_back(c.name);
    for (auto n : kShapeNames) w.push_back(n);
    for (auto n : kSizeNames) w.push_back(n);
    for (auto n : kDirectionNames) w.push_back(n);
    return w;
  }();
  return v;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, int64_t text_len) {
  if (text_len < 1) throw ArgumentError("Tokenizer::encode: text_len must be >= 1, got " + std::to_string(text_len));
  const auto words = split_words(text);
  if (static_cast<int64_t>(words.size()) > text_len)
    throw ArgumentError("Tokenizer::encode: the prompt has " + std::to_string(words.size()) +
                        " words, more than text_len " + std::to_string(text_len) + ": '" + text + "'");
  const auto& v = vocab();
  std::vector<int64_t> ids(static_cast<size_t>(text_len), kPad);
  for (size_t i = 0; i < words.size(); ++i) {
    const auto it = std::find(v.begin(), v.end(), words[i]);
    ids[i] = (it == v.end() || it == v.begin()) ? kUnknown : static_cast<int64_t>(it - v.begin());
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) {
  const auto& v = vocab();
  std::string s;
  for (int64_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(v.size()))
      throw ArgumentError("Tokenizer::decode: id must be in [0, " + std::to_string(v.size()) + "), got " +
                          std::to_string(id));
    if (id == kPad) continue;
    s += (s.empty() ? "" : " ") + v[static_cast<size_t>(id)];
  }
  return s;
}

at::Tensor embedding_table(int64_t text_dim, uint64_t seed) {
  if (text_dim < 1) throw ArgumentError("embedding_table: text_dim must be >= 1, got " + std::to_string(text_dim));
  const int64_t V = Tokenizer::vocab_size();
  at::Tensor t = at::zeros({V, text_dim}, at::kFloat);
  float* p = t.data_ptr<float>();
  Rng rng(mix(seed, static_cast<uint64_t>(text_dim)));
  for (int64_t r = 1; r < V; ++r)
    for (int64_t d = 0; d < text_dim; ++d) p[r * text_dim + d] = static_cast<float>(rng.normal());
  return t;
}

at::Tensor embed_tokens(const std::vector<int64_t>& tokens, int64_t text_dim, uint64_t seed) {
  const at::Tensor table = embedding_table(text_dim, seed);
  for (int64_t id : tokens)
    if (id < 0 || id >= table.size(0))
      throw ArgumentError("embed_tokens: token id must be in [0, " + std::to_string(table.size(0)) + "), got " +
                          std::to_string(id));
  const at::Tensor idx = at::tensor(tokens, at::kLong);
  return table.index_select(0, idx).contiguous();
}

void TextConfig::validate() const {
  if (text_len < 1) throw ArgumentError("TextConfig: text_len must be >= 1, got " + std::to_string(text_len));
  if (text_dim < 1) throw ArgumentError("TextConfig: text_dim must be >= 1, got " + std::to_string(text_dim));
}

// ---------------------------------------------------------------------------
// Samples and datasets

uint64_t sample_seed(uint64_t dataset_seed, int64_t index) {
  return mix(dataset_seed, static_cast<uint64_t>(index));
}

std::string sample_file_name(int64_t index) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "sample_%06lld.safetensors", static_cast<long long>(index));
  return buf;
}

Sample make_sample(const WorldConfig& cfg, const TextConfig& text, uint64_t dataset_seed, int64_t index) {
  cfg.validate();
  text.validate();
  if (index < 0) throw ArgumentError("make_sample: index must be >= 0, got " + std::to_string(index));
  Sample s;
  s.world = cfg;
  s.text = text;
  s.index = index;
  s.seed = sample_seed(dataset_seed, index);
  s.scene = sample_scene(cfg, s.seed);
  s.prompt = s.scene.prompt();
  s.latents = render(cfg, s.scene);
  const auto ids = Tokenizer::encode(s.prompt, text.text_len);
  s.tokens = at::tensor(ids, at::kLong);
  s.context = embed_tokens(ids, text.text_dim, text.embedding_seed);
  return s;
}

void write_sample(const std::filesystem::path& path, const Sample& s) {
  const at::Tensor lat = s.latents.to(at::kFloat).contiguous().cpu();
  const at::Tensor ctx = s.context.to(at::kFloat).contiguous().cpu();
  const at::Tensor tok = s.tokens.to(at::kLong).contiguous().cpu();
  auto shape_of = [](const at::Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); };
  std::vector<io::TensorView> views = {{"latents", io::DType::F32, shape_of(lat), lat.data_ptr()},
                                       {"context", io::DType::F32, shape_of(ctx), ctx.data_ptr()},
                                       {"tokens", io::DType::I64, shape_of(tok), tok.data_ptr()}};
  std::map<std::string, std::string> meta = {{"format", "salad.world.v1"},
                                             {"prompt", s.prompt},
                                             {"seed", std::to_string(s.seed)},
                                             {"index", std::to_string(s.index)},
                                             {"background", palette()[static_cast<size_t>(s.scene.background)].name},
                                             {"objects", s.scene.objects_json()},
                                             {"world", s.world.to_json()},
                                             {"text_len", std::to_string(s.text.text_len)},
                                             {"text_dim", std::to_string(s.text.text_dim)},
                                             {"embedding_seed", std::to_string(s.text.embedding_seed)}};
  io::write_safetensors(path, views, meta);
}

Sample read_sample(const std::filesystem::path& path) {
  const std::string where = "world sample " + path.string();
  io::SafeTensorsFile f;
  try {
    f.open(path);
  } catch (const std::exception& e) {
    throw ArgumentError(where + ": " + e.what());
  }
  const auto& meta = f.metadata();
  auto need = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    if (it == meta.end()) throw ArgumentError(where + ": metadata '" + key + "' is missing");
    return it->second;
  };
  if (need("format") != "salad.world.v1")
    throw ArgumentError(where + ": metadata format must be 'salad.world.v1', got '" + need("format") + "'");
  Sample s;
  try {
    s.world = WorldConfig::from_json(need("world"));
    s.scene =
        Scene::from_json(R"({"background": ")" + need("background") + R"(", "objects": )" + need("objects") + "}");
    s.prompt = need("prompt");
    s.seed = std::stoull(need("seed"));
    s.scene.texture_seed = s.seed;  // sample_scene(world, seed) draws the texture from its seed
    s.index = std::stoll(need("index"));
    s.text.text_len = std::stoll(need("text_len"));
    s.text.text_dim = std::stoll(need("text_dim"));
    s.text.embedding_seed = std::stoull(need("embedding_seed"));
  } catch (const ArgumentError& e) {
    throw ArgumentError(where + ": " + e.what());
  } catch (const std::logic_error& e) {  // stoll / stoull
    throw ArgumentError(where + ": a numeric metadata field does not parse (" + e.what() + ")");
  }
  auto load = [&](const char* name, io::DType dtype, const std::vector<int64_t>& shape) {
    const io::TensorInfo* t = f.find(name);
    if (!t) throw ArgumentError(where + ": tensor '" + name + "' is missing");
    if (t->dtype != dtype || t->shape != shape) {
      auto str = [](const std::vector<int64_t>& v) {
        std::string r = "[";
        for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + std::to_string(v[i]);
        return r + "]";
      };
      throw ArgumentError(where + ": tensor '" + name + "' must be " + io::to_string(dtype) + " " + str(shape) +
                          ", got " + io::to_string(t->dtype) + " " + str(t->shape));
    }
    at::Tensor out = at::empty(shape, dtype == io::DType::F32 ? at::kFloat : at::kLong);
    std::memcpy(out.data_ptr(), t->data, t->nbytes);
    return out;
  };
  const auto& w = s.world;
  s.latents = load("latents", io::DType::F32, {3, w.frames, w.height, w.width});
  s.context = load("context", io::DType::F32, {s.text.text_len, s.text.text_dim});
  s.tokens = load("tokens", io::DType::I64, {s.text.text_len});
  if (!s.latents.isfinite().all().item<bool>()) throw ArgumentError(where + ": 'latents' has NaN or inf");
  if (!s.context.isfinite().all().item<bool>()) throw ArgumentError(where + ": 'context' has NaN or inf");
  return s;
}

VideoFile read_video_file(const std::filesystem::path& path, const std::string& tensor) {
  const std::string where = "video file " + path.string();
  io::SafeTensorsFile f;
  try {
    f.open(path);
  } catch (const std::exception& e) {
    throw ArgumentError(where + ": " + e.what());
  }
  const io::TensorInfo* t = f.find(tensor);
  if (!t) throw ArgumentError(where + ": has no tensor '" + tensor + "'");
  std::vector<int64_t> shape = t->shape;
  if (shape.size() == 5 && shape[0] == 1) shape.erase(shape.begin());
  if (shape.size() != 4 || shape[0] != 3 || !io::is_floating(t->dtype)) {
    std::string s = "[";
    for (size_t i = 0; i < t->shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t->shape[i]);
    throw ArgumentError(where + ": tensor '" + tensor + "' must be floating (3, F, H, W) or (1, 3, F, H, W), got " +
                        io::to_string(t->dtype) + " " + s + "]");
  }
  const std::vector<float> values = io::to_float_vector(*t);
  VideoFile out;
  out.video = at::tensor(values, at::kFloat).reshape(shape);
  out.metadata = f.metadata();
  return out;
}

DatasetReport write_dataset(const std::filesystem::path& dir, const WorldConfig& cfg, const TextConfig& text,
                            int64_t count, uint64_t seed, const std::function<void(int64_t, int64_t)>& progress) {
  cfg.validate();
  text.validate();
  if (count < 0) throw ArgumentError("write_dataset: count must be >= 0, got " + std::to_string(count));
  std::filesystem::create_directories(dir);
  DatasetReport rep;
  json samples = json::array();
  for (int64_t i = 0; i < count; ++i) {
    const Sample s = make_sample(cfg, text, seed, i);
    const auto path = dir / sample_file_name(i);
    bool keep = false;
    const bool exists = std::filesystem::exists(path);
    if (exists) {
      try {
        const Sample old = read_sample(path);
        keep = old.seed == s.seed && old.index == s.index && old.prompt == s.prompt &&
               old.world.to_json() == s.world.to_json() && old.scene.to_json() == s.scene.to_json() &&
               old.text.embedding_seed == s.text.embedding_seed && old.latents.equal(s.latents) &&
               old.context.equal(s.context) && old.tokens.equal(s.tokens);
      } catch (const std::exception&) {
        keep = false;
      }
    }
    if (!keep) write_sample(path, s);
    (keep ? rep.kept : exists ? rep.replaced : rep.written) += 1;
    samples.push_back(json{{"file", sample_file_name(i)}, {"seed", s.seed}, {"prompt", s.prompt}});
    if (progress) progress(i + 1, count);
  }
  json index = {
      {"format", "salad.world.v1"},
      {"count", count},
      {"seed", seed},
      {"world", json::parse(cfg.to_json())},
      {"text", {{"text_len", text.text_len}, {"text_dim", text.text_dim}, {"embedding_seed", text.embedding_seed}}},
      {"vocab", Tokenizer::vocab()},
      {"samples", samples}};
  rep.index = dir / "index.json";
  write_text_atomic(rep.index, index.dump(1) + "\n");
  return rep;
}

}  // namespace salad::world
