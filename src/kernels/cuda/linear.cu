// Linear-attention branch (mode salad), forward and backward. Three generations of kernels live
// here: fp32 CUDA-core kernels (fp16 inputs, SALAD_LINEAR_KERNEL=old), mma.sync bf16 kernels
// (namespace mma), and, within it, wgmma kernels (sm_90a) for the forward state (with the k
// rotation), the forward apply (with the q rotation) and the backward's key side, the default for
// bf16. Everything is per (b, h) and order-independent, so it runs in the caller's raster order
// with no permutation.
//
//   c_j = R_j phi(k_j), a_i = R_i phi(q_i)      (R = identity when !linear_rope)
//   Sv = sum_j c_j v_j^T, z = sum_j phi(k_j)     (state kernel, chunk partials + fixed-order reduce)
//   O_i = a_i^T Sv / (phi(q_i).z + eps)           (apply kernel)
// Backward (formulas of salad::cpu::reference_backward):
//   dnum_i = dO_i / den_i, dden_i = -(dO_i . O_i) / den_i, da_i = Sv dnum_i,
//   dSv = sum_i a_i dnum_i^T, dz = sum_i dden_i phi(q_i),
//   dphi(q_i) = R_i^T da_i + dden_i z, dc_j = dSv v_j, dv_j = dSv^T c_j,
//   dphi(k_j) = R_j^T dc_j + dz; then through phi.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "internal.cuh"
#include "salad/layout.h"
#include "sm90_common.cuh"

namespace salad::cuda::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsL = kThreads / 32;
constexpr int kTok = 8;          // tokens per warp in the apply kernels
constexpr int kApplyTiles = 4;   // 64-token tiles per apply CTA (amortises the D x D state load)
constexpr int kStateBatch = 32;  // tokens staged per step in the state kernel

struct LinArgs {
  int64_t H, L;
  int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  int64_t o_sb, o_sh, o_st;  // o_l strides (batch, head, token), Params::out_strides (forward)
  FeatureMap feature;
  bool rope;
  float eps;
  RopeInfo r;
  int64_t n_chunk, chunk;  // chunk: tokens per CTA (a multiple of 64, see make_plan)
  // Fused rotation (forward, see fuse_rotate in make_plan): the apply kernel also writes
  // qr = rope3d(q) and per-16-token sums of qr.
  __nv_bfloat16* qr;
  float* qsum;
  // The wgmma state kernel's per-64-token kr sums are stored as means, (0 + sum) / tokens: the key
  // block means of block_k 64, as tile_means_kernel forms them (kmean_from_state).
  bool ksum_mean;
};

