// Argument checks and the packed sides (PackedSide) shared by the CPU and CUDA op implementations.
// Every failure names the argument, the value seen and the value expected.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "turbokv/codec.h"

namespace turbokv {

// One side (K or V) of a cache as the host sees it: its row layout and rotation, checked and
// resolved from the op's arguments (Python's hf.layer.SideSpec is the user's choice it comes from;
// kernels take the by-value copy cuda::DeviceSide, built by cuda::device_side).
struct PackedSide {
  RowLayout layout;
  int rot_group = 0;  // 0: no rotation
  bool seeded = false;
  uint64_t seed = 0;
  std::vector<float> s1, s2;  // sign diagonals; empty when unseeded

  const float* s1_ptr() const { return s1.empty() ? nullptr : s1.data(); }
  const float* s2_ptr() const { return s2.empty() ? nullptr : s2.data(); }
};

int format_id(const std::string& name, const char* arg);
void check_rotation(int64_t group, const std::optional<int64_t>& seed, int64_t row_len, const char* arg);
void fill_signs(int64_t group, const std::optional<int64_t>& seed, std::vector<float>& s1, std::vector<float>& s2);
PackedSide make_side(const std::string& format, int64_t head_dim, int64_t rot_group,
                     const std::optional<int64_t>& rot_seed, const char* format_arg, const char* group_arg);

void check_float_input(const at::Tensor& t, const char* arg);
void check_packed(const at::Tensor& t, const PackedSide& side, const char* arg);
// An int32/int64 tensor of exactly `sizes` on `device`.
void check_index_tensor(const at::Tensor& t, const char* arg, at::IntArrayRef sizes, const at::Device& device);
// The written tensor `out` and the tensor `other` (written or read) share no byte. Compared by
// the byte range each one's sizes and strides reach, not by pointer: views and offsets count.
void check_no_overlap(const at::Tensor& out, const char* out_arg, const at::Tensor& other, const char* other_arg);
std::string shape_str(const at::Tensor& t);
void check_device(const at::Tensor& t, const at::Device& device, const char* arg);

// hadamard: dtype (float16/bfloat16/float32/float64), shape and rotation.
void check_hadamard(const at::Tensor& x, int64_t group, const std::optional<int64_t>& seed);

// quantize / dequantize: checks, the contiguous input and the empty output, for every backend.
struct RowsOp {
  PackedSide side;
  at::Tensor input;  // contiguous
  at::Tensor out;
  int64_t rows;
  int width;  // values per output row (dequantize) or bytes (quantize)
};
RowsOp prepare_quantize(const at::Tensor& x, const std::string& format, int64_t rot_group,
                        const std::optional<int64_t>& rot_seed);
RowsOp prepare_dequantize(const at::Tensor& packed, const std::string& format, int64_t head_dim, int64_t rot_group,
                          const std::optional<int64_t>& rot_seed, bool unrotate, at::ScalarType dtype);

// cache_append: every shape/dtype/device check, before any write.
struct AppendArgs {
  int64_t B, H, S, d, T;
  PackedSide ks, vs;
};
AppendArgs check_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& positions, const std::string& k_format, int64_t k_rot_group,
                        const std::optional<int64_t>& k_rot_seed, const std::string& v_format, int64_t v_rot_group,
                        const std::optional<int64_t>& v_rot_seed);
// Values of positions (a CPU int64 (B, S) copy): 0 <= p < T, no position twice in a sequence.
void check_positions(const at::Tensor& pos_cpu, int64_t T);

// The attention ops' parameters (ops.cpp's schema), as each backend's kernels take them, and the
// same names as arguments: attention and attention_lse share one implementation per backend,
// impl(TURBOKV_ATTENTION_PARAMS, bool want_lse) -> (out, lse), and differ only in what they return.
#define TURBOKV_ATTENTION_PARAMS                                                                        \
  const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache, const at::Tensor &lengths, \
      const std::optional<at::Tensor>&starts, c10::string_view k_format, int64_t k_rot_group,           \
      std::optional<int64_t> k_rot_seed, c10::string_view v_format, int64_t v_rot_group,                \
      std::optional<int64_t> v_rot_seed, double scale, bool causal, int64_t window, double softcap,     \
      const std::optional<at::Tensor>&sink_logits
#define TURBOKV_ATTENTION_ARGS                                                                                       \
  q, k_cache, v_cache, lengths, starts, k_format, k_rot_group, k_rot_seed, v_format, v_rot_group, v_rot_seed, scale, \
      causal, window, softcap, sink_logits

// attention: shapes, dtypes, devices and scalars.
struct AttentionArgs {
  int64_t B, Hq, Hkv, Sq, T, d;
  int G;
  PackedSide ks, vs;
};
AttentionArgs check_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& lengths, const std::optional<at::Tensor>& starts,
                              const std::string& k_format, int64_t k_rot_group,
                              const std::optional<int64_t>& k_rot_seed, const std::string& v_format,
                              int64_t v_rot_group, const std::optional<int64_t>& v_rot_seed, double scale,
                              int64_t window, double softcap, const std::optional<at::Tensor>& sink_logits);
// sink_logits: (Hq,) float32 / float16 / bfloat16 on q's device.
void check_sink_logits(const at::Tensor& sink_logits, int64_t Hq, const at::Device& device);
// Values of lengths / starts (CPU int64 copies).
void check_lengths(const at::Tensor& len_cpu, const at::Tensor& starts_cpu, int64_t T, int64_t Sq, bool causal);

}  // namespace turbokv
