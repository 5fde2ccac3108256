"""TurboCache and the fused attention inside transformers' generate(), on tiny random models."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import device_params
from hf_models import FAMILIES, attention_layers, build, transformers

import turbokv
from turbokv.hf.attention import cache_kwargs, turbokv_attention

MAX_NEW = 12


def prompt(gen, batch=1, length=12):
    return torch.randint(1, 96, (batch, length), generator=gen)


def greedy(model, ids, cache, mask=None, **kw):
    return model.generate(
        ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )


def f16_cache(model):
    return turbokv.TurboCache.for_config(model.config, k="f16", v="f16", rotate_k="on", rotate_v="on")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("patched", [False, True])
def test_f16_with_rotation_equals_dynamic_cache(device, family, patched, gen):
    """f16 storage + rotation on both sides: the same tokens as DynamicCache + SDPA, logits within tolerance."""
    model = build(family).to(device)
    ids = prompt(gen).to(device)
    ref = greedy(model, ids, transformers.DynamicCache(config=model.config))
    calls = turbokv_attention.calls
    if patched:
        with turbokv.patch(model):
            out = greedy(model, ids, f16_cache(model))
        assert turbokv_attention.calls - calls == attention_layers(model) * MAX_NEW  # the fused op ran
    else:
        out = greedy(model, ids, f16_cache(model))
        assert turbokv_attention.calls == calls
    assert torch.equal(out.sequences, ref.sequences)
    # f16 storage of K/V (the reference keeps fp32) moves logits ~1 % of their range after 3 layers;
    # a wrong rotation moves them by their whole range (tests/test_attention.py checks that at op level).
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2.5e-2 * b.abs().max().item())


def left_padded(gen, batch=3, length=10):
    ids = prompt(gen, batch, length)
    mask = torch.ones_like(ids)
    for b, pad in enumerate([0, 3, 6][:batch]):
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama64", "qwen3", "gemma3"])
def test_left_padded_batch_f16_matches_dynamic_cache(family, gen):
    model = build(family)
    ids, mask = left_padded(gen)
    ref = greedy(model, ids, transformers.DynamicCache(config=model.config), mask)
    with turbokv.patch(model):
        out = greedy(model, ids, f16_cache(model), mask)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("family", ["llama128", "mistral", "phi3", "gemma3"])
@pytest.mark.parametrize("k,v", [("turbo3", "turbo3"), ("q4_0", "q4_0"), ("q8_0", "turbo4")])
def test_quantized_patched_equals_unpatched(device, family, k, v, gen):
    """Fused attention on the packed cache and SDPA over its dequantized K/V agree (batch 3, left padding)."""
    model = build(family).to(device)
    ids, mask = (t.to(device) for t in left_padded(gen))
    plain = greedy(model, ids, turbokv.TurboCache(model.config, k=k, v=v), mask)
    with turbokv.patch(model):
        fused = greedy(model, ids, turbokv.TurboCache(model.config, k=k, v=v), mask)
    assert torch.equal(fused.sequences, plain.sequences)
    # Both read the same quantized values, but fp32 rounding differences in one layer's output can flip
    # a quantization index of the next layer's K/V, so logits may move by a quantization step.
    for a, b in zip(fused.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-2 * b.abs().max().item())


@pytest.mark.parametrize("family", ["falcon_h1", "qwen3_5"])
def test_hybrid_beam_search_equals_dynamic_cache(family, gen):
    """Beam search reorders the attention K/V and the recurrent states together (a hybrid layer holds both):
    f16 beams equal DynamicCache's, patched."""
    model = build(family)
    ids, mask = left_padded(gen)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    ref = model.generate(ids, past_key_values=transformers.DynamicCache(config=model.config), **kw)
    with turbokv.patch(model):
        out = model.generate(ids, past_key_values=f16_cache(model), **kw)
    assert torch.equal(out, ref)


