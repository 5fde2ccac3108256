"""TurboCache: a transformers ``Cache`` whose attention layers hold packed, rotated K/V.

Each full-attention or sliding-window layer is a :class:`TurboLayer`: K and V are
stored as ``(B, Hkv, capacity, row_bytes)`` uint8 buffers written by
``turbokv.cache_append`` and grown geometrically. Two ways to read them:

* fused (``turbokv.patch(model)``): the patched attention module announces each call
  (:meth:`TurboCache.bind_fused`), ``update`` returns the packed buffers and the
  registered attention function runs ``turbokv.attention`` on them;
* fallback (an unpatched model): ``update`` returns dequantized, un-rotated K/V, so
  stock SDPA / eager attention work unchanged (slow, correct).

A layer's batch size, head count, head dim, dtype and device are fixed by its first
``update``; a new batch needs ``cache.reset()`` (or a new cache). Beam search's
``reorder_cache`` / ``batch_repeat_interleave`` / ``batch_select_indices`` change the
batch size legitimately.

Sliding-window layers are compressed too and keep every token; the window is
applied inside attention (the stock masks apply it on the fallback path).

Hybrid models (linear attention, conv or state-space layers between the attention layers:
Qwen3.5, Qwen3-Next, LFM2, ...): those layers hold a recurrent or conv state, no per-token
K/V; TurboCache keeps transformers' own cache layer for them, as DynamicCache builds it, and
compresses the attention layers.

Static capacity (``max_cache_len=N``): buffers are allocated once at N tokens, the
token count lives in a device tensor, and ``update`` does no host syncs and no
data-dependent shapes, so ``generate()`` can compile the decode step (CUDA graphs),
as with transformers' ``StaticCache``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import transformers.cache_utils as hf_cache
from transformers.cache_utils import Cache, CacheLayerMixin

from turbokv import formats, ops
from turbokv.rotation import Rotation, auto_rotation
from turbokv.windows import ExactWindows

ROTATE_CHOICES = ("auto", "on", "off")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# Layer types with no per-token K/V, whose cache layer transformers builds (a recurrent or conv
# state): what this transformers' DynamicCache maps them to. Layers that hold both such a state
# and attention K/V ("hybrid") are not among them.
_HF_LAYERS = getattr(hf_cache, "DYNAMIC_LAYER_TYPE_MAPPING", {})
STATE_LAYER_TYPES = tuple(t for t in ("linear_attention", "conv") if t in _HF_LAYERS)
# Layers that hold both (Falcon-H1, Zamba: attention and a mamba mixer side by side): TurboHybridLayer.
HYBRID_LAYER_TYPES = {t: window for t, window in (("hybrid", False), ("hybrid_sliding", True)) if t in _HF_LAYERS}
# Layers with no attention and no state (MoE / MLP blocks of Nemotron-H): what this transformers'
# DynamicCache holds for them (its placeholder layer; an empty linear-attention layer before 5.2x).
NO_CACHE_LAYER_TYPES = ("moe", "mlp") if "dummy" in _HF_LAYERS or "moe" in _HF_LAYERS else ()
NEW_BATCH_HINT = "a new batch needs cache.reset() or a new TurboCache"


@dataclass(frozen=True)
class SideSpec:
    """One side (K or V) of one layer: format and rotation policy."""

    format: str
    rotate: str = "auto"

    def __post_init__(self):
        formats.get(self.format)
        if self.rotate not in ROTATE_CHOICES:
            raise ValueError(f"rotate: got {self.rotate!r}, expected one of {ROTATE_CHOICES}")

    def rotation(self, head_dim: int, side: str) -> Rotation:
        auto = auto_rotation(self.format, head_dim, side)
        if self.rotate == "off":
            return Rotation()
        if self.rotate == "on" and not auto.enabled:  # f16/bf16 with rotation forced on
            return auto_rotation("q8_0", head_dim, side)
        return auto


def _lengths_tensor(n: int, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), n, dtype=torch.int64, device=device)


class TurboLayer(CacheLayerMixin):
    """One attention layer's packed K/V cache.

    Buffers: ``k_packed`` / ``v_packed`` of shape ``(B, Hkv, capacity, row_bytes)``;
    ``length`` tokens are valid (the same for every sequence: left padding is
    handled by the attention mask, as in transformers' DynamicLayer).
    """

    is_croppable = True

    def __init__(
        self,
        k: SideSpec,
        v: SideSpec,
        sliding_window: int | None = None,
        max_cache_len: int | None = None,
        chunk_size: int | None = None,
        sink_tokens: int = 0,
        recent_tokens: int = 0,
    ):
        super().__init__()
        _check_max_cache_len(max_cache_len)
        _check_windows(sink_tokens, recent_tokens, max_cache_len)
        self.k_spec, self.v_spec = k, v
        self.sliding_window = sliding_window
        # Chunked attention (Llama 4): a query sees the keys of its own chunk of chunk_size tokens, counted
        # from each sequence's first valid token. Like a window, a mask over every token kept.
        self.chunk_size = chunk_size
        # As transformers' caches have it (chunked layers are sliding-window layers there): masks pick layers by it.
        self.is_sliding = sliding_window is not None or chunk_size is not None
        self.max_cache_len = max_cache_len
        self.is_compileable = max_cache_len is not None
        # Set by TurboCache.bind_fused (patch()'s pre-hook on the attention module), consumed by
        # the next update: only a patched module can read the packed buffers.
        self.fused_next = False
        # Static mode counts tokens in a device tensor (a Python int would be baked into a
        # compiled graph); dynamic mode in a Python int.
        self.cumulative_length = torch.zeros((), dtype=torch.int64) if self.is_compileable else None
        self._length = 0
        self.k_packed: torch.Tensor | None = None
        self.v_packed: torch.Tensor | None = None
        self.head_dim = 0
        # Key offset (policy files, turbokv.policy): (Hkv, d) float32 subtracted from every key before it is
        # stored. Exact for the fused scores (softmax ignores q·m, a per-query constant); the dequantized
        # path adds it back. None: no shift.
        self.k_offset: torch.Tensor | None = None
        # Exact token windows (turbokv.windows): the first sink_tokens and the last recent_tokens positions
        # kept in f16 beside the packed cache; None without them.
        self.sink_tokens, self.recent_tokens = sink_tokens, recent_tokens
        self.windows: ExactWindows | None = None

    @property
    def has_windows(self) -> bool:
        return bool(self.sink_tokens or self.recent_tokens)

    # ------------------------------------------------------------------ storage

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.k_rot = self.k_spec.rotation(self.head_dim, "k")
        self.v_rot = self.v_spec.rotation(self.head_dim, "v")
        b, h = key_states.shape[:2]
        if self.is_compileable:
            if not self._static_buffers_fit(b, h):
                self.k_packed = self.v_packed = None
                self._alloc(b, h, self.max_cache_len)
            self.cumulative_length = self.cumulative_length.to(self.device)
            if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay on these buffers
                for t in (self.k_packed, self.v_packed, self.cumulative_length):
                    torch._dynamo.mark_static_address(t)
        else:
            self._alloc(b, h, max(256, key_states.shape[-2]))
        if self.has_windows:
            self.windows = ExactWindows(self.sink_tokens, self.recent_tokens, self.dtype)
        self.is_initialized = True

    @property
    def length(self) -> int:
        """Valid tokens (a host sync in static mode: not for the compiled decode step)."""
        return int(self.cumulative_length) if self.is_compileable else self._length

    @length.setter
    def length(self, n: int) -> None:
        if self.is_compileable:
            self.cumulative_length.fill_(n)
        else:
            self._length = n

    def _static_buffers_fit(self, batch: int, heads: int) -> bool:
        """Whether buffers kept by reset() hold this batch shape: then they are reused, addresses and all."""
        if self.k_packed is None or self.k_packed.device != self.device:
            return False
        kb = formats.row_bytes(self.k_spec.format, self.head_dim)
        vb = formats.row_bytes(self.v_spec.format, self.head_dim)
        cap = self.max_cache_len
        return self.k_packed.shape == (batch, heads, cap, kb) and self.v_packed.shape == (batch, heads, cap, vb)

    def _alloc(self, batch: int, heads: int, capacity: int) -> None:
        kb = formats.row_bytes(self.k_spec.format, self.head_dim)
        vb = formats.row_bytes(self.v_spec.format, self.head_dim)
        k = torch.zeros(batch, heads, capacity, kb, dtype=torch.uint8, device=self.device)
        v = torch.zeros(batch, heads, capacity, vb, dtype=torch.uint8, device=self.device)
        if self.k_packed is not None and self.length:
            k[:, :, : self.length] = self.k_packed[:, :, : self.length]
            v[:, :, : self.length] = self.v_packed[:, :, : self.length]
        self._set_buffers(k, v)

    def _set_buffers(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.is_compileable and self.k_packed is not None and k.shape == self.k_packed.shape:
            self.k_packed.copy_(k)  # keep the static addresses
            self.v_packed.copy_(v)
            return
        self.k_packed, self.v_packed = k.contiguous(), v.contiguous()

    @property
    def capacity(self) -> int:
        return 0 if self.k_packed is None else self.k_packed.shape[2]

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """K and V agree with each other and, once initialized, with what this layer holds.

        Without this, a new batch size would be broadcast into the old rows when the buffer
        grows (every sequence would attend to sequence 0's history). Shapes, dtypes and
        devices are static under torch.compile: these checks cost nothing in a graph.
        """
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if t.dim() != 4:
                raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected (batch, kv_heads, tokens, head_dim)")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(
                f"value_states: got (batch, heads, tokens) {tuple(value_states.shape[:3])}, expected key_states' "
                f"{tuple(key_states.shape[:3])}"
            )
        if key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError(
                f"value_states: got head dim {value_states.shape[-1]}, expected the key head dim "
                f"{key_states.shape[-1]}: different K/V head dims (MLA) are not supported by TurboCache"
            )
        if key_states.dtype != value_states.dtype:
            raise ValueError(f"value_states: got dtype {value_states.dtype}, expected key_states' {key_states.dtype}")
        if not self.is_initialized:
            return
        fixed = (
            ("batch size", 0, self.batch_size),
            ("kv head count", 1, self.k_packed.shape[1]),
            ("head dim", 3, self.head_dim),
        )
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            seen = [(what, t.shape[dim], want) for what, dim, want in fixed]
            seen += [("dtype", t.dtype, self.dtype), ("device", t.device, self.device)]
            for what, got, want in seen:
                if got != want:
                    raise ValueError(
                        f"{name}: got {what} {got}, expected {want} (fixed by this layer's first update); "
                        f"{NEW_BATCH_HINT}"
                    )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, Hkv, S, d)`` new K/V; return what the attention function expects.

        Returns the packed buffers when patch()'s hook announced this call (``fused_next``),
        else dequantized ``(B, Hkv, T, d)`` K/V for stock attention.
        """
        fused, self.fused_next = self.fused_next, False
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, s, _ = key_states.shape
        if self.is_compileable:
            # No host syncs: positions come from the device-side token count. Writing past
            # max_cache_len is refused by cache_append (eager), or clamped while a CUDA graph
            # is captured.
            positions = (torch.arange(s, device=self.device) + self.cumulative_length).expand(b, s)
        else:
            if self.length + s > self.capacity:
                self._alloc(b, h, max(2 * self.capacity, self.length + s))
            positions = torch.arange(self.length, self.length + s, device=self.device).expand(b, s)
        if self.k_offset is not None:
            key_states = key_states - self._k_offset_for(key_states)
        if self.windows is not None:  # only what leaves the exact windows is quantized now
            key_states, value_states, first = self.windows.append(key_states, value_states, self.length)
            positions = torch.arange(first, first + key_states.shape[2], device=self.device).expand(b, -1)
        if key_states.shape[2]:
            ops.cache_append(
                self.k_packed,
                self.v_packed,
                key_states,
                value_states,
                positions,
                self.k_spec.format,
                self.v_spec.format,
                self.k_rot,
                self.v_rot,
            )
        if self.is_compileable:
            self.cumulative_length.add_(s)
        else:
            self.length += s
        if fused:
            return self.k_packed, self.v_packed
        return self.dequantized()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated K/V of the valid tokens, ``(B, Hkv, length, d)`` in the model's dtype.

        Static mode returns all ``max_cache_len`` slots (the mask hides the unused ones), as
        transformers' StaticLayer does.
        """
        n = self.capacity if self.is_compileable else self.length
        d = self.head_dim
        k = ops.dequantize(self.k_packed[:, :, :n], self.k_spec.format, d, self.k_rot, dtype=self.dtype)
        v = ops.dequantize(self.v_packed[:, :, :n], self.v_spec.format, d, self.v_rot, dtype=self.dtype)
        if self.windows is not None:
            k, v = self.windows.fill(k, v)
        if self.k_offset is not None:
            k = k + self._k_offset_for(k)
        return k, v

    def _packed_rows(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K/V of positions ``[a, b)`` as stored (key offset not added), in the model's dtype."""
        d = self.head_dim
        k = ops.dequantize(self.k_packed[:, :, a:b], self.k_spec.format, d, self.k_rot, dtype=self.dtype)
        v = ops.dequantize(self.v_packed[:, :, a:b], self.v_spec.format, d, self.v_rot, dtype=self.dtype)
        return k, v

    def set_k_offset(self, offset: torch.Tensor | None) -> None:
        """Shift the keys of this layer by ``offset`` ``(Hkv, d)`` (None: no shift); only while it holds no tokens."""
        if self.is_initialized and self.length:
            raise ValueError("offset: got a key offset for a layer that holds tokens; set it before the first update")
        if offset is not None and offset.dim() != 2:
            raise ValueError(f"offset: got shape {tuple(offset.shape)}, expected (kv_heads, head_dim)")
        self.k_offset = None if offset is None else offset.detach().float().clone()

    def _k_offset_for(self, keys: torch.Tensor) -> torch.Tensor:
        """The offset as ``(1, Hkv, 1, d)`` in ``keys``' dtype and device; checks it fits ``(B, Hkv, S, d)`` keys."""
        if self.k_offset.shape != (keys.shape[1], keys.shape[3]):
            raise ValueError(
                f"offset: got shape {tuple(self.k_offset.shape)}, expected (kv_heads, head_dim) = "
                f"{(keys.shape[1], keys.shape[3])} of this layer's keys"
            )
        if self.k_offset.device != keys.device:
            self.k_offset = self.k_offset.to(keys.device)
        return self.k_offset.to(keys.dtype)[None, :, None, :]

    def lengths(self) -> torch.Tensor:
        """Valid tokens per sequence, ``(B,)`` int64 on the cache's device."""
        if self.is_compileable:
            return self.cumulative_length.expand(self.k_packed.shape[0])
        return _lengths_tensor(self.length, self.k_packed.shape[0], self.device)

    # ------------------------------------------------------------------ what generation needs

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_compileable:
            return self.max_cache_len, 0
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        if self.is_compileable:
            return self.cumulative_length if self.is_initialized else 0
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len if self.is_compileable else -1

    def reset(self) -> None:
        """Forget the tokens and the batch shape: the next update initializes the layer again.

        Dynamic mode frees the buffers. Static mode zeroes them in place and keeps them: a new
        batch of the same shape is written into the same addresses (CUDA graphs captured on
        them stay valid); another shape reallocates.
        """
        self.is_initialized = False
        self.fused_next = False
        if self.is_compileable:
            self.cumulative_length.zero_()
            if self.k_packed is not None:
                self.k_packed.zero_()
                self.v_packed.zero_()
        else:
            self._length = 0
            self.k_packed = self.v_packed = None
        self.windows = None

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens; 0: nothing; positive (legacy): keep that many.

        Assisted generation calls ``crop(-rejected)`` every round, so ``crop(0)`` (every draft
        token accepted) must keep the cache, as transformers' layers do.
        """
        if tokens_to_remove == 0:
            return
        keep = tokens_to_remove if tokens_to_remove > 0 else self.length + tokens_to_remove
        self.length = max(0, min(self.length, keep))
        if self.windows is not None:
            self.windows.crop(self.length, self._packed_rows)

    # The three batch edits of beam search / contrastive decoding: the batch size that later
    # updates must match is the buffers' first dim, so these set it.

    def _map_batch(self, fn) -> None:
        """Apply a batch edit or device move to the packed buffers and the exact windows."""
        if self.is_initialized:
            self._set_buffers(fn(self.k_packed), fn(self.v_packed))
            if self.windows is not None:
                self.windows.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def offload(self):
        self._map_batch(lambda t: t.to("cpu"))

    def prefetch(self):
        if self.is_initialized and self.k_packed.device != self.device:
            self._map_batch(lambda t: t.to(self.device))

    @property
    def batch_size(self) -> int:
        """Sequences held (fixed between resets, changed by the beam-search batch edits); -1 before the first update."""
        return self.k_packed.shape[0] if self.is_initialized else -1

    def nbytes(self) -> int:
        """Bytes of the valid packed K/V (capacity slack excluded)."""
        if not self.is_initialized:
            return 0
        b, h = self.k_packed.shape[:2]
        # The exact windows' f16 rows (2 bytes a value, K and V) come on top: the packed buffer keeps a
        # row for every position, written when the token leaves the window.
        exact = 0 if self.windows is None else self.windows.tokens(self.length)
        packed = self.length * (self.k_packed.shape[3] + self.v_packed.shape[3])
        return b * h * (packed + exact * 4 * self.head_dim)

    def __repr__(self) -> str:
        return f"TurboLayer(k={self.k_spec.format}, v={self.v_spec.format}, tokens={self.length})"


if HYBRID_LAYER_TYPES:

    class TurboHybridLayer(TurboLayer, hf_cache.LinearAttentionLayer):
        """A layer with attention and a linear-attention / mamba state side by side (transformers'
        ``"hybrid"`` / ``"hybrid_sliding"`` layer types): packed K/V as a :class:`TurboLayer`, the conv and
        recurrent states as transformers' ``LinearAttentionLayer`` keeps them (uncompressed: they are
        small and fixed-size). Cache methods that take a layer's state (``update_conv_state``,
        ``has_previous_state``, ...) see it as the linear-attention layer it also is.
        """

        def __init__(self, k: SideSpec, v: SideSpec, number_of_states: int = 1, **kwargs):
            TurboLayer.__init__(self, k, v, **kwargs)
            hf_cache.LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

        # The state is compileable unless it records its past (assisted generation); the K/V when static.
        @property
        def is_compileable(self) -> bool:
            return self._static and not getattr(self, "record_past", False)

        @is_compileable.setter
        def is_compileable(self, value: bool) -> None:
            self._static = value

        def lazy_initialization(self, *args, **kwargs) -> None:
            # update() passes (key_states, value_states); the state updates pass keywords only.
            if args:
                TurboLayer.lazy_initialization(self, *args, **kwargs)
                return
            device = self.device
            hf_cache.LinearAttentionLayer.lazy_initialization(self, **kwargs)
            states = kwargs.get("conv_states")
            # The attention side set self.device first. (transformers before 5.2x counts the linear
            # side's length in a Python int: nothing to move.)
            if device is not None and states is not None and hasattr(self, "cumulative_length_linear"):
                self.cumulative_length_linear = self.cumulative_length_linear.to(states.device)

        def reset(self) -> None:
            hf_cache.LinearAttentionLayer.reset(self)
            TurboLayer.reset(self)

        def crop(self, tokens_to_remove: int) -> None:
            hf_cache.LinearAttentionLayer.crop(self, tokens_to_remove)
            TurboLayer.crop(self, tokens_to_remove)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            hf_cache.LinearAttentionLayer.reorder_cache(self, beam_idx)
            TurboLayer.reorder_cache(self, beam_idx)

        def offload(self):
            hf_cache.LinearAttentionLayer.offload(self)
            TurboLayer.offload(self)

        def prefetch(self):
            hf_cache.LinearAttentionLayer.prefetch(self)
            TurboLayer.prefetch(self)

        def get_seq_length(self) -> int:
            return TurboLayer.get_seq_length(self)

        def get_max_length(self) -> int:
            return TurboLayer.get_max_length(self)

        def __repr__(self) -> str:
            return f"TurboHybridLayer(k={self.k_spec.format}, v={self.v_spec.format}, tokens={self.length})"


# ---------------------------------------------------------------------- argument checks


def _check_linear_crop(i: int, layer, tokens_to_remove: int) -> None:
    """What transformers' linear-attention layer refuses in ``crop``, raised before any layer changes."""
    if not layer.record_past:
        raise RuntimeError(
            f"crop: layer {i} keeps a linear-attention state that does not record its past; call "
            "cache.activate_past_recording() before the forward that crop undoes (assisted generation does)"
        )
    if tokens_to_remove > 0:
        raise RuntimeError(
            f"crop: got {tokens_to_remove}, expected a negative count of tokens to remove (layer {i} keeps a "
            "linear-attention state)"
        )
    history = getattr(layer, "recurrent_states_history", None) or {}
    for s, kept in history.items():
        if tokens_to_remove and layer.is_recurrent_states_initialized[s] and len(kept) < -tokens_to_remove:
            raise RuntimeError(
                f"crop: got {tokens_to_remove}, but layer {i} recorded {len(kept)} past states; expected at least "
                f"{-tokens_to_remove}"
            )


