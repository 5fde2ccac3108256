// Decoding E contiguous values [e0, e0 + E) of a packed row, specialised per format so
// one lane's slice of a row costs a few loads and no per-value format branches.
//
// Spans of whole 8-value chunks (E % 8 == 0: the dequantize kernel's 32, the SIMT decode
// kernel's 8 and 16, the flash kernel's tiles) read whole words and turn each quant into a
// float with one PRMT and one FADD: the byte under the exponent bits of 2^23 (0x4B000000) is
// the float 2^23 + q exactly, and subtracting 2^23 (+ the format's offset) is exact too. The
// values are then the reference's fp32 products (decode_element), bit for bit.
// kGlobal: the row is in global memory (read through the read-only cache); false for rows
// staged in shared memory.
#pragma once

#include <cstring>

#include "common.cuh"

namespace turbokv::cuda {

namespace span {

template <bool kGlobal, class T>
__device__ __forceinline__ T load(const T* p) {
  if constexpr (kGlobal) return __ldg(p);
  return *p;
}
// Bytes [p, p + 4) at a 2-byte aligned address (blocks are 18-34 bytes, turbo groups 2 + k):
// two 16-bit loads, never a byte past the word.
template <bool kGlobal>
__device__ __forceinline__ uint32_t word(const uint8_t* p) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return load<kGlobal>(h) | (static_cast<uint32_t>(load<kGlobal>(h + 1)) << 16);
}
template <bool kGlobal>
__device__ __forceinline__ float f16_at(const uint8_t* p) {
  return __half2float(__ushort_as_half(load<kGlobal>(reinterpret_cast<const uint16_t*>(p))));
}
// 2^23 + byte k of x, as a float.
template <int K>
__device__ __forceinline__ float byte_float(uint32_t x) {
  return __uint_as_float(prmt(x, 0x4B000000u, 0x7440u | K));
}
// Bit k of the low 4 bits of x -> bit 4 of byte k (a q5 value's fifth bit).
__device__ __forceinline__ uint32_t bits_to_bytes4(uint32_t x) { return ((x & 15u) * 0x00204081u & 0x01010101u) << 4; }

// Word w (0 or 1) of the quants of values jj.. (jj a multiple of 8) of a block whose quant bytes
// start at qs, one quant a byte: q8_0's bytes with the sign bit flipped (kByte: q + 128), or a
// 4-bit format's nibbles (the low ones of bytes jj.. for jj < 16, else the high ones of bytes
// jj - 16..). block8 and block8_f16 both read their quants through it.
template <bool kGlobal, bool kByte>
__device__ __forceinline__ uint32_t quant_word(const uint8_t* qs, int jj, int w) {
  if constexpr (kByte) return word<kGlobal>(qs + jj + 4 * w) ^ 0x80808080u;
  return (word<kGlobal>(qs + jj % 16 + 4 * w) >> (jj < 16 ? 0 : 4)) & 0x0f0f0f0fu;
}

// 8 values of a ggml block (value jj of a block: q8_0 byte jj; the others the low nibble of
// byte jj (jj < 16) or the high nibble of byte jj - 16, with the fifth bit jj of qh for q5).
template <bool kGlobal>
__device__ __forceinline__ void block8(const DeviceSide& s, const uint8_t* blk, int jj, float* out) {
  const float d = f16_at<kGlobal>(blk);
  if (s.fmt == kFmt_q8_0) {
    constexpr float kOff = 8388608.0f + 128.0f;  // the sign bit flipped: 2^23 + q + 128
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const uint32_t x = quant_word<kGlobal, true>(blk + 2, jj, w);
      out[4 * w] = (byte_float<0>(x) - kOff) * d;
      out[4 * w + 1] = (byte_float<1>(x) - kOff) * d;
      out[4 * w + 2] = (byte_float<2>(x) - kOff) * d;
      out[4 * w + 3] = (byte_float<3>(x) - kOff) * d;
    }
    return;
  }
  const bool with_min = s.fmt == kFmt_q4_1 || s.fmt == kFmt_q5_1;
  const bool five = s.fmt == kFmt_q5_0 || s.fmt == kFmt_q5_1;
  const uint8_t* qs = blk + (with_min ? 4 : 2) + (five ? 4 : 0);
  const uint32_t qh = five ? word<kGlobal>(qs - 4) >> jj : 0u;
  // The reference's q - offset (q4_0 8, q5_0 16) or q (with a min), then times d (+ m).
  const float off = 8388608.0f + (with_min ? 0.0f : five ? 16.0f : 8.0f);
  const float m = with_min ? f16_at<kGlobal>(blk + 2) : 0.0f;
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    uint32_t x = quant_word<kGlobal, false>(qs, jj, w);
    if (five) x |= bits_to_bytes4(qh >> (4 * w));
    const float q[4] = {byte_float<0>(x) - off, byte_float<1>(x) - off, byte_float<2>(x) - off, byte_float<3>(x) - off};
#pragma unroll
    for (int k = 0; k < 4; ++k) out[4 * w + k] = with_min ? __fmaf_rn(d, q[k], m) : d * q[k];
  }
}