def test_minimax_gets_a_cache_of_its_own_class(gen, tmp_path):
    """MiniMax's model takes only a MiniMaxCache: TurboCache.for_config of a MiniMax config builds one
    (TurboCache(config) refuses, naming for_config), and beam
    search on it (batch edits of the lightning-attention states and the packed K/V) gives the beams of a
    MiniMaxCache that reorders its states too (transformers' own reorders only its attention layers, so its
    beams continue from other beams' states), patched; crop and save refuse by name."""
    from hf_models import _family
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    class Reordering(MiniMaxCache):
        def reorder_cache(self, beam_idx):
            super().reorder_cache(beam_idx)
            self.linear_cache = [s if isinstance(s, list) else s.index_select(0, beam_idx) for s in self.linear_cache]

    model = _family("minimax")
    model.set_attn_implementation("sdpa")
    cache = f16_cache(model)
    assert isinstance(cache, MiniMaxCache) and isinstance(cache, turbokv.TurboCache)
    with pytest.raises(TypeError, match=r"minimax config.*TurboCache\.for_config\(config, \.\.\.\), which builds Mini"):
        turbokv.TurboCache(model.config, k="f16", v="f16")
    ids, mask = left_padded(gen)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    ref = model.generate(ids, past_key_values=Reordering(), **kw)
    with turbokv.patch(model):
        out = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    assert any(isinstance(state, torch.Tensor) for state in cache.linear_cache)
    with pytest.raises(RuntimeError, match="crop: MiniMax"):
        cache.crop(-1)
    with pytest.raises(NotImplementedError, match="linear_cache"):
        cache.save(tmp_path / "c.safetensors")
    cache.reset()
    assert cache.linear_cache == [] and cache.get_linear_cache(1) is None


@pytest.mark.parametrize("patched", [False, True])
def test_beam_search_and_sampling_run(patched, gen):
    model = build("llama64")
    ids, mask = left_padded(gen)
    ctx = turbokv.patch(model) if patched else None
    try:
        beams = model.generate(
            ids,
            attention_mask=mask,
            past_key_values=turbokv.TurboCache(model.config),
            max_new_tokens=6,
            num_beams=3,
            do_sample=False,
        )
        torch.manual_seed(0)
        sampled = model.generate(
            ids,
            attention_mask=mask,
            past_key_values=turbokv.TurboCache(model.config),
            max_new_tokens=6,
            do_sample=True,
            top_k=20,
        )
    finally:
        if ctx is not None:
            turbokv.unpatch(model)
    assert beams.shape == (3, 16) and sampled.shape == (3, 16)
    # f16 beams equal DynamicCache beams: reorder_cache keeps the right rows.
    ref = model.generate(
        ids,
        attention_mask=mask,
        past_key_values=transformers.DynamicCache(config=model.config),
        max_new_tokens=6,
        num_beams=3,
        do_sample=False,
    )
    with turbokv.patch(model):
        f16 = model.generate(
            ids, attention_mask=mask, past_key_values=f16_cache(model), max_new_tokens=6, num_beams=3, do_sample=False
        )
    assert torch.equal(f16, ref)


def test_crop_then_refeed_reproduces_logits(gen):
    model = build("llama64")
    ids = prompt(gen, 1, 16)
    with turbokv.patch(model):
        cache = turbokv.TurboCache(model.config, k="turbo4", v="turbo4")
        full = model(ids, past_key_values=cache).logits
        assert cache.get_seq_length() == 16
        cache.crop(-5)
        assert cache.get_seq_length() == 11
        again = model(ids[:, 11:], past_key_values=cache).logits
    torch.testing.assert_close(again, full[:, 11:], rtol=0, atol=1e-4)


