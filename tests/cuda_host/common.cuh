// Host stand-ins for what cpp/cuda/decode_span.cuh takes from cpp/cuda/common.cuh and the CUDA
// headers, so its decoders compile and run on the CPU (tests/test_cuda_decoders_host.py): PTX
// prmt as the ISA defines it, the f16 intrinsics on _Float16 (each operation rounded to f16, as
// the hardware's), and decode_at as codec.h's decode_element.
#pragma once

#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __device__
#define __host__
#define __forceinline__ inline

#include "turbokv/codec.h"

namespace turbokv::cuda {

struct DeviceSide {
  int fmt, family, bits, d, dp, g, group_bytes, row_bytes;
};

// Byte i of the result: byte (sel >> 4i) & 7 of b:a (the selectors here never set bit 3).
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint8_t bytes[8];
  std::memcpy(bytes, &a, 4);
  std::memcpy(bytes + 4, &b, 4);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t n = (sel >> (4 * i)) & 15u;
    assert(n < 8);
    r |= static_cast<uint32_t>(bytes[n]) << (8 * i);
  }
  return r;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

struct __half {
  _Float16 v;
};
struct __half2 {
  _Float16 x, y;
};
inline __half __ushort_as_half(uint16_t u) {
  __half h;
  std::memcpy(&h.v, &u, 2);
  return h;
}
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half2 __float2half2_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  return {h, h};
}
inline __half2 __hsub2(__half2 a, __half2 b) {
  const _Float16 x = a.x - b.x, y = a.y - b.y;
  return {x, y};
}
inline __half2 __hmul2(__half2 a, __half2 b) {
  const _Float16 x = a.x * b.x, y = a.y * b.y;
  return {x, y};
}

struct uint2 {
  uint32_t x, y;
};
struct uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }

inline float decode_at(const DeviceSide& s, const float* cb, const uint8_t* row, int j) {
  return decode_element(s.fmt, static_cast<Family>(s.family), s.bits, s.g, s.group_bytes, row, j, cb);
}

}  // namespace turbokv::cuda
