// Fused row kernels of the Wan DiT block: residual + (modulated | affine) LayerNorm
// and RMSNorm. One CTA per row; every thread holds NG groups of 8 channels in
// registers (16-byte loads of bf16 / fp16, two 16-byte loads of float32), so
// each row is read once and written once. Reductions: warp shuffles, then the
// per-warp partials in shared memory summed by every warp in a fixed order
// (deterministic). See include/salad/dit_kernels.h for the contracts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "salad/dit_kernels.h"

namespace salad::cuda::dit {
namespace {

constexpr int64_t kMaxChannels = 32768;  // 8 groups of 8 channels x 512 threads

template <class... A>
[[noreturn]] void bad(const A&... a) {
  std::ostringstream s;
  s << "salad::cuda::dit: ";
  (s << ... << a);
  throw std::invalid_argument(s.str());
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::ostringstream s;
    s << "salad::cuda::dit: " << what << " launch failed: " << cudaGetErrorString(e);
    throw std::runtime_error(s.str());
  }
}

// --- 8-element vectors ------------------------------------------------------------

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void load8(const void* base, DType t, int64_t idx, float (&v)[8]) {
  if (t == DType::F32) {
    load8(static_cast<const float*>(base) + idx, v);
    return;
  }
  const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const char*>(base) + idx * 2);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f;
    if (t == DType::BF16) {
      f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    } else {
      f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    }
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(void* base, DType t, int64_t idx, const float (&v)[8]) {
  if (t == DType::F32) {
    float* p = static_cast<float*>(base) + idx;
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (t == DType::BF16) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  *reinterpret_cast<uint4*>(static_cast<char*>(base) + idx * 2) = make_uint4(w[0], w[1], w[2], w[3]);
}

// v rounded to t and back (the eager code's .to(t) between two float32 steps).
__device__ __forceinline__ float round_to(DType t, float v) {
  if (t == DType::BF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (t == DType::F16) return __half2float(__float2half_rn(v));
  return v;
}

// --- reductions ---------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the CTA (blockDim.x a multiple of 32), returned to every thread.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (nw == 1) return v;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float t = lane < nw ? smem[lane] : 0.f;
  t = warp_sum(t);
  __syncthreads();  // smem is reused by the next reduction
  return t;
}

// --- kernels ------------------------------------------------------------------------

template <int NG>
__global__ void __launch_bounds__(NG == 8 ? 512 : 256) residual_norm_kernel(const RowArgs a) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / a.rows_per_sample;
  const int64_t C = a.C, G = C / 8;
  const int64_t base = row * C;
  float v[NG][8];
  bool ok[NG];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NG; ++i) {
    const int64_t g = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    ok[i] = g < G;
#pragma unroll
    for (int j = 0; j < 8; ++j) v[i][j] = 0.f;
    if (!ok[i]) continue;
    const int64_t c = g * 8;
    load8(a.x + base + c, v[i]);
    if (a.y) {
      float y[8];
      load8(a.y, a.y_dtype, base + c, y);
      if (a.gate.ptr) {
        float gt[8];
        load8(a.gate.ptr + b * a.gate.stride + c, gt);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = __fadd_rn(v[i][j], __fmul_rn(y[j], gt[j]));
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = __fadd_rn(v[i][j], y[j]);
      }
      if (a.res_out) store8(a.res_out, DType::F32, base + c, v[i]);
    } else if (a.res_out && a.res_out != a.x) {
      store8(a.res_out, DType::F32, base + c, v[i]);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) sum += v[i][j];
  }
  if (!a.out) return;
  if (a.norm == Norm::None) {
#pragma unroll
    for (int i = 0; i < NG; ++i)
      if (ok[i]) store8(a.out, a.out_dtype, base + (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * 8, v[i]);
    return;
  }
  const float inv_c = 1.f / static_cast<float>(C);
  const float mean = block_sum(sum, smem) * inv_c;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < NG; ++i)
    if (ok[i]) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float d = v[i][j] - mean;
        sq += d * d;
      }
    }
  const float rstd = rsqrtf(block_sum(sq, smem) * inv_c + a.eps);
