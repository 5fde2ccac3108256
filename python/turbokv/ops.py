"""Typed wrappers around ``torch.ops.turbokv.*`` plus their fake (meta) kernels.

Shapes: rows ``(..., d)``; packed rows ``(..., row_bytes)`` uint8; caches
``(B, Hkv, T, row_bytes)`` uint8; queries ``(B, Hq, Sq, d)``.
A rotation is a :class:`turbokv.rotation.Rotation` (``group`` 0 = none).
"""

from __future__ import annotations

import math
import os

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

    A whole-prompt prefill on the GPU (every sequence's length == Sq >= 64, no padding,
    window or softcap, f16/bf16) runs as dequantize + PyTorch's flash SDPA: at that size
    attention is compute-bound and the flash kernel's tensor-core pipeline wins, while the
    dequantized copy costs one pass over the new tokens. Same values as the op (it reads
    the same packed cache); TURBOKV_ATTENTION_KERNEL other than auto forces the op.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    host = _check_lengths_cuda(q, k_cache, lengths, starts, causal)
    if _whole_prompt_prefill(q, k_cache, lengths, starts, causal, window, softcap, host):
        sq, d = q.shape[2], q.shape[3]
        k = dequantize(k_cache[:, :, :sq], k_format, d, k_rot, dtype=q.dtype)
        v = dequantize(v_cache[:, :, :sq], v_format, d, v_rot, dtype=q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
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


def _check_lengths_cuda(q, k_cache, lengths, starts, causal) -> tuple[list[int], list[int]] | None:
    """The values check the CPU op does itself (the CUDA op clamps instead; see attention.cu).

    One host sync; returns the host copies of lengths and starts (None when skipped: CPU
    tensors, which the op checks, or while compiling / capturing a CUDA graph).
    """
    if not (lengths.is_cuda and lengths.dim() == 1 and k_cache.dim() == 4 and q.dim() == 4):
        return None  # shape errors are the op's to report
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    lens = lengths.tolist()
    sts = starts.tolist() if starts is not None and starts.dim() == 1 else [0] * len(lens)
    cap, sq = k_cache.shape[2], q.shape[2]
    for b, (n, s) in enumerate(zip(lens, sts, strict=False)):
        if not 0 <= n <= cap:
            raise ValueError(f"lengths: got {n} for sequence {b}, expected 0 <= length <= cache capacity {cap}")
        if causal and n < sq:
            raise ValueError(
                f"lengths: got {n} for sequence {b}, expected >= {sq} (the queries are the last Sq cached tokens)"
            )
        if not 0 <= s <= n:
            raise ValueError(f"starts: got {s} for sequence {b}, expected 0 <= start <= length {n}")
    return lens, sts


PREFILL_SDPA_MIN_QUERIES = 64


def _whole_prompt_prefill(q, k_cache, lengths, starts, causal, window, softcap, host=None) -> bool:
    """True when attention() may run as dequantize + flash SDPA (see attention's docstring).

    ``host``: the (lengths, starts) host copies _check_lengths_cuda already made, if any.
    """
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and causal and not window and not softcap):
        return False
    sq = q.shape[2]
    if sq < PREFILL_SDPA_MIN_QUERIES or sq > k_cache.shape[2]:
        return False
    if os.environ.get("TURBOKV_ATTENTION_KERNEL", "auto") != "auto":
        return False
    if lengths.shape != (q.shape[0],) or k_cache.shape[0] != q.shape[0]:
        return False  # let the op report the shape error
    if host is not None:
        lens, sts = host
        return all(n == sq for n in lens) and not any(sts)
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False  # the check below reads values on the host
    uniform = lengths == sq
    if starts is not None:
        uniform = uniform & (starts == 0)
    return bool(uniform.all())


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
