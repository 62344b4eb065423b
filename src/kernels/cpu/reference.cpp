// The readable reference of the SALAD operator, in float64 or float32.
// Every other backend is checked against it. It is written for clarity, not
// speed: O(L^2 D) in mode dense, O(L * kept * D) otherwise.
//
// Mirrors (per batch b, head h, with R = rope3d):
//   torch: qr = R q; kr = R k
//          O_s = softmax(scale * qr kr^T + mask_kept_blocks) v        (mode dense: no mask)
//          lse = logsumexp(scale * qr kr^T + mask_kept_blocks, -1)
//          O_l = ((R phi(q)) @ ((R phi(k))^T v)) / (phi(q) @ phi(k).sum(0) + eps)[:, None]
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "salad/kernels.h"
#include "salad/layout.h"

namespace salad::cpu {
namespace {

// One (batch, head) of the inputs: RoPE'd q/k in raster order, plus the raw rows.
template <class T>
struct Head {
  int64_t L, D;
  std::vector<T> q, k, v, qr, kr;  // (L, D) each, raster order

  Head(const Params& p, const RopeTable& rope, int64_t b, int64_t h) : L(p.L), D(p.D) {
    q.resize(L * D), k.resize(L * D), v.resize(L * D);
    for (int64_t t = 0; t < L; ++t) {
      std::copy_n(row<T>(p.q, p.q_stride, b, h, t), D, &q[t * D]);
      std::copy_n(row<T>(p.k, p.k_stride, b, h, t), D, &k[t * D]);
      std::copy_n(row<T>(p.v, p.v_stride, b, h, t), D, &v[t * D]);
    }
    qr = q, kr = k;
    for (int64_t t = 0; t < L; ++t) {
      rope.apply(t, &qr[t * D]);
      rope.apply(t, &kr[t * D]);
    }
  }
};

template <class T>
T dot(const T* a, const T* b, int64_t D) {
  T s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// Block table of one head: Top-K over mean-pooled block scores, or the window.
template <class T>
void select_head(const Params& p, const std::vector<int64_t>& order, const Head<T>& x,
                 int32_t* idx, int32_t* cnt) {
  const BlockShape bs = p.blocks();
  const int64_t L = p.L, D = p.D, bq = p.opt.block_q, bk = p.opt.block_k;
  if (p.opt.pattern == Pattern::Window) {
    std::vector<int32_t> widx, wcnt;
    window_table(p.grid, p.opt, &widx, &wcnt);
    std::copy(widx.begin(), widx.end(), idx);
    std::copy(wcnt.begin(), wcnt.end(), cnt);
    return;
  }
  auto means = [&](const std::vector<T>& r, int64_t bsz, int64_t n) {
    std::vector<T> m(n * D, T(0));
    for (int64_t i = 0; i < n; ++i) {
      int64_t lo = i * bsz, hi = std::min(L, lo + bsz);
      for (int64_t pos = lo; pos < hi; ++pos)
        for (int64_t d = 0; d < D; ++d) m[i * D + d] += r[order[pos] * D + d];
      for (int64_t d = 0; d < D; ++d) m[i * D + d] /= static_cast<T>(hi - lo);
    }
    return m;
  };
  const std::vector<T> mq = means(x.qr, bq, bs.n_q), mk = means(x.kr, bk, bs.n_k);
  const T scale = static_cast<T>(p.softmax_scale());
  std::vector<T> scores(bs.n_k);
  for (int64_t i = 0; i < bs.n_q; ++i) {
    for (int64_t j = 0; j < bs.n_k; ++j) scores[j] = dot(&mq[i * D], &mk[j * D], D) * scale;
    topk_row(scores.data(), bs.n_k, bs.max_k, idx + i * bs.max_k);
    cnt[i] = static_cast<int32_t>(bs.max_k);
  }
}

// Raster token ids of the keys that block-order query position `pos` attends.
std::vector<int64_t> kept_keys(const Params& p, const std::vector<int64_t>& order,
                               const int32_t* idx, const int32_t* cnt, int64_t pos) {
  std::vector<int64_t> keys;
  if (p.opt.mode == Mode::Dense) {
    keys.resize(p.L);
    for (int64_t t = 0; t < p.L; ++t) keys[t] = t;
    return keys;
  }
  const BlockShape bs = p.blocks();
  const int64_t i = pos / p.opt.block_q;
  for (int32_t c = 0; c < cnt[i]; ++c) {
    int64_t j = idx[i * bs.max_k + c];
    for (int64_t kp = j * p.opt.block_k; kp < std::min(p.L, (j + 1) * p.opt.block_k); ++kp)
      keys.push_back(order[kp]);
  }
  return keys;
}

// Linear branch state of one head: Sv = sum_j c_j v_j^T with c_j = R_j phi(k_j), z = sum_j phi(k_j).
template <class T>
struct LinearState {
  std::vector<T> phik, c, Sv, z;
  LinearState(const Params& p, const RopeTable& rope, const Head<T>& x) {
    const int64_t L = p.L, D = p.D;
    phik.resize(L * D), Sv.assign(D * D, T(0)), z.assign(D, T(0));
    for (int64_t t = 0; t < L; ++t) feature_map(p.opt.feature, &x.k[t * D], &phik[t * D], D);
    c = phik;
    if (p.opt.linear_rope)
      for (int64_t t = 0; t < L; ++t) rope.apply(t, &c[t * D]);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t a = 0; a < D; ++a) {
        z[a] += phik[t * D + a];
        for (int64_t e = 0; e < D; ++e) Sv[a * D + e] += c[t * D + a] * x.v[t * D + e];
      }
  }
};

}  // namespace

template <class T>
void reference_forward(const Params& p) {
  validate(p);
  if (!p.out_contiguous()) throw ArgumentError("o_stride: the CPU kernels write contiguous (B, H, L, D) outputs only");
  const DType want = sizeof(T) == 8 ? DType::F64 : DType::F32;
  if (p.dtype != want)
    throw ArgumentError(std::string("dtype: expected ") + to_string(want) + " for this reference, got " +
                        to_string(p.dtype));
  const int64_t L = p.L, D = p.D;
  const BlockShape bs = p.blocks();
  const RopeTable rope(p.grid, D, p.opt.rope_theta);
  const std::vector<int64_t> order = token_order(p.grid, p.opt);
  const T scale = static_cast<T>(p.softmax_scale());
  std::vector<int64_t> pos_of(L);  // raster token -> block-order position
  for (int64_t pos = 0; pos < L; ++pos) pos_of[order[pos]] = pos;

  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const Head<T> x(p, rope, b, h);
      const int64_t bh = b * p.H + h;
      int32_t* idx = p.block_idx ? p.block_idx + bh * bs.n_q * bs.max_k : nullptr;
      int32_t* cnt = p.block_cnt ? p.block_cnt + bh * bs.n_q : nullptr;
      if (p.opt.mode != Mode::Dense && !p.blocks_given) select_head(p, order, x, idx, cnt);

      T* o_s = static_cast<T*>(p.o_s) + bh * L * D;
      float* lse = p.lse + bh * L;
      std::vector<T> s;
      for (int64_t t = 0; t < L; ++t) {
        const std::vector<int64_t> keys = kept_keys(p, order, idx, cnt, pos_of[t]);
        s.resize(keys.size());
        T mx = -std::numeric_limits<T>::infinity();
        for (size_t n = 0; n < keys.size(); ++n) {
          s[n] = scale * dot(&x.qr[t * D], &x.kr[keys[n] * D], D);
          mx = std::max(mx, s[n]);
        }
        T sum = 0;
        for (size_t n = 0; n < keys.size(); ++n) sum += (s[n] = std::exp(s[n] - mx));
        T* o = o_s + t * D;
        std::fill_n(o, D, T(0));
        for (size_t n = 0; n < keys.size(); ++n)
          for (int64_t d = 0; d < D; ++d) o[d] += s[n] / sum * x.v[keys[n] * D + d];
        lse[t] = static_cast<float>(mx + std::log(sum));
      }

      if (p.opt.mode != Mode::Salad) continue;
      const LinearState<T> st(p, rope, x);
      T* o_l = static_cast<T*>(p.o_l) + bh * L * D;
      std::vector<T> phiq(D), a(D);
      for (int64_t t = 0; t < L; ++t) {
        feature_map(p.opt.feature, &x.q[t * D], phiq.data(), D);
        a = phiq;
        if (p.opt.linear_rope) rope.apply(t, a.data());
        const T den = dot(phiq.data(), st.z.data(), D) + static_cast<T>(p.opt.eps);
        for (int64_t e = 0; e < D; ++e) {
          T num = 0;
          for (int64_t d = 0; d < D; ++d) num += a[d] * st.Sv[d * D + e];
          o_l[t * D + e] = num / den;
        }
      }
    }
}

