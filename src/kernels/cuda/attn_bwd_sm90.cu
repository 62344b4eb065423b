// Hopper-native (sm_90a) block-sparse FlashAttention backward: two kernels,
// each owning its outputs (no atomics, deterministic), both warp-specialised
// like attn_fwd_sm90.cu: a producer warpgroup (one thread issues every TMA
// load into 128-byte-swizzled shared memory on mbarriers) and two consumer
// warpgroups of 64 rows each (setmaxnreg 40 / 232 in dq, 24 / 240 in dkv,
// whose consumers hold dK and dV: 128 accumulator registers at D 128).
//
// dq kernel: work item = (b*h, 128-row part of a query block), head-major,
//   persistent CTAs. Q and dO (128 x D) are loaded once per item; the producer
//   streams K and V tiles (64 keys) of the item's kept key blocks
//   (p.block_idx / p.block_cnt, or all blocks in mode dense) through a
//   kStages ring. Per tile, each consumer warpgroup (64 query rows):
//     S = Q K^T, dP = dO V^T        wgmma m64n64k16, A and B from shared memory
//     P = exp2(S * scale*log2e - lse*log2e), dS = P * (dP - delta)  (registers)
//     dQ += dS K                    wgmma m64nDk16, A = dS from registers,
//                                   B = K through the "MN-major" descriptor
//   with S/dP of tile t issued together with dQ += dS_{t-1} K_{t-1} and the
//   dS of tile t computed while that dQ runs (the forward's intra-warpgroup
//   overlap). The producer loads the next item's first K/V tiles before its
//   Q/dO (which wait until the consumers are done with the current ones).
//   Epilogue: dq = R^T (scale * dQ) (+ the linear branch's fp32 dq), stored
//   straight from the accumulators, caller order.
//   TN = 128 (opt-in, SALAD_BWD_DQ_TILE=128): K/V tiles of 128 keys gathered
//   from two 64-key halves (the forward's scheme), S / dP m64n128, dS in two
//   64-key halves with the first half's dQ running while the second is computed;
//   see DqSmem.
// dkv kernel: work item = (b*h, 128-key span), one CTA per item (hardware
//   scheduling balances the very uneven inverse lists; persistent optional).
//   Consumer warpgroup w owns keys key0 + 64w .. + 63, which lie in one key
//   block (block_k % 64 == 0); K and V of the span stay in shared memory.
//   The producer walks the ascending union of the two warpgroups' inverse
//   lists (query blocks that kept the key block, launch_invert), streaming
//   Q and dO tiles (64 queries) plus the tile's lse and delta (1-D TMA) once
//   for both; a warpgroup whose key block the query block did not keep skips
//   the tile. Per tile and warpgroup (64 keys):
//     S^T = K Q^T, dP^T = V dO^T    wgmma m64n64k16, A and B from shared memory
//     P^T = exp2(S^T * scale*log2e - lse_col*log2e) (0 past the query block)
//     dS^T = P^T * (dP^T - delta_col)
//     dV += P^T dO, dK += dS^T Q    wgmma m64nDk16, A from registers, B = dO / Q
//                                   through the MN-major descriptor
//   dK and dV (64 + 64 registers at D 128) stay in registers for the item.
//   Within a warpgroup the exp2s of P^T overlap the dP^T wgmmas (and, with
//   SALAD_BWD_DKV_OVERLAP=2, dS^T overlaps dV += P^T dO); the two consumer
//   warpgroups overlap each other.
//   Epilogue: dk = R^T (scale * dK), dv = dV (+ the linear branch's fp32
//   gradients), caller order.
// dkv, split-query layout (SPLIT, the default when block_k is not a multiple
//   of 128, e.g. the default 64): two adjacent 64-key tiles then usually lie in
//   different key blocks, whose inverse lists differ, and the span layout leaves
//   one warpgroup idle on most tiles. Instead a work item is one 64-key tile;
//   both warpgroups hold its K / V and take the two 64-row halves of each
//   128-row Q / dO stage (2 stages); at the end warpgroup 1 hands its partial dK
//   to warpgroup 0 and warpgroup 0 its partial dV to warpgroup 1 through shared
//   memory (fixed order), and each writes one. Measured at Wan1.3B-480p (H100, ncu, before the
//   epilogue fix): 3.81 ms against the span layout's 3.93 ms.
// stored dS (the default where the split layout is, not in mode dense; attn_dq_ds_sm90_kernel): the
//   split dkv kernel also writes every kept pair's dS (bf16, in the dQ GEMM's A-fragment order,
//   through shared memory and a bulk store), and a third kernel forms dQ from it with one GEMM per
//   pair instead of the dq kernel's three. dq is the dq kernel's bit for bit (same products, same
//   order). The scratch is 16 KB per kept (128-query, 64-key) pair, keep * L^2 * 2 bytes per head:
//   capped by SALAD_BWD_DS_MB (default 4096), heads run in groups under it, and a call whose one head
//   passes it keeps the two kernels. (A 16384 MB cap, 3 groups instead of 14 at Wan14B-720p, measured
//   the backward 2-3% faster there: session 18.)
//   Measured at Wan1.3B-480p (H200, session 17): dq 1,589-1,615 -> 872-886 us, dkv 2,353-2,372 ->
//   2,728-2,750 us (the stores; per-warp stores without the warpgroup barrier measured the same).
//   Session 18: the staging moved before the dV / dK GEMMs' issue and into fragment order (movmatrix,
//   then 16-byte shared stores; the dQ kernel's A operand from registers), with L2 hints: dkv
//   2,885 -> 2,700 us, dq 869 -> 800-816 us (one card, ncu); 7 stages in dq instead of 6: -2%.
// Same semantics as attn_bwd.cu's mma.sync kernels (delta from its
// delta_kernel, which still runs first).
//
// Limits (else launch_attn_bwd keeps the mma.sync kernels): bf16/fp16, D 64 or
// 128, block_k a multiple of 64 (any block_q), raster token order (V and dO
// are read in place by TMA), compute capability 9.0, block lists ascending
// (as select/invert produce them), 16-byte aligned lse (dkv).
// env SALAD_BWD_DQ_TILE=64|128 picks the dq key tile;
// SALAD_BWD_KERNEL=mma forces both mma.sync kernels, SALAD_BWD_DQ=mma /
// SALAD_BWD_DKV=mma one of them; SALAD_BWD_DQ_PERSISTENT=0 launches one dq CTA
// per work item, SALAD_BWD_DKV_PERSISTENT=1 makes dkv persistent;
// SALAD_BWD_SM90_GRID=N caps a persistent grid (testing);
// SALAD_BWD_DKV_OVERLAP=0|1|2 picks the dkv tile schedule (default 1, see above;
// 0 = no intra-warpgroup overlap, the simplest); SALAD_BWD_DS=0 turns the stored dS off.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attn_bwd_sm90.cuh"
#include "sm90_common.cuh"

namespace salad::cuda::detail {
namespace {
using namespace sm90;

constexpr int kRows = 128;  // rows of a work item: query rows (dq) or key rows (dkv); 2 warpgroups x 64
constexpr int kTn = 64;     // streamed tile: keys (dq) or queries (dkv)
#ifndef SALAD_BWD_SM90_STAGES
#define SALAD_BWD_SM90_STAGES 4
#endif
constexpr int kStages = SALAD_BWD_SM90_STAGES;
constexpr int kThreads = 384;  // warpgroup 0: producer; 1, 2: consumers
constexpr float kLog2e = 1.4426950408889634f;

struct BwdSm90Args {
  void* out0;           // dq (dq kernel) or dk (dkv kernel), caller order
  void* out1;           // dv (dkv kernel)
  const float* extra0;  // the linear branch's fp32 gradients (caller order) or null
  const float* extra1;
  const float* lse;     // (BH, L), natural log, caller order (= block order: raster only)
  const float* delta;   // (BH, L), block order
  const int32_t* idx;
  const int32_t* cnt;
  const int32_t* inv_off;
  const int32_t* inv_rows;
  RopeInfo rope;
  int64_t L, H, n_q, n_k, max_k, block_q, block_k;
  int sub_q;            // dq: 128-row parts per query block
  int tiles_per_block;  // dq: block_k / 64
  int tiles_last;       // dq: 64-key tiles of the last key block (it may be short)
  int n_span;           // dkv: 128-key spans per (b, h)
  int dense;
  int num_work;
  float scale, scale_log2;
  // The producer asks L2 for the item's extra rows once it has issued the item's last loads, so
  // the epilogue reads them from L2 (SALAD_BWD_PREFETCH=0: off).
  int prefetch_extra;
  // Stored dS (see attn_dq_ds_sm90_kernel): heads [bh0, bh0 + group) of this launch; scratch `ds` of
  // 16 KB slots (64 keys x 128 queries, two 64-query halves in fragment order), slot
  // ((bh - bh0) * ds_pairs + inverse-list position) * ds_per_pair + key tile * sub_q + query part;
  // ds_pos (bh, i, c): the inverse-list position of query block i in the list of its c-th kept block.
  int bh0;
  void* ds;
  const int32_t* ds_pos;
  int64_t ds_pairs;  // n_q * max_k
  int ds_per_pair;   // 64-key tiles per key block x 128-row parts per query block
  int ds_hint;       // dS stored and loaded evict-first, K loaded evict-last in L2 (SALAD_BWD_DS_HINT=0: off)
};

// %laneid read afresh (volatile): keeps `lane` from being held, or spilled, across the tile loops.
__device__ __forceinline__ uint32_t lane_now() {
  uint32_t l;
  asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(l));
  return l;
}

__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
// Named barrier 1 over the two consumer warpgroups (256 threads; the producer never joins).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

__device__ __forceinline__ float2 ld_shared_f2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}

