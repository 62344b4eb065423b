// at::Tensor -> Params, the registered ops (torch.ops.salad.*) and their autograd.
//
//   salad::attention(q, k, v, grid, ...options) -> (o_s, o_l, lse, block_idx, block_cnt)
//   salad::attention_backward(grad_o_s, grad_o_l?, q, k, v, o_s, o_l, lse, block_idx,
//                             block_cnt, ...options, deterministic) -> (dq, dk, dv)
//   salad::select_blocks(q, k, grid, ...) -> (block_idx, block_cnt)
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <execinfo.h>
#include <unistd.h>

#include <csignal>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "salad/kernels.h"
#include "salad/salad.h"

#ifdef SALAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace salad {
namespace {

// Debugging aid: SALAD_SEGV_TRACE=1 prints the native stack of a crash (the
// Python fault handler shows only Python frames) before the default action.
void segv_trace(int sig) {
  void* frames[64];
  const int n = backtrace(frames, 64);
  const char msg[] = "salad: fatal signal, native stack:\n";
  (void)!write(2, msg, sizeof(msg) - 1);
  backtrace_symbols_fd(frames, n, 2);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
[[maybe_unused]] const bool kSegvTrace = [] {
  const char* e = std::getenv("SALAD_SEGV_TRACE");
  if (!e || e[0] != '1') return false;
  // Own signal stack, so a stack overflow is reported too.
  static char alt[1 << 16];
  stack_t ss{};
  ss.ss_sp = alt;
  ss.ss_size = sizeof(alt);
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_handler = segv_trace;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGABRT, &sa, nullptr);
  return true;
}();

// The option arguments every op takes, as owned values (schema order).
struct OpArgs {
  std::vector<int64_t> grid;
  std::string mode = "salad", pattern = "topk";
  int64_t block_q = 128, block_k = 64;
  double keep = 0.1;
  std::vector<int64_t> tile, window{1, 1, 1};
  std::string feature = "relu";
  bool linear_rope = true;
  double eps = 1e-6, scale = 0.0, rope_theta = 10000.0;
  std::string impl = "auto";

