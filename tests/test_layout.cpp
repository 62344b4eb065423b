// Host-side index math, without LibTorch or a GPU: block counts, Top-K ties,
// token order, 3-D RoPE, the window pattern, the inverse table, validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "../src/kernels/cpu/common.h"
#include "../src/kernels/fastdiv.h"
#include "salad/kernels.h"
#include "salad/layout.h"

using namespace salad;

TEST(KeepCount, CeilClampAndExactProducts) {
  EXPECT_EQ(keep_count(0.10, 30), 3);   // 0.1*30 = 3.0000000000000004 in binary: still 3
  EXPECT_EQ(keep_count(0.10, 31), 4);   // ceil(3.1)
  EXPECT_EQ(keep_count(0.10, 512), 52); // ceil(51.2)
  EXPECT_EQ(keep_count(0.05, 10), 1);   // ceil(0.5)
  EXPECT_EQ(keep_count(0.001, 10), 1);  // clamp to at least 1
  EXPECT_EQ(keep_count(1.0, 17), 17);
  EXPECT_EQ(keep_count(0.5, 7), 4);
  for (int64_t n = 1; n < 200; ++n)
    for (double keep : {0.05, 0.1, 0.25, 0.5}) {
      const int64_t k = keep_count(keep, n);
      EXPECT_GE(k, 1);
      EXPECT_LE(k, n);
      EXPECT_GE(static_cast<double>(k), keep * n - 1e-9) << "n=" << n << " keep=" << keep;
      if (k > 1) {
        EXPECT_LT(static_cast<double>(k - 1), keep * n - 1e-9) << "n=" << n;  // smallest such k
      }
    }
}

TEST(TopK, LargestFirstTiesToLowerIndexAscendingOutput) {
  const float s[] = {0.5f, 2.0f, 1.0f, 2.0f, 2.0f, -1.0f};
  int32_t out[3];
  topk_row(s, 6, 3, out);
  EXPECT_EQ(std::vector<int32_t>(out, out + 3), (std::vector<int32_t>{1, 3, 4}));
  int32_t out4[4];
  topk_row(s, 6, 4, out4);
  EXPECT_EQ(std::vector<int32_t>(out4, out4 + 4), (std::vector<int32_t>{1, 2, 3, 4}));
  const double eq[] = {1, 1, 1, 1};
  int32_t o2[2];
  topk_row(eq, 4, 2, o2);
  EXPECT_EQ(o2[0], 0);
  EXPECT_EQ(o2[1], 1);
  const float withnan[] = {NAN, 0.0f, -5.0f};
  int32_t o1[2];
  topk_row(withnan, 3, 2, o1);  // NaN ranks last
  EXPECT_EQ(o1[0], 1);
  EXPECT_EQ(o1[1], 2);
}

TEST(TopK, MatchesBruteForceOnRandomRows) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> val(0, 5);  // many ties on purpose
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + trial % 37, k = 1 + trial % n;
    std::vector<float> s(n);
    for (float& x : s) x = static_cast<float>(val(rng));
    std::vector<int32_t> got(k);
    topk_row(s.data(), n, k, got.data());
    std::vector<int32_t> ids(n);
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return s[a] > s[b]; });
    std::vector<int32_t> want(ids.begin(), ids.begin() + k);
    std::sort(want.begin(), want.end());
    ASSERT_EQ(got, want) << "trial " << trial;
  }
}

TEST(TokenOrder, RasterIsIdentity) {
  Options o;
  const auto ord = token_order({2, 3, 5}, o);
  for (size_t i = 0; i < ord.size(); ++i) EXPECT_EQ(ord[i], static_cast<int64_t>(i));
}