// One accumulator row of a gradient (this thread's D / 4 columns col = 8 c + 2 tq4 of row t;
// x[4 c + 2 half], x[4 c + 2 half + 1] of an m64nD fragment): rotate back (R^T), scale, add the
// fp32 extra, store (attn_bwd.cu's store_rotated, 32-bit index math). Every load (rope table,
// extra) is issued before the first store: with a load between stores per pair (pointers that
// may alias), each pair waited a full L2 round trip, and ncu put ~29% of the dK/dV kernel's
// warp samples in that epilogue.
template <class T, int D>
__device__ __forceinline__ void store_row(const RopeInfo& r, T* __restrict__ out, const float* __restrict__ extra,
                                          int t, int tq4, const float* x, int half, float scale, bool rotate) {
  constexpr int NC = D / 8, NB = 4;  // column pairs per thread, pairs per batch of loads
  const float2 *rf = nullptr, *rh = nullptr, *rw = nullptr;
  if (rotate) {
    const int gw = static_cast<int>(r.gw), gh = static_cast<int>(r.gh), gf = static_cast<int>(r.gf);
    const int tw = t / gw, w = t - tw * gw, hgt = tw % gh, f = tw / gh;
    rf = r.table + f * (D / 2);
    rh = r.table + (gf + hgt) * (D / 2);
    rw = r.table + (gf + gh + w) * (D / 2);
  }
#pragma unroll
  for (int c0 = 0; c0 < NC; c0 += NB) {
    float2 cs[NB], e[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int m = 4 * (c0 + j) + tq4;
      if (rotate) cs[j] = __ldg((m < r.pf ? rf : (m < r.pf + r.ph ? rh : rw)) + m);
      if (extra) e[j] = __ldg(reinterpret_cast<const float2*>(extra + 8 * (c0 + j) + 2 * tq4));
    }
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int c = c0 + j;
      float x0 = x[4 * c + 2 * half] * scale, x1 = x[4 * c + 2 * half + 1] * scale;
      if (rotate) {
        const float y0 = x0 * cs[j].x + x1 * cs[j].y, y1 = -x0 * cs[j].y + x1 * cs[j].x;
        x0 = y0;
        x1 = y1;
      }
      if (extra) {
        x0 += e[j].x;
        x1 += e[j].y;
      }
      *reinterpret_cast<uint32_t*>(out + 8 * c + 2 * tq4) = Elem<T>::pack(x0, x1);
    }
  }
}

// The dq kernels' epilogue: dq = R^T (scale * dQ) (+ extra) of this thread's rows r0 and r0 + 8 (those
// below row_end), straight from the accumulators.
template <class T, int D>
__device__ __forceinline__ void store_dq(const BwdSm90Args& a, int L, int bh, int r0, int row_end, int tq4,
                                         const float* dq) {
  T* out = static_cast<T*>(a.out0);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + half * 8;
    if (r >= row_end) continue;
    const int64_t o = (static_cast<int64_t>(bh) * L + r) * D;
    store_row<T, D>(a.rope, out + o, a.extra0 ? a.extra0 + o : nullptr, r, tq4, dq, half, a.scale, true);
  }
}

// ================================================================== dQ
// Shared memory (1024-byte aligned): Q and dO [D/64][128 rows][128 B], K and V
// stages [kSt][D/64][TN rows][128 B] (TMA 128-byte swizzle), mbarriers.
// TN = 128: a key tile gathers two 64-key halves, each from its own kept block (a missing
// second half is loaded past the end of the sequence, which TMA fills with zeros), as in the
// forward. Per tile and warpgroup S and dP are m64n128 (SS) and dQ += dS K runs over 128 keys,
// so each operand byte read from shared memory feeds more FLOPs: with 64-key tiles the two
// m64n64 SS GEMMs read 4 KB of shared memory per 131 kFLOP, which at ~128 B/clk per SM is
// as long as the tensor cores take for them (no headroom); with 128 keys, 6 KB per 262 kFLOP.
// S, dP and dQ take 192 registers, so there is no second dS register set for the 64-key
// kernel's overlap; dS is computed in two 64-key halves instead, the first half's dQ GEMM
// running while the second is computed. (Without that overlap the 128-key kernel took 2.13 ms
// against the 64-key kernel's 2.04 ms, H200, session 6.)
template <int D, int TN>
struct DqSmem {
  static constexpr int kSt = (TN == 128 && D == 128) ? 2 : kStages;  // K/V stages (227 KB)
  static constexpr int kQ = kRows * D * 2;
  static constexpr int kTile = TN * D * 2;
  static constexpr int kSub = TN * 128;  // one TN-row x 128-byte sub-tile
  static constexpr int kHalf = 64 * 128;  // one 64-row part of a sub-tile
  static constexpr int kO = kQ;
  static constexpr int kK = 2 * kQ;
  static constexpr int kV = kK + kSt * kTile;
  static constexpr int kBar = kV + kSt * kTile;
  static constexpr int kBytes = kBar + 8 * (3 * kSt + 2);
  static constexpr int kAlloc = kBytes + 1024;  // slack for aligning the dynamic base
};

