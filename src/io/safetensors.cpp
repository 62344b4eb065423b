#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian and is mapped without byte swapping");

namespace salad::io {
namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit
constexpr size_t kMaxJsonDepth = 64;               // a real header nests 3 deep
constexpr size_t kMaxNameInMessage = 200;          // fuzzed names can be huge

struct DTypeName {
  DType dtype;
  const char* name;
  size_t size;
  bool floating;
};
constexpr DTypeName kDTypes[] = {
    {DType::BOOL, "BOOL", 1, false},      {DType::U8, "U8", 1, false},
    {DType::I8, "I8", 1, false},          {DType::U16, "U16", 2, false},
    {DType::I16, "I16", 2, false},        {DType::U32, "U32", 4, false},
    {DType::I32, "I32", 4, false},        {DType::U64, "U64", 8, false},
    {DType::I64, "I64", 8, false},        {DType::F16, "F16", 2, true},
    {DType::BF16, "BF16", 2, true},       {DType::F32, "F32", 4, true},
    {DType::F64, "F64", 8, true},         {DType::F8_E4M3, "F8_E4M3", 1, true},
    {DType::F8_E5M2, "F8_E5M2", 1, true},
};

const DTypeName* lookup(DType d) {
  for (const auto& e : kDTypes)
    if (e.dtype == d) return &e;
  return nullptr;
}

std::string q_name(std::string_view name) {
  if (name.size() <= kMaxNameInMessage) return "'" + std::string(name) + "'";
  return "'" + std::string(name.substr(0, kMaxNameInMessage)) + "...'";
}

template <class... A>
std::string cat(const A&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

[[noreturn]] void format_error(const std::filesystem::path& file, const std::string& what) {
  throw FormatError(file.string() + ": " + what);
}
[[noreturn]] void tensor_error(const std::filesystem::path& file, std::string_view tensor,
                               const std::string& what) {
  throw FormatError(file.string() + ": tensor " + q_name(tensor) + ": " + what);
}
[[noreturn]] void os_error(const std::string& what, const std::filesystem::path& p, int err) {
  throw IoError(what + " " + p.string() + ": " + std::strerror(err));
}

// a * b into *out, false on overflow; both non-negative.
bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

// Element count of `shape`, or false when a dim is negative or the product passes
// int64 (a zero dim makes the product 0 whatever the others are).
bool shape_numel(const std::vector<int64_t>& shape, uint64_t* numel) {
  for (int64_t d : shape)
    if (d < 0) return false;
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) {
    *numel = 0;
    return true;
  }
  uint64_t n = 1;
  for (int64_t d : shape)
    if (!checked_mul(n, static_cast<uint64_t>(d), &n) ||
        n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return false;
  *numel = n;
  return true;
}

// Parses a JSON document, rejecting duplicate keys at any level (nlohmann keeps
// the last one silently) and nesting deeper than kMaxJsonDepth. `file` and
// `what` ("header", "index") name the document in messages.
json parse_strict_json(std::string_view text, const std::filesystem::path& file, const char* what) {
  struct Scope {
    std::string owner;  // the key this object is the value of ("" at the top)
    std::set<std::string> keys;
    std::string last_key;
  };
  std::vector<Scope> scopes;
  size_t depth = 0;
  auto callback = [&](int, json::parse_event_t ev, json& parsed) -> bool {
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (++depth > kMaxJsonDepth)
          format_error(file, cat(what, " nests deeper than ", kMaxJsonDepth, " levels"));
        if (ev == json::parse_event_t::object_start)
          scopes.push_back({scopes.empty() ? "" : scopes.back().last_key, {}, {}});
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        --depth;
        if (ev == json::parse_event_t::object_end) scopes.pop_back();
        break;
      case json::parse_event_t::key: {
        Scope& s = scopes.back();
        s.last_key = parsed.get<std::string>();
        if (!s.keys.insert(s.last_key).second) {
          if (scopes.size() == 1)
            format_error(file, cat(what, ": duplicate ",
                                   std::string_view(what) == "header" ? "tensor name " : "key ",
                                   q_name(s.last_key)));
          format_error(file, cat(what, ": entry ", q_name(scopes[1].owner), ": duplicate key ",
                                 q_name(s.last_key)));
        }
        break;
      }
      case json::parse_event_t::value: break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), callback);
  } catch (const json::exception& e) {
    format_error(file, cat(what, " is not valid JSON: ", e.what()));
  }
}

