// Format-specialised tensor-core decode kernels for rows of 256 values (see attention_spec.cuh).
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<256>(int fmt) {
  return spec_table<256>(fmt);
}

}  // namespace turbokv::cuda
