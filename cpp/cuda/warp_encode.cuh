// Encoding of one row by one warp, after warp_rotate: lane l holds the E rotated values
// l*E .. l*E + E-1 of a row of dp = 32 * E values and writes its share of the packed bytes
// into a per-warp staging row in shared memory; the warp then copies the row out with the
// widest stores its alignment allows. The steps and roundings are codec.h's (encode_block,
// encode_turbo_group), with the per-block / per-group reductions done by shuffles across the
// lanes of the block or group: block formats give identical bytes (max, min and first-argmax
// do not depend on the order), turbo sums of squares run in another order (fp64).
#pragma once

#include "warp_rotate.cuh"

namespace turbokv::cuda {

constexpr float kFltMax = 3.4028234663852886e38f;

// Reductions over aligned groups of `width` lanes (a power of two <= 32); every lane calls.
template <typename V, typename Op>
__device__ __forceinline__ V lanes_reduce(V v, int width, Op op) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1)
    if (o < width) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }

// fp16 / bf16 bits with codec.h's NaN encoding (the hardware conversion elsewhere: both RNE).
__device__ __forceinline__ uint16_t f16_bits(float x) {
  if (x != x) return static_cast<uint16_t>(((__float_as_uint(x) >> 16) & 0x8000u) | 0x7e00u);
  return __half_as_ushort(__float2half_rn(x));
}
__device__ __forceinline__ uint16_t bf16_bits(float x) {
  if (x != x) return static_cast<uint16_t>((__float_as_uint(x) >> 16) | 0x40u);
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <int E>
__device__ __forceinline__ void encode_float_lane(const float (&v)[E], bool bf16, uint8_t* stage) {
  LaneVec<uint16_t, E> w;
#pragma unroll
  for (int e = 0; e < E; ++e) w.v[e] = bf16 ? bf16_bits(v[e]) : f16_bits(v[e]);
  reinterpret_cast<LaneVec<uint16_t, E>*>(stage)[lane_id()] = w;
}

// codec.h's trunc_clip without branches: fmaxf drops a NaN (-> 0), clamp, then truncate.
__device__ __forceinline__ int trunc_clamp(float v, int hi) {
  return __float2int_rz(fminf(fmaxf(v, 0.0f), static_cast<float>(hi)));
}

// ggml block-32 format FMT: a block spans G = 32 / E lanes.
template <int E, int FMT>
__device__ __forceinline__ void encode_block_lane(const float (&v)[E], int block_bytes, uint8_t* stage) {
  constexpr int G = 32 / E;
  const int gl = static_cast<int>(lane_id()) & (G - 1), j0 = gl * E;
  uint8_t* out = stage + (lane_id() / G) * block_bytes;
  int bad = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) bad |= !(fabsf(v[e]) <= kFltMax);
  bad = lanes_reduce(bad, G, [](int a, int b) { return a | b; });
  if constexpr (FMT == kFmt_q8_0) {
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) amax = fmaxf(amax, fabsf(v[e]));
    amax = lanes_reduce(amax, G, [](float a, float b) { return fmaxf(a, b); });
    const float d = amax / 127.0f, id = (d == 0.0f) ? 0.0f : 1.0f / d;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float r = ggml_roundf(v[e] * id);
      const int q = (r == r && !bad) ? static_cast<int>(fmaxf(-128.0f, fminf(127.0f, r))) : 0;
      out[2 + j0 + e] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
    if (gl == 0) store_u16(out, bad ? uint16_t{0x7e00} : f16_bits(d));
    return;
  }
  constexpr bool with_min = (FMT == kFmt_q4_1 || FMT == kFmt_q5_1), five = (FMT == kFmt_q5_0 || FMT == kFmt_q5_1);
  constexpr int qmax = five ? 31 : 15;
  float d, mn = 0.0f, offset;
  if constexpr (with_min) {
    float mx = v[0];
    mn = v[0];
#pragma unroll
    for (int e = 1; e < E; ++e) {
      mx = fmaxf(mx, v[e]);
      mn = fminf(mn, v[e]);
    }
    mx = lanes_reduce(mx, G, [](float a, float b) { return fmaxf(a, b); });
    mn = lanes_reduce(mn, G, [](float a, float b) { return fminf(a, b); });
    d = (mx - mn) / static_cast<float>(qmax);
    offset = 0.5f;
  } else {
    // Signed value of largest magnitude, the first one on ties (numpy argmax): first within the
    // lane, then the lower lane.
    float best = v[0], best_abs = fabsf(v[0]);
#pragma unroll
    for (int e = 1; e < E; ++e)
      if (fabsf(v[e]) > best_abs) {
        best_abs = fabsf(v[e]);
        best = v[e];
      }
    int from = gl;
    for (int o = 1; o < G; o <<= 1) {
      const float pa = __shfl_xor_sync(0xffffffffu, best_abs, o), pb = __shfl_xor_sync(0xffffffffu, best, o);
      const int pf = __shfl_xor_sync(0xffffffffu, from, o);
      if (pa > best_abs || (pa == best_abs && pf < from)) {
        best_abs = pa;
        best = pb;
        from = pf;
      }
    }
    d = best / (five ? -16.0f : -8.0f);
    offset = five ? 16.5f : 8.5f;
  }
  const float id = (d == 0.0f) ? 0.0f : 1.0f / d;
  int q[E];
  uint32_t qh = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    q[e] = bad ? 0 : trunc_clamp((with_min ? (v[e] - mn) * id : v[e] * id) + offset, qmax);
    qh |= static_cast<uint32_t>((q[e] >> 4) & 1) << (j0 + e);
  }
  uint8_t* p = out + 2;
  if constexpr (with_min) {
    if (gl == 0) store_u16(p, bad ? uint16_t{0x7e00} : f16_bits(mn));
    p += 2;
  }
  if constexpr (five) {
    qh = lanes_reduce(qh, G, [](uint32_t a, uint32_t b) { return a | b; });
    if (gl == 0)
      for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(qh >> (8 * b));
    p += 4;
  }
  // qs[j] = q[j] | q[j + 16] << 4: values j + 16 sit in the lane 16 / E up, same registers.
  // Nibbles travel packed, E <= 8 of them in one shuffle.
  if constexpr (E <= 8) {
    uint32_t nib = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) nib |= static_cast<uint32_t>(q[e] & 0xf) << (4 * e);
    const uint32_t hi = __shfl_xor_sync(0xffffffffu, nib, 16 / E);
    if (j0 < 16)