TEST(TokenOrder, TilesArePermutationsGroupedByTileWithPartialEdges) {
  for (Extent3 tile : {Extent3{1, 2, 2}, Extent3{2, 3, 4}, Extent3{3, 3, 3}, Extent3{1, 1, 7}}) {
    const Grid g{5, 7, 9};
    Options o;
    o.tile_order = true;
    o.tile = tile;
    const auto ord = token_order(g, o);
    ASSERT_EQ(static_cast<int64_t>(ord.size()), g.size());
    std::vector<int64_t> inv(ord.size(), -1);  // round trip: a permutation
    for (size_t p = 0; p < ord.size(); ++p) {
      ASSERT_GE(ord[p], 0);
      ASSERT_LT(ord[p], g.size());
      ASSERT_EQ(inv[ord[p]], -1) << "token visited twice";
      inv[ord[p]] = static_cast<int64_t>(p);
    }
    // Tokens of one tile are contiguous, tiles in raster order over the tile grid.
    auto tile_id = [&](int64_t t) {
      int64_t f, h, w;
      token_coords(g, t, &f, &h, &w);
      const int64_t th = (g.h + tile.h - 1) / tile.h, tw = (g.w + tile.w - 1) / tile.w;
      return ((f / tile.f) * th + h / tile.h) * tw + w / tile.w;
    };
    for (size_t p = 1; p < ord.size(); ++p) ASSERT_LE(tile_id(ord[p - 1]), tile_id(ord[p]));
  }
}

TEST(Rope, WanSplitAndFrequencies) {
  const RopeSplit s128 = rope_split(128);
  EXPECT_EQ(s128.f, 44);
  EXPECT_EQ(s128.h, 42);
  EXPECT_EQ(s128.w, 42);
  const RopeSplit s64 = rope_split(64);
  EXPECT_EQ(s64.f, 24);
  EXPECT_EQ(s64.h, 20);
  EXPECT_EQ(s64.w, 20);
  const RopePairs p = rope_pairs(128, 10000.0);
  ASSERT_EQ(p.axis.size(), 64u);
  EXPECT_EQ(std::count(p.axis.begin(), p.axis.end(), 0), 22);
  EXPECT_EQ(std::count(p.axis.begin(), p.axis.end(), 1), 21);
  EXPECT_EQ(std::count(p.axis.begin(), p.axis.end(), 2), 21);
  EXPECT_DOUBLE_EQ(p.freq[0], 1.0);
  EXPECT_DOUBLE_EQ(p.freq[1], std::pow(10000.0, -2.0 / 44.0));  // frame pair 1
  EXPECT_DOUBLE_EQ(p.freq[22], 1.0);                             // first row pair
  EXPECT_DOUBLE_EQ(p.freq[23], std::pow(10000.0, -2.0 / 42.0));
}

TEST(Rope, IsARotationAndInverts) {
  const Grid g{3, 4, 5};
  const cpu::RopeTable rope(g, 128, 10000.0);
  std::mt19937 rng(1);
  std::normal_distribution<double> n01;
  for (int64_t t = 0; t < g.size(); ++t) {
    std::vector<double> x(128), y;
    for (double& e : x) e = n01(rng);
    y = x;
    rope.apply(t, y.data());
    double nx = 0, ny = 0;
    for (int i = 0; i < 128; ++i) nx += x[i] * x[i], ny += y[i] * y[i];
    EXPECT_NEAR(nx, ny, 1e-10 * nx);
    rope.apply(t, y.data(), true);
    for (int i = 0; i < 128; ++i) EXPECT_NEAR(x[i], y[i], 1e-12);
  }
  // Token 0 sits at the origin: no rotation at all.
  std::vector<double> x(128, 1.0);
  rope.apply(0, x.data());
  for (double e : x) EXPECT_DOUBLE_EQ(e, 1.0);
}

TEST(Window, AlignedTilesSelectExactlyTheTilesWithinTheWindow) {
  const Grid g{4, 6, 8};
  Options o;
  o.pattern = Pattern::Window;
  o.tile_order = true;
  o.tile = {1, 2, 4};  // 8 tokens per tile = one block
  o.block_q = o.block_k = 8;
  o.window = {1, 0, 1};
  std::vector<int32_t> idx, cnt;
  window_table(g, o, &idx, &cnt);
  const int64_t tf = 4, th = 3, tw = 2, n = tf * th * tw;
  ASSERT_EQ(static_cast<int64_t>(cnt.size()), n);
  for (int64_t i = 0; i < n; ++i) {
    std::set<int32_t> want;
    const int64_t af = i / (th * tw), ah = (i / tw) % th, aw = i % tw;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t bf = j / (th * tw), bh = (j / tw) % th, bw = j % tw;
      if (std::llabs(af - bf) <= 1 && ah == bh && std::llabs(aw - bw) <= 1) want.insert(static_cast<int32_t>(j));
    }
    std::set<int32_t> got(idx.begin() + i * n, idx.begin() + i * n + cnt[i]);
    EXPECT_EQ(got, want) << "query tile " << i;
    for (int64_t c = cnt[i]; c < n; ++c) EXPECT_EQ(idx[i * n + c], -1);
  }
}

