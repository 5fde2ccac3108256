"""Typed wrappers around ``torch.ops.turbokv.*`` plus their fake (meta) kernels.

Shapes: rows ``(..., d)``; packed rows ``(..., row_bytes)`` uint8; caches
``(B, Hkv, T, row_bytes)`` uint8; queries ``(B, Hq, Sq, d)``.
A rotation is a :class:`turbokv.rotation.Rotation` (``group`` 0 = none).
"""

from __future__ import annotations

import math

import torch

from turbokv import formats
from turbokv.rotation import Rotation

try:  # loading the shared object registers the ops with the dispatcher
    from turbokv import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "turbokv: the native extension turbokv._C failed to load; rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch"
    ) from e

_ops = torch.ops.turbokv
NO_ROTATION = Rotation()


def native_loaded(device_type: str = "cpu") -> bool:
    """True when every turbokv op has a native kernel for ``device_type`` ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    names = ("hadamard", "quantize", "dequantize", "cache_append", "attention")
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"turbokv::{n}", key) for n in names)


def hadamard(x: torch.Tensor, group: int, seed: int | None = None, inverse: bool = False) -> torch.Tensor:
    """Normalised Hadamard rotation of the last dim of ``x`` in blocks of ``group``.

    ``x``: ``(..., n)`` with ``n % group == 0``; returns the same shape and dtype.
    With ``seed``: ``R = diag(s2) H/sqrt(n) diag(s1)``; ``inverse`` applies ``R^-1``.
    """
    return _ops.hadamard(x, group, seed, inverse)


def quantize(x: torch.Tensor, format: str, rot: Rotation = NO_ROTATION, check_finite: bool = True) -> torch.Tensor:
    """Pack rows ``x: (..., d)`` into ``(..., row_bytes(format, d))`` uint8.

    Rows are zero-padded to the stored width, rotated by ``rot``, then encoded.
    Non-finite input raises ``ValueError`` (a host sync); pass ``check_finite=False``
    on hot paths: the op then marks such groups with a NaN scale instead.
    """
    if check_finite and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x: got {bad} non-finite value(s) (NaN or Inf), expected finite values to quantize")
    return _ops.quantize(x, format, rot.group, rot.seed)


def dequantize(
    packed: torch.Tensor,
    format: str,
    head_dim: int,
    rot: Rotation = NO_ROTATION,
    unrotate: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unpack ``(..., row_bytes)`` to ``(..., head_dim)``, or to the rotated ``(..., dp)`` if not ``unrotate``."""
    return _ops.dequantize(packed, format, head_dim, rot.group, rot.seed, unrotate, dtype)


def cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_format: str,
    v_format: str,
    k_rot: Rotation = NO_ROTATION,
    v_rot: Rotation = NO_ROTATION,
) -> None:
    """Rotate, quantize and store ``k, v: (B, Hkv, S, d)`` at ``positions: (B, S)`` of the caches, in place."""
    _ops.cache_append(
        k_cache, v_cache, k, v, positions, k_format, k_rot.group, k_rot.seed, v_format, v_rot.group, v_rot.seed
    )


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor | None = None,
    *,
    k_format: str,
    v_format: str,
    k_rot: Rotation = NO_ROTATION,
    v_rot: Rotation = NO_ROTATION,
    scale: float | None = None,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of ``q: (B, Hq, Sq, d)`` over packed caches ``(B, Hkv, T, row_bytes)``.

    The ``Sq`` queries are the last ``Sq`` valid tokens: query ``i`` of sequence ``b``
    sits at position ``lengths[b] - Sq + i``; cache slots ``starts[b] <= j < lengths[b]``
    are valid (``starts`` skips left padding). ``window > 0`` keeps keys with
    ``qpos - j < window``; ``softcap > 0`` applies ``softcap * tanh(s / softcap)``.
    Returns ``(B, Hq, Sq, d)`` in q's dtype; rows with no valid key are zeros.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _ops.attention(
        q,
        k_cache,
        v_cache,
        lengths,
        starts,
        k_format,
        k_rot.group,
        k_rot.seed,
        v_format,
        v_rot.group,
        v_rot.seed,
        scale,
        causal,
        window,
        softcap,
    )


# ---------------------------------------------------------------- fake kernels (torch.compile, opcheck)


@torch.library.register_fake("turbokv::hadamard")
def _hadamard_fake(x, group, seed, inverse):
    return torch.empty_like(x)


@torch.library.register_fake("turbokv::quantize")
def _quantize_fake(x, format, rot_group, rot_seed):
    return x.new_empty((*x.shape[:-1], formats.row_bytes(format, x.shape[-1])), dtype=torch.uint8)


@torch.library.register_fake("turbokv::dequantize")
def _dequantize_fake(packed, format, head_dim, rot_group, rot_seed, unrotate, dtype):
    width = head_dim if unrotate else formats.padded_dim(format, head_dim)
    return packed.new_empty((*packed.shape[:-1], width), dtype=dtype)


@torch.library.register_fake("turbokv::cache_append")
def _cache_append_fake(k_cache, v_cache, k, v, positions, *specs):
    return None


@torch.library.register_fake("turbokv::attention")
def _attention_fake(q, k_cache, v_cache, lengths, starts, *rest):
    return torch.empty_like(q)
