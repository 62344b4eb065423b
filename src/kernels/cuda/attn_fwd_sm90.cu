// Hopper-native (sm_90a) block-sparse FlashAttention forward: TMA loads of
// Q/K/V tiles into 128-byte-swizzled shared memory on mbarriers, a producer
// warpgroup (setmaxnreg 24) and two consumer warpgroups (setmaxnreg 240), each
// owning 64 of the CTA's 128 query rows. A key tile holds 128 keys gathered from
// two 64-key halves of kept blocks (a missing second half is loaded past the end
// of the sequence, which TMA fills with zeros). S = Q K^T (m64n128k16, both
// operands from shared memory: Q stays resident, double-buffered across work
// items) and O += P V (m64nDk16, P from registers, V through the transposed
// "MN-major" descriptor) run on wgmma, with the QK^T of tile t issued together
// with the PV of tile t-1 (FA3's intra-warpgroup order; ptxas hoists the PV wait
// above the softmax, so the overlap that remains is across the two warpgroups, and
// forcing the in-warpgroup one measured slower, docs/PERF.md); P is kept in fp32 in
// the S registers until the PV that reads the previous P is done. O's rescale for the previous
// tile's row max and the wait for its V stage sit between the QK^T and PV issues, where the warps
// wait for the tensor cores anyway, and the row maxima are trees (FA3's order; H200, Wan1.3B-480p:
// 1,054 -> 1,035 us, SALAD_SM90_RESCALE=late restores the old order). K and V stages are released separately (K
// once its QK^T is done). Persistent CTAs (one per SM) walk the work items
// (b*h, 128-row query tile) head-major; the producer loads the next item's Q and
// K/V while the consumers finish the current one. Same semantics as
// attn_fwd.cu's mma.sync kernel: kept key blocks of p.block_idx / p.block_cnt
// (or all blocks in mode dense), exp2 online softmax, o_s and lse (natural log)
// in caller order.
//
// Measured against the earlier 64-key version (Q in registers, two P register
// sets), H100, Wan1.3B-480p: 1.375 -> 1.27 ms. The 64-key tile in this layout
// took 1.53 ms; FA3's warpgroup turn-taking (scheduler barriers) 1.43 ms.
//
// Limits (else launch_attn_fwd keeps the mma.sync kernel): bf16/fp16, D 64 or
// 128, block_k a multiple of 64 (any block_q), raster token order (V is read
// in place by TMA, which cannot gather through the tile-order permutation).
// env SALAD_FWD_KERNEL=mma forces the mma.sync kernel; SALAD_SM90_PERSISTENT=0
// launches one CTA per work item; SALAD_SM90_GRID=N caps the persistent grid
// (testing); SALAD_SM90_VSWAP=1 swaps the V descriptor's LBO/SBO (debugging); SALAD_SM90_SPLIT=0
// keeps the last, partial round of items whole (see tail_split); SALAD_SM90_HANDOVER=1 issues each
// item's first QK^T with the previous item's last PV, so it runs during that item's epilogue (HO;
// not the default: 3.5-5% slower on four H200s, 2.5% faster on a fifth; docs/PERF.md,
// session 16).
#include <climits>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attn_fwd_sm90.cuh"
#include "sm90_common.cuh"