def test_multi_turn_continues_on_the_same_cache(gen):
    model = build("qwen3")
    ids = prompt(gen)
    ref_cache, cache = transformers.DynamicCache(config=model.config), f16_cache(model)
    with turbokv.patch(model):
        first = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
        turn2 = torch.cat([first, prompt(gen, 1, 4)], dim=1)
        second = model.generate(turn2, past_key_values=cache, max_new_tokens=5, do_sample=False)
    r1 = model.generate(ids, past_key_values=ref_cache, max_new_tokens=5, do_sample=False)
    r2 = model.generate(torch.cat([r1, turn2[:, -4:]], 1), past_key_values=ref_cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(first, r1) and torch.equal(second, r2)
    assert cache.get_seq_length() == second.shape[1] - 1


def test_memory_and_repr(gen):
    model = build("llama128")
    cache = turbokv.TurboCache(model.config, k="turbo3", v="turbo3")
    model(prompt(gen, 2, 40), past_key_values=cache)
    assert cache.nbytes() == 3 * 2 * 2 * 40 * (50 + 50)  # layers x batch x heads x tokens x bytes
    assert cache.nbytes() / cache.f16_nbytes() == pytest.approx(100 / 512)
    text = repr(cache)
    assert "k=turbo3 v=turbo3" in text and "40 tokens" in text and "0.195x f16" in text and "3.125" in text


def test_layer_presets_and_overrides():
    model = build("llama64")
    cache = turbokv.TurboCache(model.config, k="turbo2", v="turbo3", keep_first=1, overrides={2: ("q8_0", "turbo4")})
    specs = [(lay.k_spec.format, lay.v_spec.format) for lay in cache.layers]
    assert specs == [("q8_0", "q8_0"), ("turbo2", "turbo3"), ("q8_0", "turbo4")]


def test_patch_is_idempotent_and_reversible():
    model = build("llama64")
    assert model.config._attn_implementation == "sdpa"
    handle = turbokv.patch(model)
    turbokv.patch(model)
    assert model.config._attn_implementation == "turbokv"
    assert handle.config is model.config  # the handle behaves as the model
    turbokv.unpatch(handle)
    assert model.config._attn_implementation == "sdpa"
    turbokv.unpatch(model)  # a second unpatch is a no-op
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_inputs_are_named(gen):
    model = build("llama64")
    model.config.kv_lora_rank = 32  # as DeepSeek-V3's config says it
    with pytest.raises(NotImplementedError, match=r"fused: multi-head latent attention \(MLA, kv_lora_rank\)"):
        turbokv.patch(model)
    assert model.config._attn_implementation == "sdpa"  # refused before it touched the model
    with pytest.raises(ValueError, match=r"config: got kv_lora_rank=32 \(llama\): multi-head latent attention"):
        turbokv.TurboCache(model.config)
    # A layer type turbokv does not know (DeepSeek-V4's compressed attention): named.
    cfg = transformers.LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "compressed_sparse_attention"])
    with pytest.raises(ValueError, match=r"layer_types\[1\]: got 'compressed_sparse_attention'"):
        turbokv.TurboCache(cfg)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, layer_types=["linear_attention", "conv"])
    with pytest.raises(ValueError, match="expected some attention layers"):
        turbokv.TurboCache(cfg)
    layer = turbokv.TurboLayer(turbokv.hf.layer.SideSpec("turbo3"), turbokv.hf.layer.SideSpec("turbo3"))
    with pytest.raises(ValueError, match="MLA"):
        layer.update(torch.randn(1, 1, 2, 192), torch.randn(1, 1, 2, 128))
    with pytest.raises(ValueError, match="rotate: got 'maybe'"):
        turbokv.hf.layer.SideSpec("turbo3", "maybe")
    model = build("llama64")
    turbokv.hf.attention.register()
    model.set_attn_implementation("turbokv")  # the attention function without patch()'s binding hooks
    with pytest.raises(RuntimeError, match="LlamaAttention was not bound to a cache"):
        model(prompt(gen), past_key_values=turbokv.TurboCache(model.config))


# ---------------------------------------------------------------- static capacity, compiled decoding


def static_cache(model, k="f16", v="f16", n=64, **kw):
    return turbokv.TurboCache(model.config, k=k, v=v, rotate_k="on", rotate_v="on", max_cache_len=n, **kw)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("family", ["llama64", "qwen3", "gemma3"])
@pytest.mark.parametrize("patched", [False, True])
def test_static_cache_equals_dynamic(device, family, patched, gen):
    """max_cache_len (preallocated buffers, device-side token count) gives the dynamic TurboCache's tokens.

    Left-padded batch of 3; f16 storage with rotation and q4_0/turbo3; sliding layers (qwen3, gemma3).
    """
    model = build(family).to(device)
    ids, mask = (t.to(device) for t in left_padded(gen))
    with turbokv.patch(model) if patched else contextlib.nullcontext():
        for k, v in [("f16", "f16"), ("q4_0", "turbo3")]:
            dyn = greedy(model, ids, turbokv.TurboCache(model.config, k=k, v=v, rotate_k="on", rotate_v="on"), mask)
            st = greedy(model, ids, static_cache(model, k, v), mask, disable_compile=True)
            assert torch.equal(st.sequences, dyn.sequences), (k, v)
            for a, b in zip(st.scores, dyn.scores, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())


