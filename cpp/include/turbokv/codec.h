// Encode / decode one row of a packed cache, torch-free (host and device).
//
// Input to encode_row is the row after zero-padding and rotation (dp values);
// decode_row gives back dp values in the same (rotated) domain. Every step
// mirrors python/turbokv/reference.py operation by operation, in fp32, so
// packed bytes are identical. Block formats follow the gguf package's numpy
// quantizers exactly (same roundings, same tie rules).
#pragma once

#include <cmath>
#include <cstdint>

#include "turbokv/float16.h"
#include "turbokv/formats_generated.h"
#include "turbokv/host_device.h"

namespace turbokv {

struct RowLayout {
  int fmt = -1;
  Family family = Family::kFloat;
  int bits = 0;
  int d = 0;            // logical head dim
  int dp = 0;           // values stored per row (turbo pads to a multiple of 64)
  int g = 0;            // turbo group size, or block size
  int group_bytes = 0;  // bytes per turbo group / ggml block / float value
  int row_bytes = 0;
  bool has_min = false;
  const float* codebook = nullptr;
  const float* midpoints = nullptr;
};

inline namespace TURBOKV_CODEGEN {

// Returns a layout with fmt == -1 when d does not suit the format.
inline RowLayout make_layout(int fmt, int d) {
  RowLayout L;
  if (fmt < 0 || fmt >= kNumFormats || d <= 0) return L;
  const FormatInfo& f = kFormats[fmt];
  L.family = f.family;
  L.bits = f.bits;
  L.d = d;
  L.has_min = f.has_min;
  if (f.family == Family::kFloat) {
    L.dp = d;
    L.g = 1;
    L.group_bytes = 2;
    L.row_bytes = 2 * d;
  } else if (f.family == Family::kBlock) {
    if (d % 32 != 0) return L;
    L.dp = d;
    L.g = 32;
    L.group_bytes = f.block_bytes;
    L.row_bytes = d / 32 * f.block_bytes;
  } else {
    L.dp = (d + 63) / 64 * 64;
    L.g = (L.dp % 128 == 0) ? 128 : 64;
    L.group_bytes = 2 + L.g * f.bits / 8;
    L.row_bytes = L.dp / L.g * L.group_bytes;
    L.codebook = codebook(L.g, f.bits);
    L.midpoints = midpoints(L.g, f.bits);
  }
  L.fmt = fmt;
  return L;
}

TKV_HD void store_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v & 0xffu);
  p[1] = static_cast<uint8_t>(v >> 8);
}

TKV_HD uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// gguf's np_roundf: round half away from zero, written as gguf writes it.
TKV_HD float ggml_roundf(float v) {
  const float a = fabsf(v);
  const float fl = floorf(a);
  const float b = fl + floorf(2.0f * (a - fl));
  return v < 0.0f ? -b : (v > 0.0f ? b : 0.0f * b);
}

// float -> integer in [0, hi] the way numpy's trunc().astype(uint8).clip() does for
// the values that occur; NaN (only from non-finite input) maps to 0.
TKV_HD int trunc_clip(float v, int hi) {
  if (!(v == v)) return 0;
  const float t = truncf(v);
  if (t <= 0.0f) return 0;
  if (t >= static_cast<float>(hi)) return hi;
  return static_cast<int>(t);
}

// ---- ggml block-32 formats ---------------------------------------------------

