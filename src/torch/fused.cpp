// The fused Wan block glue on LibTorch tensors: the CUDA row kernels of
// src/kernels/cuda/dit.cu where they apply, the eager expressions otherwise
// (see include/salad/fused.h).
#include "salad/fused.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>

#include "salad/dit_kernels.h"

#ifdef SALAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace salad::fused {
namespace {

namespace dit = salad::cuda::dit;

std::atomic<int> g_enabled{-1};  // -1: not decided yet (read SALAD_FUSED)

// --- the eager expressions (the reference semantics, and the fallback) ---------------

at::Tensor eager_modulated_norm(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                                at::ScalarType out_dtype) {
  return (at::layer_norm(x, {x.size(-1)}, {}, {}, eps) * (1 + scale) + shift).to(out_dtype);
}

at::Tensor eager_residual(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate) {
  return gate.defined() ? x + y.to(x.scalar_type()) * gate : x + y.to(x.scalar_type());
}

at::Tensor eager_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xf = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  return (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type()) * weight;
}

at::Tensor eager_layer_norm_affine(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                                   at::ScalarType out_dtype) {
  if (!weight.defined()) return x.to(out_dtype);
  return at::layer_norm(x.to(weight.scalar_type()), {x.size(-1)}, weight, bias, eps).to(out_dtype);
}

// --- when the kernels apply ---------------------------------------------------------

#ifdef SALAD_WITH_CUDA
bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

std::optional<dit::DType> dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return dit::DType::F32;
    case at::kBFloat16: return dit::DType::BF16;
    case at::kHalf: return dit::DType::F16;
    default: return std::nullopt;
  }
}

// Fusion on, kernels present, every defined tensor on x's CUDA device, no autograd needed.
bool base_ok(std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor& x = **ts.begin();
  if (!enabled() || !kernels_compiled() || !x.defined() || !x.is_cuda()) return false;
  bool grad = false;
  for (const at::Tensor* t : ts) {
    if (!t->defined()) continue;
    if (t->device() != x.device()) return false;
    grad = grad || t->requires_grad();
  }
  return !(grad && at::GradMode::is_enabled());
}

// A float32 residual stream the kernels take: contiguous (B, ..., C), C supported, aligned.
bool stream_ok(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && x.dim() >= 2 && x.numel() > 0 && x.is_contiguous() &&
         dit::supported_channels(x.size(-1)) && aligned(x.data_ptr());
}

// A per-sample vector broadcasting against x like (B, 1, ..., C): float32, unit
// channel stride, every dim but x's first and last of size 1.
std::optional<dit::PerSample> per_sample(const at::Tensor& v, const at::Tensor& x) {
  const int64_t nd = x.dim(), C = x.size(-1);
  if (!v.defined() || v.scalar_type() != at::kFloat || v.dim() < 1 || v.dim() > nd || v.size(-1) != C ||
      v.stride(-1) != 1)
    return std::nullopt;
  int64_t stride = 0;
  for (int64_t d = 0; d + 1 < v.dim(); ++d) {
    if (v.size(d) == 1) continue;
    if (nd - v.dim() + d == 0 && v.size(d) == x.size(0)) {
      stride = v.stride(d);
      continue;
    }
    return std::nullopt;
  }
  if (!aligned(v.data_ptr()) || stride % 8 != 0) return std::nullopt;
  return dit::PerSample{v.data_ptr<float>(), stride};
}

// A float32 (C) vector.
bool vector_ok(const at::Tensor& v, int64_t C) {
  return v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == C && v.is_contiguous() && aligned(v.data_ptr());
}

void* stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// One residual_norm call; false (nothing done) when the inputs do not qualify.
// y may be undefined (then no residual); norm None with out_dtype: a cast.
bool try_residual_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, dit::Norm norm,
                       const at::Tensor& p0, const at::Tensor& p1, double eps, std::optional<at::ScalarType> out_dtype,
                       bool want_r, bool reuse_x, at::Tensor* r, at::Tensor* h) {
  if (!base_ok({&x, &y, &gate, &p0, &p1}) || !stream_ok(x)) return false;
  const int64_t C = x.size(-1), rows = x.numel() / C;
  dit::RowArgs a;
  a.rows = rows, a.rows_per_sample = rows / x.size(0), a.C = C;
  a.x = x.data_ptr<float>();
  if (y.defined()) {
    const auto yt = dtype_of(y.scalar_type());
    if (!yt || y.sizes() != x.sizes() || !y.is_contiguous() || !aligned(y.data_ptr())) return false;
    a.y = y.data_ptr(), a.y_dtype = *yt;
    if (gate.defined()) {
      const auto g = per_sample(gate, x);
      if (!g) return false;
      a.gate = *g;
    }
  } else if (gate.defined()) {
    return false;
  }
  std::optional<dit::DType> ot;
  if (out_dtype) {
    ot = dtype_of(*out_dtype);
    if (!ot) return false;
    a.norm = norm, a.eps = static_cast<float>(eps), a.out_dtype = *ot;
    if (norm == dit::Norm::Modulated) {
      const auto sh = per_sample(p0, x), sc = per_sample(p1, x);
      if (!sh || !sc) return false;
      a.p0 = *sh, a.p1 = *sc;
    } else if (norm == dit::Norm::Affine) {
      if (!vector_ok(p0, C) || (p1.defined() && !vector_ok(p1, C))) return false;
      a.p0 = {p0.data_ptr<float>(), 0};
      if (p1.defined()) a.p1 = {p1.data_ptr<float>(), 0};
    }
  }
  const c10::cuda::CUDAGuard guard(x.device());
  if (want_r) {
    *r = reuse_x ? x : at::empty_like(x);
    a.res_out = r->data_ptr<float>();
  }
  if (out_dtype) {
    *h = at::empty(x.sizes(), x.options().dtype(*out_dtype));
    a.out = h->data_ptr();
  }
  dit::residual_norm(a, stream_of(x));
  return true;
}
#endif

}  // namespace

