// Format-specialised tensor-core decode kernels for rows of 64 values (see attention_spec.cuh).
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<64>(int fmt, bool long_keys) {
  return spec_table<64>(fmt, long_keys);
}

}  // namespace turbokv::cuda
