// Safetensors reader / writer: round trips of every dtype, atomic writes,
// sharded indexes, one test per corruption class, and a deterministic fuzz.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace fs = std::filesystem;
using namespace salad::io;

namespace {

constexpr DType kAllDTypes[] = {
    DType::BOOL, DType::U8,  DType::I8,  DType::U16,     DType::I16,
    DType::U32,  DType::I32, DType::U64, DType::I64,     DType::F16,
    DType::BF16, DType::F32, DType::F64, DType::F8_E4M3, DType::F8_E5M2,
};

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << p;
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &v, 8);
  return s;
}

// A raw file: length field, header text, data bytes (no padding added).
std::string raw_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

std::vector<std::string> dir_entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// Deterministic bytes for a tensor, valid for BOOL (0/1) too.
std::vector<unsigned char> pattern_bytes(size_t n, unsigned seed, bool boolean) {
  std::vector<unsigned char> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = boolean ? (i * 7 + seed) % 3 == 0 : (i * 131 + seed * 17) & 0xff;
  return v;
}

class SafeTensors : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    dir_ = fs::temp_directory_path() /
           ("salad_safetensors_test_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Writes `bytes` to `name` and asserts that opening it throws FormatError whose
  // message names the file and contains every string in `needles`.
  void expect_format_error(const std::string& bytes, const std::vector<std::string>& needles,
                           const std::string& name = "bad.safetensors") {
    const fs::path p = dir_ / name;
    write_bytes(p, bytes);
    try {
      SafeTensorsFile f(p);
      ADD_FAILURE() << "opened without error; expected FormatError containing " << needles[0];
    } catch (const FormatError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(p.string()), std::string::npos) << "message lacks the file: " << msg;
      for (const auto& n : needles)
        EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "': " << msg;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "wrong exception type: " << e.what();
    }
  }

  // A header with one F32 tensor "w" of shape [2] and its 8 data bytes.
  void expect_entry_error(const std::string& entry, const std::vector<std::string>& needles,
                          size_t data_bytes = 8) {
    expect_format_error(raw_file("{\"w\":" + entry + "}", std::string(data_bytes, '\1')), needles);
  }

  fs::path dir_;
};

// ---- dtypes and codecs ----------------------------------------------------------

TEST(SafeTensorsDType, NamesSizesRoundTrip) {
  const size_t sizes[] = {1, 1, 1, 2, 2, 4, 4, 8, 8, 2, 2, 4, 8, 1, 1};
  size_t i = 0;
  for (DType d : kAllDTypes) {
    DType back;
    ASSERT_TRUE(parse_dtype(to_string(d), &back)) << to_string(d);
    EXPECT_EQ(back, d);
    EXPECT_EQ(itemsize(d), sizes[i++]) << to_string(d);
  }
  DType unused;
  EXPECT_FALSE(parse_dtype("F4", &unused));
  EXPECT_FALSE(parse_dtype("f32", &unused));
  EXPECT_TRUE(is_floating(DType::BF16));
  EXPECT_FALSE(is_floating(DType::I64));
}

