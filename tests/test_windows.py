"""Exact token windows (turbokv.hf.exact_tokens) and what they rest on: the op's log-sum-exp output and
merge_attention. Every result is checked against attention written out key by key: a query at
position p reads the sink keys [0, s) and its recent keys [p - w + 1, p] exact (f16) and every
other key as the packed format stores it."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import attention_args, make_cache, sides

import turbokv
from turbokv.core import ops, reference
from turbokv.hf.attention import _fused_attention, cache_kwargs
from turbokv.hf.cache import TurboCache
from turbokv.hf.layer import SideSpec, TurboLayer
from turbokv.hf.policy import LayerPolicy, Policy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _marks(device):
    return pytest.param(device, marks=pytest.mark.cuda) if device == "cuda" else device


# ---------------------------------------------------------------------- the op's log-sum-exp


@pytest.mark.parametrize("device", [_marks(d) for d in DEVICES])
@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q4_0", "turbo3"])
@pytest.mark.parametrize(
    "sq, causal, window, softcap, padded, sink",
    [
        (1, True, 0, 0.0, False, False),
        (6, True, 0, 0.0, True, True),
        (5, True, 7, 30.0, False, False),
        (3, False, 0, 0.0, True, False),
    ],
)
@pytest.mark.parametrize("t", [40, 2048])  # 2048: the CUDA kernels split the keys, the merge combines the splits
def test_attention_lse_matches_reference(device, fmt, sq, causal, window, softcap, padded, sink, t):
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, d = 3, 6, 2, 64
    kr, vr = sides(fmt, fmt, d)
    kc, vc = make_cache(gen, b, hkv, t, d, fmt, fmt, kr, vr)
    q = torch.randn(b, hq, sq, d, generator=gen)
    lengths = torch.tensor([t, t - 7, 9])
    # Sequence 2 is all padding for its first queries' window: some rows see no key (lse -inf, zeros).
    starts = torch.tensor([0, 5, 9]) if padded else None
    sink_logits = torch.randn(hq, generator=gen) if sink else None
    args = attention_args(q, kc, vc, lengths, starts, fmt, fmt, kr, vr, causal, window, softcap)
    want_o, want_l = reference.attention(*args, sink_logits, return_lse=True)
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    out, lse = ops.attention(
        *(dev(x) for x in (q, kc, vc, lengths, starts)),
        k_format=fmt,
        v_format=fmt,
        k_rot=kr,
        v_rot=vr,
        causal=causal,
        window=window,
        softcap=softcap,
        sink_logits=dev(sink_logits),
        return_lse=True,
    )
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(want_l)), "rows without keys must have lse = -inf"
    fin = torch.isfinite(want_l)
    torch.testing.assert_close(lse.cpu()[fin], want_l[fin], atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(out.cpu(), want_o, atol=2e-4, rtol=1e-4)
    if padded:
        assert torch.isinf(want_l).any(), "the case must hold a row with no valid key"


def test_attention_lse_meta_shapes():
    gen = torch.Generator().manual_seed(0)
    kr, vr = sides("q4_0", "q4_0", 64)
    kc, vc = make_cache(gen, 2, 2, 16, 64, "q4_0", "q4_0", kr, vr)
    q = torch.randn(2, 4, 3, 64, generator=gen)
    meta = [x.to("meta") for x in (q, kc, vc, torch.tensor([16, 16]))]
    out, lse = torch.ops.turbokv.attention_lse(
        *meta, None, "q4_0", kr.group, kr.seed, "q4_0", vr.group, vr.seed, 0.125, True, 0, 0.0
    )
    assert out.shape == (2, 4, 3, 64) and lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="k_format"):
        torch.ops.turbokv.attention_lse(*meta, None, "q9_9", 0, None, "q4_0", vr.group, vr.seed, 0.125, True, 0, 0.0)


@pytest.mark.parametrize("device", [_marks(d) for d in DEVICES])
def test_attention_lse_refuses_bad_input(device):
    """The log-sum-exp op checks its arguments as attention does, on every device, naming them."""
    gen = torch.Generator().manual_seed(0)
    kr, vr = sides("q4_0", "q4_0", 64)
    kc, vc = (x.to(device) for x in make_cache(gen, 2, 2, 16, 64, "q4_0", "q4_0", kr, vr))
    q = torch.randn(2, 4, 3, 64, generator=gen).to(device)
    kw = dict(k_format="q4_0", v_format="q4_0", k_rot=kr, v_rot=vr, return_lse=True)
    with pytest.raises(ValueError, match="lengths: got 17 for sequence 1, expected 0 <= length <= cache capacity 16"):
        ops.attention(q, kc, vc, torch.tensor([16, 17], device=device), **kw)
    with pytest.raises(ValueError, match="starts: got 9 for sequence 0, expected 0 <= start <= length 8"):
        ops.attention(q, kc, vc, torch.tensor([8, 8], device=device), torch.tensor([9, 0], device=device), **kw)
    with pytest.raises(ValueError, match="q: got 5 query heads"):
        ops.attention(q[:, :1].expand(2, 5, 3, 64).contiguous(), kc, vc, torch.tensor([16, 16], device=device), **kw)


@pytest.mark.parametrize("device", [_marks(d) for d in DEVICES])
def test_merge_of_disjoint_key_sets_is_the_whole(device):
    """Keys [0, 40) and [40, 70) as two calls (starts / lengths), merged with a sink: the one-call result."""
    gen = torch.Generator().manual_seed(1)
    kr, vr = sides("q8_0", "q8_0", 64)
    kc, vc = make_cache(gen, 2, 2, 70, 64, "q8_0", "q8_0", kr, vr)
    kc, vc, q = kc.to(device), vc.to(device), torch.randn(2, 4, 1, 64, generator=gen).to(device)
    sink_logits = torch.randn(4, generator=gen).to(device)
    kw = dict(k_format="q8_0", v_format="q8_0", k_rot=kr, v_rot=vr)
    n = lambda x: torch.tensor([x, x], device=device)  # noqa: E731
    whole = ops.attention(q, kc, vc, n(70), None, sink_logits=sink_logits, **kw)
    head = ops.attention(
        q, kc[:, :, :40].contiguous(), vc[:, :, :40].contiguous(), n(40), None, causal=False, return_lse=True, **kw
    )
    tail = ops.attention(q, kc, vc, n(70), n(40), return_lse=True, **kw)
    empty = (torch.zeros_like(q), torch.full(q.shape[:3], -math.inf, device=device))  # a part that saw nothing
    torch.testing.assert_close(ops.merge_attention([head, tail, empty], sink_logits), whole, atol=1e-5, rtol=1e-5)
    # A row no part saw stays zeros; a NaN part makes the row NaN.
    assert torch.equal(ops.merge_attention([empty, empty]), torch.zeros_like(q))
    bad = (tail[0], torch.full_like(tail[1], math.nan))
    assert torch.isnan(ops.merge_attention([head, bad])).all()


# ---------------------------------------------------------------------- exact windows in a cache layer


def _window_reference(q, k, v, first, starts, s, w, fmt, offset=None, window=0, softcap=0.0, quantized=()):
    """Attention of q (B, Hq, Sq, d) at positions first.. over k, v (B, Hkv, T, d) written out per query:
    exact (f16) keys for j < s or p - j < w (or j in ``quantized``: positions whose exact copy holds
    their quantized value), the format's dequantized keys elsewhere."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    kr, vr = sides(fmt, fmt, d)
    if offset is not None:
        k = k - offset[None, :, None, :]
    ke, ve = k.half().float(), v.half().float()
    # A token is quantized from its exact copy when it leaves the window (f16 here: the model is float32).
    kq = ops.dequantize(ops.quantize(ke, fmt, kr), fmt, d, kr, dtype=torch.float32)
    vq = ops.dequantize(ops.quantize(ve, fmt, vr), fmt, d, vr, dtype=torch.float32)
    ke[:, :, list(quantized)], ve[:, :, list(quantized)] = kq[:, :, list(quantized)], vq[:, :, list(quantized)]
    out = torch.zeros(b, hq, sq, d)
    for bi in range(b):
        for i in range(sq):
            p = first + i
            js = [j for j in range(int(starts[bi]) if starts is not None else 0, p + 1) if not window or p - j < window]
            if not js:
                continue
            exact = torch.tensor([j < s or p - j < w for j in js])
            for h in range(hq):
                g = h // (hq // hkv)
                keys = torch.where(exact[:, None], ke[bi, g, js], kq[bi, g, js])
                vals = torch.where(exact[:, None], ve[bi, g, js], vq[bi, g, js])
                sc = keys @ q[bi, h, i] / math.sqrt(d)
                if softcap:
                    sc = softcap * torch.tanh(sc / softcap)
                out[bi, h, i] = torch.softmax(sc, 0) @ vals
    return out


