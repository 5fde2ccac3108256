// Encoding of rows by a warp, after warp_rotate: lane l holds the E = 32 rotated values
// l*E .. l*E + E-1 of the warp's rows (back to back) and writes its share of the packed bytes
// into the warp's staging rows in shared memory; the warp then copies them out with the
// widest stores the alignment allows. The steps and roundings are codec.h's (encode_block,
// encode_turbo_group): a lane holds a whole ggml block (identical bytes), a turbo group of g
// spans g / 32 lanes (sums by shuffles, in fp64 like the CPU's but in another order).
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

// codec.h's f16_store_bits / bf16_store_bits: a finite value past the 16-bit range -> NaN.
__device__ __forceinline__ uint16_t f16_store(float x) {
  const uint16_t h = f16_bits(x);
  return (h & 0x7fffu) == 0x7c00u && fabsf(x) <= kFltMax ? static_cast<uint16_t>(h | 0x7e00u) : h;
}
__device__ __forceinline__ uint16_t bf16_store(float x) {
  const uint16_t h = bf16_bits(x);
  return (h & 0x7fffu) == 0x7f80u && fabsf(x) <= kFltMax ? static_cast<uint16_t>(h | 0x7fc0u) : h;
}
__device__ __forceinline__ bool f16_inf(float x) { return (f16_bits(x) & 0x7fffu) == 0x7c00u; }

template <int E>
__device__ __forceinline__ void encode_float_lane(const float (&v)[E], bool bf16, uint8_t* stage) {
  LaneVec<uint16_t, E> w;
#pragma unroll
  for (int e = 0; e < E; ++e) w.v[e] = bf16 ? bf16_store(v[e]) : f16_store(v[e]);
  reinterpret_cast<LaneVec<uint16_t, E>*>(stage)[lane_id()] = w;
}

// codec.h's trunc_clip without branches: fmaxf drops a NaN (-> 0), clamp, then truncate.
__device__ __forceinline__ int trunc_clamp(float v, int hi) {
  return __float2int_rz(fminf(fmaxf(v, 0.0f), static_cast<float>(hi)));
}

// Stores a 32-bit word at a 2-byte aligned staging address (rows are 2 + k bytes long).
__device__ __forceinline__ void store_u32_as_u16(uint8_t* p, uint32_t w) {
  reinterpret_cast<uint16_t*>(p)[0] = static_cast<uint16_t>(w);
  reinterpret_cast<uint16_t*>(p)[1] = static_cast<uint16_t>(w >> 16);
}

// ggml block-32 format FMT: a lane holds one whole block (no reductions across lanes), with
// codec.h's encode_block steps and roundings (identical bytes).
template <int E, int FMT>
__device__ __forceinline__ void encode_block_lane(const float (&v)[E], int block_bytes, uint8_t* stage) {
  static_assert(E == 32, "one block per lane");
  uint8_t* out = stage + lane_id() * block_bytes;
  bool bad = false;
#pragma unroll
  for (int e = 0; e < E; ++e) bad |= !(fabsf(v[e]) <= kFltMax);
  if constexpr (FMT == kFmt_q8_0) {
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) amax = fmaxf(amax, fabsf(v[e]));
    const float d = amax / 127.0f, id = (d == 0.0f) ? 0.0f : 1.0f / d;
    bad |= f16_inf(d);  // a scale past the fp16 range NaN-marks the block, as in codec.h
#pragma unroll
    for (int w = 0; w < E / 4; ++w) {
      uint32_t word = 0u;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float r = ggml_roundf(v[4 * w + i] * id);
        const int q = (r == r && !bad) ? static_cast<int>(fmaxf(-128.0f, fminf(127.0f, r))) : 0;
        word |= (static_cast<uint32_t>(q) & 0xffu) << (8 * i);
      }
      store_u32_as_u16(out + 2 + 4 * w, word);
    }
    store_u16(out, bad ? uint16_t{0x7e00} : f16_bits(d));
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
    d = (mx - mn) / static_cast<float>(qmax);
    offset = 0.5f;
  } else {
    // Signed value of largest magnitude, the first one on ties (numpy argmax).
    float best = v[0], best_abs = fabsf(v[0]);
#pragma unroll
    for (int e = 1; e < E; ++e)
      if (fabsf(v[e]) > best_abs) {
        best_abs = fabsf(v[e]);
        best = v[e];
      }
    d = best / (five ? -16.0f : -8.0f);
    offset = five ? 16.5f : 8.5f;
  }
  bad |= f16_inf(d) || (with_min && f16_inf(mn));  // scale / min past the fp16 range: NaN-marked
  const float id = (d == 0.0f) ? 0.0f : 1.0f / d;
  int q[E];
  uint32_t qh = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    q[e] = bad ? 0 : trunc_clamp((with_min ? (v[e] - mn) * id : v[e] * id) + offset, qmax);
    qh |= static_cast<uint32_t>((q[e] >> 4) & 1) << e;
  }
  uint8_t* p = out + 2;
  if constexpr (with_min) {
    store_u16(p, bad ? uint16_t{0x7e00} : f16_bits(mn));
    p += 2;
  }
  if constexpr (five) {
    store_u32_as_u16(p, qh);
    p += 4;
  }
  // qs[j] = q[j] | q[j + 16] << 4.
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t word = 0u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = 4 * w + i;
      word |= (static_cast<uint32_t>(q[j] & 0xf) | (static_cast<uint32_t>(q[j + 16] & 0xf) << 4)) << (8 * i);
    }
    store_u32_as_u16(p + 4 * w, word);
  }
  store_u16(out, bad ? uint16_t{0x7e00} : f16_bits(d));
}

