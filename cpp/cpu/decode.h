// Fast CPU row decoders, bit-identical to codec.h's decode_row.
//
// The generic decoder extracts one index at a time with data-dependent branches; these loops
// have fixed shapes the compiler vectorises. Where AVX2 is on (the attention kernel's avx2
// copy, or a native build), the 4-bit blocks convert 8 values per instruction and turbo rows
// pick their centroids from registers; elsewhere turbo rows go through byte-indexed tables (one
// byte -> 4 or 2 centroids) built once per codebook, so a turbo2 group of 128 values is 32
// table loads. The bytes and the floats are __restrict: a uint8_t pointer may alias anything,
// and without it the compiler keeps the loops scalar in case a store changes the next byte.
#pragma once

#include <cstdint>
#include <cstring>

#include "turbokv/codec.h"
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace turbokv::cpu {

struct TurboTables {
  float two[256][4];         // turbo2: byte -> 4 centroids
  float three[16 * 256][4];  // turbo3: (4 high bits << 8 | low-bits byte) -> 4 centroids
  float four[256][2];        // turbo4: byte -> 2 centroids
};

inline namespace TURBOKV_CODEGEN {

inline const TurboTables& turbo_tables(int g, int bits) {
  auto build = [](int g, int bits) {
    auto* t = new TurboTables();  // lives for the process, like the codebooks
    const float* c = codebook(g, bits);
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 4; ++k) {
        const int i2 = (b >> (2 * k)) & 3;
        if (bits == 2) t->two[b][k] = c[i2];
        if (bits == 3)
          for (int nib = 0; nib < 16; ++nib) t->three[(nib << 8) | b][k] = c[i2 | (((nib >> k) & 1) << 2)];
      }
      if (bits == 4) {
        t->four[b][0] = c[b & 15];
        t->four[b][1] = c[b >> 4];
      }
    }
    return t;
  };
  static const TurboTables* tables[2][5] = {};
  static const bool ready = [&] {
    for (int gi = 0; gi < 2; ++gi)
      for (int b = 2; b <= 4; ++b) tables[gi][b] = build(gi ? 128 : 64, b);
    return true;
  }();
  (void)ready;
  return *tables[g == 128 ? 1 : 0][bits];
}

inline void decode_f16(const uint8_t* __restrict in, int n, float* __restrict y) {
  int j = 0;
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * j))));
#endif
  for (; j < n; ++j) y[j] = f16_bits_to_f32(load_u16(in + 2 * j));
}

inline void decode_bf16(const uint8_t* __restrict in, int n, float* __restrict y) {
  for (int j = 0; j < n; ++j) {
    uint16_t h;
    memcpy(&h, in + 2 * j, 2);
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    memcpy(y + j, &u, 4);
  }
}

inline void decode_turbo_group_fast(const uint8_t* __restrict in, int g, int bits, float* __restrict y) {
  const float s = f16_bits_to_f32(load_u16(in));
  const uint8_t* p = in + 2;
#if defined(__AVX2__)
  // 8 values at a time: their indices shifted out of one broadcast word lane by lane, the
  // centroids picked from registers (vpermps: 8 of them per register), no table in memory.
  const float* c = codebook(g, bits);
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 c_lo = bits == 2 ? _mm256_castps128_ps256(_mm_loadu_ps(c)) : _mm256_loadu_ps(c);
  const __m256 c_hi = bits == 4 ? _mm256_loadu_ps(c + 8) : c_lo;
  for (int k = 0; k < g / 8; ++k) {
    __m256i idx;
    if (bits == 4) {  // 4 bytes, two 4-bit indices each, low nibble first
      uint32_t w;
      memcpy(&w, p + 4 * k, 4);
      idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), _mm256_slli_epi32(lane, 2));
      idx = _mm256_and_si256(idx, _mm256_set1_epi32(15));
    } else {  // 2 bytes of 2-bit indices, lowest bits first; turbo3: and 8 high bits, one byte
      const int w = p[2 * k] | (p[2 * k + 1] << 8);
      idx = _mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_slli_epi32(lane, 1));
      idx = _mm256_and_si256(idx, _mm256_set1_epi32(3));
      if (bits == 3) {
        const __m256i hi = _mm256_srlv_epi32(_mm256_set1_epi32(p[g / 4 + k]), lane);
        idx = _mm256_or_si256(idx, _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), 2));
      }
    }
    __m256 v = _mm256_permutevar8x32_ps(c_lo, idx);
    if (bits == 4)  // indices 8-15 from the second register: bit 3 moved to the sign bit picks it
      v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(c_hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(vs, v));
  }
  return;
