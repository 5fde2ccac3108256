// What the CUDA kernels know and choose per device, queried once per device (device_config.cu).
// Plain C++ (no CUDA types): ops.cpp reports it to Python as turbokv._C.cuda_device_config(i).
#pragma once

namespace turbokv::cuda {

struct DeviceConfig {
  int major = 0, minor = 0;  // compute capability
  int sms = 0;               // streaming multiprocessors
  int smem_optin = 0;        // dynamic shared memory one block may request, bytes (the device's opt-in limit)
  int kernel_arch = 0;       // the kernel image that runs there: its SASS architecture (90 = sm_90)
  int ptx_arch = 0;          // and the virtual architecture it was compiled from (80: JIT from compute_80 PTX)
  // Programmatic dependent launch of the attention merge (attention.cu): needs an sm_90+ device
  // and kernels compiled for sm_90+ (older images have no griddepcontrol wait: the merge would
  // read partial results before they are written).
  bool pdl = false;
};

// Raises, naming the architectures built and the device's, when no kernel image runs on it.
const DeviceConfig& device_config(int device);

// Dynamic shared memory per block that kernels may plan for on `device`: its opt-in limit, or
// the pinned smem_limit (kernel_choice.h) when lower, so that a test on a large GPU takes the
// choices of a smaller one (sm_86 / sm_89 / sm_120: 99 KiB, sm_80: 163 KiB, sm_90: 227 KiB).
int smem_limit(int device);

}  // namespace turbokv::cuda
