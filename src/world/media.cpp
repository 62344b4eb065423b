// PNG / GIF encoders and frame composition (see include/salad/media.h).
#include "salad/media.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#include "io/safetensors.h"
#include "salad/layout.h"
#include "salad/world.h"

namespace salad::media {
namespace {

void put_u32be(std::vector<uint8_t>& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}
void put_u16le(std::vector<uint8_t>& out, uint32_t v) {
  out.push_back(static_cast<uint8_t>(v & 0xFF));
  out.push_back(static_cast<uint8_t>((v >> 8) & 0xFF));
}

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

void png_chunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& data) {
  put_u32be(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_u32be(out, crc32(out.data() + start, out.size() - start));
}

// The 3x5 font: rows top to bottom, '1' = ink.
const std::map<char, const char*>& font() {
  static const std::map<char, const char*> f = {
      {'A', "010101111101101"}, {'B', "110101110101110"}, {'C', "011100100100011"}, {'D', "110101101101110"},
      {'E', "111100110100111"}, {'F', "111100110100100"}, {'G', "011100101101011"}, {'H', "101101111101101"},
      {'I', "111010010010111"}, {'J', "001001001101010"}, {'K', "101101110101101"}, {'L', "100100100100111"},
      {'M', "101111111101101"}, {'N', "110101101101101"}, {'O', "010101101101010"}, {'P', "110101110100100"},
      {'Q', "010101101110011"}, {'R', "110101110101101"}, {'S', "011100010001110"}, {'T', "111010010010010"},
      {'U', "101101101101111"}, {'V', "101101101101010"}, {'W', "101101111111101"}, {'X', "101101010101101"},
      {'Y', "101101010010010"}, {'Z', "111001010100111"}, {'0', "111101101101111"}, {'1', "010110010010111"},
      {'2', "110001010100111"}, {'3', "110001010001110"}, {'4', "101101111001001"}, {'5', "111100110001110"},
      {'6', "011100111101111"}, {'7', "111001010010010"}, {'8', "111101111101111"}, {'9', "111101111001110"},
      {' ', "000000000000000"}, {'.', "000000000000010"}, {',', "000000000010100"}, {':', "000010000010000"},
      {';', "000010000010100"}, {'-', "000000111000000"}, {'+', "000010111010000"}, {'=', "000111000111000"},
      {'_', "000000000000111"}, {'%', "101001010100101"}, {'/', "001001010100100"}, {'(', "001010010010001"},
      {')', "100010010010100"}, {'#', "101111101111101"}, {'!', "010010010000010"}, {'?', "110001010000010"},
      {'<', "001010100010001"}, {'>', "100010001010100"}, {'\'', "010010000000000"}};
  return f;
}

}  // namespace

Image::Image(int64_t w, int64_t h, uint8_t r, uint8_t g, uint8_t b) : width(w), height(h) {
  if (w < 0 || h < 0)
    throw ArgumentError("Image: width and height must be >= 0, got " + std::to_string(w) + " x " + std::to_string(h));
  rgb.resize(static_cast<size_t>(3 * w * h));
  for (size_t i = 0; i < rgb.size(); i += 3) rgb[i] = r, rgb[i + 1] = g, rgb[i + 2] = b;
}

at::Tensor cfhw_to_fchw(const at::Tensor& video) {
  if (!video.defined() || video.dim() != 4 || video.size(0) != 3)
    throw ArgumentError("cfhw_to_fchw: expected a (3, F, H, W) tensor, got " +
                        (video.defined() ? c10::str(video.sizes()) : std::string("an undefined tensor")));
  return video.permute({1, 0, 2, 3});
}

std::vector<Image> video_frames(const at::Tensor& video, int64_t scale) {
  if (!video.defined() || video.dim() != 4 || video.size(1) != 3 || !at::isFloatingType(video.scalar_type()))
    throw ArgumentError("video_frames: video must be a floating (F, 3, H, W) tensor, got " +
                        (video.defined()
                             ? std::string(c10::toString(video.scalar_type())) + " " + c10::str(video.sizes())
                             : std::string("an undefined tensor")));
  if (scale < 1 || scale > 64)
    throw ArgumentError("video_frames: scale must be in [1, 64], got " + std::to_string(scale));
  const at::Tensor x = video.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* v = x.data_ptr<float>();
  const int64_t F = x.size(0), H = x.size(2), W = x.size(3);
  std::vector<Image> frames;
  for (int64_t t = 0; t < F; ++t) {
    Image img(W * scale, H * scale);
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        uint8_t px[3];
        bool nan = false;
        for (int64_t c = 0; c < 3; ++c) {
          const float f = v[((t * 3 + c) * H + i) * W + j];
          if (std::isnan(f)) nan = true;
          const double u = std::round((std::min(1.0f, std::max(-1.0f, f)) + 1.0) * 127.5);
          px[c] = static_cast<uint8_t>(std::min(255.0, std::max(0.0, u)));
        }
        if (nan) px[0] = 255, px[1] = 0, px[2] = 255;
        for (int64_t a = 0; a < scale; ++a)
          for (int64_t b = 0; b < scale; ++b) std::memcpy(img.at(j * scale + b, i * scale + a), px, 3);
      }
    frames.push_back(std::move(img));
  }
  return frames;
}

