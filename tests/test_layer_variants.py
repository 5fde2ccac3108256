"""Attention layer variants beyond full and sliding-window: chunked attention (Llama 4), NoPE layers
(Llama 4, SmolLM3) and KV sharing between layers (Gemma 3n), at op level and in tiny random models.

Model tests: f16 storage with rotation on both sides generates the same tokens as DynamicCache + SDPA,
patched and unpatched, on a left-padded batch of two and a second turn that continues from the cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import device_params
from hf_models import COMMON, transformers
from transformers.masking_utils import chunked_causal_mask_function, sdpa_mask

import turbokv
from turbokv.hf import layer as turbo_layer
from turbokv.hf.attention import _chunk_cuts, _fused_attention, cache_kwargs, turbokv_attention
from turbokv.hf.layer import SideSpec, TurboLayer

MAX_NEW = 8
CHUNK = 8

# ---------------------------------------------------------------------- tiny models


def llama4(chunk: int = CHUNK):
    """Layers 0, 2 chunked attention with RoPE; 1, 3 full attention without RoPE (NoPE, temperature-tuned)."""
    cfg = transformers.Llama4TextConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size_mlp=128,
        num_local_experts=2,
        attention_chunk_size=chunk,
        no_rope_layer_interval=2,
        **{**COMMON, "num_hidden_layers": 4},
    )
    return transformers.Llama4ForCausalLM(cfg)


def smollm3():
    """NoPE in layers 1 and 3 (no_rope_layers 0 there), RoPE in 0 and 2."""
    cfg = transformers.SmolLM3Config(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        no_rope_layers=[1, 0, 1, 0],
        **{**COMMON, "num_hidden_layers": 4},
    )
    return transformers.SmolLM3ForCausalLM(cfg)


def gemma3n():
    """Six layers, sliding / full alternating; the last two read layers 2 and 3's K/V (num_kv_shared_layers=2).

    AltUp, LAuReL and per-layer inputs are all there, at small sizes.
    """
    kw = {key: value for key, value in COMMON.items() if key != "intermediate_size"}
    cfg = transformers.Gemma3nTextConfig(
        hidden_size=128,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 3,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=96,
        laurel_rank=8,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 6,
        **{**kw, "num_hidden_layers": 6},
    )
    return transformers.Gemma3nForCausalLM(cfg)


def build(factory, seed: int = 0):
    torch.manual_seed(seed)
    try:
        model = factory().eval()
    except AttributeError as e:  # a family this transformers does not have
        pytest.skip(f"transformers {transformers.__version__}: {e}")
    model.set_attn_implementation("sdpa")
    return model


def dynamic_cache(model):
    return transformers.DynamicCache(config=model.config)


def f16_cache(model) -> turbokv.TurboCache:
    return turbokv.TurboCache(model.config, k="f16", v="f16", rotate_k="on", rotate_v="on")


def two_turns(model, make_cache, gen, prompt_len: int = 30, pads=(0, 5), second_len: int = 11):
    """Greedy tokens of a left-padded batch of two, then of a second turn (new tokens appended to each
    row) that continues from the same cache. Returns (tokens, the cache)."""
    ids = torch.randint(1, 96, (len(pads), prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    for b, pad in enumerate(pads):
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    cache = make_cache()
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, **cache_kwargs(model, cache))
    first = model.generate(ids, attention_mask=mask, **kw)
    more = torch.randint(1, 96, (len(pads), second_len), generator=gen)
    ids2 = torch.cat([first, more], dim=1)
    mask2 = torch.cat([mask, torch.ones(len(pads), ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    second = model.generate(ids2, attention_mask=mask2, **kw)
    return second, cache


def assert_same_tokens_as_dynamic_cache(model, seed: int, patched: bool, **kw) -> tuple[torch.Tensor, object]:
    """f16 TurboCache (patched or not) vs DynamicCache: the same tokens. Returns them and the TurboCache."""
    ref, _ = two_turns(model, lambda: dynamic_cache(model), torch.Generator().manual_seed(seed), **kw)
    calls = turbokv_attention.calls
    if patched:
        with turbokv.patch(model):
            out, cache = two_turns(model, lambda: f16_cache(model), torch.Generator().manual_seed(seed), **kw)
        # every layer of every forward (two turns of MAX_NEW) ran turbokv's fused attention
        assert turbokv_attention.calls - calls == model.config.num_hidden_layers * 2 * MAX_NEW
    else:
        out, cache = two_turns(model, lambda: f16_cache(model), torch.Generator().manual_seed(seed), **kw)
        assert turbokv_attention.calls == calls
    assert out.shape == ref.shape
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} tokens differ"
    return out, cache


# ---------------------------------------------------------------------- chunked attention: the op split


def chunked_reference(q, layer: TurboLayer, starts: torch.Tensor, chunk: int) -> torch.Tensor:
    """fp64 attention over ``layer``'s dequantized K/V with transformers' chunked causal mask (chunks counted
    from each sequence's first valid token), for the last ``Sq`` positions. ``(B, Hq, Sq, d)``."""
    k, v = (t.double().cpu() for t in layer.dequantized())
    b, hq, sq, d = q.shape
    t = k.shape[2]
    mask = sdpa_mask(
        batch_size=b,
        q_length=sq,
        kv_length=t,
        q_offset=t - sq,
        mask_function=chunked_causal_mask_function(chunk, starts.cpu()),
        attention_mask=torch.arange(t)[None] >= starts.cpu()[:, None],
        allow_is_causal_skip=False,
    )
    groups = hq // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q.double().cpu() @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~mask, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding queries see no key: zeros, as the op gives
    return probs @ v


def test_chunk_cuts():
    # queries 10..29, chunks of 8 counted from 0 (cuts 16, 24) and from 5 (cuts 13, 21, 29)
    assert _chunk_cuts(10, 30, [0, 5], 8) == [10, 13, 16, 21, 24, 29, 30]
    # queries before a sequence's first token: its start is a cut too
    assert _chunk_cuts(0, 12, [0, 3], 8) == [0, 3, 8, 11, 12]
    assert _chunk_cuts(7, 8, [0], 8) == [7, 8]  # one query: one run


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("formats", [("f16", "f16"), ("q8_0", "turbo3")])
def test_chunked_op_split_matches_chunked_mask(device, formats, gen):
    """The fused path of a chunked layer (one op call per run of queries within one chunk) equals attention
    with transformers' chunked mask on the same packed cache: a left-padded prompt, a second prompt after it,
    and decode steps across a chunk boundary."""
    b, hkv, hq, d, chunk = 2, 2, 4, 64, 8
    layer = TurboLayer(SideSpec(formats[0]), SideSpec(formats[1]), chunk_size=chunk)
    starts = torch.tensor([0, 5], device=device)
    checked_plain_differs = False
    for sq in (27, 9, 1, 1, 1, 1, 1):  # 27 + 9 = 36: decode crosses the boundary at 37 (pad 5) and 40 (pad 0)
        layer.update(*(torch.randn(b, hkv, sq, d, generator=gen).to(device) for _ in range(2)))
        q = torch.randn(b, hq, sq, d, generator=gen).to(device)
        got = _fused_attention(q, layer, starts, scale=1 / math.sqrt(d))
        expected = chunked_reference(q, layer, starts, chunk)
        torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=2e-4)
        if sq > chunk:
            # the mask matters here: the plain causal op is far from it
            plain = turbokv.core.ops.attention(
                q,
                layer.k_packed,
                layer.v_packed,
                layer.lengths(),
                starts,
                k_format=formats[0],
                v_format=formats[1],
                k_rot=layer.k_rot,
                v_rot=layer.v_rot,
            )
            assert (plain.double().cpu() - expected).abs().max() > 0.1
            checked_plain_differs = True
    assert checked_plain_differs


