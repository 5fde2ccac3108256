// Format-specialised tensor-core kernels for several queries per sequence, rows of 64 values.
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<64, true>(int fmt, bool long_keys) {
  return spec_table<64, true>(fmt, long_keys);
}

}  // namespace turbokv::cuda
