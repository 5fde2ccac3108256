// CUDA attention over packed K/V caches (decode, multi-query and prefill), in the rotated domain.
//
// Split-K flash attention in two launches, by one of five partial kernels (choose_path):
//  * flash (attention_flash.cuh): tensor cores, 64 (query, head) rows a block, each K/V tile
//    decoded once into shared memory for all of them; f16 calls of many rows (kFlashMinRows).
//  * templated (attention_templated.cuh): tensor cores, the K and V formats template parameters; decode
//    and multi-query calls. Keys are the M of the mma, 8 (query, head) rows of a KV head's group
//    the N (RowChunk, one chunk per blockIdx.z), so each K/V chunk is decoded once per 8 rows.
//  * mma (attention_mma.cuh): the same products with the format read at run time (f16, q8_0
//    and every format the templated kernel is not built for).
//  * simt (attention_simt.cuh): one query per sequence on CUDA cores, any head dim.
//  * tiled (below): anything else (f32 queries, mixed row widths). One block per (key split,
//    sequence x KV head, chunk of queries); its rows are the group's heads x its queries. Q is
//    padded, rotated (K side) and scaled in shared memory (prologue); K/V tiles are dequantised
//    element-parallel into shared memory and never un-rotated; online softmax.
// Each writes unnormalised partial outputs + (max, sum) to a workspace; then
//  merge: one block per query row combines the splits (log-sum-exp), adds the attention
//     sink's exp(sink - max) to the denominator when sink_logits are given, normalises,
//     inverse-rotates (V side) and drops the padding (epilogue).
// Long prompts (Sq >= PREFILL_SDPA_MIN_QUERIES) do not come here: the Python op dequantizes
// and calls SDPA's flash / cuDNN kernels, which are faster at that shape (ops.py).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "../kernel_choice.h"
#include "attention_flash.cuh"
#include "attention_merge.cuh"
#include "attention_mma.cuh"
#include "attention_simt.cuh"
#include "attention_templated.cuh"
#include "common.cuh"

