// Tensor-core decode kernels for rows of 96 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<96>(int nt) {
  return nt == 2 ? decode_mma_kernel<2, 96> : decode_mma_kernel<1, 96>;
}

}  // namespace turbokv::cuda