// ---------------------------------------------------------------------------
// PNG: 8-bit RGB, filter 0 on every row, zlib stream of stored deflate blocks.

std::vector<uint8_t> encode_png(const Image& img) {
  if (img.width < 1 || img.height < 1 || img.rgb.size() != static_cast<size_t>(3 * img.width * img.height))
    throw ArgumentError("encode_png: the image must be non-empty with 3 * width * height bytes, got " +
                        std::to_string(img.width) + " x " + std::to_string(img.height) + " and " +
                        std::to_string(img.rgb.size()) + " bytes");
  std::vector<uint8_t> raw;
  raw.reserve(static_cast<size_t>(img.height * (1 + 3 * img.width)));
  for (int64_t y = 0; y < img.height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), img.at(0, y), img.at(0, y) + 3 * img.width);
  }
  std::vector<uint8_t> z = {0x78, 0x01};
  for (size_t pos = 0; pos < raw.size() || pos == 0;) {
    const size_t n = std::min<size_t>(65535, raw.size() - pos);
    const bool last = pos + n == raw.size();
    z.push_back(last ? 1 : 0);
    put_u16le(z, static_cast<uint32_t>(n));
    put_u16le(z, static_cast<uint32_t>(~n & 0xFFFF));
    z.insert(z.end(), raw.begin() + static_cast<std::ptrdiff_t>(pos),
             raw.begin() + static_cast<std::ptrdiff_t>(pos + n));
    pos += n;
    if (last) break;
  }
  uint32_t a = 1, b = 0;  // Adler-32
  for (uint8_t c : raw) a = (a + c) % 65521, b = (b + a) % 65521;
  put_u32be(z, (b << 16) | a);

  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32be(ihdr, static_cast<uint32_t>(img.width));
  put_u32be(ihdr, static_cast<uint32_t>(img.height));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // depth 8, RGB, deflate, filter 0, no interlace
  png_chunk(out, "IHDR", ihdr);
  png_chunk(out, "IDAT", z);
  png_chunk(out, "IEND", {});
  return out;
}

// ---------------------------------------------------------------------------
// GIF

const std::vector<std::array<uint8_t, 3>>& gif_palette() {
  static const std::vector<std::array<uint8_t, 3>> p = [] {
    std::vector<std::array<uint8_t, 3>> v;
    for (const auto& c : world::palette()) v.push_back({c.r, c.g, c.b});
    for (int r = 0; r < 6; ++r)
      for (int g = 0; g < 6; ++g)
        for (int b = 0; b < 6; ++b)
          v.push_back({static_cast<uint8_t>(51 * r), static_cast<uint8_t>(51 * g), static_cast<uint8_t>(51 * b)});
    for (int k = 0; v.size() < 256; ++k) {
      const uint8_t g = static_cast<uint8_t>(std::lround(8 + k * (240.0 / 29.0)));
      v.push_back({g, g, g});
    }
    return v;
  }();
  return p;
}

