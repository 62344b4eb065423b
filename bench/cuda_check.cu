// Validate-then-benchmark harness for the CUDA kernels (torch-free).
//
// 1. Correctness: for a table of cases (mode, pattern, feature map, linear
//    rope, D, token order, partial blocks, B=2 H=3, strided inputs) draws fresh
//    random inputs, poisons every output, runs salad::cuda::forward/backward
//    and compares with the float64 CPU reference (salad::cpu::reference_*),
//    which is given the GPU's block table (the table itself is compared with
//    the CPU selection separately). Rule (FlashAttention's): max error <=
//    2 x the error of the same math done naively in the low precision (see
//    naive_attention; never less than the float32 reference rounded to the low
//    precision), plus a small floor (1e-3 of the reference's max magnitude).
// 2. Benchmark: Wan shapes (bf16, B=1, keep 0.10), median of event timings;
//    prints a table last, with our dense kernel as the in-run baseline.
//
// Usage: cuda_check [--no-bench] [--no-check] [--no-dense] [--fwd-only] [--reps N]
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "salad/kernels.h"
#include "salad/layout.h"
#include "salad/params.h"
#include "../src/kernels/cpu/common.h"  // cpu::RopeTable for the naive low-precision baseline
#include "../src/kernels/cuda/attn_bwd_sm90.cuh"  // backward dq / dkv kernels alone
#include "../src/kernels/cuda/internal.cuh"  // attention kernel alone (launch_attn_fwd) for kernel-only timings

using namespace salad;

#define CK(x)                                                                                \
  do {                                                                                       \
    cudaError_t e_ = (x);                                                                    \
    if (e_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #x, __FILE__, __LINE__,          \
                   cudaGetErrorString(e_));                                                  \
      std::exit(2);                                                                          \
    }                                                                                        \
  } while (0)