namespace salad::cuda::detail {
namespace {
using namespace sm90;  // wgmma / mbarrier / TMA helpers and the tensor-map encoder (sm90_common.cuh)

constexpr int kM = 128;        // query rows per CTA (2 consumer warpgroups x 64)
constexpr int KN = 128;        // keys per tile: two 64-key halves, each from its own kept block
constexpr int kThreads = 384;  // warpgroup 0: producer; 1, 2: consumers

struct Sm90Args {
  void* o;
  float* lse;
  const int32_t* idx;
  const int32_t* cnt;
  int64_t L, n_q, n_k, max_k, block_q, block_k, H;
  int64_t o_sb, o_sh, o_st;  // output strides (batch, head, token), Params::out_strides
  int sub_q, halves_per_block, dense, v_swap;  // halves: 64-key rows of a key block
  int early_rescale;  // O's rescale between the QK^T and PV issues (SALAD_SM90_RESCALE=late: after the softmax)
  int lazy;           // the running max moves only by more than 2^8 (see softmax); SALAD_SM90_LAZY=0: off
  int num_work;  // entries: the items before `full`, then `split` pieces of each later item
  FastDiv div_per_bh, div_sub_q, div_split, div_H;  // n_q * sub_q, sub_q, split, H
  int full, split;  // see tail_split(); split 1: no pieces
  float* part;      // split > 1: per piece 128 x D normalised outputs, then 128 log2-sum-exps
  float scale_log2;
};

// The items' last round of CTAs is partial when the item count is not a multiple of the grid
// (Wan1.3B-480p: 3,072 items on 132 SMs, 24 rounds where 23.3 would do, ~3% of the kernel). The
// items of that round (`rem` of them) are split by key tiles into `split` pieces each, so they fill
// the grid; each piece writes its normalised output and log-sum-exp, and fwd_combine_kernel merges
// them. Returns {full, split}: entries below `full` are whole items.
struct TailSplit {
  int64_t full = 0, split = 1;
};
TailSplit tail_split(int64_t work, int64_t grid, int64_t tiles_per_item, int64_t slots) {
  TailSplit t;
  t.full = work;
  if (grid <= 0 || work <= 0) return t;
  const int64_t rem = work % grid;
  if (rem == 0) return t;
  const int64_t sp = imin64(imin64(grid / rem, slots / rem), imin64(8, tiles_per_item / 2));
  if (sp < 2) return t;
  t.full = work - rem;
  t.split = sp;
  return t;
}

// Shared memory (1024-byte aligned): two Q buffers [D/64][128 rows][128 B] (the
// item's Q stays there for the SS QK^T while the next item's Q loads into the
// other; the finished item's output is staged in its own Q buffer), K and V stages
// [stages][D/64][KN rows][128 B] (TMA 128-byte swizzle), then the mbarriers
// (8-byte aligned). A KN-key tile is made of KN/64 "halves" of 64 keys, each from
// its own kept block (or part of one), so a 128-key tile gathers two 64-key blocks.
template <int D>
struct Smem {
  static constexpr int kStages = D == 64 ? 4 : 2;  // K and V stages are released separately
  static constexpr int kQ = kM * D * 2;
  static constexpr int kTile = KN * D * 2;
  static constexpr int kSub = KN * 128;  // one KN-row x 128-byte sub-tile (64 columns of D)
  static constexpr int kHalf = 64 * 128;  // one 64-row part of a sub-tile
  static constexpr int kK = 2 * kQ;
  static constexpr int kV = kK + kStages * kTile;
  static constexpr int kBar = kV + kStages * kTile;
  static constexpr int kBytes = kBar + 8 * (4 * kStages + 4);
  static constexpr int kAlloc = kBytes + 1024;  // slack for aligning the dynamic base
};

template <class T, int D, bool HO>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                         const __grid_constant__ CUtensorMap tv, const Sm90Args a) {
  static_assert(D == 64 || D == 128, "head width 64 or 128");
  using S = Smem<D>;
  constexpr int kStages = S::kStages;
  constexpr int NH = D / 64;
  constexpr int HT = KN / 64;  // halves per tile
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = base + S::kK, sV = base + S::kV, sBar = base + S::kBar;
  auto fullK = [&](int s) { return sBar + 8u * s; };
  auto fullV = [&](int s) { return sBar + 8u * (kStages + s); };
  auto emptyK = [&](int s) { return sBar + 8u * (2 * kStages + s); };  // K read by QK (released early)
  auto emptyV = [&](int s) { return sBar + 8u * (3 * kStages + s); };  // V read by PV
  auto barQ = [&](int b) { return sBar + 8u * (4 * kStages + b); };          // Q buffer b landed
  auto barQfree = [&](int b) { return sBar + 8u * (4 * kStages + 2 + b); };  // Q buffer b's item done
  auto sQb = [&](int b) { return sQ + static_cast<uint32_t>(b * S::kQ); };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Persistent CTAs: work item w = (bh, query block, 128-row part), w = blockIdx.x + k * gridDim.x.
  // Producer and consumers walk the same items; tile and item counters run on across items, so
  // the producer loads the next item's Q and first K/V tiles while the consumers finish this one.
  struct Item {
    int64_t bh, row0, row_end;
    const int32_t* list;
    int nhalf, ntiles;
    int t0, t1;  // key tiles of this entry (a piece: part of them)
    int piece;   // -1: a whole item; else the piece's slot in a.part
  };
  // Entry e -> its item (32-bit divisions by launch-time constants: every thread evaluates this once
  // per entry; the 64-bit divisions it used to do were ~1% of the kernel's warp instructions).
  auto item = [&](int e) {
    Item it;
    uint32_t w = static_cast<uint32_t>(e), k = 0;
    it.piece = -1;
    if (e >= a.full) {
      const uint32_t r = static_cast<uint32_t>(e - a.full), wq = a.div_split.div(r);
      w = static_cast<uint32_t>(a.full) + wq, k = r - wq * a.div_split.d;
      it.piece = static_cast<int>(r);
    }
    const uint32_t bh = a.div_per_bh.div(w), x = w - bh * a.div_per_bh.d;
    const uint32_t qi = a.div_sub_q.div(x), sub = x - qi * a.div_sub_q.d;
    it.bh = bh;
    it.row0 = int64_t(qi) * a.block_q + int64_t(sub) * kM;
    it.row_end = imin64(imin64(it.row0 + kM, (int64_t(qi) + 1) * a.block_q), a.L);
    const int64_t row = it.bh * a.n_q + qi;
    const int64_t nblk = it.row0 >= it.row_end ? 0 : (a.dense ? a.n_k : a.cnt[row]);
    it.list = a.dense ? nullptr : a.idx + row * a.max_k;
    it.nhalf = static_cast<int>(nblk) * a.halves_per_block;
    it.ntiles = (it.nhalf + HT - 1) / HT;
    it.t0 = 0, it.t1 = it.ntiles;
    if (it.piece >= 0) {
      it.t0 = static_cast<int>(a.div_split.div(static_cast<uint32_t>(it.ntiles) * k));
      it.t1 = static_cast<int>(a.div_split.div(static_cast<uint32_t>(it.ntiles) * (k + 1)));
    }
    return it;
  };

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(fullK(s), 1);
      mbar_init(fullV(s), 1);
      mbar_init(emptyK(s), 8);  // one arrival per consumer warp
      mbar_init(emptyV(s), 8);
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(barQ(b), 1);
      mbar_init(barQfree(b), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // ================= producer warpgroup: one thread issues every TMA load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (warp == 0 && lane == 0) {
      tma_prefetch(&tq);
      tma_prefetch(&tk);
      tma_prefetch(&tv);
      int gt = 0, n = 0;  // tiles / items issued so far
      for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
        const Item it = item(w);
        if (it.row0 >= it.row_end) continue;
        const int bh = static_cast<int>(it.bh);
        const int b = static_cast<int>(a.div_H.div(static_cast<uint32_t>(it.bh))), h = bh - b * static_cast<int>(a.H);
        const int qb = n & 1;
        mbar_wait(barQfree(qb), ((n >> 1) & 1) ^ 1);
        mbar_expect_tx(barQ(qb), S::kQ);
#pragma unroll
        for (int hh = 0; hh < NH; ++hh)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            tma_load_3d(sQb(qb) + hh * (kM * 128) + r * (64 * 128), &tq, hh * 64, static_cast<int>(it.row0 + r * 64),
                        bh, barQ(qb));
        for (int t = it.t0; t < it.t1; ++t, ++gt) {
          const int s = gt % kStages;
          const uint32_t ph = ((gt / kStages) & 1) ^ 1;
          int rows[HT];  // first key row of each half (the item's last tile may lack its second half)
#pragma unroll
          for (int x = 0; x < HT; ++x) {
            const int u = t * HT + x;
            if (u < it.nhalf) {
              const int c = u / a.halves_per_block;
              const int64_t j = a.dense ? c : it.list[c];
              rows[x] = static_cast<int>(j * a.block_k + (u % a.halves_per_block) * 64);
            } else {
              rows[x] = static_cast<int>(a.L);  // past the end: TMA fills zeros (P is 0 there, 0 * 0 = 0)
            }
          }
          mbar_wait(emptyK(s), ph);
          mbar_expect_tx(fullK(s), S::kTile);
#pragma unroll
          for (int x = 0; x < HT; ++x)
#pragma unroll
            for (int hh = 0; hh < NH; ++hh)
              tma_load_3d(sK + s * S::kTile + hh * S::kSub + x * S::kHalf, &tk, hh * 64, rows[x], bh, fullK(s));
          mbar_wait(emptyV(s), ph);
          mbar_expect_tx(fullV(s), S::kTile);
#pragma unroll
          for (int x = 0; x < HT; ++x)
#pragma unroll
              for (int hh = 0; hh < NH; ++hh)
                tma_load_4d(sV + s * S::kTile + hh * S::kSub + x * S::kHalf, &tv, hh * 64, rows[x], h, b, fullV(s));
        }
        ++n;
      }
    }
  } else {
    // ================= consumer warpgroups
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int cw = warp - 4;   // consumer warp 0..7
    const int cwg = cw / 4;    // consumer warpgroup: CTA rows 64 * cwg ..
    const int wrow = cw * 16;  // first CTA row of this warp (rows wrow + g, wrow + g + 8)
    const int g = lane >> 2, tq4 = lane & 3;
    const float sl2 = a.scale_log2;
    const uint32_t vlbo = a.v_swap ? 1024u : static_cast<uint32_t>(S::kSub);
    const uint32_t vsbo = a.v_swap ? static_cast<uint32_t>(S::kSub) : 1024u;

    const bool tree_max = a.early_rescale != 0;  // goes with the early rescale (one switch, one A/B)
    const bool lazy = a.lazy != 0;
    bool resc = true;  // the last softmax moved some row max of this warp (always, unless LAZY)
    float o[D / 2];
    float sacc[KN / 2];  // S, then (in place) the unnormalised probabilities, fp32
    float m0, m1, l0, l1;
    uint32_t pf[KN / 16][4];  // P as the A operand of PV (converted once the previous PV is done)

    auto issue_qk = [&](uint32_t q, int s) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t aaddr = q + (kk / 4) * (kM * 128) + cwg * (64 * 128) + (kk % 4) * 32;
        const uint32_t baddr = sK + s * S::kTile + (kk / 4) * S::kSub + (kk % 4) * 32;
        wgmma_ss<T, KN>(sacc, desc_sw128(aaddr, 16, 1024), desc_sw128(baddr, 16, 1024), kk > 0);
      }
    };
    auto issue_pv = [&](int s) {
#pragma unroll
      for (int kk = 0; kk < KN / 16; ++kk) {
        const uint32_t addr = sV + s * S::kTile + kk * 16 * 128;
        wgmma_rs<T, D, 1>(o, pf[kk], desc_sw128(addr, vlbo, vsbo), 1);
      }
    };
    // Online softmax of sacc (this thread: rows g and g + 8 of the warp), probabilities in place.
    auto softmax = [&](int valid, float& c0, float& c1) {
      if (valid < KN) {
#pragma unroll
        for (int nt = 0; nt < KN / 8; ++nt) {
          const int col = nt * 8 + 2 * tq4;
          if (col >= valid) sacc[4 * nt] = sacc[4 * nt + 2] = -INFINITY;
          if (col + 1 >= valid) sacc[4 * nt + 1] = sacc[4 * nt + 3] = -INFINITY;
        }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
      if (tree_max) {
        // Row maxima as trees (5 dependent steps, not 32): they gate every exp2 of the tile.
        float r0[KN / 8], r1[KN / 8];
#pragma unroll
        for (int nt = 0; nt < KN / 8; ++nt) {
          r0[nt] = fmaxf(sacc[4 * nt], sacc[4 * nt + 1]);
          r1[nt] = fmaxf(sacc[4 * nt + 2], sacc[4 * nt + 3]);
        }
        static_assert(KN == 128, "four tree levels over 16 column chunks");
#pragma unroll
        for (int i = 0; i < 8; ++i) r0[i] = fmaxf(r0[i], r0[i + 8]), r1[i] = fmaxf(r1[i], r1[i + 8]);
#pragma unroll
        for (int i = 0; i < 4; ++i) r0[i] = fmaxf(r0[i], r0[i + 4]), r1[i] = fmaxf(r1[i], r1[i + 4]);
#pragma unroll
        for (int i = 0; i < 2; ++i) r0[i] = fmaxf(r0[i], r0[i + 2]), r1[i] = fmaxf(r1[i], r1[i + 2]);
        r0[0] = fmaxf(r0[0], r0[1]), r1[0] = fmaxf(r1[0], r1[1]);
        mx0 = r0[0], mx1 = r1[0];
      } else {
#pragma unroll
        for (int nt = 0; nt < KN / 8; ++nt) {
          mx0 = fmaxf(mx0, fmaxf(sacc[4 * nt], sacc[4 * nt + 1]));
          mx1 = fmaxf(mx1, fmaxf(sacc[4 * nt + 2], sacc[4 * nt + 3]));
        }
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      float mn0 = fmaxf(m0, mx0 * sl2), mn1 = fmaxf(m1, mx1 * sl2);
      if (lazy) {
        // LAZY (FA4's conditional rescale, the default): the running max moves only when the tile's
        // exceeds it by more than 2^8 (so P <= 256), and O is rescaled only when some row of the warp
        // moved; the final O / l and m + log2(l) are the same math with another reference point.
        // Session 17, H200: the kernel 1,031-1,040 -> 1,001-1,006 us at Wan1.3B-480p.
        if (!(mx0 * sl2 > m0 + 8.f)) mn0 = m0;
        if (!(mx1 * sl2 > m1 + 8.f)) mn1 = m1;
        resc = __any_sync(0xffffffffu, mn0 != m0 || mn1 != m1);
      }
      const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;
      c0 = ex2(m0 - ms0);
      c1 = ex2(m1 - ms1);
      m0 = mn0;
      m1 = mn1;
      float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
      for (int nt = 0; nt < KN / 8; ++nt) {
        sacc[4 * nt] = ex2(fmaf(sacc[4 * nt], sl2, -ms0));
        sacc[4 * nt + 1] = ex2(fmaf(sacc[4 * nt + 1], sl2, -ms0));
        sacc[4 * nt + 2] = ex2(fmaf(sacc[4 * nt + 2], sl2, -ms1));
        sacc[4 * nt + 3] = ex2(fmaf(sacc[4 * nt + 3], sl2, -ms1));
        rs0 += sacc[4 * nt] + sacc[4 * nt + 1];
        rs1 += sacc[4 * nt + 2] + sacc[4 * nt + 3];
      }
      l0 = l0 * c0 + rs0;
      l1 = l1 * c1 + rs1;
    };
    // sacc -> pf: the A fragment of m64k16 chunk nt / 2 takes a0/a1 from the even n8 chunk and
    // a2/a3 from the odd one.
    auto pack_p = [&]() {
#pragma unroll
      for (int nt = 0; nt < KN / 8; ++nt) {
        pf[nt / 2][(nt & 1) * 2 + 0] = Elem<T>::pack(sacc[4 * nt], sacc[4 * nt + 1]);
        pf[nt / 2][(nt & 1) * 2 + 1] = Elem<T>::pack(sacc[4 * nt + 2], sacc[4 * nt + 3]);
      }
    };
    auto rescale = [&](float c0, float c1) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[4 * i] *= c0;
        o[4 * i + 1] *= c0;
        o[4 * i + 2] *= c1;
        o[4 * i + 3] *= c1;
      }
    };
    auto arrive = [&](uint32_t bar) {
      if (lane == 0) mbar_arrive(bar);
    };

    // Valid keys of tile t (< KN only in the tiles of the sequence's last key block, which an
    // ascending list has last, or in a last tile with fewer than HT halves). Computed here rather
    // than passed through shared memory, so no stage slot is shared across the mbarrier; the list is
    // read once per item, not per tile (a global load there stalls the softmax by the L2 latency).
    struct Tail {
      int u = INT_MAX;  // first half of the sequence's last key block, if the item keeps it
      int64_t key = 0;  // its first key
    };
    auto tail_of = [&](const Item& x) {
      Tail tl;
      if (x.ntiles > 0) {
        const int nblk = x.nhalf / a.halves_per_block;
        const int64_t jl = a.dense ? a.n_k - 1 : x.list[nblk - 1];
        if (jl == a.n_k - 1) tl.u = (nblk - 1) * a.halves_per_block, tl.key = jl * a.block_k;
      }
      return tl;
    };
    auto valid_at = [&](const Item& x, const Tail& tl, int t) {
      int v = 0;
#pragma unroll
      for (int h = 0; h < HT; ++h) {
        const int u = t * HT + h;
        const int vh = u >= x.nhalf ? 0
                       : u < tl.u   ? 64
                                    : static_cast<int>(imax64(0, imin64(64, a.L - (tl.key + int64_t(u - tl.u) * 64))));
        v += vh;
      }
      return v;
    };
    auto reset = [&]() {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
      m0 = m1 = -INFINITY;
      l0 = l1 = 0.f;
    };

    int gt = 0, n = 0;  // tiles / items consumed so far (same sequence as the producer)
    // HO (hand-over): the next item's first QK^T is issued right after this item's last PV and
    // runs during this item's epilogue; its softmax follows the epilogue, so the next item starts
    // `primed` (its first tile done, P packed) instead of with a lone QK^T and softmax.
    bool primed = false;
    Item nx;                   // HO: the next entry and its tail (computed at the hand-over, reused)
    Tail ntl;
    float c0 = 1.f, c1 = 1.f;  // O's rescale for the last softmax's new row max
    for (int w = blockIdx.x; w < a.num_work; w += gridDim.x) {
      const Item it = primed ? nx : item(w);
      if (it.row0 >= it.row_end) continue;
      const Tail tl = primed ? ntl : tail_of(it);
      const int qb = n & 1;
      const uint32_t q = sQb(qb);
      const int t0 = it.t0, nt = it.t1 - it.t0;  // this entry's tiles (all of the item's, or a piece's)
      if (!primed) {
        mbar_wait(barQ(qb), (n >> 1) & 1);
        reset();
        if (nt > 0) {
          const int s0 = gt % kStages;
          mbar_wait(fullK(s0), (gt / kStages) & 1);
          fence_regs<KN / 2>(sacc);
          wgmma_fence();
          issue_qk(q, s0);
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs<KN / 2>(sacc);
          arrive(emptyK(s0));
          softmax(valid_at(it, tl, t0), c0, c1);
          pack_p();
        }
      }
      // ---- epilogue: normalise and store this entry (called once per entry, on the hand-over path or not)
      auto epilogue = [&]() {
        // Stages this warp's 16 rows in its own rows of the item's Q buffer (this warpgroup's QK^T
        // of the item are done; the other one reads other rows; a handed-over QK^T reads the other
        // buffer), then 16-byte stores.
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
        if (it.piece >= 0) {
          // A piece of a split item: its normalised output (fp32) and log2-sum-exp (-inf where it saw
          // no key) to its slot, for fwd_combine_kernel; rows past the item's end are never read.
          float* po = a.part + int64_t(it.piece) * (kM * (D + 1));
          const int r0 = wrow + g, r1 = r0 + 8;
#pragma unroll
          for (int i = 0; i < D / 8; ++i) {
            const int col = 8 * i + 2 * tq4;
            *reinterpret_cast<float2*>(po + r0 * D + col) = make_float2(o[4 * i] * inv0, o[4 * i + 1] * inv0);
            *reinterpret_cast<float2*>(po + r1 * D + col) = make_float2(o[4 * i + 2] * inv1, o[4 * i + 3] * inv1);
          }
          if (tq4 == 0) {
            po[kM * D + r0] = l0 > 0.f ? m0 + log2f(l0) : -INFINITY;
            po[kM * D + r1] = l1 > 0.f ? m1 + log2f(l1) : -INFINITY;
          }
          __syncwarp();
          if (lane == 0) mbar_arrive(barQfree(qb));
        } else {
#pragma unroll
          for (int i = 0; i < D / 8; ++i) {
            const int hh = i / 8, ch = i % 8;
            const int r0 = wrow + g, r1 = wrow + g + 8;
            const uint32_t a0 = q + hh * (kM * 128) + r0 * 128 + ((ch ^ (r0 & 7)) << 4) + tq4 * 4;
            const uint32_t a1 = q + hh * (kM * 128) + r1 * 128 + ((ch ^ (r1 & 7)) << 4) + tq4 * 4;
            asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a0),
                         "r"(Elem<T>::pack(o[4 * i] * inv0, o[4 * i + 1] * inv0))
                         : "memory");
            asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a1),
                         "r"(Elem<T>::pack(o[4 * i + 2] * inv1, o[4 * i + 3] * inv1))
                         : "memory");
          }
          __syncwarp();
          const int64_t ob = a.div_H.div(static_cast<uint32_t>(it.bh));
          T* out = static_cast<T*>(a.o) + ob * a.o_sb + (it.bh - ob * a.H) * a.o_sh;
          constexpr int CH = D / 8;