def _type_name(value) -> str:
    return type(value).__name__


def _check_int(name: str, value, low: int, high: int) -> int:
    """An int (not a bool) in ``[low, high]``: TypeError / ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: got {value!r} ({_type_name(value)}), expected an int")
    if not low <= value <= high:
        raise ValueError(f"{name}: got {value}, expected {low} <= {name} <= {high}")
    return value


def _check_windows(sink_tokens, recent_tokens, max_cache_len) -> None:
    """Exact token windows: two ints >= 0; not with a static cache (not built)."""
    for name, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
        _check_int(name, value, 0, 1 << 30)
    if not (sink_tokens or recent_tokens):
        return
    if max_cache_len is not None:
        raise ValueError(
            f"sink_tokens / recent_tokens: got {sink_tokens} / {recent_tokens} with max_cache_len={max_cache_len}, "
            "expected a dynamic cache (exact token windows are not built for the static, compileable cache)"
        )


def _check_max_cache_len(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_cache_len: got {value!r} ({_type_name(value)}), expected an int number of tokens or None")
    if value < 1:
        raise ValueError(f"max_cache_len: got {value}, expected a positive number of tokens or None")


def _check_format(name: str, value, what: str = "") -> str:
    """A known format name; ``what`` says which one of several values ``name`` holds (``"k format"``)."""
    got = f"got {what} " if what else "got "
    if not isinstance(value, str):
        raise TypeError(f"{name}: {got}{value!r} ({_type_name(value)}), expected a format name")
    if value not in formats.FORMATS:
        raise ValueError(f"{name}: {got}{value!r}, expected one of {sorted(formats.FORMATS)}")
    return value


def _check_rotate(name: str, value) -> str:
    if not isinstance(value, str) or value not in ROTATE_CHOICES:
        raise ValueError(f"{name}: got {value!r}, expected one of {ROTATE_CHOICES}")
    return value


def _check_overrides(overrides, n_layers: int) -> dict[int, tuple[str, str]]:
    """``{layer index: (k_format, v_format)}`` with every index in ``[0, n_layers)``."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides: got {_type_name(overrides)} {overrides!r}, "
            "expected a dict {layer index: (k_format, v_format)} or None"
        )
    checked = {}
    for i, pair in overrides.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"overrides: got layer index {i!r} ({_type_name(i)}), expected an int")
        if not 0 <= i < n_layers:
            raise ValueError(
                f"overrides: got layer index {i}, expected 0 <= index < {n_layers} (the config's num_hidden_layers)"
            )
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"overrides[{i}]: got {pair!r}, expected a (k_format, v_format) pair")
        checked[i] = (
            _check_format(f"overrides[{i}]", pair[0], "k format"),
            _check_format(f"overrides[{i}]", pair[1], "v format"),
        )
    return checked