TEST(Window, PartialBlocksAndRasterOrderKeepTheDiagonal) {
  const Grid g{3, 5, 7};  // L = 105, not a multiple of the blocks
  Options o;
  o.pattern = Pattern::Window;
  o.block_q = 16;
  o.block_k = 8;
  o.window = {0, 1, 1};
  std::vector<int32_t> idx, cnt;
  window_table(g, o, &idx, &cnt);
  const int64_t n_q = 7, n_k = 14;
  ASSERT_EQ(static_cast<int64_t>(cnt.size()), n_q);
  for (int64_t i = 0; i < n_q; ++i) {
    ASSERT_GT(cnt[i], 0);
    ASSERT_TRUE(std::is_sorted(idx.begin() + i * n_k, idx.begin() + i * n_k + cnt[i]));
    // The key blocks overlapping the query block's own tokens are always kept.
    for (int64_t j = (i * 16) / 8; j <= std::min<int64_t>(n_k - 1, (std::min<int64_t>(105, i * 16 + 16) - 1) / 8); ++j)
      EXPECT_NE(std::find(idx.begin() + i * n_k, idx.begin() + i * n_k + cnt[i], j), idx.begin() + i * n_k + cnt[i]);
  }
}

TEST(InverseTable, ListsEveryQueryBlockOnce) {
  const int64_t n_q = 5, n_k = 6, max_k = 3;
  const std::vector<int32_t> idx = {0, 2, 5, 1, 2, 3, 0, 1, 5, 2, 4, 5, 3, -1, -1};
  const std::vector<int32_t> cnt = {3, 3, 3, 3, 1};
  std::vector<int32_t> off, rows;
  invert_table(idx.data(), cnt.data(), n_q, max_k, n_k, &off, &rows);
  ASSERT_EQ(off.size(), 7u);
  EXPECT_EQ(off.back(), 13);
  auto list = [&](int j) { return std::vector<int32_t>(rows.begin() + off[j], rows.begin() + off[j + 1]); };
  EXPECT_EQ(list(0), (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(list(2), (std::vector<int32_t>{0, 1, 3}));
  EXPECT_EQ(list(3), (std::vector<int32_t>{1, 4}));
  EXPECT_EQ(list(4), (std::vector<int32_t>{3}));
  EXPECT_EQ(list(5), (std::vector<int32_t>{0, 2, 3}));
}

namespace {
// A valid float32 call on small buffers, to be broken one field at a time.
struct Call {
  std::vector<float> q, o;
  std::vector<float> lse;
  std::vector<int32_t> idx, cnt;
  Params p;
  Call() {
    p.B = 1, p.H = 1, p.L = 24, p.D = 8;
    p.grid = {2, 3, 4};
    p.opt.block_q = 8, p.opt.block_k = 4;
    q.assign(p.L * p.D, 0.5f), o.assign(p.L * p.D, 0.f), lse.assign(p.L, 0.f);
    idx.assign(64, 0), cnt.assign(8, 0);
    p.q = p.k = p.v = q.data();
    for (auto* s : {p.q_stride, p.k_stride, p.v_stride}) s[0] = p.L * p.D, s[1] = p.L * p.D, s[2] = p.D;
    p.o_s = o.data(), p.o_l = o.data(), p.lse = lse.data(), p.block_idx = idx.data(), p.block_cnt = cnt.data();
  }
};

void expect_error(const Params& p, const std::string& needle) {
  try {
    validate(p);
    ADD_FAILURE() << "no error, expected one naming '" << needle << "'";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(Validate, EachBadArgumentIsNamedWithExpectedAndActual) {
  EXPECT_NO_THROW(validate(Call().p));
  { Call c; c.p.grid = {2, 3, 5}; expect_error(c.p, "grid: expected F*H*W to equal the token count L=24, got 2*3*5=30"); }
  { Call c; c.p.D = 7; expect_error(c.p, "D: expected a positive even head width, got 7"); }
  { Call c; c.p.opt.keep = 0.0; expect_error(c.p, "keep: expected a fraction in (0, 1], got 0"); }
  { Call c; c.p.opt.keep = 1.5; expect_error(c.p, "keep: expected a fraction in (0, 1], got 1.5"); }
  { Call c; c.p.opt.keep = NAN; expect_error(c.p, "keep:"); }
  { Call c; c.p.opt.block_q = 0; expect_error(c.p, "block_q: expected a positive token count, got 0"); }
  { Call c; c.p.opt.block_k = -3; expect_error(c.p, "block_k: expected a positive token count, got -3"); }
  { Call c; c.p.opt.eps = 0; expect_error(c.p, "eps:"); }
  { Call c; c.p.B = 0; expect_error(c.p, "B: expected a positive batch size, got 0"); }
  { Call c; c.p.opt.tile_order = true; c.p.opt.tile = {1, 0, 2}; expect_error(c.p, "tile:"); }
  { Call c; c.p.opt.window = {-1, 0, 0}; expect_error(c.p, "window:"); }
  { Call c; c.p.o_l = nullptr; expect_error(c.p, "o_l:"); }
  { Call c; c.p.opt.mode = Mode::Dense; c.p.o_l = nullptr; c.p.block_idx = nullptr; EXPECT_NO_THROW(validate(c.p)); }
  { Call c; c.p.o_stride[0] = 192, c.p.o_stride[1] = 8, c.p.o_stride[2] = 8; EXPECT_NO_THROW(validate(c.p)); }
  { Call c; c.p.o_stride[0] = 1, c.p.o_stride[1] = 2, c.p.o_stride[2] = 3;
    expect_error(c.p, "o_stride: expected all zero, (192, 192, 8) or (192, 8, 8), got (1, 2, 3)"); }
  EXPECT_THROW(parse_mode("fast"), ArgumentError);
  EXPECT_THROW(parse_feature("gelu"), ArgumentError);
  EXPECT_THROW(parse_pattern("random"), ArgumentError);
}

TEST(Validate, KernelsRefuseTheWrongDtype) {
  Call c;
  c.p.dtype = DType::F64;
  EXPECT_THROW(cpu::fast_forward(c.p), ArgumentError);
  EXPECT_THROW(cpu::reference_forward<float>(c.p), ArgumentError);
}

// (B, L, H, D) outputs are for the CUDA kernels; the CPU ones write (B, H, L, D) only.
TEST(Validate, CpuKernelsRefuseTokenMajorOutputs) {
  Call c;
  c.p.o_stride[0] = 192, c.p.o_stride[1] = 8, c.p.o_stride[2] = 8;
  EXPECT_THROW(cpu::fast_forward(c.p), ArgumentError);
  EXPECT_THROW(cpu::reference_forward<float>(c.p), ArgumentError);
  c.p.o_stride[1] = 192;  // the contiguous strides spelled out
  EXPECT_NO_THROW(cpu::reference_forward<float>(c.p));
}

// The CUDA kernels' token -> (frame, row, column) maps divide by the grid's row width and frame
// area with FastDiv; it must equal '/' for every token index below 2^31.
TEST(FastDiv, MatchesIntegerDivisionBelow2To31) {
  std::mt19937 rng(7);
  std::vector<uint32_t> divisors = {1, 2, 3, 5, 7, 30, 52, 60, 64, 90, 104, 160, 1560, 4680, 9360, 65535, 65536,
                                    1000003, (1u << 30) + 1, (1u << 31) - 1};
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + rng() % 100000);
  for (uint32_t d : divisors) {
    const FastDiv f(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, (1u << 31) - 1, (1u << 31) - 2};
    for (uint32_t m = 1; m < 2000 && uint64_t(m) * d < (1u << 31); m += 1 + m / 7) ns.push_back(m * d - 1), ns.push_back(m * d);
    for (int i = 0; i < 2000; ++i) ns.push_back(rng() & 0x7fffffffu);
    for (uint32_t n : ns) {
      if (n >= (1u << 31)) continue;
      ASSERT_EQ(f.div(n), n / d) << "n=" << n << " d=" << d;
    }
  }
}
