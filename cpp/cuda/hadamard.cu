// CUDA normalised Hadamard rotation: each block rotates a chunk of whole groups in
// shared memory (fp32, or fp64 for fp64 input), bit-identical to the CPU kernel.
#include <torch/library.h>

#include "common.cuh"

namespace turbokv::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void hadamard_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t total, int chunk,
                                DevSide rot, bool inverse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* buf = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * chunk;
  const int len = static_cast<int>(min(static_cast<int64_t>(chunk), total - base));
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    if constexpr (std::is_same_v<acc_t, double>)
      buf[i] = x[base + i];
    else
      buf[i] = to_float(x[base + i]);
  }
  __syncthreads();
  rotate_side<acc_t>(buf, len, rot, inverse);
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    if constexpr (std::is_same_v<acc_t, double>)
      y[base + i] = buf[i];
    else
      y[base + i] = from_float<scalar_t>(buf[i]);
  }
}

template <typename scalar_t, typename acc_t>
void launch(const at::Tensor& x, at::Tensor& y, int n, const std::optional<int64_t>& seed, bool inverse) {
  const int64_t total = x.numel();
  if (total == 0) return;
  const int chunk = n * std::max(1, 2048 / n);
  const int64_t blocks = (total + chunk - 1) / chunk;
  const int threads = std::min(256, std::max(32, chunk / 2));
  const size_t smem = static_cast<size_t>(chunk) * sizeof(acc_t);
  auto kernel = hadamard_kernel<scalar_t, acc_t>;
  DevSide rot{};
  set_sign_bits(rot, n, seed.has_value(), static_cast<uint64_t>(seed.value_or(0)));
  clear_stale_error();
  TKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(blocks), threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const scalar_t*>(x.const_data_ptr()), reinterpret_cast<scalar_t*>(y.mutable_data_ptr()), total,
      chunk, rot, inverse);
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
  const at::Tensor xc = x.contiguous();
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
