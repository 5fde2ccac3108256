// Combining the split-K partials of the CUDA attention kernels (merge_kernel, attention.cu):
// each split leaves an unnormalised output row, its running max and its sum; a row's result
// is the log-sum-exp weighted sum of its splits.
//
// This step is pure latency (a few hundred KB, but every load depends on nothing else): a
// block loop over the splits cost 20-30 us per decode call at 128k on the H100. So the split
// weights are computed once, in parallel, and the sums run in kMergeThreads / (dpv / VW)
// groups of splits with VW-wide loads, so that all loads of a row are in flight at once.
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
// load needs a guard.
template <int VW>
__device__ void merge_row(const float* part_o, const float* part_ml, int64_t row, int64_t rows_total, int nsplit,
                          int dpv, float* out_row, float* scratch) {
  using V = std::conditional_t<VW == 4, float4, float>;
  float* w = scratch + 8;
  V* sums = reinterpret_cast<V*>(w + (nsplit + 3) / 4 * 4);
  const int tid = threadIdx.x, nt = blockDim.x;
  float m = -INFINITY;
  for (int s = tid; s < nsplit; s += nt) m = fmaxf(m, part_ml[(s * rows_total + row) * 2]);
  m = block_reduce<true>(m, scratch);
  float l = 0.0f;
  for (int s = tid; s < nsplit; s += nt) {
    const float ms = part_ml[(s * rows_total + row) * 2];
    const float ws = ms == -INFINITY ? 0.0f : __expf(ms - m);
    w[s] = ws;
    l += ws * part_ml[(s * rows_total + row) * 2 + 1];
  }
  l = block_reduce<false>(l, scratch);  // its barriers also publish w[]
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const int cols = dpv / VW, groups = max(1, nt / cols);
  const V* base = reinterpret_cast<const V*>(part_o + row * dpv);
  const int64_t stride = rows_total * cols;  // one split, in V units
  const auto fma = [](V& acc, float a, const V& x) {
    if constexpr (VW == 4) {
      acc.x += a * x.x;
      acc.y += a * x.y;
      acc.z += a * x.z;
      acc.w += a * x.w;
    } else {
      acc += a * x;
    }
  };
  for (int t = tid; t < cols * groups; t += nt) {
    const int c = t % cols, k = t / cols;
    V acc[4] = {};
    int s = k;
    for (; s + 3 * groups < nsplit; s += 4 * groups) {
#pragma unroll
      for (int u = 0; u < 4; ++u) fma(acc[u], w[s + u * groups], __ldg(base + (s + u * groups) * stride + c));
    }
    for (; s < nsplit; s += groups) fma(acc[0], w[s], __ldg(base + s * stride + c));
    fma(acc[0], 1.0f, acc[1]);
    fma(acc[2], 1.0f, acc[3]);
    fma(acc[0], 1.0f, acc[2]);
    if (groups == 1) {
      V r{};
      fma(r, inv, acc[0]);
      reinterpret_cast<V*>(out_row)[c] = r;
    } else {
      sums[t] = acc[0];
    }
  }
  __syncthreads();
  if (groups > 1)
    for (int c = tid; c < cols; c += nt) {
      V acc{};
      for (int k = 0; k < groups; ++k) fma(acc, 1.0f, sums[k * cols + c]);
      V r{};
      fma(r, inv, acc);
      reinterpret_cast<V*>(out_row)[c] = r;
    }
}

}  // namespace turbokv::cuda
