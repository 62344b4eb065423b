// SALAD conversion, weight-space LoRA on the frozen linears, adapter files
// (see include/salad/lora.h for the conventions).
#include "salad/lora.h"
#include "model/text.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <sstream>

#include "io/safetensors.h"

namespace salad {
namespace {

std::string join(const std::vector<std::string>& v, const char* sep = ",") {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}
std::vector<std::string> split(const std::string& s, char sep = ',') {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

// '*' matches any run of characters (dots included); everything else literally.
bool glob_match(const std::string& pat, const std::string& s) {
  size_t p = 0, i = 0, star = std::string::npos, mark = 0;
  while (i < s.size()) {
    if (p < pat.size() && pat[p] == '*') {
      star = p++, mark = i;
    } else if (p < pat.size() && pat[p] == s[i]) {
      ++p, ++i;
    } else if (star != std::string::npos) {
      p = star + 1, i = ++mark;
    } else {
      return false;
    }
  }
  while (p < pat.size() && pat[p] == '*') ++p;
  return p == pat.size();
}

// "q" -> "self_attn.q" (the paper's default targets).
std::string expand_target(const std::string& p) {
  return (p == "q" || p == "k" || p == "v" || p == "o") ? "self_attn." + p : p;
}

bool target_selects(const std::string& pattern, int64_t layer, const std::string& rel) {
  const std::string p = expand_target(pattern);
  return glob_match(p, rel) || glob_match(p, "blocks." + std::to_string(layer) + "." + rel);
}

// blocks.N.<rel> -> (N, rel); false for names outside the blocks.
bool split_block_name(const std::string& name, int64_t* layer, std::string* rel) {
  if (!starts_with(name, "blocks.")) return false;
  const size_t dot = name.find('.', 7);
  if (dot == std::string::npos || dot == 7) return false;
  const std::string idx = name.substr(7, dot - 7);
  if (!std::all_of(idx.begin(), idx.end(), ::isdigit)) return false;
  *layer = std::stoll(idx);
  *rel = name.substr(dot + 1);
  return true;
}

struct Candidate {
  std::string name, rel;
  int64_t layer;
  torch::nn::LinearImpl* linear;
};

// Every Linear of a block that LoRA may adapt (not linear_o / gate), in model order.
std::vector<Candidate> lora_candidates(WanModel& model) {
  std::vector<Candidate> out;
  for (const auto& item : model->named_modules("", false)) {
    auto* lin = dynamic_cast<torch::nn::LinearImpl*>(item.value().get());
    if (!lin) continue;
    Candidate c{item.key(), "", -1, lin};
    if (!split_block_name(c.name, &c.layer, &c.rel)) continue;
    if (c.rel == "self_attn.linear_o" || c.rel == "self_attn.gate") continue;
    out.push_back(c);
  }
  return out;
}

at::ScalarType high_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::shared_ptr<LoRAFactorImpl> child_factor(torch::nn::LinearImpl* lin, const char* name) {
  const auto children = lin->named_children();
  const auto* c = children.find(name);
  return c ? std::dynamic_pointer_cast<LoRAFactorImpl>(*c) : nullptr;
}

at::Tensor registered_weight(torch::nn::LinearImpl* lin) {
  return lin->named_parameters(false)["weight"];
}

std::string format_double(double v) {
  for (int prec : {15, 16, 17}) {
    std::ostringstream o;
    o.precision(prec);
    o << v;
    if (std::stod(o.str()) == v) return o.str();
  }
  return std::to_string(v);
}

// The targets of a model as metadata text: block-relative names when every
// block carries the same ones, else full module names.
std::string format_targets(const std::vector<std::vector<std::string>>& per_layer) {
  bool uniform = true;
  for (const auto& t : per_layer) uniform = uniform && t == per_layer.front();
  if (per_layer.empty() || uniform) return per_layer.empty() ? "" : join(per_layer.front());
  std::vector<std::string> full;
  for (size_t i = 0; i < per_layer.size(); ++i)
    for (const auto& rel : per_layer[i]) full.push_back("blocks." + std::to_string(i) + "." + rel);
  return join(full);
}

at::ScalarType torch_float_dtype(io::DType d, const std::string& what) {
  switch (d) {
    case io::DType::F32:
      return at::kFloat;
    case io::DType::F64:
      return at::kDouble;
    case io::DType::BF16:
      return at::kBFloat16;
    case io::DType::F16:
      return at::kHalf;
    default:
      break;
  }
  fail(what, ": expected a float32/float64/bfloat16/float16 tensor, got ", io::to_string(d));
}

// A file tensor name in any accepted convention -> the official parameter name.
std::string official_adapter_name(std::string n) {
  for (bool again = true; again;) {
    again = false;
    for (const char* p : {"base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer."})
      if (starts_with(n, p)) n = n.substr(std::string(p).size()), again = true;
  }
  for (auto [from, to] : {std::pair<const char*, const char*>{".lora_down.", ".lora_A."}, {".lora_up.", ".lora_B."}})
    if (auto at = n.find(from); at != std::string::npos) n.replace(at, std::string(from).size(), to);
  return wan_diffusers_to_official(n);
}
}  // namespace

// --- LoRA ---------------------------------------------------------------------

LoRAFactorImpl::LoRAFactorImpl(const at::Tensor& w) {
  weight = register_parameter("weight", w);
}

void LoRAOptions::validate() const {
  if (rank < 0) fail("rank: expected >= 0 (0: no LoRA), got ", rank);
  if (rank > 0 && !(alpha > 0 && std::isfinite(alpha))) fail("alpha: expected a positive finite value, got ", alpha);
  if (dropout != 0.0)
    fail("dropout: expected 0 (the adapter is merged into the weight, so there is no input to drop), got ", dropout);
  if (rank > 0 && targets.empty()) fail("targets: expected at least one module-name pattern");
  for (const auto& t : targets)
    if (t.empty()) fail("targets: expected non-empty patterns, got an empty one");
}

at::Tensor LoRALinear::delta() const {
  const auto hi = high_dtype(base_weight.scalar_type());
  return at::mm(B->weight.to(hi), A->weight.to(hi)).mul_(scale());
}

at::Tensor LoRALinear::effective_weight() const {
  const auto hi = high_dtype(base_weight.scalar_type());
  const at::Tensor w = at::addmm(base_weight.to(hi), B->weight.to(hi), A->weight.to(hi), 1.0, scale());
  return w.scalar_type() == base_weight.scalar_type() ? w : w.to(base_weight.scalar_type());
}

at::Tensor LoRALinear::forward(const at::Tensor& x) const {
  const at::Tensor bias = linear->bias.defined() ? linear->bias : at::Tensor();
  const at::Tensor base = at::linear(x, base_weight, bias);
  const at::Tensor low = at::linear(at::linear(x, A->weight.to(x.scalar_type())), B->weight.to(x.scalar_type()));
  return base + low * scale();
}

std::vector<std::string> lora_target_names(WanModel& model, const std::vector<std::string>& patterns) {
  const auto cands = lora_candidates(model);
  std::vector<std::string> out;
  std::vector<bool> used(patterns.size(), false);
  for (const auto& c : cands) {
    bool hit = false;
    for (size_t i = 0; i < patterns.size(); ++i)
      if (target_selects(patterns[i], c.layer, c.rel)) used[i] = true, hit = true;
    if (hit) out.push_back(c.name);
  }
  for (size_t i = 0; i < patterns.size(); ++i)
    if (!used[i]) {
      std::vector<std::string> rels;
      for (const auto& c : cands)
        if (c.layer == 0) rels.push_back(c.rel);
      fail("targets: pattern '", patterns[i], "' matches no Linear; candidates per block: ", join(rels, ", "),
           " (or q, k, v, o, globs with '*', full names blocks.N.<name>)");
    }
  return out;
}

std::vector<LoRALinear> find_lora(WanModel& model) {
  std::vector<LoRALinear> out;
  for (const auto& item : model->named_modules("", false)) {
    auto* lin = dynamic_cast<torch::nn::LinearImpl*>(item.value().get());
    if (!lin) continue;
    auto a = child_factor(lin, "lora_A"), b = child_factor(lin, "lora_B");
    if (!a || !b) continue;
    out.push_back({item.key(), lin, registered_weight(lin), LoRAFactor(a), LoRAFactor(b)});
  }
  return out;
}

void refresh_lora(WanModel& model) {
  // The graph must exist even when the caller is under NoGradGuard, or a later
  // training forward would silently give A and B no gradient.
  at::AutoGradMode grad_on(true);
  // Never under autocast (the "lora" pre-forward hook runs inside the training
  // forward): the merge stays in float32 as documented, and above all A and B,
  // float32 leaves that require grad, must not reach autocast's cast cache. A
  // cached bf16 copy outlives the step (until at::autocast::clear_cache()), so
  // every later forward would reuse step 1's A and B (B = 0): the adapter
  // would have no effect on training, A no gradient, and B would drift blind.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  for (const LoRALinear& l : find_lora(model)) {
    at::Tensor w = l.effective_weight();
    if (w.requires_grad()) {
      // A second backward through one effective weight means a forward ran
      // without refresh_lora after the previous step: say so, instead of
      // autograd's "backward through the graph a second time".
      auto uses = std::make_shared<int>(0);
      const std::string name = l.name;
      w.register_hook([uses, name](const at::Tensor& g) {
        if (++*uses > 1)
          throw ArgumentError("LoRA weight of '" + name +
                              "' is stale: call salad::refresh_lora(model) before every forward that follows a "
                              "backward or an update of the adapters");
        return g;
      });
    }
    l.linear->weight = w;
  }
}

std::vector<LoRALinear> apply_lora(WanModel& model, const LoRAOptions& opt) {
  opt.validate();
  if (opt.rank == 0) return {};
  const std::vector<std::string> names = lora_target_names(model, opt.targets);
  const auto modules = model->named_modules("", false);
  for (const auto& n : names)
    if (child_factor(dynamic_cast<torch::nn::LinearImpl*>(modules[n].get()), "lora_A"))
      fail("targets: '", n, "' already has a LoRA adapter; merge_lora or remove_lora first");
  for (const auto& n : names) {
    auto* lin = dynamic_cast<torch::nn::LinearImpl*>(modules[n].get());
    const at::Tensor w0 = registered_weight(lin);
    const int64_t out_f = w0.size(0), in_f = w0.size(1);
    if (opt.rank > std::min(in_f, out_f))
      fail("rank: expected at most min(in, out)=", std::min(in_f, out_f), " for '", n, "', got ", opt.rank);
    const auto o = w0.options().dtype(high_dtype(w0.scalar_type())).requires_grad(false);
    at::Tensor a = at::empty({opt.rank, in_f}, o), b = at::zeros({out_f, opt.rank}, o);
    torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));  // as nn.Linear(in, r) / PEFT
    lin->register_module("lora_A", LoRAFactor(a));
    auto bf = lin->register_module("lora_B", LoRAFactor(b));
    bf->alpha = opt.alpha;
  }
  refresh_lora(model);
  // Every forward re-composes W0 + (alpha/r) B A, so training and sampling need no extra call.
  WanModelImpl* raw = model.get();
  model->pre_forward["lora"] = [raw] {
    WanModel holder(std::shared_ptr<WanModelImpl>(raw, [](WanModelImpl*) {}));
    refresh_lora(holder);
  };
  std::vector<LoRALinear> out;
  for (auto& l : find_lora(model))
    if (std::find(names.begin(), names.end(), l.name) != names.end()) out.push_back(l);
  return out;
}

