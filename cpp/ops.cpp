// Every turbokv op schema, declared once. Backends add implementations in
// cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL, the meta (fake) kernels torch.compile
// traces with are in meta.cpp; python/turbokv/ops.py wraps the ops with types.
// Rotation of a side is (rot_group, rot_seed): rot_group 0 = none, rot_seed None = plain
// Hadamard without sign diagonals.
// attention's sink_logits: one logit per query head that joins the softmax denominator (no value).
// attention_lse: attention's output and each row's log-sum-exp (B, Hq, Sq) float32, the logit
// of its denominator (sink included; -inf where the row saw no key), so that attention over
// disjoint sets of keys can be merged exactly (ops.merge_attention).
#include <Python.h>
#include <torch/library.h>

#include "cpu/attention_kernel.h"
#include "kernel_choice.h"
#if TURBOKV_WITH_CUDA
#include "cuda/device_config.h"
#endif

TORCH_LIBRARY(turbokv, m) {
  m.def("hadamard(Tensor x, int group, int? seed, bool inverse) -> Tensor");
  m.def("quantize(Tensor x, str format, int rot_group, int? rot_seed) -> Tensor");
  m.def(
      "dequantize(Tensor packed, str format, int head_dim, int rot_group, int? rot_seed, bool unrotate, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor positions, "
      "str k_format, int k_rot_group, int? k_rot_seed, str v_format, int v_rot_group, int? v_rot_seed) -> ()");
  m.def(
      "attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? starts, "
      "str k_format, int k_rot_group, int? k_rot_seed, str v_format, int v_rot_group, int? v_rot_seed, "
      "float scale, bool causal, int window, float softcap, Tensor? sink_logits=None) -> Tensor");
  m.def(
      "attention_lse(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? starts, "
      "str k_format, int k_rot_group, int? k_rot_seed, str v_format, int v_rot_group, int? v_rot_seed, "
      "float scale, bool causal, int window, float softcap, Tensor? sink_logits=None) -> (Tensor, Tensor)");
}

#ifndef TURBOKV_WITH_CUDA
#define TURBOKV_WITH_CUDA 0
#endif
#ifndef TURBOKV_CUDA_ARCHS
#define TURBOKV_CUDA_ARCHS ""
#endif

// The Python module holds build facts and what the kernels chose at run time; importing it
// loads this shared object, and the static registrations above reach the dispatcher.

// A C++ exception (a failed check) as a Python ValueError / RuntimeError.
template <typename F>
static PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
  return nullptr;
}

// cpu_isa() -> "avx2" | "baseline" | "native": the copy of the CPU attention kernel this
// process runs (cpu/attention_kernel.h).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(turbokv::cpu::attention_isa()); });
}

// cuda_device_config(index) -> dict: what the CUDA kernels know and chose for that device
// (cuda/device_config.h): capability, sms, smem_optin, smem_limit, kernel_arch, ptx_arch, pdl.
static PyObject* cuda_device_config(PyObject*, PyObject* arg) {
  const long index = PyLong_AsLong(arg);
  if (index == -1 && PyErr_Occurred()) return nullptr;
#if TURBOKV_WITH_CUDA
  return guarded([index] {
    const auto& c = turbokv::cuda::device_config(static_cast<int>(index));
    return Py_BuildValue("{s:(ii),s:i,s:i,s:i,s:i,s:i,s:O}", "capability", c.major, c.minor, "sms", c.sms, "smem_optin",
                         c.smem_optin, "smem_limit", turbokv::cuda::smem_limit(static_cast<int>(index)), "kernel_arch",
                         c.kernel_arch, "ptx_arch", c.ptx_arch, "pdl", c.pdl ? Py_True : Py_False);
  });
#else
  PyErr_SetString(PyExc_RuntimeError, "turbokv was built without its CUDA kernels");
  return nullptr;
#endif
}

// kernel_choice() -> dict: the kernels pinned by set_kernel_choice (kernel_choice.h): attention,
// smem_limit, decode_values, cpu_isa; "auto" / 0 where the ops choose.
static PyObject* kernel_choice(PyObject*, PyObject*) {
  return guarded([] {
    const turbokv::KernelChoice c = turbokv::kernel_choice();
    return Py_BuildValue("{s:s,s:i,s:i,s:s}", "attention", turbokv::attention_kernel_name(c.attention), "smem_limit",
                         c.smem_limit, "decode_values", c.decode_values, "cpu_isa", turbokv::cpu_isa_name(c.cpu_isa));
  });
}

// set_kernel_choice(attention, smem_limit, decode_values, cpu_isa): pin kernels for every later
// op call of this process (python: turbokv.ops.pinned_kernels).
static PyObject* set_kernel_choice(PyObject*, PyObject* args) {
  const char* attention = nullptr;
  const char* cpu_isa = nullptr;
  int smem_limit = 0, decode_values = 0;
  if (!PyArg_ParseTuple(args, "siis", &attention, &smem_limit, &decode_values, &cpu_isa)) return nullptr;
  return guarded([&] {
    turbokv::set_kernel_choice(attention, smem_limit, decode_values, cpu_isa, turbokv::cpu::avx2_available());
    Py_RETURN_NONE;
  });
}

static PyMethodDef turbokv_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The copy of the CPU attention kernel this process runs: avx2, baseline, native."},
    {"kernel_choice", kernel_choice, METH_NOARGS,
     "The kernels pinned for this process: attention, smem_limit, decode_values, cpu_isa (auto / 0: chosen)."},
    {"set_kernel_choice", set_kernel_choice, METH_VARARGS,
     "Pin kernels for every later op call: set_kernel_choice(attention, smem_limit, decode_values, cpu_isa)."},
    {"cuda_device_config", cuda_device_config, METH_O,
     "What the CUDA kernels chose for device `index`: capability, sms, smem_optin, smem_limit, kernel_arch, "
     "ptx_arch, pdl."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef turbokv_module = {PyModuleDef_HEAD_INIT,
                                     "_C",
                                     "turbokv native ops (see torch.ops.turbokv)",
                                     -1,
                                     turbokv_methods,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr};

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&turbokv_module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "WITH_CUDA", TURBOKV_WITH_CUDA);
  PyModule_AddStringConstant(m, "CUDA_ARCHS", TURBOKV_CUDA_ARCHS);
  return m;
}
