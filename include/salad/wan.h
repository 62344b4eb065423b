// The Wan 2.1 text-to-video DiT on LibTorch, with SALAD self-attention in every
// block, and its checkpoint I/O (official and diffusers safetensors layouts).
//
// Module member names follow the official checkpoint keys (patch_embedding,
// text_embedding.{0,2}, time_embedding.{0,2}, time_projection.1,
// blocks.N.{modulation, self_attn.*, norm3, cross_attn.*, ffn.{0,2}},
// head.{head, modulation}), so named_parameters() *is* the official layout;
// the SALAD additions live under blocks.N.self_attn.{linear_o, gate, static_scale}.
//
// Precision policy (as the official model): the timestep embedding, the
// modulation, the norms and the residual stream run in float32 (float64 when
// the whole model is float64); the large linears, the convolution and both
// attentions run in the compute dtype (set_dtype: bf16 on GPU, float32 on CPU).
#pragma once

#include <torch/torch.h>

#include <array>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "salad/salad.h"

namespace salad {

struct WanConfig {
  int64_t in_dim = 16;
  int64_t out_dim = 16;
  int64_t dim = 1536;
  int64_t ffn_dim = 8960;
  int64_t freq_dim = 256;
  int64_t text_dim = 4096;
  int64_t num_heads = 12;
  int64_t num_layers = 30;
  std::array<int64_t, 3> patch{1, 2, 2};
  double eps = 1e-6;
  bool qk_norm = true;
  bool cross_attn_norm = true;
  int64_t text_len = 512;  // context is zero-padded to this many tokens (as Wan does); 0: no padding

  int64_t head_dim() const { return dim / num_heads; }
  // Throws ArgumentError naming the first bad field.
  void validate() const;

  // "wan2.1-1.3b", "wan2.1-14b", "world" (the embedded shapes world: 3 channels,
  // dim 128 = 2 heads of 64, 4 layers, text 32 x 64), "tiny" (dim 64, 2 heads of 32, 2 layers, 4
  // channels, text_dim 32, text_len 0; for tests).
  static WanConfig preset(const std::string& name);
};

// The SALAD attention options of every block: a template plus per-layer overrides.
struct WanAttentionPlan {
  // attn, gate, static_per_head, impl are used; dim, heads, norm_eps, qk_norm
  // come from WanConfig; skip_linear here applies to every layer.
  LayerConfig base;
  std::map<int64_t, Mode> mode;   // layer index -> mode overriding base.attn.mode
  std::set<int64_t> skip_linear;  // layers whose linear branch is dropped

  // The LayerConfig of block `index` (throws ArgumentError for an index out of range).
  LayerConfig layer(int64_t index, const WanConfig& cfg) const;
  // A plan with every layer in `m` (dense/sparse/salad) and implementation `impl`.
  static WanAttentionPlan uniform(Mode m, Impl impl = Impl::Auto);
};

// Cross-attention to the text context: q, k, v, o linears, RMSNorm on q and k
// over the full width, no RoPE, dense softmax attention.
class WanCrossAttentionImpl : public torch::nn::Module {
 public:
  WanCrossAttentionImpl(int64_t dim, int64_t heads, bool qk_norm, double eps);
  // x: (B, L, C), context: (B, Lc, C), same dtype; returns (B, L, C).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context);

  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  RMSNorm norm_q{nullptr}, norm_k{nullptr};

 private:
  int64_t heads_;
};
TORCH_MODULE(WanCrossAttention);

// One Wan 2.1 block: modulated self-attention (SALAD), cross-attention, FFN.
class WanBlockImpl : public torch::nn::Module {
 public:
  WanBlockImpl(const WanConfig& cfg, const LayerConfig& attn);
  // x: (B, L, C) residual stream (float32/64), e: (B, 6, C) projected time
  // embedding (same dtype), context: (B, Lc, C) embedded text (compute dtype).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& e, const Grid& grid, const at::Tensor& context);