// A non-negative JSON integer, or an explanation in *err.
bool json_to_u64(const json& v, uint64_t* out, std::string* err) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {  // signed storage: "-0" is fine, anything else negative
    if (v.get<int64_t>() == 0) {
      *out = 0;
      return true;
    }
    *err = cat("is negative (", v.get<int64_t>(), ")");
    return false;
  }
  *err = "is not an integer (" + v.dump() + ")";
  return false;
}

const json& required_field(const std::filesystem::path& file, const std::string& tensor,
                           const json& entry, const char* key) {
  auto it = entry.find(key);
  if (it == entry.end()) tensor_error(file, tensor, cat("missing \"", key, "\""));
  return *it;
}

}  // namespace

// ---- dtypes and scalar codecs -------------------------------------------------

const char* to_string(DType d) {
  const DTypeName* e = lookup(d);
  return e ? e->name : "?";
}

bool parse_dtype(std::string_view s, DType* out) {
  for (const auto& e : kDTypes)
    if (s == e.name) {
      *out = e.dtype;
      return true;
    }
  return false;
}

size_t itemsize(DType d) {
  const DTypeName* e = lookup(d);
  if (!e) throw std::invalid_argument(cat("itemsize: dtype: expected a DType, got ", int(d)));
  return e->size;
}

bool is_floating(DType d) {
  const DTypeName* e = lookup(d);
  return e && e->floating;
}

namespace {
uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

float bf16_to_float(uint16_t bits) { return bits_float(uint32_t(bits) << 16); }

float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));  // rebias 15 -> 127
}

float f8e4m3_to_float(uint8_t b) {
  const bool neg = b & 0x80;
  const int exp = (b >> 3) & 0xf, man = b & 7;
  float v;
  if (exp == 15 && man == 7)
    v = std::numeric_limits<float>::quiet_NaN();
  else if (exp == 0)
    v = std::ldexp(float(man), -9);  // subnormal: 2^-6 * man / 8
  else
    v = std::ldexp(float(8 + man), exp - 10);  // (1 + man/8) * 2^(exp-7)
  return neg ? -v : v;
}

// E5M2 is the top byte of an IEEE half.
float f8e5m2_to_float(uint8_t b) { return f16_to_float(uint16_t(b) << 8); }

uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40);  // quiet NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1)) >> 16);  // nearest even; overflow -> inf
}

uint16_t float_to_f16(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00 | uint16_t((ax >> 13) & 0x3ff);  // quiet NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, scaling is exact
    return sign | uint16_t(std::nearbyint(std::ldexp(bits_float(ax), 24)));
  }
  uint32_t h = (((ax >> 23) - 112) << 10) | ((ax >> 13) & 0x3ff);
  const uint32_t rest = ax & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // a carry bumps the exponent
  return sign | uint16_t(h);
}

namespace {
template <class T>
T load(const void* data, size_t index) {
  T v;
  std::memcpy(&v, static_cast<const char*>(data) + index * sizeof(T), sizeof(T));
  return v;
}
}  // namespace

