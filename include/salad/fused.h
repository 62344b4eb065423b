// Fused kernels for the glue of a Wan block (norms, modulation, gated
// residuals), with the eager LibTorch math as the fallback.
//
// Every function computes exactly the eager expression in its comment unless
// all of these hold, and then runs one CUDA kernel (src/kernels/cuda/dit.cu)
// that computes the same thing in one pass, in float32 with the eager
// rounding order (only the order of the row reductions differs):
//   - fusion is enabled (set_enabled; the default is on unless the
//     environment has SALAD_FUSED=0),
//   - the library has the CUDA kernels and the tensors are on a CUDA device,
//   - no autograd is needed: grad mode is off, or no input requires grad,
//   - dtypes, shapes and alignment are supported (float32 residual stream;
//     bf16 / fp16 / float32 activations; C a multiple of 8, at most 32768;
//     contiguous rows; per-sample vectors (B, 1, C) with unit channel stride).
// So CPU results, float64 models and training are the eager code bit for bit.
#pragma once

#include <torch/torch.h>

#include <utility>

namespace salad::fused {

// The global switch. enabled() is set_enabled's last value, else
// SALAD_FUSED != "0" (read once).
void set_enabled(bool on);
bool enabled();

// Sets the switch for a scope and restores the previous value.
class EnabledGuard {
 public:
  explicit EnabledGuard(bool on) : prev_(enabled()) { set_enabled(on); }
  ~EnabledGuard() { set_enabled(prev_); }
  EnabledGuard(const EnabledGuard&) = delete;
  EnabledGuard& operator=(const EnabledGuard&) = delete;

 private:
  bool prev_;
};

// True when the kernels are compiled into this library.
bool kernels_compiled();

// True when fused code may run for x and a module: fusion enabled, kernels
// compiled, x on CUDA, and no autograd needed (grad mode off, or neither x
// nor any parameter of `m` requires grad). The layers use it to pick their
// inference path (fewer temporaries, fused GEMM epilogues).
bool inference_path(const at::Tensor& x, const torch::nn::Module& m);

// (a) (LN(x) * (1 + scale) + shift).to(out_dtype); LN without affine over the
// last dim. x: (B, ..., C) float32; shift, scale broadcast like (B, 1, C).
at::Tensor modulated_norm(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                          at::ScalarType out_dtype);

// (b) x + y.to(x.dtype) * gate, or x + y.to(x.dtype) when gate is undefined.
// reuse_x: the fused kernel may write the result into x (the caller must not
// read x afterwards); the eager path always returns a new tensor.
at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, bool reuse_x = false);

// (c) Wan's RMSNorm: (xf * rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.dtype) * weight
// with xf = x in float32 (float64 stays float64). reuse_x as above.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool reuse_x = false);

// (d) at::layer_norm(x.to(weight.dtype), {C}, weight, bias, eps).to(out_dtype)
// (bias may be undefined). A torch::nn::LayerNorm's forward, then a cast.
at::Tensor layer_norm_affine(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                             at::ScalarType out_dtype);

// (b) then (a) in one pass: r = gated_residual(x, y, gate), h = modulated_norm(r, ...); returns {r, h}.
std::pair<at::Tensor, at::Tensor> residual_modulated_norm(const at::Tensor& x, const at::Tensor& y,
                                                          const at::Tensor& gate, const at::Tensor& shift,
                                                          const at::Tensor& scale, double eps,
                                                          at::ScalarType out_dtype, bool reuse_x = false);

// (b) then (d) in one pass: r = gated_residual(x, y, gate), h = layer_norm_affine(r, ...); returns
// {r, h}. An undefined weight means no norm: h = r.to(out_dtype).
std::pair<at::Tensor, at::Tensor> residual_layer_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                                                      const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                      at::ScalarType out_dtype, bool reuse_x = false);

}  // namespace salad::fused
