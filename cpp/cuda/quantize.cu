// CUDA quantize / dequantize / cache_append. Rows of 32, 64, 128, 256 or 512 stored values
// are encoded by warps, 32 values per lane, in registers (warp_encode.cuh): wide loads,
// in-lane butterflies (shuffles for the last stages of a group), a lane's block or quarter
// group quantised on its own, staged rows stored with 16-byte words. Other row lengths
// take one block per row: load (any float dtype) -> zero-pad -> rotate in shared memory ->
// encode into a shared staging row -> one coalesced copy out, with codec.h's encoders.
#include <torch/library.h>

#include "common.cuh"
#include "decode_span.cuh"
#include "warp_encode.cuh"

namespace turbokv::cuda {
namespace {

constexpr int kThreads = 128;

// n / d for n < 2^32 by a multiply-high, an add and a shift, d fixed per launch (integer
// division is a long instruction sequence on the GPU, and this runs for every row):
// s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1, n / d = (umulhi(n, m) + n) >> s.
struct FastDiv {
  uint32_t d = 1, m = 1;
  int s = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t div) : d(static_cast<uint32_t>(div)) {
    TORCH_CHECK(div >= 1 && div <= INT32_MAX, "FastDiv: divisor ", div, " out of range");
    while ((uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>((uint64_t{1} << 32) * ((uint64_t{1} << s) - d) / d + 1);
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(__umulhi(n, m)) + n) >> s);
  }
};

// Where encoded row r goes: row r of `out`, or cache slot (b*H + h)*T + positions[b*S + s]
// (rows = B * H * S < 2^31, checked on the host).
struct RowTarget {
  const int64_t* positions;  // null: dense output
  FastDiv H, S;
  int64_t T;
  GraphError* err = nullptr;  // set while a CUDA graph is captured (positions unchecked on the host)
};

// In two steps, so that a loop can issue the positions load of a later row early: the row's
// position (a load, or r for a dense output), then the slot.
__device__ __forceinline__ int64_t target_position(const RowTarget& t, int64_t r) {
  if (t.positions == nullptr) return r;
  const uint32_t bh = t.S(static_cast<uint32_t>(r)), s = static_cast<uint32_t>(r) - bh * t.S.d, b = t.H(bh);
  return t.positions[static_cast<int64_t>(b) * t.S.d + s];
}
__device__ __forceinline__ int64_t target_slot(const RowTarget& t, int64_t r, int64_t p) {
  if (t.positions == nullptr) return r;
  if (p < 0 || p >= t.T) {  // validated on the host unless capturing a graph: never write out of bounds
    record_graph_error(t.err, kPositionRange, r, p, t.T);
    return -1;
  }
  return static_cast<int64_t>(t.S(static_cast<uint32_t>(r))) * t.T + p;
}
__device__ __forceinline__ int64_t target_row(const RowTarget& t, int64_t r) {
  return target_slot(t, r, target_position(t, r));
}

// Deterministic block sum of a double (warp shuffles, then the warps in order).
__device__ double block_sum(double v, double* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) v += scratch[w];
  __syncthreads();
  return v;
}

