// Format-specialised tensor-core kernels for several queries per sequence, rows of 128 values.
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<128, true>(int fmt, bool long_keys) {
  return spec_table<128, true>(fmt, long_keys);
}

}  // namespace turbokv::cuda
