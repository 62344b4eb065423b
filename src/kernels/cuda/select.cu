// Workspace plan, token order + RoPE tables, q/k rotation with block means,
// Top-K block selection, the inverse table, and the public entry points of
// salad::cuda.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "internal.cuh"
#include "salad/kernels.h"

namespace salad::cuda::detail {
namespace {

constexpr int kSelectRows = 8;  // query blocks per selection CTA (one warp each)

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// ---------------------------------------------------------------- tables
__global__ void rope_table_kernel(float2* table, int64_t gf, int64_t gh, int64_t gw, int half_d,
                                  int pf, int ph, double theta) {
  int64_t n = (gf + gh + gw) * half_d;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t row = e / half_d;
    int m = static_cast<int>(e % half_d);
    int axis = m < pf ? 0 : (m < pf + ph ? 1 : 2);
    int start = axis == 0 ? 0 : (axis == 1 ? pf : pf + ph);
    int pairs = axis == 0 ? pf : (axis == 1 ? ph : half_d - pf - ph);
    int64_t x = axis == 0 ? row : (axis == 1 ? row - gf : row - gf - gh);  // position on that axis
    double freq = 1.0 / pow(theta, static_cast<double>(2 * (m - start)) / static_cast<double>(2 * pairs));
    double s, c;
    sincos(static_cast<double>(x) * freq, &s, &c);
    table[e] = make_float2(static_cast<float>(c), static_cast<float>(s));
  }
}

// perm[position of raster token t in tile order] = t (closed form of salad::token_order).
__global__ void tile_perm_kernel(int32_t* perm, int64_t gf, int64_t gh, int64_t gw, int64_t tf,
                                 int64_t th, int64_t tw) {
  int64_t L = gf * gh * gw;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < L;
       t += int64_t(gridDim.x) * blockDim.x) {
    int64_t w = t % gw, h = (t / gw) % gh, f = t / (gw * gh);
    int64_t bf = f / tf, bh = h / th, bw = w / tw;
    int64_t sf = min(tf, gf - bf * tf), sh = min(th, gh - bh * th), sw = min(tw, gw - bw * tw);
    int64_t pos = bf * tf * gh * gw + bh * th * gw * sf + bw * tw * sh * sf +
                  ((f - bf * tf) * sh + (h - bh * th)) * sw + (w - bw * tw);
    perm[pos] = static_cast<int32_t>(t);
  }
}

// ---------------------------------------------------------------- rotation
// One CTA per (block, b*h): rotates the block's tokens, writes them in block
// order and (optionally) the fp32 mean of the rotated block. A thread owns 8
// channels (4 pairs, one 16-byte load and store) of one token; the token's
// (f, h, w) is computed once in 32-bit arithmetic (L < 2^31 is checked on the host).
template <class T>
__global__ void __launch_bounds__(256) rotate_kernel(const T* __restrict__ src, int64_t s_b, int64_t s_h,
                                                     int64_t s_t, int64_t H, T* __restrict__ dst,
                                                     float* __restrict__ mean, int64_t L, int D, int64_t bs,
                                                     RopeInfo r) {
  extern __shared__ float red[];  // [groups][D]
  const int half_d = D / 2;
  const int lanes = D / 8;                  // threads per token
  const int groups = blockDim.x / lanes;    // tokens in flight
  const int c8 = threadIdx.x % lanes, g = threadIdx.x / lanes;
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t p0 = blockIdx.x * bs, p1 = min(L, p0 + bs);
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  const T* base = src + b * s_b + h * s_h + 8 * c8;
  T* out = dst + bh * L * D + 8 * c8;
  // Table row offsets of this thread's 4 pairs, per axis.
  int axis[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = 4 * c8 + i;
    axis[i] = m < r.pf ? 0 : (m < r.pf + r.ph ? 1 : 2);
  }
  for (int64_t p = p0 + g; p < p1; p += groups) {
    const uint32_t t = static_cast<uint32_t>(perm_at(r.perm, p));
    const TokPos tp = tok_pos(r, t);
    const int64_t rows[3] = {tp.f, r.gf + tp.h, r.gf + r.gh + tp.w};
    const uint4 u = *reinterpret_cast<const uint4*>(base + static_cast<int64_t>(t) * s_t);
    const uint32_t in[4] = {u.x, u.y, u.z, u.w};
    uint32_t o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = Elem<T>::unpack(in[i]);
      const float2 cs = __ldg(r.table + rows[axis[i]] * half_d + 4 * c8 + i);
      const float y0 = x.x * cs.x - x.y * cs.y, y1 = x.x * cs.y + x.y * cs.x;
      o[i] = Elem<T>::pack(y0, y1);
      acc[2 * i] += y0;
      acc[2 * i + 1] += y1;
    }
    *reinterpret_cast<uint4*>(out + p * D) = make_uint4(o[0], o[1], o[2], o[3]);
  }
  if (!mean) return;
#pragma unroll
  for (int i = 0; i < 8; ++i) red[g * D + 8 * c8 + i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int k = 0; k < groups; ++k) sum += red[k * D + d];
    mean[(bh * gridDim.x + blockIdx.x) * D + d] = sum / static_cast<float>(p1 - p0);
  }
}

// Mean of block i (tokens [i block, min(L, (i + 1) block)), block a multiple of tile) of one channel
// from per-tile sums part_d[j * D], added in tile order from 0 (tile_means_kernel and, in the fused
// forward, select_mma_kernel: the same bits).
__device__ __forceinline__ float block_mean_from_tiles(const float* part_d, int64_t tile, int64_t block, int64_t i,
                                                       int64_t L, int D) {
  const int64_t t0 = i * block, t1 = min(L, t0 + block);
  float sum = 0.f;
#pragma unroll 8
  for (int64_t j = t0 / tile; j < (t1 + tile - 1) / tile; ++j) sum += part_d[j * D];
  return sum / static_cast<float>(t1 - t0);
}