// encode_turbo_group (codec.h) with one thread per value (g <= blockDim.x) instead of one
// thread per group: the same steps and roundings, except that the two fp64 sums run in a
// different order (a scale may move by an fp16 ulp, an index across a midpoint, rarely).
// Index bits are gathered with shared-memory atomicOr into `words` (g / 8 words), laid out
// exactly as the packed bytes (little-endian), then copied to `out`.
__device__ void encode_turbo_group_parallel(const float* x, int g, int bits, const float* cb, const float* mids,
                                            uint8_t* out, uint32_t* words, double* scratch) {
  const int j = threadIdx.x, nmid = (1 << bits) - 1, nwords = g * bits / 32;
  const bool mine = j < g;
  for (int w = j; w < nwords; w += blockDim.x) words[w] = 0u;
  const float xj = mine ? x[j] : 0.0f;
  const float norm = static_cast<float>(sqrt(block_sum(static_cast<double>(xj) * static_cast<double>(xj), scratch)));
  const bool finite = norm <= 3.4028234663852886e38f;
  const float inv = (norm == 0.0f || !finite) ? 0.0f : 1.0f / norm;
  int k = 0;
  if (mine && finite) {
    const float u = xj * inv;
    while (k < nmid && mids[k] < u) ++k;
    if (bits == 2) {
      atomicOr(words + (j >> 4), static_cast<uint32_t>(k) << ((j & 15) * 2));
    } else if (bits == 4) {
      atomicOr(words + (j >> 3), static_cast<uint32_t>(k) << ((j & 7) * 4));
    } else {  // 2 low bits (g / 16 words), then the high bits (g / 32 words)
      atomicOr(words + (j >> 4), static_cast<uint32_t>(k & 3) << ((j & 15) * 2));
      atomicOr(words + g / 16 + (j >> 5), static_cast<uint32_t>((k >> 2) & 1) << (j & 31));
    }
  }
  const double c2 = block_sum(mine ? static_cast<double>(cb[k]) * static_cast<double>(cb[k]) : 0.0, scratch);
  const uint8_t* wb = reinterpret_cast<const uint8_t*>(words);
  for (int b = j; b < nwords * 4; b += blockDim.x) out[2 + b] = wb[b];
  if (j == 0) {  // a non-finite group gets the NaN scale (it decodes to NaN, never to finite garbage)
    const float scale = norm == 0.0f || !finite ? 0.0f : static_cast<float>(static_cast<double>(norm) / sqrt(c2));
    store_u16(out, finite && !f16_rounds_to_inf(scale) ? f32_to_f16_bits(scale) : uint16_t{0x7e00});
  }
  __syncthreads();
}

template <typename scalar_t>
__device__ void encode_one_row(const scalar_t* __restrict__ x, const DeviceSide& s, uint8_t* __restrict__ dst,
                               float* buf, uint8_t* obuf, float* cb, float* mids) {
  for (int j = threadIdx.x; j < s.dp; j += blockDim.x) buf[j] = j < s.d ? to_float(x[j]) : 0.0f;
  if (threadIdx.x < 16) {
    cb[threadIdx.x] = s.cb[threadIdx.x];
    mids[threadIdx.x] = s.mids[threadIdx.x];
  }
  __syncthreads();
  if (s.rot_group) rotate_side<float>(buf, s.dp, s, false);
  const Family fam = static_cast<Family>(s.family);
  if (fam == Family::kFloat) {
    for (int j = threadIdx.x; j < s.dp; j += blockDim.x)
      store_u16(obuf + 2 * j, s.fmt == kFmt_bf16 ? bf16_store_bits(buf[j]) : f16_store_bits(buf[j]));
  } else if (fam == Family::kBlock) {
    for (int b = threadIdx.x; b < s.dp / 32; b += blockDim.x)
      encode_block(s.fmt, buf + 32 * b, obuf + b * s.group_bytes, s.group_bytes);
  } else {
    __shared__ uint32_t words[64];  // g * bits / 32 <= 16
    __shared__ double scratch[32];
    for (int b = 0; b < s.dp / s.g; ++b)
      encode_turbo_group_parallel(buf + s.g * b, s.g, s.bits, cb, mids, obuf + b * s.group_bytes, words, scratch);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < s.row_bytes; j += blockDim.x) dst[j] = obuf[j];
  __syncthreads();
}

// blockIdx.x = row, blockIdx.y = side (0: K / the only side, 1: V).
template <typename scalar_t>
__global__ void encode_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ x1, int64_t d,
                              DeviceSide s0, DeviceSide s1, uint8_t* out0, uint8_t* out1, RowTarget target) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float cb[16], mids[16];
  const bool second = blockIdx.y == 1;
  const DeviceSide& s = second ? s1 : s0;
  float* buf = reinterpret_cast<float*>(smem_raw);
  uint8_t* obuf = smem_raw + sizeof(float) * s.dp;
  const int64_t r = blockIdx.x;
  const int64_t dst = target_row(target, r);
  if (dst < 0) return;
  encode_one_row((second ? x1 : x0) + r * d, s, (second ? out1 : out0) + dst * s.row_bytes, buf, obuf, cb, mids);
}

