// Fused row kernels of the Wan DiT block (torch-free; src/kernels/cuda/dit.cu,
// host stubs that throw in src/kernels/cuda_dit_stub.cpp when CUDA is off).
//
// Every kernel works on `rows` rows of `C` channels (the tokens of B samples,
// `rows_per_sample` rows each; row r belongs to sample r / rows_per_sample).
// Per-sample vectors (shift, scale, gate) are float32, C contiguous, `stride`
// elements from one sample to the next (0: one vector for every sample), as the
// (B, 1, C) chunks of Wan's (B, 6, C) modulation are. Requirements, checked by
// every entry point (std::invalid_argument): C % 8 == 0 and C <= max_channels();
// every pointer 16-byte aligned; every row stride and per-sample stride a
// multiple of 8 elements. Math is float32 with the rounding order of the eager
// LibTorch code (products and sums rounded separately, no FMA contraction):
// the only differences from it are the order of the row reductions.
// `stream` is a cudaStream_t.
#pragma once

#include <cstdint>

namespace salad::cuda::dit {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct PerSample {
  const float* ptr = nullptr;  // null: absent
  int64_t stride = 0;          // elements between samples
};

// True when this build has the kernels.
bool compiled();
// The widest row the kernels take (32768).
int64_t max_channels();
// C % 8 == 0 and 8 <= C <= max_channels().
bool supported_channels(int64_t C);

// One pass over the float32 residual stream x (rows, C), contiguous:
//   r = x + y * gate[b]    (y given; gate.ptr null: r = x + y), else r = x
//   res_out = r            (when res_out is not null; may alias x)
//   out = norm(r)          (when out is not null), in out_dtype:
//     Norm::None:      r
//     Norm::Modulated: LN(r) * (1 + p1[b]) + p0[b]       (p0 = shift, p1 = scale; LN without affine)
//     Norm::Affine:    LN(r) * p0 + p1                    (weight, bias; stride 0; p1.ptr null: no bias)
// LN uses the two-pass mean / variance of the row in float32 (biased), eps inside the rsqrt.
enum class Norm : int { None = 0, Modulated = 1, Affine = 2 };
struct RowArgs {
  int64_t rows = 0, rows_per_sample = 1, C = 0;
  const float* x = nullptr;
  const void* y = nullptr;
  DType y_dtype = DType::BF16;
  PerSample gate;
  float* res_out = nullptr;
  Norm norm = Norm::None;
  PerSample p0, p1;
  float eps = 1e-6f;
  void* out = nullptr;
  DType out_dtype = DType::BF16;
};
void residual_norm(const RowArgs& a, void* stream);

// Conveniences over residual_norm.
// (a) out = LN(x) * (1 + scale[b]) + shift[b] in out_dtype.
void modulated_norm(const float* x, void* out, DType out_dtype, int64_t rows, int64_t rows_per_sample, int64_t C,
                    PerSample shift, PerSample scale, float eps, void* stream);
// (b) out = x + y * gate[b] (gate.ptr null: x + y), float32; out may alias x.
void gated_residual(const float* x, const void* y, DType y_dtype, PerSample gate, float* out, int64_t rows,
                    int64_t rows_per_sample, int64_t C, void* stream);
// (d) out = LN(x) * weight + bias (bias may be null), weight / bias float32 (C).
void layer_norm_affine(const float* x, const float* weight, const float* bias, void* out, DType out_dtype,
                       int64_t rows, int64_t C, float eps, void* stream);

// (c) Wan's RMSNorm: out = T(T(x * rsqrt(mean(x^2) + eps)) * w), with T the
// dtype of x and w (both `dtype`), the mean over each row in float32; the
// product rounded to T before the weight multiplies it, as
// (x.float() * rsqrt(...)).type_as(x) * weight does. Row strides in elements
// (x_stride, out_stride >= C); out may alias x (in place).
void rms_norm(const void* x, int64_t x_stride, const void* weight, void* out, int64_t out_stride, DType dtype,
              int64_t rows, int64_t C, float eps, void* stream);

}  // namespace salad::cuda::dit