  Grid to_grid() const {
    if (grid.size() != 3) fail("grid: expected 3 sizes (F, H, W), got ", grid.size(), " values");
    return {grid[0], grid[1], grid[2]};
  }
  Options to_options() const {
    Options o;
    o.mode = parse_mode(mode);
    o.pattern = parse_pattern(pattern);
    o.block_q = block_q, o.block_k = block_k, o.keep = keep;
    if (!tile.empty()) {
      if (tile.size() != 3) fail("tile: expected [] (raster order) or 3 sizes (ft, ht, wt), got ", tile.size(), " values");
      o.tile_order = true;
      o.tile = {tile[0], tile[1], tile[2]};
    }
    if (window.size() != 3) fail("window: expected 3 radii (wf, wh, ww), got ", window.size(), " values");
    o.window = {window[0], window[1], window[2]};
    o.feature = parse_feature(feature);
    o.linear_rope = linear_rope, o.eps = eps, o.scale = scale, o.rope_theta = rope_theta;
    return o;
  }
  static OpArgs from(const Grid& g, const Options& o, Impl impl) {
    OpArgs a;
    a.grid = {g.f, g.h, g.w};
    a.mode = to_string(o.mode), a.pattern = to_string(o.pattern);
    a.block_q = o.block_q, a.block_k = o.block_k, a.keep = o.keep;
    if (o.tile_order) a.tile = {o.tile.f, o.tile.h, o.tile.w};
    a.window = {o.window.f, o.window.h, o.window.w};
    a.feature = to_string(o.feature);
    a.linear_rope = o.linear_rope, a.eps = o.eps, a.scale = o.scale, a.rope_theta = o.rope_theta;
    a.impl = to_string(impl);
    return a;
  }
};

#define SALAD_OPT_PARAMS                                                                               \
  c10::IntArrayRef grid, c10::string_view mode, c10::string_view pattern, int64_t block_q,            \
      int64_t block_k, double keep, c10::IntArrayRef tile, c10::IntArrayRef window,                    \
      c10::string_view feature, bool linear_rope, double eps, double scale, double rope_theta,        \
      c10::string_view impl
#define SALAD_OPT_NAMES \
  grid, mode, pattern, block_q, block_k, keep, tile, window, feature, linear_rope, eps, scale, rope_theta, impl

OpArgs make_args(SALAD_OPT_PARAMS) {
  OpArgs a;
  a.grid = grid.vec();
  a.mode = std::string(mode), a.pattern = std::string(pattern);
  a.block_q = block_q, a.block_k = block_k, a.keep = keep;
  a.tile = tile.vec(), a.window = window.vec();
  a.feature = std::string(feature);
  a.linear_rope = linear_rope, a.eps = eps, a.scale = scale, a.rope_theta = rope_theta;
  a.impl = std::string(impl);
  return a;
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::F64;
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: fail("dtype: expected float64, float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Shapes, dtypes and devices of q, k, v; returns (B, H, L, D).
std::array<int64_t, 4> check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    if (!ts[i]->defined()) fail(names[i], ": expected a tensor, got an undefined one");
    if (ts[i]->dim() != 4) fail(names[i], ": expected a 4-D tensor (B, H, L, D), got shape ", shape_str(*ts[i]));
  }
  for (int i = 1; i < 3; ++i) {
    if (ts[i]->sizes() != q.sizes())
      fail(names[i], ": expected the shape of q ", shape_str(q), ", got ", shape_str(*ts[i]));
    if (ts[i]->scalar_type() != q.scalar_type())
      fail(names[i], ": expected the dtype of q (", q.scalar_type(), "), got ", ts[i]->scalar_type());
    if (ts[i]->device() != q.device())
      fail(names[i], ": expected the device of q (", q.device(), "), got ", ts[i]->device());
  }
  dtype_of(q);
  return {q.size(0), q.size(1), q.size(2), q.size(3)};
}

at::Tensor channel_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

void set_input(const at::Tensor& t, const void** ptr, int64_t* stride) {
  *ptr = t.data_ptr();
  stride[0] = t.stride(0), stride[1] = t.stride(1), stride[2] = t.stride(2);
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OpArgs& a) {
  auto [B, H, L, D] = check_qkv(q, k, v);
  Params p;
  p.dtype = dtype_of(q);
  p.B = B, p.H = H, p.L = L, p.D = D;
  p.grid = a.to_grid();
  p.opt = a.to_options();
  if (p.grid.f <= 0 || p.grid.h <= 0 || p.grid.w <= 0 || p.grid.size() != L)
    fail("grid: expected positive (F, H, W) with F*H*W equal to the token count L=", L, " of q, got (", p.grid.f,
         ", ", p.grid.h, ", ", p.grid.w, ")");
  validate_options(p.opt, L, D);
  return p;
}

struct Outputs {
  at::Tensor o_s, o_l, lse, idx, cnt;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const { return {o_s, o_l, lse, idx, cnt}; }
};

// token_major: o_s and o_l as (B, H, L, D) views of (B, L, H, D) memory (CUDA kernels only).
Outputs allocate(const Params& p, const at::TensorOptions& like, bool token_major = false) {
  Outputs o;
  const BlockShape bs = p.blocks();
  auto out = [&] {
    return token_major ? at::empty({p.B, p.L, p.H, p.D}, like).transpose(1, 2) : at::empty({p.B, p.H, p.L, p.D}, like);
  };
  o.o_s = out();
  o.o_l = p.opt.mode == Mode::Salad ? out() : at::empty({0}, like);
  o.lse = at::empty({p.B, p.H, p.L}, like.dtype(at::kFloat));
  const bool table = p.opt.mode != Mode::Dense;
  o.idx = at::empty(table ? std::vector<int64_t>{p.B, p.H, bs.n_q, bs.max_k} : std::vector<int64_t>{0},
                    like.dtype(at::kInt));
  o.cnt = at::empty(table ? std::vector<int64_t>{p.B, p.H, bs.n_q} : std::vector<int64_t>{0}, like.dtype(at::kInt));
  // Tests set SALAD_POISON=1 so that an element a kernel forgets to write fails the comparison.
  const bool poison = std::getenv("SALAD_POISON") != nullptr;
  // The CUDA selection kernels write every entry of a row, -1 past its count (select.cu,
  // select_row_*; the window pattern copies whole host tables), so the table needs no fill there
  // (one launch less per forward); the CPU paths get it.
  const bool cuda = like.device().is_cuda();
  if (table && (!cuda || poison)) o.idx.fill_(cuda ? -7 : -1);
  if (poison) {
    o.o_s.fill_(NAN), o.lse.fill_(NAN);
    if (o.o_l.numel()) o.o_l.fill_(NAN);
    if (o.cnt.numel()) o.cnt.fill_(-7);
  }
  return o;
}

void bind_outputs(Params* p, Outputs& o) {
  p->o_s = o.o_s.data_ptr();
  if (!o.o_s.is_contiguous())
    for (int i = 0; i < 3; ++i) p->o_stride[i] = o.o_s.stride(i);
  p->lse = o.lse.data_ptr<float>();
  p->o_l = p->opt.mode == Mode::Salad ? o.o_l.data_ptr() : nullptr;
  p->block_idx = o.idx.numel() ? o.idx.data_ptr<int32_t>() : nullptr;
  p->block_cnt = o.cnt.numel() ? o.cnt.data_ptr<int32_t>() : nullptr;
}

// CPU compute dtype for an input dtype and implementation.
at::ScalarType cpu_compute_type(at::ScalarType in, Impl impl) {
  if (in == at::kDouble) {
    if (impl == Impl::Fast) fail("impl: 'fast' runs float32 only, got float64 inputs (use 'reference' or 'auto')");
    return at::kDouble;
  }
  return at::kFloat;  // float32, and bf16/fp16 upcast
}

void run_forward_cpu(const Params& p, Impl impl) {
  if (p.dtype == DType::F64)
    cpu::reference_forward<double>(p);
  else if (impl == Impl::Reference)
    cpu::reference_forward<float>(p);
  else
    cpu::fast_forward(p);
}

void run_backward_cpu(const BwdParams& p, Impl impl) {
  if (p.dtype == DType::F64)
    cpu::reference_backward<double>(p);
  else if (impl == Impl::Reference)
    cpu::reference_backward<float>(p);
  else
    cpu::fast_backward(p);
}

// bf16 autocast leaves float32 q, k (an RMSNorm with a float32 weight) next to a
// bf16 v. Like the CUDA path, the CPU one takes such a mix of float32, bf16 and
// fp16 (it computes in float32 anyway); other dtype mismatches stay errors.
bool autocast_mix(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  auto mixable = [](const at::Tensor& t) {
    return t.defined() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                           t.scalar_type() == at::kHalf);
  };
  return mixable(q) && mixable(k) && mixable(v) &&
         (k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type());
}

