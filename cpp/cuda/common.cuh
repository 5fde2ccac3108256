// Shared pieces of the CUDA kernels: a side by value (codebook included),
// cooperative shared-memory rotation, dtype loads/stores, and the host helpers
// that guard against running while a CUDA graph is being captured.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <iterator>

#include "../op_checks.h"
#include "device_config.h"
#include "graph_errors.cuh"
#include "turbokv/codec.h"
#include "turbokv/signs.h"

namespace turbokv::cuda {

// Everything a kernel needs to know about one side, passed by value: a PackedSide (op_checks.h)
// with its codebook and rotation signs copied in (device_side).
struct DeviceSide {
  int fmt, family, bits, d, dp, g, group_bytes, row_bytes;
  int rot_group, seeded;
  unsigned long long seed;
  float cb[16];
  float mids[16];
  // Bit i = 1 where sign i of the seeded rotation's 2 * rot_group stream is -1 (rot_group <=
  // 512): computed once on the host, so kernels test a bit instead of hashing per element.
  uint32_t sign_bits[32];
};

// The rotation fields of a side: group n (0: none) and, when seeded, its 2n signs as bits.
inline void set_sign_bits(DeviceSide& v, int n, bool seeded, uint64_t seed) {
  v.rot_group = n;
  v.seeded = seeded ? 1 : 0;
  v.seed = seed;
  for (uint32_t& w : v.sign_bits) w = 0u;
  if (!seeded || n <= 0) return;
  TORCH_CHECK(n <= 512, "rotation group ", n, " > 512");
  // Every attention / cache_append call asks for the same few rotations (K and V of each
  // model): hashing 2n signs costs about a microsecond per side, a lookup here nothing.
  struct Entry {
    int n = 0;
    uint64_t seed = 0;
    uint32_t bits[32] = {};
  };
  static thread_local Entry cache[4];
  static thread_local int next = 0;
  for (const Entry& c : cache)
    if (c.n == n && c.seed == seed) {
      std::copy(std::begin(c.bits), std::end(c.bits), std::begin(v.sign_bits));
      return;
    }
  for (int i = 0; i < 2 * n; ++i)
    if (sign_at(seed, static_cast<uint64_t>(i)) < 0.0f) v.sign_bits[i >> 5] |= 1u << (i & 31);
  Entry& c = cache[next];
  next = (next + 1) % 4;
  c.n = n;
  c.seed = seed;
  std::copy(std::begin(v.sign_bits), std::end(v.sign_bits), std::begin(c.bits));
}

inline DeviceSide device_side(const PackedSide& s) {
  DeviceSide v{};
  const RowLayout& L = s.layout;
  v.fmt = L.fmt;
  v.family = static_cast<int>(L.family);
  v.bits = L.bits;
  v.d = L.d;
  v.dp = L.dp;
  v.g = L.g;
  v.group_bytes = L.group_bytes;
  v.row_bytes = L.row_bytes;
  set_sign_bits(v, s.rot_group, s.seeded, s.seed);
  if (L.codebook) {
    for (int i = 0; i < (1 << L.bits); ++i) v.cb[i] = L.codebook[i];
    for (int i = 0; i + 1 < (1 << L.bits); ++i) v.mids[i] = L.midpoints[i];
  }
  return v;
}

// max that propagates NaN (fmaxf drops it): a NaN score makes its row NaN, as SDPA's softmax
// does, instead of being taken for a masked key. One instruction, like fmaxf (sm_80+).
__device__ __forceinline__ float nan_max(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// True when the current stream is capturing a CUDA graph: host syncs are not allowed then.
inline bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

// The first check of every CUDA op: its first tensor is a CUDA one, the kernels have an image
// for its device (device_config.h), and no error is pending from a CUDA graph's kernels
// (graph_errors.cuh).
inline void check_cuda(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.is_cuda(), arg, ": got device ", t.device(), ", expected a CUDA tensor for this kernel");
  (void)device_config(t.device().index());
  raise_graph_error();
}

// Resets a non-sticky error that an earlier, unchecked runtime call (ours or a library's) left
// behind, so the cudaGetLastError after our launches reports our launches only. Sticky errors
// (a faulted context) are returned by every later call anyway.
inline void clear_stale_error() { (void)cudaGetLastError(); }

// Programmatic dependent launch (sm_90 and newer): a kernel that leaves partial results lets
// the kernel that consumes them launch while it still runs (the consumer's blocks take SMs
// as they free up, instead of after a launch gap), and the consumer waits for the whole
// producer grid and its memory before its first read. Compiled out below sm_90, where the
// host launches without the early-launch attribute (DeviceConfig::pdl).
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_producer_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A global load of a 64-bit value that stays where it is written relative to other asm
// volatile statements (the cp.async copies, the fences above): issued before a burst of
// cp.async, it does not queue behind the burst in the memory pipeline, as a plain load the
// compiler placed after it would.
__device__ __forceinline__ int64_t load_before_copies(const int64_t* p) {
  int64_t v;
  asm volatile("ld.global.b64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}

#define TKV_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t err_ = (expr);                                                    \
    TORCH_CHECK(err_ == cudaSuccess, "turbokv CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

// Streaming multiprocessors of a device (sizes grids of resident blocks).
inline int sm_count(int device) { return device_config(device).sms; }

// PTX prmt: __byte_perm ignores bit 3 of each selector nibble (the hardware's sign-replicate
// mode), which costs a mask (LOP3 & 0x7777) before every table lookup. Every selector here
// has bit 3 clear already, so the instruction is used as it is.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// Bit i of the low 16 bits -> bit 2i.
__device__ __forceinline__ uint32_t spread16(uint32_t x) {
  x = prmt(x, 0, 0x4140);  // byte 0 -> bits 0-7, byte 1 -> bits 16-23
  x = (x | (x << 4)) & 0x0f0f0f0fu;
  x = (x | (x << 2)) & 0x33333333u;
  return (x | (x << 1)) & 0x55555555u;
}

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

// Block-diagonal rotation of `len` values in shared memory by all threads of the block, in
// groups of the side's rot_group (a power of two): the same butterfly order and roundings as
// fwht.h (bit-identical in fp32), with the signs read from the side's precomputed bits and
// the butterfly indices from shifts. Callers synchronise before (data ready); this returns
// synchronised.
template <typename T>
__device__ void rotate_side(T* x, int len, const DeviceSide& s, bool inverse) {
  const int tid = threadIdx.x, nt = blockDim.x, n = s.rot_group, lg = __ffs(n) - 1;
  const int pre_off = inverse ? n : 0, post_off = inverse ? 0 : n;
  const auto sign = [&](int i) { return static_cast<T>(((s.sign_bits[i >> 5] >> (i & 31)) & 1u) ? -1.0f : 1.0f); };
  if (s.seeded)
    for (int i = tid; i < len; i += nt) x[i] *= sign(pre_off + (i & (n - 1)));
  __syncthreads();
  for (int lh = 0; lh < lg; ++lh) {
    const int h = 1 << lh;
    for (int p = tid; p < len / 2; p += nt) {
      const int blk = p >> (lg - 1), q = p & (n / 2 - 1);
      const int i = (blk << lg) + ((q >> lh) << (lh + 1)) + (q & (h - 1));
      const T a = x[i], b = x[i + h];
      x[i] = a + b;
      x[i + h] = a - b;
    }
    __syncthreads();
  }
  const T inv = static_cast<T>(1.0 / sqrt(static_cast<double>(n)));
  for (int i = tid; i < len; i += nt) {
    T v = x[i] * inv;
    if (s.seeded) v *= sign(post_off + (i & (n - 1)));
    x[i] = v;
  }
  __syncthreads();
}

__device__ __forceinline__ float decode_at(const DeviceSide& s, const float* cb, const uint8_t* row, int j) {
  return decode_element(s.fmt, static_cast<Family>(s.family), s.bits, s.g, s.group_bytes, row, j, cb);
}

}  // namespace turbokv::cuda
