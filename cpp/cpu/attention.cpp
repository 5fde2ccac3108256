// CPU attention over packed K/V caches: the op's checks, the split into tasks (one per
// sequence, KV head and chunk of queries) over ATen's thread pool, and the choice of the
// kernel copy that runs them (attention_kernel.h: baseline, or AVX2+FMA where the CPU has it).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "../kernel_choice.h"
#include "../op_checks.h"
#include "attention_kernel.h"

namespace turbokv::cpu {
namespace {

constexpr int kRowsPerTask = 64;  // query rows (heads x queries) per task, at least one query

struct Kernel {
  AttendTask fn;
  const char* isa;
};

// The kernel copy attention runs: the pinned one (kernel_choice.h), else AVX2 where the CPU has
// it. set_kernel_choice refuses avx2 where this returns false.
const Kernel& chosen_kernel() {
#if defined(TURBOKV_CPU_NATIVE)
  static const Kernel native{&baseline::attend_task, "native"};  // the one copy, tuned for the build machine
  return native;
#else
  static const Kernel base{&baseline::attend_task, "baseline"};
#if defined(TURBOKV_CPU_AVX2_COPY)
  static const Kernel wide{&avx2::attend_task, "avx2"};
  if (avx2_available() && kernel_choice().cpu_isa != CpuIsa::kBaseline) return wide;
#endif
  return base;
#endif
}

// Both ops' work: the output (B, Hq, Sq, d) in q's dtype and, with want_lse, each row's
// log-sum-exp (B, Hq, Sq) float32 (an undefined tensor otherwise).
std::tuple<at::Tensor, at::Tensor> attention_impl(TURBOKV_ATTENTION_PARAMS, bool want_lse) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q: got device ", q.device(), ", expected cpu for this kernel");
  const AttentionArgs a =
      check_attention(q, k_cache, v_cache, lengths, starts, std::string(k_format), k_rot_group, k_rot_seed,
                      std::string(v_format), v_rot_group, v_rot_seed, scale, window, softcap, sink_logits);
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const at::Tensor st = starts.has_value() ? starts->to(at::kLong).contiguous() : at::zeros({a.B}, len.options());
  check_lengths(len, st, a.T, a.Sq, causal);
  const int64_t* lp = len.const_data_ptr<int64_t>();
  const int64_t* sp = st.const_data_ptr<int64_t>();
  const PackedSide &ks = a.ks, &vs = a.vs;
  AttnShape P{a.B,    a.Hq,   a.Hkv,   a.Sq,   a.T, a.d, a.G, static_cast<float>(scale), static_cast<float>(softcap),
              causal, window, nullptr, nullptr};
  const AttnSide kside{ks.layout, ks.rot_group, ks.s1_ptr(), ks.s2_ptr()};
  const AttnSide vside{vs.layout, vs.rot_group, vs.s1_ptr(), vs.s2_ptr()};
  const AttendTask attend_task = chosen_kernel().fn;
  const at::Tensor sink_logits_f32 = sink_logits.has_value() ? sink_logits->to(at::kFloat).contiguous() : at::Tensor();
  if (sink_logits.has_value()) P.sink_logits = sink_logits_f32.const_data_ptr<float>();

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor kc = k_cache.contiguous(), vc = v_cache.contiguous();
  at::Tensor out = at::empty({P.B, P.Hq, P.Sq, P.d}, q.options().dtype(at::kFloat));
  at::Tensor lse;
  if (want_lse) {
    lse = at::empty({P.B, P.Hq, P.Sq}, q.options().dtype(at::kFloat));
    P.lse = lse.mutable_data_ptr<float>();
  }
  const int64_t per_task = std::max<int64_t>(1, kRowsPerTask / P.G);
  const int64_t chunks = (P.Sq + per_task - 1) / per_task;
  const float* qp = qf.const_data_ptr<float>();
  const uint8_t* kp = kc.const_data_ptr<uint8_t>();
  const uint8_t* vp = vc.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, P.B * P.Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    // Workspace on the heap (no large stack arrays), sized for the largest task.
    std::vector<float> ws(attend_workspace(P.G * std::min(per_task, P.Sq), ks.layout.dp, vs.layout.dp));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, h = (task / chunks) % P.Hkv, b = task / (chunks * P.Hkv);
      const int64_t i0 = c * per_task, i1 = std::min(P.Sq, i0 + per_task);
      attend_task(P, kside, vside, qp, kp, vp, b, h, i0, i1, lp[b], sp[b], op, ws.data());
    }
  });
  return {out.to(q.scalar_type()), lse};
}

at::Tensor attention_cpu(TURBOKV_ATTENTION_PARAMS) {
  return std::get<0>(attention_impl(TURBOKV_ATTENTION_ARGS, false));
}

std::tuple<at::Tensor, at::Tensor> attention_lse_cpu(TURBOKV_ATTENTION_PARAMS) {
  return attention_impl(TURBOKV_ATTENTION_ARGS, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(turbokv, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_lse", &attention_lse_cpu);
}

bool avx2_available() {
#if defined(TURBOKV_CPU_AVX2_COPY) && !defined(TURBOKV_CPU_NATIVE)
  // The OS saves the AVX registers, too: the compiler runtime's check includes that.
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

const char* attention_isa() { return chosen_kernel().isa; }

}  // namespace turbokv::cpu
