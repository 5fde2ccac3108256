"""turbokv: KV-cache compression with Hadamard rotation and attention over the packed cache."""

from turbokv import formats, reference, rotation
from turbokv.ops import attention, cache_append, dequantize, hadamard, merge_attention, native_loaded, quantize

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
    "cache",
    "hf",
    "patch",
    "unpatch",
]
__version__ = "0.1.0"

_HF = {"TurboCache": "turbokv.cache", "TurboLayer": "turbokv.cache", "patch": "turbokv.hf", "unpatch": "turbokv.hf"}
_HF_MODULES = ("cache", "hf")  # submodules that need transformers


def __getattr__(name: str):
    """The transformers integration loads on first use, so the core needs no transformers."""
    import importlib

    if name in _HF_MODULES:
        return importlib.import_module(f"turbokv.{name}")
    if name in _HF:
        return getattr(importlib.import_module(_HF[name]), name)
    raise AttributeError(f"module 'turbokv' has no attribute {name!r}")