  SaladSelfAttention self_attn{nullptr};
  torch::nn::LayerNorm norm3{nullptr};  // affine; absent when !cross_attn_norm
  WanCrossAttention cross_attn{nullptr};
  torch::nn::Sequential ffn{nullptr};  // 0: Linear, 1: GELU(tanh), 2: Linear
  at::Tensor modulation;               // (1, 6, C)

 private:
  // ffn->forward(h); in inference on CUDA the first Linear and the GELU are one GEMM.
  at::Tensor ffn_forward(const at::Tensor& h);

  double eps_;
};
TORCH_MODULE(WanBlock);

// Output head: LayerNorm (no affine), modulation (1, 2, C), Linear C -> out_dim * prod(patch).
class WanHeadImpl : public torch::nn::Module {
 public:
  WanHeadImpl(int64_t dim, int64_t out_features, double eps);
  // x: (B, L, C), e: (B, C) time embedding; returns (B, L, out_features) in x's dtype.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& e);

  torch::nn::Linear head{nullptr};
  at::Tensor modulation;

 private:
  double eps_;
};
TORCH_MODULE(WanHead);

class WanModelImpl : public torch::nn::Module {
 public:
  explicit WanModelImpl(const WanConfig& cfg, const WanAttentionPlan& plan = {});

  // x: (B, in_dim, F, H, W) latents with F, H, W divisible by the patch;
  // t: (B,) timesteps (any real dtype); context: (B, Lt, text_dim) text
  // embeddings, Lt <= text_len when text_len > 0. Returns (B, out_dim, F, H, W)
  // in float32 (float64 for a float64 model).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& context);

  // Casts the compute weights to `dtype` and keeps the precision-critical ones
  // (time embedding and projection, modulations, norm3, head) in float32; for
  // float64 every weight becomes float64.
  void set_dtype(at::ScalarType dtype);
  at::ScalarType compute_dtype() const { return patch_embedding->weight.scalar_type(); }
  // True for the parameters that set_dtype keeps in float32 (official names).
  static bool keeps_float32(const std::string& name);

  // The token grid (F/pt, H/ph, W/pw) of a latent of the given sizes (B, C, F, H, W).
  Grid grid_of(at::IntArrayRef latent_sizes) const;
  // Wan's sinusoidal timestep embedding (cos half, then sin half), computed in float64.
  at::Tensor timestep_embedding(const at::Tensor& t) const;

  const WanConfig& config() const { return cfg_; }
  const WanAttentionPlan& plan() const { return plan_; }
  // What every block's self-attention keeps of its last forward (see KeepLast; default Auto:
  // everything under grad mode, only the block tables and s(x) in inference).
  void keep_last(KeepLast k);
  // Block `i` as its typed module.
  WanBlock block(int64_t i) const { return blocks_.at(static_cast<size_t>(i)); }

  torch::nn::Conv3d patch_embedding{nullptr};
  torch::nn::Sequential text_embedding{nullptr};   // 0: Linear, 1: GELU(tanh), 2: Linear
  torch::nn::Sequential time_embedding{nullptr};   // 0: Linear, 1: SiLU, 2: Linear
  torch::nn::Sequential time_projection{nullptr};  // 0: SiLU, 1: Linear C -> 6C
  torch::nn::ModuleList blocks{nullptr};
  WanHead head{nullptr};

  // Run at the start of every forward, by name (apply_lora registers "lora",
  // which re-composes the adapted weights from their factors).
  std::map<std::string, std::function<void()>> pre_forward;