namespace {
void drop_adapter(const LoRALinear& l) {
  l.linear->unregister_module("lora_A");
  l.linear->unregister_module("lora_B");
  l.linear->weight = l.base_weight;
}
}  // namespace

int64_t merge_lora(WanModel& model) {
  const auto ls = find_lora(model);
  {
    torch::NoGradGuard ng;
    for (const LoRALinear& l : ls) {
      // Same arithmetic as effective_weight, so merged == adapted (bit-for-bit in float32).
      const at::Tensor w = l.effective_weight();
      l.base_weight.copy_(w);
      drop_adapter(l);
    }
  }
  return static_cast<int64_t>(ls.size());
}

int64_t remove_lora(WanModel& model) {
  const auto ls = find_lora(model);
  for (const LoRALinear& l : ls) drop_adapter(l);
  return static_cast<int64_t>(ls.size());
}

// --- conversion ---------------------------------------------------------------

void SaladConvertOptions::validate() const {
  validate_options(attn, 1, 64);  // the fields that do not depend on the input
  for (int64_t i : skip_linear)
    if (i < 0) fail("skip_linear: expected non-negative layer indices, got ", i);
  lora.validate();
}

WanAttentionPlan SaladConvertOptions::plan(Impl impl) const {
  WanAttentionPlan p;
  p.base.attn = attn;
  p.base.attn.mode = Mode::Salad;
  p.base.gate = gate;
  p.base.static_per_head = static_per_head;
  p.base.impl = impl;
  p.skip_linear = skip_linear;
  return p;
}