def _run(layer, q, starts=None, window=0, softcap=0.0):
    out = _fused_attention(
        q, layer, starts, scale=q.shape[-1] ** -0.5, window=window, softcap=softcap, sink_logits=None
    )
    return out


@pytest.mark.parametrize("device", [_marks(d) for d in DEVICES])
@pytest.mark.parametrize("fmt", ["q4_0", "turbo3"])
@pytest.mark.parametrize("s, w", [(0, 4), (2, 0), (2, 4), (3, 1)])
# window 3: not more than w = 4, so the packed part is empty and the recent part takes the window.
@pytest.mark.parametrize("window, softcap, padded", [(0, 0.0, False), (6, 0.0, True), (3, 0.0, False), (0, 25.0, True)])
@pytest.mark.parametrize("static", [False, True])
def test_windowed_layer_matches_per_query_reference(device, fmt, s, w, window, softcap, padded, static):
    """A prompt, decode steps and a chunk after a prefix: each call's attention, key by key; in a
    dynamic layer and in a static one (fixed stores, a decode step without host syncs)."""
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, d, total = 2, 4, 2, 64, 23
    k = torch.randn(b, hkv, total, d, generator=gen) + 0.5
    v = torch.randn(b, hkv, total, d, generator=gen)
    q = torch.randn(b, hq, total, d, generator=gen)
    offset = torch.randn(hkv, d, generator=gen) * 0.3
    starts = torch.tensor([0, 3]) if padded else None
    layer = TurboLayer(
        SideSpec(fmt),
        SideSpec(fmt),
        sliding_window=window or None,
        sink_tokens=s,
        recent_tokens=w,
        max_cache_len=32 if static else None,
    )
    layer.set_k_offset(offset.to(device))
    pos = 0
    # A prompt in two chunks (the first shorter than the sink), decode, decode, a chunk, decode, a chunk.
    for n in (2, 7, 1, 1, 5, 1, 6):
        layer.fused_next = True
        layer.update(k[:, :, pos : pos + n].to(device), v[:, :, pos : pos + n].to(device))
        dev_starts = None if starts is None else starts.to(device)
        got = _run(layer, q[:, :, pos : pos + n].to(device), dev_starts, window, softcap).cpu()
        want = _window_reference(
            q[:, :, pos : pos + n],
            k[:, :, : pos + n],
            v[:, :, : pos + n],
            pos,
            starts,
            s,
            w,
            fmt,
            offset,
            window,
            softcap,
        )
        torch.testing.assert_close(got, want, atol=3e-4, rtol=1e-3, msg=f"call of {n} tokens at {pos}")
        pos += n
    # What stays exact between calls: the sink and the last w tokens; the rest is packed.
    assert layer.exact.tokens(pos) == min(s, pos) + min(w, pos - s)
    # The fallback path's K/V: exact at the sink and the last w positions, dequantized elsewhere.
    kd = layer.dequantized()[0].cpu()
    exact_at = [j for j in range(pos) if j < s or j >= pos - w]
    torch.testing.assert_close(kd[:, :, exact_at], k[:, :, exact_at].half().float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("device", [_marks(d) for d in DEVICES])
@pytest.mark.parametrize("s, w, window", [(3, 4, 0), (3, 4, 6), (1, 2, 0)])
def test_one_query_of_a_prompt_alone(device, s, w, window):
    """A run of one query ending inside a longer forward (a chunked layer cuts its prompt so, also
    inside the sink): the decode path reads only keys up to it and its own w recent positions."""
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d, n = 2, 4, 2, 64, 12
    k, v = torch.randn(b, hkv, n, d, generator=gen) + 0.5, torch.randn(b, hkv, n, d, generator=gen)
    q = torch.randn(b, hq, n, d, generator=gen)
    starts = torch.tensor([0, 2])
    spec = SideSpec("q4_0")
    layer = TurboLayer(spec, spec, sliding_window=window or None, sink_tokens=s, recent_tokens=w)
    layer.fused_next = True
    layer.update(k.to(device), v.to(device))
    args = dict(k_format="q4_0", v_format="q4_0", k_rot=layer.k_rot, v_rot=layer.v_rot, scale=d**-0.5, window=window)
    want = _window_reference(q, k, v, 0, starts, s, w, "q4_0", window=window)
    for p in range(n):
        got = layer.exact.attention(
            q[:, :, p : p + 1].to(device), (layer.k_packed, layer.v_packed), p + 1, starts.to(device), **args
        )
        torch.testing.assert_close(got.cpu(), want[:, :, p : p + 1], atol=3e-4, rtol=1e-3, msg=f"query {p}")


@pytest.mark.parametrize("s, w, n", [(0, 4, 2), (2, 4, 3), (1, 3, 9)])
def test_static_fallback_kv_has_the_exact_tokens(s, w, n):
    """An unpatched static layer's K/V: the exact values at the sink and the last w positions, also
    before the register is full (its stale slots must not overwrite a position)."""
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, n, 64, generator=gen), torch.randn(2, 2, n, 64, generator=gen)
    static = TurboLayer(SideSpec("q4_0"), SideSpec("q4_0"), sink_tokens=s, recent_tokens=w, max_cache_len=16)
    dynamic = TurboLayer(SideSpec("q4_0"), SideSpec("q4_0"), sink_tokens=s, recent_tokens=w)
    for layer in (static, dynamic):
        layer.update(k[:, :, :1], v[:, :, :1])
        layer.update(k[:, :, 1:], v[:, :, 1:])
    for a, b in zip(static.dequantized(), dynamic.dequantized(), strict=True):
        torch.testing.assert_close(a[:, :, :n], b, rtol=0, atol=0)
    exact_at = [j for j in range(n) if j < s or j >= n - w]
    torch.testing.assert_close(static.dequantized()[0][:, :, exact_at], k[:, :, exact_at].half().float())