// ---------------------------------------------------------------- selection
__device__ __forceinline__ uint32_t order_key(float s) {
  if (s != s) return 0u;  // NaN ranks last
  if (s == 0.f) s = 0.f;  // -0 ties +0
  uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One warp: exact radix select of the k_keep largest of row[0 .. n_k) (shared memory), 32
// one-bit passes, ties to the lower j; writes out[0 .. max_k) ascending, -1 padded.
__device__ void select_row_smem(const float* row, int64_t n_k, int k_keep, int64_t max_k, int32_t* out,
                                int lane) {
  uint32_t thr = 0;
  for (int bit = 31; bit >= 0; --bit) {
    uint32_t cand = thr | (1u << bit);
    int c = 0;
    for (int64_t j = lane; j < n_k; j += 32) c += order_key(row[j]) >= cand;
    c = __reduce_add_sync(0xffffffffu, c);
    if (c >= k_keep) thr = cand;
  }
  int gt = 0;
  for (int64_t j = lane; j < n_k; j += 32) gt += order_key(row[j]) > thr;
  gt = __reduce_add_sync(0xffffffffu, gt);
  const int need_eq = k_keep - gt;
  int taken = 0, eq_seen = 0;
  const uint32_t lt = (1u << lane) - 1u;
  for (int64_t base = 0; base < n_k; base += 32) {
    int64_t j = base + lane;
    uint32_t key = j < n_k ? order_key(row[j]) : 0u;
    bool in = j < n_k;
    bool is_gt = in && key > thr, is_eq = in && key == thr;
    uint32_t eq_mask = __ballot_sync(0xffffffffu, is_eq);
    int eq_rank = eq_seen + __popc(eq_mask & lt);
    bool take = is_gt || (is_eq && eq_rank < need_eq);
    uint32_t take_mask = __ballot_sync(0xffffffffu, take);
    if (take) out[taken + __popc(take_mask & lt)] = static_cast<int32_t>(j);
    taken += __popc(take_mask);
    eq_seen += __popc(eq_mask);
  }
  for (int64_t c = k_keep + lane; c < max_k; c += 32) out[c] = -1;
}

// c + (key >= cand), cand >= 1: key + (2^32 - cand) carries out exactly then (two instructions, an add
// with carry-out and an add of the carry, where the compare-and-increment takes three).
__device__ __forceinline__ int add_ge(int c, uint32_t key, uint32_t neg_cand) {
  asm("{\n\t.reg .u32 t;\n\tadd.cc.u32 t, %1, %2;\n\taddc.u32 %0, %0, 0;\n\t}" : "+r"(c) : "r"(key), "r"(neg_cand));
  return c;
}

// One warp: the k_keep largest of row[0 .. nk) (shared memory, nk <= 32 KPL), as select_row_smem
// (same table) but with the row's order keys, key[t] of j = lane + 32 t, in registers: bits
// 31..16 of the threshold by one-bit passes over them, then the low halves of the keys that share
// those 16 bits are compacted into the row's (now free) slots and bits 15..0 are found over those
// alone. The row is overwritten.
template <int KPL>
__device__ void select_row_regs(float* row, int nk, int k_keep, int64_t max_k, int32_t* out, int lane) {
  uint32_t key[KPL];
#pragma unroll
  for (int t = 0; t < KPL; ++t) key[t] = lane + 32 * t < nk ? order_key(row[lane + 32 * t]) : 0u;
  // Padding keys (j >= n_k) are 0 and never reach a candidate (>= 1) nor exceed thr.
  uint32_t thr = 0;
#pragma unroll 1
  for (int bit = 31; bit >= 16; --bit) {
    const uint32_t cand = thr | (1u << bit);
    int c[2] = {0, 0};  // two chains
#pragma unroll
    for (int t = 0; t < KPL; ++t) c[t % 2] = add_ge(c[t % 2], key[t], 0u - cand);
    if (__reduce_add_sync(0xffffffffu, c[0] + c[1]) >= k_keep) thr = cand;
  }
  // key >= (hi << 16 | low) <=> key >> 16 > hi, or key >> 16 == hi and its low half >= low.
  const uint32_t hi = thr >> 16;
  const uint32_t lt = (1u << lane) - 1u;
  uint32_t* buf = reinterpret_cast<uint32_t*>(row);
  int above = 0, n_eq = 0;
  __syncwarp();  // every lane has read its scores before buf overwrites them
#pragma unroll
  for (int t = 0; t < KPL; ++t) {
    above += (key[t] >> 16) > hi;
    const bool match = lane + 32 * t < nk && (key[t] >> 16) == hi;
    const uint32_t mm = __ballot_sync(0xffffffffu, match);
    if (match) buf[n_eq + __popc(mm & lt)] = key[t] & 0xffffu;
    n_eq += __popc(mm);
  }
  above = __reduce_add_sync(0xffffffffu, above);
  __syncwarp();
  uint32_t lo[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) lo[s] = lane + 32 * s < n_eq ? buf[lane + 32 * s] : 0u;
  uint32_t tl = 0;
#pragma unroll 1
  for (int bit = 15; bit >= 0; --bit) {
    const uint32_t cand = tl | (1u << bit);
    int c = 0;
#pragma unroll
    for (int s = 0; s < 4; ++s) c = add_ge(c, lo[s], 0u - cand);
    for (int e = lane + 128; e < n_eq; e += 32) c = add_ge(c, buf[e], 0u - cand);
    if (__reduce_add_sync(0xffffffffu, c) + above >= k_keep) tl = cand;
  }
  thr = hi << 16 | tl;
  int gt = 0;
#pragma unroll
  for (int t = 0; t < KPL; ++t) gt += key[t] > thr;
  gt = __reduce_add_sync(0xffffffffu, gt);
  const int need_eq = k_keep - gt;
  int taken = 0, eq_seen = 0;
#pragma unroll
  for (int t = 0; t < KPL; ++t) {
    const int j = lane + 32 * t;
    const bool in = j < nk;
    const bool is_gt = in && key[t] > thr, is_eq = in && key[t] == thr;
    const uint32_t eq_mask = __ballot_sync(0xffffffffu, is_eq);
    const int eq_rank = eq_seen + __popc(eq_mask & lt);
    const bool take = is_gt || (is_eq && eq_rank < need_eq);
    const uint32_t take_mask = __ballot_sync(0xffffffffu, take);
    if (take) out[taken + __popc(take_mask & lt)] = j;
    taken += __popc(take_mask);
    eq_seen += __popc(eq_mask);
  }
  for (int64_t c = k_keep + lane; c < max_k; c += 32) out[c] = -1;
}

// One warp: table row `r` (of (b*h) * n_q) from its scores in shared memory (overwritten):
// select_row_regs<KPL>, or select_row_smem for KPL 0 (n_k past 32 * 40).
template <int KPL>
__device__ __forceinline__ void select_row(float* row, int64_t n_k, int k_keep, int64_t max_k, int32_t* idx,
                                           int32_t* cnt, int64_t r, int lane) {
  if constexpr (KPL == 0) select_row_smem(row, n_k, k_keep, max_k, idx + r * max_k, lane);
  else select_row_regs<KPL>(row, static_cast<int>(n_k), k_keep, max_k, idx + r * max_k, lane);
  if (lane == 0) cnt[r] = k_keep;
}

// CTA: kSelectRows query blocks of one (b, h). Scores S[i, j] = qmean_i . kmean_j * scale,
// then per row (one warp) an exact radix select of the k largest, ties to the lower j.
// The reference kernel (SALAD_SELECT_KERNEL=old); select_fast_kernel gives the same bits.
__global__ void select_kernel(const float* __restrict__ qmean, const float* __restrict__ kmean,
                              int64_t n_q, int64_t n_k, int D, float scale, int k_keep,
                              int64_t max_k, int32_t* __restrict__ idx, int32_t* __restrict__ cnt) {
  extern __shared__ float sm[];
  float* qm = sm;                       // [kSelectRows][D]
  float* sc = sm + kSelectRows * D;     // [kSelectRows][n_k]
  const int64_t bh = blockIdx.y;
  const int64_t i0 = blockIdx.x * int64_t(kSelectRows);
  const int rows = static_cast<int>(imin64(kSelectRows, n_q - i0));
  for (int e = threadIdx.x; e < kSelectRows * D; e += blockDim.x) {
    int q = e / D;
    qm[e] = q < rows ? qmean[(bh * n_q + i0 + q) * D + e % D] : 0.f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarp = blockDim.x / 32;
  for (int64_t j = warp; j < n_k; j += nwarp) {
    const float* km = kmean + (bh * n_k + j) * D;
    float acc[kSelectRows];
#pragma unroll
    for (int q = 0; q < kSelectRows; ++q) acc[q] = 0.f;
    for (int d = lane; d < D; d += 32) {
      float kv = km[d];
#pragma unroll
      for (int q = 0; q < kSelectRows; ++q) acc[q] = fmaf(qm[q * D + d], kv, acc[q]);
    }
#pragma unroll
    for (int q = 0; q < kSelectRows; ++q) {
      float v = acc[q];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) sc[q * n_k + j] = v * scale;
    }
  }
  __syncthreads();
  for (int q = warp; q < rows; q += nwarp) {
    select_row_smem(sc + q * n_k, n_k, k_keep, max_k, idx + (bh * n_q + i0 + q) * max_k, lane);
    if (lane == 0) cnt[bh * n_q + i0 + q] = k_keep;
  }
}

__host__ __device__ inline int select_stride(int n_k) { return (n_k + 31) / 32 * 32 + 4; }

// Same contract and bits as select_kernel, faster (kSelectRows == 8 warps, blockDim 256).
// Scores: lane l keeps qmean[q][l + 32 m] of the CTA's 8 rows in registers, slot r holding
// row q = r ^ ((l >> 2) & 7), so the cross-lane sum of 8 rows is a 4 + 2 + 1 + 1 + 1 shuffle
// transpose-reduce that adds the same pairs, in the same tree, as select_kernel's butterflies
// (lane l ends with row (l >> 2) & 7). Selection: select_row_regs<KPL> (n_k <= 32 KPL), KPL == 0
// select_row_smem. Shared memory: sc[kSelectRows][select_stride(n_k)] (= 4 mod 32: the 8 rows'
// stores of one j fall in distinct banks).
template <int D, int KPL>
__global__ void __launch_bounds__(32 * kSelectRows, 2)
    select_fast_kernel(const float* __restrict__ qmean, const float* __restrict__ kmean, int64_t n_q,
                       int64_t n_k, float scale, int k_keep, int64_t max_k, int32_t* __restrict__ idx,
                       int32_t* __restrict__ cnt) {
  static_assert(kSelectRows == 8, "the transpose-reduce maps 8 rows onto lane bits 4..2");
  constexpr int M = D / 32;  // channels per lane
  constexpr int U = 2;       // key blocks per warp iteration (loads issued one iteration ahead)
  extern __shared__ float sm[];
  const int nk = static_cast<int>(n_k);  // L < 2^31
  const int ld = select_stride(nk);
  float* sc = sm;  // [kSelectRows][ld]
  const int64_t bh = blockIdx.y;
  const int64_t i0 = blockIdx.x * int64_t(kSelectRows);
  const int rows = static_cast<int>(imin64(kSelectRows, n_q - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarp = blockDim.x / 32;
  const int sw = (lane >> 2) & 7;
  float qr[kSelectRows][M];
#pragma unroll
  for (int r = 0; r < kSelectRows; ++r) {
    const int q = r ^ sw;
#pragma unroll
    for (int m = 0; m < M; ++m) qr[r][m] = q < rows ? qmean[(bh * n_q + i0 + q) * D + lane + 32 * m] : 0.f;
  }
  const float* kb = kmean + bh * n_k * D + lane;
  float kv[U][M];
  auto load = [&](float(&dst)[U][M], int j) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int m = 0; m < M; ++m) dst[u][m] = j + u * nwarp < nk ? kb[(j + u * nwarp) * int64_t(D) + 32 * m] : 0.f;
  };
  load(kv, warp);
  for (int j = warp; j < nk; j += U * nwarp) {
    float nx[U][M];
    load(nx, j + U * nwarp);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float acc[kSelectRows];
#pragma unroll
      for (int r = 0; r < kSelectRows; ++r) acc[r] = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < kSelectRows; ++r) acc[r] = fmaf(qr[r][m], kv[u][m], acc[r]);
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r + 4], 16);
#pragma unroll
      for (int r = 0; r < 2; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r + 2], 8);
      acc[0] += __shfl_xor_sync(0xffffffffu, acc[1], 4);
      acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 2);
      acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 1);
      const int jj = j + u * nwarp;
      if ((lane & 3) == 0 && jj < nk) sc[sw * ld + jj] = acc[0] * scale;
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int m = 0; m < M; ++m) kv[u][m] = nx[u][m];
  }
  __syncthreads();
  for (int q = warp; q < rows; q += nwarp)
    select_row<KPL>(sc + q * ld, n_k, k_keep, max_k, idx, cnt, bh * n_q + i0 + q, lane);
}