double element_to_double(DType d, const void* data, size_t i) {
  switch (d) {
    case DType::BOOL: return load<uint8_t>(data, i) != 0 ? 1.0 : 0.0;
    case DType::U8: return load<uint8_t>(data, i);
    case DType::I8: return load<int8_t>(data, i);
    case DType::U16: return load<uint16_t>(data, i);
    case DType::I16: return load<int16_t>(data, i);
    case DType::U32: return load<uint32_t>(data, i);
    case DType::I32: return load<int32_t>(data, i);
    case DType::U64: return double(load<uint64_t>(data, i));
    case DType::I64: return double(load<int64_t>(data, i));
    case DType::F16: return f16_to_float(load<uint16_t>(data, i));
    case DType::BF16: return bf16_to_float(load<uint16_t>(data, i));
    case DType::F32: return load<float>(data, i);
    case DType::F64: return load<double>(data, i);
    case DType::F8_E4M3: return f8e4m3_to_float(load<uint8_t>(data, i));
    case DType::F8_E5M2: return f8e5m2_to_float(load<uint8_t>(data, i));
  }
  throw std::invalid_argument(cat("element_to_double: dtype: expected a DType, got ", int(d)));
}

float element_to_float(DType d, const void* data, size_t i) {
  return static_cast<float>(element_to_double(d, data, i));
}

int64_t TensorInfo::numel() const {
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated on open: fits in int64
  return n;
}

std::vector<double> to_double_vector(const TensorInfo& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = element_to_double(t.dtype, t.data, i);
  return out;
}

std::vector<float> to_float_vector(const TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = element_to_float(t.dtype, t.data, i);
  return out;
}

// ---- SafeTensorsFile ----------------------------------------------------------

SafeTensorsFile::~SafeTensorsFile() { close(); }

SafeTensorsFile::SafeTensorsFile(SafeTensorsFile&& o) noexcept { *this = std::move(o); }

SafeTensorsFile& SafeTensorsFile::operator=(SafeTensorsFile&& o) noexcept {
  if (this != &o) {
    close();
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
    names_ = std::move(o.names_);
    tensors_ = std::move(o.tensors_);
    metadata_ = std::move(o.metadata_);
    o.close();
  }
  return *this;
}

void SafeTensorsFile::close() {
  if (map_) munmap(const_cast<std::byte*>(map_), map_size_);
  map_ = nullptr;
  map_size_ = 0;
  names_.clear();
  tensors_.clear();
  metadata_.clear();
}

