#include "op_checks.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <utility>
#include <vector>

#include "turbokv/signs.h"

namespace turbokv {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

int format_id(const std::string& name, const char* arg) {
  std::string names;
  for (int i = 0; i < kNumFormats; ++i) {
    if (name == kFormats[i].name) return i;
    names += (i ? ", " : "") + std::string(kFormats[i].name);
  }
  TORCH_CHECK_VALUE(false, arg, ": got '", name, "', expected one of ", names);
  return -1;
}

void check_rotation(int64_t group, const std::optional<int64_t>& seed, int64_t row_len, const char* arg) {
  if (group == 0) return;
  const bool pow2 = group >= 16 && group <= 512 && (group & (group - 1)) == 0;
  TORCH_CHECK_VALUE(pow2, arg, ": got ", group, ", expected 0 (no rotation) or a power of two in [16, 512]");
  TORCH_CHECK_VALUE(row_len % group == 0, arg, ": got ", group, ", expected a divisor of the stored row length ",
                    row_len);
  TORCH_CHECK_VALUE(!seed.has_value() || *seed >= 0, "rot_seed: got ", seed.value_or(0),
                    ", expected a non-negative seed or None");
}

void fill_signs(int64_t group, const std::optional<int64_t>& seed, std::vector<float>& s1, std::vector<float>& s2) {
  s1.clear();
  s2.clear();
  if (group == 0 || !seed.has_value()) return;
  s1.resize(group);
  s2.resize(group);
  const uint64_t sd = static_cast<uint64_t>(*seed);
  for (int64_t i = 0; i < group; ++i) {
    s1[i] = sign_at(sd, i);
    s2[i] = sign_at(sd, group + i);
  }
}

PackedSide make_side(const std::string& format, int64_t head_dim, int64_t rot_group,
                     const std::optional<int64_t>& rot_seed, const char* format_arg, const char* group_arg) {
  const int fmt = format_id(format, format_arg);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim <= 1024, "head_dim: got ", head_dim, ", expected 1..1024");
  PackedSide side;
  side.layout = make_layout(fmt, static_cast<int>(head_dim));
  TORCH_CHECK_VALUE(side.layout.fmt >= 0, "head_dim: got ", head_dim, ", expected a multiple of 32 for format ",
                    format);
  check_rotation(rot_group, rot_seed, side.layout.dp, group_arg);
  side.rot_group = static_cast<int>(rot_group);
  side.seeded = rot_group != 0 && rot_seed.has_value();
  side.seed = side.seeded ? static_cast<uint64_t>(*rot_seed) : 0;
  fill_signs(rot_group, rot_seed, side.s1, side.s2);
  return side;
}

void check_float_input(const at::Tensor& t, const char* arg) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, arg, ": got dtype ", st,
                   ", expected float32, float16 or bfloat16");
}

void check_packed(const at::Tensor& t, const PackedSide& side, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, arg, ": got dtype ", t.scalar_type(),
                   ", expected uint8 (packed rows)");
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == side.layout.row_bytes, arg, ": got shape ", shape_str(t),
                    ", expected rows of ", side.layout.row_bytes, " bytes (format ", kFormats[side.layout.fmt].name,
                    ", head_dim ", side.layout.d, ")");
}

void check_index_tensor(const at::Tensor& t, const char* arg, at::IntArrayRef sizes, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, arg, ": got dtype ", t.scalar_type(),
                   ", expected int32 or int64");
  TORCH_CHECK_VALUE(t.device() == device, arg, ": got device ", t.device(), ", expected ", device);
  TORCH_CHECK_VALUE(t.sizes() == sizes, arg, ": got shape ", shape_str(t), ", expected ", sizes);
}

namespace {
// [first, last] byte addresses a tensor's elements reach; empty tensors reach none.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < t.dim(); ++i) {
    const int64_t reach = (t.size(i) - 1) * t.stride(i);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const auto item = static_cast<int64_t>(t.element_size());
  return {base + lo * item, base + hi * item + item - 1};
}
}  // namespace

void check_no_overlap(const at::Tensor& out, const char* out_arg, const at::Tensor& other, const char* other_arg) {
  if (out.numel() == 0 || other.numel() == 0 || out.device() != other.device() || out.is_meta()) return;
  const auto [a0, a1] = byte_span(out);
  const auto [b0, b1] = byte_span(other);
  TORCH_CHECK_VALUE(a1 < b0 || b1 < a0, other_arg, ": got a tensor whose memory overlaps ", out_arg, " (bytes ",
                    b1 - b0 + 1, " at offset ", static_cast<int64_t>(b0 - a0), " from ", out_arg,
                    "), expected separate memory (", out_arg, " is written by this op)");
}

void check_device(const at::Tensor& t, const at::Device& device, const char* arg) {
  TORCH_CHECK_VALUE(t.device() == device, arg, ": got device ", t.device(), ", expected ", device);
}

