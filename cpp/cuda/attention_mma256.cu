// Tensor-core attention kernels for rows of 256 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<256>(int nt, bool multi) {
  return mma_table<256>(nt, multi);
}

}  // namespace turbokv::cuda
