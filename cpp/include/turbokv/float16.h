// fp16 / bf16 <-> fp32 conversions with round-to-nearest-even, written with
// integer arithmetic only so host and device give the same bits whatever the
// floating-point environment (no FMA contraction, no flush-to-zero surprises).
#pragma once

#include <cstdint>
#include <cstring>

#include "turbokv/host_device.h"

namespace turbokv {

inline namespace TURBOKV_CODEGEN {

TKV_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

TKV_HD float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// Shift right by s (1..31) rounding to nearest, ties to even.
TKV_HD uint32_t shift_rne(uint32_t m, int s) {
  const uint32_t q = m >> s;
  const uint32_t rem = m & ((1u << s) - 1u);
  const uint32_t half = 1u << (s - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

TKV_HD uint16_t f32_to_f16_bits(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN stays NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 -> inf
  if (ax >= 0x38800000u) {  // normal half: rebias the exponent, round 13 bits away
    return static_cast<uint16_t>(sign | shift_rne(ax - 0x38000000u, 13));
  }
  if (ax < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
  const uint32_t e = ax >> 23;
  const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
  return static_cast<uint16_t>(sign | shift_rne(mant, static_cast<int>(126u - e)));
}

TKV_HD float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (m << 13));
  if (e != 0) return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
  if (m == 0) return f32_from_bits(sign);
  // Subnormal half: normalise into an fp32 normal.
  uint32_t exp = 113u;
  while ((m & 0x400u) == 0) {
    m <<= 1;
    --exp;
  }
  return f32_from_bits(sign | (exp << 23) | ((m & 0x3ffu) << 13));
}

TKV_HD uint16_t f32_to_bf16_bits(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

TKV_HD float bf16_bits_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

}  // namespace TURBOKV_CODEGEN
}  // namespace turbokv
