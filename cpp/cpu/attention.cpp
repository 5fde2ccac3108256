// CPU attention over packed K/V caches, entirely in the rotated domain.
//
// One task = (sequence b, KV head h, chunk of queries). The task's rows are
// the GQA group's query heads x its queries, so each K/V tile is decoded once
// and shared by all of them. Q is padded and rotated by the K side's rotation
// (prologue), the scale folded in; the output is inverse-rotated by the V
// side's rotation (epilogue). Online softmax in fp32. An attention sink (one logit per query
// head, no value) only adds exp(sink - max) to a row's denominator, once, in the epilogue.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../op_checks.h"
#include "decode.h"
#include "rows.h"
#include "simd.h"
#include "turbokv/fwht.h"

namespace turbokv::cpu {
namespace {

constexpr int kTile = 32;         // keys decoded per tile
constexpr int kRowsPerTask = 64;  // query rows (heads x queries) per task, at least one query

struct Params {
  int64_t B, Hq, Hkv, Sq, T, d;
  int G;  // query heads per KV head
  float scale, softcap;
  bool causal;
  int64_t window;
  const float* sinks;  // (Hq,) or null
};

// NaN wins: max(NaN, x) = max(x, NaN) = NaN (std::max and fmaxf drop a NaN in one order or both).
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// Tile slots [v0, v1) (of the tile's nt, starting at cache slot t0) that query i sees: valid
// (start <= j < len), causal (j <= its position) and inside the window. An interval.
std::pair<int, int> visible(const Params& P, int64_t len, int64_t start, int64_t i, int64_t t0, int nt) {
  const int64_t qpos = len - P.Sq + i;
  int64_t lo = start, hi = len;
  if (P.causal) hi = std::min(hi, qpos + 1);
  if (P.window > 0) lo = std::max(lo, qpos - P.window + 1);
  const int64_t v0 = std::clamp<int64_t>(lo - t0, 0, nt), v1 = std::clamp<int64_t>(hi - t0, 0, nt);
  return {static_cast<int>(v0), static_cast<int>(std::max(v0, v1))};
}

void attend_task(const Params& P, const SideSpec& ks, const SideSpec& vs, const float* q, const uint8_t* kc,
                 const uint8_t* vc, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t len, int64_t start,
                 float* out, std::vector<float>& ws) {
  const int dpk = ks.layout.dp, dpv = vs.layout.dp;
  const int64_t nq = i1 - i0;
  const int64_t M = P.G * nq;
  // Workspace on the heap (no large stack arrays): Q, acc, max, sum, K tile, V tile, scores.
  ws.resize(M * dpk + M * dpv + 2 * M + kTile * dpk + kTile * dpv + M * kTile);
  float* qr = ws.data();
  float* acc = qr + M * dpk;
  float* mx = acc + M * dpv;
  float* sm = mx + M;
  float* kt = sm + M;
  float* vt = kt + kTile * dpk;
  float* sc = vt + kTile * dpv;

  // Prologue: rows ordered (head g, query i); rotate and scale Q once.
  for (int g = 0; g < P.G; ++g) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = qr + (g * nq + (i - i0)) * dpk;
      const float* src = q + (((b * P.Hq + h * P.G + g) * P.Sq) + i) * P.d;
      for (int j = 0; j < P.d; ++j) row[j] = src[j];
      for (int j = P.d; j < dpk; ++j) row[j] = 0.0f;
      if (ks.rot_group) rotate_row<float>(row, dpk, ks.rot_group, ks.s1_ptr(), ks.s2_ptr(), false);
      for (int j = 0; j < dpk; ++j) row[j] *= P.scale;
    }
  }
  std::fill(acc, acc + M * dpv, 0.0f);
  std::fill(mx, mx + M, -std::numeric_limits<float>::infinity());
  std::fill(sm, sm + M, 0.0f);

