"""The transformers integration: TurboCache and its layers, the patched attention, exact token
windows, cache files, calibrated policies (the cache's layout) and the MiniMax cache.

Importing it registers every model-specific cache class with TurboCache.for_config."""

from turbokv.hf import minimax
from turbokv.hf.attention import cache_kwargs, patch, unpatch
from turbokv.hf.cache import TurboCache
from turbokv.hf.layer import TurboLayer

__all__ = ["TurboCache", "TurboLayer", "cache_kwargs", "minimax", "patch", "unpatch"]
