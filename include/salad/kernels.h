// Entry points of the torch-free kernel layer.
#pragma once

#include <cstddef>

#include "salad/params.h"

namespace salad::cpu {

// Readable reference, written for clarity (T = double or float; dtype must match).
// Computes the block table unless p.blocks_given.
template <class T>
void reference_forward(const Params& p);
template <class T>
void reference_backward(const BwdParams& p);

// Fast path: blocked and multi-threaded, float32 only.
void fast_forward(const Params& p);
void fast_backward(const BwdParams& p);

// Only the block table (float32 or float64 inputs).
void select_blocks(const Params& p);

}  // namespace salad::cpu

namespace salad::cuda {

// True when this build has the CUDA kernels compiled in.
bool compiled();

// Device workspace a call needs (bytes); the caller allocates it on the device.
size_t forward_workspace_bytes(const Params& p);
size_t backward_workspace_bytes(const BwdParams& p);

// bf16 / fp16 inputs on the device; stream is a cudaStream_t.
void forward(const Params& p, void* workspace, void* stream);
void backward(const BwdParams& p, void* workspace, void* stream);
void select_blocks(const Params& p, void* workspace, void* stream);

}  // namespace salad::cuda
