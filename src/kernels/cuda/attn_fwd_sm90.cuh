// Hopper-native (wgmma + TMA, warp-specialised) block-sparse attention forward.
#pragma once

#include "internal.cuh"

namespace salad::cuda::detail {

// Launches the sm_90a forward when the call fits it (bf16/fp16, D 64/128,
// block_k % 64 == 0, raster order) and SALAD_FWD_KERNEL is not "mma";
// returns false (nothing launched) otherwise.
bool try_launch_attn_fwd_sm90(const Params& p, const Plan& pl, const RopeInfo& r, void* ws, cudaStream_t s);
// True when env SALAD_FWD_KERNEL=mma forces the mma.sync kernel.
bool sm90_fwd_disabled();

}  // namespace salad::cuda::detail