void convert_to_salad(WanModel& model, const SaladConvertOptions& opt) {
  opt.validate();
  const WanConfig& cfg = model->config();
  for (int64_t i : opt.skip_linear)
    if (i >= cfg.num_layers) fail("skip_linear: layer index ", i, " outside [0, ", cfg.num_layers, ")");
  const bool want_dyn = opt.gate == Gate::Dynamic || opt.gate == Gate::StaticDynamic;
  const bool want_static = opt.gate == Gate::Static || opt.gate == Gate::StaticDynamic;
  const int64_t n_static = opt.static_per_head ? cfg.num_heads : 1;
  // Check everything first so that a refused conversion leaves the model as it was.
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    auto sa = model->block(i)->self_attn;
    if (!want_static && sa->static_scale.defined())
      fail("gate: '", to_string(opt.gate), "' has no static scale, but block ", i,
           " was built with one (a parameter cannot be removed); build the model with SaladConvertOptions::plan()");
    if (want_static && sa->static_scale.defined() && sa->static_scale.numel() != n_static)
      fail("static_per_head: expected ", n_static, " static scale(s) per layer, block ", i, " has ",
           sa->static_scale.numel(), "; build the model with SaladConvertOptions::plan()");
  }
  if (opt.lora.rank > 0) {
    const auto modules = model->named_modules("", false);
    for (const auto& n : lora_target_names(model, opt.lora.targets))
      if (child_factor(dynamic_cast<torch::nn::LinearImpl*>(modules[n].get()), "lora_A"))
        fail("lora.targets: '", n, "' already has a LoRA adapter; merge_lora or remove_lora first");
  }
  torch::NoGradGuard ng;
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    auto sa = model->block(i)->self_attn;
    LayerConfig& lc = sa->config();
    lc.attn = opt.attn;
    lc.attn.mode = Mode::Salad;
    lc.gate = opt.gate;
    lc.static_per_head = opt.static_per_head;
    lc.skip_linear = opt.skip_linear.count(i) > 0;
    const at::Tensor& ref = sa->linear_o->weight;
    if (want_dyn && !sa->gate) {
      sa->gate = sa->register_module("gate", torch::nn::Linear(cfg.dim, 1));
      sa->gate->to(ref.device(), ref.scalar_type());
      sa->gate->weight.zero_(), sa->gate->bias.zero_();
    } else if (!want_dyn && sa->gate) {
      sa->unregister_module("gate");
      sa->gate = nullptr;
    }
    if (want_static && !sa->static_scale.defined())
      sa->static_scale = sa->register_parameter("static_scale", torch::ones({n_static}, ref.options()));
    if (opt.reinit) {
      sa->linear_o->weight.zero_();
      sa->linear_o->bias.zero_();
      if (sa->gate) sa->gate->weight.zero_(), sa->gate->bias.zero_();
      if (sa->static_scale.defined()) sa->static_scale.fill_(1.0);
    }
  }
  if (opt.lora.rank > 0) {
    at::AutoGradMode grad_on(true);
    apply_lora(model, opt.lora);
  }
}

