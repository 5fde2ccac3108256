"""ggml block formats are byte-identical to the gguf package's own numpy quantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import turbokv

gguf = pytest.importorskip("gguf", reason="the gguf package is the outside oracle for ggml block formats")
QT = gguf.GGMLQuantizationType
BLOCK_FORMATS = {"q8_0": QT.Q8_0, "q5_1": QT.Q5_1, "q5_0": QT.Q5_0, "q4_1": QT.Q4_1, "q4_0": QT.Q4_0}


def adversarial_rows(gen: torch.Generator) -> torch.Tensor:
    """Rows (each one 32-block) that stress ggml's rounding and tie rules."""
    rows = [
        torch.zeros(32),  # all zeros: d = 0, id = 0
        torch.full((32,), 65504.0),  # fp16 max
        torch.full((32,), -65504.0),
        torch.linspace(-65504.0, 65504.0, 32),
        torch.randn(32, generator=gen) * 1e-6,  # tiny magnitudes (d becomes an fp16 subnormal)
        torch.randn(32, generator=gen) * 1e-9,  # d underflows to zero in fp16
        torch.arange(32, dtype=torch.float32) - 16,  # exact integers: ties in q4/q5
        (torch.arange(32, dtype=torch.float32) - 16) / 2,  # halves: exact .5 ties
        torch.full((32,), 0.5),
    ]
    outlier = torch.randn(32, generator=gen)
    outlier[7] = 1000.0  # one huge outlier
    rows.append(outlier)
    neg_outlier = torch.randn(32, generator=gen)
    neg_outlier[0] = -1000.0
    rows.append(neg_outlier)
    tie = torch.randn(32, generator=gen)
    tie[3], tie[9] = 5.0, -5.0  # equal magnitudes: argmax must take the first
    rows.append(tie)
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_rows_byte_identical(name, dtype, gen):
    x = (torch.randn(257, 128, generator=gen) * torch.rand(257, 1, generator=gen) * 10).to(dtype)
    mine = turbokv.quantize(x, name).numpy()
    theirs = gguf.quants.quantize(x.float().numpy(), BLOCK_FORMATS[name])
    np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(
        turbokv.dequantize(torch.from_numpy(mine), name, 128).numpy(),
        gguf.quants.dequantize(theirs, BLOCK_FORMATS[name]),
    )


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_adversarial_rows_byte_identical(name, gen):
    x = adversarial_rows(gen)
    mine = turbokv.quantize(x, name).numpy()
    with np.errstate(all="ignore"):
        theirs = gguf.quants.quantize(x.numpy(), BLOCK_FORMATS[name])
        expected = gguf.quants.dequantize(theirs, BLOCK_FORMATS[name])
    np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(turbokv.dequantize(torch.from_numpy(mine), name, 32).numpy(), expected)


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_reference_matches_gguf(name, gen):
    """The pure-PyTorch reference is held to the same oracle."""
    x = torch.cat([adversarial_rows(gen), torch.randn(64, 32, generator=gen)])
    with np.errstate(all="ignore"):
        theirs = gguf.quants.quantize(x.numpy(), BLOCK_FORMATS[name])
    np.testing.assert_array_equal(turbokv.core.reference.quantize(x, name).numpy(), theirs)