void SafeTensorsFile::open(const std::filesystem::path& path) {
  close();
  path_ = path;

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) os_error("cannot open", path, errno);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    os_error("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(path.string() + ": not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    format_error(path, cat("file is ", size, " bytes, shorter than the 8-byte header length"));
  }
  void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (m == MAP_FAILED) os_error("cannot mmap", path, err);
  map_ = static_cast<const std::byte*>(m);
  map_size_ = size;

  try {
    uint64_t header_len;
    std::memcpy(&header_len, map_, 8);
    if (header_len > kMaxHeaderBytes)
      format_error(path, cat("header length ", header_len, " exceeds the ", kMaxHeaderBytes,
                             "-byte limit (corrupt length field?)"));
    if (header_len > size - 8)
      format_error(path, cat("header length ", header_len, " runs past the end of the file (", size,
                             " bytes)"));
    const std::string_view text(reinterpret_cast<const char*>(map_) + 8, header_len);
    const json header = parse_strict_json(text, path, "header");
    if (!header.is_object())
      format_error(path, cat("header is a JSON ", header.type_name(), ", expected an object"));

    const uint64_t data_start = 8 + header_len, data_size = size - data_start;
    struct Span {
      uint64_t begin, end;
      const std::string* name;
    };
    std::vector<Span> spans;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object())
          format_error(path, cat("__metadata__ is a JSON ", entry.type_name(),
                                 ", expected an object of strings"));
        for (const auto& [k, v] : entry.items()) {
          if (!v.is_string())
            format_error(path, cat("__metadata__ value of ", q_name(k), " is a JSON ",
                                   v.type_name(), ", expected a string"));
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      if (!entry.is_object())
        tensor_error(path, name,
                     cat("entry is a JSON ", entry.type_name(), ", expected an object"));

      TensorInfo t;
      const json& dtype = required_field(path, name, entry, "dtype");
      if (!dtype.is_string())
        tensor_error(
            path, name,
            "\"dtype\" is a JSON " + std::string(dtype.type_name()) + ", expected a string");
      if (!parse_dtype(dtype.get_ref<const std::string&>(), &t.dtype))
        tensor_error(path, name, "unknown dtype " + q_name(dtype.get_ref<const std::string&>()));

      const json& shape = required_field(path, name, entry, "shape");
      if (!shape.is_array())
        tensor_error(
            path, name,
            "\"shape\" is a JSON " + std::string(shape.type_name()) + ", expected an array");
      for (size_t i = 0; i < shape.size(); ++i) {
        uint64_t d;
        std::string why;
        if (!json_to_u64(shape[i], &d, &why)) tensor_error(path, name, cat("shape[", i, "] ", why));
        if (d > uint64_t(std::numeric_limits<int64_t>::max()))
          tensor_error(path, name, cat("shape[", i, "] = ", d, " does not fit in int64"));
        t.shape.push_back(static_cast<int64_t>(d));
      }
      uint64_t numel, nbytes;
      if (!shape_numel(t.shape, &numel) || !checked_mul(numel, itemsize(t.dtype), &nbytes))
        tensor_error(path, name, "shape " + shape.dump() + " has more elements than fit in int64");

      const json& offsets = required_field(path, name, entry, "data_offsets");
      if (!offsets.is_array() || offsets.size() != 2)
        tensor_error(path, name,
                     "\"data_offsets\" is " + offsets.dump() + ", expected [begin, end]");
      uint64_t begin, end;
      std::string why;
      if (!json_to_u64(offsets[0], &begin, &why))
        tensor_error(path, name, "data_offsets begin " + why);
      if (!json_to_u64(offsets[1], &end, &why)) tensor_error(path, name, "data_offsets end " + why);
      if (begin > end)
        tensor_error(path, name,
                     cat("data_offsets [", begin, ", ", end, "] ends before it begins"));
      if (end > data_size)
        tensor_error(path, name,
                     cat("data_offsets [", begin, ", ", end,
                         "] run past the end of the data section (", data_size, " bytes)"));
      if (end - begin != nbytes)
        tensor_error(path, name,
                     cat("data_offsets [", begin, ", ", end, "] hold ", end - begin, " bytes, but ",
                         to_string(t.dtype), " ", shape.dump(), " needs ", nbytes));
      t.data = map_ + data_start + begin;
      t.nbytes = static_cast<size_t>(nbytes);
      auto ins = tensors_.emplace(name, std::move(t));
      if (nbytes > 0) spans.push_back({begin, end, &ins.first->first});
    }

    // Holes are tolerated (see the header); shared bytes are not.
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.begin < b.begin; });
    for (size_t i = 1; i < spans.size(); ++i)
      if (spans[i].begin < spans[i - 1].end)
        tensor_error(path, *spans[i].name,
                     cat("data_offsets [", spans[i].begin, ", ", spans[i].end, "] overlap tensor ",
                         q_name(*spans[i - 1].name), " at [", spans[i - 1].begin, ", ",
                         spans[i - 1].end, "]"));
    // Sorted non-empty spans that do not overlap their predecessor cannot overlap any earlier one.

    names_.reserve(tensors_.size());
    for (const auto& kv : tensors_) names_.push_back(kv.first);
  } catch (...) {
    close();
    throw;
  }
}

bool SafeTensorsFile::contains(std::string_view name) const { return find(name) != nullptr; }

const TensorInfo* SafeTensorsFile::find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const TensorInfo& SafeTensorsFile::info(std::string_view name) const {
  if (const TensorInfo* t = find(name)) return *t;
  throw std::out_of_range(path_.string() + ": no tensor named " + q_name(name));
}