std::string parameter_group(const std::string& name) {
  if (name.find(".lora_A.") != std::string::npos || name.find(".lora_B.") != std::string::npos) return "lora";
  if (name.find(".self_attn.linear_o.") != std::string::npos) return "linear_o";
  if (name.find(".self_attn.gate.") != std::string::npos) return "gate";
  if (ends_with(name, ".self_attn.static_scale")) return "static_scale";
  return "";
}

torch::OrderedDict<std::string, at::Tensor> trainable_parameters(WanModel& model,
                                                                 const std::vector<std::string>& groups) {
  bool all = false;
  std::set<std::string> want;
  for (const auto& g : groups) {
    if (g == "all") {
      all = true;
    } else if (g == "lora" || g == "linear_o" || g == "gate" || g == "static_scale") {
      want.insert(g);
    } else {
      fail("groups: expected any of lora, linear_o, gate, static_scale or all, got '", g, "'");
    }
  }
  torch::OrderedDict<std::string, at::Tensor> out;
  for (auto& p : model->named_parameters(true)) {
    const bool on = all || want.count(parameter_group(p.key())) > 0;
    p.value().requires_grad_(on);
    if (on) out.insert(p.key(), p.value());
  }
  refresh_lora(model);
  return out;
}

SaladConvertOptions adapter_options(WanModel& model) {
  SaladConvertOptions o;
  const WanConfig& cfg = model->config();
  const LayerConfig& lc = model->block(0)->self_attn->config();
  o.attn = lc.attn;
  o.attn.mode = Mode::Salad;
  o.gate = lc.gate;
  o.static_per_head = lc.static_per_head;
  o.skip_linear.clear();
  for (int64_t i = 0; i < cfg.num_layers; ++i)
    if (model->block(i)->self_attn->config().skip_linear) o.skip_linear.insert(i);
  const auto ls = find_lora(model);
  o.lora.targets.clear();
  if (ls.empty()) {
    o.lora.rank = 0;
    return o;
  }
  o.lora.rank = ls.front().rank();
  o.lora.alpha = ls.front().alpha();
  std::vector<std::vector<std::string>> per_layer(static_cast<size_t>(cfg.num_layers));
  for (const auto& l : ls) {
    int64_t layer;
    std::string rel;
    if (split_block_name(l.name, &layer, &rel)) per_layer[static_cast<size_t>(layer)].push_back(rel);
  }
  o.lora.targets = split(format_targets(per_layer));
  return o;
}