TEST(SafeTensorsCodec, F16ExhaustiveRoundTripAndKnownValues) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_float(uint16_t(h));
    if (std::isnan(f)) {
      ASSERT_TRUE((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0) << h;
      ASSERT_TRUE(std::isnan(f16_to_float(float_to_f16(f)))) << h;
      continue;
    }
    ASSERT_EQ(float_to_f16(f), h) << "bits " << h << " value " << f;
  }
  EXPECT_EQ(f16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_float(0xc000), -2.0f);
  EXPECT_EQ(f16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_float(0x0400), std::ldexp(1.0f, -14));
  EXPECT_TRUE(std::isinf(f16_to_float(0x7c00)));
  EXPECT_EQ(float_to_f16(65519.0f), 0x7bff);  // below the halfway point to 65536
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);  // tie with odd mantissa: rounds up to inf
  EXPECT_EQ(float_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(float_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie to even zero
  EXPECT_EQ(float_to_f16(std::ldexp(3.0f, -26)), 0x0001);  // 0.75 ulp rounds up
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
}

// Nearest-even rounding against a brute-force reference over all finite halves.
TEST(SafeTensorsCodec, F16RoundingMatchesReference) {
  std::vector<std::pair<double, uint16_t>> table;  // non-negative finite halves, ascending
  for (uint32_t h = 0; h < 0x7c00; ++h) table.push_back({f16_to_float(uint16_t(h)), uint16_t(h)});
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> exponent(-27.0, 16.5);
  for (int i = 0; i < 20000; ++i) {
    float x = float(std::exp2(exponent(rng)));
    if (i % 4 == 0) {  // exact halfway points stress the tie rule
      size_t k = rng() % (table.size() - 1);
      x = float((table[k].first + table[k + 1].first) / 2);
    }
    uint16_t want;
    if (x >= 65520.0f) {
      want = 0x7c00;
    } else {
      auto hi =
          std::lower_bound(table.begin(), table.end(), std::make_pair(double(x), uint16_t(0)));
      if (hi == table.begin() || hi->first == x) {
        want = hi->second;
      } else {
        auto lo = hi - 1;
        const double dl = x - lo->first, dh = hi->first - x;
        want = dl < dh   ? lo->second
               : dh < dl ? hi->second
                         : (lo->second % 2 == 0 ? lo->second : hi->second);
      }
    }
    ASSERT_EQ(float_to_f16(x), want) << "x = " << x;
    ASSERT_EQ(float_to_f16(-x), want | 0x8000) << "x = " << -x;
  }
}

TEST(SafeTensorsCodec, BF16ExhaustiveRoundTripAndRounding) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_float(uint16_t(b));
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f)))) << b;
      continue;
    }
    ASSERT_EQ(float_to_bf16(f), b) << b;
  }
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(3.0f, -8)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // overflow -> inf
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

TEST(SafeTensorsCodec, Float8Decoding) {
  EXPECT_EQ(f8e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(f8e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(f8e4m3_to_float(0xfe), -448.0f);
  EXPECT_EQ(f8e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(f8e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_float(0xff)));
  EXPECT_EQ(f8e5m2_to_float(0x3c), 1.0f);
  EXPECT_EQ(f8e5m2_to_float(0x7b), 57344.0f);
  EXPECT_TRUE(std::isinf(f8e5m2_to_float(0x7c)));
  EXPECT_TRUE(std::isnan(f8e5m2_to_float(0x7d)));
  for (int b = 1; b < 0x7e; ++b)  // positive finite codes increase strictly
    EXPECT_LT(f8e4m3_to_float(uint8_t(b - 1)), f8e4m3_to_float(uint8_t(b))) << b;
}

// ---- round trips ------------------------------------------------------------------

TEST_F(SafeTensors, RoundTripEveryDTypeScalarsZeroSizeAndMetadata) {
  struct Want {
    TensorView view;
    std::vector<unsigned char> bytes;
  };
  std::vector<Want> want;
  unsigned seed = 0;
  for (DType d : kAllDTypes) {
    const std::string n = to_string(d);
    const bool boolean = d == DType::BOOL;
    const std::vector<std::vector<int64_t>> shapes = {{2, 3}, {}, {0, 4}, {5}, {3, 0, 2}};
    const char* suffix[] = {".matrix", ".scalar", ".empty", ".odd", ".empty3"};
    for (size_t s = 0; s < shapes.size(); ++s) {
      int64_t numel = 1;
      for (int64_t x : shapes[s]) numel *= x;
      Want w{{n + suffix[s], d, shapes[s], nullptr},
             pattern_bytes(size_t(numel) * itemsize(d), seed++, boolean)};
      want.push_back(std::move(w));
    }
  }
  std::vector<TensorView> views;
  for (auto& w : want) {
    w.view.data = w.bytes.empty() ? nullptr : w.bytes.data();
    views.push_back(w.view);
  }
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"note", "ünïcode ✓"}, {"", ""}};
  const fs::path p = dir_ / "all.safetensors";
  write_safetensors(p, views, meta);

  const std::string raw = read_bytes(p);
  uint64_t header_len;
  std::memcpy(&header_len, raw.data(), 8);
  EXPECT_EQ(header_len % 8, 0u) << "data section must start 8-byte aligned";

  SafeTensorsFile f(p);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.names().size(), want.size());
  EXPECT_TRUE(std::is_sorted(f.names().begin(), f.names().end()));
  size_t data_bytes = 0;
  for (const auto& w : want) {
    SCOPED_TRACE(w.view.name);
    const TensorInfo& t = f.info(w.view.name);
    EXPECT_EQ(t.dtype, w.view.dtype);
    EXPECT_EQ(t.shape, w.view.shape);
    ASSERT_EQ(t.nbytes, w.bytes.size());
    EXPECT_EQ(t.numel() * int64_t(itemsize(t.dtype)), int64_t(t.nbytes));
    if (t.nbytes > 0) {
      EXPECT_EQ(std::memcmp(t.data, w.bytes.data(), t.nbytes), 0);
    }
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % itemsize(t.dtype), 0u) << "not aligned";
    data_bytes += t.nbytes;
  }
  EXPECT_EQ(raw.size(), 8 + header_len + data_bytes) << "no holes, no trailing bytes";
  EXPECT_EQ(f.info("F32.scalar").numel(), 1);
  EXPECT_EQ(f.info("I64.empty3").numel(), 0);
}