#endif
  const TurboTables& t = turbo_tables(g, bits);
  if (bits == 2) {
    for (int i = 0; i < g / 4; ++i)
      for (int k = 0; k < 4; ++k) y[4 * i + k] = s * t.two[p[i]][k];
  } else if (bits == 4) {
    for (int i = 0; i < g / 2; ++i)
      for (int k = 0; k < 2; ++k) y[2 * i + k] = s * t.four[p[i]][k];
  } else {
    const uint8_t* h = p + g / 4;
    for (int i = 0; i < g / 4; ++i) {
      const int nib = (h[i >> 1] >> (4 * (i & 1))) & 15;
      const float* c = t.three[(nib << 8) | p[i]];
      for (int k = 0; k < 4; ++k) y[4 * i + k] = s * c[k];
    }
  }
}

inline void decode_block_fast(int fmt, const uint8_t* __restrict in, float* __restrict y) {
  const float d = f16_bits_to_f32(load_u16(in));
  if (fmt == kFmt_q8_0) {
    for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(in[2 + j])) * d;
    return;
  }
  if (fmt == kFmt_q4_0 || fmt == kFmt_q4_1) {
    const bool q4_1 = fmt == kFmt_q4_1;
    const uint8_t* p = in + (q4_1 ? 4 : 2);
    const float m = q4_1 ? f16_bits_to_f32(load_u16(in + 2)) : 0.0f;
#if defined(__AVX2__)
    // GCC leaves these loops scalar (nibbles of bytes to floats); the same arithmetic by hand:
    // the 4-bit integers (minus 8 for q4_0) are exact in float, so converting first changes nothing.
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i nib = _mm_set1_epi8(15);
    const __m128i halves[2] = {_mm_and_si128(bytes, nib), _mm_and_si128(_mm_srli_epi16(bytes, 4), nib)};
    const __m256 vd = _mm256_set1_ps(d), off = _mm256_set1_ps(q4_1 ? 0.0f : 8.0f), vm = _mm256_set1_ps(m);
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 2; ++k) {
        const __m128i part = k ? _mm_srli_si128(halves[h], 8) : halves[h];
        const __m256 q = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part)), off);
        const __m256 x = q4_1 ? _mm256_add_ps(_mm256_mul_ps(vd, q), vm) : _mm256_mul_ps(vd, q);
        _mm256_storeu_ps(y + 16 * h + 8 * k, x);
      }
    }
#else
    if (q4_1) {
      for (int j = 0; j < 16; ++j) {
        y[j] = d * static_cast<float>(p[j] & 15) + m;
        y[j + 16] = d * static_cast<float>(p[j] >> 4) + m;
      }
    } else {
      for (int j = 0; j < 16; ++j) {
        y[j] = d * static_cast<float>((p[j] & 15) - 8);
        y[j + 16] = d * static_cast<float>((p[j] >> 4) - 8);
      }
    }
#endif
    return;
  }
  decode_block(fmt, in, y);  // q5_0 / q5_1: the generic path
}

// Same result as codec.h decode_row, faster.
inline void decode_row_fast(const RowLayout& L, const uint8_t* in, float* y) {
  if (L.family == Family::kFloat) {
    if (L.fmt == kFmt_f16)
      decode_f16(in, L.dp, y);
    else
      decode_bf16(in, L.dp, y);
  } else if (L.family == Family::kBlock) {
    for (int b = 0; b < L.dp / 32; ++b) decode_block_fast(L.fmt, in + b * L.group_bytes, y + 32 * b);
  } else {
    for (int b = 0; b < L.dp / L.g; ++b) decode_turbo_group_fast(in + b * L.group_bytes, L.g, L.bits, y + L.g * b);
  }
}

}  // namespace TURBOKV_CODEGEN
}  // namespace turbokv::cpu
