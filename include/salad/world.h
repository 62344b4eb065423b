// The shapes world: a deterministic, seeded generator of short RGB videos of
// one to three flat shapes moving with constant velocity on a one-colour
// background (optionally with a static random texture the prompt does not
// describe), bouncing off the walls, each with a prompt that describes it;
// a word-level tokenizer with a fixed random embedding table standing in for
// the text encoder; and the per-sample dataset files that `salad finetune`
// reads (the model works in pixel space: in_dim = out_dim = 3, patch (1,2,2)).
//
// Why it needs long-range attention: the background colour is global (the same
// in every frame), each object keeps its shape, colour and size in every frame,
// and its position follows one constant velocity through all frames (with
// bounces), so a token must agree with tokens far away in time and space.
// The background texture (WorldConfig::texture) is identical in every frame
// and not in the prompt: at high noise the best estimate of a background token
// pools the same position in all other frames, H*W/4 tokens apart each, i.e.
// attention to about F distant key blocks per query block.
//
// Coordinates: x to the right, y down, in pixels; pixel (row i, column j)
// covers [j, j+1) x [i, i+1) and is inside a shape when its centre is.
// Videos are (3, F, H, W) float32 in [-1, 1] (channel-first, as Wan latents).
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace salad::world {

// The world's palette, fixed; a colour's id is its index. Any colour may be the
// background; an object's colour differs from the background and from every
// other object of the scene.
struct PaletteColor {
  const char* name;
  uint8_t r, g, b;
};
const std::vector<PaletteColor>& palette();
// The id of a colour name, or -1.
int color_id(const std::string& name);
// Palette colour `id` in [-1, 1] (c / 127.5 - 1). Throws ArgumentError for a bad id.
std::array<float, 3> color_value(int id);

enum class Shape : int { Circle, Square, Triangle };
enum class Size : int { Small, Large };
// y grows downwards: Up is (0, -1).
enum class Direction : int { Left, Right, Up, Down, UpLeft, UpRight, DownLeft, DownRight };
constexpr int kNumShapes = 3, kNumSizes = 2, kNumDirections = 8;

const char* to_string(Shape s);      // circle | square | triangle
const char* to_string(Size s);       // small | large
const char* to_string(Direction d);  // left | right | up | down | up-left | up-right | down-left | down-right
// Parsers; throw ArgumentError naming the word and the accepted ones.
Shape parse_shape(const std::string& s);
Size parse_size(const std::string& s);
Direction parse_direction(const std::string& s);
// Unit velocity of a direction (diagonals are (+-1, +-1) / sqrt(2)).
std::array<double, 2> unit_velocity(Direction d);

// A default-constructed config is the first world ("v1": 8 x 32 x 32, speed
// 0.06, no texture); the presets below are what the tools use.
struct WorldConfig {
  int64_t frames = 8, height = 32, width = 32;
  int64_t min_objects = 1, max_objects = 3;
  double speed = 0.06;       // pixels per frame, as a fraction of min(height, width)
  double small_size = 0.11;  // half-extent of a small object, fraction of min(height, width)
  double large_size = 0.17;  // half-extent of a large object
  // Static background texture: every texture_cell x texture_cell cell of the
  // background (cells aligned at pixel (0, 0)) gets an offset drawn uniformly
  // from {-texture, 0, +texture}, added to all three channels of the
  // background colour (then clamped to [-1, 1]); the same in every frame,
  // hidden behind objects, drawn from the scene's texture_seed, not in the
  // prompt. 0 = a flat background (bit-identical to the old world).
  double texture = 0;        // amplitude in [-1, 1] pixel units, 0 <= texture <= 0.5
  int64_t texture_cell = 2;  // cell side in pixels, >= 1 (2 = one cell per 2x2-pixel token)

  // Throws ArgumentError naming the first bad field (sizes >= 1, 1 <= min <=
  // max <= 3, speed >= 0, 0 < small < large, a large object fits in the frame
  // with room to move, 0 <= texture <= 0.5, texture_cell >= 1).
  void validate() const;
  double speed_px() const;              // speed in pixels per frame
  double half_extent_px(Size s) const;  // an object's half-extent (circle radius, half the square's side)
  // "cpu":  24 x 32 x 32, speed 0.12, texture 0.35 (cell 2): the world of the
  //         shipped checkpoints (world run 4; sparse/dense held-out loss 4.5x)
  // "gpu":  24 x 64 x 64, otherwise as "cpu"
  // "v2":   16 x 32 x 32, speed 0.09, texture 0.25 (cell 2) (world runs 2-3)
  // "v1":   8 x 32 x 32, speed 0.06, no texture (the first world; = WorldConfig())
  // Throws ArgumentError otherwise.
  static WorldConfig preset(const std::string& name);
  std::string to_json() const;  // compact JSON of every field
  // Throws ArgumentError on a bad document. "texture" and "texture_cell" are
  // optional (documents written before they existed load as texture 0, cell 2).
  static WorldConfig from_json(const std::string& text);
};

struct WorldObject {
  Shape shape = Shape::Circle;
  int color = 0;  // palette id
  Size size = Size::Small;
  Direction direction = Direction::Right;
  // Centre at frame 0, in pixels. Not part of the prompt (the generator draws it).
  double x = 0, y = 0;
};

// What a prompt says (background and objects) plus what the generator hides
// (where the objects start, the seed of the background texture).
struct Scene {
  int background = 0;  // palette id
  std::vector<WorldObject> objects;
  // Seed of the background texture (see WorldConfig::texture); sample_scene
  // sets it to its seed, so a sample's texture follows from its metadata "seed".
  uint64_t texture_seed = 0;

  // "a small red circle moving left and a large blue square moving down-right on a grey background"
  std::string prompt() const;
  // {"background": "grey", "objects": [{"shape", "color", "size", "direction", "x", "y"}, ...],
  //  "texture_seed": n}  (texture_seed optional in from_json: 0)
  std::string to_json() const;
  std::string objects_json() const;                 // the "objects" array alone
  static Scene from_json(const std::string& text);  // throws ArgumentError on a bad document
};

// The scene the generator draws for `seed`: the object count uniform in
// [min_objects, max_objects], background, distinct colours, shapes, sizes,
// directions and start positions uniform (a start is two steps clear of the
// walls on each axis the object moves along, when the frame allows); objects never overlap in any frame
// (a colliding object redraws direction and start, turns small after 100
// tries and is dropped after 200; the first always fits); texture_seed = seed.
// The texture has its own random stream: the scene does not depend on it.
Scene sample_scene(const WorldConfig& cfg, uint64_t seed);
// The structured scene of a prompt (positions 0). Accepts exactly the grammar
// of Scene::prompt(); throws ArgumentError naming the first unexpected word.
Scene parse_prompt(const std::string& prompt);

// Centres of `obj` in frames 0..F-1: constant velocity speed_px * unit_velocity,
// reflected at the walls so the object's box [c - e, c + e] stays inside the frame.
std::vector<std::array<double, 2>> trajectory(const WorldConfig& cfg, const WorldObject& obj);
// Same, for any start point, direction, speed (px/frame), half-extent and frame count.
std::vector<std::array<double, 2>> trajectory(double x, double y, Direction d, double speed_px, double half_extent,
                                              int64_t frames, int64_t height, int64_t width);
// Whether pixel centre (px, py) lies inside a shape of half-extent e centred at (cx, cy).
// Triangle: apex up at (cx, cy - e), base from (cx - e, cy + e) to (cx + e, cy + e).
bool inside_shape(Shape s, double cx, double cy, double e, double px, double py);
// The background texture offsets of a scene: (H, W) float32, each value in
// {-texture, 0, +texture}, constant on texture_cell x texture_cell cells; all
// zero when cfg.texture == 0. Cells in row-major order each draw one
// splitmix64 value (mod 3) from a stream seeded by texture_seed.
at::Tensor texture_offsets(const WorldConfig& cfg, uint64_t texture_seed);
// The video of a scene: (3, F, H, W) float32 in [-1, 1], hard edges, exact
// palette colours for objects; background pixels are clamp(background colour
// + texture offset, -1, 1) (exactly the palette colour when texture == 0).
at::Tensor render(const WorldConfig& cfg, const Scene& scene);

// ---------------------------------------------------------------------------
// Text: a word-level tokenizer over the world's fixed vocabulary.

class Tokenizer {
 public:
  static constexpr int64_t kPad = 0, kUnknown = 1;
  // "<pad>", "<unk>", the grammar words, colours, shapes, sizes, directions.
  static const std::vector<std::string>& vocab();
  static int64_t vocab_size() { return static_cast<int64_t>(vocab().size()); }
  // Lower-cased words split on whitespace (',' and '.' dropped); unknown words
  // map to kUnknown; padded with kPad to `text_len`. Throws ArgumentError when
  // the prompt has more than text_len words.
  static std::vector<int64_t> encode(const std::string& text, int64_t text_len);
  // The words of the non-pad ids, joined by single spaces; throws ArgumentError for an id out of range.
  static std::string decode(const std::vector<int64_t>& ids);
};

// Default seed of the embedding table; every dataset with the same text_dim
// shares it, so contexts are comparable across datasets.
constexpr uint64_t kEmbeddingSeed = 0x5A1ADull;

// The fixed "learned embedding table" stand-in: (vocab_size, text_dim) float32,
// N(0, 1) entries from `seed`, the pad row zero (Wan zero-pads its context).
at::Tensor embedding_table(int64_t text_dim, uint64_t seed = kEmbeddingSeed);
// Rows of the table for `tokens`: (tokens.size(), text_dim) float32.
at::Tensor embed_tokens(const std::vector<int64_t>& tokens, int64_t text_dim, uint64_t seed = kEmbeddingSeed);

struct TextConfig {
  int64_t text_len = 32;  // three objects take 24 words
  int64_t text_dim = 64;
  uint64_t embedding_seed = kEmbeddingSeed;
  void validate() const;  // throws ArgumentError
};

// ---------------------------------------------------------------------------
// Dataset files.
//
// One .safetensors file per sample (the layout `salad finetune` reads):
//   latents  F32 (3, F, H, W) in [-1, 1]   (pixel space: latents are the video)
//   context  F32 (text_len, text_dim)      (embedding rows of the tokens; pad rows zero)
//   tokens   I64 (text_len,)
//   __metadata__: format = "salad.world.v1", prompt, seed (decimal), index,
//     background (colour name), objects (JSON array, see Scene::to_json),
//     world (WorldConfig JSON, with texture and texture_cell), text_len,
//     text_dim, embedding_seed. The background texture is not stored: it is
//     texture_offsets(world, seed) (read_sample sets scene.texture_seed = seed),
//     and it is in the latents.
// And <dir>/index.json: {"format", "count", "seed", "world", "text", "vocab",
//   "samples": [{"file", "seed", "prompt"}]}.

struct Sample {
  at::Tensor latents;  // (3, F, H, W)
  at::Tensor context;  // (text_len, text_dim)
  at::Tensor tokens;   // (text_len,) int64
  std::string prompt;
  uint64_t seed = 0;
  int64_t index = 0;
  Scene scene;
  WorldConfig world;
  TextConfig text;
};

// Per-sample seed of sample `index` of a dataset with seed `dataset_seed` (a hash of both).
uint64_t sample_seed(uint64_t dataset_seed, int64_t index);
// Sample `index` of the dataset with seed `dataset_seed`.
Sample make_sample(const WorldConfig& cfg, const TextConfig& text, uint64_t dataset_seed, int64_t index);
// Writes atomically (see io::write_safetensors).
void write_sample(const std::filesystem::path& path, const Sample& s);
// Reads and checks a sample file; throws ArgumentError naming the file and what is wrong.
Sample read_sample(const std::filesystem::path& path);
// The file name of sample `index`: "sample_000123.safetensors".
std::string sample_file_name(int64_t index);

// A video tensor from any .safetensors file: `tensor` ((3, F, H, W) or
// (1, 3, F, H, W), any floating dtype) as float32 (3, F, H, W), and the file's
// metadata. Throws ArgumentError naming the file and the problem.
struct VideoFile {
  at::Tensor video;
  std::map<std::string, std::string> metadata;
};
VideoFile read_video_file(const std::filesystem::path& path, const std::string& tensor = "latents");

struct DatasetReport {
  int64_t written = 0;   // new files
  int64_t kept = 0;      // existing files that verified (same tensors and metadata as regenerated)
  int64_t replaced = 0;  // existing files that did not verify (unreadable or different) and were rewritten
  std::filesystem::path index;
};

// Writes samples 0..count-1 into `dir` (created if needed), then the index.
// Resumable: an existing sample file is kept when it matches the regenerated
// sample exactly, else rewritten. `progress(done, count)` is called after each sample.
DatasetReport write_dataset(const std::filesystem::path& dir, const WorldConfig& cfg, const TextConfig& text,
                            int64_t count, uint64_t seed, const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace salad::world
