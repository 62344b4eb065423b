// Wan 2.1 flow-matching sampling (see include/salad/sampler.h).
//
// UniPC here is the data-prediction (x0) multistep predictor-corrector with the
// B(h) = expm1(-h) variant ("bh2") and order 2, in the half-log-SNR variable
// lambda = log((1 - sigma) / sigma) of the flow path x = (1 - sigma) x0 + sigma eps.
// It follows the schedule logic of Wan's FlowUniPCMultistepScheduler (order 1
// at the first and at the last step, corrector from the second step on).
#include "salad/sampler.h"
#include "model/text.h"

#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace salad {
namespace {
double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Half log-SNR of the flow path: log(alpha / sigma) with alpha = 1 - sigma.
double lambda_of(double sigma) {
  return std::log1p(-sigma) - std::log(sigma);
}

// One UniPC-bh2 predictor step from sigma s0 to t (> 0) in data prediction:
// exponential-integrator base step plus, at order 2, the 0.5-weighted first
// difference of the last two x0 predictions (m0 newest at s0, m1 at s1).
at::Tensor unipc_predict(const at::Tensor& x, const at::Tensor& m0, const at::Tensor& m1, double s1, double s0,
                         double t, int order) {
  if (t <= 0) return m0;  // lambda(0) = inf: the order-1 step lands exactly on the x0 prediction
  const double h = lambda_of(t) - lambda_of(s0);
  const double phi1 = std::expm1(-h);  // also B(h) for bh2
  at::Tensor out = (t / s0) * x - ((1 - t) * phi1) * m0;
  if (order >= 2) {
    const double r = (lambda_of(s1) - lambda_of(s0)) / h;
    out = out - ((1 - t) * phi1 * 0.5 / r) * (m1 - m0);
  }
  return out;
}

// The UniC corrector: re-does the step s0 -> t from `x_prev` (the sample at
// s0) using the x0 prediction `m_t` made at the predicted sample, with
// coefficients from the order conditions (a 2x2 solve at order 2).
at::Tensor unipc_correct(const at::Tensor& x_prev, const at::Tensor& m_t, const at::Tensor& m0, const at::Tensor& m1,
                         double s1, double s0, double t, int order) {
  const double h = lambda_of(t) - lambda_of(s0);
  const double hh = -h;
  const double phi1 = std::expm1(hh);
  const double bh = phi1;
  const at::Tensor base = (t / s0) * x_prev - ((1 - t) * phi1) * m0;
  if (order < 2) return base - ((1 - t) * bh * 0.5) * (m_t - m0);
  // b_k = k! hh phi_{k+1}(hh) / B(h), k = 1, 2, with the exponential-integrator functions phi_k.
  double phik = phi1 / hh - 1;
  const double b0 = phik / bh;
  phik = phik / hh - 0.5;
  const double b1 = phik * 2 / bh;
  const double r = (lambda_of(s1) - lambda_of(s0)) / h;  // < 0: s1 is the older, noisier sigma
  // Solve [[1, 1], [r, 1]] [rho0, rho1] = [b0, b1].
  const double rho0 = (b0 - b1) / (1 - r), rho1 = b0 - rho0;
  return base - ((1 - t) * bh) * ((rho0 / r) * (m1 - m0) + rho1 * (m_t - m0));
}

bool stderr_is_tty() {
  return ::isatty(2) == 1;
}

std::string clock_str(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}
}  // namespace

// --- schedule ------------------------------------------------------------------

const char* to_string(Solver s) {
  return s == Solver::Euler ? "euler" : "unipc";
}

Solver parse_solver(const std::string& s) {
  if (s == "euler") return Solver::Euler;
  if (s == "unipc") return Solver::UniPC;
  fail("solver: expected euler | unipc, got '", s, "'");
}

double flow_shift(double sigma, double shift) {
  return shift * sigma / (1 + (shift - 1) * sigma);
}

std::vector<double> flow_sigmas(int64_t steps, double shift, double sigma_max) {
  if (steps <= 0) fail("steps: expected a positive count, got ", steps);
  if (!(shift > 0)) fail("shift: expected a positive value, got ", shift);
  if (!(sigma_max > 0 && sigma_max < 1)) fail("sigma_max: expected a value in (0, 1), got ", sigma_max);
  std::vector<double> s(static_cast<size_t>(steps) + 1);
  for (int64_t i = 0; i < steps; ++i)
    s[static_cast<size_t>(i)] =
        flow_shift(sigma_max * (1.0 - static_cast<double>(i) / static_cast<double>(steps)), shift);
  s.back() = 0.0;
  return s;
}

void SamplerConfig::validate() const {
  if (steps <= 0) fail("steps: expected a positive count, got ", steps);
  if (!(shift > 0)) fail("shift: expected a positive value, got ", shift);
  if (!(sigma_max > 0 && sigma_max < 1)) fail("sigma_max: expected a value in (0, 1), got ", sigma_max);
  if (num_train_timesteps <= 0) fail("num_train_timesteps: expected a positive count, got ", num_train_timesteps);
}