namespace turbokv::cuda {
namespace {

size_t partial_smem(int M, int dpk, int dpv) {
  return sizeof(float) * (static_cast<size_t>(M) * dpk + kTile * (dpk + 1) + kTile * dpv + M * kTile + 3 * M +
                          static_cast<size_t>(M) * dpv + 32);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(const scalar_t* __restrict__ q, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                   DeviceSide ks, DeviceSide vs, AttnParams P, float* __restrict__ part_o,
                   float* __restrict__ part_ml) {
  extern __shared__ __align__(16) float sm[];
  const int dpk = ks.dp, dpv = vs.dp;
  const int Mmax = rows_per_block(P);
  float* qs = sm;
  float* kt = qs + Mmax * dpk;
  float* vt = kt + kTile * (dpk + 1);  // +1: threads of a warp read different keys, same column
  float* sc = vt + kTile * dpv;
  float* mrow = sc + Mmax * kTile;
  float* lrow = mrow + Mmax;
  float* alpha = lrow + Mmax;
  float* acc = alpha + Mmax;
  float* cbk = acc + Mmax * dpv;
  float* cbv = cbk + 16;

  const int split = blockIdx.x, qc = blockIdx.z;
  const int64_t bh = blockIdx.y, b = bh / P.Hkv, h = bh % P.Hkv;
  const int64_t i0 = static_cast<int64_t>(qc) * P.nq, i1 = min(P.Sq, i0 + P.nq);
  const int nqc = static_cast<int>(i1 - i0), M = P.G * nqc;
  const int tid = threadIdx.x, nt_ = blockDim.x;
  if (tid < 16) {
    cbk[tid] = ks.cb[tid];
    cbv[tid] = vs.cb[tid];
  }
  // Lengths are validated on the host outside graph capture; clamp so nothing reads out of bounds.
  const int64_t len = min(max(P.lengths[b], int64_t(0)), P.T);
  const int64_t start = P.starts ? min(max(P.starts[b], int64_t(0)), len) : 0;

  // Prologue: rows (head g, query i), padded, rotated with the K side's rotation, then scaled.
  for (int idx = tid; idx < M * dpk; idx += nt_) {
    const int r = idx / dpk, j = idx % dpk, g = r / nqc;
    const int64_t i = i0 + r % nqc;
    qs[idx] = j < P.d ? to_float(q[((b * P.Hq + h * P.G + g) * P.Sq + i) * P.d + j]) : 0.0f;
  }
  for (int r = tid; r < M; r += nt_) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.0f;
  }
  for (int idx = tid; idx < M * dpv; idx += nt_) acc[idx] = 0.0f;
  __syncthreads();
  if (ks.rot_group) rotate_side<float>(qs, M * dpk, ks, false);
  for (int idx = tid; idx < M * dpk; idx += nt_) qs[idx] *= P.scale;

  // Keys any query of this block may see, then this split's share.
  const int64_t qpos0 = len - P.Sq + i0, qpos1 = len - P.Sq + i1 - 1;
  int64_t lo = start, hi = len;
  if (P.causal) hi = min(hi, qpos1 + 1);
  if (P.window > 0) lo = max(lo, qpos0 - P.window + 1);
  const int64_t s_lo = lo + split * P.span, s_hi = min(hi, s_lo + P.span);
  const int64_t base = bh * P.T;
  __syncthreads();

  for (int64_t t0 = s_lo; t0 < s_hi; t0 += kTile) {
    const int nt = static_cast<int>(min(static_cast<int64_t>(kTile), s_hi - t0));
    for (int idx = tid; idx < nt * dpk; idx += nt_) {
      const int t = idx / dpk, j = idx % dpk;
      kt[t * (dpk + 1) + j] = decode_at(ks, cbk, kc + (base + t0 + t) * ks.row_bytes, j);
    }
    for (int idx = tid; idx < nt * dpv; idx += nt_) {
      const int t = idx / dpv, j = idx % dpv;
      vt[t * dpv + j] = decode_at(vs, cbv, vc + (base + t0 + t) * vs.row_bytes, j);
    }
    __syncthreads();
    for (int idx = tid; idx < M * kTile; idx += nt_) {
      const int r = idx / kTile, t = idx % kTile;
      float v = -INFINITY;
      if (t < nt) {
        const int64_t qpos = len - P.Sq + i0 + r % nqc, jpos = t0 + t;
        const bool ok = (!P.causal || jpos <= qpos) && (P.window <= 0 || qpos - jpos < P.window);
        if (ok) {
          const float* qr = qs + r * dpk;
          const float* kr = kt + t * (dpk + 1);
          float s = 0.0f;
          for (int j = 0; j < dpk; ++j) s = __fmaf_rn(qr[j], kr[j], s);
          if (P.softcap > 0.0f) s = P.softcap * tanhf(s / P.softcap);
          v = s;
        }
      }
      sc[idx] = v;
    }
    __syncthreads();
    for (int r = tid; r < M; r += nt_) {
      float* s = sc + r * kTile;
      float tmax = -INFINITY;
      for (int t = 0; t < nt; ++t) tmax = nan_max(tmax, s[t]);
      const float m_new = nan_max(mrow[r], tmax);  // a NaN score makes the row NaN
      if (m_new == -INFINITY) {                    // nothing visible yet
        alpha[r] = 1.0f;
        for (int t = 0; t < kTile; ++t) s[t] = 0.0f;
        continue;
      }
      const float a = __expf(mrow[r] - m_new);
      float sum = 0.0f;
      for (int t = 0; t < kTile; ++t) {
        const float p = t < nt ? __expf(s[t] - m_new) : 0.0f;
        s[t] = p;
        sum += p;
      }
      lrow[r] = lrow[r] * a + sum;
      mrow[r] = m_new;
      alpha[r] = a;
    }
    __syncthreads();
    // Only the slots a row sees: their V counts even at probability 0 (a NaN makes the row
    // NaN), the others' bytes never do. Visible slots are an interval (causal, window).
    for (int idx = tid; idx < M * dpv; idx += nt_) {
      const int r = idx / dpv, j = idx % dpv;
      const float* p = sc + r * kTile;
      const int64_t qpos = len - P.Sq + i0 + r % nqc;
      int64_t vlo = start, vhi = len;
      if (P.causal) vhi = min(vhi, qpos + 1);
      if (P.window > 0) vlo = max(vlo, qpos - P.window + 1);
      const int t_lo = static_cast<int>(min(max(vlo - t0, int64_t(0)), static_cast<int64_t>(nt)));
      const int t_hi = static_cast<int>(min(max(vhi - t0, int64_t(0)), static_cast<int64_t>(nt)));
      float a = acc[idx] * alpha[r];
      for (int t = t_lo; t < t_hi; ++t) a = __fmaf_rn(p[t], vt[t * dpv + j], a);
      acc[idx] = a;
    }
    __syncthreads();
  }

  const int64_t rows_total = P.B * P.Hq * P.Sq;
  for (int idx = tid; idx < M * dpv; idx += nt_) {
    const int r = idx / dpv, j = idx % dpv, g = r / nqc;
    const int64_t row = (b * P.Hq + h * P.G + g) * P.Sq + i0 + r % nqc;
    part_o[(split * rows_total + row) * dpv + j] = acc[idx];
  }
  for (int r = tid; r < M; r += nt_) {
    const int g = r / nqc;
    const int64_t row = (b * P.Hq + h * P.G + g) * P.Sq + i0 + r % nqc;
    part_ml[(split * rows_total + row) * 2] = mrow[r];
    part_ml[(split * rows_total + row) * 2 + 1] = lrow[r];
  }
}

// check_lengths (op_checks.cpp) inside a CUDA graph: the first bad value goes to the record.
__device__ void check_lengths_in_graph(const AttnParams& P, int64_t b, GraphError* err) {
  const int64_t len = P.lengths[b], start = P.starts ? P.starts[b] : 0;
  if (len < 0 || len > P.T)
    record_graph_error(err, kLengthRange, b, len, P.T);
  else if (P.causal && len < P.Sq)
    record_graph_error(err, kLengthShort, b, len, P.Sq);
  else if (start < 0 || start > len)
    record_graph_error(err, kStartRange, b, start, len);
}

// The merged row (32 * E values in shared memory), inverse-rotated by one warp in registers
// (rot: lane_rotation<E>(vs, true)) and written out (its first d values).
template <int E, typename scalar_t>
__device__ void unrotate_out(const float* buf, const LaneRotation<float>& rot, int d, scalar_t* out) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  float v[E];
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] = buf[lane * E + e];
  warp_rotate<E>(v, rot);
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (lane * E + e < d) out[lane * E + e] = from_float<scalar_t>(v[e]);
}