namespace {

uint16_t to_low(float x, DType t) {
  if (t == DType::BF16) {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
  __half h = __float2half_rn(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float from_low(uint16_t u, DType t) {
  if (t == DType::BF16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &u, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &u, 2);
  return __half2float(h);
}

struct Case {
  std::string name;
  Mode mode = Mode::Sparse;
  Pattern pattern = Pattern::TopK;
  FeatureMap feature = FeatureMap::Relu;
  bool linear_rope = true;
  int64_t D = 128;
  Grid grid{5, 9, 17};
  int64_t block_q = 128, block_k = 64;
  double keep = 0.25;
  bool tile_order = false;
  Extent3 tile{1, 4, 4};
  Extent3 window{1, 1, 1};
  DType dtype = DType::BF16;
};

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { CK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  void poison() { CK(cudaMemset(p, 0xff, n * sizeof(T))); }  // NaN for floats / bf16, -1 for ints
  void up(const std::vector<T>& h) { CK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> down() const {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

struct Err {
  double err = 0, naive = 0, ref_max = 0, rel_l2 = 0;
  bool finite = true;
  double bound() const { return 2 * naive + 1e-3 * ref_max; }
  bool ok() const { return finite && err <= bound(); }
};

// gpu: low-precision values, ref: float64, ref32: float32 reference (naive baseline).
Err compare(const std::vector<uint16_t>& gpu, const std::vector<double>& ref, const std::vector<float>& ref32,
            DType t) {
  Err e;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double g = from_low(gpu[i], t);
    if (!std::isfinite(g)) e.finite = false;
    e.err = std::max(e.err, std::fabs(g - ref[i]));
    e.naive = std::max(e.naive, std::fabs(double(from_low(to_low(ref32[i], t), t)) - ref[i]));
    e.ref_max = std::max(e.ref_max, std::fabs(ref[i]));
    num += (g - ref[i]) * (g - ref[i]);
    den += ref[i] * ref[i];
  }
  e.rel_l2 = std::sqrt(num / std::max(den, 1e-300));
  return e;
}
Err compare_f(const std::vector<float>& gpu, const std::vector<double>& ref, const std::vector<float>& ref32) {
  Err e;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double g = gpu[i];
    if (!std::isfinite(g)) e.finite = false;
    e.err = std::max(e.err, std::fabs(g - ref[i]));
    e.naive = std::max(e.naive, std::fabs(double(ref32[i]) - ref[i]));
    e.ref_max = std::max(e.ref_max, std::fabs(ref[i]));
    num += (g - ref[i]) * (g - ref[i]);
    den += ref[i] * ref[i];
  }
  e.rel_l2 = std::sqrt(num / std::max(den, 1e-300));
  return e;
}

// "Same math in low precision, naively" (the FlashAttention test baseline): the
// attention of one (b, h) as a framework would run it in bf16/fp16 -- rotated
// q/k, scores, probabilities, outputs and every gradient matmul rounded to the
// low precision, accumulations in float. Returns o_s and unrounded sparse grads.
struct Naive {
  std::vector<double> os, dq, dk, dv;  // (B, H, L, D) contiguous; grads before the final rounding
};
Naive naive_attention(const Params& p, const std::vector<float>& q, const std::vector<float>& k,
                      const std::vector<float>& v, const std::vector<float>& dout, const int32_t* idx,
                      const int32_t* cnt) {
  const DType t = p.dtype;
  auto rd = [t](double x) { return double(from_low(to_low(float(x), t), t)); };
  const int64_t L = p.L, D = p.D, B = p.B, H = p.H;
  const BlockShape bs = p.blocks();
  const cpu::RopeTable rope(p.grid, D, p.opt.rope_theta);
  const std::vector<int64_t> order = token_order(p.grid, p.opt);
  std::vector<int64_t> pos_of(L);
  for (int64_t i = 0; i < L; ++i) pos_of[order[i]] = i;
  const double scale = p.softmax_scale();
  Naive n;
  n.os.assign(B * H * L * D, 0), n.dq = n.os, n.dk = n.os, n.dv = n.os;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      std::vector<double> qr(L * D), kr(L * D), vv(L * D), go(L * D);
      for (int64_t tk = 0; tk < L; ++tk) {
        for (int64_t d = 0; d < D; ++d) {
          const int64_t in = b * p.q_stride[0] + h * p.q_stride[1] + tk * p.q_stride[2] + d;
          qr[tk * D + d] = q[in], kr[tk * D + d] = k[in], vv[tk * D + d] = v[in];
          go[tk * D + d] = dout[(bh * L + tk) * D + d];
        }
        rope.apply(tk, &qr[tk * D]);
        rope.apply(tk, &kr[tk * D]);
        for (int64_t d = 0; d < D; ++d) qr[tk * D + d] = rd(qr[tk * D + d]), kr[tk * D + d] = rd(kr[tk * D + d]);
      }
      std::vector<double> dqr(L * D, 0), dkr(L * D, 0), dvv(L * D, 0);
      for (int64_t tq = 0; tq < L; ++tq) {
        std::vector<int64_t> keys;
        if (p.opt.mode == Mode::Dense) {
          for (int64_t j = 0; j < L; ++j) keys.push_back(j);
        } else {
          const int64_t i = pos_of[tq] / p.opt.block_q;
          const int32_t* row = idx + (bh * bs.n_q + i) * bs.max_k;
          for (int32_t c = 0; c < cnt[bh * bs.n_q + i]; ++c)
            for (int64_t kp = row[c] * p.opt.block_k; kp < std::min(L, (row[c] + 1) * p.opt.block_k); ++kp)
              keys.push_back(order[kp]);
        }
        std::vector<double> s(keys.size()), P(keys.size());
        double mx = -1e300, sum = 0;
        for (size_t a = 0; a < keys.size(); ++a) {
          double d0 = 0;
          for (int64_t d = 0; d < D; ++d) d0 += qr[tq * D + d] * kr[keys[a] * D + d];
          s[a] = rd(rd(d0) * scale);
          mx = std::max(mx, s[a]);
        }
        for (size_t a = 0; a < keys.size(); ++a) sum += std::exp(s[a] - mx);
        for (size_t a = 0; a < keys.size(); ++a) P[a] = rd(std::exp(s[a] - mx) / sum);
        double* o = &n.os[(bh * L + tq) * D];
        for (size_t a = 0; a < keys.size(); ++a)
          for (int64_t d = 0; d < D; ++d) o[d] += P[a] * vv[keys[a] * D + d];
        for (int64_t d = 0; d < D; ++d) o[d] = rd(o[d]);
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += go[tq * D + d] * o[d];
        delta = rd(delta);
        for (size_t a = 0; a < keys.size(); ++a) {
          const int64_t j = keys[a];
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += go[tq * D + d] * vv[j * D + d];
          const double ds = rd(P[a] * (rd(dp) - delta));
          for (int64_t d = 0; d < D; ++d) {
            dvv[j * D + d] += P[a] * go[tq * D + d];
            dqr[tq * D + d] += ds * kr[j * D + d];
            dkr[j * D + d] += ds * qr[tq * D + d];
          }
        }
      }
      for (int64_t tk = 0; tk < L; ++tk) {
        for (int64_t d = 0; d < D; ++d) {
          dqr[tk * D + d] = rd(rd(dqr[tk * D + d]) * scale);
          dkr[tk * D + d] = rd(rd(dkr[tk * D + d]) * scale);
        }
        rope.apply(tk, &dqr[tk * D], true);
        rope.apply(tk, &dkr[tk * D], true);
        for (int64_t d = 0; d < D; ++d) {
          n.dq[(bh * L + tk) * D + d] = dqr[tk * D + d];
          n.dk[(bh * L + tk) * D + d] = dkr[tk * D + d];
          n.dv[(bh * L + tk) * D + d] = dvv[tk * D + d];
        }
      }
    }
  return n;
}

// Error of the naive low-precision result `nv` (+ `extra`, the float64 linear-branch part) against ref.
double naive_err(const std::vector<double>& nv, const std::vector<double>* extra, const std::vector<double>& ref,
                 DType t) {
  double e = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double x = nv[i] + (extra ? (*extra)[i] : 0.0);
    x = from_low(to_low(float(x), t), t);
    e = std::max(e, std::fabs(x - ref[i]));
  }
  return e;
}

Options make_opt(const Case& c) {
  Options o;
  o.mode = c.mode;
  o.pattern = c.pattern;
  o.feature = c.feature;
  o.linear_rope = c.linear_rope;
  o.block_q = c.block_q;
  o.block_k = c.block_k;
  o.keep = c.keep;
  o.tile_order = c.tile_order;
  o.tile = c.tile;
  o.window = c.window;
  return o;
}

bool report(const char* what, const Err& e) {
  bool ok = e.ok();
  std::printf("    %-6s err %.3e  bound %.3e (naive %.3e)  rel_l2 %.2e  %s\n", what, e.err, e.bound(), e.naive,
              e.rel_l2, ok ? "ok" : "FAIL");
  return ok;
}

bool run_case(const Case& c, std::mt19937_64& rng) {
  const int64_t B = 2, H = 3, D = c.D, L = c.grid.size();
  std::printf("[%s] mode=%s pattern=%s feature=%s rope=%d D=%ld L=%ld bq=%ld bk=%ld tile_order=%d %s\n",
              c.name.c_str(), to_string(c.mode), to_string(c.pattern), to_string(c.feature), c.linear_rope, (long)D,
              (long)L, (long)c.block_q, (long)c.block_k, c.tile_order, to_string(c.dtype));
  // Inputs stored (B, L, H, D) (strided as seen by the operator).
  const size_t N = B * H * L * D;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> hq(N), hk(N), hv(N), hdo(N), hdl(N);
  for (auto* v : {&hq, &hk, &hv})
    for (auto& x : *v) x = to_low(nd(rng), c.dtype);
  for (auto* v : {&hdo, &hdl})
    for (auto& x : *v) x = to_low(nd(rng), c.dtype);
  int64_t st[3] = {L * H * D, D, H * D};

  Params p;
  p.dtype = c.dtype;
  p.B = B, p.H = H, p.L = L, p.D = D;
  p.grid = c.grid;
  p.opt = make_opt(c);
  for (int i = 0; i < 3; ++i) p.q_stride[i] = p.k_stride[i] = p.v_stride[i] = st[i];
  const BlockShape bs = p.blocks();
  const size_t ntab = std::max<int64_t>(1, B * H * bs.n_q * bs.max_k), ncnt = std::max<int64_t>(1, B * H * bs.n_q);

  Dev<uint16_t> dq_in(N), dk_in(N), dv_in(N), d_os(N), d_ol(N), d_do(N), d_dl(N), d_dq(N), d_dk(N), d_dv(N);
  Dev<float> d_lse(B * H * L);
  Dev<int32_t> d_idx(ntab), d_cnt(ncnt);
  dq_in.up(hq), dk_in.up(hk), dv_in.up(hv), d_do.up(hdo), d_dl.up(hdl);
  for (auto* d : {&d_os, &d_ol, &d_dq, &d_dk, &d_dv}) d->poison();
  d_lse.poison(), d_idx.poison(), d_cnt.poison();
  p.q = dq_in.p, p.k = dk_in.p, p.v = dv_in.p;
  p.o_s = d_os.p, p.lse = d_lse.p, p.o_l = c.mode == Mode::Salad ? d_ol.p : nullptr;
  p.block_idx = c.mode == Mode::Dense ? nullptr : d_idx.p;
  p.block_cnt = c.mode == Mode::Dense ? nullptr : d_cnt.p;

  BwdParams bp;
  static_cast<Params&>(bp) = p;
  bp.blocks_given = true;
  bp.do_s = d_do.p;
  bp.do_l = c.mode == Mode::Salad ? d_dl.p : nullptr;
  bp.dq = d_dq.p, bp.dk = d_dk.p, bp.dv = d_dv.p;
  size_t wsb = std::max(cuda::forward_workspace_bytes(p), cuda::backward_workspace_bytes(bp));
  Dev<char> ws(wsb);
  try {
    cuda::forward(p, ws.p, nullptr);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    cuda::backward(bp, ws.p, nullptr);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
  } catch (const std::exception& ex) {
    std::printf("    EXCEPTION %s\n", ex.what());
    return false;
  }
  std::vector<uint16_t> g_os = d_os.down(), g_ol = d_ol.down(), g_dq = d_dq.down(), g_dk = d_dk.down(),
                        g_dv = d_dv.down();
  std::vector<float> g_lse = d_lse.down();
  {  // the backward owns every output row in one CTA (no atomics): a rerun must be bitwise equal
    bool same = true;
    try {
      cuda::backward(bp, ws.p, nullptr);
      CK(cudaDeviceSynchronize());
    } catch (const std::exception& ex) {
      std::printf("    EXCEPTION %s\n", ex.what());
      return false;
    }
    same = d_dq.down() == g_dq && d_dk.down() == g_dk && d_dv.down() == g_dv;
    std::printf("    bwd rerun bitwise identical: %s\n", same ? "ok" : "FAIL");
    if (!same) return false;
  }
  std::vector<int32_t> g_idx = d_idx.down(), g_cnt = d_cnt.down();

  // ---- CPU references (float64 and float32) on the same (rounded) inputs
  std::vector<double> q64(N), k64(N), v64(N), do64(N), dl64(N);
  std::vector<float> q32(N), k32(N), v32(N), do32(N), dl32(N);
  for (size_t i = 0; i < N; ++i) {
    q32[i] = from_low(hq[i], c.dtype), k32[i] = from_low(hk[i], c.dtype), v32[i] = from_low(hv[i], c.dtype);
    do32[i] = from_low(hdo[i], c.dtype), dl32[i] = from_low(hdl[i], c.dtype);
    q64[i] = q32[i], k64[i] = k32[i], v64[i] = v32[i], do64[i] = do32[i], dl64[i] = dl32[i];
  }
  bool ok = true;
  // Block table vs CPU selection (float64).
  if (c.mode != Mode::Dense) {
    Params sp = p;
    sp.dtype = DType::F64;
    sp.q = q64.data(), sp.k = k64.data(), sp.v = v64.data();
    std::vector<int32_t> cidx(ntab, -1), ccnt(ncnt, 0);
    sp.block_idx = cidx.data(), sp.block_cnt = ccnt.data();
    cpu::select_blocks(sp);
    int64_t bad = 0;
    for (int64_t r = 0; r < B * H * bs.n_q; ++r) {
      bool same = ccnt[r] == g_cnt[r];
      for (int64_t j = 0; same && j < ccnt[r]; ++j) same = cidx[r * bs.max_k + j] == g_idx[r * bs.max_k + j];
      bad += !same;
    }
    std::printf("    table  %ld / %ld rows differ from the CPU selection  %s\n", (long)bad,
                (long)(B * H * bs.n_q), bad == 0 ? "ok" : "FAIL");
    ok &= bad == 0;
  }
  auto run_ref = [&](auto tag, std::vector<decltype(tag)>& qq, std::vector<decltype(tag)>& kk,
                     std::vector<decltype(tag)>& vv, std::vector<decltype(tag)>& dd, std::vector<decltype(tag)>& dl,
                     std::vector<decltype(tag)>& os, std::vector<decltype(tag)>& ol, std::vector<float>& lse,
                     std::vector<decltype(tag)>& gq, std::vector<decltype(tag)>& gk, std::vector<decltype(tag)>& gv) {
    using T = decltype(tag);
    Params rp = p;
    rp.dtype = sizeof(T) == 8 ? DType::F64 : DType::F32;
    rp.q = qq.data(), rp.k = kk.data(), rp.v = vv.data();
    os.assign(N, 0), ol.assign(N, 0), lse.assign(B * H * L, 0);
    rp.o_s = os.data(), rp.lse = lse.data(), rp.o_l = c.mode == Mode::Salad ? ol.data() : nullptr;
    rp.blocks_given = true;  // the GPU's table
    rp.block_idx = c.mode == Mode::Dense ? nullptr : g_idx.data();
    rp.block_cnt = c.mode == Mode::Dense ? nullptr : g_cnt.data();
    cpu::reference_forward<T>(rp);
    BwdParams rb;
    static_cast<Params&>(rb) = rp;
    rb.do_s = dd.data();
    rb.do_l = c.mode == Mode::Salad ? dl.data() : nullptr;
    gq.assign(N, 0), gk.assign(N, 0), gv.assign(N, 0);
    rb.dq = gq.data(), rb.dk = gk.data(), rb.dv = gv.data();
    cpu::reference_backward<T>(rb);
  };
  std::vector<double> os64, ol64, gq64, gk64, gv64;
  std::vector<float> os32, ol32, gq32, gk32, gv32, lse64f, lse32;
  run_ref(double(0), q64, k64, v64, do64, dl64, os64, ol64, lse64f, gq64, gk64, gv64);
  run_ref(float(0), q32, k32, v32, do32, dl32, os32, ol32, lse32, gq32, gk32, gv32);
  // Naive low-precision baseline of the attention part; in mode salad the gradients'
  // linear-branch part is taken from float64 (reference in mode sparse, same table).
  Naive nv = naive_attention(p, q32, k32, v32, do32, g_idx.data(), g_cnt.data());
  std::vector<double> lin_q, lin_k, lin_v;
  if (c.mode == Mode::Salad) {
    std::vector<double> a, bb, gq, gk, gv;
    std::vector<float> l;
    Params saved = p;
    p.opt.mode = Mode::Sparse;
    run_ref(double(0), q64, k64, v64, do64, dl64, a, bb, l, gq, gk, gv);
    p = saved;
    lin_q.resize(N), lin_k.resize(N), lin_v.resize(N);
    for (size_t i = 0; i < N; ++i) lin_q[i] = gq64[i] - gq[i], lin_k[i] = gk64[i] - gk[i], lin_v[i] = gv64[i] - gv[i];
  }
  const bool sal = c.mode == Mode::Salad;
  auto with_naive = [&](Err e, double ne) {
    e.naive = std::max(e.naive, ne);
    return e;
  };
  ok &= report("o_s", with_naive(compare(g_os, os64, os32, c.dtype), naive_err(nv.os, nullptr, os64, c.dtype)));
  {
    std::vector<double> l64(lse64f.begin(), lse64f.end());
    Err e = compare_f(g_lse, l64, lse32);
    e.naive = std::max(e.naive, 1e-6 * e.ref_max);  // float32 output: naive is float32 rounding
    ok &= report("lse", e);
  }
  if (c.mode == Mode::Salad) ok &= report("o_l", compare(g_ol, ol64, ol32, c.dtype));
  ok &= report("dq", with_naive(compare(g_dq, gq64, gq32, c.dtype), naive_err(nv.dq, sal ? &lin_q : nullptr, gq64, c.dtype)));
  ok &= report("dk", with_naive(compare(g_dk, gk64, gk32, c.dtype), naive_err(nv.dk, sal ? &lin_k : nullptr, gk64, c.dtype)));
  ok &= report("dv", with_naive(compare(g_dv, gv64, gv32, c.dtype), naive_err(nv.dv, sal ? &lin_v : nullptr, gv64, c.dtype)));
  return ok;
}

// ---------------------------------------------------------------- benchmark
struct Shape {
  const char* name;
  int64_t H;
  Grid grid;
};

float time_ms(const std::function<void()>& f, int reps) {
  f();
  CK(cudaDeviceSynchronize());
  std::vector<float> ts;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  CK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

struct BenchRow {
  std::string shape, what;
  float ms;
  double tflops;
};

// Sparse backward: the sm90 dq and dkv kernels alone (actual GEMM FLOPs: dq 3, dkv 4 matmuls, i.e.
// 1.5x / 2x the forward's), launch_attn_bwd (delta + dq + dkv) sm90 vs mma.sync, the whole backward
// with SALAD_BWD_KERNEL=mma, and (first shape) how far the two backward paths are apart.
void bench_bwd_kernels(const char* shape, const BwdParams& bp, void* ws, double flop, int r, bool compare,
                       const Dev<uint16_t>& gq, const Dev<uint16_t>& gk, const Dev<uint16_t>& gv,
                       std::vector<BenchRow>& rows) {
  namespace dd = salad::cuda::detail;
  void* wsa = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws) + 255) / 256 * 256);
  const dd::Plan pl = dd::make_plan(bp, true);
  const dd::RopeInfo ri = dd::prepare_order_and_rope(bp, pl, wsa, nullptr);
  cuda::backward(bp, ws, nullptr);  // workspace: qr / kr, inverse table, delta
  CK(cudaDeviceSynchronize());
  const char* names[] = {"SALAD_BWD_KERNEL", "SALAD_BWD_DQ_PERSISTENT", "SALAD_BWD_DKV_PERSISTENT"};
  std::string saved[3];
  bool had[3];
  for (int i = 0; i < 3; ++i) {
    const char* e = std::getenv(names[i]);
    had[i] = e != nullptr, saved[i] = e ? e : "";
    unsetenv(names[i]);
  }
  if (dd::try_launch_attn_dq_sm90(bp, pl, ri, wsa, nullptr)) {
    float t = time_ms([&] { dd::try_launch_attn_dq_sm90(bp, pl, ri, wsa, nullptr); }, r);
    rows.push_back({shape, "bwd dq kernel sm90", t, 1.5 * flop / t * 1e-9});
    setenv("SALAD_BWD_DQ_PERSISTENT", "0", 1);
    t = time_ms([&] { dd::try_launch_attn_dq_sm90(bp, pl, ri, wsa, nullptr); }, r);
    rows.push_back({shape, "bwd dq kernel sm90 1CTA/it", t, 1.5 * flop / t * 1e-9});
    unsetenv("SALAD_BWD_DQ_PERSISTENT");
  } else {
    std::printf("[%s] sm90 dq kernel not applicable\n", shape);
  }
  if (dd::try_launch_attn_dkv_sm90(bp, pl, ri, wsa, nullptr)) {
    float t = time_ms([&] { dd::try_launch_attn_dkv_sm90(bp, pl, ri, wsa, nullptr); }, r);
    rows.push_back({shape, "bwd dkv kernel sm90", t, 2.0 * flop / t * 1e-9});
    setenv("SALAD_BWD_DKV_PERSISTENT", "1", 1);
    t = time_ms([&] { dd::try_launch_attn_dkv_sm90(bp, pl, ri, wsa, nullptr); }, r);
    rows.push_back({shape, "bwd dkv kernel sm90 persist", t, 2.0 * flop / t * 1e-9});
    unsetenv("SALAD_BWD_DKV_PERSISTENT");
  } else {
    std::printf("[%s] sm90 dkv kernel not applicable\n", shape);
  }
  float t = time_ms([&] { dd::launch_attn_bwd(bp, pl, ri, wsa, nullptr); }, r);
  rows.push_back({shape, "attn bwd kernels", t, 3.5 * flop / t * 1e-9});
  std::vector<uint16_t> n_q, n_k, n_v;
  if (compare) {
    cuda::backward(bp, ws, nullptr);
    CK(cudaDeviceSynchronize());
    n_q = gq.down(), n_k = gk.down(), n_v = gv.down();
  }
  setenv("SALAD_BWD_KERNEL", "mma", 1);
  t = time_ms([&] { dd::launch_attn_bwd(bp, pl, ri, wsa, nullptr); }, r);
  rows.push_back({shape, "attn bwd kernels mma", t, 3.5 * flop / t * 1e-9});
  t = time_ms([&] { cuda::backward(bp, ws, nullptr); }, r);
  rows.push_back({shape, "sparse bwd mma", t, 2.5 * flop / t * 1e-9});
  if (compare) {
    cuda::backward(bp, ws, nullptr);
    CK(cudaDeviceSynchronize());
    const std::vector<uint16_t>* now[3] = {&n_q, &n_k, &n_v};
    const Dev<uint16_t>* old[3] = {&gq, &gk, &gv};
    for (int i = 0; i < 3; ++i) {
      std::vector<uint16_t> o = old[i]->down();
      double num = 0, den = 0, mx = 0;
      bool fin = true;
      for (size_t j = 0; j < o.size(); ++j) {
        double a = from_low((*now[i])[j], DType::BF16), b = from_low(o[j], DType::BF16);
        fin &= std::isfinite(a);
        num += (a - b) * (a - b), den += b * b, mx = std::max(mx, std::fabs(a - b));
      }
      std::printf("[%s sparse bwd] default vs mma kernels: d%c max|diff| %.3e rel_l2 %.3e, finite %d\n", shape,
                  "qkv"[i], mx, std::sqrt(num / std::max(den, 1e-300)), fin);
    }
  }
  for (int i = 0; i < 3; ++i) {
    if (had[i]) setenv(names[i], saved[i].c_str(), 1);
    else unsetenv(names[i]);
  }
}

void bench(int reps, bool dense, bool fwd_only) {
  const Shape shapes[] = {{"Wan1.3B-480p", 12, {21, 30, 52}}, {"Wan14B-480p", 40, {21, 30, 52}},
                          {"Wan14B-720p", 40, {21, 45, 80}}};
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  using Row = BenchRow;
  std::vector<Row> rows;
  for (const Shape& s : shapes) {
    const int64_t B = 1, H = s.H, D = 128, L = s.grid.size(), N = B * H * L * D;
    std::vector<uint16_t> h(N);
    Dev<uint16_t> q(N), k(N), v(N), os(N), ol(N), dos(N), dol(N), gq(N), gk(N), gv(N);
    for (auto* d : {&q, &k, &v, &dos, &dol}) {
      for (auto& x : h) x = to_low(nd(rng), DType::BF16);
      d->up(h);
    }
    Dev<float> lse(B * H * L);
    Params p;
    p.dtype = DType::BF16;
    p.B = B, p.H = H, p.L = L, p.D = D;
    p.grid = s.grid;
    p.opt.keep = 0.10;
    int64_t st[3] = {H * L * D, L * D, D};
    for (int i = 0; i < 3; ++i) p.q_stride[i] = p.k_stride[i] = p.v_stride[i] = st[i];
    p.q = q.p, p.k = k.p, p.v = v.p, p.o_s = os.p, p.lse = lse.p, p.o_l = ol.p;
    BlockShape bs0;
    {
      Params t = p;
      t.opt.mode = Mode::Sparse;
      bs0 = t.blocks();
    }
    Dev<int32_t> idx(B * H * bs0.n_q * bs0.max_k), cnt(B * H * bs0.n_q);
    p.block_idx = idx.p, p.block_cnt = cnt.p;
    const double kept_keys = double(bs0.max_k * p.opt.block_k);
    const double sparse_flop = 4.0 * B * H * L * std::min<double>(kept_keys, L) * D;
    const double dense_flop = 4.0 * B * H * double(L) * L * D;
    for (Mode m : {Mode::Dense, Mode::Sparse, Mode::Salad}) {
      if (m == Mode::Dense && !dense) continue;
      if (m == Mode::Salad && fwd_only) continue;
      p.opt.mode = m;
      p.blocks_given = false;
      BwdParams bp;
      static_cast<Params&>(bp) = p;
      bp.blocks_given = true;
      bp.do_s = dos.p, bp.do_l = m == Mode::Salad ? dol.p : nullptr;
      bp.dq = gq.p, bp.dk = gk.p, bp.dv = gv.p;
      size_t wsb = std::max(cuda::forward_workspace_bytes(p), cuda::backward_workspace_bytes(bp));
      Dev<char> ws(wsb);
      const double flop = m == Mode::Dense ? dense_flop : sparse_flop;
      int r = m == Mode::Dense ? std::max(3, reps / 5) : reps;
      float f = time_ms([&] { cuda::forward(p, ws.p, nullptr); }, r);
      rows.push_back({s.name, std::string(to_string(m)) + " fwd", f, flop / f * 1e-9});
      if (m != Mode::Dense) {
        p.blocks_given = true;
        float fa = time_ms([&] { cuda::forward(p, ws.p, nullptr); }, r);
        rows.push_back({s.name, std::string(to_string(m)) + " fwd (table given)", fa, flop / fa * 1e-9});
      }
      {  // the mma.sync forward kernel (SALAD_FWD_KERNEL=mma) on the same inputs, and how far apart they are
        const char* prev = std::getenv("SALAD_FWD_KERNEL");
        std::string saved = prev ? prev : "";
        const bool cmp = m == Mode::Sparse && &s == &shapes[0];
        std::vector<uint16_t> o_new;
        std::vector<float> l_new;
        if (cmp) {
          cuda::forward(p, ws.p, nullptr);
          CK(cudaDeviceSynchronize());
          o_new = os.down(), l_new = lse.down();
        }
        setenv("SALAD_FWD_KERNEL", "mma", 1);
        float fm = time_ms([&] { cuda::forward(p, ws.p, nullptr); }, r);
        rows.push_back({s.name, std::string(to_string(m)) + (m != Mode::Dense ? " fwd (table given) mma" : " fwd mma"),
                        fm, flop / fm * 1e-9});
        if (cmp) {
          CK(cudaDeviceSynchronize());
          std::vector<uint16_t> o_old = os.down();
          std::vector<float> l_old = lse.down();
          double num = 0, den = 0, mx = 0, lmx = 0;
          bool fin = true;
          for (size_t i = 0; i < o_old.size(); ++i) {
            double a = from_low(o_new[i], DType::BF16), b = from_low(o_old[i], DType::BF16);
            fin &= std::isfinite(a);
            num += (a - b) * (a - b), den += b * b, mx = std::max(mx, std::fabs(a - b));
          }
          for (size_t i = 0; i < l_old.size(); ++i) lmx = std::max(lmx, double(std::fabs(l_new[i] - l_old[i])));
          std::printf("[%s sparse fwd] default vs mma kernel: o_s max|diff| %.3e rel_l2 %.3e, lse max|diff| %.3e, "
                      "finite %d\n", s.name, mx, std::sqrt(num / std::max(den, 1e-300)), lmx, fin);
        }
        if (prev) setenv("SALAD_FWD_KERNEL", saved.c_str(), 1);
        else unsetenv("SALAD_FWD_KERNEL");
      }
      if (m == Mode::Sparse) {  // the attention kernel alone (no RoPE / rotation), each forward kernel variant
        namespace dd = salad::cuda::detail;
        void* wsa = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.p) + 255) / 256 * 256);
        const dd::Plan pl = dd::make_plan(p, false);
        const dd::RopeInfo ri = dd::prepare_order_and_rope(p, pl, wsa, nullptr);
        const char* prev = std::getenv("SALAD_FWD_KERNEL");
        std::string saved = prev ? prev : "";
        struct V {
          const char* name;
          const char* kern;
          const char* pers;
          const char* pp;
        };
        for (V v : {V{"attn kernel sm90", "", "1", "0"}, V{"attn kernel sm90 1CTA/item", "", "0", "0"},
                    V{"attn kernel mma", "mma", "1", "0"}}) {
          setenv("SALAD_FWD_KERNEL", v.kern, 1);
          setenv("SALAD_SM90_PERSISTENT", v.pers, 1);
          setenv("SALAD_SM90_PINGPONG", v.pp, 1);
          float fk = time_ms([&] { dd::launch_attn_fwd(p, pl, ri, wsa, nullptr); }, r);
          rows.push_back({s.name, v.name, fk, flop / fk * 1e-9});
        }
        unsetenv("SALAD_SM90_PERSISTENT");
        unsetenv("SALAD_SM90_PINGPONG");
        if (prev) setenv("SALAD_FWD_KERNEL", saved.c_str(), 1);
        else unsetenv("SALAD_FWD_KERNEL");
      }
      if (m != Mode::Dense) p.blocks_given = false;
      if (!fwd_only) {
        float b = time_ms([&] { cuda::backward(bp, ws.p, nullptr); }, r);
        rows.push_back({s.name, std::string(to_string(m)) + " bwd", b, 2.5 * flop / b * 1e-9});
        if (m == Mode::Sparse) bench_bwd_kernels(s.name, bp, ws.p, flop, r, &s == &shapes[0], gq, gk, gv, rows);
      }
    }
  }
  int dev;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("\n== benchmark (%s, bf16, B=1, D=128, keep 0.10, block 128/64, median of %d) ==\n", prop.name, reps);
  std::printf("%-14s %-26s %10s %10s\n", "shape", "call", "ms", "TFLOP/s*");
  for (const Row& r : rows) std::printf("%-14s %-26s %10.3f %10.1f\n", r.shape.c_str(), r.what.c_str(), r.ms, r.tflops);
  std::printf("* attention FLOPs only: dense 4*L^2*D*H, sparse/salad 4*L*kept*D*H (bwd 2.5x); linear branch and\n"
              "  selection not counted. Dense row = this kernel on all blocks (in-run baseline). Backward kernel\n"
              "  rows count the matmuls done: dq 1.5x, dkv 2x, attn bwd kernels (delta + dq + dkv) 3.5x.\n");
}

}  // namespace