// Row of D channels held by one warp: lane owns columns lane + 32 i.
template <class T, int NI>
__device__ __forceinline__ void load_row(const T* src, float (&x)[NI], int lane) {
#pragma unroll
  for (int i = 0; i < NI; ++i) x[i] = Elem<T>::to_float(src[lane + 32 * i]);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <int NI>
__device__ __forceinline__ void phi_row(FeatureMap f, const float (&x)[NI], float (&y)[NI]) {
  if (f == FeatureMap::Relu) {
#pragma unroll
    for (int i = 0; i < NI; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
  } else if (f == FeatureMap::Elu1) {
#pragma unroll
    for (int i = 0; i < NI; ++i) y[i] = x[i] > 0.f ? x[i] + 1.f : expf(x[i]);
  } else {
    float m = x[0];
#pragma unroll
    for (int i = 1; i < NI; ++i) m = fmaxf(m, x[i]);
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NI; ++i) s += (y[i] = expf(x[i] - m));
    s = 1.f / warp_sum(s);
#pragma unroll
    for (int i = 0; i < NI; ++i) y[i] *= s;
  }
}

// dx from x, y = phi(x) and g = dL/dy.
template <int NI>
__device__ __forceinline__ void phi_bwd_row(FeatureMap f, const float (&x)[NI], const float (&y)[NI],
                                            const float (&g)[NI], float (&dx)[NI]) {
  if (f == FeatureMap::Relu) {
#pragma unroll
    for (int i = 0; i < NI; ++i) dx[i] = x[i] > 0.f ? g[i] : 0.f;
  } else if (f == FeatureMap::Elu1) {
#pragma unroll
    for (int i = 0; i < NI; ++i) dx[i] = x[i] > 0.f ? g[i] : g[i] * y[i];
  } else {
    float d = 0.f;
#pragma unroll
    for (int i = 0; i < NI; ++i) d += y[i] * g[i];
    d = warp_sum(d);
#pragma unroll
    for (int i = 0; i < NI; ++i) dx[i] = y[i] * (g[i] - d);
  }
}

// y <- R_t y (inverse: R_t^T y); pairs (2m, 2m+1) live in adjacent lanes.
template <int D, int NI>
__device__ __forceinline__ void rope_row(const RopeInfo& r, int64_t t, float (&y)[NI], bool inverse,
                                         int lane) {
#pragma unroll
  for (int i = 0; i < NI; ++i) {
    int col = lane + 32 * i;
    float other = __shfl_xor_sync(0xffffffffu, y[i], 1);
    float2 cs = rope_cs(r, t, col / 2, D / 2);
    float sn = inverse ? -cs.y : cs.y;
    if ((col & 1) == 0)
      y[i] = y[i] * cs.x - other * sn;  // x0 cos - x1 sin
    else
      y[i] = other * sn + y[i] * cs.x;  // x0 sin + x1 cos
  }
}

// ---------------------------------------------------------------- state sums
// kState: X = c = R phi(k), Y = v, zrow = phi(k).
// kDState: X = a = R phi(q), Y = dnum (fp32 workspace), zrow = dden * phi(q).
enum StateKind { kState = 0, kDState = 1 };

template <class T, int D, int KIND>
__global__ void __launch_bounds__(kThreads) state_kernel(LinArgs g, const T* __restrict__ xin,
                                                         const T* __restrict__ yin, const float* __restrict__ dnum,
                                                         const float* __restrict__ dden, float* __restrict__ part,
                                                         float* __restrict__ zpart) {
  constexpr int NI = D / 32;
  constexpr int R = D / 16;  // per-thread rows / cols of the D x D partial
  __shared__ float Xs[kStateBatch][D];
  __shared__ float Ys[kStateBatch][D];
  __shared__ float Zs[kWarpsL][D];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int ty = tid / 16, tx = tid % 16;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t chunk = g.chunk;
  const int64_t t0 = blockIdx.x * chunk, t1 = imin64(g.L, t0 + chunk);
  const int64_t xsb = KIND == kState ? g.k_sb : g.q_sb, xsh = KIND == kState ? g.k_sh : g.q_sh,
                xst = KIND == kState ? g.k_st : g.q_st;
  const T* xb = xin + b * xsb + h * xsh;
  const T* yb = yin ? yin + b * g.v_sb + h * g.v_sh : nullptr;

  float acc[R][R];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < R; ++j) acc[i][j] = 0.f;
  float zacc[NI];
#pragma unroll
  for (int i = 0; i < NI; ++i) zacc[i] = 0.f;

  for (int64_t base = t0; base < t1; base += kStateBatch) {
    for (int k = warp; k < kStateBatch; k += kWarpsL) {
      int64_t t = base + k;
      float xv[NI], yv[NI], pv[NI];
      if (t < t1) {
        load_row<T, NI>(xb + t * xst, xv, lane);
        phi_row<NI>(g.feature, xv, pv);
        float zs = 1.f;
        if (KIND == kState) {
          load_row<T, NI>(yb + t * g.v_st, yv, lane);
        } else {
#pragma unroll
          for (int i = 0; i < NI; ++i) yv[i] = dnum[(bh * g.L + t) * D + lane + 32 * i];
          zs = dden[bh * g.L + t];
        }
#pragma unroll
        for (int i = 0; i < NI; ++i) zacc[i] += zs * pv[i];
        if (g.rope) rope_row<D, NI>(g.r, t, pv, false, lane);
      } else {
#pragma unroll
        for (int i = 0; i < NI; ++i) pv[i] = yv[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        Xs[k][lane + 32 * i] = pv[i];
        Ys[k][lane + 32 * i] = yv[i];
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kStateBatch; ++k) {
      float xr[R], yr[R];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        xr[i] = Xs[k][ty + 16 * i];
        yr[i] = Ys[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < R; ++j) acc[i][j] = fmaf(xr[i], yr[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* out = part + (bh * g.n_chunk + blockIdx.x) * D * D;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < R; ++j) out[(ty + 16 * i) * D + tx + 16 * j] = acc[i][j];
#pragma unroll
  for (int i = 0; i < NI; ++i) Zs[warp][lane + 32 * i] = zacc[i];
  __syncthreads();
  for (int d = tid; d < D; d += kThreads) {
    float s = 0.f;
    for (int w = 0; w < kWarpsL; ++w) s += Zs[w][d];
    zpart[(bh * g.n_chunk + blockIdx.x) * D + d] = s;
  }
}

// out[bh][e] = sum over chunks, fixed order (deterministic).
__global__ void reduce_chunks_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t n_chunk,
                                     int64_t n) {
  const int64_t bh = blockIdx.y;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t c = 0; c < n_chunk; ++c) s += part[(bh * n_chunk + c) * n + e];
    out[bh * n + e] = s;
  }
}

// Loads the D x D state (row stride D + 1: column reads are conflict-free) and z.
template <int D>
__device__ __forceinline__ void load_state(float* S, float* z, const float* src, const float* zsrc) {
  for (int e = threadIdx.x; e < D * D; e += blockDim.x) S[(e / D) * (D + 1) + e % D] = src[e];
  for (int e = threadIdx.x; e < D; e += blockDim.x) z[e] = zsrc[e];
}

// ---------------------------------------------------------------- forward apply
template <class T, int D>
__global__ void __launch_bounds__(kThreads) apply_fwd_kernel(LinArgs g, const T* __restrict__ q,
                                                             const float* __restrict__ sv, const float* __restrict__ zv,
                                                             T* __restrict__ o) {
  constexpr int NI = D / 32;
  extern __shared__ float sm[];
  float* S = sm;                       // D x (D+1)
  float* z = S + D * (D + 1);          // D
  float* As = z + D;                   // [warps][kTok][D]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  load_state<D>(S, z, sv + bh * D * D, zv + bh * D);
  __syncthreads();
  float* Aw = As + warp * kTok * D;
  const T* qb = q + b * g.q_sb + h * g.q_sh;
  for (int tile = 0; tile < kApplyTiles; ++tile) {
    const int64_t tbase = (blockIdx.x * int64_t(kApplyTiles) + tile) * (kWarpsL * kTok) + warp * kTok;
    float den[kTok];
#pragma unroll
    for (int k = 0; k < kTok; ++k) {
      int64_t t = tbase + k;
      float xv[NI], y[NI];
      if (t < g.L) {
        load_row<T, NI>(qb + t * g.q_st, xv, lane);
        phi_row<NI>(g.feature, xv, y);
        float dz = 0.f;
#pragma unroll
        for (int i = 0; i < NI; ++i) dz += y[i] * z[lane + 32 * i];
        den[k] = warp_sum(dz) + g.eps;
        if (g.rope) rope_row<D, NI>(g.r, t, y, false, lane);
      } else {
#pragma unroll
        for (int i = 0; i < NI; ++i) y[i] = 0.f;
        den[k] = 1.f;
      }
#pragma unroll
      for (int i = 0; i < NI; ++i) Aw[k * D + lane + 32 * i] = y[i];
    }
    __syncwarp();
    float num[kTok][NI];
#pragma unroll
    for (int k = 0; k < kTok; ++k)
#pragma unroll
      for (int i = 0; i < NI; ++i) num[k][i] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      float sr[NI];
#pragma unroll
      for (int i = 0; i < NI; ++i) sr[i] = S[d * (D + 1) + lane + 32 * i];
#pragma unroll
      for (int k = 0; k < kTok; ++k) {
        float av = Aw[k * D + d];
#pragma unroll
        for (int i = 0; i < NI; ++i) num[k][i] = fmaf(av, sr[i], num[k][i]);
      }
    }
#pragma unroll
    for (int k = 0; k < kTok; ++k) {
      int64_t t = tbase + k;
      if (t >= g.L) continue;
      T* out = o + b * g.o_sb + h * g.o_sh + t * g.o_st;
      float inv = 1.f / den[k];
#pragma unroll
      for (int i = 0; i < NI; ++i) out[lane + 32 * i] = Elem<T>::from_float(num[k][i] * inv);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- backward, query side
template <class T, int D>
__global__ void __launch_bounds__(kThreads) apply_bwd_q_kernel(LinArgs g, const T* __restrict__ q,
                                                               const T* __restrict__ ol, const T* __restrict__ dol,
                                                               const float* __restrict__ sv, const float* __restrict__ zv,
                                                               float* __restrict__ dnum, float* __restrict__ dden,
                                                               float* __restrict__ dq) {
  constexpr int NI = D / 32;
  extern __shared__ float sm[];
  float* S = sm;
  float* z = S + D * (D + 1);
  float* Ns = z + D;  // [warps][kTok][D] dnum rows
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  load_state<D>(S, z, sv + bh * D * D, zv + bh * D);
  __syncthreads();
  float* Nw = Ns + warp * kTok * D;
  const T* qb = q + b * g.q_sb + h * g.q_sh;
  for (int tile = 0; tile < kApplyTiles; ++tile) {
    const int64_t tbase = (blockIdx.x * int64_t(kApplyTiles) + tile) * (kWarpsL * kTok) + warp * kTok;
    float ddn[kTok];
#pragma unroll
    for (int k = 0; k < kTok; ++k) {
      int64_t t = tbase + k;
      float dn[NI];
      ddn[k] = 0.f;
      if (t < g.L) {
        float xv[NI], y[NI], go[NI], oo[NI];
        load_row<T, NI>(qb + t * g.q_st, xv, lane);
        phi_row<NI>(g.feature, xv, y);
        load_row<T, NI>(dol + (bh * g.L + t) * D, go, lane);
        load_row<T, NI>(ol + (bh * g.L + t) * D, oo, lane);
        float dz = 0.f, dot = 0.f;
#pragma unroll
        for (int i = 0; i < NI; ++i) {
          dz += y[i] * z[lane + 32 * i];
          dot += go[i] * oo[i];
        }
        float den = warp_sum(dz) + g.eps;
        ddn[k] = -warp_sum(dot) / den;
#pragma unroll
        for (int i = 0; i < NI; ++i) {
          dn[i] = go[i] / den;
          dnum[(bh * g.L + t) * D + lane + 32 * i] = dn[i];
        }
        if (lane == 0) dden[bh * g.L + t] = ddn[k];
      } else {
#pragma unroll
        for (int i = 0; i < NI; ++i) dn[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < NI; ++i) Nw[k * D + lane + 32 * i] = dn[i];
    }
    __syncwarp();
    // da[k][d] = sum_e Sv[d][e] dnum[k][e], lane owns d = lane + 32 i
    float da[kTok][NI];
#pragma unroll
    for (int k = 0; k < kTok; ++k)
#pragma unroll
      for (int i = 0; i < NI; ++i) da[k][i] = 0.f;
#pragma unroll 4
    for (int e = 0; e < D; ++e) {
      float sr[NI];
#pragma unroll
      for (int i = 0; i < NI; ++i) sr[i] = S[(lane + 32 * i) * (D + 1) + e];
#pragma unroll
      for (int k = 0; k < kTok; ++k) {
        float nv = Nw[k * D + e];
#pragma unroll
        for (int i = 0; i < NI; ++i) da[k][i] = fmaf(sr[i], nv, da[k][i]);
      }
    }
#pragma unroll
    for (int k = 0; k < kTok; ++k) {
      int64_t t = tbase + k;
      if (t >= g.L) continue;
      float xv[NI], y[NI], gph[NI], dx[NI];
      load_row<T, NI>(qb + t * g.q_st, xv, lane);
      phi_row<NI>(g.feature, xv, y);
#pragma unroll
      for (int i = 0; i < NI; ++i) gph[i] = da[k][i];
      if (g.rope) rope_row<D, NI>(g.r, t, gph, true, lane);
#pragma unroll
      for (int i = 0; i < NI; ++i) gph[i] += ddn[k] * z[lane + 32 * i];
      phi_bwd_row<NI>(g.feature, xv, y, gph, dx);
#pragma unroll
      for (int i = 0; i < NI; ++i) dq[(bh * g.L + t) * D + lane + 32 * i] = dx[i];
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- backward, key side
template <class T, int D>
__global__ void __launch_bounds__(kThreads) apply_bwd_k_kernel(LinArgs g, const T* __restrict__ kin,
                                                               const T* __restrict__ vin, const float* __restrict__ dsv,
                                                               const float* __restrict__ dzv, float* __restrict__ dk,
                                                               float* __restrict__ dv) {
  constexpr int NI = D / 32;
  extern __shared__ float sm[];
  float* S = sm;  // dSv
  float* z = S + D * (D + 1);
  float* Cs = z + D;                        // [warps][kTok][D]
  float* Vs = Cs + kWarpsL * kTok * D;      // [warps][kTok][D]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  load_state<D>(S, z, dsv + bh * D * D, dzv + bh * D);
  __syncthreads();
  float* Cw = Cs + warp * kTok * D;
  float* Vw = Vs + warp * kTok * D;
  const T* kb = kin + b * g.k_sb + h * g.k_sh;
  const T* vb = vin + b * g.v_sb + h * g.v_sh;
  for (int tile = 0; tile < kApplyTiles; ++tile) {
    const int64_t tbase = (blockIdx.x * int64_t(kApplyTiles) + tile) * (kWarpsL * kTok) + warp * kTok;
#pragma unroll
    for (int k = 0; k < kTok; ++k) {
      int64_t t = tbase + k;
      float xv[NI], y[NI], vv[NI];
      if (t < g.L) {
        load_row<T, NI>(kb + t * g.k_st, xv, lane);
        phi_row<NI>(g.feature, xv, y);
        if (g.rope) rope_row<D, NI>(g.r, t, y, false, lane);
        load_row<T, NI>(vb + t * g.v_st, vv, lane);
      } else {
#pragma unroll
        for (int i = 0; i < NI; ++i) y[i] = vv[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        Cw[k * D + lane + 32 * i] = y[i];
        Vw[k * D + lane + 32 * i] = vv[i];
      }
    }
    __syncwarp();
    float dc[kTok][NI], dvv[kTok][NI];
#pragma unroll
    for (int k = 0; k < kTok; ++k)
#pragma unroll
      for (int i = 0; i < NI; ++i) dc[k][i] = dvv[k][i] = 0.f;
#pragma unroll 2
    for (int e = 0; e < D; ++e) {
      float sr[NI], sc[NI];
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        sr[i] = S[(lane + 32 * i) * (D + 1) + e];  // dSv[d = lane+32i][e]
        sc[i] = S[e * (D + 1) + lane + 32 * i];    // dSv[e][lane+32i]
      }
#pragma unroll
      for (int k = 0; k < kTok; ++k) {
        float vv = Vw[k * D + e], cv = Cw[k * D + e];
#pragma unroll
        for (int i = 0; i < NI; ++i) {
          dc[k][i] = fmaf(sr[i], vv, dc[k][i]);
          dvv[k][i] = fmaf(sc[i], cv, dvv[k][i]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kTok; ++k) {
      int64_t t = tbase + k;
      if (t >= g.L) continue;
      float xv[NI], y[NI], gph[NI], dx[NI];
      load_row<T, NI>(kb + t * g.k_st, xv, lane);
      phi_row<NI>(g.feature, xv, y);
#pragma unroll
      for (int i = 0; i < NI; ++i) gph[i] = dc[k][i];
      if (g.rope) rope_row<D, NI>(g.r, t, gph, true, lane);
#pragma unroll
      for (int i = 0; i < NI; ++i) gph[i] += z[lane + 32 * i];
      phi_bwd_row<NI>(g.feature, xv, y, gph, dx);
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        dk[(bh * g.L + t) * D + lane + 32 * i] = dx[i];
        dv[(bh * g.L + t) * D + lane + 32 * i] = dvv[k][i];
      }
    }
    __syncwarp();
  }
}

LinArgs make_args(const Params& p, const Plan& pl, const RopeInfo& r) {
  LinArgs g;
  g.H = p.H;
  g.L = p.L;
  g.q_sb = p.q_stride[0], g.q_sh = p.q_stride[1], g.q_st = p.q_stride[2];
  const std::array<int64_t, 3> os = p.out_strides();
  g.o_sb = os[0], g.o_sh = os[1], g.o_st = os[2];
  g.k_sb = p.k_stride[0], g.k_sh = p.k_stride[1], g.k_st = p.k_stride[2];
  g.v_sb = p.v_stride[0], g.v_sh = p.v_stride[1], g.v_st = p.v_stride[2];
  g.feature = p.opt.feature;
  g.rope = p.opt.linear_rope;
  g.eps = static_cast<float>(p.opt.eps);
  g.r = r;
  g.n_chunk = pl.n_chunk;
  g.chunk = pl.chunk;
  g.qr = nullptr;
  g.qsum = nullptr;
  g.ksum_mean = kmean_from_state(p, pl);
  return g;
}

template <class T, int D>
void state(const LinArgs& g, const Plan& pl, const T* x, const T* y, const float* dnum, const float* dden,
           float* part, float* zpart, float* out, float* zout, int kind, cudaStream_t s) {
  dim3 grid(static_cast<unsigned>(pl.n_chunk), static_cast<unsigned>(pl.BH));
  if (kind == kState)
    state_kernel<T, D, kState><<<grid, kThreads, 0, s>>>(g, x, y, dnum, dden, part, zpart);
  else
    state_kernel<T, D, kDState><<<grid, kThreads, 0, s>>>(g, x, y, dnum, dden, part, zpart);
  SALAD_LAUNCH_CHECK();
  reduce_chunks_kernel<<<dim3((D * D + 255) / 256, static_cast<unsigned>(pl.BH)), 256, 0, s>>>(part, out, pl.n_chunk,
                                                                                               D * D);
  SALAD_LAUNCH_CHECK();
  reduce_chunks_kernel<<<dim3(1, static_cast<unsigned>(pl.BH)), 256, 0, s>>>(zpart, zout, pl.n_chunk, D);
  SALAD_LAUNCH_CHECK();
}

template <class K>
void set_smem(K kernel, size_t bytes) {
  SALAD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

unsigned apply_blocks(int64_t L) {
  const int64_t per = int64_t(kApplyTiles) * kWarpsL * kTok;
  return static_cast<unsigned>((L + per - 1) / per);
}

template <class T, int D>
void fwd(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  LinArgs g = make_args(p, pl, r);
  state<T, D>(g, pl, static_cast<const T*>(p.k), static_cast<const T*>(p.v), nullptr, nullptr,
              at<float>(ws, pl.sv_part), at<float>(ws, pl.z_part), at<float>(ws, pl.sv), at<float>(ws, pl.z), kState, s);
  size_t smem = sizeof(float) * (D * (D + 1) + D + kWarpsL * kTok * D);
  set_smem(apply_fwd_kernel<T, D>, smem);
  apply_fwd_kernel<T, D><<<dim3(apply_blocks(p.L), static_cast<unsigned>(pl.BH)), kThreads, smem, s>>>(
      g, static_cast<const T*>(p.q), at<float>(ws, pl.sv), at<float>(ws, pl.z), static_cast<T*>(p.o_l));
  SALAD_LAUNCH_CHECK();
}

template <class T, int D>
void bwd(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  LinArgs g = make_args(p, pl, r);
  state<T, D>(g, pl, static_cast<const T*>(p.k), static_cast<const T*>(p.v), nullptr, nullptr,
              at<float>(ws, pl.sv_part), at<float>(ws, pl.z_part), at<float>(ws, pl.sv), at<float>(ws, pl.z), kState, s);
  size_t smem_q = sizeof(float) * (D * (D + 1) + D + kWarpsL * kTok * D);
  set_smem(apply_bwd_q_kernel<T, D>, smem_q);
  apply_bwd_q_kernel<T, D><<<dim3(apply_blocks(p.L), static_cast<unsigned>(pl.BH)), kThreads, smem_q, s>>>(
      g, static_cast<const T*>(p.q), static_cast<const T*>(p.o_l), static_cast<const T*>(p.do_l), at<float>(ws, pl.sv),
      at<float>(ws, pl.z), at<float>(ws, pl.dnum), at<float>(ws, pl.dden), at<float>(ws, pl.dq_l));
  SALAD_LAUNCH_CHECK();
  state<T, D>(g, pl, static_cast<const T*>(p.q), nullptr, at<float>(ws, pl.dnum), at<float>(ws, pl.dden),
              at<float>(ws, pl.dsv_part), at<float>(ws, pl.dz_part), at<float>(ws, pl.dsv), at<float>(ws, pl.dz), kDState,
              s);
  size_t smem_k = sizeof(float) * (D * (D + 1) + D + 2 * kWarpsL * kTok * D);
  set_smem(apply_bwd_k_kernel<T, D>, smem_k);
  apply_bwd_k_kernel<T, D><<<dim3(apply_blocks(p.L), static_cast<unsigned>(pl.BH)), kThreads, smem_k, s>>>(
      g, static_cast<const T*>(p.k), static_cast<const T*>(p.v), at<float>(ws, pl.dsv), at<float>(ws, pl.dz),
      at<float>(ws, pl.dk_l), at<float>(ws, pl.dv_l));
  SALAD_LAUNCH_CHECK();
}

// ==================================================================== tensor-core path (bf16)
// The D x D products run on mma.sync m16n8k16 (bf16 operands, fp32 accumulation);
// feature map, RoPE, normaliser and every reduction stay in fp32. Rounded to bf16:
// c = R phi(k) and a = R phi(q) (operands), Sv (hi part in the forward apply; hi + lo
// in the query-side backward), a / den and dSv in the backward; v and dO are exact.
// Partial sums per (b, h, chunk) are reduced in fixed order (deterministic).
namespace mma {

using bf16 = __nv_bfloat16;
constexpr int kW = 8;          // warps per CTA
constexpr int kT = kW * 32;    // threads per CTA
constexpr int kTT = 64;        // tokens per state-kernel tile
constexpr int kWT = 16;        // tokens per warp tile in the apply kernels

// A token's rope3d table offsets (row * half) for the frame, row and column axes.
struct Rows {
  int f, h, w;
};
// 32-bit index math (check_supported guarantees L < 2^31).
__device__ __forceinline__ Rows tok_rows(const RopeInfo& r, int64_t t, int half) {
  const TokPos tp = tok_pos(r, static_cast<uint32_t>(t));
  const int gf = static_cast<int>(r.gf), gfh = static_cast<int>(r.gf + r.gh);
  return {static_cast<int>(tp.f) * half, (gf + static_cast<int>(tp.h)) * half, (gfh + static_cast<int>(tp.w)) * half};
}
__device__ __forceinline__ float2 tok_cs(const RopeInfo& r, const Rows& rw, int m) {
  const int off = m < r.pf ? rw.f : (m < r.pf + r.ph ? rw.h : rw.w);
  return __ldg(&r.table[off + m]);
}

// 8 consecutive bf16 <-> floats.
__device__ __forceinline__ void unpack8(const bf16* p, float* x) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = Elem<bf16>::unpack(w[i]);
    x[2 * i] = f.x, x[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ uint4 pack8(const float* x) {
  uint4 u;
  u.x = Elem<bf16>::pack(x[0], x[1]);
  u.y = Elem<bf16>::pack(x[2], x[3]);
  u.z = Elem<bf16>::pack(x[4], x[5]);
  u.w = Elem<bf16>::pack(x[6], x[7]);
  return u;
}

// Reductions over the 8 lanes that share one token row (lanes 8g .. 8g+7).
__device__ __forceinline__ float g8_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  return v;
}
__device__ __forceinline__ float g8_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
  return v;
}

// phi over a row spread across 8 lanes (CPL channels each); softmax also returns max and 1/sum.
// Must be called by all 32 lanes (shuffles).
template <int CPL>
__device__ __forceinline__ void phi8(FeatureMap f, const float* x, float* y, float& mx, float& inv) {
  mx = 0.f, inv = 1.f;
  if (f == FeatureMap::Relu) {
#pragma unroll
    for (int i = 0; i < CPL; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
  } else if (f == FeatureMap::Elu1) {
#pragma unroll
    for (int i = 0; i < CPL; ++i) y[i] = x[i] > 0.f ? x[i] + 1.f : expf(x[i]);
  } else {
    float m = x[0];
#pragma unroll
    for (int i = 1; i < CPL; ++i) m = fmaxf(m, x[i]);
    m = g8_max(m);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < CPL; ++i) s += (y[i] = expf(x[i] - m));
    s = 1.f / g8_sum(s);
#pragma unroll
    for (int i = 0; i < CPL; ++i) y[i] *= s;
    mx = m, inv = s;
  }
}

// (y0, y1) rotated by (cos, sin) = cs, into (o0, o1).
__device__ __forceinline__ void rot_pair(float2 cs, float y0, float y1, float& o0, float& o1) {
  o0 = y0 * cs.x - y1 * cs.y;
  o1 = y0 * cs.y + y1 * cs.x;
}

// Rotates the CPL channels starting at channel c0 (even) of token rows rw.
template <int CPL, int D>
__device__ __forceinline__ void rope8(const RopeInfo& r, const Rows& rw, int c0, float* y) {
#pragma unroll
  for (int p = 0; p < CPL / 2; ++p) rot_pair(tok_cs(r, rw, c0 / 2 + p), y[2 * p], y[2 * p + 1], y[2 * p], y[2 * p + 1]);
}

// Copies rows [base, base + ROWS) of a (row stride st) into a swizzled smem tile; rows >= end are
// zero. NTHR threads starting at index `me` each copy one 16-byte column chunk of every
// (NTHR / (D / 8))-th row: the chunk, the source row pointer and the swizzled offset are computed
// once, not per copy (the integer work was a quarter of the state kernel's instructions).
template <int D, int ROWS, int NTHR>
__device__ __forceinline__ void load_rows(bf16* tile, const bf16* src, int64_t st, int64_t base, int64_t end,
                                          int me) {
  constexpr int CH = D / 8;
  constexpr int RS = NTHR / CH;  // rows per step
  static_assert(NTHR % CH == 0 && ROWS % RS == 0, "whole rows per step");
  const int ch = me % CH, r0 = me / CH;
  const int lim = static_cast<int>(imin64(end - base, ROWS));  // rows present (32-bit compares below)
  const bf16* s0 = src + base * st + ch * 8;
  const bf16* p = s0 + r0 * st;  // advanced by one pointer add per row (no 64-bit multiply per copy)
  const int64_t step = RS * st;
  const uint32_t d0 = smem_addr(tile);
#pragma unroll
  for (int k = 0; k < ROWS / RS; ++k) {
    const int row = r0 + k * RS;
    const bool ok = row < lim;
    cp_async16(d0 + 2u * static_cast<uint32_t>(swz<D>(row, ch * 8)), ok ? p : s0, ok ? 16 : 0);
    p += step;
  }
}

// Rotates x (CPL channels from c0, even) into xr with the token's rope3d table entries and, when
// rope_y, y in place with the same entries.
template <int CPL, int D>
__device__ __forceinline__ void rope_xy(const RopeInfo& r, const Rows& rw, int c0, const float* x, float* xr, float* y,
                                        bool rope_y) {
#pragma unroll
  for (int p = 0; p < CPL / 2; ++p) {
    const float2 cs = tok_cs(r, rw, c0 / 2 + p);
    rot_pair(cs, x[2 * p], x[2 * p + 1], xr[2 * p], xr[2 * p + 1]);
    if (rope_y) rot_pair(cs, y[2 * p], y[2 * p + 1], y[2 * p], y[2 * p + 1]);
  }
}

// Sum over the 4 token rows of a warp that share this lane's channels (lanes s, s + 8, ...).
template <int CPL>
__device__ __forceinline__ void rows4_sum(float* a) {
#pragma unroll
  for (int i = 0; i < CPL; ++i) {
    a[i] += __shfl_xor_sync(0xffffffffu, a[i], 8);
    a[i] += __shfl_xor_sync(0xffffffffu, a[i], 16);
  }
}

// The phi / RoPE / z part of the state kernel for one 64-token tile (in place, bf16).
template <int D>
__device__ __forceinline__ void state_transform(const LinArgs& g, bf16* X, int64_t base, int64_t t1,
                                                float (&zacc)[D / 8]) {
  constexpr int CPL = D / 8;
  const int s = threadIdx.x & 7;
  const bool full = t1 - base >= kTT;  // all but a chunk's last tile: no row needs masking
#pragma unroll
  for (int pass = 0; pass < kTT / (kT / 8); ++pass) {
    const int row = (threadIdx.x >> 3) + pass * (kT / 8);
    const int64_t t = base + row;
    const bool ok = t < t1;
    float x[CPL], y[CPL], mx, inv;
#pragma unroll
    for (int c = 0; c < CPL / 8; ++c) unpack8(X + swz<D>(row, s * CPL + 8 * c), x + 8 * c);
    phi8<CPL>(g.feature, x, y, mx, inv);
    if (!full && !ok) {  // rows past the end are zero-filled, but phi(0) is not 0 for elu1 / softmax
#pragma unroll
      for (int i = 0; i < CPL; ++i) y[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < CPL; ++i) zacc[i] += y[i];
    if (g.rope && ok) rope8<CPL, D>(g.r, tok_rows(g.r, t, D / 2), s * CPL, y);
#pragma unroll
    for (int c = 0; c < CPL / 8; ++c)
      *reinterpret_cast<uint4*>(X + swz<D>(row, s * CPL + 8 * c)) = pack8(y + 8 * c);
  }
}

// part[bh][chunk] = X^T Y over the chunk's tokens (D x D, fp32).
// TRANSFORM: X = k (raw), transformed to c = R phi(k), zpart = sum phi(k).
// !TRANSFORM: X used as is (a / den), Y = dO; no z.
// 2 CTAs / SM: without the bound, D = 128 with TRANSFORM took 192 registers -> 8 warps / SM and two
// waves of the ~2 CTAs / SM grid; with it, a few loop-invariant spills and 16% less time (H100, ncu:
// 197 -> 166 us at Wan1.3B-480p). The double-buffered apply kernels tried alongside were no faster
// (bwd q side 506 -> 557 us, k side 441 -> 442 us) and were dropped.
template <int D, bool TRANSFORM>
__global__ void __launch_bounds__(kT, 2) state_mma_kernel(LinArgs g, const bf16* __restrict__ X, int64_t xsb, int64_t xsh,
                                                       int64_t xst, const bf16* __restrict__ Y, int64_t ysb,
                                                       int64_t ysh, int64_t yst, float* __restrict__ part,
                                                       float* __restrict__ zpart) {
  constexpr int CPL = D / 8;
  constexpr int MT = D / 32, NT = D / 32;  // warp tile (D/2) x (D/4): MT m16 tiles, NT n8 tiles
  extern __shared__ __align__(16) unsigned char smraw[];
  bf16* Xs = reinterpret_cast<bf16*>(smraw);  // [2][kTT * D]
  bf16* Ys = Xs + 2 * kTT * D;                // [2][kTT * D]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t chunk = g.chunk;
  const int64_t t0 = blockIdx.x * chunk, t1 = imin64(g.L, t0 + chunk);
  const bf16* xb = X + b * xsb + h * xsh;
  const bf16* yb = Y + b * ysb + h * ysh;
  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  float zacc[CPL];
#pragma unroll
  for (int i = 0; i < CPL; ++i) zacc[i] = 0.f;

  const int ntile = t1 > t0 ? static_cast<int>((t1 - t0 + kTT - 1) / kTT) : 0;
  if (ntile > 0) {
    load_rows<D, kTT, kT>(Xs, xb, xst, t0, t1, tid);
    load_rows<D, kTT, kT>(Ys, yb, yst, t0, t1, tid);
  }
  cp_async_commit();
  const int mat = lane >> 3, r8 = lane & 7;
  for (int it = 0; it < ntile; ++it) {
    const int buf = it & 1;
    const int64_t base = t0 + int64_t(it) * kTT;
    if (it + 1 < ntile) {
      load_rows<D, kTT, kT>(Xs + (buf ^ 1) * kTT * D, xb, xst, base + kTT, t1, tid);
      load_rows<D, kTT, kT>(Ys + (buf ^ 1) * kTT * D, yb, yst, base + kTT, t1, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    bf16* xt = Xs + buf * kTT * D;
    const bf16* yt = Ys + buf * kTT * D;
    if (TRANSFORM) {
      state_transform<D>(g, xt, base, t1, zacc);
      __syncthreads();
    }
#pragma unroll
    for (int kk = 0; kk < kTT / 16; ++kk) {
      uint32_t a[MT][4], bb[NT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        int row = kk * 16 + ((mat >> 1) << 3) + r8;
        int col = wm * (D / 2) + mi * 16 + ((mat & 1) << 3);
        ldmatrix_x4_trans(smem_addr(xt + swz<D>(row, col)), a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
      }
#pragma unroll
      for (int nj = 0; nj < NT / 2; ++nj) {
        int row = kk * 16 + ((mat & 1) << 3) + r8;
        int col = wn * (D / 4) + nj * 16 + ((mat >> 1) << 3);
        ldmatrix_x4_trans(smem_addr(yt + swz<D>(row, col)), bb[2 * nj][0], bb[2 * nj][1], bb[2 * nj + 1][0],
                          bb[2 * nj + 1][1]);
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) mma16816<bf16>(acc[mi][ni], a[mi], bb[ni][0], bb[ni][1]);
    }
    __syncthreads();
  }
  float* out = part + (bh * g.n_chunk + blockIdx.x) * D * D;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni) {
      int row = wm * (D / 2) + mi * 16 + (lane >> 2);
      int col = wn * (D / 4) + ni * 8 + 2 * (lane & 3);
      *reinterpret_cast<float2*>(out + row * D + col) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(out + (row + 8) * D + col) = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
  if (TRANSFORM) {
    float* zr = reinterpret_cast<float*>(smraw);  // [kT / 8][D], the tiles are dead
#pragma unroll
    for (int i = 0; i < CPL; ++i) zr[(tid >> 3) * D + (tid & 7) * CPL + i] = zacc[i];
    __syncthreads();
    for (int d = tid; d < D; d += kT) {
      float s = 0.f;
      for (int gi = 0; gi < kT / 8; ++gi) s += zr[gi * D + d];
      zpart[(bh * g.n_chunk + blockIdx.x) * D + d] = s;
    }
  }
}

// Sum over chunks (fixed order) -> bf16 hi (and lo = bf16(s - hi) when split).
// zpart / zout (optional): block 0 also sums the normaliser's n_z partials (reduce_chunks_kernel's
// order, one launch fewer).
template <int D>
__global__ void reduce_sv_kernel(const float* __restrict__ part, bf16* __restrict__ out, int64_t n_chunk, bool split,
                                 const float* __restrict__ zpart = nullptr, float* __restrict__ zout = nullptr,
                                 int64_t n_z = 0) {
  const int64_t bh = blockIdx.y;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (zout && blockIdx.x == 0) {
    for (int ez = threadIdx.x; ez < D; ez += blockDim.x) {
      float z = 0.f;
      for (int64_t c = 0; c < n_z; ++c) z += zpart[(bh * n_z + c) * D + ez];
      zout[bh * D + ez] = z;
    }
  }
  if (e >= D * D) return;
  float s = 0.f;
  for (int64_t c = 0; c < n_chunk; ++c) s += part[(bh * n_chunk + c) * D * D + e];
  bf16 hi = __float2bfloat16_rn(s);
  if (split) {
    out[bh * 2 * D * D + e] = hi;
    out[bh * 2 * D * D + D * D + e] = __float2bfloat16_rn(s - __bfloat162float(hi));
  } else {
    out[bh * D * D + e] = hi;
  }
}

// Loads a D x D bf16 matrix (row-major) into a swizzled tile (cp.async, no wait).
template <int D>
__device__ __forceinline__ void load_mat(bf16* tile, const bf16* src) {
  for (int idx = threadIdx.x; idx < D * D / 8; idx += blockDim.x) {
    int row = idx / (D / 8), ch = idx % (D / 8);
    cp_async16(smem_addr(tile + swz<D>(row, ch * 8)), src + row * D + ch * 8, 16);
  }
}

// acc[16 x D] += A (16 x D, swizzled smem tile, row-major, non-trans ldmatrix) x B, with B given by
// BT: B[k][n] = M[n][k] (M row-major D x D swizzled: non-trans ldmatrix) or
// !BT: B[k][n] = M[k][n] (trans ldmatrix).
template <int D, bool BT>
__device__ __forceinline__ void warp_gemm(float (&acc)[D / 8][4], const bf16* A, const bf16* M, int lane) {
  const int mat = lane >> 3, r8 = lane & 7;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(smem_addr(A + swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, kk * 16 + (lane >> 4) * 8)), a[0], a[1],
                a[2], a[3]);
#pragma unroll
    for (int nj = 0; nj < D / 16; ++nj) {
      uint32_t b0, b1, b2, b3;
      if (BT) {
        int row = nj * 16 + ((mat >> 1) << 3) + r8;
        int col = kk * 16 + ((mat & 1) << 3);
        ldmatrix_x4(smem_addr(M + swz<D>(row, col)), b0, b1, b2, b3);
      } else {
        int row = kk * 16 + ((mat & 1) << 3) + r8;
        int col = nj * 16 + ((mat >> 1) << 3);
        ldmatrix_x4_trans(smem_addr(M + swz<D>(row, col)), b0, b1, b2, b3);
      }
      mma16816<bf16>(acc[2 * nj], a, b0, b1);
      mma16816<bf16>(acc[2 * nj + 1], a, b2, b3);
    }
  }
}

template <int D>
__device__ __forceinline__ void zero_acc(float (&acc)[D / 8][4]) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Token range of this CTA (same chunks as the state kernel).
struct Range {
  int64_t t0, t1;
  int ntile;
};
__device__ __forceinline__ Range cta_range(const LinArgs& g) {
  const int64_t chunk = g.chunk;
  Range r;
  r.t0 = blockIdx.x * chunk;
  r.t1 = imin64(g.L, r.t0 + chunk);
  r.ntile = r.t1 > r.t0 ? static_cast<int>((r.t1 - r.t0 + kWT - 1) / kWT) : 0;
  return r;
}

// ---------------------------------------------------------------- forward apply (mma)
// Each warp owns 16-token tiles: q -> a = R phi(q) in place (bf16), den; O = a Sv_hi / den.
template <int D>
__global__ void __launch_bounds__(kT, 2) apply_fwd_mma_kernel(LinArgs g, const bf16* __restrict__ q,
                                                              const bf16* __restrict__ svhl,
                                                              const float* __restrict__ zv, bf16* __restrict__ o) {
  constexpr int CPL = D / 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  bf16* Svs = reinterpret_cast<bf16*>(smraw);                 // D x D
  bf16* Wb = Svs + D * D;                                     // [kW][2][kWT * D]
  float* inv_all = reinterpret_cast<float*>(Wb + kW * 2 * kWT * D);  // [kW][kWT]
  float* zs = inv_all + kW * kWT;                                    // [D]: z (in shared memory: registers
                                                                     // go to the fused rotation's sums)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, s = lane & 7;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const Range rg = cta_range(g);
  load_mat<D>(Svs, svhl + bh * 2 * D * D);
  cp_async_commit();
  for (int d = tid; d < D; d += kT) zs[d] = zv[bh * D + d];
  cp_async_wait<0>();
  __syncthreads();
  const bf16* qb = q + b * g.q_sb + h * g.q_sh;
  bf16* ob = o + b * g.o_sb + h * g.o_sh;
  const int ost = static_cast<int>(g.o_st);  // D or H * D
  bf16* buf0 = Wb + warp * 2 * kWT * D;
  float* inv = inv_all + warp * kWT;
  int tile = warp;
  if (tile < rg.ntile) load_rows<D, kWT, 32>(buf0, qb, g.q_st, rg.t0 + int64_t(tile) * kWT, rg.t1, lane);
  cp_async_commit();
  for (int i = 0; tile < rg.ntile; ++i, tile += kW) {
    bf16* X = buf0 + (i & 1) * kWT * D;
    const int64_t base = rg.t0 + int64_t(tile) * kWT;
    if (tile + kW < rg.ntile) {
      load_rows<D, kWT, 32>(buf0 + ((i + 1) & 1) * kWT * D, qb, g.q_st, base + kW * kWT, rg.t1, lane);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();
    float racc[CPL];  // fused rotation: this lane's sums of qr over its rows of the tile
#pragma unroll
    for (int c = 0; c < CPL; ++c) racc[c] = 0.f;
#pragma unroll
    for (int rr = 0; rr < kWT / 4; ++rr) {
      const int row = rr * 4 + (lane >> 3);
      const int64_t t = base + row;
      const bool ok = t < rg.t1;
      float x[CPL], y[CPL], mx, iv;
#pragma unroll
      for (int c = 0; c < CPL / 8; ++c) unpack8(X + swz<D>(row, s * CPL + 8 * c), x + 8 * c);
      phi8<CPL>(g.feature, x, y, mx, iv);
      float dz = 0.f;
#pragma unroll
      for (int c = 0; c < CPL; ++c) dz += y[c] * zs[s * CPL + c];
      dz = g8_sum(dz) + g.eps;
      // Rows past the end (zero-filled x) need no masking: their GEMM rows are never stored.
      if (g.qr) {
        if (ok) {
          float xr[CPL];
          rope_xy<CPL, D>(g.r, tok_rows(g.r, t, D / 2), s * CPL, x, xr, y, g.rope);
#pragma unroll
          for (int c = 0; c < CPL / 8; ++c)
            *reinterpret_cast<uint4*>(g.qr + (bh * g.L + t) * D + s * CPL + 8 * c) = pack8(xr + 8 * c);
#pragma unroll
          for (int c = 0; c < CPL; ++c) racc[c] += xr[c];
        }
      } else if (g.rope && ok) {
        rope8<CPL, D>(g.r, tok_rows(g.r, t, D / 2), s * CPL, y);
      }
#pragma unroll
      for (int c = 0; c < CPL / 8; ++c) *reinterpret_cast<uint4*>(X + swz<D>(row, s * CPL + 8 * c)) = pack8(y + 8 * c);
      if (s == 0) inv[row] = ok ? __fdividef(1.f, dz) : 0.f;  // den >= eps > 0
    }
    if (g.qsum) {  // qr sums of this 16-token tile (rows in a fixed order)
      rows4_sum<CPL>(racc);
      if (lane < 8) {
        float* dst = g.qsum + (bh * ((g.L + kWT - 1) / kWT) + base / kWT) * D + s * CPL;
#pragma unroll
        for (int c = 0; c < CPL; c += 4) *reinterpret_cast<float4*>(dst + c) = make_float4(racc[c], racc[c + 1], racc[c + 2], racc[c + 3]);
      }
    }
    __syncwarp();
    float acc[D / 8][4];
    zero_acc<D>(acc);
    warp_gemm<D, false>(acc, X, Svs, lane);
    __syncwarp();
    const int r0 = lane >> 2;
    const float i0 = inv[r0], i1 = inv[r0 + 8];
#pragma unroll
    for (int ni = 0; ni < D / 8; ++ni) {
      const int col = ni * 8 + 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(X + swz<D>(r0, col)) = Elem<bf16>::pack(acc[ni][0] * i0, acc[ni][1] * i0);
      *reinterpret_cast<uint32_t*>(X + swz<D>(r0 + 8, col)) = Elem<bf16>::pack(acc[ni][2] * i1, acc[ni][3] * i1);
    }
    __syncwarp();
    {
      bf16* orow = ob + base * g.o_st;  // 16-byte chunk idx of the tile: row idx / (D / 8), column (idx % (D / 8)) * 8
      const int lim = static_cast<int>(imin64(rg.t1 - base, kWT));
#pragma unroll
      for (int k = 0; k < kWT * D / 8 / 32; ++k) {
        const int idx = lane + 32 * k, row = idx / (D / 8), ch = idx % (D / 8);
        if (row < lim)
          *reinterpret_cast<uint4*>(orow + row * ost + ch * 8) = *reinterpret_cast<const uint4*>(X + swz<D>(row, ch * 8));
      }
    }
    __syncwarp();
  }
}

// dx for the pair (x0, x1) -> g (in place); y from x (softmax: exp(x - mx) * iv).
__device__ __forceinline__ float phi_y(FeatureMap f, float x, float mx, float iv) {
  if (f == FeatureMap::Relu) return x > 0.f ? x : 0.f;
  if (f == FeatureMap::Elu1) return x > 0.f ? x + 1.f : expf(x);
  return expf(x - mx) * iv;
}

// Accumulator-layout epilogue shared by both backward kernels: for rows r0 = lane/4 and r0 + 8 of the
// warp tile, g = R^T (acc * sc[row]) + add_row[row] * zv[col] (+ zv[col] * 1 when add_row is null), then
// through phi (x from the raw swizzled tile) -> out fp32.
template <int D>
__device__ __forceinline__ void bwd_epilogue(const LinArgs& g, float (&acc)[D / 8][4], const bf16* Xraw,
                                             const float* sc, const float* add_row, const float* zs,
                                             const float* smx, const float* siv, int64_t base, int64_t t1,
                                             float* out, int lane) {
  const int r0 = lane >> 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + 8 * half;
    const int64_t t = base + row;
    const bool ok = t < t1;
    const float scl = sc ? sc[row] : 1.f, ad = add_row ? add_row[row] : 1.f;
    const float mx = smx[row], iv = siv[row];
    Rows rw{0, 0, 0};
    if (g.rope && ok) rw = tok_rows(g.r, t, D / 2);
    float dot = 0.f;
    float gg[D / 8][2], xx[D / 8][2];
#pragma unroll
    for (int ni = 0; ni < D / 8; ++ni) {
      const int col = ni * 8 + 2 * (lane & 3);
      float g0 = acc[ni][2 * half] * scl, g1 = acc[ni][2 * half + 1] * scl;
      if (g.rope && ok) {
        float2 cs = tok_cs(g.r, rw, col / 2);  // inverse rotation
        float a0 = g0 * cs.x + g1 * cs.y, a1 = -g0 * cs.y + g1 * cs.x;
        g0 = a0, g1 = a1;
      }
      g0 += ad * zs[col], g1 += ad * zs[col + 1];
      float2 xf = Elem<bf16>::unpack(*reinterpret_cast<const uint32_t*>(Xraw + swz<D>(row, col)));
      gg[ni][0] = g0, gg[ni][1] = g1, xx[ni][0] = xf.x, xx[ni][1] = xf.y;
      if (g.feature == FeatureMap::Softmax)
        dot += phi_y(g.feature, xf.x, mx, iv) * g0 + phi_y(g.feature, xf.y, mx, iv) * g1;
    }
    if (g.feature == FeatureMap::Softmax) {
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
    }
    if (ok) {
#pragma unroll
      for (int ni = 0; ni < D / 8; ++ni) {
        const int col = ni * 8 + 2 * (lane & 3);
        float d2[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = xx[ni][e], gv = gg[ni][e];
          if (g.feature == FeatureMap::Relu) d2[e] = x > 0.f ? gv : 0.f;
          else if (g.feature == FeatureMap::Elu1) d2[e] = x > 0.f ? gv : gv * expf(x);
          else d2[e] = phi_y(g.feature, x, mx, iv) * (gv - dot);
        }
        *reinterpret_cast<float2*>(out + t * D + col) = make_float2(d2[0], d2[1]);
      }
    }
  }
}

// ---------------------------------------------------------------- backward, query side (mma)
// Per 16-token warp tile: den, as = R phi(q) / den (bf16, for dSv), the GEMM G = dO Sv^T with
// Sv = hi + lo, dden = -(dO . O) / den, the dz partial and dq = phi'(R^T G / den + dden z).
// dO . O comes from the GEMM, not from the forward's o_l: dO_i . O_i = sum_n as_i[n] (Sv dO_i)[n] =
// sum_n as_i[n] G_i[n] (as kept in shared memory; phi(q) recomputed for dz once dden is known).
// Reading o_l instead measured 493 against 486 us (H200, Wan1.3B-480p).
template <int D>
__global__ void __launch_bounds__(kT) apply_bwd_q_mma_kernel(LinArgs g, const bf16* __restrict__ q,
                                                             const bf16* __restrict__ dol,
                                                             const bf16* __restrict__ svhl, const float* __restrict__ zv,
                                                             bf16* __restrict__ as_out, float* __restrict__ dzpart,
                                                             float* __restrict__ dq) {
  constexpr int CPL = D / 8;
  constexpr int NB = 3;  // per-warp tiles: raw q, dO, as
  extern __shared__ __align__(16) unsigned char smraw[];
  bf16* Sh = reinterpret_cast<bf16*>(smraw);  // D x D hi
  bf16* Sl = Sh + D * D;                      // D x D lo
  bf16* Wb = Sl + D * D;                      // [kW][NB][kWT * D]
  float* zs = reinterpret_cast<float*>(Wb + kW * NB * kWT * D);  // D
  float* st = zs + D;                                            // [kW][4][kWT]
  float* dzw = st + kW * 4 * kWT;                                // [kW][D]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, s = lane & 7;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const Range rg = cta_range(g);
  load_mat<D>(Sh, svhl + bh * 2 * D * D);
  load_mat<D>(Sl, svhl + bh * 2 * D * D + D * D);
  cp_async_commit();
  for (int d = tid; d < D; d += kT) zs[d] = zv[bh * D + d];
  cp_async_wait<0>();
  __syncthreads();
  float zr[CPL], dzacc[CPL];
#pragma unroll
  for (int i = 0; i < CPL; ++i) zr[i] = zs[s * CPL + i], dzacc[i] = 0.f;
  const bf16* qb = q + b * g.q_sb + h * g.q_sh;
  const bf16* gb = dol + bh * g.L * D;
  bf16* Qs = Wb + warp * NB * kWT * D;
  bf16* Gs = Qs + kWT * D;
  bf16* As = Gs + kWT * D;
  float* s_inv = st + warp * 4 * kWT;
  float* s_dd = s_inv + kWT;
  float* s_mx = s_dd + kWT;
  float* s_iv = s_mx + kWT;
  // (Prefetching the next tile's dO and o_l behind the GEMM measured slower here: 470 -> 489 us,
  // H100, Wan1.3B-480p; the key side gains from it.)
  for (int tile = warp; tile < rg.ntile; tile += kW) {
    const int64_t base = rg.t0 + int64_t(tile) * kWT;
    load_rows<D, kWT, 32>(Qs, qb, g.q_st, base, rg.t1, lane);
    load_rows<D, kWT, 32>(Gs, gb, D, base, rg.t1, lane);
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
#pragma unroll
    for (int rr = 0; rr < kWT / 4; ++rr) {
      const int row = rr * 4 + (lane >> 3);
      const int64_t t = base + row;
      const bool ok = t < rg.t1;
      float x[CPL], y[CPL], mx, iv;
#pragma unroll
      for (int c = 0; c < CPL / 8; ++c) unpack8(Qs + swz<D>(row, s * CPL + 8 * c), x + 8 * c);
      phi8<CPL>(g.feature, x, y, mx, iv);
      float dz = 0.f;
#pragma unroll
      for (int c = 0; c < CPL; ++c) dz += y[c] * zr[c];
      const float den = g8_sum(dz) + g.eps, id = __fdividef(1.f, den);
      if (ok) {
        if (g.rope) rope8<CPL, D>(g.r, tok_rows(g.r, t, D / 2), s * CPL, y);
#pragma unroll
        for (int c = 0; c < CPL; ++c) y[c] *= id;
#pragma unroll
        for (int c = 0; c < CPL / 8; ++c)
          *reinterpret_cast<uint4*>(as_out + (bh * g.L + t) * D + s * CPL + 8 * c) = pack8(y + 8 * c);
      }
      // Rows past the end: G is 0 there (zero-filled dO), so their dot is 0.
#pragma unroll
      for (int c = 0; c < CPL / 8; ++c)
        *reinterpret_cast<uint4*>(As + swz<D>(row, s * CPL + 8 * c)) = pack8(y + 8 * c);
      if (s == 0) s_inv[row] = ok ? id : 0.f, s_mx[row] = mx, s_iv[row] = iv;
    }
    __syncwarp();
    float acc[D / 8][4];
    zero_acc<D>(acc);
    warp_gemm<D, true>(acc, Gs, Sh, lane);
    warp_gemm<D, true>(acc, Gs, Sl, lane);
    // dot_i = as_i . G_i over this lane's columns of rows r0 and r0 + 8, summed over the quad.
    const int r0 = lane >> 2;
    float d0 = 0.f, d1 = 0.f;
#pragma unroll
    for (int ni = 0; ni < D / 8; ++ni) {
      const int col = ni * 8 + 2 * (lane & 3);
      const float2 a0 = Elem<bf16>::unpack(*reinterpret_cast<const uint32_t*>(As + swz<D>(r0, col)));
      const float2 a1 = Elem<bf16>::unpack(*reinterpret_cast<const uint32_t*>(As + swz<D>(r0 + 8, col)));
      d0 += a0.x * acc[ni][0] + a0.y * acc[ni][1];
      d1 += a1.x * acc[ni][2] + a1.y * acc[ni][3];
    }
    d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
    d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
    d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
    d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
    if ((lane & 3) == 0) s_dd[r0] = -d0 * s_inv[r0], s_dd[r0 + 8] = -d1 * s_inv[r0 + 8];  // 0 past t1
    __syncwarp();
    // dz += dden * phi(q), in the row layout of the first pass (phi recomputed from raw q).
#pragma unroll
    for (int rr = 0; rr < kWT / 4; ++rr) {
      const int row = rr * 4 + (lane >> 3);
      float x[CPL], y[CPL], mx, iv;
#pragma unroll
      for (int c = 0; c < CPL / 8; ++c) unpack8(Qs + swz<D>(row, s * CPL + 8 * c), x + 8 * c);
      phi8<CPL>(g.feature, x, y, mx, iv);
      const float dd = s_dd[row];
#pragma unroll
      for (int c = 0; c < CPL; ++c) dzacc[c] += dd * y[c];
    }
    bwd_epilogue<D>(g, acc, Qs, s_inv, s_dd, zs, s_mx, s_iv, base, rg.t1, dq + bh * g.L * D, lane);
    __syncwarp();
  }
  // dz: lanes with the same s hold the same channels; fixed-order reduction.
#pragma unroll
  for (int c = 0; c < CPL; ++c) {
    dzacc[c] += __shfl_xor_sync(0xffffffffu, dzacc[c], 8);
    dzacc[c] += __shfl_xor_sync(0xffffffffu, dzacc[c], 16);
  }
  if (lane < 8)
#pragma unroll
    for (int c = 0; c < CPL; ++c) dzw[warp * D + s * CPL + c] = dzacc[c];
  __syncthreads();
  for (int d = tid; d < D; d += kT) {
    float acc = 0.f;
    for (int w = 0; w < kW; ++w) acc += dzw[w * D + d];
    dzpart[(bh * g.n_chunk + blockIdx.x) * D + d] = acc;
  }
}

// ---------------------------------------------------------------- backward, key side (mma)
// Per 16-token warp tile: dc = v dSv^T -> dk = phi'(R^T dc + dz); dv = c dSv with c = R phi(k).
template <int D>
__global__ void __launch_bounds__(kT) apply_bwd_k_mma_kernel(LinArgs g, const bf16* __restrict__ kin,
                                                             const bf16* __restrict__ vin, const bf16* __restrict__ dsv,
                                                             const float* __restrict__ dzv, float* __restrict__ dk,
                                                             float* __restrict__ dv) {
  constexpr int CPL = D / 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  bf16* Ms = reinterpret_cast<bf16*>(smraw);  // dSv, D x D
  bf16* Wb = Ms + D * D;                      // [kW][3][kWT * D]: raw k, v, c
  float* zs = reinterpret_cast<float*>(Wb + kW * 3 * kWT * D);  // D
  float* st = zs + D;                                           // [kW][2][kWT]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, s = lane & 7;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const Range rg = cta_range(g);
  load_mat<D>(Ms, dsv + bh * D * D);
  cp_async_commit();
  for (int d = tid; d < D; d += kT) zs[d] = dzv[bh * D + d];
  cp_async_wait<0>();
  __syncthreads();
  const bf16* kb = kin + b * g.k_sb + h * g.k_sh;
  const bf16* vb = vin + b * g.v_sb + h * g.v_sh;
  bf16* Ks = Wb + warp * 3 * kWT * D;
  bf16* Vs = Ks + kWT * D;
  bf16* Cs = Vs + kWT * D;
  float* s_mx = st + warp * 2 * kWT;
  float* s_iv = s_mx + kWT;
  // The next tile's v loads once the dk GEMM has read v, its k once the epilogue is done with it.
  if (warp < rg.ntile) {
    const int64_t base = rg.t0 + int64_t(warp) * kWT;
    load_rows<D, kWT, 32>(Ks, kb, g.k_st, base, rg.t1, lane);
    load_rows<D, kWT, 32>(Vs, vb, g.v_st, base, rg.t1, lane);
  }
  cp_async_commit();
  for (int tile = warp; tile < rg.ntile; tile += kW) {
    const int64_t base = rg.t0 + int64_t(tile) * kWT, next = base + kW * kWT;
    const bool more = tile + kW < rg.ntile;
    cp_async_wait<0>();
    __syncwarp();
#pragma unroll
    for (int rr = 0; rr < kWT / 4; ++rr) {
      const int row = rr * 4 + (lane >> 3);
      const int64_t t = base + row;
      const bool ok = t < rg.t1;
      float x[CPL], y[CPL], mx, iv;
#pragma unroll
      for (int c = 0; c < CPL / 8; ++c) unpack8(Ks + swz<D>(row, s * CPL + 8 * c), x + 8 * c);
      phi8<CPL>(g.feature, x, y, mx, iv);
      // Rows past the end need no masking: their c rows only reach dv rows that are never stored.
      if (g.rope && ok) rope8<CPL, D>(g.r, tok_rows(g.r, t, D / 2), s * CPL, y);
#pragma unroll
      for (int c = 0; c < CPL / 8; ++c) *reinterpret_cast<uint4*>(Cs + swz<D>(row, s * CPL + 8 * c)) = pack8(y + 8 * c);
      if (s == 0) s_mx[row] = mx, s_iv[row] = iv;
    }
    __syncwarp();
    float acc[D / 8][4];
    zero_acc<D>(acc);
    warp_gemm<D, true>(acc, Vs, Ms, lane);
    __syncwarp();
    if (more) load_rows<D, kWT, 32>(Vs, vb, g.v_st, next, rg.t1, lane);
    bwd_epilogue<D>(g, acc, Ks, nullptr, nullptr, zs, s_mx, s_iv, base, rg.t1, dk + bh * g.L * D, lane);
    __syncwarp();
    if (more) load_rows<D, kWT, 32>(Ks, kb, g.k_st, next, rg.t1, lane);
    cp_async_commit();
    zero_acc<D>(acc);
    warp_gemm<D, false>(acc, Cs, Ms, lane);
    float* dvb = dv + bh * g.L * D;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = (lane >> 2) + 8 * half;
      const int64_t t = base + row;
      if (t < rg.t1)
#pragma unroll
        for (int ni = 0; ni < D / 8; ++ni)
          *reinterpret_cast<float2*>(dvb + t * D + ni * 8 + 2 * (lane & 3)) =
              make_float2(acc[ni][2 * half], acc[ni][2 * half + 1]);
    }
    __syncwarp();
  }
}

template <class K>
void set_smem_mma(K kernel, size_t bytes) {
  SALAD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// ---------------------------------------------------------------- forward apply (wgmma, sm_90a)
// One warpgroup per CTA over kApplySpan tokens of one (b, h); warp w owns rows 16 w .. 16 w + 15 of
// every 64-token tile and keeps its own two-stage cp.async pipeline (no CTA barrier in the loop). Its
// q rows go from a swizzled tile by ldmatrix into registers in the layout of wgmma's A operand, where
// phi, the normaliser, RoPE, the fused rotation (qr = R q and its 16-token sums) are computed in place;
// a = R phi(q) (bf16) then multiplies Sv_hi, held in shared memory in the 128-byte-swizzled layout of
// the attention kernels' V tiles. A lane holds channels 8 j + 2 (lane & 3) + {0, 1} (rope pair
// 4 j + (lane & 3)), so the rope3d axis of a pair is a compile-time constant for all j but the (at
// most two) that straddle an axis boundary. Replaces the mma.sync kernel's per-element table-axis
// selection, 64-bit index math and bf16 round trips through shared memory (~38 warp-instruction
// lanes per element, PERF.md session 6).
constexpr int kAW = 4;               // warps: one warpgroup
constexpr int kApplySpan = 64 * 8;   // tokens per CTA (Sv is loaded once per span)

template <int D>
struct ApplySmem {
  static constexpr int kSv = D * D * 2;         // Sv_hi: D / 64 sub-tiles of D rows x 128 bytes
  static constexpr int kQ = kAW * 2 * 16 * D * 2;  // per warp, two 16-row q tiles (swz<D>)
  static constexpr int kBytes = kSv + kQ + D * 4 + 1024;  // + z, + slack to align Sv to 1024 bytes
};

// rope3d pairs per axis (rope_split): frame pf, row ph, column the rest.
template <int D>
struct RopeAxes {
  static constexpr int pf = static_cast<int>(rope_split(D).f / 2), ph = static_cast<int>(rope_split(D).h / 2);
};

// Table entry ((cos, sin)) of channel pair 4 j + tq of a token whose per-axis entries at pair tq are
// tp[axis]: a compile-time axis unless j straddles an axis boundary (j unrolled).
template <int D>
__device__ __forceinline__ const float2* rope_pair_entry(const float2* const (&tp)[3], int j, int tq) {
  constexpr int pf = RopeAxes<D>::pf, pfh = RopeAxes<D>::pf + RopeAxes<D>::ph;
  const int m0 = 4 * j;
  if (m0 + 3 < pf) return tp[0] + m0;
  if (m0 >= pf && m0 + 3 < pfh) return tp[1] + m0;
  if (m0 >= pfh) return tp[2] + m0;
  return (m0 + tq < pf ? tp[0] : (m0 + tq < pfh ? tp[1] : tp[2])) + m0;
}

// Row max and 1 / sum of exp(x - max) of the softmax feature map over bf16 A fragments (rows lane / 4
// and lane / 4 + 8 of a warp tile; element e of a[kk] belongs to row e & 1; the 4 lanes of a row).
template <int KS>
__device__ __forceinline__ void frag_softmax_stats(const uint32_t (&a)[KS][4], float (&mx)[2], float (&iv)[2]) {
  float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = Elem<bf16>::unpack(a[kk][e]);
      m[e & 1] = fmaxf(m[e & 1], fmaxf(x.x, x.y));
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], 1));
    m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], 2));
  }
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = Elem<bf16>::unpack(a[kk][e]);
      sum[e & 1] += expf(x.x - m[e & 1]) + expf(x.y - m[e & 1]);
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    mx[r] = m[r], iv[r] = 1.f / sum[r];
  }
}

// D x D bf16 (row-major) into shared memory in the 128-byte-swizzled V-tile layout: 16-byte chunk c
// of row r at sub-tile c / 8 (D rows x 128 bytes each), position (c % 8) ^ (r % 8). cp.async, no wait.
template <int D, int NT>
__device__ __forceinline__ void load_mat_sw128(uint32_t dst, const bf16* src) {
  for (int idx = threadIdx.x; idx < D * D / 8; idx += NT) {
    const int row = idx / (D / 8), ch = idx % (D / 8);
    cp_async16(dst + (ch >> 3) * (D * 128) + row * 128 + (((ch & 7) ^ (row & 7)) << 4), src + row * D + ch * 8, 16);
  }
}

// Sums of one value over the 8 lanes of a warp that share lane % 4, for two sets at once (a, b; two
// components each), halving the exchanges: the lane whose bit m / 4 is set keeps b and sends a, the
// other keeps a and sends b, so each lane ends with one set summed over the lane pair (lane, lane ^ m).
// Applied with m = 4, 8, 16 this adds in the order of three xor-shuffle butterflies (own value first,
// then the partner's), so the sums are bit-identical to them.
__device__ __forceinline__ void pair_reduce(const float (&a)[2], const float (&b)[2], int lane, int m, float (&out)[2]) {
  const bool hi = lane & m;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const float keep = hi ? b[c] : a[c], send = hi ? a[c] : b[c];
    out[c] = keep + __shfl_xor_sync(0xffffffffu, send, m);
  }
}

// The 16-row sums of qr (Top-K query block means) by pair_reduce: 3.5 exchanges per pair instead of a
// butterfly's 6, stored by every lane (H200, Wan1.3B-480p: 116.5-121.9 -> 105.9-109.8 us). Registers
// capped for 2 CTAs per SM (237 at D 128, none spilled, 8 warps per SM): the cap for 3 (168) spilled
// 32 bytes, whose reloads were the kernel's top stall (105.9-109.8 -> 101.3-104.2 us).
template <int D, FeatureMap F, bool ROPE>
__global__ void __launch_bounds__(kAW * 32, 2) apply_fwd_wgmma_kernel(LinArgs g, const bf16* __restrict__ q,
                                                                      const bf16* __restrict__ svhl,
                                                                      const float* __restrict__ zv,
                                                                      bf16* __restrict__ o) {
  using namespace sm90;
  constexpr int KS = D / 16;
  extern __shared__ __align__(16) unsigned char smraw[];
  const uint32_t raw = smem_addr(smraw), sSv = (raw + 1023u) & ~1023u;
  unsigned char* sm = smraw + (sSv - raw);
  bf16* Qall = reinterpret_cast<bf16*>(sm + ApplySmem<D>::kSv);
  float* zs = reinterpret_cast<float*>(sm + ApplySmem<D>::kSv + ApplySmem<D>::kQ);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t t0 = blockIdx.x * int64_t(kApplySpan), t1 = imin64(g.L, t0 + kApplySpan);
  const int ntile = static_cast<int>((t1 - t0 + 63) / 64);
  load_mat_sw128<D, kAW * 32>(sSv, svhl + bh * 2 * D * D);  // Sv_hi
  cp_async_commit();
  for (int d = tid; d < D; d += kAW * 32) zs[d] = zv[bh * D + d];
  const bf16* qb = q + b * g.q_sb + h * g.q_sh;
  bf16* ob = o + b * g.o_sb + h * g.o_sh;
  const int ost = static_cast<int>(g.o_st);  // D or H * D
  bf16* buf0 = Qall + warp * 2 * 16 * D;
  load_rows<D, 16, 32>(buf0, qb, g.q_st, t0 + 16 * warp, t1, lane);
  cp_async_commit();
  cp_async_wait<1>();                                                    // Sv landed (this thread's part)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");        // visible to wgmma
  __syncthreads();
  const float2* tab = g.r.table;
  const int64_t n16 = (g.L + 15) / 16;
  for (int i = 0; i < ntile; ++i) {
    bf16* X = buf0 + (i & 1) * 16 * D;
    const int64_t base = t0 + int64_t(i) * 64 + 16 * warp;  // this warp's first row
    if (i + 1 < ntile) {
      load_rows<D, 16, 32>(buf0 + ((i + 1) & 1) * 16 * D, qb, g.q_st, base + 64, t1, lane);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();
    uint32_t a[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      ldmatrix_x4(smem_addr(X + swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, kk * 16 + (lane >> 4) * 8)), a[kk][0],
                  a[kk][1], a[kk][2], a[kk][3]);
    __syncwarp();  // the staging below rewrites X (each element by the lane that received it, but
                   // ldmatrix reads through the addresses of other lanes)
    // Rows gq and gq + 8 of the warp tile; element e of a[kk] is row e & 1, channel pair j = 2 kk + (e >> 1).
    const bool ok0 = base + gq < t1, ok1 = base + gq + 8 < t1;
    float mx[2] = {0.f, 0.f}, iv[2] = {1.f, 1.f};
    if (F == FeatureMap::Softmax) frag_softmax_stats<KS>(a, mx, iv);
    // rope3d table entries of the two rows per axis, at pair tq (rows past the end use table row 0);
    // the staged qr of row gq + 8 r, channel pair j lands at xrow[r] + ((j ^ gq) << 3) (swz<D>).
    const float2* tp[2][3];
    bf16* xrow[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = r ? ok1 : ok0;
      const Rows rw = ok ? tok_rows(g.r, base + gq + 8 * r, D / 2) : Rows{0, 0, 0};
      tp[r][0] = tab + rw.f + tq, tp[r][1] = tab + rw.h + tq, tp[r][2] = tab + rw.w + tq;
      xrow[r] = X + (gq + 8 * r) * D + 2 * tq;
    }
    const float* zq = zs + 2 * tq;
    float* qsrow = g.qsum && base < t1 ? g.qsum + (bh * n16 + base / 16) * D + 2 * tq : nullptr;
    float dz[2] = {0.f, 0.f};
    // Pair j's sums over rows (gq, gq + 8), then over lanes 4 apart (pair_reduce at m = 4
    // per kk, 8 per kk pair, 16 per kk quad); lane gq ends with pairs 8 n + gq (n < KS / 4).
    float sj[2][2], q1[KS][2], q2[KS / 2][2], q3[KS / 4][2];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
      for (int hj = 0; hj < 2; ++hj) {
        const int j = 2 * kk + hj;
        const float2 zz = *reinterpret_cast<const float2*>(zq + 8 * j);
        float c0 = 0.f, c1 = 0.f;  // row gq's rotated q of this pair, for the 16-row sums
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int e = 2 * hj + r;
          const float2 x = Elem<bf16>::unpack(a[kk][e]);
          float y0 = phi_y(F, x.x, mx[r], iv[r]), y1 = phi_y(F, x.y, mx[r], iv[r]);
          dz[r] = fmaf(y0, zz.x, fmaf(y1, zz.y, dz[r]));
          const float2 cs = __ldg(rope_pair_entry<D>(tp[r], j, tq));
          float r0, r1;
          rot_pair(cs, x.x, x.y, r0, r1);
          *reinterpret_cast<uint32_t*>(xrow[r] + ((j ^ gq) << 3)) = Elem<bf16>::pack(r0, r1);
          if (r == 0) {
            c0 = r0, c1 = r1;
          } else {  // rows past the end are zero
            sj[hj][0] = c0 + r0, sj[hj][1] = c1 + r1;
          }
          if (ROPE) rot_pair(cs, y0, y1, y0, y1);
          a[kk][e] = Elem<bf16>::pack(y0, y1);
        }
      }
      if (g.qsum) {
        pair_reduce(sj[0], sj[1], lane, 4, q1[kk]);
        if (kk & 1) pair_reduce(q1[kk - 1], q1[kk], lane, 8, q2[kk / 2]);
        if ((kk & 3) == 3) pair_reduce(q2[kk / 2 - 1], q2[kk / 2], lane, 16, q3[kk / 4]);
      }
    }
    if (qsrow) {
#pragma unroll
      for (int n = 0; n < KS / 4; ++n)
        *reinterpret_cast<float2*>(qsrow + 8 * (8 * n + gq)) = make_float2(q3[n][0], q3[n][1]);
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      dz[r] += __shfl_xor_sync(0xffffffffu, dz[r], 1);
      dz[r] += __shfl_xor_sync(0xffffffffu, dz[r], 2);
      inv[r] = __fdividef(1.f, dz[r] + g.eps);  // den >= eps > 0
    }
    float acc[D / 2];
#pragma unroll
    for (int n = 0; n < D / 2; ++n) acc[n] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) wgmma_rs<bf16, D, 1>(acc, a[kk], desc_sw128(sSv + kk * 16 * 128, D * 128, 1024), 1);
    wgmma_commit();
    __syncwarp();
    // Copy-out of the warp's 16 staged rows, 16-byte stores: lane -> chunk cch of rows cr0 + RS k.
    constexpr int CHK = D / 8, RS = 32 / CHK;
    const int cr0 = lane / CHK, cch = lane % CHK;
    const int lim = static_cast<int>(imin64(t1 - base, 16));  // rows present (may be <= 0)
    {
      bf16* dst = g.qr + (bh * g.L + base + cr0) * D + cch * 8;
#pragma unroll
      for (int k = 0; k < 16 / RS; ++k)
        if (cr0 + RS * k < lim)
          *reinterpret_cast<uint4*>(dst + RS * k * D) = *reinterpret_cast<const uint4*>(X + swz<D>(cr0 + RS * k, cch * 8));
    }
    __syncwarp();
    wgmma_wait<0>();
    fence_regs<D / 2>(acc);
#pragma unroll
    for (int ni = 0; ni < D / 8; ++ni) {
      *reinterpret_cast<uint32_t*>(xrow[0] + ((ni ^ gq) << 3)) =
          Elem<bf16>::pack(acc[4 * ni] * inv[0], acc[4 * ni + 1] * inv[0]);
      *reinterpret_cast<uint32_t*>(xrow[1] + ((ni ^ gq) << 3)) =
          Elem<bf16>::pack(acc[4 * ni + 2] * inv[1], acc[4 * ni + 3] * inv[1]);
    }
    __syncwarp();
    {
      bf16* dst = ob + (base + cr0) * ost + cch * 8;
#pragma unroll
      for (int k = 0; k < 16 / RS; ++k, dst += RS * ost)
        if (cr0 + RS * k < lim)
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(X + swz<D>(cr0 + RS * k, cch * 8));
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- forward state (wgmma, sm_90a), k rotation fused
// CTA = D / 64 warpgroups over one chunk (make_plan's, whole 64-token tiles) of one (b, h). Per tile,
// each thread transforms 8 channels of 4 key rows, copied with v (cp.async, three stages) into shared
// memory: kr = R k (the sparse branch's rotated keys) with its 64-token sums (block means),
// z += phi(k), and c = R phi(k) (bf16) into shared memory in the V-tile layout; then warpgroup w
// accumulates Sv[64 w .. 64 w + 63][:] += c^T v on wgmma with both operands MN-major (v tiles by
// cp.async, three stages; c double-buffered, so the product of tile i runs under the transform of
// tile i + 1). Replaces rotate_kernel (k) + state_mma_kernel<D, true>: the mma.sync state kernel
// could not absorb the rotation (sessions 5 and 7), its issue slots being the limit.
template <int D>
struct StateSmem {
  static constexpr int kTile = 64 * D * 2;  // one 64-token tile: D / 64 sub-tiles of 64 rows x 128 B
  static constexpr int kV = 0, kC = 3 * kTile, kRed = 5 * kTile;
  static constexpr int kK = kRed + 2 * (D / 16) * D * 4;  // after the [2][warps][D] sums: 3 k stages
  static constexpr int kBytes = kK + 3 * kTile + 1024;    // + alignment
};

// Table row offsets (axis row x D / 2) of one raster token for the rope3d table, advanced 16 tokens
// at a time without a division: 16 in the grid's mixed radix is (df, dh, dw) (frames, rows, columns),
// added with one carry per digit (any grid; a digit plus its carry stays under twice its radix).
struct RopeCursor {
  int f, h, w;  // frame row, gf + grid row, gf + gh + column; each times half
  int df, dh, dw, h_end, w_end, h_span, w_span;
  __device__ __forceinline__ RopeCursor(const RopeInfo& r, uint32_t t, int half) {
    const TokPos tp = tok_pos(r, t), d = tok_pos(r, 16u);
    const int gf = static_cast<int>(r.gf), gh = static_cast<int>(r.gh), gw = static_cast<int>(r.gw);
    f = static_cast<int>(tp.f) * half, h = (gf + static_cast<int>(tp.h)) * half;
    w = (gf + gh + static_cast<int>(tp.w)) * half;
    df = static_cast<int>(d.f) * half, dh = static_cast<int>(d.h) * half, dw = static_cast<int>(d.w) * half;
    h_end = (gf + gh) * half, w_end = (gf + gh + gw) * half, h_span = gh * half, w_span = gw * half;
  }
  __device__ __forceinline__ void advance16(int half) {
    w += dw;
    const bool cw = w >= w_end;
    w -= cw ? w_span : 0;
    h += dh + (cw ? half : 0);
    const bool ch = h >= h_end;
    h -= ch ? h_span : 0;
    f += df + (ch ? half : 0);
  }
};

// Per row: 32-bit bounds; the rope3d table rows of a thread's next row by RopeCursor (no divisions),
// the table read 16 bytes (two pairs) at a time; no zeroing pass for rows past the end where phi(0) = 0
// (relu). k goes through cp.async into three shared-memory stages with v (unswizzled rows: each thread
// reads back the 16-byte chunks it copied); loaded one tile ahead into registers instead, ptxas sank
// those loads to the end of the iteration, next to their use, and the wait on them was 22% of the
// kernel's stall samples (ncu, H200, Wan1.3B-480p: 107.5-111.3 -> 100.2-100.6 us).
template <int D, FeatureMap F, bool ROPE>
__global__ void __launch_bounds__(D * 2, 1) state_fwd_wgmma_kernel(LinArgs g, const bf16* __restrict__ k,
                                                                   const bf16* __restrict__ v,
                                                                   float* __restrict__ part,
                                                                   float* __restrict__ zpart,
                                                                   bf16* __restrict__ kr, float* __restrict__ ksum) {
  using namespace sm90;
  constexpr int NT = D * 2, NW = NT / 32;  // threads, warps
  constexpr int CH = D / 8;                // threads per token row (8 channels each)
  constexpr int RP = NT / CH;              // rows per pass (16)
  constexpr int NP = 64 / RP;              // passes per tile (4)
  constexpr int kSub = 64 * 128;           // 64 rows x 128 bytes
  constexpr int kTile = StateSmem<D>::kTile;
  extern __shared__ __align__(16) unsigned char smraw[];
  const uint32_t raw = smem_addr(smraw), s0 = (raw + 1023u) & ~1023u;
  float* red = reinterpret_cast<float*>(smraw + (s0 - raw) + StateSmem<D>::kRed);  // [2][NW][D]
  const uint32_t sV = s0 + StateSmem<D>::kV, sC = s0 + StateSmem<D>::kC, sK = s0 + StateSmem<D>::kK;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, ch = tid % CH, rg = tid / CH, wg = tid >> 7;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t t0 = blockIdx.x * g.chunk, t1 = imin64(g.L, t0 + g.chunk);
  const int ntile = t1 > t0 ? static_cast<int>((t1 - t0 + 63) / 64) : 0;
  const bf16* kb = k + b * g.k_sb + h * g.k_sh + ch * 8;
  const bf16* vb = v + b * g.v_sb + h * g.v_sh + ch * 8;
  const float2* tab = g.r.table;
  constexpr int pf = RopeAxes<D>::pf, pfh = RopeAxes<D>::pf + RopeAxes<D>::ph;
  int axis[4];  // rope3d axis of this thread's 4 pairs
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = 4 * ch + i;
    axis[i] = m < pf ? 0 : (m < pfh ? 1 : 2);
  }
  // The row of pass p of tile i is rg + RP p; its 16-byte chunk ch. Rows >= t1: v zero-filled, k zero.
  auto load_v = [&](int i) {
    if (i < ntile) {
      const int64_t base = t0 + int64_t(i) * 64;
      const uint32_t dst = sV + (i % 3) * kTile + (ch >> 3) * kSub + (((ch & 7) ^ (rg & 7)) << 4);
      const int lim = static_cast<int>(imin64(t1 - base, 64));  // rows present
      const bf16* src = vb + (base + rg) * g.v_st;
#pragma unroll
      for (int p = 0; p < NP; ++p, src += RP * g.v_st) {
        const int row = rg + RP * p;  // row & 7 == rg & 7 (RP = 16)
        const bool ok = row < lim;
        cp_async16(dst + row * 128, ok ? src : vb, ok ? 16 : 0);
      }
      {  // k of the same rows, rows past the end zero-filled
        const uint32_t kdst = sK + (i % 3) * kTile + rg * (D * 2) + ch * 16;
        const bf16* ksrc = kb + (base + rg) * g.k_st;
#pragma unroll
        for (int p = 0; p < NP; ++p, ksrc += RP * g.k_st) {
          const bool ok = rg + RP * p < lim;
          cp_async16(kdst + RP * p * (D * 2), ok ? ksrc : kb, ok ? 16 : 0);
        }
      }
    }
    cp_async_commit();
  };
  float acc[D / 2];
#pragma unroll
  for (int n = 0; n < D / 2; ++n) acc[n] = 0.f;
  float zacc[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) zacc[c] = 0.f;
  load_v(0);
  load_v(1);
  const int64_t n64 = (g.L + 63) / 64;
  // The table rows of this thread's next row (t0 + rg, then 16 tokens further per pass), its
  // 4 pairs as two 16-byte halves each read from the axis row of its first pair; a half whose second
  // pair starts the next axis (an odd axis boundary: pair 43 at D 128) reads that pair again.
  constexpr bool fix1 = pf % 4 == 1 || pfh % 4 == 1, fix3 = pf % 4 == 3 || pfh % 4 == 3;
  RopeCursor cur(g.r, static_cast<uint32_t>(t0 + rg), D / 2);
  const float2* tabc = tab + 4 * ch;
  int ax_h[4], ax_w[4];  // pair i's axis is the row axis / the column axis
#pragma unroll
  for (int i = 0; i < 4; ++i) ax_h[i] = axis[i] == 1, ax_w[i] = axis[i] == 2;
  const bool split1 = axis[1] != axis[0], split3 = axis[3] != axis[2];
  const int t1i = static_cast<int>(t1);
  for (int i = 0; i < ntile; ++i) {
    const int64_t base = t0 + int64_t(i) * 64;
    cp_async_wait<1>();  // this thread's copies of tile i (k and v) landed; tile i + 1's may not have
    uint4 kc[NP];
    {
      const unsigned char* ksm = smraw + (sK - raw) + (i % 3) * kTile + rg * (D * 2) + ch * 16;
#pragma unroll
      for (int p = 0; p < NP; ++p) kc[p] = *reinterpret_cast<const uint4*>(ksm + RP * p * (D * 2));
    }
    float ks[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) ks[c] = 0.f;
    const uint32_t cdst = sC + (i & 1) * kTile + (ch >> 3) * kSub + (((ch & 7) ^ (rg & 7)) << 4);
    bf16* krow = kr + (bh * g.L + base + rg) * D + ch * 8;  // row rg of the tile
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int row = rg + RP * p;
      const bool ok = static_cast<int>(base) + row < t1i;
      float x[8], y[8];
      {
        const uint32_t w[4] = {kc[p].x, kc[p].y, kc[p].z, kc[p].w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float2 f = Elem<bf16>::unpack(w[c]);
          x[2 * c] = f.x, x[2 * c + 1] = f.y;
        }
      }
      if (F == FeatureMap::Softmax) {
        float m = x[0];
#pragma unroll
        for (int c = 1; c < 8; ++c) m = fmaxf(m, x[c]);
#pragma unroll
        for (int sh = 1; sh < CH; sh <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, sh));
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c) sum += (y[c] = expf(x[c] - m));
#pragma unroll
        for (int sh = 1; sh < CH; sh <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, sh);
        const float iv = 1.f / sum;
#pragma unroll
        for (int c = 0; c < 8; ++c) y[c] *= iv;
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c) y[c] = phi_y(F, x[c], 0.f, 1.f);
      }
      float xr[8];
      // Rows past the end: k is zero, so kr and the block sums get zeros whatever the table row; v is
      // zero-filled, so c^T v gets nothing from them; only z must skip phi(0) (1 for elu+1, 1 / D for
      // softmax; 0 for relu). y * 1 + z and y * 0 + z round as z + y and z (z >= 0, y finite).
      if constexpr (F == FeatureMap::Relu) {
#pragma unroll
        for (int c = 0; c < 8; ++c) zacc[c] += y[c];
      } else {
        const float okf = ok ? 1.f : 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c) zacc[c] = fmaf(y[c], okf, zacc[c]);
      }
      // Row of axis a = f + (a == 1) (h - f) + (a == 2) (w - f), table row 0 past the end.
      const int dh = cur.h - cur.f, dw = cur.w - cur.f, okm = ok ? -1 : 0;
      auto row_of = [&](int i) { return (cur.f + ax_h[i] * dh + ax_w[i] * dw) & okm; };
      const float4 c01 = __ldg(reinterpret_cast<const float4*>(tabc + row_of(0)));
      const float4 c23 = __ldg(reinterpret_cast<const float4*>(tabc + row_of(2) + 2));
      float2 cs[4] = {make_float2(c01.x, c01.y), make_float2(c01.z, c01.w), make_float2(c23.x, c23.y),
                      make_float2(c23.z, c23.w)};
      if (fix1 && split1) cs[1] = __ldg(tabc + row_of(1) + 1);
      if (fix3 && split3) cs[3] = __ldg(tabc + row_of(3) + 3);
      cur.advance16(D / 2);
#pragma unroll
      for (int i2 = 0; i2 < 4; ++i2) {
        rot_pair(cs[i2], x[2 * i2], x[2 * i2 + 1], xr[2 * i2], xr[2 * i2 + 1]);
        if (ROPE) rot_pair(cs[i2], y[2 * i2], y[2 * i2 + 1], y[2 * i2], y[2 * i2 + 1]);
      }
#pragma unroll
      for (int c = 0; c < 8; ++c) ks[c] += xr[c];
      if (ok) *reinterpret_cast<uint4*>(krow + RP * p * D) = pack8(xr);
      *reinterpret_cast<uint4*>(smraw + (cdst - raw) + row * 128) = pack8(y);
    }
    if (ksum) {  // this tile's sums of kr: the warp's row groups, then the warps (after the barrier)
#pragma unroll
      for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int sh = CH; sh < 32; sh <<= 1) ks[c] += __shfl_xor_sync(0xffffffffu, ks[c], sh);
      if (lane < CH) {
        float* dst = red + ((i & 1) * NW + warp) * D + ch * 8;
        *reinterpret_cast<float4*>(dst) = make_float4(ks[0], ks[1], ks[2], ks[3]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(ks[4], ks[5], ks[6], ks[7]);
      }
    }
    // (Already satisfied by the wait at the top of the iteration; kept because removing it reschedules
    // the whole kernel, and the machine code measured on the GPU is this one.)
    cp_async_wait<1>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // c and v visible to wgmma
    wgmma_wait<0>();                                                 // tile i - 1's product done
    __syncthreads();
    load_v(i + 2);  // into tile i - 1's stage
    if (ksum) {
      for (int d = tid; d < D; d += NT) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) s += red[((i & 1) * NW + w) * D + d];
        ksum[(bh * n64 + base / 64) * D + d] =
            g.ksum_mean ? (0.f + s) / static_cast<float>(imin64(g.L, base + 64) - base) : s;
      }
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss_tt<D>(acc, desc_sw128(sC + (i & 1) * kTile + wg * kSub + kk * 2048, kSub, 1024),
                     desc_sw128(sV + (i % 3) * kTile + kk * 2048, kSub, 1024), 1);
    wgmma_commit();
  }
  wgmma_wait<0>();
  fence_regs<D / 2>(acc);
  {  // Sv partial: rows (features) 64 wg + 16 (warp % 4) + lane / 4 (+ 8), columns 8 ni + 2 (lane % 4)
    float* out = part + (bh * g.n_chunk + blockIdx.x) * D * D;
    const int r0 = 64 * wg + 16 * (warp & 3) + (lane >> 2);
#pragma unroll
    for (int ni = 0; ni < D / 8; ++ni) {
      const int col = ni * 8 + 2 * (lane & 3);
      *reinterpret_cast<float2*>(out + r0 * D + col) = make_float2(acc[4 * ni], acc[4 * ni + 1]);
      *reinterpret_cast<float2*>(out + (r0 + 8) * D + col) = make_float2(acc[4 * ni + 2], acc[4 * ni + 3]);
    }
  }
