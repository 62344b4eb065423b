// Wan 2.1 flow-matching sampling: the shifted sigma schedule, Euler and UniPC
// (bh2, order 2 predictor-corrector, predicting x0) solvers, classifier-free
// guidance, seeded noise, a progress bar, per-step callbacks, and the SALAD
// quality knobs that switch the attention mode of WanModel's blocks per step.
//
// Flow matching as Wan trains it: x_s = (1 - s) x0 + s eps, the model takes the
// timestep t = 1000 s and predicts the velocity v = eps - x0. The sampler only
// sees a callable (x, t) -> v, so it is testable without a DiT.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "salad/wan.h"

namespace salad {

enum class Solver { Euler, UniPC };
const char* to_string(Solver s);
Solver parse_solver(const std::string& s);  // "euler" | "unipc"

// Wan's timestep shift: shift * s / (1 + (shift - 1) * s). Maps 0 -> 0 and 1 -> 1.
double flow_shift(double sigma, double shift);

// The steps + 1 sigmas of Wan's FlowUniPCMultistepScheduler.set_timesteps:
// linspace(sigma_max, 0, steps + 1) without its last point, shifted, then a
// final 0. Strictly decreasing; sigma_max 0.999 is 1 - 1/num_train_timesteps.
std::vector<double> flow_sigmas(int64_t steps, double shift, double sigma_max = 0.999);

// Classifier-free guidance: v_uncond + guidance * (v_cond - v_uncond).
at::Tensor cfg_combine(const at::Tensor& v_cond, const at::Tensor& v_uncond, double guidance);

// Standard normal noise of `shape` from a CPU generator seeded with `seed`, in
// float32, then moved to `device`: the same seed gives the same latents on any device.
at::Tensor seeded_noise(at::IntArrayRef shape, uint64_t seed, const at::Device& device = at::kCPU);

// Wan's latent shape (z_dim, 1 + (frames - 1) / 4, height / 8, width / 8) for
// the VAE strides (4, 8, 8). Throws ArgumentError unless frames = 4n + 1 and
// height, width are positive multiples of 16 (VAE stride times the 2x2 patch).
std::vector<int64_t> wan_latent_shape(int64_t frames, int64_t height, int64_t width, int64_t z_dim = 16);

struct SamplerConfig {
  int64_t steps = 50;             // Wan T2V default
  double shift = 5.0;             // Wan T2V default (3.0 for I2V at 480p)
  Solver solver = Solver::UniPC;  // Wan's default solver
  double sigma_max = 0.999;       // first sigma before the shift (Wan's UniPC)
  int64_t num_train_timesteps = 1000;
  bool integer_timesteps = true;  // t = floor(1000 s) as Wan's scheduler hands the model int64 timesteps
  bool progress = false;          // progress bar on stderr
  void validate() const;          // throws ArgumentError naming the field
};

// What a callback sees. `elapsed_ms` and `total_ms` are filled for the
// after-step callback only (the step's wall time, the run's so far).
struct StepInfo {
  int64_t index = 0;      // 0-based step
  int64_t steps = 0;      // total steps
  double sigma = 0;       // sigma at which the model is evaluated
  double sigma_next = 0;  // sigma after the step
  double timestep = 0;    // what the model receives (see integer_timesteps)
  double elapsed_ms = 0;
  double total_ms = 0;
};

// The model: x (the current latents, the noise's dtype/device) and t (B,)
// float64 timesteps -> velocity of x's shape.
using VelocityFn = std::function<at::Tensor(const at::Tensor& x, const at::Tensor& t)>;
using StepCallback = std::function<void(const StepInfo&)>;

// Integrates from `noise` (treated as x at sigma = sigmas[0]) to sigma = 0 in
// `noise`'s dtype; returns the final latents. `before_step` runs before each
// model evaluation (switch attention modes there), `after_step` after each
// update (timings). One model evaluation per step for both solvers. With a
// CUDA tensor the device is synchronised at each step end so timings are real.
at::Tensor sample_flow(const VelocityFn& model, const at::Tensor& noise, const SamplerConfig& cfg,
                       const StepCallback& before_step = {}, const StepCallback& after_step = {});

// "step i/N [####....] 1.23 s/it, ETA 0:45" on stderr, rewritten in place
// (one line per update when stderr is not a terminal).
class ProgressBar {
 public:
  explicit ProgressBar(int64_t total, std::string label = "sampling");
  void update(int64_t done, double elapsed_ms);  // `done` steps finished, `elapsed_ms` since start
  void finish();

 private:
  int64_t total_;
  std::string label_;
  bool tty_;
  bool open_ = false;
};

// --- Attention knobs on a WanModel ------------------------------------------

// Which attention each block uses at each step: `dense` for the first
// dense_steps steps and always in dense_layers, `mode` otherwise.
struct AttentionSchedule {
  Mode mode = Mode::Salad;
  int64_t dense_steps = 0;
  std::set<int64_t> dense_layers;

  Mode mode_at(int64_t step, int64_t layer) const;
  // Throws ArgumentError for a negative dense_steps or a layer outside [0, num_layers).
  void validate(int64_t num_layers) const;
};

// Sets every block's self-attention mode for `step` (WanModel reads the mode at each forward).
void apply_attention_schedule(WanModel& model, const AttentionSchedule& schedule, int64_t step);
// Every block in mode `m`.
void set_attention_mode(WanModel& model, Mode m);
// The current mode of each block.
std::vector<Mode> attention_modes(WanModel& model);

// A VelocityFn for a WanModel: latents (C, F, H, W) or (B, C, F, H, W), the
// text context (Lt, text_dim) or (1, Lt, text_dim), and with guidance != 1 a
// negative context for the unconditional pass. `batch_cfg` runs both passes
// in one batch of 2 (contexts zero-padded to the longer one; only where the
// model pads to text_len anyway, else it runs them one after the other).
// Runs under NoGradGuard; returns float32 velocity of x's shape and device.
VelocityFn wan_velocity(WanModel model, const at::Tensor& context, const at::Tensor& negative_context = {},
                        double guidance = 1.0, bool batch_cfg = false);

}  // namespace salad
