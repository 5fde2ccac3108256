// CPU quantize / dequantize / cache_append: pad -> rotate -> encode, and back.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../op_checks.h"
#include "decode.h"
#include "rows.h"
#include "turbokv/fwht.h"

namespace turbokv::cpu {
namespace {

// Loads row r of a contiguous (rows, d) float tensor, zero-pads to dp, rotates.
void prepare_row(const at::Tensor& x, int64_t r, const PackedSide& s, float* buf) {
  const RowLayout& L = s.layout;
  load_row(x, r, L.d, buf);
  for (int j = L.d; j < L.dp; ++j) buf[j] = 0.0f;
  if (s.rot_group) rotate_row<float>(buf, L.dp, s.rot_group, s.s1_ptr(), s.s2_ptr(), false);
}

void check_cpu(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), arg, ": got device ", t.device(), ", expected cpu for this kernel");
}

at::Tensor quantize_cpu(const at::Tensor& x, c10::string_view format, int64_t rot_group,
                        std::optional<int64_t> rot_seed) {
  check_cpu(x, "x");
  RowsOp op = prepare_quantize(x, std::string(format), rot_group, rot_seed);
  const PackedSide& s = op.side;
  const RowLayout& L = s.layout;
  uint8_t* dst = op.out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, op.rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(L.dp);
    for (int64_t r = begin; r < end; ++r) {
      prepare_row(op.input, r, s, buf.data());
      encode_row(L, buf.data(), dst + r * L.row_bytes);
    }
  });
  return op.out;
}

at::Tensor dequantize_cpu(const at::Tensor& packed, c10::string_view format, int64_t head_dim, int64_t rot_group,
                          std::optional<int64_t> rot_seed, bool unrotate, at::ScalarType dtype) {
  check_cpu(packed, "packed");
  RowsOp op = prepare_dequantize(packed, std::string(format), head_dim, rot_group, rot_seed, unrotate, dtype);
  const PackedSide& s = op.side;
  const RowLayout& L = s.layout;
  const uint8_t* src = op.input.const_data_ptr<uint8_t>();
  at::parallel_for(0, op.rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(L.dp);
    for (int64_t r = begin; r < end; ++r) {
      decode_row_fast(L, src + r * L.row_bytes, buf.data());
      if (unrotate && s.rot_group) rotate_row<float>(buf.data(), L.dp, s.rot_group, s.s1_ptr(), s.s2_ptr(), true);
      store_row(op.out, r, op.width, buf.data());
    }
  });
  return op.out;
}

void cache_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& positions, c10::string_view k_format, int64_t k_rot_group,
                      std::optional<int64_t> k_rot_seed, c10::string_view v_format, int64_t v_rot_group,
                      std::optional<int64_t> v_rot_seed) {
  // Every check runs before the first write, so bad input leaves the caches untouched.
  check_cpu(k, "k");
  const AppendArgs a = check_append(k_cache, v_cache, k, v, positions, std::string(k_format), k_rot_group, k_rot_seed,
                                    std::string(v_format), v_rot_group, v_rot_seed);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  check_positions(pos, a.T);
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const int64_t B = a.B, H = a.H, S = a.S, T = a.T;
  const PackedSide &ks = a.ks, &vs = a.vs;
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  uint8_t* kdst = k_cache.mutable_data_ptr<uint8_t>();
  uint8_t* vdst = v_cache.mutable_data_ptr<uint8_t>();
  const int dmax = std::max(ks.layout.dp, vs.layout.dp);
  at::parallel_for(0, B * H * S, 32, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(dmax);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * S), h = (r / S) % H, s = r % S;
      const int64_t slot = (b * H + h) * T + pp[b * S + s];
      prepare_row(kc, r, ks, buf.data());
      encode_row(ks.layout, buf.data(), kdst + slot * ks.layout.row_bytes);
      prepare_row(vc, r, vs, buf.data());
      encode_row(vs.layout, buf.data(), vdst + slot * vs.layout.row_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("cache_append", &cache_append_cpu);
}

}  // namespace turbokv::cpu
