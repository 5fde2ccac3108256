"""TurboCache for MiniMax, whose model accepts no cache but its own class (``MiniMaxCache``).

``TurboCache.for_config(config)`` of a MiniMax config builds this (registered below): a TurboCache
that is also a ``MiniMaxCache``. The attention layers are TurboLayers as in any TurboCache; MiniMax's
lightning-attention layers keep their state where the model puts it, in ``linear_cache`` (one tensor
per layer, uncompressed), as ``MiniMaxCache`` does. Like ``MiniMaxCache``, it cannot be cropped.
"""

from __future__ import annotations

import torch
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from turbokv.hf.cache import TurboCache
from turbokv.hf.layer import _HF_LAYERS, STATE_LAYER_TYPES


class MiniMaxTurboCache(TurboCache, MiniMaxCache):
    """A TurboCache for MiniMax models; build it as ``TurboCache.for_config(config, ...)``."""

    is_croppable = False

    def __init__(self, config, *args, **kwargs):
        TurboCache.__init__(self, config, *args, **kwargs)
        # The lightning-attention layers never touch their cache layer (their state goes to linear_cache):
        # transformers' placeholder layer there, whose batch edits and resets do nothing.
        placeholder = _HF_LAYERS.get("dummy")
        if placeholder is not None:
            kinds = zip(self.layers, self.layer_types, strict=True)
            self.layers = [placeholder() if kind in STATE_LAYER_TYPES else layer for layer, kind in kinds]
        self.linear_cache: list[torch.Tensor | list] = []

    def __len__(self) -> int:
        return len(self.layers)  # every layer exists from the start (MiniMaxCache grows them)

    def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
        """Layer ``layer_idx``'s lightning-attention state, or None before its first forward."""
        state = self.linear_cache[layer_idx] if layer_idx < len(self.linear_cache) else []
        return None if isinstance(state, list) else state

    def reset(self) -> None:
        TurboCache.reset(self)
        self.linear_cache = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._edit_states(lambda t: t.index_select(0, beam_idx.to(t.device)))
        TurboCache.reorder_cache(self, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._edit_states(lambda t: t.repeat_interleave(repeats, dim=0))
        TurboCache.batch_repeat_interleave(self, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._edit_states(lambda t: t[indices, ...])
        TurboCache.batch_select_indices(self, indices)

    def _edit_states(self, edit) -> None:
        self.linear_cache = [s if isinstance(s, list) else edit(s) for s in self.linear_cache]

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("crop: MiniMax's lightning-attention state cannot be rolled back (MiniMaxCache cannot crop)")

    def save(self, path) -> None:
        raise NotImplementedError(
            "cache.save: a MiniMax cache's lightning-attention states (linear_cache) are not in the file format yet"
        )


TurboCache.register_model_type("minimax", MiniMaxTurboCache)
