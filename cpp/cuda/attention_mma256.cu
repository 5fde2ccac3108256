// Tensor-core decode kernels for rows of 256 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<256>(int nt) {
  return nt == 2 ? decode_mma_kernel<2, 256> : decode_mma_kernel<1, 256>;
}

}  // namespace turbokv::cuda
