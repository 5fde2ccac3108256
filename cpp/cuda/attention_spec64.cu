// Format-specialised tensor-core decode kernels for rows of 64 values (see attention_spec.cuh).
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<64>(int fmt) {
  return spec_table<64>(fmt);
}

}  // namespace turbokv::cuda
