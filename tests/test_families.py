"""Every causal-LM family of the installed transformers, built small: token-equal or refused by name.

For each family (tests/family_configs.py): greedy tokens of a left-padded batch of two prompts with
an f16 + rotation TurboCache, unpatched and under ``turbokv.patch``, against DynamicCache + SDPA.
A family passes when the tokens are equal, or when turbokv refuses it with its own ValueError /
NotImplementedError (TurboCache for the model, or ``patch()`` for its attention); different
tokens or any other exception fail. Families that do not build small are skipped with the reason.
The families of issue 18 are named in EXPECTED with the outcome they must keep.
"""

from __future__ import annotations

import pytest
import torch
from family_configs import NOT_COMPARABLE, Family, families, run

import turbokv
from turbokv.hf import checks
from turbokv.hf.attention import cache_kwargs

FAMILIES = families()

# The families docs/models.md names: "equal" (unpatched and patched), "patch refused: <words of
# the reason>" (unpatched equal), "refused: <words>" (TurboCache refuses the model) or "not built: <words>".
# Flip an entry when turbokv learns the feature.
EXPECTED = {
    "mixtral": "equal",
    "qwen3_moe": "equal",
    "phimoe": "equal",
    "smollm3": "equal",
    "olmo2": "equal",
    "olmo3": "equal",
    "cohere2": "equal",
    "glm4": "equal",
    "granite": "equal",
    "exaone4": "equal",
    "ernie4_5": "equal",
    "hunyuan_v1_dense": "equal",
    "gpt_oss": "equal",
    "llama4_text": "equal",
    "gemma3n_text": "equal",
    "gemma4_text": "equal",  # KV sharing; the KV-shared layers see only the last queries
    "gemma4": "equal",  # the multimodal wrapper: patch() switches the language model only
    "deepseek_v3": "refused: multi-head latent attention (MLA)",
    "diffllama": "patch refused: uses the cached value_states",
    "doge": "patch refused: uses the cached value_states",
    "jetmoe": "patch refused: uses the cached key_states",
    "falcon_h1": "equal",
    "nemotron_h": "equal",
    # Zamba's one attention module serves every hybrid layer and takes layer_idx as a call argument
    "zamba": "equal",
    "qwen3_5_text": "equal",
    "qwen3_next": "equal",
    "lfm2": "equal",
    "granitemoehybrid": "equal",
    # transformers' MiniMax takes only its own cache class: TurboCache.for_config builds one, compared with MiniMaxCache
    "minimax": "equal",
}


# Families turbokv gets wrong today (a bug to fix, kept visible): strict xfail, so a fix fails here too.
KNOWN_WRONG = {
    name: f"not comparable: {why}; test_hrm_cache_slots_hold_what_dynamic_cache_holds checks TurboCache there"
    for name, why in NOT_COMPARABLE.items()
}


def _param(family: Family):
    why = KNOWN_WRONG.get(family.model_type)
    marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
    return pytest.param(family, id=family.model_type, marks=marks)


def test_named_families_are_in_this_transformers():
    """A renamed or removed family fails here rather than silently dropping out of EXPECTED."""
    names = {f.model_type for f in FAMILIES}
    assert set(EXPECTED) | set(KNOWN_WRONG) <= names, sorted(set(EXPECTED) | set(KNOWN_WRONG) - names)


@pytest.mark.parametrize("family", [_param(f) for f in FAMILIES])
def test_family_is_token_equal_or_refused_by_name(family: Family):
    outcome = run(family)
    expected = EXPECTED.get(family.model_type)
    if expected is None:
        if outcome.kind == "not built":
            pytest.skip(f"{family.model_type} does not build or generate small: {outcome.detail}")
        assert outcome.kind in ("equal", "patch refused", "refused"), str(outcome)
        return
    kind, _, words = expected.partition(": ")
    assert outcome.kind == kind and words in outcome.detail, f"expected {expected!r}, got {outcome}"


# ---------------------------------------------------------------- the checks behind those outcomes


class _Module(torch.nn.Module):
    pass


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"sinks": torch.zeros(4)}, r"sinks: got a tensor of shape \(4,\).*attention sinks"),
        ({"is_causal": False}, "is_causal: got False.*non-causal"),
        ({"cu_seq_lens_q": torch.zeros(3)}, "cu_seq_lens_q.*packed"),
        ({"position_bias": torch.zeros(1)}, "position_bias.*position bias"),
        ({"some_new_kwarg": 1}, "some_new_kwarg: got 1 from _Module"),
    ],
)
def test_call_kwargs_that_change_the_math_are_refused_by_name(kwargs, named):
    with pytest.raises(NotImplementedError, match=named):
        checks.check_call_kwargs(_Module(), kwargs)


def test_call_kwargs_that_do_not_change_the_math_pass():
    checks.check_call_kwargs(
        _Module(),
        {"position_ids": torch.arange(3), "use_cache": True, "is_causal": True, "cu_seq_lens_q": None},
    )


def test_refused_patch_leaves_the_model_as_it_was():
    """patch() refuses before it touches the model: no hooks, the attention implementation unchanged."""
    jetmoe = next(f for f in FAMILIES if f.model_type == "jetmoe")
    from family_configs import build

    model = build(jetmoe)
    before = model.config._attn_implementation
    with pytest.raises(NotImplementedError, match="JetMoeAttention.forward uses the cached key_states"):
        turbokv.patch(model)
    assert model.config._attn_implementation == before
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_hrm_cache_slots_hold_what_dynamic_cache_holds():
    """HRM writes cache slots layer_idx + cycle_offset (32 slots for 4 layers): an f16 TurboCache without
    rotation gives, bit for bit, the logits of a DynamicCache that rounds K/V to float16, and holds the same
    K/V in every slot. (Rotation moves the rounding, which HRM's recurrence amplifies: see KNOWN_WRONG.)"""
    import family_configs
    import transformers

    family = next((f for f in FAMILIES if f.model_type == "hrm_text"), None)
    if family is None:
        pytest.skip(f"transformers {transformers.__version__} has no hrm_text")

    class F16DynamicCache(transformers.DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            rounded = (t.to(torch.float16).to(t.dtype) for t in (key_states, value_states))
            return super().update(*rounded, layer_idx, *args, **kwargs)

    model = family_configs.build(family)
    ids, mask = family_configs.prompts()
    ref_cache = F16DynamicCache(config=model.config)
    cache = turbokv.TurboCache.for_config(model.config, k="f16", v="f16", rotate_k="off", rotate_v="off")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, **cache_kwargs(model, ref_cache)).logits
        out = model(ids, attention_mask=mask, **cache_kwargs(model, cache)).logits
    assert torch.equal(out, ref)
    assert len(cache.layers) == model.config.num_hidden_layers == len(ref_cache.layers)
    for slot, (a, b) in enumerate(zip(ref_cache.layers, cache.layers, strict=True)):
        k, v = b.dequantized()
        assert torch.equal(k, a.keys) and torch.equal(v, a.values), slot
