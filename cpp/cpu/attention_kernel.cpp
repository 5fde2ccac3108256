// The CPU attention kernel (attention_kernel.h), entirely in the rotated domain. CMakeLists.txt
// compiles this file twice: as it is (namespace turbokv::cpu::baseline) and, on x86, with
// -mavx2 -mfma -mf16c and TURBOKV_CPU_ISA=avx2 (namespace turbokv::cpu::avx2); attention.cpp
// picks one at run time. Each copy sets its own TURBOKV_CODEGEN, so the inline functions it
// reaches are copies of its own. For the same reason this file calls no float helpers of the
// C++ library (std::exp, std::fill: inline templates, shared by name with other files), only
// the C library's expf / tanhf.
//
// One task = (sequence b, KV head h, chunk of queries). The task's rows are the GQA group's
// query heads x its queries, so each K/V tile is decoded once and shared by all of them. Q is
// padded and rotated by the K side's rotation (prologue), the scale folded in; the output is
// inverse-rotated by the V side's rotation (epilogue). Online softmax in fp32.
#include "attention_kernel.h"

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "decode.h"
#include "simd.h"
#include "turbokv/fwht.h"

#ifndef TURBOKV_CPU_ISA
#define TURBOKV_CPU_ISA baseline
#endif

namespace turbokv::cpu::TURBOKV_CPU_ISA {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// NaN wins: max(NaN, x) = max(x, NaN) = NaN (std::max and fmaxf drop a NaN in one order or both).
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// Tile slots [v0, v1) (of the tile's nt, starting at cache slot t0) that query i sees: valid
// (start <= j < len), causal (j <= its position) and inside the window. An interval.
std::pair<int, int> visible(const AttnShape& P, int64_t len, int64_t start, int64_t i, int64_t t0, int nt) {
  const int64_t qpos = len - P.Sq + i;
  int64_t lo = start, hi = len;
  if (P.causal) hi = std::min(hi, qpos + 1);
  if (P.window > 0) lo = std::max(lo, qpos - P.window + 1);
  const int64_t v0 = std::clamp<int64_t>(lo - t0, 0, nt), v1 = std::clamp<int64_t>(hi - t0, 0, nt);
  return {static_cast<int>(v0), static_cast<int>(std::max(v0, v1))};
}

}  // namespace

