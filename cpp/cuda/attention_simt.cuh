// Decode fast path of the CUDA attention (one query per sequence, GQA group <= 8).
//
// Lanes split each key row: lpk = dp / E lanes per key, so a warp works on 32 / lpk keys
// at once and each lane keeps its E-value slice of every head's rotated query and output
// in registers. A score costs E FMAs and log2(lpk) shuffles per lane; K and V slices are
// decoded straight from the packed row (decode_span.cuh). The block's 4 warps and the
// key slots within a warp are merged at the end; the result is one split's partial
// (unnormalised output, max, sum), combined by merge_kernel.
#pragma once

#include "attention_params.cuh"
#include "decode_span.cuh"

namespace turbokv::cuda {

template <int E, int GMAX, int U, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    simt_decode_kernel(const scalar_t* __restrict__ q, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                       DeviceSide ks, DeviceSide vs, AttnParams P, float* __restrict__ part_o,
                       float* __restrict__ part_ml) {
  extern __shared__ __align__(16) float sm[];
  const int dp = ks.dp;         // == vs.dp on this path
  float* qs = sm;               // GMAX x dp
  float* red = qs + GMAX * dp;  // 4 warps x GMAX x (dp + 2)
  float* cbk = red + 4 * GMAX * (dp + 2);
  float* cbv = cbk + 16;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int lpk = dp / E, kpw = 32 / lpk, sub = lane / lpk, e0 = (lane % lpk) * E;
  const int split = blockIdx.x, G = P.G;
  const int64_t bh = blockIdx.y, b = bh / P.Hkv, h = bh % P.Hkv;
  if (tid < 16) {
    cbk[tid] = ks.cb[tid];
    cbv[tid] = vs.cb[tid];
  }
  const int64_t len = min(max(P.lengths[b], int64_t(0)), P.T);
  const int64_t start = P.starts ? min(max(P.starts[b], int64_t(0)), len) : 0;
  for (int idx = tid; idx < G * dp; idx += blockDim.x) {
    const int g = idx / dp, j = idx % dp;
    qs[idx] = j < P.d ? to_float(q[(b * P.Hq + h * G + g) * P.Sq * P.d + j]) : 0.0f;
  }
  __syncthreads();
  if (ks.rot_group) rotate_side<float>(qs, G * dp, ks, false);

  float qr[GMAX][E], acc[GMAX][E], m[GMAX], l[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      qr[g][e] = g < G ? qs[g * dp + e0 + e] * P.scale : 0.0f;
      acc[g][e] = 0.0f;
    }
  }
  // The single query sits at len - 1: every valid key is causal-visible; only the window cuts.
  int64_t lo = start;
  if (P.window > 0) lo = max(lo, len - P.window);
  const int64_t s_lo = lo + split * P.span, s_hi = min(len, s_lo + P.span);
  const int64_t base = bh * P.T;
  // U keys per lane per step, all their K and V bytes requested before any is used, so
  // several loads are in flight per warp (the loop is latency-bound otherwise).
  for (int64_t t0 = s_lo + warp * kpw * U; t0 < s_hi; t0 += 4 * kpw * U) {  // uniform within a warp
    float kv[U][E], vv[U][E];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = t0 + u * kpw + sub;
      if (t < s_hi) {
        decode_span<E>(ks, cbk, kc + (base + t) * ks.row_bytes, e0, kv[u]);
        decode_span<E>(vs, cbv, vc + (base + t) * vs.row_bytes, e0, vv[u]);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) kv[u][e] = vv[u][e] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool valid = t0 + u * kpw + sub < s_hi;
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g < G) {
          float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // 4 chains: the FMAs need not wait on each other
#pragma unroll
          for (int e = 0; e < E; ++e) part[e % 4] = __fmaf_rn(qr[g][e], kv[u][e], part[e % 4]);
          float s = (part[0] + part[1]) + (part[2] + part[3]);
          for (int off = lpk / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
          if (P.softcap > 0.0f) s = P.softcap * tanhf(s / P.softcap);
          if (valid) {
            if (s > m[g]) {
              const float a = __expf(m[g] - s);
              l[g] *= a;
#pragma unroll
              for (int e = 0; e < E; ++e) acc[g][e] *= a;
              m[g] = s;
            }
            const float p = __expf(s - m[g]);
            l[g] += p;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[g][e] = __fmaf_rn(p, vv[u][e], acc[g][e]);
          }
        }
      }
    }
  }

  // Merge the key slots of a warp (lanes holding the same e0), then the warps.
  for (int off = lpk; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float lo_other = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float mn = fmaxf(m[g], mo);
      const float a = mn == -INFINITY ? 0.0f : __expf(m[g] - mn);
      const float ao = mn == -INFINITY ? 0.0f : __expf(mo - mn);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float other = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        acc[g][e] = acc[g][e] * a + other * ao;
      }
      l[g] = l[g] * a + lo_other * ao;
      m[g] = mn;
    }
  }
  float* mine = red + warp * GMAX * (dp + 2);
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
#pragma unroll
      for (int e = 0; e < E; ++e) mine[g * (dp + 2) + e0 + e] = acc[g][e];
      if (e0 == 0) {
        mine[g * (dp + 2) + dp] = m[g];
        mine[g * (dp + 2) + dp + 1] = l[g];
      }
    }
  }
  __syncthreads();
  const int64_t rows_total = P.B * P.Hq * P.Sq;
  for (int idx = tid; idx < G * dp; idx += blockDim.x) {
    const int g = idx / dp, j = idx % dp;
    float mx = -INFINITY;
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, red[(w * GMAX + g) * (dp + 2) + dp]);
    float o = 0.0f, sum = 0.0f;
    for (int w = 0; w < 4; ++w) {
      const float* r = red + (w * GMAX + g) * (dp + 2);
      if (r[dp + 1] == 0.0f) continue;  // saw no key (a NaN sum, from a NaN score, does count)
      const float a = __expf(r[dp] - mx);
      o += r[j] * a;
      sum += r[dp + 1] * a;
    }
    const int64_t row = (b * P.Hq + h * G + g) * P.Sq;
    part_o[(split * rows_total + row) * dp + j] = o;
    if (j == 0) {
      part_ml[(split * rows_total + row) * 2] = mx;
      part_ml[(split * rows_total + row) * 2 + 1] = sum;
    }
  }
}

// Launches simt_decode_kernel with e values per lane (16, 8 or 4) for GQA group G; built in
// attention_simt.cu (its own file, so it compiles in parallel with the others).
template <typename T>
void launch_simt(int e, int G, dim3 grid, cudaStream_t stream, const T* q, const uint8_t* kc, const uint8_t* vc,
                 const DeviceSide& ks, const DeviceSide& vs, const AttnParams& P, float* po, float* pm);

}  // namespace turbokv::cuda