// One block per query row: combine the splits, inverse-rotate, store.
template <typename scalar_t>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml, DeviceSide vs, int nsplit,
                 int64_t rows_total, int d, scalar_t* __restrict__ out, AttnParams P, GraphError* err) {
  extern __shared__ __align__(16) float buf[];  // dpv outputs, then merge_row's scratch
  // Rows a warp holds are inverse-rotated in registers; the lane's sign flips are read before
  // the wait for the partials (constant-memory reads with a lane-dependent index: a cold
  // constant cache took them to the end of a decode call's critical path).
  const bool in_warp = vs.rot_group && (vs.dp == 64 || vs.dp == 128 || vs.dp == 256);
  LaneRotation<float> rot;
  if (in_warp)
    rot = vs.dp == 64    ? lane_rotation<2>(vs, true)
          : vs.dp == 128 ? lane_rotation<4>(vs, true)
                         : lane_rotation<8>(vs, true);
  wait_for_producer_grid();  // launched early (see attention_cuda)
  const int64_t row = blockIdx.x;
  const float* sink = P.sink_logits ? P.sink_logits + (row / P.Sq) % P.Hq : nullptr;
  if (err != nullptr && threadIdx.x == 0 && row % (P.Hq * P.Sq) == 0)
    check_lengths_in_graph(P, row / (P.Hq * P.Sq), err);
  float* lse = P.lse ? P.lse + row : nullptr;
  if (vs.dp % 4 == 0)
    merge_row<4>(part_o, part_ml, row, rows_total, nsplit, vs.dp, sink, lse, buf, buf + vs.dp);
  else
    merge_row<1>(part_o, part_ml, row, rows_total, nsplit, vs.dp, sink, lse, buf, buf + vs.dp);
  __syncthreads();
  if (in_warp) {
    if (threadIdx.x >= 32) return;
    if (vs.dp == 64)
      unrotate_out<2>(buf, rot, d, out + row * d);
    else if (vs.dp == 128)
      unrotate_out<4>(buf, rot, d, out + row * d);
    else
      unrotate_out<8>(buf, rot, d, out + row * d);
    return;
  }
  if (vs.rot_group) rotate_side<float>(buf, vs.dp, vs, true);
  for (int j = threadIdx.x; j < d; j += blockDim.x) out[row * d + j] = from_float<scalar_t>(buf[j]);
}