// 8 values of a turbo group from value `within` (a multiple of 8): scale times codebook entry.
template <bool kGlobal>
__device__ __forceinline__ void turbo8(const DeviceSide& s, const float* __restrict__ cb, const uint8_t* blk,
                                       int within, float* out) {
  const float scale = f16_at<kGlobal>(blk);
  const uint8_t* idx = blk + 2;
  if (s.bits == 4) {
    const uint32_t w = word<kGlobal>(idx + within / 2);
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = scale * cb[(w >> (4 * k)) & 15u];
    return;
  }
  const uint32_t lo = load<kGlobal>(reinterpret_cast<const uint16_t*>(idx + within / 4));
  const uint32_t hi = s.bits == 3 ? static_cast<uint32_t>(load<kGlobal>(idx + s.g / 4 + within / 8)) << 2 : 0u;
#pragma unroll
  for (int k = 0; k < 8; ++k) out[k] = scale * cb[((lo >> (2 * k)) & 3u) | ((hi >> k) & 4u)];
}

// 8 values of a q8_0 / q4_0 block (from value jj, a multiple of 8) as four f16x2, in f16
// arithmetic: the quant under the exponent bits of 1024 (0x6400) is the f16 1024 + q exactly,
// the subtraction is exact, and one f16 multiply rounds the exact product q d once: the same
// f16 as block8's fp32 product rounded, in a third of the instructions (the flash kernel's
// tiles, which hold f16).
template <int FMT, bool kGlobal = false>
__device__ __forceinline__ uint4 block8_f16(const uint8_t* blk, int jj) {
  static_assert(FMT == kFmt_q8_0 || FMT == kFmt_q4_0, "q8_0 or q4_0");
  const uint32_t s = load<kGlobal>(reinterpret_cast<const uint16_t*>(blk));
  const uint32_t d2 = s | (s << 16);
  const uint32_t x[2] = {quant_word<kGlobal, FMT == kFmt_q8_0>(blk + 2, jj, 0),
                         quant_word<kGlobal, FMT == kFmt_q8_0>(blk + 2, jj, 1)};
  const __half2 off = __float2half2_rn(FMT == kFmt_q8_0 ? 1152.0f : 1032.0f);
  __half2 d;
  memcpy(&d, &d2, 4);
  uint32_t h[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t biased = prmt(x[k / 2], 0x64646464u, k % 2 ? 0x4342u : 0x4140u);  // 1024 + byte, twice
    __half2 v;
    memcpy(&v, &biased, 4);
    v = __hmul2(__hsub2(v, off), d);
    memcpy(&h[k], &v, 4);
  }
  return make_uint4(h[0], h[1], h[2], h[3]);
}

}  // namespace span

