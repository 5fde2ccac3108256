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
//
// The products are register-blocked (a small GEMM per tile): scores 4 rows x 2 keys at a time,
// P V 4 rows x 16 columns at a time, so each loaded vector feeds several FMAs; one row times
// one key (a dot product, an axpy) would load two vectors per FMA and leave the FMA units
// idle. Vectors are GCC / Clang vector extensions: 8 floats in the avx2 copy, 4 (SSE or NEON)
// in the baseline copy.
#include "attention_kernel.h"

#include <math.h>
#include <string.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "decode.h"
#include "turbokv/fwht.h"

#ifndef TURBOKV_CPU_ISA
#define TURBOKV_CPU_ISA baseline
#endif

namespace turbokv::cpu::TURBOKV_CPU_ISA {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// One vector: 8 floats where AVX is on (the avx2 copy), else 4 (SSE or NEON: their 16
// registers of 4 would spill the accumulators of 8-float blocks).
#if defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
using vf = float __attribute__((vector_size(4 * kLanes)));
using vi = int32_t __attribute__((vector_size(4 * kLanes)));
using f4 = float __attribute__((vector_size(16)));

inline vf load(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { memcpy(p, &v, sizeof v); }

inline float hsum(vf v) {
#if defined(__AVX__)
  f4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  f4 s = v;
#endif
  s += __builtin_shufflevector(s, s, 2, 3, 0, 1);
  return s[0] + s[1];
}

// The sums of 8 vectors' lanes, in order, into out[8]: pairwise adds of interleaved lanes (a
// transpose), a few shuffles for all 8 where 8 separate sums would take 8 times as many.
inline void hsum8(vf a0, vf a1, vf a2, vf a3, vf a4, vf a5, vf a6, vf a7, float* out) {
#if defined(__AVX__)
  // hadd(a, b): lanes (a0+a1, a2+a3, b0+b1, b2+b3) within each 128-bit half, as vhaddps.
  auto hadd = [](vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const vf u0 = hadd(hadd(a0, a1), hadd(a2, a3));  // (a0, a1, a2, a3) low halves, then high halves
  const vf u1 = hadd(hadd(a4, a5), hadd(a6, a7));
  const vf r = __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
  memcpy(out, &r, sizeof r);
#else
  auto hadd = [](vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
  };
  const vf r0 = hadd(hadd(a0, a1), hadd(a2, a3)), r1 = hadd(hadd(a4, a5), hadd(a6, a7));
  memcpy(out, &r0, sizeof r0);
  memcpy(out + 4, &r1, sizeof r1);
#endif
}

// NaN wins: max(NaN, x) = max(x, NaN) = NaN (std::max and fmaxf drop a NaN in one order or both).
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// e^x lane by lane for x <= 0 (scores minus their running max), within 1 ulp of expf over
// [-87, 0] (checked over a grid of 1e-5): x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-7 Taylor polynomial (degree 6 was 2 ulp off, enough to move a float32 model's logits
// by 3e-4), 2^n into the exponent bits. Below -87 (e^-87 is about the smallest normal float)
// and at -inf (a masked slot): 0. NaN stays NaN.
inline vf exp_nonpositive(vf x) {
  const vi tiny = x < -87.0f;              // 2^n below the normal range (and -inf): 0
  const vf xc = tiny ? -87.0f + vf{} : x;  // keeps 2^n a normal float; NaN stays NaN
  const vf round = 12582912.0f + vf{};     // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (xc * 1.44269504088896341f + round) - round;
  vf r = xc - n * 0.693359375f;  // ln 2 in two parts: the first exact in 9 bits
  r = r + n * 2.12194440e-4f;
  vf p = r * (1.0f / 5040) + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  memcpy(&two_n, &bits, sizeof two_n);
  const vf e = p * two_n;
  vi eb;
  memcpy(&eb, &e, sizeof eb);
  eb &= ~tiny;
  vf out;
  memcpy(&out, &eb, sizeof out);
  return out;
}

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

// s[i][j] = q[i] . k[j] (rows of stride `stride`, a multiple of kLanes) for R rows x K keys; s has
// rows of kAttnTile.
template <int R, int K>
inline void score_block(const float* q, const float* k, int stride, float* s) {
  vf acc[R][K] = {};
  for (int c = 0; c < stride; c += kLanes) {
    vf kv[K];
    for (int j = 0; j < K; ++j) kv[j] = load(k + j * stride + c);
    for (int i = 0; i < R; ++i) {
      const vf qv = load(q + i * stride + c);
      for (int j = 0; j < K; ++j) acc[i][j] += qv * kv[j];
    }
  }
  if constexpr (R == 4 && K == 2) {
    float sums[8];
    hsum8(acc[0][0], acc[0][1], acc[1][0], acc[1][1], acc[2][0], acc[2][1], acc[3][0], acc[3][1], sums);
    for (int i = 0; i < 4; ++i) memcpy(s + i * kAttnTile, sums + 2 * i, 2 * sizeof(float));
  } else {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < K; ++j) s[i * kAttnTile + j] = hsum(acc[i][j]);
  }
}

template <int R>
inline void score_rows(const float* q, const float* kt, int stride, int nt, float* s) {
  int t = 0;
  for (; t + 2 <= nt; t += 2) score_block<R, 2>(q, kt + t * stride, stride, s + t);
  if (t < nt) score_block<R, 1>(q, kt + t * stride, stride, s + t);
}

// Scores of M rows (q) against a tile's nt keys (kt): s (M x kAttnTile).
void scores(const float* q, const float* kt, int stride, int64_t M, int nt, float* s) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) score_rows<4>(q + r * stride, kt, stride, nt, s + r * kAttnTile);
  const float* qr = q + r * stride;
  float* sr = s + r * kAttnTile;
  switch (M - r) {
    case 3:
      score_rows<3>(qr, kt, stride, nt, sr);
      break;
    case 2:
      score_rows<2>(qr, kt, stride, nt, sr);
      break;
    case 1:
      score_rows<1>(qr, kt, stride, nt, sr);
      break;
    default:
      break;
  }
}