#pragma unroll
      for (int e = 0; e < E; ++e)
        p[j0 + e] = static_cast<uint8_t>(((nib >> (4 * e)) & 0xfu) | (((hi >> (4 * e)) & 0xfu) << 4));
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int hi = __shfl_xor_sync(0xffffffffu, q[e], 16 / E);
      if (j0 + e < 16) p[j0 + e] = static_cast<uint8_t>((q[e] & 0xf) | ((hi & 0xf) << 4));
    }
  }
  if (gl == 0) store_u16(out, bad ? uint16_t{0x7e00} : f16_bits(d));
}

// Packs field (k >> shift) & (2^W - 1) of each value, 8 / W values per byte, value j of the
// group at bits (j % (8 / W)) * W of byte j / (8 / W): the lane's own bytes, or (E < 8 / W)
// one byte ORed together over 8 / (W * E) lanes.
template <int E, int W>
__device__ __forceinline__ void pack_fields(const int (&k)[E], int shift, uint8_t* dst, int j0) {
  constexpr int V = 8 / W;
  constexpr uint32_t mask = (1u << W) - 1u;
  if constexpr (E >= V) {
#pragma unroll
    for (int t = 0; t < E / V; ++t) {
      uint32_t b = 0;
#pragma unroll
      for (int i = 0; i < V; ++i) b |= ((static_cast<uint32_t>(k[t * V + i]) >> shift) & mask) << (i * W);
      dst[j0 / V + t] = static_cast<uint8_t>(b);
    }
  } else {
    uint32_t b = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) b |= ((static_cast<uint32_t>(k[e]) >> shift) & mask) << (((j0 + e) % V) * W);
    b = lanes_reduce(b, V / E, [](uint32_t x, uint32_t y) { return x | y; });
    if (j0 % V == 0) dst[j0 / V] = static_cast<uint8_t>(b);
  }
}

// Turbo formats with BITS-bit indices: a group of g values spans g / E lanes. The sums of
// squares run per lane in fp32 and across lanes in fp64, the final sqrt / divide in fp32 (the
// CPU sums in fp64 throughout: a scale may differ by an fp16 ulp, an index cross a midpoint,
// rarely, as the issue allows; the fp64 divide and square roots were a third of the work).
template <int E, int BITS>
__device__ __forceinline__ void encode_turbo_lane(const float (&v)[E], const DevSide& s, const float* mids,
                                                  const float* cb2, uint8_t* stage) {
  const int width = s.g / E, gl = static_cast<int>(lane_id()) & (width - 1), j0 = gl * E;
  uint8_t* out = stage + (static_cast<int>(lane_id()) >> (__ffs(width) - 1)) * s.group_bytes;  // width: a power of 2
  float part = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) part = fma_rn(v[e], v[e], part);
  const double n2 = lanes_reduce(static_cast<double>(part), width, [](double a, double b) { return a + b; });
  const float norm = sqrtf(static_cast<float>(n2));
  const bool finite = norm <= kFltMax;
  const float inv = (norm == 0.0f || !finite) ? 0.0f : 1.0f / norm;
  int k[E];
  float c2part = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float u = v[e] * inv;
    int i = 0;  // binary search over the sorted midpoints: i = #{mids < u}