// Storage overflow rule: a value or scale that is finite but past what its 16-bit field holds
// (|x| > 65504 in fp16, rounding to inf) is stored as NaN, never as inf: the group decodes to
// NaN, and attention turns that into NaN rows (never into finite garbage).
TKV_HD bool f16_rounds_to_inf(float f) { return (f32_to_f16_bits(f) & 0x7fffu) == 0x7c00u; }
TKV_HD bool f32_finite(float f) { return fabsf(f) <= 3.4028234663852886e38f; }
// One stored value of an f16 / bf16 row: IEEE round to nearest even, finite overflow -> NaN.
TKV_HD uint16_t f16_store_bits(float f) {
  const uint16_t h = f32_to_f16_bits(f);
  return (h & 0x7fffu) == 0x7c00u && f32_finite(f) ? static_cast<uint16_t>(h | 0x7e00u) : h;
}
TKV_HD uint16_t bf16_store_bits(float f) {
  const uint16_t h = f32_to_bf16_bits(f);
  return (h & 0x7fffu) == 0x7f80u && f32_finite(f) ? static_cast<uint16_t>(h | 0x7fc0u) : h;
}

// A NaN-marked block: NaN scale (and min), zero quants.
TKV_HD void mark_block_nan(int fmt, uint8_t* out, int block_bytes) {
  for (int j = 0; j < block_bytes; ++j) out[j] = 0;
  store_u16(out, 0x7e00u);
  if (fmt == kFmt_q4_1 || fmt == kFmt_q5_1) store_u16(out + 2, 0x7e00u);
}

// A block holding NaN/Inf is NaN-marked, so it decodes to NaN (ggml itself would store finite
// garbage there); so is a block whose fp16 scale or min would overflow (ggml: inf).
TKV_HD bool encode_block_nonfinite(int fmt, const float* x, uint8_t* out, int block_bytes) {
  bool finite = true;
  for (int j = 0; j < 32; ++j) finite = finite && (fabsf(x[j]) <= 3.4028234663852886e38f);
  if (finite) return false;
  mark_block_nan(fmt, out, block_bytes);
  return true;
}

TKV_HD void encode_block(int fmt, const float* x, uint8_t* out, int block_bytes) {
  if (encode_block_nonfinite(fmt, x, out, block_bytes)) return;
  if (fmt == kFmt_q8_0) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f;
    if (f16_rounds_to_inf(d)) return mark_block_nan(fmt, out, block_bytes);
    const float id = (d == 0.0f) ? 0.0f : 1.0f / d;
    store_u16(out, f32_to_f16_bits(d));
    for (int j = 0; j < 32; ++j) {
      const float r = ggml_roundf(x[j] * id);
      const int q = (r == r) ? static_cast<int>(fmaxf(-128.0f, fminf(127.0f, r))) : 0;
      out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
    return;
  }
  const bool with_min = (fmt == kFmt_q4_1 || fmt == kFmt_q5_1);
  const bool five = (fmt == kFmt_q5_0 || fmt == kFmt_q5_1);
  const int qmax = five ? 31 : 15;
  float d, id, offset, mn = 0.0f;
  if (with_min) {
    float mx = x[0];
    mn = x[0];
    for (int j = 1; j < 32; ++j) {
      mx = fmaxf(mx, x[j]);
      mn = fminf(mn, x[j]);
    }
    d = (mx - mn) / static_cast<float>(qmax);
    offset = 0.5f;
  } else {
    // Signed value of largest magnitude, first one on ties (numpy argmax).
    float best = x[0];
    float best_abs = fabsf(x[0]);
    for (int j = 1; j < 32; ++j) {
      const float a = fabsf(x[j]);
      if (a > best_abs) {
        best_abs = a;
        best = x[j];
      }
    }
    d = best / (five ? -16.0f : -8.0f);
    offset = five ? 16.5f : 8.5f;
  }
  if (f16_rounds_to_inf(d) || (with_min && f16_rounds_to_inf(mn))) return mark_block_nan(fmt, out, block_bytes);
  id = (d == 0.0f) ? 0.0f : 1.0f / d;
  int q[32];
  for (int j = 0; j < 32; ++j) {
    const float v = with_min ? (x[j] - mn) * id : x[j] * id;
    q[j] = trunc_clip(v + offset, qmax);
  }
  uint8_t* p = out;
  store_u16(p, f32_to_f16_bits(d));
  p += 2;
  if (with_min) {
    store_u16(p, f32_to_f16_bits(mn));
    p += 2;
  }
  if (five) {
    uint32_t qh = 0;
    for (int j = 0; j < 32; ++j) qh |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
    for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>((qh >> (8 * b)) & 0xffu);
    p += 4;
  }
  for (int j = 0; j < 16; ++j) p[j] = static_cast<uint8_t>((q[j] & 0xf) | ((q[j + 16] & 0xf) << 4));
}

