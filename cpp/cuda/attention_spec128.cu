// Format-specialised tensor-core decode kernels (one query per sequence) for rows of 128 values.
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<128, false>(int fmt, bool long_keys) {
  return spec_table<128, false>(fmt, long_keys);
}

}  // namespace turbokv::cuda