void attend_task(const AttnShape& P, const AttnSide& ks, const AttnSide& vs, const float* q, const uint8_t* kc,
                 const uint8_t* vc, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t len, int64_t start,
                 float* out, float* ws) {
  const int dpk = ks.layout.dp, dpv = vs.layout.dp;
  const int64_t nq = i1 - i0;
  const int64_t M = P.G * nq;
  // Workspace (attend_workspace floats, the caller's): Q, acc, max, sum, K tile, V tile, scores.
  float* qr = ws;
  float* acc = qr + M * dpk;
  float* mx = acc + M * dpv;
  float* sm = mx + M;
  float* kt = sm + M;
  float* vt = kt + kAttnTile * dpk;
  float* sc = vt + kAttnTile * dpv;

  // Prologue: rows ordered (head g, query i); rotate and scale Q once.
  for (int g = 0; g < P.G; ++g) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = qr + (g * nq + (i - i0)) * dpk;
      const float* src = q + (((b * P.Hq + h * P.G + g) * P.Sq) + i) * P.d;
      for (int j = 0; j < P.d; ++j) row[j] = src[j];
      for (int j = P.d; j < dpk; ++j) row[j] = 0.0f;
      if (ks.rot_group) rotate_row<float>(row, dpk, ks.rot_group, ks.s1, ks.s2, false);
      for (int j = 0; j < dpk; ++j) row[j] *= P.scale;
    }
  }
  for (int64_t j = 0; j < M * dpv; ++j) acc[j] = 0.0f;
  for (int64_t r = 0; r < M; ++r) {
    mx[r] = -kInf;
    sm[r] = 0.0f;
  }

  // Key range any query of this chunk can see.
  const int64_t qpos0 = len - P.Sq + i0, qpos1 = len - P.Sq + i1 - 1;
  int64_t lo = start, hi = len;
  if (P.causal) hi = std::min(hi, qpos1 + 1);
  if (P.window > 0) lo = std::max(lo, qpos0 - P.window + 1);
  const int64_t base = (b * P.Hkv + h) * P.T;

  for (int64_t t0 = lo; t0 < hi; t0 += kAttnTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kAttnTile, hi - t0));
    for (int t = 0; t < nt; ++t) decode_row_fast(ks.layout, kc + (base + t0 + t) * ks.layout.row_bytes, kt + t * dpk);
    bool any = false;
    for (int64_t r = 0; r < M; ++r) {
      const auto [v0, v1] = visible(P, len, start, i0 + r % nq, t0, nt);
      float* s = sc + r * kAttnTile;
      // NaN-propagating max: a NaN score (a NaN query or key) makes the row NaN, as in SDPA.
      float tile_max = -kInf;
      for (int t = 0; t < nt; ++t) {
        float v = -kInf;
        if (t >= v0 && t < v1) {
          v = dot(qr + r * dpk, kt + t * dpk, dpk);
          if (P.softcap > 0.0f) v = P.softcap * tanhf(v / P.softcap);
        }
        s[t] = v;
        tile_max = nan_max(tile_max, v);
      }
      if (tile_max == -kInf) {
        for (int t = 0; t < nt; ++t) s[t] = 0.0f;
        continue;
      }
      any = true;
      const float m_new = nan_max(mx[r], tile_max);
      const float alpha = expf(mx[r] - m_new);  // exp(-inf) = 0 on the first tile
      mx[r] = m_new;
      float sum = 0.0f;
      for (int t = 0; t < nt; ++t) {
        s[t] = expf(s[t] - m_new);
        sum += s[t];
      }
      sm[r] = sm[r] * alpha + sum;
      if (alpha != 1.0f) scale(acc + r * dpv, alpha, dpv);
    }
    if (!any) continue;
    for (int t = 0; t < nt; ++t) decode_row_fast(vs.layout, vc + (base + t0 + t) * vs.layout.row_bytes, vt + t * dpv);
    // Every visible slot's V counts, even at probability 0 (a NaN there makes the row NaN);
    // slots the row cannot see never do, whatever their bytes.
    for (int64_t r = 0; r < M; ++r) {
      const auto [v0, v1] = visible(P, len, start, i0 + r % nq, t0, nt);
      float* a = acc + r * dpv;
      const float* s = sc + r * kAttnTile;
      for (int t = v0; t < v1; ++t) axpy(s[t], vt + t * dpv, a, dpv);
    }
  }

  // Epilogue: normalise, inverse-rotate the V side, drop the padding. A row that saw no key
  // stays zeros, whatever its sink (the sink has no value); a NaN sink makes the sum NaN.
  for (int64_t r = 0; r < M; ++r) {
    float* a = acc + r * dpv;
    const int g = static_cast<int>(r / nq);
    if (P.sinks != nullptr && mx[r] != -kInf) sm[r] += expf(P.sinks[h * P.G + g] - mx[r]);
    scale(a, sm[r] == 0.0f ? 0.0f : 1.0f / sm[r], dpv);
    if (vs.rot_group) rotate_row<float>(a, dpv, vs.rot_group, vs.s1, vs.s2, true);
    const int64_t i = i0 + r % nq;
    // The row's denominator as a logit (scale and softcap applied): what merging it with
    // attention over other keys needs (ops.merge_attention). No key seen: -inf.
    if (P.lse != nullptr) P.lse[(b * P.Hq + h * P.G + g) * P.Sq + i] = sm[r] == 0.0f ? -kInf : mx[r] + logf(sm[r]);
    float* dst = out + (((b * P.Hq + h * P.G + g) * P.Sq) + i) * P.d;
    for (int j = 0; j < P.d; ++j) dst[j] = a[j];
  }
}

}  // namespace turbokv::cpu::TURBOKV_CPU_ISA
