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
  const int64_t* starts;  // may be null
};

__host__ __device__ inline int rows_per_block(const AttnParams& P) { return P.G * P.nq; }

}  // namespace turbokv::cuda
