"""transformers integration: the fused attention function, its mask function, and patch().

``turbokv.patch(model)`` registers an attention function named ``"turbokv"`` with
``AttentionInterface`` and pairs it with a mask function in ``AttentionMaskInterface``
(without the pair, transformers silently passes no mask at all). It also puts a forward
pre-hook on every attention module, which binds the module to the cache of that call:

* a :class:`~turbokv.TurboCache`: the hook tells the cache layer ``module.layer_idx``
  that its next update is read fused (``update`` then returns the packed buffers) and
  hands that layer to the attention function, which runs ``turbokv.attention`` on it;
* any other cache (DynamicCache, StaticCache, none): the hook hands over the cache's mask
  sizes and the attention function runs transformers' SDPA on the plain K/V.

An unpatched model has no hooks, so a TurboCache gives it dequantized K/V.

Masks: the fused op applies causality, the layer's sliding window and softcapping itself
and takes left padding as each sequence's first valid slot. The mask function checks,
once per forward (not per layer), that the 2D padding mask is exactly left padding; any
other mask (a hole, right padding) becomes transformers' full 4D mask, and the layers
then dequantize their packed K/V and run SDPA with it: slower, never wrong.
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from turbokv.core import ops
from turbokv.hf import checks
from turbokv.hf.cache import TurboCache
from turbokv.hf.layer import (
    HYBRID_LAYER_TYPES,
    NEW_BATCH_HINT,
    NO_CACHE_LAYER_TYPES,
    STATE_LAYER_TYPES,
    TurboLayer,
    chunked_layers,
    kv_sources,
)

NAME = "turbokv"
CACHE_PARAMETERS = ("cache", "past_key_values")  # the attention forward's cache argument: 5.24, before
_PREVIOUS = "_turbokv_previous_attn_implementation"
_HOOKS = "_turbokv_hook_handles"


def cache_kwargs(model, cache) -> dict:
    """Keyword arguments that hand ``cache`` to ``model(...)`` or ``model.generate(...)``.

    ``cache=`` where the model's ``forward`` takes it (transformers 5.24 renamed
    ``past_key_values``, which now warns and is to leave ``forward`` in 5.40),
    ``past_key_values=`` before.
    """
    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


# ---------------------------------------------------------------------- masks


def left_padding_starts(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """First valid slot of each row of a 2D padding mask ``(B, kv_len)`` (left padding), ``(B,)`` int64.

    Zeros after the last valid token (a static cache's unused slots) do not count.
    """
    if attention_mask is None:
        return None
    return (~attention_mask.bool()).to(torch.int64).cumprod(dim=-1).sum(dim=-1)


def _can_sync() -> bool:
    """Whether a host sync is allowed here: not while torch.compile traces or a CUDA graph is captured."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _valid_tokens(attention_mask: torch.Tensor, mask_kwargs: dict) -> int | torch.Tensor:
    """Tokens of each sequence once this forward's are in: mask columns past them are unused cache slots.

    A 0-dim tensor for a static cache (its device-side count): compared on the device, no extra sync.
    """
    q_offset, q_length = mask_kwargs.get("q_offset"), mask_kwargs.get("q_length")
    if q_offset is not None and q_length is not None:
        return q_offset + q_length
    cache_position = mask_kwargs.get("cache_position")  # what transformers passed before q_offset
    if cache_position is not None:
        return cache_position[-1] + 1
    return attention_mask.shape[-1]


def is_left_padding(attention_mask: torch.Tensor, starts: torch.Tensor, valid_tokens: int | torch.Tensor) -> bool:
    """Whether the first ``valid_tokens`` columns of each row of ``(B, L)`` ``attention_mask`` are
    zeros then ones (``starts``: :func:`left_padding_starts`). One host sync.

    A mask narrower than ``valid_tokens`` is not: transformers pads it with zeros, which masks the
    newest tokens.
    """
    width = attention_mask.shape[-1]
    cols = torch.arange(width, device=attention_mask.device)
    as_left_padding = attention_mask.bool() == (cols >= starts[:, None])
    unused_slot = cols >= valid_tokens
    return bool((as_left_padding | unused_slot).all() & (width >= valid_tokens))


def turbokv_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function paired with :func:`turbokv_attention`, called by transformers once per forward and mask type.

    Returns None (no padding), the left-padding starts the fused op takes (int64, ``(B, 1, 1, 1)``), or, for a
    2D mask that is not exactly left padding, transformers' full ``(B, 1, Sq, kv_len)`` boolean
    mask (built by ``sdpa_mask`` from the same arguments), which sends the layers to the
    dequantize + SDPA path. The check is a host sync; while torch.compile traces or a CUDA graph
    is captured it is skipped and the mask is taken as left padding (generate() builds a static
    cache's masks eagerly, outside the compiled step, so the check runs there).

    Idempotent: generate() builds the masks once for a compileable cache and passes the result
    back in as the model's attention_mask, which comes here again.
    """
    if attention_mask is None or attention_mask.dim() in (1, 4):
        return attention_mask
    starts = left_padding_starts(attention_mask)
    if not _can_sync() or is_left_padding(attention_mask, starts, _valid_tokens(attention_mask, kwargs)):
        # Shaped (B, 1, 1, 1) like a mask, so that a model slicing its masks' query or key dimension
        # (Gemma 4 keeps only the last queries in its KV-shared layers) slices these starts to themselves.
        return starts.view(-1, 1, 1, 1)
    return sdpa_mask(attention_mask=attention_mask.bool(), **{**kwargs, "allow_is_causal_skip": False})


def _causal_mask(
    query: torch.Tensor,
    starts: torch.Tensor | None,
    sizes: tuple,
    window: int | None,
    allow_skip: bool,
    chunk: int | None = None,
) -> torch.Tensor | None:
    """Transformers' mask for plain K/V of a non-TurboCache cache, from left-padding starts.

    ``sizes``: ``(q_offset, kv_length, kv_offset)`` of the cache before this call's update.
    ``chunk``: a chunked-attention layer's chunk size (chunks counted from each sequence's first
    valid token, as transformers counts them). None where SDPA's ``is_causal`` does the same (``allow_skip``).
    """
    q_offset, kv_length, kv_offset = sizes
    padding = None
    if starts is not None:
        starts = starts.to(query.device)
        padding = torch.arange(kv_offset + kv_length, device=query.device) >= starts[:, None]
    if chunk:
        pad = torch.zeros(query.shape[0], dtype=torch.int64, device=query.device) if starts is None else starts
        mask_function = chunked_causal_mask_function(chunk, pad)
    else:
        mask_function = sliding_window_causal_mask_function(window) if window else causal_mask_function
    return sdpa_mask(
        batch_size=query.shape[0],
        q_length=query.shape[2],
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=padding,
        local_size=chunk or window or None,
        allow_is_causal_skip=allow_skip,
        device=query.device,
    )


def _mask_argument(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None, ``(B,)`` starts or a 4D boolean / additive mask, as the attention function takes them.

    Starts come from :func:`turbokv_mask` as int64 ``(B, 1, 1, 1)`` (or ``(B,)``). A 2D padding mask handed
    to the attention function directly (not through the mask function) is taken only when it is left
    padding: without the cache's sizes no full mask can be built.
    """
    if attention_mask is None or attention_mask.dim() == 1:
        return attention_mask
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.int64 and attention_mask.shape[1:] == (1, 1, 1):
            return attention_mask.view(-1)
        return attention_mask
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask: got {attention_mask.dim()} dims, expected the (B,) starts or 4D mask of turbokv's mask "
            "function, or a 2D padding mask"
        )
    starts = left_padding_starts(attention_mask)
    if _can_sync() and not is_left_padding(attention_mask, starts, attention_mask.shape[-1]):
        raise ValueError(
            "attention_mask: got a 2D mask that is not left padding, passed to the attention function directly; "
            "pass it to the model, whose turbokv mask function builds the full mask for it"
        )
    return starts


