// The fast CPU path: float32, blocked, multi-threaded (OpenMP). Same function
// as reference.cpp; the tests hold it to 1e-5 relative of the float32 reference.
//
// Layout per (batch, head): RoPE'd q/k and v are gathered once into block order
// (contiguous L x D, plus k^T as D x L) so every kept block pair is two small
// dense GEMMs on a register-blocked micro-kernel; the softmax of one query block
// over all its kept keys is exact (two passes over an S buffer), not online.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "common.h"
#include "salad/kernels.h"
#include "salad/layout.h"

namespace salad::cpu {
namespace {

// Portable SIMD through GCC/Clang vector extensions: 16 lanes where AVX-512
// is enabled, else 8 (AVX2, or two SSE halves).
#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

inline vf loadu(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

// e^x for x <= 0 (softmax arguments after the max is subtracted), to ~2e-7
// relative: 2^n * e^(f ln 2) with n = round(x / ln 2) and a degree-6 Taylor
// polynomial on |f ln 2| <= 0.35.
inline vf vexp(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vf t = x * 1.44269504088896341f;
  const vi n = __builtin_convertvector(t + (t < splat(0.0f) ? splat(-0.5f) : splat(0.5f)), vi);
  const vf y = (t - __builtin_convertvector(n, vf)) * 0.693147180559945309f;
  vf p = splat(1.0f / 720);
  p = p * y + 1.0f / 120;
  p = p * y + 1.0f / 24;
  p = p * y + 1.0f / 6;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  vf scale;
  const vi bits = (n + 127) << 23;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// x[i] = exp(x[i] * a - b) for i < n; returns the sum.
float exp_affine(float* x, int64_t n, float a, float b) {
  vf acc{};
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    const vf e = vexp(loadu(x + i) * a - b);
    storeu(x + i, e);
    acc += e;
  }
  float sum = 0;
  for (int l = 0; l < VL; ++l) sum += acc[l];
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] * a - b));
  return sum;
}

// max of x[0..n); NaN does not propagate (a NaN row gives NaN through exp anyway).
float row_max(const float* x, int64_t n) {
  vf m = splat(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    const vf v = loadu(x + i);
    m = v > m ? v : m;
  }
  float r = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < VL; ++l) r = std::max(r, m[l]);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// R x (2 VL) register tile: 2R vector accumulators, one broadcast of A per row.
template <int R>
inline void micro_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                       bool accumulate) {
  vf c0[R], c1[R];
  for (int r = 0; r < R; ++r) c0[r] = vf{}, c1[r] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = loadu(B + k * ldb), b1 = loadu(B + k * ldb + VL);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + k];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    if (accumulate) c0[r] += loadu(C + r * ldc), c1[r] += loadu(C + r * ldc + VL);
    storeu(C + r * ldc, c0[r]);
    storeu(C + r * ldc + VL, c1[r]);
  }
}

// C[M x N] (+)= A[M x K] * B[K x N]; row-major with leading dimensions. Column
// strips of 2 VL keep a K x 2VL panel of B in L1 while 6-row tiles of A stream.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  // 8 rows fill 16 of AVX-512's 32 vector registers with accumulators; AVX2 has 16 in all.
  constexpr int R = VL == 16 ? 8 : 6, W = 2 * VL;
  int64_t j = 0;
  for (; j + W <= N; j += W) {
    int64_t i = 0;
    for (; i + R <= M; i += R) micro_tile<R>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    for (; i + 2 <= M; i += 2) micro_tile<2>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    for (; i < M; ++i) micro_tile<1>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
  }
  if (j == N) return;
  for (int64_t i = 0; i < M; ++i) {  // last columns (partial blocks, small D)
    float* c = C + i * ldc;
    if (!accumulate) std::fill(c + j, c + N, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * lda + k];
      const float* b = B + k * ldb;
      for (int64_t x = j; x < N; ++x) c[x] += a * b[x];
    }
  }
}

// dst[c * rows + r] = src[r * ld + c] for an rows x cols block.
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * ld + c];
}

