// Combining the split-K partials of the CUDA attention kernels (merge_kernel, attention.cu):
// each split leaves an unnormalised output row, its running max and its sum; a row's result
// is the log-sum-exp weighted sum of its splits.
//
// This step is pure latency (a few hundred KB, but every load depends on nothing else), and a
// block loop over the splits made it a visible share of a long decode call. So the split
// weights are computed once, in parallel, and the sums run in kMergeThreads / (dpv / VW)
// groups of splits with VW-wide loads, issued before the weights are known, so that all
// loads of a row are in flight at once.
#pragma once

#include <type_traits>

#include "attention_params.cuh"

namespace turbokv::cuda {

constexpr int kMergeThreads = 256;

// Max (kMax) or sum of v over the block; scratch holds blockDim.x / 32 floats.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) v = kMax ? fmaxf(v, scratch[w]) : v + scratch[w];
  __syncthreads();  // scratch is reused by the next reduction
  return v;
}

// Shared memory of merge_kernel: the row, 8 reduction floats, the weights, the group sums.
inline size_t merge_smem(int dpv, int nsplit) {
  return sizeof(float) * (dpv + 8 + (nsplit + 3) / 4 * 4 + 4 * kMergeThreads);
}

// Row `row` of the result, normalised and still rotated, into out_row[0, dpv) (VW divides
// dpv), by all threads of the block; scratch: 8 + nsplit (rounded up to 4) + 4 * blockDim.x
// floats, 16-byte aligned. Every split wrote its partial (zeros where it saw no key), so no
// load needs a guard. `sink` (or null) points at the row's attention-sink logit: it joins the
// denominator once, as exp(sink - max) (a row that saw no key stays zeros). `lse` (or null):
// where thread 0 stores the row's log-sum-exp, max + log(denominator) (-inf for no key seen).
//
// Thread (c, k) sums column c (VW values) of splits k, k + groups, ... Its first kBatch
// partial rows are loaded before anything else, so they are in flight while the block
// finds the splits' weights (one load of each split's (max, sum), two block reductions):
// the loads cost about one round trip to L2 instead of one per phase.
template <int VW>
__device__ void merge_row(const float* part_o, const float* part_ml, int64_t row, int64_t rows_total, int nsplit,
                          int dpv, const float* sink, float* lse, float* out_row, float* scratch) {
  using V = std::conditional_t<VW == 4, float4, float>;
  constexpr int kBatch = 16;
  float* w = scratch + 8;
  V* sums = reinterpret_cast<V*>(w + (nsplit + 3) / 4 * 4);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int cols = dpv / VW, groups = max(1, nt / cols);
  const bool summer = tid < cols * groups;
  const int c = tid % cols, k = tid / cols;
  const V* base = reinterpret_cast<const V*>(part_o + row * dpv);
  const int64_t stride = rows_total * cols;  // one split, in V units
  V x[kBatch];
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int sp = k + u * groups;
    x[u] = summer && sp < nsplit ? __ldg(base + sp * stride + c) : V{};
  }
  // The splits' (max, sum) pairs, once each; more splits than threads loop.
  float m = -INFINITY;
  for (int sp = tid; sp < nsplit; sp += nt) m = fmaxf(m, part_ml[(sp * rows_total + row) * 2]);
  m = block_reduce<true>(m, scratch);
  float l = 0.0f;
  for (int sp = tid; sp < nsplit; sp += nt) {
    const float ms = part_ml[(sp * rows_total + row) * 2];
    const float ws = ms == -INFINITY ? 0.0f : __expf(ms - m);
    w[sp] = ws;
    l += ws * part_ml[(sp * rows_total + row) * 2 + 1];
  }
  l = block_reduce<false>(l, scratch);  // its barriers also publish w[]
  if (sink != nullptr && m != -INFINITY) l += expf(*sink - m);
  // l is 0 (no key seen), positive, +inf (a sink far above every score: zeros) or NaN (kept).
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;
  if (lse != nullptr && tid == 0) *lse = l == 0.0f ? -INFINITY : m + logf(l);
  const auto fma = [](V& acc, float a, const V& v) {
    if constexpr (VW == 4) {
      acc.x += a * v.x;
      acc.y += a * v.y;
      acc.z += a * v.z;
      acc.w += a * v.w;
    } else {
      acc += a * v;
    }
  };
  V acc{};
  if (summer) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int sp = k + u * groups;
      if (sp < nsplit) fma(acc, w[sp], x[u]);
    }
    for (int sp = k + kBatch * groups; sp < nsplit; sp += groups) fma(acc, w[sp], __ldg(base + sp * stride + c));
    if (groups == 1) {
      V r{};
      fma(r, inv, acc);
      reinterpret_cast<V*>(out_row)[c] = r;
    } else {
      sums[tid] = acc;
    }
  }
  __syncthreads();
  if (groups > 1)
    for (int cc = tid; cc < cols; cc += nt) {
      V a{};
      for (int kk = 0; kk < groups; ++kk) fma(a, 1.0f, sums[kk * cols + cc]);
      V r{};
      fma(r, inv, a);
      reinterpret_cast<V*>(out_row)[cc] = r;
    }
}

}  // namespace turbokv::cuda
