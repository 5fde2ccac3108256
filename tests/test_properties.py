"""Property-based differential tests: the native ops against reference.py on drawn cases.

Hypothesis draws shapes (batch, KV heads, GQA ratio, head dim, capacity), per-sequence
lengths and left padding, decode and chunked-prefill query counts, windows, softcaps,
dtypes, a K and a V format each from every format, each side's rotation, and a data seed;
every tensor comes from a ``torch.Generator`` seeded by that drawn integer (no global RNG).
The runs are derandomized (the same examples on every run, as CI needs); a failure prints
its smallest example and a ``@reproduce_failure`` blob. Inputs are always finite.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import device_params
from helpers import assert_packed_match
from hypothesis import given, note, settings
from hypothesis import strategies as st

import turbokv  # noqa: F401  (loads the native ops)
from turbokv.core import formats, reference
from turbokv.core.formats import ROTATION_GROUPS
from turbokv.core.rotation import MAX_SEED, Rotation, auto_rotation

ALL_FORMATS = tuple(formats.FORMATS)
HEAD_DIMS = (32, 64, 96, 128)  # multiples of 32: every format takes them (turbo pads 32 -> 64, 96 -> 128)
EXTRA_DIMS = (16, 48, 80, 200)  # rows that only the float and turbo formats take
GQA = (1, 2, 3, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOFTCAPS = (0.0, 5.0, 30.0)


def checked(max_examples: int):
    """Derandomized settings, no example database (nothing written into the checkout), no deadline."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, print_blob=True, database=None)


# ---------------------------------------------------------------- strategies


@st.composite
def rotations(draw, fmt: str, d: int, side: str) -> Rotation:
    """Turbo formats: their auto rotation. Others: auto, none, or any group dividing the stored row, seeded or not."""
    f = formats.get(fmt)
    if f.family == "turbo":
        return auto_rotation(fmt, d, side)
    groups = [g for g in ROTATION_GROUPS if formats.padded_dim(f, d) % g == 0]
    modes = ["auto", "off", "custom"] if groups else ["auto", "off"]
    mode = draw(st.sampled_from(modes))
    if mode == "auto":
        return auto_rotation(fmt, d, side)
    if mode == "off":
        return Rotation()
    return Rotation(draw(st.sampled_from(groups)), draw(st.none() | st.integers(0, MAX_SEED)))


seeds = st.integers(0, 2**31 - 1)
index_dtypes = st.sampled_from([torch.int64, torch.int32])


@st.composite
def attention_cases(draw) -> dict:
    """One attention call: shapes, lengths, left padding, queries, mask options, formats, rotations."""
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from(GQA))
    d = draw(st.sampled_from(HEAD_DIMS))
    kf, vf = draw(st.sampled_from(ALL_FORMATS)), draw(st.sampled_from(ALL_FORMATS))
    T = draw(st.integers(1, 80))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    Sq = draw(st.integers(1, min(lengths)))
    starts = [draw(st.integers(0, n)) for n in lengths]
    return dict(
        B=B,
        Hkv=Hkv,
        Hq=G * Hkv,
        d=d,
        T=T,
        Sq=Sq,
        lengths=lengths,
        starts=starts,
        pass_starts=any(starts) or draw(st.booleans()),  # starts=None when all zero, sometimes
        causal=draw(st.sampled_from([True, True, True, False])),  # Sq <= every length either way
        window=draw(st.just(0) | st.integers(1, T)),
        softcap=draw(st.sampled_from(SOFTCAPS)),
        dtype=draw(st.sampled_from(DTYPES)),
        kf=kf,
        vf=vf,
        kr=draw(rotations(kf, d, "k")),
        vr=draw(rotations(vf, d, "v")),
        k_scale=draw(st.sampled_from([0.5, 1.0, 2.0])),
        q_transposed=draw(st.booleans()),  # q as a (B, Sq, Hq, d) buffer viewed (B, Hq, Sq, d)
        index_dtype=draw(index_dtypes),
        seed=draw(seeds),
    )


