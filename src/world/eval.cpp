// Video metrics of the shapes world (see include/salad/eval.h for the definitions).
#include "salad/eval.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "salad/layout.h"

namespace salad::eval {
namespace {

double clamp01(double v) {
  return std::min(1.0, std::max(0.0, v));
}

// 1 up to `slack`, falling linearly to 0 at slack + width.
double falloff(double err, double slack, double width) {
  return clamp01(1.0 - std::max(0.0, err - slack) / width);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Blob blob_of(const std::vector<int64_t>& pixels, int64_t W) {
  Blob b;
  if (pixels.empty()) return b;
  int64_t i0 = INT64_MAX, i1 = -1, j0 = INT64_MAX, j1 = -1;
  for (int64_t p : pixels) {
    const int64_t i = p / W, j = p % W;
    i0 = std::min(i0, i), i1 = std::max(i1, i), j0 = std::min(j0, j), j1 = std::max(j1, j);
  }
  const double w = static_cast<double>(j1 - j0 + 1), h = static_cast<double>(i1 - i0 + 1);
  b.found = true;
  b.area = static_cast<int64_t>(pixels.size());
  b.cx = 0.5 * static_cast<double>(j0 + j1 + 1);
  b.cy = 0.5 * static_cast<double>(i0 + i1 + 1);
  b.half_extent = 0.25 * (w + h);
  b.fill = static_cast<double>(b.area) / (w * h);
  double top = 0;
  for (int64_t p : pixels) {
    const double row_centre = static_cast<double>(p / W) + 0.5;
    top += row_centre < b.cy ? 1.0 : row_centre == b.cy ? 0.5 : 0.0;
  }
  b.top_share = top / static_cast<double>(b.area);
  b.shape = classify_shape(b.fill, b.top_share);
  return b;
}

// The colours a textured background can take: clamp(bg + s (1, 1, 1), -1, 1)
// for s in [-texture, texture], a polyline in RGB (it bends where a channel
// reaches +-1). A single point when texture == 0.
struct BackgroundPath {
  std::vector<std::array<double, 3>> pts;

  BackgroundPath(const std::array<float, 3>& bg, double texture) {
    std::vector<double> s = {-texture, texture};
    for (int c = 0; c < 3; ++c)
      for (double lim : {-1.0, 1.0}) {
        const double b = lim - static_cast<double>(bg[static_cast<size_t>(c)]);
        if (b > -texture && b < texture) s.push_back(b);
      }
    std::sort(s.begin(), s.end());
    for (double x : s) {
      std::array<double, 3> p{};
      for (int c = 0; c < 3; ++c) p[static_cast<size_t>(c)] = std::clamp(bg[static_cast<size_t>(c)] + x, -1.0, 1.0);
      pts.push_back(p);
    }
  }
  // Squared distance from (r, g, b) to the path; its nearest point in `q`.
  double dist2(double r, double g, double b, std::array<double, 3>* q) const {
    const double x[3] = {r, g, b};
    double best = 1e300;
    *q = pts[0];
    for (size_t k = 0; k + 1 < pts.size(); ++k) {
      const auto &a = pts[k], &e = pts[k + 1];
      double dd = 0, dx = 0;
      for (int c = 0; c < 3; ++c) {
        const double u = e[static_cast<size_t>(c)] - a[static_cast<size_t>(c)];
        dd += u * u, dx += u * (x[c] - a[static_cast<size_t>(c)]);
      }
      const double t = dd > 0 ? std::clamp(dx / dd, 0.0, 1.0) : 0.0;
      double d = 0;
      std::array<double, 3> p{};
      for (int c = 0; c < 3; ++c) {
        p[static_cast<size_t>(c)] =
            a[static_cast<size_t>(c)] + t * (e[static_cast<size_t>(c)] - a[static_cast<size_t>(c)]);
        d += (x[c] - p[static_cast<size_t>(c)]) * (x[c] - p[static_cast<size_t>(c)]);
      }
      if (d < best) best = d, *q = p;
    }
    return best;
  }
};

}  // namespace

world::Shape classify_shape(double fill, double top_share) {
  if (top_share < 0.38) return world::Shape::Triangle;  // apex up: about a quarter of the area above the middle
  if (fill >= 0.9) return world::Shape::Square;         // fills its box; a disc fills pi/4
  return world::Shape::Circle;
}

std::string VideoMetrics::to_json() const {
  return nlohmann::json{{"subject_consistency", subject_consistency},
                        {"background_consistency", background_consistency},
                        {"imaging_quality", imaging_quality},
                        {"text_consistency", text_consistency},
                        {"sum", sum()}}
      .dump();
}

VideoMetrics mean(const std::vector<VideoMetrics>& m) {
  VideoMetrics r;
  if (m.empty()) return r;
  for (const auto& x : m) {
    r.subject_consistency += x.subject_consistency;
    r.background_consistency += x.background_consistency;
    r.imaging_quality += x.imaging_quality;
    r.text_consistency += x.text_consistency;
  }
  const double n = static_cast<double>(m.size());
  r.subject_consistency /= n, r.background_consistency /= n, r.imaging_quality /= n, r.text_consistency /= n;
  return r;
}

Report analyse(const at::Tensor& video, const world::Scene& scene, const world::WorldConfig& cfg,
               const EvalOptions& opt) {
  cfg.validate();
  if (!video.defined() || video.dim() != 4 || video.size(0) != 3 || !at::isFloatingType(video.scalar_type()))
    throw ArgumentError("evaluate: video must be a floating (3, F, H, W) tensor, got " +
                        (video.defined()
                             ? std::string(c10::toString(video.scalar_type())) + " " + c10::str(video.sizes())
                             : std::string("an undefined tensor")));
  if (video.size(1) != cfg.frames || video.size(2) != cfg.height || video.size(3) != cfg.width)
    throw ArgumentError("evaluate: video (3, F, H, W) = " + c10::str(video.sizes()) + " does not match the world " +
                        std::to_string(cfg.frames) + " x " + std::to_string(cfg.height) + " x " +
                        std::to_string(cfg.width));
  const int P = static_cast<int>(world::palette().size());
  world::color_value(scene.background);  // validates ids
  for (const auto& o : scene.objects) world::color_value(o.color);

  const at::Tensor x = video.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* v = x.data_ptr<float>();
  const int64_t F = cfg.frames, H = cfg.height, W = cfg.width, N = H * W;
  std::vector<std::array<float, 3>> pal(static_cast<size_t>(P));
  for (int c = 0; c < P; ++c) pal[static_cast<size_t>(c)] = world::color_value(c);
  const int bg = scene.background;
  const auto bgc = pal[static_cast<size_t>(bg)];
  const double small_e = cfg.half_extent_px(world::Size::Small), large_e = cfg.half_extent_px(world::Size::Large);
  const double min_area = std::max(4.0, opt.min_area_fraction * M_PI * small_e * small_e);
  // A textured world: the background's distance is to its texture path, and
  // background pixels are compared with the path (see eval.h).
  const bool textured = cfg.texture > 0;
  const BackgroundPath bg_path(bgc, cfg.texture);
  std::vector<std::array<double, 3>> bg_point(textured ? static_cast<size_t>(N) : 0);
  std::vector<uint8_t> prev_mask(textured ? static_cast<size_t>(N) : 0);
  double change_sum = 0, change_count = 0;

  Report rep;
  rep.blobs.assign(static_cast<size_t>(P), std::vector<Blob>(static_cast<size_t>(F)));
  std::vector<int> nearest(static_cast<size_t>(N)), label(static_cast<size_t>(N)), comp(static_cast<size_t>(N));
  std::vector<double> dist(static_cast<size_t>(N));
  std::vector<uint8_t> object_mask(static_cast<size_t>(N));
  std::vector<int64_t> stack;
  double closeness_sum = 0, isolated = 0, bg_score_sum = 0, bg_match_frames = 0, flicker_sum = 0;
  std::array<double, 3> prev_mean{0, 0, 0};
  bool have_prev = false;

  for (int64_t t = 0; t < F; ++t) {
    // Nearest palette colour of every pixel.
    for (int64_t p = 0; p < N; ++p) {
      const float r = v[(0 * F + t) * N + p], g = v[(1 * F + t) * N + p], b = v[(2 * F + t) * N + p];
      double best = 1e30;
      int arg = 0;
      for (int c = 0; c < P; ++c) {
        const auto& q = pal[static_cast<size_t>(c)];
        const double d = textured && c == bg
                             ? bg_path.dist2(r, g, b, &bg_point[static_cast<size_t>(p)])
                             : (r - q[0]) * (r - q[0]) + (g - q[1]) * (g - q[1]) + (b - q[2]) * (b - q[2]);
        if (d < best) best = d, arg = c;
      }
      const double d = std::isfinite(best) ? std::sqrt(best) : 1e30;
      nearest[static_cast<size_t>(p)] = arg;
      dist[static_cast<size_t>(p)] = d;
      label[static_cast<size_t>(p)] = d < opt.assign_tol ? arg : -1;
      closeness_sum += falloff(d, 0.03, opt.imaging_width);
    }
    // Isolated pixels: nearest colour differs from every existing 4-neighbour.
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        const int c = nearest[static_cast<size_t>(i * W + j)];
        bool alone = true;
        if (i > 0 && nearest[static_cast<size_t>((i - 1) * W + j)] == c) alone = false;
        if (i + 1 < H && nearest[static_cast<size_t>((i + 1) * W + j)] == c) alone = false;
        if (j > 0 && nearest[static_cast<size_t>(i * W + j - 1)] == c) alone = false;
        if (j + 1 < W && nearest[static_cast<size_t>(i * W + j + 1)] == c) alone = false;
        isolated += alone ? 1 : 0;
      }
    // 4-connected components of equal assigned colour; keep each colour's largest.
    std::fill(comp.begin(), comp.end(), -1);
    std::vector<std::vector<int64_t>> best_pixels(static_cast<size_t>(P));
    int next_comp = 0;
    std::vector<int64_t> pixels;
    for (int64_t s = 0; s < N; ++s) {
      const int c = label[static_cast<size_t>(s)];
      if (c < 0 || c == bg || comp[static_cast<size_t>(s)] >= 0) continue;
      pixels.clear();
      stack.assign(1, s);
      comp[static_cast<size_t>(s)] = next_comp;
      while (!stack.empty()) {
        const int64_t p = stack.back();
        stack.pop_back();
        pixels.push_back(p);
        const int64_t i = p / W, j = p % W;
        const int64_t nb[4] = {i > 0 ? p - W : -1, i + 1 < H ? p + W : -1, j > 0 ? p - 1 : -1, j + 1 < W ? p + 1 : -1};
        for (int64_t q : nb)
          if (q >= 0 && comp[static_cast<size_t>(q)] < 0 && label[static_cast<size_t>(q)] == c) {
            comp[static_cast<size_t>(q)] = next_comp;
            stack.push_back(q);
          }
      }
      ++next_comp;
      auto& best = best_pixels[static_cast<size_t>(c)];
      if (pixels.size() > best.size()) best = pixels;
    }
    std::fill(object_mask.begin(), object_mask.end(), 0);
    for (int c = 0; c < P; ++c) {
      const auto& px = best_pixels[static_cast<size_t>(c)];
      if (c == bg || static_cast<double>(px.size()) < min_area) continue;
      rep.blobs[static_cast<size_t>(c)][static_cast<size_t>(t)] = blob_of(px, W);
      for (int64_t p : px) {  // the blob dilated by one pixel is not background
        const int64_t i = p / W, j = p % W;
        for (int64_t di = -1; di <= 1; ++di)
          for (int64_t dj = -1; dj <= 1; ++dj)
            if (i + di >= 0 && i + di < H && j + dj >= 0 && j + dj < W)
              object_mask[static_cast<size_t>((i + di) * W + j + dj)] = 1;
      }
    }
    // Background region: its share of pixels nearest to the prompted colour, its mean colour.
    std::array<double, 3> mean{0, 0, 0};
    std::vector<int64_t> votes(static_cast<size_t>(P), 0);
    int64_t n = 0, on_bg = 0;
    for (int64_t p = 0; p < N; ++p) {
      if (object_mask[static_cast<size_t>(p)]) continue;
      ++n;
      const int c = nearest[static_cast<size_t>(p)];
      ++votes[static_cast<size_t>(c)];
      on_bg += c == bg;
      for (int ch = 0; ch < 3; ++ch) {
        const float val = v[(ch * F + t) * N + p];
        // Textured: the colour less its texture offset (bg + the distance vector to the texture path).
        const double x =
            textured ? bgc[static_cast<size_t>(ch)] +
                           (static_cast<double>(val) - bg_point[static_cast<size_t>(p)][static_cast<size_t>(ch)])
                     : static_cast<double>(val);
        mean[static_cast<size_t>(ch)] += std::isfinite(x) ? x : 10.0;
      }
      // Textured: per-pixel change since the previous frame, where both frames show background.
      if (textured && t > 0 && !prev_mask[static_cast<size_t>(p)]) {
        double d2 = 0;
        for (int ch = 0; ch < 3; ++ch) {
          const double a = v[(ch * F + t) * N + p], b = v[(ch * F + t - 1) * N + p];
          d2 += (a - b) * (a - b);
        }
        change_sum += std::isfinite(d2) ? std::sqrt(d2) : 10.0;
        change_count += 1;
      }
    }
    if (textured) prev_mask = object_mask;
    if (n > 0) {
      for (auto& m : mean) m /= static_cast<double>(n);
      double e = 0;
      for (int ch = 0; ch < 3; ++ch)
        e += (mean[static_cast<size_t>(ch)] - bgc[static_cast<size_t>(ch)]) *
             (mean[static_cast<size_t>(ch)] - bgc[static_cast<size_t>(ch)]);
      const double uniform = static_cast<double>(on_bg) / static_cast<double>(n);
      bg_score_sum += uniform * falloff(std::sqrt(e), 0.05, 0.3);
      const int majority = static_cast<int>(std::max_element(votes.begin(), votes.end()) - votes.begin());
      bg_match_frames += majority == bg;
      if (have_prev) {
        double f = 0;
        for (int ch = 0; ch < 3; ++ch)
          f += (mean[static_cast<size_t>(ch)] - prev_mean[static_cast<size_t>(ch)]) *
               (mean[static_cast<size_t>(ch)] - prev_mean[static_cast<size_t>(ch)]);
        flicker_sum += std::sqrt(f);
      }
      prev_mean = mean;
      have_prev = true;
    } else {
      have_prev = false;
    }
  }

