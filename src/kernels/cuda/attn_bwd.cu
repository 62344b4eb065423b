// Block-sparse FlashAttention-2 style backward (mma.sync m16n8k16).
//
// Two kernels, each owning its outputs, so no atomics and the result is
// deterministic whatever p.deterministic says:
//   dq kernel : CTA = 64 query rows of one query block, walks the kept key
//               tiles (recomputes P from lse), dQ = scale * dS K.
//   dkv kernel: CTA = 64 keys of one key block, walks the query tiles of the
//               query blocks that kept it (inverse table, ascending),
//               dV = P^T dO, dK = scale * dS^T Q.
// Both rotate the result back (dq = R^T dqr), add the linear branch's fp32
// gradient when given, and scatter rows to caller order.
// On Hopper, attn_bwd_sm90.cu's wgmma/TMA kernels replace either where they
// apply (SALAD_BWD_KERNEL=mma, SALAD_BWD_DQ=mma, SALAD_BWD_DKV=mma force these).
#include "attn_bwd_sm90.cuh"
#include "internal.cuh"

namespace salad::cuda::detail {
namespace {

constexpr int kTile = 64;  // rows per CTA (4 warps x 16) and columns per tile
constexpr int kWarps = kTile / 16;

template <class T>
struct BwdArgs {
  const T* qr;
  const T* kr;
  const T* v;
  int64_t v_sb, v_sh, v_st, H;
  const T* dout;      // do_s, contiguous (B, H, L, D), caller order
  const float* lse;   // caller order
  const float* delta; // block order
  const float* extra_dq;  // linear-branch grads (fp32, caller order) or null
  const float* extra_dk;
  const float* extra_dv;
  T* dq;
  T* dk;
  T* dv;
  const int32_t* idx;
  const int32_t* cnt;
  const int32_t* inv_off;
  const int32_t* inv_rows;
  RopeInfo rope;
  int64_t max_k, L, n_q, n_k, block_q, block_k;
  int sub;
  bool dense;
  float scale, scale_log2;
};

// delta[p] = dO[t] . O[t] (block order p, caller token t), one warp per row.
template <class T>
__global__ void delta_kernel(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ delta,
                             const int32_t* __restrict__ perm, int64_t L, int D) {
  const int lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y;
  const int64_t p = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (p >= L) return;
  const int64_t t = perm_at(perm, p);
  const T* a = o + (bh * L + t) * D;
  const T* g = dout + (bh * L + t) * D;
  float acc = 0.f;
  for (int d = 2 * lane; d < D; d += 64) {
    float2 x = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(a + d));
    float2 y = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(g + d));
    acc += x.x * y.x + x.y * y.y;
  }
  for (int k = 16; k > 0; k >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, k);
  if (lane == 0) delta[bh * L + p] = acc;
}

// Same, 16-byte loads: a group of D / 8 lanes (a power of two <= 32) per row, several rows per
// warp (the one-warp-per-row kernel above issues 4-byte loads and is latency-bound).
template <class T>
__global__ void __launch_bounds__(256) delta_vec_kernel(const T* __restrict__ o, const T* __restrict__ dout,
                                                        float* __restrict__ delta, const int32_t* __restrict__ perm,
                                                        int64_t L, int D) {
  const int lanes = D / 8, c = threadIdx.x % lanes;
  const int64_t bh = blockIdx.y;
  const int64_t p = blockIdx.x * int64_t(blockDim.x / lanes) + threadIdx.x / lanes;
  float acc = 0.f;
  if (p < L) {
    const int64_t t = perm_at(perm, p);
    const uint4 x = *reinterpret_cast<const uint4*>(o + (bh * L + t) * D + 8 * c);
    const uint4 y = *reinterpret_cast<const uint4*>(dout + (bh * L + t) * D + 8 * c);
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = Elem<T>::unpack(xs[i]), b = Elem<T>::unpack(ys[i]);
      acc += a.x * b.x + a.y * b.y;
    }
  }
  for (int k = lanes / 2; k > 0; k >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, k);
  if (c == 0 && p < L) delta[bh * L + p] = acc;
}

