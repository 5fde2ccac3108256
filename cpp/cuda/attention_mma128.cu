// Tensor-core decode kernels for rows of 128 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<128>(int nt) {
  return nt == 2 ? decode_mma_kernel<2, 128> : decode_mma_kernel<1, 128>;
}

}  // namespace turbokv::cuda
