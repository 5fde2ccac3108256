#!/usr/bin/env bash
# Compile every CUDA source (a cubin per architecture, so that each one's ptxas errors show), so a
# CUDA compile error fails CI even on a machine with no GPU and a CPU-only torch.
#   bash tools/check_cuda_compile.sh           as CI runs it: the kernels' two device-code paths
#                                              (__CUDA_ARCH__ below 900: no PDL; 900 and up), sm_80
#                                              and sm_90a; the generated kernel instances (templated/,
#                                              42 files of one template) for sm_90a, one per head
#                                              dim for sm_80 too
#   bash tools/check_cuda_compile.sh --wheel   every architecture of the wheel list, every file
#   TORCH_CUDA_ARCH_LIST="8.6;12.0" bash tools/check_cuda_compile.sh   those, every file
# The wheel list's six cubins and compute_80 PTX take three front-end passes per file (one per
# device-code path, tools/cuda_archs.py) and six ptxas runs: for the largest kernel files about
# 45 s of cicc per pass and 58 s of ptxas per cubin on one core (nvcc --time, attention_mma128.cu).
# Torch-free kernels compile as they are; files that include torch headers get the CPU torch's
# include paths (they need no CUDA build of torch to compile).
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -z "$nvcc" ]; then
  echo "check_cuda_compile: no nvcc on this machine; skipped"
  exit 0
fi
shopt -s nullglob
mapfile -t srcs < <(find cpp/cuda -name '*.cu' | LC_ALL=C sort)
if [ ${#srcs[@]} -eq 0 ]; then
  echo "check_cuda_compile: no CUDA sources yet"
  exit 0
fi
py=${PYTHON:-.venv/bin/python}
# The instances' sm_80 path differs from their sm_90a one only in the shared headers' PDL code,
# which every other file and one instance file per head dim compile for sm_80.
split_instances=0
if [ "${1:-}" = "--wheel" ]; then
  archs=$("$py" tools/cuda_archs.py --wheel)
elif [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  archs=$("$py" tools/cuda_archs.py)
else
  archs=$(TORCH_CUDA_ARCH_LIST="8.0;9.0a" "$py" tools/cuda_archs.py)
  split_instances=1
fi
gencode=$(sed -n 3p <<<"$archs")
gencode_instances=$gencode
[ "$split_instances" = 1 ] && gencode_instances=$(TORCH_CUDA_ARCH_LIST="9.0a" "$py" tools/cuda_archs.py | sed -n 3p)
echo "check_cuda_compile: $(sed -n 2p <<<"$archs") ($(sed -n 1p <<<"$archs"))"
incs=$("$py" -c "import torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A CPU build of torch ships c10/cuda headers but not their CMake-generated config
# header; an empty stand-in is enough to compile (searched after torch's own paths).
mkdir -p "$out/shim/c10/cuda/impl"
echo '#pragma once' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
# One nvcc per file and core (the attention kernels are split into several files for this),
# each for all architectures: the host code compiles once per file, the device code per
# architecture.
export nvcc incs out gencode gencode_instances
t0=$SECONDS
printf '%s\n' "${srcs[@]}" | xargs -P "$(nproc)" -I{} bash -c '
  s=$SECONDS
  g=$gencode
  case {} in cpp/cuda/templated/*) case {} in */templated*_q4_0.cu) ;; *) g=$gencode_instances ;; esac ;; esac
  "$nvcc" -std=c++20 $g -Icpp -Icpp/include $incs -I"$out/shim" \
    -D_GLIBCXX_USE_CXX11_ABI=1 -DTURBOKV_COMPILE_CHECK=1 -Xcompiler=-Werror=frame-larger-than=16384 \
    --expt-relaxed-constexpr -c {} -o "$out/$(echo {} | tr / _).o"
  echo "check_cuda_compile: {} ($((SECONDS - s)) s)"'
echo "check_cuda_compile: ${#srcs[@]} file(s) compiled in $((SECONDS - t0)) s"
