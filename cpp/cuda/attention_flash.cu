// Flash kernels (attention_flash.cuh) for rows of 64, 128 and 256 values.
#include "attention_flash.cuh"

namespace turbokv::cuda {

FlashKernel flash_kernel_for(int dp, int krb, int vrb) {
  switch (dp) {
    case 64:
      return flash_entry<64>(krb, vrb);
    case 128:
      return flash_entry<128>(krb, vrb);
    case 256:
      return flash_entry<256>(krb, vrb);
    default:
      return {};
  }
}

}  // namespace turbokv::cuda