// The dtype q, k, v are validated and computed as.
at::ScalarType cpu_input_type(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return autocast_mix(q, k, v) ? at::kFloat : q.scalar_type();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, SALAD_OPT_PARAMS) {
  const OpArgs a = make_args(SALAD_OPT_NAMES);
  // validate before any conversion
  if (autocast_mix(q_in, k_in, v_in))
    make_params(q_in.to(at::kFloat), k_in.to(at::kFloat), v_in.to(at::kFloat), a);
  else
    make_params(q_in, k_in, v_in, a);
  const Impl im = parse_impl(a.impl);
  const at::ScalarType ct = cpu_compute_type(cpu_input_type(q_in, k_in, v_in), im);
  const at::Tensor q = channel_contiguous(q_in.to(ct)), k = channel_contiguous(k_in.to(ct)),
                   v = channel_contiguous(v_in.to(ct));
  Params p = make_params(q, k, v, a);
  set_input(q, &p.q, p.q_stride), set_input(k, &p.k, p.k_stride), set_input(v, &p.v, p.v_stride);
  Outputs o = allocate(p, q.options());
  bind_outputs(&p, o);
  run_forward_cpu(p, im);
  if (ct != q_in.scalar_type()) {
    o.o_s = o.o_s.to(q_in.scalar_type());
    if (o.o_l.numel()) o.o_l = o.o_l.to(q_in.scalar_type());
    else o.o_l = o.o_l.to(q_in.scalar_type());
  }
  return o.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& go_s, const std::optional<at::Tensor>& go_l, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_s_in, const at::Tensor& o_l_in, const at::Tensor& lse,
    const at::Tensor& idx, const at::Tensor& cnt, SALAD_OPT_PARAMS, bool deterministic) {
  const OpArgs a = make_args(SALAD_OPT_NAMES);
  const Impl im = parse_impl(a.impl);
  const at::ScalarType ct = cpu_compute_type(cpu_input_type(q_in, k_in, v_in), im);
  auto cvt = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  const at::Tensor q = cvt(q_in), k = cvt(k_in), v = cvt(v_in);
  BwdParams p;
  static_cast<Params&>(p) = make_params(q, k, v, a);
  set_input(q, &p.q, p.q_stride), set_input(k, &p.k, p.k_stride), set_input(v, &p.v, p.v_stride);
  const at::Tensor o_s = cvt(o_s_in), g_s = cvt(go_s), lse_c = lse.to(at::kFloat).contiguous();
  const at::Tensor idx_c = idx.contiguous(), cnt_c = cnt.contiguous();
  at::Tensor o_l, g_l;
  if (p.opt.mode == Mode::Salad && go_l.has_value() && go_l->defined() && go_l->numel()) {
    o_l = cvt(o_l_in), g_l = cvt(*go_l);
  }
  p.o_s = const_cast<void*>(o_s.data_ptr());
  p.lse = lse_c.data_ptr<float>();
  p.o_l = o_l.defined() ? o_l.data_ptr() : const_cast<void*>(o_s.data_ptr());
  p.block_idx = idx_c.numel() ? idx_c.data_ptr<int32_t>() : nullptr;
  p.block_cnt = cnt_c.numel() ? cnt_c.data_ptr<int32_t>() : nullptr;
  p.blocks_given = true;
  p.do_s = g_s.data_ptr();
  p.do_l = g_l.defined() ? g_l.data_ptr() : nullptr;
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.deterministic = deterministic;
  run_backward_cpu(p, im);
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> select_cpu(const at::Tensor& q_in, const at::Tensor& k_in, c10::IntArrayRef grid,
                                              c10::string_view pattern, int64_t block_q, int64_t block_k, double keep,
                                              c10::IntArrayRef tile, c10::IntArrayRef window, double scale,
                                              double rope_theta) {
  OpArgs a = make_args(grid, "sparse", pattern, block_q, block_k, keep, tile, window, "relu", true, 1e-6, scale,
                       rope_theta, "auto");
  const at::ScalarType ct = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor q = channel_contiguous(q_in.to(ct)), k = channel_contiguous(k_in.to(ct));
  Params p = make_params(q, k, q, a);
  set_input(q, &p.q, p.q_stride), set_input(k, &p.k, p.k_stride), set_input(q, &p.v, p.v_stride);
  Outputs o = allocate(p, q.options());
  bind_outputs(&p, o);
  cpu::select_blocks(p);
  return {o.idx, o.cnt};
}

#ifdef SALAD_WITH_CUDA
// The CUDA kernels' workspace; under SALAD_POISON every byte is 0xFF (NaN as bf16 / fp16 / fp32, -1 as
// int32), so a temporary that a kernel reads before it is written fails the tests instead of reusing
// a previous call's values from the caching allocator.
at::Tensor workspace(size_t bytes, const at::TensorOptions& like) {
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes) + 1}, like.dtype(at::kByte));
  if (std::getenv("SALAD_POISON")) ws.fill_(255);
  return ws;
}

