// Stands in for the CUDA kernels in builds without nvcc (SALAD_CUDA=OFF).
#include "salad/kernels.h"
#include "salad/layout.h"

namespace salad::cuda {
namespace {
[[noreturn]] void missing() { throw ArgumentError("device: this build has no CUDA kernels (configure with -DSALAD_CUDA=ON)"); }
}  // namespace
bool compiled() { return false; }
size_t forward_workspace_bytes(const Params&) { missing(); }
size_t backward_workspace_bytes(const BwdParams&) { missing(); }
void forward(const Params&, void*, void*) { missing(); }
void backward(const BwdParams&, void*, void*) { missing(); }
void select_blocks(const Params&, void*, void*) { missing(); }
}  // namespace salad::cuda
