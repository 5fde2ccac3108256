"""transformers integration: the fused attention function, its mask function, and patch().

``turbokv.patch(model)`` registers an attention function named ``"turbokv"`` with
``AttentionInterface`` and pairs it with a mask function in ``AttentionMaskInterface``
(without the pair, transformers silently passes no mask at all). The mask function
turns the 2D padding mask into each sequence's left-padding start, once per forward
and without a data-dependent branch (so a compiled decode step has no graph break);
every layer's attention passes those starts to ``turbokv.attention``. Causality,
sliding windows and softcapping are arguments of the op.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from turbokv import ops
from turbokv.cache import layer_for_buffer

NAME = "turbokv"
# Families whose attention modules call the attention interface with K/V from
# cache.update and the usual kwargs (scaling, sliding_window, softcap).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "gemma2", "phi3")
_PREVIOUS = "_turbokv_previous_attn_implementation"


def cache_kwargs(model, cache) -> dict:
    """Keyword arguments that hand ``cache`` to ``model(...)`` or ``model.generate(...)``.

    ``cache=`` where the model's ``forward`` takes it (transformers 5.24 renamed
    ``past_key_values``, which now warns and is to leave ``forward`` in 5.40),
    ``past_key_values=`` before.
    """
    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def left_padding_starts(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """First valid slot of each row of a 2D padding mask ``(B, kv_len)`` (left padding), ``(B,)`` int64.

    Zeros after the last valid token (a static cache's unused slots) do not count.
    """
    if attention_mask is None:
        return None
    return (~attention_mask.bool()).to(torch.int64).cumprod(dim=-1).sum(dim=-1)


def turbokv_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function paired with :func:`turbokv_attention`: ``(B,)`` left-padding starts, or None.

    Idempotent: generate() builds the mask once for a compileable cache and passes the result
    back in as the model's attention_mask, which comes here again.
    """
    if attention_mask is not None and attention_mask.dim() == 1:
        return attention_mask
    return left_padding_starts(attention_mask)


def turbokv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the packed cache that ``TurboLayer.update`` returned.

    ``query``: ``(B, Hq, Sq, d)``; ``key``/``value``: the layer's packed buffers.
    Returns ``(B, Sq, Hq, d)`` as transformers' attention functions do.
    """
    layer = layer_for_buffer(key, getattr(module, "layer_idx", None))
    if layer is None:
        raise RuntimeError(
            "turbokv attention: key is not a TurboCache buffer. Pass past_key_values=turbokv.TurboCache(...) "
            "to generate()/forward() when the model is patched with turbokv.patch()"
        )
    if dropout:
        raise ValueError(f"dropout: got {dropout}, expected 0.0 (turbokv attention is for inference)")
    attention_mask = turbokv_mask(attention_mask)  # a 2D padding mask passed directly becomes starts too
    if attention_mask is not None and attention_mask.dim() != 1:
        raise ValueError(
            f"attention_mask: got {attention_mask.dim()} dims, expected the (B,) starts of turbokv's mask function "
            "or a 2D padding mask"
        )
    out = ops.attention(
        query,
        layer.k_packed,
        layer.v_packed,
        layer.lengths(),
        attention_mask,
        k_format=layer.k_spec.format,
        v_format=layer.v_spec.format,
        k_rot=layer.k_rot,
        v_rot=layer.v_rot,
        scale=scaling,
        causal=True,
        window=int(sliding_window or 0),
        softcap=float(softcap or 0.0),
    )
    if not torch.compiler.is_compiling():
        turbokv_attention.calls += 1
    return out.transpose(1, 2).contiguous(), None


turbokv_attention.calls = 0  # counts fused calls (tests use it to prove the fused path ran)


def register() -> None:
    """Register the attention and mask functions under the name ``"turbokv"`` (idempotent)."""
    AttentionInterface.register(NAME, turbokv_attention)
    AttentionMaskInterface.register(NAME, turbokv_mask)


class _Patched:
    """What :func:`patch` returns: the model itself for attribute access, and a context manager."""

    def __init__(self, model):
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def __enter__(self):
        return self._model

    def __exit__(self, *exc):
        unpatch(self._model)
        return False


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def patch(model):
    """Make ``model`` run turbokv's fused attention on a TurboCache. Idempotent and reversible.

    Use as ``with turbokv.patch(model): ...`` or ``model = turbokv.patch(model)`` then
    ``turbokv.unpatch(model)``. Raises ``ValueError`` for unsupported model families.
    """
    model = model._model if isinstance(model, _Patched) else model
    model_type = getattr(_text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: got model_type {model_type!r}, expected one of {SUPPORTED_MODEL_TYPES} "
            "(other families may route attention differently; use TurboCache without patch() for them)"
        )
    register()
    if not hasattr(model, _PREVIOUS):
        setattr(model, _PREVIOUS, model.config._attn_implementation)
        model.set_attn_implementation(NAME)
    return _Patched(model)


def unpatch(model):
    """Restore the attention implementation the model had before :func:`patch`."""
    model = model._model if isinstance(model, _Patched) else model
    if hasattr(model, _PREVIOUS):
        model.set_attn_implementation(getattr(model, _PREVIOUS))
        delattr(model, _PREVIOUS)
    return model
