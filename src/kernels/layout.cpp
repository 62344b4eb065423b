#include "salad/layout.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

namespace salad {
namespace {

template <class S>
void topk_impl(const S* scores, int64_t n, int64_t k, int32_t* out) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  // Larger score first; equal scores (and NaN, which compares false) keep the lower index.
  auto before = [&](int32_t a, int32_t b) {
    S sa = scores[a], sb = scores[b];
    bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return nb;  // NaN scores rank last
    if (!na && sa != sb) return sa > sb;
    return a < b;
  };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), before);
  std::sort(ids.begin(), ids.begin() + k);
  std::copy(ids.begin(), ids.begin() + k, out);
}

// The set of tiles (flattened tile-grid ids) touched by block-order positions [lo, hi).
std::vector<int64_t> touched_tiles(const std::vector<int64_t>& order, const Grid& g,
                                   const Extent3& tile, int64_t lo, int64_t hi) {
  std::vector<int64_t> out;
  const int64_t th = (g.h + tile.h - 1) / tile.h, tw = (g.w + tile.w - 1) / tile.w;
  for (int64_t p = lo; p < hi; ++p) {
    int64_t f, h, w;
    token_coords(g, order[p], &f, &h, &w);
    out.push_back(((f / tile.f) * th + h / tile.h) * tw + w / tile.w);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace

const char* to_string(Mode m) {
  switch (m) {
    case Mode::Dense: return "dense";
    case Mode::Sparse: return "sparse";
    case Mode::Salad: return "salad";
  }
  return "?";
}
const char* to_string(Pattern p) { return p == Pattern::TopK ? "topk" : "window"; }
const char* to_string(FeatureMap f) {
  switch (f) {
    case FeatureMap::Relu: return "relu";
    case FeatureMap::Elu1: return "elu1";
    case FeatureMap::Softmax: return "softmax";
  }
  return "?";
}
const char* to_string(DType t) {
  switch (t) {
    case DType::F64: return "float64";
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
  }
  return "?";
}
Mode parse_mode(const std::string& s) {
  if (s == "dense") return Mode::Dense;
  if (s == "sparse") return Mode::Sparse;
  if (s == "salad") return Mode::Salad;
  fail("mode: expected one of dense|sparse|salad, got '", s, "'");
}
Pattern parse_pattern(const std::string& s) {
  if (s == "topk") return Pattern::TopK;
  if (s == "window") return Pattern::Window;
  fail("pattern: expected one of topk|window, got '", s, "'");
}
FeatureMap parse_feature(const std::string& s) {
  if (s == "relu") return FeatureMap::Relu;
  if (s == "elu1") return FeatureMap::Elu1;
  if (s == "softmax") return FeatureMap::Softmax;
  fail("feature: expected one of relu|elu1|softmax, got '", s, "'");
}

double Params::softmax_scale() const {
  return opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(D));
}

std::array<int64_t, 3> Params::out_strides() const {
  if (o_stride[0] == 0 && o_stride[1] == 0 && o_stride[2] == 0) return {H * L * D, L * D, D};
  return {o_stride[0], o_stride[1], o_stride[2]};
}

bool Params::out_contiguous() const {
  const std::array<int64_t, 3> s = out_strides();
  return s[0] == H * L * D && s[1] == L * D && s[2] == D;
}

BlockShape Params::blocks() const {
  BlockShape b;
  if (opt.block_q <= 0 || opt.block_k <= 0 || L <= 0) return b;
  b.n_q = (L + opt.block_q - 1) / opt.block_q;
  b.n_k = (L + opt.block_k - 1) / opt.block_k;
  if (opt.mode == Mode::Dense)
    b.max_k = 0;
  else if (opt.pattern == Pattern::Window)
    b.max_k = b.n_k;
  else
    b.max_k = keep_count(opt.keep, b.n_k);
  return b;
}

int64_t keep_count(double keep, int64_t n_k) {
  if (n_k <= 0) return 0;
  double x = keep * static_cast<double>(n_k);
  double r = std::round(x);
  int64_t k = std::fabs(x - r) < 1e-9 ? static_cast<int64_t>(r) : static_cast<int64_t>(std::ceil(x));
  return std::clamp<int64_t>(k, 1, n_k);
}

void validate_options(const Options& o, int64_t L, int64_t D) {
  if (o.block_q <= 0) fail("block_q: expected a positive token count, got ", o.block_q);
  if (o.block_k <= 0) fail("block_k: expected a positive token count, got ", o.block_k);
  if (!(o.keep > 0.0 && o.keep <= 1.0)) fail("keep: expected a fraction in (0, 1], got ", o.keep);
  if (o.tile_order && (o.tile.f <= 0 || o.tile.h <= 0 || o.tile.w <= 0))
    fail("tile: expected three positive sizes (ft,ht,wt), got (", o.tile.f, ",", o.tile.h, ",",
         o.tile.w, ")");
  if (o.window.f < 0 || o.window.h < 0 || o.window.w < 0)
    fail("window: expected three non-negative radii (wf,wh,ww), got (", o.window.f, ",",
         o.window.h, ",", o.window.w, ")");
  if (!(o.eps > 0.0) || !std::isfinite(o.eps)) fail("eps: expected a positive finite number, got ", o.eps);
  if (!(o.rope_theta > 0.0)) fail("rope_theta: expected a positive number, got ", o.rope_theta);
  if (!(o.scale >= 0.0) || !std::isfinite(o.scale))
    fail("scale: expected 0 (meaning 1/sqrt(D)) or a positive number, got ", o.scale);
  if (L <= 0) fail("L: expected a positive token count, got ", L);
  if (D <= 0 || D % 2 != 0) fail("D: expected a positive even head width, got ", D);
  if (D < 6) fail("D: expected a head width of at least 6 (3-D RoPE needs a pair per axis), got ", D);
}

void validate(const Params& p) {
  if (p.B <= 0) fail("B: expected a positive batch size, got ", p.B);
  if (p.H <= 0) fail("H: expected a positive head count, got ", p.H);
  if (p.grid.f <= 0 || p.grid.h <= 0 || p.grid.w <= 0)
    fail("grid: expected three positive sizes (F,H,W), got (", p.grid.f, ",", p.grid.h, ",",
         p.grid.w, ")");
  if (p.grid.size() != p.L)
    fail("grid: expected F*H*W to equal the token count L=", p.L, ", got ", p.grid.f, "*",
         p.grid.h, "*", p.grid.w, "=", p.grid.size());
  validate_options(p.opt, p.L, p.D);
  if (!p.q || !p.k || !p.v) fail("q/k/v: expected non-null input pointers");
  if (!p.o_s || !p.lse) fail("o_s/lse: expected non-null output pointers");
  if (p.opt.mode == Mode::Salad && !p.o_l) fail("o_l: expected an output pointer in mode salad");
  if (!p.out_contiguous()) {
    const std::array<int64_t, 3> s = p.out_strides();
    // The two layouts the kernels write: (B, H, L, D) and (B, L, H, D).
    if (!(s[0] == p.L * p.H * p.D && s[1] == p.D && s[2] == p.H * p.D))
      fail("o_stride: expected all zero, (", p.H * p.L * p.D, ", ", p.L * p.D, ", ", p.D, ") or (", p.L * p.H * p.D,
           ", ", p.D, ", ", p.H * p.D, "), got (", s[0], ", ", s[1], ", ", s[2], ")");
  }
  if (p.opt.mode != Mode::Dense && (!p.block_idx || !p.block_cnt))
    fail("block_idx/block_cnt: expected block-table pointers in mode ", to_string(p.opt.mode));
}

std::vector<int64_t> token_order(const Grid& g, const Options& o) {
  std::vector<int64_t> order(static_cast<size_t>(g.size()));
  if (!o.tile_order) {
    std::iota(order.begin(), order.end(), int64_t{0});
    return order;
  }
  const Extent3& t = o.tile;
  size_t p = 0;
  for (int64_t f0 = 0; f0 < g.f; f0 += t.f)
    for (int64_t h0 = 0; h0 < g.h; h0 += t.h)
      for (int64_t w0 = 0; w0 < g.w; w0 += t.w)
        for (int64_t f = f0; f < std::min(f0 + t.f, g.f); ++f)
          for (int64_t h = h0; h < std::min(h0 + t.h, g.h); ++h)
            for (int64_t w = w0; w < std::min(w0 + t.w, g.w); ++w)
              order[p++] = (f * g.h + h) * g.w + w;
  return order;
}

RopePairs rope_pairs(int64_t D, double theta) {
  RopeSplit s = rope_split(D);
  RopePairs r;
  const int64_t dims[3] = {s.f, s.h, s.w};
  for (int a = 0; a < 3; ++a)
    for (int64_t i = 0; i < dims[a] / 2; ++i) {
      r.axis.push_back(a);
      // Wan: 1 / theta^(arange(0, d, 2) / d)
      r.freq.push_back(1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(dims[a])));
    }
  return r;
}