// acc[i] += sum over t in [t0, t1) of p[i][t] v[t], R rows, V columns C vectors at a time.
template <int R, int C>
inline void pv_columns(const float* p, const float* vt, int stride, int t0, int t1, int c, float* acc) {
  vf a[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) a[i][j] = load(acc + i * stride + c + kLanes * j);
  for (int t = t0; t < t1; ++t) {
    vf v[C];
    for (int j = 0; j < C; ++j) v[j] = load(vt + t * stride + c + kLanes * j);
    for (int i = 0; i < R; ++i) {
      const float w = p[i * kAttnTile + t];
      for (int j = 0; j < C; ++j) a[i][j] += w * v[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) store(acc + i * stride + c + kLanes * j, a[i][j]);
}

template <int R>
inline void pv_rows(const float* p, const float* vt, int stride, int t0, int t1, float* acc) {
  int c = 0;
  for (; c + 2 * kLanes <= stride; c += 2 * kLanes) pv_columns<R, 2>(p, vt, stride, t0, t1, c, acc);
  if (c < stride) pv_columns<R, 1>(p, vt, stride, t0, t1, c, acc);
}

// acc (M x stride) += p (M x kAttnTile, slots [t0, t1)) times the V tile.
void pv(const float* p, const float* vt, int stride, int64_t M, int t0, int t1, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) pv_rows<4>(p + r * kAttnTile, vt, stride, t0, t1, acc + r * stride);
  const float* pr = p + r * kAttnTile;
  float* ar = acc + r * stride;
  switch (M - r) {
    case 3:
      pv_rows<3>(pr, vt, stride, t0, t1, ar);
      break;
    case 2:
      pv_rows<2>(pr, vt, stride, t0, t1, ar);
      break;
    case 1:
      pv_rows<1>(pr, vt, stride, t0, t1, ar);
      break;
    default:
      break;
  }
}

// Whether rows [t0, t1) of the V tile hold only finite values.
bool all_finite(const float* vt, int stride, int t0, int t1) {
  vi bad = {};
  for (int64_t j = int64_t{t0} * stride; j < int64_t{t1} * stride; j += kLanes) {
    const vf x = load(vt + j);
    bad |= (x - x) != 0.0f;  // inf - inf and NaN - NaN are NaN: unequal to 0
  }
  for (int l = 0; l < kLanes; ++l)
    if (bad[l]) return false;
  return true;
}

// Row r's probabilities for this tile in place of its scores s (kAttnTile slots, visible
// [v0, v1)), its running max and sum updated and its accumulator rescaled. A row that sees no
// key here, or only scores of -inf (an infinite key), gets zeros and changes nothing: -inf
// scores weigh 0 beside the row's finite ones in other tiles, as in the softmax.
void softmax_row(const AttnShape& P, float* s, int v0, int v1, float& mx, float& sm, float* acc, int stride) {
  auto none = [s] {
    for (int t = 0; t < kAttnTile; ++t) s[t] = 0.0f;
  };
  if (v0 >= v1) return none();
  if (P.softcap > 0.0f)
    for (int t = v0; t < v1; ++t) s[t] = P.softcap * tanhf(s[t] / P.softcap);
  vi iota;
  for (int l = 0; l < kLanes; ++l) iota[l] = l;
  vf x[kAttnTile / kLanes];
  vf m = -kInf + vf{};
  for (int k = 0; k < kAttnTile / kLanes; ++k) {
    const vi t = iota + kLanes * k;
    const vi seen = (t >= v0) & (t < v1);
    x[k] = seen ? load(s + kLanes * k) : -kInf + vf{};
    // NaN-propagating max: a NaN score (a NaN query or key) makes the row NaN, as in SDPA.
    m = (x[k] > m) | (x[k] != x[k]) ? x[k] : m;
  }
  float tile_max = m[0];
  for (int l = 1; l < kLanes; ++l) tile_max = nan_max(tile_max, m[l]);
  if (tile_max == -kInf) return none();
  const float m_new = nan_max(mx, tile_max);
  const float alpha = expf(mx - m_new);  // exp(-inf) = 0 on the first tile
  mx = m_new;
  vf sum = {};
  for (int k = 0; k < kAttnTile / kLanes; ++k) {
    const vf e = exp_nonpositive(x[k] - m_new);
    sum += e;
    store(s + kLanes * k, e);
  }
  sm = sm * alpha + hsum(sum);
  if (alpha != 1.0f)
    for (int c = 0; c < stride; c += kLanes) store(acc + c, load(acc + c) * alpha);
}

}  // namespace

