// Host-side index math shared by every backend: validation, block counts,
// token order, 3-D RoPE frequencies, Top-K tie-breaking and the window
// pattern. Torch-free and unit-tested on the host.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "salad/params.h"

namespace salad {

// Thrown for every bad argument; the message names the argument, the expected
// and the actual value.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Throws ArgumentError with the parts streamed into one message.
template <class... A>
[[noreturn]] void fail(const A&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw ArgumentError(s.str());
}

// Checks sizes, grid, options and the pointers `p` needs; throws ArgumentError.
void validate(const Params& p);
void validate_options(const Options& o, int64_t L, int64_t D);

// k = clamp(ceil(keep * n_k), 1, n_k); keep * n_k within 1e-9 of an integer
// counts as that integer, so keep 0.1 of 30 blocks keeps 3, not 4.
int64_t keep_count(double keep, int64_t n_k);

// order[p] = raster token index at block-order position p (identity for raster).
// Tiles of `tile` are visited in raster order over the tile grid, tokens inside a
// tile in raster order; edge tiles are partial, nothing is padded.
std::vector<int64_t> token_order(const Grid& g, const Options& o);

// Wan's 3-D RoPE split of the head width: (D - 4*(D/6), 2*(D/6), 2*(D/6)).
struct RopeSplit {
  int64_t f, h, w;
};
constexpr RopeSplit rope_split(int64_t D) {  // (constexpr: the CUDA kernels fix the split per D)
  const int64_t s = 2 * (D / 6);
  return {D - 2 * s, s, s};
}

// Per channel pair m (D/2 of them): which axis rotates it (0 frame, 1 row,
// 2 column) and its frequency theta^(-2i/d_axis) for the i-th pair of the axis.
struct RopePairs {
  std::vector<int> axis;
  std::vector<double> freq;
};
RopePairs rope_pairs(int64_t D, double theta);

// Raster token index -> (f, h, w).
inline void token_coords(const Grid& g, int64_t t, int64_t* f, int64_t* h, int64_t* w) {
  *w = t % g.w;
  *h = (t / g.w) % g.h;
  *f = t / (g.w * g.h);
}

// Top-K of one row of block scores: the k largest, ties to the lower index;
// written to out[0..k) in ascending index order.
void topk_row(const float* scores, int64_t n, int64_t k, int32_t* out);
void topk_row(const double* scores, int64_t n, int64_t k, int32_t* out);

// Window pattern (input-independent): query block i keeps key block j when some
// tile touched by i and some tile touched by j are within (wf, wh, ww) tiles of
// each other in every axis. Tiles are o.tile when tile_order, else single
// tokens. Fills idx (n_q * n_k, ascending, -1 padded) and cnt (n_q).
void window_table(const Grid& g, const Options& o, std::vector<int32_t>* idx,
                  std::vector<int32_t>* cnt);

// Inverse of a block table: for each key block the query blocks that kept it.
// offsets has n_k + 1 entries; rows[offsets[j] .. offsets[j+1]) ascending.
void invert_table(const int32_t* idx, const int32_t* cnt, int64_t n_q, int64_t max_k,
                  int64_t n_k, std::vector<int32_t>* offsets, std::vector<int32_t>* rows);

}  // namespace salad