# ---------------------------------------------------------------------- attention


def _eager_attention(query, key, value, attention_mask, scaling, softcap, sink_logits=None) -> torch.Tensor:
    """Eager attention, ``(B, Sq, Hq, d)``, for what SDPA lacks: ``softcap * tanh(s / softcap)`` scores
    and attention sinks (``sink_logits: (Hq,)``, one logit column that joins the softmax and is dropped after it)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    if sink_logits is not None:
        column = sink_logits.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sink_logits is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _stock_attention(module, query, key, value, attention_mask, scaling, softcap, sink_logits=None) -> torch.Tensor:
    """What the unpatched model computes on plain ``(B, Hkv, T, d)`` K/V with a 4D (or no) mask."""
    if not torch.compiler.is_compiling():
        turbokv_attention.fallback_calls += 1
    if softcap or sink_logits is not None:
        return _eager_attention(query, key, value, attention_mask, scaling, softcap, sink_logits)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)[0]


def _chunk_cuts(first: int, end: int, pads: list[int], chunk: int) -> list[int]:
    """Positions that split queries ``first <= i < end`` into runs lying in one chunk of every sequence:
    ``first``, ``end`` and each chunk start ``pad + k * chunk`` (k >= 0) of each sequence in between."""
    cuts = {first, end}
    for pad in set(pads):
        k = max(0, (first - pad) // chunk + 1)  # the first chunk that starts after `first`
        cuts.update(range(pad + k * chunk, end, chunk))
    return sorted(cuts)


def _fused_attention(query: torch.Tensor, layer: TurboLayer, starts: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """``turbokv.attention`` of ``query (B, Hq, Sq, d)`` over ``layer``'s packed K/V, ``(B, Hq, Sq, d)``.

    ``starts``: each sequence's first valid slot (left padding) or None. A chunked layer (Llama 4) is the
    same op with a later start: a query at position i sees keys j <= i of its own chunk, chunks counted
    from the sequence's first valid token (as transformers' chunked mask counts them). One call per run
    of queries inside one chunk of every sequence: a decode step is one call on the device (no host sync);
    a prompt splits at chunk boundaries (one host sync for the padding).
    """
    lengths = layer.lengths()
    starts = None if starts is None else starts.to(lengths.device)
    op_args = dict(
        k_format=layer.k_spec.format, v_format=layer.v_spec.format, k_rot=layer.k_rot, v_rot=layer.v_rot, **kwargs
    )
    k, v, chunk = layer.k_packed, layer.v_packed, layer.chunk_size

    def attend(q, end: int | None, first_keys) -> torch.Tensor:  # queries ending at `end` (None: the layer's length)
        if layer.exact is not None:  # the exact token windows' three parts (turbokv.hf.exact_tokens)
            return layer.exact.attention(q, (k, v), layer.count if end is None else end, first_keys, **op_args)
        return ops.attention(q, k, v, lengths if end is None else torch.full_like(lengths, end), first_keys, **op_args)

    if not chunk:
        return attend(query, None, starts)
    pad = torch.zeros_like(lengths) if starts is None else starts

    def chunk_start(position) -> torch.Tensor:  # the start of the chunk holding `position`, never before `pad`
        return pad + torch.div(position - pad, chunk, rounding_mode="floor").clamp(min=0) * chunk

    sq = query.shape[2]
    if sq == 1:
        return attend(query, None, chunk_start(lengths - 1))
    end = layer.length
    first = end - sq
    cuts = _chunk_cuts(first, end, pad.tolist(), chunk)
    outs = [attend(query[:, :, a - first : e - first], e, chunk_start(a)) for a, e in itertools.pairwise(cuts)]
    return torch.cat(outs, dim=2)


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
    s_aux: torch.Tensor | None = None,
    turbokv_layer: TurboLayer | None = None,
    turbokv_mask_sizes: tuple | None = None,
    turbokv_chunk: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a patched module: fused over its TurboCache layer, else stock SDPA.

    ``query``: ``(B, Hq, Sq, d)``; ``key``/``value``: the layer's packed buffers when the
    module's pre-hook bound a TurboCache layer (``turbokv_layer``), else the plain
    ``(B, Hkv, T, d)`` K/V of another cache (``turbokv_mask_sizes`` and, for a chunked-attention
    layer, ``turbokv_chunk`` from the hook).
    ``attention_mask``: what :func:`turbokv_mask` returned. Returns ``(B, Sq, Hq, d)`` as
    transformers' attention functions do.
    """
    if dropout:
        raise ValueError(f"dropout: got {dropout}, expected 0.0 (turbokv attention is for inference)")
    if kwargs:  # what transformers passes through: refused by name where it would change the math
        checks.check_call_kwargs(module, kwargs)
    if turbokv_layer is None and turbokv_mask_sizes is None:
        raise RuntimeError(
            f"turbokv attention: {type(module).__name__} was not bound to a cache; "
            "select it with turbokv.patch(model), not set_attn_implementation('turbokv')"
        )
    mask = _mask_argument(attention_mask)
    if turbokv_layer is None:  # another cache's plain K/V
        if mask is None or mask.dim() == 1:
            mask = _causal_mask(
                query,
                mask,
                turbokv_mask_sizes,
                sliding_window,
                allow_skip=not softcap and s_aux is None,
                chunk=turbokv_chunk,
            )
        return _stock_attention(module, query, key, value, mask, scaling, softcap, s_aux), None
    layer = turbokv_layer
    if key is not layer.k_packed or value is not layer.v_packed:
        raise RuntimeError(
            f"turbokv attention: {'key' if key is not layer.k_packed else 'value'} is not the packed buffer of "
            f"cache layer {getattr(module, 'layer_idx', '')}; the cache's update must run between the module's "
            "pre-hook and its attention, and the module must pass the K/V it returns to the attention function "
            "unchanged"
        )
    if mask is not None and mask.dim() == 4:  # not left padding: the full mask over dequantized K/V
        k, v = layer.dequantized()
        return _stock_attention(module, query, k, v, mask, scaling, softcap, s_aux), None
    # A sliding layer's window: the module's argument, else the cache layer's (from the config, as the
    # model's mask applies it): Phi-MoE passes none to the attention function and relies on its mask.
    window = int(sliding_window or layer.sliding_window or 0)
    out = _fused_attention(
        query, layer, mask, scale=scaling, window=window, softcap=float(softcap or 0.0), sink_logits=s_aux
    )
    if not torch.compiler.is_compiling():
        turbokv_attention.calls += 1
    return out.transpose(1, 2).contiguous(), None


