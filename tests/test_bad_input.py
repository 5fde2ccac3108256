"""Bad input: a clear exception naming the argument, and caches left byte-identical."""

from __future__ import annotations

import pytest
import torch
from conftest import device_params

import turbokv
from turbokv.core import formats
from turbokv.core.rotation import K_SEED, Rotation, auto_rotation

ERRORS = (RuntimeError, ValueError, TypeError)
D = 128
KF, VF = "turbo3", "q4_0"
KR, VR = auto_rotation(KF, D, "k"), auto_rotation(VF, D, "v")


@pytest.fixture(params=device_params())
def setup(request, gen):
    """(k_cache, v_cache, k, v, positions, q, device) on each device present."""
    dev = request.param
    B, H, T = 2, 2, 16
    kc = torch.randint(0, 256, (B, H, T, formats.row_bytes(KF, D)), generator=gen, dtype=torch.uint8)
    vc = torch.randint(0, 256, (B, H, T, formats.row_bytes(VF, D)), generator=gen, dtype=torch.uint8)
    k = torch.randn(B, H, 3, D, generator=gen)
    v = torch.randn(B, H, 3, D, generator=gen)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    q = torch.randn(B, 8, 1, D, generator=gen, dtype=torch.float16)
    return tuple(t.to(dev) for t in (kc, vc, k, v, pos, q)) + (dev,)


def T(s, values, **kw):
    """A tensor on the setup's device."""
    return torch.tensor(values, device=s[6], **kw)


def append(kc, vc, k, v, pos, kf=KF, vf=VF, kr=KR, vr=VR):
    turbokv.cache_append(kc, vc, k, v, pos, kf, vf, kr, vr)


def attend(q, kc, vc, lengths, starts=None, kf=KF, vf=VF, **kw):
    return turbokv.attention(q, kc, vc, lengths, starts, k_format=kf, v_format=vf, k_rot=KR, v_rot=VR, **kw)


# (case id, callable(setup) -> None, expected text in the message)
CASES = [
    (
        "quantize-int-dtype",
        lambda s: turbokv.quantize(torch.ones(2, D, dtype=torch.int32, device=s[6]), KF),
        "x: got dtype",
    ),
    ("quantize-unknown-format", lambda s: turbokv.quantize(s[2], "q3_k"), "format: got 'q3_k'"),
    ("quantize-head-dim", lambda s: turbokv.quantize(torch.randn(2, 48, device=s[6]), "q4_0"), "head_dim: got 48"),
    ("quantize-rot-group-not-pow2", lambda s: torch.ops.turbokv.quantize(s[2], KF, 24, None), "rot_group: got 24"),
    (
        "quantize-rot-group-too-big",
        lambda s: torch.ops.turbokv.quantize(s[2], KF, 256, None),
        "divisor of the stored row length 128",
    ),
    ("quantize-negative-seed", lambda s: torch.ops.turbokv.quantize(s[2], KF, 128, -5), "rot_seed: got -5"),
    ("quantize-nonfinite", lambda s: turbokv.quantize(T(s, [[float("inf")] * D]), KF), "non-finite"),
    ("quantize-0dim", lambda s: torch.ops.turbokv.quantize(T(s, 1.0), KF, 0, None), "0-dim"),
    (
        "dequantize-float-packed",
        lambda s: turbokv.dequantize(torch.randn(2, 50, device=s[6]), KF, D),
        "packed: got dtype",
    ),
    ("dequantize-other-format", lambda s: turbokv.dequantize(s[0], "turbo4", D), "expected rows of 66 bytes"),
    ("dequantize-int-dtype", lambda s: turbokv.dequantize(s[0], KF, D, dtype=torch.int32), "dtype: got"),
    ("hadamard-group-zero", lambda s: turbokv.hadamard(s[2], 0), "group: got 0"),
    ("hadamard-group-not-divisor", lambda s: turbokv.hadamard(torch.randn(3, 48, device=s[6]), 32), "divisor"),
    (
        "hadamard-group-too-large",
        lambda s: turbokv.hadamard(torch.randn(3, 2048, device=s[6]), 1024),
        "group: got 1024",
    ),
]

