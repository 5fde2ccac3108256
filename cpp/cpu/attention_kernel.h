// The CPU attention kernel's interface: one task of attention.cpp's loop, compiled once per
// instruction set (attention_kernel.cpp: a baseline copy, and on x86 one with AVX2+FMA+F16C)
// and chosen at run time (attention.cpp). Plain structs and pointers only: the copies share no
// inline code with the rest of the extension (see TURBOKV_CODEGEN in turbokv/host_device.h).
#pragma once

#include <cstdint>

#include "turbokv/codec.h"

namespace turbokv::cpu {

constexpr int kAttnTile = 32;  // keys decoded per tile

struct AttnShape {
  int64_t B, Hq, Hkv, Sq, T, d;
  int G;  // query heads per KV head
  float scale, softcap;
  bool causal;
  int64_t window;
  const float* sink_logits;  // (Hq,) or null: one logit per query head that joins the denominator, no value
  float* lse;                // (B, Hq, Sq) or null: each row's log-sum-exp of its scores (sink included), -inf for none
};

struct AttnSide {
  RowLayout layout;
  int rot_group;         // 0: no rotation
  const float *s1, *s2;  // sign diagonals, or null (unseeded)
};

// A row's stride in the workspace: padded to whole vectors of 8 floats (the tail stays zero).
constexpr int64_t attend_stride(int dp) { return (dp + 7) / 8 * 8; }

// Floats of workspace attend_task needs for M = G x (i1 - i0) query rows.
constexpr int64_t attend_workspace(int64_t M, int dpk, int dpv) {
  const int64_t sk = attend_stride(dpk), sv = attend_stride(dpv);
  return M * sk + M * sv + 2 * M + kAttnTile * sk + kAttnTile * sv + M * kAttnTile;
}

// Attention of queries [i0, i1) of sequence b against KV head h: rows are the group's query
// heads x those queries. q: (B, Hq, Sq, d) f32; caches (B, Hkv, T, row_bytes); out like q.
using AttendTask = void (*)(const AttnShape& P, const AttnSide& ks, const AttnSide& vs, const float* q,
                            const uint8_t* kc, const uint8_t* vc, int64_t b, int64_t h, int64_t i0, int64_t i1,
                            int64_t len, int64_t start, float* out, float* ws);

namespace baseline {
void attend_task(const AttnShape& P, const AttnSide& ks, const AttnSide& vs, const float* q, const uint8_t* kc,
                 const uint8_t* vc, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t len, int64_t start,
                 float* out, float* ws);
}
namespace avx2 {
void attend_task(const AttnShape& P, const AttnSide& ks, const AttnSide& vs, const float* q, const uint8_t* kc,
                 const uint8_t* vc, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t len, int64_t start,
                 float* out, float* ws);
}

// The copy of the kernel attention runs now: "avx2", "baseline", or "native" (a TURBOKV_NATIVE=ON
// build has one copy, tuned for the build machine). AVX2 where the CPU has it, unless a caller
// pinned the baseline (kernel_choice.h: tests, benchmarks).
const char* attention_isa();

// Whether this build has an AVX2+FMA+F16C copy and this CPU runs it.
bool avx2_available();

}  // namespace turbokv::cpu