// ---------------------------------------------------------------- linear branch alone (--linear)
// Times launch_linear_fwd / launch_linear_bwd by themselves, SALAD_LINEAR_KERNEL=old vs the
// default, on the Wan shapes, and reports how far the two outputs are apart (first shape).
#include "../src/kernels/cuda/internal.cuh"
namespace {
// Approximately N(0, 1) bf16 values from a counter hash (sum of 4 uniforms).
__global__ void lin_fill_kernel(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ (seed * 0xBF58476D1CE4E5B9ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = 0.f;
    for (int j = 0; j < 4; ++j) u += float((z >> (16 * j)) & 0xFFFF) * (1.f / 65536.f);
    __nv_bfloat16 b = __float2bfloat16_rn((u - 2.f) * 1.7320508f);
    p[i] = *reinterpret_cast<uint16_t*>(&b);
  }
}

void bench_linear(int reps) {
  namespace dt = salad::cuda::detail;
  const Shape shapes[] = {{"Wan1.3B-480p", 12, {21, 30, 52}}, {"Wan14B-480p", 40, {21, 30, 52}},
                          {"Wan14B-720p", 40, {21, 45, 80}}};
  std::mt19937_64 rng(11);
  setvbuf(stdout, nullptr, _IOLBF, 0);  // line-buffered: partial results survive a timeout
  const char* prev = std::getenv("SALAD_LINEAR_KERNEL");
  std::string saved = prev ? prev : "";
  std::printf("\n== linear branch alone (bf16, B=1, D=128, relu, rope, median of %d) ==\n", reps);
  std::printf("%-14s %-8s %10s %10s %10s %10s\n", "shape", "impl", "fwd ms", "bwd ms", "fwd GB/s", "fwd TF/s");
  for (const Shape& s : shapes) {
    const int64_t B = 1, H = s.H, D = 128, L = s.grid.size(), N = B * H * L * D;
    Dev<uint16_t> q(N), k(N), v(N), ol(N), dol(N), gq(N), gk(N), gv(N), os(N), dos(N);
    uint64_t seed = rng();
    for (auto* d : {&q, &k, &v, &dol, &dos}) {
      lin_fill_kernel<<<1024, 256>>>(d->p, size_t(N), seed++);  // device-side fill: host RNG is too slow here
      CK(cudaGetLastError());
    }
    CK(cudaDeviceSynchronize());
    Params p;
    p.dtype = DType::BF16;
    p.B = B, p.H = H, p.L = L, p.D = D;
    p.grid = s.grid;
    p.opt.keep = 0.10;
    p.opt.mode = Mode::Salad;
    int64_t st[3] = {H * L * D, L * D, D};
    for (int i = 0; i < 3; ++i) p.q_stride[i] = p.k_stride[i] = p.v_stride[i] = st[i];
    p.q = q.p, p.k = k.p, p.v = v.p, p.o_l = ol.p, p.o_s = os.p;
    BwdParams bp;
    static_cast<Params&>(bp) = p;
    bp.do_s = dos.p, bp.do_l = dol.p, bp.dq = gq.p, bp.dk = gk.p, bp.dv = gv.p;
    const dt::Plan plf = dt::make_plan(p, false), plb = dt::make_plan(bp, true);
    Dev<char> ws(std::max(plf.total, plb.total));
    const dt::RopeInfo r = dt::prepare_order_and_rope(p, plf, ws.p, nullptr);
    std::vector<uint16_t> o_ref;
    std::vector<float> g_ref[3];
    const size_t goff[3] = {plb.dq_l, plb.dk_l, plb.dv_l};
    {  // full operator: sparse (reference) and salad with each linear implementation
      BlockShape bs0 = p.blocks();
      Dev<int32_t> idx(B * H * bs0.n_q * bs0.max_k), cnt(B * H * bs0.n_q);
      Dev<float> lse(B * H * L);
      Params fp = p;
      fp.lse = lse.p, fp.block_idx = idx.p, fp.block_cnt = cnt.p;
      BwdParams fb = bp;
      static_cast<Params&>(fb) = fp;
      fb.blocks_given = true;
      fb.do_s = dos.p, fb.do_l = dol.p, fb.dq = gq.p, fb.dk = gk.p, fb.dv = gv.p;
      Dev<char> fws(std::max(cuda::forward_workspace_bytes(fp), cuda::backward_workspace_bytes(fb)));
      const int fr = std::max(3, reps / 2);
      for (const char* impl : {"sparse", "old", "new"}) {
        const bool sp = std::strcmp(impl, "sparse") == 0;
        fp.opt.mode = fb.opt.mode = sp ? Mode::Sparse : Mode::Salad;
        fb.do_l = sp ? nullptr : dol.p;
        if (!sp) setenv("SALAD_LINEAR_KERNEL", impl, 1);
        fp.blocks_given = false;
        float f = time_ms([&] { cuda::forward(fp, fws.p, nullptr); }, fr);
        fp.blocks_given = true;
        float fg = time_ms([&] { cuda::forward(fp, fws.p, nullptr); }, fr);
        float b = time_ms([&] { cuda::backward(fb, fws.p, nullptr); }, fr);
        std::printf("%-14s %-8s full op (%s): fwd %.3f ms, fwd (table given) %.3f ms, bwd %.3f ms\n", s.name,
                    sp ? "-" : impl, sp ? "sparse" : "salad", f, fg, b);
      }
    }
    for (const char* impl : {"old", "new"}) {
      setenv("SALAD_LINEAR_KERNEL", impl, 1);
      float f = time_ms([&] { dt::launch_linear_fwd(p, plf, r, ws.p, nullptr); }, reps);
      const bool cmp = &s == &shapes[0];
      std::vector<uint16_t> o_now;
      if (cmp) o_now = ol.down();
      float b = time_ms([&] { dt::launch_linear_bwd(bp, plb, r, ws.p, nullptr); }, reps);
      const double bytes = 4.0 * N * 2, flop = 4.0 * N * D;
      std::printf("%-14s %-8s %10.4f %10.4f %10.0f %10.1f\n", s.name, impl, f, b, bytes / f * 1e-6, flop / f * 1e-9);
      if (cmp) {
        std::vector<float> gnow[3];
        for (int i = 0; i < 3; ++i) {
          gnow[i].resize(N);
          CK(cudaMemcpy(gnow[i].data(), ws.p + goff[i], N * sizeof(float), cudaMemcpyDeviceToHost));
        }
        if (o_ref.empty()) {
          o_ref = o_now;
          for (int i = 0; i < 3; ++i) g_ref[i] = gnow[i];
        } else {
          auto rel = [](auto get_a, auto get_b, size_t n, double* mx) {
            double num = 0, den = 0;
            *mx = 0;
            for (size_t i = 0; i < n; ++i) {
              double a = get_a(i), bb = get_b(i);
              num += (a - bb) * (a - bb), den += bb * bb, *mx = std::max(*mx, std::fabs(a - bb));
            }
            return std::sqrt(num / std::max(den, 1e-300));
          };
          double mx;
          double ro = rel([&](size_t i) { return (double)from_low(o_now[i], DType::BF16); },
                          [&](size_t i) { return (double)from_low(o_ref[i], DType::BF16); }, N, &mx);
          std::printf("  %s vs old: o_l rel_l2 %.3e max|diff| %.3e", impl, ro, mx);
          const char* nm[3] = {"dq_l", "dk_l", "dv_l"};
          for (int i = 0; i < 3; ++i) {
            double rg = rel([&](size_t j) { return (double)gnow[i][j]; }, [&](size_t j) { return (double)g_ref[i][j]; },
                            N, &mx);
            std::printf(", %s rel_l2 %.3e", nm[i], rg);
          }
          std::printf("\n");
        }
      }
    }
  }
  if (prev) setenv("SALAD_LINEAR_KERNEL", saved.c_str(), 1);
  else unsetenv("SALAD_LINEAR_KERNEL");
}
}  // namespace

