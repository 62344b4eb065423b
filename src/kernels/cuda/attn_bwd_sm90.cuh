// Hopper-native (wgmma + TMA, warp-specialised) block-sparse attention backward.
#pragma once

#include "internal.cuh"

namespace salad::cuda::detail {

// Launch the sm_90a dQ (resp. dK/dV) kernel when the call fits it (bf16/fp16, D 64/128,
// block_k % 64 == 0, raster token order, compute capability 9.0) and the environment
// does not ask for the mma.sync kernel (SALAD_BWD_KERNEL=mma, SALAD_BWD_DQ=mma,
// SALAD_BWD_DKV=mma); return false (nothing launched) otherwise. Both read the
// workspace's qr/kr, delta and (dkv) inverse table and write p.dq (resp. p.dk, p.dv)
// exactly like attn_bwd.cu's kernels: rotated back, plus the linear branch's
// fp32 gradient when present, caller order.
bool try_launch_attn_dq_sm90(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);
bool try_launch_attn_dkv_sm90(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);
// Both at once through the stored dS (pl.ds_group > 0, see make_plan / bwd_ds_group): the dK/dV kernel
// also stores each kept pair's dS^T, then a dQ kernel does one GEMM per pair; in groups of heads.
bool try_launch_attn_bwd_ds_sm90(const BwdParams& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);

}  // namespace salad::cuda::detail