// ---------------------------------------------------------------- selection on tensor cores
constexpr int kMmaSelRows = 16;  // query blocks per select_mma_kernel CTA (one m16 tile), a warp each

// Row stride of the score tile: = 8 mod 32 floats, so the float2 stores of a half-warp's
// accumulators (rows g = 0..3, columns 2t, 2t + 1) fall in distinct banks.
__host__ __device__ inline int select_mma_stride(int n_k) { return (n_k + 31) / 32 * 32 + 8; }

// x = hi + lo exactly, hi = x with the low 13 mantissa bits cleared (a TF32 value; one LOP3 where
// cvt.rna.tf32 costs several integer instructions on sm_90); the mma reads lo's top 19 bits, so
// hi*hi + hi*lo + lo*hi is x*y to about 2^-20 relative.
__device__ __forceinline__ void tf32_split(float x, uint32_t& hi, uint32_t& lo) {
  hi = __float_as_uint(x) & 0xffffe000u;
  lo = __float_as_uint(x - __uint_as_float(hi));
}
__device__ __forceinline__ void mma_tf32(float (&c)[4], const float4& a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(__float_as_uint(a.x)), "r"(__float_as_uint(a.y)), "r"(__float_as_uint(a.z)), "r"(__float_as_uint(a.w)),
        "r"(b0), "r"(b1));
}