// --- adapter files --------------------------------------------------------------

std::map<std::string, at::Tensor> adapter_state(WanModel& model) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : model->named_parameters(true))
    if (!parameter_group(p.key()).empty()) out[p.key()] = p.value().detach();
  return out;
}

namespace {
std::map<std::string, std::string> options_metadata(const SaladConvertOptions& o, const WanConfig& cfg) {
  const Options& a = o.attn;
  std::vector<std::string> skip;
  for (int64_t i : o.skip_linear) skip.push_back(std::to_string(i));
  auto ext = [](const Extent3& e) {
    return std::to_string(e.f) + "," + std::to_string(e.h) + "," + std::to_string(e.w);
  };
  return {
      {"format", "salad.adapter"},
      {"format_version", "1"},
      {"key_convention", "official (blocks.N.self_attn.q.lora_A.weight)"},
      {"lora_rank", std::to_string(o.lora.rank)},
      {"lora_alpha", format_double(o.lora.alpha)},
      {"lora_targets", join(o.lora.targets)},
      {"mode", "salad"},
      {"pattern", to_string(a.pattern)},
      {"keep", format_double(a.keep)},
      {"block_q", std::to_string(a.block_q)},
      {"block_k", std::to_string(a.block_k)},
      {"tile", a.tile_order ? ext(a.tile) : ""},
      {"window", ext(a.window)},
      {"feature", to_string(a.feature)},
      {"linear_rope", a.linear_rope ? "true" : "false"},
      {"eps", format_double(a.eps)},
      {"rope_theta", format_double(a.rope_theta)},
      {"gate", to_string(o.gate)},
      {"static_per_head", o.static_per_head ? "true" : "false"},
      {"skip_linear", join(skip)},
      {"dim", std::to_string(cfg.dim)},
      {"num_heads", std::to_string(cfg.num_heads)},
      {"num_layers", std::to_string(cfg.num_layers)},
  };
}

SaladConvertOptions options_from_metadata(const std::map<std::string, std::string>& md, const std::string& where) {
  auto it = md.find("format");
  if (it == md.end() || it->second != "salad.adapter")
    fail(where, ": not a salad adapter (metadata \"format\" is '", it == md.end() ? "" : it->second,
         "', expected 'salad.adapter')");
  auto get = [&](const char* key) -> std::string {
    auto f = md.find(key);
    if (f == md.end()) fail(where, ": metadata \"", key, "\" is missing");
    return f->second;
  };
  auto num = [&](const char* key, auto parse) {
    const std::string v = get(key);
    try {
      size_t used = 0;
      auto r = parse(v, &used);
      if (used != v.size()) throw std::invalid_argument(v);
      return r;
    } catch (const std::exception&) {
      fail(where, ": metadata \"", key, "\": expected a number, got '", v, "'");
    }
  };
  auto i64 = [&](const char* key) {
    return num(key, [](const std::string& s, size_t* u) { return std::stoll(s, u); });
  };
  auto dbl = [&](const char* key) { return num(key, [](const std::string& s, size_t* u) { return std::stod(s, u); }); };
  auto boolean = [&](const char* key) {
    const std::string v = get(key);
    if (v != "true" && v != "false") fail(where, ": metadata \"", key, "\": expected true|false, got '", v, "'");
    return v == "true";
  };
  auto ext = [&](const char* key) {
    const auto parts = split(get(key));
    if (parts.size() != 3) fail(where, ": metadata \"", key, "\": expected three integers f,h,w, got '", get(key), "'");
    Extent3 e;
    e.f = std::stoll(parts[0]), e.h = std::stoll(parts[1]), e.w = std::stoll(parts[2]);
    return e;
  };
  SaladConvertOptions o;
  try {
    o.lora.rank = i64("lora_rank");
    o.lora.alpha = dbl("lora_alpha");
    o.lora.targets = split(get("lora_targets"));
    o.attn.mode = Mode::Salad;
    o.attn.pattern = parse_pattern(get("pattern"));
    o.attn.keep = dbl("keep");
    o.attn.block_q = i64("block_q");
    o.attn.block_k = i64("block_k");
    if (!get("tile").empty()) o.attn.tile_order = true, o.attn.tile = ext("tile");
    o.attn.window = ext("window");
    o.attn.feature = parse_feature(get("feature"));
    o.attn.linear_rope = boolean("linear_rope");
    o.attn.eps = dbl("eps");
    o.attn.rope_theta = dbl("rope_theta");
    o.gate = parse_gate(get("gate"));
    o.static_per_head = boolean("static_per_head");
    for (const auto& s : split(get("skip_linear"))) o.skip_linear.insert(std::stoll(s));
    o.validate();
  } catch (const ArgumentError& e) {
    const std::string msg = e.what();
    if (starts_with(msg, where)) throw;
    fail(where, ": metadata: ", msg);
  } catch (const std::exception& e) {
    fail(where, ": metadata: ", e.what());
  }
  return o;
}
}  // namespace

