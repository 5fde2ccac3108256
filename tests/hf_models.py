"""Tiny random-weight models of each supported family, built offline from configs."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers", reason="transformers is needed for the cache tests")

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


FAMILIES = {
    "llama64": llama,
    "llama128": lambda: llama(128),
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma3": gemma3,
    "phi3": phi3,
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[name]().eval()
    model.set_attn_implementation("sdpa")
    return model
