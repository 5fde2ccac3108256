// Normalised fast Walsh-Hadamard transform over one row, block-diagonal in
// groups of n (power of two). The butterfly order (h = 1, 2, 4, ...) is the one
// reference.py uses, so fp32 results are bit-identical to the reference.
#pragma once

#include <cmath>

#include "turbokv/host_device.h"

namespace turbokv {

inline namespace TURBOKV_CODEGEN {

// In place: x[0..n) <- H_n x / sqrt(n). inv_sqrt_n = float(1 / sqrt(double(n))).
template <typename T>
inline void fwht_inplace(T* x, int n, T inv_sqrt_n) {
  for (int h = 1; h < n; h <<= 1) {
    for (int i = 0; i < n; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const T a = x[j];
        const T b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  for (int j = 0; j < n; ++j) x[j] *= inv_sqrt_n;
}

// Rotates a row of `len` values (len % n == 0) block by block.
// Forward: y = s2 * H(s1 * x); inverse: x = s1 * H(s2 * y). Null signs = plain H.
template <typename T>
inline void rotate_row(T* x, int len, int n, const float* s1, const float* s2, bool inverse) {
  const T inv_sqrt_n = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n)));
  const float* pre = inverse ? s2 : s1;
  const float* post = inverse ? s1 : s2;
  for (int base = 0; base < len; base += n) {
    T* blk = x + base;
    if (pre)
      for (int j = 0; j < n; ++j) blk[j] *= static_cast<T>(pre[j]);
    fwht_inplace(blk, n, inv_sqrt_n);
    if (post)
      for (int j = 0; j < n; ++j) blk[j] *= static_cast<T>(post[j]);
  }
}

}  // namespace TURBOKV_CODEGEN
}  // namespace turbokv