void set_enabled(bool on) { g_enabled.store(on ? 1 : 0); }

bool enabled() {
  int v = g_enabled.load();
  if (v < 0) {
    const char* e = std::getenv("SALAD_FUSED");
    const int from_env = (e && std::strcmp(e, "0") == 0) ? 0 : 1;
    g_enabled.compare_exchange_strong(v, from_env);
    v = g_enabled.load();
  }
  return v == 1;
}

bool kernels_compiled() {
#ifdef SALAD_WITH_CUDA
  return dit::compiled();
#else
  return false;
#endif
}

bool inference_path(const at::Tensor& x, const torch::nn::Module& m) {
  if (!enabled() || !kernels_compiled() || !x.defined() || !x.is_cuda()) return false;
  if (!at::GradMode::is_enabled()) return true;
  if (x.requires_grad()) return false;
  for (const auto& p : m.parameters(true))
    if (p.requires_grad()) return false;
  return true;
}

at::Tensor modulated_norm(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                          at::ScalarType out_dtype) {
#ifdef SALAD_WITH_CUDA
  at::Tensor r, h;
  if (try_residual_norm(x, {}, {}, dit::Norm::Modulated, shift, scale, eps, out_dtype, false, false, &r, &h)) return h;
#endif
  return eager_modulated_norm(x, shift, scale, eps, out_dtype);
}

at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, bool reuse_x) {
#ifdef SALAD_WITH_CUDA
  at::Tensor r, h;
  if (y.defined() &&
      try_residual_norm(x, y, gate, dit::Norm::None, {}, {}, 0.0, std::nullopt, true, reuse_x, &r, &h))
    return r;
#endif
  return eager_residual(x, y, gate);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool reuse_x) {
#ifdef SALAD_WITH_CUDA
  const int64_t C = x.dim() >= 1 ? x.size(-1) : 0;
  const auto t = dtype_of(x.scalar_type());
  if (base_ok({&x, &weight}) && t && weight.defined() && weight.scalar_type() == x.scalar_type() &&
      weight.dim() == 1 && weight.size(0) == C && weight.is_contiguous() && aligned(weight.data_ptr()) &&
      x.dim() >= 2 && x.numel() > 0 && dit::supported_channels(C) && x.is_contiguous() && aligned(x.data_ptr())) {
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor out = reuse_x ? x : at::empty_like(x);
    dit::rms_norm(x.data_ptr(), C, weight.data_ptr(), out.data_ptr(), C, *t, x.numel() / C, C,
                  static_cast<float>(eps), stream_of(x));
    return out;
  }
#endif
  return eager_rms_norm(x, weight, eps);
}

at::Tensor layer_norm_affine(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                             at::ScalarType out_dtype) {
#ifdef SALAD_WITH_CUDA
  at::Tensor r, h;
  if (weight.defined() &&
      try_residual_norm(x, {}, {}, dit::Norm::Affine, weight, bias, eps, out_dtype, false, false, &r, &h))
    return h;
#endif
  return eager_layer_norm_affine(x, weight, bias, eps, out_dtype);
}

std::pair<at::Tensor, at::Tensor> residual_modulated_norm(const at::Tensor& x, const at::Tensor& y,
                                                          const at::Tensor& gate, const at::Tensor& shift,
                                                          const at::Tensor& scale, double eps,
                                                          at::ScalarType out_dtype, bool reuse_x) {
#ifdef SALAD_WITH_CUDA
  at::Tensor r, h;
  if (y.defined() &&
      try_residual_norm(x, y, gate, dit::Norm::Modulated, shift, scale, eps, out_dtype, true, reuse_x, &r, &h))
    return {r, h};
#endif
  at::Tensor r2 = eager_residual(x, y, gate);
  at::Tensor h2 = eager_modulated_norm(r2, shift, scale, eps, out_dtype);
  return {r2, h2};
}

std::pair<at::Tensor, at::Tensor> residual_layer_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                                                      const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                      at::ScalarType out_dtype, bool reuse_x) {
#ifdef SALAD_WITH_CUDA
  at::Tensor r, h;
  if (y.defined() && try_residual_norm(x, y, gate, weight.defined() ? dit::Norm::Affine : dit::Norm::None, weight,
                                       bias, eps, out_dtype, true, reuse_x, &r, &h))
    return {r, h};
#endif
  at::Tensor r2 = eager_residual(x, y, gate);
  at::Tensor h2 = eager_layer_norm_affine(r2, weight, bias, eps, out_dtype);
  return {r2, h2};
}

}  // namespace salad::fused
