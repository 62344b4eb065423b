// Small device helpers shared by the CUDA kernels: error checks, element
// types, warp-level tensor-core primitives (ldmatrix / mma.sync m16n8k16),
// cp.async and the 3-D RoPE lookups. sm_80-style instructions; they run on
// Hopper (sm_90a) as well.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "../fastdiv.h"
#include "salad/layout.h"
#include "salad/params.h"

namespace salad::cuda::detail {

inline void check(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess) {
    std::ostringstream s;
    s << "salad::cuda: " << what << " failed at " << file << ":" << line << ": "
      << cudaGetErrorString(e);
    throw std::runtime_error(s.str());
  }
}
#define SALAD_CUDA_CHECK(x) ::salad::cuda::detail::check((x), #x, __FILE__, __LINE__)
#define SALAD_LAUNCH_CHECK() ::salad::cuda::detail::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// ---------------------------------------------------------------- element types
template <class T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&u);
    return __bfloat1622float2(h);
  }
};
template <>
struct Elem<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    __half2 h = *reinterpret_cast<__half2*>(&u);
    return __half22float2(h);
  }
};

// ---------------------------------------------------------------- tensor cores
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                                  uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// D(16x8, f32) += A(16x16) * B(16x8); A row-major fragment a[4], B "col" fragment b[2].
template <class T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte async copy; src_bytes 0 zero-fills the destination (masked rows).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 32-bit shared-memory addresses (no 64-bit generic pointer per access); volatile, so their order
// among each other and around __syncwarp stays as written.
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v));
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// Tile of rows x D 16-bit elements in shared memory, 16-byte chunks XOR-swizzled
// by (row & 7) so that ldmatrix over 8 rows of one chunk column hits 8 bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// A fragments (m16 x k16 per kk, the mma.sync / wgmma register-A order) of a warp's 16-row tile X
// and, interleaved, of a second tile Y, both swz<D>-swizzled, D columns.
template <int D, class T>
__device__ __forceinline__ void load_a_frags2(const T* X, uint32_t (&a)[D / 16][4], const T* Y, uint32_t (&b)[D / 16][4],
                                              int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = kk * 16 + (lane >> 4) * 8;
    ldmatrix_x4(smem_addr(X + swz<D>(r, c)), a[kk][0], a[kk][1], a[kk][2], a[kk][3]);
    ldmatrix_x4(smem_addr(Y + swz<D>(r, c)), b[kk][0], b[kk][1], b[kk][2], b[kk][3]);
  }
}

// Warp tile products of the mma.sync kernels (attn_fwd.cu, attn_bwd.cu), on swizzled tiles.
// acc(16 x N) = A(16 x D, smem rows arow ..) * B^T, with B N rows x D in shared memory.
template <class T, int D, int N>
__device__ __forceinline__ void warp_rows_by_rows(float (&acc)[N / 8][4], const T* As, int arow, const T* Bs,
                                                  int lane) {
#pragma unroll
  for (int i = 0; i < N / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(smem_addr(As + swz<D>(arow + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 16 + (lane >> 4) * 8)),
                af[0], af[1], af[2], af[3]);
#pragma unroll
    for (int n2 = 0; n2 < N / 16; ++n2) {
      uint32_t b0, b1, b2, b3;
      ldmatrix_x4(smem_addr(Bs + swz<D>(n2 * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8)),
                  b0, b1, b2, b3);
      mma16816<T>(acc[2 * n2], af, b0, b1);
      mma16816<T>(acc[2 * n2 + 1], af, b2, b3);
    }
  }
}

// acc(16 x D) += P(16 x K, fp32 accumulator fragments, packed to T here) * B(K rows x D in shared memory).
template <class T, int D, int K>
__device__ __forceinline__ void warp_p_by_rows(float (&acc)[D / 8][4], const float (&p)[K / 8][4], const T* Bs,
                                               int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t pf[4];
    pf[0] = Elem<T>::pack(p[2 * kk][0], p[2 * kk][1]);
    pf[1] = Elem<T>::pack(p[2 * kk][2], p[2 * kk][3]);
    pf[2] = Elem<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    pf[3] = Elem<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int d2 = 0; d2 < D / 16; ++d2) {
      uint32_t b0, b1, b2, b3;
      ldmatrix_x4_trans(
          smem_addr(Bs + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, d2 * 16 + (lane >> 4) * 8)), b0, b1,
          b2, b3);
      mma16816<T>(acc[2 * d2], pf, b0, b1);
      mma16816<T>(acc[2 * d2 + 1], pf, b2, b3);
    }
  }
}

// ---------------------------------------------------------------- RoPE / order
// Everything the kernels need to rotate a token and map block order <-> caller order.
struct RopeInfo {
  const float2* table = nullptr;  // (F + Hg + Wg) x (D/2) (cos, sin) pairs, see rope_table
  const int32_t* perm = nullptr;  // block position -> raster token; null = identity
  int64_t gh = 1, gw = 1;         // grid rows / columns
  int64_t gf = 1;
  int pf = 0, ph = 0;             // pairs rotated by the frame / row axis (rest: column)
  FastDiv div_gw, div_ghw;        // token -> (frame, row, column) without hardware division
};

// Raster token t (< 2^31) -> its (frame, row, column) in the grid, through FastDiv.
struct TokPos {
  uint32_t f, h, w;
};
__device__ __forceinline__ TokPos tok_pos(const RopeInfo& r, uint32_t t) {
  const uint32_t f = r.div_ghw.div(t), rem = t - f * r.div_ghw.d, h = r.div_gw.div(rem);
  return {f, h, rem - h * r.div_gw.d};
}

// (cos, sin) of channel pair m at raster token t.
__device__ __forceinline__ float2 rope_cs(const RopeInfo& r, int64_t t, int m, int half_d) {
  int64_t w = t % r.gw, h = (t / r.gw) % r.gh, f = t / (r.gw * r.gh);
  int64_t row = m < r.pf ? f : (m < r.pf + r.ph ? r.gf + h : r.gf + r.gh + w);
  return r.table[row * half_d + m];
}

__host__ __device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ int64_t perm_at(const int32_t* perm, int64_t p) {
  return perm ? static_cast<int64_t>(perm[p]) : p;
}

}  // namespace salad::cuda::detail