void check_cuda_dtype(const at::Tensor& q) {
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf)
    fail("dtype: expected bfloat16 or float16 for CUDA tensors, got ", q.scalar_type());
}

// The CUDA kernels run bf16/fp16. float32 inputs (what autocast leaves after an
// RMSNorm with a float32 weight) are rounded to bf16, computed, and the
// outputs returned in float32.
at::Tensor lowp(const at::Tensor& t) {
  return t.defined() && t.scalar_type() == at::kFloat ? t.to(at::kBFloat16) : t;
}
at::Tensor like_input(const at::Tensor& t, const at::Tensor& in) {
  return t.defined() && in.scalar_type() == at::kFloat ? t.to(at::kFloat) : t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cuda_run(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const OpArgs& a, bool token_major) {
  make_params(q_in, k_in, v_in, a);
  check_cuda_dtype(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = channel_contiguous(q_in), k = channel_contiguous(k_in), v = channel_contiguous(v_in);
  Params p = make_params(q, k, v, a);
  set_input(q, &p.q, p.q_stride), set_input(k, &p.k, p.k_stride), set_input(v, &p.v, p.v_stride);
  Outputs o = allocate(p, q.options(), token_major);
  bind_outputs(&p, o);
  at::Tensor ws = workspace(cuda::forward_workspace_bytes(p), q.options());
  cuda::forward(p, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream());
  return o.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cuda_lowp(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, SALAD_OPT_PARAMS) {
  return attention_cuda_run(q_in, k_in, v_in, make_args(SALAD_OPT_NAMES), false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda_lowp(
    const at::Tensor& go_s, const std::optional<at::Tensor>& go_l, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_s, const at::Tensor& o_l, const at::Tensor& lse,
    const at::Tensor& idx, const at::Tensor& cnt, SALAD_OPT_PARAMS, bool deterministic) {
  const OpArgs a = make_args(SALAD_OPT_NAMES);
  check_cuda_dtype(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = channel_contiguous(q_in), k = channel_contiguous(k_in), v = channel_contiguous(v_in);
  BwdParams p;
  static_cast<Params&>(p) = make_params(q, k, v, a);
  set_input(q, &p.q, p.q_stride), set_input(k, &p.k, p.k_stride), set_input(v, &p.v, p.v_stride);
  const at::Tensor os = o_s.contiguous(), gs = go_s.contiguous(), lc = lse.contiguous();
  const at::Tensor ic = idx.contiguous(), cc = cnt.contiguous();
  at::Tensor ol, gl;
  if (p.opt.mode == Mode::Salad && go_l.has_value() && go_l->defined() && go_l->numel())
    ol = o_l.contiguous(), gl = go_l->contiguous();
  p.o_s = const_cast<void*>(os.data_ptr());
  p.lse = lc.data_ptr<float>();
  p.o_l = ol.defined() ? ol.data_ptr() : const_cast<void*>(os.data_ptr());
  p.block_idx = ic.numel() ? ic.data_ptr<int32_t>() : nullptr;
  p.block_cnt = cc.numel() ? cc.data_ptr<int32_t>() : nullptr;
  p.blocks_given = true;
  p.do_s = gs.data_ptr();
  p.do_l = gl.defined() ? gl.data_ptr() : nullptr;
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous), dk = at::empty_like(k, at::MemoryFormat::Contiguous),
             dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.deterministic = deterministic;
  at::Tensor ws = workspace(cuda::backward_workspace_bytes(p), q.options());
  cuda::backward(p, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream());
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, SALAD_OPT_PARAMS) {
  auto [o_s, o_l, lse, idx, cnt] = attention_cuda_lowp(lowp(q), lowp(k), lowp(v), SALAD_OPT_NAMES);
  const bool f32 = q.scalar_type() == at::kFloat;
  return {f32 ? o_s.to(at::kFloat) : o_s, f32 ? o_l.to(at::kFloat) : o_l, lse, idx, cnt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& go_s, const std::optional<at::Tensor>& go_l, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o_s, const at::Tensor& o_l, const at::Tensor& lse, const at::Tensor& idx,
    const at::Tensor& cnt, SALAD_OPT_PARAMS, bool deterministic) {
  std::optional<at::Tensor> gl;
  if (go_l.has_value() && go_l->defined()) gl = lowp(*go_l);
  auto [dq, dk, dv] = backward_cuda_lowp(lowp(go_s), gl, lowp(q), lowp(k), lowp(v), lowp(o_s), lowp(o_l), lse, idx, cnt,
                                         SALAD_OPT_NAMES, deterministic);
  return {like_input(dq, q), like_input(dk, k), like_input(dv, v)};
}

std::tuple<at::Tensor, at::Tensor> select_cuda(const at::Tensor& q_in0, const at::Tensor& k_in0, c10::IntArrayRef grid,
                                               c10::string_view pattern, int64_t block_q, int64_t block_k, double keep,
                                               c10::IntArrayRef tile, c10::IntArrayRef window, double scale,
                                               double rope_theta) {
  const at::Tensor q_in = lowp(q_in0), k_in = lowp(k_in0);
  OpArgs a = make_args(grid, "sparse", pattern, block_q, block_k, keep, tile, window, "relu", true, 1e-6, scale,
                       rope_theta, "auto");
  check_cuda_dtype(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = channel_contiguous(q_in), k = channel_contiguous(k_in);
  Params p = make_params(q, k, q, a);
  set_input(q, &p.q, p.q_stride), set_input(k, &p.k, p.k_stride), set_input(q, &p.v, p.v_stride);
  Outputs o = allocate(p, q.options());
  bind_outputs(&p, o);
  at::Tensor ws = workspace(cuda::forward_workspace_bytes(p), q.options());
  cuda::select_blocks(p, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream());
  return {o.idx, o.cnt};
}
#endif

// Meta (shape-only) kernels so torch.compile / FakeTensor can trace the ops.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, SALAD_OPT_PARAMS) {
  const OpArgs a = make_args(SALAD_OPT_NAMES);
  Params p = make_params(q, k, v, a);
  Outputs o = allocate(p, q.options());
  return o.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, SALAD_OPT_PARAMS,
    bool) {
  return {at::empty_like(q, at::MemoryFormat::Contiguous), at::empty_like(k, at::MemoryFormat::Contiguous),
          at::empty_like(v, at::MemoryFormat::Contiguous)};
}

std::tuple<at::Tensor, at::Tensor> select_meta(const at::Tensor& q, const at::Tensor& k, c10::IntArrayRef grid,
                                               c10::string_view pattern, int64_t block_q, int64_t block_k, double keep,
                                               c10::IntArrayRef tile, c10::IntArrayRef window, double scale,
                                               double rope_theta) {
  OpArgs a = make_args(grid, "sparse", pattern, block_q, block_k, keep, tile, window, "relu", true, 1e-6, scale,
                       rope_theta, "auto");
  Params p = make_params(q, k, q, a);
  Outputs o = allocate(p, q.options());
  return {o.idx, o.cnt};
}

// Autograd --------------------------------------------------------------------

using AttentionSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::string_view, c10::string_view,
    int64_t, int64_t, double, c10::IntArrayRef, c10::IntArrayRef, c10::string_view, bool, double, double, double,
    c10::string_view);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
    c10::string_view, c10::string_view, int64_t, int64_t, double, c10::IntArrayRef, c10::IntArrayRef, c10::string_view,
    bool, double, double, double, c10::string_view, bool);

auto call_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OpArgs& a) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("salad::attention", "").typed<AttentionSig>();
  return op.call(q, k, v, a.grid, a.mode, a.pattern, a.block_q, a.block_k, a.keep, a.tile, a.window, a.feature,
                 a.linear_rope, a.eps, a.scale, a.rope_theta, a.impl);
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, const OpArgs& a) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [o_s, o_l, lse, idx, cnt] = call_attention(q, k, v, a);
    ctx->save_for_backward({q, k, v, o_s, o_l, lse, idx, cnt});
    save_args(ctx, a);
    ctx->mark_non_differentiable({lse, idx, cnt});
    // Undefined incoming gradients stay undefined (backward treats them as zero): otherwise autograd
    // fills zeros for lse, idx and cnt (three launches per CUDA backward) and for an unused o_l.
    ctx->set_materialize_grads(false);
    return {o_s, o_l, lse, idx, cnt};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("salad::attention_backward", "").typed<BackwardSig>();
    const auto saved = ctx->get_saved_variables();
    const OpArgs a = load_args(ctx);
    at::Tensor g_s = grads[0].defined() ? grads[0] : at::zeros_like(saved[3]);
    std::optional<at::Tensor> g_l;
    if (grads[1].defined() && grads[1].numel()) g_l = grads[1];
    auto [dq, dk, dv] = op.call(g_s, g_l, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                                saved[7], a.grid, a.mode, a.pattern, a.block_q, a.block_k, a.keep, a.tile, a.window,
                                a.feature, a.linear_rope, a.eps, a.scale, a.rope_theta, a.impl, false);
    return {dq, dk, dv, at::Tensor()};
  }

 private:
  static void save_args(torch::autograd::AutogradContext* ctx, const OpArgs& a) {
    auto& d = ctx->saved_data;
    d["grid"] = a.grid, d["mode"] = a.mode, d["pattern"] = a.pattern, d["block_q"] = a.block_q;
    d["block_k"] = a.block_k, d["keep"] = a.keep, d["tile"] = a.tile, d["window"] = a.window;
    d["feature"] = a.feature, d["linear_rope"] = a.linear_rope, d["eps"] = a.eps, d["scale"] = a.scale;
    d["rope_theta"] = a.rope_theta, d["impl"] = a.impl;
  }
  static OpArgs load_args(torch::autograd::AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    OpArgs a;
    a.grid = d["grid"].toIntVector(), a.mode = d["mode"].toStringRef(), a.pattern = d["pattern"].toStringRef();
    a.block_q = d["block_q"].toInt(), a.block_k = d["block_k"].toInt(), a.keep = d["keep"].toDouble();
    a.tile = d["tile"].toIntVector(), a.window = d["window"].toIntVector(), a.feature = d["feature"].toStringRef();
    a.linear_rope = d["linear_rope"].toBool(), a.eps = d["eps"].toDouble(), a.scale = d["scale"].toDouble();
    a.rope_theta = d["rope_theta"].toDouble(), a.impl = d["impl"].toStringRef();
    return a;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, SALAD_OPT_PARAMS) {
  auto outs = AttentionFunction::apply(q, k, v, make_args(SALAD_OPT_NAMES));
  return {outs[0], outs[1], outs[2], outs[3], outs[4]};
}

// Kernels and checks throw salad::ArgumentError; at the dispatcher boundary it
// becomes c10::ValueError (Python: ValueError), which crosses into Python the
// way torch's own errors do whatever compiler built this library (a plain
// std::exception from a gcc-13 build crashed the pip torch's Python binding).
template <auto Fn>
struct Translated;
template <class R, class... A, R (*Fn)(A...)>
struct Translated<Fn> {
  static R call(A... a) {
    try {
      return Fn(std::forward<A>(a)...);
    } catch (const ArgumentError& e) {
      C10_THROW_ERROR(ValueError, e.what());
    }
  }
};

#define SALAD_OPT_SCHEMA_DEFAULTS                                                                          \
  "int[] grid, str mode=\"salad\", str pattern=\"topk\", int block_q=128, int block_k=64, float keep=0.1, " \
  "int[] tile=[], int[] window=[1,1,1], str feature=\"relu\", bool linear_rope=True, float eps=1e-6, "      \
  "float scale=0.0, float rope_theta=10000.0, str impl=\"auto\""
#define SALAD_OPT_SCHEMA                                                                                    \
  "int[] grid, str mode, str pattern, int block_q, int block_k, float keep, int[] tile, int[] window, "      \
  "str feature, bool linear_rope, float eps, float scale, float rope_theta, str impl"

}  // namespace

