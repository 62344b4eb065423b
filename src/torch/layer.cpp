// SaladSelfAttention: Wan 2.1 self-attention with the SALAD sparse + linear branches.
#include <cmath>
#include <sstream>

#include "salad/fused.h"
#include "salad/salad.h"

namespace salad {
namespace {
// A storage-free stand-in (meta device) with t's shape and dtype.
at::Tensor meta_like(const at::Tensor& t) {
  return t.defined() ? at::empty(t.sizes(), t.options().device(at::kMeta)) : t;
}
}  // namespace

const char* to_string(KeepLast k) {
  switch (k) {
    case KeepLast::Auto: return "auto";
    case KeepLast::All: return "all";
    case KeepLast::Small: return "small";
    case KeepLast::None: return "none";
  }
  return "?";
}

const char* to_string(Gate g) {
  switch (g) {
    case Gate::None: return "none";
    case Gate::Static: return "static";
    case Gate::Dynamic: return "dynamic";
    case Gate::StaticDynamic: return "static_dynamic";
  }
  return "?";
}

Gate parse_gate(const std::string& s) {
  if (s == "none") return Gate::None;
  if (s == "static") return Gate::Static;
  if (s == "dynamic") return Gate::Dynamic;
  if (s == "static_dynamic") return Gate::StaticDynamic;
  fail("gate: expected one of none|static|dynamic|static_dynamic, got '", s, "'");
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  // Wan: (x.float() * rsqrt(mean(x.float()^2) + eps)).type_as(x) * weight; float64 stays float64
  // (one CUDA kernel in inference, see fused.h).
  return fused::rms_norm(x, weight, eps);
}

SaladSelfAttentionImpl::SaladSelfAttentionImpl(const LayerConfig& cfg) : cfg_(cfg) {
  if (cfg.dim <= 0) fail("dim: expected a positive model width, got ", cfg.dim);
  if (cfg.heads <= 0 || cfg.dim % cfg.heads != 0)
    fail("heads: expected a positive divisor of dim=", cfg.dim, ", got ", cfg.heads);
  const int64_t C = cfg.dim;
  q = register_module("q", torch::nn::Linear(C, C));
  k = register_module("k", torch::nn::Linear(C, C));
  v = register_module("v", torch::nn::Linear(C, C));
  o = register_module("o", torch::nn::Linear(C, C));
  if (cfg.qk_norm) {
    norm_q = register_module("norm_q", RMSNorm(C, cfg.norm_eps));
    norm_k = register_module("norm_k", RMSNorm(C, cfg.norm_eps));
  }
  // W_l starts at zero, so a freshly converted layer equals the sparse-only layer.
  linear_o = register_module("linear_o", torch::nn::Linear(C, C));
  {
    torch::NoGradGuard ng;
    linear_o->weight.zero_();
    linear_o->bias.zero_();
  }
  if (cfg.gate == Gate::Dynamic || cfg.gate == Gate::StaticDynamic) {
    gate = register_module("gate", torch::nn::Linear(C, 1));
    torch::NoGradGuard ng;
    gate->weight.zero_();
    gate->bias.zero_();
  }
  if (cfg.gate == Gate::Static || cfg.gate == Gate::StaticDynamic)
    static_scale = register_parameter("static_scale", torch::ones({cfg.static_per_head ? cfg.heads : 1}));
}

at::Tensor SaladSelfAttentionImpl::scale(const at::Tensor& x) {
  const int64_t B = x.size(0);
  at::Tensor s = torch::ones({B, 1}, x.options());
  if (gate) s = torch::sigmoid(gate->forward(x.mean(1)));  // (B, 1)
  if (static_scale.defined()) s = s * static_scale.to(x.scalar_type()).unsqueeze(0);  // (B, 1) or (B, H)
  return cfg_.static_per_head && static_scale.defined() ? s : s.squeeze(1);
}

void SaladSelfAttentionImpl::store_last(AttentionOutput out, const at::Tensor& s) {
  KeepLast k = cfg_.keep_last;
  if (k == KeepLast::Auto) k = at::GradMode::is_enabled() ? KeepLast::All : KeepLast::Small;
  switch (k) {
    case KeepLast::All:
      last_ = std::move(out);
      if (s.defined()) last_scale_ = s.detach();
      break;
    case KeepLast::Small:
      last_ = {meta_like(out.o_s), meta_like(out.o_l), meta_like(out.lse), out.block_idx, out.block_cnt};
      if (s.defined()) last_scale_ = s.detach();
      break;
    case KeepLast::None:
    case KeepLast::Auto:
      last_ = {};
      last_scale_ = at::Tensor();
      break;
  }
}

at::Tensor SaladSelfAttentionImpl::forward(const at::Tensor& x, const Grid& grid) {
  if (x.dim() != 3 || x.size(2) != cfg_.dim) {
    std::ostringstream s;
    s << x.sizes();
    fail("x: expected a (B, L, ", cfg_.dim, ") tensor, got shape ", s.str());
  }
  const int64_t B = x.size(0), L = x.size(1), C = cfg_.dim, H = cfg_.heads, D = C / H;
  if (grid.size() != L)
    fail("grid: expected F*H*W equal to the token count L=", L, ", got ", grid.f, "*", grid.h, "*", grid.w, "=",
         grid.size());
  Options opt = cfg_.attn;
  if (cfg_.skip_linear && opt.mode == Mode::Salad) opt.mode = Mode::Sparse;
  if (fused::inference_path(x, *this)) return forward_inference(x, grid, opt);
  at::Tensor qx = linear(q, x), kx = linear(k, x);
  if (cfg_.qk_norm) qx = norm_q->forward(qx), kx = norm_k->forward(kx);
  const at::Tensor vx = linear(v, x);
  auto heads = [&](const at::Tensor& t) { return t.view({B, L, H, D}).transpose(1, 2); };  // strided view
  AttentionOutput out = attention(heads(qx), heads(kx), heads(vx), grid, opt, cfg_.impl);
  at::Tensor y = linear(o, out.o_s.transpose(1, 2).reshape({B, L, C}));
  if (opt.mode != Mode::Salad) {
    store_last(std::move(out), {});
    return y;
  }
  at::Tensor s = scale(x);
  const at::Tensor ol = out.o_l * (s.dim() == 2 ? s.view({B, H, 1, 1}) : s.view({B, 1, 1, 1}));
  y = y + linear(linear_o, ol.transpose(1, 2).reshape({B, L, C}));
  store_last(std::move(out), s);
  return y;
}

at::Tensor SaladSelfAttentionImpl::forward_inference(const at::Tensor& x, const Grid& grid, const Options& opt) {
  const int64_t B = x.size(0), L = x.size(1), C = cfg_.dim, H = cfg_.heads, D = C / H;
  at::Tensor qx = linear(q, x), kx = linear(k, x);
  if (cfg_.qk_norm) {  // in place: one read and one write of each projection
    qx = fused::rms_norm(qx, norm_q->weight, norm_q->eps, /*reuse_x=*/true);
    kx = fused::rms_norm(kx, norm_k->weight, norm_k->eps, /*reuse_x=*/true);
  }
  at::Tensor vx = linear(v, x);
  auto heads = [&](const at::Tensor& t) { return t.view({B, L, H, D}).transpose(1, 2); };  // strided view
  // Outputs in (B, L, H, D) memory where the CUDA kernels run: the projections' input rows as views.
  AttentionOutput out = attention(heads(qx), heads(kx), heads(vx), grid, opt, cfg_.impl, /*token_major=*/true);
  qx.reset(), kx.reset(), vx.reset();  // free before the output projections
  auto rows = [&](const at::Tensor& t) { return t.transpose(1, 2).reshape({B * L, C}); };  // a copy only if head-major
  if (opt.mode != Mode::Salad) {
    at::Tensor y = linear(o, rows(out.o_s)).view({B, L, C});
    store_last(std::move(out), {});
    return y;
  }
  // y = o(o_s) + linear_o(s * o_l) as one output: the biases summed into the first GEMM's
  // epilogue, the second GEMM accumulating into it (beta = 1).
  const at::Tensor s = scale(x);
  const at::Tensor& bo = o->bias;
  const at::Tensor& bl = linear_o->bias;
  const at::Tensor bias = bo.defined() && bl.defined() ? bo + bl : bo.defined() ? bo : bl;
  const at::Tensor rs = rows(out.o_s);
  at::Tensor y = bias.defined() ? at::addmm(bias, rs, o->weight.t()) : at::mm(rs, o->weight.t());
  if (B == 1) {
    // s folded into W_l's columns (head h's D input columns times s[h]): a C x C product instead of
    // an L x C one over o_l (124 us per layer at Wan1.3B-480p, H200).
    const at::Tensor sc = s.dim() == 2 ? s.view({H, 1}).expand({H, D}).reshape({1, C}) : s.view({1, 1});
    y.addmm_(rows(out.o_l), (linear_o->weight * sc).t());
  } else {
    y.addmm_(rows(out.o_l * (s.dim() == 2 ? s.view({B, H, 1, 1}) : s.view({B, 1, 1, 1}))), linear_o->weight.t());
  }
  store_last(std::move(out), s);
  return y.view({B, L, C});
}

}  // namespace salad