void check_hadamard(const at::Tensor& x, int64_t group, const std::optional<int64_t>& seed) {
  if (x.scalar_type() != at::kDouble) check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: got a 0-dim tensor, expected (..., n)");
  TORCH_CHECK_VALUE(group != 0, "group: got 0, expected a power of two in [16, 512]");
  check_rotation(group, seed, x.size(-1), "group");
}

RowsOp prepare_quantize(const at::Tensor& x, const std::string& format, int64_t rot_group,
                        const std::optional<int64_t>& rot_seed) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: got a 0-dim tensor, expected (..., head_dim)");
  RowsOp op{make_side(format, x.size(-1), rot_group, rot_seed, "format", "rot_group"), x.contiguous(), {}, 0, 0};
  op.width = op.side.layout.row_bytes;
  auto sizes = op.input.sizes().vec();
  sizes.back() = op.width;
  op.out = at::empty(sizes, op.input.options().dtype(at::kByte));
  op.rows = op.input.numel() / op.side.layout.d;
  return op;
}

RowsOp prepare_dequantize(const at::Tensor& packed, const std::string& format, int64_t head_dim, int64_t rot_group,
                          const std::optional<int64_t>& rot_seed, bool unrotate, at::ScalarType dtype) {
  RowsOp op{make_side(format, head_dim, rot_group, rot_seed, "format", "rot_group"), {}, {}, 0, 0};
  check_packed(packed, op.side, "packed");
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "dtype: got ", dtype,
                   ", expected float32, float16 or bfloat16");
  op.input = packed.contiguous();
  op.width = unrotate ? op.side.layout.d : op.side.layout.dp;
  auto sizes = op.input.sizes().vec();
  sizes.back() = op.width;
  op.out = at::empty(sizes, op.input.options().dtype(dtype));
  op.rows = op.input.numel() / op.side.layout.row_bytes;
  return op;
}

namespace {
void check_cache(const at::Tensor& cache, const PackedSide& s, const at::Device& device, const char* arg) {
  check_device(cache, device, arg);
  check_packed(cache, s, arg);
  TORCH_CHECK_VALUE(cache.dim() == 4, arg, ": got shape ", shape_str(cache), ", expected (B, Hkv, T, row_bytes)");
  TORCH_CHECK_VALUE(cache.is_contiguous(), arg, ": expected a contiguous tensor");
}
}  // namespace

AppendArgs check_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& positions, const std::string& k_format, int64_t k_rot_group,
                        const std::optional<int64_t>& k_rot_seed, const std::string& v_format, int64_t v_rot_group,
                        const std::optional<int64_t>& v_rot_seed) {
  const at::Device device = k.device();
  check_device(v, device, "v");
  check_float_input(k, "k");
  check_float_input(v, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == v.scalar_type(), "v: got dtype ", v.scalar_type(), ", expected the dtype of k ",
                   k.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == 4, "k: got shape ", shape_str(k), ", expected (B, Hkv, S, head_dim)");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v: got shape ", shape_str(v), ", expected the shape of k ", shape_str(k));
  AppendArgs a{k.size(0), k.size(1), k.size(2), k.size(3), 0, {}, {}};
  TORCH_CHECK_VALUE(a.B > 0, "k: got an empty batch (shape ", shape_str(k), "), expected B >= 1");
  a.ks = make_side(k_format, a.d, k_rot_group, k_rot_seed, "k_format", "k_rot_group");
  a.vs = make_side(v_format, a.d, v_rot_group, v_rot_seed, "v_format", "v_rot_group");
  check_cache(k_cache, a.ks, device, "k_cache");
  check_cache(v_cache, a.vs, device, "v_cache");
  TORCH_CHECK_VALUE(k_cache.size(0) == a.B && k_cache.size(1) == a.H, "k_cache: got shape ", shape_str(k_cache),
                    ", expected (", a.B, ", ", a.H, ", T, ", a.ks.layout.row_bytes, ") to match k");
  a.T = k_cache.size(2);
  TORCH_CHECK_VALUE(v_cache.size(0) == a.B && v_cache.size(1) == a.H && v_cache.size(2) == a.T, "v_cache: got shape ",
                    shape_str(v_cache), ", expected (", a.B, ", ", a.H, ", ", a.T, ", ", a.vs.layout.row_bytes,
                    ") to match k_cache");
  check_index_tensor(positions, "positions", {a.B, a.S}, device);
  // Both caches are written: neither may share a byte with the other or with an input.
  check_no_overlap(k_cache, "k_cache", v_cache, "v_cache");
  const std::pair<const at::Tensor*, const char*> inputs[] = {{&k, "k"}, {&v, "v"}, {&positions, "positions"}};
  for (const auto& [t, name] : inputs) {
    check_no_overlap(k_cache, "k_cache", *t, name);
    check_no_overlap(v_cache, "v_cache", *t, name);
  }
  return a;
}

