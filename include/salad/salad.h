// The public C++ API on LibTorch: the SALAD attention operator (with autograd)
// and the SALAD self-attention layer of a Wan-style DiT.
//
// The same shared library registers torch.ops.salad.attention and
// torch.ops.salad.select_blocks for Python (torch.ops.load_library).
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "salad/layout.h"
#include "salad/params.h"

namespace salad {

// Which implementation runs a call. Auto: CUDA kernels for CUDA tensors, the
// fast CPU path for float32 (and bf16/fp16, upcast) and the reference for float64.
enum class Impl { Auto, Reference, Fast };
const char* to_string(Impl i);
Impl parse_impl(const std::string& s);  // "auto" | "reference" | "fast"

struct AttentionOutput {
  at::Tensor o_s;        // (B, H, L, D): sparse (or dense) branch
  at::Tensor o_l;        // (B, H, L, D) in mode salad, else empty
  at::Tensor lse;        // (B, H, L) float32
  at::Tensor block_idx;  // (B, H, n_q, max_k) int32, -1 padded; empty in mode dense
  at::Tensor block_cnt;  // (B, H, n_q) int32; empty in mode dense
};

// q, k, v: (B, H, L, D), q and k before RoPE, channel dim contiguous, one dtype
// and device. Differentiable in q, k, v through o_s and o_l.
// token_major (a layout hint): where the CUDA kernels run on bf16/fp16 inputs and
// no autograd is needed, o_s and o_l come back as (B, H, L, D) views of (B, L, H, D) memory, so
// o.transpose(1, 2).reshape({B, L, H * D}) -- the output projection's input --
// is free instead of a transposing copy. Elsewhere the outputs are contiguous.
AttentionOutput attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Grid& grid,
                          const Options& opt = {}, Impl impl = Impl::Auto, bool token_major = false);

// True when this library was built with the CUDA kernels (a GPU may still be absent).
bool cuda_kernels_compiled();

// Only the block table (idx, cnt) that attention() would use.
std::pair<at::Tensor, at::Tensor> select_blocks(const at::Tensor& q, const at::Tensor& k, const Grid& grid,
                                                const Options& opt = {});

// How the linear branch's output is scaled before it is added: s(x) per
// sample (dynamic), per layer or head (static), or both (SALAD.md section 1).
enum class Gate { None, Static, Dynamic, StaticDynamic };
const char* to_string(Gate g);
Gate parse_gate(const std::string& s);  // "none" | "static" | "dynamic" | "static_dynamic"

// What a SaladSelfAttention keeps of its last forward for last_attention() and last_scale().
//   Auto:  All while grad mode is on (autograd holds these tensors anyway), Small under no-grad.
//   All:   every output of the op (o_s, o_l, lse, block_idx, block_cnt) and s(x).
//   Small: the block table (block_idx, block_cnt, a few percent of o_s) and s(x); o_s, o_l and
//          lse become storage-free tensors on the meta device with their shape and dtype
//          (sizes readable, data not). Inference keeps nothing large: Wan 14B at 720p would
//          otherwise hold 40 layers x (o_s + o_l) = ~62 GB.
//   None:  nothing (every field undefined).
// A caller that reads o_s / o_l / lse values after an inference forward sets All first.
enum class KeepLast { Auto, All, Small, None };
const char* to_string(KeepLast k);

struct LayerConfig {
  int64_t dim = 1536;
  int64_t heads = 12;
  double norm_eps = 1e-6;
  bool qk_norm = true;
  Options attn;                   // mode, pattern, blocks, keep, feature map, ...
  Gate gate = Gate::StaticDynamic;
  bool static_per_head = false;   // static scale per head instead of per layer
  bool skip_linear = false;       // drop the linear branch of this layer (costs nothing)
  Impl impl = Impl::Auto;
  KeepLast keep_last = KeepLast::Auto;  // see KeepLast
};

// y = x W^T + b for a torch::nn::Linear, through ATen's at::linear (what Python's
// F.linear calls): for a contiguous input of any rank it folds the bias into the
// GEMM's epilogue. The C++ frontend's Linear::forward adds the bias in a separate
// elementwise pass whenever x has more than 2 dims (155 us per (32760, 1536)
// projection on an H200, five per Wan block). Same autograd, same values.
inline at::Tensor linear(const torch::nn::LinearImpl& l, const at::Tensor& x) { return at::linear(x, l.weight, l.bias); }
inline at::Tensor linear(const torch::nn::Linear& l, const at::Tensor& x) { return linear(*l, x); }

// RMSNorm over the last dimension with a learned weight (Wan: computed in float32).
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// Wan 2.1 self-attention with the SALAD branches. Member names follow the
// checkpoint keys (blocks.N.self_attn.{q,k,v,o,norm_q,norm_k}); the new
// parameters are linear_o (W_l, zero-initialised), gate (w_g, b_g) and
// static_scale.
class SaladSelfAttentionImpl : public torch::nn::Module {
 public:
  explicit SaladSelfAttentionImpl(const LayerConfig& cfg);

  // x: (B, L, C) with L = grid.size(); returns (B, L, C).
  at::Tensor forward(const at::Tensor& x, const Grid& grid);
  // The scalar s(x) per sample, (B,) or (B, H) with per-head static scales.
  at::Tensor scale(const at::Tensor& x);

  LayerConfig& config() { return cfg_; }
  // Shorthand for config().keep_last.
  void keep_last(KeepLast k) { cfg_.keep_last = k; }
  // The last forward's op outputs, as much of them as config().keep_last keeps.
  const AttentionOutput& last_attention() const { return last_; }
  // s(x) of the last salad-mode forward, (B,) or (B, H) (undefined before one):
  // the layers with the smallest mean |s| are the ones to drop.
  const at::Tensor& last_scale() const { return last_scale_; }

  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr}, linear_o{nullptr}, gate{nullptr};
  RMSNorm norm_q{nullptr}, norm_k{nullptr};
  at::Tensor static_scale;

 private:
  // The inference path (fused::inference_path): in-place qk-norms, the o and
  // linear_o projections accumulated into one output, s(x) folded into the
  // transposing copy of o_l.
  at::Tensor forward_inference(const at::Tensor& x, const Grid& grid, const Options& opt);
  // Keeps `out` (and s in salad mode) as config().keep_last says.
  void store_last(AttentionOutput out, const at::Tensor& s);

  LayerConfig cfg_;
  AttentionOutput last_;
  at::Tensor last_scale_;
};
TORCH_MODULE(SaladSelfAttention);

}  // namespace salad