// Turbo formats with BITS-bit indices, 32 values a lane: a group of g values spans g / 32
// lanes. The codebooks are symmetric (c[2^B - 1 - i] = -c[i], the middle midpoint 0), so
// codec.h's index #{mids < u} is P + 1 + c for u > 0, with c = #{positive mids < u}, and
// P - c for u <= 0, with c = #{positive mids <= |u|} (ties at a midpoint do occur: once in a
// few million values from fp16 inputs), P = 2^(B-1) - 1. Per value: one multiply, P + 1
// compares and the bits they set in bit planes (gt[j]: |u| > mid j, a thermometer code of
// c; pos: u > 0); per lane, the planes become the binary index fields (XORs), the packed
// layout (bit spreads) and the counts of each magnitude (popcounts), from which every lane
// of the group gets the same
// sum of squared codebook entries (integer reductions, then a fixed fp64 order). Sums, square
// roots and the divide are codec.h's, in fp64; only the order of the sums differs (the norm,
// and so every u and index, matches the CPU's but where an fp64 rounding moves an fp32 one).
template <int E, int BITS>
__device__ __forceinline__ void encode_turbo_lane(const float (&v)[E], const DeviceSide& s, const float* mids,
                                                  const float* cb, uint8_t* stage) {
  static_assert(E == 32, "one bit-plane word per lane");
  constexpr int P = (1 << (BITS - 1)) - 1;
  float mid[P];  // the positive midpoints (mids P + 1 .. 2P), ascending
#pragma unroll
  for (int j = 0; j < P; ++j) mid[j] = mids[P + 1 + j];
  const int width = s.g / E, gl = static_cast<int>(lane_id()) & (width - 1);
  uint8_t* out = stage + (static_cast<int>(lane_id()) >> (__ffs(width) - 1)) * s.group_bytes;  // width: a power of 2
  // fp64 like the CPU (only the order differs), so that the norm rounds to the CPU's fp32
  // value all but always, and so do u and its index (fp32 lane sums and an fp32 square root
  // moved the norm by an ulp in one row in eight, and an index across a midpoint about once
  // in ten million values).
  double part = 0.0;
#pragma unroll
  for (int e = 0; e < E; ++e) part = fma_rn(static_cast<double>(v[e]), static_cast<double>(v[e]), part);
  const double n2 = lanes_reduce(part, width, [](double a, double b) { return a + b; });
  const float norm = static_cast<float>(sqrt(n2));
  const bool finite = norm <= kFltMax;
  const float inv = (norm == 0.0f || !finite) ? 0.0f : 1.0f / norm;
  // A compare is the sign bit of a difference (mid - |u| < 0: |u| > mid; 0 - u < 0: u > 0,
  // and +-0 gives +0), shifted in from the top value down: one add and one funnel shift
  // (SHF.L.U32.HI) a bit.
  uint32_t gt[P] = {}, pos = 0u;
#pragma unroll
  for (int e = E - 1; e >= 0; --e) {
    const float u = v[e] * inv;
    // For u <= 0 the count is #{mid <= |u|} = #{mid < next float after |u|}: the bits of u
    // plus its sign bit (one LEA.HI) are -next(|u|) there, u itself for u > 0 (and -0 becomes
    // the smallest denormal, below every midpoint).
    const float w = __uint_as_float(__float_as_uint(u) + (__float_as_uint(u) >> 31));
#pragma unroll
    for (int j = 0; j < P; ++j) gt[j] = (gt[j] << 1) + (__float_as_uint(mid[j] - fabsf(w)) >> 31);
    pos = (pos << 1) + (__float_as_uint(0.0f - u) >> 31);
  }
  // Counts of c > j for each j, 8 bits each (<= 128 a group), summed over the group's lanes.
  uint32_t above[(P + 3) / 4] = {};
#pragma unroll
  for (int j = 0; j < P; ++j) above[j / 4] |= static_cast<uint32_t>(__popc(gt[j])) << (8 * (j % 4));
#pragma unroll
  for (int w = 0; w < (P + 3) / 4; ++w)
    above[w] = lanes_reduce(above[w], width, [](uint32_t a, uint32_t b) { return a + b; });
  // Index bit b < B - 1 is bit b of c, flipped where u <= 0; bit b of c is the XOR of the
  // thermometer planes m 2^b - 1 (m >= 1); the top index bit is pos.
  uint32_t k[BITS];
#pragma unroll
  for (int b = 0; b < BITS - 1; ++b) {
    uint32_t c = 0u;
#pragma unroll
    for (int m = 1; m * (1 << b) - 1 < P; ++m) c ^= gt[m * (1 << b) - 1];
    k[b] = finite ? c ^ ~pos : 0u;
  }
  k[BITS - 1] = finite ? pos : 0u;
  uint8_t* idx = out + 2;
  if constexpr (BITS == 4) {  // value j at bits 4j..4j+3 of 8-value words
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint32_t word = 0u;
#pragma unroll
      for (int b = 0; b < 4; ++b) word |= spread16(spread16((k[b] >> (8 * w)) & 0xffu) & 0xffffu) << b;
      store_u32_as_u16(idx + 16 * gl + 4 * w, word);
    }
  } else {  // value j at bits 2j, 2j+1 of 16-value words (turbo3: then one bit per value)
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const uint32_t word = spread16((k[0] >> (16 * w)) & 0xffffu) | (spread16((k[1] >> (16 * w)) & 0xffffu) << 1);
      store_u32_as_u16(idx + 8 * gl + 4 * w, word);
    }
    if constexpr (BITS == 3) store_u32_as_u16(idx + s.g / 4 + 4 * gl, k[2]);
  }
  if (gl == 0) {  // a non-finite group gets the NaN scale (it decodes to NaN, never to finite garbage)
    double c2 = 0.0;
#pragma unroll
    for (int c = 0; c <= P; ++c) {
      const int ge = c == 0 ? s.g : static_cast<int>((above[(c - 1) / 4] >> (8 * ((c - 1) % 4))) & 0xffu);
      const int gt_c = c == P ? 0 : static_cast<int>((above[c / 4] >> (8 * (c % 4))) & 0xffu);
      const double m = cb[P + 1 + c];  // positive entry c; its square is exact in fp64
      c2 = fma_rn(static_cast<double>(ge - gt_c), m * m, c2);
    }
    const float scale = norm == 0.0f || !finite ? 0.0f : static_cast<float>(static_cast<double>(norm) / sqrt(c2));
    store_u16(out, finite && !f16_inf(scale) ? f16_bits(scale) : uint16_t{0x7e00});
  }
}