template <class T, int D, int TN>
__global__ void __launch_bounds__(kThreads, 1)
    attn_dq_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tdo,
                        const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                        const BwdSm90Args a) {
  static_assert(D == 64 || D == 128, "head width 64 or 128");
  static_assert(TN == 64 || TN == 128, "key tile of 64 or 128");
  using S = DqSmem<D, TN>;
  constexpr int NH = D / 64;
  constexpr int ST = S::kSt;
  constexpr int HT = TN / 64;  // 64-key halves per tile
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base, sO = base + S::kO, sK = base + S::kK, sV = base + S::kV, sBar = base + S::kBar;
  auto fullK = [&](int s) { return sBar + 8u * s; };
  auto fullV = [&](int s) { return sBar + 8u * (ST + s); };
  auto empty = [&](int s) { return sBar + 8u * (2 * ST + s); };
  const uint32_t barQ = sBar + 8u * (3 * ST);          // Q and dO of the item landed
  const uint32_t barQfree = sBar + 8u * (3 * ST + 1);  // all consumer warps done with them

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Work item w = (bh, query block, 128-row part), w = blockIdx.x + k * gridDim.x. Producer and
  // consumers walk the same items; tile and item counters run on across items.
  // 32-bit index math throughout (L * BH < 2^31, checked on the host).
  struct Item {
    int bh, row0, row_end;
    const int32_t* list;
    int nhalf, ntiles;  // 64-key halves, TN-key tiles
  };
  const int L = static_cast<int>(a.L), n_q = static_cast<int>(a.n_q), n_k = static_cast<int>(a.n_k);
  const int block_q = static_cast<int>(a.block_q), block_k = static_cast<int>(a.block_k);
  const int per_bh = n_q * a.sub_q;
  auto item = [&](int w) {
    Item it;
    it.bh = w / per_bh;
    const int x = w - it.bh * per_bh, qi = x / a.sub_q, sub = x - qi * a.sub_q;
    it.row0 = qi * block_q + sub * kRows;
    it.row_end = min(min(it.row0 + kRows, (qi + 1) * block_q), L);
    const int nblk = it.row0 >= it.row_end ? 0 : (a.dense ? n_k : a.cnt[it.bh * n_q + qi]);
    it.list = a.dense ? nullptr : a.idx + (static_cast<int64_t>(it.bh) * n_q + qi) * a.max_k;
    it.nhalf = nblk * a.tiles_per_block;
    // Only the last key block can be short, and an ascending list has it last.
    if (nblk > 0 && (a.dense ? n_k - 1 : it.list[nblk - 1]) == n_k - 1) it.nhalf -= a.tiles_per_block - a.tiles_last;
    it.ntiles = HT == 1 ? it.nhalf : (it.nhalf + HT - 1) / HT;
    return it;
  };
  auto key_start = [&](const Item& it, int u) {  // first key of 64-key half u
    const int c = u / a.tiles_per_block, kt = u - c * a.tiles_per_block;
    const int j = a.dense ? c : it.list[c];
    return j * block_k + kt * 64;
  };

  if (tid == 0) {
    for (int s = 0; s < ST; ++s) {
      mbar_init(fullK(s), 1);
      mbar_init(fullV(s), 1);
      mbar_init(empty(s), 8);  // one arrival per consumer warp
    }
    mbar_init(barQ, 1);
    mbar_init(barQfree, 8);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // ================= producer warpgroup: one thread issues every TMA load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 0 && lane == 0) {
      tma_prefetch(&tq);
      tma_prefetch(&tdo);
      tma_prefetch(&tk);
      tma_prefetch(&tv);
      int gt = 0, n = 0;  // tiles / items issued so far
      for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
        const Item it = item(w);
        if (it.row0 >= it.row_end) continue;
        const int bh = it.bh, H = static_cast<int>(a.H);
        const int b = bh / H, h = bh - b * H;
        auto load_kv = [&](int t) {
          const int u = gt + t, s = u % ST;
          mbar_wait(empty(s), ((u / ST) & 1) ^ 1);
          int rows[HT];  // first key of each half; a missing half past the end (TMA fills zeros)
          if constexpr (HT == 1) {
            rows[0] = key_start(it, t);
          } else {
#pragma unroll
            for (int x = 0; x < HT; ++x) rows[x] = t * HT + x < it.nhalf ? key_start(it, t * HT + x) : L;
          }
          mbar_expect_tx(fullK(s), S::kTile);
#pragma unroll
          for (int x = 0; x < HT; ++x)
#pragma unroll
            for (int hh = 0; hh < NH; ++hh)
              tma_load_3d(sK + s * S::kTile + hh * S::kSub + x * S::kHalf, &tk, hh * 64, rows[x], bh, fullK(s));
          mbar_expect_tx(fullV(s), S::kTile);
#pragma unroll
          for (int x = 0; x < HT; ++x)
#pragma unroll
            for (int hh = 0; hh < NH; ++hh)
              tma_load_4d(sV + s * S::kTile + hh * S::kSub + x * S::kHalf, &tv, hh * 64, rows[x], h, b, fullV(s));
        };
        // The first ST tiles only wait for slots of earlier items: issue them before this
        // item's Q/dO, which wait until the consumers are done with the previous item.
        const int pre = it.ntiles < ST ? it.ntiles : ST;
        for (int t = 0; t < pre; ++t) load_kv(t);
        mbar_wait(barQfree, (n & 1) ^ 1);
        const int nbox = it.row0 + 64 < it.row_end ? 2 : 1;  // rows past the item are not needed
        mbar_expect_tx(barQ, 2 * nbox * NH * 64 * 128);
#pragma unroll
        for (int hh = 0; hh < NH; ++hh)
          for (int r = 0; r < nbox; ++r) {
            const int row = it.row0 + r * 64;
            tma_load_3d(sQ + hh * (kRows * 128) + r * (64 * 128), &tq, hh * 64, row, bh, barQ);
            tma_load_3d(sO + hh * (kRows * 128) + r * (64 * 128), &tdo, hh * 64, row, bh, barQ);
          }
        for (int t = pre; t < it.ntiles; ++t) load_kv(t);
        if (a.extra0 && a.prefetch_extra)
          l2_prefetch(a.extra0 + (static_cast<int64_t>(bh) * L + it.row0) * D,
                      static_cast<uint32_t>((it.row_end - it.row0) * D * 4));
        gt += it.ntiles;
        ++n;
      }
    }
  } else {
    // ================= consumer warpgroups
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = warp - 4;   // consumer warp 0..7
    const int wg = cw / 4;     // consumer warpgroup: CTA rows 64 wg .. 64 wg + 63
    const int wrow = cw * 16;  // first CTA row of this warp (rows wrow + g, wrow + g + 8)
    const int g = lane >> 2, tq4 = lane & 3;
    const float sl2 = a.scale_log2;

    float dq[D / 2];
    float sacc[TN / 2], dpacc[TN / 2];
    uint32_t dsa[TN / 16][4], dsb[TN == 64 ? TN / 16 : 1][4];
    float lse0 = 0.f, lse1 = 0.f, dl0 = 0.f, dl1 = 0.f;  // this thread's two rows, lse in log2 units

    auto issue_sdp = [&](int s) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t aoff = (kk / 4) * (kRows * 128) + wg * (64 * 128) + (kk % 4) * 32;
        const uint32_t boff = s * S::kTile + (kk / 4) * S::kSub + (kk % 4) * 32;
        wgmma_ss<T, TN>(sacc, desc_sw128(sQ + aoff, 16, 1024), desc_sw128(sK + boff, 16, 1024), kk > 0);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t aoff = (kk / 4) * (kRows * 128) + wg * (64 * 128) + (kk % 4) * 32;
        const uint32_t boff = s * S::kTile + (kk / 4) * S::kSub + (kk % 4) * 32;
        wgmma_ss<T, TN>(dpacc, desc_sw128(sO + aoff, 16, 1024), desc_sw128(sV + boff, 16, 1024), kk > 0);
      }
    };
    // dQ += dS K over the tile's key k-steps [k0, k1) (16 keys each).
    auto issue_dq_k = [&](int s, uint32_t (*ds)[4], int k0, int k1) {
#pragma unroll
      for (int kk = k0; kk < k1; ++kk) {
        const uint32_t addr = sK + s * S::kTile + kk * 16 * 128;
        wgmma_rs<T, D, 1>(dq, ds[kk], desc_sw128(addr, S::kSub, 1024), 1);
      }
    };
    auto issue_dq = [&](int s, uint32_t (*ds)[4]) { issue_dq_k(s, ds, 0, TN / 16); };
    // dS of the tile's key columns [8 n0, 8 n1) in sacc / dpacc (this thread: rows g, g + 8 of the
    // warp) into ds (A fragments).
    auto compute_ds_n = [&](int valid, uint32_t (*ds)[4], int n0, int n1) {
#pragma unroll
      for (int nt = n0; nt < n1; ++nt) {
        const int col = nt * 8 + 2 * tq4;
        const bool v0 = col < valid, v1 = col + 1 < valid;
        const float p0 = v0 ? ex2(fmaf(sacc[4 * nt], sl2, -lse0)) : 0.f;
        const float p1 = v1 ? ex2(fmaf(sacc[4 * nt + 1], sl2, -lse0)) : 0.f;
        const float p2 = v0 ? ex2(fmaf(sacc[4 * nt + 2], sl2, -lse1)) : 0.f;
        const float p3 = v1 ? ex2(fmaf(sacc[4 * nt + 3], sl2, -lse1)) : 0.f;
        // A fragment of m64k16 chunk nt / 2: a0/a1 from the even n8 chunk, a2/a3 from the odd one.
        ds[nt / 2][(nt & 1) * 2 + 0] = Elem<T>::pack(p0 * (dpacc[4 * nt] - dl0), p1 * (dpacc[4 * nt + 1] - dl0));
        ds[nt / 2][(nt & 1) * 2 + 1] =
            Elem<T>::pack(p2 * (dpacc[4 * nt + 2] - dl1), p3 * (dpacc[4 * nt + 3] - dl1));
      }
    };
    auto compute_ds = [&](int valid, uint32_t (*ds)[4]) { compute_ds_n(valid, ds, 0, TN / 8); };
    auto release = [&](int s) {
      if (lane == 0) mbar_arrive(empty(s));
    };

    int gt = 0, n = 0;  // tiles / items consumed so far (same sequence as the producer)
    for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
      const Item it = item(w);
      if (it.row0 >= it.row_end) continue;
      const int ntiles = it.ntiles;
      // Only the item's last half can be short (the last key block is last in an ascending list);
      // the valid keys of a tile are a prefix of it (a short half is the last one).
      const int nhalf = it.nhalf;
      const int last_valid = nhalf > 0 ? min(64, L - key_start(it, nhalf - 1)) : 64;
      auto valid_at = [&](int t) {
        if constexpr (HT == 1) return t == ntiles - 1 ? last_valid : 64;
        int v = 0;
#pragma unroll
        for (int x = 0; x < HT; ++x) {
          const int u = t * HT + x;
          v += u >= nhalf ? 0 : (u == nhalf - 1 ? last_valid : 64);
        }
        return v;
      };
      {
        // Rows past the item: P = 0 (their dQ is not stored; rows never mix).
        const int r0 = it.row0 + wrow + g, r1 = r0 + 8, o = it.bh * L;
        lse0 = r0 < it.row_end ? a.lse[o + r0] * kLog2e : INFINITY;
        lse1 = r1 < it.row_end ? a.lse[o + r1] * kLog2e : INFINITY;
        dl0 = r0 < it.row_end ? a.delta[o + r0] : 0.f;
        dl1 = r1 < it.row_end ? a.delta[o + r1] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
      mbar_wait(barQ, n & 1);

      if (it.row0 + 64 * wg >= it.row_end) {
        // No rows of this item for this warpgroup (short last query block, block_q <= 64):
        // keep the stage phases in step without computing.
        for (int t = 0; t < ntiles; ++t) {
          const int u = gt + t, s = u % ST;
          mbar_wait(fullK(s), (u / ST) & 1);
          mbar_wait(fullV(s), (u / ST) & 1);
          __syncwarp();
          release(s);
        }
        gt += ntiles;
      } else if (ntiles > 0) {
        if constexpr (TN == 128) {
          // Per tile: S and dP; dS of keys 0-63 and their dQ += dS K issued; dS of keys 64-127
          // computed while that runs (ptxas interleaves the exp2s with the first half's wgmmas), then
          // their dQ; the stage is released once dQ is done. The halves share one dS register set.
          // (Repeats the 64-key path's first-tile steps: helpers shared with it compiled to another
          // register allocation than the one tested on the H200. Restructuring the loop -- S / dP
          // issued at the end of the previous tile -- made ptxas spill 200-330 B and serialise the
          // wgmmas for lack of registers.)
          for (int t = 0; t < ntiles; ++t) {
            const int u = gt + t, s = u % ST;
            mbar_wait(fullK(s), (u / ST) & 1);
            mbar_wait(fullV(s), (u / ST) & 1);
            fence_regs<TN / 2>(sacc);
            fence_regs<TN / 2>(dpacc);
            wgmma_fence();
            issue_sdp(s);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<TN / 2>(sacc);
            fence_regs<TN / 2>(dpacc);
            compute_ds_n(valid_at(t), dsa, 0, TN / 16);
            fence_regs<D / 2>(dq);
            fence_regs_u<TN / 8>(&dsa[0][0]);
            wgmma_fence();
            issue_dq_k(s, dsa, 0, TN / 32);
            wgmma_commit();
            compute_ds_n(valid_at(t), dsa, TN / 16, TN / 8);
            fence_regs_u<TN / 8>(&dsa[TN / 32][0]);
            wgmma_fence();
            issue_dq_k(s, dsa, TN / 32, TN / 16);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<D / 2>(dq);
            fence_regs_u<TN / 4>(&dsa[0][0]);
            release(s);
          }
          gt += ntiles;
        } else {
          {
            const int s0 = gt % ST;
            mbar_wait(fullK(s0), (gt / ST) & 1);
            mbar_wait(fullV(s0), (gt / ST) & 1);
            fence_regs<TN / 2>(sacc);
            fence_regs<TN / 2>(dpacc);
            wgmma_fence();
            issue_sdp(s0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<TN / 2>(sacc);
            fence_regs<TN / 2>(dpacc);
            compute_ds(valid_at(0), dsa);
          }
          // Tile t: S_t / dP_t and dQ += dS_{t-1} K_{t-1} in flight together, dS_t computed while
          // the latter runs. dS alternates between two register sets.
          auto step = [&](int t, uint32_t (*pin)[4], uint32_t (*pout)[4]) {
            const int u = gt + t;
            const int s = u % ST, ps = (u - 1) % ST;
            mbar_wait(fullK(s), (u / ST) & 1);
            mbar_wait(fullV(s), (u / ST) & 1);
            fence_regs<D / 2>(dq);
            fence_regs<TN / 2>(sacc);
            fence_regs<TN / 2>(dpacc);
            fence_regs_u<TN / 4>(&pin[0][0]);
            wgmma_fence();
            issue_sdp(s);
            wgmma_commit();
            issue_dq(ps, pin);
            wgmma_commit();
            wgmma_wait<1>();
            fence_regs<TN / 2>(sacc);
            fence_regs<TN / 2>(dpacc);
            compute_ds(valid_at(t), pout);
            wgmma_wait<0>();
            fence_regs<D / 2>(dq);
            fence_regs_u<TN / 4>(&pin[0][0]);
            release(ps);
          };
          int t = 1;
          for (; t + 1 < ntiles; t += 2) {
            step(t, dsa, dsb);
            step(t + 1, dsb, dsa);
          }
          const bool odd_tail = t < ntiles;
          if (odd_tail) step(t, dsa, dsb);
          const int ls = (gt + ntiles - 1) % ST;
          auto last = [&](uint32_t (*p)[4]) {
            fence_regs<D / 2>(dq);
            fence_regs_u<TN / 4>(&p[0][0]);
            wgmma_fence();
            issue_dq(ls, p);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs<D / 2>(dq);
            fence_regs_u<TN / 4>(&p[0][0]);
          };
          if (odd_tail) last(dsb);
          else last(dsa);
          release(ls);
          gt += ntiles;
        }
      }
      // Every wgmma reading Q / dO of this item has completed (wait<0> above).
      __syncwarp();
      if (lane == 0) mbar_arrive(barQfree);
      ++n;

      store_dq<T, D>(a, L, it.bh, it.row0 + wrow + g, it.row_end, tq4, dq);
    }
  }
}