// Values per lane (16 or 8) of the decode fast path, or 0 when this call must take the general kernel.
int decode_fast_path(const AttentionArgs& a, const DeviceSide& ks, const DeviceSide& vs, const at::Tensor& kc,
                     const at::Tensor& vc) {
  if (a.Sq != 1 || a.G > 8 || ks.dp != vs.dp) return 0;
  const bool aligned = reinterpret_cast<uintptr_t>(kc.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(vc.const_data_ptr()) % 16 == 0 && ks.row_bytes % 16 == 0 &&
                       vs.row_bytes % 16 == 0;
  const bool floats = ks.family == static_cast<int>(Family::kFloat) || vs.family == static_cast<int>(Family::kFloat);
  if (floats && !aligned) return 0;
  // Registers: the q and output slices are GMAX x E floats each. A pinned decode_values
  // (kernel_choice.h: 4, 8 or 16) overrides the choice for G <= 4, for benchmarking.
  const int pinned = kernel_choice().decode_values;
  const int e = a.G > 4 ? 8 : (pinned ? pinned : 16);
  const int lpk = ks.dp / e;
  if (ks.dp % e != 0 || lpk < 1 || lpk > 32 || (lpk & (lpk - 1)) != 0) return 0;
  return e;
}

// Which kernel runs a call: chosen from the shapes and the device, or pinned by a caller
// (kernel_choice.h: tests, benchmarks); a pinned kernel that cannot run the call is an error.
enum class Path { kTiled, kSimt, kMma, kTemplated, kFlash };

// From this many (query, head) rows per KV head and sequence, auto runs a call of several
// queries with f16 K and V rows on the flash kernel, which is faster there by measurement
// (benchmarks/results/bench_prefill_kernels.md). Packed formats stay on the templated kernel: its
// word-wide decoders in registers beat the flash kernel's decode into shared memory.
constexpr int kFlashMinRows = 32;

MmaKernel mma_for_dp(int nt, int dp, bool multi = false) {
  switch (dp) {
    case 64:
      return mma_kernel<64>(nt, multi);
    case 96:
      return mma_kernel<96>(nt, multi);
    case 128:
      return mma_kernel<128>(nt, multi);
    case 256:
      return mma_kernel<256>(nt, multi);
    default:
      return nullptr;
  }
}

// Resident blocks per SM of a tensor-core kernel with `smem` bytes of shared memory. Cached:
// the attribute call and the occupancy query run once, outside any CUDA-graph capture.
int mma_blocks_per_sm(MmaKernel k, size_t smem, int device) {
  static std::mutex mu;
  static std::map<std::tuple<MmaKernel, size_t, int>, int> known;
  static std::map<std::pair<MmaKernel, int>, bool> opted_in;
  const std::lock_guard<std::mutex> lock(mu);
  if (!opted_in[{k, device}]) {
    // The opt-in limit, once per kernel: one kernel serves several formats with different
    // shared-memory sizes, and a limit set for a smaller one would make a larger launch fail.
    const int optin = device_config(device).smem_optin;
    cudaFuncAttributes attr{};
    TKV_CUDA_CHECK(cudaFuncGetAttributes(&attr, k));  // static shared memory counts against the limit
    TKV_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        optin - static_cast<int>(attr.sharedSizeBytes)));
    opted_in[{k, device}] = true;
  }
  const auto key = std::make_tuple(k, smem, device);
  if (auto it = known.find(key); it != known.end()) return it->second;
  int per_sm = 1;
  TKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kThreads, smem));
  known[key] = std::max(per_sm, 1);
  return known[key];
}

// 16-key tiles per chunk: two when a chunk of K and V stays within 8 KiB.
int mma_tiles(const DeviceSide& ks, const DeviceSide& vs) { return 32 * (ks.row_bytes + vs.row_bytes) <= 8192 ? 2 : 1; }

// Why neither tensor-core kernel (attention_mma.cuh, attention_templated.cuh) can run this call,
// shared memory aside, or nullptr when they can.
const char* tensor_core_unfit(const AttentionArgs& a, const DeviceSide& ks, const DeviceSide& vs, const at::Tensor& q,
                              const at::Tensor& kc, const at::Tensor& vc) {
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return "it is built for f16/bf16 queries";
  if ((a.G * a.Sq + 7) / 8 > 65535) return "it takes at most 65535 chunks of 8 (query, head) rows (the grid's z)";
  if (ks.dp != vs.dp || !mma_for_dp(1, ks.dp)) return "it is built for K and V rows of 64, 96, 128 or 256 values";
  if (reinterpret_cast<uintptr_t>(kc.const_data_ptr()) % 16 || reinterpret_cast<uintptr_t>(vc.const_data_ptr()) % 16)
    return "it needs 16-byte aligned cache tensors";
  return nullptr;
}