// Same contract as select_kernel, scores on tensor cores: the table equals the float64
// reference's up to near-ties, as select_kernel's does, but not bit for bit (a different sum
// order). CTA: 16 query blocks of one (b, h), 16 warps, one wave at Wan1.3B-480p (192 CTAs, 2 per
// SM). Scores by mma.sync m16n8k8 in 3xTF32 (tf32_split: fp32-like, where one TF32 product would
// swap near-threshold blocks in a tenth of the rows): the 16 rows' qmean split once into shared
// memory in fragment order (one conflict-free LDS.128 per A operand); each warp takes 32 key
// blocks at a time (4 n-tiles, the A fragments reused 4x) and loads their kmean straight from
// global memory into B fragments. Channel order: within 16 channels, lane t's float4 at 4t holds
// k-step 2s's k = t, t + 4 and k-step 2s + 1's k = t, t + 4 (a permutation of the channels, the
// same for A and B, so each lane loads whole float4s). qsum
// (forward with fuse_rotate): the query block means are summed here from the apply kernel's
// 16-token sums instead of by a tile_means launch. Scaled scores to sc[16][select_mma_stride(n_k)],
// then each warp selects its row (select_row_regs<KPL>, KPL == 0: select_row_smem).
template <int D, int KPL>
__global__ void __launch_bounds__(32 * kMmaSelRows, KPL <= 24 ? 2 : 1)
    select_mma_kernel(const float* __restrict__ qmean, const float* __restrict__ qsum, int64_t block_q, int64_t L,
                      const float* __restrict__ kmean, int64_t n_q, int64_t n_k, float scale, int k_keep,
                      int64_t max_k, int32_t* __restrict__ idx, int32_t* __restrict__ cnt) {
  constexpr int NT = 4;  // n-tiles per warp iteration
  extern __shared__ float sm[];
  float* am = sm;  // [16][D + 1] (in 16 (D + 4) floats): the means, then split into fh / fl
  float4* fh = reinterpret_cast<float4*>(sm + 16 * (D + 4));  // [D / 8][32]: A fragments, hi
  float4* fl = fh + D / 8 * 32;                          // [D / 8][32]: lo
  float* sc = sm + 16 * (D + 4) + 2 * 16 * D;            // [16][ld]
  const int nk = static_cast<int>(n_k);  // L < 2^31
  const int ld = select_mma_stride(nk);
  const int64_t bh = blockIdx.y;
  const int64_t i0 = blockIdx.x * int64_t(kMmaSelRows);
  const int rows = static_cast<int>(imin64(kMmaSelRows, n_q - i0));
  for (int e = threadIdx.x; e < kMmaSelRows * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    float x = 0.f;
    if (r < rows && qsum) {  // the query block mean from 16-token sums, as tile_means_kernel
      x = block_mean_from_tiles(qsum + bh * ((L + 15) / 16) * D + d, 16, block_q, i0 + r, L, D);
    } else if (r < rows) {
      x = qmean[(bh * n_q + i0 + r) * D + d];
    }
    am[r * (D + 1) + d] = x;
  }
  __syncthreads();
  // Fragment order: slot (ks, lane) holds the lane's a0..a3 of k-step ks, so one LDS.128 is an A
  // operand; k-step 2s + h, k = t is channel 16s + 4t + 2h and k = t + 4 the next one.
  for (int e = threadIdx.x; e < D / 8 * 32; e += blockDim.x) {
    const int ks = e / 32, gg = (e % 32) >> 2, tt = e & 3;
    const int d0 = 16 * (ks >> 1) + 4 * tt + 2 * (ks & 1);
    const float v[4] = {am[gg * (D + 1) + d0], am[(gg + 8) * (D + 1) + d0], am[gg * (D + 1) + d0 + 1],
                        am[(gg + 8) * (D + 1) + d0 + 1]};
    uint32_t h[4], l[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) tf32_split(v[c], h[c], l[c]);
    fh[e] = make_float4(__uint_as_float(h[0]), __uint_as_float(h[1]), __uint_as_float(h[2]), __uint_as_float(h[3]));
    fl[e] = make_float4(__uint_as_float(l[0]), __uint_as_float(l[1]), __uint_as_float(l[2]), __uint_as_float(l[3]));
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int groups = (nk + 8 * NT - 1) / (8 * NT);
  for (int grp = warp; grp < groups; grp += kMmaSelRows) {
    float acc[NT][4];
    const float* kp[NT];
    bool kin[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
      const int j = grp * 8 * NT + 8 * n + g;
      kin[n] = j < nk;
      kp[n] = kmean + (bh * n_k + (kin[n] ? j : 0)) * D + 4 * t;
    }
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
      const float4 h0 = fh[(2 * s) * 32 + lane], h1 = fh[(2 * s + 1) * 32 + lane];
      const float4 l0 = fl[(2 * s) * 32 + lane], l1 = fl[(2 * s + 1) * 32 + lane];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const float4 b =
            kin[n] ? __ldg(reinterpret_cast<const float4*>(kp[n] + 16 * s)) : make_float4(0.f, 0.f, 0.f, 0.f);
        uint32_t bx, by, bz, bw, lx, ly, lz, lw;
        tf32_split(b.x, bx, lx), tf32_split(b.y, by, ly), tf32_split(b.z, bz, lz), tf32_split(b.w, bw, lw);
        mma_tf32(acc[n], l0, bx, by);  // k-step 2s: b = .x, .y
        mma_tf32(acc[n], h0, lx, ly);
        mma_tf32(acc[n], h0, bx, by);
        mma_tf32(acc[n], l1, bz, bw);  // k-step 2s + 1: .z, .w
        mma_tf32(acc[n], h1, lz, lw);
        mma_tf32(acc[n], h1, bz, bw);
      }
    }
    // C: c0, c1 = row g, key blocks 2t, 2t + 1 of the n-tile; c2, c3 = row g + 8. Columns up to
    // 32 * groups - 1 < ld: padding keys (scores 0) land inside the row and are never read.
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int col = grp * 8 * NT + 8 * n + 2 * t;
      *reinterpret_cast<float2*>(sc + g * ld + col) = make_float2(acc[n][0] * scale, acc[n][1] * scale);
      *reinterpret_cast<float2*>(sc + (g + 8) * ld + col) = make_float2(acc[n][2] * scale, acc[n][3] * scale);
    }
  }
  __syncthreads();
  if (warp < rows) select_row<KPL>(sc + warp * ld, n_k, k_keep, max_k, idx, cnt, bh * n_q + i0 + warp, lane);
}

// One CTA per (b, h): offsets by counting, rows filled in ascending query-block order.
// The reference kernel (SALAD_SELECT_KERNEL=old, or tables too large for invert_tiled_kernel).
__global__ void invert_kernel(const int32_t* __restrict__ idx, const int32_t* __restrict__ cnt,
                              int64_t n_q, int64_t n_k, int64_t max_k, int32_t* __restrict__ off,
                              int32_t* __restrict__ rows) {
  extern __shared__ int32_t si[];
  int32_t* count = si;          // n_k + 1
  int32_t* fill = si + n_k + 1;  // n_k
  const int64_t bh = blockIdx.x;
  const int32_t* ib = idx + bh * n_q * max_k;
  const int32_t* cb = cnt + bh * n_q;
  for (int64_t j = threadIdx.x; j <= n_k; j += blockDim.x) count[j] = 0;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n_q * max_k; e += blockDim.x) {
    int64_t i = e / max_k, c = e % max_k;
    if (c < cb[i]) atomicAdd(&count[ib[e] + 1], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int64_t j = 0; j < n_k; ++j) count[j + 1] += count[j];
  __syncthreads();
  int32_t* ob = off + bh * (n_k + 1);
  for (int64_t j = threadIdx.x; j <= n_k; j += blockDim.x) {
    ob[j] = count[j];
    if (j < n_k) fill[j] = count[j];
  }
  __syncthreads();
  int32_t* rb = rows + bh * n_q * max_k;
  for (int64_t i = 0; i < n_q; ++i) {
    int c = cb[i];
    for (int t = threadIdx.x; t < c; t += blockDim.x) {
      int j = ib[i * max_k + t];  // distinct within a row: no two threads share fill[j]
      rb[fill[j]++] = static_cast<int32_t>(i);
    }
    __syncthreads();
  }
}

// Grid (b*h, tiles), kInvThreads threads; same off / rows as invert_kernel (rows of (b, h) at
// bh * n_q * max_k). CTA (bh, s) owns key blocks [j0, j0 + C), C = 32 * words, and the R row
// segments [r * seg, (r + 1) * seg) of each. Shared memory: cs[n_q] (clamped cnt), sel[n_q][words]
// (bit j - j0 of row i: i kept j) and ct[C * R] (entries of column jl in segment r at jl * R + r,
// then their exclusive offsets). Every CTA reads the whole idx of its (b, h); entries below j0
// only add to the base offset. A thread per (jl, r) then walks its rows in ascending i.
constexpr int kInvThreads = 1024;

