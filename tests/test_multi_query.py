"""Several queries per sequence (speculative decoding, chunked and padded prefill): the tensor-core
kernels against the reference and the tiled kernel, and the dequantize + SDPA prefill path
against the op."""

from __future__ import annotations

import pytest
import torch
from conftest import device_params
from helpers import attention_args, make_cache, pairwise, poison_cuda_memory, reference_errors, sides, templated_built

from turbokv.core import ops

CUDA_ONLY = [p for p in device_params() if p != "cpu"]

# (head dim, K format, V format, query dtype, masking): every head dim of the tensor-core
# kernels, specialised (same format both sides) and generic ones, each masking variant once.
CASES = [
    (64, "turbo3", "turbo3", torch.float16, {}),
    (96, "q5_1", "q4_1", torch.bfloat16, {"window": 40}),
    (128, "turbo4", "q8_0", torch.float16, {"softcap": 30.0}),
    (128, "q4_0", "q4_0", torch.bfloat16, {"window": 7, "softcap": 20.0}),
    (256, "f16", "f16", torch.float16, {"causal": False}),
    (128, "bf16", "turbo2", torch.bfloat16, {}),
]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize(*pairwise(sq=[2, 5, 16, 64], heads=[(4, 4), (8, 2), (8, 1), (16, 1)], case=range(len(CASES))))
def test_multi_query_kernels_cuda(device, sq, heads, case, gen, pin_kernels):
    """The tensor-core kernels with several queries: chunks of 8 (query, head) rows that the
    causal diagonal or the window edge cuts, GQA 1 / 4 / 8 / 16 (MQA), odd lengths, left padding
    that starts after some queries (their rows are zeros); auto takes them, and the tiled
    kernel agrees. Every pair of query count, GQA shape and case (head dim, formats, masks)."""
    hq, hkv = heads
    d, kf, vf, _, _ = CASES[case]
    args = _case_args(gen, case, sq, hq, hkv)
    dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    templated = templated_built(kf, vf) and d != 96
    flash = d != 96
    kernels = ["mma", "tiled", "auto"] + (["templated"] if templated else []) + (["flash"] if flash else [])
    outs = {}
    for kernel in kernels:
        pin_kernels(attention=kernel)
        poison_cuda_memory()
        outs[kernel] = torch.ops.turbokv.attention(*dev).cpu()
    _, ref_err = reference_errors(args, outs["tiled"])
    for kernel in kernels:
        assert outs[kernel].isfinite().all(), kernel
        err, _ = reference_errors(args, outs[kernel])
        assert err <= 2 * ref_err + 1e-6, f"{kernel}: error {err:.3e} > 2 x reference error {ref_err:.3e}"
    on_flash = flash and kf == vf == "f16" and (hq // hkv) * sq >= FLASH_MIN_ROWS
    assert torch.equal(outs["auto"], outs["flash" if on_flash else "templated" if templated else "mma"])
    tiled = outs["tiled"].double()
    for kernel in ["mma"] + (["flash"] if flash else []):
        torch.testing.assert_close(outs[kernel].double(), tiled, rtol=0, atol=4 * ref_err + 1e-6, msg=kernel)


def _case_args(gen, case: int, sq: int, hq: int, hkv: int) -> tuple:
    """The op's arguments for CASES[case]: 3 sequences over 300 slots (odd lengths, left padding
    that starts after some queries), sq queries of hq heads over hkv KV heads."""
    d, kf, vf, dtype, kw = CASES[case]
    kr, vr = sides(kf, vf, d)
    T = 300
    lengths, starts = [T, 77, sq + 3], [0, 10, min(sq + 1, 5)]
    kc, vc = make_cache(gen, 3, hkv, T, d, kf, vf, kr, vr, scale=2.0)
    q = torch.randn(3, hq, sq, d, generator=gen).to(dtype)
    return attention_args(q, kc, vc, torch.tensor(lengths), torch.tensor(starts), kf, vf, kr, vr, **kw)


def _many_tiles_args(gen, case: int) -> tuple:
    """The op's arguments for FLASH_CASES[case]: whole prompts or chunks after a prefix over many
    key tiles, 3 sequences (left padded), 8 query heads over 2 KV heads."""
    d, kf, vf, dtype, T, sq, kw = FLASH_CASES[case]
    kr, vr = sides(kf, vf, d)
    lengths, starts = [T, max(sq, T - 91), min(T, sq + 5)], [0, 37, 3]
    kc, vc = make_cache(gen, 3, 2, T, d, kf, vf, kr, vr, scale=2.0)
    q = torch.randn(3, 8, sq, d, generator=gen).to(dtype)
    return attention_args(q, kc, vc, torch.tensor(lengths), torch.tensor(starts), kf, vf, kr, vr, **kw)


# attention.cu's kFlashMinRows: from this many (query, head) rows per KV head, auto takes the
# flash kernel for several queries over f16 K and V.
FLASH_MIN_ROWS = 32
# The flash kernel over many key tiles and row chunks: every format on one side or the other,
# whole prompts (Sq = T) left padded, chunks after a prefix, windows, softcap.
FLASH_CASES = [
    (128, "q4_0", "q4_0", torch.float16, 700, 700, {}),
    (128, "turbo3", "turbo3", torch.bfloat16, 700, 130, {"window": 100}),
    (128, "turbo4", "turbo2", torch.float16, 517, 200, {"softcap": 25.0}),
    (64, "q5_0", "q5_1", torch.float16, 400, 400, {}),
    (64, "q4_1", "q8_0", torch.bfloat16, 333, 70, {"causal": False}),
    (256, "f16", "bf16", torch.float16, 300, 300, {}),
    (256, "q8_0", "turbo3", torch.bfloat16, 260, 33, {"window": 64, "softcap": 30.0}),
]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("case", range(len(FLASH_CASES)))
def test_flash_kernel_many_tiles_cuda(device, case, gen, pin_kernels):
    """The flash kernel (64 rows a block, each K/V tile decoded once into shared memory) against
    the reference and the tiled kernel: tiles of 32 / 64 keys cut by sequence ends, left padding
    and the causal diagonal, 2 KV heads of 4 query heads, several blocks of rows."""
    args = _many_tiles_args(gen, case)
    dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    outs = {}
    for kernel in ("flash", "tiled"):
        pin_kernels(attention=kernel)
        poison_cuda_memory()
        outs[kernel] = torch.ops.turbokv.attention(*dev).cpu()
    _, ref_err = reference_errors(args, outs["tiled"])
    err, _ = reference_errors(args, outs["flash"])
    assert outs["flash"].isfinite().all()
    assert err <= 2 * ref_err + 1e-6, f"flash: error {err:.3e} > 2 x reference error {ref_err:.3e}"
    torch.testing.assert_close(outs["flash"].double(), outs["tiled"].double(), rtol=0, atol=4 * ref_err + 1e-6)


@pytest.mark.parametrize("sq", [2, 5, 16, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_multi_query_cpu_kernel(sq, hq, hkv, case, gen):
    """The CPU kernel's register blocks (scores 4 rows x 2 keys, P V 4 rows x 2 vectors) with
    several queries: row counts (GQA 1 / 3 / 8 x Sq) that leave 1-3 rows over, odd tiles,
    the causal diagonal and the window edge inside a tile, left padding that starts after some
    queries (their rows are zeros), every head dim and masking variant of CASES."""
    args = _case_args(gen, case, sq, hq, hkv)
    out = torch.ops.turbokv.attention(*args)
    err, ref_err = reference_errors(args, out)
    assert out.isfinite().all()
    assert err <= 2 * ref_err + 1e-6, f"error {err:.3e} > 2 x reference error {ref_err:.3e}"


@pytest.mark.parametrize("case", range(len(FLASH_CASES)))
def test_multi_query_cpu_kernel_many_tiles(case, gen):
    """Whole prompts (left padded) and chunks after a prefix over many 32-key tiles and several
    tasks of 64 rows: the CPU kernel against the reference."""
    args = _many_tiles_args(gen, case)
    out = torch.ops.turbokv.attention(*args)
    err, ref_err = reference_errors(args, out)
    assert out.isfinite().all()
    assert err <= 2 * ref_err + 1e-6, f"error {err:.3e} > 2 x reference error {ref_err:.3e}"


# (Sq, lengths, starts, causal): a whole prompt, left padded, chunks after a cached prefix,
# a sequence with one valid key and one with none, and no causal mask.
SPANS = [
    (9, [9, 9], [0, 0], True),
    (9, [9, 9], [0, 4], True),
    (6, [30, 17], [0, 0], True),
    (6, [30, 17], [3, 16], True),
    (6, [30, 17], [0, 17], True),
    (6, [30, 17], [2, 5], False),
]


@pytest.mark.parametrize("per_sequence", [False, True], ids=["masked", "per-sequence"])
@pytest.mark.parametrize("sq,lengths,starts,causal", SPANS)
def test_dequantized_sdpa_equals_the_op(sq, lengths, starts, causal, per_sequence, gen, monkeypatch):
    """The prefill shortcut (dequantize + SDPA, taken on the GPU) gives the op's values on the
    CPU too: where spans differ, one masked call or a call per sequence; zeros for rows before
    a start; causal from the bottom right when the queries are fewer than the keys."""
    monkeypatch.setattr(ops, "PREFILL_PER_SEQUENCE_MIN_QUERIES", 1 if per_sequence else 1 << 30)
    d, kf, vf = 64, "turbo3", "q4_0"
    kr, vr = sides(kf, vf, d)
    kc, vc = make_cache(gen, 2, 2, 32, d, kf, vf, kr, vr)
    q = torch.randn(2, 4, sq, d, generator=gen)
    args = attention_args(q, kc, vc, torch.tensor(lengths), torch.tensor(starts), kf, vf, kr, vr, causal=causal)
    op = torch.ops.turbokv.attention(*args)
    spans = list(zip(starts, lengths, strict=True))
    got = ops._dequantized_sdpa(q, kc, vc, spans, ((kf, kr), (vf, vr)), d**-0.5, causal)
    torch.testing.assert_close(got, op, rtol=1e-5, atol=1e-5)
