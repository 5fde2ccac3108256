"""Attention sinks (gpt-oss, granite_swa: transformers' ``s_aux``): one logit per query head that
joins the softmax denominator and has no value. Every kernel against the reference, the reference
against transformers' eager formula, the values at the edges (no visible key, huge, infinite and
NaN sink_logits) and bad input for the new argument."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import device_params
from helpers import attention_args, make_cache, pairwise, poison_cuda_memory, reference_errors, sides, templated_built

import turbokv
from turbokv.core import formats, ops, reference

CUDA_ONLY = [p for p in device_params() if p != "cpu"]


def spread_sinks(gen, hq: int) -> torch.Tensor:
    """(hq,) float32 sink_logits from far below the scores (no effect) to far above them (rows near zero)."""
    return torch.linspace(-4.0, 12.0, hq)[torch.randperm(hq, generator=gen)]


def check_against_reference(args, sink_logits, got):
    """got (the op with sink_logits) is within the error budget of the reference with sink_logits, and the
    sink_logits changed the result by far more than that budget (so a kernel that drops them fails)."""
    err, ref_err = reference_errors(args + (sink_logits,), got)
    budget = 2 * ref_err + 1e-6
    assert got.isfinite().all()
    assert err <= budget, f"error {err:.3e} > 2 x reference error {ref_err:.3e}"
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    without = reference.attention(*cpu_args, compute_dtype=torch.float64)
    moved = (got.cpu().double() - without.double()).abs().max().item()
    assert moved > 10 * budget, f"the sink_logits moved the output by {moved:.3e} only (budget {budget:.3e})"


def case_args(gen, B, hq, hkv, T, d, sq, kf, vf, lengths, starts, dtype=torch.float16, **kw):
    kr, vr = sides(kf, vf, d)
    kc, vc = make_cache(gen, B, hkv, T, d, kf, vf, kr, vr, scale=2.0)
    q = torch.randn(B, hq, sq, d, generator=gen).to(dtype)
    starts = None if starts is None else torch.tensor(starts)
    return attention_args(q, kc, vc, torch.tensor(lengths), starts, kf, vf, kr, vr, **kw)


def to(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# ---------------------------------------------------------------- the op against the reference


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1), (16, 2)])
@pytest.mark.parametrize("sq", [1, 5, 70])
def test_sinks_budget(device, hq, hkv, sq, gen):
    """GQA 1 / 4 / 8, one query, several (chunked prefill after a prefix) and a whole prompt of
    70 (on the GPU: more than the SDPA shortcut's threshold, which sink_logits turn off); left padding
    that starts after the first queries of the last sequence (their rows are zeros)."""
    T = 137
    lengths, starts = [T, max(60, sq), sq + 3], [0, 7, min(sq + 2, 6)]
    args = case_args(gen, 3, hq, hkv, T, 128, sq, "turbo3", "q4_0", lengths, starts)
    sink_logits = spread_sinks(gen, hq)
    out = torch.ops.turbokv.attention(*to(device, args), sink_logits.to(device))
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    check_against_reference(args, sink_logits, out)
    if sq > 4:  # queries 0, 1, 2 of sequence 2 sit at positions 3, 4, 5, before its start 6
        assert torch.equal(out[2, :, :3].cpu(), torch.zeros_like(out[2, :, :3].cpu()))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("window,softcap", [(16, 0.0), (0, 30.0), (50, 20.0)])
@pytest.mark.parametrize("sq", [1, 6])
def test_sinks_with_window_softcap_left_padding(device, window, softcap, sq, gen):
    """The sink is neither scaled nor softcapped: it joins the scores after both."""
    args = case_args(
        gen, 3, 8, 2, 137, 128, sq, "turbo4", "turbo3", [137, 137, 90], [0, 40, 3], window=window, softcap=softcap
    )
    sink_logits = spread_sinks(gen, 8)
    out = torch.ops.turbokv.attention(*to(device, args), sink_logits.to(device))
    check_against_reference(args, sink_logits, out)


@pytest.mark.parametrize("device", device_params())
def test_sinks_non_causal_float32(device, gen):
    args = case_args(gen, 2, 4, 4, 64, 64, 9, "q8_0", "turbo4", [64, 33], None, causal=False, dtype=torch.float32)
    sink_logits = spread_sinks(gen, 4)
    check_against_reference(args, sink_logits, torch.ops.turbokv.attention(*to(device, args), sink_logits.to(device)))


@pytest.mark.parametrize("device", device_params())
def test_gpt_oss_shape(device, gen):
    """gpt-oss's attention shape: 64 query heads on 8 KV heads of 64 dims, every other layer a
    128-token window, bf16 queries and sink_logits (the model's parameter dtype)."""
    for window in (0, 128):
        args = case_args(
            gen, 2, 64, 8, 300, 64, 3, "turbo3", "turbo3", [300, 150], [0, 20], torch.bfloat16, window=window
        )
        sink_logits = (torch.randn(64, generator=gen) * 2 + 3).bfloat16()
        out = torch.ops.turbokv.attention(*to(device, args), sink_logits.to(device))
        check_against_reference(args, sink_logits, out)


def test_reference_is_transformers_eager_formula(gen):
    """The oracle against gpt-oss's eager attention written out (un-rotated fp64 K/V, the sink
    a column of the logits before the softmax, dropped after it), with a softcap on the
    scores only, left padding and a row that sees no key (all weight on the sink: zeros)."""
    d, hq, hkv, sq = 64, 6, 2, 4
    args = case_args(gen, 2, hq, hkv, 40, d, sq, "q8_0", "turbo3", [40, 30], [0, 28], torch.float64, softcap=15.0)
    sink_logits = torch.randn(hq, generator=gen) * 3
    got = reference.attention(*args, sink_logits, compute_dtype=torch.float64)
    q, kc, vc, lengths, starts = args[:5]
    kr, vr = sides("q8_0", "turbo3", d)
    k = reference.dequantize(kc, "q8_0", d, kr.group, kr.seed, dtype=torch.float64).repeat_interleave(3, 1)
    v = reference.dequantize(vc, "turbo3", d, vr.group, vr.seed, dtype=torch.float64).repeat_interleave(3, 1)
    logits = q.double() @ k.transpose(-1, -2) * d**-0.5
    logits = 15.0 * torch.tanh(logits / 15.0)
    logits = logits.masked_fill(~reference.attention_mask(lengths, starts, sq, 40, True, 0), -math.inf)
    column = sink_logits.double().reshape(1, hq, 1, 1).expand(2, hq, sq, 1)
    probs = torch.softmax(torch.cat([logits, column], -1), -1)[..., :-1]
    expected = probs @ v
    assert torch.equal(got[1, :, :2], torch.zeros_like(got[1, :, :2]))  # queries before start 28
    # K and V decode in float32 (their un-rotation here adds float32 rounding), hence 1e-6.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- values at the edges


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("sq", [1, 4])
def test_sink_edges(device, sq, gen):
    """-inf is no sink (bit-equal); +inf takes all the weight (zeros); a huge sink gives near
    zeros; a NaN sink makes its head's rows NaN; rows that see no key stay zeros whatever the
    sink; float16 / bfloat16 sink_logits are their float32 values."""
    hq = 4
    args = to(device, case_args(gen, 2, hq, 2, 50, 128, sq, "turbo3", "turbo3", [50, 50], [0, 50], causal=False))
    plain = torch.ops.turbokv.attention(*args)
    assert plain[0].abs().sum() > 0

    def run(values):
        return torch.ops.turbokv.attention(*args, torch.tensor(values, device=device))

    assert torch.equal(run([-math.inf] * hq), plain)
    assert torch.equal(run([math.inf] * hq), torch.zeros_like(plain))
    huge = run([200.0] * hq).float()
    assert huge.isfinite().all() and huge.abs().max() < 1e-30
    nan = run([0.0, math.nan, 0.0, -math.inf])
    assert nan[0, 1].isnan().all() and nan[0, [0, 2, 3]].isfinite().all()
    assert torch.equal(nan[0, 3], plain[0, 3])
    for out in (nan, huge, run([5.0] * hq)):  # sequence 1: start == length, no visible key
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    values = torch.randn(hq, generator=gen) * 3
    for dtype in (torch.float16, torch.bfloat16):
        low = values.to(dtype)
        got = torch.ops.turbokv.attention(*args, low.to(device))
        assert torch.equal(got, torch.ops.turbokv.attention(*args, low.float().to(device)))


@pytest.mark.parametrize("device", device_params())
def test_nan_rule_holds_with_sinks(device, gen):
    """A NaN value in a visible slot still makes the row NaN, even where the sink takes all the weight."""
    fmt, d = "q8_0", 128
    kr, vr = sides(fmt, fmt, d)
    v = torch.randn(1, 1, 20, d, generator=gen)
    v[0, 0, 5] = math.nan
    kc = reference.quantize(torch.randn(1, 1, 20, d, generator=gen), fmt, kr.group, kr.seed)
    vc = reference.quantize(v, fmt, vr.group, vr.seed)
    q = torch.randn(1, 2, 1, d, generator=gen).half()
    args = to(device, attention_args(q, kc, vc, torch.tensor([20]), None, fmt, fmt, kr, vr))
    for sink in (0.0, math.inf):
        out = torch.ops.turbokv.attention(*args, torch.full((2,), sink, device=device))
        assert out.isnan().all(), sink


# ---------------------------------------------------------------- every CUDA kernel

# (head dim, K format, V format, query dtype, masking)
CASES = [
    (64, "turbo3", "turbo3", torch.float16, {}),
    (128, "q8_0", "q8_0", torch.bfloat16, {"window": 40}),
    (128, "turbo4", "q4_0", torch.float16, {"softcap": 30.0}),
    (64, "f16", "f16", torch.bfloat16, {"window": 16, "softcap": 20.0}),
    (256, "q4_0", "q4_0", torch.float16, {}),
    (96, "q5_1", "q4_1", torch.float16, {"causal": False}),
]


def cuda_kernels(d, kf, vf, sq, g):
    """The kernels a call can be pinned to (see choose_path in cpp/cuda/attention.cu)."""
    kernels = ["auto", "tiled", "mma"]
    if templated_built(kf, vf) and d != 96:
        kernels.append("templated")
    if sq == 1 and g <= 8 and d != 96:  # the SIMT kernel splits a row into 4..32 lanes: not 96
        kernels.append("simt")
    return kernels


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize(
    *pairwise(sq=[1, 3, 16, 64, 100], heads=[(4, 4), (8, 2), (8, 1), (16, 1)], case=range(len(CASES)))
)
def test_sinks_every_kernel_cuda(device, sq, heads, case, gen, pin_kernels):
    """templated / mma / simt / tiled (pinned) and auto, one query and several, each against the
    reference with sink_logits; they all end in the merge kernel, which adds the sink once. Every
    pair of query count, GQA shape and case."""
    hq, hkv = heads
    d, kf, vf, dtype, kw = CASES[case]
    T = 300
    lengths, starts = [T, max(77, sq), sq + 3], [0, 10, min(sq + 1, 5)]
    args = case_args(gen, 3, hq, hkv, T, d, sq, kf, vf, lengths, starts, dtype, **kw)
    sink_logits = spread_sinks(gen, hq)
    dev = to(device, args) + (sink_logits.to(device),)
    outs = {}
    for kernel in cuda_kernels(d, kf, vf, sq, hq // hkv):
        pin_kernels(attention=kernel)
        poison_cuda_memory()
        outs[kernel] = torch.ops.turbokv.attention(*dev).cpu()
        check_against_reference(args, sink_logits, outs[kernel])
    _, ref_err = reference_errors(args + (sink_logits,), outs["tiled"])
    for kernel, out in outs.items():
        torch.testing.assert_close(out.double(), outs["tiled"].double(), rtol=0, atol=4 * ref_err + 1e-6, msg=kernel)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("kernel", ["auto", "templated", "mma", "simt", "tiled"])
@pytest.mark.parametrize("T", [4097, 70001])
def test_sinks_long_decode_cuda(device, kernel, T, gen, pin_kernels):
    """Long caches: many key splits, the sink added once in the merge (not once per split)."""
    args = case_args(gen, 2, 8, 2, T, 128, 1, "turbo3", "turbo3", [T, T // 3 + 1], None)
    sink_logits = torch.linspace(4.0, 14.0, 8)  # around the row maxima of a long row
    pin_kernels(attention=kernel)
    poison_cuda_memory()
    out = torch.ops.turbokv.attention(*to(device, args), sink_logits.to(device))
    check_against_reference(args, sink_logits, out)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("kernel", ["auto", "templated", "mma", "simt", "tiled"])
def test_sink_edges_every_kernel_cuda(device, kernel, gen, pin_kernels):
    """The edge values of test_sink_edges on each pinned decode kernel."""
    pin_kernels(attention=kernel)
    test_sink_edges(device, 1, gen)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("starts", [[0, 0], [0, 37]])
def test_prefill_with_sinks_skips_the_sdpa_shortcut_cuda(device, starts, gen, pin_kernels):
    """A whole prompt on the GPU (f16, >= PREFILL_SDPA_MIN_QUERIES queries) takes dequantize +
    SDPA without sink_logits; with sink_logits it runs the op's kernels (SDPA has no sink), within the
    reference's budget, and equals the op pinned to its kernel."""
    sq = 2 * ops.PREFILL_SDPA_MIN_QUERIES
    args = case_args(gen, 2, 8, 2, sq, 128, sq, "turbo3", "turbo3", [sq, sq], starts)
    dev = to(device, args)
    assert ops._prefill_spans(dev[0], dev[1], dev[3], dev[4], True, 0, 0.0) is not None  # the shortcut's case
    sink_logits = spread_sinks(gen, 8)
    kr, vr = sides("turbo3", "turbo3", 128)
    kw = dict(k_format="turbo3", v_format="turbo3", k_rot=kr, v_rot=vr, sink_logits=sink_logits.to(device))
    out = turbokv.attention(*dev[:5], **kw)
    check_against_reference(args, sink_logits, out)
    pin_kernels(attention="templated")
    assert torch.equal(out, turbokv.attention(*dev[:5], **kw))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("sink_dtype", [torch.float32, torch.bfloat16])
def test_decode_with_sinks_replays_in_a_cuda_graph(device, sink_dtype, gen):
    """Sinks inside a captured decode step: read (and, for bf16, converted) on every replay."""
    args = to(device, case_args(gen, 2, 8, 2, 200, 128, 1, "turbo3", "turbo3", [200, 120], [0, 9]))
    sink_logits = spread_sinks(gen, 8).to(sink_dtype).to(device)
    torch.ops.turbokv.attention(*args, sink_logits)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.turbokv.attention(*args, sink_logits)
    sink_logits.copy_(spread_sinks(gen, 8).to(sink_dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.ops.turbokv.attention(*args, sink_logits))


# ---------------------------------------------------------------- bad input


@pytest.fixture(params=device_params())
def small(request, gen):
    """(q, k_cache, v_cache, lengths, other device) for attention on each device present."""
    dev = request.param
    kr, vr = sides("turbo3", "q4_0", 128)
    kc, vc = make_cache(gen, 2, 2, 16, 128, "turbo3", "q4_0", kr, vr)
    q = torch.randn(2, 8, 1, 128, generator=gen, dtype=torch.float16)
    return q.to(dev), kc.to(dev), vc.to(dev), torch.tensor([4, 4], device=dev), "meta" if dev == "cpu" else "cpu"


BAD_SINKS = [
    ("one-too-many", lambda o: torch.zeros(9), "sink_logits: got shape [9], expected (8,)"),
    ("one-per-kv-head", lambda o: torch.zeros(2), "sink_logits: got shape [2], expected (8,)"),
    ("2d", lambda o: torch.zeros(1, 8), "sink_logits: got shape [1, 8], expected (8,)"),
    ("0-dim", lambda o: torch.tensor(0.0), "sink_logits: got shape [], expected (8,)"),
    (
        "int",
        lambda o: torch.zeros(8, dtype=torch.int32),
        "sink_logits: got dtype Int, expected float32, float16 or bfloat16",
    ),
    ("float64", lambda o: torch.zeros(8, dtype=torch.float64), "sink_logits: got dtype Double"),
    ("other-device", lambda o: torch.zeros(8, device=o), "sink_logits: got device"),
]


@pytest.mark.parametrize("case", BAD_SINKS, ids=[c[0] for c in BAD_SINKS])
def test_bad_sinks_are_named_and_cache_untouched(case, small):
    _, make, text = case
    q, kc, vc, lengths, other = small
    before = kc.clone(), vc.clone()
    bad = make(other)
    if case[0] != "other-device":
        bad = bad.to(q.device)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=re.escape(text)):
        turbokv.attention(q, kc, vc, lengths, k_format="turbo3", v_format="q4_0", sink_logits=bad)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_meta_kernel_checks_sinks():
    """What torch.compile traces with: the meta kernel checks sink_logits as the real ones do."""
    rb_k, rb_v = formats.row_bytes("turbo3", 128), formats.row_bytes("q4_0", 128)
    q = torch.empty(2, 8, 1, 128, device="meta", dtype=torch.float16)
    kc = torch.empty(2, 2, 16, rb_k, device="meta", dtype=torch.uint8)
    vc = torch.empty(2, 2, 16, rb_v, device="meta", dtype=torch.uint8)
    lengths = torch.empty(2, dtype=torch.long, device="meta")
    kw = dict(k_format="turbo3", v_format="q4_0")
    out = turbokv.attention(q, kc, vc, lengths, **kw, sink_logits=torch.empty(8, device="meta"))
    assert out.shape == q.shape and out.device.type == "meta"
    with pytest.raises(ValueError, match=re.escape("sink_logits: got shape [4], expected (8,)")):
        turbokv.attention(q, kc, vc, lengths, **kw, sink_logits=torch.empty(4, device="meta"))
    with pytest.raises(ValueError, match="sink_logits: got device cpu, expected meta"):
        turbokv.attention(q, kc, vc, lengths, **kw, sink_logits=torch.zeros(8))
