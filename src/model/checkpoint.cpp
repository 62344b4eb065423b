// Wan 2.1 checkpoints: official <-> diffusers key mapping, architecture
// detection from tensor shapes, loading into WanModel and saving it.
#include <algorithm>
#include <cctype>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/safetensors.h"
#include "salad/wan.h"
#include "model/text.h"

namespace salad {
namespace {
// Prefix renames (official, diffusers). A rule matches a whole dotted prefix
// (its text followed by '.' or the end of the key).
struct Rule {
  const char* official;
  const char* diffusers;
};
const Rule kTopRules[] = {
    {"text_embedding.0", "condition_embedder.text_embedder.linear_1"},
    {"text_embedding.2", "condition_embedder.text_embedder.linear_2"},
    {"time_embedding.0", "condition_embedder.time_embedder.linear_1"},
    {"time_embedding.2", "condition_embedder.time_embedder.linear_2"},
    {"time_projection.1", "condition_embedder.time_proj"},
    {"head.head", "proj_out"},
    {"head.modulation", "scale_shift_table"},
};
// Inside blocks.N. ; norm3 (official, affine, before cross-attention) is diffusers' norm2.
const Rule kBlockRules[] = {
    {"modulation", "scale_shift_table"},
    {"self_attn.q", "attn1.to_q"},
    {"self_attn.k", "attn1.to_k"},
    {"self_attn.v", "attn1.to_v"},
    {"self_attn.o", "attn1.to_out.0"},
    {"self_attn", "attn1"},  // norm_q, norm_k and the SALAD parameters keep their names
    {"cross_attn.q", "attn2.to_q"},
    {"cross_attn.k", "attn2.to_k"},
    {"cross_attn.v", "attn2.to_v"},
    {"cross_attn.o", "attn2.to_out.0"},
    {"cross_attn", "attn2"},
    {"norm3", "norm2"},
    {"ffn.0", "ffn.net.0.proj"},
    {"ffn.2", "ffn.net.2"},
};

bool prefix_match(const std::string& key, const std::string& p) {
  return starts_with(key, p) && (key.size() == p.size() || key[p.size()] == '.');
}

template <size_t N>
std::string rename(const std::string& key, const Rule (&rules)[N], bool to_diffusers) {
  for (const Rule& r : rules) {
    const std::string from = to_diffusers ? r.official : r.diffusers, to = to_diffusers ? r.diffusers : r.official;
    if (prefix_match(key, from)) return to + key.substr(from.size());
  }
  return key;
}

std::string map_key(const std::string& key, bool to_diffusers) {
  if (starts_with(key, "blocks.")) {
    const size_t dot = key.find('.', 7);
    if (dot == std::string::npos) return key;
    return key.substr(0, dot + 1) + rename(key.substr(dot + 1), kBlockRules, to_diffusers);
  }
  return rename(key, kTopRules, to_diffusers);
}

// Parameters that a base (non-SALAD) checkpoint does not have.
bool is_salad_extra(const std::string& official) {
  return official.find(".self_attn.linear_o.") != std::string::npos ||
         official.find(".self_attn.gate.") != std::string::npos || official.find(".lora_A.") != std::string::npos ||
         official.find(".lora_B.") != std::string::npos ||
         (official.size() >= 13 && official.compare(official.size() - 13, 13, ".static_scale") == 0);
}

at::ScalarType torch_dtype(io::DType d, const std::string& name) {
  switch (d) {
    case io::DType::BOOL:
      return at::kBool;
    case io::DType::U8:
      return at::kByte;
    case io::DType::I8:
      return at::kChar;
    case io::DType::I16:
      return at::kShort;
    case io::DType::I32:
      return at::kInt;
    case io::DType::I64:
      return at::kLong;
    case io::DType::F16:
      return at::kHalf;
    case io::DType::BF16:
      return at::kBFloat16;
    case io::DType::F32:
      return at::kFloat;
    case io::DType::F64:
      return at::kDouble;
    case io::DType::F8_E4M3:
      return at::kFloat8_e4m3fn;
    case io::DType::F8_E5M2:
      return at::kFloat8_e5m2;
    default:
      break;
  }
  fail("tensor '", name, "': dtype ", io::to_string(d), " is not supported");
}

io::DType io_dtype(at::ScalarType t, const std::string& name) {
  switch (t) {
    case at::kBool:
      return io::DType::BOOL;
    case at::kByte:
      return io::DType::U8;
    case at::kChar:
      return io::DType::I8;
    case at::kShort:
      return io::DType::I16;
    case at::kInt:
      return io::DType::I32;
    case at::kLong:
      return io::DType::I64;
    case at::kHalf:
      return io::DType::F16;
    case at::kBFloat16:
      return io::DType::BF16;
    case at::kFloat:
      return io::DType::F32;
    case at::kDouble:
      return io::DType::F64;
    case at::kFloat8_e4m3fn:
      return io::DType::F8_E4M3;
    case at::kFloat8_e5m2:
      return io::DType::F8_E5M2;
    default:
      break;
  }
  fail("tensor '", name, "': dtype ", t, " cannot be written to safetensors");
}

// A CPU tensor owning a copy of the mapped bytes (memcpy: the mapping need not be aligned).
at::Tensor to_tensor(const io::TensorInfo& info, const std::string& name) {
  at::Tensor t = at::empty(info.shape, at::TensorOptions().dtype(torch_dtype(info.dtype, name)));
  if (info.nbytes) std::memcpy(t.data_ptr(), info.data, info.nbytes);
  return t;
}

std::map<std::string, std::vector<int64_t>> shapes_of(const io::ShardedCheckpoint& ck) {
  std::map<std::string, std::vector<int64_t>> s;
  for (const auto& n : ck.names()) s[n] = ck.info(n).shape;
  return s;
}

int64_t heads_from_json(const std::filesystem::path& dir) {
  const auto cfg = dir / "config.json";
  std::ifstream in(cfg);
  if (!in) return 0;
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return 0;
  for (const char* key : {"num_heads", "num_attention_heads"})
    if (j.contains(key) && j[key].is_number_integer()) return j[key].get<int64_t>();
  return 0;
}
}  // namespace

const char* to_string(WanLayout l) {
  return l == WanLayout::Official ? "official" : "diffusers";
}

std::string wan_official_to_diffusers(const std::string& key) {
  return map_key(key, true);
}
std::string wan_diffusers_to_official(const std::string& key) {
  return map_key(key, false);
}

std::string wan_key_prefix(const std::vector<std::string>& names) {
  static const std::string anchor = "patch_embedding.weight";
  for (const auto& n : names)
    if (n.size() >= anchor.size() && n.compare(n.size() - anchor.size(), anchor.size(), anchor) == 0 &&
        (n.size() == anchor.size() || n[n.size() - anchor.size() - 1] == '.'))
      return n.substr(0, n.size() - anchor.size());
  return "";
}

WanLayout detect_wan_layout(const std::vector<std::string>& names) {
  const std::string pre = wan_key_prefix(names);
  for (const auto& n : names) {
    if (!starts_with(n, pre)) continue;
    const std::string k = n.substr(pre.size());
    if (starts_with(k, "condition_embedder.") || starts_with(k, "proj_out.") || k == "scale_shift_table" ||
        k.find(".attn1.") != std::string::npos || k.find(".attn2.") != std::string::npos)
      return WanLayout::Diffusers;
  }
  return WanLayout::Official;
}

WanConfig detect_wan_config(const std::map<std::string, std::vector<int64_t>>& shapes, int64_t num_heads) {
  std::vector<std::string> names;
  for (const auto& kv : shapes) names.push_back(kv.first);
  const std::string pre = wan_key_prefix(names);
  const bool diff = detect_wan_layout(names) == WanLayout::Diffusers;
  // Shape of an official-named tensor, looked up under the checkpoint's own name.
  auto find = [&](const std::string& official) -> const std::vector<int64_t>* {
    const auto it = shapes.find(pre + (diff ? wan_official_to_diffusers(official) : official));
    return it == shapes.end() ? nullptr : &it->second;
  };
  auto need = [&](const std::string& official, size_t rank) -> const std::vector<int64_t>& {
    const auto* s = find(official);
    if (!s)
      fail("checkpoint: missing tensor '", pre + (diff ? wan_official_to_diffusers(official) : official),
           "' needed to detect the architecture");
    if (s->size() != rank)
      fail("checkpoint: tensor '", official, "': expected rank ", rank, ", got shape ", shape_str(*s));
    return *s;
  };
  WanConfig c;
  const auto& pe = need("patch_embedding.weight", 5);
  c.dim = pe[0], c.in_dim = pe[1], c.patch = {pe[2], pe[3], pe[4]};
  int64_t max_block = -1;
  const std::string bp = pre + "blocks.";
  for (const auto& n : names) {
    if (!starts_with(n, bp)) continue;
    const size_t end = n.find('.', bp.size());
    const std::string idx = n.substr(bp.size(), end == std::string::npos ? std::string::npos : end - bp.size());
    if (idx.empty() || !std::all_of(idx.begin(), idx.end(), ::isdigit))
      fail("checkpoint: tensor '", n, "': expected blocks.<index>.*");
    max_block = std::max<int64_t>(max_block, std::stoll(idx));
  }
  if (max_block < 0) fail("checkpoint: no blocks.<index>.* tensors found");
  c.num_layers = max_block + 1;
  c.ffn_dim = need("blocks.0.ffn.0.weight", 2)[0];
  c.text_dim = need("text_embedding.0.weight", 2)[1];
  c.freq_dim = need("time_embedding.0.weight", 2)[1];
  const int64_t prod = c.patch[0] * c.patch[1] * c.patch[2];
  const auto& hw = need("head.head.weight", 2);
  if (hw[0] % prod != 0)
    fail("checkpoint: tensor 'head.head.weight': expected rows divisible by prod(patch)=", prod, ", got shape ",
         shape_str(hw));
  c.out_dim = hw[0] / prod;
  c.cross_attn_norm = find("blocks.0.norm3.weight") != nullptr;
  c.qk_norm = find("blocks.0.self_attn.norm_q.weight") != nullptr;
  if (num_heads > 0) {
    c.num_heads = num_heads;
  } else {
    if (c.dim % 128 != 0)
      fail("num_heads: dim=", c.dim, " is not a multiple of Wan's head width 128; pass num_heads explicitly");
    c.num_heads = c.dim / 128;
  }
  c.validate();
  return c;
}

WanConfig detect_wan_config(const std::filesystem::path& checkpoint, int64_t num_heads) {
  const io::ShardedCheckpoint ck(checkpoint);
  if (num_heads <= 0) {
    const auto& md = ck.metadata();
    if (auto it = md.find("num_heads"); it != md.end()) num_heads = std::stoll(it->second);
  }
  if (num_heads <= 0) {
    const auto dir = std::filesystem::is_directory(checkpoint) ? checkpoint : checkpoint.parent_path();
    num_heads = heads_from_json(dir.empty() ? std::filesystem::path(".") : dir);
  }
  WanConfig c = detect_wan_config(shapes_of(ck), num_heads);
  // The context padding is not visible in the shapes; our own files record it.
  if (auto it = ck.metadata().find("text_len"); it != ck.metadata().end()) c.text_len = std::stoll(it->second);
  return c;
}

WanLoadReport load_wan_weights(WanModel& model, const std::filesystem::path& checkpoint, bool strict) {
  const io::ShardedCheckpoint ck(checkpoint);
  const std::vector<std::string> names = ck.names();
  const std::string pre = wan_key_prefix(names);
  WanLoadReport rep;
  rep.layout = detect_wan_layout(names);
  const bool diff = rep.layout == WanLayout::Diffusers;
  auto file_key = [&](const std::string& official) {
    return pre + (diff ? wan_official_to_diffusers(official) : official);
  };
  std::set<std::string> used;
  torch::NoGradGuard ng;
  for (auto& p : model->named_parameters(true)) {
    const std::string& name = p.key();
    const std::string key = file_key(name);
    const io::TensorInfo* info = ck.find(key);
    const std::vector<int64_t> want = p.value().sizes().vec();
    const std::string label = "tensor '" + name + "'" +
                              (key != name ? " (" + std::string(to_string(rep.layout)) + " key '" + key + "')" : "");
    if (!info) {
      if (is_salad_extra(name)) {
        rep.kept_default.push_back(name);
        continue;
      }
      fail("checkpoint ", checkpoint.string(), ": missing ", label, ", expected shape ", shape_str(want));
    }
    if (info->shape != want)
      fail("checkpoint ", checkpoint.string(), ": ", label, ": expected shape ", shape_str(want), ", got ",
           shape_str(info->shape));
    p.value().copy_(to_tensor(*info, key));
    used.insert(key);
    rep.loaded.push_back(name);
  }
  for (const auto& n : names)
    if (!used.count(n)) rep.unexpected.push_back(n);
  if (strict && !rep.unexpected.empty()) {
    std::ostringstream s;
    for (size_t i = 0; i < rep.unexpected.size() && i < 5; ++i) s << (i ? ", " : "") << "'" << rep.unexpected[i] << "'";
    if (rep.unexpected.size() > 5) s << ", ...";
    fail("checkpoint ", checkpoint.string(), ": ", rep.unexpected.size(), " unexpected tensor(s) for this ",
         to_string(rep.layout), " layout: ", s.str());
  }
  return rep;
}

WanModel load_wan_model(const std::filesystem::path& checkpoint, const WanAttentionPlan& plan, int64_t num_heads,
                        int64_t text_len, at::ScalarType dtype, const at::Device& device) {
  WanConfig cfg = detect_wan_config(checkpoint, num_heads);
  if (text_len >= 0) cfg.text_len = text_len;
  // Build with `dtype` as the default dtype so the initial weights are never
  // float32 for a bf16 model; the process-wide default is restored at once.
  struct DefaultDtype {
    caffe2::TypeMeta saved = at::get_default_dtype();
    explicit DefaultDtype(at::ScalarType t) { at::set_default_dtype(c10::scalarTypeToTypeMeta(t)); }
    ~DefaultDtype() { at::set_default_dtype(saved); }
  };
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 && dtype != at::kHalf)
    fail("dtype: expected float32, float64, bfloat16 or float16, got ", dtype);
  WanModel model{nullptr};
  {
    DefaultDtype guard(dtype);
    model = WanModel(cfg, plan);
  }
  model->set_dtype(dtype);
  model->to(device);
  load_wan_weights(model, checkpoint);
  return model;
}