constexpr const char* kNoSmem = "its shared memory for these rows exceeds the GPU's limit per block";

// Why the tensor-core kernel (attention_mma.cuh) cannot run this call within `smem_max` bytes
// of shared memory per block, or nullptr when it can.
const char* mma_unfit(const AttentionArgs& a, const DeviceSide& ks, const DeviceSide& vs, const at::Tensor& q,
                      const at::Tensor& kc, const at::Tensor& vc, int smem_max) {
  if (const char* why = tensor_core_unfit(a, ks, vs, q, kc, vc)) return why;
  if (mma_smem_bytes(MmaLayout(mma_tiles(ks, vs), ks.row_bytes, vs.row_bytes), ks.dp) > static_cast<size_t>(smem_max))
    return kNoSmem;  // f16 / bf16 rows of 256 on GPUs of 99 KiB (sm_86, sm_89, sm_120)
  return nullptr;
}

// Why the flash kernel (attention_flash.cuh) cannot run this call, or nullptr when it can.
const char* flash_unfit(const AttentionArgs& a, const DeviceSide& ks, const DeviceSide& vs, const at::Tensor& q,
                        const at::Tensor& kc, const at::Tensor& vc, int smem_max) {
  if (const char* why = tensor_core_unfit(a, ks, vs, q, kc, vc)) return why;
  const FlashKernel fk = flash_kernel_for(ks.dp, ks.row_bytes, vs.row_bytes);
  if (!fk.fn) return "it is built for K and V rows of 64, 128 or 256 values";
  if (fk.smem > smem_max) return kNoSmem;
  return nullptr;
}

template <bool kMulti>
TemplatedKernel templated_for_dp(int kfmt, int vfmt, int dp, bool long_keys) {
  switch (dp) {
    case 64:
      return templated_kernel<64, kMulti>(kfmt, vfmt, long_keys);
    case 128:
      return templated_kernel<128, kMulti>(kfmt, vfmt, long_keys);
    case 256:
      return templated_kernel<256, kMulti>(kfmt, vfmt, long_keys);
    default:
      return {};
  }
}

// The format-specialised kernel for this call (fn null where none is built), in the shape that
// fits `smem_max` bytes of shared memory per block where there is a choice: f16 rows of 128
// have a 2-stage shape of 68 KiB beside the 3-stage one of 102 KiB, which sm_86 / sm_89 /
// sm_120 (99 KiB) cannot hold.
TemplatedKernel pick_templated(const AttentionArgs& a, const DeviceSide& ks, const DeviceSide& vs, int smem_max) {
  const auto get = [&](bool long_keys) {
    return a.Sq == 1 ? templated_for_dp<false>(ks.fmt, vs.fmt, ks.dp, long_keys)
                     : templated_for_dp<true>(ks.fmt, vs.fmt, ks.dp, long_keys);
  };
  const bool long_keys = a.T >= 8192;
  const TemplatedKernel sk = get(long_keys);
  if (sk.fn && sk.smem > smem_max) {
    const TemplatedKernel other = get(!long_keys);
    if (other.smem <= smem_max) return other;
  }
  return sk;
}

// Why the format-specialised tensor-core kernel cannot run this call, or nullptr when it can.
const char* templated_unfit(const AttentionArgs& a, const DeviceSide& ks, const DeviceSide& vs, const at::Tensor& q,
                            const at::Tensor& kc, const at::Tensor& vc, int smem_max) {
  if (const char* why = tensor_core_unfit(a, ks, vs, q, kc, vc)) return why;
  const TemplatedKernel sk = pick_templated(a, ks, vs, smem_max);
  if (!sk.fn)
    return "it is built for rows of 64, 128 or 256 values, K and V each in q8_0, q5_0, q4_0, turbo2, turbo3 or "
           "turbo4, or both in f16";
  if (sk.smem > smem_max) return kNoSmem;  // f16 / q8_0 rows of 256 on GPUs of 99 KiB
  for (const DeviceSide* s : {&ks, &vs})   // the turbo4 decoder relies on c[15 - i] == -c[i]
    if (s->fmt == kFmt_turbo4)
      for (int i = 0; i < 16; ++i)
        if (s->cb[i] != -s->cb[15 - i]) return "its turbo4 decoder needs a symmetric codebook";
  return nullptr;
}