APPEND_CASES = [
    ("positions-past-capacity", lambda s: append(*s[:4], T(s, [[0, 1, 2], [14, 15, 16]])), "positions: got 16"),
    ("positions-negative", lambda s: append(*s[:4], T(s, [[0, -1, 2], [3, 4, 5]])), "positions: got -1"),
    ("positions-float", lambda s: append(*s[:4], s[4].float()), "positions: got dtype"),
    ("positions-shape", lambda s: append(*s[:4], s[4][:, :2]), "positions: got shape"),
    ("v-shape-mismatch", lambda s: append(s[0], s[1], s[2], s[3][:, :, :2], s[4]), "v: got shape"),
    ("k-int-dtype", lambda s: append(s[0], s[1], s[2].int(), s[3], s[4]), "k: got dtype"),
    (
        "cache-other-format",
        lambda s: append(*s[:5], kf="turbo4", kr=auto_rotation("turbo4", D, "k")),
        "k_cache: got shape",
    ),
    ("v-cache-other-format", lambda s: append(*s[:5], vf="q8_0"), "v_cache: got shape"),
    ("cache-float-dtype", lambda s: append(s[0].float(), *s[1:5]), "k_cache: got dtype"),
    ("empty-batch", lambda s: append(s[0][:0], s[1][:0], s[2][:0], s[3][:0], s[4][:0]), "empty batch"),
    ("cache-wrong-batch", lambda s: append(s[0][:1], s[1], *s[2:5]), "k_cache: got shape"),
    (
        "head-dim-unsupported",
        lambda s: append(s[0], s[1], s[2][..., :48], s[3][..., :48], s[4], kf="q4_0", kr=Rotation()),
        "head_dim: got 48",
    ),
    ("rotation-past-row", lambda s: append(s[0], s[1], s[2][..., :48], s[3][..., :48], s[4]), "k_rot_group: got 128"),
    # Exact shapes (root cause 1: a (B, 2) lengths tensor read past the end of starts).
    ("positions-3d", lambda s: append(*s[:4], s[4][:, None]), r"positions: got shape \[2, 1, 3\]"),
    ("positions-duplicated", lambda s: append(*s[:4], T(s, [[0, 1, 1], [5, 6, 7]])), "positions: got 1 twice"),
    # Overlap by byte range (root cause 7), not only the same pointer.
    ("v-cache-overlaps-k-cache", lambda s: _overlapping_caches(s), "v_cache: got a tensor whose memory overlaps"),
    ("v-is-a-view-of-v-cache", lambda s: _v_view_of_cache(s), "v: got a tensor whose memory overlaps v_cache"),
    ("v-dtype-differs", lambda s: append(s[0], s[1], s[2], s[3].double(), s[4]), "v: got dtype"),
    ("k-v-same-storage", lambda s: append(s[0], s[0], *s[2:5], vf=KF, vr=KR), "v_cache: got a tensor whose memory"),
]

