"""Comparison helpers shared by the tests."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from turbokv.core import formats, ops, reference
from turbokv.core.rotation import Rotation, auto_rotation


def make_cache(gen, B, Hkv, T, d, kf, vf, kr, vr, scale=1.0):
    """Packed K and V caches (B, Hkv, T, row_bytes) of normal values (K times ``scale``).

    Packed by the CPU op, whose bytes equal reference.quantize's (tests/test_quantize.py) at a
    fraction of its time; the attention tests decode them with the reference."""
    k = torch.randn(B, Hkv, T, d, generator=gen) * scale
    v = torch.randn(B, Hkv, T, d, generator=gen)
    return ops.quantize(k, kf, kr, check_finite=False), ops.quantize(v, vf, vr, check_finite=False)


def poison_cuda_memory():
    """Fill freed memory of the caching allocator with NaN bytes, so unwritten outputs cannot pass."""
    junk = torch.full((64 << 20,), 0xFF, dtype=torch.uint8, device="cuda")
    del junk


def sides(k_format: str, v_format: str, d: int) -> tuple[Rotation, Rotation]:
    return auto_rotation(k_format, d, "k"), auto_rotation(v_format, d, "v")


def turbo_indices_and_scales(fmt: str, packed: torch.Tensor, d: int):
    """Split turbo rows into (indices, fp16 scales) for comparisons across devices."""
    f = formats.get(fmt)
    dp = formats.padded_dim(f, d)
    g = formats.turbo_group(dp)
    rows = packed.cpu().reshape(-1, formats.group_bytes(f, g))
    scales = rows[:, :2].contiguous().view(torch.float16)
    idx = reference._unpack_indices(rows[:, 2:], g, f.bits)
    return idx, scales


def assert_packed_match(fmt: str, got: torch.Tensor, expected: torch.Tensor, d: int, exact: bool = True):
    """Exact bytes, or (turbo, another device) indices equal on >= 99.99 % and scales within 1 fp16 ulp."""
    got, expected = got.cpu(), expected.cpu()
    if exact or formats.get(fmt).family != "turbo":
        mism = (got != expected).sum().item()
        assert mism == 0, f"{fmt}: {mism} of {got.numel()} packed bytes differ"
        return
    gi, gs = turbo_indices_and_scales(fmt, got, d)
    ei, es = turbo_indices_and_scales(fmt, expected, d)
    agree = (gi == ei).float().mean().item()
    assert agree >= 0.9999, f"{fmt}: only {agree:.6f} of indices agree"
    ulps = (gs.view(torch.int16).int() - es.view(torch.int16).int()).abs().max().item()
    assert ulps <= 1, f"{fmt}: scales differ by {ulps} fp16 ulps"


def attention_args(q, kc, vc, lengths, starts, kf, vf, kr, vr, causal=True, window=0, softcap=0.0, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q, kc, vc, lengths, starts, kf, kr.group, kr.seed, vf, vr.group, vr.seed, scale, causal, window, softcap)


# The last reference_errors arguments (held, so their ids stay theirs), versions and results: a
# test that checks several kernels' outputs against one set of arguments computes the reference once.
_last_reference: tuple | None = None


def reference_errors(args, got: torch.Tensor) -> tuple[float, float]:
    """(error of got, error of the reference in q's precision), both max-abs against an fp64 reference."""
    global _last_reference
    versions = tuple(a._version if isinstance(a, torch.Tensor) else None for a in args)
    last = _last_reference
    if last is not None and len(last[0]) == len(args) and all(a is b for a, b in zip(last[0], args, strict=True)):
        if last[1] == versions:
            exact, ref_err = last[2], last[3]
            return (got.cpu().double() - exact).abs().max().item(), ref_err
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    exact = reference.attention(*cpu_args, compute_dtype=torch.float64).double()
    low = reference.attention(*cpu_args, compute_dtype=cpu_args[0].dtype).double()
    ref_err = (low - exact).abs().max().item()
    _last_reference = (tuple(args), versions, exact, ref_err)
    return (got.cpu().double() - exact).abs().max().item(), ref_err


# The format-specialised CUDA kernel (attention_templated.cuh) is built for every pair of these K and
# V formats, and for f16 with f16, at rows of 64, 128 or 256 values.
SPEC_PACKED = ("q8_0", "q5_0", "q4_0", "turbo2", "turbo3", "turbo4")


def templated_built(kf: str, vf: str) -> bool:
    return (kf == vf == "f16") or (kf in SPEC_PACKED and vf in SPEC_PACKED)


def pairwise(**lists) -> tuple[str, list]:
    """``pytest.mark.parametrize`` arguments over the named lists: cases in which every pair of values
    of two of the parameters meets at least once (a greedy covering array), instead of the full
    product. For kernel grids whose failures come from one parameter or an interaction of two
    (a head dim with a format, a query count with a GQA group), at a fraction of the product's
    cases. The cases carry the ``pairwise`` mark: the smoke tier covers each value of each
    parameter, not each case (conftest.py)."""
    names = list(lists)
    values = [list(v) for v in lists.values()]
    pairs = list(itertools.combinations(range(len(values)), 2))
    todo = {(i, a, j, b) for i, j in pairs for a in range(len(values[i])) for b in range(len(values[j]))}
    cases = []
    while todo:
        best = max(
            itertools.product(*(range(len(v)) for v in values)),
            key=lambda c: sum((i, c[i], j, c[j]) in todo for i, j in pairs),
        )
        todo -= {(i, best[i], j, best[j]) for i, j in pairs}
        cases.append(best)
    rows = []
    for c in cases:
        case = [v[k] for v, k in zip(values, c, strict=True)]
        name = "-".join("x".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in case)
        rows.append(pytest.param(*case, marks=pytest.mark.pairwise, id=name))
    return ",".join(names), rows