// smem_max: dynamic shared memory per block on this device (smem_limit): the tensor-core
// kernels that would exceed it are not chosen (GPUs of 99 KiB take the SIMT or tiled kernel
// for f16 rows of 256, say), and a pinned one is an error.
Path choose_path(const AttentionArgs& a, const DeviceSide& ks, const DeviceSide& vs, const at::Tensor& q,
                 const at::Tensor& kc, const at::Tensor& vc, int smem_max) {
  const AttentionKernel want = kernel_choice().attention;
  const char* unfit = mma_unfit(a, ks, vs, q, kc, vc, smem_max);
  const char* templated_why = templated_unfit(a, ks, vs, q, kc, vc, smem_max);
  const char* flash_why = flash_unfit(a, ks, vs, q, kc, vc, smem_max);
  switch (want) {
    case AttentionKernel::kFlash:
      TORCH_CHECK(!flash_why, "attention: the pinned kernel flash cannot run this call: ", flash_why, " (", smem_max,
                  " bytes)");
      return Path::kFlash;
    case AttentionKernel::kTemplated:
      TORCH_CHECK(!templated_why,
                  "attention: the pinned kernel templated (format-specialised, tensor cores) cannot run this call: ",
                  templated_why, " (", smem_max, " bytes)");
      return Path::kTemplated;
    case AttentionKernel::kMma:
      TORCH_CHECK(!unfit, "attention: the pinned kernel mma (tensor cores) cannot run this call: ", unfit, " (",
                  smem_max, " bytes)");
      return Path::kMma;
    case AttentionKernel::kSimt:
      TORCH_CHECK(decode_fast_path(a, ks, vs, kc, vc) != 0,
                  "attention: the pinned kernel simt cannot run this call: it is built for one query per sequence, "
                  "GQA groups <= 8 and equal K/V row sizes whose head dim splits into 4..32 lanes");
      return Path::kSimt;
    case AttentionKernel::kTiled:
      return Path::kTiled;
    case AttentionKernel::kAuto:
      break;
  }
  if (!flash_why && a.Sq > 1 && a.G * a.Sq >= kFlashMinRows && ks.fmt == kFmt_f16 && vs.fmt == kFmt_f16)
    return Path::kFlash;
  if (!templated_why) return Path::kTemplated;
  // By measurement (benchmarks/results/): the format-specialised kernel is the fastest
  // wherever it is built (taken above); of the generic ones, the tensor-core kernel wins where
  // decoding a value is a load and a convert (f16, bf16, q8_0), the SIMT kernel elsewhere.
  const auto cheap = [](const DeviceSide& s) {
    return s.family == static_cast<int>(Family::kFloat) || s.fmt == kFmt_q8_0;
  };
  if (!unfit && cheap(ks) && cheap(vs)) return Path::kMma;
  if (decode_fast_path(a, ks, vs, kc, vc)) return Path::kSimt;
  // Several queries, or more than 8 heads to a KV head: the SIMT kernel is not built for them,
  // and the tiled kernel decodes each key tile in every block of rows, on CUDA cores.
  return unfit ? Path::kTiled : Path::kMma;
}