// ================================================================== dK, dV
// Shared memory (1024-byte aligned): K and V of the span [D/64][128 rows][128 B],
// Q and dO stages [kStages][D/64][64 rows][128 B], lse and delta stages
// [kStages][64] f32, mbarriers.
// SPLIT (split-query layout): K and V of one 64-key tile [D/64][64 rows][128 B], Q and dO
// stages of 128 query rows (one 64-row half per consumer warpgroup), 2 stages (3 do not fit).
// DS (stored dS): two 8 KB staging buffers per consumer warpgroup for the dS bulk stores.
template <int D, bool SPLIT, bool DS = false>
struct KvSmem {
  static constexpr int kKeys = SPLIT ? 64 : kRows;  // key rows held
  static constexpr int kQr = SPLIT ? 2 * kTn : kTn;  // query rows per stage
  static constexpr int kStg = SPLIT ? 2 : kStages;
  static constexpr int kKsub = kKeys * 128;  // stride of the D/64 halves of K and V
  static constexpr int kKV = kKeys * D * 2;
  static constexpr int kTile = kQr * D * 2;
  static constexpr int kSub = kQr * 128;  // stride of the D/64 halves of a Q / dO stage
  static constexpr int kV = kKV;
  static constexpr int kQ = 2 * kKV;
  static constexpr int kO = kQ + kStg * kTile;
  static constexpr int kLse = kO + kStg * kTile;
  static constexpr int kDl = kLse + kStg * kQr * 4;
  static constexpr int kBar = kDl + kStg * kQr * 4;
  static constexpr int kDsb = (kBar + 8 * (2 * kStg + 2) + 1023) / 1024 * 1024;
  static constexpr int kBytes = DS ? kDsb + 4 * 8192 : kBar + 8 * (2 * kStg + 2);
  static constexpr int kAlloc = kBytes + 1024;
  static_assert(!SPLIT || 2 * kKV >= kKeys * D * 4, "the dK/dV reduction reuses the K/V region");
};

// Ascending union of two ascending query-block lists base[a0 .. e0) and base[a1 .. e1) (null
// base: the lists 0, 1, ..., e - 1); flags bit w: the block is in list w.
struct QMerge {
  const int32_t* base;
  int a0, e0, a1, e1;
  __device__ __forceinline__ int next(int& flags) {
    const int i0 = a0 < e0 ? (base ? base[a0] : a0) : INT_MAX;
    const int i1 = a1 < e1 ? (base ? base[a1] : a1) : INT_MAX;
    const int i = i0 < i1 ? i0 : i1;
    if (i == INT_MAX) return -1;
    flags = (i0 == i ? 1 : 0) | (i1 == i ? 2 : 0);
    a0 += i0 == i ? 1 : 0;
    a1 += i1 == i ? 1 : 0;
    return i;
  }
};

template <class T, int D, int OV, bool SPLIT, bool DS>
__global__ void __launch_bounds__(kThreads, 1)
    attn_dkv_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tdo,
                         const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                         const __grid_constant__ CUtensorMap tlse, const __grid_constant__ CUtensorMap tdl,
                         const BwdSm90Args a) {
  static_assert(D == 64 || D == 128, "head width 64 or 128");
  static_assert(!DS || SPLIT, "stored dS: split-query layout only");
  using S = KvSmem<D, SPLIT, DS>;
  constexpr int NH = D / 64;
  constexpr int kStg = S::kStg;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = base, sV = base + S::kV, sQ = base + S::kQ, sO = base + S::kO;
  const uint32_t sLse = base + S::kLse, sDl = base + S::kDl, sBar = base + S::kBar;
  [[maybe_unused]] const uint32_t sDsb = base + S::kDsb;
  auto full = [&](int s) { return sBar + 8u * s; };
  auto empty = [&](int s) { return sBar + 8u * (kStg + s); };
  const uint32_t barKV = sBar + 8u * (2 * kStg);          // K and V of the span landed
  const uint32_t barKVfree = sBar + 8u * (2 * kStg + 1);  // all consumer warps done with them

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // 32-bit index math throughout (L * BH < 2^31, checked on the host).
  struct Item {
    int bh, key0;
    int nact;  // warpgroups with keys (< L): 1 or 2
    QMerge m;
  };
  const int L = static_cast<int>(a.L), n_q = static_cast<int>(a.n_q), n_k = static_cast<int>(a.n_k);
  const int block_q = static_cast<int>(a.block_q), block_k = static_cast<int>(a.block_k);
  auto item = [&](int w) {
    Item it;
    const int wb = w / a.n_span;
    it.bh = a.bh0 + wb;
    it.key0 = (w - wb * a.n_span) * S::kKeys;
    it.nact = !SPLIT && it.key0 + 64 < L ? 2 : 1;  // SPLIT: one key tile, both warpgroups on it
    if (a.dense) {
      it.m = QMerge{nullptr, 0, n_q, 0, it.nact > 1 ? n_q : 0};
    } else {
      const int32_t* off = a.inv_off + static_cast<int64_t>(it.bh) * (n_k + 1);
      const int j0 = it.key0 / block_k, j1 = (it.key0 + 64) / block_k;
      it.m.base = a.inv_rows + static_cast<int64_t>(it.bh) * n_q * a.max_k;
      it.m.a0 = off[j0];
      it.m.e0 = off[j0 + 1];
      it.m.a1 = it.nact > 1 ? off[j1] : 0;
      it.m.e1 = it.nact > 1 ? off[j1 + 1] : 0;
    }
    return it;
  };
  // Rows [qs, qe) of query block i, in ceil((qe - qs) / kQr) stages.
  auto qtiles = [&](int i, int& qs, int& qe) {
    qs = i * block_q;
    qe = min(qs + block_q, L);
    return (qe - qs + S::kQr - 1) / S::kQr;
  };

  if (tid == 0) {
    for (int s = 0; s < kStg; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 8);  // one arrival per consumer warp
    }
    mbar_init(barKV, 1);
    mbar_init(barKVfree, 8);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // ================= producer warpgroup: one thread issues every TMA load (fits 24 registers)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (warp == 0 && lane == 0) {
      tma_prefetch(&tq);
      tma_prefetch(&tdo);
      tma_prefetch(&tk);
      tma_prefetch(&tv);
      tma_prefetch(&tlse);
      tma_prefetch(&tdl);
      int gt = 0, n = 0;  // tiles / items issued so far
      for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
        Item it = item(w);
        const int bh = it.bh, H = static_cast<int>(a.H);
        const int b = bh / H, h = bh - b * H;
        auto load_kv = [&]() {
          mbar_wait(barKVfree, (n & 1) ^ 1);
          mbar_expect_tx(barKV, 2 * it.nact * NH * 64 * 128);
#pragma unroll
          for (int hh = 0; hh < NH; ++hh)
            for (int r = 0; r < it.nact; ++r) {
              const int row = it.key0 + r * 64;
              tma_load_3d(sK + hh * S::kKsub + r * (64 * 128), &tk, hh * 64, row, bh, barKV);
              tma_load_4d(sV + hh * S::kKsub + r * (64 * 128), &tv, hh * 64, row, h, b, barKV);
            }
        };
        // Up to kStages tiles go out before this item's K/V (their slots belong to earlier items).
        int issued = 0;
        bool kv = false;
        int flags, i;
        while ((i = it.m.next(flags)) >= 0) {
          int qs, qe;
          const int nt = qtiles(i, qs, qe);
          for (int qt = 0; qt < nt; ++qt) {
            if (!kv && issued == kStg) {
              load_kv();
              kv = true;
            }
            const int s = gt % kStg;
            mbar_wait(empty(s), ((gt / kStg) & 1) ^ 1);
            const int row = qs + qt * S::kQr;
            mbar_expect_tx(full(s), 2 * S::kTile + 2 * S::kQr * 4);
#pragma unroll
            for (int hh = 0; hh < NH; ++hh)
#pragma unroll
              for (int r = 0; r < S::kQr / 64; ++r) {
                const uint32_t off = s * S::kTile + hh * S::kSub + r * (64 * 128);
                tma_load_3d(sQ + off, &tq, hh * 64, row + r * 64, bh, full(s));
                tma_load_3d(sO + off, &tdo, hh * 64, row + r * 64, bh, full(s));
              }
            const int flat = bh * L + row;
            tma_load_1d(sLse + s * (S::kQr * 4), &tlse, flat, full(s));
            tma_load_1d(sDl + s * (S::kQr * 4), &tdl, flat, full(s));
            ++gt;
            ++issued;
          }
        }
        if (!kv) load_kv();
        if (a.extra0 && a.prefetch_extra) {
          const int64_t o = (static_cast<int64_t>(bh) * L + it.key0) * D;
          const uint32_t bytes = static_cast<uint32_t>((min(it.key0 + S::kKeys, L) - it.key0) * D * 4);
          l2_prefetch(a.extra0 + o, bytes);
          l2_prefetch(a.extra1 + o, bytes);
        }
        ++n;
      }
    }
  } else {
    // ================= consumer warpgroups: dK + dV (128) + S^T + dP^T (64) registers at D 128
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int cw = warp - 4;          // consumer warp 0..7
    const int wg = cw / 4;            // consumer warpgroup: keys key0 + 64 wg .. + 63 (SPLIT: query rows 64 wg .. of a stage)
    const int wrow = (cw % 4) * 16;   // first key row of this warp within its warpgroup
    const int g = lane >> 2, tq4 = lane & 3;
    const float sl2 = a.scale_log2;

    float dk[D / 2], dv[D / 2];
    float sacc[kTn / 2], dpacc[kTn / 2];
    uint32_t pf[kTn / 16][4], dsf[kTn / 16][4];
    // DS: the tile's dS^T slot, and whether this thread's key rows are < L (rows past L hold
    // P^T (0 - delta), not 0: stored as 0, the dQ kernel's K rows there are 0 too); ds_n counts the
    // warpgroup's stores (staging buffer ds_n % 2; the leader thread issues them).
    int ds_slot = 0, ds_n = 0;
    bool krow0 = true, krow1 = true;
    const bool ds_leader = cw % 4 == 0 && lane == 0;

    // One tile (stage s, `valid` query columns) for this warpgroup's 64 keys. OV (overlap):
    //   0: S^T and dP^T in one group, then P^T / dS^T, then dV and dK in one group;
    //   1: P^T (the exp2s) computed while dP^T runs;
    //   2: as 1, and dS^T computed while dV += P^T dO runs (more live registers).
    // SPLIT: both warpgroups share the K / V tile; warpgroup wg takes query rows 64 wg .. of the stage.
    const uint32_t koff = SPLIT ? 0u : static_cast<uint32_t>(wg) * (64 * 128);
    const uint32_t qoff = SPLIT ? static_cast<uint32_t>(wg) * (64 * 128) : 0u;
    auto tile = [&](int s, int valid) {
      const uint32_t lrow = sLse + s * (S::kQr * 4) + qoff / 32, drow = sDl + s * (S::kQr * 4) + qoff / 32;
#pragma unroll
      for (int i = 0; i < kTn / 2; ++i) sacc[i] = dpacc[i] = 0.f;  // old values dead: shorter live ranges
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t aoff = (kk / 4) * S::kKsub + koff + (kk % 4) * 32;
        const uint32_t boff = s * S::kTile + (kk / 4) * S::kSub + qoff + (kk % 4) * 32;
        wgmma_ss64<T>(sacc, desc_sw128(sK + aoff, 16, 1024), desc_sw128(sQ + boff, 16, 1024), kk > 0);
      }
      if constexpr (OV > 0) wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t aoff = (kk / 4) * S::kKsub + koff + (kk % 4) * 32;
        const uint32_t boff = s * S::kTile + (kk / 4) * S::kSub + qoff + (kk % 4) * 32;
        wgmma_ss64<T>(dpacc, desc_sw128(sV + aoff, 16, 1024), desc_sw128(sO + boff, 16, 1024), kk > 0);
      }
      wgmma_commit();
      if constexpr (OV > 0) wgmma_wait<1>();  // S^T done, dP^T may still run
      else wgmma_wait<0>();
      fence_regs<kTn / 2>(sacc);
      // P^T in place (query columns col, col + 1; key rows g, g + 8), 0 past the query block.