# Eager call counts (tests use them to prove which path ran): the fused op, and the
# SDPA path (non-TurboCache caches, masks that are not left padding).
turbokv_attention.calls = 0
turbokv_attention.fallback_calls = 0


def register() -> None:
    """Register the attention and mask functions under the name ``"turbokv"`` (idempotent)."""
    AttentionInterface.register(NAME, turbokv_attention)
    AttentionMaskInterface.register(NAME, turbokv_mask)


# ---------------------------------------------------------------------- binding modules to caches


def _parameters(module: torch.nn.Module) -> list[str]:
    """Names of ``module.forward``'s parameters ([] where they cannot be read)."""
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _cache_index(module: torch.nn.Module) -> int | None:
    """Positional index of the cache argument of ``module.forward`` (None: it takes none)."""
    params = _parameters(module)
    return next((params.index(p) for p in CACHE_PARAMETERS if p in params), None)


def _innermost(model: torch.nn.Module, keep) -> list[torch.nn.Module]:
    """The modules of ``model`` that ``keep`` accepts and that hold no other such module."""
    found = [m for m in model.modules() if keep(m)]
    ids = {id(m) for m in found}
    return [m for m in found if not any(id(c) in ids for c in m.modules() if c is not m)]


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules with an int ``layer_idx`` whose forward takes the cache, innermost only
    (a Gemma 3 decoder layer has both too; its attention module is the one that reads K/V)."""
    return _innermost(model, lambda m: isinstance(getattr(m, "layer_idx", None), int) and _cache_index(m) is not None)


def _shared_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that run at several layers and take the layer as a call argument (Zamba's one attention
    block, shared by its hybrid layers): no int ``layer_idx`` attribute, a forward with ``layer_idx`` and
    the cache. Innermost only."""

    def shared(m) -> bool:
        return not isinstance(getattr(m, "layer_idx", None), int) and "layer_idx" in _parameters(m)

    return _innermost(model, lambda m: shared(m) and _cache_index(m) is not None)