#pragma unroll
  for (int i = 0; i < NG; ++i) {
    if (!ok[i]) continue;
    const int64_t c = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * 8;
    float p0[8], p1[8], o[8];
    if (a.norm == Norm::Modulated) {
      load8(a.p0.ptr + b * a.p0.stride + c, p0);  // shift
      load8(a.p1.ptr + b * a.p1.stride + c, p1);  // scale
#pragma unroll
      for (int j = 0; j < 8; ++j)
        o[j] = __fadd_rn(__fmul_rn(__fmul_rn(v[i][j] - mean, rstd), __fadd_rn(1.f, p1[j])), p0[j]);
    } else {
      load8(a.p0.ptr + c, p0);  // weight
      if (a.p1.ptr) {
        load8(a.p1.ptr + c, p1);  // bias
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) p1[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = __fadd_rn(__fmul_rn(__fmul_rn(v[i][j] - mean, rstd), p0[j]), p1[j]);
    }
    store8(a.out, a.out_dtype, base + c, o);
  }
}

struct RmsArgs {
  const void* x;
  int64_t x_stride;
  const void* w;
  void* out;
  int64_t out_stride;
  DType t;
  int64_t C;
  float eps;
};

template <int NG>
__global__ void __launch_bounds__(NG == 8 ? 512 : 256) rms_norm_kernel(const RmsArgs a) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const int64_t G = a.C / 8;
  float v[NG][8];
  bool ok[NG];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NG; ++i) {
    const int64_t g = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    ok[i] = g < G;
    if (!ok[i]) continue;
    load8(a.x, a.t, row * a.x_stride + g * 8, v[i]);
#pragma unroll
    for (int j = 0; j < 8; ++j) ss = __fadd_rn(ss, __fmul_rn(v[i][j], v[i][j]));
  }
  // mean(x^2) + eps, then rsqrt: float32 as Wan's (x.float().pow(2).mean(-1) + eps).rsqrt().
  const float r = rsqrtf(__fadd_rn(block_sum(ss, smem) / static_cast<float>(a.C), a.eps));
#pragma unroll
  for (int i = 0; i < NG; ++i) {
    if (!ok[i]) continue;
    const int64_t c = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * 8;
    float w[8], o[8];
    load8(a.w, a.t, c, w);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = __fmul_rn(round_to(a.t, __fmul_rn(v[i][j], r)), w[j]);
    store8(a.out, a.t, row * a.out_stride + c, o);
  }
}

// --- launch ---------------------------------------------------------------------------

struct Shape {
  int ng, threads;
};

// Groups of 8 channels per thread (1, 2, 4 with at most 256 threads, else 8 with at most 512) and the CTA size.
Shape shape_of(int64_t C) {
  const int64_t G = C / 8;
  for (int ng : {1, 2, 4}) {
    const int64_t t = ((G + ng - 1) / ng + 31) / 32 * 32;
    if (t <= 256) return {ng, static_cast<int>(t)};
  }
  return {8, static_cast<int>(((G + 7) / 8 + 31) / 32 * 32)};
}

void check_aligned(const void* p, const char* name) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) bad(name, ": expected a 16-byte aligned pointer");
}

void check_rows(int64_t rows, int64_t C) {
  if (rows < 0) bad("rows: expected >= 0, got ", rows);
  if (rows > INT_MAX) bad("rows: expected at most ", INT_MAX, ", got ", rows);
  if (!supported_channels(C)) bad("C: expected a multiple of 8 in [8, ", kMaxChannels, "], got ", C);
}

void check_per_sample(const PerSample& p, const char* name) {
  check_aligned(p.ptr, name);
  if (p.stride < 0 || p.stride % 8 != 0) bad(name, ": expected a per-sample stride that is a multiple of 8, got ", p.stride);
}

}  // namespace

bool compiled() { return true; }
int64_t max_channels() { return kMaxChannels; }
bool supported_channels(int64_t C) { return C >= 8 && C % 8 == 0 && C <= kMaxChannels; }