#pragma unroll
      for (int nt = 0; nt < kTn / 8; ++nt) {
        const int col = nt * 8 + 2 * tq4;
        const float2 l = ld_shared_f2(lrow + col * 4);
        const bool v0 = col < valid, v1 = col + 1 < valid;
        const float l0 = l.x * kLog2e, l1 = l.y * kLog2e;
        sacc[4 * nt] = v0 ? ex2(fmaf(sacc[4 * nt], sl2, -l0)) : 0.f;
        sacc[4 * nt + 1] = v1 ? ex2(fmaf(sacc[4 * nt + 1], sl2, -l1)) : 0.f;
        sacc[4 * nt + 2] = v0 ? ex2(fmaf(sacc[4 * nt + 2], sl2, -l0)) : 0.f;
        sacc[4 * nt + 3] = v1 ? ex2(fmaf(sacc[4 * nt + 3], sl2, -l1)) : 0.f;
        pf[nt / 2][(nt & 1) * 2 + 0] = Elem<T>::pack(sacc[4 * nt], sacc[4 * nt + 1]);
        pf[nt / 2][(nt & 1) * 2 + 1] = Elem<T>::pack(sacc[4 * nt + 2], sacc[4 * nt + 3]);
      }
      auto issue_dv = [&]() {
#pragma unroll
        for (int kk = 0; kk < kTn / 16; ++kk)
          wgmma_rs<T, D, 1>(dv, pf[kk], desc_sw128(sO + s * S::kTile + qoff + kk * 16 * 128, S::kSub, 1024), 1);
      };
      if constexpr (OV == 2) {
        fence_regs<D / 2>(dv);
        fence_regs_u<kTn / 4>(&pf[0][0]);
        wgmma_fence();
        issue_dv();
        wgmma_commit();
        wgmma_wait<1>();  // dP^T done, dV may still run
      } else if constexpr (OV == 1) {
        wgmma_wait<0>();
      }
      fence_regs<kTn / 2>(dpacc);
      // dS^T = P^T (dP^T - delta_col), 0 past the query block.
#pragma unroll
      for (int nt = 0; nt < kTn / 8; ++nt) {
        const int col = nt * 8 + 2 * tq4;
        const float2 d = ld_shared_f2(drow + col * 4);
        const bool v0 = col < valid, v1 = col + 1 < valid;
        const float e0 = v0 ? sacc[4 * nt] * (dpacc[4 * nt] - d.x) : 0.f;
        const float e1 = v1 ? sacc[4 * nt + 1] * (dpacc[4 * nt + 1] - d.y) : 0.f;
        const float e2 = v0 ? sacc[4 * nt + 2] * (dpacc[4 * nt + 2] - d.x) : 0.f;
        const float e3 = v1 ? sacc[4 * nt + 3] * (dpacc[4 * nt + 3] - d.y) : 0.f;
        dsf[nt / 2][(nt & 1) * 2 + 0] = Elem<T>::pack(e0, e1);
        dsf[nt / 2][(nt & 1) * 2 + 1] = Elem<T>::pack(e2, e3);
      }
      if constexpr (DS) {
        // dS (from dS^T) into this warpgroup's staging buffer in the dQ kernel's A-fragment order, before the
        // GEMMs that read dsf are issued (after them, the staging cost the kernel ~7%: session 18).
        // This warp's 16 keys x queries 16 kk .. + 15 are the four 8 x 8 blocks of dsf[kk]; movmatrix
        // transposes each in place, which gives the lane of the dQ warp owning those queries its A
        // fragment for these keys, {T0, T2, T1, T3}, 16 bytes at [query chunk kk][key chunk][lane].
        const uint32_t buf = sDsb + static_cast<uint32_t>(wg * 2 + (ds_n & 1)) * 8192u;
        const int l = static_cast<int>(lane_now());
#pragma unroll
        for (int kk = 0; kk < kTn / 16; ++kk) {
          const uint32_t t0 = movmatrix_trans(krow0 ? dsf[kk][0] : 0u);
          const uint32_t t1 = movmatrix_trans(krow1 ? dsf[kk][1] : 0u);
          const uint32_t t2 = movmatrix_trans(krow0 ? dsf[kk][2] : 0u);
          const uint32_t t3 = movmatrix_trans(krow1 ? dsf[kk][3] : 0u);
          st_shared_v4(buf + ((kk * 4 + cw % 4) * 32 + l) * 16, t0, t2, t1, t3);
        }
      }
      if constexpr (OV < 2) fence_regs<D / 2>(dv);
      fence_regs<D / 2>(dk);
      if constexpr (OV < 2) fence_regs_u<kTn / 4>(&pf[0][0]);
      fence_regs_u<kTn / 4>(&dsf[0][0]);
      wgmma_fence();
      if constexpr (OV < 2) issue_dv();
#pragma unroll
      for (int kk = 0; kk < kTn / 16; ++kk)
        wgmma_rs<T, D, 1>(dk, dsf[kk], desc_sw128(sQ + s * S::kTile + qoff + kk * 16 * 128, S::kSub, 1024), 1);
      wgmma_commit();
      if constexpr (DS) {
        // The staged dS to its slot half by one 8 KB bulk store per warpgroup and tile, while dV and
        // dK run. The buffer written above was last read by the store of two tiles ago, which the
        // leader waited for before the previous tile's barrier.
        fence_async_shared();
        if (ds_leader) bulk_wait_read<0>();
        asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
        if (ds_leader) {
          const uint32_t buf = sDsb + static_cast<uint32_t>(wg * 2 + (ds_n & 1)) * 8192u;
          void* dst = static_cast<char*>(a.ds) + static_cast<int64_t>(2 * ds_slot + wg) * 8192;
          if (a.ds_hint) bulk_store_hint(dst, buf, 8192, l2_policy_evict_first());
          else bulk_store(dst, buf, 8192);
          bulk_commit();
        }
        ++ds_n;
      }
      wgmma_wait<0>();
      fence_regs<D / 2>(dv);
      fence_regs<D / 2>(dk);
      fence_regs_u<kTn / 4>(&pf[0][0]);
      fence_regs_u<kTn / 4>(&dsf[0][0]);
    };

    int gt = 0, n = 0;  // tiles / items consumed so far (same sequence as the producer)
    for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
      Item it = item(w);
      const bool active = SPLIT || wg < it.nact;  // SPLIT: both warpgroups write (dk, dv)
