"""quantize / dequantize / cache_append: native kernels against reference.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import device_params
from helpers import assert_packed_match

import turbokv
from turbokv.core import formats, reference
from turbokv.core.rotation import K_SEED, Rotation, auto_rotation

ALL = list(formats.FORMATS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rot_for(fmt: str, d: int, mode: str) -> Rotation:
    if mode == "off":
        return Rotation()
    if mode == "plain":  # unseeded Hadamard over the largest allowed block
        dp = formats.padded_dim(fmt, d)
        return Rotation(max(g for g in (16, 32, 64, 128) if dp % g == 0), None)
    return auto_rotation(fmt, d, "k") if formats.get(fmt).quantized else Rotation(32, K_SEED)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("mode", ["off", "plain", "seeded"])
def test_packed_bytes_match_reference(device, fmt, d, mode, gen):
    x = torch.randn(3, 5, 37, d, generator=gen) * (1 + 4 * torch.rand(3, 5, 37, 1, generator=gen))
    rot = rot_for(fmt, d, mode)
    got = turbokv.quantize(x.to(device), fmt, rot)
    expected = reference.quantize(x, fmt, rot.group, rot.seed)
    assert got.shape == (3, 5, 37, formats.row_bytes(fmt, d))
    assert_packed_match(fmt, got, expected, d, exact=device == "cpu")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("d", [32, 512, 1024])
def test_row_lengths_of_each_encoder(device, fmt, d, gen):
    """CUDA encodes rows of 32..512 stored values one per warp, longer ones one per block: both exact."""
    x = torch.randn(2, 3, 11, d, generator=gen) * (1 + 4 * torch.rand(2, 3, 11, 1, generator=gen))
    rot = rot_for(fmt, d, "seeded")
    got = turbokv.quantize(x.to(device), fmt, rot)
    assert_packed_match(fmt, got, reference.quantize(x, fmt, rot.group, rot.seed), d, exact=device == "cpu")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q5_1", "q4_0", "turbo3"])
def test_many_rows_match_the_cpu_op(device, fmt, gen):
    """More rows than one wave of warps (the CUDA encoder loops over rows), against the exact CPU op."""
    x = torch.randn(3, 8, 1000, 128, generator=gen, dtype=torch.float16)
    rot = auto_rotation(fmt, 128, "k")
    assert_packed_match(
        fmt, turbokv.quantize(x.to(device), fmt, rot), turbokv.quantize(x, fmt, rot), 128, exact=device == "cpu"
    )


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_dtypes(device, fmt, dtype, gen):
    x = torch.randn(64, 128, generator=gen).to(dtype)
    rot = auto_rotation(fmt, 128, "v")
    assert_packed_match(
        fmt,
        turbokv.quantize(x.to(device), fmt, rot),
        reference.quantize(x, fmt, rot.group, rot.seed),
        128,
        exact=device == "cpu",
    )


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("unrotate", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [0, 64, 128, 256])
def test_dequantize_matches_reference(device, fmt, unrotate, dtype, d, gen):
    """Rows whose stored width is not a power of two (d = 0: 96, or 80 for float formats; the CUDA
    op's block-per-row kernel) and rows of 64 / 128 / 256 (its warp kernel: 1001 rows, not a
    whole number of warps' worth)."""
    n = 1001 if d else 50
    d = d or (96 if formats.get(fmt).family != "float" else 80)
    x = torch.randn(n, d, generator=gen)
    rot = auto_rotation(fmt, d, "k") if fmt not in ("f16", "bf16") else Rotation(16, K_SEED)
    packed = reference.quantize(x, fmt, rot.group, rot.seed)
    got = turbokv.dequantize(packed.to(device), fmt, d, rot, unrotate, dtype).cpu()
    expected = reference.dequantize(packed, fmt, d, rot.group, rot.seed, unrotate, torch.float32)
    assert got.dtype == dtype
    assert got.shape[-1] == (d if unrotate else formats.padded_dim(fmt, d))
    # Within rounding of the output dtype (exact for float32 on the CPU).
    tol = {torch.float32: 0.0 if device == "cpu" else 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("fmt", ["turbo2", "turbo3", "turbo4"])
def test_turbo_zero_group_decodes_to_zero(fmt):
    x = torch.zeros(4, 128)
    x[1, :] = 1.0  # a non-zero row next to zero rows
    y = turbokv.dequantize(turbokv.quantize(x, fmt, Rotation(128, K_SEED)), fmt, 128, Rotation(128, K_SEED))
    assert torch.equal(y[0], torch.zeros(128)) and torch.equal(y[2:], torch.zeros(2, 128))
    assert y[1].norm().item() == pytest.approx(x[1].norm().item(), rel=1e-3)  # norm correction keeps the norm


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", ["turbo2", "turbo3", "turbo4"])
@pytest.mark.parametrize("g", [64, 128])
def test_turbo_values_on_a_midpoint(device, fmt, g):
    """A normalised value equal to a midpoint: index #{mids < u} on either side of zero, exactly.

    Rows of norm 1 (so u = x) holding +-midpoint and the value that completes the norm; the
    CUDA encoder counts magnitudes against the positive midpoints, strictly for u > 0 and
    not for u < 0, which only such ties tell apart (they occur from fp16 inputs).
    """
    mids = torch.tensor(formats.MIDPOINTS[(g, formats.get(fmt).bits)], dtype=torch.float32)
    rows = []
    for m in mids[mids != 0]:
        row = torch.zeros(g)
        row[0], row[1] = m, math.sqrt(1.0 - m.item() ** 2)
        rows.append(row)
    x = torch.stack(rows)
    assert torch.equal(x.double().norm(dim=1).float(), torch.ones(len(rows)))  # so u = x exactly
    got = turbokv.quantize(x.to(device), fmt, Rotation()).cpu()
    expected = reference.quantize(x, fmt, 0, None)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_group_never_decodes_to_finite(device, fmt, bad, gen):
    """The op (no host sync) marks a poisoned group so it decodes to NaN/Inf, not to finite garbage."""
    x = torch.randn(3, 256, generator=gen)
    x[1, 17] = bad
    rot = auto_rotation(fmt, 256, "k")
    packed = turbokv.quantize(x.to(device), fmt, rot, check_finite=False).cpu()
    expected = reference.quantize(x, fmt, rot.group, rot.seed)
    y = turbokv.dequantize(packed, fmt, 256, rot, unrotate=False)
    if formats.get(fmt).quantized:
        assert torch.equal(packed, expected)
    else:  # NaN payload bits may differ (torch writes 0xffff for a bf16 NaN); the values may not
        y_ref = reference.dequantize(expected, fmt, 256, unrotate=False)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(y[1]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


def test_quantize_rejects_nonfinite_input(gen):
    x = torch.randn(2, 128, generator=gen)
    x[0, 3] = float("nan")
    with pytest.raises(ValueError, match="x: got 1 non-finite"):
        turbokv.quantize(x, "turbo3", Rotation(128, K_SEED))


def test_turbo_bits_per_value_and_error(gen):
    """Rotated turbo formats on outlier-heavy rows: error falls with bits, and rotation helps q4_0."""
    x = torch.randn(512, 128, generator=gen)
    x[:, 3] *= 20  # an outlier channel, as in real keys
    errs = {}
    for fmt in ("turbo2", "turbo3", "turbo4", "q4_0"):
        for rot in (Rotation(), auto_rotation(fmt, 128, "k")):
            y = turbokv.dequantize(turbokv.quantize(x, fmt, rot), fmt, 128, rot)
            errs[(fmt, rot.enabled)] = ((y - x).norm() / x.norm()).item()
    assert errs[("turbo4", True)] < errs[("turbo3", True)] < errs[("turbo2", True)]
    assert errs[("q4_0", True)] < 0.7 * errs[("q4_0", False)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kf,vf", [("turbo3", "turbo3"), ("q8_0", "turbo4"), ("q4_0", "q4_1"), ("f16", "bf16")])
@pytest.mark.parametrize("d", [64, 96, 128])
def test_cache_append_matches_reference(device, kf, vf, d, gen):
    B, H, T, S = 3, 2, 41, 5
    kr, vr = auto_rotation(kf, d, "k"), auto_rotation(vf, d, "v")
    k_init = torch.randint(0, 256, (B, H, T, formats.row_bytes(kf, d)), generator=gen, dtype=torch.uint8)
    v_init = torch.randint(0, 256, (B, H, T, formats.row_bytes(vf, d)), generator=gen, dtype=torch.uint8)
    k = torch.randn(B, H, S, d, generator=gen, dtype=torch.float16)
    v = torch.randn(B, H, S, d, generator=gen, dtype=torch.float16)
    positions = torch.stack([torch.randperm(T, generator=gen)[:S] for _ in range(B)])
    kc, vc = k_init.clone().to(device), v_init.clone().to(device)
    turbokv.cache_append(kc, vc, k.to(device), v.to(device), positions.to(device), kf, vf, kr, vr)
    kr_ref, vr_ref = k_init.clone(), v_init.clone()
    reference.cache_append(kr_ref, vr_ref, k, v, positions, kf, kr.group, kr.seed, vf, vr.group, vr.seed)
    assert_packed_match(kf, kc, kr_ref, d, exact=device == "cpu")
    assert_packed_match(vf, vc, vr_ref, d, exact=device == "cpu")