constexpr int kWarpThreads = 256, kWarps = kWarpThreads / 32;

// Rows of dp stored values, R = 32 * E / dp of them per warp (lanes l*L .. l*L + L-1 hold row
// l, L = dp / E), grid-stride over the rows; blockIdx.y = side as in encode_kernel. Each lane
// works out its own row's target, so the per-row costs (the target, the reductions, the copy
// out) are paid once per R rows. The next rows' loads are issued before these are encoded.
// vec: rows are d = dp values aligned for 16-byte loads; otherwise element loads, zero beyond d.
// The format's encoder is chosen once, outside the row loop (with_lane_encoder).
template <typename T, int E>
__global__ void __launch_bounds__(kWarpThreads, 2)
    encode_warp_kernel(const T* __restrict__ x0, const T* __restrict__ x1, int64_t d, bool vec, DeviceSide s0,
                       DeviceSide s1, uint8_t* out0, uint8_t* out1, RowTarget target, int64_t rows) {
  using Vec = LaneWords<T, E>;
  // The widest rows (2 bytes a value), and up to 15 bytes of lead (see below).
  __shared__ __align__(16) uint8_t stage_all[kWarps][64 * E + 16];
  __shared__ float mids[16], cb[16];
  const bool second = blockIdx.y == 1;
  const DeviceSide& s = second ? s1 : s0;
  if (threadIdx.x < 16) {
    mids[threadIdx.x] = s.mids[threadIdx.x];
    cb[threadIdx.x] = s.cb[threadIdx.x];
  }
  __syncthreads();
  const T* x = second ? x1 : x0;
  uint8_t* out = second ? out1 : out0;
  uint8_t* stage = stage_all[threadIdx.x / 32];
  const LaneRotation<float> rotation = lane_rotation<E>(s, false);
  const int lane = static_cast<int>(threadIdx.x & 31u), per_row = s.dp / E, nrows = 32 / per_row;
  const int row_in_warp = lane / per_row, col = (lane % per_row) * E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * nrows;
  const CopyPlan plan = copy_plan(out, s.row_bytes, nrows);
  const auto load = [&](int64_t r) {
    Vec in;
    if (r >= rows) {
#pragma unroll
      for (int i = 0; i < Vec::kWords; ++i) in.w[i] = 0u;
    } else if (vec) {
      in = *reinterpret_cast<const Vec*>(x + r * d + col);
    } else {
      // (Bounds as e < d - col against immediates: `col + e` for every e would be loop
      // invariant, hoisted into a register each.)
      LaneVec<T, E> e1;
      const T* p = x + r * d + col;
      const int64_t lim = d - col;
#pragma unroll
      for (int e = 0; e < E; ++e) e1.v[e] = e < lim ? p[e] : from_float<T>(0.0f);
      in = *reinterpret_cast<const Vec*>(&e1);
    }
    return in;
  };
  const int row_bytes = s.row_bytes;
  const bool float_rows = static_cast<Family>(s.family) == Family::kFloat;
  with_lane_encoder<E>(s, mids, cb, [&](auto encode) {
    int64_t r = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * nrows + row_in_warp;
    // The next rows' values and positions are loaded an iteration ahead (a cache slot comes
    // from a positions load, which would otherwise stall every iteration for its latency).
    const auto position = [&](int64_t rr) { return rr < rows ? target_position(target, rr) : int64_t{-1}; };
    Vec cur = load(r);
    int64_t pos = position(r);
#pragma unroll 1
    for (; r - row_in_warp < rows; r += stride) {  // warp-uniform: the shuffles need every lane
      const Vec next = load(r + stride);
      const int64_t next_pos = position(r + stride);
      const int64_t dst = r < rows ? target_slot(target, r, pos) : -1;
      // Rows bound for consecutive cache rows (a prefill's tokens, quantize's dense output) are
      // staged at their destination's offset mod 16 and copied out as one span of 16-byte
      // words; others row by row. (Stores into the staging rows are 2-byte, or 16-byte for
      // float rows: the offset must keep that alignment.)
      const int64_t dst0 = __shfl_sync(0xffffffffu, dst, 0);
      uint8_t* span = out + dst0 * row_bytes;
      const unsigned lead = static_cast<unsigned>(reinterpret_cast<uintptr_t>(span) & 15u);
      const bool fits = (lead & 1u) == 0u && (lead == 0u || !float_rows);
      const bool contiguous = __all_sync(0xffffffffu, dst0 >= 0 && dst == dst0 + row_in_warp) && fits;
      uint8_t* st = stage + (contiguous ? lead : 0u);
      float v[E];
      to_floats(cur, v);
      // The sign bits pass through an opaque copy per row: the per-value sign tests are loop
      // invariant here, and hoisted they would take a register (or a spill slot) each.
      LaneRotation<float> row_rotation = rotation;
      row_rotation.pre = opaque(rotation.pre);
      row_rotation.post = opaque(rotation.post);
      warp_rotate<E>(v, row_rotation);
      encode(v, st);
      __syncwarp();
      if (contiguous)
        copy_span_out(st, span, nrows * row_bytes);
      else
        copy_rows_out(stage, out, dst, per_row, row_bytes, plan);
      __syncwarp();
      cur = next;
      pos = next_pos;
    }
  });
}