TKV_HD void decode_block(int fmt, const uint8_t* in, float* y) {
  const float d = f16_bits_to_f32(load_u16(in));
  if (fmt == kFmt_q8_0) {
    for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(in[2 + j])) * d;
    return;
  }
  const bool with_min = (fmt == kFmt_q4_1 || fmt == kFmt_q5_1);
  const bool five = (fmt == kFmt_q5_0 || fmt == kFmt_q5_1);
  const uint8_t* p = in + 2;
  float m = 0.0f;
  if (with_min) {
    m = f16_bits_to_f32(load_u16(p));
    p += 2;
  }
  uint32_t qh = 0;
  if (five) {
    qh = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
    p += 4;
  }
  const int zero = with_min ? 0 : (five ? 16 : 8);
  for (int j = 0; j < 32; ++j) {
    int q = (j < 16) ? (p[j] & 0xf) : (p[j - 16] >> 4);
    if (five) q |= static_cast<int>((qh >> j) & 1u) << 4;
    y[j] = with_min ? d * static_cast<float>(q) + m : d * static_cast<float>(q - zero);
  }
}

// ---- turbo formats -------------------------------------------------------------

// Index of bits b at position j of a group's packed index bytes.
TKV_HD int turbo_index(const uint8_t* idx, int bits, int g, int j) {
  if (bits == 2) return (idx[j >> 2] >> ((j & 3) * 2)) & 3;
  if (bits == 4) return (idx[j >> 1] >> ((j & 1) * 4)) & 15;
  const int lo = (idx[j >> 2] >> ((j & 3) * 2)) & 3;
  const int hi = (idx[g / 4 + (j >> 3)] >> (j & 7)) & 1;
  return lo | (hi << 2);
}

// One group of g rotated values -> fp16 scale + packed indices.
// norm = sqrt(sum x^2) (fp64 sum, rounded to fp32); u = x * (1/norm);
// index = #midpoints < u; scale = norm / ||c[index]||. Zero group: scale 0.
// Non-finite group: NaN scale and zero indices (decodes to NaN, never to finite garbage); a
// scale past the fp16 range: NaN scale, the indices as encoded.
TKV_HD void encode_turbo_group(const float* x, int g, int bits, const float* cb, const float* mids, uint8_t* out) {
  const int nmid = (1 << bits) - 1;
  double n2 = 0.0;
  for (int j = 0; j < g; ++j) n2 += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  const float norm = static_cast<float>(sqrt(n2));
  uint8_t* idx = out + 2;
  const int nbytes = g * bits / 8;
  for (int j = 0; j < nbytes; ++j) idx[j] = 0;
  if (!(norm <= 3.4028234663852886e38f)) {  // NaN or inf
    store_u16(out, 0x7e00u);
    return;
  }
  const float inv = (norm == 0.0f) ? 0.0f : 1.0f / norm;
  double c2 = 0.0;
  for (int j = 0; j < g; ++j) {
    const float u = x[j] * inv;
    int k = 0;
    while (k < nmid && mids[k] < u) ++k;
    c2 += static_cast<double>(cb[k]) * static_cast<double>(cb[k]);
    if (bits == 2) {
      idx[j >> 2] |= static_cast<uint8_t>(k << ((j & 3) * 2));
    } else if (bits == 4) {
      idx[j >> 1] |= static_cast<uint8_t>(k << ((j & 1) * 4));
    } else {
      idx[j >> 2] |= static_cast<uint8_t>((k & 3) << ((j & 3) * 2));
      idx[g / 4 + (j >> 3)] |= static_cast<uint8_t>(((k >> 2) & 1) << (j & 7));
    }
  }
  const float scale = (norm == 0.0f) ? 0.0f : static_cast<float>(static_cast<double>(norm) / sqrt(c2));
  store_u16(out, f16_rounds_to_inf(scale) ? uint16_t{0x7e00u} : f32_to_f16_bits(scale));
}

