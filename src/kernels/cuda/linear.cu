// Linear-attention branch (mode salad), forward and backward, fp32 on CUDA
// cores (first version; the D x D state products are small next to the sparse
// branch). Everything is per (b, h) and order-independent, so it runs in the
// caller's raster order with no permutation.
//
//   c_j = R_j phi(k_j), a_i = R_i phi(q_i)      (R = identity when !linear_rope)
//   Sv = sum_j c_j v_j^T, z = sum_j phi(k_j)     (state kernel, chunk partials + fixed-order reduce)
//   O_i = a_i^T Sv / (phi(q_i).z + eps)           (apply kernel)
// Backward (formulas of salad::cpu::reference_backward):
//   dnum_i = dO_i / den_i, dden_i = -(dO_i . O_i) / den_i, da_i = Sv dnum_i,
//   dSv = sum_i a_i dnum_i^T, dz = sum_i dden_i phi(q_i),
//   dphi(q_i) = R_i^T da_i + dden_i z, dc_j = dSv v_j, dv_j = dSv^T c_j,
//   dphi(k_j) = R_j^T dc_j + dz; then through phi.
#include "internal.cuh"

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
  FeatureMap feature;
  bool rope;
  float eps;
  RopeInfo r;
  int64_t n_chunk;
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
  const int64_t chunk = (g.L + g.n_chunk - 1) / g.n_chunk;
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
      T* out = o + (bh * g.L + t) * D;
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
  g.k_sb = p.k_stride[0], g.k_sh = p.k_stride[1], g.k_st = p.k_stride[2];
  g.v_sb = p.v_stride[0], g.v_sh = p.v_stride[1], g.v_st = p.v_stride[2];
  g.feature = p.opt.feature;
  g.rope = p.opt.linear_rope;
  g.eps = static_cast<float>(p.opt.eps);
  g.r = r;
  g.n_chunk = pl.n_chunk;
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

}  // namespace

void launch_linear_fwd(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (p.dtype == DType::BF16) {
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
  if (p.dtype == DType::BF16) {
    if (p.D == 64) bwd<__nv_bfloat16, 64>(p, pl, r, ws, s);
    else bwd<__nv_bfloat16, 128>(p, pl, r, ws, s);
  } else {
    if (p.D == 64) bwd<__half, 64>(p, pl, r, ws, s);
    else bwd<__half, 128>(p, pl, r, ws, s);
  }
}

}  // namespace salad::cuda::detail