// ---- ShardedCheckpoint --------------------------------------------------------

namespace {
bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
constexpr std::string_view kIndexSuffix = ".safetensors.index.json";
constexpr std::string_view kFileSuffix = ".safetensors";

std::string read_small_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) os_error("cannot open", path, errno);
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) os_error("cannot read", path, errno);
  if (uint64_t(size) > kMaxHeaderBytes)
    format_error(path, cat("index is ", size, " bytes, over the ", kMaxHeaderBytes, "-byte limit"));
  std::string text(static_cast<size_t>(size), '\0');
  in.seekg(0);
  if (!in.read(text.data(), size)) os_error("cannot read", path, errno);
  return text;
}
}  // namespace

void ShardedCheckpoint::open(const std::filesystem::path& path_in) {
  namespace fs = std::filesystem;
  path_.clear();
  shards_.clear();
  shard_index_.clear();
  metadata_.clear();

  fs::path path = path_in;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    std::vector<fs::path> indexes, files;
    for (const auto& e : fs::directory_iterator(path, ec)) {
      const std::string name = e.path().filename().string();
      if (ends_with(name, kIndexSuffix))
        indexes.push_back(e.path());
      else if (ends_with(name, kFileSuffix) && name[0] != '.')
        files.push_back(e.path());
    }
    if (ec) os_error("cannot list", path, ec.value());
    std::sort(indexes.begin(), indexes.end());
    std::sort(files.begin(), files.end());
    const auto list = [](const std::vector<fs::path>& v) {
      std::string s;
      for (const auto& p : v) s += (s.empty() ? "" : ", ") + p.filename().string();
      return s;
    };
    if (indexes.size() > 1)
      format_error(path, "several checkpoint indexes (" + list(indexes) + "); name one");
    if (indexes.empty() && files.size() > 1)
      format_error(path, "several .safetensors files and no index (" + list(files) + "); name one");
    if (indexes.empty() && files.empty())
      format_error(path, "no *.safetensors or *.safetensors.index.json in the directory");
    path = indexes.empty() ? files[0] : indexes[0];
  }
  path_ = path;

  if (!ends_with(path.filename().string(), ".json")) {
    shards_.emplace_back(path);
    for (const auto& n : shards_[0].names()) shard_index_.emplace(n, 0);
    metadata_ = shards_[0].metadata();
    return;
  }

  try {
    const json index = parse_strict_json(read_small_file(path), path, "index");
    if (!index.is_object())
      format_error(path, cat("index is a JSON ", index.type_name(), ", expected an object"));
    if (auto m = index.find("metadata"); m != index.end() && !m->is_null()) {
      if (!m->is_object())
        format_error(path, cat("\"metadata\" is a JSON ", m->type_name(), ", expected an object"));
      for (const auto& [k, v] : m->items())
        metadata_[k] = v.is_string() ? v.get<std::string>() : v.dump();
    }
    auto wm = index.find("weight_map");
    if (wm == index.end()) format_error(path, "missing \"weight_map\"");
    if (!wm->is_object())
      format_error(path, cat("\"weight_map\" is a JSON ", wm->type_name(), ", expected an object"));

    std::map<std::string, size_t> slot_of_file;
    for (const auto& [tensor, file] : wm->items()) {
      if (!file.is_string())
        tensor_error(
            path, tensor,
            cat("weight_map value is a JSON ", file.type_name(), ", expected a shard file name"));
      const fs::path rel(file.get<std::string>());
      const bool escapes =
          std::any_of(rel.begin(), rel.end(), [](const fs::path& c) { return c == ".."; });
      if (rel.empty() || rel.is_absolute() || escapes)
        tensor_error(
            path, tensor,
            "shard " + q_name(rel.string()) + " is not a path inside the index's directory");
      slot_of_file.emplace(rel.string(), 0);
    }
    for (auto& [file, slot] : slot_of_file) {  // sorted, each shard opened once
      slot = shards_.size();
      shards_.emplace_back(path.parent_path() / file);
    }
    for (const auto& [tensor, file] : wm->items()) {
      const size_t slot = slot_of_file.at(file.get<std::string>());
      if (!shards_[slot].contains(tensor))
        tensor_error(path, tensor,
                     "listed in weight_map under shard " + q_name(file.get<std::string>()) +
                         " but missing from it");
      shard_index_.emplace(tensor, slot);
    }
  } catch (...) {
    shards_.clear();
    shard_index_.clear();
    metadata_.clear();
    throw;
  }
}