#pragma unroll
          for (int k = 0; k < 16 * CH / 32; ++k) {
            const int e = k * 32 + lane, rr = e / CH, cc = e % CH;
            const int r = wrow + rr;
            const uint32_t src = q + (cc / 8) * (kM * 128) + r * 128 + (((cc % 8) ^ (r & 7)) << 4);
            uint4 v;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                         : "r"(src)
                         : "memory");
            const int64_t gr = it.row0 + r;
            if (gr < it.row_end) *reinterpret_cast<uint4*>(out + gr * a.o_st + cc * 8) = v;
          }
          __syncwarp();
          if (lane == 0) mbar_arrive(barQfree(qb));  // the producer may load item n + 2's Q here
          if (tq4 == 0) {
            constexpr float kLn2 = 0.6931471805599453f;
            const int64_t gr0 = it.row0 + wrow + g, gr1 = gr0 + 8;
            if (gr0 < it.row_end) a.lse[it.bh * a.L + gr0] = l0 > 0.f ? (m0 + log2f(l0)) * kLn2 : INFINITY;
            if (gr1 < it.row_end) a.lse[it.bh * a.L + gr1] = l1 > 0.f ? (m1 + log2f(l1)) * kLn2 : INFINITY;
          }
        }
      };
      primed = false;
      bool hand = false;  // HO: the next entry's first QK^T goes with this entry's last PV
      if (nt > 0) {
        // Tile t: QK_t and PV_{t-1} issued together, then the softmax of S_t (ptxas places the PV
        // wait before it, see the header); P_t is packed into pf once PV_{t-1} (which reads pf) is
        // done. early (default): O's rescale for S_{t-1} and the wait for V_{t-1} come between the
        // two issues, where the warps wait for the tensor cores anyway (FA3's order), not after the
        // softmax on the critical path; SALAD_SM90_RESCALE=late keeps them after it.
        const bool early = a.early_rescale != 0;
        for (int t = 1; t < nt; ++t) {
          const int u = gt + t;
          const int s = u % kStages, ps = (u - 1) % kStages;
          mbar_wait(fullK(s), (u / kStages) & 1);
          if (!early) mbar_wait(fullV(ps), ((u - 1) / kStages) & 1);  // loaded with K_{t-1}
          fence_regs<D / 2>(o);
          fence_regs<KN / 2>(sacc);
          fence_regs_u<KN / 4>(&pf[0][0]);
          wgmma_fence();
          issue_qk(q, s);
          wgmma_commit();
          if (early) {
            // While QK_t runs: O rescaled for S_{t-1}'s new row max, then V_{t-1}'s wait.
            if (resc) rescale(c0, c1);
            mbar_wait(fullV(ps), ((u - 1) / kStages) & 1);
            fence_regs<D / 2>(o);
            wgmma_fence();
          }
          issue_pv(ps);
          wgmma_commit();
          wgmma_wait<1>();
          fence_regs<KN / 2>(sacc);
          arrive(emptyK(s));
          softmax(valid_at(it, tl, t0 + t), c0, c1);
          wgmma_wait<0>();
          fence_regs<D / 2>(o);
          fence_regs_u<KN / 4>(&pf[0][0]);
          arrive(emptyV(ps));
          pack_p();
          if (!early && resc) rescale(c0, c1);
        }
        const int lu = gt + nt - 1, ls = lu % kStages;
        if (early && resc) rescale(c0, c1);
        mbar_wait(fullV(ls), (lu / kStages) & 1);
        fence_regs<D / 2>(o);
        fence_regs_u<KN / 4>(&pf[0][0]);
        wgmma_fence();
        issue_pv(ls);
        wgmma_commit();
        if (HO && w + static_cast<int>(gridDim.x) < a.num_work) {
          nx = item(w + gridDim.x);
          hand = nx.row0 < nx.row_end && nx.t1 > nx.t0;
        }
        // The two paths each run the epilogue (ptxas serialises every wgmma of the kernel when the
        // hand-over's issue and its wait sit under two separate tests of `hand`).
        if (HO && hand) {
          const int un = gt + nt, snx = un % kStages;
          mbar_wait(barQ(qb ^ 1), ((n + 1) >> 1) & 1);
          mbar_wait(fullK(snx), (un / kStages) & 1);
          fence_regs<KN / 2>(sacc);
          wgmma_fence();
          issue_qk(sQb(qb ^ 1), snx);
          wgmma_commit();
          wgmma_wait<1>();  // the PV (groups complete in order); the QK^T runs on through the epilogue
          fence_regs<D / 2>(o);
          fence_regs_u<KN / 4>(&pf[0][0]);
          arrive(emptyV(ls));
          gt += nt;
          epilogue();
          ++n;
          wgmma_wait<0>();
          fence_regs<KN / 2>(sacc);
          arrive(emptyK(snx));
          reset();
          ntl = tail_of(nx);
          softmax(valid_at(nx, ntl, nx.t0), c0, c1);
          pack_p();
          primed = true;
          continue;
        }
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        fence_regs_u<KN / 4>(&pf[0][0]);
        arrive(emptyV(ls));
        gt += nt;
      }
      epilogue();
      ++n;
    }
  }
}