@st.composite
def append_cases(draw) -> dict:
    """One cache_append call: caches of random bytes, S new tokens at distinct drawn slots per sequence."""
    d = draw(st.sampled_from(HEAD_DIMS))
    kf, vf = draw(st.sampled_from(ALL_FORMATS)), draw(st.sampled_from(ALL_FORMATS))
    T = draw(st.integers(1, 80))
    return dict(
        B=draw(st.integers(1, 3)),
        H=draw(st.integers(1, 3)),
        T=T,
        S=draw(st.integers(1, T)),
        d=d,
        kf=kf,
        vf=vf,
        kr=draw(rotations(kf, d, "k")),
        vr=draw(rotations(vf, d, "v")),
        dtype=draw(st.sampled_from(DTYPES)),
        transposed=draw(st.booleans()),  # k, v as (B, S, H, d) buffers viewed (B, H, S, d)
        index_dtype=draw(index_dtypes),
        seed=draw(seeds),
    )


@st.composite
def quantize_cases(draw) -> dict:
    """Rows of any leading shape, a format, a head dim it takes, a rotation, an input dtype, special rows."""
    fmt = draw(st.sampled_from(ALL_FORMATS))
    dims = HEAD_DIMS if formats.get(fmt).family == "block" else HEAD_DIMS + EXTRA_DIMS
    d = draw(st.sampled_from(dims))
    return dict(
        fmt=fmt,
        d=d,
        lead=draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)),
        rot=draw(rotations(fmt, d, draw(st.sampled_from(["k", "v"])))),
        dtype=draw(st.sampled_from(DTYPES)),
        special=draw(st.sampled_from(["none", "zero", "constant", "spike"])),
        unrotate=draw(st.booleans()),
        out_dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(seeds),
    )


# ---------------------------------------------------------------- helpers


def poison_cuda_memory(device: str) -> None:
    """Fill freed memory of the caching allocator with NaN bytes, so unwritten outputs cannot pass."""
    if device == "cuda":
        junk = torch.full((64 << 20,), 0xFF, dtype=torch.uint8, device="cuda")
        del junk


def random_bytes(shape, gen) -> torch.Tensor:
    return torch.randint(0, 256, tuple(shape), generator=gen, dtype=torch.uint8)


def rows_like(shape, gen, scale=1.0) -> torch.Tensor:
    """Finite fp32 rows whose magnitudes differ from row to row (1x..5x)."""
    return torch.randn(*shape, generator=gen) * (1 + 4 * torch.rand(*shape[:-1], 1, generator=gen)) * scale