  // Key range any query of this chunk can see.
  const int64_t qpos0 = len - P.Sq + i0, qpos1 = len - P.Sq + i1 - 1;
  int64_t lo = start, hi = len;
  if (P.causal) hi = std::min(hi, qpos1 + 1);
  if (P.window > 0) lo = std::max(lo, qpos0 - P.window + 1);
  const int64_t base = (b * P.Hkv + h) * P.T;

  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kTile, hi - t0));
    for (int t = 0; t < nt; ++t) decode_row_fast(ks.layout, kc + (base + t0 + t) * ks.layout.row_bytes, kt + t * dpk);
    bool any = false;
    for (int64_t r = 0; r < M; ++r) {
      const auto [v0, v1] = visible(P, len, start, i0 + r % nq, t0, nt);
      float* s = sc + r * kTile;
      // NaN-propagating max: a NaN score (a NaN query or key) makes the row NaN, as in SDPA.
      float tile_max = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < nt; ++t) {
        float v = -std::numeric_limits<float>::infinity();
        if (t >= v0 && t < v1) {
          v = dot(qr + r * dpk, kt + t * dpk, dpk);
          if (P.softcap > 0.0f) v = P.softcap * std::tanh(v / P.softcap);
        }
        s[t] = v;
        tile_max = nan_max(tile_max, v);
      }
      if (tile_max == -std::numeric_limits<float>::infinity()) {
        for (int t = 0; t < nt; ++t) s[t] = 0.0f;
        continue;
      }
      any = true;
      const float m_new = nan_max(mx[r], tile_max);
      const float alpha = std::exp(mx[r] - m_new);  // exp(-inf) = 0 on the first tile
      mx[r] = m_new;
      float sum = 0.0f;
      for (int t = 0; t < nt; ++t) {
        s[t] = std::exp(s[t] - m_new);
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
      const float* s = sc + r * kTile;
      for (int t = v0; t < v1; ++t) axpy(s[t], vt + t * dpv, a, dpv);
    }
  }

  // Epilogue: normalise, inverse-rotate the V side, drop the padding. A row that saw no key
  // stays zeros, whatever its sink (the sink has no value); a NaN sink makes the sum NaN.
  for (int64_t r = 0; r < M; ++r) {
    float* a = acc + r * dpv;
    const int g = static_cast<int>(r / nq);
    if (P.sinks != nullptr && mx[r] != -std::numeric_limits<float>::infinity())
      sm[r] += std::exp(P.sinks[h * P.G + g] - mx[r]);
    scale(a, sm[r] == 0.0f ? 0.0f : 1.0f / sm[r], dpv);
    if (vs.rot_group) rotate_row<float>(a, dpv, vs.rot_group, vs.s1_ptr(), vs.s2_ptr(), true);
    const int64_t i = i0 + r % nq;
    float* dst = out + (((b * P.Hq + h * P.G + g) * P.Sq) + i) * P.d;
    for (int j = 0; j < P.d; ++j) dst[j] = a[j];
  }
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& lengths, const std::optional<at::Tensor>& starts, c10::string_view k_format,
                         int64_t k_rot_group, std::optional<int64_t> k_rot_seed, c10::string_view v_format,
                         int64_t v_rot_group, std::optional<int64_t> v_rot_seed, double scale, bool causal,
                         int64_t window, double softcap, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q: got device ", q.device(), ", expected cpu for this kernel");
  const AttentionArgs a =
      check_attention(q, k_cache, v_cache, lengths, starts, std::string(k_format), k_rot_group, k_rot_seed,
                      std::string(v_format), v_rot_group, v_rot_seed, scale, window, softcap, sinks);
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const at::Tensor st = starts.has_value() ? starts->to(at::kLong).contiguous() : at::zeros({a.B}, len.options());
  check_lengths(len, st, a.T, a.Sq, causal);
  const int64_t* lp = len.const_data_ptr<int64_t>();
  const int64_t* sp = st.const_data_ptr<int64_t>();
  const SideSpec &ks = a.ks, &vs = a.vs;
  Params P{a.B,    a.Hq,   a.Hkv,  a.Sq, a.T, a.d, a.G, static_cast<float>(scale), static_cast<float>(softcap),
           causal, window, nullptr};
  const at::Tensor sinks_f32 = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  if (sinks.has_value()) P.sinks = sinks_f32.const_data_ptr<float>();

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor kc = k_cache.contiguous(), vc = v_cache.contiguous();
  at::Tensor out = at::empty({P.B, P.Hq, P.Sq, P.d}, q.options().dtype(at::kFloat));
  const int64_t per_task = std::max<int64_t>(1, kRowsPerTask / P.G);
  const int64_t chunks = (P.Sq + per_task - 1) / per_task;
  const float* qp = qf.const_data_ptr<float>();
  const uint8_t* kp = kc.const_data_ptr<uint8_t>();
  const uint8_t* vp = vc.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, P.B * P.Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, h = (task / chunks) % P.Hkv, b = task / (chunks * P.Hkv);
      const int64_t i0 = c * per_task, i1 = std::min(P.Sq, i0 + per_task);
      attend_task(P, ks, vs, qp, kp, vp, b, h, i0, i1, lp[b], sp[b], op, ws);
    }
  });
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace turbokv::cpu
