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
import torch
from conftest import cuda_ready
from test_attention import run_budget

import turbokv

ops = turbokv.core.ops
_C = ops._C
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2_FLAGS = {"avx2", "fma", "f16c"}
# Dynamic shared memory per block of smaller GPUs than the H100 / H200 (227 KiB).
SMEM_SM86 = 99 * 1024  # sm_86, sm_89, sm_120
SMEM_SM80 = 163 * 1024


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
    if not X86:
        assert isa == "baseline"
    elif not cpu_flags():
        pytest.skip("no /proc/cpuinfo flags to compare with")
    else:
        assert isa == ("avx2" if AVX2_FLAGS <= cpu_flags() else "baseline")


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_each_cpu_kernel_copy_meets_the_budget(isa, pin_kernels, gen):
    """Each copy, pinned with ops.pinned_kernels, against the fp64 reference."""
    if _C.cpu_isa() == "native":
        pytest.skip("built with TURBOKV_NATIVE=ON: one kernel copy, tuned for the build machine")
    if isa == "avx2" and not (X86 and AVX2_FLAGS <= cpu_flags()):
        pytest.skip("this CPU has no AVX2+FMA+F16C (or is not x86)")
    pin_kernels(cpu_isa=isa)
    assert _C.cpu_isa() == isa
    for kf, vf, d, sq in [("turbo3", "turbo3", 128, 1), ("q4_1", "q5_0", 96, 5), ("f16", "bf16", 64, 3)]:
        run_budget("cpu", gen, 2, 8, 2, 137, d, sq, kf, vf, [137, 60], softcap=20.0)


def test_pinned_kernels_are_checked_and_restored():
    """Each field is checked by name before anything changes; the block's end restores the choice."""
    before = ops.kernel_choice()
    assert before == {"attention": "auto", "smem_limit": 0, "decode_values": 0, "cpu_isa": "auto"}
    with ops.pinned_kernels(attention="tiled", smem_limit=4096):
        assert ops.kernel_choice() == {**before, "attention": "tiled", "smem_limit": 4096}
        with ops.pinned_kernels(cpu_isa="baseline"):
            assert ops.kernel_choice()["attention"] == "tiled" and _C.cpu_isa() == "baseline"
        assert ops.kernel_choice()["cpu_isa"] == "auto"
    assert ops.kernel_choice() == before
    bad = [
        (dict(attention="fastest"), "attention: got 'fastest', expected auto, flash, templated, mma, simt or tiled"),
        (dict(cpu_isa="avx9"), "cpu_isa: got 'avx9', expected auto, avx2 or baseline"),
        (dict(smem_limit=-1), "smem_limit: got -1, expected bytes"),
        (dict(smem_limit="lots"), "smem_limit: got 'lots', expected an int"),
        (dict(decode_values=5), "decode_values: got 5, expected 4, 8 or 16"),
    ]
    if _C.cpu_isa() != "avx2":  # this build or CPU has no AVX2 copy: pinning it is refused
        bad.append((dict(cpu_isa="avx2"), "cpu_isa: got 'avx2', but this build or this CPU has no AVX2"))
    for fields, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            with ops.pinned_kernels(**{"decode_values": 8, **fields}):
                pass
        assert ops.kernel_choice() == before


def cuda_archs(*args: str, arch_list: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, str(root / "tools" / "cuda_archs.py"), *args], env=env, capture_output=True, text=True
    )


def test_cuda_architectures_share_one_front_end_pass_per_code_path():
    """The wheel list's six cubins come from three PTX: the kernels' device code has two paths
    (__CUDA_ARCH__ below / from 900), and sm_90a its own; what nvcc is told to build is what the
    list names."""
    wheel = cuda_archs("--wheel").stdout.splitlines()
    assert wheel[1] == "sm_80 sm_86 sm_89 sm_90a sm_100 sm_120 compute_80"
    assert wheel[2].split() == [
        "-gencode=arch=compute_80,code=[sm_80,sm_86,sm_89,compute_80]",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=[sm_100,sm_120]",
    ]
    own = cuda_archs(arch_list="8.9;12.0+PTX").stdout.splitlines()
    assert own[2].split() == [
        "-gencode=arch=compute_80,code=sm_89",
        "-gencode=arch=compute_90,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120",
    ]
    old = cuda_archs(arch_list="7.5")
    assert old.returncode == 1 and "got '7.5', the kernels need compute capability 8.0 or newer" in old.stderr