const char* to_string(Impl i) {
  switch (i) {
    case Impl::Auto: return "auto";
    case Impl::Reference: return "reference";
    case Impl::Fast: return "fast";
  }
  return "?";
}
Impl parse_impl(const std::string& s) {
  if (s == "auto") return Impl::Auto;
  if (s == "reference") return Impl::Reference;
  if (s == "fast") return Impl::Fast;
  fail("impl: expected one of auto|reference|fast, got '", s, "'");
}

bool cuda_kernels_compiled() { return cuda::compiled(); }

AttentionOutput attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Grid& grid,
                          const Options& opt, Impl impl, bool token_major) {
  const OpArgs a = OpArgs::from(grid, opt, impl);
#ifdef SALAD_WITH_CUDA
  // Outputs in (B, L, H, D) memory: straight to the CUDA kernels (no autograd needed, so the
  // dispatcher's autograd kernel has nothing to record).
  const bool needs_grad =
      at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (token_major && q.is_cuda() && !needs_grad && q.scalar_type() != at::kFloat) {
    auto [o_s, o_l, lse, idx, cnt] = attention_cuda_run(q, k, v, a, true);
    return {o_s, o_l, lse, idx, cnt};
  }
#endif
  auto [o_s, o_l, lse, idx, cnt] = call_attention(q, k, v, a);
  return {o_s, o_l, lse, idx, cnt};
}

