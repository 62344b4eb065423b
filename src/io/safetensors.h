// Safetensors checkpoints: a memory-mapped, validating reader, a sharded
// (HF *.safetensors.index.json) view, and an atomic writer. Pure C++17 + POSIX.
//
// File layout: u64 little-endian header length N, N bytes of UTF-8 JSON
//   {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {str: str}}   (optional)
// then the data section; offsets are relative to its start (byte 8 + N).
//
// What the reader accepts (every violation throws FormatError naming the file
// and, where there is one, the tensor):
//   strict  : header length <= 100 MB and inside the file; the header is a JSON
//             object without duplicate keys; every entry has a string "dtype"
//             of a known type, a "shape" of non-negative integers whose product
//             fits in int64, and "data_offsets" [begin <= end] inside the data
//             section with end - begin == numel * itemsize; no two tensors share
//             a byte; "__metadata__" maps strings to strings.
//   lenient : holes between tensors and bytes after the last tensor (the spec
//             forbids them; we only lose the bytes, never read them), unknown
//             extra keys inside an entry, and tensors that are not naturally
//             aligned (read them with element_to_double / memcpy).
// The host must be little-endian (checked at compile time).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace salad::io {

// A malformed file: the message names the file and, where there is one, the tensor.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The operating system refused (open, mmap, write, fsync, rename); names the path and errno text.
struct IoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Element types of the safetensors spec with a whole-byte item size. The
// sub-byte F4/F6 types and F8_E8M0 are not supported (open fails with FormatError).
enum class DType {
  BOOL,
  U8,
  I8,
  U16,
  I16,
  U32,
  I32,
  U64,
  I64,
  F16,
  BF16,
  F32,
  F64,
  F8_E4M3,
  F8_E5M2
};

const char* to_string(DType d);                    // the spec's spelling: "BF16", "F8_E4M3", ...
bool parse_dtype(std::string_view s, DType* out);  // false for an unknown spelling
size_t itemsize(DType d);                          // bytes per element
bool is_floating(DType d);                         // F16, BF16, F32, F64, F8_*

// Bit-exact scalar codecs. Encoders round to nearest even; NaN stays a (quiet)
// NaN with its sign; values past the largest finite one become inf.
float bf16_to_float(uint16_t bits);
float f16_to_float(uint16_t bits);
float f8e4m3_to_float(uint8_t bits);  // "fn" variant: no inf, S.1111.111 is NaN, max 448
float f8e5m2_to_float(uint8_t bits);  // IEEE-like: max 57344, has inf
uint16_t float_to_bf16(float f);
uint16_t float_to_f16(float f);

// Element `index` of a packed little-endian array of dtype `d`, converted to
// double (any dtype; I64/U64 above 2^53 round). `data` needs no alignment.
double element_to_double(DType d, const void* data, size_t index);
float element_to_float(DType d, const void* data, size_t index);

// One tensor of an open file. `data` points into the read-only mapping and
// stays valid while the owning SafeTensorsFile lives (moves included).
struct TensorInfo {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // [] is a scalar (numel 1)
  const std::byte* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const;  // product of shape; 1 for a scalar
};

// All elements converted to float / double (see element_to_double).
std::vector<float> to_float_vector(const TensorInfo& t);
std::vector<double> to_double_vector(const TensorInfo& t);

// A validated, read-only, memory-mapped .safetensors file. Move-only. If the
// file is truncated by another process while mapped, reads may SIGBUS: the
// writer below never does that (it renames a new file into place).
class SafeTensorsFile {
 public:
  SafeTensorsFile() = default;
  explicit SafeTensorsFile(const std::filesystem::path& path) { open(path); }
  ~SafeTensorsFile();
  SafeTensorsFile(SafeTensorsFile&& o) noexcept;
  SafeTensorsFile& operator=(SafeTensorsFile&& o) noexcept;
  SafeTensorsFile(const SafeTensorsFile&) = delete;
  SafeTensorsFile& operator=(const SafeTensorsFile&) = delete;

  // Maps and validates `path`; throws IoError or FormatError, leaving *this closed.
  void open(const std::filesystem::path& path);
  void close();
  bool is_open() const { return map_ != nullptr; }

  const std::filesystem::path& path() const { return path_; }
  const std::vector<std::string>& names() const { return names_; }  // sorted
  bool contains(std::string_view name) const;
  const TensorInfo* find(std::string_view name) const;  // nullptr when absent
  const TensorInfo& info(std::string_view name) const;  // std::out_of_range when absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The whole mapped file (header included); every TensorInfo span lies inside it.
  const std::byte* mapped_data() const { return map_; }
  size_t mapped_size() const { return map_size_; }

 private:
  std::filesystem::path path_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<std::string> names_;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint that is one .safetensors file, a *.safetensors.index.json
// ({"metadata": {...}, "weight_map": {tensor: shard file}}, shards relative to
// the index), or a directory holding exactly one index (preferred) or else
// exactly one .safetensors file. Every shard is opened and checked up front:
// a weight_map name missing from its shard is a FormatError. Tensors present in
// a shard but absent from the weight_map are not visible (as in HF loaders).
class ShardedCheckpoint {
 public:
  ShardedCheckpoint() = default;
  explicit ShardedCheckpoint(const std::filesystem::path& path) { open(path); }
  void open(const std::filesystem::path& path);

  // The file that was opened (index or single shard).
  const std::filesystem::path& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(std::string_view name) const;
  const TensorInfo* find(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const;  // std::out_of_range when absent
  const SafeTensorsFile& shard_of(std::string_view name) const;
  const std::vector<SafeTensorsFile>& shards() const { return shards_; }
  // The index's "metadata" (non-string values as compact JSON text, e.g.
  // total_size -> "1234"), or the single file's __metadata__.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::filesystem::path path_;
  std::vector<SafeTensorsFile> shards_;
  std::map<std::string, size_t, std::less<>> shard_index_;  // tensor -> shards_ slot
  std::map<std::string, std::string> metadata_;
};

// A tensor to write: `data` holds numel(shape) * itemsize(dtype) packed
// little-endian bytes (may be null only when that count is 0).
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes a .safetensors file atomically: a temp file in the same directory,
// fsync, rename over `path`, fsync of the directory; on any failure the temp
// file is removed and an existing `path` is untouched. The header lists
// __metadata__ first, then the tensors in data order; the header is space-padded
// so data starts 8-byte aligned, and tensors are laid out without holes by
// descending itemsize, then name, which keeps every tensor naturally aligned.
// Bad arguments (empty, duplicate or "__metadata__" names, negative dims,
// null data, invalid UTF-8) throw std::invalid_argument before touching disk;
// OS failures throw IoError.
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Splits `tensors` (in the given order) greedily into shards of at most
// `max_shard_bytes` of data (a bigger tensor gets a shard of its own), writes
// `<dir>/<stem>-0000i-of-0000n.safetensors` (each with `metadata` as its
// __metadata__) and then, last, the index `<dir>/<stem>.safetensors.index.json`
// with {"metadata": {...metadata, "total_size": bytes}, "weight_map": ...}; every
// file atomically, the index last so a reader never sees it point at a missing
// shard. One shard still gets an index. Returns the index path.
std::filesystem::path write_sharded_safetensors(
    const std::filesystem::path& dir, const std::string& stem,
    const std::vector<TensorView>& tensors, size_t max_shard_bytes,
    const std::map<std::string, std::string>& metadata = {});

}  // namespace salad::io