struct FloatRope {
  int64_t half;
  std::vector<float> cos, sin;
  explicit FloatRope(const RopeTable& t) : half(t.half), cos(t.cos.begin(), t.cos.end()), sin(t.sin.begin(), t.sin.end()) {}

  // The table of the last few (grid, D, theta): a sampler calls every layer at one shape,
  // and L * D/2 sincos per call would cost more than the linear branch.
  static std::shared_ptr<const FloatRope> cached(const Grid& g, int64_t D, double theta) {
    static std::mutex mu;
    static std::vector<std::pair<std::array<double, 5>, std::shared_ptr<const FloatRope>>> cache;
    const std::array<double, 5> key = {double(g.f), double(g.h), double(g.w), double(D), theta};
    std::lock_guard<std::mutex> lock(mu);
    for (auto& kv : cache)
      if (kv.first == key) return kv.second;
    auto made = std::make_shared<const FloatRope>(RopeTable(g, D, theta));
    if (cache.size() >= 8) cache.erase(cache.begin());
    cache.emplace_back(key, made);
    return made;
  }
  void apply(int64_t tok, float* x, bool inverse = false) const {
    const float* c = &cos[tok * half];
    const float* s = &sin[tok * half];
    const float sg = inverse ? -1.0f : 1.0f;
    for (int64_t m = 0; m < half; ++m) {
      const float x0 = x[2 * m], x1 = x[2 * m + 1], sn = sg * s[m];
      x[2 * m] = x0 * c[m] - x1 * sn;
      x[2 * m + 1] = x0 * sn + x1 * c[m];
    }
  }
};

// One (batch, head) gathered into block order for the sparse branch.
// Block j of rows (block order, L x D) transposed into a contiguous D x bk
// panel, so a GEMM against it reads one small L1-resident tile; the columns
// past the end of a partial last block are zero.
std::vector<float> panels(const std::vector<float>& rows, int64_t L, int64_t D, int64_t bk) {
  const int64_t n = (L + bk - 1) / bk;
  std::vector<float> out(n * bk * D, 0.0f);
  for (int64_t pos = 0; pos < L; ++pos)
    for (int64_t d = 0; d < D; ++d) out[(pos / bk) * bk * D + d * bk + pos % bk] = rows[pos * D + d];
  return out;
}

struct BlockHead {
  std::vector<float> qr, kr, krT, v;  // qr, kr, v: (L, D); krT: key-block panels (see panels())
  void load(const Params& p, const FloatRope& rope, const std::vector<int64_t>& order, int64_t b, int64_t h,
            bool with_transposes) {
    const int64_t L = p.L, D = p.D;
    qr.resize(L * D), kr.resize(L * D), v.resize(L * D);
    for (int64_t pos = 0; pos < L; ++pos) {
      const int64_t t = order[pos];
      std::copy_n(row<float>(p.q, p.q_stride, b, h, t), D, &qr[pos * D]);
      std::copy_n(row<float>(p.k, p.k_stride, b, h, t), D, &kr[pos * D]);
      std::copy_n(row<float>(p.v, p.v_stride, b, h, t), D, &v[pos * D]);
      rope.apply(t, &qr[pos * D]);
      rope.apply(t, &kr[pos * D]);
    }
    if (with_transposes) {
      krT = panels(kr, L, D, p.opt.block_k);
    }
  }
};

void select_topk(const Params& p, const BlockHead& x, int32_t* idx, int32_t* cnt) {
  const BlockShape bs = p.blocks();
  const int64_t L = p.L, D = p.D;
  auto means = [&](const std::vector<float>& r, int64_t bsz, int64_t n) {
    std::vector<float> m(n * D, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t lo = i * bsz, hi = std::min(L, lo + bsz);
      for (int64_t pos = lo; pos < hi; ++pos)
        for (int64_t d = 0; d < D; ++d) m[i * D + d] += r[pos * D + d];
      for (int64_t d = 0; d < D; ++d) m[i * D + d] /= static_cast<float>(hi - lo);
    }
    return m;
  };
  const std::vector<float> mq = means(x.qr, p.opt.block_q, bs.n_q), mk = means(x.kr, p.opt.block_k, bs.n_k);
  std::vector<float> mkT(D * bs.n_k), scores(bs.n_q * bs.n_k);
  transpose(mk.data(), bs.n_k, D, D, mkT.data(), bs.n_k);
  gemm(bs.n_q, bs.n_k, D, mq.data(), D, mkT.data(), bs.n_k, scores.data(), bs.n_k, false);
  const float scale = static_cast<float>(p.softmax_scale());
  for (float& s : scores) s *= scale;
  for (int64_t i = 0; i < bs.n_q; ++i) {
    topk_row(&scores[i * bs.n_k], bs.n_k, bs.max_k, idx + i * bs.max_k);
    cnt[i] = static_cast<int32_t>(bs.max_k);
  }
}