__global__ void __launch_bounds__(kInvThreads)
    invert_tiled_kernel(const int32_t* __restrict__ idx, const int32_t* __restrict__ cnt, int n_q, int n_k,
                        int max_k, int words, int R, int32_t* __restrict__ off, int32_t* __restrict__ rows) {
  extern __shared__ uint32_t su[];
  const int C = 32 * words, CR = C * R;
  int32_t* cs = reinterpret_cast<int32_t*>(su);                // [n_q]
  uint32_t* sel = su + n_q;                                     // [n_q][words]
  int32_t* ct = reinterpret_cast<int32_t*>(sel + n_q * words);  // [C * R]
  __shared__ int32_t wsum[kInvThreads / 32], wbelow[kInvThreads / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarp = blockDim.x / 32;
  const int64_t bh = blockIdx.x;
  const int j0 = blockIdx.y * C, j1 = min(n_k, j0 + C);
  const int seg = (n_q + R - 1) / R;
  const int32_t* ib = idx + bh * n_q * int64_t(max_k);
  const int32_t* cb = cnt + bh * n_q;
  for (int e = tid; e < n_q * words + CR; e += blockDim.x) sel[e] = 0u;  // sel and ct
  for (int i = tid; i < n_q; i += blockDim.x) cs[i] = min(max(cb[i], 0), max_k);
  __syncthreads();
  // Entries: count those below j0, mark those in the tile (a repeated j counts once).
  int below = 0;
  const uint32_t total = static_cast<uint32_t>(n_q) * static_cast<uint32_t>(max_k);
  constexpr int kBatch = 8;  // loads in flight per thread
  for (uint32_t e0 = tid; e0 < total; e0 += kBatch * blockDim.x) {
    int jv[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const uint32_t e = e0 + b * blockDim.x;
      jv[b] = e < total ? __ldg(ib + e) : -1;
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const uint32_t e = e0 + b * blockDim.x;
      if (e >= total) break;
      const int i = static_cast<int>(e / static_cast<uint32_t>(max_k)), c = static_cast<int>(e - i * max_k);
      const int j = jv[b];
      if (c >= cs[i] || j < 0 || j >= j1) continue;
      if (j < j0) {
        ++below;
      } else {
        const int jl = j - j0;
        const uint32_t bit = 1u << (jl & 31);
        if (!(atomicOr(&sel[i * words + (jl >> 5)], bit) & bit)) atomicAdd(&ct[jl * R + i / seg], 1);
      }
    }
  }
  // Exclusive scan of ct (thread-contiguous chunks), offset by the entries below j0.
  __syncthreads();
  const int per = (CR + blockDim.x - 1) / blockDim.x;
  const int a = min(CR, tid * per), z = min(CR, a + per);
  int local = 0;
  for (int k = a; k < z; ++k) local += ct[k];
  int inc = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  below = __reduce_add_sync(0xffffffffu, below);
  if (lane == 31) wsum[warp] = inc;
  if (lane == 0) wbelow[warp] = below;
  __syncthreads();
  if (warp == 0) {
    int v = lane < nwarp ? wsum[lane] : 0;
    const int bl = __reduce_add_sync(0xffffffffu, lane < nwarp ? wbelow[lane] : 0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += y;
    }
    wsum[lane] = bl + v;  // entries below j0 plus warps 0 .. lane, inclusive
    if (lane == 0) wbelow[0] = bl;
  }
  __syncthreads();
  int run = (warp ? wsum[warp - 1] : wbelow[0]) + inc - local;
  for (int k = a; k < z; ++k) {
    const int v = ct[k];
    ct[k] = run;
    run += v;
  }
  __syncthreads();
  int32_t* ob = off + bh * (n_k + 1);
  for (int jl = tid; jl < j1 - j0; jl += blockDim.x) ob[j0 + jl] = ct[jl * R];
  if (j1 == n_k && tid == 0) ob[n_k] = wsum[nwarp - 1];
  int32_t* rb = rows + bh * n_q * int64_t(max_k);
  for (int t = tid; t < CR; t += blockDim.x) {
    const int r = t / C, jl = t - r * C;  // a warp shares r and one sel word: broadcast loads
    if (j0 + jl >= j1) continue;
    int pos = ct[jl * R + r];
    const uint32_t* col = sel + (jl >> 5);
    const int sh = jl & 31, i_end = min(n_q, (r + 1) * seg);
#pragma unroll 4
    for (int i = r * seg; i < i_end; ++i)
      if ((col[i * words] >> sh) & 1u) rb[pos++] = i;
  }
}

// SALAD_SELECT_KERNEL=old: the reference select_kernel / invert_kernel; =fast: select_fast_kernel
// (fp32 FMAs, select_kernel's bits); otherwise select_mma_kernel (A/B timing and tests).
const char* select_kernel_env() {
  const char* e = std::getenv("SALAD_SELECT_KERNEL");
  return e ? e : "";
}
bool old_select_kernels() { return std::strcmp(select_kernel_env(), "old") == 0; }
bool fast_select_kernel() { return std::strcmp(select_kernel_env(), "fast") == 0; }

// The smallest keys-per-lane instantiation that holds n_k, pick(std::integral_constant<int, KPL>) for
// KPL in 4, 8, 16, 24, 32, 40; KPL 0 (keys in shared memory) past 32 * 40.
template <class Pick>
auto by_keys_per_lane(int64_t n_k, Pick pick) {
  const int64_t kpl = (n_k + 31) / 32;
  if (kpl <= 4) return pick(std::integral_constant<int, 4>{});
  if (kpl <= 8) return pick(std::integral_constant<int, 8>{});
  if (kpl <= 16) return pick(std::integral_constant<int, 16>{});
  if (kpl <= 24) return pick(std::integral_constant<int, 24>{});
  if (kpl <= 32) return pick(std::integral_constant<int, 32>{});
  if (kpl <= 40) return pick(std::integral_constant<int, 40>{});
  return pick(std::integral_constant<int, 0>{});
}
using SelectFn = void (*)(const float*, const float*, int64_t, int64_t, float, int, int64_t, int32_t*, int32_t*);
template <int D>
SelectFn pick_select(int64_t n_k) {
  return by_keys_per_lane(n_k, [](auto kpl) -> SelectFn { return select_fast_kernel<D, decltype(kpl)::value>; });
}
using SelectMmaFn = void (*)(const float*, const float*, int64_t, int64_t, const float*, int64_t, int64_t, float, int,
                            int64_t, int32_t*, int32_t*);
template <int D>
SelectMmaFn pick_select_mma(int64_t n_k) {
  return by_keys_per_lane(n_k, [](auto kpl) -> SelectMmaFn { return select_mma_kernel<D, decltype(kpl)::value>; });
}

// Tiling of invert_tiled_kernel: up to 8 column tiles per (b, h) (about two CTAs per SM of an
// H100 in all), narrower where the bitmap would pass 160 KB; words = 0: it does not fit.
struct InvertTiles {
  int words = 0, R = 1;
  int64_t tiles = 0;
  size_t smem = 0;
};
InvertTiles invert_tiles(const Plan& pl) {
  InvertTiles t;
  if (pl.n_k <= 0 || pl.n_q <= 0 || pl.n_q * std::max<int64_t>(pl.max_k, 1) >= (int64_t{1} << 31)) return t;
  const int64_t target = std::clamp<int64_t>(264 / std::max<int64_t>(pl.BH, 1), 1, 8);
  int64_t words = std::max<int64_t>(2, ((pl.n_k + target - 1) / target + 31) / 32);
  words = std::min(words, (pl.n_k + 31) / 32);
  auto bytes = [&](int64_t w, int64_t R) { return sizeof(int32_t) * (pl.n_q * (1 + w) + 32 * w * R); };
  auto rsegs = [&](int64_t w) { return std::max<int64_t>(1, std::min<int64_t>(kInvThreads / (32 * w), pl.n_q)); };
  while (words > 1 && bytes(words, rsegs(words)) > 160 * 1024) words = (words + 1) / 2;
  if (bytes(words, rsegs(words)) > 160 * 1024 || (pl.n_k + 32 * words - 1) / (32 * words) > 65535) return t;
  t.words = static_cast<int>(words);
  t.R = static_cast<int>(rsegs(words));
  t.tiles = (pl.n_k + 32 * words - 1) / (32 * words);
  t.smem = bytes(words, t.R);
  return t;
}

}  // namespace

