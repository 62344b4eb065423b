// Block-sparse FlashAttention-2 style forward (mma.sync m16n8k16, fp32
// accumulation, online softmax over the kept key blocks only).
//
// CTA = one tile of kBM query rows inside one query block; it walks the kept
// key blocks of that query block in kBN-token tiles (a key block of block_k
// tokens is split into ceil(block_k / kBN) tiles; the last tile of a block and
// the last block of the sequence are masked, never padded with fake keys).
// Q/K come pre-rotated in block order from the workspace; V is read in place
// through the block permutation. Output and lse go to caller (raster) order.
#include "attn_fwd_sm90.cuh"
#include "internal.cuh"

namespace salad::cuda::detail {
namespace {

#ifndef SALAD_FWD_BM
#define SALAD_FWD_BM 128
#endif
constexpr int kBM = SALAD_FWD_BM;  // query rows per CTA: 16 per warp (128: 8 warps; 64: 4 warps, 2 CTAs/SM)
constexpr int kBN = 64;   // keys per tile
constexpr int kWarps = kBM / 16;

template <class T>
struct FwdArgs {
  const T* qr;
  const T* kr;
  const T* v;
  int64_t v_sb, v_sh, v_st, H;
  T* o;
  int64_t o_sb, o_sh, o_st;  // output strides (batch, head, token), Params::out_strides
  float* lse;
  const int32_t* idx;
  const int32_t* cnt;
  const int32_t* perm;
  int64_t max_k, L, n_q, n_k, block_q, block_k;
  int sub_q;
  bool dense;
  float scale, scale_log2;
};

template <class T, int D>
__global__ void __launch_bounds__(kWarps * 32, kBM == 64 ? 2 : 1) attn_fwd_kernel(FwdArgs<T> a) {
  static_assert(D % 16 == 0 && D <= 256, "head width must be a multiple of 16");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kBM * D;     // [2][kBN * D]
  T* Vs = Ks + 2 * kBN * D; // [2][kBN * D]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t qi = blockIdx.x / a.sub_q, sub = blockIdx.x % a.sub_q;
  const int64_t row0 = qi * a.block_q + sub * kBM;
  const int64_t row_end = min(min(row0 + kBM, (qi + 1) * a.block_q), a.L);
  if (row0 >= row_end) return;

  constexpr int CH = D / 8;  // 16-byte chunks per row
  // ---- Q tile
  const T* qbase = a.qr + bh * a.L * D;
  for (int e = tid; e < kBM * CH; e += blockDim.x) {
    int r = e / CH, c = e % CH;
    int64_t gr = row0 + r;
    bool ok = gr < row_end;
    cp_async16(smem_addr(Qs + swz<D>(r, c * 8)), qbase + (ok ? gr : row0) * D + c * 8, ok ? 16 : 0);
  }

  const int64_t nblk = a.dense ? a.n_k : a.cnt[bh * a.n_q + qi];
  const int32_t* list = a.dense ? nullptr : a.idx + (bh * a.n_q + qi) * a.max_k;
  const T* kbase = a.kr + bh * a.L * D;
  const T* vbase = a.v + b * a.v_sb + h * a.v_sh;

  // Tile cursor: kept block c, offset kt inside the block.
  auto tile_start = [&](int64_t c, int64_t kt, int64_t* start, int* valid) {
    int64_t j = a.dense ? c : list[c];
    int64_t s0 = j * a.block_k + kt;
    int64_t end = min((j + 1) * a.block_k, a.L);
    *start = s0;
    *valid = static_cast<int>(imin64(kBN, end - s0));
  };
  auto advance = [&](int64_t* c, int64_t* kt) {
    int64_t j = a.dense ? *c : list[*c];
    *kt += kBN;
    if (j * a.block_k + *kt >= min((j + 1) * a.block_k, a.L)) {
      ++*c;
      *kt = 0;
    }
  };
  auto load_kv = [&](int stage, int64_t start, int valid) {
    T* ks = Ks + stage * kBN * D;
    T* vs = Vs + stage * kBN * D;
    for (int e = tid; e < kBN * CH; e += blockDim.x) {
      int r = e / CH, c = e % CH;
      bool ok = r < valid;
      int64_t p = ok ? start + r : start;
      cp_async16(smem_addr(ks + swz<D>(r, c * 8)), kbase + p * D + c * 8, ok ? 16 : 0);
      int64_t t = perm_at(a.perm, p);
      cp_async16(smem_addr(vs + swz<D>(r, c * 8)), vbase + t * a.v_st + c * 8, ok ? 16 : 0);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  int64_t c = 0, kt = 0;
  int64_t start;
  int valid;
  if (nblk > 0) {
    tile_start(c, kt, &start, &valid);
    load_kv(0, start, valid);
  }
  cp_async_commit();
  int stage = 0;
  const int qrow = warp * 16;
  while (c < nblk) {
    int cur_valid = valid;
    int64_t nc = c, nkt = kt;
    advance(&nc, &nkt);
    cp_async_wait<0>();
    __syncthreads();
    if (nc < nblk) {
      tile_start(nc, nkt, &start, &valid);
      load_kv(stage ^ 1, start, valid);
    }
    cp_async_commit();

    const T* ks = Ks + stage * kBN * D;
    const T* vs = Vs + stage * kBN * D;
    // ---- S = Q K^T
    float s[kBN / 8][4];
    warp_rows_by_rows<T, D, kBN>(s, Qs, qrow, ks, lane);
    // ---- mask + online softmax (rows g and g + 8 of the warp's 16)
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      int col = nt * 8 + 2 * (lane & 3);
      if (col >= cur_valid) s[nt][0] = s[nt][2] = -INFINITY;
      if (col + 1 >= cur_valid) s[nt][1] = s[nt][3] = -INFINITY;
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    float corr0 = exp2f((m0 - mn0) * a.scale_log2), corr1 = exp2f((m1 - mn1) * a.scale_log2);
    m0 = mn0;
    m1 = mn1;
    const float sub0 = mn0 * a.scale_log2, sub1 = mn1 * a.scale_log2;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      s[nt][0] = exp2f(fmaf(s[nt][0], a.scale_log2, -sub0));
      s[nt][1] = exp2f(fmaf(s[nt][1], a.scale_log2, -sub0));
      s[nt][2] = exp2f(fmaf(s[nt][2], a.scale_log2, -sub1));
      s[nt][3] = exp2f(fmaf(s[nt][3], a.scale_log2, -sub1));
      rs0 += s[nt][0] + s[nt][1];
      rs1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * corr0 + rs0;
    l1 = l1 * corr1 + rs1;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= corr0;
      o[i][1] *= corr0;
      o[i][2] *= corr1;
      o[i][3] *= corr1;
    }
    // ---- O += P V
    warp_p_by_rows<T, D, kBN>(o, s, vs, lane);
    stage ^= 1;
    c = nc;
    kt = nkt;
  }
  cp_async_wait<0>();

  // ---- epilogue: normalise, scatter rows back to caller order
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const int g = lane >> 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    int64_t r = row0 + qrow + g + half * 8;
    if (r >= row_end) continue;
    float l = half ? l1 : l0, m = half ? m1 : m0;
    float inv = l > 0.f ? 1.f / l : 0.f;
    int64_t t = perm_at(a.perm, r);
    T* out = a.o + b * a.o_sb + h * a.o_sh + t * a.o_st;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      int col = i * 8 + 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(out + col) =
          Elem<T>::pack(o[i][2 * half] * inv, o[i][2 * half + 1] * inv);
    }
    if ((lane & 3) == 0) a.lse[bh * a.L + t] = l > 0.f ? m * a.scale + logf(l) : INFINITY;
  }
}

template <class T, int D>
void launch(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  FwdArgs<T> a;
  a.qr = at<T>(ws, pl.qr);
  a.kr = at<T>(ws, pl.kr);
  a.v = static_cast<const T*>(p.v);
  a.v_sb = p.v_stride[0];
  a.v_sh = p.v_stride[1];
  a.v_st = p.v_stride[2];
  a.H = p.H;
  a.o = static_cast<T*>(p.o_s);
  const std::array<int64_t, 3> os = p.out_strides();
  a.o_sb = os[0], a.o_sh = os[1], a.o_st = os[2];
  a.lse = p.lse;
  a.idx = p.block_idx;
  a.cnt = p.block_cnt;
  a.perm = r.perm;
  a.max_k = pl.max_k;
  a.L = p.L;
  a.n_q = pl.n_q;
  a.n_k = pl.n_k;
  a.block_q = p.opt.block_q;
  a.block_k = p.opt.block_k;
  a.sub_q = static_cast<int>((p.opt.block_q + kBM - 1) / kBM);
  a.dense = pl.dense;
  a.scale = static_cast<float>(p.softmax_scale());
  a.scale_log2 = static_cast<float>(p.softmax_scale() * 1.4426950408889634);
  size_t smem = sizeof(T) * (kBM + 4 * kBN) * D;
  SALAD_CUDA_CHECK(cudaFuncSetAttribute(attn_fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  dim3 grid(static_cast<unsigned>(pl.n_q * a.sub_q), static_cast<unsigned>(pl.BH));
  attn_fwd_kernel<T, D><<<grid, kWarps * 32, smem, s>>>(a);
  SALAD_LAUNCH_CHECK();
}

}  // namespace

void launch_attn_fwd(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  // Hopper wgmma/TMA kernel where it applies (attn_fwd_sm90.cu); SALAD_FWD_KERNEL=mma forces this one.
  if (try_launch_attn_fwd_sm90(p, pl, r, ws, s)) return;
  if (p.dtype == DType::BF16) {
    if (p.D == 64) launch<__nv_bfloat16, 64>(p, pl, r, ws, s);
    else launch<__nv_bfloat16, 128>(p, pl, r, ws, s);
  } else {
    if (p.D == 64) launch<__half, 64>(p, pl, r, ws, s);
    else launch<__half, 128>(p, pl, r, ws, s);
  }
}

}  // namespace salad::cuda::detail