#pragma unroll
  for (int c = 0; c < 8; ++c)
#pragma unroll
    for (int sh = CH; sh < 32; sh <<= 1) zacc[c] += __shfl_xor_sync(0xffffffffu, zacc[c], sh);
  __syncthreads();  // every thread is past its last reads of red
  if (lane < CH) {
#pragma unroll
    for (int c = 0; c < 8; ++c) red[warp * D + ch * 8 + c] = zacc[c];
  }
  __syncthreads();
  for (int d = tid; d < D; d += NT) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) s += red[w * D + d];
    zpart[(bh * g.n_chunk + blockIdx.x) * D + d] = s;
  }
}

// Calls f(std::integral_constant<FeatureMap, F>, std::bool_constant<ROPE>) for the runtime pair: the
// wgmma kernels are compiled per feature map and RoPE flag (uniform branches per element kept ptxas
// from scheduling the loads and arithmetic of neighbouring elements together).
template <class Fn>
void with_feature_rope(FeatureMap f, bool rope, Fn&& fn) {
  auto go = [&](auto fc) {
    if (rope) fn(fc, std::true_type{});
    else fn(fc, std::false_type{});
  };
  if (f == FeatureMap::Relu) go(std::integral_constant<FeatureMap, FeatureMap::Relu>{});
  else if (f == FeatureMap::Elu1) go(std::integral_constant<FeatureMap, FeatureMap::Elu1>{});
  else go(std::integral_constant<FeatureMap, FeatureMap::Softmax>{});
}

