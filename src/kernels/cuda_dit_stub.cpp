// Stands in for the fused DiT kernels (src/kernels/cuda/dit.cu) in builds without nvcc (SALAD_CUDA=OFF).
#include <stdexcept>

#include "salad/dit_kernels.h"

namespace salad::cuda::dit {
namespace {
[[noreturn]] void missing() {
  throw std::runtime_error("salad::cuda::dit: this build has no CUDA kernels (configure with -DSALAD_CUDA=ON)");
}
}  // namespace
bool compiled() { return false; }
int64_t max_channels() { return 0; }
bool supported_channels(int64_t) { return false; }
void residual_norm(const RowArgs&, void*) { missing(); }
void modulated_norm(const float*, void*, DType, int64_t, int64_t, int64_t, PerSample, PerSample, float, void*) {
  missing();
}
void gated_residual(const float*, const void*, DType, PerSample, float*, int64_t, int64_t, int64_t, void*) {
  missing();
}
void layer_norm_affine(const float*, const float*, const float*, void*, DType, int64_t, int64_t, float, void*) {
  missing();
}
void rms_norm(const void*, int64_t, const void*, void*, int64_t, DType, int64_t, int64_t, float, void*) { missing(); }
}  // namespace salad::cuda::dit
