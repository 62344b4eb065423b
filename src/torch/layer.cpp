// SaladSelfAttention: Wan 2.1 self-attention with the SALAD sparse + linear branches.
#include <cmath>
#include <sstream>

#include "salad/salad.h"

namespace salad {
namespace {
}  // namespace

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
  // Wan: (x.float() * rsqrt(mean(x.float()^2) + eps)).type_as(x) * weight; float64 stays float64.
  const at::Tensor xf = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  return (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type()) * weight;
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
  at::Tensor qx = q->forward(x), kx = k->forward(x);
  if (cfg_.qk_norm) qx = norm_q->forward(qx), kx = norm_k->forward(kx);
  const at::Tensor vx = v->forward(x);
  auto heads = [&](const at::Tensor& t) { return t.view({B, L, H, D}).transpose(1, 2); };  // strided view
  Options opt = cfg_.attn;
  if (cfg_.skip_linear && opt.mode == Mode::Salad) opt.mode = Mode::Sparse;
  last_ = attention(heads(qx), heads(kx), heads(vx), grid, opt, cfg_.impl);
  at::Tensor y = o->forward(last_.o_s.transpose(1, 2).reshape({B, L, C}));
  if (opt.mode != Mode::Salad) return y;
  at::Tensor s = scale(x);
  last_scale_ = s.detach();
  const at::Tensor ol = last_.o_l * (s.dim() == 2 ? s.view({B, H, 1, 1}) : s.view({B, 1, 1, 1}));
  return y + linear_o->forward(ol.transpose(1, 2).reshape({B, L, C}));
}

}  // namespace salad