// g.qr must be set (fuse_rotate): the kernel always writes qr.
template <int D>
void apply_fwd_wgmma(const LinArgs& g, const Plan& pl, const bf16* q, const bf16* svhl, const float* z, bf16* o,
                     cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((g.L + kApplySpan - 1) / kApplySpan), static_cast<unsigned>(pl.BH));
  with_feature_rope(g.feature, g.rope, [&](auto fc, auto rc) {
    auto kernel = apply_fwd_wgmma_kernel<D, decltype(fc)::value, decltype(rc)::value>;
    set_smem_mma(kernel, ApplySmem<D>::kBytes);
    kernel<<<grid, kAW * 32, ApplySmem<D>::kBytes, s>>>(g, q, svhl, z, o);
    SALAD_LAUNCH_CHECK();
  });
}

// SALAD_LINEAR_APPLY=mma selects the mma.sync forward apply kernel (A/B and tests).
bool apply_wgmma_enabled() {
  const char* e = std::getenv("SALAD_LINEAR_APPLY");
  return !(e && std::strcmp(e, "mma") == 0);
}

// ---------------------------------------------------------------- backward, key side (wgmma, sm_90a)
// As the forward apply kernel: one warpgroup per CTA over kApplySpan tokens, each warp 16 rows of every
// 64-token tile, its k and v rows by cp.async (two stages) and ldmatrix into wgmma A fragments. dSv
// sits in shared memory once, in the V-tile layout, which is both operands' layout: dc = v dSv^T
// (B K-major) and dv = c dSv (B MN-major), c = R phi(k) built in registers. dk = phi'(R^T dc + dz)
// in the accumulator layout (which equals the A layout, so the raw k is at hand). fp32 outputs.
template <int D>
struct BwdKSmem {
  static constexpr int kM = D * D * 2;
  static constexpr int kW = kAW * 2 * 2 * 16 * D * 2;  // per warp, two stages of k and v rows
  static constexpr int kBytes = kM + kW + D * 4 + 1024;
};