TEST_F(SafeTensors, ValuesConvertToFloat) {
  const std::vector<float> x = {0.0f, 1.0f, -2.5f, 1024.0f, 0.099975586f};
  std::vector<uint16_t> h, b;
  for (float v : x) h.push_back(float_to_f16(v)), b.push_back(float_to_bf16(v));
  const std::vector<double> d(x.begin(), x.end());
  const std::vector<int32_t> i = {-7, 0, 7, 1 << 30, -(1 << 30)};
  const std::vector<int64_t> big = {int64_t(1) << 40, -3, 0, 5, 9};
  const std::vector<uint8_t> e4 = {0x38, 0x7e, 0xb8, 0x00, 0x01};
  write_safetensors(dir_ / "v.safetensors", {{"f32", DType::F32, {5}, x.data()},
                                             {"f16", DType::F16, {5}, h.data()},
                                             {"bf16", DType::BF16, {5}, b.data()},
                                             {"f64", DType::F64, {5}, d.data()},
                                             {"i32", DType::I32, {5}, i.data()},
                                             {"i64", DType::I64, {5}, big.data()},
                                             {"e4m3", DType::F8_E4M3, {5}, e4.data()}});
  SafeTensorsFile f(dir_ / "v.safetensors");
  EXPECT_EQ(to_float_vector(f.info("f32")), x);
  EXPECT_EQ(to_double_vector(f.info("f64")), d);
  const std::vector<float> f16 = to_float_vector(f.info("f16"));
  const std::vector<float> bf16 = to_float_vector(f.info("bf16"));
  for (size_t k = 0; k < x.size(); ++k) {
    EXPECT_NEAR(f16[k], x[k], std::abs(x[k]) * 1e-3) << k;
    EXPECT_NEAR(bf16[k], x[k], std::abs(x[k]) * 8e-3) << k;
  }
  EXPECT_EQ(to_double_vector(f.info("i32")), std::vector<double>(i.begin(), i.end()));
  EXPECT_EQ(to_double_vector(f.info("i64")), std::vector<double>(big.begin(), big.end()));
  EXPECT_EQ(to_float_vector(f.info("e4m3")), (std::vector<float>{1, 448, -1, 0, 1.0f / 512}));
}

TEST_F(SafeTensors, EmptyCheckpointAndLookups) {
  write_safetensors(dir_ / "e.safetensors", {});
  SafeTensorsFile f(dir_ / "e.safetensors");
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_FALSE(f.contains("x"));
  EXPECT_EQ(f.find("x"), nullptr);
  try {
    f.info("missing.weight");
    ADD_FAILURE() << "expected out_of_range";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("missing.weight"), std::string::npos);
  }
  SafeTensorsFile moved = std::move(f);
  EXPECT_TRUE(moved.is_open());
  EXPECT_FALSE(f.is_open());  // NOLINT(bugprone-use-after-move): documented state
}

TEST_F(SafeTensors, OpenReportsOsErrors) {
  EXPECT_THROW(SafeTensorsFile(dir_ / "nope.safetensors"), IoError);
  EXPECT_THROW(SafeTensorsFile{dir_}, IoError);  // a directory
}