// Kept key blocks of query block i: (first position, length) runs in block order.
struct KeptRuns {
  std::vector<int64_t> start, len;  // one run per kept key block, in block order
  int64_t total = 0;
  void build(const Params& p, const int32_t* idx, const int32_t* cnt, int64_t i) {
    start.clear(), len.clear(), total = 0;
    const BlockShape bs = p.blocks();
    const int64_t bk = p.opt.block_k;
    auto add = [&](int64_t lo, int64_t n) {
      start.push_back(lo), len.push_back(n);
      total += n;
    };
    if (p.opt.mode == Mode::Dense) {
      for (int64_t j = 0; j < bs.n_k; ++j) add(j * bk, std::min(p.L, (j + 1) * bk) - j * bk);
      return;
    }
    for (int32_t c = 0; c < cnt[i]; ++c) {
      const int64_t j = idx[i * bs.max_k + c];
      add(j * bk, std::min(p.L, (j + 1) * bk) - j * bk);
    }
  }
};

void linear_forward_head(const Params& p, const FloatRope& rope, int64_t b, int64_t h) {
  const int64_t L = p.L, D = p.D, bh = b * p.H + h;
  // One pass over K/V in chunks: Sv += C^T V with C = R phi(K), z = sum_j phi(k_j).
  constexpr int64_t kChunk = 256;
  std::vector<float> phi(D), cT(D * kChunk), v(kChunk * D), Sv(D * D, 0.0f), z(D, 0.0f);
  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int64_t n = std::min(kChunk, L - t0);
    for (int64_t r = 0; r < n; ++r) {
      feature_map(p.opt.feature, row<float>(p.k, p.k_stride, b, h, t0 + r), phi.data(), D);
      for (int64_t a = 0; a < D; ++a) z[a] += phi[a];
      if (p.opt.linear_rope) rope.apply(t0 + r, phi.data());
      for (int64_t a = 0; a < D; ++a) cT[a * kChunk + r] = phi[a];
      std::copy_n(row<float>(p.v, p.v_stride, b, h, t0 + r), D, &v[r * D]);
    }
    gemm(D, D, n, cT.data(), kChunk, v.data(), D, Sv.data(), D, true);
  }
  float* o_l = static_cast<float*>(p.o_l) + bh * L * D;
  std::vector<float> A(kChunk * D);
  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int64_t n = std::min(kChunk, L - t0);
    std::vector<float> den(n);
    for (int64_t r = 0; r < n; ++r) {
      float* a = &A[r * D];
      feature_map(p.opt.feature, row<float>(p.q, p.q_stride, b, h, t0 + r), a, D);
      float s = 0;
      for (int64_t d = 0; d < D; ++d) s += a[d] * z[d];
      den[r] = s + static_cast<float>(p.opt.eps);
      if (p.opt.linear_rope) rope.apply(t0 + r, a);
    }
    gemm(n, D, D, A.data(), D, Sv.data(), D, o_l + t0 * D, D, false);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t d = 0; d < D; ++d) o_l[(t0 + r) * D + d] /= den[r];
  }
}

}  // namespace

