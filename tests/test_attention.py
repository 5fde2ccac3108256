"""attention over packed caches: error budgets against an fp64 reference, and rotation correctness."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import device_params
from helpers import (
    SPEC_PACKED,
    attention_args,
    make_cache,
    poison_cuda_memory,
    reference_errors,
    sides,
    templated_built,
)

import turbokv
from turbokv.core import formats, reference
from turbokv.core.rotation import K_SEED, V_SEED, Rotation


def run_budget(device, gen, B, Hq, Hkv, T, d, Sq, kf, vf, lengths, starts=None, dtype=torch.float16, **kw):
    kr, vr = sides(kf, vf, d)
    kc, vc = make_cache(gen, B, Hkv, T, d, kf, vf, kr, vr, scale=2.0)
    q = torch.randn(B, Hq, Sq, d, generator=gen).to(dtype)
    lengths = torch.tensor(lengths)
    starts = None if starts is None else torch.tensor(starts)
    args = attention_args(q, kc, vc, lengths, starts, kf, vf, kr, vr, **kw)
    dev_args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    if device == "cuda":
        poison_cuda_memory()
    out = torch.ops.turbokv.attention(*dev_args)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == device
    err, ref_err = reference_errors(args, out)
    assert err <= 2 * ref_err + 1e-6, f"error {err:.3e} > 2 x reference error {ref_err:.3e}"
    return out


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("T", [1, 7, 137, 1000])
@pytest.mark.parametrize("gqa", [1, 3, 4, 8])
@pytest.mark.parametrize("kf,vf", [("turbo3", "turbo3"), ("q4_0", "q8_0")])
def test_decode_budget(device, T, gqa, kf, vf, gen):
    run_budget(device, gen, 2, 2 * gqa, 2, T, 128, 1, kf, vf, [T, max(1, T // 2)], dtype=torch.float16)


@pytest.mark.parametrize("device", [p for p in device_params() if p != "cpu"])
@pytest.mark.parametrize("T", [4097, 70001])
def test_long_decode_budget_cuda(device, T, gen):
    """Long caches on the GPU (split-K merges many splits); the CPU suite stops at 1000 tokens."""
    run_budget(device, gen, 2, 8, 2, T, 128, 1, "turbo3", "q4_0", [T, T // 3 + 1])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("kf,vf", [("f16", "f16"), ("turbo4", "turbo2"), ("q5_1", "q4_1"), ("bf16", "q5_0")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq", [1, 3])
def test_head_dims_budget(device, d, kf, vf, dtype, sq, gen):
    run_budget(device, gen, 2, 8, 2, 137, d, sq, kf, vf, [137, 60], dtype=dtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("Sq", [7, 137])
@pytest.mark.parametrize("gqa", [1, 4])
def test_prefill_causal_budget(device, Sq, gqa, gen):
    """Many queries with a causal offset (chunked prefill: Sq < length) and a full prefill (Sq == length)."""
    run_budget(device, gen, 2, 2 * gqa, 2, 200, 128, Sq, "turbo3", "q4_0", [200, Sq])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("window,softcap", [(16, 0.0), (0, 30.0), (50, 20.0)])
def test_window_softcap_left_padding_budget(device, window, softcap, gen):
    run_budget(
        device,
        gen,
        3,
        8,
        2,
        137,
        128,
        5,
        "turbo4",
        "turbo3",
        [137, 137, 90],
        [0, 40, 3],
        window=window,
        softcap=softcap,
    )


@pytest.mark.parametrize("device", device_params())
def test_non_causal_and_float32(device, gen):
    run_budget(device, gen, 2, 4, 4, 64, 64, 9, "q8_0", "turbo4", [64, 33], causal=False, dtype=torch.float32)


@pytest.mark.parametrize("device", device_params())
def test_fully_masked_rows_are_zero(device, gen):
    """A sequence whose valid range is empty (start == length) gives zeros, not NaN."""
    kr, vr = sides("turbo3", "turbo3", 128)
    kc, vc = make_cache(gen, 2, 1, 16, 128, "turbo3", "turbo3", kr, vr)
    q = torch.randn(2, 2, 1, 128, generator=gen)
    out = turbokv.attention(
        q.to(device),
        kc.to(device),
        vc.to(device),
        torch.tensor([16, 16]).to(device),
        torch.tensor([0, 16]).to(device),
        k_format="turbo3",
        v_format="turbo3",
        k_rot=kr,
        v_rot=vr,
    ).cpu()
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


# ---------------------------------------------------------------- rotation correctness


def sdpa_expected(q, k, v, lengths, causal=True):
    """Plain attention over un-rotated fp K/V, one sequence length per batch row (fp64)."""
    b, hq, sq, d = q.shape
    group = hq // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    mask = reference.attention_mask(lengths, None, sq, k.shape[2], causal, 0)
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(d)
    return torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("rotate", ["k", "v", "both"])
def test_f16_rotation_on_equals_off(device, rotate, gen):
    """With f16 storage, attention with rotation equals attention without: R and R^T are the right way round."""
    B, Hq, Hkv, T, d = 2, 8, 2, 77, 128
    k = torch.randn(B, Hkv, T, d, generator=gen)
    v = torch.randn(B, Hkv, T, d, generator=gen)
    q = torch.randn(B, Hq, 4, d, generator=gen)
    lengths = torch.tensor([77, 50])
    kr = Rotation(128, K_SEED) if rotate in ("k", "both") else Rotation()
    vr = Rotation(64, V_SEED) if rotate in ("v", "both") else Rotation()
    outs = []
    for kk, vv in ((kr, vr), (Rotation(), Rotation())):
        kc = turbokv.quantize(k.to(device), "f16", kk)
        vc = turbokv.quantize(v.to(device), "f16", vv)
        outs.append(
            turbokv.attention(
                q.to(device), kc, vc, lengths.to(device), k_format="f16", v_format="f16", k_rot=kk, v_rot=vv
            ).cpu()
        )
    rotated, plain = outs
    torch.testing.assert_close(rotated, plain, rtol=0, atol=2e-3)  # only f16 rounding of rotated K/V differs
    torch.testing.assert_close(plain.double(), sdpa_expected(q, k, v, lengths), rtol=0, atol=2e-3)
    # A swapped rotation (R where R^T belongs) must be caught: it is far off.
    if rotate != "k":
        wrong_v = Rotation(64, V_SEED + 1)
        vc = turbokv.quantize(v.to(device), "f16", vr)
        bad = turbokv.attention(
            q.to(device),
            turbokv.quantize(k.to(device), "f16", kr),
            vc,
            lengths.to(device),
            k_format="f16",
            v_format="f16",
            k_rot=kr,
            v_rot=wrong_v,
        ).cpu()
        assert (bad - plain).abs().max() > 0.05


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kf,vf", [("turbo3", "turbo3"), ("turbo4", "turbo2"), ("q4_0", "turbo3")])
@pytest.mark.parametrize("d", [96, 128])
def test_fused_equals_attention_over_unrotated_dequant(device, kf, vf, d, gen):
    """Pre-rotated-query attention on the packed cache == plain attention over dequantize(unrotate=True)."""
    kr, vr = sides(kf, vf, d)
    kc, vc = make_cache(gen, 2, 2, 65, d, kf, vf, kr, vr)
    q = torch.randn(2, 8, 3, d, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([65, 20])
    fused = turbokv.attention(
        q.float().to(device),
        kc.to(device),
        vc.to(device),
        lengths.to(device),
        k_format=kf,
        v_format=vf,
        k_rot=kr,
        v_rot=vr,
    ).cpu()
    k = turbokv.dequantize(kc, kf, d, kr, unrotate=True)
    v = turbokv.dequantize(vc, vf, d, vr, unrotate=True)
    torch.testing.assert_close(fused.double(), sdpa_expected(q, k, v, lengths), rtol=0, atol=2e-5)


def test_padding_is_invisible(gen):
    """d = 96 with turbo pads to 128: the output keeps 96 channels and matches the 96-dim math."""
    kr, vr = sides("turbo3", "turbo3", 96)
    assert formats.padded_dim("turbo3", 96) == 128
    kc, vc = make_cache(gen, 1, 1, 10, 96, "turbo3", "turbo3", kr, vr)
    q = torch.randn(1, 1, 1, 96, generator=gen)
    out = turbokv.attention(q, kc, vc, torch.tensor([10]), k_format="turbo3", v_format="turbo3", k_rot=kr, v_rot=vr)
    assert out.shape == (1, 1, 1, 96)


CUDA_ONLY = [p for p in device_params() if p != "cpu"]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize(
    "kf,vf", [("turbo3", "turbo3"), ("q4_0", "q8_0"), ("f16", "bf16"), ("q8_0", "q8_0"), ("turbo4", "q5_1")]
)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_kernels_agree_cuda(device, kf, vf, d, gen, pin_kernels):
    """The tensor-core decode kernel, the SIMT one and the tiled one give the same attention.

    ops.pinned_kernels pins each; auto takes the format-specialised kernel where one is
    built (templated_built), else the generic tensor-core kernel for f16/bf16/q8_0 rows
    and the SIMT one for the rest; pinning a kernel where it cannot run is a clear error.
    """
    kr, vr = sides(kf, vf, d)
    kc, vc = make_cache(gen, 3, 2, 300, d, kf, vf, kr, vr, scale=2.0)
    q = torch.randn(3, 8, 1, d, generator=gen).half()
    args = attention_args(q, kc, vc, torch.tensor([300, 17, 1]), torch.tensor([0, 5, 0]), kf, vf, kr, vr)
    dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    cheap = {"f16", "bf16", "q8_0"}
    expected = "templated" if templated_built(kf, vf) else "mma" if {kf, vf} <= cheap else "simt"
    outs = {}
    for kernel in {"mma", "simt", "tiled", "auto", expected}:
        pin_kernels(attention=kernel)
        poison_cuda_memory()
        outs[kernel] = torch.ops.turbokv.attention(*dev).double().cpu()
    err, ref_err = reference_errors(args, outs["mma"].half())
    assert err <= 2 * ref_err + 1e-6
    assert torch.equal(outs["auto"], outs[expected])
    for other in ("simt", "tiled"):
        torch.testing.assert_close(outs["mma"], outs[other], rtol=0, atol=4 * ref_err + 1e-6)
    pin_kernels(attention="simt")
    q3 = torch.randn(3, 8, 3, d, generator=gen).half().to(device)
    with pytest.raises(RuntimeError, match="pinned kernel simt cannot run this call: it is built for one query per"):
        torch.ops.turbokv.attention(q3, dev[1], dev[2], torch.tensor([300, 17, 3], device=device), *dev[4:])


SPEC_FORMATS = ("f16",) + SPEC_PACKED


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("fmt", SPEC_FORMATS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1), (3, 3)])
def test_templated_decode_kernel_cuda(device, fmt, d, hq, hkv, gen, pin_kernels):
    """The format-specialised tensor-core decode kernel (each format's own bit tricks and dim
    order) against the reference: odd lengths, left padding, GQA 4 / 8 / 1, bf16 and f16
    queries; it is what auto runs for these formats, and the tiled kernel agrees with it."""
    kr, vr = sides(fmt, fmt, d)
    lengths, starts = [4097, 137, 7, 1], [0, 3, 0, 0]
    kc, vc = make_cache(gen, 4, hkv, 4097, d, fmt, fmt, kr, vr, scale=2.0)
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(4, hq, 1, d, generator=gen).to(dtype)
        args = attention_args(q, kc, vc, torch.tensor(lengths), torch.tensor(starts), fmt, fmt, kr, vr)
        dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        outs = {}
        for kernel in ("templated", "auto", "tiled"):
            pin_kernels(attention=kernel)
            poison_cuda_memory()
            outs[kernel] = torch.ops.turbokv.attention(*dev).double().cpu()
        assert outs["templated"].isfinite().all()
        err, ref_err = reference_errors(args, outs["templated"].to(dtype))
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)
        assert torch.equal(outs["auto"], outs["templated"])
        torch.testing.assert_close(outs["templated"], outs["tiled"], rtol=0, atol=4 * ref_err + 1e-6)


MIXED_PAIRS = [(kf, vf) for kf in SPEC_PACKED for vf in SPEC_PACKED if kf != vf]
GQA_SHAPES = [(8, 2), (8, 1), (4, 4), (16, 1), (12, 3)]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("pair", range(len(MIXED_PAIRS)))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("sq", [1, 5])
def test_templated_kernel_mixed_pairs_cuda(device, pair, d, sq, gen, pin_kernels):
    """K and V in different formats (what calibrated policies and q8_0-K / turbo-V choose): the
    specialised kernel reads each side through its own decoder, for decode and several queries,
    GQA 1-8 and MQA, f16 and bf16 queries, odd lengths and left padding; auto takes it."""
    kf, vf = MIXED_PAIRS[pair]
    hq, hkv = GQA_SHAPES[(pair + d + sq) % len(GQA_SHAPES)]
    dtype = torch.bfloat16 if (pair + sq) % 2 else torch.float16
    kr, vr = sides(kf, vf, d)
    kc, vc = make_cache(gen, 3, hkv, 601, d, kf, vf, kr, vr, scale=2.0)
    q = torch.randn(3, hq, sq, d, generator=gen).to(dtype)
    args = attention_args(q, kc, vc, torch.tensor([601, 77, 9]), torch.tensor([0, 4, 0]), kf, vf, kr, vr)
    dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    outs = {}
    for kernel in ("templated", "auto"):
        pin_kernels(attention=kernel)
        poison_cuda_memory()
        outs[kernel] = torch.ops.turbokv.attention(*dev).cpu()
    assert outs["templated"].isfinite().all()
    err, ref_err = reference_errors(args, outs["templated"])
    assert err <= 2 * ref_err + 1e-6, f"{kf}/{vf}: error {err:.3e} > 2 x reference error {ref_err:.3e}"
    assert torch.equal(outs["auto"], outs["templated"])


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("fmt", ["f16", "q8_0"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("kgroup", [16, 32, 64])
def test_templated_decode_rotation_groups_cuda(device, fmt, d, kgroup, gen, pin_kernels):
    """The specialised kernel's query rotation takes each lane's sign bits out of one word
    per side (its E = d / 32 values are consecutive bits of a group): groups smaller than
    a 32-bit word of signs (16) and than a row, with K and V rotated by different groups."""
    kr, vr = Rotation(kgroup, K_SEED), Rotation(32, V_SEED)
    lengths = [301, 33]
    kc, vc = make_cache(gen, 2, 2, 301, d, fmt, fmt, kr, vr)
    q = torch.randn(2, 8, 1, d, generator=gen).to(torch.float16)
    args = attention_args(q, kc, vc, torch.tensor(lengths), torch.tensor([0, 0]), fmt, fmt, kr, vr)
    dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    pin_kernels(attention="templated")
    poison_cuda_memory()
    out = torch.ops.turbokv.attention(*dev).cpu()
    err, ref_err = reference_errors(args, out)
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("qscale", [1.0, 4.0])
def test_q4_0_blocks_of_very_different_scales_cuda(device, rotated, qscale, gen):
    """The q4_0 decode kernel scores a block at a time (raw nibbles through the tensor cores,
    each block's offset 1032 sum q subtracted and its scale applied in fp32) and folds V's
    block scales into the probabilities: blocks whose scales differ by up to 100x within a
    row, and larger queries, stay within the error budget. (Wider spreads or larger queries
    make the f16 reference's own error, and so the budget, too loose to tell much.)"""
    d, hkv, T = 128, 2, 777
    kr, vr = sides("q4_0", "q4_0", d) if rotated else (Rotation(), Rotation())
    blocks = 10.0 ** torch.randint(-1, 2, (1, hkv, T, d // 32, 1), generator=gen).double()
    k = (torch.randn(1, hkv, T, d // 32, 32, generator=gen, dtype=torch.float64) * blocks).reshape(1, hkv, T, d)
    v = (torch.randn(1, hkv, T, d // 32, 32, generator=gen, dtype=torch.float64) * blocks).reshape(1, hkv, T, d)
    kc = reference.quantize(k.float(), "q4_0", kr.group, kr.seed)
    vc = reference.quantize(v.float(), "q4_0", vr.group, vr.seed)
    q = (torch.randn(1, 8, 1, d, generator=gen) * qscale).half()
    args = attention_args(q, kc, vc, torch.tensor([T]), None, "q4_0", "q4_0", kr, vr)
    poison_cuda_memory()
    out = torch.ops.turbokv.attention(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
    assert out.isfinite().all()
    err, ref_err = reference_errors(args, out)
    assert err <= 2 * ref_err + 1e-6, f"error {err:.3e} > 2 x reference error {ref_err:.3e}"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", SPEC_FORMATS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bytes_outside_the_lengths_never_matter(device, fmt, d, gen):
    """NaN bytes in the cache rows before each sequence's start and past its length (the stale
    rows of a last chunk, which the kernels' 16-byte copies do read) leave the output exactly
    as it was: lengths that end inside a chunk, and a length of 1."""
    kr, vr = sides(fmt, fmt, d)
    lengths, starts = [200, 37, 1, 90], [0, 5, 0, 3]
    kc, vc = make_cache(gen, 4, 2, 200, d, fmt, fmt, kr, vr, scale=2.0)
    q = torch.randn(4, 8, 1, d, generator=gen).half()
    args = attention_args(q, kc, vc, torch.tensor(lengths), torch.tensor(starts), fmt, fmt, kr, vr)
    dev = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    clean = torch.ops.turbokv.attention(*dev)
    for cache in (dev[1], dev[2]):
        for b, (n, s) in enumerate(zip(lengths, starts, strict=True)):
            cache[b, :, n:] = 0xFF
            cache[b, :, :s] = 0xFF
    dirty = torch.ops.turbokv.attention(*dev)
    assert dirty.isfinite().all()
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_templated_kernel_refuses_what_it_is_not_built_for_cuda(device, gen, pin_kernels):
    """Pinning the specialised kernel on a call it has no variant for is a clear error."""
    pin_kernels(attention="templated")
    for kf, vf, d, match in (("f16", "q4_0", 128, "both in f16"), ("q5_1", "q5_1", 128, "each in q8_0, q5_0")):
        kr, vr = sides(kf, vf, d)
        kc, vc = make_cache(gen, 1, 2, 40, d, kf, vf, kr, vr)
        q = torch.randn(1, 8, 1, d, generator=gen).half()
        args = attention_args(q, kc, vc, torch.tensor([40]), None, kf, vf, kr, vr)
        dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.turbokv.attention(*dev)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("vf", ["q4_0", "turbo3"])
@pytest.mark.parametrize("sq", [1, 4])
def test_decode_step_replays_in_a_cuda_graph(device, vf, sq, gen):
    """cache_append + attention captured once in a CUDA graph, replayed on new tokens and lengths
    (no host sync inside), equal the eager ops: one token a step (decode) and four (a draft of
    speculative decoding, the multi-query tensor-core path). turbo3/turbo3 takes the specialised
    kernel with its fused merge (its split counters must be back at zero after every replay)."""
    d, kf, T = 128, "turbo3", 4096
    kr, vr = sides(kf, vf, d)
    rb = lambda f: formats.row_bytes(f, d)  # noqa: E731
    kc = torch.zeros(2, 2, T, rb(kf), dtype=torch.uint8, device=device)
    vc = torch.zeros(2, 2, T, rb(vf), dtype=torch.uint8, device=device)
    k0, v0 = torch.randn(2, 2, 20, d, generator=gen), torch.randn(2, 2, 20, d, generator=gen)
    pos0 = torch.arange(20).expand(2, 20).to(device)
    turbokv.cache_append(kc, vc, k0.half().to(device), v0.half().to(device), pos0, kf, vf, kr, vr)
    q, k, v = (torch.zeros(2, n, sq, d, dtype=torch.half, device=device) for n in (8, 2, 2))
    pos = torch.zeros(2, sq, dtype=torch.int64, device=device)
    lengths = torch.zeros(2, dtype=torch.int64, device=device)

    def step():
        turbokv.cache_append(kc, vc, k, v, pos, kf, vf, kr, vr)
        return turbokv.attention(q, kc, vc, lengths, k_format=kf, v_format=vf, k_rot=kr, v_rot=vr)

    def feed(t):
        for dst in (q, k, v):
            dst.copy_(torch.randn(dst.shape, generator=gen).half())
        pos.copy_(t + torch.arange(sq, device=device))
        lengths.fill_(t + sq)

    feed(20)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t in (21, 22, 40):
        feed(t)
        graph.replay()
        replayed = out.clone()
        kc_after, vc_after = kc.clone(), vc.clone()
        kc[:, :, t : t + sq].zero_()
        vc[:, :, t : t + sq].zero_()
        eager = step()
        assert torch.equal(kc, kc_after) and torch.equal(vc, vc_after)
        torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "sq,lengths,starts",
    [(300, [300, 300], None), (300, [300, 300], [0, 57]), (128, [320, 200], [0, 0]), (100, [250, 100], [30, 99])],
)
def test_prefill_via_sdpa_cuda(device, dtype, sq, lengths, starts, gen, pin_kernels):
    """A prefill of >= PREFILL_SDPA_MIN_QUERIES queries (a whole prompt, left padded, a chunk after
    a cached prefix) takes dequantize + SDPA; it stays inside the error budget and agrees with the
    op's tensor-core kernel, which pinning mma forces."""
    d, kf, vf = 128, "turbo3", "q4_0"
    kr, vr = sides(kf, vf, d)
    kc, vc = make_cache(gen, 2, 2, 320, d, kf, vf, kr, vr, scale=2.0)
    q = torch.randn(2, 8, sq, d, generator=gen).to(dtype)
    st = None if starts is None else torch.tensor(starts)
    args = attention_args(q, kc, vc, torch.tensor(lengths), st, kf, vf, kr, vr)
    dev = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kw = dict(k_format=kf, v_format=vf, k_rot=kr, v_rot=vr)
    assert turbokv.core.ops._prefill_spans(dev[0], dev[1], dev[3], dev[4], True, 0, 0.0) is not None
    poison_cuda_memory()
    fast = turbokv.attention(dev[0], dev[1], dev[2], dev[3], dev[4], **kw)
    err, ref_err = reference_errors(args, fast)
    assert err <= 2 * ref_err + 1e-6, f"error {err:.3e} > 2 x reference error {ref_err:.3e}"
    pin_kernels(attention="mma")
    assert turbokv.core.ops._prefill_spans(dev[0], dev[1], dev[3], dev[4], True, 0, 0.0) is None
    fused = turbokv.attention(dev[0], dev[1], dev[2], dev[3], dev[4], **kw)
    torch.testing.assert_close(fast.double(), fused.double(), rtol=0, atol=4 * ref_err + 1e-6)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_bad_lengths_are_an_error_cuda(device):
    """Lengths that do not fit the cache give an error naming them, raised by the CUDA op itself.

    In a child process, so that a crash fails this test instead of ending the suite: raising an
    error that formats an integer crashed builds that carried a static libstdc++ (CMakeLists.txt).
    """
    code = (
        "import torch, turbokv\n"
        "kc = torch.zeros(3, 2, 300, 256, dtype=torch.uint8, device='cuda')\n"
        "q = torch.randn(3, 8, 3, 128, device='cuda').half()\n"
        "try:\n"
        "    turbokv.attention(q, kc, kc, torch.tensor([300, 17, 1], device='cuda'), k_format='f16', v_format='f16')\n"
        "except (ValueError, RuntimeError) as e:\n"
        "    print('raised:', str(e).splitlines()[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"child exited with {out.returncode}: {out.stderr[-500:]}"
    assert "raised: lengths: got 1 for sequence 2, expected >= 3" in out.stdout, out.stdout