def test_chunked_layer_type_accepted_and_checked():
    model = build(llama4)
    cache = f16_cache(model)
    chunked = [i for i, t in enumerate(model.config.layer_types) if t == "chunked_attention"]
    assert chunked == [0, 2]
    assert [cache.layers[i].chunk_size for i in range(4)] == [CHUNK, None, CHUNK, None]
    assert all(cache.layers[i].is_sliding for i in chunked)  # as transformers' caches mark chunked layers
    config = model.config
    config.attention_chunk_size = None
    with pytest.raises(ValueError, match="config.attention_chunk_size: got None, expected a positive int"):
        turbokv.TurboCache(config)


# ---------------------------------------------------------------------- chunked attention and NoPE in models


@pytest.mark.parametrize("patched", [False, True])
def test_llama4_chunked_and_nope_equal_dynamic_cache(patched):
    """Llama 4: chunks of 8 over prompts of 30 and a second turn of 11 (runs cut by both sequences' chunk
    starts), NoPE + temperature tuning in the full-attention layers."""
    model = build(llama4)
    assert model.config.no_rope_layers == [1, 0, 1, 0]
    assert_same_tokens_as_dynamic_cache(model, seed=1, patched=patched)


def windowed_two_turns(model, seed: int) -> object:
    """Two turns with an f16 TurboCache keeping 2 sink + 5 recent tokens exact, patched: the same tokens
    as DynamicCache's (nothing is lossy). Returns the cache."""
    ref, _ = two_turns(model, lambda: dynamic_cache(model), torch.Generator().manual_seed(seed))

    def windowed():
        return turbokv.TurboCache(
            model.config, k="f16", v="f16", rotate_k="off", rotate_v="off", sink_tokens=2, recent_tokens=5
        )

    with turbokv.patch(model):
        out, cache = two_turns(model, windowed, torch.Generator().manual_seed(seed))
    assert all(layer.exact is not None for layer in cache.turbo_layers)
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} tokens differ"
    return cache