def compile_config(device: str):
    """generate()'s compile settings: CUDA graphs on the GPU; on the CPU, fullgraph tracing only
    (aot_eager: proves no graph break and that every op has a fake kernel, without inductor's minutes)."""
    if device == "cuda":
        return transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    cfg = transformers.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    cfg._compile_all_devices = True  # generate() compiles on CUDA-like devices only unless told
    return cfg


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("windows", [{}, {"sink_tokens": 1, "recent_tokens": 4}])
def test_static_cache_compiled_generation_matches_eager(device, windows, gen):
    """generate() compiles the decode step for a static TurboCache (fullgraph) and gives the eager
    tokens; with exact sink and recent tokens too (what the shipped policies keep)."""
    torch._dynamo.reset()
    model = build("llama64").to(device)
    ids, mask = (t.to(device) for t in left_padded(gen))
    with turbokv.patch(model):
        eager = greedy(model, ids, static_cache(model, "q4_0", "turbo3", **windows), mask, disable_compile=True)
        cache = static_cache(model, "q4_0", "turbo3", **windows)
        # The cache's key among generate()'s model kwargs: "past_key_values" in transformers 5.17,
        # "cache" in 5.24.
        assert cache.is_compileable and model._valid_auto_compile_criteria(
            {"past_key_values": cache, "cache": cache},
            transformers.GenerationConfig(compile_config=compile_config(device)),
        )
        calls = turbokv_attention.calls
        compiled = greedy(model, ids, cache, mask, compile_config=compile_config(device))
        # Eager calls: the prefill only (the compiled decode steps do not run the Python function).
        assert turbokv_attention.calls - calls == model.config.num_hidden_layers
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())
    assert int(cache.get_seq_length()) == ids.shape[1] + MAX_NEW - 1


def test_static_cache_bookkeeping_and_overflow(gen):
    model = build("llama64")
    cache = static_cache(model, "turbo3", "turbo3", n=20)
    assert cache.get_max_length() == 20 and not cache.layers[0].is_initialized
    with turbokv.patch(model):
        model(prompt(gen, 2, 16), past_key_values=cache)
        before = [(lay.k_packed.clone(), lay.v_packed.clone()) for lay in cache.layers]
        assert int(cache.get_seq_length()) == 16 and "16 tokens" in repr(cache)
        with pytest.raises(ValueError, match="positions"):
            model(prompt(gen, 2, 5), past_key_values=cache)  # 16 + 5 > 20 slots
        layer = cache.layers[0]
        assert torch.equal(layer.k_packed, before[0][0]) and torch.equal(layer.v_packed, before[0][1])
        assert layer.k_packed.shape[2] == 20  # never grown
        cache.crop(-6)
        assert int(cache.get_seq_length()) == 10
        cache.reset()
        assert int(cache.get_seq_length()) == 0
    with pytest.raises(ValueError, match="max_cache_len: got 0"):
        turbokv.TurboCache(model.config, max_cache_len=0)


def test_cache_kwargs_follows_the_models_forward():
    """cache_kwargs names the argument the model's forward takes: cache= (transformers >= 5.24)
    or past_key_values= (before)."""

    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    class After(torch.nn.Module):
        def forward(self, input_ids, cache=None): ...

    marker = object()
    assert turbokv.hf.attention.cache_kwargs(Before(), marker) == {"past_key_values": marker}
    assert turbokv.hf.attention.cache_kwargs(After(), marker) == {"cache": marker}


