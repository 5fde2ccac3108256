"""Typed wrappers around ``torch.ops.turbokv.*`` plus their fake (meta) kernels.

Shapes: rows ``(..., d)``; packed rows ``(..., row_bytes)`` uint8; caches
``(B, Hkv, T, row_bytes)`` uint8; queries ``(B, Hq, Sq, d)``.
A rotation is a :class:`turbokv.rotation.Rotation` (``group`` 0 = none).
"""

from __future__ import annotations

import math
import os

import torch

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
    Non-finite input, and finite input the format cannot store (past the fp16 range of
    its values or block scales), raise ``ValueError`` (host syncs). Pass
    ``check_finite=False`` on hot paths: the op then NaN-marks such groups instead
    (docs/contract.md).
    """
    if check_finite and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x: got {bad} non-finite value(s) (NaN or Inf), expected finite values to quantize")
    packed = _ops.quantize(x, format, rot.group, rot.seed)
    if check_finite and x.is_floating_point() and x.numel():
        _check_storable(x, packed, format, rot)
    return packed


def _check_storable(x: torch.Tensor, packed: torch.Tensor, format: str, rot: Rotation) -> None:
    """Raise if finite ``x`` did not fit the format's 16-bit fields (the op stored NaN there)."""
    y = _ops.dequantize(packed, format, x.shape[-1], rot.group, rot.seed, False, torch.float32)
    if bool(torch.isfinite(y).all()):
        return
    rows = int((~torch.isfinite(y)).any(-1).sum())
    raise ValueError(
        f"x: got {rows} row(s) with values that format {format!r} cannot store (largest |x| "
        f"{float(x.abs().max()):.6g}; its fp16 values or block scales hold at most 65504), "
        "expected values within the storage range"
    )


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
    args = (k_format, k_rot.group, k_rot.seed, v_format, v_rot.group, v_rot.seed, scale, causal, window, softcap)
    if _whole_prompt_prefill(q, k_cache, lengths, starts, causal, window, softcap):
        # The op's shape / dtype / format checks (its meta kernel: no data, no launch) first.
        meta = [None if t is None else t.to("meta") for t in (q, k_cache, v_cache, lengths, starts)]
        _ops.attention(*meta, *args)
        sq, d = q.shape[2], q.shape[3]
        k = dequantize(k_cache[:, :, :sq], k_format, d, k_rot, dtype=q.dtype)
        v = dequantize(v_cache[:, :, :sq], v_format, d, v_rot, dtype=q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    return _ops.attention(q, k_cache, v_cache, lengths, starts, *args)


PREFILL_SDPA_MIN_QUERIES = 64


def _whole_prompt_prefill(q, k_cache, lengths, starts, causal, window, softcap) -> bool:
    """True when attention() may run as dequantize + flash SDPA (see attention's docstring).

    Every sequence's length must be Sq with no padding: such values are valid by construction,
    so this path needs none of the op's value checks. One host sync (not while compiling or
    capturing a CUDA graph, where the op runs).
    """
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and causal and not window and not softcap):
        return False
    if q.dim() != 4 or k_cache.dim() != 4 or not PREFILL_SDPA_MIN_QUERIES <= q.shape[2] <= k_cache.shape[2]:
        return False
    sq = q.shape[2]
    if os.environ.get("TURBOKV_ATTENTION_KERNEL", "auto") != "auto":
        return False
    if lengths.shape != (q.shape[0],) or k_cache.shape[0] != q.shape[0]:
        return False  # let the op report the shape error
    if starts is not None and starts.shape != lengths.shape:
        return False
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False  # the check below reads values on the host
    uniform = lengths == sq
    if starts is not None:
        uniform = uniform & (starts == 0)
    return bool(uniform.all())