// Writes one row-pair fragment: rotate back (R^T), add the fp32 extra, store.
template <class T, int D>
__device__ __forceinline__ void store_rotated(const RopeInfo& r, T* out, const float* extra, int64_t t,
                                              int col, float x0, float x1, bool rotate) {
  if (rotate) {
    float2 cs = rope_cs(r, t, col / 2, D / 2);
    float y0 = x0 * cs.x + x1 * cs.y, y1 = -x0 * cs.y + x1 * cs.x;
    x0 = y0;
    x1 = y1;
  }
  if (extra) {
    float2 e = *reinterpret_cast<const float2*>(extra + col);
    x0 += e.x;
    x1 += e.y;
  }
  *reinterpret_cast<uint32_t*>(out + col) = Elem<T>::pack(x0, x1);
}

// ------------------------------------------------------------------ dQ
template <class T, int D>
__global__ void __launch_bounds__(kWarps * 32) attn_dq_kernel(BwdArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + kTile * D;
  T* Ks = dOs + kTile * D;        // [2]
  T* Vs = Ks + 2 * kTile * D;     // [2]
  float* lse_s = reinterpret_cast<float*>(Vs + 2 * kTile * D);
  float* delta_s = lse_s + kTile;

  constexpr int CH = D / 8;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t qi = blockIdx.x / a.sub, sub = blockIdx.x % a.sub;
  const int64_t row0 = qi * a.block_q + sub * kTile;
  const int64_t row_end = imin64(imin64(row0 + kTile, (qi + 1) * a.block_q), a.L);
  if (row0 >= row_end) return;
  const int32_t* perm = a.rope.perm;

  const T* qbase = a.qr + bh * a.L * D;
  const T* obase = a.dout + bh * a.L * D;
  for (int e = tid; e < kTile * CH; e += blockDim.x) {
    int r = e / CH, c = e % CH;
    int64_t gr = row0 + r;
    bool ok = gr < row_end;
    int64_t p = ok ? gr : row0;
    cp_async16(smem_addr(Qs + swz<D>(r, c * 8)), qbase + p * D + c * 8, ok ? 16 : 0);
    cp_async16(smem_addr(dOs + swz<D>(r, c * 8)), obase + perm_at(perm, p) * D + c * 8, ok ? 16 : 0);
  }
  for (int r = tid; r < kTile; r += blockDim.x) {
    int64_t gr = row0 + r;
    bool ok = gr < row_end;
    lse_s[r] = ok ? a.lse[bh * a.L + perm_at(perm, gr)] * 1.4426950408889634f : INFINITY;
    delta_s[r] = ok ? a.delta[bh * a.L + gr] : 0.f;
  }

  const int64_t nblk = a.dense ? a.n_k : a.cnt[bh * a.n_q + qi];
  const int32_t* list = a.dense ? nullptr : a.idx + (bh * a.n_q + qi) * a.max_k;
  const T* kbase = a.kr + bh * a.L * D;
  const T* vbase = a.v + b * a.v_sb + h * a.v_sh;
  auto block_of = [&](int64_t c) -> int64_t { return a.dense ? c : list[c]; };
  auto load_kv = [&](int stage, int64_t start, int valid) {
    T* ks = Ks + stage * kTile * D;
    T* vs = Vs + stage * kTile * D;
    for (int e = tid; e < kTile * CH; e += blockDim.x) {
      int r = e / CH, c = e % CH;
      bool ok = r < valid;
      int64_t p = ok ? start + r : start;
      cp_async16(smem_addr(ks + swz<D>(r, c * 8)), kbase + p * D + c * 8, ok ? 16 : 0);
      cp_async16(smem_addr(vs + swz<D>(r, c * 8)), vbase + perm_at(perm, p) * a.v_st + c * 8, ok ? 16 : 0);
    }
  };

  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  int64_t c = 0, kt = 0;
  auto tile = [&](int64_t cc, int64_t kk, int64_t* start, int* valid) {
    int64_t j = block_of(cc);
    *start = j * a.block_k + kk;
    *valid = static_cast<int>(imin64(kTile, imin64((j + 1) * a.block_k, a.L) - *start));
  };
  auto advance = [&](int64_t* cc, int64_t* kk) {
    int64_t j = block_of(*cc);
    *kk += kTile;
    if (j * a.block_k + *kk >= imin64((j + 1) * a.block_k, a.L)) {
      ++*cc;
      *kk = 0;
    }
  };
  int64_t start;
  int valid = 0;
  if (nblk > 0) {
    tile(c, kt, &start, &valid);
    load_kv(0, start, valid);
  }
  cp_async_commit();
  int stage = 0;
  const int qrow = warp * 16, g = lane >> 2;
  while (c < nblk) {
    const int cur_valid = valid;
    int64_t nc = c, nkt = kt;
    advance(&nc, &nkt);
    cp_async_wait<0>();
    __syncthreads();
    if (nc < nblk) {
      tile(nc, nkt, &start, &valid);
      load_kv(stage ^ 1, start, valid);
    }
    cp_async_commit();
    const T* ks = Ks + stage * kTile * D;
    const T* vs = Vs + stage * kTile * D;

    float s[kTile / 8][4], dp[kTile / 8][4];
    warp_rows_by_rows<T, D, kTile>(s, Qs, qrow, ks, lane);
    warp_rows_by_rows<T, D, kTile>(dp, dOs, qrow, vs, lane);
    const float l0 = lse_s[qrow + g], l1 = lse_s[qrow + g + 8];
    const float d0 = delta_s[qrow + g], d1 = delta_s[qrow + g + 8];
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int col = nt * 8 + 2 * (lane & 3) + (e & 1);
        float lz = e < 2 ? l0 : l1, dl = e < 2 ? d0 : d1;
        float pr = col < cur_valid ? exp2f(fmaf(s[nt][e], a.scale_log2, -lz)) : 0.f;
        s[nt][e] = pr * (dp[nt][e] - dl);
      }
    }
    warp_p_by_rows<T, D, kTile>(dq, s, ks, lane);
    stage ^= 1;
    c = nc;
    kt = nkt;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    int64_t r = row0 + qrow + g + half * 8;
    if (r >= row_end) continue;
    int64_t t = perm_at(perm, r);
    T* out = a.dq + (bh * a.L + t) * D;
    const float* ex = a.extra_dq ? a.extra_dq + (bh * a.L + t) * D : nullptr;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      store_rotated<T, D>(a.rope, out, ex, t, i * 8 + 2 * (lane & 3), dq[i][2 * half] * a.scale,
                          dq[i][2 * half + 1] * a.scale, true);
  }
}

