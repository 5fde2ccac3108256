// Meta kernels (shapes only): what torch.compile traces with, and what a call with meta
// tensors runs. They make the same shape, dtype and device checks as the CPU and CUDA kernels
// (the functions of op_checks.h), so a meta tensor among real ones is a device error rather
// than a silent no-op. Checks of values (lengths, positions) need data and are the real
// kernels' alone. Under torch.compile with dynamic shapes the sizes may be symbolic: the
// kernels then check dtypes and devices only (sizes are checked when the op runs).
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#include "op_checks.h"

namespace turbokv::meta {
namespace {

bool symbolic(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    for (const c10::SymInt& s : t->sym_sizes())
      if (s.is_symbolic()) return true;
  return false;
}

// What the shape checks still say with symbolic sizes: every tensor on `first`'s device.
void check_same_device(const at::Tensor& first, std::initializer_list<std::pair<const at::Tensor*, const char*>> ts) {
  for (const auto& [t, name] : ts) check_device(*t, first.device(), name);
}

// quantize / dequantize output: the input's leading sizes, `width` last.
at::Tensor rows_out(const at::Tensor& in, int64_t width, at::ScalarType dtype) {
  std::vector<c10::SymInt> sizes(in.sym_sizes().begin(), in.sym_sizes().end());
  sizes.back() = width;
  return at::empty_symint(sizes, in.options().dtype(dtype));
}

at::Tensor hadamard_meta(const at::Tensor& x, int64_t group, std::optional<int64_t> seed, bool inverse) {
  if (!symbolic({&x})) check_hadamard(x, group, seed);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

at::Tensor quantize_meta(const at::Tensor& x, c10::string_view format, int64_t rot_group,
                         std::optional<int64_t> rot_seed) {
  // The row width depends on head_dim: a symbolic one is specialised (guarded), as it is fixed per model.
  if (!symbolic({&x})) return prepare_quantize(x, std::string(format), rot_group, rot_seed).out;
  check_float_input(x, "x");
  const PackedSide side = make_side(std::string(format), x.sym_size(-1).guard_int(__FILE__, __LINE__), rot_group,
                                    rot_seed, "format", "rot_group");
  return rows_out(x, side.layout.row_bytes, at::kByte);
}

at::Tensor dequantize_meta(const at::Tensor& packed, c10::string_view format, int64_t head_dim, int64_t rot_group,
                           std::optional<int64_t> rot_seed, bool unrotate, at::ScalarType dtype) {
  if (!symbolic({&packed}))
    return prepare_dequantize(packed, std::string(format), head_dim, rot_group, rot_seed, unrotate, dtype).out;
  const PackedSide side = make_side(std::string(format), head_dim, rot_group, rot_seed, "format", "rot_group");
  return rows_out(packed, unrotate ? side.layout.d : side.layout.dp, dtype);
}

void cache_append_meta(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& positions, c10::string_view k_format, int64_t k_rot_group,
                       std::optional<int64_t> k_rot_seed, c10::string_view v_format, int64_t v_rot_group,
                       std::optional<int64_t> v_rot_seed) {
  if (symbolic({&k_cache, &v_cache, &k, &v, &positions})) {
    check_same_device(k, {{&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&positions, "positions"}});
    return;
  }
  check_append(k_cache, v_cache, k, v, positions, std::string(k_format), k_rot_group, k_rot_seed, std::string(v_format),
               v_rot_group, v_rot_seed);
}

at::Tensor attention_meta(TURBOKV_ATTENTION_PARAMS) {
  if (symbolic({&q, &k_cache, &v_cache, &lengths})) {
    check_same_device(q, {{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&lengths, "lengths"}});
    if (starts.has_value()) check_device(*starts, q.device(), "starts");
    if (sink_logits.has_value()) {
      check_device(*sink_logits, q.device(), "sink_logits");
      check_float_input(*sink_logits, "sink_logits");
    }
  } else {
    check_attention(q, k_cache, v_cache, lengths, starts, std::string(k_format), k_rot_group, k_rot_seed,
                    std::string(v_format), v_rot_group, v_rot_seed, scale, window, softcap, sink_logits);
  }
  return at::empty_like(q, at::MemoryFormat::Contiguous);  // (B, Hq, Sq, d), like q
}

std::tuple<at::Tensor, at::Tensor> attention_lse_meta(TURBOKV_ATTENTION_PARAMS) {
  at::Tensor out = attention_meta(TURBOKV_ATTENTION_ARGS);
  std::vector<c10::SymInt> rows(q.sym_sizes().begin(), q.sym_sizes().end() - 1);  // (B, Hq, Sq)
  return {out, at::empty_symint(rows, q.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, Meta, m) {
  m.impl("hadamard", &hadamard_meta);
  m.impl("quantize", &quantize_meta);
  m.impl("dequantize", &dequantize_meta);
  m.impl("cache_append", &cache_append_meta);
  m.impl("attention", &attention_meta);
  m.impl("attention_lse", &attention_lse_meta);
}

}  // namespace turbokv::meta
