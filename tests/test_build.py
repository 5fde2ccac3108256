"""What the build and the kernels chose for the machine they run on: the copy of the CPU attention
kernel (baseline or AVX2+FMA, picked at run time) and, on a GPU, the per-device launch choices
(programmatic dependent launch, shared memory per block)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

import turbokv

_C = turbokv.ops._C
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2_FLAGS = {"avx2", "fma", "f16c"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(m[1].split()) if m else set()


def test_cpu_kernel_copy_follows_the_cpu():
    isa = _C.cpu_isa()
    if isa == "native":
        pytest.skip("built with TURBOKV_NATIVE=ON: one kernel copy, tuned for the build machine")
    if os.environ.get("TURBOKV_CPU_ISA", "auto") != "auto":
        pytest.skip(f"TURBOKV_CPU_ISA={os.environ['TURBOKV_CPU_ISA']} pins the copy")
    if not X86:
        assert isa == "baseline"
    elif not cpu_flags():
        pytest.skip("no /proc/cpuinfo flags to compare with")
    else:
        assert isa == ("avx2" if AVX2_FLAGS <= cpu_flags() else "baseline")


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
import turbokv
gen = torch.Generator().manual_seed(0)
for kf, vf, d, sq in [("turbo3", "turbo3", 128, 1), ("q4_1", "q5_0", 96, 5), ("f16", "bf16", 64, 3),
                      ("turbo4", "q8_0", 256, 1)]:
    run_budget("cpu", gen, 2, 8, 2, 137, d, sq, kf, vf, [137, 60], softcap=20.0)
print(turbokv.ops._C.cpu_isa())
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_each_cpu_kernel_copy_meets_the_budget(isa):
    """Each copy, pinned with TURBOKV_CPU_ISA in a child process, against the fp64 reference."""
    if _C.cpu_isa() == "native":
        pytest.skip("built with TURBOKV_NATIVE=ON: one kernel copy, tuned for the build machine")
    if isa == "avx2" and not (X86 and AVX2_FLAGS <= cpu_flags()):
        pytest.skip("this CPU has no AVX2+FMA+F16C (or is not x86)")
    env = {**os.environ, "TURBOKV_CPU_ISA": isa}
    code = CHILD.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == isa


def test_unknown_cpu_isa_is_refused():
    env = {**os.environ, "TURBOKV_CPU_ISA": "avx9"}
    code = "import turbokv, turbokv.ops\ntry:\n    turbokv.ops._C.cpu_isa()\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TURBOKV_CPU_ISA: got 'avx9', expected auto, avx2 or baseline" in out.stdout