Plan make_plan(const Params& p, bool backward) {
  Plan pl;
  BlockShape bs = p.blocks();
  pl.BH = p.B * p.H;
  pl.L = p.L;
  pl.D = p.D;
  pl.n_q = bs.n_q;
  pl.n_k = bs.n_k;
  pl.max_k = bs.max_k;
  pl.dense = p.opt.mode == Mode::Dense;
  pl.linear = p.opt.mode == Mode::Salad;
  pl.tile_order = p.opt.tile_order;
  pl.topk_select = !pl.dense && !p.blocks_given && p.opt.pattern == Pattern::TopK;
  // Enough chunks to fill ~2 waves of 132 SMs, each at least 256 tokens.
  pl.n_chunk = std::max<int64_t>(1, std::min<int64_t>((264 + pl.BH - 1) / pl.BH, (p.L + 255) / 256));
  // Chunks of whole 64-token tiles, so the apply kernel's 16-token tiles never straddle a chunk
  // (their qr sums feed the block means when the rotation is fused).
  pl.chunk = ((p.L + pl.n_chunk - 1) / pl.n_chunk + 63) / 64 * 64;
  pl.n_chunk = (p.L + pl.chunk - 1) / pl.chunk;
  {
    const char* e = std::getenv("SALAD_FUSE_ROTATE");
    pl.fuse_rotate = !backward && pl.linear && !pl.tile_order && linear_uses_mma(p.dtype) &&
                     p.opt.block_q % 16 == 0 && !(e && std::strcmp(e, "0") == 0);
    const char* ek = std::getenv("SALAD_FUSE_K");
    // Backward: the state pass (Sv recomputed) writes kr as well; forward: after fuse_rotate's apply
    // kernel, with block_k % 64 == 0 for the key block means from 64-token sums.
    pl.fuse_k = pl.linear && !pl.tile_order && linear_uses_mma(p.dtype) &&
                (backward || (pl.fuse_rotate && p.opt.block_k % 64 == 0)) && !(ek && std::strcmp(ek, "0") == 0);
    pl.fuse_q = backward && pl.linear && !pl.tile_order && linear_uses_mma(p.dtype) && p.opt.linear_rope &&
                p.opt.feature != FeatureMap::Softmax && !env_is("SALAD_LINEAR_BWD_Q", "mma") &&
                !env_is("SALAD_FUSE_Q_BWD", "0");
  }
  size_t cur = 0;
  auto take = [&](size_t bytes) {
    size_t o = cur;
    cur += align256(bytes);
    return o;
  };
  const size_t BHLD = static_cast<size_t>(pl.BH * p.L * p.D);
  pl.rope = take(sizeof(float2) * (p.grid.f + p.grid.h + p.grid.w) * (p.D / 2));
  if (pl.tile_order) pl.perm = take(sizeof(int32_t) * p.L);
  pl.qr = take(2 * BHLD);
  pl.kr = take(2 * BHLD);
  if (pl.topk_select && !backward) {
    pl.qmean = take(sizeof(float) * pl.BH * pl.n_q * p.D);
    pl.kmean = take(sizeof(float) * pl.BH * pl.n_k * p.D);
    if (pl.fuse_rotate) pl.qsum = take(sizeof(float) * pl.BH * ((p.L + 15) / 16) * p.D);
    if (pl.fuse_k) pl.ksum = take(sizeof(float) * pl.BH * ((p.L + 63) / 64) * p.D);
  }
  if (!backward) {
    // One slot per SM: the sm90 forward splits the items of its last, partial round of CTAs into at
    // most that many pieces.
    int dev = 0, sms = 0;
    SALAD_CUDA_CHECK(cudaGetDevice(&dev));
    SALAD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    pl.sms = sms;
    pl.fwd_split = take(sizeof(float) * pl.sms * 128 * (p.D + 1));
  }
  if (pl.linear) {
    pl.sv_part = take(sizeof(float) * pl.BH * pl.n_chunk * p.D * p.D);
    pl.z_part = take(sizeof(float) * pl.BH * pl.n_chunk * p.D);
    pl.sv = take(sizeof(float) * pl.BH * p.D * p.D);
    pl.z = take(sizeof(float) * pl.BH * p.D);
  }
  if (backward) {
    pl.delta = take(sizeof(float) * pl.BH * p.L);
    if (!pl.dense) {
      pl.inv_off = take(sizeof(int32_t) * pl.BH * (pl.n_k + 1));
      pl.inv_rows = take(sizeof(int32_t) * pl.BH * pl.n_q * std::max<int64_t>(pl.max_k, 1));
      pl.ds_group = bwd_ds_group(p, pl);
      if (pl.ds_group > 0) {
        pl.ds_pos = take(sizeof(int32_t) * pl.BH * pl.n_q * pl.max_k);
        pl.ds = take(static_cast<size_t>(pl.ds_group * bwd_ds_head_bytes(p, pl)));
      }
    }
    if (pl.linear) {
      pl.dnum = take(sizeof(float) * BHLD);
      pl.dden = take(sizeof(float) * pl.BH * p.L);
      pl.dsv_part = take(sizeof(float) * pl.BH * pl.n_chunk * p.D * p.D);
      // dz partials: per chunk (mma.sync query-side kernel) or per 512-token span (the wgmma one)
      pl.dz_part = take(sizeof(float) * pl.BH * std::max<int64_t>(pl.n_chunk, (p.L + 511) / 512) * p.D);
      pl.dsv = take(sizeof(float) * pl.BH * p.D * p.D);
      pl.dz = take(sizeof(float) * pl.BH * p.D);
      pl.dq_l = take(sizeof(float) * BHLD);
      pl.dk_l = take(sizeof(float) * BHLD);
      pl.dv_l = take(sizeof(float) * BHLD);
    }
  }
  pl.total = cur + 256;  // slack for aligning the caller's base pointer
  return pl;
}

bool kmean_from_state(const Params& p, const Plan& pl) {
  return pl.topk_select && pl.fuse_k && pl.ksum && p.opt.block_k == 64 && !env_is("SALAD_KMEAN", "kernel");
}

namespace {
void fill_rope_table(float2* table, const Params& p, const RopeInfo& r, cudaStream_t s) {
  const int64_t n = (p.grid.f + p.grid.h + p.grid.w) * (p.D / 2);
  rope_table_kernel<<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 1024)), 256, 0, s>>>(
      table, p.grid.f, p.grid.h, p.grid.w, static_cast<int>(p.D / 2), r.pf, r.ph, p.opt.rope_theta);
  SALAD_LAUNCH_CHECK();
}

// The RoPE table depends only on (device, grid, D, theta), so it is built once and kept (a few
// KB per grid; at most kRopeCache grids) instead of being recomputed in double precision by every
// forward and backward (one launch, ~3.5 us on an H200 at Wan1.3B-480p). Returns null where it
// cannot be cached (full, a stream being captured into a graph, SALAD_ROPE_CACHE=0): the caller
// then fills the workspace's copy as before.
const float2* cached_rope_table(const Params& p, const RopeInfo& r, cudaStream_t s) {
  struct Entry {
    int dev;
    int64_t f, h, w, d;
    double theta;
    float2* table;
  };
  constexpr size_t kRopeCache = 16;
  static std::mutex mu;
  static std::vector<Entry> cache;
  if (env_is("SALAD_ROPE_CACHE", "0")) return nullptr;
  int dev = 0;
  SALAD_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : cache)
    if (e.dev == dev && e.f == p.grid.f && e.h == p.grid.h && e.w == p.grid.w && e.d == p.D &&
        e.theta == p.opt.rope_theta)
      return e.table;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  SALAD_CUDA_CHECK(cudaStreamIsCapturing(s, &cap));
  if (cache.size() >= kRopeCache || cap != cudaStreamCaptureStatusNone) return nullptr;
  float2* table = nullptr;
  const int64_t n = (p.grid.f + p.grid.h + p.grid.w) * (p.D / 2);
  SALAD_CUDA_CHECK(cudaMalloc(&table, sizeof(float2) * n));
  fill_rope_table(table, p, r, s);
  SALAD_CUDA_CHECK(cudaStreamSynchronize(s));  // complete before any stream may read it
  cache.push_back({dev, p.grid.f, p.grid.h, p.grid.w, p.D, p.opt.rope_theta, table});
  return table;
}
}  // namespace