// The epilogue's rope-table reloads of a row are issued together before the row's first store.
// Interleaved with the dv / dk stores (which may alias the table for the compiler) each reload waited
// for its own L1/L2 round trip: long-scoreboard stalls were 66% of this kernel's samples (ncu, H200,
// Wan1.3B-480p: 269.8 -> 198.3 us, the gradients bit-identical).
template <int D, FeatureMap F, bool ROPE>
__global__ void __launch_bounds__(kAW * 32, 2) apply_bwd_k_wgmma_kernel(LinArgs g, const bf16* __restrict__ kin,
                                                                        const bf16* __restrict__ vin,
                                                                        const bf16* __restrict__ dsv,
                                                                        const float* __restrict__ dzv,
                                                                        float* __restrict__ dk, float* __restrict__ dv) {
  using namespace sm90;
  constexpr int KS = D / 16, kSub = D * 128;
  extern __shared__ __align__(16) unsigned char smraw[];
  const uint32_t raw = smem_addr(smraw), sM = (raw + 1023u) & ~1023u;
  unsigned char* sm = smraw + (sM - raw);
  bf16* Wall = reinterpret_cast<bf16*>(sm + BwdKSmem<D>::kM);
  float* zs = reinterpret_cast<float*>(sm + BwdKSmem<D>::kM + BwdKSmem<D>::kW);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t t0 = blockIdx.x * int64_t(kApplySpan), t1 = imin64(g.L, t0 + kApplySpan);
  const int ntile = static_cast<int>((t1 - t0 + 63) / 64);
  load_mat_sw128<D, kAW * 32>(sM, dsv + bh * D * D);
  cp_async_commit();
  for (int d = tid; d < D; d += kAW * 32) zs[d] = dzv[bh * D + d];
  const bf16* kb = kin + b * g.k_sb + h * g.k_sh;
  const bf16* vb = vin + b * g.v_sb + h * g.v_sh;
  bf16* buf0 = Wall + warp * 2 * 2 * 16 * D;  // [stage][k, v][16 x D]
  load_rows<D, 16, 32>(buf0, kb, g.k_st, t0 + 16 * warp, t1, lane);
  load_rows<D, 16, 32>(buf0 + 16 * D, vb, g.v_st, t0 + 16 * warp, t1, lane);
  cp_async_commit();
  cp_async_wait<1>();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const float2* tab = g.r.table;
  const float* zq = zs + 2 * tq;
  float* dkb = dk + bh * g.L * D + 2 * tq;
  float* dvb = dv + bh * g.L * D + 2 * tq;
  for (int i = 0; i < ntile; ++i) {
    bf16* Kt = buf0 + (i & 1) * 2 * 16 * D;
    bf16* Vt = Kt + 16 * D;
    const int64_t base = t0 + int64_t(i) * 64 + 16 * warp;
    if (i + 1 < ntile) {
      bf16* nk = buf0 + ((i + 1) & 1) * 2 * 16 * D;
      load_rows<D, 16, 32>(nk, kb, g.k_st, base + 64, t1, lane);
      load_rows<D, 16, 32>(nk + 16 * D, vb, g.v_st, base + 64, t1, lane);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();
    uint32_t kf[KS][4], af[KS][4];  // raw k; v, then c
    load_a_frags2<D>(Kt, kf, Vt, af, lane);
    float dc[D / 2];
#pragma unroll
    for (int n = 0; n < D / 2; ++n) dc[n] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      wgmma_rs<bf16, D, 0>(dc, af[kk], desc_sw128(sM + (kk / 4) * kSub + (kk % 4) * 32, 16, 1024), 1);
    wgmma_commit();
    const bool ok0 = base + gq < t1, ok1 = base + gq + 8 < t1;
    // c = R phi(k) into af (the wgmma above must be done reading v first)
    float mx[2] = {0.f, 0.f}, iv[2] = {1.f, 1.f};
    if (F == FeatureMap::Softmax) frag_softmax_stats<KS>(kf, mx, iv);
    const float2* tp[2][3];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = r ? ok1 : ok0;
      const Rows rw = ROPE && ok ? tok_rows(g.r, base + gq + 8 * r, D / 2) : Rows{0, 0, 0};
      tp[r][0] = tab + rw.f + tq, tp[r][1] = tab + rw.h + tq, tp[r][2] = tab + rw.w + tq;
    }
    // (The epilogue reloads with plain loads, which the dv stores keep from being merged with the
    // first ones: holding all the (cos, sin) of both uses cost ~130 registers and spills.)
    auto pair_cs = [&](int r, int j, bool reload = false) {
      const float2* e = rope_pair_entry<D>(tp[r], j, tq);
      return reload ? *e : __ldg(e);
    };
    wgmma_wait<0>();
    fence_regs<D / 2>(dc);
    fence_regs_u<KS * 4>(&af[0][0]);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e & 1, j = 2 * kk + (e >> 1);
        const float2 x = Elem<bf16>::unpack(kf[kk][e]);
        float y0 = phi_y(F, x.x, mx[r], iv[r]), y1 = phi_y(F, x.y, mx[r], iv[r]);
        if (ROPE) rot_pair(pair_cs(r, j), y0, y1, y0, y1);
        af[kk][e] = Elem<bf16>::pack(y0, y1);
      }
    float dva[D / 2];
#pragma unroll
    for (int n = 0; n < D / 2; ++n) dva[n] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) wgmma_rs<bf16, D, 1>(dva, af[kk], desc_sw128(sM + kk * 16 * 128, kSub, 1024), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<D / 2>(dva);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (r ? ok1 : ok0) {
        float* out = dvb + (base + gq + 8 * r) * D;
#pragma unroll
        for (int ni = 0; ni < D / 8; ++ni)
          *reinterpret_cast<float2*>(out + 8 * ni) = make_float2(dva[4 * ni + 2 * r], dva[4 * ni + 2 * r + 1]);
      }
    // dk = phi'(R^T dc + dz), accumulator element (ni, e): row gq + 8 (e >> 1), channels 8 ni + 2 tq + {0, 1}
    float2 rcs[D / 8] = {};  // row r's table entries, loaded before its stores
    auto grad = [&](int r, int ni) {  // R^T dc + dz at (row gq + 8 r, channel pair of group ni)
      float g0 = dc[4 * ni + 2 * r], g1 = dc[4 * ni + 2 * r + 1];
      if (ROPE) {
        const float2 cs = rcs[ni];  // inverse rotation
        const float a0 = g0 * cs.x + g1 * cs.y, a1 = -g0 * cs.y + g1 * cs.x;
        g0 = a0, g1 = a1;
      }
      const float2 zz = *reinterpret_cast<const float2*>(zq + 8 * ni);
      return make_float2(g0 + zz.x, g1 + zz.y);
    };
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (ROPE) {
#pragma unroll
        for (int ni = 0; ni < D / 8; ++ni) rcs[ni] = pair_cs(r, ni, true);
      }
      float dot = 0.f;
      if (F == FeatureMap::Softmax) {
#pragma unroll
        for (int ni = 0; ni < D / 8; ++ni) {
          const float2 gv = grad(r, ni), x = Elem<bf16>::unpack(kf[ni / 2][2 * (ni & 1) + r]);
          dot += phi_y(F, x.x, mx[r], iv[r]) * gv.x + phi_y(F, x.y, mx[r], iv[r]) * gv.y;
        }
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      }
      if (r ? ok1 : ok0) {
        float* out = dkb + (base + gq + 8 * r) * D;
#pragma unroll
        for (int ni = 0; ni < D / 8; ++ni) {
          const float2 x = Elem<bf16>::unpack(kf[ni / 2][2 * (ni & 1) + r]), gv = grad(r, ni);
          float d2[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float xv = e ? x.y : x.x, gg = e ? gv.y : gv.x;
            if (F == FeatureMap::Relu) d2[e] = xv > 0.f ? gg : 0.f;
            else if (F == FeatureMap::Elu1) d2[e] = xv > 0.f ? gg : gg * expf(xv);
            else d2[e] = phi_y(F, xv, mx[r], iv[r]) * (gg - dot);
          }
          *reinterpret_cast<float2*>(out + 8 * ni) = make_float2(d2[0], d2[1]);
        }
      }
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- backward, query side (wgmma, sm_90a)
// As the key side: one warpgroup per CTA over kApplySpan tokens, each warp 16 rows of every 64-token
// tile, its q and dO rows by cp.async (one stage per warp: the next tile's copies go out once this
// tile's fragments are consumed) and ldmatrix into wgmma A fragments. Sv = hi + lo sits in shared
// memory in the V-tile layout, B K-major: G = dO Sv^T. Per row: den = phi(q) . z + eps, as = R phi(q)
// / den (bf16, for the dSv state pass), dden = -(as . G) / den (= -(dO . O) / den), dz += dden
// phi(q), and dq = phi'(R^T G / den + dden z) in the accumulator layout (fp32). One dz partial per CTA.
template <int D>
struct BwdQSmem {
  static constexpr int kM = D * D * 2;
  static constexpr int kW = kAW * 2 * 16 * D * 2;  // per warp, one stage of q and dO rows
  static constexpr int kBytes = 2 * kM + kW + D * 4 + kAW * D * 4 + 1024;  // + z, per-warp dz, alignment
};

// As in the key side, each row's table entries are loaded together before the row's stores, in the as
// pass (one row at a time, the dot's terms in the same order) and in the epilogue (long-scoreboard
// stalls: 69% of the samples with the loads interleaved with the stores; 294.6 -> 187.2 us, same
// card and shape, the gradients bit-identical). as leaves through the dO tile's shared-memory place in
// 16-byte chunks (193.6-195.5 -> 174.0 us), and with QR the rotated q for the sparse backward through
// the q tile's place: 201.8 us against 174.0 us plus the rotation pass's 81.1 us (H200, Wan1.3B-480p).
template <int D, FeatureMap F, bool ROPE, bool QR>
__global__ void __launch_bounds__(kAW * 32, 2) apply_bwd_q_wgmma_kernel(LinArgs g, const bf16* __restrict__ q,
                                                                        const bf16* __restrict__ dol,
                                                                        const bf16* __restrict__ svhl,
                                                                        const float* __restrict__ zv,
                                                                        bf16* __restrict__ as_out,
                                                                        float* __restrict__ dzpart,
                                                                        float* __restrict__ dq) {
  using namespace sm90;
  constexpr int KS = D / 16, kSub = D * 128;
  extern __shared__ __align__(16) unsigned char smraw[];
  const uint32_t raw = smem_addr(smraw), sH = (raw + 1023u) & ~1023u, sL = sH + BwdQSmem<D>::kM;
  unsigned char* sm = smraw + (sH - raw);
  bf16* Wall = reinterpret_cast<bf16*>(sm + 2 * BwdQSmem<D>::kM);
  float* zs = reinterpret_cast<float*>(sm + 2 * BwdQSmem<D>::kM + BwdQSmem<D>::kW);
  float* dzw = zs + D;  // [kAW][D]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t t0 = blockIdx.x * int64_t(kApplySpan), t1 = imin64(g.L, t0 + kApplySpan);
  const int ntile = static_cast<int>((t1 - t0 + 63) / 64);
  load_mat_sw128<D, kAW * 32>(sH, svhl + bh * 2 * D * D);
  load_mat_sw128<D, kAW * 32>(sL, svhl + bh * 2 * D * D + D * D);
  cp_async_commit();
  for (int d = tid; d < D; d += kAW * 32) zs[d] = zv[bh * D + d];
  const bf16* qb = q + b * g.q_sb + h * g.q_sh;
  const bf16* gb = dol + bh * g.L * D;
  bf16* Qt = Wall + warp * 2 * 16 * D;
  bf16* Gt = Qt + 16 * D;
  const uint32_t sQt = smem_addr(Qt), sGt = smem_addr(Gt);
  load_rows<D, 16, 32>(Qt, qb, g.q_st, t0 + 16 * warp, t1, lane);
  load_rows<D, 16, 32>(Gt, gb, D, t0 + 16 * warp, t1, lane);
  cp_async_commit();
  cp_async_wait<1>();                                              // Sv landed (this thread's part)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to wgmma
  __syncthreads();
  const float2* tab = g.r.table;
  const float* zq = zs + 2 * tq;
  float dzacc[D / 4];  // channels 8 ni + 2 tq + {0, 1} of this lane's rows, over all its tiles
#pragma unroll
  for (int c = 0; c < D / 4; ++c) dzacc[c] = 0.f;
  float* dqb = dq + bh * g.L * D + 2 * tq;
  // kStage: as (and qr) leave through shared memory in 16-byte chunks (below); not under softmax, whose
  // registers it spills (48 bytes at D 128 with RoPE): there as is stored from the fragments, 4 bytes each.
  constexpr bool kStage = F != FeatureMap::Softmax;
  bf16* asb = as_out + bh * g.L * D + (kStage ? 0 : 2 * tq);
  // QR (Plan::fuse_q; ROPE, not softmax, whose registers it would spill): qr = R q into g.qr for the
  // sparse backward, from the as pass's table entries. A compile-time switch: with a run-time one ptxas
  // spilled 304 bytes (dz's accumulators) at D 128 under relu.
  static_assert(!QR || (ROPE && kStage), "qr needs the linear RoPE and the staged stores (not softmax)");
  bf16* qrb = QR ? g.qr + bh * g.L * D : nullptr;
  for (int i = 0; i < ntile; ++i) {
    const int64_t base = t0 + int64_t(i) * 64 + 16 * warp;  // this warp's first row
    cp_async_wait<0>();
    __syncwarp();
    uint32_t qf[KS][4], gf[KS][4];  // raw q; dO
    load_a_frags2<D>(Qt, qf, Gt, gf, lane);
    float acc[D / 2];
#pragma unroll
    for (int n = 0; n < D / 2; ++n) acc[n] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      wgmma_rs<bf16, D, 0>(acc, gf[kk], desc_sw128(sH + (kk / 4) * kSub + (kk % 4) * 32, 16, 1024), 1);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      wgmma_rs<bf16, D, 0>(acc, gf[kk], desc_sw128(sL + (kk / 4) * kSub + (kk % 4) * 32, 16, 1024), 1);
    wgmma_commit();
    const bool ok[2] = {base + gq < t1, base + gq + 8 < t1};
    // Rows gq and gq + 8; element e of qf[kk] is row e & 1, channel pair j = 2 kk + (e >> 1).
    float mx[2] = {0.f, 0.f}, iv[2] = {1.f, 1.f};
    if (F == FeatureMap::Softmax) frag_softmax_stats<KS>(qf, mx, iv);
    const float2* tp[2][3];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const Rows rw = ROPE && ok[r] ? tok_rows(g.r, base + gq + 8 * r, D / 2) : Rows{0, 0, 0};
      tp[r][0] = tab + rw.f + tq, tp[r][1] = tab + rw.h + tq, tp[r][2] = tab + rw.w + tq;
    }
    float den[2] = {0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e & 1, j = 2 * kk + (e >> 1);
        const float2 x = Elem<bf16>::unpack(qf[kk][e]), zz = *reinterpret_cast<const float2*>(zq + 8 * j);
        den[r] = fmaf(phi_y(F, x.x, mx[r], iv[r]), zz.x, fmaf(phi_y(F, x.y, mx[r], iv[r]), zz.y, den[r]));
      }
    float id[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      den[r] += __shfl_xor_sync(0xffffffffu, den[r], 1);
      den[r] += __shfl_xor_sync(0xffffffffu, den[r], 2);
      id[r] = __fdividef(1.f, den[r] + g.eps);  // den >= eps > 0
    }
    // G done: gf dies here, before as is built (holding gf, as and G took 255 registers and 260-640
    // bytes of spills at D 128 in ptxas; the GEMM is ~10% of this kernel's time, the normaliser runs
    // under it), and as needs no registers of its own: the dot takes it as it is stored.
    wgmma_wait<0>();
    fence_regs<D / 2>(acc);
    fence_regs_u<KS * 4>(&gf[0][0]);
    fence_regs_u<KS * 4>(&qf[0][0]);  // unpack q again below rather than hold its fp32 values
    // as = R phi(q) / den (bf16: what the dSv pass reads) and, G being done, dden = -(as . G) / den
    // per row (0 past the end: no dz contribution). as (and qr) overwrite the tiles that the warp's
    // ldmatrix read: the __syncwarp orders those reads before the stores (compute-sanitizer racecheck).
    if (kStage) __syncwarp();
    float dot[2] = {0.f, 0.f};
    auto as_term = [&](int r, int j, float2 cs) {
      const float2 x = Elem<bf16>::unpack(qf[j / 2][2 * (j & 1) + r]);
      const uint32_t at = 2u * static_cast<uint32_t>(swz<D>(gq + 8 * r, 8 * j + 2 * tq));  // the pair's place
      if (QR) {  // the rotation pass's arithmetic (rotate_kernel), into the q tile's place
        float r0, r1;
        rot_pair(cs, x.x, x.y, r0, r1);
        st_shared_b32(sQt + at, Elem<bf16>::pack(r0, r1));
      }
      float y0 = phi_y(F, x.x, mx[r], iv[r]), y1 = phi_y(F, x.y, mx[r], iv[r]);
      if (ROPE) rot_pair(cs, y0, y1, y0, y1);
      const uint32_t pa = Elem<bf16>::pack(y0 * id[r], y1 * id[r]);
      if (kStage)
        st_shared_b32(sGt + at, pa);  // into the dO tile's place (gf holds dO)
      else if (ok[r])
        *reinterpret_cast<uint32_t*>(asb + (base + gq + 8 * r) * D + 8 * j) = pa;
      const float2 av = Elem<bf16>::unpack(pa);
      dot[r] = fmaf(av.x, acc[4 * j + 2 * r], fmaf(av.y, acc[4 * j + 2 * r + 1], dot[r]));
    };
    float2 rcs[D / 8] = {};  // one row's table entries
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (ROPE) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) rcs[j] = __ldg(rope_pair_entry<D>(tp[r], j, tq));
      }
