// Internal interface between the CUDA translation units: the workspace plan
// (one place that decides where every temporary lives) and the launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "salad/params.h"

namespace salad::cuda::detail {

// Byte offsets of the temporaries inside the caller's workspace; 0-sized
// regions are absent. Offsets are 256-byte aligned.
struct Plan {
  int64_t BH = 0, L = 0, D = 0, n_q = 0, n_k = 0, max_k = 0;
  int64_t n_chunk = 0;  // linear branch: token chunks per (b, h) for the state sums
  int64_t chunk = 0;    // tokens per chunk, a multiple of 64
  bool dense = false, topk_select = false, linear = false, tile_order = false;
  // Forward in mode salad: the linear apply kernel (which reads q anyway) also writes qr and
  // per-16-token sums of qr for the query block means, so the rotation pass reads only k
  // (SALAD_FUSE_ROTATE=0 turns it off). The k rotation: fuse_k below.
  bool fuse_rotate = false;
  // The wgmma state kernel also writes kr (and, forward with Top-K, per-64-token sums of kr), so the
  // rotation pass skips k: forward with fuse_rotate and block_k % 64 == 0 (no rotation pass at all),
  // and the backward's state recomputation (SALAD_FUSE_K=0 turns it off).
  bool fuse_k = false;
  // Backward with the linear branch's RoPE on the bf16 wgmma kernels, feature map relu or elu+1: the
  // query-side kernel, which loads each row's rope3d table entries anyway, also writes qr, so the
  // rotation pass skips q when the linear gradient is given (SALAD_FUSE_Q_BWD=0 keeps the pass, for A/B).
  bool fuse_q = false;
  size_t rope = 0, perm = 0, qr = 0, kr = 0, qmean = 0, kmean = 0, qsum = 0, ksum = 0;
  size_t sv_part = 0, z_part = 0, sv = 0, z = 0;
  // Forward: the current device's SMs, and the Hopper sparse kernel's split tail (attn_fwd_sm90.cu):
  // one slot per SM, 128 rows of D + 1 floats (a piece's normalised output and its log2-sum-exp).
  int64_t sms = 0;
  size_t fwd_split = 0;
  // backward only
  size_t delta = 0, inv_off = 0, inv_rows = 0;
  // Stored dS (attn_bwd_sm90.cu): scratch for ds_group heads at a time (0: the path is off) and the
  // kept pairs' slot positions.
  int64_t ds_group = 0;
  size_t ds = 0, ds_pos = 0;
  size_t dnum = 0, dden = 0, dsv_part = 0, dz_part = 0, dsv = 0, dz = 0;
  size_t dq_l = 0, dk_l = 0, dv_l = 0;
  size_t total = 0;
};
Plan make_plan(const Params& p, bool backward);

// True when environment variable `name` is set to `value` (kernel switches, read per call).
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e && std::strcmp(e, value) == 0;
}
// Forward with Top-K, the k rotation fused into the state kernel and 64-key blocks: that kernel stores
// the key block means itself (its 64-token kr sums divided as tile_means_kernel does), so no key
// tile_means launch. SALAD_KMEAN=kernel keeps the launch (A/B).
bool kmean_from_state(const Params& p, const Plan& pl);

template <class X>
X* at(void* ws, size_t off) {
  return reinterpret_cast<X*>(static_cast<char*>(ws) + off);
}

// Rope table and block permutation (device-computed, no host uploads).
RopeInfo prepare_order_and_rope(const Params& p, const Plan& pl, void* ws, cudaStream_t s);

// qr/kr (rotated, block order, contiguous (BH, L, D)) and optional block means; q only when q_too,
// k only when k_too.
void launch_rotate(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, bool means, cudaStream_t s,
                   bool q_too = true, bool k_too = true);
// Block means from the fused rotations' tile sums: queries from the apply kernel's 16-token sums
// (plan.fuse_rotate), keys from the state kernel's 64-token sums (plan.fuse_k).
void launch_tile_means(const Params& p, const Plan& pl, void* ws, bool keys, cudaStream_t s);
// Top-K table (or window table) into p.block_idx / p.block_cnt.
// from_qsum: the tensor-core kernel (mma_select) sums the query block means from pl.qsum itself.
void launch_select(const Params& p, const Plan& pl, void* ws, cudaStream_t s, bool from_qsum = false);
bool mma_select(const Params& p, const Plan& pl);
// Inverse table for the backward.
void launch_invert(const Params& p, const Plan& pl, void* ws, cudaStream_t s);
// The Hopper backward's stored-dS path (attn_bwd_sm90.cu): heads per group when it applies to the call
// (else 0), and its scratch bytes per head.
int64_t bwd_ds_group(const Params& p, const Plan& pl);
int64_t bwd_ds_head_bytes(const Params& p, const Plan& pl);

// Sparse / dense attention over the block table (forward and backward).
void launch_attn_fwd(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);
void launch_attn_bwd(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);

// Linear branch.
bool linear_uses_mma(DType t);  // the bf16 tensor-core kernels (which can fuse the rotation)
void launch_linear_fwd(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);
void launch_linear_bwd(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);

}  // namespace salad::cuda::detail