RopeInfo prepare_order_and_rope(const Params& p, const Plan& pl, void* ws, cudaStream_t s) {
  RopeInfo r;
  RopeSplit sp = rope_split(p.D);
  r.pf = static_cast<int>(sp.f / 2);
  r.ph = static_cast<int>(sp.h / 2);
  r.gf = p.grid.f;
  r.gh = p.grid.h;
  r.gw = p.grid.w;
  r.div_gw = FastDiv(static_cast<uint32_t>(p.grid.w));
  r.div_ghw = FastDiv(static_cast<uint32_t>(p.grid.w * p.grid.h));
  r.table = cached_rope_table(p, r, s);
  if (!r.table) {
    float2* table = at<float2>(ws, pl.rope);
    fill_rope_table(table, p, r, s);
    r.table = table;
  }
  if (pl.tile_order) {
    int32_t* perm = at<int32_t>(ws, pl.perm);
    tile_perm_kernel<<<static_cast<unsigned>(std::min<int64_t>((p.L + 255) / 256, 4096)), 256, 0, s>>>(
        perm, p.grid.f, p.grid.h, p.grid.w, p.opt.tile.f, p.opt.tile.h, p.opt.tile.w);
    SALAD_LAUNCH_CHECK();
    r.perm = perm;
  }
  return r;
}

template <class T>
static void rotate_t(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, bool means, bool q_too,
                     bool k_too, cudaStream_t s) {
  const int threads = 256;
  const int groups = threads / static_cast<int>(p.D / 8);
  size_t smem = sizeof(float) * groups * p.D;
  if (q_too) {
    rotate_kernel<T><<<dim3(static_cast<unsigned>(pl.n_q), static_cast<unsigned>(pl.BH)), threads, smem, s>>>(
        static_cast<const T*>(p.q), p.q_stride[0], p.q_stride[1], p.q_stride[2], p.H, at<T>(ws, pl.qr),
        means ? at<float>(ws, pl.qmean) : nullptr, p.L, static_cast<int>(p.D), p.opt.block_q, r);
    SALAD_LAUNCH_CHECK();
  }
  if (!k_too) return;
  rotate_kernel<T><<<dim3(static_cast<unsigned>(pl.n_k), static_cast<unsigned>(pl.BH)), threads, smem, s>>>(
      static_cast<const T*>(p.k), p.k_stride[0], p.k_stride[1], p.k_stride[2], p.H, at<T>(ws, pl.kr),
      means ? at<float>(ws, pl.kmean) : nullptr, p.L, static_cast<int>(p.D), p.opt.block_k, r);
  SALAD_LAUNCH_CHECK();
}

// mean[bh][i] = (sum of the per-tile sums of block i, in tile order) / tokens in block i;
// blocks are whole tiles (block % tile == 0). One CTA of D threads per (block, bh). For the
// block means of the fused rotations (16-token query tiles of the linear apply kernel, 64-token key
// tiles of its state kernel).
__global__ void tile_means_kernel(const float* __restrict__ part, int64_t tile, int64_t block, int64_t L,
                                  float* __restrict__ mean) {
  const int D = blockDim.x, d = threadIdx.x;
  const int64_t bh = blockIdx.y, i = blockIdx.x, n_tiles = (L + tile - 1) / tile;
  mean[(bh * gridDim.x + i) * D + d] = block_mean_from_tiles(part + bh * n_tiles * D + d, tile, block, i, L, D);
}

void launch_tile_means(const Params& p, const Plan& pl, void* ws, bool keys, cudaStream_t s) {
  const int64_t n = keys ? pl.n_k : pl.n_q;
  tile_means_kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(pl.BH)), static_cast<unsigned>(p.D), 0, s>>>(
      at<float>(ws, keys ? pl.ksum : pl.qsum), keys ? 64 : 16, keys ? p.opt.block_k : p.opt.block_q, p.L,
      at<float>(ws, keys ? pl.kmean : pl.qmean));
  SALAD_LAUNCH_CHECK();
}

void launch_rotate(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, bool means, cudaStream_t s,
                   bool q_too, bool k_too) {
  if (p.dtype == DType::BF16)
    rotate_t<__nv_bfloat16>(p, pl, r, ws, means, q_too, k_too, s);
  else
    rotate_t<__half>(p, pl, r, ws, means, q_too, k_too, s);
}

size_t mma_select_smem(const Params& p, const Plan& pl) {
  return sizeof(float) * kMmaSelRows * (3 * p.D + 4 + select_mma_stride(static_cast<int>(pl.n_k)));
}

bool mma_select(const Params& p, const Plan& pl) {
  return p.opt.pattern != Pattern::Window && !old_select_kernels() && !fast_select_kernel() &&
         mma_select_smem(p, pl) <= 200 * 1024;
}

void launch_select(const Params& p, const Plan& pl, void* ws, cudaStream_t s, bool from_qsum) {
  if (p.opt.pattern == Pattern::Window) {
    std::vector<int32_t> idx, cnt;
    window_table(p.grid, p.opt, &idx, &cnt);
    SALAD_CUDA_CHECK(cudaMemcpyAsync(p.block_idx, idx.data(), idx.size() * sizeof(int32_t),
                                     cudaMemcpyHostToDevice, s));
    SALAD_CUDA_CHECK(cudaMemcpyAsync(p.block_cnt, cnt.data(), cnt.size() * sizeof(int32_t),
                                     cudaMemcpyHostToDevice, s));
    for (int64_t bh = 1; bh < pl.BH; ++bh) {
      SALAD_CUDA_CHECK(cudaMemcpyAsync(p.block_idx + bh * idx.size(), p.block_idx,
                                       idx.size() * sizeof(int32_t), cudaMemcpyDeviceToDevice, s));
      SALAD_CUDA_CHECK(cudaMemcpyAsync(p.block_cnt + bh * cnt.size(), p.block_cnt,
                                       cnt.size() * sizeof(int32_t), cudaMemcpyDeviceToDevice, s));
    }
    SALAD_CUDA_CHECK(cudaStreamSynchronize(s));  // the host vectors die here
    return;
  }
  size_t smem = sizeof(float) * kSelectRows * (p.D + pl.n_k);
  if (smem > 200 * 1024)
    throw ArgumentError("L: too many key blocks for the GPU top-k (n_k=" + std::to_string(pl.n_k) + ")");
  dim3 grid(static_cast<unsigned>((pl.n_q + kSelectRows - 1) / kSelectRows), static_cast<unsigned>(pl.BH));
  const float scale = static_cast<float>(p.softmax_scale());
  if (old_select_kernels()) {
    if (smem > 48 * 1024)
      SALAD_CUDA_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
    select_kernel<<<grid, 32 * kSelectRows, smem, s>>>(at<float>(ws, pl.qmean), at<float>(ws, pl.kmean), pl.n_q,
                                                       pl.n_k, static_cast<int>(p.D), scale,
                                                       static_cast<int>(pl.max_k), pl.max_k, p.block_idx,
                                                       p.block_cnt);
  } else if (mma_select(p, pl)) {
    smem = mma_select_smem(p, pl);
    grid.x = static_cast<unsigned>((pl.n_q + kMmaSelRows - 1) / kMmaSelRows);
    SelectMmaFn fn = p.D == 64 ? pick_select_mma<64>(pl.n_k) : pick_select_mma<128>(pl.n_k);
    if (smem > 48 * 1024)
      SALAD_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const float* qsum = from_qsum ? at<float>(ws, pl.qsum) : nullptr;
    fn<<<grid, 32 * kMmaSelRows, smem, s>>>(at<float>(ws, pl.qmean), qsum, p.opt.block_q, p.L, at<float>(ws, pl.kmean),
                                            pl.n_q, pl.n_k, scale, static_cast<int>(pl.max_k), pl.max_k, p.block_idx,
                                            p.block_cnt);
  } else {
    smem = sizeof(float) * kSelectRows * select_stride(static_cast<int>(pl.n_k));
    SelectFn fn = p.D == 64 ? pick_select<64>(pl.n_k) : pick_select<128>(pl.n_k);
    if (smem > 48 * 1024)
      SALAD_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    fn<<<grid, 256, smem, s>>>(at<float>(ws, pl.qmean), at<float>(ws, pl.kmean), pl.n_q, pl.n_k, scale,
                               static_cast<int>(pl.max_k), pl.max_k, p.block_idx, p.block_cnt);
  }
  SALAD_LAUNCH_CHECK();
}

