#!/usr/bin/env bash
# Compile every CUDA source for sm_90a with nvcc, so a CUDA compile error fails CI
# even on a machine with no GPU and a CPU-only torch. Torch-free kernels compile
# as they are; files that include torch headers get the CPU torch's include paths
# (they need no CUDA build of torch to compile).
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -z "$nvcc" ]; then
  echo "check_cuda_compile: no nvcc on this machine; skipped"
  exit 0
fi
shopt -s nullglob
srcs=(cpp/cuda/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then
  echo "check_cuda_compile: no CUDA sources yet"
  exit 0
fi
py=${PYTHON:-.venv/bin/python}
incs=$("$py" -c "import torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))")
out=$(mktemp -d)
# A CPU build of torch ships c10/cuda headers but not their CMake-generated config
# header; an empty stand-in is enough to compile (searched after torch's own paths).
mkdir -p "$out/shim/c10/cuda/impl"
echo '#pragma once' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
# One nvcc per core: the attention kernels are split into several files for this.
export nvcc incs out
printf '%s\n' "${srcs[@]}" | xargs -P "$(nproc)" -I{} bash -c '
  echo "check_cuda_compile: {}"
  "$nvcc" -std=c++20 -gencode=arch=compute_90a,code=sm_90a -Icpp -Icpp/include $incs -I"$out/shim" \
    -D_GLIBCXX_USE_CXX11_ABI=1 -DTURBOKV_COMPILE_CHECK=1 -Xcompiler=-Werror=frame-larger-than=16384 \
    --expt-relaxed-constexpr -c {} -o "$out/$(basename {}).o"'
echo "check_cuda_compile: ${#srcs[@]} file(s) compiled"
