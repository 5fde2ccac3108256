"""Tiny random-weight models of each supported family, built offline from configs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is needed for the cache tests")

COMMON = dict(
    vocab_size=96,
    intermediate_size=128,
    num_hidden_layers=3,
    max_position_embeddings=512,
    initializer_range=0.3,  # peaked logits: greedy decoding is not decided by rounding noise
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def llama(head_dim: int = 64):
    cfg = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, **COMMON
    )
    return transformers.LlamaForCausalLM(cfg)


def qwen3():
    cfg = transformers.Qwen3Config(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        **COMMON,
    )
    return transformers.Qwen3ForCausalLM(cfg)


def mistral():
    cfg = transformers.MistralConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=10, **COMMON
    )
    return transformers.MistralForCausalLM(cfg)


def gemma3():
    cfg = transformers.Gemma3TextConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=20.0,
        query_pre_attn_scalar=256,
        **COMMON,
    )
    return transformers.Gemma3ForCausalLM(cfg)


def phi3():
    cfg = transformers.Phi3Config(hidden_size=192, num_attention_heads=2, num_key_value_heads=2, **COMMON)
    return transformers.Phi3ForCausalLM(cfg)  # head dim 96


def _linear_attention(**kw):
    """Gated-DeltaNet linear attention sizes shared by Qwen3.5 and Qwen3-Next."""
    return dict(
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32, **kw
    )


HYBRID = dict(COMMON, num_hidden_layers=4)  # three linear-attention layers, then full attention


def qwen3_5():
    cfg = transformers.Qwen3_5TextConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, **_linear_attention(**HYBRID)
    )
    return transformers.Qwen3_5ForCausalLM(cfg)


def qwen3_next():
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    cfg = transformers.Qwen3NextConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, **moe, **_linear_attention(**HYBRID)
    )
    return transformers.Qwen3NextForCausalLM(cfg)


def lfm2():
    kw = {k: v for k, v in HYBRID.items() if k != "intermediate_size"}
    cfg = transformers.Lfm2Config(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        block_ff_dim=128,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        **kw,
    )
    return transformers.Lfm2ForCausalLM(cfg)


def _family(model_type: str):
    """A family of tests/family_configs.py (every causal-LM family, built small) by its model type."""
    import family_configs

    family = next((f for f in family_configs.families() if f.model_type == model_type), None)
    if family is None:
        raise AttributeError(f"no causal-LM family {model_type!r}")
    return family_configs.build(family)


FAMILIES = {
    "llama64": llama,
    "llama128": lambda: llama(128),
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma3": gemma3,
    "phi3": phi3,
    "qwen3_5": qwen3_5,
    "qwen3_next": qwen3_next,
    "lfm2": lfm2,
    # hybrid layers (attention and a mamba mixer in one layer), and MoE layers with no attention
    "falcon_h1": lambda: _family("falcon_h1"),
    "nemotron_h": lambda: _family("nemotron_h"),
}
# Hybrid families: linear-attention, conv or MoE layers beside the attention layers, or in the same layer.
HYBRIDS = ("qwen3_5", "qwen3_next", "lfm2", "falcon_h1", "nemotron_h")


def attention_layers(model) -> int:
    """How many layers of the model hold attention K/V."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    return sum(t in ("full_attention", "sliding_attention", "hybrid", "hybrid_sliding") for t in types)


def build(name: str, seed: int = 0):
    import turbokv.hf.cache

    if name in HYBRIDS and not turbokv.hf.layer.STATE_LAYER_TYPES:
        pytest.skip(f"transformers {transformers.__version__} has no linear-attention cache layers")
    torch.manual_seed(seed)
    try:
        model = FAMILIES[name]().eval()
    except AttributeError as e:  # a family this transformers does not have
        pytest.skip(f"transformers {transformers.__version__}: {e}")
    model.set_attn_implementation("sdpa")
    return model
