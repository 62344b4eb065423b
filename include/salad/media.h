// Pictures of videos: PNG frames, animated GIFs, and side-by-side GIFs of
// several videos with labels, scaled up by an integer factor for viewing.
// Self-contained encoders (no libpng/zlib): PNG with stored (uncompressed)
// deflate blocks, GIF89a with LZW over a fixed 256-colour palette (the world's
// palette exactly, a 6x6x6 colour cube and a grey ramp).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace salad::media {

// An 8-bit RGB picture, rows top to bottom, 3 bytes per pixel.
struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;
  Image() = default;
  Image(int64_t w, int64_t h, uint8_t r = 0, uint8_t g = 0, uint8_t b = 0);
  uint8_t* at(int64_t x, int64_t y) { return rgb.data() + 3 * (y * width + x); }
  const uint8_t* at(int64_t x, int64_t y) const { return rgb.data() + 3 * (y * width + x); }
};

// Frames of a video (F, 3, H, W) with values in [-1, 1] (clamped; NaN shows
// as magenta), each pixel repeated `scale` x `scale` times. Any float dtype or device.
std::vector<Image> video_frames(const at::Tensor& video, int64_t scale = 1);
// (3, F, H, W) -> (F, 3, H, W): the dataset/model layout to the picture layout.
at::Tensor cfhw_to_fchw(const at::Tensor& video);

// Encoders (whole file in memory) and atomic file writers.
std::vector<uint8_t> encode_png(const Image& img);
// Every frame must have the first frame's size. delay in 1/100 s; loops 0 = forever.
std::vector<uint8_t> encode_gif(const std::vector<Image>& frames, int delay_cs = 12, int loops = 0);
void write_file(const std::filesystem::path& path, const std::vector<uint8_t>& bytes);
void write_png(const std::filesystem::path& path, const Image& img);
void write_gif(const std::filesystem::path& path, const std::vector<Image>& frames, int delay_cs = 12, int loops = 0);

// The fixed GIF palette (256 RGB triples) and the index a colour maps to.
const std::vector<std::array<uint8_t, 3>>& gif_palette();
uint8_t gif_index(uint8_t r, uint8_t g, uint8_t b);

// Writes <dir>/<prefix>_000.png ... one per frame; returns the paths.
std::vector<std::filesystem::path> write_video_pngs(const std::filesystem::path& dir, const at::Tensor& video,
                                                    int64_t scale = 4, const std::string& prefix = "frame");
void write_video_gif(const std::filesystem::path& path, const at::Tensor& video, int64_t scale = 4, double fps = 8);

// Draws `text` (upper-cased; A-Z 0-9 and " .,:;-+=_%/()#!?<>'") with a 3x5
// pixel font, each font pixel `font_scale` x `font_scale`; unknown characters
// show as '?'. Returns the pixel width drawn.
int64_t draw_text(Image& img, int64_t x, int64_t y, const std::string& text, int64_t font_scale,
                  const std::array<uint8_t, 3>& color);
int64_t text_width(const std::string& text, int64_t font_scale);

// Frames of several videos (each (F_i, 3, H_i, W_i)) side by side, `gap` pixels
// apart on a dark backdrop, each under its label (labels may be empty, or
// fewer than the videos). Videos shorter than the longest hold their last frame.
std::vector<Image> side_by_side(const std::vector<at::Tensor>& videos, const std::vector<std::string>& labels = {},
                                int64_t scale = 4, int64_t gap = 4);
void write_side_by_side_gif(const std::filesystem::path& path, const std::vector<at::Tensor>& videos,
                            const std::vector<std::string>& labels = {}, int64_t scale = 4, double fps = 8);

}  // namespace salad::media