#pragma unroll
      for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
      int kt_ds = 0;
      if constexpr (DS) {
        krow0 = it.key0 + wrow + g < L;
        krow1 = it.key0 + wrow + g + 8 < L;
        kt_ds = (it.key0 % block_k) / 64;
      }
      mbar_wait(barKV, n & 1);
      int flags, i;
      while ((i = it.m.next(flags)) >= 0) {
        int qs, qe;
        const int nt = qtiles(i, qs, qe);
        const bool mine = SPLIT || ((flags >> wg) & 1);
        for (int qt = 0; qt < nt; ++qt) {
          const int s = gt % kStg;
          if constexpr (DS) {
            // it.m.a0 - 1: the position of i in this key block's inverse list (the only list in SPLIT).
            ds_slot = static_cast<int>((static_cast<int64_t>(it.bh - a.bh0) * a.ds_pairs + (it.m.a0 - 1)) *
                                           a.ds_per_pair +
                                       kt_ds * a.sub_q + qt);
          }
          mbar_wait(full(s), (gt / kStg) & 1);  // also when skipping: keeps the empty phases in order
          const int valid = min(kTn, qe - (qs + qt * S::kQr + (SPLIT ? 64 * wg : 0)));
          if (mine && valid > 0) tile(s, valid);
          __syncwarp();
          if (lane_now() == 0) mbar_arrive(empty(s));
          ++gt;
        }
      }
      // Every wgmma reading K / V of this item has completed (wait<0> in tile()).
      if constexpr (SPLIT) {
        // Both warpgroups hold partial dK / dV of the same keys. Through the K / V region (every
        // wgmma reading it has completed), warpgroup 1 hands dK to warpgroup 0 and warpgroup 0 hands
        // dV to warpgroup 1 (fixed order: deterministic); each then writes one of them.
        const uint32_t red = sK + static_cast<uint32_t>(cw % 4 * 32 + lane_now()) * 4;
        auto hand = [&](int from, float* acc) {
          consumer_sync();  // K / V, or the previous hand-over, no longer read
          if (wg == from) {
#pragma unroll
            for (int i = 0; i < D / 2; ++i) st_shared_f32(red + i * 512, acc[i]);
          }
          consumer_sync();
          if (wg != from) {
#pragma unroll
            for (int i = 0; i < D / 2; ++i) acc[i] += ld_shared_f32(red + i * 512);
          }
        };
        hand(1, dk);
        hand(0, dv);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // before TMA rewrites K / V
      }
      __syncwarp();
      if (lane_now() == 0) mbar_arrive(barKVfree);
      ++n;

      // ---- epilogue: dk = R^T (scale * dK), dv = dV (+ extras), straight from the accumulators
      // (SPLIT: warpgroup 0 writes dk, warpgroup 1 dv, of the same 64 keys).
      if (active) {
        T* dko = static_cast<T*>(a.out0);
        T* dvo = static_cast<T*>(a.out1);
        const bool do_k = !SPLIT || wg == 0, do_v = !SPLIT || wg == 1;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = it.key0 + (SPLIT ? 0 : wg * 64) + wrow + g + half * 8;
          if (r >= L) continue;
          const int64_t o = (static_cast<int64_t>(it.bh) * L + r) * D;
          if (do_k) store_row<T, D>(a.rope, dko + o, a.extra0 ? a.extra0 + o : nullptr, r, tq4, dk, half, a.scale, true);
          if (do_v) store_row<T, D>(a.rope, dvo + o, a.extra1 ? a.extra1 + o : nullptr, r, tq4, dv, half, 1.f, false);
        }
      }
    }
    if constexpr (DS) {
      if (ds_leader) bulk_wait<0>();  // the dS^T stores complete (and their staging reads) before exit
    }
  }
}

// ================================================================== dQ from the stored dS
// The dK/dV kernel (split layout, template DS) has formed every kept pair's dS^T anyway: it stores
// it (bf16, as the dQ GEMM rounds it) to a scratch slot per (128-row part of query block i,
// 64-key tile of key block j), 16 KB: two 8 KB query halves, each [16-query warp][16-key chunk kk]
// [lane] x 16 bytes, the lane's A fragment of dS (rows = queries) for chunk kk. This kernel then
// does one GEMM per pair instead of three: work item = (bh, query block, 128-row part) as in
// attn_dq_sm90_kernel; the producer streams, per 64-key tile, K (64 x D) by TMA and the pair's slot
// by one 1-D bulk copy through a kSt ring; consumer warpgroup w (64 query rows) loads its fragments
// (four 16-byte shared loads per lane, conflict-free) and runs
//   dQ += dS K    wgmma m64nDk16, A = dS from registers, B = K (MN-major)
// with one tile's GEMMs in flight while it waits for the next. Same epilogue as the dq kernel.
// ds_pos_kernel first finds each kept pair's slot: the position of i in j's inverse list.
template <int D>
struct DqDsSmem {
  static constexpr int kTile = 64 * D * 2;  // K tile [D/64][64 rows][128 B]
  static constexpr int kSub = 64 * 128;
  static constexpr int kDs = 64 * 128 * 2;  // dS slot: [2 halves][4 warps][4 key chunks][32 lanes][16 B]
  static constexpr int kSt = D == 128 ? 7 : 8;  // 6 at D 128: dQ 829-833 against 813-814 us (session 18)
  static constexpr int kK = 0;
  static constexpr int kS = kSt * kTile;
  static constexpr int kBar = kS + kSt * kDs;
  static constexpr int kBytes = kBar + 8 * (2 * kSt);
  static constexpr int kAlloc = kBytes + 1024;
};

__global__ void ds_pos_kernel(const int32_t* __restrict__ idx, const int32_t* __restrict__ cnt,
                              const int32_t* __restrict__ off, const int32_t* __restrict__ rows, int n_q, int n_k,
                              int max_k, int64_t total, int32_t* __restrict__ pos) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t per = static_cast<int64_t>(n_q) * max_k;
  const int64_t bh = e / per;
  const int r = static_cast<int>(e - bh * per), i = r / max_k, c = r - i * max_k;
  if (c >= cnt[bh * n_q + i]) return;
  const int j = idx[e];
  const int32_t* o = off + bh * (n_k + 1);
  const int32_t* rb = rows + bh * per;
  int lo = o[j], hi = o[j + 1];  // the ascending list of query blocks that kept j holds i
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (rb[mid] < i) lo = mid + 1;
    else hi = mid;
  }
  pos[e] = lo;
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_dq_ds_sm90_kernel(const __grid_constant__ CUtensorMap tk, const BwdSm90Args a) {
  static_assert(D == 64 || D == 128, "head width 64 or 128");
  using S = DqDsSmem<D>;
  constexpr int NH = D / 64;
  constexpr int ST = S::kSt;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = base + S::kK, sS = base + S::kS, sBar = base + S::kBar;
  auto full = [&](int s) { return sBar + 8u * s; };
  auto empty = [&](int s) { return sBar + 8u * (ST + s); };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  struct Item {
    int bh, sub, row0, row_end;
    const int32_t* list;
    const int32_t* pos;
    int ntiles;
  };
  const int L = static_cast<int>(a.L), n_q = static_cast<int>(a.n_q), n_k = static_cast<int>(a.n_k);
  const int block_q = static_cast<int>(a.block_q), block_k = static_cast<int>(a.block_k);
  const int per_bh = n_q * a.sub_q;
  auto item = [&](int w) {
    Item it;
    const int wb = w / per_bh;
    it.bh = a.bh0 + wb;
    const int x = w - wb * per_bh, qi = x / a.sub_q;
    it.sub = x - qi * a.sub_q;
    it.row0 = qi * block_q + it.sub * kRows;
    it.row_end = min(min(it.row0 + kRows, (qi + 1) * block_q), L);
    const int nblk = it.row0 >= it.row_end ? 0 : a.cnt[it.bh * n_q + qi];
    const int64_t row = (static_cast<int64_t>(it.bh) * n_q + qi) * a.max_k;
    it.list = a.idx + row;
    it.pos = a.ds_pos + row;
    it.ntiles = nblk * a.tiles_per_block;
    // Only the last key block can be short, and an ascending list has it last.
    if (nblk > 0 && it.list[nblk - 1] == n_k - 1) it.ntiles -= a.tiles_per_block - a.tiles_last;
    return it;
  };

  if (tid == 0) {
    for (int s = 0; s < ST; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 8);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // ================= producer warpgroup: one thread issues every TMA load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 0) {
      // The whole warp walks the items (lane 0 issues); the item's block list and slot positions come
      // 32 entries per coalesced load instead of two dependent loads per tile (-1%, session 17).
      if (lane == 0) tma_prefetch(&tk);
      int gt = 0;
      for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
        const Item it = item(w);
        if (it.row0 >= it.row_end) continue;
        const int64_t slot0 = static_cast<int64_t>(it.bh - a.bh0) * a.ds_pairs;
        int jv = 0, pv = 0;
        for (int t = 0; t < it.ntiles; ++t) {
          const int u = gt + t, s = u % ST;
          const int c = t / a.tiles_per_block, kt = t - c * a.tiles_per_block;
          if (kt == 0 && c % 32 == 0) {
            const int cl = c + lane;
            const bool in = cl * a.tiles_per_block < it.ntiles;  // cl < the item's kept blocks
            jv = in ? it.list[cl] : 0;
            pv = in ? it.pos[cl] : 0;
          }
          const int j = __shfl_sync(0xffffffffu, jv, c % 32), ps = __shfl_sync(0xffffffffu, pv, c % 32);
          const int key = j * block_k + kt * 64;
          const int slot = static_cast<int>((slot0 + ps) * a.ds_per_pair + kt * a.sub_q + it.sub);
          mbar_wait(empty(s), ((u / ST) & 1) ^ 1);
          if (lane == 0) {
            mbar_expect_tx(full(s), S::kTile + S::kDs);
            const char* src = static_cast<const char*>(a.ds) + static_cast<int64_t>(slot) * S::kDs;
            if (a.ds_hint) {
              const uint64_t keep = l2_policy_evict_last(), once = l2_policy_evict_first();
#pragma unroll
              for (int hh = 0; hh < NH; ++hh)
                tma_load_3d_hint(sK + s * S::kTile + hh * S::kSub, &tk, hh * 64, key, it.bh, full(s), keep);
              bulk_load_hint(sS + s * S::kDs, src, S::kDs, full(s), once);
            } else {
#pragma unroll
              for (int hh = 0; hh < NH; ++hh)
                tma_load_3d(sK + s * S::kTile + hh * S::kSub, &tk, hh * 64, key, it.bh, full(s));
              bulk_load(sS + s * S::kDs, src, S::kDs, full(s));
            }
          }
          __syncwarp();
        }
        if (lane == 0 && a.extra0 && a.prefetch_extra)
          l2_prefetch(a.extra0 + (static_cast<int64_t>(it.bh) * L + it.row0) * D,
                      static_cast<uint32_t>((it.row_end - it.row0) * D * 4));
        gt += it.ntiles;
      }
    }
  } else {
    // ================= consumer warpgroups: dQ (D / 2 registers)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = warp - 4;   // consumer warp 0..7
    const int wg = cw / 4;     // consumer warpgroup: item rows 64 wg .. 64 wg + 63
    const int wrow = cw * 16;  // first item row of this warp
    const int g = lane >> 2, tq4 = lane & 3;
    float dq[D / 2];
    // The slot holds each lane's A fragments (dS, this warp's 16 query rows x 16 keys kk) at
    // [warpgroup half][warp][kk][lane], 16 bytes each; two register sets, since a tile's fragments
    // are read by its GEMMs until the next tile's wait.
    uint32_t afa[4][4], afb[4][4];
    auto issue = [&](int s, uint32_t(&af)[4][4]) {
      const uint32_t src = sS + s * S::kDs + wg * 8192 + ((cw % 4) * 128 + static_cast<int>(lane_now())) * 16;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) ld_shared_v4(src + kk * 512, af[kk]);
      fence_regs_u<16>(&af[0][0]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_rs<T, D, 1>(dq, af[kk], desc_sw128(sK + s * S::kTile + kk * 2048, S::kSub, 1024), 1);
    };
    auto release = [&](int s) {
      if (lane == 0) mbar_arrive(empty(s));
    };
    int gt = 0;
    for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
      const Item it = item(w);
      if (it.row0 >= it.row_end) continue;
      const int ntiles = it.ntiles;
#pragma unroll
      for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
      const bool rows = it.row0 + 64 * wg < it.row_end;  // else: keep the stage phases in step only
      if (!rows) {
        // Separate loops: a wgmma under a divergent-looking branch made ptxas serialise every one
        // (C7518). The kernel took the same time either way (872 / 886 us at Wan1.3B-480p, H200):
        // it is bound by reading the 2.6 GB of dS^T.
        for (int t = 0; t < ntiles; ++t) {
          const int u = gt + t, s = u % ST;
          mbar_wait(full(s), (u / ST) & 1);
          __syncwarp();
          release(s);
        }
      } else if (ntiles > 0) {
        auto step = [&](int t, uint32_t(&af)[4][4]) {
          const int u = gt + t, s = u % ST;
          mbar_wait(full(s), (u / ST) & 1);
          fence_regs<D / 2>(dq);
          issue(s, af);
          wgmma_commit();
          wgmma_wait<1>();  // the previous tile's GEMMs are done (its fragments free)
          fence_regs<D / 2>(dq);
          fence_regs_u<16>(&afa[0][0]);
          fence_regs_u<16>(&afb[0][0]);
          if (t > 0) release((u - 1) % ST);
        };
        int t = 0;
        for (; t + 1 < ntiles; t += 2) {
          step(t, afa);
          step(t + 1, afb);
        }
        if (t < ntiles) step(t, afa);
        wgmma_wait<0>();
        fence_regs<D / 2>(dq);
        release((gt + ntiles - 1) % ST);
      }
      gt += ntiles;
      if (!rows) continue;

      store_dq<T, D>(a, L, it.bh, it.row0 + wrow + g, it.row_end, tq4, dq);
    }
  }
}

