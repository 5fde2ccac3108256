"""The CUDA kernels' word-wide decoders (cpp/cuda/decode_span.cuh: the dequantize kernel, the SIMT
decode kernel and the flash kernel's tiles) compiled for the CPU and checked value for value against
codec.h's decode_element, so a machine without a GPU (CI) still catches a wrong bit trick. The
stand-ins for the CUDA headers are tests/cuda_host/common.cuh; the GPU tests run the same code as
compiled by nvcc (test_quantize, test_multi_query)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST = Path(__file__).resolve().parent / "cuda_host"


def compiler() -> str:
    """A C++20 compiler with _Float16 arithmetic (GCC >= 12 or Clang >= 15 on x86-64 / arm64)."""
    for name in ("g++", "clang++", "c++"):
        cxx = shutil.which(name)
        if cxx:
            return cxx
    pytest.skip("no C++ compiler on PATH (g++, clang++ or c++) to build the host copy of the CUDA decoders")


def test_cuda_decoders_match_codec_on_the_host(tmp_path):
    cxx = compiler()
    # decode_span.cuh includes "common.cuh" from its own folder: copy it beside the stand-ins.
    shutil.copy(ROOT / "cpp" / "cuda" / "decode_span.cuh", tmp_path)
    shutil.copy(HOST / "common.cuh", tmp_path)
    exe = tmp_path / "decoders"
    cmd = [cxx, "-std=c++20", "-O1", "-w", f"-I{tmp_path}", f"-I{ROOT / 'cpp' / 'include'}", str(HOST / "decoders.cpp")]
    build = subprocess.run([*cmd, "-o", str(exe)], capture_output=True, text=True)
    if build.returncode and "_Float16" in build.stderr:
        pytest.skip(f"{cxx} has no _Float16 arithmetic on this machine: {build.stderr.strip().splitlines()[0]}")
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    last = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-4000:]
    checked, mismatches = int(last.split()[1]), int(last.split()[3])
    assert mismatches == 0 and checked > 1_000_000, last
