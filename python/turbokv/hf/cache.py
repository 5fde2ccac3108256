"""TurboCache: a transformers ``Cache`` whose attention layers hold packed, rotated K/V (layer.py).

Hybrid models (linear attention, conv or state-space layers between the attention layers:
Qwen3.5, Qwen3-Next, LFM2, ...): those layers hold a recurrent or conv state, no per-token
K/V; TurboCache keeps transformers' own cache layer for them, as DynamicCache builds it, and
compresses the attention layers.

Models whose code accepts no cache but its own class (MiniMax) get a subclass of TurboCache that
is also that class: :meth:`TurboCache.for_config` builds it (minimax.py registers it).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from turbokv.core import formats
from turbokv.hf import cache_file
from turbokv.hf.layer import (
    _HF_LAYERS,
    HYBRID_LAYER_TYPES,
    NEW_BATCH_HINT,
    NO_CACHE_LAYER_TYPES,
    STATE_LAYER_TYPES,
    SideSpec,
    TurboHybridLayer,
    TurboLayer,
    _check_format,
    _check_int,
    _check_linear_crop,
    _check_max_cache_len,
    _check_overrides,
    _check_rotate,
    _check_windows,
    _chunk_size,
    _layer_types,
    _shared_layer,
    _state_layer,
    _type_name,
    kv_sources,
)
from turbokv.hf.policy import Policy, check_against


def _model_type(config) -> str | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None)


class TurboCache(Cache):
    """A transformers Cache storing K/V in turbokv formats.

    ``TurboCache(model.config, k="turbo3", v="turbo3")``. Per side: a format and a
    rotation policy (``rotate_k`` / ``rotate_v``: auto, on, off). ``overrides`` maps
    layer index -> ``(k_format, v_format)``; ``keep_first`` / ``keep_last`` layers use
    ``keep_format`` (a common guard at very low bits). ``sink_tokens`` / ``recent_tokens``
    keep the first and each query's last tokens exact (f16) beside the packed cache
    (turbokv.hf.exact_tokens; dynamic caches). ``max_cache_len=N`` makes the
    cache static (preallocated, compileable: ``generate()`` then compiles decoding). Pass it as
    ``generate(past_key_values=cache)``; with ``turbokv.patch(model)`` attention
    reads the packed cache directly. Every argument is checked (``TypeError`` /
    ``ValueError`` naming it).

    One cache serves one model (its layer count) and one batch shape at a time:
    ``reset()`` starts over with any batch.
    """

    # Model types whose code takes only a cache of its own class -> the TurboCache subclass that is
    # one (registered by its module, e.g. minimax.py): for_config builds it.
    _own_classes: dict[str, type[TurboCache]] = {}

    @classmethod
    def register_model_type(cls, model_type: str, subclass: type[TurboCache]) -> None:
        """Build ``subclass`` for configs of ``model_type`` (:meth:`for_config`)."""
        cls._own_classes[model_type] = subclass

    @classmethod
    def for_config(cls, config, *args, **kwargs) -> TurboCache:
        """``TurboCache(config, ...)``, or for a model that takes only a cache of its own class
        (MiniMax) the TurboCache subclass that is one; the same arguments."""
        subclass = cls._own_classes.get(_model_type(config))
        return (subclass or cls)(config, *args, **kwargs)

    def __init__(
        self,
        config,
        k: str = "turbo3",
        v: str = "turbo3",
        rotate_k: str = "auto",
        rotate_v: str = "auto",
        overrides: dict[int, tuple[str, str]] | None = None,
        keep_first: int = 0,
        keep_last: int = 0,
        keep_format: str = "q8_0",
        max_cache_len: int | None = None,
        sink_tokens: int = 0,
        recent_tokens: int = 0,
    ):
        own = self._own_classes.get(_model_type(config))
        if own is not None and not isinstance(self, own):
            raise TypeError(
                f"config: got a {_model_type(config)} config, whose model takes only a cache of its own class; "
                f"expected TurboCache.for_config(config, ...), which builds {own.__name__}"
            )
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(config, "num_hidden_layers", None)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TypeError(
                f"config: got {_type_name(config)} with num_hidden_layers={n!r}, expected a transformers model config"
            )
        if getattr(config, "kv_lora_rank", None):
            # DeepSeek-V2/V3 and relatives cache a compressed latent and a rope key, not per-head K/V:
            # refused here rather than at the first update (or not at all where the widths happen to match).
            raise ValueError(
                f"config: got kv_lora_rank={config.kv_lora_rank} ({getattr(config, 'model_type', '?')}): "
                "multi-head latent attention (MLA) is not supported by TurboCache"
            )
        sources = kv_sources(config)
        k, v, keep_format = _check_format("k", k), _check_format("v", v), _check_format("keep_format", keep_format)
        rotate_k, rotate_v = _check_rotate("rotate_k", rotate_k), _check_rotate("rotate_v", rotate_v)
        overrides = _check_overrides(overrides, n)
        for i in sorted(set(overrides) & set(sources)):
            raise ValueError(
                f"overrides: got layer index {i}, a KV-shared layer (it reads layer {sources[i]}'s cache and holds "
                f"none); set the format of layer {sources[i]}"
            )
        keep_first, keep_last = _check_int("keep_first", keep_first, 0, n), _check_int("keep_last", keep_last, 0, n)
        _check_max_cache_len(max_cache_len)
        _check_windows(sink_tokens, recent_tokens, max_cache_len)
        layers = []
        for i, kind in enumerate(_layer_types(config, n)):
            if i in sources:  # transformers' placeholder, or nothing where its DynamicCache drops the last layers
                shared = _shared_layer()
                if shared is None and sorted(sources) != list(range(n - len(sources), n)):
                    raise ValueError(
                        f"config: KV-shared layers {sorted(sources)}, expected the last layers (this transformers "
                        "has no placeholder cache layer for shared layers elsewhere)"
                    )
                if shared is not None:
                    layers.append(shared)
                continue
            if kind in STATE_LAYER_TYPES:
                layers.append(_state_layer(kind, config, max_cache_len))
                continue
            if kind in NO_CACHE_LAYER_TYPES:
                layers.append(
                    _HF_LAYERS["dummy"]() if "dummy" in _HF_LAYERS else _state_layer(kind, config, max_cache_len)
                )
                continue
            kf, vf = k, v
            if i < keep_first or i >= n - keep_last:
                kf = vf = keep_format
            kf, vf = overrides.get(i, (kf, vf))
            sliding = kind == "sliding_attention" or HYBRID_LAYER_TYPES.get(kind, False)
            window = getattr(config, "sliding_window", None) if sliding else None
            chunk = _chunk_size(config) if kind == "chunked_attention" else None
            specs = SideSpec(kf, rotate_k), SideSpec(vf, rotate_v)
            kw = dict(sliding_window=window, max_cache_len=max_cache_len, chunk_size=chunk)
            kw.update(sink_tokens=sink_tokens, recent_tokens=recent_tokens)
            if kind in HYBRID_LAYER_TYPES:
                states = getattr(config, "number_of_conv_states", None)
                layers.append(TurboHybridLayer(*specs, **kw, **({"number_of_states": states} if states else {})))
            else:
                layers.append(TurboLayer(*specs, **kw))
        # Cache's own __init__, not the next class of the MRO: MiniMaxTurboCache puts MiniMaxCache there.
        Cache.__init__(self, layers=layers)
        self.num_model_layers = n
        self.kv_sources = sources
        # What save() records, so that load() can check a file against a model's config.
        self.layer_types = _layer_types(config, n)
        self.model_type = getattr(config, "model_type", None)

    def _layer(self, layer_idx: int) -> TurboLayer:
        if not 0 <= layer_idx < len(self.layers):
            n = len(self.layers)
            raise ValueError(
                f"layer_idx: got {layer_idx}, expected 0 <= layer_idx < {n}: this TurboCache has {n} layers and the "
                "model has more; build the cache from the model's config"
            )
        layer = self.layers[layer_idx]
        if not isinstance(layer, TurboLayer):
            raise ValueError(
                f"layer_idx: got {layer_idx}, a {type(layer).__name__} (the config's layer type there holds no "
                "attention K/V); build the cache from the model's config"
            )
        return layer

    # ------------------------------------------------------------------ edits that change every layer
    # transformers' Cache applies crop and the batch edits layer by layer, so a layer that refuses
    # leaves the layers before it changed; and a step with a new batch size moves a linear-attention
    # layer's state before an attention layer refuses it. TurboCache checks every layer first: an
    # edit that raises leaves the cache as it was.

    def _held_batch(self) -> int | None:
        """The batch size the cache holds (its attention layers'), or None while it holds nothing."""
        return next((lay.batch_size for lay in self.turbo_layers if lay.is_initialized), None)

    def end_forward(self) -> None:
        """After a patched forward (patch()'s hook): each layer's exact token store drops the rows it
        held for that forward's attention, so a prompt's K/V do not stay in 16 bits until the next one."""
        for layer in self.turbo_layers:
            if layer.exact is not None:
                layer.exact.release()

    def crop(self, tokens_to_remove: int) -> None:
        for i, layer in enumerate(self.layers):
            if hasattr(layer, "record_past") and hasattr(layer, "conv_states"):  # a linear-attention state
                _check_linear_crop(i, layer, tokens_to_remove)
        super().crop(tokens_to_remove)

    def _check_batch_index(self, indices, what: str) -> None:
        held = self._held_batch()
        idx = torch.as_tensor(indices)
        if held is None or idx.numel() == 0:
            return
        if idx.dtype == torch.bool:
            if idx.shape != (held,):
                raise ValueError(f"{what}: got a mask of shape {tuple(idx.shape)}, expected ({held},)")
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -held or hi >= held:
            raise IndexError(f"{what}: got indices in [{lo}, {hi}], expected indices of the {held} sequences held")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._check_batch_index(beam_idx, "beam_idx")
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._check_batch_index(indices, "indices")
        super().batch_select_indices(indices)

    def _check_state_batch(self, states: torch.Tensor, layer_idx: int) -> None:
        held = self._held_batch()
        if held is not None and states.shape[0] != held:
            raise ValueError(
                f"layer {layer_idx}: got a state of batch size {states.shape[0]}, expected {held} (the sequences this "
                f"cache holds); {NEW_BATCH_HINT}"
            )

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._check_state_batch(conv_states, layer_idx)
        return super().update_conv_state(conv_states, layer_idx, *args, **kwargs)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._check_state_batch(recurrent_states, layer_idx)
        return super().update_recurrent_state(recurrent_states, layer_idx, *args, **kwargs)

    @property
    def turbo_layers(self) -> list[TurboLayer]:
        """The attention layers (those that hold packed K/V)."""
        return [layer for layer in self.layers if isinstance(layer, TurboLayer)]

    def bind_fused(self, layer_idx: int, model_layers: int) -> TurboLayer:
        """Called by patch()'s pre-hook on attention module ``layer_idx`` of a model of ``model_layers``
        layers: the layer's next ``update`` returns the packed buffers (the module reads them through
        turbokv's attention function). Returns that layer.

        A KV-shared layer (:func:`kv_sources`) writes nothing: it is handed its source layer's packed
        buffers, so the source layer is returned and no update is announced.
        """
        if model_layers != self.num_model_layers:
            raise ValueError(
                f"cache: this TurboCache has {self.num_model_layers} layers, the model has {model_layers} "
                "(num_hidden_layers); build the cache from the model's config"
            )
        if layer_idx in self.kv_sources:
            return self._layer(self.kv_sources[layer_idx])
        layer = self._layer(layer_idx)
        layer.fused_next = True
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``(B, Hkv, S, d)`` K/V to layer ``layer_idx``; see :meth:`TurboLayer.update`."""
        return self._layer(layer_idx).update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of packed K/V held for the valid tokens, all layers."""
        return sum(layer.nbytes() for layer in self.turbo_layers)

    def bits_per_value(self) -> tuple[float, float]:
        """Mean stored bits per K and per V value over the tokens held, all attention layers: the
        packed rows (a row for every position) and the exact windows' 16-bit copies, as
        :meth:`nbytes` counts them, plus the key offsets (one fp16 vector per KV head and layer,
        which policies count and nbytes does not)."""
        k_bits = v_bits = values = 0
        for layer in self.turbo_layers:
            if not layer.is_initialized or not layer.length:
                continue
            b, h = layer.k_packed.shape[:2]
            n, d = layer.length, layer.head_dim
            exact = 0 if layer.exact is None else layer.exact.tokens(n)
            offset = 0 if layer.k_offset is None else h * 16 * d
            k_bits += b * h * (n * 8 * layer.k_packed.shape[3] + exact * 16 * d) + offset
            v_bits += b * h * (n * 8 * layer.v_packed.shape[3] + exact * 16 * d)
            values += b * h * n * d
        if not values:
            raise ValueError("cache: holds no tokens, expected a filled cache to count bits per value of")
        return k_bits / values, v_bits / values

    def f16_nbytes(self) -> int:
        """What the same tokens would take in an f16 cache."""
        total = 0
        for layer in self.turbo_layers:
            if layer.is_initialized:
                b, h = layer.k_packed.shape[:2]
                total += b * h * layer.length * layer.head_dim * 2 * 2
        return total

    def __repr__(self) -> str:
        turbo = self.turbo_layers
        specs = sorted({(lay.k_spec.format, lay.v_spec.format) for lay in turbo})
        desc = ", ".join(f"k={kf} v={vf}" for kf, vf in specs)
        tokens = int(self.get_seq_length())
        nb, f16 = self.nbytes(), self.f16_nbytes()
        ratio = f"{nb / f16:.3f}x f16" if f16 else "empty"
        d = next((lay.head_dim for lay in turbo if lay.is_initialized), 0)
        bpv = ""
        if d:
            kb = formats.bits_per_value(turbo[0].k_spec.format, d)
            vb = formats.bits_per_value(turbo[0].v_spec.format, d)
            bpv = f", {kb:.3f}/{vb:.3f} bits per value (first attention layer K/V)"
        shared = len(self.kv_sources)
        state = sum(kind in STATE_LAYER_TYPES for kind in self.layer_types)
        hybrid = sum(kind in HYBRID_LAYER_TYPES for kind in self.layer_types)
        none = sum(kind in NO_CACHE_LAYER_TYPES for kind in self.layer_types)
        kept = f" ({state} with transformers' state layers)" if state else ""
        kept += f" ({hybrid} hybrid, with a recurrent state beside the attention)" if hybrid else ""
        kept += f" ({none} without attention)" if none else ""
        kept += f" ({shared} KV-shared, reading other layers' cache)" if shared else ""
        return f"TurboCache({self.num_model_layers} layers{kept}, {desc}{bpv}, {tokens} tokens, {nb} bytes, {ratio})"

    # ------------------------------------------------------------------ saving and loading (cache_file.py)

    def save(self, path) -> None:
        """Write this cache to ``path`` (safetensors, no pickle) for :meth:`load`; see turbokv.hf.cache_file."""
        cache_file.save(self, path)

    @classmethod
    def load(cls, path, config, device="cpu", max_cache_len: int | None = None, **expected) -> TurboCache:
        """The cache saved at ``path``, for a model of ``config``, on ``device``; checks the file against
        the config (and the formats / rotations named in ``expected``); see turbokv.hf.cache_file.load."""
        return cache_file.load(path, config, cls.for_config, device=device, max_cache_len=max_cache_len, **expected)

    # ------------------------------------------------------------------ calibrated policies (policy.py)

    @classmethod
    def from_policy(cls, config, path, max_cache_len: int | None = None, windows: bool = True) -> TurboCache:
        """A cache laid out by the policy file at ``path`` (``turbokv calibrate``): per layer and side a
        format and rotation, key offsets and exact token windows. Checks the policy against ``config``
        (layers, KV heads, head dim, model type; offsets refused with softcapping); ``ValueError``
        naming what differs. ``windows=False`` leaves the policy's exact token windows out (the policy
        was chosen with them, so expect more error)."""
        policy = Policy.load(path)
        check_against(policy, config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        types = _layer_types(text, policy.num_layers)
        for i, (kind, lp) in enumerate(zip(types, policy.layers, strict=True)):
            if (lp is None) != (kind in STATE_LAYER_TYPES):
                want = "null" if kind in STATE_LAYER_TYPES else "formats"
                raise ValueError(f"policy: layers[{i}] got {lp!r}, expected {want} for a {kind} layer")
        first = next(lp for lp in policy.layers if lp is not None)
        cache = cls.for_config(
            text,
            k=first.k,
            v=first.v,
            max_cache_len=max_cache_len,
            sink_tokens=policy.sink_tokens if windows else 0,
            recent_tokens=policy.recent_tokens if windows else 0,
        )
        for i, lp in enumerate(policy.layers):
            if lp is None:
                continue
            layer = cache.layers[i]
            layer.k_spec, layer.v_spec = SideSpec(lp.k, lp.rotate_k), SideSpec(lp.v, lp.rotate_v)
            if lp.k_offset:
                layer.set_k_offset(policy.k_offsets[i])
        cache.policy = policy
        return cache
