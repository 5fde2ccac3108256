// Row helpers for the CPU kernels: load a row of any float dtype into fp32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "turbokv/float16.h"

namespace turbokv::cpu {

// Loads n values of row `row` of a contiguous (rows, n) tensor into dst (fp32).
inline void load_row(const at::Tensor& x, int64_t row, int64_t n, float* dst) {
  switch (x.scalar_type()) {
    case at::kFloat: {
      const float* p = x.const_data_ptr<float>() + row * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = p[j];
      break;
    }
    case at::kHalf: {
      const auto* p = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::Half>()) + row * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = f16_bits_to_f32(p[j]);
      break;
    }
    case at::kBFloat16: {
      const auto* p = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()) + row * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = bf16_bits_to_f32(p[j]);
      break;
    }
    default:
      TORCH_CHECK(false, "internal: load_row got dtype ", x.scalar_type());
  }
}

// Stores n fp32 values as row `row` of a contiguous (rows, n) tensor of x's dtype.
inline void store_row(at::Tensor& x, int64_t row, int64_t n, const float* src) {
  switch (x.scalar_type()) {
    case at::kFloat: {
      float* p = x.mutable_data_ptr<float>() + row * n;
      for (int64_t j = 0; j < n; ++j) p[j] = src[j];
      break;
    }
    case at::kHalf: {
      auto* p = reinterpret_cast<uint16_t*>(x.mutable_data_ptr<at::Half>()) + row * n;
      for (int64_t j = 0; j < n; ++j) p[j] = f32_to_f16_bits(src[j]);
      break;
    }
    case at::kBFloat16: {
      auto* p = reinterpret_cast<uint16_t*>(x.mutable_data_ptr<at::BFloat16>()) + row * n;
      for (int64_t j = 0; j < n; ++j) p[j] = f32_to_bf16_bits(src[j]);
      break;
    }
    default:
      TORCH_CHECK(false, "internal: store_row got dtype ", x.scalar_type());
  }
}

}  // namespace turbokv::cpu
