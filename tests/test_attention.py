"""attention over packed caches: error budgets against an fp64 reference, and rotation correctness."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import device_params
from helpers import attention_args, reference_errors, sides

import turbokv
from turbokv import formats, reference
from turbokv.rotation import K_SEED, V_SEED, Rotation


def make_cache(gen, B, Hkv, T, d, kf, vf, kr, vr, scale=1.0):
    k = torch.randn(B, Hkv, T, d, generator=gen) * scale
    v = torch.randn(B, Hkv, T, d, generator=gen)
    return reference.quantize(k, kf, kr.group, kr.seed), reference.quantize(v, vf, vr.group, vr.seed)


def poison_cuda_memory():
    """Fill freed memory of the caching allocator with NaN bytes, so unwritten outputs cannot pass."""
    junk = torch.full((64 << 20,), 0xFF, dtype=torch.uint8, device="cuda")
    del junk


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