TKV_HD void decode_turbo_group(const uint8_t* in, int g, int bits, const float* cb, float* y) {
  const float s = f16_bits_to_f32(load_u16(in));
  for (int j = 0; j < g; ++j) y[j] = s * cb[turbo_index(in + 2, bits, g, j)];
}

// ---- one element (CUDA kernels decode tiles element-parallel) ------------------

// Value j (0 <= j < dp) of a packed row, in the rotated domain; cb = the row's codebook.
TKV_HD float decode_element(int fmt, Family family, int bits, int g, int group_bytes, const uint8_t* row, int j,
                            const float* cb) {
  if (family == Family::kFloat) {
    const uint16_t h = load_u16(row + 2 * j);
    return fmt == kFmt_bf16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
  }
  const uint8_t* blk = row + (j / g) * group_bytes;
  const int jj = j % g;
  const float d = f16_bits_to_f32(load_u16(blk));
  if (family == Family::kTurbo) return d * cb[turbo_index(blk + 2, bits, g, jj)];
  if (fmt == kFmt_q8_0) return static_cast<float>(static_cast<int8_t>(blk[2 + jj])) * d;
  const bool with_min = (fmt == kFmt_q4_1 || fmt == kFmt_q5_1);
  const bool five = (fmt == kFmt_q5_0 || fmt == kFmt_q5_1);
  const uint8_t* p = blk + (with_min ? 4 : 2);
  uint32_t qh = 0;
  if (five) {
    qh = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
    p += 4;
  }
  int q = (jj < 16) ? (p[jj] & 0xf) : (p[jj - 16] >> 4);
  if (five) q |= static_cast<int>((qh >> jj) & 1u) << 4;
  if (with_min) return d * static_cast<float>(q) + f16_bits_to_f32(load_u16(blk + 2));
  return d * static_cast<float>(q - (five ? 16 : 8));
}

// ---- whole rows ------------------------------------------------------------------

inline void encode_row(const RowLayout& L, const float* x, uint8_t* out) {
  if (L.family == Family::kFloat) {
    const bool bf = (L.fmt == kFmt_bf16);
    for (int j = 0; j < L.dp; ++j) store_u16(out + 2 * j, bf ? bf16_store_bits(x[j]) : f16_store_bits(x[j]));
  } else if (L.family == Family::kBlock) {
    for (int b = 0; b < L.dp / 32; ++b) encode_block(L.fmt, x + 32 * b, out + b * L.group_bytes, L.group_bytes);
  } else {
    for (int b = 0; b < L.dp / L.g; ++b)
      encode_turbo_group(x + L.g * b, L.g, L.bits, L.codebook, L.midpoints, out + b * L.group_bytes);
  }
}

inline void decode_row(const RowLayout& L, const uint8_t* in, float* y) {
  if (L.family == Family::kFloat) {
    const bool bf = (L.fmt == kFmt_bf16);
    for (int j = 0; j < L.dp; ++j) {
      const uint16_t h = load_u16(in + 2 * j);
      y[j] = bf ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
    }
  } else if (L.family == Family::kBlock) {
    for (int b = 0; b < L.dp / 32; ++b) decode_block(L.fmt, in + b * L.group_bytes, y + 32 * b);
  } else {
    for (int b = 0; b < L.dp / L.g; ++b)
      decode_turbo_group(in + b * L.group_bytes, L.g, L.bits, L.codebook, y + L.g * b);
  }
}

}  // namespace TURBOKV_CODEGEN
}  // namespace turbokv