def need_cuda():
    ok, why = cuda_ready()
    if not ok:
        pytest.skip(why)


@pytest.mark.cuda
def test_cuda_launch_choices_follow_the_device():
    """PDL only where both the device and the kernel image are sm_90+; the image is one of the build's."""
    need_cuda()
    dev = torch.cuda.current_device()
    c = _C.cuda_device_config(dev)
    major, minor = torch.cuda.get_device_capability(dev)
    assert c["capability"] == (major, minor)
    assert c["sms"] == torch.cuda.get_device_properties(dev).multi_processor_count
    assert c["pdl"] == (major >= 9 and c["ptx_arch"] >= 90)
    built = _C.CUDA_ARCHS.split()
    cubin = any(re.fullmatch(rf"sm_{c['kernel_arch']}[af]?", a) for a in built)
    jit = any(re.fullmatch(rf"compute_{c['ptx_arch']}[af]?", a) for a in built)
    assert cubin or jit, f"image sm_{c['kernel_arch']} / compute_{c['ptx_arch']} is not in {built}"
    # This device's own sm_90+ cubin compiled from its own virtual architecture (every build of the wheel list,
    # and of the GPUs present) has the griddepcontrol; one compiled from compute_80 (code=sm_90) has not.
    if cubin and c["kernel_arch"] >= 90 and c["ptx_arch"] == c["kernel_arch"]:
        assert c["pdl"]
    optin = getattr(torch.cuda.get_device_properties(dev), "shared_memory_per_block_optin", None)
    if optin is not None:
        assert c["smem_optin"] == optin
    print(f"cuda_device_config({dev}) = {c}, built {built}")


@pytest.mark.cuda
@pytest.mark.parametrize("limit", [SMEM_SM86, SMEM_SM80])
@pytest.mark.parametrize(
    "fmt,d,T",
    [("f16", 128, 1000), ("f16", 128, 9000), ("f16", 256, 300), ("q8_0", 256, 300), ("turbo3", 128, 300)],
)
@pytest.mark.parametrize("sq", [1, 4])
def test_attention_within_a_smaller_gpus_shared_memory(pin_kernels, limit, fmt, d, T, sq, gen):
    """With the shared memory of an sm_86 / sm_80 GPU, attention takes kernels that fit, and meets the budget."""
    need_cuda()
    pin_kernels(smem_limit=limit)
    c = _C.cuda_device_config(torch.cuda.current_device())
    assert c["smem_limit"] == min(limit, c["smem_optin"])
    run_budget("cuda", gen, 2, 8, 2, T, d, sq, fmt, fmt, [T, T // 2])


@pytest.mark.cuda
def test_tiled_kernel_takes_fewer_queries_per_block_to_fit(pin_kernels, gen):
    """f32 queries of head dim 256 (the tiled kernel): its 4 queries x 4 heads per block take 98 KiB;
    with 90 KiB it takes 2 queries per block (81 KiB)."""
    need_cuda()
    pin_kernels(smem_limit=90 * 1024)
    run_budget("cuda", gen, 2, 8, 2, 300, 256, 8, "q4_0", "turbo3", [300, 100], dtype=torch.float32)


@pytest.mark.cuda
def test_kernels_that_do_not_fit_are_refused_by_name(gen, pin_kernels):
    need_cuda()
    pin_kernels(smem_limit=SMEM_SM86)
    # f16 rows of 128: the 3-stage specialised shape (102 KiB) gives way to the 2-stage one.
    pin_kernels(attention="templated")
    run_budget("cuda", gen, 1, 8, 2, 1000, 128, 1, "f16", "f16", [1000])
    # f16 rows of 256 fit neither tensor-core kernel in 99 KiB.
    for kernel in ("templated", "mma"):
        pin_kernels(attention=kernel)
        with pytest.raises(RuntimeError, match=f"pinned kernel {kernel}.*shared memory.*{SMEM_SM86} bytes"):
            run_budget("cuda", gen, 1, 8, 2, 300, 256, 1, "f16", "f16", [300])
    # The tiled kernel with one query per block still needs 73 KiB at head dim 256.
    pin_kernels(attention="tiled")
    pin_kernels(smem_limit=32 * 1024)
    with pytest.raises(RuntimeError, match=r"more than this GPU allows \(32768 bytes\)"):
        run_budget("cuda", gen, 1, 8, 2, 300, 256, 1, "q4_0", "q4_0", [300], dtype=torch.float32)