std::pair<at::Tensor, at::Tensor> select_blocks(const at::Tensor& q, const at::Tensor& k, const Grid& grid,
                                                const Options& opt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("salad::select_blocks", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::string_view, int64_t, int64_t,
                           double, c10::IntArrayRef, c10::IntArrayRef, double, double)>();
  const OpArgs a = OpArgs::from(grid, opt, Impl::Auto);
  auto [idx, cnt] = op.call(q, k, a.grid, a.pattern, a.block_q, a.block_k, a.keep, a.tile, a.window, a.scale,
                            a.rope_theta);
  return {idx, cnt};
}

}  // namespace salad

TORCH_LIBRARY(salad, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, " SALAD_OPT_SCHEMA_DEFAULTS
        ") -> (Tensor o_s, Tensor o_l, Tensor lse, Tensor block_idx, Tensor block_cnt)");
  m.def("attention_backward(Tensor grad_o_s, Tensor? grad_o_l, Tensor q, Tensor k, Tensor v, Tensor o_s, "
        "Tensor o_l, Tensor lse, Tensor block_idx, Tensor block_cnt, " SALAD_OPT_SCHEMA
        ", bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("select_blocks(Tensor q, Tensor k, int[] grid, str pattern=\"topk\", int block_q=128, int block_k=64, "
        "float keep=0.1, int[] tile=[], int[] window=[1,1,1], float scale=0.0, float rope_theta=10000.0) "
        "-> (Tensor block_idx, Tensor block_cnt)");
}

TORCH_LIBRARY_IMPL(salad, CPU, m) {
  m.impl("attention", &salad::Translated<&salad::attention_cpu>::call);
  m.impl("attention_backward", &salad::Translated<&salad::backward_cpu>::call);
  m.impl("select_blocks", &salad::Translated<&salad::select_cpu>::call);
}

TORCH_LIBRARY_IMPL(salad, Meta, m) {
  m.impl("attention", &salad::Translated<&salad::attention_meta>::call);
  m.impl("attention_backward", &salad::Translated<&salad::backward_meta>::call);
  m.impl("select_blocks", &salad::Translated<&salad::select_meta>::call);
}

TORCH_LIBRARY_IMPL(salad, Autograd, m) { m.impl("attention", &salad::Translated<&salad::attention_autograd>::call); }

#ifdef SALAD_WITH_CUDA
TORCH_LIBRARY_IMPL(salad, CUDA, m) {
  m.impl("attention", &salad::Translated<&salad::attention_cuda>::call);
  m.impl("attention_backward", &salad::Translated<&salad::backward_cuda>::call);
  m.impl("select_blocks", &salad::Translated<&salad::select_cuda>::call);
}
#endif