void topk_row(const float* s, int64_t n, int64_t k, int32_t* out) { topk_impl(s, n, k, out); }
void topk_row(const double* s, int64_t n, int64_t k, int32_t* out) { topk_impl(s, n, k, out); }

void window_table(const Grid& g, const Options& o, std::vector<int32_t>* idx,
                  std::vector<int32_t>* cnt) {
  const int64_t L = g.size();
  const int64_t n_q = (L + o.block_q - 1) / o.block_q, n_k = (L + o.block_k - 1) / o.block_k;
  const std::vector<int64_t> order = token_order(g, o);
  const Extent3 tile = o.tile_order ? o.tile : Extent3{1, 1, 1};
  const int64_t th = (g.h + tile.h - 1) / tile.h, tw = (g.w + tile.w - 1) / tile.w;
  auto coords = [&](int64_t id, int64_t* a, int64_t* b, int64_t* c) {
    *c = id % tw;
    *b = (id / tw) % th;
    *a = id / (tw * th);
  };
  std::vector<std::vector<int64_t>> kt(static_cast<size_t>(n_k));
  for (int64_t j = 0; j < n_k; ++j)
    kt[j] = touched_tiles(order, g, tile, j * o.block_k, std::min(L, (j + 1) * o.block_k));
  idx->assign(static_cast<size_t>(n_q * n_k), -1);
  cnt->assign(static_cast<size_t>(n_q), 0);
  for (int64_t i = 0; i < n_q; ++i) {
    std::vector<int64_t> qt = touched_tiles(order, g, tile, i * o.block_q, std::min(L, (i + 1) * o.block_q));
    int32_t c = 0;
    for (int64_t j = 0; j < n_k; ++j) {
      bool near = false;
      for (int64_t a : qt) {
        int64_t af, ah, aw;
        coords(a, &af, &ah, &aw);
        for (int64_t b : kt[j]) {
          int64_t bf, bh, bw;
          coords(b, &bf, &bh, &bw);
          if (std::llabs(af - bf) <= o.window.f && std::llabs(ah - bh) <= o.window.h &&
              std::llabs(aw - bw) <= o.window.w) {
            near = true;
            break;
          }
        }
        if (near) break;
      }
      if (near) (*idx)[i * n_k + c++] = static_cast<int32_t>(j);
    }
    (*cnt)[i] = c;
  }
}

void invert_table(const int32_t* idx, const int32_t* cnt, int64_t n_q, int64_t max_k, int64_t n_k,
                  std::vector<int32_t>* offsets, std::vector<int32_t>* rows) {
  offsets->assign(static_cast<size_t>(n_k + 1), 0);
  for (int64_t i = 0; i < n_q; ++i)
    for (int32_t c = 0; c < cnt[i]; ++c) ++(*offsets)[idx[i * max_k + c] + 1];
  for (int64_t j = 0; j < n_k; ++j) (*offsets)[j + 1] += (*offsets)[j];
  rows->assign(static_cast<size_t>((*offsets)[n_k]), 0);
  std::vector<int32_t> fill(offsets->begin(), offsets->end() - 1);
  for (int64_t i = 0; i < n_q; ++i)  // i ascending, so each list comes out ascending
    for (int32_t c = 0; c < cnt[i]; ++c) (*rows)[fill[idx[i * max_k + c]]++] = static_cast<int32_t>(i);
}

}  // namespace salad