def _layer_argument(module) -> int:
    """Position of ``layer_idx`` among ``module.forward``'s parameters (a shared module's call argument)."""
    return _parameters(module).index("layer_idx")


def _mask_sizes(cache, layer_idx: int, q_length: int) -> tuple:
    """``(q_offset, kv_length, kv_offset)`` of a non-TurboCache cache before this call's update."""
    if cache is None:
        return 0, q_length, 0
    kv_length, kv_offset = cache.get_mask_sizes(q_length, layer_idx)
    q_offset = cache.get_query_offset(layer_idx)
    if isinstance(q_offset, torch.Tensor):  # a static layer's own token count, which its update advances in place
        q_offset = q_offset.clone()
    return q_offset, kv_length, kv_offset


def _before_attention(
    module,
    args,
    kwargs,
    *,
    cache_index: int,
    layer_argument: int | None,
    model_layers: int,
    chunks: dict,
    sources: dict,
    source_sizes: dict,
):
    """Forward pre-hook of a patched attention module: binds it to this call's cache layer.

    Passes the binding to the attention function through the module's kwargs (the supported
    families forward them to the attention interface), so no state outlives the call but the
    layer's "next update is fused" flag, which that update consumes. Traced by torch.compile
    like the rest of the forward.

    KV sharing with another cache: a shared layer (``source``: the layer it reads) gets its source's
    K/V as that layer's update returned them, after the update, so it takes the mask sizes its
    source's hook saw earlier in the same forward (``source_sizes``, written by source layers only).

    ``layer_argument``: for a module shared by several layers, the position of its ``layer_idx`` argument
    (the layer is the call's, not the module's).
    """
    if layer_argument is None:
        layer_idx = module.layer_idx
    else:
        layer_idx = kwargs["layer_idx"] if "layer_idx" in kwargs else args[layer_argument]
    chunk, source = chunks.get(layer_idx), sources.get(layer_idx)
    cache = next((kwargs[p] for p in CACHE_PARAMETERS if p in kwargs), None)
    if cache is None and len(args) > cache_index:
        cache = args[cache_index]
    if isinstance(cache, TurboCache):
        return args, {**kwargs, "turbokv_layer": cache.bind_fused(layer_idx, model_layers)}
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if source is not None:
        sizes = source_sizes[source]
    else:
        sizes = _mask_sizes(cache, layer_idx, hidden.shape[1])
        if layer_idx in source_sizes:
            source_sizes[layer_idx] = sizes
    return args, {**kwargs, "turbokv_mask_sizes": sizes, "turbokv_chunk": chunk}


