"""Pure-PyTorch reference of every turbokv op: the oracle the kernels are tested against.

Imports no compiled code. Every step is written as the C++ kernels compute it
(fp32, same operation order), so packed bytes match exactly. Shapes:

* rows: ``(..., d)`` float; packed rows: ``(..., row_bytes(fmt, d))`` uint8
* caches: ``(B, Hkv, T, row_bytes)`` uint8; ``q``: ``(B, Hq, Sq, d)``
"""

from __future__ import annotations

import math

import torch

from turbokv.core import formats
from turbokv.core.rotation import signs

# ---------------------------------------------------------------- rotation


def _fwht(x: torch.Tensor, n: int) -> torch.Tensor:
    """Normalised FWHT of each n-block of the last dim (butterflies h = 1, 2, 4, ...)."""
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    inv = torch.tensor(1.0 / math.sqrt(n), dtype=x.dtype)
    return (y.reshape(-1, n) * inv).reshape(shape)


def rotate(x: torch.Tensor, group: int, seed: int | None, inverse: bool = False) -> torch.Tensor:
    """Block-diagonal rotation of the last dim in x's own (float32/float64) dtype."""
    if group == 0:
        return x
    shape = x.shape
    y = x.reshape(*shape[:-1], shape[-1] // group, group)
    if seed is not None:
        s1, s2 = signs(seed, group, x.dtype)
        pre, post = (s2, s1) if inverse else (s1, s2)
        y = _fwht(y * pre, group) * post
    else:
        y = _fwht(y, group)
    return y.reshape(shape)


def hadamard(x: torch.Tensor, group: int, seed: int | None = None, inverse: bool = False) -> torch.Tensor:
    """Rotate the last dim of ``x`` (computed in fp32, or fp64 for fp64 input); returns x.dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return rotate(x.to(work), group, seed, inverse).to(x.dtype)


# ---------------------------------------------------------------- helpers


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp32 (..., n) -> uint8 (..., 2n), little-endian fp16."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2n) -> fp32 (..., n)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _prepare(x: torch.Tensor, fmt: formats.Format, rot_group: int, rot_seed: int | None) -> torch.Tensor:
    """fp32, zero-padded to the stored width, rotated."""
    d = x.shape[-1]
    x = x.to(torch.float32)
    dp = formats.padded_dim(fmt, d)
    if dp != d:
        x = torch.nn.functional.pad(x, (0, dp - d))
    return rotate(x, rot_group, rot_seed)


def _nonfinite_rows(blocks: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(blocks).all(dim=-1, keepdim=True)


def _f16_inf(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` rounds to +-inf in fp16: a scale the storage cannot hold (the group is NaN-marked)."""
    return torch.isinf(x.to(torch.float16))


def _store_16bit(rows: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """f16 / bf16 storage of fp32 values: round to nearest even; a finite value past the range -> NaN."""
    out = rows.to(dt)
    nan = torch.copysign(torch.full_like(rows, torch.nan), rows).to(dt)  # the sign kept, as codec.h does
    return torch.where(torch.isinf(out) & torch.isfinite(rows), nan, out)


# ---------------------------------------------------------------- ggml block formats


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """gguf's np_roundf: round half away from zero."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _encode_blocks(fmt: formats.Format, blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) fp32 -> (n, block_bytes) uint8."""
    bad = _nonfinite_rows(blocks)
    blocks = torch.where(bad, torch.zeros_like(blocks), blocks)
    zero = torch.zeros((), dtype=torch.float32)
    if fmt.name == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        bad = bad | _f16_inf(d)
        inv = torch.where(d == 0, zero, 1 / d)
        qs = _roundf(blocks * inv).clamp(-128, 127).to(torch.int8)
        qs = torch.where(bad, torch.zeros_like(qs), qs).view(torch.uint8)
        d = torch.where(bad, torch.nan, d)
        return torch.cat([_f16_bytes(d), qs], -1)
    five = fmt.bits == 5
    qmax = 31 if five else 15
    parts = []
    if fmt.has_min:
        mx = blocks.amax(-1, keepdim=True)
        mn = blocks.amin(-1, keepdim=True)
        d = (mx - mn) / qmax
        bad = bad | _f16_inf(d) | _f16_inf(mn)
        inv = torch.where(d == 0, zero, 1 / d)
        q = torch.trunc((blocks - mn) * inv + 0.5)
        parts = [_f16_bytes(torch.where(bad, torch.nan, d)), _f16_bytes(torch.where(bad, torch.nan, mn))]
    else:
        imax = blocks.abs().argmax(-1, keepdim=True)
        d = torch.gather(blocks, -1, imax) / (-16 if five else -8)
        bad = bad | _f16_inf(d)
        inv = torch.where(d == 0, zero, 1 / d)
        q = torch.trunc(blocks * inv + (16.5 if five else 8.5))
        parts = [_f16_bytes(torch.where(bad, torch.nan, d))]
    q = q.clamp(0, qmax).to(torch.int32)
    q = torch.where(bad, torch.zeros_like(q), q)
    if five:
        weights = torch.tensor([1 << j for j in range(32)], dtype=torch.int64)
        qh = ((q >> 4) & 1).to(torch.int64).mul(weights).sum(-1, keepdim=True)
        qh_bytes = torch.cat([(qh >> (8 * b)) & 0xFF for b in range(4)], -1)
        parts.append(qh_bytes.to(torch.uint8))
    lo = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    parts.append(lo.to(torch.uint8))
    return torch.cat(parts, -1)


def _decode_blocks(fmt: formats.Format, b: torch.Tensor) -> torch.Tensor:
    """(n, block_bytes) uint8 -> (n, 32) fp32."""
    d = _f16_from(b[:, :2])
    if fmt.name == "q8_0":
        return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d
    p = 2
    m = None
    if fmt.has_min:
        m = _f16_from(b[:, 2:4])
        p = 4
    qs = b[:, -16:].to(torch.int32)
    q = torch.cat([qs & 0xF, qs >> 4], -1)
    if fmt.bits == 5:
        qh = b[:, p : p + 4].to(torch.int64)
        word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
        hi = (word[:, None] >> torch.arange(32)) & 1
        q = q | (hi.to(torch.int32) << 4)
    if m is not None:
        return d * q.to(torch.float32) + m
    return d * (q - (16 if fmt.bits == 5 else 8)).to(torch.float32)


# ---------------------------------------------------------------- turbo formats


def _codebook(g: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    cb = torch.tensor(formats.CODEBOOKS[(g, bits)], dtype=torch.float32)
    mids = torch.tensor(formats.MIDPOINTS[(g, bits)], dtype=torch.float32)
    return cb, mids


def _pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, g) int -> (n, g*bits/8) uint8, layout of codec.h."""
    n, g = idx.shape
    if bits == 4:
        pairs = idx.reshape(n, g // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    low = (idx & 3).reshape(n, g // 4, 4)
    out = low[..., 0] | (low[..., 1] << 2) | (low[..., 2] << 4) | (low[..., 3] << 6)
    if bits == 2:
        return out.to(torch.uint8)
    high = ((idx >> 2) & 1).reshape(n, g // 8, 8) << torch.arange(8)
    return torch.cat([out, high.sum(-1)], -1).to(torch.uint8)


def _unpack_indices(b: torch.Tensor, g: int, bits: int) -> torch.Tensor:
    """(n, g*bits/8) uint8 -> (n, g) int64."""
    b = b.to(torch.int64)
    if bits == 4:
        return torch.stack([b & 0xF, b >> 4], -1).reshape(b.shape[0], g)
    low = torch.stack([(b[:, : g // 4] >> s) & 3 for s in (0, 2, 4, 6)], -1).reshape(-1, g)
    if bits == 2:
        return low
    high = ((b[:, g // 4 :, None] >> torch.arange(8)) & 1).reshape(-1, g)
    return low | (high << 2)


def _encode_turbo(fmt: formats.Format, groups: torch.Tensor) -> torch.Tensor:
    """(n, g) rotated fp32 groups -> (n, group_bytes) uint8."""
    g = groups.shape[-1]
    cb, mids = _codebook(g, fmt.bits)
    norm = torch.sqrt((groups.double() ** 2).sum(-1, keepdim=True)).float()
    bad = ~torch.isfinite(norm)
    zero = norm == 0
    inv = torch.where(zero | bad, torch.zeros_like(norm), 1.0 / norm)
    u = groups * inv
    idx = torch.searchsorted(mids, u.contiguous(), right=False)
    idx = torch.where(bad, torch.zeros_like(idx), idx)
    c2 = (cb.double()[idx] ** 2).sum(-1, keepdim=True)
    scale = (norm.double() / torch.sqrt(c2)).float()
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    scale = torch.where(bad | _f16_inf(scale), torch.full_like(scale, torch.nan), scale)
    return torch.cat([_f16_bytes(scale), _pack_indices(idx, fmt.bits)], -1)


def _decode_turbo(fmt: formats.Format, b: torch.Tensor, g: int) -> torch.Tensor:
    cb, _ = _codebook(g, fmt.bits)
    return _f16_from(b[:, :2]) * cb[_unpack_indices(b[:, 2:], g, fmt.bits)]


# ---------------------------------------------------------------- ops


def quantize(x: torch.Tensor, fmt: str, rot_group: int = 0, rot_seed: int | None = None) -> torch.Tensor:
    """Rows ``(..., d)`` -> packed ``(..., row_bytes(fmt, d))`` uint8 (pad, rotate, encode)."""
    f = formats.get(fmt)
    d = x.shape[-1]
    nbytes = formats.row_bytes(f, d)
    y = _prepare(x, f, rot_group, rot_seed)
    rows = y.reshape(-1, y.shape[-1])
    if f.family == "float":
        dt = torch.float16 if f.name == "f16" else torch.bfloat16
        out = _store_16bit(rows, dt).contiguous().view(torch.uint8)
    elif f.family == "block":
        out = _encode_blocks(f, rows.reshape(-1, 32))
    else:
        g = formats.turbo_group(y.shape[-1])
        out = _encode_turbo(f, rows.reshape(-1, g))
    return out.reshape(*x.shape[:-1], nbytes)


def dequantize(
    packed: torch.Tensor,
    fmt: str,
    head_dim: int,
    rot_group: int = 0,
    rot_seed: int | None = None,
    unrotate: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed ``(..., row_bytes)`` -> ``(..., head_dim)`` (unrotate) or ``(..., dp)`` rotated values."""
    f = formats.get(fmt)
    dp = formats.padded_dim(f, head_dim)
    rows = packed.reshape(-1, packed.shape[-1])
    if f.family == "float":
        dt = torch.float16 if f.name == "f16" else torch.bfloat16
        y = rows.contiguous().view(dt).to(torch.float32)
    elif f.family == "block":
        y = _decode_blocks(f, rows.reshape(-1, f.block_bytes))
    else:
        g = formats.turbo_group(dp)
        y = _decode_turbo(f, rows.reshape(-1, formats.group_bytes(f, g)), g)
    y = y.reshape(*packed.shape[:-1], dp)
    if unrotate:
        y = rotate(y, rot_group, rot_seed, inverse=True)[..., :head_dim]
    return y.to(dtype)


def cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_format: str,
    k_rot_group: int,
    k_rot_seed: int | None,
    v_format: str,
    v_rot_group: int,
    v_rot_seed: int | None,
) -> None:
    """Write new tokens ``k, v: (B, Hkv, S, d)`` at ``positions: (B, S)`` of the caches, in place."""
    kp = quantize(k, k_format, k_rot_group, k_rot_seed)
    vp = quantize(v, v_format, v_rot_group, v_rot_seed)
    for b in range(k.shape[0]):
        pos = positions[b].long()
        k_cache[b, :, pos] = kp[b]
        v_cache[b, :, pos] = vp[b]


def attention_mask(
    lengths: torch.Tensor, starts: torch.Tensor | None, sq: int, t: int, causal: bool, window: int
) -> torch.Tensor:
    """Boolean ``(B, 1, Sq, T)``: True where query i may attend to cache slot j.

    Query i sits at absolute position ``lengths[b] - Sq + i``; slot j is valid
    when ``starts[b] <= j < lengths[b]``, ``j <= qpos`` if causal, and
    ``qpos - j < window`` if window > 0.
    """
    lengths = lengths.long()
    starts = torch.zeros_like(lengths) if starts is None else starts.long()
    j = torch.arange(t)[None, None, :]
    qpos = (lengths[:, None] - sq + torch.arange(sq)[None, :])[:, :, None]
    ok = (j >= starts[:, None, None]) & (j < lengths[:, None, None])
    if causal:
        ok = ok & (j <= qpos)
    if window > 0:
        ok = ok & (qpos - j < window)
    return ok[:, None]


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    k_format: str,
    k_rot_group: int,
    k_rot_seed: int | None,
    v_format: str,
    v_rot_group: int,
    v_rot_seed: int | None,
    scale: float,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
    sink_logits: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q: (B, Hq, Sq, d)`` over packed caches, in the rotated domain.

    Q is padded and rotated with the K side's rotation, K/V are decoded but never
    un-rotated, the output is inverse-rotated with the V side's rotation. ``sink_logits: (Hq,)``
    adds one unscaled, uncapped logit per query head to the softmax denominator (no value).
    Rows with no valid key give zeros. Returns ``(B, Hq, Sq, d)`` in q's dtype,
    computed in ``compute_dtype`` (float16/bfloat16/float32/float64). ``return_lse``: also each
    row's log-sum-exp ``(B, Hq, Sq)`` float32 of its scores and sink, ``-inf`` for no valid key.
    """
    b, hq, sq, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    keys = dequantize(k_cache, k_format, d, k_rot_group, k_rot_seed, unrotate=False)
    vals = dequantize(v_cache, v_format, d, v_rot_group, v_rot_seed, unrotate=False)
    work = torch.float64 if compute_dtype == torch.float64 else torch.float32
    dpk = keys.shape[-1]
    qr = torch.nn.functional.pad(q.to(work), (0, dpk - d))
    qr = rotate(qr, k_rot_group, k_rot_seed)
    keys = keys.to(compute_dtype).repeat_interleave(group, dim=1)
    vals = vals.to(compute_dtype).repeat_interleave(group, dim=1)
    s = torch.matmul(qr.to(compute_dtype), keys.transpose(-1, -2)).to(work) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    ok = attention_mask(lengths, starts, sq, t, causal, window)
    s = s.masked_fill(~ok, -math.inf)
    # SDPA's NaN rule: a NaN score (NaN query or key in a visible slot) makes the row NaN; a
    # non-finite V in a visible slot too. Slots a row cannot see never matter; rows that see
    # no slot are zeros.
    p = torch.softmax(s, dim=-1)
    p = torch.where(ok.any(-1, keepdim=True), p, torch.zeros_like(p))
    bad_v = ~torch.isfinite(vals).all(-1)  # (B, Hq, T)
    vals = torch.where(bad_v[..., None], torch.zeros_like(vals), vals)
    o = torch.matmul(p.to(compute_dtype), vals).to(work)
    if sink_logits is not None:
        # The sink's share of the denominator: sum e^s / (sum e^s + e^sink) = sigmoid(lse - sink)
        # (-inf sink: 1, no sink; +inf: 0, zeros; NaN: NaN). Rows that see no key stay zeros.
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, Hq, Sq, 1)
        keep = torch.sigmoid(lse - sink_logits.to(work).reshape(1, hq, 1, 1))
        o = o * torch.where(ok.any(-1, keepdim=True), keep, torch.ones_like(keep))
    poisoned = (ok & bad_v[:, :, None, :]).any(-1, keepdim=True)
    o = torch.where(poisoned, torch.full_like(o, torch.nan), o)
    o = rotate(o, v_rot_group, v_rot_seed, inverse=True)[..., :d]
    if not return_lse:
        return o.to(q.dtype)
    lse = torch.logsumexp(s, dim=-1)  # -inf where the row sees no slot
    if sink_logits is not None:
        sink = sink_logits.to(work).reshape(1, hq, 1).expand_as(lse)
        lse = torch.where(torch.isfinite(lse) | torch.isnan(lse), torch.logaddexp(lse, sink), lse)
    return o.to(q.dtype), lse.float()