#pragma unroll
      for (int j = 0; j < D / 8; ++j) as_term(r, j, rcs[j]);
    }
    // kStage: as (and qr) leave from the tile buffers in whole 16-byte chunks, 16 lanes per 256-byte row
    // (the 4-byte stores of the fragment layout fill half a sector each). Then the fragments are in registers
    // (the wgmmas read gf, the loop above read qf) and the buffers take the next tile, behind the epilogue.
    if (kStage) {
      __syncwarp();
      constexpr int CH = D / 8;
#pragma unroll 1
      for (int c = lane; c < 16 * CH; c += 32) {
        const int row = c / CH, ch = c % CH;
        if (base + row < t1) {
          const int64_t o = (base + row) * D + 8 * ch;
          const uint32_t at = 2u * static_cast<uint32_t>(swz<D>(row, 8 * ch));
          *reinterpret_cast<uint4*>(asb + o) = ld_shared_v4(sGt + at);
          if (QR) *reinterpret_cast<uint4*>(qrb + o) = ld_shared_v4(sQt + at);
        }
      }
    }
    __syncwarp();
    if (i + 1 < ntile) {
      load_rows<D, 16, 32>(Qt, qb, g.q_st, base + 64, t1, lane);
      load_rows<D, 16, 32>(Gt, gb, D, base + 64, t1, lane);
      cp_async_commit();
    }
    float dden[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
      dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
      dden[r] = ok[r] ? -dot[r] * id[r] : 0.f;
    }
    fence_regs_u<KS * 4>(&qf[0][0]);
    // dq = phi'(R^T G / den + dden z), accumulator element (ni, e): row gq + 8 (e >> 1), channels
    // 8 ni + 2 tq + {0, 1}; dz += dden phi(q) on the way.
    auto grad = [&](int r, int ni) {
      float g0 = acc[4 * ni + 2 * r] * id[r], g1 = acc[4 * ni + 2 * r + 1] * id[r];
      if (ROPE) {
        const float2 cs = rcs[ni];  // inverse rotation
        const float a0 = g0 * cs.x + g1 * cs.y, a1 = -g0 * cs.y + g1 * cs.x;
        g0 = a0, g1 = a1;
      }
      const float2 zz = *reinterpret_cast<const float2*>(zq + 8 * ni);
      return make_float2(fmaf(dden[r], zz.x, g0), fmaf(dden[r], zz.y, g1));
    };
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      fence_regs<D / 2>(acc);  // one row at a time (interleaving both rows' epilogues spilled)
      if (ROPE) {  // plain loads: after the as stores, so not merged with the __ldg ones above
#pragma unroll
        for (int ni = 0; ni < D / 8; ++ni) rcs[ni] = *rope_pair_entry<D>(tp[r], ni, tq);
      }
      float dot = 0.f;
