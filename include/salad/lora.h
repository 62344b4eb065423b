// SALAD conversion of a Wan model, LoRA adapters on its frozen linears, and
// adapter files (SALAD.md section 2: frozen base; LoRA on self-attention
// q, k, v, o; W_l, gate and static scales trained).
//
// LoRA here is weight-space: an adapted torch::nn::Linear keeps its base
// weight W0 as the registered parameter "weight" (so checkpoint names and
// loading are unchanged) and gets two child modules lora_A (r x in, Kaiming
// uniform) and lora_B (out x r, zero), whose parameters are therefore named
//   blocks.N.self_attn.q.lora_A.weight, blocks.N.self_attn.q.lora_B.weight
// (the "official" convention, written by save_adapter). Its forward uses the
// member `weight` = W0 + (alpha / r) * B A, rebuilt by refresh_lora(): the
// layer code calls Linear::forward, which cannot be intercepted, so the
// effective weight is materialised instead of adding x A^T B^T to the output.
//
//   apply_lora registers a "lora" pre-forward hook on the model, so every
//   WanModel forward re-composes the weights itself. Without it (a hook removed,
//   or the adapted Linear used directly), call refresh_lora(model) before every
//   forward that follows a change of A, B or W0 (an optimizer step, set_dtype, to()).
//   !! apply_lora, convert_to_salad, load_adapter and trainable_parameters call
//   !! it themselves. A training step that forgets it fails loudly in
//   !! backward() with a message naming refresh_lora.
//
// Files accepted on load use either convention: official names, or PEFT's
// "base_model.model.<name>.lora_{A,B}.weight"; prefixes "transformer.",
// "diffusion_model." and "model.diffusion_model." are dropped, diffusers
// module names (attn1.to_q, ffn.net.0.proj, ...) are mapped to official ones,
// and kohya's lora_down / lora_up mean lora_A / lora_B.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "salad/wan.h"

namespace salad {

// One low-rank factor; a module so that its parameter is "<linear>.lora_A.weight".
class LoRAFactorImpl : public torch::nn::Module {
 public:
  explicit LoRAFactorImpl(const at::Tensor& w);
  at::Tensor weight;
  double alpha = 0.0;  // LoRA alpha; meaningful on lora_B only (scale = alpha / rank)
};
TORCH_MODULE(LoRAFactor);

struct LoRAOptions {
  int64_t rank = 16;  // 0: no LoRA
  double alpha = 16.0;
  double dropout = 0.0;  // only 0: a weight-space adapter has no input to drop
  // Module-name patterns ('*' matches any text) against the block-relative
  // name ("self_attn.q", "cross_attn.v", "ffn.0") or the full one
  // ("blocks.3.self_attn.q"); "q", "k", "v", "o" mean "self_attn.<x>".
  // Candidates: every Linear of a block except self_attn.linear_o and self_attn.gate.
  std::vector<std::string> targets = {"q", "k", "v", "o"};

  double scale() const { return rank > 0 ? alpha / static_cast<double>(rank) : 0.0; }
  // Throws ArgumentError naming rank, alpha, dropout or targets.
  void validate() const;
};

// A view of one adapted Linear.
struct LoRALinear {
  std::string name;  // module name, e.g. "blocks.3.self_attn.q"
  torch::nn::LinearImpl* linear = nullptr;
  at::Tensor base_weight;  // W0: the registered parameter "<name>.weight"
  LoRAFactor A{nullptr}, B{nullptr};

  int64_t rank() const { return A->weight.size(0); }
  double alpha() const { return B->alpha; }
  double scale() const { return B->alpha / static_cast<double>(rank()); }
  // scale * B A, (out, in), computed in float32 (float64 for a float64 W0).
  at::Tensor delta() const;
  // W0 + scale * B A in W0's dtype (what forward uses), differentiable in W0, A, B.
  at::Tensor effective_weight() const;
  // The activation-space reference x W0^T + bias + scale (x A^T) B^T (tests, and
  // a layer that wants to call the adapter directly).
  at::Tensor forward(const at::Tensor& x) const;
};

// The module names the patterns select, in model order; a pattern that
// matches nothing throws ArgumentError naming it and listing the candidates.
std::vector<std::string> lora_target_names(WanModel& model, const std::vector<std::string>& patterns);
// Adds LoRA to every selected Linear (A Kaiming-uniform with a = sqrt(5) from
// the global generator, B zero; float32 (float64 for a float64 W0) as PEFT
// keeps adapters, W0's device) and refreshes. A Linear
// that already has one throws. Returns the adapted linears.
std::vector<LoRALinear> apply_lora(WanModel& model, const LoRAOptions& opt);
// Every adapted Linear, in model order.
std::vector<LoRALinear> find_lora(WanModel& model);
// Rebuilds the effective weights from W0, A, B (see the header comment).
void refresh_lora(WanModel& model);
// Folds scale * B A into W0 (computed in float32 for 16-bit weights), removes
// the adapters and restores the plain Linear. Returns how many were merged.
int64_t merge_lora(WanModel& model);
// Drops the adapters without merging. Returns how many were removed.
int64_t remove_lora(WanModel& model);

// What convert_to_salad sets on every block.
struct SaladConvertOptions {
  Options attn;  // pattern, blocks, keep, tile, window, feature, linear_rope, eps; mode becomes salad
  Gate gate = Gate::StaticDynamic;
  bool static_per_head = false;
  std::set<int64_t> skip_linear;  // layers whose linear branch is dropped
  LoRAOptions lora;
  // Zero W_l (linear_o) and the gate, static scales 1: the converted model
  // then equals the sparse-only model exactly.
  bool reinit = true;

