// Tensor-core decode kernels for rows of 64 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<64>(int nt) {
  return nt == 2 ? decode_mma_kernel<2, 64> : decode_mma_kernel<1, 64>;
}

}  // namespace turbokv::cuda