#pragma unroll
    for (int step = 1 << (BITS - 1); step >= 1; step >>= 1)
      if (mids[i + step - 1] < u) i += step;
    k[e] = finite ? i : 0;
    c2part += cb2[k[e]];
  }
  const double c2 = lanes_reduce(static_cast<double>(c2part), width, [](double a, double b) { return a + b; });
  uint8_t* idx = out + 2;
  if constexpr (BITS == 3) {  // 2 low bits, then the high bits from byte g / 4
    pack_fields<E, 2>(k, 0, idx, j0);
    pack_fields<E, 1>(k, 2, idx + s.g / 4, j0);
  } else {
    pack_fields<E, BITS>(k, 0, idx, j0);
  }
  if (gl == 0) {  // a non-finite group gets the NaN scale (it decodes to NaN, never to finite garbage)
    const float scale = norm == 0.0f || !finite ? 0.0f : norm / sqrtf(static_cast<float>(c2));
    store_u16(out, finite ? f16_bits(scale) : uint16_t{0x7e00});
  }
}

// The lane's share of a row of any format into the staging row.
template <int E>
__device__ __forceinline__ void encode_lane(const float (&v)[E], const DevSide& s, const float* mids, const float* cb2,
                                            uint8_t* stage) {
  const Family fam = static_cast<Family>(s.family);
  if (fam == Family::kFloat)
    encode_float_lane<E>(v, s.fmt == kFmt_bf16, stage);
  else if (s.fmt == kFmt_q8_0)
    encode_block_lane<E, kFmt_q8_0>(v, s.group_bytes, stage);
  else if (s.fmt == kFmt_q4_0)
    encode_block_lane<E, kFmt_q4_0>(v, s.group_bytes, stage);
  else if (s.fmt == kFmt_q4_1)
    encode_block_lane<E, kFmt_q4_1>(v, s.group_bytes, stage);
  else if (s.fmt == kFmt_q5_0)
    encode_block_lane<E, kFmt_q5_0>(v, s.group_bytes, stage);
  else if (s.fmt == kFmt_q5_1)
    encode_block_lane<E, kFmt_q5_1>(v, s.group_bytes, stage);
  else if (s.bits == 2)
    encode_turbo_lane<E, 2>(v, s, mids, cb2, stage);
  else if (s.bits == 3)
    encode_turbo_lane<E, 3>(v, s, mids, cb2, stage);
  else
    encode_turbo_lane<E, 4>(v, s, mids, cb2, stage);
}

// How a warp copies its staged rows out: words of `width` bytes (the widest that the output
// and the row length are aligned to), `per_row` words a row, `total` words for all rows.
// Made once per warp; rcp = 1 / per_row finds a word's row with a float multiply (exact for
// these sizes: word and row counts below 2^10).
struct CopyPlan {
  int width, per_row, total;
  float rcp;
};

__device__ __forceinline__ CopyPlan copy_plan(const uint8_t* out, int row_bytes, int nrows) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(out) | static_cast<uintptr_t>(row_bytes);
  const int w = (a & 15u) == 0 ? 16 : (a & 7u) == 0 ? 8 : (a & 3u) == 0 ? 4 : (a & 1u) == 0 ? 2 : 1;
  return {w, row_bytes / w, nrows * (row_bytes / w), 1.0f / static_cast<float>(row_bytes / w)};
}

template <typename W>
__device__ __forceinline__ void copy_word(const uint8_t* src, uint8_t* dst) {
  *reinterpret_cast<W*>(dst) = *reinterpret_cast<const W*>(src);
}

// The staged rows (back to back, row_bytes each) to cache rows: row i goes to row `dst` of
// lane i * lanes_per_row (-1: skipped). Every lane calls it (shuffles).
__device__ __forceinline__ void copy_rows_out(const uint8_t* stage, uint8_t* out, int64_t dst, int lanes_per_row,
                                              int row_bytes, const CopyPlan& c) {
  for (int base = 0; base < c.total; base += 32) {
    const int w = base + static_cast<int>(lane_id());
    const bool valid = w < c.total;
    const int i = valid ? __float2int_rz((static_cast<float>(w) + 0.5f) * c.rcp) : 0;
    const int64_t di = __shfl_sync(0xffffffffu, dst, i * lanes_per_row);
    if (!valid || di < 0) continue;
    const int off = i * row_bytes + (w - i * c.per_row) * c.width;
    const uint8_t* src = stage + off;
    uint8_t* d = out + di * row_bytes + (off - i * row_bytes);
    switch (c.width) {
      case 16:
        copy_word<uint4>(src, d);
        break;
      case 8:
        copy_word<uint2>(src, d);
        break;
      case 4:
        copy_word<uint32_t>(src, d);
        break;
      case 2:
        copy_word<uint16_t>(src, d);
        break;
      default:
        copy_word<uint8_t>(src, d);
        break;
    }
  }
}

}  // namespace turbokv::cuda