void attend_task(const AttnShape& P, const AttnSide& ks, const AttnSide& vs, const float* q, const uint8_t* kc,
                 const uint8_t* vc, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t len, int64_t start,
                 float* out, float* ws) {
  const int dpk = ks.layout.dp, dpv = vs.layout.dp;
  const int sk = static_cast<int>(attend_stride(dpk)), sv = static_cast<int>(attend_stride(dpv));
  const int64_t nq = i1 - i0;
  const int64_t M = P.G * nq;
  // Workspace (attend_workspace floats, the caller's): Q, acc, max, sum, K tile, V tile, scores.
  // Rows of sk / sv floats; the columns past dpk / dpv are zeros and stay zeros.
  float* qr = ws;
  float* acc = qr + M * sk;
  float* mx = acc + M * sv;
  float* sm = mx + M;
  float* kt = sm + M;
  float* vt = kt + kAttnTile * sk;
  float* sc = vt + kAttnTile * sv;

  // Prologue: rows ordered (head g, query i); rotate and scale Q once.
  for (int g = 0; g < P.G; ++g) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = qr + (g * nq + (i - i0)) * sk;
      const float* src = q + (((b * P.Hq + h * P.G + g) * P.Sq) + i) * P.d;
      for (int j = 0; j < P.d; ++j) row[j] = src[j];
      for (int j = P.d; j < sk; ++j) row[j] = 0.0f;
      if (ks.rot_group) rotate_row<float>(row, dpk, ks.rot_group, ks.s1, ks.s2, false);
      for (int j = 0; j < dpk; ++j) row[j] *= P.scale;
    }
  }
  for (int64_t j = 0; j < M * sv; ++j) acc[j] = 0.0f;
  for (int64_t r = 0; r < M; ++r) {
    mx[r] = -kInf;
    sm[r] = 0.0f;
  }
  for (int t = 0; t < kAttnTile; ++t) {
    for (int j = dpk; j < sk; ++j) kt[t * sk + j] = 0.0f;
    for (int j = dpv; j < sv; ++j) vt[t * sv + j] = 0.0f;
  }

  // Key range any query of this chunk can see.
  const int64_t qpos0 = len - P.Sq + i0, qpos1 = len - P.Sq + i1 - 1;
  int64_t lo = start, hi = len;
  if (P.causal) hi = std::min(hi, qpos1 + 1);
  if (P.window > 0) lo = std::max(lo, qpos0 - P.window + 1);
  const int64_t base = (b * P.Hkv + h) * P.T;

  for (int64_t t0 = lo; t0 < hi; t0 += kAttnTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kAttnTile, hi - t0));
    for (int t = 0; t < nt; ++t) decode_row_fast(ks.layout, kc + (base + t0 + t) * ks.layout.row_bytes, kt + t * sk);
    scores(qr, kt, sk, M, nt, sc);
    // The union [u0, u1) of the rows' visible slots; `same`: every row sees exactly it.
    int u0 = nt, u1 = 0;
    bool same = true;
    const auto first = visible(P, len, start, i0, t0, nt);
    for (int64_t r = 0; r < M; ++r) {
      const auto [v0, v1] = visible(P, len, start, i0 + r % nq, t0, nt);
      same = same && v0 == first.first && v1 == first.second;
      softmax_row(P, sc + r * kAttnTile, v0, v1, mx[r], sm[r], acc + r * sv, sv);
      if (v0 < v1) {
        u0 = std::min(u0, v0);
        u1 = std::max(u1, v1);
      }
    }
    if (u0 >= u1) continue;
    for (int t = u0; t < u1; ++t) decode_row_fast(vs.layout, vc + (base + t0 + t) * vs.layout.row_bytes, vt + t * sv);
    // Every visible slot's V counts, even at probability 0 (a NaN there makes the row NaN);
    // slots the row cannot see never do, whatever their bytes. The blocked product reads the
    // whole union for every row (probability 0 outside a row's own slots), which is the same
    // unless a slot some row cannot see holds a NaN or an infinity: then row by row.
    if (same || all_finite(vt, sv, u0, u1)) {
      pv(sc, vt, sv, M, u0, u1, acc);
      continue;
    }
    for (int64_t r = 0; r < M; ++r) {
      const auto [v0, v1] = visible(P, len, start, i0 + r % nq, t0, nt);
      pv(sc + r * kAttnTile, vt, sv, 1, v0, std::max(v0, v1), acc + r * sv);
    }
  }

  // Epilogue: normalise, inverse-rotate the V side, drop the padding. A row that saw no key
  // stays zeros, whatever its sink (the sink has no value); a NaN sink makes the sum NaN.
  for (int64_t r = 0; r < M; ++r) {
    float* a = acc + r * sv;
    const int g = static_cast<int>(r / nq);
    if (P.sink_logits != nullptr && mx[r] != -kInf) sm[r] += expf(P.sink_logits[h * P.G + g] - mx[r]);
    const float inv = sm[r] == 0.0f ? 0.0f : 1.0f / sm[r];
    for (int j = 0; j < dpv; ++j) a[j] *= inv;
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