  // A plan that builds a model convert_to_salad accepts without changes (use
  // it when the model is built, e.g. for load_wan_model).
  WanAttentionPlan plan(Impl impl = Impl::Auto) const;
  void validate() const;  // ArgumentError naming the field
};

// Sets every block to mode salad with `opt`'s options, adds a missing gate /
// static scale (a model built with static scales cannot drop them: throws
// naming "gate"; a per-layer / per-head mismatch likewise names
// static_per_head), re-initialises per `reinit` and adds LoRA when rank > 0.
// model->plan() keeps the plan it was built with; the blocks' configs are the truth.
void convert_to_salad(WanModel& model, const SaladConvertOptions& opt);

// The SALAD/adapter group of a parameter name: "lora", "linear_o", "gate",
// "static_scale", or "" for a base parameter.
std::string parameter_group(const std::string& name);
// Makes exactly the parameters of `groups` (any of "lora", "linear_o", "gate",
// "static_scale", or "all") trainable, freezes everything else
// (requires_grad false), refreshes the LoRA weights and returns the selected
// parameters by name. An unknown group throws naming it.
torch::OrderedDict<std::string, at::Tensor> trainable_parameters(WanModel& model,
                                                                 const std::vector<std::string>& groups);

// The options a converted model carries (attention options of block 0, gate,
// skip list, LoRA rank / alpha / targets as block-relative names).
SaladConvertOptions adapter_options(WanModel& model);

// ---------------------------------------------------------------------------
// Adapter files: the SALAD + LoRA parameters only (linear_o, gate,
// static_scale, lora_A / lora_B), official names, each parameter's dtype, with
// metadata: format "salad.adapter", lora_rank, lora_alpha, lora_targets,
// mode, pattern, keep, block_q, block_k, tile, window, feature, linear_rope,
// eps, gate, static_per_head, skip_linear, dim, num_heads, num_layers.

std::map<std::string, at::Tensor> adapter_state(WanModel& model);
std::map<std::string, std::string> adapter_metadata(WanModel& model);
// Atomic (io::write_safetensors).
void save_adapter(WanModel& model, const std::filesystem::path& path);

// The options recorded in an adapter file (throws when it is not a salad adapter).
SaladConvertOptions read_adapter_options(const std::filesystem::path& path);

struct AdapterLoadReport {
  SaladConvertOptions options;            // from the metadata (defaults when absent)
  std::vector<std::string> loaded;        // model parameter names that were set
  std::vector<std::string> kept_default;  // SALAD parameters absent from the file
};

// Loads an adapter file onto `model`. With `convert`, the model is first
// converted with the file's options (it must not carry LoRA yet); otherwise it
// must already carry the adapters. Every LoRA parameter of the model must be
// in the file; a file tensor without a parameter, or of another shape, throws
// ArgumentError naming the tensor (file and model names) and both shapes.
AdapterLoadReport load_adapter(WanModel& model, const std::filesystem::path& path, bool convert = true);

// A fresh adapter (W_l = 0, gate 0, static scales 1, B = 0, A Kaiming from
// torch::manual_seed(seed)) for a model of architecture `cfg`, float32,
// written without building the whole model (one block at a time).
void create_adapter(const WanConfig& cfg, const SaladConvertOptions& opt, const std::filesystem::path& out,
                    uint64_t seed = 0);

// base checkpoint + adapter -> merged checkpoint (official layout; base
// weights with the LoRA folded in, plus the trained SALAD parameters). dtype:
// the base's patch_embedding dtype unless given. num_heads as detect_wan_config.
void merge_adapter_checkpoint(const std::filesystem::path& base, const std::filesystem::path& adapter,
                              const std::filesystem::path& out, int64_t num_heads = 0,
                              std::optional<at::ScalarType> dtype = std::nullopt);

}  // namespace salad
