// Kernels pinned by a caller (kernel_choice.h).
#include "kernel_choice.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <string_view>

namespace turbokv {
namespace {

constexpr std::array<std::string_view, 6> kAttentionNames{"auto", "flash", "templated", "mma", "simt", "tiled"};
constexpr std::array<std::string_view, 3> kIsaNames{"auto", "avx2", "baseline"};

// One atomic a field: op calls read them on every call, from any thread, without a lock.
std::atomic<int> g_attention{0}, g_smem_limit{0}, g_decode_values{0}, g_cpu_isa{0};

template <size_t N>
int index_of(const std::array<std::string_view, N>& names, const std::string& value) {
  for (size_t i = 0; i < N; ++i)
    if (names[i] == value) return static_cast<int>(i);
  return -1;
}

}  // namespace

KernelChoice kernel_choice() {
  KernelChoice c;
  c.attention = static_cast<AttentionKernel>(g_attention.load(std::memory_order_relaxed));
  c.smem_limit = g_smem_limit.load(std::memory_order_relaxed);
  c.decode_values = g_decode_values.load(std::memory_order_relaxed);
  c.cpu_isa = static_cast<CpuIsa>(g_cpu_isa.load(std::memory_order_relaxed));
  return c;
}

void set_kernel_choice(const std::string& attention, int smem_limit, int decode_values, const std::string& cpu_isa,
                       bool avx2_available) {
  const int a = index_of(kAttentionNames, attention);
  TORCH_CHECK_VALUE(a >= 0, "attention: got '", attention, "', expected auto, flash, templated, mma, simt or tiled");
  TORCH_CHECK_VALUE(smem_limit >= 0, "smem_limit: got ", smem_limit,
                    ", expected bytes of shared memory per block > 0, or 0 for the device's limit");
  TORCH_CHECK_VALUE(decode_values == 0 || decode_values == 4 || decode_values == 8 || decode_values == 16,
                    "decode_values: got ", decode_values, ", expected 4, 8 or 16, or 0 for the kernel's own choice");
  const int isa = index_of(kIsaNames, cpu_isa);
  TORCH_CHECK_VALUE(isa >= 0, "cpu_isa: got '", cpu_isa, "', expected auto, avx2 or baseline");
  TORCH_CHECK_VALUE(isa != static_cast<int>(CpuIsa::kAvx2) || avx2_available,
                    "cpu_isa: got 'avx2', but this build or this CPU has no AVX2+FMA+F16C copy of the kernel "
                    "(not x86, built with TURBOKV_NATIVE=ON, or a CPU without those instructions)");
  g_attention = a;
  g_smem_limit = smem_limit;
  g_decode_values = decode_values;
  g_cpu_isa = isa;
}

const char* attention_kernel_name(AttentionKernel k) { return kAttentionNames[static_cast<int>(k)].data(); }

const char* cpu_isa_name(CpuIsa isa) { return kIsaNames[static_cast<int>(isa)].data(); }

}  // namespace turbokv
