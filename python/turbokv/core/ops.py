"""Typed wrappers around ``torch.ops.turbokv.*`` (the ops' schemas are in cpp/ops.cpp, their
meta kernels for torch.compile in cpp/meta.cpp).

Shapes: rows ``(..., d)``; packed rows ``(..., row_bytes)`` uint8; caches
``(B, Hkv, T, row_bytes)`` uint8; queries ``(B, Hq, Sq, d)``.
A rotation is a :class:`turbokv.core.rotation.Rotation` (``group`` 0 = none).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from turbokv.core.rotation import Rotation

try:  # loading the shared object registers the ops with the dispatcher
    from turbokv import _C
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "turbokv: the native extension turbokv._C failed to load; rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch"
    ) from e

_ops = torch.ops.turbokv
NO_ROTATION = Rotation()
# The dequantize + SDPA prefill path's backends, in order of preference (cuDNN's fused
# attention is the faster on Hopper where it takes the shape; flash for the rest).
_SDPA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def kernel_choice() -> dict[str, str | int]:
    """The kernels pinned for this process (:func:`pinned_kernels`); ``"auto"`` / 0 where the ops choose."""
    return _C.kernel_choice()


@contextlib.contextmanager
def pinned_kernels(
    *,
    attention: str | None = None,
    smem_limit: int | None = None,
    decode_values: int | None = None,
    cpu_isa: str | None = None,
) -> Iterator[None]:
    """Run the ops with the kernels named, inside the ``with`` block (tests and benchmarks).

    Production code pins nothing: each op chooses its kernel from the shapes and the device.
    ``attention``: ``auto | flash | templated | mma | simt | tiled`` (CUDA; a pinned kernel that
    cannot run a call raises, naming why); ``smem_limit``: bytes of shared memory per block the
    CUDA kernels plan for, below the device's (0: the device's), so a large GPU takes the
    choices of a smaller one; ``decode_values``: 4, 8 or 16 values per lane for the SIMT decode
    kernel (0: its own); ``cpu_isa``: ``auto | avx2 | baseline``, the copy of the CPU attention
    kernel. Fields left None keep their value. Process-wide (every thread), restored on exit;
    a bad value raises ``ValueError`` naming it and changes nothing.
    """
    for name, value in (("smem_limit", smem_limit), ("decode_values", decode_values)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name}: got {value!r}, expected an int")
    before = _C.kernel_choice()
    asked = dict(attention=attention, smem_limit=smem_limit, decode_values=decode_values, cpu_isa=cpu_isa)
    now = {**before, **{k: v for k, v in asked.items() if v is not None}}
    _C.set_kernel_choice(now["attention"], now["smem_limit"], now["decode_values"], now["cpu_isa"])
    try:
        yield
    finally:
        _C.set_kernel_choice(before["attention"], before["smem_limit"], before["decode_values"], before["cpu_isa"])


def native_loaded(device_type: str = "cpu") -> bool:
    """True when every turbokv op has a native kernel for ``device_type`` ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    names = ("hadamard", "quantize", "dequantize", "cache_append", "attention", "attention_lse")
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
    sink_logits: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q: (B, Hq, Sq, d)`` over packed caches ``(B, Hkv, T, row_bytes)``.

    The ``Sq`` queries are the last ``Sq`` valid tokens: query ``i`` of sequence ``b``
    sits at position ``lengths[b] - Sq + i``; cache slots ``starts[b] <= j < lengths[b]``
    are valid (``starts`` skips left padding). ``window > 0`` keeps keys with
    ``qpos - j < window``; ``softcap > 0`` applies ``softcap * tanh(s / softcap)``.
    ``sink_logits: (Hq,)`` (float32 / float16 / bfloat16; transformers' ``s_aux``) adds one logit per
    query head to the softmax denominator, with no value: ``out = sum_j e^s_j v_j / (sum_j e^s_j
    + e^sink)``; the sink is neither scaled nor softcapped.
    Returns ``(B, Hq, Sq, d)`` in q's dtype; rows with no valid key are zeros. ``return_lse``:
    ``(out, lse)``, ``lse: (B, Hq, Sq)`` float32 each row's log-sum-exp of its (scaled, softcapped)
    scores, the sink included, ``-inf`` for a row with no valid key: what :func:`merge_attention`
    combines attention over disjoint sets of keys with (the op's kernels, never the SDPA path).

    Prefill on the GPU (Sq >= PREFILL_SDPA_MIN_QUERIES, f16/bf16, no window or softcap: a
    whole prompt, left-padded or not, or a chunk of one after a cached prefix) runs as
    dequantize + PyTorch's SDPA (cuDNN or flash, whichever takes the shape; causal from the
    bottom right; when lengths or starts differ, one masked call, or one call per sequence
    from PREFILL_PER_SEQUENCE_MIN_QUERIES queries): there attention is
    compute-bound and those kernels' tensor-core pipelines win, while the dequantized copy is
    one pass over the keys. Same values as the op within rounding (it reads the same packed
    cache); an attention kernel pinned with :func:`pinned_kernels` forces the op, and so do
    sink_logits (SDPA has no sink; the op's kernels add it where they normalise).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    args = (k_format, k_rot.group, k_rot.seed, v_format, v_rot.group, v_rot.seed, scale, causal, window, softcap)
    if return_lse:
        return _ops.attention_lse(q, k_cache, v_cache, lengths, starts, *args, sink_logits)
    spans = None if sink_logits is not None else _prefill_spans(q, k_cache, lengths, starts, causal, window, softcap)
    if spans is not None:
        # The op's shape / dtype / format checks (its meta kernel: no data, no launch) first.
        meta = [None if t is None else t.to("meta") for t in (q, k_cache, v_cache, lengths, starts)]
        _ops.attention(*meta, *args)
        sides = ((k_format, k_rot), (v_format, v_rot))
        return _dequantized_sdpa(q, k_cache, v_cache, spans, sides, scale, causal)
    return _ops.attention(q, k_cache, v_cache, lengths, starts, *args, sink_logits)


def merge_attention(
    parts: list[tuple[torch.Tensor, torch.Tensor]], sink_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention over the union of disjoint key sets from each set's ``(out, lse)``.

    ``out: (B, Hq, Sq, d)``, ``lse: (B, Hq, Sq)`` (as :func:`attention` returns with ``return_lse``);
    ``sink_logits: (Hq,)`` joins the merged denominator once (leave it out of the parts). Each part is
    weighted by ``exp(lse - max)``: a part whose rows saw no key (``lse = -inf``) counts nothing, and
    a row no part saw stays zeros, as the op leaves it. Returns ``(B, Hq, Sq, d)`` in the first
    part's dtype.
    """
    _check_merge(parts, sink_logits)
    lses = torch.stack([lse.float() for _, lse in parts])  # (P, B, Hq, Sq)
    if sink_logits is not None:
        sink = sink_logits.float().view(1, 1, -1, 1).expand(1, *lses.shape[1:])
        lses = torch.cat([lses, sink])
    top = lses.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf: weights 0, not NaN
    w = torch.exp(lses - top)
    denom = w.sum(0)
    w = w / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = sum(w[i, ..., None] * o.float() for i, (o, _) in enumerate(parts))
    return out.to(parts[0][0].dtype)


def _check_merge(parts, sink_logits) -> None:
    """``ValueError`` naming the part for what the op would refuse: no parts, an output that is not
    ``(B, Hq, Sq, d)`` floats, a log-sum-exp that is not its ``(B, Hq, Sq)`` float32, parts of
    different shapes or devices, or sink_logits that are not ``(Hq,)`` floats there. (Parts may differ in
    float dtype: the merge runs in float32.)"""
    if not isinstance(parts, list | tuple) or not parts:
        raise ValueError(f"parts: got {parts!r}, expected a non-empty list of (out, lse) pairs")
    out0 = parts[0][0] if isinstance(parts[0], tuple | list) and len(parts[0]) == 2 else None
    for i, part in enumerate(parts):
        if not isinstance(part, tuple | list) or len(part) != 2:
            raise ValueError(f"parts[{i}]: got {type(part).__name__}, expected an (out, lse) pair")
        out, lse = part
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or not out.is_floating_point():
            raise ValueError(f"parts[{i}] out: got {_describe(out)}, expected a (B, Hq, Sq, d) float tensor")
        if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != tuple(out.shape[:3]):
            raise ValueError(f"parts[{i}] lse: got {_describe(lse)}, expected float32 of shape {tuple(out.shape[:3])}")
        if out.shape != out0.shape or out.device != out0.device or lse.device != out.device:
            raise ValueError(
                f"parts[{i}] out: got {_describe(out)} on {out.device}, expected shape {tuple(out0.shape)} on "
                f"{out0.device} like parts[0]"
            )
    if sink_logits is not None:
        hq = out0.shape[1]
        if (
            not isinstance(sink_logits, torch.Tensor)
            or tuple(sink_logits.shape) != (hq,)
            or not sink_logits.is_floating_point()
        ):
            raise ValueError(f"sink_logits: got {_describe(sink_logits)}, expected a float tensor of shape ({hq},)")
        if sink_logits.device != out0.device:
            raise ValueError(
                f"sink_logits: got a tensor on {sink_logits.device}, expected {out0.device} like the parts"
            )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


# Fewer queries than this stay in the op's tensor-core kernels (memory-bound: they read the
# packed cache once for all rows, where a dequantized copy would be written and read again).
PREFILL_SDPA_MIN_QUERIES = 64
# From this many queries, sequences of unequal spans get an SDPA call each over their valid
# keys (is_causal or bottom-right causal, no mask: the fastest kernels, and no work on padding);
# below it, one masked call for the batch.
PREFILL_PER_SEQUENCE_MIN_QUERIES = 1024


def _prefill_spans(q, k_cache, lengths, starts, causal, window, softcap) -> list[tuple[int, int]] | None:
    """Each sequence's valid ``(start, length)`` when attention() may run as dequantize + SDPA.

    None sends the call to the op: not a GPU prefill (see attention's docstring), or lengths
    and starts the op must reject (it names them). One host sync (never while compiling or
    capturing a CUDA graph, where the op runs).
    """
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not window and not softcap):
        return None
    if q.dim() != 4 or k_cache.dim() != 4 or q.shape[2] < PREFILL_SDPA_MIN_QUERIES:
        return None
    if _C.kernel_choice()["attention"] != "auto":
        return None
    if lengths.shape != (q.shape[0],) or k_cache.shape[0] != q.shape[0] or lengths.is_floating_point():
        return None  # let the op report the shape or dtype error
    if starts is not None and (starts.shape != lengths.shape or starts.is_floating_point()):
        return None
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    host = torch.stack([lengths.long(), starts.long() if starts is not None else torch.zeros_like(lengths).long()])
    lens, sts = host.cpu().tolist()
    sq, t = q.shape[2], k_cache.shape[2]
    if not all(0 <= s <= n <= t and (not causal or n >= sq) for n, s in zip(lens, sts, strict=True)):
        return None
    return list(zip(sts, lens, strict=True))


def _dequantized_sdpa(q, k_cache, v_cache, spans, sides, scale, causal) -> torch.Tensor:
    """attention() over the dequantized cache with SDPA; ``spans``: each sequence's (start, length).

    The queries are the last Sq tokens of each sequence; a query before its sequence's start
    (left padding) sees no key and is zeros, as in the op.
    """
    (kf, kr), (vf, vr) = sides
    sq, d = q.shape[2], q.shape[3]

    def sdpa(qs, lo, hi, sel=slice(None)):
        k = dequantize(k_cache[sel, :, lo:hi], kf, d, kr, dtype=q.dtype)
        v = dequantize(v_cache[sel, :, lo:hi], vf, d, vr, dtype=q.dtype)
        # Causal from the bottom right: the last query sees every key (flash and cuDNN under
        # CausalBias; SDPA's is_causal is top-left, the same only when the counts are equal).
        mask = causal_lower_right(qs.shape[2], hi - lo) if causal and qs.shape[2] != hi - lo else None
        with sdpa_kernel(_SDPA_BACKENDS, set_priority=True):
            return torch.nn.functional.scaled_dot_product_attention(
                qs, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=True
            )

    if len(set(spans)) == 1 and spans[0][1] - spans[0][0] >= (sq if causal else 1):
        lo, hi = spans[0]  # one call for the batch
        return sdpa(q, lo, hi)
    if sq < PREFILL_PER_SEQUENCE_MIN_QUERIES:
        # One call for the batch with each sequence's mask: a call per sequence costs more
        # host time than the padded keys cost the kernel at this many queries.
        lo, hi = min(s for s, _ in spans), max(n for _, n in spans)
        k = dequantize(k_cache[:, :, lo:hi], kf, d, kr, dtype=q.dtype)
        v = dequantize(v_cache[:, :, lo:hi], vf, d, vr, dtype=q.dtype)
        st, ln = torch.tensor(spans, dtype=torch.int64).to(q.device, non_blocking=True).unbind(1)
        j = torch.arange(lo, hi, device=q.device)
        mask = (j >= st[:, None, None]) & (j < ln[:, None, None])  # (B, 1, T')
        if causal:  # query i of sequence b sits at ln[b] - sq + i
            qpos = ln[:, None] - sq + torch.arange(sq, device=q.device)
            mask = mask & (j <= qpos[:, :, None])  # (B, Sq, T')
        mask = mask[:, None].expand(-1, 1, sq, -1)
        with sdpa_kernel(_SDPA_BACKENDS, set_priority=True):
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        # A row that sees no key (a query in the left padding) is zeros, whatever SDPA made of it.
        return torch.where(mask.any(-1, keepdim=True), out, 0)
    out = torch.zeros_like(q)
    for i, (lo, hi) in enumerate(spans):
        rows = min(sq, hi - lo) if causal else (sq if hi > lo else 0)
        if rows:
            out[i : i + 1, :, sq - rows :] = sdpa(q[i : i + 1, :, sq - rows :], lo, hi, slice(i, i + 1))
    return out