void launch_invert(const Params& p, const Plan& pl, void* ws, cudaStream_t s) {
  int32_t* off = at<int32_t>(ws, pl.inv_off);
  int32_t* rows = at<int32_t>(ws, pl.inv_rows);
  const InvertTiles t = invert_tiles(pl);
  if (t.words > 0 && !old_select_kernels()) {
    if (t.smem > 48 * 1024)
      SALAD_CUDA_CHECK(cudaFuncSetAttribute(invert_tiled_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(t.smem)));
    dim3 grid(static_cast<unsigned>(pl.BH), static_cast<unsigned>(t.tiles));
    invert_tiled_kernel<<<grid, kInvThreads, t.smem, s>>>(p.block_idx, p.block_cnt, static_cast<int>(pl.n_q),
                                                         static_cast<int>(pl.n_k), static_cast<int>(pl.max_k),
                                                         t.words, t.R, off, rows);
    SALAD_LAUNCH_CHECK();
    return;
  }
  size_t smem = sizeof(int32_t) * (2 * pl.n_k + 1);
  if (smem > 200 * 1024)
    throw ArgumentError("L: too many key blocks for the GPU inverse table (n_k=" + std::to_string(pl.n_k) + ")");
  if (smem > 48 * 1024)
    SALAD_CUDA_CHECK(cudaFuncSetAttribute(invert_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
  invert_kernel<<<static_cast<unsigned>(pl.BH), 256, smem, s>>>(p.block_idx, p.block_cnt, pl.n_q, pl.n_k,
                                                                pl.max_k, off, rows);
  SALAD_LAUNCH_CHECK();
}

}  // namespace salad::cuda::detail

// ==================================================================== public API
namespace salad::cuda {
using namespace detail;

namespace {
void check_supported(const Params& p) {
  validate(p);
  if (p.dtype != DType::BF16 && p.dtype != DType::F16)
    throw ArgumentError(std::string("dtype: expected bfloat16 or float16 for the CUDA kernels, got ") +
                        to_string(p.dtype));
  if (p.D != 64 && p.D != 128)
    throw ArgumentError("D: expected 64 or 128 for the CUDA kernels, got " + std::to_string(p.D));
  if (p.L >= (int64_t{1} << 31))
    throw ArgumentError("L: expected fewer than 2^31 tokens for the CUDA kernels, got " + std::to_string(p.L));
  auto chk = [](const int64_t* st, const char* name) {
    if (st[2] < 0 || st[2] % 8 != 0 || st[1] % 8 != 0 || st[0] % 8 != 0)
      throw ArgumentError(std::string(name) +
                          "_stride: expected strides that are multiples of 8 elements (16-byte rows)");
  };
  auto al = [](const void* ptr, const char* name) {
    if (ptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      throw ArgumentError(std::string(name) + ": expected a 16-byte aligned device pointer");
  };
  al(p.q, "q"), al(p.k, "k"), al(p.v, "v"), al(p.o_s, "o_s"), al(p.o_l, "o_l");
  chk(p.q_stride, "q");
  chk(p.k_stride, "k");
  chk(p.v_stride, "v");
}
void* aligned(void* ws) {
  uintptr_t u = reinterpret_cast<uintptr_t>(ws);
  return reinterpret_cast<void*>((u + 255) / 256 * 256);
}
}  // namespace

bool compiled() { return true; }

size_t forward_workspace_bytes(const Params& p) { return make_plan(p, false).total; }
size_t backward_workspace_bytes(const BwdParams& p) { return make_plan(p, true).total; }

void select_blocks(const Params& p, void* workspace, void* stream) {
  check_supported(p);
  if (p.opt.mode == Mode::Dense) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  void* ws = aligned(workspace);
  Plan pl = make_plan(p, false);
  if (p.opt.pattern == Pattern::TopK) {
    Plan sel = pl;
    sel.topk_select = true;
    RopeInfo r = prepare_order_and_rope(p, sel, ws, s);
    launch_rotate(p, sel, r, ws, true, s);
  }
  launch_select(p, pl, ws, s);
}

void forward(const Params& p, void* workspace, void* stream) {
  check_supported(p);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  void* ws = aligned(workspace);
  Plan pl = make_plan(p, false);
  RopeInfo r = prepare_order_and_rope(p, pl, ws, s);
  launch_rotate(p, pl, r, ws, pl.topk_select, s, /*q_too=*/!pl.fuse_rotate, /*k_too=*/!pl.fuse_k);
  bool qsum_in_select = false;
  if (pl.fuse_rotate) {
    launch_linear_fwd(p, pl, r, ws, s);  // writes qr (and, fuse_k, kr) and their tile sums too
    // The tensor-core selection sums the query block means itself (SALAD_QMEAN=kernel keeps the launch).
    qsum_in_select = pl.topk_select && !p.blocks_given && mma_select(p, pl) && !env_is("SALAD_QMEAN", "kernel");
    if (pl.topk_select && !qsum_in_select) launch_tile_means(p, pl, ws, /*keys=*/false, s);
    if (pl.topk_select && pl.fuse_k && !kmean_from_state(p, pl)) launch_tile_means(p, pl, ws, /*keys=*/true, s);
  }
  if (!pl.dense && !p.blocks_given) launch_select(p, pl, ws, s, qsum_in_select);
  launch_attn_fwd(p, pl, r, ws, s);
  if (pl.linear && !pl.fuse_rotate) launch_linear_fwd(p, pl, r, ws, s);
}

void backward(const BwdParams& p, void* workspace, void* stream) {
  check_supported(p);
  if (!p.do_s || !p.dq || !p.dk || !p.dv)
    throw ArgumentError("do_s/dq/dk/dv: expected non-null gradient pointers");
  for (const void* ptr : {p.do_s, p.do_l, static_cast<const void*>(p.dq), static_cast<const void*>(p.dk),
                          static_cast<const void*>(p.dv)})
    if (ptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      throw ArgumentError("do_s/do_l/dq/dk/dv: expected 16-byte aligned device pointers");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  void* ws = aligned(workspace);
  Plan pl = make_plan(p, true);
  // (Writing qr from the earlier, mma.sync query-side linear kernel measured 470 -> 740 us for that
  // kernel against 94 us for the rotation pass, H100, Wan1.3B-480p; the wgmma one has each row's
  // table entries in registers at once, see Plan::fuse_q.)
  RopeInfo r = prepare_order_and_rope(p, pl, ws, s);
  // (fuse_k: the linear branch's state pass writes kr, unless its incoming gradient is zero and it
  // does not run.)
  // (fuse_q: likewise the query-side linear kernel writes qr, from its table entries.)
  launch_rotate(p, pl, r, ws, false, s, /*q_too=*/!(pl.fuse_q && p.do_l), /*k_too=*/!(pl.fuse_k && p.do_l));
  if (!pl.dense) launch_invert(p, pl, ws, s);
  if (pl.linear) launch_linear_bwd(p, pl, r, ws, s);
  launch_attn_bwd(p, pl, r, ws, s);
}

}  // namespace salad::cuda
