// The SIMT (CUDA-core) decode kernel's launches: f32 queries, and the fallback of the
// tensor-core kernel (attention_mma.cuh) for calls it is not built for.
#include "attention_simt.cuh"

namespace turbokv::cuda {
namespace {

template <int E, int GMAX, typename T>
void launch(dim3 grid, cudaStream_t stream, const T* q, const uint8_t* kc, const uint8_t* vc, const DeviceSide& ks,
            const DeviceSide& vs, const AttnParams& P, float* po, float* pm) {
  const size_t smem = sizeof(float) * (GMAX * ks.dp + 4 * GMAX * (ks.dp + 2) + 32);
  auto k = simt_decode_kernel<E, GMAX, 1, T>;
  TKV_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  k<<<grid, kThreads, smem, stream>>>(q, kc, vc, ks, vs, P, po, pm);
}

}  // namespace

template <typename T>
void launch_simt(int e, int G, dim3 grid, cudaStream_t stream, const T* q, const uint8_t* kc, const uint8_t* vc,
                 const DeviceSide& ks, const DeviceSide& vs, const AttnParams& P, float* po, float* pm) {
  if (e == 16) {
    launch<16, 4, T>(grid, stream, q, kc, vc, ks, vs, P, po, pm);
  } else if (e == 8 && G <= 4) {
    launch<8, 4, T>(grid, stream, q, kc, vc, ks, vs, P, po, pm);
  } else if (e == 4) {
    launch<4, 4, T>(grid, stream, q, kc, vc, ks, vs, P, po, pm);
  } else {
    TORCH_CHECK(e == 8, "attention: the SIMT decode kernel is not built for ", e, " values per lane");
    launch<8, 8, T>(grid, stream, q, kc, vc, ks, vs, P, po, pm);
  }
}

template void launch_simt<float>(int, int, dim3, cudaStream_t, const float*, const uint8_t*, const uint8_t*,
                                 const DeviceSide&, const DeviceSide&, const AttnParams&, float*, float*);
template void launch_simt<__half>(int, int, dim3, cudaStream_t, const __half*, const uint8_t*, const uint8_t*,
                                  const DeviceSide&, const DeviceSide&, const AttnParams&, float*, float*);
template void launch_simt<__nv_bfloat16>(int, int, dim3, cudaStream_t, const __nv_bfloat16*, const uint8_t*,
                                         const uint8_t*, const DeviceSide&, const DeviceSide&, const AttnParams&,
                                         float*, float*);

}  // namespace turbokv::cuda
