// CUDA normalised Hadamard rotation, bit-identical to the CPU kernel. One warp rotates a chunk
// of 32 * E contiguous values (a whole number of groups) in registers: each lane loads its E
// values with one or two 16-byte loads, butterflies run in-lane and through shuffles
// (warp_rotate.cuh), and the lane stores its E results; fp32 arithmetic (fp64 for fp64 input).
#include <torch/library.h>

#include "common.cuh"
#include "warp_rotate.cuh"

namespace turbokv::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // chunks in flight per warp: more bytes in flight per SM

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T x) {
  if constexpr (std::is_same_v<A, double>)
    return static_cast<double>(x);
  else
    return to_float(x);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x) {
  if constexpr (std::is_same_v<T, double>)
    return x;
  else
    return from_float<T>(x);
}

template <typename T, typename A, int E>
__global__ void __launch_bounds__(kThreads)
    hadamard_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total, DevSide rot, bool inverse) {
  using Vec = LaneVec<T, E>;
  const LaneRotation<A> rotation = lane_rotation<E, A>(rot, inverse);
  const int64_t lane = threadIdx.x & 31, warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * (kThreads / 32), chunk = 32 * E;
  const int64_t chunks = (total + chunk - 1) / chunk;
  for (int64_t c0 = warp; c0 < chunks; c0 += kUnroll * nwarps) {
    // total is a multiple of the group, and E divides the group or a 16-byte load: a lane's E
    // values are all in range or all out of it.
    Vec in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t off = (c0 + u * nwarps) * chunk + lane * E;
      if (off < total) in[u] = *reinterpret_cast<const Vec*>(x + off);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t off = (c0 + u * nwarps) * chunk + lane * E;
      if (c0 + u * nwarps >= chunks) break;  // warp-uniform: the shuffles need every lane
      A v[E];
#pragma unroll
      for (int e = 0; e < E; ++e) v[e] = off < total ? to_acc<A>(in[u].v[e]) : A(0);
      warp_rotate<E>(v, rotation);
      Vec out;
#pragma unroll
      for (int e = 0; e < E; ++e) out.v[e] = from_acc<T>(v[e]);
      if (off < total) *reinterpret_cast<Vec*>(y + off) = out;
    }
  }
}

template <typename T, typename A, int E>
void launch_e(const T* x, T* y, int64_t total, const DevSide& rot, bool inverse) {
  const int64_t chunks = (total + 32 * E - 1) / (32 * E);
  const int64_t warps_wanted = (chunks + kUnroll - 1) / kUnroll;
  const int64_t blocks = std::min<int64_t>((warps_wanted + kThreads / 32 - 1) / (kThreads / 32),
                                           16LL * sm_count(c10::cuda::current_device()));
  hadamard_kernel<T, A, E>
      <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(x, y, total, rot, inverse);
}

// E = values per lane: at least a 16-byte load, at least a group per warp (n <= 32 * E).
template <typename T, typename A>
void launch(const at::Tensor& x, at::Tensor& y, int n, const std::optional<int64_t>& seed, bool inverse) {
  const int64_t total = x.numel();
  if (total == 0) return;
  DevSide rot{};
  set_sign_bits(rot, n, seed.has_value(), static_cast<uint64_t>(seed.value_or(0)));
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  T* yp = reinterpret_cast<T*>(y.mutable_data_ptr());
  const int e = std::max(n / 32, static_cast<int>(16 / sizeof(T)));
  clear_stale_error();
  switch (e) {
    case 2:
      launch_e<T, A, 2>(xp, yp, total, rot, inverse);
      break;
    case 4:
      launch_e<T, A, 4>(xp, yp, total, rot, inverse);
      break;
    case 8:
      launch_e<T, A, 8>(xp, yp, total, rot, inverse);
      break;
    default:
      launch_e<T, A, 16>(xp, yp, total, rot, inverse);
      break;
  }
  TKV_CUDA_CHECK(cudaGetLastError());
}

at::Tensor hadamard_cuda(const at::Tensor& x, int64_t group, std::optional<int64_t> seed, bool inverse) {
  check_cuda(x, "x");
  const bool f64 = x.scalar_type() == at::kDouble;
  if (!f64) check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: got a 0-dim tensor, expected (..., n)");
  TORCH_CHECK_VALUE(group != 0, "group: got 0, expected a power of two in [16, 512]");
  check_rotation(group, seed, x.size(-1), "group");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  // The kernel loads 16-byte vectors: a view starting off that alignment is copied first.
  if (reinterpret_cast<uintptr_t>(xc.const_data_ptr()) % 16 != 0) xc = xc.clone();
  at::Tensor y = at::empty_like(xc);
  const int n = static_cast<int>(group);
  switch (x.scalar_type()) {
    case at::kDouble:
      launch<double, double>(xc, y, n, seed, inverse);
      break;
    case at::kFloat:
      launch<float, float>(xc, y, n, seed, inverse);
      break;
    case at::kHalf:
      launch<__half, float>(xc, y, n, seed, inverse);
      break;
    default:
      launch<__nv_bfloat16, float>(xc, y, n, seed, inverse);
      break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, CUDA, m) { m.impl("hadamard", &hadamard_cuda); }

}  // namespace turbokv::cuda
