// Rotation of 32 * E values held in the registers of one warp: lane l holds the E contiguous
// values l*E .. l*E + E-1. Butterflies with h < E stay in a lane; the others exchange with
// lane l ^ (h / E) through shuffles. Same butterfly order and roundings as fwht.h, so the
// results are bit-identical to the CPU kernel and to rotate_side (shared memory). Used where a
// row or a chunk fits one warp (cache_append / quantize rows, the hadamard op): no shared
// memory, no block barriers, loads and stores as wide as the lane's E values.
#pragma once

#include "common.cuh"

namespace turbokv::cuda {

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// What a lane needs to rotate its values: the group n (0: no rotation), 1 / sqrt(n), and the
// sign flips (bit e: the lane's value e is multiplied by -1 before / after the transform).
// Loop invariant: made once per warp, not per row.
template <typename A>
struct LaneRotation {
  int n = 0;
  uint32_t pre = 0u, post = 0u;
  A inv = A(1);
};

// The lane's rotation for chunks of 32 * E values (a whole number of groups of rot_group).
template <int E, typename A = float>
__device__ __forceinline__ LaneRotation<A> lane_rotation(const DeviceSide& s, bool inverse) {
  static_assert(E <= 32, "a lane holds at most 32 values");
  LaneRotation<A> r;
  r.n = s.rot_group;
  if (r.n == 0) return r;
  r.inv = static_cast<A>(1.0 / sqrt(static_cast<double>(r.n)));
  if (!s.seeded) return r;
  const int n = s.rot_group, lane = static_cast<int>(threadIdx.x & 31u);
  const int pre_off = inverse ? n : 0, post_off = inverse ? 0 : n;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = (lane * E + e) & (n - 1), a = pre_off + i, b = post_off + i;
    r.pre |= ((s.sign_bits[a >> 5] >> (a & 31)) & 1u) << e;
    r.post |= ((s.sign_bits[b >> 5] >> (b & 31)) & 1u) << e;
  }
  return r;
}

// lane_rotation in two steps, for lanes of E values (E dividing 32) and groups of at least E:
// a lane's E signs per side are then E consecutive bits of one word. lane_sign_words issues
// the two word loads; lane_rotation(s, words, inverse) builds the same rotation from them
// later, so a wait on the loads (a cold constant cache) does not hold up the work between
// (the decode kernels' query prologue requests its first keys in between).
struct LaneSignWords {
  uint32_t pre = 0u, post = 0u;
};

template <int E>
__device__ __forceinline__ LaneSignWords lane_sign_words(const DeviceSide& s, bool inverse) {
  static_assert(32 % E == 0, "a lane's signs in one word");
  LaneSignWords w;
  if (s.rot_group == 0 || !s.seeded) return w;
  const int n = s.rot_group, i0 = (static_cast<int>(threadIdx.x & 31u) * E) & (n - 1);
  w.pre = s.sign_bits[((inverse ? n : 0) + i0) >> 5];
  w.post = s.sign_bits[((inverse ? 0 : n) + i0) >> 5];
  return w;
}

template <int E>
__device__ __forceinline__ LaneRotation<float> lane_rotation(const DeviceSide& s, const LaneSignWords& w,
                                                             bool inverse) {
  LaneRotation<float> r;
  r.n = s.rot_group;
  if (r.n == 0) return r;
  // 1 / sqrt(n) rounded to float, the value of lane_rotation's fp64 route (n = 2^k: 2^(-k/2),
  // or 2^(-(k-1)/2) times the float nearest 1 / sqrt(2): a power-of-two scaling keeps the
  // rounding), without an fp64 square root and divide.
  const int k = __ffs(r.n) - 1;
  r.inv = ldexpf(k % 2 ? 0.70710677f : 1.0f, -(k / 2));
  const int n = r.n, i0 = (static_cast<int>(threadIdx.x & 31u) * E) & (n - 1);
  constexpr uint32_t mask = E == 32 ? ~0u : (1u << E) - 1u;
  r.pre = (w.pre >> (((inverse ? n : 0) + i0) & 31)) & mask;
  r.post = (w.post >> (((inverse ? 0 : n) + i0) & 31)) & mask;
  return r;
}

