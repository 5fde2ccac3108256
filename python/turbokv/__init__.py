"""turbokv: KV-cache compression with Hadamard rotation and attention over the packed cache."""

from turbokv import formats, reference, rotation
from turbokv.ops import attention, cache_append, dequantize, hadamard, native_loaded, quantize

__all__ = [
    "attention",
    "cache_append",
    "dequantize",
    "formats",
    "hadamard",
    "native_loaded",
    "quantize",
    "reference",
    "rotation",
]
__version__ = "0.1.0"
