// CPU normalised Hadamard rotation, computed in fp32 (fp64 for fp64 input).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../op_checks.h"
#include "rows.h"
#include "turbokv/fwht.h"

namespace turbokv::cpu {
namespace {

at::Tensor hadamard_cpu(const at::Tensor& x, int64_t group, std::optional<int64_t> seed, bool inverse) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: got device ", x.device(), ", expected cpu for this kernel");
  check_hadamard(x, group, seed);
  const bool f64 = x.scalar_type() == at::kDouble;
  const int64_t n = x.size(-1);
  std::vector<float> s1, s2;
  fill_signs(group, seed, s1, s2);
  const float* p1 = s1.empty() ? nullptr : s1.data();
  const float* p2 = s2.empty() ? nullptr : s2.data();

  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = n == 0 ? 0 : xc.numel() / n;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    if (f64) {
      const double* src = xc.const_data_ptr<double>();
      double* dst = out.mutable_data_ptr<double>();
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t j = 0; j < n; ++j) dst[r * n + j] = src[r * n + j];
        rotate_row<double>(dst + r * n, static_cast<int>(n), static_cast<int>(group), p1, p2, inverse);
      }
      return;
    }
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      load_row(xc, r, n, buf.data());
      rotate_row<float>(buf.data(), static_cast<int>(n), static_cast<int>(group), p1, p2, inverse);
      store_row(out, r, n, buf.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, CPU, m) { m.impl("hadamard", &hadamard_cpu); }

}  // namespace turbokv::cpu