TEST_F(SafeTensors, WriteRejectsBadArgumentsBeforeTouchingDisk) {
  const float v[2] = {1, 2};
  const fs::path p = dir_ / "x.safetensors";
  const std::vector<std::vector<TensorView>> bad = {
      {{"a", DType::F32, {2}, v}, {"a", DType::F32, {2}, v}},        // duplicate
      {{"", DType::F32, {2}, v}},                                    // empty name
      {{"__metadata__", DType::F32, {2}, v}},                        // reserved
      {{"a", DType::F32, {-2}, v}},                                  // negative dim
      {{"a", DType::F32, {2}, nullptr}},                             // null data
      {{"a", DType::F32, {int64_t(1) << 40, int64_t(1) << 40}, v}},  // overflow
      {{"a", DType(99), {2}, v}},                                    // bad enum
      {{"bad\xff", DType::F32, {2}, v}},                             // not UTF-8
  };
  for (size_t i = 0; i < bad.size(); ++i)
    EXPECT_THROW(write_safetensors(p, bad[i]), std::invalid_argument) << "case " << i;
  EXPECT_THROW(write_safetensors(p, {}, {{"k", "\xc3"}}), std::invalid_argument);
  EXPECT_TRUE(dir_entries(dir_).empty()) << "nothing may be created";
}

// ---- atomic writes -------------------------------------------------------------------

TEST_F(SafeTensors, AtomicWriteLeavesOnlyTheTarget) {
  const float v[3] = {1, 2, 3};
  write_safetensors(dir_ / "a.safetensors", {{"v", DType::F32, {3}, v}});
  write_safetensors(dir_ / "a.safetensors", {{"v", DType::F32, {3}, v}});  // overwrite
  EXPECT_EQ(dir_entries(dir_), std::vector<std::string>{"a.safetensors"});
}

TEST_F(SafeTensors, AtomicWriteIntoMissingDirectoryFailsCleanly) {
  const float v[1] = {1};
  const fs::path p = dir_ / "no" / "such" / "dir" / "a.safetensors";
  EXPECT_THROW(write_safetensors(p, {{"v", DType::F32, {1}, v}}), IoError);
  EXPECT_TRUE(dir_entries(dir_).empty());
}

TEST_F(SafeTensors, AtomicWriteOntoADirectoryRemovesTheTemp) {
  const float v[1] = {1};
  fs::create_directories(dir_ / "taken.safetensors" / "child");
  EXPECT_THROW(write_safetensors(dir_ / "taken.safetensors", {{"v", DType::F32, {1}, v}}), IoError);
  EXPECT_EQ(dir_entries(dir_), std::vector<std::string>{"taken.safetensors"});
}

