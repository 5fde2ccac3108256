"""The ops are the native kernels, with schemas and fake kernels that torch.library.opcheck accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import cuda_ready
from helpers import sides

import turbokv
from turbokv.core import formats

OPS = ("hadamard", "quantize", "dequantize", "cache_append", "attention", "attention_lse")


@pytest.mark.parametrize("name", OPS)
def test_native_cpu_kernel_is_registered(name):
    """The suite compares native code with the reference, never the reference with itself."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"turbokv::{name}", "CPU")
    assert turbokv.native_loaded("cpu")
    # The op resolves to the C++ extension, not to a Python implementation.
    assert "turbokv/_C" in turbokv.core.ops._C.__file__.replace("\\", "/")


@pytest.mark.cuda
@pytest.mark.parametrize("name", OPS)
def test_native_cuda_kernel_is_registered(name):
    ok, why = cuda_ready()
    if not ok:
        pytest.skip(why)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"turbokv::{name}", "CUDA")
    x = torch.randn(4, 128, device="cuda")
    assert turbokv.quantize(x, "turbo3").device.type == "cuda"


def test_schemas_declared_once_with_mutation():
    schema = str(torch.ops.turbokv.cache_append.default._schema)
    assert "Tensor(a!) k_cache" in schema and "Tensor(b!) v_cache" in schema


def _samples(gen):
    d = 128
    kr, vr = sides("turbo3", "q4_0", d)
    x = torch.randn(2, 3, d, generator=gen)
    kc = torch.zeros(2, 2, 16, formats.row_bytes("turbo3", d), dtype=torch.uint8)
    vc = torch.zeros(2, 2, 16, formats.row_bytes("q4_0", d), dtype=torch.uint8)
    k = torch.randn(2, 2, 4, d, generator=gen)
    v = torch.randn(2, 2, 4, d, generator=gen)
    pos = torch.arange(4).repeat(2, 1)
    q = torch.randn(2, 8, 1, d, generator=gen, dtype=torch.float16)
    samples = {
        "hadamard": (x, 128, 7, False),
        "quantize": (x, "turbo3", 128, 11),
        "dequantize": (turbokv.quantize(x, "q4_0"), "q4_0", d, 64, None, True, torch.float16),
        "cache_append": (kc, vc, k, v, pos, "turbo3", kr.group, kr.seed, "q4_0", vr.group, vr.seed),
        "attention": (
            q,
            kc,
            vc,
            torch.tensor([4, 3]),
            torch.tensor([0, 1]),
            "turbo3",
            kr.group,
            kr.seed,
            "q4_0",
            vr.group,
            vr.seed,
            0.088,
            True,
            0,
            0.0,
        ),
    }
    samples["attention_lse"] = samples["attention"]
    return samples


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, gen):
    args = _samples(gen)[name]
    torch.library.opcheck(getattr(torch.ops.turbokv, name).default, args)


def test_compiles_under_torch_compile(gen):
    """Fake kernels let torch.compile trace a decode step without graph breaks."""
    args = _samples(gen)["attention"]

    def step(q, kc, vc, lengths):
        return torch.ops.turbokv.attention(q, kc, vc, lengths, *args[4:])

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args[:4]), step(*args[:4]), rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_extension_uses_the_processes_cpp_runtime():
    """The extension links the libstdc++ that torch loaded and carries no copy of its own: with a
    static copy (a toolchain that links libstdc++ statically), every error message that
    formatted an integer crashed the process (its num_put facet came from the other copy)."""
    so = turbokv.core.ops._C.__file__
    defined = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    assert "_ZNSt6locale7classicEv" not in defined, "the extension defines std::locale::classic(): a static libstdc++"
    child = (
        "import torch, turbokv\n"
        "try:\n    turbokv.quantize(torch.randn(2, 48), 'q4_0')\n"
        "except ValueError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "head_dim: got 48" in out.stdout, out.stderr[-400:]