#pragma unroll
      for (int ni = 0; ni < D / 8; ++ni) {
        const float2 x = Elem<bf16>::unpack(qf[ni / 2][2 * (ni & 1) + r]);
        const float y0 = phi_y(F, x.x, mx[r], iv[r]), y1 = phi_y(F, x.y, mx[r], iv[r]);
        dzacc[2 * ni] = fmaf(dden[r], y0, dzacc[2 * ni]);
        dzacc[2 * ni + 1] = fmaf(dden[r], y1, dzacc[2 * ni + 1]);
        if (F == FeatureMap::Softmax) {
          const float2 gv = grad(r, ni);
          dot += y0 * gv.x + y1 * gv.y;
        }
      }
      if (F == FeatureMap::Softmax) {
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      }
      if (ok[r]) {
        float* out = dqb + (base + gq + 8 * r) * D;
#pragma unroll
        for (int ni = 0; ni < D / 8; ++ni) {
          const float2 x = Elem<bf16>::unpack(qf[ni / 2][2 * (ni & 1) + r]), gv = grad(r, ni);
          float d2[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float xv = e ? x.y : x.x, gg = e ? gv.y : gv.x;
            if (F == FeatureMap::Relu) d2[e] = xv > 0.f ? gg : 0.f;
            else if (F == FeatureMap::Elu1) d2[e] = xv > 0.f ? gg : gg * expf(xv);
            else d2[e] = phi_y(F, xv, mx[r], iv[r]) * (gg - dot);
          }
          *reinterpret_cast<float2*>(out + 8 * ni) = make_float2(d2[0], d2[1]);
        }
      }
    }
  }
  // dz: the 8 lanes of one tq hold the same channels (a fixed tree over lanes 4 apart), then the warps
  // in order: one partial per CTA, reduced over the spans in fixed order (deterministic).