// A write that fails halfway (file size limit -> EFBIG) keeps the old file intact.
TEST_F(SafeTensors, FailedOverwriteKeepsTheOldFile) {
  const fs::path p = dir_ / "keep.safetensors";
  const float small[2] = {4, 5};
  write_safetensors(p, {{"v", DType::F32, {2}, small}});
  const std::string before = read_bytes(p);

  std::vector<float> big(1 << 18, 1.0f);  // 1 MiB of data
  rlimit old_limit;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  rlimit limit = old_limit;
  limit.rlim_cur = 64 * 1024;
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of a signal
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  bool threw_io = false;
  try {
    write_safetensors(p, {{"v", DType::F32, {int64_t(big.size())}, big.data()}});
  } catch (const IoError& e) {
    threw_io = true;
    EXPECT_NE(std::string(e.what()).find(p.string()), std::string::npos) << e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(threw_io);
  EXPECT_EQ(read_bytes(p), before);
  EXPECT_EQ(dir_entries(dir_), std::vector<std::string>{"keep.safetensors"});
  SafeTensorsFile f(p);
  EXPECT_EQ(to_float_vector(f.info("v")), (std::vector<float>{4, 5}));
}

// Rename-over-the-top means an open mapping keeps seeing the old contents.
TEST_F(SafeTensors, OverwriteWhileMappedKeepsTheOldMappingValid) {
  const fs::path p = dir_ / "m.safetensors";
  const float a[2] = {1, 2}, b[3] = {7, 8, 9};
  write_safetensors(p, {{"v", DType::F32, {2}, a}});
  SafeTensorsFile old_file(p);
  write_safetensors(p, {{"v", DType::F32, {3}, b}});
  EXPECT_EQ(to_float_vector(old_file.info("v")), (std::vector<float>{1, 2}));
  EXPECT_EQ(to_float_vector(SafeTensorsFile(p).info("v")), (std::vector<float>{7, 8, 9}));
}

// ---- sharded checkpoints -------------------------------------------------------------

TEST_F(SafeTensors, ShardedIndexRoundTrip) {
  std::vector<std::vector<float>> data;
  std::vector<TensorView> views;
  for (int i = 0; i < 7; ++i) data.push_back(std::vector<float>(size_t(10 + i), float(i)));
  for (int i = 0; i < 7; ++i)
    views.push_back({"blocks." + std::to_string(i) + ".w",
                     DType::F32,
                     {int64_t(data[size_t(i)].size())},
                     data[size_t(i)].data()});
  const fs::path index = write_sharded_safetensors(dir_, "model", views, 100, {{"format", "pt"}});
  EXPECT_EQ(index, dir_ / "model.safetensors.index.json");

  for (const fs::path& open_as : {index, dir_}) {
    SCOPED_TRACE(open_as.string());
    ShardedCheckpoint ck(open_as);
    EXPECT_EQ(ck.path(), index);
    ASSERT_EQ(ck.shards().size(), 5u);  // 40+44 | 48+52 | 56 | 60 | 64 bytes under a 100-byte cap
    ASSERT_EQ(ck.names().size(), 7u);
    for (int i = 0; i < 7; ++i) {
      const std::string n = "blocks." + std::to_string(i) + ".w";
      ASSERT_TRUE(ck.contains(n));
      EXPECT_EQ(to_float_vector(ck.info(n)), data[size_t(i)]);
      EXPECT_TRUE(ck.shard_of(n).contains(n));
      EXPECT_EQ(ck.shard_of(n).metadata().at("format"), "pt");
    }
    size_t total = 0;
    for (const auto& d : data) total += d.size() * 4;
    EXPECT_EQ(ck.metadata().at("total_size"), std::to_string(total));
    EXPECT_EQ(ck.metadata().at("format"), "pt");
    EXPECT_EQ(ck.shard_of("blocks.0.w").path().filename(), "model-00001-of-00005.safetensors");
    EXPECT_EQ(ck.shard_of("blocks.1.w").path(), ck.shard_of("blocks.0.w").path());
    EXPECT_EQ(ck.shard_of("blocks.6.w").path().filename(), "model-00005-of-00005.safetensors");
    EXPECT_FALSE(ck.contains("nope"));
    EXPECT_THROW(ck.info("nope"), std::out_of_range);
  }
}

TEST_F(SafeTensors, ShardedOpensASingleFileOrItsDirectory) {
  const int32_t v[2] = {3, 4};
  write_safetensors(dir_ / "only.safetensors", {{"x", DType::I32, {2}, v}}, {{"k", "v"}});
  for (const fs::path& open_as : {dir_ / "only.safetensors", dir_}) {
    ShardedCheckpoint ck(open_as);
    EXPECT_EQ(ck.names(), std::vector<std::string>{"x"});
    EXPECT_EQ(ck.metadata().at("k"), "v");
    EXPECT_EQ(to_double_vector(ck.info("x")), (std::vector<double>{3, 4}));
  }
  write_safetensors(dir_ / "other.safetensors", {{"x", DType::I32, {2}, v}});
  try {
    ShardedCheckpoint ck(dir_);
    ADD_FAILURE() << "two files and no index must be ambiguous";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("other.safetensors"), std::string::npos) << e.what();
  }
  const fs::path empty = dir_ / "empty";
  fs::create_directories(empty);
  EXPECT_THROW(ShardedCheckpoint{empty}, FormatError);
}

TEST_F(SafeTensors, ShardedIndexNameMissingFromShard) {
  const float v[1] = {1};
  write_safetensors(dir_ / "s1.safetensors", {{"a", DType::F32, {1}, v}});
  write_bytes(
      dir_ / "m.safetensors.index.json",
      R"({"metadata": {}, "weight_map": {"a": "s1.safetensors", "ghost.bias": "s1.safetensors"}})");
  try {
    ShardedCheckpoint ck(dir_ / "m.safetensors.index.json");
    ADD_FAILURE() << "expected FormatError";
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("ghost.bias"), std::string::npos) << msg;
    EXPECT_NE(msg.find("s1.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find("m.safetensors.index.json"), std::string::npos) << msg;
  }
}

TEST_F(SafeTensors, ShardedBadIndexes) {
  const float v[1] = {1};
  write_safetensors(dir_ / "s1.safetensors", {{"a", DType::F32, {1}, v}});
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{not json", "not valid JSON"},
      {"[1, 2]", "expected an object"},
      {R"({"metadata": {}})", "weight_map"},
      {R"({"weight_map": {"a": 3}})", "'a'"},
      {R"({"weight_map": {"a": "../s1.safetensors"}})", "inside the index's directory"},
      {R"({"weight_map": {"a": "/etc/s1.safetensors"}})", "inside the index's directory"},
      {R"({"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}})", "duplicate key 'a'"},
  };
  for (const auto& [text, needle] : cases) {
    SCOPED_TRACE(text);
    const fs::path p = dir_ / "bad.safetensors.index.json";
    write_bytes(p, text);
    try {
      ShardedCheckpoint ck(p);
      ADD_FAILURE() << "expected FormatError";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(p.string()), std::string::npos) << e.what();
    }
  }
  write_bytes(dir_ / "bad.safetensors.index.json", R"({"weight_map": {"a": "gone.safetensors"}})");
  EXPECT_THROW(ShardedCheckpoint{dir_ / "bad.safetensors.index.json"}, IoError);
}

