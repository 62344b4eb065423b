// Wan 2.1 T2V DiT (official wan/modules/model.py semantics) with SALAD self-attention.
#include "salad/wan.h"
#include "model/text.h"
#include "salad/fused.h"

#include <cmath>
#include <sstream>

namespace salad {
namespace {
// The dtype of the float32-kept path: float64 for a float64 model, else float32.
at::ScalarType high_dtype(at::ScalarType compute) {
  return compute == at::kDouble ? at::kDouble : at::kFloat;
}
}  // namespace

// --- config -----------------------------------------------------------------

void WanConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v <= 0) fail(name, ": expected a positive value, got ", v);
  };
  positive("in_dim", in_dim);
  positive("out_dim", out_dim);
  positive("dim", dim);
  positive("ffn_dim", ffn_dim);
  positive("freq_dim", freq_dim);
  positive("text_dim", text_dim);
  positive("num_heads", num_heads);
  positive("num_layers", num_layers);
  for (int i = 0; i < 3; ++i)
    if (patch[i] <= 0)
      fail("patch: expected three positive sizes, got (", patch[0], ", ", patch[1], ", ", patch[2], ")");
  if (dim % num_heads != 0) fail("num_heads: expected a divisor of dim=", dim, ", got ", num_heads);
  if ((dim / num_heads) % 2 != 0)
    fail("num_heads: expected an even head width (RoPE pairs), got dim/num_heads=", dim / num_heads);
  if (freq_dim % 2 != 0) fail("freq_dim: expected an even value, got ", freq_dim);
  if (text_len < 0) fail("text_len: expected >= 0, got ", text_len);
  if (!(eps > 0)) fail("eps: expected a positive value, got ", eps);
}

WanConfig WanConfig::preset(const std::string& name) {
  WanConfig c;
  if (name == "wan2.1-1.3b") {
    c.dim = 1536, c.ffn_dim = 8960, c.num_heads = 12, c.num_layers = 30;
  } else if (name == "wan2.1-14b") {
    c.dim = 5120, c.ffn_dim = 13824, c.num_heads = 40, c.num_layers = 40;
  } else if (name == "tiny") {
    c.in_dim = 4, c.out_dim = 4, c.dim = 64, c.ffn_dim = 128, c.freq_dim = 32, c.text_dim = 32;
    c.num_heads = 2, c.num_layers = 2, c.text_len = 0;
  } else if (name == "world") {
    // The embedded shapes world: pixel space (3 channels, patch 1x2x2), 2 heads of 64.
    c.in_dim = 3, c.out_dim = 3, c.dim = 128, c.ffn_dim = 512, c.freq_dim = 64, c.text_dim = 64;
    c.num_heads = 2, c.num_layers = 4, c.text_len = 32;
  } else {
    fail("preset: expected one of wan2.1-1.3b|wan2.1-14b|world|tiny, got '", name, "'");
  }
  return c;
}

LayerConfig WanAttentionPlan::layer(int64_t index, const WanConfig& cfg) const {
  if (index < 0 || index >= cfg.num_layers) fail("layer: expected an index in [0, ", cfg.num_layers, "), got ", index);
  LayerConfig l = base;
  l.dim = cfg.dim;
  l.heads = cfg.num_heads;
  l.norm_eps = cfg.eps;
  l.qk_norm = cfg.qk_norm;
  if (auto it = mode.find(index); it != mode.end()) l.attn.mode = it->second;
  if (skip_linear.count(index)) l.skip_linear = true;
  return l;
}

WanAttentionPlan WanAttentionPlan::uniform(Mode m, Impl impl) {
  WanAttentionPlan p;
  p.base.attn.mode = m;
  p.base.impl = impl;
  return p;
}

// --- cross-attention ----------------------------------------------------------

WanCrossAttentionImpl::WanCrossAttentionImpl(int64_t dim, int64_t heads, bool qk_norm, double eps) : heads_(heads) {
  q = register_module("q", torch::nn::Linear(dim, dim));
  k = register_module("k", torch::nn::Linear(dim, dim));
  v = register_module("v", torch::nn::Linear(dim, dim));
  o = register_module("o", torch::nn::Linear(dim, dim));
  if (qk_norm) {
    norm_q = register_module("norm_q", RMSNorm(dim, eps));
    norm_k = register_module("norm_k", RMSNorm(dim, eps));
  }
}