int main(int argc, char** argv) {
  bool check = true, do_bench = true, dense = true, fwd_only = false;
  bool linear_only = false;
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--no-bench") do_bench = false;
    else if (a == "--no-check") check = false;
    else if (a == "--no-dense") dense = false;
    else if (a == "--fwd-only") fwd_only = true;
    else if (a == "--linear") linear_only = true;  // linear branch alone, then exit
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
  }
  if (linear_only) {
    bench_linear(reps);
    return 0;
  }
  int fails = 0, total = 0;
  if (check) {
    std::vector<Case> cases;
    for (int64_t D : {64, 128}) {
      std::string d = "_D" + std::to_string(D);
      Case c;
      c.D = D;
      c.name = "dense" + d, c.mode = Mode::Dense, cases.push_back(c);
      c.name = "sparse_topk" + d, c.mode = Mode::Sparse, cases.push_back(c);
      c.name = "sparse_window" + d, c.pattern = Pattern::Window, cases.push_back(c);
      c.pattern = Pattern::TopK;
      c.name = "salad_topk_relu_rope" + d, c.mode = Mode::Salad, cases.push_back(c);
      c.name = "salad_topk_elu1_norope" + d, c.feature = FeatureMap::Elu1, c.linear_rope = false, cases.push_back(c);
      c.name = "salad_window_softmax_rope" + d, c.feature = FeatureMap::Softmax, c.linear_rope = true,
      c.pattern = Pattern::Window, cases.push_back(c);
    }
    {
      Case c;
      c.name = "salad_tile_order_odd_blocks", c.mode = Mode::Salad, c.grid = {3, 7, 11}, c.block_q = 96, c.block_k = 40,
      c.tile_order = true, c.tile = {2, 3, 5}, c.feature = FeatureMap::Softmax;
      cases.push_back(c);
      c.name = "sparse_window_tile_order", c.mode = Mode::Sparse, c.pattern = Pattern::Window, c.block_q = 64,
      c.block_k = 32, c.tile = {1, 4, 4}, c.window = {1, 1, 1};
      cases.push_back(c);
      c = Case();
      c.name = "salad_fp16", c.mode = Mode::Salad, c.dtype = DType::F16, c.feature = FeatureMap::Elu1;
      cases.push_back(c);
      c.name = "dense_fp16_D64_odd", c.mode = Mode::Dense, c.D = 64, c.grid = {2, 5, 13}, c.block_q = 128, c.block_k = 64;
      cases.push_back(c);
      // sm90 forward: key blocks of two 64-key tiles, query blocks of two 128-row CTAs, many tiles per CTA
      c = Case();
      c.name = "sparse_topk_bq256_bk128", c.mode = Mode::Sparse, c.grid = {4, 16, 20}, c.block_q = 256, c.block_k = 128,
      c.keep = 0.6;
      cases.push_back(c);
      c.name = "sparse_topk_fp16_D64_bq64", c.dtype = DType::F16, c.D = 64, c.block_q = 64, c.block_k = 64, c.keep = 0.5;
      cases.push_back(c);
      // sm90 backward: 128-row dq items whose second warpgroup is idle (block_q 192), 128-key dkv spans
      // straddling two key blocks (block_k 192) or inside one (block_k 128), L = 1260 (partial blocks)
      c = Case();
      c.name = "sparse_topk_bq192_bk192", c.mode = Mode::Sparse, c.grid = {4, 15, 21}, c.block_q = 192,
      c.block_k = 192, c.keep = 0.4;
      cases.push_back(c);
      c.name = "salad_topk_D64_bq192_bk128", c.mode = Mode::Salad, c.D = 64, c.block_k = 128;
      cases.push_back(c);
    }
    std::mt19937_64 rng(12345);
    for (const Case& c : cases) {
      ++total;
      if (!run_case(c, rng)) {
        ++fails;
        std::printf("  -> FAIL %s\n", c.name.c_str());
      }
    }
    std::printf("\n== correctness: %d / %d cases passed ==\n", total - fails, total);
  }
  if (do_bench) bench(reps, dense, fwd_only);
  if (check) std::printf("correctness: %d / %d cases passed\n", total - fails, total);
  return fails ? 1 : 0;
}
