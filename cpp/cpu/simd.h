// Small vector kernels for the CPU attention loop. GCC does not vectorise a
// float reduction without -ffast-math, so the AVX2/FMA paths are explicit;
// the portable fallbacks keep other machines correct. A portable build compiles
// the attention kernel twice, with and without AVX2+FMA (attention_kernel.cpp).
#pragma once

#include "turbokv/host_device.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TURBOKV_AVX2 1
#endif

namespace turbokv::cpu {
inline namespace TURBOKV_CODEGEN {

inline float dot(const float* __restrict a, const float* __restrict b, int n) {
  int j = 0;
  float s = 0.0f;
#if defined(TURBOKV_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 1));
  s = _mm_cvtss_f32(r);
#endif
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y += p * x
inline void axpy(float p, const float* __restrict x, float* __restrict y, int n) {
  int j = 0;
#if defined(TURBOKV_AVX2)
  const __m256 vp = _mm256_set1_ps(p);
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(vp, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < n; ++j) y[j] += p * x[j];
}

// y *= s
inline void scale(float* __restrict y, float s, int n) {
  int j = 0;
#if defined(TURBOKV_AVX2)
  const __m256 vs = _mm256_set1_ps(s);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(vs, _mm256_loadu_ps(y + j)));
#endif
  for (; j < n; ++j) y[j] *= s;
}

}  // namespace TURBOKV_CODEGEN
}  // namespace turbokv::cpu