at::Tensor cfg_combine(const at::Tensor& v_cond, const at::Tensor& v_uncond, double guidance) {
  if (!v_cond.sizes().equals(v_uncond.sizes()))
    fail("v_uncond: expected the shape of v_cond ", shape_str(v_cond.sizes()), ", got ", shape_str(v_uncond.sizes()));
  return v_uncond + guidance * (v_cond - v_uncond);
}

at::Tensor seeded_noise(at::IntArrayRef shape, uint64_t seed, const at::Device& device) {
  for (int64_t d : shape)
    if (d <= 0) fail("shape: expected positive sizes, got ", shape_str(shape));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)).to(device);
}

std::vector<int64_t> wan_latent_shape(int64_t frames, int64_t height, int64_t width, int64_t z_dim) {
  if (frames <= 0 || (frames - 1) % 4 != 0) fail("frames: expected 4n + 1 (1, 5, ..., 81), got ", frames);
  if (height <= 0 || height % 16 != 0) fail("height: expected a positive multiple of 16, got ", height);
  if (width <= 0 || width % 16 != 0) fail("width: expected a positive multiple of 16, got ", width);
  if (z_dim <= 0) fail("z_dim: expected a positive channel count, got ", z_dim);
  return {z_dim, 1 + (frames - 1) / 4, height / 8, width / 8};
}

// --- sampler -------------------------------------------------------------------

at::Tensor sample_flow(const VelocityFn& model, const at::Tensor& noise, const SamplerConfig& cfg,
                       const StepCallback& before_step, const StepCallback& after_step) {
  cfg.validate();
  if (!model) fail("model: expected a callable (x, t) -> v, got an empty function");
  if (!noise.defined() || !noise.is_floating_point())
    fail("noise: expected a defined floating-point tensor, got ",
         noise.defined() ? c10::toString(noise.scalar_type()) : "undefined");
  const std::vector<double> sig = flow_sigmas(cfg.steps, cfg.shift, cfg.sigma_max);
  const int64_t N = cfg.steps;
  const int64_t B = noise.dim() == 5 ? noise.size(0) : 1;  // timesteps per batch row; (C, F, H, W) is one sample
  const bool cuda = noise.is_cuda();
  torch::NoGradGuard ng;

  at::Tensor x = noise;
  at::Tensor m_prev, m_prev2, last_sample;  // UniPC history: x0 predictions at steps i-1, i-2; sample at i-1
  int last_order = 0;
  ProgressBar bar(N);
  const double t_start = now_ms();
  for (int64_t i = 0; i < N; ++i) {
    const size_t iu = static_cast<size_t>(i);
    StepInfo info;
    info.index = i, info.steps = N, info.sigma = sig[iu], info.sigma_next = sig[iu + 1];
    const double t_raw = sig[iu] * static_cast<double>(cfg.num_train_timesteps);
    info.timestep = cfg.integer_timesteps ? std::floor(t_raw) : t_raw;
    if (before_step) before_step(info);
    const double t0 = now_ms();

    const at::Tensor t = at::full({B}, info.timestep, x.options().dtype(at::kDouble));
    const at::Tensor v = model(x, t);
    if (!v.defined() || !v.sizes().equals(x.sizes()))
      fail("model: expected a velocity of shape ", shape_str(x.sizes()), ", got ",
           v.defined() ? shape_str(v.sizes()) : std::string("undefined"));
    const at::Tensor vx = v.to(x.device(), x.scalar_type());

    if (cfg.solver == Solver::Euler) {
      x = x + (info.sigma_next - info.sigma) * vx;
    } else {
      const at::Tensor m = x - info.sigma * vx;  // x0 prediction at the current sample
      if (i > 0)
        x = unipc_correct(last_sample, m, m_prev, m_prev2, i >= 2 ? sig[iu - 2] : 0.0, sig[iu - 1], sig[iu],
                          last_order);
      m_prev2 = m_prev;
      m_prev = m;
      // Order 2 once two predictions exist; order 1 on the final step (lower_order_final).
      const int order = static_cast<int>(std::min<int64_t>({2, N - i, i + 1}));
      last_sample = x;
      x = unipc_predict(x, m_prev, m_prev2, i >= 1 ? sig[iu - 1] : 0.0, sig[iu], sig[iu + 1], order);
      last_order = order;
    }

    if (cuda) torch::cuda::synchronize();
    const double t1 = now_ms();
    info.elapsed_ms = t1 - t0;
    info.total_ms = t1 - t_start;
    if (cfg.progress) bar.update(i + 1, info.total_ms);
    if (after_step) after_step(info);
  }
  if (cfg.progress) bar.finish();
  return x;
}

// --- progress bar ----------------------------------------------------------------

ProgressBar::ProgressBar(int64_t total, std::string label)
    : total_(total), label_(std::move(label)), tty_(stderr_is_tty()) {}