  const double Fd = static_cast<double>(F);
  VideoMetrics& m = rep.metrics;
  // Imaging quality.
  const double iso_share = isolated / (Fd * static_cast<double>(N));
  m.imaging_quality =
      clamp01(0.8 * closeness_sum / (Fd * static_cast<double>(N)) + 0.2 * clamp01(1.0 - 10.0 * iso_share));
  // Background consistency.
  const double mean_flicker = F > 1 ? flicker_sum / (Fd - 1) : 0.0;
  m.background_consistency = clamp01(bg_score_sum / Fd * falloff(mean_flicker, 0.02, 0.15));
  if (textured) {  // the texture must hold still: per-pixel stability of the background
    const double mean_change = change_count > 0 ? change_sum / change_count : 0.0;
    m.background_consistency *= falloff(mean_change, 0.05, 0.3);
  }
  rep.background_match = bg_match_frames / Fd;

  // Subject consistency: every detected colour is a track.
  double subject_sum = 0;
  int tracks = 0;
  for (int c = 0; c < P; ++c) {
    const auto& bl = rep.blobs[static_cast<size_t>(c)];
    std::vector<double> areas;
    int counts[world::kNumShapes] = {0, 0, 0};
    for (const auto& b : bl)
      if (b.found) areas.push_back(static_cast<double>(b.area)), ++counts[static_cast<int>(b.shape)];
    if (areas.empty()) continue;
    const double med = median(areas);
    double area_score = 0;
    for (double a : areas) area_score += falloff(std::abs(a / med - 1.0), 0.25, 0.5);
    area_score /= static_cast<double>(areas.size());
    const double shape_score =
        static_cast<double>(*std::max_element(counts, counts + world::kNumShapes)) / static_cast<double>(areas.size());
    const double presence = static_cast<double>(areas.size()) / Fd;
    subject_sum += presence * 0.5 * (area_score + shape_score);
    ++tracks;
  }
  m.subject_consistency = tracks ? clamp01(subject_sum / tracks) : 0.0;