def to_device(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def clear_negative_zero_min(fmt: str, packed: torch.Tensor) -> torch.Tensor:
    """q4_1 / q5_1: a block minimum stored as -0.0 (f16 0x8000) rewritten as +0.0; other bytes as they are.

    Works around the one known divergence (see test_zero_min_sign_of_mixed_zero_blocks, strict
    xfail): for a block whose minimum is zero and holds both +0.0 and -0.0 the native encoder
    keeps the sign of its first zero while the reference and gguf (numpy's vectorised min)
    may pick the other. Remove this when that test passes.
    """
    if not formats.get(fmt).has_min:
        return packed
    blocks = packed.clone().reshape(-1, formats.get(fmt).block_bytes)
    neg_zero = (blocks[:, 2] == 0) & (blocks[:, 3] == 0x80)
    blocks[neg_zero, 3] = 0
    return blocks.reshape(packed.shape)


# ---------------------------------------------------------------- a. attention


@pytest.mark.parametrize("device", device_params())
@checked(100)
@given(c=attention_cases())
def test_attention_matches_reference(device, c):
    """Native attention equals the fp64 reference within the budget of test_attention.py.

    The max-abs error against the fp64 reference is at most twice the reference's own error
    in q's precision plus 1e-6. The fp64 result stays in fp64 (q's values as float64), not
    rounded to q's dtype as helpers.reference_errors does: where every query sees one key,
    the low-precision reference can round exactly as that rounded result does (error 0),
    and a native result one ulp away, as close to the truth, would fail.

    Every cache slot holds a valid row; the native op gets a copy whose slots outside
    [start, length) are random bytes (NaN/Inf patterns included), so reading one is caught.
    Rows with no valid key (window, left padding) are exactly zero in the native output and
    in the reference; the op leaves its caches as they were.
    """
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hq, Hkv, T, d, Sq = c["B"], c["Hq"], c["Hkv"], c["T"], c["d"], c["Sq"]
    kf, vf, kr, vr = c["kf"], c["vf"], c["kr"], c["vr"]
    k = torch.randn(B, Hkv, T, d, generator=gen) * c["k_scale"]  # as test_attention.make_cache
    v = torch.randn(B, Hkv, T, d, generator=gen)
    kc = random_bytes((B, Hkv, T, formats.row_bytes(kf, d)), gen)
    vc = random_bytes((B, Hkv, T, formats.row_bytes(vf, d)), gen)
    slots = torch.stack([torch.randperm(T, generator=gen) for _ in range(B)])  # every slot, in a random order
    k_in = torch.gather(k, 2, slots[:, None, :, None].expand(B, Hkv, T, d))
    v_in = torch.gather(v, 2, slots[:, None, :, None].expand(B, Hkv, T, d))
    reference.cache_append(kc, vc, k_in, v_in, slots, kf, kr.group, kr.seed, vf, vr.group, vr.seed)
    dirty_k, dirty_v = kc.clone(), vc.clone()
    for b, (n, s) in enumerate(zip(c["lengths"], c["starts"], strict=True)):
        for cache in (dirty_k, dirty_v):
            cache[b, :, :s] = random_bytes(cache[b, :, :s].shape, gen)
            cache[b, :, n:] = random_bytes(cache[b, :, n:].shape, gen)
    if c["q_transposed"]:
        q = torch.randn(B, Sq, Hq, d, generator=gen).to(c["dtype"]).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Sq, d, generator=gen).to(c["dtype"])
    lengths = torch.tensor(c["lengths"], dtype=c["index_dtype"])
    starts = torch.tensor(c["starts"], dtype=c["index_dtype"]) if c["pass_starts"] else None
    rest = (kf, kr.group, kr.seed, vf, vr.group, vr.seed, 1.0 / math.sqrt(d), c["causal"], c["window"], c["softcap"])
    clean = (q, kc, vc, lengths, starts, *rest)

    dev_args = to_device((q, dirty_k, dirty_v, lengths, starts, *rest), device)
    poison_cuda_memory(device)
    out = torch.ops.turbokv.attention(*dev_args)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == device
    assert torch.equal(dev_args[1].cpu(), dirty_k) and torch.equal(dev_args[2].cpu(), dirty_v), "caches written"
    out = out.cpu()
    assert out.isfinite().all(), "non-finite output"

    exact = reference.attention(q.double(), *clean[1:], compute_dtype=torch.float64)  # not rounded to q's dtype
    low = reference.attention(*clean, compute_dtype=c["dtype"])
    empty = ~reference.attention_mask(lengths, starts, Sq, T, c["causal"], c["window"]).any(-1)  # (B, 1, Sq)
    empty = empty.expand(B, Hq, Sq)
    for name, t in (("native", out), ("reference", low), ("fp64 reference", exact)):
        assert torch.equal(t[empty], torch.zeros_like(t[empty])), f"{name}: a row with no valid key is not zero"

    err = (out.double() - exact).abs().max().item()
    ref_err = (low.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"error {err:.3e} > 2 x reference error {ref_err:.3e}"


# ---------------------------------------------------------------- b. cache_append


@pytest.mark.parametrize("device", device_params())
@checked(100)
@given(c=append_cases())
def test_cache_append_matches_reference(device, c):
    """Native cache_append writes the reference's bytes at the named slots and leaves every other slot alone.

    Bytes exact on the CPU; on CUDA, turbo rows as assert_packed_match allows across devices
    (indices on >= 99.99 %, scales within 1 fp16 ulp). Slots not named in positions keep their
    random initial bytes exactly, on every device.
    """
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, T, S, d = c["B"], c["H"], c["T"], c["S"], c["d"]
    kf, vf, kr, vr = c["kf"], c["vf"], c["kr"], c["vr"]
    k_init = random_bytes((B, H, T, formats.row_bytes(kf, d)), gen)
    v_init = random_bytes((B, H, T, formats.row_bytes(vf, d)), gen)
    if c["transposed"]:
        k = rows_like((B, S, H, d), gen).to(c["dtype"]).transpose(1, 2)
        v = rows_like((B, S, H, d), gen).to(c["dtype"]).transpose(1, 2)
    else:
        k = rows_like((B, H, S, d), gen).to(c["dtype"])
        v = rows_like((B, H, S, d), gen).to(c["dtype"])
    positions = torch.stack([torch.randperm(T, generator=gen)[:S] for _ in range(B)]).to(c["index_dtype"])
    note(f"positions: {positions.tolist()}")

    kc, vc = k_init.clone().to(device), v_init.clone().to(device)
    dk, dv, dpos = to_device((k, v, positions), device)
    torch.ops.turbokv.cache_append(kc, vc, dk, dv, dpos, kf, kr.group, kr.seed, vf, vr.group, vr.seed)
    k_ref, v_ref = k_init.clone(), v_init.clone()
    reference.cache_append(k_ref, v_ref, k, v, positions, kf, kr.group, kr.seed, vf, vr.group, vr.seed)

    kc, vc = kc.cpu(), vc.cpu()
    untouched = torch.ones(B, T, dtype=torch.bool)
    untouched[torch.arange(B)[:, None], positions.long()] = False
    for name, got, init in (("k_cache", kc, k_init), ("v_cache", vc, v_init)):
        for b in range(B):
            same = torch.equal(got[b][:, untouched[b]], init[b][:, untouched[b]])
            assert same, f"{name}: sequence {b}: a slot not in positions changed"
    assert_packed_match(kf, kc, k_ref, d, exact=device == "cpu")
    assert_packed_match(vf, vc, v_ref, d, exact=device == "cpu")


# ---------------------------------------------------------------- c. quantize / dequantize


@pytest.mark.parametrize("device", device_params())
@checked(100)
@given(c=quantize_cases())
def test_quantize_dequantize_match_reference(device, c):
    """Native quantize gives the reference's bytes, and native dequantize the reference's values.

    quantize: exact bytes on the CPU, the cross-device allowance of assert_packed_match on
    CUDA (as test_quantize.py). Rows include all-zero, constant and one-spike rows, in every
    input dtype. dequantize (of the reference's bytes, unrotated or not, into each output
    dtype): within the output dtype's rounding, as test_dequantize_matches_reference (exact for
    float32 on the CPU); the round trip through the native bytes decodes the same way.
    """
    gen = torch.Generator().manual_seed(c["seed"])
    fmt, d, rot = c["fmt"], c["d"], c["rot"]
    x = rows_like((*c["lead"], d), gen)
    flat = x.view(-1, d)
    if c["special"] == "zero":
        flat[::2] = 0.0
    elif c["special"] == "constant":
        flat[::2] = flat[::2, :1]
    elif c["special"] == "spike":
        flat[::2] = 0.0
        flat[::2, d // 3] = 7.0
    x = x.to(c["dtype"])

    got = torch.ops.turbokv.quantize(x.to(device), fmt, rot.group, rot.seed).cpu()
    expected = reference.quantize(x, fmt, rot.group, rot.seed)
    assert got.shape == (*c["lead"], formats.row_bytes(fmt, d)) and got.dtype == torch.uint8
    assert_packed_match(
        fmt, clear_negative_zero_min(fmt, got), clear_negative_zero_min(fmt, expected), d, exact=device == "cpu"
    )

    out_dtype, unrotate = c["out_dtype"], c["unrotate"]
    tol = {torch.float32: 0.0 if device == "cpu" else 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    width = d if unrotate else formats.padded_dim(fmt, d)
    for packed in (expected, got):
        y = torch.ops.turbokv.dequantize(packed.to(device), fmt, d, rot.group, rot.seed, unrotate, out_dtype).cpu()
        y_ref = reference.dequantize(packed, fmt, d, rot.group, rot.seed, unrotate, torch.float32)
        assert y.dtype == out_dtype and y.shape == (*c["lead"], width)
        atol = tol * y_ref.abs().max().item() if y_ref.numel() else 0.0
        torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=atol)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="native bug: q4_1/q5_1 encoder takes the block minimum with fminf from x[0], so for a block "
    "whose minimum is zero and holds both +0.0 and -0.0 it stores the first zero's sign; the reference "
    "(torch.amin) and gguf (numpy min) store -0.0 here (a seeded rotation of an all-zero row)",
)
@pytest.mark.parametrize("fmt", ["q4_1", "q5_1"])
def test_zero_min_sign_of_mixed_zero_blocks(fmt):
    """A seeded rotation (group 16, seed 0) of an all-zero 32-block gives a mix of +0.0 and -0.0."""
    x = torch.zeros(1, 32)
    rot = Rotation(16, 0)
    got = torch.ops.turbokv.quantize(x, fmt, rot.group, rot.seed)
    expected = reference.quantize(x, fmt, rot.group, rot.seed)
    assert torch.equal(got, expected), f"native {got[0, :4].tolist()} != reference {expected[0, :4].tolist()}"