@pytest.mark.parametrize("static", [False, True])
def test_windowed_layer_crop_and_batch_edits(static):
    """Assisted generation's crop and beam search's reorder keep every later call equal to the
    key-by-key reference. The recent store holds the last w tokens only, so a crop re-reads the
    positions it brings back into the window from the packed cache (their quantized values)."""
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d, s, w, fmt = 2, 2, 1, 64, 1, 4, "q4_0"
    k, v, q = (torch.randn(b, h, 30, d, generator=gen) for h in (hkv, hkv, hq))
    cap = 32 if static else None
    layer = TurboLayer(SideSpec(fmt), SideSpec(fmt), sink_tokens=s, recent_tokens=w, max_cache_len=cap)
    layer.fused_next = True
    layer.update(k[:, :, :20], v[:, :, :20])
    layer.crop(-2)  # 18 left: the window [14, 18) reaches back to 14, 15, which only the packed cache holds
    layer.fused_next = True
    layer.update(k[:, :, 18:19], v[:, :, 18:19])
    want = _window_reference(q[:, :, 18:19], k[:, :, :19], v[:, :, :19], 18, None, s, w, fmt, quantized=(14, 15))
    torch.testing.assert_close(_run(layer, q[:, :, 18:19]), want, atol=3e-4, rtol=1e-3)
    layer.crop(-9)  # 10 left, the store began at 15: 6..9 refilled from the packed cache
    layer.fused_next = True
    layer.update(k[:, :, 10:12], v[:, :, 10:12])
    want = _window_reference(q[:, :, 10:12], k[:, :, :12], v[:, :, :12], 10, None, s, w, fmt, quantized=range(6, 10))
    torch.testing.assert_close(_run(layer, q[:, :, 10:12]), want, atol=3e-4, rtol=1e-3)
    layer.reorder_cache(torch.tensor([1, 0]))
    layer.fused_next = True
    layer.update(k.flip(0)[:, :, 12:13], v.flip(0)[:, :, 12:13])
    want = _window_reference(
        q.flip(0)[:, :, 12:13], k.flip(0)[:, :, :13], v.flip(0)[:, :, :13], 12, None, s, w, fmt, quantized=range(6, 10)
    )
    torch.testing.assert_close(_run(layer, q.flip(0)[:, :, 12:13]), want, atol=3e-4, rtol=1e-3)
    layer.crop(-13)  # everything: the next prompt starts from nothing, as in a fresh layer
    assert layer.exact.tokens(0) == 0
    layer.fused_next = True
    layer.update(k[:, :, :7], v[:, :, :7])
    want = _window_reference(q[:, :, :7], k[:, :, :7], v[:, :, :7], 0, None, s, w, fmt)
    torch.testing.assert_close(_run(layer, q[:, :, :7]), want, atol=3e-4, rtol=1e-3)