// ================================================================== host side
// What both kernels need of the call (besides the environment).
bool supported(const BwdParams& p, const Plan& pl, const RopeInfo& r) {
  if (env_is("SALAD_BWD_KERNEL", "mma")) return false;
  if (p.dtype != DType::BF16 && p.dtype != DType::F16) return false;
  if (p.D != 64 && p.D != 128) return false;
  if (r.perm) return false;  // tile order: V / dO would need a gather
  if (p.opt.block_k % kTn != 0 || p.opt.block_q <= 0) return false;
  if (p.L <= 0 || pl.BH * p.L >= (int64_t(1) << 31) - 4 * kRows) return false;  // 32-bit TMA coordinates
  if (!pl.dense && (!p.block_idx || !p.block_cnt)) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

// Q/K (workspace, block order), dO (contiguous, caller order) and V (in place) tensor maps.
template <class T, int D>
bool make_maps(const BwdParams& p, const Plan& pl, void* ws, CUtensorMap* mq, CUtensorMap* mdo, CUtensorMap* mk,
               CUtensorMap* mv) {
  const cuuint64_t BH = static_cast<cuuint64_t>(pl.BH), L = static_cast<cuuint64_t>(p.L);
  const cuuint64_t dqk[3] = {static_cast<cuuint64_t>(D), L, BH};
  const cuuint64_t sqk[2] = {D * 2ull, L * D * 2ull};
  if (!make_map(mq, p.dtype, 3, at<T>(ws, pl.qr), dqk, sqk)) return false;
  if (!make_map(mk, p.dtype, 3, at<T>(ws, pl.kr), dqk, sqk)) return false;
  if (!make_map(mdo, p.dtype, 3, p.do_s, dqk, sqk)) return false;
  // V in place: (D, L, H, B) with the caller's strides (a size-1 dim's stride is never used).
  const cuuint64_t dv[4] = {static_cast<cuuint64_t>(D), L, static_cast<cuuint64_t>(p.H),
                            static_cast<cuuint64_t>(p.B)};
  cuuint64_t sv[3] = {static_cast<cuuint64_t>(p.v_stride[2]) * 2, static_cast<cuuint64_t>(p.v_stride[1]) * 2,
                      static_cast<cuuint64_t>(p.v_stride[0]) * 2};
  if (p.H == 1) sv[1] = 16;
  if (p.B == 1) sv[2] = 16;
  return make_map(mv, p.dtype, 4, p.v, dv, sv);
}

BwdSm90Args base_args(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws) {
  BwdSm90Args a{};
  a.lse = p.lse;
  a.delta = at<float>(ws, pl.delta);
  a.idx = p.block_idx;
  a.cnt = p.block_cnt;
  a.inv_off = pl.dense ? nullptr : at<int32_t>(ws, pl.inv_off);
  a.inv_rows = pl.dense ? nullptr : at<int32_t>(ws, pl.inv_rows);
  a.rope = r;
  a.L = p.L;
  a.H = p.H;
  a.n_q = pl.n_q;
  a.n_k = pl.n_k;
  a.max_k = pl.max_k;
  a.block_q = p.opt.block_q;
  a.block_k = p.opt.block_k;
  a.dense = pl.dense ? 1 : 0;
  a.prefetch_extra = env_is("SALAD_BWD_PREFETCH", "0") ? 0 : 1;
  a.scale = static_cast<float>(p.softmax_scale());
  a.scale_log2 = static_cast<float>(p.softmax_scale() * 1.4426950408889634);
  return a;
}

unsigned grid_for(int64_t work, bool persistent) {
  int dev = 0, sms = 0;
  SALAD_CUDA_CHECK(cudaGetDevice(&dev));
  SALAD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  int64_t cap = sms;
  if (const char* g = std::getenv("SALAD_BWD_SM90_GRID")) cap = imax64(1, std::atoll(g));  // testing: fewer CTAs
  return static_cast<unsigned>(persistent ? imin64(work, cap) : work);
}

template <class T, int D, int TN>
bool launch_dq(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  CUtensorMap mq, mdo, mk, mv;
  if (!make_maps<T, D>(p, pl, ws, &mq, &mdo, &mk, &mv)) return false;
  BwdSm90Args a = base_args(p, pl, r, ws);
  a.out0 = p.dq;
  const bool lin = pl.linear && p.do_l;
  a.extra0 = lin ? at<float>(ws, pl.dq_l) : nullptr;
  a.sub_q = static_cast<int>((p.opt.block_q + kRows - 1) / kRows);
  a.tiles_per_block = static_cast<int>(p.opt.block_k / kTn);
  a.tiles_last = static_cast<int>((p.L - (pl.n_k - 1) * p.opt.block_k + kTn - 1) / kTn);
  const int64_t work = pl.BH * pl.n_q * a.sub_q;
  if (work >= (int64_t(1) << 31)) return false;
  a.num_work = static_cast<int>(work);
  constexpr int smem = DqSmem<D, TN>::kAlloc;
  SALAD_CUDA_CHECK(
      cudaFuncSetAttribute(attn_dq_sm90_kernel<T, D, TN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const bool persistent = !env_is("SALAD_BWD_DQ_PERSISTENT", "0");
  attn_dq_sm90_kernel<T, D, TN><<<grid_for(work, persistent), kThreads, smem, s>>>(mq, mdo, mk, mv, a);
  SALAD_LAUNCH_CHECK();
  return true;
}

// The stored-dS fields of the arguments (both kernels of that path).
void set_ds_args(const BwdParams& p, const Plan& pl, void* ws, BwdSm90Args* a) {
  a->ds = at<void>(ws, pl.ds);
  a->ds_pos = at<int32_t>(ws, pl.ds_pos);
  a->ds_pairs = pl.n_q * pl.max_k;
  a->sub_q = static_cast<int>((p.opt.block_q + kRows - 1) / kRows);
  a->tiles_per_block = static_cast<int>(p.opt.block_k / kTn);
  a->tiles_last = static_cast<int>((p.L - (pl.n_k - 1) * p.opt.block_k + kTn - 1) / kTn);
  a->ds_per_pair = a->tiles_per_block * a->sub_q;
  a->ds_hint = env_is("SALAD_BWD_DS_HINT", "0") ? 0 : 1;
}

template <class T, int D>
bool launch_dq_ds(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s, int64_t bh0,
                  int64_t nbh) {
  CUtensorMap mq, mdo, mk, mv;
  if (!make_maps<T, D>(p, pl, ws, &mq, &mdo, &mk, &mv)) return false;
  BwdSm90Args a = base_args(p, pl, r, ws);
  set_ds_args(p, pl, ws, &a);
  a.out0 = p.dq;
  a.extra0 = pl.linear && p.do_l ? at<float>(ws, pl.dq_l) : nullptr;
  a.bh0 = static_cast<int>(bh0);
  const int64_t work = nbh * pl.n_q * a.sub_q;
  if (work >= (int64_t(1) << 31)) return false;
  a.num_work = static_cast<int>(work);
  constexpr int smem = DqDsSmem<D>::kAlloc;
  SALAD_CUDA_CHECK(cudaFuncSetAttribute(attn_dq_ds_sm90_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        smem));
  attn_dq_ds_sm90_kernel<T, D><<<grid_for(work, true), kThreads, smem, s>>>(mk, a);
  SALAD_LAUNCH_CHECK();
  return true;
}

// DS (stored dS): heads [bh0, bh0 + nbh) only, dS^T to the workspace's scratch (pl.ds).
template <class T, int D, int OV, bool SPLIT, bool DS = false>
bool launch_dkv_ov(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s, int64_t bh0 = 0,
                   int64_t nbh = -1) {
  using S = KvSmem<D, SPLIT, DS>;
  CUtensorMap mq, mdo, mk, mv, ml, md;
  if (!make_maps<T, D>(p, pl, ws, &mq, &mdo, &mk, &mv)) return false;
  const cuuint64_t n = static_cast<cuuint64_t>(pl.BH * p.L);
  if (!make_map_f32_1d(&ml, p.lse, n, S::kQr)) return false;
  if (!make_map_f32_1d(&md, at<float>(ws, pl.delta), n, S::kQr)) return false;
  BwdSm90Args a = base_args(p, pl, r, ws);
  a.out0 = p.dk;
  a.out1 = p.dv;
  const bool lin = pl.linear && p.do_l;
  a.extra0 = lin ? at<float>(ws, pl.dk_l) : nullptr;
  a.extra1 = lin ? at<float>(ws, pl.dv_l) : nullptr;
  a.n_span = static_cast<int>((p.L + S::kKeys - 1) / S::kKeys);
  if (nbh < 0) nbh = pl.BH;
  a.bh0 = static_cast<int>(bh0);
  if constexpr (DS) set_ds_args(p, pl, ws, &a);
  const int64_t work = nbh * a.n_span;
  if (work >= (int64_t(1) << 31)) return false;
  a.num_work = static_cast<int>(work);
  constexpr int smem = S::kAlloc;
  SALAD_CUDA_CHECK(cudaFuncSetAttribute(attn_dkv_sm90_kernel<T, D, OV, SPLIT, DS>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const bool persistent = env_is("SALAD_BWD_DKV_PERSISTENT", "1");
  attn_dkv_sm90_kernel<T, D, OV, SPLIT, DS>
      <<<grid_for(work, persistent), kThreads, smem, s>>>(mq, mdo, mk, mv, ml, md, a);
  SALAD_LAUNCH_CHECK();
  return true;
}

#ifndef SALAD_BWD_DKV_OVERLAP
#define SALAD_BWD_DKV_OVERLAP 1
#endif
// The split-query layout when two adjacent 64-key tiles may lie in different key blocks (their
// inverse lists differ, so the span layout would leave one warpgroup idle on most tiles) and
// query blocks fill 128-row stages; SALAD_BWD_DKV_SPLIT=0|1 forces either.
bool use_split(const Params& p) {
  if (const char* e = std::getenv("SALAD_BWD_DKV_SPLIT")) return std::atoi(e) != 0;
  return p.opt.block_k % kRows != 0 && p.opt.block_q % kRows == 0;
}

template <class T, int D>
bool launch_dkv(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  int ov = SALAD_BWD_DKV_OVERLAP;
  if (const char* e = std::getenv("SALAD_BWD_DKV_OVERLAP")) ov = std::atoi(e);
  if (use_split(p)) return launch_dkv_ov<T, D, 1, true>(p, pl, r, ws, s);  // OV 2 measured no faster
  if (ov <= 0) return launch_dkv_ov<T, D, 0, false>(p, pl, r, ws, s);
  if (ov == 1) return launch_dkv_ov<T, D, 1, false>(p, pl, r, ws, s);
  return launch_dkv_ov<T, D, 2, false>(p, pl, r, ws, s);
}

template <class T, int D>
bool launch_ds(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  const int64_t total = pl.BH * pl.n_q * pl.max_k;
  ds_pos_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, s>>>(
      p.block_idx, p.block_cnt, at<int32_t>(ws, pl.inv_off), at<int32_t>(ws, pl.inv_rows), static_cast<int>(pl.n_q),
      static_cast<int>(pl.n_k), static_cast<int>(pl.max_k), total, at<int32_t>(ws, pl.ds_pos));
  SALAD_LAUNCH_CHECK();
  for (int64_t bh0 = 0; bh0 < pl.BH; bh0 += pl.ds_group) {
    const int64_t nbh = std::min(pl.ds_group, pl.BH - bh0);
    // A failed tensor map can only fail on the first group, before this group's dq: the caller then
    // runs the two-kernel backward, which rewrites dk and dv.
    if (!launch_dkv_ov<T, D, 1, true, true>(p, pl, r, ws, s, bh0, nbh)) return false;
    if (!launch_dq_ds<T, D>(p, pl, r, ws, s, bh0, nbh)) return false;
  }
  return true;
}

void warn_once(bool ok, const char* what) {
  static bool warned = false;
  if (!ok && !warned) {
    warned = true;
    std::fprintf(stderr, "salad: sm90 attention backward (%s): TMA descriptor setup failed, using the mma.sync kernel\n",
                 what);
  }
}

}  // namespace

bool try_launch_attn_dq_sm90(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (env_is("SALAD_BWD_DQ", "mma") || !supported(p, pl, r)) return false;
  // SALAD_BWD_DQ_TILE=64|128: keys per streamed tile (default 64; see DqSmem).
  const bool t128 = env_is("SALAD_BWD_DQ_TILE", "128");
  bool ok;
  if (p.dtype == DType::BF16) {
    if (p.D == 128)
      ok = t128 ? launch_dq<__nv_bfloat16, 128, 128>(p, pl, r, ws, s) : launch_dq<__nv_bfloat16, 128, 64>(p, pl, r, ws, s);
    else
      ok = t128 ? launch_dq<__nv_bfloat16, 64, 128>(p, pl, r, ws, s) : launch_dq<__nv_bfloat16, 64, 64>(p, pl, r, ws, s);
  } else {
    if (p.D == 128)
      ok = t128 ? launch_dq<__half, 128, 128>(p, pl, r, ws, s) : launch_dq<__half, 128, 64>(p, pl, r, ws, s);
    else
      ok = t128 ? launch_dq<__half, 64, 128>(p, pl, r, ws, s) : launch_dq<__half, 64, 64>(p, pl, r, ws, s);
  }
  warn_once(ok, "dq");
  return ok;
}

int64_t bwd_ds_head_bytes(const Params& p, const Plan& pl) {
  return pl.n_q * std::max<int64_t>(pl.max_k, 1) * (p.opt.block_k / kTn) * ((p.opt.block_q + kRows - 1) / kRows) *
         (64 * 128 * 2);
}

int64_t bwd_ds_group(const Params& p, const Plan& pl) {
  if (env_is("SALAD_BWD_DS", "0") || env_is("SALAD_BWD_DQ", "mma") || env_is("SALAD_BWD_DKV", "mma") ||
      env_is("SALAD_BWD_DQ_TILE", "128"))
    return 0;
  if (pl.dense || pl.tile_order || pl.BH <= 0 || pl.n_q <= 0 || pl.max_k <= 0) return 0;
  if (p.opt.block_k % kTn != 0 || p.L % 4 != 0 || p.opt.block_q % 4 != 0 || !use_split(p)) return 0;
  BwdParams bp;
  static_cast<Params&>(bp) = p;
  RopeInfo r{};
  bp.block_idx = bp.block_cnt = reinterpret_cast<int32_t*>(16);  // checked at launch, not here
  if (!supported(bp, pl, r)) return 0;
  // The scratch grows as keep * L^2 per head, so it is capped (SALAD_BWD_DS_MB, default 4096 MB):
  // larger calls run in groups of heads of about equal size, and a call whose single head would pass
  // the cap takes the two-kernel path (no allocation beyond the cap).
  int64_t cap = int64_t{4096} << 20;
  if (const char* e = std::getenv("SALAD_BWD_DS_MB")) cap = std::max<int64_t>(1, std::atoll(e)) << 20;
  const int64_t per = bwd_ds_head_bytes(p, pl);
  if (per > cap) return 0;
  const int64_t most = std::min(cap / per, pl.BH), groups = (pl.BH + most - 1) / most;
  return (pl.BH + groups - 1) / groups;
}

bool try_launch_attn_bwd_ds_sm90(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (pl.ds_group <= 0 || !pl.ds_pos || !supported(p, pl, r) || r.perm) return false;
  if (reinterpret_cast<uintptr_t>(p.lse) % 16 != 0) return false;  // the dK/dV kernel's 1-D TMA of lse
  bool ok;
  if (p.dtype == DType::BF16)
    ok = p.D == 128 ? launch_ds<__nv_bfloat16, 128>(p, pl, r, ws, s) : launch_ds<__nv_bfloat16, 64>(p, pl, r, ws, s);
  else
    ok = p.D == 128 ? launch_ds<__half, 128>(p, pl, r, ws, s) : launch_ds<__half, 64>(p, pl, r, ws, s);
  warn_once(ok, "stored dS");
  return ok;
}

bool try_launch_attn_dkv_sm90(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (env_is("SALAD_BWD_DKV", "mma") || !supported(p, pl, r)) return false;
  if (reinterpret_cast<uintptr_t>(p.lse) % 16 != 0) return false;  // lse is read by 1-D TMA
  // ... from float bh * L + row (rows step by block_q and 64): a box that starts off a 16-byte
  // boundary faults ("illegal instruction", H200, L 245: LeanLinearEqualsEarlierCodeOnShortRows).
  if (p.L % 4 != 0 || p.opt.block_q % 4 != 0) return false;
  bool ok;
  if (p.dtype == DType::BF16)
    ok = p.D == 128 ? launch_dkv<__nv_bfloat16, 128>(p, pl, r, ws, s)
                    : launch_dkv<__nv_bfloat16, 64>(p, pl, r, ws, s);
  else
    ok = p.D == 128 ? launch_dkv<__half, 128>(p, pl, r, ws, s) : launch_dkv<__half, 64>(p, pl, r, ws, s);
  warn_once(ok, "dkv");
  return ok;
}

}  // namespace salad::cuda::detail
