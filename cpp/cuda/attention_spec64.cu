// Format-specialised tensor-core decode kernels (one query per sequence) for rows of 64 values.
#include "attention_spec.cuh"

namespace turbokv::cuda {

template <>
SpecKernel spec_kernel<64, false>(int fmt, bool long_keys) {
  return spec_table<64, false>(fmt, long_keys);
}

}  // namespace turbokv::cuda