void fast_forward(const Params& p) {
  validate(p);
  if (!p.out_contiguous()) throw ArgumentError("o_stride: the CPU kernels write contiguous (B, H, L, D) outputs only");
  if (p.dtype != DType::F32)
    throw ArgumentError(std::string("dtype: expected float32 for the fast CPU path, got ") + to_string(p.dtype));
  const int64_t L = p.L, D = p.D, BH = p.B * p.H;
  const BlockShape bs = p.blocks();
  const std::shared_ptr<const FloatRope> rope_ptr = FloatRope::cached(p.grid, D, p.opt.rope_theta);
  const FloatRope& rope = *rope_ptr;
  const std::vector<int64_t> order = token_order(p.grid, p.opt);
  const float scale = static_cast<float>(p.softmax_scale());
  const int64_t bq = p.opt.block_q, bk = p.opt.block_k;
  std::vector<int32_t> widx, wcnt;
  if (p.opt.mode != Mode::Dense && p.opt.pattern == Pattern::Window && !p.blocks_given)
    window_table(p.grid, p.opt, &widx, &wcnt);

  // Reused across calls (no page faults per call); OpenMP workers see it through
  // this reference, not through their own thread_local.
  thread_local std::vector<BlockHead> heads_storage;
  std::vector<BlockHead>& heads = heads_storage;
  heads.resize(BH);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < BH; ++bh) {
    heads[bh].load(p, rope, order, bh / p.H, bh % p.H, true);
    if (p.opt.mode == Mode::Dense || p.blocks_given) continue;
    int32_t* idx = p.block_idx + bh * bs.n_q * bs.max_k;
    int32_t* cnt = p.block_cnt + bh * bs.n_q;
    if (p.opt.pattern == Pattern::Window) {
      std::copy(widx.begin(), widx.end(), idx);
      std::copy(wcnt.begin(), wcnt.end(), cnt);
    } else {
      select_topk(p, heads[bh], idx, cnt);
    }
  }

#pragma omp parallel
  {
    std::vector<float> S, O(bq * D), inv_sum(bq);
    KeptRuns runs;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int64_t i = 0; i < bs.n_q; ++i) {
        const BlockHead& x = heads[bh];
        const int32_t* idx = p.block_idx ? p.block_idx + bh * bs.n_q * bs.max_k : nullptr;
        const int32_t* cnt = p.block_cnt ? p.block_cnt + bh * bs.n_q : nullptr;
        runs.build(p, idx, cnt, i);
        const int64_t q0 = i * bq, m = std::min(L, q0 + bq) - q0, n = runs.total;
        S.resize(m * n);
        for (size_t r = 0, col = 0; r < runs.start.size(); col += runs.len[r], ++r)
          gemm(m, runs.len[r], D, &x.qr[q0 * D], D, &x.krT[runs.start[r] * D], bk, &S[col], n, false);
        float* lse = p.lse + bh * L;
        for (int64_t r = 0; r < m; ++r) {
          float* s = &S[r * n];
          const float mx = row_max(s, n);
          const float sum = exp_affine(s, n, scale, mx * scale);
          inv_sum[r] = 1.0f / sum;
          lse[order[q0 + r]] = mx * scale + std::log(sum);
        }
        for (size_t r = 0, col = 0; r < runs.start.size(); col += runs.len[r], ++r)
          gemm(m, D, runs.len[r], &S[col], n, &x.v[runs.start[r] * D], D, O.data(), D, r > 0);
        float* o_s = static_cast<float*>(p.o_s) + bh * L * D;
        for (int64_t r = 0; r < m; ++r)
          for (int64_t d = 0; d < D; ++d) o_s[order[q0 + r] * D + d] = O[r * D + d] * inv_sum[r];
      }
  }

  if (p.opt.mode != Mode::Salad) return;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < BH; ++bh) linear_forward_head(p, rope, bh / p.H, bh % p.H);
}