// x, as a value the compiler cannot treat as loop invariant (an asm it must run in place).
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("mov.b32 %0, %0;" : "+r"(x));
  return x;
}

// In place, v <- s_post * H_N(s_pre * v) / sqrt(N) per group of N (a power of two dividing
// 32 * E), N fixed at compile time so the butterflies are straight-line code.
template <int E, int N, typename A>
__device__ __forceinline__ void warp_rotate_n(A (&v)[E], const LaneRotation<A>& r) {
  const unsigned lane = threadIdx.x & 31u;
#pragma unroll
  for (int e = 0; e < E; ++e)
    if ((r.pre >> e) & 1u) v[e] = -v[e];
#pragma unroll
  for (int h = 1; h < E && h < N; h <<= 1) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (e & h) continue;
      const A a = v[e], b = v[e + h];
      v[e] = a + b;
      v[e + h] = a - b;
    }
  }
#pragma unroll
  for (int m = 1; m < 32 && m * E < N; m <<= 1) {
    // The lower lane of a pair computes a + b, the upper one a - b, as fma(+-1, own, partner):
    // +-own is exact, so this rounds exactly like the two-operand add / subtract.
    const A sg = (lane & static_cast<unsigned>(m)) ? A(-1) : A(1);
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = fma_rn(sg, v[e], __shfl_xor_sync(0xffffffffu, v[e], m));
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const A y = v[e] * r.inv;
    v[e] = ((r.post >> e) & 1u) ? -y : y;
  }
}

// warp_rotate_n for the lane rotation's group (16..512; nothing when it is 0). All 32 lanes
// must call it (shuffles).
template <int E, typename A>
__device__ __forceinline__ void warp_rotate(A (&v)[E], const LaneRotation<A>& r) {
  switch (r.n) {
    case 16:
      return warp_rotate_n<E, 16>(v, r);
    case 32:
      return warp_rotate_n<E, 32>(v, r);
    case 64:
      return warp_rotate_n<E, 64>(v, r);
    case 128:
      return warp_rotate_n<E, 128>(v, r);
    case 256:
      if constexpr (32 * E >= 256) return warp_rotate_n<E, 256>(v, r);
      return;
    case 512:
      if constexpr (32 * E >= 512) return warp_rotate_n<E, 512>(v, r);
      return;
    default:
      return;
  }
}

// E values of T at p (aligned to their total size, or to 16 bytes beyond that).
template <typename T, int E>
struct alignas(E * sizeof(T) < 16 ? E * sizeof(T) : 16) LaneVec {
  T v[E];
};

// The same E values as raw 32-bit words: moved and converted a word (two 16-bit values) at a
// time, where an array of 16-bit values costs a PRMT per value to split and re-pack.
template <typename T, int E>
struct alignas(16) LaneWords {
  static constexpr int kWords = E * static_cast<int>(sizeof(T)) / 4;
  static_assert(kWords % 4 == 0, "whole 16-byte words");
  uint32_t w[kWords];
};

__device__ __forceinline__ float2 word_to_float2(uint32_t w, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
__device__ __forceinline__ float2 word_to_float2(uint32_t w, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
}

template <typename T, int E>
__device__ __forceinline__ void to_floats(const LaneWords<T, E>& in, float (&v)[E]) {
#pragma unroll
  for (int i = 0; i < LaneWords<T, E>::kWords; ++i) {
    if constexpr (sizeof(T) == 4) {
      v[i] = __uint_as_float(in.w[i]);
    } else {
      const float2 f = word_to_float2(in.w[i], T{});
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
}

}  // namespace turbokv::cuda
