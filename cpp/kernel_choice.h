// Kernels pinned by a caller instead of chosen by the ops: tests pin each attention kernel in
// turn and benchmarks compare them. Production code never sets anything here; the ops then
// choose from the shapes and the device alone. Set from Python with turbokv.ops.pinned_kernels
// (through turbokv._C.set_kernel_choice); process-wide, read by every op call.
#pragma once

#include <string>

namespace turbokv {

// The CUDA attention kernels (cuda/attention.cu, choose_path).
enum class AttentionKernel : int { kAuto, kFlash, kTemplated, kMma, kSimt, kTiled };
// The copies of the CPU attention kernel (cpu/attention_kernel.h).
enum class CpuIsa : int { kAuto, kAvx2, kBaseline };

struct KernelChoice {
  AttentionKernel attention = AttentionKernel::kAuto;
  // Dynamic shared memory per block the CUDA kernels plan for, bytes; 0: the device's limit.
  // Lower values make a large GPU take the choices of a smaller one.
  int smem_limit = 0;
  // Values per lane of the SIMT decode kernel for GQA groups <= 4 (4, 8 or 16); 0: its own.
  int decode_values = 0;
  CpuIsa cpu_isa = CpuIsa::kAuto;
};

KernelChoice kernel_choice();

// Raises a ValueError naming the field, the value seen and the values expected; on error
// nothing changes.
void set_kernel_choice(const std::string& attention, int smem_limit, int decode_values, const std::string& cpu_isa,
                       bool avx2_available);

const char* attention_kernel_name(AttentionKernel k);
const char* cpu_isa_name(CpuIsa isa);

}  // namespace turbokv