def _default_layer_type(config) -> str:
    """Every layer's type for a config without ``layer_types``, as transformers infers it."""
    if getattr(config, "sliding_window", None):
        return "sliding_attention"
    if getattr(config, "attention_chunk_size", None):
        return "chunked_attention"
    return "full_attention"


def _layer_types(config, n_layers: int) -> list[str]:
    types = getattr(config, "layer_types", None) or [_default_layer_type(config)] * n_layers
    if len(types) < n_layers:
        raise ValueError(f"config.layer_types: got {len(types)} entries, expected num_hidden_layers={n_layers} of them")
    known = SUPPORTED_LAYER_TYPES + tuple(HYBRID_LAYER_TYPES) + STATE_LAYER_TYPES + NO_CACHE_LAYER_TYPES
    for i, kind in enumerate(types[:n_layers]):
        if kind not in known:
            raise ValueError(
                f"config.layer_types[{i}]: got {kind!r}, expected one of {known} (TurboCache compresses full, "
                "sliding-window and chunked attention layers and keeps transformers' cache layer for linear-attention "
                "and conv layers)"
            )
    if not any(kind in SUPPORTED_LAYER_TYPES or kind in HYBRID_LAYER_TYPES for kind in types[:n_layers]):
        raise ValueError(f"config.layer_types: got {sorted(set(types[:n_layers]))}, expected some attention layers")
    return list(types[:n_layers])


