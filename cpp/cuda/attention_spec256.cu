// Format-specialised tensor-core decode kernels for rows of 256 values (see attention_spec.cuh).
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<256>(int fmt, bool long_keys) {
  return spec_table<256>(fmt, long_keys);
}

}  // namespace turbokv::cuda