def _add_hooks(model) -> list:
    # A hybrid model's linear-attention / conv / MoE layers take the cache too, for their state (or nothing),
    # and so does the mamba mixer beside the attention of a hybrid layer (Falcon-H1): not attention modules.
    types = getattr(_text_config(model), "layer_types", None) or ()

    def kind(m) -> str | None:
        return types[m.layer_idx] if m.layer_idx < len(types) else None

    modules = [m for m in _attention_modules(model) if kind(m) not in STATE_LAYER_TYPES + NO_CACHE_LAYER_TYPES]
    hybrid = {m.layer_idx for m in modules if kind(m) in HYBRID_LAYER_TYPES and checks.calls_interface(m)}
    shared = _shared_attention_modules(model)
    if shared:  # Zamba: one attention block serves every hybrid layer, beside each layer's mamba mixer
        hybrid |= {i for i, t in enumerate(types) if t in HYBRID_LAYER_TYPES}
    modules = [m for m in modules if m.layer_idx not in hybrid or checks.calls_interface(m)]
    modules += shared
    if not modules:
        raise ValueError(
            f"model: found no attention module (a module with layer_idx whose forward takes one of {CACHE_PARAMETERS}) "
            f"in {type(model).__name__}"
        )
    reason = checks.config_refusal(_text_config(model))
    reason = reason or next(filter(None, map(checks.module_refusal, modules)), None)
    if reason:
        raise NotImplementedError(
            f"model: turbokv.patch cannot run the attention of {type(model).__name__} fused: {reason}; "
            "use TurboCache without patch() (it gives the model's own attention dequantized K/V)"
        )
    config = _text_config(model)
    chunks, sources = chunked_layers(config), kv_sources(config)
    source_sizes = dict.fromkeys(sources.values())  # one dict per model, shared by its hooks
    hook = functools.partial(
        _before_attention,
        model_layers=config.num_hidden_layers,
        chunks=chunks,
        sources=sources,
        source_sizes=source_sizes,
    )
    return [
        model.register_forward_pre_hook(_check_batch, with_kwargs=True),
        model.register_forward_hook(_end_forward, with_kwargs=True),
    ] + [
        m.register_forward_pre_hook(
            functools.partial(
                hook, cache_index=_cache_index(m), layer_argument=_layer_argument(m) if m in shared else None
            ),
            with_kwargs=True,
        )
        for m in modules
    ]