void ProgressBar::update(int64_t done, double elapsed_ms) {
  const double per_it = done > 0 ? elapsed_ms / 1000.0 / static_cast<double>(done) : 0.0;
  const double eta = per_it * static_cast<double>(total_ - done);
  constexpr int kWidth = 24;
  const int fill = total_ > 0 ? static_cast<int>(kWidth * done / total_) : kWidth;
  std::string bar(static_cast<size_t>(fill), '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "%s%s step %lld/%lld [%s] %.2f s/it, elapsed %s, ETA %s%s", tty_ ? "\r" : "", label_.c_str(),
               static_cast<long long>(done), static_cast<long long>(total_), bar.c_str(), per_it,
               clock_str(elapsed_ms / 1000.0).c_str(), clock_str(eta).c_str(), tty_ ? "" : "\n");
  std::fflush(stderr);
  open_ = tty_;
}

void ProgressBar::finish() {
  if (open_) std::fprintf(stderr, "\n");
  open_ = false;
}

// --- attention knobs ------------------------------------------------------------------

Mode AttentionSchedule::mode_at(int64_t step, int64_t layer) const {
  return step < dense_steps || dense_layers.count(layer) ? Mode::Dense : mode;
}

void AttentionSchedule::validate(int64_t num_layers) const {
  if (dense_steps < 0) fail("dense_steps: expected >= 0, got ", dense_steps);
  for (int64_t l : dense_layers)
    if (l < 0 || l >= num_layers) fail("dense_layers: expected layer indices in [0, ", num_layers, "), got ", l);
}

void apply_attention_schedule(WanModel& model, const AttentionSchedule& schedule, int64_t step) {
  const int64_t n = model->config().num_layers;
  schedule.validate(n);
  for (int64_t i = 0; i < n; ++i) model->block(i)->self_attn->config().attn.mode = schedule.mode_at(step, i);
}

void set_attention_mode(WanModel& model, Mode m) {
  for (int64_t i = 0; i < model->config().num_layers; ++i) model->block(i)->self_attn->config().attn.mode = m;
}

std::vector<Mode> attention_modes(WanModel& model) {
  std::vector<Mode> out;
  for (int64_t i = 0; i < model->config().num_layers; ++i)
    out.push_back(model->block(i)->self_attn->config().attn.mode);
  return out;
}

// --- Wan model as a velocity ------------------------------------------------------------

VelocityFn wan_velocity(WanModel model, const at::Tensor& context, const at::Tensor& negative_context, double guidance,
                        bool batch_cfg) {
  const int64_t text_dim = model->config().text_dim;
  auto as_batch = [&](const at::Tensor& c, const char* name) {
    if (!c.defined()) fail(name, ": expected a (Lt, ", text_dim, ") or (1, Lt, ", text_dim, ") tensor, got undefined");
    const at::Tensor c3 = c.dim() == 2 ? c.unsqueeze(0) : c;
    if (c3.dim() != 3 || c3.size(0) != 1 || c3.size(2) != text_dim || c3.size(1) <= 0)
      fail(name, ": expected a (Lt, ", text_dim, ") or (1, Lt, ", text_dim, ") tensor, got shape ",
           shape_str(c.sizes()));
    return c3;
  };
  const at::Tensor cond = as_batch(context, "context");
  const bool guided = guidance != 1.0;
  at::Tensor uncond;
  if (guided) uncond = as_batch(negative_context, "negative_context");
  const int64_t text_len = model->config().text_len;
  // Zero-padding both contexts to one length changes nothing only when the model pads to text_len itself.
  const bool batched =
      guided && batch_cfg &&
      (cond.size(1) == uncond.size(1) || (text_len > 0 && cond.size(1) <= text_len && uncond.size(1) <= text_len));

  return [model, cond, uncond, guided, batched, guidance](const at::Tensor& x, const at::Tensor& t) mutable {
    torch::NoGradGuard ng;
    const bool single = x.dim() == 4;
    const at::Tensor xb = single ? x.unsqueeze(0) : x;
    const int64_t B = xb.size(0);
    auto ctx = [&](const at::Tensor& c) { return c.expand({B, c.size(1), c.size(2)}); };
    at::Tensor v;
    if (!guided) {
      v = model->forward(xb, t, ctx(cond));
    } else if (batched) {
      const int64_t Lt = std::max(cond.size(1), uncond.size(1));
      auto pad = [&](const at::Tensor& c) {
        return c.size(1) == Lt ? ctx(c) : ctx(at::constant_pad_nd(c, {0, 0, 0, Lt - c.size(1)}));
      };
      const at::Tensor both = model->forward(at::cat({xb, xb}), at::cat({t, t}), at::cat({pad(cond), pad(uncond)}));
      v = cfg_combine(both.slice(0, 0, B), both.slice(0, B), guidance);
    } else {
      const at::Tensor vc = model->forward(xb, t, ctx(cond));
      const at::Tensor vu = model->forward(xb, t, ctx(uncond));
      v = cfg_combine(vc, vu, guidance);
    }
    v = v.to(x.device(), at::kFloat);
    return single ? v.squeeze(0) : v;
  };
}

}  // namespace salad
