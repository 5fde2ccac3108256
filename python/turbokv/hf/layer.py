"""The cache layers of a TurboCache and what decides them from a model's config.

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
from transformers.cache_utils import CacheLayerMixin

from turbokv.core import formats, ops
from turbokv.core.rotation import Rotation, auto_rotation
from turbokv.hf.exact_tokens import ExactTokens

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
        # Key offset (policy files, turbokv.hf.policy): (Hkv, d) float32 subtracted from every key before it is
        # stored. Exact for the fused scores (softmax ignores q·m, a per-query constant); the dequantized
        # path adds it back. None: no shift.
        self.k_offset: torch.Tensor | None = None
        # Exact token windows (turbokv.hf.exact_tokens): the first sink_tokens and the last recent_tokens positions
        # kept in f16 beside the packed cache; None without them.
        self.sink_tokens, self.recent_tokens = sink_tokens, recent_tokens
        self.exact: ExactTokens | None = None

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
            if self.exact is None or not self.exact.fits(key_states, self.dtype):  # reset() keeps a static one
                self.exact = ExactTokens(self.sink_tokens, self.recent_tokens, self.dtype, key_states)
            if self.is_compileable and not torch.compiler.is_compiling():
                for t in self.exact.buffers():
                    torch._dynamo.mark_static_address(t)
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

    @property
    def count(self) -> int | torch.Tensor:
        """Valid tokens without a host sync: static mode's 0-dim device tensor, else the int."""
        return self.cumulative_length if self.is_compileable else self._length

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
        if self.exact is not None:  # every token is packed too, from its exact copy
            key_states, value_states = self.exact.append(key_states, value_states, self.count, keep=fused)
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
        if self.exact is not None:
            k, v = self.exact.fill(k, v, self.count)
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
            if self.exact is not None:
                self.exact.zero_()  # kept, addresses and all, like the packed buffers
        else:
            self._length = 0
            self.k_packed = self.v_packed = None
            self.exact = None

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens; 0: nothing; positive (legacy): keep that many.

        Assisted generation calls ``crop(-rejected)`` every round, so ``crop(0)`` (every draft
        token accepted) must keep the cache, as transformers' layers do.
        """
        if tokens_to_remove == 0:
            return
        before = self.length
        keep = tokens_to_remove if tokens_to_remove > 0 else before + tokens_to_remove
        self.length = max(0, min(before, keep))
        if self.exact is not None:
            self.exact.crop(self.length, self._packed_rows, before)

    # The three batch edits of beam search / contrastive decoding: the batch size that later
    # updates must match is the buffers' first dim, so these set it.

    def _map_batch(self, fn) -> None:
        """Apply a batch edit or device move to the packed buffers and the exact windows."""
        if self.is_initialized:
            self._set_buffers(fn(self.k_packed), fn(self.v_packed))
            if self.exact is not None:
                self.exact.map_batch(fn)

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
        exact = 0 if self.exact is None else self.exact.tokens(self.length)
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
    """Exact token windows: two ints >= 0, fewer than a static cache's capacity."""
    for name, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
        _check_int(name, value, 0, 1 << 30)
    if max_cache_len is not None and sink_tokens + recent_tokens > max_cache_len:
        raise ValueError(
            f"sink_tokens / recent_tokens: got {sink_tokens} / {recent_tokens} with max_cache_len={max_cache_len}, "
            "expected at most max_cache_len exact tokens in all"
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