std::map<std::string, std::string> adapter_metadata(WanModel& model) {
  return options_metadata(adapter_options(model), model->config());
}

void save_adapter(WanModel& model, const std::filesystem::path& path) {
  write_tensor_file(path, adapter_state(model), adapter_metadata(model));
}

SaladConvertOptions read_adapter_options(const std::filesystem::path& path) {
  const io::SafeTensorsFile f(path);
  return options_from_metadata(f.metadata(), "adapter " + path.string());
}

AdapterLoadReport load_adapter(WanModel& model, const std::filesystem::path& path, bool convert) {
  const io::SafeTensorsFile f(path);
  const std::string where = "adapter " + path.string();
  AdapterLoadReport rep;
  const bool ours = f.metadata().count("format") && f.metadata().at("format") == "salad.adapter";
  if (ours) rep.options = options_from_metadata(f.metadata(), where);
  if (convert) {
    if (!ours)
      fail(where,
           ": convert needs a salad adapter's metadata (format 'salad.adapter'); pass convert=false "
           "to load plain LoRA weights onto a model that already carries the adapters");
    if (!find_lora(model).empty())
      fail(where, ": the model already carries LoRA adapters; pass convert=false, or remove_lora first");
    convert_to_salad(model, rep.options);
  }
  // File names in any accepted convention -> official names.
  std::map<std::string, std::string> by_official;
  for (const auto& n : f.names()) {
    const std::string off = official_adapter_name(n);
    if (!by_official.emplace(off, n).second)
      fail(where, ": tensors '", by_official[off], "' and '", n, "' both name parameter '", off, "'");
  }
  struct Pending {
    at::Tensor param;
    const io::TensorInfo* info;
    std::string name, file_name;
  };
  std::vector<Pending> todo;
  std::set<std::string> used;
  for (auto& p : model->named_parameters(true)) {
    const std::string group = parameter_group(p.key());
    if (group.empty()) continue;
    const auto it = by_official.find(p.key());
    if (it == by_official.end()) {
      if (group == "lora")
        fail(where, ": missing tensor '", p.key(), "', expected shape ", shape_str(p.value().sizes()));
      rep.kept_default.push_back(p.key());
      continue;
    }
    const io::TensorInfo& info = f.info(it->second);
    const std::string label =
        "tensor '" + p.key() + "'" + (it->second != p.key() ? " (file key '" + it->second + "')" : "");
    if (info.shape != p.value().sizes().vec())
      fail(where, ": ", label, ": expected shape ", shape_str(p.value().sizes()), " (the model's), got ",
           shape_str(info.shape));
    torch_float_dtype(info.dtype, where + ": " + label);
    todo.push_back({p.value(), &info, p.key(), it->second});
    used.insert(it->second);
  }
  for (const auto& n : f.names())
    if (!used.count(n))
      fail(where, ": unexpected tensor '", n, "' (parameter '", official_adapter_name(n),
           "'): the model has no such adapter parameter (other targets, gate or layer count?)");
  {
    torch::NoGradGuard ng;
    for (const Pending& t : todo) {
      at::Tensor src = at::empty(t.info->shape, at::TensorOptions().dtype(torch_float_dtype(t.info->dtype, t.name)));
      if (t.info->nbytes) std::memcpy(src.data_ptr(), t.info->data, t.info->nbytes);
      t.param.copy_(src);
      rep.loaded.push_back(t.name);
    }
  }
  if (!ours) rep.options = adapter_options(model);
  refresh_lora(model);
  return rep;
}

