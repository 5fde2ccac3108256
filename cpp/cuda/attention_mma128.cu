// Tensor-core attention kernels for rows of 128 values (see attention_mma.cuh).
#include "attention_mma.cuh"

namespace turbokv::cuda {

template <>
MmaKernel mma_kernel<128>(int nt, bool multi) {
  return mma_table<128>(nt, multi);
}

}  // namespace turbokv::cuda