at::Tensor WanCrossAttentionImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), Lc = context.size(1), H = heads_, D = C / H;
  at::Tensor qx = linear(q, x), kx = linear(k, context);
  if (norm_q) {  // Wan's RMSNorm (fused::rms_norm), in place on the fresh projections
    qx = fused::rms_norm(qx, norm_q->weight, norm_q->eps, /*reuse_x=*/true);
    kx = fused::rms_norm(kx, norm_k->weight, norm_k->eps, /*reuse_x=*/true);
  }
  const at::Tensor vx = linear(v, context);
  const at::Tensor y =
      at::scaled_dot_product_attention(qx.view({B, L, H, D}).transpose(1, 2), kx.view({B, Lc, H, D}).transpose(1, 2),
                                       vx.view({B, Lc, H, D}).transpose(1, 2));
  return linear(o, y.transpose(1, 2).reshape({B, L, C}));
}

// --- block --------------------------------------------------------------------

WanBlockImpl::WanBlockImpl(const WanConfig& cfg, const LayerConfig& attn) : eps_(cfg.eps) {
  const int64_t C = cfg.dim;
  self_attn = register_module("self_attn", SaladSelfAttention(attn));
  if (cfg.cross_attn_norm)
    norm3 = register_module("norm3", torch::nn::LayerNorm(torch::nn::LayerNormOptions({C}).eps(cfg.eps)));
  cross_attn = register_module("cross_attn", WanCrossAttention(C, cfg.num_heads, cfg.qk_norm, cfg.eps));
  ffn = register_module("ffn", torch::nn::Sequential(torch::nn::Linear(C, cfg.ffn_dim),
                                                     torch::nn::GELU(torch::nn::GELUOptions().approximate("tanh")),
                                                     torch::nn::Linear(cfg.ffn_dim, C)));
  modulation = register_parameter("modulation", torch::randn({1, 6, C}) / std::sqrt(static_cast<double>(C)));
}

at::Tensor WanBlockImpl::ffn_forward(const at::Tensor& h) {
  auto* l0 = ffn->ptr(0)->as<torch::nn::LinearImpl>();
  auto* l2 = ffn->ptr(2)->as<torch::nn::LinearImpl>();
  if (l0 && l2 && l0->bias.defined() && h.dim() == 3 && fused::inference_path(h, *ffn)) {
    // Linear + GELU(tanh) as one GEMM with a bias+GELU epilogue, then the second Linear. On CUDA
    // _addmm_activation's GELU is the tanh form (the cuBLASLt epilogue, applied in float32 before
    // the bf16 rounding, or gelu_(.., "tanh") after a plain GEMM); on the CPU it would be the erf
    // form, but this path is CUDA-only (inference_path).
    const at::Tensor g = at::_addmm_activation(l0->bias, h.reshape({-1, h.size(2)}), l0->weight.t(), 1, 1,
                                               /*use_gelu=*/true);
    return linear(*l2, g).view({h.size(0), h.size(1), -1});
  }
  if (!l0 || !l2) return ffn->forward(h);
  return linear(*l2, at::gelu(linear(*l0, h), "tanh"));  // ffn->forward(h), the biases in the GEMMs
}

// The official block, written as five fused steps (fused.h; each is the eager
// expression in its comment wherever the kernels do not apply):
//   h = (LN(x) * (1 + m1) + m0).to(cdt)
//   out = x + self_attn(h).to(hp) * m2;     h = norm3(out).to(cdt)   (out.to(cdt) without norm3)
//   out = out + cross_attn(h).to(hp);       h = (LN(out) * (1 + m4) + m3).to(cdt)
//   out = out + ffn(h).to(hp) * m5
at::Tensor WanBlockImpl::forward(const at::Tensor& x, const at::Tensor& e, const Grid& grid,
                                 const at::Tensor& context) {
  const auto hp = x.scalar_type();
  const auto cdt = context.scalar_type();
  const std::vector<at::Tensor> m = (modulation.to(hp) + e).chunk(6, 1);  // each (B, 1, C)
  at::Tensor h = fused::modulated_norm(x, m[0], m[1], eps_, cdt);
  at::Tensor out;
  {
    const at::Tensor a = self_attn->forward(h, grid);
    h = at::Tensor();
    if (norm3)
      std::tie(out, h) = fused::residual_layer_norm(x, a, m[2], norm3->weight, norm3->bias, norm3->options.eps(), cdt);
    else
      std::tie(out, h) = fused::residual_layer_norm(x, a, m[2], {}, {}, 0.0, cdt);
  }
  {
    const at::Tensor c = cross_attn->forward(h, context);
    h = at::Tensor();
    std::tie(out, h) = fused::residual_modulated_norm(out, c, {}, m[3], m[4], eps_, cdt, /*reuse_x=*/true);
  }
  const at::Tensor f = ffn_forward(h);
  h = at::Tensor();
  return fused::gated_residual(out, f, m[5], /*reuse_x=*/true);
}

