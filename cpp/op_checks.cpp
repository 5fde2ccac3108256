#include "op_checks.h"

#include <sstream>

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

SideSpec make_side(const std::string& format, int64_t head_dim, int64_t rot_group,
                   const std::optional<int64_t>& rot_seed, const char* format_arg, const char* group_arg) {
  const int fmt = format_id(format, format_arg);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim <= 1024, "head_dim: got ", head_dim, ", expected 1..1024");
  SideSpec side;
  side.layout = make_layout(fmt, static_cast<int>(head_dim));
  TORCH_CHECK_VALUE(side.layout.fmt >= 0, "head_dim: got ", head_dim, ", expected a multiple of 32 for format ",
                    format);
  check_rotation(rot_group, rot_seed, side.layout.dp, group_arg);
  side.rot_group = static_cast<int>(rot_group);
  fill_signs(rot_group, rot_seed, side.s1, side.s2);
  return side;
}

void check_float_input(const at::Tensor& t, const char* arg) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, arg, ": got dtype ", st,
                   ", expected float32, float16 or bfloat16");
}

void check_packed(const at::Tensor& t, const SideSpec& side, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, arg, ": got dtype ", t.scalar_type(),
                   ", expected uint8 (packed rows)");
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == side.layout.row_bytes, arg, ": got shape ", shape_str(t),
                    ", expected rows of ", side.layout.row_bytes, " bytes (format ", kFormats[side.layout.fmt].name,
                    ", head_dim ", side.layout.d, ")");
}

void check_index_tensor(const at::Tensor& t, const char* arg, int64_t dim0, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, arg, ": got dtype ", t.scalar_type(),
                   ", expected int32 or int64");
  TORCH_CHECK_VALUE(t.device() == device, arg, ": got device ", t.device(), ", expected ", device);
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == dim0, arg, ": got shape ", shape_str(t), ", expected first dim ",
                    dim0);
}

}  // namespace turbokv