uint8_t gif_index(uint8_t r, uint8_t g, uint8_t b) {
  const auto& pal = gif_palette();
  const size_t exact = world::palette().size();
  for (size_t i = 0; i < exact; ++i)
    if (pal[i][0] == r && pal[i][1] == g && pal[i][2] == b) return static_cast<uint8_t>(i);
  // Nearest palette entry of the 5-bit-per-channel cell, computed once per cell.
  static std::vector<uint8_t> lut;
  static std::once_flag once;
  std::call_once(once, [&pal] {
    lut.resize(1 << 15);
    for (int cell = 0; cell < (1 << 15); ++cell) {
      const int cr = ((cell >> 10) & 31) * 8 + 4, cg = ((cell >> 5) & 31) * 8 + 4, cb = (cell & 31) * 8 + 4;
      int best = INT32_MAX, arg = 0;
      for (size_t i = 0; i < pal.size(); ++i) {
        const int dr = cr - pal[i][0], dg = cg - pal[i][1], db = cb - pal[i][2];
        const int d = dr * dr + dg * dg + db * db;
        if (d < best) best = d, arg = static_cast<int>(i);
      }
      lut[static_cast<size_t>(cell)] = static_cast<uint8_t>(arg);
    }
  });
  return lut[static_cast<size_t>(((r >> 3) << 10) | ((g >> 3) << 5) | (b >> 3))];
}

namespace {

// GIF's variable-width LZW (codes LSB first, 9 to 12 bits, clear on a full table),
// packed into 255-byte sub-blocks.
void lzw_encode(const std::vector<uint8_t>& idx, std::vector<uint8_t>& out) {
  constexpr int kMinCode = 8, kClear = 256, kEnd = 257;
  std::vector<uint8_t> bytes;
  uint32_t bitbuf = 0;
  int nbits = 0, width = kMinCode + 1, next = kEnd + 1;
  auto emit = [&](int code) {
    bitbuf |= static_cast<uint32_t>(code) << nbits;
    nbits += width;
    while (nbits >= 8) bytes.push_back(static_cast<uint8_t>(bitbuf & 0xFF)), bitbuf >>= 8, nbits -= 8;
  };
  std::unordered_map<uint32_t, int> dict;  // (prefix code << 8 | byte) -> code
  emit(kClear);
  int prefix = -1;
  for (uint8_t k : idx) {
    if (prefix < 0) {
      prefix = k;
      continue;
    }
    const uint32_t key = (static_cast<uint32_t>(prefix) << 8) | k;
    const auto it = dict.find(key);
    if (it != dict.end()) {
      prefix = it->second;
      continue;
    }
    emit(prefix);
    dict.emplace(key, next++);
    // The decoder's table trails ours by one entry, so widen once `next` passes 2^width.
    if (next > (1 << width) && width < 12) ++width;
    if (next == 4096) {  // table full: start over
      emit(kClear);
      dict.clear();
      width = kMinCode + 1, next = kEnd + 1;
    }
    prefix = k;
  }
  if (prefix >= 0) emit(prefix);
  emit(kEnd);
  if (nbits > 0) bytes.push_back(static_cast<uint8_t>(bitbuf & 0xFF));
  out.push_back(kMinCode);
  for (size_t pos = 0; pos < bytes.size(); pos += 255) {
    const size_t n = std::min<size_t>(255, bytes.size() - pos);
    out.push_back(static_cast<uint8_t>(n));
    out.insert(out.end(), bytes.begin() + static_cast<std::ptrdiff_t>(pos),
               bytes.begin() + static_cast<std::ptrdiff_t>(pos + n));
  }
  out.push_back(0);
}

}  // namespace