# Logits up to ~12 here. f32: the fused kernel and transformers' SDPA over the same f16 rows sum in
# different orders and differ by up to 3.1e-4 without windows (torch 2.13, transformers 5.25; about
# 3e-5 of the logits): 5e-4 allowed. bf16: steps of 0.0625 there; each part's output is rounded to
# bf16 before the merge, and the fused and SDPA paths differ by 0.16 without windows: 4 steps allowed.
@pytest.mark.parametrize("dtype, fmt, tol", [(torch.float32, "f16", 5e-4), (torch.bfloat16, "bf16", 0.25)])
def test_float_windows_change_nothing_in_a_model(dtype, fmt, tol):
    """With f16 (bf16) packed rows every store is exact: logits equal the cache without windows,
    fused and fallback (a bf16 model keeps its exact tokens in bf16); no forward's rows outlive it."""
    from hf_models import build

    model = build("qwen3").to(dtype)  # a sliding-window layer among full ones
    ids = torch.randint(1, 96, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    outs = []
    for windows in ({}, {"sink_tokens": 2, "recent_tokens": 5}):
        for patched in (True, False):
            cache = TurboCache(model.config, k=fmt, v=fmt, rotate_k="off", rotate_v="off", **windows)
            with torch.no_grad(), turbokv.patch(model) if patched else contextlib.nullcontext():
                first = model(ids[:, :15], attention_mask=mask[:, :15], **cache_kwargs(model, cache)).logits
                step = model(ids[:, 15:], attention_mask=mask, **cache_kwargs(model, cache)).logits
            outs.append(torch.cat([first, step], 1).float())
            if windows:
                assert all(lay.exact.format == fmt for lay in cache.turbo_layers)
                # A forward's rows (a prompt's are an f16 copy of it) are not held after it.
                assert all(lay.exact.pending is None for lay in cache.turbo_layers)
    for got in outs[1:]:
        torch.testing.assert_close(got, outs[0], atol=tol, rtol=1e-4)


# ---------------------------------------------------------------------- arguments, bits, policies


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sink_tokens": -1}, "sink_tokens: got -1"),
        ({"recent_tokens": True}, "recent_tokens: got True"),
        ({"sink_tokens": 4, "recent_tokens": 61, "max_cache_len": 64}, "at most max_cache_len exact tokens"),
    ],
)
def test_window_arguments_are_checked(kw, match):
    from hf_models import llama

    with pytest.raises((TypeError, ValueError), match=match):
        TurboCache(llama().config, k="q4_0", v="q4_0", **kw)


