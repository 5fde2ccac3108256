// Launch parameters shared by the attention kernels.
#pragma once

#include "common.cuh"

namespace turbokv::cuda {

constexpr int kTile = 32;
constexpr int kThreads = 128;

struct AttnParams {
  int64_t B, Hq, Hkv, Sq, T;
  int d, G, nq, nqchunks, nsplit;
  int64_t span;  // keys per split, a multiple of kTile
  float scale, softcap;
  int causal;
  int64_t window;
  const int64_t* lengths;
  const int64_t* starts;     // may be null
  const float* sink_logits;  // (Hq,) attention sinks, or null; only the merge reads them
  float* lse;                // (B, Hq, Sq) log-sum-exp per row (attention_lse), or null; only the merge writes it
};

__host__ __device__ inline int rows_per_block(const AttnParams& P) { return P.G * P.nq; }

// The query rows of a tensor-core block: the (query, head) pairs of one KV head's group,
// numbered query-major (r = i * G + g) and cut into chunks of kRowsOf (blockIdx.z), so that a
// chunk holds consecutive queries. Chunks of 8 (RowChunk: the N of mma.m16n8k16, attention_mma.cuh
// and attention_templated.cuh): one query per sequence (decode) with G <= 8 is one chunk, its rows the
// group's heads. Chunks of 64 (attention_flash.cuh): 4 warps x the M of the mma.
template <int kRowsOf>
struct RowChunkOf {
  static constexpr int kRows = kRowsOf;
  int first, count;  // flat rows [first, first + count)
  __device__ explicit RowChunkOf(const AttnParams& P)
      : first(kRows * static_cast<int>(blockIdx.z)),
        count(static_cast<int>(min(static_cast<int64_t>(kRows), P.G * P.Sq - kRows * blockIdx.z))) {}
  // Query (0..Sq-1) and head in the group of row n; rows past count: those of the last row.
  __device__ int64_t query(const AttnParams& P, int n) const { return (first + min(n, count - 1)) / P.G; }
  __device__ int head(const AttnParams& P, int n) const { return (first + min(n, count - 1)) % P.G; }
  // Row of the (B, Hq, Sq) output (and of the partial workspace).
  __device__ int64_t out_row(const AttnParams& P, int64_t b, int64_t h, int n) const {
    return (b * P.Hq + h * P.G + head(P, n)) * P.Sq + query(P, n);
  }
  // Position of row n's query in a sequence of len tokens: its last Sq tokens are the queries.
  __device__ int64_t qpos(const AttnParams& P, int64_t len, int n) const { return len - P.Sq + query(P, n); }
  // Keys [lo, hi) that some row of the chunk sees, for a sequence of [start, len).
  __device__ void key_range(const AttnParams& P, int64_t start, int64_t len, int64_t& lo, int64_t& hi) const {
    lo = start;
    hi = len;
    if (P.causal) hi = min(hi, qpos(P, len, count - 1) + 1);
    if (P.window > 0) lo = max(lo, qpos(P, len, 0) - P.window + 1);
  }
  // Whether keys [t0, t1) are seen by some rows of the chunk but not by all (then each score
  // is masked by its row's position); never for one query per sequence.
  __device__ bool partly_seen(const AttnParams& P, int64_t len, int64_t t0, int64_t t1) const {
    return (P.causal && t1 - 1 > qpos(P, len, 0)) || (P.window > 0 && t0 < qpos(P, len, count - 1) - P.window + 1);
  }
};
using RowChunk = RowChunkOf<8>;

// Whether the query at qpos sees the key at jpos (both inside the sequence's valid range).
__device__ __forceinline__ bool sees(const AttnParams& P, int64_t qpos, int64_t jpos) {
  return (!P.causal || jpos <= qpos) && (P.window <= 0 || qpos - jpos < P.window);
}

}  // namespace turbokv::cuda