template <typename scalar_t>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, DeviceSide s, bool unrotate,
                                  scalar_t* __restrict__ y, int width) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float cb[16];
  float* buf = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x < 16) cb[threadIdx.x] = s.cb[threadIdx.x];
  __syncthreads();
  const int64_t r = blockIdx.x;
  const uint8_t* row = packed + r * s.row_bytes;
  for (int j = threadIdx.x; j < s.dp; j += blockDim.x) buf[j] = decode_at(s, cb, row, j);
  __syncthreads();
  if (unrotate && s.rot_group) rotate_side<float>(buf, s.dp, s, true);
  for (int j = threadIdx.x; j < width; j += blockDim.x) y[r * width + j] = from_float<scalar_t>(buf[j]);
}

// Dequantization by warps, for rows of 32..512 values (a power of two): lane l decodes the
// 32 values l*32 .. l*32+31 of the warp's rows (back to back, as the warp encoder holds them)
// straight from the packed bytes (decode_span), inverse-rotates them in registers
// (warp_rotate, the block kernel's butterflies and roundings) and stores them with 16-byte
// stores where the output allows. (One block per row spent its time starting blocks: a
// dequantized cache for SDPA is hundreds of thousands of rows.)
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    dequantize_warp_kernel(const uint8_t* __restrict__ packed, DeviceSide s, bool unrotate, T* __restrict__ y,
                           int width, bool vec, int64_t rows) {
  constexpr int E = 32;
  __shared__ float cb[16];
  if (threadIdx.x < 16) cb[threadIdx.x] = s.cb[threadIdx.x];
  __syncthreads();
  const LaneRotation<float> rotation = unrotate ? lane_rotation<E>(s, true) : LaneRotation<float>{};
  const int lane = static_cast<int>(threadIdx.x & 31u), per_row = s.dp / E, nrows = 32 / per_row;
  const int row_in_warp = lane / per_row, col = (lane % per_row) * E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * nrows;
  int64_t r = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * nrows + row_in_warp;
#pragma unroll 1
  for (; r - row_in_warp < rows; r += stride) {  // warp-uniform: the shuffles need every lane
    float v[E];
    decode_span<E>(s, cb, packed + min(r, rows - 1) * s.row_bytes, col, v);
    warp_rotate<E>(v, rotation);
    if (r >= rows || col >= width) continue;
    T* out = y + r * width + col;
    if (vec) {
      LaneVec<T, E> w;
#pragma unroll
      for (int e = 0; e < E; ++e) w.v[e] = from_float<T>(v[e]);
      *reinterpret_cast<LaneVec<T, E>*>(out) = w;
    } else {
      const int lim = width - col;
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (e < lim) out[e] = from_float<T>(v[e]);
    }
  }
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    default:
      f(__nv_bfloat16{});
      break;
  }
}

