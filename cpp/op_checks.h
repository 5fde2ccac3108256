// Argument checks and per-side specs shared by the CPU and CUDA op implementations.
// Every failure names the argument, the value seen and the value expected.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "turbokv/codec.h"

namespace turbokv {

// One side (K or V) of a cache: its row layout and rotation.
struct SideSpec {
  RowLayout layout;
  int rot_group = 0;          // 0: no rotation
  std::vector<float> s1, s2;  // sign diagonals; empty when unseeded

  const float* s1_ptr() const { return s1.empty() ? nullptr : s1.data(); }
  const float* s2_ptr() const { return s2.empty() ? nullptr : s2.data(); }
};

int format_id(const std::string& name, const char* arg);
void check_rotation(int64_t group, const std::optional<int64_t>& seed, int64_t row_len, const char* arg);
void fill_signs(int64_t group, const std::optional<int64_t>& seed, std::vector<float>& s1, std::vector<float>& s2);
SideSpec make_side(const std::string& format, int64_t head_dim, int64_t rot_group,
                   const std::optional<int64_t>& rot_seed, const char* format_arg, const char* group_arg);

void check_float_input(const at::Tensor& t, const char* arg);
void check_packed(const at::Tensor& t, const SideSpec& side, const char* arg);
void check_index_tensor(const at::Tensor& t, const char* arg, int64_t dim0, const at::Device& device);
std::string shape_str(const at::Tensor& t);

}  // namespace turbokv