// ---- corruption classes (one test each) -----------------------------------------------

TEST_F(SafeTensors, CorruptFileShorterThanEightBytes) {
  expect_format_error("", {"0 bytes", "shorter"});
  expect_format_error(std::string("\x10\0\0\0", 4), {"4 bytes", "shorter"});
}

TEST_F(SafeTensors, CorruptHeaderLengthPastEndOfFile) {
  const std::string header = "{}      ";
  expect_format_error(le64(header.size() + 1) + header, {"header length 9", "past the end"});
}

TEST_F(SafeTensors, CorruptHeaderLengthAbsurd) {
  expect_format_error(le64(100'000'001) + "{}", {"header length 100000001", "limit"});
  expect_format_error(le64(~uint64_t(0)) + "{}", {"limit"});
}

TEST_F(SafeTensors, CorruptHeaderNotJson) {
  expect_format_error(raw_file("{\"w\": {\"dtype\": ", ""), {"not valid JSON"});
  expect_format_error(raw_file("{} trailing", ""), {"not valid JSON"});
  expect_format_error(raw_file("{\"\xff\": 1}", ""), {"not valid JSON"});  // invalid UTF-8
  expect_format_error(raw_file(std::string(100, '[') + std::string(100, ']'), ""), {"deeper"});
}

TEST_F(SafeTensors, CorruptHeaderNotAnObject) {
  expect_format_error(raw_file("[1, 2, 3]", ""), {"header is a JSON array", "expected an object"});
}

TEST_F(SafeTensors, CorruptEntryMissingFields) {
  expect_entry_error(R"({"shape": [2], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "missing \"dtype\""});
  expect_entry_error(R"({"dtype": "F32", "data_offsets": [0, 8]})",
                     {"tensor 'w'", "missing \"shape\""});
  expect_entry_error(R"({"dtype": "F32", "shape": [2]})",
                     {"tensor 'w'", "missing \"data_offsets\""});
}

TEST_F(SafeTensors, CorruptEntryWrongTypes) {
  expect_entry_error("7", {"tensor 'w'", "entry is a JSON number"});
  expect_entry_error(R"({"dtype": 32, "shape": [2], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "\"dtype\" is a JSON number"});
  expect_entry_error(R"({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]})",
                     {"tensor 'w'", "\"shape\" is a JSON string"});
  expect_entry_error(R"({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "shape[0] is not an integer"});
  expect_entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]})",
                     {"tensor 'w'", "expected [begin, end]"});
  expect_entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": {"a": 0}})",
                     {"tensor 'w'", "expected [begin, end]"});
  expect_entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]})",
                     {"tensor 'w'", "data_offsets end is not an integer"});
  expect_format_error(raw_file(R"({"__metadata__": {"k": 1}})", ""), {"__metadata__", "'k'"});
  expect_format_error(raw_file(R"({"__metadata__": []})", ""), {"__metadata__"});
}

TEST_F(SafeTensors, CorruptUnknownDType) {
  expect_entry_error(R"({"dtype": "F4", "shape": [2], "data_offsets": [0, 1]})",
                     {"tensor 'w'", "unknown dtype 'F4'"});
}

TEST_F(SafeTensors, CorruptNegativeDimension) {
  expect_entry_error(R"({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "shape[0] is negative (-2)"});
  expect_entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [-1, 8]})",
                     {"tensor 'w'", "begin is negative"});
}

TEST_F(SafeTensors, CorruptShapeProductOverflow) {
  expect_entry_error(
      R"({"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]})",
      {"tensor 'w'", "more elements than fit in int64"});
  expect_entry_error(R"({"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "more elements"});  // numel fits, bytes do not
  expect_entry_error(R"({"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "does not fit in int64"});
  expect_entry_error(R"({"dtype": "F32", "shape": [1e30], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "not an integer"});
}