void create_adapter(const WanConfig& cfg, const SaladConvertOptions& opt, const std::filesystem::path& out,
                    uint64_t seed) {
  cfg.validate();
  opt.validate();
  for (int64_t i : opt.skip_linear)
    if (i >= cfg.num_layers) fail("skip_linear: layer index ", i, " outside [0, ", cfg.num_layers, ")");
  torch::manual_seed(seed);
  // One block stands in for each layer in turn: the SALAD tensors are the same
  // constants everywhere, only lora_A is drawn afresh per layer.
  WanConfig one = cfg;
  one.num_layers = 1;
  one.text_len = 0;
  SaladConvertOptions base = opt;
  base.skip_linear.clear();
  base.lora.rank = 0;
  WanModel m(one, base.plan());
  convert_to_salad(m, base);
  std::vector<std::string> rels;
  for (const auto& c : lora_candidates(m)) rels.push_back(c.rel);
  std::vector<bool> pattern_used(opt.lora.targets.size(), false);
  std::vector<std::vector<std::string>> per_layer;
  std::map<std::string, at::Tensor> state;
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    std::vector<std::string> targets;
    if (opt.lora.rank > 0)
      for (const auto& rel : rels) {
        bool hit = false;
        for (size_t p = 0; p < opt.lora.targets.size(); ++p)
          if (target_selects(opt.lora.targets[p], i, rel)) pattern_used[p] = true, hit = true;
        if (hit) targets.push_back(rel);
      }
    per_layer.push_back(targets);
    remove_lora(m);
    if (!targets.empty()) {
      LoRAOptions lo = opt.lora;
      lo.targets = targets;
      apply_lora(m, lo);
    }
    const std::string prefix = "blocks." + std::to_string(i) + ".";
    for (const auto& [name, t] : adapter_state(m)) state[prefix + name.substr(std::string("blocks.0.").size())] = t;
  }
  for (size_t p = 0; p < pattern_used.size(); ++p)
    if (opt.lora.rank > 0 && !pattern_used[p])
      fail("targets: pattern '", opt.lora.targets[p], "' matches no Linear; candidates per block: ", join(rels, ", "));
  SaladConvertOptions recorded = opt;
  recorded.lora.targets = opt.lora.rank > 0 ? split(format_targets(per_layer)) : std::vector<std::string>{};
  write_tensor_file(out, state, options_metadata(recorded, cfg));
}

void merge_adapter_checkpoint(const std::filesystem::path& base, const std::filesystem::path& adapter,
                              const std::filesystem::path& out, int64_t num_heads,
                              std::optional<at::ScalarType> dtype) {
  const SaladConvertOptions opt = read_adapter_options(adapter);
  if (!dtype) {
    const io::ShardedCheckpoint ck(base);
    const std::string key = wan_key_prefix(ck.names()) + "patch_embedding.weight";
    const io::TensorInfo* info = ck.find(key);
    if (!info) fail("checkpoint ", base.string(), ": missing tensor '", key, "'");
    dtype = torch_float_dtype(info->dtype, "checkpoint " + base.string() + ": tensor '" + key + "'");
  }
  // The model in the output dtype; LoRA factors stay float32 and the merge is
  // computed in float32, so the base weights are rounded once.
  WanModel m = load_wan_model(base, opt.plan(), num_heads, 0, *dtype);
  load_adapter(m, adapter, true);
  merge_lora(m);
  save_wan_weights(m, out, WanLayout::Official, *dtype);
}

}  // namespace salad