  // Text consistency.
  double text_sum = 0.5 * rep.background_match;
  std::vector<bool> prompted(static_cast<size_t>(P), false);
  for (const auto& o : scene.objects) {
    prompted[static_cast<size_t>(o.color)] = true;
    const auto& bl = rep.blobs[static_cast<size_t>(o.color)];
    ObjectScore os;
    os.color = o.color;
    const double e = cfg.half_extent_px(o.size);
    int64_t t0 = -1;
    for (int64_t t = 0; t < F; ++t) {
      const Blob& b = bl[static_cast<size_t>(t)];
      if (!b.found) continue;
      if (t0 < 0) t0 = t;
      os.presence += 1;
      os.shape += b.shape == o.shape;
      const bool looks_small =
          std::abs(std::log(b.half_extent / small_e)) <= std::abs(std::log(b.half_extent / large_e));
      os.size += looks_small == (o.size == world::Size::Small);
    }
    os.presence /= Fd, os.shape /= Fd, os.size /= Fd;
    if (t0 >= 0 && F > 1) {
      const double tol = std::max(1.0, opt.motion_tol * e);
      const Blob& first = bl[static_cast<size_t>(t0)];
      const int steps = static_cast<int>(std::ceil(opt.start_search_px / 0.25));
      double best = 0;
      for (int a = -steps; a <= steps; ++a)
        for (int b = -steps; b <= steps; ++b) {
          const double sx = first.cx + opt.start_search_px * a / std::max(steps, 1),
                       sy = first.cy + opt.start_search_px * b / std::max(steps, 1);
          const auto path = world::trajectory(sx, sy, o.direction, cfg.speed_px(), e, F - t0, H, W);
          double s = 0;
          for (int64_t t = t0 + 1; t < F; ++t) {
            const Blob& bt = bl[static_cast<size_t>(t)];
            if (!bt.found) continue;
            const auto& q = path[static_cast<size_t>(t - t0)];
            s += falloff(std::hypot(bt.cx - q[0], bt.cy - q[1]), opt.motion_slack_px, tol);
          }
          best = std::max(best, s);
        }
      // Frames before the first detection count as misses, like undetected frames.
      os.motion = best / (Fd - 1);
    } else if (t0 >= 0) {
      os.motion = 1.0;  // a single frame shows no motion to check
    }
    os.score = 0.15 * os.presence + 0.15 * os.shape + 0.1 * os.size + 0.6 * os.motion;
    text_sum += os.score;
    rep.objects.push_back(os);
  }
  for (int c = 0; c < P; ++c) {
    if (c == bg || prompted[static_cast<size_t>(c)]) continue;
    int64_t found = 0;
    for (const auto& b : rep.blobs[static_cast<size_t>(c)]) found += b.found;
    if (2 * found >= F) ++rep.extra_tracks;
  }
  m.text_consistency =
      clamp01(text_sum / (static_cast<double>(scene.objects.size()) + 0.5 + static_cast<double>(rep.extra_tracks)));
  return rep;
}

VideoMetrics evaluate(const at::Tensor& video, const world::Scene& scene, const world::WorldConfig& cfg,
                      const EvalOptions& opt) {
  return analyse(video, scene, cfg, opt).metrics;
}

}  // namespace salad::eval
