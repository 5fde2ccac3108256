// Format-specialised tensor-core kernels for several queries per sequence, rows of 256 values.
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<256, true>(int fmt, bool long_keys) {
  return spec_table<256, true>(fmt, long_keys);
}

}  // namespace turbokv::cuda