 private:
  WanConfig cfg_;
  WanAttentionPlan plan_;
  std::vector<WanBlock> blocks_;
};
TORCH_MODULE(WanModel);

// ---------------------------------------------------------------------------
// Checkpoints (src/model/checkpoint.cpp)

enum class WanLayout { Official, Diffusers };
const char* to_string(WanLayout l);

// Key renaming between the layouts; a key with no counterpart is returned unchanged.
std::string wan_official_to_diffusers(const std::string& key);
std::string wan_diffusers_to_official(const std::string& key);

// Diffusers when a key names condition_embedder / attn1 / attn2 / proj_out /
// scale_shift_table, else official. `names` may carry a common prefix such as
// "model.diffusion_model." (see wan_key_prefix).
WanLayout detect_wan_layout(const std::vector<std::string>& names);
// The prefix in front of "patch_embedding.weight" ("" for plain checkpoints).
std::string wan_key_prefix(const std::vector<std::string>& names);

// Architecture from tensor shapes (name -> shape, either layout, prefix
// allowed): dim and in_dim and patch from the patch embedding, layers from the
// largest block index, ffn_dim from the first FFN linear, text_dim and
// freq_dim from the embeddings, out_dim from the head. Heads: `num_heads`
// when > 0, else dim / 128 (Wan's head width: 1.3B -> 12, 14B -> 40).
// text_len, eps and the norm flags keep their defaults, except
// cross_attn_norm (false when norm3 is absent) and qk_norm (false when no
// norm_q). Throws ArgumentError naming a missing or inconsistent tensor.
WanConfig detect_wan_config(const std::map<std::string, std::vector<int64_t>>& shapes, int64_t num_heads = 0);
// The same from a checkpoint (file, sharded index or directory). Heads come
// from `num_heads` when > 0, else the file metadata "num_heads", else a
// config.json beside the checkpoint (num_heads or num_attention_heads), else dim / 128.
WanConfig detect_wan_config(const std::filesystem::path& checkpoint, int64_t num_heads = 0);

struct WanLoadReport {
  WanLayout layout = WanLayout::Official;
  std::vector<std::string> loaded;        // official names that were set
  std::vector<std::string> kept_default;  // SALAD parameters absent from the checkpoint (left at init)
  std::vector<std::string> unexpected;    // checkpoint keys with no parameter (error when strict)
};

// Loads a checkpoint (official or diffusers layout, detected; one file, a
// *.safetensors.index.json or a directory) into `model`, converting dtypes to
// each parameter's. A missing base tensor or a wrong shape throws
// ArgumentError naming the tensor (both layouts' names), the expected and the
// actual shape; the SALAD parameters may be absent (a base checkpoint). With
// `strict`, unexpected keys throw as well.
WanLoadReport load_wan_weights(WanModel& model, const std::filesystem::path& checkpoint, bool strict = true);

// text_len < 0: the checkpoint's recorded "text_len" (our files), else 512 (Wan).
// Detects the architecture, builds the model directly in `dtype` (see
// set_dtype; no float32 copy of a bf16 model is ever made), moves it to
// `device` and loads the weights tensor by tensor (host memory: the model in
// `dtype` while it is built, then one tensor at a time).
WanModel load_wan_model(const std::filesystem::path& checkpoint, const WanAttentionPlan& plan = {},
                        int64_t num_heads = 0, int64_t text_len = -1, at::ScalarType dtype = at::kFloat,
                        const at::Device& device = at::kCPU);

// Writes every parameter of `model` to one .safetensors file in `layout`
// (official by default), in each parameter's dtype, or in `dtype` when given
// (floating tensors only). The metadata records the architecture
// ("format": "salad.wan2.1", "num_heads", ...).
void save_wan_weights(WanModel& model, const std::filesystem::path& path, WanLayout layout = WanLayout::Official,
                      std::optional<at::ScalarType> dtype = std::nullopt);

// The same split into shards of at most `max_shard_bytes` of data:
// `<dir>/<stem>-0000i-of-0000n.safetensors` plus `<dir>/<stem>.safetensors.index.json`
// (HF layout, readable by load_wan_weights). Returns the index path.
std::filesystem::path save_wan_weights_sharded(WanModel& model, const std::filesystem::path& dir,
                                               size_t max_shard_bytes, WanLayout layout = WanLayout::Official,
                                               const std::string& stem = "diffusion_pytorch_model",
                                               std::optional<at::ScalarType> dtype = std::nullopt);

// Plain safetensors <-> tensors (CPU, contiguous), for tests and tools.
std::map<std::string, at::Tensor> read_tensor_file(const std::filesystem::path& path);
void write_tensor_file(const std::filesystem::path& path, const std::map<std::string, at::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace salad
