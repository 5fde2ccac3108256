// Per-device facts and choices of the CUDA kernels (device_config.h), queried once per device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <mutex>

#include "../kernel_choice.h"
#include "device_config.h"

#ifndef TURBOKV_CUDA_ARCHS
#define TURBOKV_CUDA_ARCHS "(unknown)"
#endif

namespace turbokv::cuda {
namespace {

// Compiled with the same -gencode flags as every kernel: the image the driver picks for it on
// a device is the one it picks for the others.
__global__ void probe_kernel() {}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "turbokv CUDA error in ", what, ": ", cudaGetErrorString(err));
}

DeviceConfig query(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  DeviceConfig c;
  check(cudaDeviceGetAttribute(&c.major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
  check(cudaDeviceGetAttribute(&c.minor, cudaDevAttrComputeCapabilityMinor, device), "compute capability");
  check(cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, device), "multiprocessor count");
  check(cudaDeviceGetAttribute(&c.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory");
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "turbokv: its CUDA kernels were built for ", TURBOKV_CUDA_ARCHS,
                ", none of which runs on device ", device, " (compute capability ", c.major, ".", c.minor,
                "); rebuild for it: TORCH_CUDA_ARCH_LIST=", c.major, ".", c.minor,
                " pip install --no-build-isolation .");
  }
  check(err, "kernel attributes");
  c.kernel_arch = attr.binaryVersion;
  c.ptx_arch = attr.ptxVersion;
  c.pdl = c.major >= 9 && c.ptx_arch >= 90;
  return c;
}

}  // namespace

const DeviceConfig& device_config(int device) {
  static std::once_flag once[C10_COMPILE_TIME_MAX_GPUS];
  static DeviceConfig configs[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_CHECK_VALUE(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "device: got ", device, ", expected 0..",
                    C10_COMPILE_TIME_MAX_GPUS - 1);
  std::call_once(once[device], [device] { configs[device] = query(device); });
  return configs[device];
}

int smem_limit(int device) {
  const int limit = device_config(device).smem_optin;
  const int pinned = kernel_choice().smem_limit;
  return pinned > 0 && pinned < limit ? pinned : limit;
}

}  // namespace turbokv::cuda