// Merges the pieces of the split items (tail_split): per row, the pieces' outputs weighted by
// 2^(lse2_k - max) in piece order (deterministic), written as the kernel's epilogue writes o and lse.
// Grid (split items, kM / 8), 8 warps: one warp per row.
template <class T, int D>
__global__ void __launch_bounds__(256) fwd_combine_kernel(const Sm90Args a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.y * 8 + warp;
  const int64_t w = a.full + blockIdx.x, per_bh = a.n_q * a.sub_q;
  const int64_t bh = w / per_bh, x = w % per_bh, qi = x / a.sub_q, sub = x % a.sub_q;
  const int64_t row0 = qi * a.block_q + sub * kM;
  const int64_t row_end = imin64(imin64(row0 + kM, (qi + 1) * a.block_q), a.L);
  if (row0 + row >= row_end) return;
  constexpr int kSlot = kM * (D + 1), C = D / 32;
  const float* base = a.part + int64_t(blockIdx.x) * a.split * kSlot;
  float mx = -INFINITY;
  for (int k = 0; k < a.split; ++k) mx = fmaxf(mx, base[k * kSlot + kM * D + row]);
  float acc[C] = {}, wsum = 0.f;
  for (int k = 0; k < a.split; ++k) {
    const float lk = base[k * kSlot + kM * D + row];
    if (lk == -INFINITY) continue;
    const float wk = exp2f(lk - mx);
    wsum += wk;
    const float* src = base + k * kSlot + row * D + lane * C;
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = fmaf(wk, src[c], acc[c]);
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  const int64_t ob = bh / a.H;
  T* out = static_cast<T*>(a.o) + ob * a.o_sb + (bh - ob * a.H) * a.o_sh + (row0 + row) * a.o_st + lane * C;
#pragma unroll
  for (int c = 0; c < C; c += 2)
    *reinterpret_cast<uint32_t*>(out + c) = Elem<T>::pack(acc[c] * inv, acc[c + 1] * inv);
  if (lane == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
    a.lse[bh * a.L + row0 + row] = wsum > 0.f ? (mx + log2f(wsum)) * kLn2 : INFINITY;
  }
}

// ---------------------------------------------------------------- host side
template <class T, int D>
bool launch(const Params& p, const Plan& pl, void* ws, cudaStream_t s) {
  const cuuint64_t BH = static_cast<cuuint64_t>(pl.BH), L = static_cast<cuuint64_t>(p.L);
  CUtensorMap mq, mk, mv;
  const cuuint64_t dqk[3] = {static_cast<cuuint64_t>(D), L, BH};
  const cuuint64_t sqk[2] = {D * 2ull, L * D * 2ull};
  if (!make_map(&mq, p.dtype, 3, at<T>(ws, pl.qr), dqk, sqk)) return false;
  if (!make_map(&mk, p.dtype, 3, at<T>(ws, pl.kr), dqk, sqk)) return false;
  // V in place: (D, L, H, B) with the caller's strides (a size-1 dim's stride is never used).
  const cuuint64_t dv[4] = {static_cast<cuuint64_t>(D), L, static_cast<cuuint64_t>(p.H),
                            static_cast<cuuint64_t>(p.B)};
  cuuint64_t sv[3] = {static_cast<cuuint64_t>(p.v_stride[2]) * 2, static_cast<cuuint64_t>(p.v_stride[1]) * 2,
                      static_cast<cuuint64_t>(p.v_stride[0]) * 2};
  if (p.H == 1) sv[1] = 16;
  if (p.B == 1) sv[2] = 16;
  if (!make_map(&mv, p.dtype, 4, p.v, dv, sv)) return false;

  Sm90Args a;
  a.o = p.o_s;
  a.lse = p.lse;
  a.idx = p.block_idx;
  a.cnt = p.block_cnt;
  a.L = p.L;
  a.n_q = pl.n_q;
  a.n_k = pl.n_k;
  a.max_k = pl.max_k;
  a.block_q = p.opt.block_q;
  a.block_k = p.opt.block_k;
  a.H = p.H;
  const std::array<int64_t, 3> os = p.out_strides();
  a.o_sb = os[0], a.o_sh = os[1], a.o_st = os[2];
  a.sub_q = static_cast<int>((p.opt.block_q + kM - 1) / kM);
  a.halves_per_block = static_cast<int>(p.opt.block_k / 64);
  a.dense = pl.dense ? 1 : 0;
  a.v_swap = env_is("SALAD_SM90_VSWAP", "1");
  a.early_rescale = !env_is("SALAD_SM90_RESCALE", "late");
  a.lazy = !env_is("SALAD_SM90_LAZY", "0");
  a.scale_log2 = static_cast<float>(p.softmax_scale() * 1.4426950408889634);
  constexpr int smem = Smem<D>::kAlloc;
  auto kernel = env_is("SALAD_SM90_HANDOVER", "1") ? attn_fwd_sm90_kernel<T, D, true>  // the item hand-over (HO)
                                                    : attn_fwd_sm90_kernel<T, D, false>;
  SALAD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t work = pl.n_q * a.sub_q * pl.BH;
  const bool persistent = !env_is("SALAD_SM90_PERSISTENT", "0");  // "0": one CTA per work item
  int64_t cap = pl.sms;
  if (const char* g = std::getenv("SALAD_SM90_GRID")) cap = imax64(1, std::atoll(g));  // testing: fewer CTAs
  // The last round's items in pieces (persistent grid only; SALAD_SM90_SPLIT=0 turns it off).
  TailSplit ts;
  ts.full = work;
  if (persistent && !env_is("SALAD_SM90_SPLIT", "0")) {
    const int64_t blocks = pl.dense ? pl.n_k : pl.max_k;
    ts = tail_split(work, cap, (blocks * a.halves_per_block + 1) / 2, pl.sms);
  }
  const int64_t rem = work - ts.full, entries = ts.full + rem * ts.split;
  a.full = static_cast<int>(ts.full);
  a.split = static_cast<int>(ts.split);
  a.num_work = static_cast<int>(entries);
  a.part = ts.split > 1 ? at<float>(ws, pl.fwd_split) : nullptr;
  a.div_per_bh = FastDiv(static_cast<uint32_t>(pl.n_q * a.sub_q));
  a.div_sub_q = FastDiv(static_cast<uint32_t>(a.sub_q));
  a.div_split = FastDiv(static_cast<uint32_t>(a.split));
  a.div_H = FastDiv(static_cast<uint32_t>(p.H));
  const unsigned grid = static_cast<unsigned>(persistent ? imin64(entries, cap) : work);
  kernel<<<grid, kThreads, smem, s>>>(mq, mk, mv, a);
  SALAD_LAUNCH_CHECK();
  if (ts.split > 1) {
    fwd_combine_kernel<T, D><<<dim3(static_cast<unsigned>(rem), kM / 8), 256, 0, s>>>(a);
    SALAD_LAUNCH_CHECK();
  }
  return true;
}

}  // namespace