TEST_F(SafeTensors, CorruptByteCountMismatch) {
  expect_entry_error(R"({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "hold 8 bytes", "needs 12"});
}

TEST_F(SafeTensors, CorruptOffsetsReversedOrPastEnd) {
  expect_entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]})",
                     {"tensor 'w'", "ends before it begins"});
  expect_entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]})",
                     {"tensor 'w'", "past the end of the data section (8 bytes)"});
  expect_entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})",
                     {"tensor 'w'", "past the end"}, 7);
}

TEST_F(SafeTensors, CorruptOverlappingTensors) {
  const std::string h = R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                        R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})";
  expect_format_error(raw_file(h, std::string(12, '\0')), {"tensor 'b'", "overlap tensor 'a'"});
  // Zero-size tensors own no bytes and may sit anywhere in bounds.
  const std::string ok = R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                         R"( "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})";
  write_bytes(dir_ / "ok.safetensors", raw_file(ok, std::string(8, '\0')));
  EXPECT_EQ(SafeTensorsFile(dir_ / "ok.safetensors").info("z").nbytes, 0u);
}

TEST_F(SafeTensors, CorruptDuplicateNames) {
  const std::string h = R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                        R"( "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})";
  expect_format_error(raw_file(h, std::string(8, '\0')), {"duplicate tensor name 'w'"});
  expect_entry_error(R"({"dtype": "F32", "dtype": "I32", "shape": [2], "data_offsets": [0, 8]})",
                     {"entry 'w'", "duplicate key 'dtype'"});
}

// Documented leniency: holes between tensors and trailing bytes are accepted.
TEST_F(SafeTensors, HolesAndTrailingBytesAreAllowed) {
  const std::string h = R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},)"
                        R"( "b": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}})";
  write_bytes(dir_ / "holes.safetensors", raw_file(h, "ab....cd----"));
  SafeTensorsFile f(dir_ / "holes.safetensors");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f.info("b").data), 2), "cd");
}

// ---- fuzz ---------------------------------------------------------------------------------

