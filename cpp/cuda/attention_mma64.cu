// Tensor-core attention kernels for rows of 64 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<64>(int nt, bool multi) {
  return mma_table<64>(nt, multi);
}

}  // namespace turbokv::cuda