ATTENTION_CASES = [
    ("lengths-negative", lambda s: attend(s[5], s[0], s[1], T(s, [-1, 4])), "lengths: got -1"),
    ("lengths-past-capacity", lambda s: attend(s[5], s[0], s[1], T(s, [17, 4])), "lengths: got 17"),
    ("lengths-shape", lambda s: attend(s[5], s[0], s[1], T(s, [4])), "lengths: got shape"),
    ("lengths-float", lambda s: attend(s[5], s[0], s[1], T(s, [4.0, 4.0])), "lengths: got dtype"),
    (
        "starts-past-length",
        lambda s: attend(s[5], s[0], s[1], T(s, [4, 4]), T(s, [0, 5])),
        "starts: got 5",
    ),
    ("gqa-not-multiple", lambda s: attend(s[5][:, :3], s[0], s[1], T(s, [4, 4])), "multiple of the 2 KV heads"),
    ("q-int-dtype", lambda s: attend(s[5].int(), s[0], s[1], T(s, [4, 4])), "q: got dtype"),
    ("q-3d", lambda s: attend(s[5][0], s[0], s[1], T(s, [4, 4])), "q: got shape"),
    (
        "q-empty-batch",
        lambda s: attend(s[5][:0], s[0][:0], s[1][:0], T(s, [], dtype=torch.long)),
        "empty batch",
    ),
    ("v-cache-other-format", lambda s: attend(s[5], s[0], s[1], T(s, [4, 4]), vf="q8_0"), "v_cache: got shape"),
    ("window-negative", lambda s: attend(s[5], s[0], s[1], T(s, [4, 4]), window=-2), "window: got -2"),
    ("softcap-negative", lambda s: attend(s[5], s[0], s[1], T(s, [4, 4]), softcap=-1.0), "softcap: got -1"),
    (
        "length-shorter-than-queries",
        lambda s: attend(s[5].expand(2, 8, 5, D), s[0], s[1], T(s, [4, 4])),
        "expected >= 5",
    ),
    (
        "head-dim-unsupported",
        lambda s: attend(s[5][..., :48], s[0], s[1], T(s, [4, 4]), kf="q4_0"),
        "head_dim: got 48",
    ),
    ("k-cache-wrong-batch", lambda s: attend(s[5], s[0][:1], s[1], T(s, [4, 4])), "k_cache: got batch 1"),
    ("lengths-2d", lambda s: attend(s[5], s[0], s[1], T(s, [[4, 4], [4, 4]])), r"lengths: got shape \[2, 2\]"),
    ("lengths-too-many", lambda s: attend(s[5], s[0], s[1], T(s, [4, 4, 4])), r"lengths: got shape \[3\]"),
    ("starts-2d", lambda s: attend(s[5], s[0], s[1], T(s, [4, 4]), T(s, [[0, 0]])), r"starts: got shape \[1, 2\]"),
    (
        "lengths-on-meta",
        lambda s: attend(s[5], s[0], s[1], torch.tensor([4, 4], device="meta")),
        "got device",
    ),
]


def _overlapping_caches(s):
    """k_cache and v_cache as two views of one buffer that overlap without sharing a pointer."""
    kb, vb = formats.row_bytes(KF, D), formats.row_bytes(VF, D)
    buf = torch.zeros(2 * 2 * 16 * (kb + vb), dtype=torch.uint8, device=s[6])
    kc = buf[: 2 * 2 * 16 * kb].view(2, 2, 16, kb)
    vc = buf[kb * 8 : kb * 8 + 2 * 2 * 16 * vb].view(2, 2, 16, vb)
    append(kc, vc, *s[2:5])


def _v_view_of_cache(s):
    """v read from the very bytes the op writes: a float32 view into v_cache (q4_0 rows: 18 floats)."""
    v = s[1].view(torch.float32)[:, :, :3, :1].expand(2, 2, 3, D)
    append(s[0], s[1], s[2], v, s[4])


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize(
    "case", CASES + APPEND_CASES + ATTENTION_CASES, ids=_ids(CASES + APPEND_CASES + ATTENTION_CASES)
)
def test_bad_input_is_named_and_cache_untouched(case, setup):
    _, fn, text = case
    before = [t.clone() for t in setup[:2]]
    with pytest.raises(ERRORS, match=text.replace("(", r"\(")):
        fn(setup)
    assert torch.equal(setup[0], before[0]) and torch.equal(setup[1], before[1]), "the caches changed"


def test_at_least_twenty_cases():
    assert len(CASES + APPEND_CASES + ATTENTION_CASES) >= 20


def test_good_append_after_rejected_one_still_works(setup):
    kc, vc, k, v, pos, _, _ = setup
    with pytest.raises(ERRORS):
        append(kc, vc, k, v, T(setup, [[0, 1, 99], [0, 1, 2]]))
    append(kc, vc, k, v, pos)
    got = turbokv.dequantize(kc[1, :, 5:8], KF, D, KR).cpu()
    assert ((got - k[1].cpu()).norm() / k[1].cpu().norm()).item() < 0.25
    assert Rotation(128, K_SEED).enabled