template <int E, bool kGlobal = true>
__device__ __forceinline__ void decode_span(const DeviceSide& s, const float* __restrict__ cb,
                                            const uint8_t* __restrict__ row, int e0, float (&out)[E]) {
  using span::load;
  if (s.family == static_cast<int>(Family::kFloat)) {
    // 2*E bytes at an offset that is a multiple of 2*E: 16-byte loads (8-byte for E = 4).
    uint32_t words[E / 2];
    if constexpr (E >= 8) {
      const uint4* p = reinterpret_cast<const uint4*>(row + 2 * e0);
#pragma unroll
      for (int c = 0; c < E / 8; ++c) {
        const uint4 w = load<kGlobal>(p + c);
        words[4 * c] = w.x;
        words[4 * c + 1] = w.y;
        words[4 * c + 2] = w.z;
        words[4 * c + 3] = w.w;
      }
    } else {
      const uint2 w = load<kGlobal>(reinterpret_cast<const uint2*>(row + 2 * e0));
      words[0] = w.x;
      words[1] = w.y;
    }
#pragma unroll
    for (int k = 0; k < E / 2; ++k) {
      const uint16_t lo = words[k] & 0xffffu, hi = words[k] >> 16;
      if (s.fmt == kFmt_bf16) {
        out[2 * k] = __uint_as_float(static_cast<uint32_t>(lo) << 16);
        out[2 * k + 1] = __uint_as_float(static_cast<uint32_t>(hi) << 16);
      } else {
        out[2 * k] = __half2float(__ushort_as_half(lo));
        out[2 * k + 1] = __half2float(__ushort_as_half(hi));
      }
    }
    return;
  }
  if constexpr (E % 8 == 0) {  // whole chunks of 8, each inside one block / group
    const bool turbo = s.family == static_cast<int>(Family::kTurbo);
    const int g = turbo ? s.g : 32;
#pragma unroll
    for (int c = 0; c < E / 8; ++c) {
      const int j = e0 + 8 * c;
      const uint8_t* blk = row + (j / g) * s.group_bytes;
      if (turbo)
        span::turbo8<kGlobal>(s, cb, blk, j % g, out + 8 * c);
      else
        span::block8<kGlobal>(s, blk, j % g, out + 8 * c);
    }
    return;
  }
  if (s.family == static_cast<int>(Family::kTurbo)) {
    const int g = s.g, within = e0 % g;
    const uint8_t* blk = row + (e0 / g) * s.group_bytes;
    const float scale = __half2float(__ushort_as_half(static_cast<uint16_t>(blk[0] | (blk[1] << 8))));
    const uint8_t* idx = blk + 2;
    if (s.bits == 4) {
#pragma unroll
      for (int k = 0; k < E / 2; ++k) {
        const int b = load<kGlobal>(idx + within / 2 + k);
        out[2 * k] = scale * cb[b & 15];
        out[2 * k + 1] = scale * cb[b >> 4];
      }
    } else {
      uint32_t hi = 0;
      if (s.bits == 3) {
#pragma unroll
        for (int k = 0; k < (E + 7) / 8; ++k)
          hi |= static_cast<uint32_t>(load<kGlobal>(idx + g / 4 + within / 8 + k)) << (8 * k);
        hi >>= within % 8;  // E = 4: our 4 bits may start mid-byte
      }
#pragma unroll
      for (int k = 0; k < E / 4; ++k) {
        const int b = load<kGlobal>(idx + within / 4 + k);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int i2 = (b >> (2 * j)) & 3;
          const int i3 = i2 | (((hi >> (4 * k + j)) & 1) << 2);
          out[4 * k + j] = scale * cb[s.bits == 3 ? i3 : i2];
        }
      }
    }
    return;
  }
  const uint8_t* blk = row + (e0 / 32) * s.group_bytes;
  const int pos = e0 % 32;
  const float d = __half2float(__ushort_as_half(static_cast<uint16_t>(blk[0] | (blk[1] << 8))));
  if (s.fmt == kFmt_q8_0) {
#pragma unroll
    for (int k = 0; k < E; ++k) out[k] = static_cast<float>(static_cast<int8_t>(load<kGlobal>(blk + 2 + pos + k))) * d;
    return;
  }
  if (s.fmt == kFmt_q4_0) {
    // Value p of a block is the low nibble of byte p (p < 16), else the high nibble of byte p - 16.
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int p = pos + k;
      out[k] = d * static_cast<float>(((load<kGlobal>(blk + 2 + p % 16) >> (p < 16 ? 0 : 4)) & 15) - 8);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < E; ++k) out[k] = decode_at(s, cb, row, e0 + k);
}

}  // namespace turbokv::cuda