// ------------------------------------------------------------------ dK, dV
template <class T, int D>
__global__ void __launch_bounds__(kWarps * 32) attn_dkv_kernel(BwdArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + kTile * D;
  T* Qs = Vs + kTile * D;          // [2]
  T* dOs = Qs + 2 * kTile * D;     // [2]
  float* lse_s = reinterpret_cast<float*>(dOs + 2 * kTile * D);  // [2][kTile]
  float* delta_s = lse_s + 2 * kTile;                            // [2][kTile]

  constexpr int CH = D / 8;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t kj = blockIdx.x / a.sub, sub = blockIdx.x % a.sub;
  const int64_t key0 = kj * a.block_k + sub * kTile;
  const int64_t key_end = imin64(imin64(key0 + kTile, (kj + 1) * a.block_k), a.L);
  if (key0 >= key_end) return;
  const int32_t* perm = a.rope.perm;

  const T* kbase = a.kr + bh * a.L * D;
  const T* vbase = a.v + b * a.v_sb + h * a.v_sh;
  for (int e = tid; e < kTile * CH; e += blockDim.x) {
    int r = e / CH, c = e % CH;
    int64_t gr = key0 + r;
    bool ok = gr < key_end;
    int64_t p = ok ? gr : key0;
    cp_async16(smem_addr(Ks + swz<D>(r, c * 8)), kbase + p * D + c * 8, ok ? 16 : 0);
    cp_async16(smem_addr(Vs + swz<D>(r, c * 8)), vbase + perm_at(perm, p) * a.v_st + c * 8, ok ? 16 : 0);
  }

  int64_t nblk;
  const int32_t* list = nullptr;
  if (a.dense) {
    nblk = a.n_q;
  } else {
    const int32_t* off = a.inv_off + bh * (a.n_k + 1);
    nblk = off[kj + 1] - off[kj];
    list = a.inv_rows + bh * a.n_q * a.max_k + off[kj];
  }
  auto block_of = [&](int64_t c) -> int64_t { return a.dense ? c : list[c]; };
  const T* qbase = a.qr + bh * a.L * D;
  const T* obase = a.dout + bh * a.L * D;
  auto load_q = [&](int stage, int64_t start, int valid) {
    T* qs = Qs + stage * kTile * D;
    T* os = dOs + stage * kTile * D;
    for (int e = tid; e < kTile * CH; e += blockDim.x) {
      int r = e / CH, c = e % CH;
      bool ok = r < valid;
      int64_t p = ok ? start + r : start;
      cp_async16(smem_addr(qs + swz<D>(r, c * 8)), qbase + p * D + c * 8, ok ? 16 : 0);
      cp_async16(smem_addr(os + swz<D>(r, c * 8)), obase + perm_at(perm, p) * D + c * 8, ok ? 16 : 0);
    }
    for (int r = tid; r < kTile; r += blockDim.x) {
      bool ok = r < valid;
      lse_s[stage * kTile + r] = ok ? a.lse[bh * a.L + perm_at(perm, start + r)] * 1.4426950408889634f : INFINITY;
      delta_s[stage * kTile + r] = ok ? a.delta[bh * a.L + start + r] : 0.f;
    }
  };
  auto tile = [&](int64_t cc, int64_t qq, int64_t* start, int* valid) {
    int64_t i = block_of(cc);
    *start = i * a.block_q + qq;
    *valid = static_cast<int>(imin64(kTile, imin64((i + 1) * a.block_q, a.L) - *start));
  };
  auto advance = [&](int64_t* cc, int64_t* qq) {
    int64_t i = block_of(*cc);
    *qq += kTile;
    if (i * a.block_q + *qq >= imin64((i + 1) * a.block_q, a.L)) {
      ++*cc;
      *qq = 0;
    }
  };

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
  int64_t c = 0, qt = 0, start;
  int valid = 0;
  if (nblk > 0) {
    tile(c, qt, &start, &valid);
    load_q(0, start, valid);
  }
  cp_async_commit();
  int stage = 0;
  const int krow = warp * 16;
  while (c < nblk) {
    int64_t nc = c, nqt = qt;
    advance(&nc, &nqt);
    cp_async_wait<0>();
    __syncthreads();
    if (nc < nblk) {
      tile(nc, nqt, &start, &valid);
      load_q(stage ^ 1, start, valid);
    }
    cp_async_commit();
    const T* qs = Qs + stage * kTile * D;
    const T* os = dOs + stage * kTile * D;
    const float* ls = lse_s + stage * kTile;
    const float* ds = delta_s + stage * kTile;

    float s[kTile / 8][4];
    warp_rows_by_rows<T, D, kTile>(s, Ks, krow, qs, lane);  // S^T: keys x queries
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      int col = nt * 8 + 2 * (lane & 3);
      float la = ls[col], lb = ls[col + 1];
      s[nt][0] = exp2f(fmaf(s[nt][0], a.scale_log2, -la));
      s[nt][1] = exp2f(fmaf(s[nt][1], a.scale_log2, -lb));
      s[nt][2] = exp2f(fmaf(s[nt][2], a.scale_log2, -la));
      s[nt][3] = exp2f(fmaf(s[nt][3], a.scale_log2, -lb));
    }
    warp_p_by_rows<T, D, kTile>(dv, s, os, lane);  // dV += P^T dO
    {
      float dp[kTile / 8][4];
      warp_rows_by_rows<T, D, kTile>(dp, Vs, krow, os, lane);  // dP^T = V dO^T
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt) {
        int col = nt * 8 + 2 * (lane & 3);
        float da = ds[col], db = ds[col + 1];
        s[nt][0] *= dp[nt][0] - da;
        s[nt][1] *= dp[nt][1] - db;
        s[nt][2] *= dp[nt][2] - da;
        s[nt][3] *= dp[nt][3] - db;
      }
    }
    warp_p_by_rows<T, D, kTile>(dk, s, qs, lane);  // dK += dS^T Q
    stage ^= 1;
    c = nc;
    qt = nqt;
  }
  cp_async_wait<0>();

  const int g = lane >> 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    int64_t r = key0 + krow + g + half * 8;
    if (r >= key_end) continue;
    int64_t t = perm_at(perm, r);
    T* ok_ = a.dk + (bh * a.L + t) * D;
    T* ov = a.dv + (bh * a.L + t) * D;
    const float* ek = a.extra_dk ? a.extra_dk + (bh * a.L + t) * D : nullptr;
    const float* ev = a.extra_dv ? a.extra_dv + (bh * a.L + t) * D : nullptr;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      int col = i * 8 + 2 * (lane & 3);
      store_rotated<T, D>(a.rope, ok_, ek, t, col, dk[i][2 * half] * a.scale, dk[i][2 * half + 1] * a.scale, true);
      store_rotated<T, D>(a.rope, ov, ev, t, col, dv[i][2 * half], dv[i][2 * half + 1], false);
    }
  }
}

