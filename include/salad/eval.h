// Video metrics of the shapes world: analogues of the four VBench dimensions
// the SALAD paper reports, each in [0, 1], higher is better, computed from the
// frames alone plus the prompt (never the generator's hidden start positions).
//
// Every frame is segmented by nearest palette colour: a pixel belongs to a
// colour when it lies within `assign_tol` of it (L2 over RGB in [-1, 1]
// units; palette colours are >= 0.78 apart). In a textured world (cfg.texture
// > 0) the background's distance is to its texture path instead, the colours
// clamp(bg + s (1, 1, 1), -1, 1) for s in [-texture, texture] (>= 0.37 from
// every other palette colour up to texture 0.5): texture offsets are
// background, not noise or another colour. For each colour that is not the
// background, the largest 4-connected component of at least `min_area` pixels
// is that colour's blob in that frame; blobs give area, bounding-box centre,
// half-extent and a shape class (fill ratio of the box: square ~1, circle
// ~0.78; share of pixels in the box's top half: apex-up triangle ~0.25).
//
//  subject_consistency    each blob track (one per detected colour) is present
//                         in every frame, keeps its area (within 25%) and its
//                         shape class: mean over tracks of
//                         presence * (area stability + shape stability) / 2.
//  background_consistency outside the blobs (dilated by a pixel) the frame shows
//                         the prompted background colour, uniformly, without
//                         flicker: mean over frames of (share of pixels nearest
//                         to it) x (closeness of their mean colour to it), times
//                         a flicker term on the frame-to-frame change of that mean.
//                         Textured world: a pixel's colour counts less its
//                         texture offset (bg + its distance vector to the texture
//                         path), and the score is further multiplied by a
//                         stability term, falloff(mean per-pixel L2 change between
//                         consecutive frames over pixels that are background in
//                         both, slack 0.05, width 0.3): the texture must hold still
//                         (ground truth: no change; pixel noise or a re-drawn
//                         texture costs). Flat world (texture 0): unchanged.
//  imaging_quality        pixels lie on palette colours (no noise, blur or
//                         off-palette colour): 0.8 x mean closeness of each pixel
//                         to its nearest palette colour (the background: its
//                         texture path, so offsets up to `texture` cost nothing) + 0.2 x (1 - 10 x the
//                         share of isolated pixels, whose nearest colour differs
//                         from all four neighbours).
//  text_consistency       the video shows what the prompt says: per prompted
//                         object, 0.15 presence of its colour + 0.15 right shape
//                         + 0.1 right size + 0.6 motion (the blob centres follow
//                         the prompted direction at the world's speed, bouncing
//                         off the walls, from the best-fitting start within a
//                         pixel of the first detection); plus 0.5 x the share of
//                         frames whose background shows the prompted colour;
//                         divided by (objects + 0.5 + blobs of colours the
//                         prompt does not mention, present in at least half of
//                         the frames).
//
// Reference points (tests/test_op_world.cpp; means over seeds, v1 and textured
// CPU worlds): ground truth >= 0.95 on every metric (>= 0.98 over 300 seeds;
// textured ground truth >= 0.98 on every seed tested); Gaussian noise sigma 0.2
// -> imaging ~0.3-0.55 (background ~0 when textured: the pixels no longer hold
// still); sigma 0.05 on a textured world -> background ~0.8; a random +-0.35
// background shift per frame -> background ~0; a texture re-drawn every frame
// -> background ~0; a frozen or reversed object loses >= 0.3 of its object score.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "salad/world.h"

namespace salad::eval {

struct VideoMetrics {
  double subject_consistency = 0;
  double background_consistency = 0;
  double imaging_quality = 0;
  double text_consistency = 0;

  double sum() const { return subject_consistency + background_consistency + imaging_quality + text_consistency; }
  std::string to_json() const;  // {"subject_consistency": ..., ..., "sum": ...}
};

// Thresholds of the analysis (defaults tuned so ground-truth videos score >= 0.95
// and visible defects cost a clear margin; see tests/test_op_world.cpp).
struct EvalOptions {
  double assign_tol = 0.35;         // a pixel belongs to a colour within this L2 distance
  double min_area_fraction = 0.35;  // blob area floor, as a fraction of a small circle's area
  double motion_slack_px = 0.75;    // centre error forgiven (pixel quantisation)
  double motion_tol = 0.5;          // ... then the score falls to 0 over this fraction of the half-extent (>= 1 px)
  double start_search_px = 1.0;     // the fitted start lies within this distance (per axis) of the first detection
  double imaging_width = 0.3;       // pixel closeness falls to 0 this far (L2) beyond 0.03 from the palette
};

// One colour's largest blob in one frame.
struct Blob {
  bool found = false;
  int64_t area = 0;
  double cx = 0, cy = 0;   // bounding-box centre (pixels, continuous coordinates)
  double half_extent = 0;  // (box width + box height) / 4
  double fill = 0;         // area / box area
  double top_share = 0;    // share of the area in the box's top half
  world::Shape shape = world::Shape::Circle;
};

// Shape class of a blob from its fill ratio and top share.
world::Shape classify_shape(double fill, double top_share);

struct ObjectScore {
  int color = 0;
  double presence = 0, shape = 0, size = 0, motion = 0, score = 0;
};

struct Report {
  VideoMetrics metrics;
  std::vector<ObjectScore> objects;  // one per prompted object, in prompt order
  double background_match = 0;       // share of frames whose background shows the prompted colour
  int64_t extra_tracks = 0;          // unprompted colours present in >= half of the frames
  // blobs[color][frame] for every palette colour (the background's entries stay empty).
  std::vector<std::vector<Blob>> blobs;
};

// video: (3, F, H, W) float, values in [-1, 1] (any device; analysed on the
// CPU). `cfg` gives the speed and object sizes; its frames/height/width must
// match the video; its texture and texture_cell say how much background texture
// to tolerate. Only the prompt part of `scene` is used (background, and per
// object colour, shape, size, direction), not the start positions nor the
// texture seed.
// Throws ArgumentError for a wrong shape, dtype or config.
Report analyse(const at::Tensor& video, const world::Scene& scene, const world::WorldConfig& cfg,
               const EvalOptions& opt = {});
VideoMetrics evaluate(const at::Tensor& video, const world::Scene& scene, const world::WorldConfig& cfg,
                      const EvalOptions& opt = {});
// Field-wise mean (all zero for an empty list).
VideoMetrics mean(const std::vector<VideoMetrics>& m);

}  // namespace salad::eval
