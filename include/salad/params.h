// The torch-free description of one SALAD attention call. Kernels (CPU and
// CUDA) see only these structs; src/torch/ turns at::Tensor into them.
//
// Semantics (../shared/SALAD.md; docs/OPERATOR.md has the long form):
//   q, k, v : (B, H, L, D), q and k *before* RoPE, token order raster (f, h, w).
//   Sparse branch: qr = rope3d(q), kr = rope3d(k), tokens permuted to the
//     block order (raster or 3-D tiles), blocks of block_q / block_k tokens,
//     O_s = softmax(scale * qr kr^T restricted to the kept blocks) v, lse = log
//     sum exp over the kept keys (natural log, float32).
//   Linear branch (mode salad): O_l[i] = sum_j <R_i phi(q_i), R_j phi(k_j)> v_j
//     / (sum_j <phi(q_i), phi(k_j)> + eps), R = rope3d, or identity when
//     linear_rope is false.
//   All outputs are in the caller's (raster) token order; the block table is in
//   block space (block order).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace salad {

enum class Mode { Dense, Sparse, Salad };
enum class Pattern { TopK, Window };
enum class FeatureMap { Relu, Elu1, Softmax };
enum class DType { F64, F32, BF16, F16 };

// Video token grid: L = f * h * w, raster order (frame, row, column).
struct Grid {
  int64_t f = 1, h = 1, w = 1;
  int64_t size() const { return f * h * w; }
};

// A 3-D extent in tokens (token-order tiles) or in tiles (window radius).
struct Extent3 {
  int64_t f = 1, h = 1, w = 1;
  int64_t volume() const { return f * h * w; }
};

// Everything a user configures; framework-free and copyable.
struct Options {
  Mode mode = Mode::Salad;
  Pattern pattern = Pattern::TopK;
  int64_t block_q = 128;
  int64_t block_k = 64;
  double keep = 0.10;          // fraction of key blocks kept per query block (topk)
  bool tile_order = false;     // false: raster order; true: 3-D tiles of `tile`
  Extent3 tile{1, 1, 1};       // token tile (ft, ht, wt) used when tile_order
  Extent3 window{1, 1, 1};     // window radius (wf, wh, ww) in tiles (pattern window)
  FeatureMap feature = FeatureMap::Relu;
  bool linear_rope = true;
  double eps = 1e-6;           // linear-branch normaliser epsilon
  double rope_theta = 10000.0;
  double scale = 0.0;          // softmax scale; 0 means 1/sqrt(D)
};

// Sizes derived from a Params (shared by every backend).
struct BlockShape {
  int64_t n_q = 0;    // query blocks: ceil(L / block_q)
  int64_t n_k = 0;    // key blocks: ceil(L / block_k)
  int64_t max_k = 0;  // width of the block table (k for topk, n_k for window)
};

// One forward call. Input strides are in elements for (batch, head, token);
// the channel dimension is contiguous. Outputs are contiguous (B, H, L, D)
// (lse (B, H, L)) unless o_stride says otherwise (CUDA kernels only). Pointers
// that a mode does not need may be null.
struct Params {
  DType dtype = DType::F32;
  int64_t B = 0, H = 0, L = 0, D = 0;
  Grid grid;
  Options opt;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};

  void* o_s = nullptr;        // (B, H, L, D), dtype; dense output in mode dense
  float* lse = nullptr;       // (B, H, L)
  void* o_l = nullptr;        // (B, H, L, D), dtype; mode salad only
  // (batch, head, token) strides of o_s and o_l in elements, channels contiguous; all zero:
  // contiguous (B, H, L, D). The CUDA forward kernels also write (B, L, H, D) memory
  // ({L*H*D, D, H*D}: the rows of the output projection's input, no transposing copy);
  // the CPU kernels need the contiguous layout.
  int64_t o_stride[3] = {0, 0, 0};
  int32_t* block_idx = nullptr;  // (B, H, n_q, max_k), ascending, -1 padded
  int32_t* block_cnt = nullptr;  // (B, H, n_q)
  bool blocks_given = false;     // true: use block_idx/block_cnt as input, skip selection

  double softmax_scale() const;
  BlockShape blocks() const;
  // o_stride with the zero default resolved to contiguous (B, H, L, D).
  std::array<int64_t, 3> out_strides() const;
  bool out_contiguous() const;
};

// One backward call: the forward's params (inputs, outputs and block table,
// which is always given) plus the incoming and outgoing gradients. Gradient
// inputs and outputs are contiguous (B, H, L, D) of the same dtype.
struct BwdParams : Params {
  const void* do_s = nullptr;  // grad of o_s
  const void* do_l = nullptr;  // grad of o_l (mode salad; null means zero)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  bool deterministic = false;  // CUDA: fixed-order accumulation of dK/dV
};

const char* to_string(Mode m);
const char* to_string(Pattern p);
const char* to_string(FeatureMap f);
const char* to_string(DType t);
Mode parse_mode(const std::string& s);              // "dense" | "sparse" | "salad"
Pattern parse_pattern(const std::string& s);        // "topk" | "window"
FeatureMap parse_feature(const std::string& s);     // "relu" | "elu1" | "softmax"

}  // namespace salad