bool sm90_fwd_disabled() {
  return env_is("SALAD_FWD_KERNEL", "mma");
}

bool try_launch_attn_fwd_sm90(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s) {
  if (sm90_fwd_disabled()) return false;
  if (p.dtype != DType::BF16 && p.dtype != DType::F16) return false;
  if (p.D != 64 && p.D != 128) return false;
  if (r.perm) return false;  // tile order: V needs a gather
  if (p.opt.block_k % 64 != 0 || p.opt.block_q <= 0) return false;
  if (p.L >= (int64_t(1) << 31) - 2 * kM || pl.BH * pl.n_q * ((p.opt.block_q + kM - 1) / kM) >= (int64_t(1) << 31))
    return false;
  if (!pl.dense && (!p.block_idx || !p.block_cnt)) return false;
  bool ok;
  if (p.dtype == DType::BF16)
    ok = p.D == 128 ? launch<__nv_bfloat16, 128>(p, pl, ws, s) : launch<__nv_bfloat16, 64>(p, pl, ws, s);
  else
    ok = p.D == 128 ? launch<__half, 128>(p, pl, ws, s) : launch<__half, 64>(p, pl, ws, s);
  static bool warned = false;
  if (!ok && !warned) {
    warned = true;
    std::fprintf(stderr, "salad: sm90 attention forward: TMA descriptor setup failed, using the mma.sync kernel\n");
  }
  return ok;
}

}  // namespace salad::cuda::detail