// Calls f once with the lane encoder of the side's format, a callable (v, stage) that writes
// the lane's share of a row into the staging row: the format is chosen before a kernel's row
// loop, not per row, so the loop holds one format's code (no dispatch branches in it).
template <int E, typename F>
__device__ __forceinline__ void with_lane_encoder(const DeviceSide& s, const float* mids, const float* cb, F&& f) {
  if (static_cast<Family>(s.family) == Family::kFloat) {
    const bool bf16 = s.fmt == kFmt_bf16;
    return f([bf16](const float (&v)[E], uint8_t* st) { encode_float_lane<E>(v, bf16, st); });
  }
  const int bb = s.group_bytes;
  switch (s.fmt) {
    case kFmt_q8_0:
      return f([bb](const float (&v)[E], uint8_t* st) { encode_block_lane<E, kFmt_q8_0>(v, bb, st); });
    case kFmt_q4_0:
      return f([bb](const float (&v)[E], uint8_t* st) { encode_block_lane<E, kFmt_q4_0>(v, bb, st); });
    case kFmt_q4_1:
      return f([bb](const float (&v)[E], uint8_t* st) { encode_block_lane<E, kFmt_q4_1>(v, bb, st); });
    case kFmt_q5_0:
      return f([bb](const float (&v)[E], uint8_t* st) { encode_block_lane<E, kFmt_q5_0>(v, bb, st); });
    case kFmt_q5_1:
      return f([bb](const float (&v)[E], uint8_t* st) { encode_block_lane<E, kFmt_q5_1>(v, bb, st); });
    default:
      break;
  }
  if (s.bits == 2)
    return f([&s, mids, cb](const float (&v)[E], uint8_t* st) { encode_turbo_lane<E, 2>(v, s, mids, cb, st); });
  if (s.bits == 3)
    return f([&s, mids, cb](const float (&v)[E], uint8_t* st) { encode_turbo_lane<E, 3>(v, s, mids, cb, st); });
  return f([&s, mids, cb](const float (&v)[E], uint8_t* st) { encode_turbo_lane<E, 4>(v, s, mids, cb, st); });
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

// n staged bytes at src to dst, where src and dst have the same address mod 16: 16-byte
// words, and byte copies for the (at most 15) bytes before the first aligned word and after
// the last. Every lane calls it.
__device__ __forceinline__ void copy_span_out(const uint8_t* src, uint8_t* dst, int n) {
  const int lane = static_cast<int>(lane_id());
  const int head = min(n, static_cast<int>((16u - (reinterpret_cast<uintptr_t>(dst) & 15u)) & 15u));
  const int words = (n - head) / 16, tail = n - head - 16 * words;
  if (lane < head) dst[lane] = src[lane];
  for (int w = lane; w < words; w += 32) copy_word<uint4>(src + head + 16 * w, dst + head + 16 * w);
  if (lane < tail) dst[head + 16 * words + lane] = src[head + 16 * words + lane];
}

}  // namespace turbokv::cuda