template <class T>
void reference_backward(const BwdParams& p) {
  validate(p);
  if (!p.do_s || !p.dq || !p.dk || !p.dv)
    throw ArgumentError("do_s/dq/dk/dv: expected non-null gradient pointers");
  const int64_t L = p.L, D = p.D;
  const RopeTable rope(p.grid, D, p.opt.rope_theta);
  const std::vector<int64_t> order = token_order(p.grid, p.opt);
  const T scale = static_cast<T>(p.softmax_scale());
  const BlockShape bs = p.blocks();
  std::vector<int64_t> pos_of(L);
  for (int64_t pos = 0; pos < L; ++pos) pos_of[order[pos]] = pos;

  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const Head<T> x(p, rope, b, h);
      const int64_t bh = b * p.H + h;
      const int32_t* idx = p.block_idx ? p.block_idx + bh * bs.n_q * bs.max_k : nullptr;
      const int32_t* cnt = p.block_cnt ? p.block_cnt + bh * bs.n_q : nullptr;
      const T* o_s = static_cast<const T*>(p.o_s) + bh * L * D;
      const T* do_s = static_cast<const T*>(p.do_s) + bh * L * D;
      std::vector<T> dqr(L * D, T(0)), dkr(L * D, T(0)), dv(L * D, T(0));

      // Sparse / dense branch; the softmax is recomputed here in T (not read
      // from the float32 lse) so the float64 reference stays exact.
      std::vector<T> s;
      for (int64_t t = 0; t < L; ++t) {
        const std::vector<int64_t> keys =
            kept_keys(p, order, const_cast<int32_t*>(idx), const_cast<int32_t*>(cnt), pos_of[t]);
        s.resize(keys.size());
        T mx = -std::numeric_limits<T>::infinity();
        for (size_t n = 0; n < keys.size(); ++n) {
          s[n] = scale * dot(&x.qr[t * D], &x.kr[keys[n] * D], D);
          mx = std::max(mx, s[n]);
        }
        T sum = 0;
        for (size_t n = 0; n < keys.size(); ++n) sum += (s[n] = std::exp(s[n] - mx));
        const T delta = dot(&do_s[t * D], &o_s[t * D], D);
        for (size_t n = 0; n < keys.size(); ++n) {
          const int64_t j = keys[n];
          const T P = s[n] / sum;
          const T dP = dot(&do_s[t * D], &x.v[j * D], D);
          const T dS = P * (dP - delta) * scale;
          for (int64_t d = 0; d < D; ++d) {
            dv[j * D + d] += P * do_s[t * D + d];
            dqr[t * D + d] += dS * x.kr[j * D + d];
            dkr[j * D + d] += dS * x.qr[t * D + d];
          }
        }
      }
      // dq = R^T dqr, dk = R^T dkr
      std::vector<T> dq = dqr, dk = dkr;
      for (int64_t t = 0; t < L; ++t) {
        rope.apply(t, &dq[t * D], true);
        rope.apply(t, &dk[t * D], true);
      }

      if (p.opt.mode == Mode::Salad && p.do_l) {
        const LinearState<T> st(p, rope, x);
        const T* o_l = static_cast<const T*>(p.o_l) + bh * L * D;
        const T* do_l = static_cast<const T*>(p.do_l) + bh * L * D;
        std::vector<T> dSv(D * D, T(0)), dz(D, T(0)), phiq(D), a(D), dnum(D), da(D), dphi(D), dx(D);
        for (int64_t t = 0; t < L; ++t) {
          feature_map(p.opt.feature, &x.q[t * D], phiq.data(), D);
          a = phiq;
          if (p.opt.linear_rope) rope.apply(t, a.data());
          const T den = dot(phiq.data(), st.z.data(), D) + static_cast<T>(p.opt.eps);
          const T dden = -dot(&do_l[t * D], &o_l[t * D], D) / den;
          for (int64_t e = 0; e < D; ++e) dnum[e] = do_l[t * D + e] / den;
          for (int64_t d = 0; d < D; ++d) {
            da[d] = dot(&st.Sv[d * D], dnum.data(), D);
            for (int64_t e = 0; e < D; ++e) dSv[d * D + e] += a[d] * dnum[e];
            dz[d] += dden * phiq[d];
          }
          if (p.opt.linear_rope) rope.apply(t, da.data(), true);
          for (int64_t d = 0; d < D; ++d) dphi[d] = da[d] + dden * st.z[d];
          feature_map_backward(p.opt.feature, &x.q[t * D], phiq.data(), dphi.data(), dx.data(), D);
          for (int64_t d = 0; d < D; ++d) dq[t * D + d] += dx[d];
        }
        std::vector<T> dc(D);
        for (int64_t t = 0; t < L; ++t) {
          for (int64_t d = 0; d < D; ++d) {
            dc[d] = dot(&dSv[d * D], &x.v[t * D], D);
            for (int64_t e = 0; e < D; ++e) dv[t * D + e] += dSv[d * D + e] * st.c[t * D + d];
          }
          if (p.opt.linear_rope) rope.apply(t, dc.data(), true);
          for (int64_t d = 0; d < D; ++d) dphi[d] = dc[d] + dz[d];
          feature_map_backward(p.opt.feature, &x.k[t * D], &st.phik[t * D], dphi.data(), dx.data(), D);
          for (int64_t d = 0; d < D; ++d) dk[t * D + d] += dx[d];
        }
      }
      std::copy(dq.begin(), dq.end(), static_cast<T*>(p.dq) + bh * L * D);
      std::copy(dk.begin(), dk.end(), static_cast<T*>(p.dk) + bh * L * D);
      std::copy(dv.begin(), dv.end(), static_cast<T*>(p.dv) + bh * L * D);
    }
}

void select_blocks(const Params& p) {
  if (p.opt.mode == Mode::Dense) return;
  const RopeTable rope(p.grid, p.D, p.opt.rope_theta);
  const std::vector<int64_t> order = token_order(p.grid, p.opt);
  const BlockShape bs = p.blocks();
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t bh = b * p.H + h;
      int32_t* idx = p.block_idx + bh * bs.n_q * bs.max_k;
      int32_t* cnt = p.block_cnt + bh * bs.n_q;
      if (p.dtype == DType::F64)
        select_head(p, order, Head<double>(p, rope, b, h), idx, cnt);
      else if (p.dtype == DType::F32)
        select_head(p, order, Head<float>(p, rope, b, h), idx, cnt);
      else
        throw ArgumentError(std::string("dtype: expected float32 or float64 for CPU block selection, got ") +
                            to_string(p.dtype));
    }
}

template void reference_forward<double>(const Params&);
template void reference_forward<float>(const Params&);
template void reference_backward<double>(const BwdParams&);
template void reference_backward<float>(const BwdParams&);

}  // namespace salad::cpu