// --- head ---------------------------------------------------------------------

WanHeadImpl::WanHeadImpl(int64_t dim, int64_t out_features, double eps) : eps_(eps) {
  head = register_module("head", torch::nn::Linear(dim, out_features));
  modulation = register_parameter("modulation", torch::randn({1, 2, dim}) / std::sqrt(static_cast<double>(dim)));
}

at::Tensor WanHeadImpl::forward(const at::Tensor& x, const at::Tensor& e) {
  const std::vector<at::Tensor> m = (modulation.to(x.scalar_type()) + e.unsqueeze(1)).chunk(2, 1);
  // (LN(x) * (1 + m1) + m0).to(head dtype), one kernel where fused.h applies.
  const at::Tensor h = fused::modulated_norm(x, m[0], m[1], eps_, head->weight.scalar_type());
  return linear(head, h).to(x.scalar_type());
}

// --- model --------------------------------------------------------------------

WanModelImpl::WanModelImpl(const WanConfig& cfg, const WanAttentionPlan& plan) : cfg_(cfg), plan_(plan) {
  cfg.validate();
  for (const auto& [i, mode] : plan.mode)
    if (i < 0 || i >= cfg.num_layers) fail("plan.mode: layer index ", i, " outside [0, ", cfg.num_layers, ")");
  for (int64_t i : plan.skip_linear)
    if (i < 0 || i >= cfg.num_layers) fail("plan.skip_linear: layer index ", i, " outside [0, ", cfg.num_layers, ")");
  const int64_t C = cfg.dim;
  patch_embedding = register_module(
      "patch_embedding",
      torch::nn::Conv3d(torch::nn::Conv3dOptions(cfg.in_dim, C, {cfg.patch[0], cfg.patch[1], cfg.patch[2]})
                            .stride({cfg.patch[0], cfg.patch[1], cfg.patch[2]})));
  text_embedding = register_module(
      "text_embedding",
      torch::nn::Sequential(torch::nn::Linear(cfg.text_dim, C),
                            torch::nn::GELU(torch::nn::GELUOptions().approximate("tanh")), torch::nn::Linear(C, C)));
  time_embedding = register_module("time_embedding", torch::nn::Sequential(torch::nn::Linear(cfg.freq_dim, C),
                                                                           torch::nn::SiLU(), torch::nn::Linear(C, C)));
  time_projection =
      register_module("time_projection", torch::nn::Sequential(torch::nn::SiLU(), torch::nn::Linear(C, 6 * C)));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    blocks_.push_back(WanBlock(cfg, plan.layer(i, cfg)));
    blocks->push_back(blocks_.back());
  }
  head = register_module("head", WanHead(C, cfg.out_dim * cfg.patch[0] * cfg.patch[1] * cfg.patch[2], cfg.eps));
}

bool WanModelImpl::keeps_float32(const std::string& name) {
  auto starts = [&](const char* p) { return name.rfind(p, 0) == 0; };
  auto ends = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  return starts("time_embedding.") || starts("time_projection.") || starts("head.") || ends(".modulation") ||
         name.find(".norm3.") != std::string::npos;
}

void WanModelImpl::set_dtype(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 && dtype != at::kHalf)
    fail("dtype: expected float32, float64, bfloat16 or float16, got ", dtype);
  torch::NoGradGuard ng;
  for (auto& p : named_parameters(true)) {
    const at::ScalarType target = dtype == at::kDouble ? at::kDouble : keeps_float32(p.key()) ? at::kFloat : dtype;
    if (p.value().scalar_type() != target) p.value().set_data(p.value().to(target));
  }
}