def test_llama4_chunked_with_exact_windows():
    """Exact token windows on chunked layers (the chunk start bounds all three parts, as left padding
    does): with f16 rows the two turns' tokens equal DynamicCache's."""
    windowed_two_turns(build(llama4), seed=1)


def test_kv_shared_layers_read_their_sources_exact_windows():
    """Gemma 3n's last layers read layers 2 and 3's K/V in the same forward: with exact token windows
    they read the source's exact rows of that forward too (kept until the forward ends, then
    dropped), so with f16 rows the two turns' tokens equal DynamicCache's."""
    cache = windowed_two_turns(build(gemma3n), seed=3)
    assert cache.kv_sources and all(layer.exact.pending is None for layer in cache.turbo_layers)


def test_llama4_test_sees_the_chunks():
    """The model test can fail: the same run with the chunking switched off gives other tokens."""
    model = build(llama4)
    ref, _ = two_turns(model, lambda: dynamic_cache(model), torch.Generator().manual_seed(1))

    def unchunked():
        cache = f16_cache(model)
        for layer in cache.turbo_layers:
            layer.chunk_size = None
        return cache

    with turbokv.patch(model):
        out, _ = two_turns(model, unchunked, torch.Generator().manual_seed(1))
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("patched", [False, True])
def test_smollm3_nope_equal_dynamic_cache(patched):
    model = build(smollm3)
    assert model.config.no_rope_layers == [1, 0, 1, 0]
    assert_same_tokens_as_dynamic_cache(model, seed=2, patched=patched)


# ---------------------------------------------------------------------- KV sharing


def test_kv_sources_follow_transformers():
    config = build(gemma3n).config
    sources = turbo_layer.kv_sources(config)
    assert sources == {4: 2, 5: 3}
    modes = getattr(config, "kv_sharing_modes", None)  # transformers >= 5.2x marks them
    if modes is not None:
        assert [i for i, m in enumerate(modes) if m == "reuse"] == sorted(sources)
        assert {i for i, m in enumerate(modes) if m == "store"} == set(sources.values())


@pytest.mark.parametrize("patched", [False, True])
def test_gemma3n_kv_sharing_equals_dynamic_cache(patched):
    """Gemma 3n: the shared layers read their source layers' packed cache; no cache of their own."""
    model = build(gemma3n)
    _, cache = assert_same_tokens_as_dynamic_cache(model, seed=3, patched=patched)
    assert len(cache.turbo_layers) == 4  # layers 4 and 5 hold nothing
    assert [cache.layers[i] for i in range(4)] == cache.turbo_layers
    tokens = cache.get_seq_length()
    b, h, d = 2, model.config.num_key_value_heads, model.config.head_dim
    assert cache.nbytes() == 4 * b * h * tokens * 2 * d * 2  # f16 K and V of four layers, not six


def test_gemma3n_patched_with_dynamic_cache():
    """A patched model keeps working with other caches: the shared layers get their sources' masks."""
    model = build(gemma3n)
    ref, _ = two_turns(model, lambda: transformers.DynamicCache(config=model.config), torch.Generator().manual_seed(4))
    fallback = turbokv_attention.fallback_calls
    with turbokv.patch(model):
        out, _ = two_turns(
            model, lambda: transformers.DynamicCache(config=model.config), torch.Generator().manual_seed(4)
        )
    assert turbokv_attention.fallback_calls - fallback == 6 * 2 * MAX_NEW
    assert torch.equal(out, ref)


def test_kv_sharing_refusals():
    config = build(gemma3n).config
    with pytest.raises(ValueError, match="overrides: got layer index 5, a KV-shared layer .* layer 3"):
        turbokv.TurboCache(config, overrides={5: ("q8_0", "q8_0")})
    config.num_kv_shared_layers = 6
    with pytest.raises(ValueError, match="config.num_kv_shared_layers: got 6, expected 0 <= num_kv_shared_layers < 6"):
        turbokv.TurboCache(config)
