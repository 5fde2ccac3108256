// Format-specialised tensor-core decode kernels for rows of 128 values (see attention_spec.cuh).
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<128>(int fmt, bool long_keys) {
  return spec_table<128>(fmt, long_keys);
}

}  // namespace turbokv::cuda