void WanModelImpl::keep_last(KeepLast k) {
  for (auto& b : blocks_) b->self_attn->keep_last(k);
  plan_.base.keep_last = k;
}

Grid WanModelImpl::grid_of(at::IntArrayRef s) const {
  if (s.size() != 5) fail("x: expected a 5-D latent (B, C, F, H, W), got shape ", shape_str(s));
  for (int i = 0; i < 3; ++i)
    if (s[2 + i] <= 0 || s[2 + i] % cfg_.patch[i] != 0)
      fail("x: expected (F, H, W) positive multiples of the patch (", cfg_.patch[0], ", ", cfg_.patch[1], ", ",
           cfg_.patch[2], "), got shape ", shape_str(s));
  return Grid{s[2] / cfg_.patch[0], s[3] / cfg_.patch[1], s[4] / cfg_.patch[2]};
}

at::Tensor WanModelImpl::timestep_embedding(const at::Tensor& t) const {
  // Wan: outer(t, 10000^(-i/half)) in float64, then [cos | sin].
  const int64_t half = cfg_.freq_dim / 2;
  const at::Tensor pos = t.to(at::kDouble);
  const at::Tensor freq = at::pow(10000.0, -at::arange(half, pos.options()).div(static_cast<double>(half)));
  const at::Tensor arg = at::outer(pos, freq);
  return at::cat({at::cos(arg), at::sin(arg)}, 1);
}

at::Tensor WanModelImpl::forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& context) {
  for (auto& [name, hook] : pre_forward) hook();
  const Grid grid = grid_of(x.sizes());
  const int64_t B = x.size(0), C = cfg_.dim;
  if (x.size(1) != cfg_.in_dim) fail("x: expected ", cfg_.in_dim, " channels, got shape ", shape_str(x.sizes()));
  if (t.dim() != 1 || t.size(0) != B)
    fail("t: expected a (B,) tensor with B=", B, ", got shape ", shape_str(t.sizes()));
  if (context.dim() != 3 || context.size(0) != B || context.size(2) != cfg_.text_dim)
    fail("context: expected a (", B, ", Lt, ", cfg_.text_dim, ") tensor, got shape ", shape_str(context.sizes()));
  if (cfg_.text_len > 0 && context.size(1) > cfg_.text_len)
    fail("context: expected at most text_len=", cfg_.text_len, " tokens, got ", context.size(1));
  const auto cdt = compute_dtype();
  const auto hp = high_dtype(cdt);
  const auto dev = patch_embedding->weight.device();

  // Patches -> tokens (raster f, h, w), residual stream in the high dtype, contiguous (B, L, C).
  at::Tensor h = patch_embedding->forward(x.to(dev, cdt))
                     .flatten(2)
                     .transpose(1, 2)
                     .to(hp, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);

  // Time: sinusoid (float64) -> float32 MLP -> shared projection (B, 6, C).
  const at::Tensor e =
      time_embedding->forward(timestep_embedding(t.to(dev)).to(time_embedding->parameters()[0].scalar_type())).to(hp);
  const at::Tensor e0 =
      time_projection->forward(e.to(time_projection->parameters()[0].scalar_type())).to(hp).unflatten(1, {6, C});

  // Text: zero-pad to text_len as Wan does (the padded rows still get embedded and attended).
  at::Tensor ctx = context.to(dev, cdt);
  if (cfg_.text_len > ctx.size(1))
    ctx = at::cat({ctx, at::zeros({B, cfg_.text_len - ctx.size(1), cfg_.text_dim}, ctx.options())}, 1);
  ctx = text_embedding->forward(ctx);

  for (auto& blk : blocks_) h = blk->forward(h, e0, grid, ctx);
  h = head->forward(h, e);  // (B, L, out * pt * ph * pw)

  // Unpatchify: (B, f, h, w, pt, ph, pw, c) -> (B, c, f*pt, h*ph, w*pw).
  const auto& p = cfg_.patch;
  return h.view({B, grid.f, grid.h, grid.w, p[0], p[1], p[2], cfg_.out_dim})
      .permute({0, 7, 1, 4, 2, 5, 3, 6})
      .reshape({B, cfg_.out_dim, grid.f * p[0], grid.h * p[1], grid.w * p[2]});
}

}  // namespace salad