// Both ops' work: the output (B, Hq, Sq, d) in q's dtype and, with want_lse, each row's
// log-sum-exp (B, Hq, Sq) float32 (written by the merge; an undefined tensor otherwise).
std::tuple<at::Tensor, at::Tensor> attention_impl(TURBOKV_ATTENTION_PARAMS, bool want_lse) {
  check_cuda(q, "q");
  const AttentionArgs a =
      check_attention(q, k_cache, v_cache, lengths, starts, std::string(k_format), k_rot_group, k_rot_seed,
                      std::string(v_format), v_rot_group, v_rot_seed, scale, window, softcap, sink_logits);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  at::Tensor st;
  if (starts.has_value()) st = starts->to(at::kLong).contiguous();
  // The values are checked as the CPU op checks them: from one host copy outside a CUDA graph;
  // inside one (no syncs), by the merge kernel into the graph-error record, raised by the next
  // call outside. The kernels clamp lengths and starts to [0, T] either way.
  GraphError* graph_err = nullptr;
  if (capturing()) {
    graph_err = graph_error_record();
  } else {
    const at::Tensor host = (starts.has_value() ? at::stack({len, st}) : len.unsqueeze(0)).cpu();
    check_lengths(host[0], starts.has_value() ? host[1] : at::zeros_like(host[0]), a.T, a.Sq, causal);
  }

  const DeviceSide ks = device_side(a.ks), vs = device_side(a.vs);
  AttnParams P{};
  P.B = a.B;
  P.Hq = a.Hq;
  P.Hkv = a.Hkv;
  P.Sq = a.Sq;
  P.T = a.T;
  P.d = static_cast<int>(a.d);
  P.G = a.G;
  const int target_rows = std::max(ks.dp, vs.dp) > 128 ? 16 : 32;
  P.nq = static_cast<int>(std::min<int64_t>(a.Sq, std::max(1, target_rows / a.G)));
  P.nqchunks = static_cast<int>((a.Sq + P.nq - 1) / P.nq);
  P.scale = static_cast<float>(scale);
  P.softcap = static_cast<float>(softcap);
  P.causal = causal ? 1 : 0;
  P.window = window;
  P.lengths = len.const_data_ptr<int64_t>();
  P.starts = starts.has_value() ? st.const_data_ptr<int64_t>() : nullptr;
  // Sinks join only the merge's denominator: the partial kernels never read them.
  const at::Tensor sink_logits_f32 = sink_logits.has_value() ? sink_logits->to(at::kFloat).contiguous() : at::Tensor();
  P.sink_logits = sink_logits.has_value() ? sink_logits_f32.const_data_ptr<float>() : nullptr;
  at::Tensor lse;
  if (want_lse) {
    lse = at::empty({a.B, a.Hq, a.Sq}, q.options().dtype(at::kFloat));
    P.lse = lse.mutable_data_ptr<float>();
  }
  const int device = q.device().index();
  const int sms = sm_count(device);
  const int smem_max = smem_limit(device);
  const Path path = choose_path(a, ks, vs, q, k_cache, v_cache, smem_max);
  // Tensor-core kernels: chunks of 8 (query, head) rows (RowChunk), every one over its keys.
  if (path == Path::kMma || path == Path::kTemplated) P.nqchunks = static_cast<int>((a.G * a.Sq + 7) / 8);
  if (path == Path::kFlash) P.nqchunks = static_cast<int>((a.G * a.Sq + kFlashRows - 1) / kFlashRows);
  // Tiled kernel: fewer queries per block where their rows would not fit in shared memory.
  if (path == Path::kTiled) {
    while (P.nq > 1 && partial_smem(rows_per_block(P), ks.dp, vs.dp) > static_cast<size_t>(smem_max))
      P.nq = (P.nq + 1) / 2;
    P.nqchunks = static_cast<int>((a.Sq + P.nq - 1) / P.nq);
  }
  const int64_t blocks = a.B * a.Hkv * P.nqchunks;
  MmaKernel mma = nullptr;
  size_t mma_smem = 0;
  TemplatedKernel sk;
  if (path == Path::kMma || path == Path::kTemplated || path == Path::kFlash) {
    // One wave of resident blocks, each warp with at least one chunk of keys (tk keys each;
    // the flash kernel's warps share each tile of tk keys: at least 4 tiles a split).
    int tk = 0;
    if (path == Path::kFlash) {
      const FlashKernel fk = flash_kernel_for(ks.dp, ks.row_bytes, vs.row_bytes);
      mma = fk.fn;
      mma_smem = static_cast<size_t>(fk.smem);
      tk = fk.bn;
    } else if (path == Path::kTemplated) {
      // Decode takes the build without the per-row masking of several query positions.
      sk = pick_templated(a, ks, vs, smem_max);
      mma = sk.fn;
      mma_smem = static_cast<size_t>(sk.smem);
      tk = sk.tk;
    } else {
      const int nt = mma_tiles(ks, vs);
      tk = 16 * nt;
      mma = mma_for_dp(nt, ks.dp, /*multi=*/a.Sq > 1);
      mma_smem = mma_smem_bytes(MmaLayout(nt, ks.row_bytes, vs.row_bytes), ks.dp);
    }
    const int per_sm = mma_blocks_per_sm(mma, mma_smem, device);
    const int64_t max_split = std::max<int64_t>(1, (a.T + 4 * tk - 1) / (4 * tk));
    // Rounded down: one block more than a wave runs alone after it and doubles the time.
    P.nsplit =
        static_cast<int>(std::clamp<int64_t>(int64_t{sms} * per_sm / blocks, 1, std::min<int64_t>(max_split, 1024)));
    P.span = ((a.T + P.nsplit - 1) / P.nsplit + tk - 1) / tk * tk;
  } else {
    // Split the keys so the grid fills the GPU about twice, each split at least 4 tiles.
    const int64_t max_split = std::max<int64_t>(1, (a.T + 4 * kTile - 1) / (4 * kTile));
    P.nsplit =
        static_cast<int>(std::clamp<int64_t>((2 * sms + blocks - 1) / blocks, 1, std::min<int64_t>(max_split, 256)));
    P.span = ((a.T + P.nsplit - 1) / P.nsplit + kTile - 1) / kTile * kTile;
  }

  const int64_t rows_total = a.B * a.Hq * a.Sq;
  auto fopts = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({P.nsplit, rows_total, vs.dp}, fopts);
  at::Tensor part_ml = at::empty({P.nsplit, rows_total, 2}, fopts);
  at::Tensor out = at::empty({a.B, a.Hq, a.Sq, a.d}, q.options());
  const at::Tensor qc = q.contiguous();
  const size_t smem = path == Path::kTiled ? partial_smem(rows_per_block(P), ks.dp, vs.dp) : 0;
  TORCH_CHECK(smem <= static_cast<size_t>(smem_max), "attention: ", rows_per_block(P), " rows x head_dim ", a.d,
              " need ", smem, " bytes of shared memory per block, more than this GPU allows (", smem_max, " bytes)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  clear_stale_error();
  const int fast_e = path == Path::kSimt ? decode_fast_path(a, ks, vs, k_cache, v_cache) : 0;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* qp = reinterpret_cast<const T*>(qc.const_data_ptr());
    const uint8_t *kp = k_cache.const_data_ptr<uint8_t>(), *vp = v_cache.const_data_ptr<uint8_t>();
    float *po = part_o.mutable_data_ptr<float>(), *pm = part_ml.mutable_data_ptr<float>();
    const dim3 grid(P.nsplit, static_cast<unsigned>(a.B * a.Hkv), P.nqchunks);
    if (mma) {
      mma<<<grid, kThreads, mma_smem, stream>>>(qc.const_data_ptr(), q.scalar_type() == at::kBFloat16 ? 1 : 0, kp, vp,
                                                ks, vs, P, po, pm);
    } else if (fast_e) {
      launch_simt<T>(fast_e, a.G, grid, stream, qp, kp, vp, ks, vs, P, po, pm);
    } else {
      auto pk = partial_kernel<T>;
      TKV_CUDA_CHECK(cudaFuncSetAttribute(pk, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      pk<<<grid, kThreads, smem, stream>>>(qp, kp, vp, ks, vs, P, po, pm);
    }
    TKV_CUDA_CHECK(cudaGetLastError());
    // The merge may launch while the partial kernel still runs (programmatic dependent
    // launch, sm_90+ with sm_90+ kernels: DeviceConfig::pdl; it waits for the partials before
    // reading them): no launch gap between the two, which is several us of a decode step.
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(rows_total));
    cfg.blockDim = dim3(kMergeThreads);
    cfg.dynamicSmemBytes = merge_smem(vs.dp, P.nsplit);
    cfg.stream = stream;
    cudaLaunchAttribute early{};
    early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    early.val.programmaticStreamSerializationAllowed = 1;
    if (device_config(device).pdl) {
      cfg.attrs = &early;
      cfg.numAttrs = 1;
    }
    TKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, merge_kernel<T>, part_o.const_data_ptr<float>(),
                                      part_ml.const_data_ptr<float>(), vs, P.nsplit, rows_total, P.d,
                                      reinterpret_cast<T*>(out.mutable_data_ptr()), P, graph_err));
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(__half{});
      break;
    default:
      run(__nv_bfloat16{});
      break;
  }
  return {out, lse};
}

at::Tensor attention_cuda(TURBOKV_ATTENTION_PARAMS) {
  return std::get<0>(attention_impl(TURBOKV_ATTENTION_ARGS, false));
}

std::tuple<at::Tensor, at::Tensor> attention_lse_cuda(TURBOKV_ATTENTION_PARAMS) {
  return attention_impl(TURBOKV_ATTENTION_ARGS, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_lse", &attention_lse_cuda);
}

}  // namespace turbokv::cuda