# ---------------------------------------------------------------- hybrid models


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "lfm2", "falcon_h1", "nemotron_h"])
def test_hybrid_keeps_transformers_state_layers(family, gen):
    """Linear-attention / conv layers keep transformers' own cache layer (what DynamicCache builds);
    the attention layers are compressed: a left-padded batch, a second turn on the same cache and a
    static cache give DynamicCache's tokens, patched, and the byte counts cover attention only."""
    model = build(family)
    ref_cache = transformers.DynamicCache(config=model.config)
    cache = f16_cache(model)
    kinds = [type(a) is type(b) for a, b in zip(cache.layers, ref_cache.layers, strict=True)]
    n_attn = attention_layers(model)
    assert kinds.count(False) == n_attn and len(cache.turbo_layers) == n_attn
    ids, mask = left_padded(gen)
    ref = greedy(model, ids, ref_cache, mask)
    with turbokv.patch(model):
        calls = turbokv_attention.calls
        out = greedy(model, ids, cache, mask)
        assert turbokv_attention.calls - calls == n_attn * MAX_NEW
        static = greedy(model, ids, static_cache(model), mask)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(static.sequences, ref.sequences)
    tokens = cache.get_seq_length()
    assert tokens == out.sequences.shape[1] - 1
    d = cache.turbo_layers[0].head_dim
    assert cache.f16_nbytes() == n_attn * 3 * model.config.num_key_value_heads * tokens * d * 2 * 2
    state = sum(kind in turbokv.hf.layer.STATE_LAYER_TYPES for kind in cache.layer_types)
    hybrid = sum(kind in turbokv.hf.layer.HYBRID_LAYER_TYPES for kind in cache.layer_types)
    assert (f"({state} with transformers' state layers)" in repr(cache)) == bool(state)
    assert (f"({hybrid} hybrid, with a recurrent state" in repr(cache)) == bool(hybrid)
    # The next turn of a chat continues on the same caches.
    extra, kw = prompt(gen, 1, 4), dict(max_new_tokens=4, do_sample=False)
    r_cache, t_cache = transformers.DynamicCache(config=model.config), f16_cache(model)
    r1 = model.generate(ids[:1], past_key_values=r_cache, **kw)
    with turbokv.patch(model):
        t1 = model.generate(ids[:1], past_key_values=t_cache, **kw)
        t2 = model.generate(torch.cat([t1, extra], 1), past_key_values=t_cache, **kw)
    r2 = model.generate(torch.cat([r1, extra], 1), past_key_values=r_cache, **kw)
    assert torch.equal(t1, r1) and torch.equal(t2, r2)


def _state_snapshot(cache) -> list:
    """Every layer's counters and tensors, cloned: what an edit that raises must leave as it was."""
    snap = []
    for layer in cache.layers:
        fields = vars(layer)
        tensors = [t.clone() for t in fields.values() if isinstance(t, torch.Tensor)]
        for name in ("conv_states", "recurrent_states"):
            tensors += [t.clone() for t in getattr(layer, name, None) or [] if isinstance(t, torch.Tensor)]
        numbers = {k: v for k, v in fields.items() if isinstance(v, int)}  # counters (bools too)
        snap.append((numbers, tensors))
    return snap


def _same(a, b) -> bool:
    return all(
        n1 == n2 and len(t1) == len(t2) and all(torch.equal(x, y) for x, y in zip(t1, t2, strict=True))
        for (n1, t1), (n2, t2) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("family", ["qwen3_5", "lfm2"])
def test_hybrid_edits_that_raise_change_nothing(family, gen):
    """On a hybrid model (attention layers beside linear-attention / conv states), crop without
    recorded past states, batch edits with indices out of range and a step with another batch size
    raise before any layer changes; the next step of the held batch is what it would have been."""
    model = build(family)
    ids, mask = left_padded(gen)
    cache = f16_cache(model)
    with turbokv.patch(model), torch.no_grad():
        model(ids[:, :-1], attention_mask=mask[:, :-1], **cache_kwargs(model, cache))
        before = _state_snapshot(cache)
        with pytest.raises(RuntimeError, match="does not record its past"):
            cache.crop(-1)
        assert _same(_state_snapshot(cache), before)
        with pytest.raises(IndexError, match="expected indices of the 3 sequences held"):
            cache.batch_select_indices(torch.tensor([0, 5]))
        with pytest.raises(IndexError, match="beam_idx"):
            cache.reorder_cache(torch.tensor([2, 1, 3]))
        assert _same(_state_snapshot(cache), before)
        with pytest.raises(ValueError, match="got a batch of 2 sequences, expected the 3 .* a new batch needs"):
            model(ids[:2, -1:], attention_mask=mask[:2], **cache_kwargs(model, cache))
        assert _same(_state_snapshot(cache), before)
        got = model(ids[:, -1:], attention_mask=mask, **cache_kwargs(model, cache)).logits
        fresh = f16_cache(model)
        model(ids[:, :-1], attention_mask=mask[:, :-1], **cache_kwargs(model, fresh))
        want = model(ids[:, -1:], attention_mask=mask, **cache_kwargs(model, fresh)).logits
    assert torch.equal(got, want)
