"""TurboCache / TurboLayer / patch() never give a silently wrong answer: each misuse either
raises an error that names the argument, or gives the reference result.

One test per root cause: fixed batch shape per layer, masks that are not left padding,
constructor validation, the explicit binding of cache layers to attention modules, and
``turbokv.hf.attention`` reachable after ``import turbokv``.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from hf_models import build, transformers

import turbokv
from turbokv.hf.attention import cache_kwargs, turbokv_attention


def f16_cache(config, **kw):
    return turbokv.TurboCache(config, k="f16", v="f16", rotate_k="on", rotate_v="on", **kw)


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor):
    # f16 storage of K/V moves logits by ~1 % of their range (tests/test_hf.py); attending to one
    # wrong token moves them by far more.
    torch.testing.assert_close(got, ref, rtol=0, atol=2.5e-2 * ref.abs().max().item())


def greedy(model, ids, cache, mask=None, n=6):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **cache_kwargs(model, cache),
    )


# ---------------------------------------------------------------- 1. fixed batch shape per layer


def test_layer_shape_is_fixed_until_reset(gen):
    """A second batch size, head count, head dim or dtype is refused (it used to be broadcast into the
    first batch's rows: sequence 1 attended to sequence 0's history); reset() allows a new batch."""
    model = build("llama64")
    ids1, ids2 = torch.randint(1, 96, (1, 8), generator=gen), torch.randint(1, 96, (2, 8), generator=gen)
    cache = f16_cache(model.config)
    model(ids1, **cache_kwargs(model, cache))
    with pytest.raises(ValueError, match=r"key_states: got batch size 2, expected 1.*cache\.reset\(\)"):
        model(ids2, **cache_kwargs(model, cache))

    layer = cache.layers[0]
    k = torch.randn(1, 2, 1, 64)
    for bad, match in [
        (torch.randn(1, 3, 1, 64), "key_states: got kv head count 3, expected 2"),
        (torch.randn(1, 2, 1, 128), "key_states: got head dim 128, expected 64"),
        (k.double(), "key_states: got dtype torch.float64, expected torch.float32"),
    ]:
        with pytest.raises(ValueError, match=match):
            layer.update(bad, bad.clone())
    with pytest.raises(ValueError, match=r"value_states: got \(batch, heads, tokens\) \(2, 2, 1\)"):
        layer.update(k, torch.randn(2, 2, 1, 64))

    # reset(): the next update starts a new batch, with the logits of a fresh cache.
    cache.reset()
    again = model(ids2, **cache_kwargs(model, cache)).logits
    fresh = model(ids2, **cache_kwargs(model, f16_cache(model.config))).logits
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)

    # Beam search changes the batch legitimately: batch_repeat_interleave records the new size.
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].batch_size == 4
    model(torch.randint(1, 96, (4, 1), generator=gen), **cache_kwargs(model, cache))
    cache.batch_select_indices(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="key_states: got batch size 4, expected 2"):
        model(torch.randint(1, 96, (4, 1), generator=gen), **cache_kwargs(model, cache))

    # Static capacity: a reset keeps the buffers' addresses for the same shape (CUDA graphs replay on
    # them) and reallocates for a new one.
    static = f16_cache(model.config, max_cache_len=32)
    model(ids1, **cache_kwargs(model, static))
    ptr = static.layers[0].k_packed.data_ptr()
    static.reset()
    model(ids1, **cache_kwargs(model, static))
    assert static.layers[0].k_packed.data_ptr() == ptr and int(static.get_seq_length()) == 8
    static.reset()
    model(ids2, **cache_kwargs(model, static))
    assert static.layers[0].batch_size == 2


# ---------------------------------------------------------------- 2. masks that are not left padding


def test_masks_other_than_left_padding_match_sdpa(gen):
    """A mask with a hole, or right padding, gives DynamicCache + SDPA's logits and tokens (the fused
    path used to read every 2D mask as left-padding starts and attend to the masked tokens); plain
    left padding, dynamic or static, still runs fused."""
    model = build("qwen3")  # full and sliding layers
    ids = torch.randint(1, 96, (2, 12), generator=gen)
    hole, right, left = (torch.ones_like(ids) for _ in range(3))
    hole[0, 3:6] = 0
    hole[1, 1] = 0
    right[0, 9:] = 0
    left[1, :4] = 0
    for mask in (hole, right):
        ref = greedy(model, ids, transformers.DynamicCache(config=model.config), mask)
        with turbokv.patch(model):
            fused, fallback = turbokv_attention.calls, turbokv_attention.fallback_calls
            out = greedy(model, ids, f16_cache(model.config), mask)
            assert turbokv_attention.calls == fused and turbokv_attention.fallback_calls > fallback
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.scores, ref.scores, strict=True):
            assert_logits_close(a, b)

    # Left padding; for the static cache, as wide as its slots: the zeros after the last token are
    # unused slots, not holes.
    layers = model.config.num_hidden_layers
    static_width = torch.cat([left, torch.zeros(2, 20, dtype=left.dtype)], dim=1)
    ref = model(ids, attention_mask=left, **cache_kwargs(model, transformers.DynamicCache(config=model.config)))
    for cache, mask in ((f16_cache(model.config), left), (f16_cache(model.config, max_cache_len=32), static_width)):
        with turbokv.patch(model):
            fused, fallback = turbokv_attention.calls, turbokv_attention.fallback_calls
            out = model(ids, attention_mask=mask, **cache_kwargs(model, cache))
            assert turbokv_attention.calls - fused == layers and turbokv_attention.fallback_calls == fallback
        assert_logits_close(out.logits[1, 4:], ref.logits[1, 4:])
        assert_logits_close(out.logits[0], ref.logits[0])


# ---------------------------------------------------------------- 3. constructor validation


BAD_ARGUMENTS = [
    ({"k": "turbo9"}, ValueError, r"^k: got 'turbo9', expected one of"),
    ({"v": 3}, TypeError, r"^v: got 3 \(int\), expected a format name"),
    ({"keep_format": "q9_0"}, ValueError, r"^keep_format: got 'q9_0'"),
    ({"rotate_k": "yes"}, ValueError, r"^rotate_k: got 'yes', expected one of \('auto', 'on', 'off'\)"),
    ({"rotate_v": None}, ValueError, r"^rotate_v: got None"),
    ({"overrides": [(0, ("q8_0", "q8_0"))]}, TypeError, r"^overrides: got list \[\(0, .*expected a dict"),
    ({"overrides": {3: ("q8_0", "q8_0")}}, ValueError, r"^overrides: got layer index 3, expected 0 <= index < 3"),
    ({"overrides": {-1: ("q8_0", "q8_0")}}, ValueError, r"^overrides: got layer index -1"),
    ({"overrides": {True: ("q8_0", "q8_0")}}, TypeError, r"^overrides: got layer index True \(bool\)"),
    ({"overrides": {1: "q8_0"}}, TypeError, r"^overrides\[1\]: got 'q8_0', expected a \(k_format, v_format\)"),
    ({"overrides": {1: ("q8_0", "turbo7")}}, ValueError, r"^overrides\[1\]: got v format 'turbo7'"),
    ({"keep_first": -1}, ValueError, r"^keep_first: got -1, expected 0 <= keep_first <= 3"),
    ({"keep_last": 4}, ValueError, r"^keep_last: got 4, expected 0 <= keep_last <= 3"),
    ({"keep_last": 1.0}, TypeError, r"^keep_last: got 1.0 \(float\), expected an int"),
    ({"max_cache_len": 0}, ValueError, r"^max_cache_len: got 0, expected a positive"),
    ({"max_cache_len": True}, TypeError, r"^max_cache_len: got True \(bool\), expected an int"),
    ({"max_cache_len": 64.0}, TypeError, r"^max_cache_len: got 64.0 \(float\)"),
]


def test_constructor_arguments_are_validated():
    """Every constructor argument is checked; the error names the argument, the value and what was expected
    (an overrides list used to be ignored, negative counts and bad unused formats accepted)."""
    config = build("llama64").config
    for kwargs, error, match in BAD_ARGUMENTS:
        with pytest.raises(error, match=match):
            turbokv.TurboCache(config, **kwargs)


# ---------------------------------------------------------------- 4. explicit binding of layers to modules


def test_cache_layers_are_bound_to_the_patched_modules(gen):
    """Fused or dequantized is decided by the (un)patched model, not by a config copy or global registries:
    copied configs, deep copies and pickles work; a DynamicCache works on a patched model; a cache with
    another layer count is refused with both counts; unpatch() removes the hooks."""
    model = build("llama64")
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    ids = torch.randint(1, 96, (1, 10), generator=gen)
    ref = greedy(model, ids, transformers.DynamicCache(config=model.config))

    before_patch = f16_cache(copy.deepcopy(model.config))
    with turbokv.patch(model):
        during_patch = f16_cache(copy.deepcopy(model.config))
        fused = turbokv_attention.calls
        assert torch.equal(greedy(model, ids, before_patch).sequences, ref.sequences)
        assert turbokv_attention.calls > fused
        # A patched model with another cache runs SDPA on its plain tensors.
        for other in (transformers.DynamicCache(config=model.config), transformers.StaticCache(model.config, 32)):
            assert torch.equal(greedy(model, ids, other).sequences, ref.sequences)
    # The unpatched model gets dequantized K/V, whatever the cache's config copy says.
    assert torch.equal(greedy(model, ids, during_patch).sequences, ref.sequences)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks

    # Deep copies and pickles of a cache holding tokens continue as the original does.
    with turbokv.patch(model):
        cache = f16_cache(model.config)
        model(ids, **cache_kwargs(model, cache))
        clones = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
        step = torch.randint(1, 96, (1, 1), generator=gen)
        expected = model(step, **cache_kwargs(model, cache)).logits
        for clone in clones:
            torch.testing.assert_close(model(step, **cache_kwargs(model, clone)).logits, expected, rtol=0, atol=0)

    # Another model's layer count: refused with both counts (patched: before any token is stored; unpatched:
    # at the first layer the cache lacks).
    for layers in (2, 4):
        other = f16_cache(config_with_layers(model.config, layers))
        with turbokv.patch(model), pytest.raises(ValueError, match=f"TurboCache has {layers} layers, the model has 3"):
            model(ids, **cache_kwargs(model, other))
        assert other.get_seq_length() == 0
    with pytest.raises(ValueError, match="layer_idx: got 2, expected 0 <= layer_idx < 2: this TurboCache has 2 layers"):
        model(ids, **cache_kwargs(model, f16_cache(config_with_layers(model.config, 2))))


def config_with_layers(config, n: int):
    config = copy.deepcopy(config)
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * n
    return config


# ---------------------------------------------------------------- 5. turbokv.hf.attention after import turbokv


def test_hf_is_reachable_after_import_turbokv():
    """``turbokv.hf.attention.cache_kwargs`` after a plain ``import turbokv`` (in a fresh interpreter: this one has
    imported turbokv.hf.attention already)."""
    code = "import turbokv; print(turbokv.hf.attention.cache_kwargs.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cache_kwargs"