#pragma unroll
  for (int c = 0; c < D / 4; ++c) {
    dzacc[c] += __shfl_xor_sync(0xffffffffu, dzacc[c], 4);
    dzacc[c] += __shfl_xor_sync(0xffffffffu, dzacc[c], 8);
    dzacc[c] += __shfl_xor_sync(0xffffffffu, dzacc[c], 16);
  }
  if (gq == 0)
#pragma unroll
    for (int ni = 0; ni < D / 8; ++ni)
      *reinterpret_cast<float2*>(dzw + warp * D + 8 * ni + 2 * tq) = make_float2(dzacc[2 * ni], dzacc[2 * ni + 1]);
  __syncthreads();
  for (int d = tid; d < D; d += kAW * 32) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kAW; ++w) acc += dzw[w * D + d];
    dzpart[(bh * gridDim.x + blockIdx.x) * D + d] = acc;
  }
}

// zout (optional): a normaliser reduced in the same launch as the state, from zred's n_z partials
// (default: the n_chunk partials the state kernel writes to zpart).
template <int D, bool TRANSFORM>
void state_mma(const LinArgs& g, const Plan& pl, const bf16* x, const int64_t* xs, const bf16* y, const int64_t* ys,
               float* part, float* zpart, bf16* out, bool split, float* zout, cudaStream_t s,
               const float* zred = nullptr, int64_t n_z = 0) {
  const size_t smem = sizeof(bf16) * 4 * kTT * D;
  set_smem_mma(state_mma_kernel<D, TRANSFORM>, smem);
  state_mma_kernel<D, TRANSFORM><<<dim3(static_cast<unsigned>(pl.n_chunk), static_cast<unsigned>(pl.BH)), kT, smem, s>>>(
      g, x, xs[0], xs[1], xs[2], y, ys[0], ys[1], ys[2], part, zpart);
  SALAD_LAUNCH_CHECK();
  reduce_sv_kernel<D><<<dim3((D * D + 255) / 256, static_cast<unsigned>(pl.BH)), 256, 0, s>>>(part, out, pl.n_chunk,
                                                                                           split, zred ? zred : zpart,
                                                                                           zout, n_z ? n_z : pl.n_chunk);
  SALAD_LAUNCH_CHECK();
}

template <int D>
void fwd_state(const Params& p, const Plan& pl, const LinArgs& g, void* ws, cudaStream_t s) {
  if (pl.fuse_k) {
    with_feature_rope(g.feature, g.rope, [&](auto fc, auto rc) {
      auto kernel = state_fwd_wgmma_kernel<D, decltype(fc)::value, decltype(rc)::value>;
      set_smem_mma(kernel, StateSmem<D>::kBytes);
      kernel<<<dim3(static_cast<unsigned>(pl.n_chunk), static_cast<unsigned>(pl.BH)), 2 * D, StateSmem<D>::kBytes, s>>>(
          g, static_cast<const bf16*>(p.k), static_cast<const bf16*>(p.v), at<float>(ws, pl.sv_part),
          at<float>(ws, pl.z_part), at<bf16>(ws, pl.kr),
          pl.ksum ? at<float>(ws, kmean_from_state(p, pl) ? pl.kmean : pl.ksum) : nullptr);  // forward Top-K only
      SALAD_LAUNCH_CHECK();
    });
    reduce_sv_kernel<D><<<dim3((D * D + 255) / 256, static_cast<unsigned>(pl.BH)), 256, 0, s>>>(
        at<float>(ws, pl.sv_part), at<bf16>(ws, pl.sv), pl.n_chunk, true, at<float>(ws, pl.z_part), at<float>(ws, pl.z),
        pl.n_chunk);
    SALAD_LAUNCH_CHECK();
    return;
  }
  state_mma<D, true>(g, pl, static_cast<const bf16*>(p.k), p.k_stride, static_cast<const bf16*>(p.v), p.v_stride,
                     at<float>(ws, pl.sv_part), at<float>(ws, pl.z_part), at<bf16>(ws, pl.sv), true, at<float>(ws, pl.z),
                     s);
}

template <int D>
void fwd(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  LinArgs g = make_args(p, pl, r);
  if (pl.fuse_rotate) {
    g.qr = at<bf16>(ws, pl.qr);
    if (pl.topk_select) g.qsum = at<float>(ws, pl.qsum);
  }
  fwd_state<D>(p, pl, g, ws, s);
  if (g.qr && apply_wgmma_enabled()) {
    apply_fwd_wgmma<D>(g, pl, static_cast<const bf16*>(p.q), at<bf16>(ws, pl.sv), at<float>(ws, pl.z),
                       static_cast<bf16*>(p.o_l), s);
    return;
  }
  const size_t smem = sizeof(bf16) * (D * D + kW * 2 * kWT * D) + sizeof(float) * (kW * kWT + D);
  set_smem_mma(apply_fwd_mma_kernel<D>, smem);
  apply_fwd_mma_kernel<D><<<dim3(static_cast<unsigned>(pl.n_chunk), static_cast<unsigned>(pl.BH)), kT, smem, s>>>(
      g, static_cast<const bf16*>(p.q), at<bf16>(ws, pl.sv), at<float>(ws, pl.z), static_cast<bf16*>(p.o_l));
  SALAD_LAUNCH_CHECK();
}

template <int D>
void bwd(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  LinArgs g = make_args(p, pl, r);
  fwd_state<D>(p, pl, g, ws, s);
  const dim3 grid(static_cast<unsigned>(pl.n_chunk), static_cast<unsigned>(pl.BH));
  bf16* as = at<bf16>(ws, pl.dnum);  // a / den, (BH, L, D) bf16 in the fp32 dnum region
  const char* eq = std::getenv("SALAD_LINEAR_BWD_Q");  // "mma": the mma.sync query-side kernel
  int64_t n_dz = pl.n_chunk;  // dz partials per (b, h)
  if (!(eq && std::strcmp(eq, "mma") == 0)) {
    n_dz = (g.L + kApplySpan - 1) / kApplySpan;  // one per span (make_plan sizes dz_part for either)
    const dim3 gq(static_cast<unsigned>(n_dz), static_cast<unsigned>(pl.BH));
    LinArgs ga = g;
    if (pl.fuse_q) ga.qr = at<bf16>(ws, pl.qr);  // this kernel writes qr (no rotation pass for q)
    with_feature_rope(g.feature, g.rope, [&](auto fc, auto rc) {
      constexpr FeatureMap F = decltype(fc)::value;
      constexpr bool R = decltype(rc)::value;
      auto kernel = apply_bwd_q_wgmma_kernel<D, F, R, false>;
      if constexpr (R && F != FeatureMap::Softmax)
        if (ga.qr) kernel = apply_bwd_q_wgmma_kernel<D, F, R, true>;
      set_smem_mma(kernel, BwdQSmem<D>::kBytes);
      kernel<<<gq, kAW * 32, BwdQSmem<D>::kBytes, s>>>(ga, static_cast<const bf16*>(p.q),
                                                       static_cast<const bf16*>(p.do_l), at<bf16>(ws, pl.sv),
                                                       at<float>(ws, pl.z), as, at<float>(ws, pl.dz_part),
                                                       at<float>(ws, pl.dq_l));
      SALAD_LAUNCH_CHECK();
    });
  } else {
    const size_t smem_q = sizeof(bf16) * (2 * D * D + kW * 3 * kWT * D) + sizeof(float) * (D + kW * 4 * kWT + kW * D);
    set_smem_mma(apply_bwd_q_mma_kernel<D>, smem_q);
    apply_bwd_q_mma_kernel<D><<<grid, kT, smem_q, s>>>(g, static_cast<const bf16*>(p.q), static_cast<const bf16*>(p.do_l),
                                                       at<bf16>(ws, pl.sv), at<float>(ws, pl.z), as,
                                                       at<float>(ws, pl.dz_part), at<float>(ws, pl.dq_l));
    SALAD_LAUNCH_CHECK();
  }
  const int64_t cs[3] = {p.H * p.L * D, p.L * D, D};  // contiguous (B, H, L, D)
  // The dSv reduction also sums dz's n_dz partials (written by the query side above).
  state_mma<D, false>(g, pl, as, cs, static_cast<const bf16*>(p.do_l), cs, at<float>(ws, pl.dsv_part), nullptr,
                      at<bf16>(ws, pl.dsv), false, at<float>(ws, pl.dz), s, at<float>(ws, pl.dz_part), n_dz);
  const char* ek = std::getenv("SALAD_LINEAR_BWD_K");  // "mma": the mma.sync key-side kernel
  if (!(ek && std::strcmp(ek, "mma") == 0)) {
    const dim3 gk(static_cast<unsigned>((g.L + kApplySpan - 1) / kApplySpan), static_cast<unsigned>(pl.BH));
    with_feature_rope(g.feature, g.rope, [&](auto fc, auto rc) {
      auto kernel = apply_bwd_k_wgmma_kernel<D, decltype(fc)::value, decltype(rc)::value>;
      set_smem_mma(kernel, BwdKSmem<D>::kBytes);
      kernel<<<gk, kAW * 32, BwdKSmem<D>::kBytes, s>>>(g, static_cast<const bf16*>(p.k), static_cast<const bf16*>(p.v),
                                                       at<bf16>(ws, pl.dsv), at<float>(ws, pl.dz),
                                                       at<float>(ws, pl.dk_l), at<float>(ws, pl.dv_l));
      SALAD_LAUNCH_CHECK();
    });
    return;
  }
  const size_t smem_k = sizeof(bf16) * (D * D + kW * 3 * kWT * D) + sizeof(float) * (D + kW * 2 * kWT);
  set_smem_mma(apply_bwd_k_mma_kernel<D>, smem_k);
  apply_bwd_k_mma_kernel<D><<<grid, kT, smem_k, s>>>(g, static_cast<const bf16*>(p.k), static_cast<const bf16*>(p.v),
                                                     at<bf16>(ws, pl.dsv), at<float>(ws, pl.dz), at<float>(ws, pl.dk_l),
                                                     at<float>(ws, pl.dv_l));
  SALAD_LAUNCH_CHECK();
}

}  // namespace mma

}  // namespace

// SALAD_LINEAR_KERNEL=old selects the fp32 CUDA-core path (also used for fp16 inputs).
bool linear_uses_mma(DType t) {
  if (t != DType::BF16) return false;
  const char* e = std::getenv("SALAD_LINEAR_KERNEL");
  return !(e && std::strcmp(e, "old") == 0);
}

void launch_linear_fwd(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (linear_uses_mma(p.dtype)) {
    if (p.D == 64) mma::fwd<64>(p, pl, r, ws, s);
    else mma::fwd<128>(p, pl, r, ws, s);
  } else if (p.dtype == DType::BF16) {
    if (p.D == 64) fwd<__nv_bfloat16, 64>(p, pl, r, ws, s);
    else fwd<__nv_bfloat16, 128>(p, pl, r, ws, s);
  } else {
    if (p.D == 64) fwd<__half, 64>(p, pl, r, ws, s);
    else fwd<__half, 128>(p, pl, r, ws, s);
  }
}

void launch_linear_bwd(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (!p.do_l) return;  // zero incoming gradient: the branch adds nothing
  if (!p.o_l) throw ArgumentError("o_l: expected the forward's linear output for the backward in mode salad");
  if (linear_uses_mma(p.dtype)) {
    if (p.D == 64) mma::bwd<64>(p, pl, r, ws, s);
    else mma::bwd<128>(p, pl, r, ws, s);
  } else if (p.dtype == DType::BF16) {
    if (p.D == 64) bwd<__nv_bfloat16, 64>(p, pl, r, ws, s);
    else bwd<__nv_bfloat16, 128>(p, pl, r, ws, s);
  } else {
    if (p.D == 64) bwd<__half, 64>(p, pl, r, ws, s);
    else bwd<__half, 128>(p, pl, r, ws, s);
  }
}

}  // namespace salad::cuda::detail
