// Shared pieces of the CUDA kernels: a by-value side spec (codebook included),
// cooperative shared-memory rotation, dtype loads/stores, and the host helpers
// that guard against running while a CUDA graph is being captured.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../op_checks.h"
#include "turbokv/codec.h"
#include "turbokv/signs.h"

namespace turbokv::cuda {

// Everything a kernel needs to know about one side, passed by value.
struct DevSide {
  int fmt, family, bits, d, dp, g, group_bytes, row_bytes;
  int rot_group, seeded;
  unsigned long long seed;
  float cb[16];
  float mids[16];
};

inline DevSide dev_side(const SideSpec& s) {
  DevSide v{};
  const RowLayout& L = s.layout;
  v.fmt = L.fmt;
  v.family = static_cast<int>(L.family);
  v.bits = L.bits;
  v.d = L.d;
  v.dp = L.dp;
  v.g = L.g;
  v.group_bytes = L.group_bytes;
  v.row_bytes = L.row_bytes;
  v.rot_group = s.rot_group;
  v.seeded = s.seeded ? 1 : 0;
  v.seed = s.seed;
  if (L.codebook) {
    for (int i = 0; i < (1 << L.bits); ++i) v.cb[i] = L.codebook[i];
    for (int i = 0; i + 1 < (1 << L.bits); ++i) v.mids[i] = L.midpoints[i];
  }
  return v;
}

// True when the current stream is capturing a CUDA graph: host syncs are not allowed then.
inline bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

inline void check_cuda(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.is_cuda(), arg, ": got device ", t.device(), ", expected a CUDA tensor for this kernel");
}

// Resets a non-sticky error that an earlier, unchecked runtime call (ours or a library's) left
// behind, so the cudaGetLastError after our launches reports our launches only. Sticky errors
// (a faulted context) are returned by every later call anyway.
inline void clear_stale_error() { (void)cudaGetLastError(); }

#define TKV_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t err_ = (expr);                                                    \
    TORCH_CHECK(err_ == cudaSuccess, "turbokv CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Block-diagonal rotation of `len` values in shared memory, groups of n, by all threads
// of the block. Same butterfly order and roundings as fwht.h (bit-identical in fp32).
// Callers synchronise before (data ready); this returns synchronised.
template <typename T>
__device__ void rotate_smem(T* x, int len, int n, bool seeded, unsigned long long seed, bool inverse) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int pre_off = inverse ? n : 0, post_off = inverse ? 0 : n;
  if (seeded)
    for (int i = tid; i < len; i += nt) x[i] *= static_cast<T>(sign_at(seed, pre_off + (i % n)));
  __syncthreads();
  for (int h = 1; h < n; h <<= 1) {
    for (int p = tid; p < len / 2; p += nt) {
      const int blk = p / (n / 2), q = p % (n / 2);
      const int i = blk * n + (q / h) * 2 * h + (q % h);
      const T a = x[i], b = x[i + h];
      x[i] = a + b;
      x[i + h] = a - b;
    }
    __syncthreads();
  }
  const T inv = static_cast<T>(1.0 / sqrt(static_cast<double>(n)));
  for (int i = tid; i < len; i += nt) {
    T v = x[i] * inv;
    if (seeded) v *= static_cast<T>(sign_at(seed, post_off + (i % n)));
    x[i] = v;
  }
  __syncthreads();
}

__device__ __forceinline__ float decode_at(const DevSide& s, const float* cb, const uint8_t* row, int j) {
  return decode_element(s.fmt, static_cast<Family>(s.family), s.bits, s.g, s.group_bytes, row, j, cb);
}

}  // namespace turbokv::cuda