void fast_backward(const BwdParams& p) {
  validate(p);
  if (p.dtype != DType::F32)
    throw ArgumentError(std::string("dtype: expected float32 for the fast CPU path, got ") + to_string(p.dtype));
  if (!p.do_s || !p.dq || !p.dk || !p.dv) throw ArgumentError("do_s/dq/dk/dv: expected non-null gradient pointers");
  const int64_t L = p.L, D = p.D, BH = p.B * p.H, bq = p.opt.block_q, bk = p.opt.block_k;
  const BlockShape bs = p.blocks();
  const std::shared_ptr<const FloatRope> rope_ptr = FloatRope::cached(p.grid, D, p.opt.rope_theta);
  const FloatRope& rope = *rope_ptr;
  const std::vector<int64_t> order = token_order(p.grid, p.opt);
  const float scale = static_cast<float>(p.softmax_scale());

  // One thread per (batch, head): dK/dV accumulate over query blocks without races.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t b = bh / p.H, h = bh % p.H;
    BlockHead x;
    x.load(p, rope, order, b, h, true);
    const std::vector<float> vT = panels(x.v, L, D, bk);
    std::vector<float> dO(L * D), delta(L), dqr(L * D, 0.0f), dkr(L * D, 0.0f), dv(L * D, 0.0f);
    const float* do_s = static_cast<const float*>(p.do_s) + bh * L * D;
    const float* o_s = static_cast<const float*>(p.o_s) + bh * L * D;
    const float* lse = p.lse + bh * L;
    for (int64_t pos = 0; pos < L; ++pos) {
      const int64_t t = order[pos];
      std::copy_n(do_s + t * D, D, &dO[pos * D]);
      float s = 0;
      for (int64_t d = 0; d < D; ++d) s += do_s[t * D + d] * o_s[t * D + d];
      delta[pos] = s;
    }
    const int32_t* idx = p.block_idx ? p.block_idx + bh * bs.n_q * bs.max_k : nullptr;
    const int32_t* cnt = p.block_cnt ? p.block_cnt + bh * bs.n_q : nullptr;
    KeptRuns runs;
    std::vector<float> P, dS, T;
    for (int64_t i = 0; i < bs.n_q; ++i) {
      runs.build(p, idx, cnt, i);
      const int64_t q0 = i * bq, m = std::min(L, q0 + bq) - q0, n = runs.total;
      P.resize(m * n), dS.resize(m * n), T.resize(n * m);
      for (size_t r = 0, col = 0; r < runs.start.size(); col += runs.len[r], ++r) {
        gemm(m, runs.len[r], D, &x.qr[q0 * D], D, &x.krT[runs.start[r] * D], bk, &P[col], n, false);
        gemm(m, runs.len[r], D, &dO[q0 * D], D, &vT[runs.start[r] * D], bk, &dS[col], n, false);
      }
      for (int64_t r = 0; r < m; ++r) {
        const float dl = delta[q0 + r];
        exp_affine(&P[r * n], n, scale, lse[order[q0 + r]]);
        for (int64_t c = 0; c < n; ++c) dS[r * n + c] = P[r * n + c] * (dS[r * n + c] - dl) * scale;
      }
      // dQ = dS K;  dV += P^T dO;  dK += dS^T Q
      for (size_t r = 0, col = 0; r < runs.start.size(); col += runs.len[r], ++r)
        gemm(m, D, runs.len[r], &dS[col], n, &x.kr[runs.start[r] * D], D, &dqr[q0 * D], D, r > 0);
      transpose(P.data(), m, n, n, T.data(), m);
      for (size_t r = 0, row0 = 0; r < runs.start.size(); row0 += runs.len[r], ++r)
        gemm(runs.len[r], D, m, &T[row0 * m], m, &dO[q0 * D], D, &dv[runs.start[r] * D], D, true);
      transpose(dS.data(), m, n, n, T.data(), m);
      for (size_t r = 0, row0 = 0; r < runs.start.size(); row0 += runs.len[r], ++r)
        gemm(runs.len[r], D, m, &T[row0 * m], m, &x.qr[q0 * D], D, &dkr[runs.start[r] * D], D, true);
    }
    float* dq = static_cast<float*>(p.dq) + bh * L * D;
    float* dk = static_cast<float*>(p.dk) + bh * L * D;
    float* dvo = static_cast<float*>(p.dv) + bh * L * D;
    for (int64_t pos = 0; pos < L; ++pos) {
      const int64_t t = order[pos];
      rope.apply(t, &dqr[pos * D], true);
      rope.apply(t, &dkr[pos * D], true);
      std::copy_n(&dqr[pos * D], D, dq + t * D);
      std::copy_n(&dkr[pos * D], D, dk + t * D);
      std::copy_n(&dv[pos * D], D, dvo + t * D);
    }
    if (p.opt.mode != Mode::Salad || !p.do_l) continue;

    // Linear branch, in raster order (see reference_backward for the formulas).
    std::vector<float> q(L * D), k(L * D), v(L * D), phiq(L * D), phik(L * D), a(L * D), c(L * D);
    for (int64_t t = 0; t < L; ++t) {
      std::copy_n(row<float>(p.q, p.q_stride, b, h, t), D, &q[t * D]);
      std::copy_n(row<float>(p.k, p.k_stride, b, h, t), D, &k[t * D]);
      std::copy_n(row<float>(p.v, p.v_stride, b, h, t), D, &v[t * D]);
      feature_map(p.opt.feature, &q[t * D], &phiq[t * D], D);
      feature_map(p.opt.feature, &k[t * D], &phik[t * D], D);
      std::copy_n(&phiq[t * D], D, &a[t * D]);
      std::copy_n(&phik[t * D], D, &c[t * D]);
      if (p.opt.linear_rope) rope.apply(t, &a[t * D]), rope.apply(t, &c[t * D]);
    }
    std::vector<float> cT(D * L), aT(D * L), Sv(D * D), SvT(D * D), z(D, 0.0f);
    transpose(c.data(), L, D, D, cT.data(), L);
    transpose(a.data(), L, D, D, aT.data(), L);
    gemm(D, D, L, cT.data(), L, v.data(), D, Sv.data(), D, false);
    transpose(Sv.data(), D, D, D, SvT.data(), D);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t d = 0; d < D; ++d) z[d] += phik[t * D + d];
    const float* o_l = static_cast<const float*>(p.o_l) + bh * L * D;
    const float* do_l = static_cast<const float*>(p.do_l) + bh * L * D;
    std::vector<float> dnum(L * D), dden(L), da(L * D), dSv(D * D), dSvT(D * D), dz(D, 0.0f);
    for (int64_t t = 0; t < L; ++t) {
      float den = static_cast<float>(p.opt.eps), od = 0;
      for (int64_t d = 0; d < D; ++d) den += phiq[t * D + d] * z[d], od += do_l[t * D + d] * o_l[t * D + d];
      dden[t] = -od / den;
      for (int64_t d = 0; d < D; ++d) dnum[t * D + d] = do_l[t * D + d] / den, dz[d] += dden[t] * phiq[t * D + d];
    }
    gemm(L, D, D, dnum.data(), D, SvT.data(), D, da.data(), D, false);     // da = dnum Sv^T
    gemm(D, D, L, aT.data(), L, dnum.data(), D, dSv.data(), D, false);     // dSv = a^T dnum
    transpose(dSv.data(), D, D, D, dSvT.data(), D);
    std::vector<float> dc(L * D), g(D), dx(D);
    gemm(L, D, D, v.data(), D, dSvT.data(), D, dc.data(), D, false);       // dc = V dSv^T
    gemm(L, D, D, c.data(), D, dSv.data(), D, dvo, D, true);               // dV += C dSv
    for (int64_t t = 0; t < L; ++t) {
      if (p.opt.linear_rope) rope.apply(t, &da[t * D], true), rope.apply(t, &dc[t * D], true);
      for (int64_t d = 0; d < D; ++d) g[d] = da[t * D + d] + dden[t] * z[d];
      feature_map_backward(p.opt.feature, &q[t * D], &phiq[t * D], g.data(), dx.data(), D);
      for (int64_t d = 0; d < D; ++d) dq[t * D + d] += dx[d];
      for (int64_t d = 0; d < D; ++d) g[d] = dc[t * D + d] + dz[d];
      feature_map_backward(p.opt.feature, &k[t * D], &phik[t * D], g.data(), dx.data(), D);
      for (int64_t d = 0; d < D; ++d) dk[t * D + d] += dx[d];
    }
  }
}

}  // namespace salad::cpu