template <class T, int D>
void launch(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  BwdArgs<T> a;
  a.qr = at<T>(ws, pl.qr);
  a.kr = at<T>(ws, pl.kr);
  a.v = static_cast<const T*>(p.v);
  a.v_sb = p.v_stride[0];
  a.v_sh = p.v_stride[1];
  a.v_st = p.v_stride[2];
  a.H = p.H;
  a.dout = static_cast<const T*>(p.do_s);
  a.lse = p.lse;
  a.delta = at<float>(ws, pl.delta);
  const bool lin = pl.linear && p.do_l;
  a.extra_dq = lin ? at<float>(ws, pl.dq_l) : nullptr;
  a.extra_dk = lin ? at<float>(ws, pl.dk_l) : nullptr;
  a.extra_dv = lin ? at<float>(ws, pl.dv_l) : nullptr;
  a.dq = static_cast<T*>(p.dq);
  a.dk = static_cast<T*>(p.dk);
  a.dv = static_cast<T*>(p.dv);
  a.idx = p.block_idx;
  a.cnt = p.block_cnt;
  a.inv_off = pl.dense ? nullptr : at<int32_t>(ws, pl.inv_off);
  a.inv_rows = pl.dense ? nullptr : at<int32_t>(ws, pl.inv_rows);
  a.rope = r;
  a.max_k = pl.max_k;
  a.L = p.L;
  a.n_q = pl.n_q;
  a.n_k = pl.n_k;
  a.block_q = p.opt.block_q;
  a.block_k = p.opt.block_k;
  a.dense = pl.dense;
  a.scale = static_cast<float>(p.softmax_scale());
  a.scale_log2 = static_cast<float>(p.softmax_scale() * 1.4426950408889634);

  const bool vec = (p.D == 64 || p.D == 128) && reinterpret_cast<uintptr_t>(p.o_s) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a.dout) % 16 == 0;
  if (vec) {
    const int64_t rows = 256 / (p.D / 8);
    delta_vec_kernel<T><<<dim3(static_cast<unsigned>((p.L + rows - 1) / rows), static_cast<unsigned>(pl.BH)), 256, 0,
                          s>>>(static_cast<const T*>(p.o_s), a.dout, at<float>(ws, pl.delta), r.perm, p.L,
                               static_cast<int>(p.D));
  } else {
    delta_kernel<T><<<dim3(static_cast<unsigned>((p.L + 7) / 8), static_cast<unsigned>(pl.BH)), 256, 0, s>>>(
        static_cast<const T*>(p.o_s), a.dout, at<float>(ws, pl.delta), r.perm, p.L, static_cast<int>(p.D));
  }
  SALAD_LAUNCH_CHECK();

  if (try_launch_attn_bwd_ds_sm90(p, pl, r, ws, s)) return;
  if (!try_launch_attn_dq_sm90(p, pl, r, ws, s)) {
    size_t smem_dq = sizeof(T) * 6 * kTile * D + sizeof(float) * 2 * kTile;
    SALAD_CUDA_CHECK(cudaFuncSetAttribute(attn_dq_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_dq)));
    a.sub = static_cast<int>((p.opt.block_q + kTile - 1) / kTile);
    attn_dq_kernel<T, D><<<dim3(static_cast<unsigned>(pl.n_q * a.sub), static_cast<unsigned>(pl.BH)),
                           kWarps * 32, smem_dq, s>>>(a);
    SALAD_LAUNCH_CHECK();
  }

  if (!try_launch_attn_dkv_sm90(p, pl, r, ws, s)) {
    size_t smem_kv = sizeof(T) * 6 * kTile * D + sizeof(float) * 4 * kTile;
    SALAD_CUDA_CHECK(cudaFuncSetAttribute(attn_dkv_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_kv)));
    a.sub = static_cast<int>((p.opt.block_k + kTile - 1) / kTile);
    attn_dkv_kernel<T, D><<<dim3(static_cast<unsigned>(pl.n_k * a.sub), static_cast<unsigned>(pl.BH)),
                            kWarps * 32, smem_kv, s>>>(a);
    SALAD_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_attn_bwd(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (p.dtype == DType::BF16) {
    if (p.D == 64) launch<__nv_bfloat16, 64>(p, pl, r, ws, s);
    else launch<__nv_bfloat16, 128>(p, pl, r, ws, s);
  } else {
    if (p.D == 64) launch<__half, 64>(p, pl, r, ws, s);
    else launch<__half, 128>(p, pl, r, ws, s);
  }
}

}  // namespace salad::cuda::detail