def _chunk_size(config) -> int:
    """``config.attention_chunk_size``, checked: chunked attention layers need it."""
    size = getattr(config, "attention_chunk_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"config.attention_chunk_size: got {size!r}, expected a positive int for its chunked_attention layers"
        )
    return size


def chunked_layers(config) -> dict[int, int]:
    """Chunked-attention layers (Llama 4) of ``config``: ``{layer: chunk size}``."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or [_default_layer_type(config)] * n
    return {i: _chunk_size(config) for i, kind in enumerate(types[:n]) if kind == "chunked_attention"}


def kv_sources(config) -> dict[int, int]:
    """KV sharing (Gemma 3n, Gemma 4): ``{layer: the earlier layer whose K/V it reads}``; ``{}`` without sharing.

    As transformers' models choose the source: ``config.kv_source_layers`` where the config names one per
    layer; else each of the last ``num_kv_shared_layers`` layers reads the last earlier layer of its own type.
    A shared layer computes no K/V and writes no cache: the model hands it what its source's ``update``
    returned (``shared_kv_states``).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = config.num_hidden_layers
    named = getattr(config, "kv_source_layers", None)
    if named is not None:
        return {i: int(source) for i, source in enumerate(named[:n]) if source != i}
    shared = getattr(config, "num_kv_shared_layers", None) or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared < n:
        raise ValueError(
            f"config.num_kv_shared_layers: got {shared!r}, expected 0 <= num_kv_shared_layers < {n} "
            "(num_hidden_layers): some layer must compute the K/V the shared layers read"
        )
    types = getattr(config, "layer_types", None) or [_default_layer_type(config)] * n
    first = n - shared
    sources = {}
    for i in range(first, n):
        earlier = [j for j in range(first) if types[j] == types[i]]
        if not earlier:
            raise ValueError(
                f"config.layer_types[{i}]: got {types[i]!r} for a KV-shared layer, expected a type that one of the "
                f"first {first} layers has (the shared layer reads the last of them)"
            )
        sources[i] = earlier[-1]
    return sources