def test_window_bytes_and_policy_bits():
    layer = TurboLayer(SideSpec("q4_0"), SideSpec("q4_0"), sink_tokens=1, recent_tokens=16)
    layer.update(torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64))
    # Every position has its q4_0 row (36 bytes a side); the 17 exact tokens' f16 rows (128 bytes) come on top.
    assert layer.nbytes() == 2 * (100 * 2 * 36 + 17 * 2 * 128)
    policy = Policy("llama", 2, 2, 64, [LayerPolicy("q4_0", "q4_0")] * 2, sink_tokens=1, recent_tokens=16)
    assert policy.bits_per_value() == pytest.approx(4.5)
    assert policy.bits_per_value(512) == pytest.approx(4.5 + 17 * 16 / 512)


def test_policy_windows_round_trip(tmp_path):
    from hf_models import llama

    config = llama().config
    n = config.num_hidden_layers
    policy = Policy("llama", n, 2, 64, [LayerPolicy("q4_0", "turbo3")] * n, sink_tokens=2, recent_tokens=8)
    policy.save(tmp_path / "p.json")
    cache = TurboCache.from_policy(config, tmp_path / "p.json")
    assert all((lay.sink_tokens, lay.recent_tokens) == (2, 8) for lay in cache.turbo_layers)
    # The static cache keeps them too, unless left out on request.
    static = TurboCache.from_policy(config, tmp_path / "p.json", max_cache_len=64)
    assert all((lay.sink_tokens, lay.recent_tokens, lay.max_cache_len) == (2, 8, 64) for lay in static.turbo_layers)
    static = TurboCache.from_policy(config, tmp_path / "p.json", max_cache_len=64, windows=False)
    assert all((lay.sink_tokens, lay.recent_tokens) == (0, 0) for lay in static.turbo_layers)
    text = (tmp_path / "p.json").read_text().replace('"recent_tokens": 8', '"recent_tokens": -3')
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match="recent_tokens got -3"):
        Policy.load(tmp_path / "bad.json")


