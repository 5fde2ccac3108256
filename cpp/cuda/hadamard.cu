// CUDA normalised Hadamard rotation, bit-identical to the CPU kernel. One warp rotates a chunk
// of 32 * 16 contiguous values (a whole number of groups) in registers: each lane loads its 16
// values with 16-byte loads, butterflies run in-lane and through shuffles (warp_rotate.cuh),
// and the lane stores its 16 results; fp32 arithmetic (fp64 for fp64 input).
#include <torch/library.h>

#include <algorithm>

#include "common.cuh"
#include "warp_rotate.cuh"

namespace turbokv::cuda {
namespace {

constexpr int kThreads = 256;

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

// A lane holds E = 16 values (a chunk of 512 per warp, a whole number of groups of 16..512):
// the butterflies of h < 16 stay in the lane, the rest (3 of 7 stages for groups of 128) go
// through shuffles. One 16-byte load per lane (fp16: 8 values) sent 4 of 7 through shuffles,
// and then the shuffles, not the bytes, limited the kernel. The next chunk's loads are
// issued before the current chunk is rotated and stored: a warp keeps loads in flight while
// it computes.
constexpr int kE = 16;

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    hadamard_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total, DeviceSide rot, bool inverse) {
  using Vec = LaneVec<T, kE>;
  const LaneRotation<A> rotation = lane_rotation<kE, A>(rot, inverse);
  const int64_t lane = threadIdx.x & 31, warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * (kThreads / 32), chunk = 32 * kE;
  // total is a multiple of the group, and kE divides the group: a lane's values are all in
  // range or all out of it.
  auto load = [&](int64_t c, Vec& v) {
    const int64_t off = c * chunk + lane * kE;
    if (off < total) v = *reinterpret_cast<const Vec*>(x + off);
  };
  const int64_t chunks = (total + chunk - 1) / chunk;
  Vec cur;
  load(warp, cur);
  for (int64_t c = warp; c < chunks; c += nwarps) {  // warp-uniform: the shuffles need every lane
    Vec next;
    load(c + nwarps, next);
    const int64_t off = c * chunk + lane * kE;
    A v[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) v[e] = off < total ? to_acc<A>(cur.v[e]) : A(0);
    warp_rotate<kE>(v, rotation);
    Vec out;
#pragma unroll
    for (int e = 0; e < kE; ++e) out.v[e] = from_acc<T>(v[e]);
    if (off < total) *reinterpret_cast<Vec*>(y + off) = out;
    cur = next;
  }
}

template <typename T, typename A>
void launch(const at::Tensor& x, at::Tensor& y, int n, const std::optional<int64_t>& seed, bool inverse) {
  const int64_t total = x.numel();
  if (total == 0) return;
  DeviceSide rot{};
  set_sign_bits(rot, n, seed.has_value(), static_cast<uint64_t>(seed.value_or(0)));
  const int64_t chunks = (total + 32 * kE - 1) / (32 * kE);
  const int64_t blocks =
      std::min<int64_t>((chunks + kThreads / 32 - 1) / (kThreads / 32), 16LL * sm_count(c10::cuda::current_device()));
  clear_stale_error();
  hadamard_kernel<T, A><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.const_data_ptr()), reinterpret_cast<T*>(y.mutable_data_ptr()), total, rot, inverse);
  TKV_CUDA_CHECK(cudaGetLastError());
}

at::Tensor hadamard_cuda(const at::Tensor& x, int64_t group, std::optional<int64_t> seed, bool inverse) {
  check_cuda(x, "x");
  check_hadamard(x, group, seed);
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