std::map<std::string, at::Tensor> read_tensor_file(const std::filesystem::path& path) {
  const io::SafeTensorsFile f(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& n : f.names()) out[n] = to_tensor(f.info(n), n);
  return out;
}

void write_tensor_file(const std::filesystem::path& path, const std::map<std::string, at::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> keep;  // owns the contiguous CPU copies while writing
  std::vector<io::TensorView> views;
  for (const auto& [name, t] : tensors) {
    keep.push_back(t.detach().to(at::kCPU).contiguous());
    views.push_back({name, io_dtype(t.scalar_type(), name), keep.back().sizes().vec(), keep.back().data_ptr()});
  }
  io::write_safetensors(path, views, metadata);
}

namespace {
// The model's parameters under `layout` names (CPU, contiguous, optionally cast) and the file metadata.
std::map<std::string, at::Tensor> export_state(WanModel& model, WanLayout layout, std::optional<at::ScalarType> dtype,
                                               std::map<std::string, std::string>* metadata) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : model->named_parameters(true)) {
    at::Tensor t = p.value().detach();
    if (dtype && t.is_floating_point()) t = t.to(*dtype);
    tensors[layout == WanLayout::Diffusers ? wan_official_to_diffusers(p.key()) : p.key()] =
        t.to(at::kCPU).contiguous();
  }
  const WanConfig& c = model->config();
  *metadata = {
      {"format", "salad.wan2.1"},
      {"layout", to_string(layout)},
      {"num_heads", std::to_string(c.num_heads)},
      {"dim", std::to_string(c.dim)},
      {"num_layers", std::to_string(c.num_layers)},
      {"text_len", std::to_string(c.text_len)},
  };
  return tensors;
}
}  // namespace

void save_wan_weights(WanModel& model, const std::filesystem::path& path, WanLayout layout,
                      std::optional<at::ScalarType> dtype) {
  std::map<std::string, std::string> md;
  const auto tensors = export_state(model, layout, dtype, &md);
  write_tensor_file(path, tensors, md);
}

std::filesystem::path save_wan_weights_sharded(WanModel& model, const std::filesystem::path& dir,
                                               size_t max_shard_bytes, WanLayout layout, const std::string& stem,
                                               std::optional<at::ScalarType> dtype) {
  std::map<std::string, std::string> md;
  const auto tensors = export_state(model, layout, dtype, &md);
  std::vector<io::TensorView> views;
  for (const auto& [name, t] : tensors)
    views.push_back({name, io_dtype(t.scalar_type(), name), t.sizes().vec(), t.data_ptr()});
  return io::write_sharded_safetensors(dir, stem, views, max_shard_bytes, md);
}

}  // namespace salad