std::vector<uint8_t> encode_gif(const std::vector<Image>& frames, int delay_cs, int loops) {
  if (frames.empty()) throw ArgumentError("encode_gif: needs at least one frame, got 0");
  const int64_t W = frames[0].width, H = frames[0].height;
  if (W < 1 || H < 1 || W > 65535 || H > 65535)
    throw ArgumentError("encode_gif: frame size must be in [1, 65535], got " + std::to_string(W) + " x " +
                        std::to_string(H));
  if (delay_cs < 0 || delay_cs > 65535)
    throw ArgumentError("encode_gif: delay_cs must be in [0, 65535], got " + std::to_string(delay_cs));
  if (loops < 0 || loops > 65535)
    throw ArgumentError("encode_gif: loops must be in [0, 65535], got " + std::to_string(loops));
  for (size_t f = 0; f < frames.size(); ++f)
    if (frames[f].width != W || frames[f].height != H || frames[f].rgb.size() != static_cast<size_t>(3 * W * H))
      throw ArgumentError("encode_gif: frame " + std::to_string(f) + " is " + std::to_string(frames[f].width) + " x " +
                          std::to_string(frames[f].height) + ", expected the first frame's " + std::to_string(W) +
                          " x " + std::to_string(H));
  std::vector<uint8_t> out = {'G', 'I', 'F', '8', '9', 'a'};
  put_u16le(out, static_cast<uint32_t>(W));
  put_u16le(out, static_cast<uint32_t>(H));
  out.insert(out.end(), {0xF7, 0, 0});  // global table of 256, 8-bit colour resolution
  for (const auto& c : gif_palette()) out.insert(out.end(), c.begin(), c.end());
  // NETSCAPE2.0 application extension: loop count.
  out.insert(out.end(), {0x21, 0xFF, 0x0B, 'N', 'E', 'T', 'S', 'C', 'A', 'P', 'E', '2', '.', '0', 0x03, 0x01});
  put_u16le(out, static_cast<uint32_t>(loops));
  out.push_back(0);
  std::vector<uint8_t> idx(static_cast<size_t>(W * H));
  for (const auto& fr : frames) {
    out.insert(out.end(), {0x21, 0xF9, 0x04, 0x04});  // graphic control: dispose "do not dispose", no transparency
    put_u16le(out, static_cast<uint32_t>(delay_cs));
    out.insert(out.end(), {0, 0});
    out.push_back(0x2C);  // image descriptor: full frame, no local table, not interlaced
    put_u16le(out, 0);
    put_u16le(out, 0);
    put_u16le(out, static_cast<uint32_t>(W));
    put_u16le(out, static_cast<uint32_t>(H));
    out.push_back(0);
    for (size_t p = 0; p < idx.size(); ++p) idx[p] = gif_index(fr.rgb[3 * p], fr.rgb[3 * p + 1], fr.rgb[3 * p + 2]);
    lzw_encode(idx, out);
  }
  out.push_back(0x3B);
  return out;
}

void write_file(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  const std::string tmp = path.string() + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw io::IoError("open " + tmp + ": " + std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string err = std::strerror(errno);
      ::close(fd);
      std::remove(tmp.c_str());
      throw io::IoError("write " + tmp + ": " + err);
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = std::strerror(errno);
    std::remove(tmp.c_str());
    throw io::IoError("close/rename " + tmp + " -> " + path.string() + ": " + err);
  }
}

void write_png(const std::filesystem::path& path, const Image& img) {
  write_file(path, encode_png(img));
}

void write_gif(const std::filesystem::path& path, const std::vector<Image>& frames, int delay_cs, int loops) {
  write_file(path, encode_gif(frames, delay_cs, loops));
}

namespace {
int delay_of(double fps) {
  if (!(fps > 0) || !std::isfinite(fps)) throw ArgumentError("fps must be > 0, got " + std::to_string(fps));
  return static_cast<int>(std::clamp(std::lround(100.0 / fps), 2L, 65535L));
}
}  // namespace

std::vector<std::filesystem::path> write_video_pngs(const std::filesystem::path& dir, const at::Tensor& video,
                                                    int64_t scale, const std::string& prefix) {
  const auto frames = video_frames(video, scale);
  std::filesystem::create_directories(dir);
  std::vector<std::filesystem::path> paths;
  for (size_t t = 0; t < frames.size(); ++t) {
    char name[32];
    std::snprintf(name, sizeof name, "_%03zu.png", t);
    paths.push_back(dir / (prefix + name));
    write_png(paths.back(), frames[t]);
  }
  return paths;
}