size_t encode_smem(const DeviceSide& a, const DeviceSide& b) {
  return std::max(sizeof(float) * a.dp + a.row_bytes, sizeof(float) * b.dp + b.row_bytes) + 16;
}

// Values per lane of the warp encoder for a side (32: a ggml block or a quarter of a turbo
// group of 128 per lane, 32 rows of 32 .. 2 rows of 512 values per warp), or 0 where rows
// take the block-per-row kernel. (8 values per lane, 16 lanes per row of 128, spent most of
// its instructions on shuffles: butterflies, reductions and packing across lanes.)
int warp_values(const DeviceSide& s) {
  const int dp = s.dp;
  if (dp < 32 || dp > 512 || (dp & (dp - 1)) != 0) return 0;
  return 32;
}

// Encodes `rows` rows of x0 (and x1 into the second side, when s1 is given) with the warp
// encoder where every side has the same warp_values, else one kernel per side.
template <typename T>
void launch_encode(const T* x0, const T* x1, int64_t d, const DeviceSide& s0, const DeviceSide* s1, uint8_t* out0,
                   uint8_t* out1, const RowTarget& target, int64_t rows) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int e = warp_values(s0);
  if (s1 != nullptr && warp_values(*s1) != e) {  // sides of different shapes: one launch each
    launch_encode<T>(x0, nullptr, d, s0, nullptr, out0, nullptr, target, rows);
    launch_encode<T>(x1, nullptr, d, *s1, nullptr, out1, nullptr, target, rows);
    return;
  }
  const DeviceSide& t1 = s1 != nullptr ? *s1 : s0;
  const dim3 grid_rows(static_cast<unsigned>(rows), s1 != nullptr ? 2u : 1u);
  if (e == 0) {
    encode_kernel<T><<<grid_rows, kThreads, encode_smem(s0, t1), stream>>>(x0, x1, d, s0, t1, out0, out1, target);
    return;
  }
  const auto aligned = [&](const T* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % (16 < e * sizeof(T) ? 16 : e * sizeof(T)) == 0;
  };
  const bool vec = d == s0.dp && d == t1.dp && aligned(x0) && aligned(x1);
  const int64_t per_warp = 32 * e / s0.dp, warps = (rows + per_warp - 1) / per_warp;
  // Two resident blocks per SM (per side): a warp's prologue (its rotation's sign bits, the
  // tables) is paid once for many rows, not once for a few.
  const int64_t blocks = std::min<int64_t>((warps + kWarps - 1) / kWarps, 2LL * sm_count(c10::cuda::current_device()));
  const dim3 grid(static_cast<unsigned>(blocks), grid_rows.y);
  const auto go = [&](auto kernel) {
    kernel<<<grid, kWarpThreads, 0, stream>>>(x0, x1, d, vec, s0, t1, out0, out1, target, rows);
  };
  go(encode_warp_kernel<T, 32>);
}

at::Tensor quantize_cuda(const at::Tensor& x, c10::string_view format, int64_t rot_group,
                         std::optional<int64_t> rot_seed) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  RowsOp op = prepare_quantize(x, std::string(format), rot_group, rot_seed);
  if (op.rows == 0) return op.out;
  const DeviceSide s = device_side(op.side);
  clear_stale_error();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_encode<T>(reinterpret_cast<const T*>(op.input.const_data_ptr()), nullptr, op.side.layout.d, s, nullptr,
                     op.out.mutable_data_ptr<uint8_t>(), nullptr, RowTarget{nullptr, FastDiv(1), FastDiv(1), 0},
                     op.rows);
  });
  TKV_CUDA_CHECK(cudaGetLastError());
  return op.out;
}