// Every mutation of a valid file must either load with all spans inside the
// mapping, or throw FormatError; any other outcome fails.
TEST_F(SafeTensors, FuzzedFilesLoadOrThrowFormatError) {
  std::vector<float> f32(6, 1.5f);
  std::vector<uint16_t> bf16(5, 0x3f80);
  std::vector<int64_t> i64 = {1, 2, 3};
  std::vector<uint8_t> flags = {1, 0, 1};
  const double scalar = 3.25;
  const fs::path valid = dir_ / "valid.safetensors";
  write_safetensors(valid,
                    {{"layer.0.weight", DType::F32, {2, 3}, f32.data()},
                     {"layer.0.bias", DType::BF16, {5}, bf16.data()},
                     {"ids", DType::I64, {3}, i64.data()},
                     {"mask", DType::BOOL, {3}, flags.data()},
                     {"scale", DType::F64, {}, &scalar},
                     {"empty", DType::F16, {0, 7}, nullptr}},
                    {{"format", "pt"}});
  const std::string base = read_bytes(valid);
  uint64_t header_len;
  std::memcpy(&header_len, base.data(), 8);
  const std::string header = base.substr(8, header_len), data = base.substr(8 + header_len);

  std::vector<std::pair<std::string, std::string>> cases;  // (description, bytes)
  std::mt19937 rng(20240607);
  auto pick = [&](size_t n) { return n == 0 ? size_t(0) : size_t(rng() % n); };

  for (int i = 0; i < 150; ++i) {  // byte flips in the header
    std::string b = base;
    for (int k = 0, n = 1 + int(pick(4)); k < n; ++k)
      b[8 + pick(header_len)] ^= char(1 + pick(255));
    cases.push_back({"header flip " + std::to_string(i), b});
  }
  for (int i = 0; i < 40; ++i) {  // byte flips in the data
    std::string b = base;
    b[8 + header_len + pick(data.size())] ^= char(1 + pick(255));
    cases.push_back({"data flip " + std::to_string(i), b});
  }
  for (int k = 0; k < 50; ++k)  // truncations
    cases.push_back(
        {"truncate " + std::to_string(k), base.substr(0, base.size() * size_t(k) / 50)});
  const uint64_t lengths[] = {0,
                              1,
                              2,
                              7,
                              header_len - 1,
                              header_len + 1,
                              header_len + 8,
                              base.size() - 8,
                              base.size() - 7,
                              base.size(),
                              100'000'000,
                              100'000'001,
                              uint64_t(1) << 32,
                              uint64_t(1) << 63,
                              ~uint64_t(0)};
  for (uint64_t len : lengths)  // header-length field edits
    cases.push_back({"length " + std::to_string(len), le64(len) + base.substr(8)});
  for (int i = 0; i < 10; ++i)
    cases.push_back({"length random " + std::to_string(i), le64(rng()) + base.substr(8)});

  const std::string alphabet = "{}[]\":,-.0123456789eE \\aFUIB";
  const char* numbers[] = {"-1",
                           "0",
                           "1",
                           "9223372036854775807",
                           "9223372036854775808",
                           "18446744073709551615",
                           "18446744073709551616",
                           "1e308",
                           "1e999",
                           "-0",
                           "2.5",
                           "4294967296",
                           "null",
                           "\"x\"",
                           "[]",
                           "{}"};
  for (int i = 0; i < 250; ++i) {  // JSON-aware edits, length field kept consistent
    std::string h = header;
    const int op = int(pick(6));
    if (op == 0) {
      h.erase(pick(h.size()), 1 + pick(3));
    } else if (op == 1) {
      h.insert(pick(h.size() + 1), 1, alphabet[pick(alphabet.size())]);
    } else if (op == 2 || op == 3) {  // replace a number with an interesting token
      std::vector<size_t> starts;
      for (size_t k = 0; k < h.size(); ++k)
        if (std::isdigit(static_cast<unsigned char>(h[k])) &&
            (k == 0 || !std::isdigit(static_cast<unsigned char>(h[k - 1]))))
          starts.push_back(k);
      const size_t s = starts[pick(starts.size())];
      size_t e = s;
      while (e < h.size() && std::isdigit(static_cast<unsigned char>(h[e]))) ++e;
      h.replace(s, e - s, numbers[pick(std::size(numbers))]);
    } else if (op == 4) {  // swap a dtype
      const char* dtypes[] = {"\"F32\"", "\"BF16\"", "\"U8\"", "\"F64\"", "\"Q4\"", "\"\""};
      const size_t at = h.find(std::string("\"") + (pick(2) ? "F32" : "BF16") + "\"");
      if (at != std::string::npos) h.replace(at, h.find('"', at + 1) - at + 1, dtypes[pick(6)]);
    } else {  // duplicate or drop a slice of the header text
      const size_t s = pick(h.size()), n = pick(40);
      if (pick(2))
        h.insert(pick(h.size() + 1), h.substr(s, n));
      else
        h.erase(s, n);
    }
    if (pick(8) == 0) {  // sometimes keep the stale length field
      cases.push_back(
          {"json edit (stale length) " + std::to_string(i), le64(header_len) + h + data});
    } else {
      cases.push_back({"json edit " + std::to_string(i), le64(h.size()) + h + data});
    }
  }

  const fs::path p = dir_ / "fuzz.safetensors";
  int loaded = 0, rejected = 0;
  for (const auto& [what, bytes] : cases) {
    write_bytes(p, bytes);
    try {
      SafeTensorsFile f(p);
      const std::byte* lo = f.mapped_data();
      const std::byte* hi = lo + f.mapped_size();
      for (const auto& n : f.names()) {
        const TensorInfo& t = f.info(n);
        ASSERT_TRUE(t.data >= lo && t.data <= hi && t.nbytes <= size_t(hi - t.data))
            << what << ": tensor " << n << " escapes the mapping";
        ASSERT_EQ(size_t(t.numel()) * itemsize(t.dtype), t.nbytes) << what;
        double sum = 0;  // touch every element
        for (double v : to_double_vector(t)) sum += v;
        (void)sum;
      }
      ++loaded;
    } catch (const FormatError&) {
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << what << ": threw a non-FormatError: " << e.what();
    } catch (...) {
      ADD_FAILURE() << what << ": threw a non-exception";
    }
  }
  EXPECT_GT(cases.size(), 500u);
  EXPECT_GE(loaded, 40) << "data flips alone must load";
  EXPECT_GT(rejected, 100);
  std::cout << "[ fuzz ] " << cases.size() << " mutations: " << loaded << " loaded, " << rejected
            << " rejected\n";
}

}  // namespace