void write_video_gif(const std::filesystem::path& path, const at::Tensor& video, int64_t scale, double fps) {
  write_gif(path, video_frames(video, scale), delay_of(fps));
}

int64_t text_width(const std::string& text, int64_t font_scale) {
  return text.empty() ? 0 : static_cast<int64_t>(text.size()) * 4 * font_scale - font_scale;
}

int64_t draw_text(Image& img, int64_t x, int64_t y, const std::string& text, int64_t font_scale,
                  const std::array<uint8_t, 3>& color) {
  if (font_scale < 1) throw ArgumentError("draw_text: font_scale must be >= 1, got " + std::to_string(font_scale));
  const auto& f = font();
  int64_t pen = x;
  for (char ch : text) {
    auto it = f.find(static_cast<char>(std::toupper(static_cast<unsigned char>(ch))));
    const char* glyph = it == f.end() ? f.at('?') : it->second;
    for (int r = 0; r < 5; ++r)
      for (int c = 0; c < 3; ++c) {
        if (glyph[r * 3 + c] != '1') continue;
        for (int64_t a = 0; a < font_scale; ++a)
          for (int64_t b = 0; b < font_scale; ++b) {
            const int64_t px = pen + c * font_scale + b, py = y + r * font_scale + a;
            if (px >= 0 && py >= 0 && px < img.width && py < img.height) std::memcpy(img.at(px, py), color.data(), 3);
          }
      }
    pen += 4 * font_scale;
  }
  return pen - x;
}

std::vector<Image> side_by_side(const std::vector<at::Tensor>& videos, const std::vector<std::string>& labels,
                                int64_t scale, int64_t gap) {
  if (videos.empty()) throw ArgumentError("side_by_side: needs at least one video, got 0");
  if (labels.size() > videos.size())
    throw ArgumentError("side_by_side: " + std::to_string(labels.size()) + " labels for " +
                        std::to_string(videos.size()) + " videos");
  if (gap < 0) throw ArgumentError("side_by_side: gap must be >= 0, got " + std::to_string(gap));
  std::vector<std::vector<Image>> panels;
  for (size_t k = 0; k < videos.size(); ++k) {
    panels.push_back(video_frames(videos[k], scale));
    if (panels.back().empty()) throw ArgumentError("side_by_side: video " + std::to_string(k) + " has no frames");
  }
  bool any_label = false;
  for (const auto& l : labels) any_label |= !l.empty();
  const int64_t fs = std::max<int64_t>(1, (scale + 1) / 2);
  const int64_t strip = any_label ? 7 * fs : 0;
  int64_t width = gap, height = 0;
  size_t frames = 0;
  for (const auto& p : panels) {
    width += p[0].width + gap;
    height = std::max(height, p[0].height);
    frames = std::max(frames, p.size());
  }
  height += 2 * gap + strip;
  const std::array<uint8_t, 3> ink = {240, 240, 240};
  std::vector<Image> out;
  for (size_t t = 0; t < frames; ++t) {
    Image img(width, height, 24, 24, 24);
    int64_t x = gap;
    for (size_t k = 0; k < panels.size(); ++k) {
      const Image& src = panels[k][std::min(t, panels[k].size() - 1)];
      if (k < labels.size()) draw_text(img, x, gap, labels[k], fs, ink);
      for (int64_t y = 0; y < src.height; ++y)
        std::memcpy(img.at(x, gap + strip + y), src.at(0, y), static_cast<size_t>(3 * src.width));
      x += src.width + gap;
    }
    out.push_back(std::move(img));
  }
  return out;
}

void write_side_by_side_gif(const std::filesystem::path& path, const std::vector<at::Tensor>& videos,
                            const std::vector<std::string>& labels, int64_t scale, double fps) {
  write_gif(path, side_by_side(videos, labels, scale), delay_of(fps));
}

}  // namespace salad::media