at::Tensor dequantize_cuda(const at::Tensor& packed, c10::string_view format, int64_t head_dim, int64_t rot_group,
                           std::optional<int64_t> rot_seed, bool unrotate, at::ScalarType dtype) {
  check_cuda(packed, "packed");
  const c10::cuda::CUDAGuard guard(packed.device());
  RowsOp op = prepare_dequantize(packed, std::string(format), head_dim, rot_group, rot_seed, unrotate, dtype);
  if (op.rows == 0) return op.out;
  const DeviceSide s = device_side(op.side);
  clear_stale_error();
  const uint8_t* in = op.input.const_data_ptr<uint8_t>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = reinterpret_cast<T*>(op.out.mutable_data_ptr());
    // decode_span loads float rows in 16-byte words, the others a byte at a time.
    const bool words = reinterpret_cast<uintptr_t>(in) % 16 == 0 && s.row_bytes % 16 == 0;
    if (warp_values(s) == 32 && (words || s.family != static_cast<int>(Family::kFloat))) {
      const bool vec = op.width == s.dp && reinterpret_cast<uintptr_t>(out) % 16 == 0;
      const int64_t per_warp = 32 * 32 / s.dp, warps = (op.rows + per_warp - 1) / per_warp;
      const int64_t blocks = std::min<int64_t>((warps + kWarps - 1) / kWarps, 8LL * sm_count(packed.device().index()));
      dequantize_warp_kernel<T>
          <<<static_cast<unsigned>(blocks), kWarpThreads, 0, stream>>>(in, s, unrotate, out, op.width, vec, op.rows);
    } else {
      dequantize_kernel<T>
          <<<static_cast<unsigned>(op.rows), kThreads, sizeof(float) * s.dp, stream>>>(in, s, unrotate, out, op.width);
    }
  });
  TKV_CUDA_CHECK(cudaGetLastError());
  return op.out;
}

void cache_append_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& positions, c10::string_view k_format, int64_t k_rot_group,
                       std::optional<int64_t> k_rot_seed, c10::string_view v_format, int64_t v_rot_group,
                       std::optional<int64_t> v_rot_seed) {
  check_cuda(k, "k");
  const AppendArgs a = check_append(k_cache, v_cache, k, v, positions, std::string(k_format), k_rot_group, k_rot_seed,
                                    std::string(v_format), v_rot_group, v_rot_seed);
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  // Validating values needs a device->host copy; during graph capture the kernel skips bad
  // slots instead and records the first in the graph-error record (duplicates go unchecked there).
  GraphError* graph_err = capturing() ? graph_error_record() : nullptr;
  if (!capturing() && pos.numel() > 0) {
    // Three values cross to the host (a 64k-token prefill would copy 512 KB): the extremes and
    // whether a sequence names a position twice; all of them only when one is bad, for
    // check_positions' message naming it.
    const auto [lo, hi] = at::aminmax(pos);
    at::Tensor dup = at::zeros_like(lo);
    if (a.S > 1) {
      const at::Tensor sorted = std::get<0>(pos.sort(1));
      dup = (sorted.narrow(1, 1, a.S - 1) == sorted.narrow(1, 0, a.S - 1)).any().to(at::kLong);
    }
    const at::Tensor summary = at::stack({lo, hi, dup}).cpu();
    const int64_t* sv = summary.const_data_ptr<int64_t>();
    if (sv[0] < 0 || sv[1] >= a.T || sv[2] != 0) check_positions(pos.cpu(), a.T);
  }
  const int64_t rows = a.B * a.H * a.S;
  if (rows == 0) return;
  TORCH_CHECK_VALUE(rows <= INT32_MAX, "k: got ", rows, " rows (batch x heads x tokens), expected at most ", INT32_MAX,
                    " per call");
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const DeviceSide ks = device_side(a.ks), vs = device_side(a.vs);
  clear_stale_error();
  dispatch_float(k.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_encode<T>(reinterpret_cast<const T*>(kc.const_data_ptr()), reinterpret_cast<const T*>(vc.const_data_ptr()),
                     a.d, ks, &vs, k_cache.mutable_data_ptr<uint8_t>(), v_cache.mutable_data_ptr<uint8_t>(),
                     RowTarget{pos.const_data_ptr<int64_t>(), FastDiv(a.H), FastDiv(a.S), a.T, graph_err}, rows);
  });
  TKV_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("cache_append", &cache_append_cuda);
}

}  // namespace turbokv::cuda
