// Decoding E contiguous values [e0, e0 + E) of a packed row, specialised per format so
// one lane's slice of a row costs a few loads and no per-value format branches.
#pragma once

#include "common.cuh"

namespace turbokv::cuda {

template <int E>
__device__ __forceinline__ void decode_span(const DevSide& s, const float* __restrict__ cb,
                                            const uint8_t* __restrict__ row, int e0, float (&out)[E]) {
  if (s.family == static_cast<int>(Family::kFloat)) {
    // 2*E bytes at an offset that is a multiple of 2*E: 16-byte loads (8-byte for E = 4).
    uint32_t words[E / 2];
    if constexpr (E >= 8) {
      const uint4* p = reinterpret_cast<const uint4*>(row + 2 * e0);
#pragma unroll
      for (int c = 0; c < E / 8; ++c) {
        const uint4 w = __ldg(p + c);
        words[4 * c] = w.x;
        words[4 * c + 1] = w.y;
        words[4 * c + 2] = w.z;
        words[4 * c + 3] = w.w;
      }
    } else {
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(row + 2 * e0));
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
  if (s.family == static_cast<int>(Family::kTurbo)) {
    const int g = s.g, within = e0 % g;
    const uint8_t* blk = row + (e0 / g) * s.group_bytes;
    const float scale = __half2float(__ushort_as_half(static_cast<uint16_t>(blk[0] | (blk[1] << 8))));
    const uint8_t* idx = blk + 2;
    if (s.bits == 4) {
#pragma unroll
      for (int k = 0; k < E / 2; ++k) {
        const int b = __ldg(idx + within / 2 + k);
        out[2 * k] = scale * cb[b & 15];
        out[2 * k + 1] = scale * cb[b >> 4];
      }
    } else {
      uint32_t hi = 0;
      if (s.bits == 3) {
#pragma unroll
        for (int k = 0; k < (E + 7) / 8; ++k)
          hi |= static_cast<uint32_t>(__ldg(idx + g / 4 + within / 8 + k)) << (8 * k);
        hi >>= within % 8;  // E = 4: our 4 bits may start mid-byte
      }
#pragma unroll
      for (int k = 0; k < E / 4; ++k) {
        const int b = __ldg(idx + within / 4 + k);
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
    for (int k = 0; k < E; ++k) out[k] = static_cast<float>(static_cast<int8_t>(__ldg(blk + 2 + pos + k))) * d;
    return;
  }
  if (s.fmt == kFmt_q4_0) {
    // Value p of a block is the low nibble of byte p (p < 16), else the high nibble of byte p - 16.
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int p = pos + k;
      out[k] = d * static_cast<float>(((__ldg(blk + 2 + p % 16) >> (p < 16 ? 0 : 4)) & 15) - 8);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < E; ++k) out[k] = decode_at(s, cb, row, e0 + k);
}

}  // namespace turbokv::cuda
