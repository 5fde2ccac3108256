// Tensor-core attention kernels for rows of 96 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<96>(int nt, bool multi) {
  return mma_table<96>(nt, multi);
}

}  // namespace turbokv::cuda