std::vector<std::string> ShardedCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(shard_index_.size());
  for (const auto& kv : shard_index_) out.push_back(kv.first);
  return out;
}

bool ShardedCheckpoint::contains(std::string_view name) const { return find(name) != nullptr; }

const TensorInfo* ShardedCheckpoint::find(std::string_view name) const {
  auto it = shard_index_.find(name);
  return it == shard_index_.end() ? nullptr : shards_[it->second].find(name);
}

const TensorInfo& ShardedCheckpoint::info(std::string_view name) const {
  if (const TensorInfo* t = find(name)) return *t;
  throw std::out_of_range(path_.string() + ": no tensor named " + q_name(name));
}

const SafeTensorsFile& ShardedCheckpoint::shard_of(std::string_view name) const {
  auto it = shard_index_.find(name);
  if (it == shard_index_.end())
    throw std::out_of_range(path_.string() + ": no tensor named " + q_name(name));
  return shards_[it->second];
}

// ---- writing ------------------------------------------------------------------

namespace {

void write_all(int fd, const void* data, size_t n, const std::filesystem::path& target) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t(1) << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      os_error("cannot write", target, errno);
    }
    p += w;
    n -= size_t(w);
  }
}

// Runs `body(fd)` on a fresh temp file beside `path`, then fsync + rename onto
// `path` + fsync of the directory; removes the temp file if anything throws.
void write_atomically(const std::filesystem::path& path, const std::function<void(int)>& body) {
  static std::atomic<unsigned> counter{0};
  const std::string base = path.filename().string();
  if (base.empty() || base == "." || base == "..")
    throw std::invalid_argument("write: path: expected a file path, got '" + path.string() + "'");
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : ".";

  std::filesystem::path tmp;
  int fd = -1;
  for (int attempt = 0; fd < 0; ++attempt) {
    tmp = dir / cat(".", base, ".tmp.", getpid(), ".", counter++);
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && (errno != EEXIST || attempt > 100))
      os_error("cannot create a temp file for", path, errno);
  }
  try {
    body(fd);
    if (::fsync(fd) != 0) os_error("cannot fsync", tmp, errno);
    const int rc = ::close(fd);
    fd = -1;
    if (rc != 0) os_error("cannot close", tmp, errno);
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
      os_error("cannot rename temp file onto", path, errno);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename durable; best effort (the new file is already in place).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

// Bytes of `t`, checking every argument; `what` prefixes messages.
uint64_t checked_nbytes(const TensorView& t, const char* what) {
  const DTypeName* d = lookup(t.dtype);
  if (!d)
    throw std::invalid_argument(
        cat(what, ": tensor ", q_name(t.name), ": dtype: expected a DType, got ", int(t.dtype)));
  for (size_t i = 0; i < t.shape.size(); ++i)
    if (t.shape[i] < 0)
      throw std::invalid_argument(cat(what, ": tensor ", q_name(t.name), ": shape[", i,
                                      "]: expected >= 0, got ", t.shape[i]));
  uint64_t numel, nbytes;
  if (!shape_numel(t.shape, &numel) || !checked_mul(numel, d->size, &nbytes))
    throw std::invalid_argument(
        cat(what, ": tensor ", q_name(t.name), ": shape: element count overflows int64"));
  if (nbytes > 0 && t.data == nullptr)
    throw std::invalid_argument(
        cat(what, ": tensor ", q_name(t.name), ": data: expected ", nbytes, " bytes, got null"));
  return nbytes;
}

void check_names(const std::vector<TensorView>& tensors, const char* what) {
  std::set<std::string_view> seen;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      throw std::invalid_argument(cat(what, ": tensor name: expected a non-empty name other than ",
                                      "__metadata__, got ", q_name(t.name)));
    if (!seen.insert(t.name).second)
      throw std::invalid_argument(cat(what, ": tensor name ", q_name(t.name), " appears twice"));
  }
}