void residual_norm(const RowArgs& a, void* stream) {
  check_rows(a.rows, a.C);
  if (a.rows_per_sample <= 0) bad("rows_per_sample: expected > 0, got ", a.rows_per_sample);
  if (!a.x) bad("x: expected a pointer");
  check_aligned(a.x, "x");
  if (a.y) check_aligned(a.y, "y");
  if (a.gate.ptr) {
    if (!a.y) bad("gate: given without y");
    check_per_sample(a.gate, "gate");
  }
  if (a.res_out) check_aligned(a.res_out, "res_out");
  if (a.out) {
    check_aligned(a.out, "out");
    if (a.norm == Norm::Modulated) {
      if (!a.p0.ptr || !a.p1.ptr) bad("modulated norm: expected shift and scale");
      check_per_sample(a.p0, "shift");
      check_per_sample(a.p1, "scale");
    } else if (a.norm == Norm::Affine) {
      if (!a.p0.ptr) bad("affine norm: expected a weight");
      check_aligned(a.p0.ptr, "weight");
      if (a.p1.ptr) check_aligned(a.p1.ptr, "bias");
    }
  }
  if (a.rows == 0 || (!a.out && !a.res_out)) return;
  const Shape s = shape_of(a.C);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(a.rows));
  switch (s.ng) {
    case 1: residual_norm_kernel<1><<<grid, s.threads, 0, st>>>(a); break;
    case 2: residual_norm_kernel<2><<<grid, s.threads, 0, st>>>(a); break;
    case 4: residual_norm_kernel<4><<<grid, s.threads, 0, st>>>(a); break;
    default: residual_norm_kernel<8><<<grid, s.threads, 0, st>>>(a); break;
  }
  check_launch("residual_norm");
}

void modulated_norm(const float* x, void* out, DType out_dtype, int64_t rows, int64_t rows_per_sample, int64_t C,
                    PerSample shift, PerSample scale, float eps, void* stream) {
  RowArgs a;
  a.rows = rows, a.rows_per_sample = rows_per_sample, a.C = C, a.x = x;
  a.norm = Norm::Modulated, a.p0 = shift, a.p1 = scale, a.eps = eps;
  a.out = out, a.out_dtype = out_dtype;
  if (!out) bad("out: expected a pointer");
  residual_norm(a, stream);
}

void gated_residual(const float* x, const void* y, DType y_dtype, PerSample gate, float* out, int64_t rows,
                    int64_t rows_per_sample, int64_t C, void* stream) {
  if (!y || !out) bad("gated_residual: expected y and out");
  RowArgs a;
  a.rows = rows, a.rows_per_sample = rows_per_sample, a.C = C, a.x = x;
  a.y = y, a.y_dtype = y_dtype, a.gate = gate, a.res_out = out;
  residual_norm(a, stream);
}

void layer_norm_affine(const float* x, const float* weight, const float* bias, void* out, DType out_dtype,
                       int64_t rows, int64_t C, float eps, void* stream) {
  if (!out) bad("out: expected a pointer");
  RowArgs a;
  a.rows = rows, a.C = C, a.x = x;
  a.norm = Norm::Affine, a.p0 = {weight, 0}, a.p1 = {bias, 0}, a.eps = eps;
  a.out = out, a.out_dtype = out_dtype;
  residual_norm(a, stream);
}

void rms_norm(const void* x, int64_t x_stride, const void* weight, void* out, int64_t out_stride, DType dtype,
              int64_t rows, int64_t C, float eps, void* stream) {
  check_rows(rows, C);
  if (!x || !weight || !out) bad("rms_norm: expected x, weight and out");
  check_aligned(x, "x");
  check_aligned(weight, "weight");
  check_aligned(out, "out");
  if (x_stride < C || x_stride % 8 != 0) bad("x_stride: expected a multiple of 8 >= C=", C, ", got ", x_stride);
  if (out_stride < C || out_stride % 8 != 0) bad("out_stride: expected a multiple of 8 >= C=", C, ", got ", out_stride);
  if (rows == 0) return;
  RmsArgs a{x, x_stride, weight, out, out_stride, dtype, C, eps};
  const Shape s = shape_of(C);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(rows));
  switch (s.ng) {
    case 1: rms_norm_kernel<1><<<grid, s.threads, 0, st>>>(a); break;
    case 2: rms_norm_kernel<2><<<grid, s.threads, 0, st>>>(a); break;
    case 4: rms_norm_kernel<4><<<grid, s.threads, 0, st>>>(a); break;
    default: rms_norm_kernel<8><<<grid, s.threads, 0, st>>>(a); break;
  }
  check_launch("rms_norm");
}

}  // namespace salad::cuda::dit