@pytest.mark.parametrize("beams, static", [(1, False), (2, False), (1, True), (2, True)])
def test_generate_with_f16_windows_equals_without(beams, static):
    """generate() (greedy and beam search: reorder_cache on the exact stores) through the windows,
    dynamic and static caches: with f16 packed rows nothing is lossy, so the tokens equal a cache
    without windows."""
    from hf_models import build

    model = build("llama64")
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    outs = []
    for windows in ({}, {"sink_tokens": 1, "recent_tokens": 3}):
        kw = dict(k="f16", v="f16", rotate_k="off", rotate_v="off", max_cache_len=32 if static else None)
        cache = TurboCache(model.config, **kw, **windows)
        with torch.no_grad(), turbokv.patch(model):
            outs.append(
                model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=12, do_sample=False, num_beams=beams)
            )
    assert torch.equal(outs[0], outs[1])


def _part(b=2, h=4, s=3, d=8, dtype=torch.float32):
    return torch.randn(b, h, s, d).to(dtype), torch.randn(b, h, s)


@pytest.mark.parametrize(
    "parts, sink_logits, message",
    [
        ([], None, "parts: got \\[\\], expected a non-empty list"),
        ([_part(), (torch.randn(2, 4, 3, 8), torch.randn(2, 4, 1))], None, r"parts\[1\] lse: got .* \(2, 4, 1\)"),
        (
            [_part(), (torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3).double())],
            None,
            r"parts\[1\] lse: got torch.float64",
        ),
        ([_part(), _part(d=16)], None, r"parts\[1\] out: got .* \(2, 4, 3, 16\) on cpu, expected shape \(2, 4, 3, 8\)"),
        ([_part(), (torch.randn(2, 4, 3, 8).long(), torch.randn(2, 4, 3))], None, r"parts\[1\] out: got torch.int64"),
        ([(torch.randn(4, 3, 8), torch.randn(4, 3))], None, r"parts\[0\] out: got .* \(4, 3, 8\)"),
        ([_part()], torch.zeros(1), r"sink_logits: got torch.float32 \(1,\), expected a float tensor of shape \(4,\)"),
        ([_part()], torch.zeros(4, dtype=torch.long), "sink_logits: got torch.int64"),
        ([_part()], [0.0] * 4, "sink_logits: got list"),
    ],
)
def test_merge_attention_checks_like_the_op(parts, sink_logits, message):
    """merge_attention refuses what the op refuses (shapes that would broadcast, a sink per
    nothing), naming the part, instead of a wrong merge or a raw torch error."""
    with pytest.raises(ValueError, match=message):
        turbokv.merge_attention(parts, sink_logits)