template <class J>
std::string dump_json(const J& j, int indent, const char* what) {
  try {
    return j.dump(indent);
  } catch (const nlohmann::json::exception& e) {  // invalid UTF-8 in a name or value
    throw std::invalid_argument(cat(what, ": names and metadata must be UTF-8: ", e.what()));
  }
}

}  // namespace

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const char* what = "write_safetensors";
  check_names(tensors, what);
  std::vector<uint64_t> nbytes;
  for (const auto& t : tensors) nbytes.push_back(checked_nbytes(t, what));

  // Descending itemsize keeps every tensor naturally aligned without padding.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const size_t sa = itemsize(tensors[a].dtype), sb = itemsize(tensors[b].dtype);
    return sa != sb ? sa > sb : tensors[a].name < tensors[b].name;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i : order) {
    const TensorView& t = tensors[i];
    header[t.name] = {{"dtype", to_string(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + nbytes[i]}}};
    offset += nbytes[i];
  }
  std::string text = dump_json(header, -1, what);
  text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  const uint64_t header_len = text.size();

  write_atomically(path, [&](int fd) {
    write_all(fd, &header_len, 8, path);
    write_all(fd, text.data(), text.size(), path);
    for (size_t i : order) write_all(fd, tensors[i].data, nbytes[i], path);
  });
}

std::filesystem::path write_sharded_safetensors(
    const std::filesystem::path& dir, const std::string& stem,
    const std::vector<TensorView>& tensors, size_t max_shard_bytes,
    const std::map<std::string, std::string>& metadata) {
  const char* what = "write_sharded_safetensors";
  if (stem.empty() || stem.find('/') != std::string::npos)
    throw std::invalid_argument(cat(what, ": stem: expected a file name stem, got ", q_name(stem)));
  if (max_shard_bytes == 0)
    throw std::invalid_argument(cat(what, ": max_shard_bytes: expected > 0, got 0"));
  check_names(tensors, what);

  std::vector<std::vector<TensorView>> shards(1);
  uint64_t shard_bytes = 0, total = 0;
  for (const auto& t : tensors) {
    const uint64_t n = checked_nbytes(t, what);
    if (!shards.back().empty() && shard_bytes + n > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(t);
    shard_bytes += n;
    total += n;
  }

  nlohmann::ordered_json index = nlohmann::ordered_json::object();
  index["metadata"] = nlohmann::ordered_json::object();
  for (const auto& [k, v] : metadata) index["metadata"][k] = v;
  index["metadata"]["total_size"] = total;
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> files;
  for (size_t s = 0; s < shards.size(); ++s) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    files.push_back(stem + buf);
    for (const auto& t : shards[s]) weight_map[t.name] = files.back();
  }
  index["weight_map"] = weight_map;
  const std::string text = dump_json(index, 2, what) + "\n";

  for (size_t s = 0; s < shards.size(); ++s) write_safetensors(dir / files[s], shards[s], metadata);
  const std::filesystem::path index_path = dir / (stem + std::string(kIndexSuffix));
  write_atomically(index_path,
                   [&](int fd) { write_all(fd, text.data(), text.size(), index_path); });
  return index_path;
}

}  // namespace salad::io
