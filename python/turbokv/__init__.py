"""turbokv: KV-cache compression with Hadamard rotation and attention over the packed cache."""

from turbokv.core import formats, ops, reference, rotation
from turbokv.core.ops import attention, cache_append, dequantize, hadamard, merge_attention, native_loaded, quantize

__all__ = [
    "attention",
    "cache_append",
    "dequantize",
    "formats",
    "hadamard",
    "merge_attention",
    "native_loaded",
    "quantize",
    "reference",
    "rotation",
    "TurboCache",
    "TurboLayer",
    "core",
    "hf",
    "ops",
    "quality",
    "patch",
    "unpatch",
]
__version__ = "0.1.0"

_HF = ("TurboCache", "TurboLayer", "patch", "unpatch")  # the transformers integration's public names
_LAZY_MODULES = ("hf", "quality")  # subpackages that need transformers


def __getattr__(name: str):
    """The transformers integration loads on first use, so the core needs no transformers."""
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"turbokv.{name}")
    if name in _HF:
        return getattr(importlib.import_module("turbokv.hf"), name)
    raise AttributeError(f"module 'turbokv' has no attribute {name!r}")