def _check_batch(module, args, kwargs):
    """A forward whose batch size is not the one a TurboCache holds is refused before any layer runs: a
    hybrid model's linear-attention layers move their state before an attention layer could refuse it."""
    cache = next((kwargs.get(k) for k in CACHE_PARAMETERS if isinstance(kwargs.get(k), TurboCache)), None)
    if cache is None:
        return None
    held = cache._held_batch()
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None and args and isinstance(args[0], torch.Tensor):
        inputs = args[0]
    if held is not None and inputs is not None and inputs.shape[0] != held:
        raise ValueError(
            f"input: got a batch of {inputs.shape[0]} sequences, expected the {held} this TurboCache holds; "
            f"{NEW_BATCH_HINT}"
        )
    return None


def _end_forward(module, args, kwargs, output):
    """After the model's forward, its TurboCache drops the rows its exact token stores held for it
    (TurboCache.end_forward). Left to the next forward while compiling: a compiled decode step's rows
    are one token per sequence."""
    cache = next((kwargs.get(k) for k in CACHE_PARAMETERS if isinstance(kwargs.get(k), TurboCache)), None)
    if cache is not None and not torch.compiler.is_compiling():
        cache.end_forward()
    return None


# ---------------------------------------------------------------------- patch / unpatch


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
    ``turbokv.unpatch(model)``. Other caches keep working on a patched model (transformers'
    SDPA on their tensors).

    Accepts any model whose attention modules pass the K/V of ``cache.update`` untouched to
    transformers' attention interface and are causal, with no more than turbokv implements
    (turbokv.hf.checks); raises ``NotImplementedError`` naming what else a model does (attention sinks,
    MLA, cross-attention, a module that reads its K/V itself, ...) and leaves it unpatched.
    """
    model = model._model if isinstance(model, _Patched) else model
    register()
    if not hasattr(model, _PREVIOUS):
        hooks = _add_hooks(model)
        key = _text_key(model)
        previous = (key or "", _text_config(model)._attn_implementation)
        setattr(model, _PREVIOUS, previous)
        setattr(model, _HOOKS, hooks)
        _set_attention(model, key, NAME)
    return _Patched(model)


def _text_key(model) -> str | None:
    """The sub-config key of a multimodal model's language model (``"text_config"``); None for a language model.

    patch() switches only that sub-model's attention: the vision / audio towers keep theirs (some have no
    attention function but their own, and none of them reads the cache).
    """
    cfg, text = model.config, _text_config(model)
    if text is cfg:
        return None
    return next((k for k in getattr(cfg, "sub_configs", {}) if getattr(cfg, k, None) is text), None)


def _set_attention(model, key: str | None, implementation: str) -> None:
    model.set_attn_implementation({key: implementation} if key else implementation)


def unpatch(model):
    """Restore the attention implementation the model had before :func:`patch` and remove its hooks."""
    model = model._model if isinstance(model, _Patched) else model
    if hasattr(model, _PREVIOUS):
        key, previous = getattr(model, _PREVIOUS)
        _set_attention(model, key or None, previous)
        for handle in getattr(model, _HOOKS, ()):
            handle.remove()
        delattr(model, _PREVIOUS)
        if hasattr(model, _HOOKS):
            delattr(model, _HOOKS)
    return model