void check_positions(const at::Tensor& pos_cpu, int64_t T) {
  const int64_t* pp = pos_cpu.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < pos_cpu.numel(); ++i)
    TORCH_CHECK_VALUE(pp[i] >= 0 && pp[i] < T, "positions: got ", pp[i], " at flat index ", i,
                      ", expected 0 <= position < cache capacity ", T);
  // A position named twice would be written twice, in an unspecified order.
  const int64_t B = pos_cpu.size(0), S = pos_cpu.size(1);
  std::vector<int64_t> row(S);
  for (int64_t b = 0; b < B && S > 1; ++b) {
    std::copy(pp + b * S, pp + (b + 1) * S, row.begin());
    if (!std::is_sorted(row.begin(), row.end())) std::sort(row.begin(), row.end());
    const auto dup = std::adjacent_find(row.begin(), row.end());
    TORCH_CHECK_VALUE(dup == row.end(), "positions: got ", dup == row.end() ? 0 : *dup, " twice for sequence ", b,
                      ", expected distinct positions (each new token has its own slot)");
  }
}

AttentionArgs check_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& lengths, const std::optional<at::Tensor>& starts,
                              const std::string& k_format, int64_t k_rot_group,
                              const std::optional<int64_t>& k_rot_seed, const std::string& v_format,
                              int64_t v_rot_group, const std::optional<int64_t>& v_rot_seed, double scale,
                              int64_t window, double softcap, const std::optional<at::Tensor>& sink_logits) {
  check_float_input(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, "q: got shape ", shape_str(q), ", expected (B, Hq, Sq, head_dim)");
  AttentionArgs a{q.size(0), q.size(1), 0, q.size(2), 0, q.size(3), 0, {}, {}};
  TORCH_CHECK_VALUE(a.B > 0, "q: got an empty batch (shape ", shape_str(q), "), expected B >= 1");
  TORCH_CHECK_VALUE(a.Sq > 0 && a.Hq > 0, "q: got shape ", shape_str(q), ", expected Hq >= 1 and Sq >= 1");
  a.ks = make_side(k_format, a.d, k_rot_group, k_rot_seed, "k_format", "k_rot_group");
  a.vs = make_side(v_format, a.d, v_rot_group, v_rot_seed, "v_format", "v_rot_group");
  check_cache(k_cache, a.ks, q.device(), "k_cache");
  check_cache(v_cache, a.vs, q.device(), "v_cache");
  a.Hkv = k_cache.size(1);
  a.T = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) == a.B, "k_cache: got batch ", k_cache.size(0), ", expected ", a.B,
                    " (the batch of q)");
  TORCH_CHECK_VALUE(v_cache.size(0) == a.B && v_cache.size(1) == a.Hkv && v_cache.size(2) == a.T, "v_cache: got shape ",
                    shape_str(v_cache), ", expected (", a.B, ", ", a.Hkv, ", ", a.T, ", ", a.vs.layout.row_bytes, ")");
  TORCH_CHECK_VALUE(a.Hkv > 0 && a.Hq % a.Hkv == 0, "q: got ", a.Hq, " query heads, expected a multiple of the ", a.Hkv,
                    " KV heads of k_cache");
  a.G = static_cast<int>(a.Hq / a.Hkv);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale: got ", scale, ", expected a finite number");
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), "softcap: got ", softcap, ", expected >= 0 (0 = off)");
  TORCH_CHECK_VALUE(window >= 0, "window: got ", window, ", expected >= 0 (0 = no sliding window)");
  check_index_tensor(lengths, "lengths", {a.B}, q.device());
  if (starts.has_value()) check_index_tensor(*starts, "starts", {a.B}, q.device());
  if (sink_logits.has_value()) check_sink_logits(*sink_logits, a.Hq, q.device());
  return a;
}

void check_sink_logits(const at::Tensor& sink_logits, int64_t Hq, const at::Device& device) {
  check_float_input(sink_logits, "sink_logits");
  check_device(sink_logits, device, "sink_logits");
  TORCH_CHECK_VALUE(sink_logits.dim() == 1 && sink_logits.size(0) == Hq, "sink_logits: got shape ",
                    shape_str(sink_logits), ", expected (", Hq, ",) (one logit per query head of q)");
}

void check_lengths(const at::Tensor& len_cpu, const at::Tensor& starts_cpu, int64_t T, int64_t Sq, bool causal) {
  const int64_t* lp = len_cpu.const_data_ptr<int64_t>();
  const int64_t* sp = starts_cpu.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < len_cpu.numel(); ++b) {
    TORCH_CHECK_VALUE(lp[b] >= 0 && lp[b] <= T, "lengths: got ", lp[b], " for sequence ", b,
                      ", expected 0 <= length <= cache capacity ", T);
    TORCH_CHECK_VALUE(!causal || lp[b] >= Sq, "lengths: got ", lp[b], " for sequence ", b, ", expected >= ", Sq,
                      " (the queries are the last Sq cached tokens)");
    TORCH_CHECK_VALUE(sp[b] >= 0 && sp[b] <= lp[b], "starts: got ", sp[b], " for sequence ", b,
                      ", expected 0 <= start <= length ", lp[b]);
  }
}

}  // namespace turbokv