def _shared_layer():
    """What transformers' DynamicCache holds for a KV-shared layer (its DummyLayer), or None where it drops
    those layers (transformers before DummyLayer: the shared layers are the last ones there)."""
    cls = getattr(hf_cache, "DYNAMIC_LAYER_TYPE_MAPPING", {}).get("dummy")
    return None if cls is None else cls()


def _state_layer(kind: str, config, max_cache_len: int | None):
    """transformers' own cache layer for a layer of ``kind`` in STATE_LAYER_TYPES."""
    mapping = hf_cache.DYNAMIC_LAYER_TYPE_MAPPING
    if max_cache_len is not None:
        mapping = getattr(hf_cache, "STATIC_LAYER_TYPE_MAPPING", mapping)
    cls = mapping[kind]
    # As transformers' get_layer_types_and_kwargs: some models keep several conv states a layer.
    states = getattr(config, "number_of_conv_states", None)
    return cls(number_of_states=states) if states is not None else cls()


class TurboCache(Cache):
    """A transformers Cache storing K/V in turbokv formats.

    ``TurboCache(model.config, k="turbo3", v="turbo3")``. Per side: a format and a
    rotation policy (``rotate_k`` / ``rotate_v``: auto, on, off). ``overrides`` maps
    layer index -> ``(k_format, v_format)``; ``keep_first`` / ``keep_last`` layers use
    ``keep_format`` (a common guard at very low bits). ``sink_tokens`` / ``recent_tokens``
    keep the first and each query's last tokens exact (f16) beside the packed cache
    (turbokv.windows; dynamic caches). ``max_cache_len=N`` makes the
    cache static (preallocated, compileable: ``generate()`` then compiles decoding). Pass it as
    ``generate(past_key_values=cache)``; with ``turbokv.patch(model)`` attention
    reads the packed cache directly. Every argument is checked (``TypeError`` /
    ``ValueError`` naming it).

    One cache serves one model (its layer count) and one batch shape at a time:
    ``reset()`` starts over with any batch.
    """

    def __new__(cls, config=None, *args, **kwargs):
        # MiniMax's model takes only a cache of its own class: build the TurboCache that is one.
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if cls is TurboCache and getattr(text, "model_type", None) == "minimax":
            from turbokv.cache_minimax import MiniMaxTurboCache

            cls = MiniMaxTurboCache
        return super().__new__(cls)

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
        packed rows (a row for every position), the exact windows' 16-bit copies and the key
        offsets (one fp16 vector per KV head and layer), as :meth:`nbytes` counts them."""
        k_bits = v_bits = values = 0
        for layer in self.turbo_layers:
            if not layer.is_initialized or not layer.length:
                continue
            b, h = layer.k_packed.shape[:2]
            n, d = layer.length, layer.head_dim
            exact = 0 if layer.windows is None else layer.windows.tokens(n)
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

    # ------------------------------------------------------------------ saving and loading (cache_io.py)

    def save(self, path) -> None:
        """Write this cache to ``path`` (safetensors, no pickle) for :meth:`load`; see turbokv.cache_io."""
        from turbokv import cache_io

        cache_io.save(self, path)

    @classmethod
    def load(cls, path, config, device="cpu", max_cache_len: int | None = None, **expected) -> TurboCache:
        """The cache saved at ``path``, for a model of ``config``, on ``device``; checks the file against
        the config (and the formats / rotations named in ``expected``); see turbokv.cache_io.load."""
        from turbokv import cache_io

        return cache_io.load(path, config, device=device, max_cache_len=max_cache_len, **expected)

    # ------------------------------------------------------------------ calibrated policies (policy.py)

    @classmethod
    def from_policy(cls, config, path, max_cache_len: int | None = None, windows: bool = True) -> TurboCache:
        """A cache laid out by the policy file at ``path`` (``turbokv calibrate``): per layer and side a
        format and rotation, key offsets and exact token windows. Checks the policy against ``config``
        (layers, KV heads, head dim, model type; offsets refused with softcapping); ``ValueError``
        naming what differs. ``windows=False`` leaves the policy's exact token windows out (the static
        cache, ``max_cache_len``, has none; the policy was chosen with them, so expect more error)."""
        from turbokv.policy import Policy, check_against

        policy = Policy.load(path)
        check_against(policy, config)
        if windows and max_cache_len is not None and (policy.sink_tokens or policy.recent_tokens):
            raise ValueError(
                f"max_cache_len: got {max_cache_len} for policy {path}, which keeps {policy.sink_tokens} sink + "
                f"{policy.recent_tokens} recent tokens exact (not built for the static cache); calibrate with "
                "--sink-tokens 0 --recent-tokens 0 for a static cache, or pass windows=False to use this policy "
                "without its windows"
            )
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        types = _layer_types(text, policy.num_layers)
        for i, (kind, lp) in enumerate(zip(types, policy.layers, strict=True)):
            if (lp is None) != (kind in STATE_LAYER_TYPES):
                want = "null" if kind in STATE_LAYER_TYPES else "formats"
                raise ValueError(f"policy: layers[{i}] got {lp!r}, expected {want} for a {kind} layer")
        first = next(lp for lp in policy.layers if lp is not None)
        cache = cls(
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
