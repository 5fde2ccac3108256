"""Exact token windows: the first (sink) and the most recent tokens of a layer kept unquantized.

A query at position ``p`` attends to three disjoint sets of keys, each in its own store:

* sink tokens ``[0, s)``: the first ``s`` positions, exact (attention sinks take a large share of
  every query's attention, and their quantization error lands in every output);
* recent tokens ``[max(s, p - w + 1), p]``: the query's last ``w`` positions, exact;
* everything between, ``[s, p - w]``: the packed cache, read by the fused op.

Each set's attention comes with its log-sum-exp and :func:`turbokv.core.ops.merge_attention` combines
them exactly: the result is attention over one key set in which only the middle part is
quantized. In decoding that is what a cache holding ``s + w`` tokens in f16 and the rest packed
computes; in a prompt every query gets its own recent window, as it would token by token.

Storage, the same for the dynamic and the static (compileable) cache: fixed buffers of f16 (bf16
for a bf16 model) rows, the sink's ``(B, Hkv, s, d)`` for positions ``[0, s)`` and the recent
tokens' ``(B, Hkv, w, d)`` shift register, whose slot ``i`` holds position ``length - w + i``
(slots before position ``s`` or 0 are stale and never read). Every token is also packed when it
arrives, from its exact copy: the packed rows of exact positions are read only once those
positions leave the window. Keys are stored after the layer's key offset, in every store, so all
scores share one shift. A decode step (one query) updates the stores and attends with fixed shapes
and no host sync, so ``generate()`` compiles it into CUDA graphs; a forward of several queries (a
prompt) reads the token count once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from turbokv.core import ops
from turbokv.core.rotation import Rotation


def exact_format(dtype: torch.dtype) -> str:
    """The float format the exact tokens of a model of ``dtype`` are stored in."""
    return "bf16" if dtype == torch.bfloat16 else "f16"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, n, d)`` f16 / bf16 as the op's packed rows of that format: ``(B, H, n, 2 d)`` uint8."""
    return x.contiguous().view(torch.uint8)


class ExactTokens:
    """The exact stores of one layer (see the module's docstring), sized like ``like (B, Hkv, *, d)``."""

    def __init__(self, sink: int, recent: int, dtype: torch.dtype, like: torch.Tensor):
        self.sink, self.recent = sink, recent
        self.dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        self.format = exact_format(dtype)
        b, h, _, d = like.shape
        new = lambda n: torch.zeros(b, h, n, d, dtype=self.dtype, device=like.device)  # noqa: E731
        self.sink_k, self.sink_v = new(sink), new(sink)
        self.recent_k, self.recent_v = new(recent), new(recent)
        # During one forward: the recent rows before it and the new ones, and the forward's first
        # position (an int, or a 0-dim device tensor in a static cache): rows from `start - w`.
        self.pending: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None = None

    # ------------------------------------------------------------------ storage

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.sink_k, self.sink_v, self.recent_k, self.recent_v

    def fits(self, like: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether these buffers hold a layer of ``like``'s (B, Hkv, *, d) and device in ``dtype``'s format."""
        b, h, _, d = like.shape
        same = self.sink_k.shape[:2] == (b, h) and self.sink_k.shape[3] == d and self.sink_k.device == like.device
        return same and self.format == exact_format(dtype)

    def zero_(self) -> None:
        for t in self.buffers():
            t.zero_()
        self.pending = None

    def _recent_start(self, length: int) -> int:
        """The first position the recent store holds as recent at ``length`` (``length``: none)."""
        return min(max(self.sink, length - self.recent), length) if self.recent else length

    def append(
        self, k: torch.Tensor, v: torch.Tensor, length: int | torch.Tensor, keep: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Store new ``(B, Hkv, S, d)`` K/V at positions ``[length, length + S)`` (``length``: the count
        before them, an int or a 0-dim device tensor); returns them in the exact format, which the
        layer packs. ``keep``: hold this forward's rows for :meth:`attention` (a fused forward) until
        :meth:`release`; a prompt's are as large as an f16 cache of it."""
        s, w, n = self.sink, self.recent, k.shape[2]
        k, v = k.to(self.dtype), v.to(self.dtype)
        if s:  # sink slot j takes new token j - length where that is one of them
            j = torch.arange(s, device=k.device) - length
            take = ((j >= 0) & (j < n))[None, None, :, None]
            idx = j.clamp(0, n - 1)
            self.sink_k.copy_(torch.where(take, k.index_select(2, idx), self.sink_k))
            self.sink_v.copy_(torch.where(take, v.index_select(2, idx), self.sink_v))
        all_k, all_v = torch.cat([self.recent_k, k], 2), torch.cat([self.recent_v, v], 2)
        self.pending = (all_k, all_v, length.clone() if isinstance(length, torch.Tensor) else length) if keep else None
        if w:
            self.recent_k.copy_(all_k[:, :, n:])
            self.recent_v.copy_(all_v[:, :, n:])
        return k, v

    def release(self) -> None:
        """Drop the rows of the last forward: only that forward's attention reads them."""
        self.pending = None

    def crop(self, length: int, refill: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], before: int) -> None:
        """Keep positions ``< length`` of the ``before`` held: the recent slots move back; positions the
        register no longer holds come back from the packed cache (``refill(a, b)``: dequantized K/V of
        ``[a, b)``, no offset added), with their quantized values."""
        self.pending = None
        w = self.recent
        if not w or length >= before:
            return
        old, new = before - w, length - w  # the position of slot 0, now and after the crop
        kept = min(max(new, old), length)  # positions [kept, length) are in the register already
        parts_k, parts_v = [], []
        if new < 0:  # slots before position 0: stale, never read
            parts_k.append(self.recent_k[:, :, : min(-new, w)])
            parts_v.append(self.recent_v[:, :, : min(-new, w)])
        lo = max(new, 0)
        if kept > lo:
            k, v = (x.to(self.dtype) for x in refill(lo, kept))
            parts_k.append(k)
            parts_v.append(v)
        if length > kept:
            parts_k.append(self.recent_k[:, :, kept - old : length - old])
            parts_v.append(self.recent_v[:, :, kept - old : length - old])
        self.recent_k.copy_(torch.cat(parts_k, 2))
        self.recent_v.copy_(torch.cat(parts_v, 2))

    def map_batch(self, fn) -> None:
        """Apply a batch edit (index select, repeat, device move) to every store, in place where the
        shape and device stay (a static cache's addresses)."""
        self.pending = None
        for name in ("sink_k", "sink_v", "recent_k", "recent_v"):
            t, new = getattr(self, name), fn(getattr(self, name))
            if new.shape == t.shape and new.device == t.device:
                t.copy_(new)
            else:
                setattr(self, name, new)

    def fill(self, k: torch.Tensor, v: torch.Tensor, length: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(B, Hkv, T, d)`` K/V (slot = position) with the exact positions written over."""
        s, w = self.sink, self.recent
        t = torch.arange(k.shape[2], device=k.device)  # every slot's position
        if w:  # slot t - (length - w) of the register, for positions [max(s, length - w), length)
            held = ((t >= length - w) & (t < length) & (t >= s))[None, None, :, None]
            slot = (t - (length - w)).clamp(0, w - 1)
            k = torch.where(held, self.recent_k.index_select(2, slot).to(k.dtype), k)
            v = torch.where(held, self.recent_v.index_select(2, slot).to(v.dtype), v)
        if s:
            held = ((t < s) & (t < length))[None, None, :, None]
            slot = t.clamp(max=s - 1)
            k = torch.where(held, self.sink_k.index_select(2, slot).to(k.dtype), k)
            v = torch.where(held, self.sink_v.index_select(2, slot).to(v.dtype), v)
        return k, v

    def tokens(self, length: int) -> int:
        """Exact tokens held at ``length`` (the sink and the recent window)."""
        return min(self.sink, length) + (length - self._recent_start(length))

    def saved(self, length: int) -> tuple[dict[str, torch.Tensor], int]:
        """The rows a cache file holds at ``length``: the sink's ``min(s, length)`` and the recent
        positions ``[r0, length)``, and ``r0``."""
        r0, n_s = self._recent_start(length), min(self.sink, length)
        slot = r0 - (length - self.recent)
        rows = {"sink_k": self.sink_k[:, :, :n_s], "sink_v": self.sink_v[:, :, :n_s]}
        rows |= {"recent_k": self.recent_k[:, :, slot:], "recent_v": self.recent_v[:, :, slot:]}
        return rows, r0

    def restore(self, length: int, rows: dict[str, torch.Tensor]) -> None:
        """Put :meth:`saved`'s rows at ``length`` back into the stores."""
        n_s = min(self.sink, length)
        self.sink_k[:, :, :n_s], self.sink_v[:, :, :n_s] = rows["sink_k"], rows["sink_v"]
        n_r = rows["recent_k"].shape[2]
        if n_r:
            self.recent_k[:, :, self.recent - n_r :] = rows["recent_k"]
            self.recent_v[:, :, self.recent - n_r :] = rows["recent_v"]

    # ------------------------------------------------------------------ attention

    def attention(
        self,
        query: torch.Tensor,
        packed: tuple[torch.Tensor, torch.Tensor],
        length: int | torch.Tensor,
        starts: torch.Tensor | None,
        *,
        k_format: str,
        v_format: str,
        k_rot: Rotation,
        v_rot: Rotation,
        scale: float | None,
        window: int = 0,
        softcap: float = 0.0,
        sink_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the queries ``query (B, Hq, Sq, d)`` at positions ``[length - Sq, length)``
        (``length``: an int, or a static cache's 0-dim device tensor) over the packed cache and the
        exact tokens of this forward, merged by log-sum-exp. ``starts``: each sequence's first
        visible position (left padding, a chunk's start) ``(B,)`` or None; ``window``: the layer's
        sliding window (0: none); ``sink_logits``: transformers' per-head sink logits. One query (a decode
        step, or a run of one inside a longer forward): fixed shapes, no host sync."""
        d = query.shape[3]
        sides = dict(k_format=k_format, v_format=v_format, k_rot=k_rot, v_rot=v_rot)
        scale = d**-0.5 if scale is None else scale
        if query.shape[2] == 1:
            parts = self._one_query(query, packed, length, starts, sides, scale, window, softcap)
        else:
            parts = self._queries(query, packed, int(length), starts, sides, scale, window, softcap)
        if not parts:
            return query.new_zeros(query.shape)
        return ops.merge_attention(parts, sink_logits).to(query.dtype)

    def _one_query(self, query, packed, length, starts, sides, scale, window, softcap) -> list:
        """The packed and the exact ``(out, lse)`` of one query a sequence at ``p = length - 1``: packed
        keys ``[max(pad, s), p - w]`` by the op; the sink and this forward's recent rows by fixed-shape
        tensor ops over all of them, masked by position."""
        b = query.shape[0]
        s, w = self.sink, self.recent
        p = torch.as_tensor(length, device=query.device).reshape(-1).expand(b) - 1  # (B,)
        pad = torch.zeros_like(p) if starts is None else starts.to(p)
        low = torch.maximum(pad, torch.full_like(pad, s))
        if window:
            low = torch.maximum(low, p - window + 1)
        end = p - w + 1  # packed keys [low, end); none where low >= end
        n = end.clamp(min=1)
        common = dict(scale=scale, softcap=softcap, return_lse=True)
        parts = [ops.attention(query, *packed, n, torch.where(low < end, low, n), **sides, **common)]
        all_k, all_v, start = self.pending  # positions start - w, start - w + 1, ...
        r = all_k.shape[2]
        first = torch.as_tensor(start, device=query.device) - w
        pos = torch.cat(
            [torch.arange(s, device=p.device).expand(b, s), (first + torch.arange(r, device=p.device)).expand(b, r)], 1
        )
        is_sink = torch.arange(s + r, device=p.device) < s
        ok = (pos <= p[:, None]) & (pos >= pad[:, None])
        ok &= is_sink | ((pos >= s) & (pos > p[:, None] - w))
        if window:
            ok &= p[:, None] - pos < window
        keys, values = torch.cat([self.sink_k, all_k], 2), torch.cat([self.sink_v, all_v], 2)
        parts.append(_masked_attention(query, keys, values, ok[:, None], scale, softcap))
        return parts

    def _queries(self, query, packed, length, starts, sides, scale, window, softcap) -> list:
        """The parts of ``Sq > 1`` queries ending at ``length``: packed keys by the op with every query
        moved ``w`` positions back, the recent rows by the op with a window of ``w``, the sink by
        matmuls."""
        b, _, sq, _ = query.shape
        s, w = self.sink, self.recent
        first = length - sq  # position of query 0
        pad = torch.zeros(b, dtype=torch.int64, device=query.device) if starts is None else starts.long()
        common = dict(scale=scale, softcap=softcap, return_lse=True)
        parts = []
        lo = max(0, w - first)
        if sq > lo and length - w > s and (window == 0 or window > w):
            n = length - w
            lengths = torch.full((b,), n, dtype=torch.int64, device=query.device)
            window_packed = window - w if window else 0
            out = ops.attention(
                query[:, :, lo:],
                *packed,
                lengths,
                pad.clamp(min=s).clamp(max=n),
                window=window_packed,
                **sides,
                **common,
            )
            parts.append(_padded(*out, lo))
        all_k, all_v, start = self.pending
        base = int(start) - w  # the position of pending row 0
        r0 = min(max(s, first - w + 1), length)  # the earliest recent key of these queries
        n = length - r0
        lo = max(0, r0 - first)
        if w and sq > lo and n > 0:
            out = ops.attention(
                query[:, :, lo:],
                _rows(all_k[:, :, r0 - base : length - base]),
                _rows(all_v[:, :, r0 - base : length - base]),
                torch.full((b,), n, dtype=torch.int64, device=query.device),
                (pad - r0).clamp(0, n),
                k_format=self.format,
                v_format=self.format,
                window=min(w, window) if window else w,
                **common,
            )
            parts.append(_padded(*out, lo))
        n_s = min(s, length)  # sink keys [0, s): few, so plain matmuls, with the causal, padding and window masks
        if n_s:
            sink_k, sink_v = self.sink_k[:, :, :n_s], self.sink_v[:, :, :n_s]
            parts.append(_sink_part(query, sink_k, sink_v, first, pad, scale, window, softcap))
        return parts


def _padded(out: torch.Tensor, lse: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A part's ``(out, lse)`` of queries ``[lo, Sq)`` as all ``Sq`` rows: rows ``[0, lo)`` saw none of its keys."""
    if lo == 0:
        return out, lse
    out = torch.cat([out.new_zeros(*out.shape[:2], lo, out.shape[3]), out], 2)
    return out, torch.cat([lse.new_full((*lse.shape[:2], lo), -torch.inf), lse], 2)


def _sink_part(q, k, v, first, pad, scale, window, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q (B, Hq, Sq, d)`` (query 0 at position ``first``) over the ``n`` sink keys
    ``k, v (B, Hkv, n, d)`` at positions ``[0, n)``, with the causal, padding and window masks."""
    j = torch.arange(k.shape[2], device=q.device)
    p = first + torch.arange(q.shape[2], device=q.device)
    ok = (j[None, :] <= p[:, None])[None] & (j[None, None, :] >= pad[:, None, None])  # (B, Sq, n)
    if window:
        ok = ok & (p[:, None] - j[None, :] < window)[None]
    return _masked_attention(q, k, v, ok, scale, softcap)


def _masked_attention(q, k, v, ok, scale, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q (B, Hq, Sq, d)`` over keys ``k, v (B, Hkv, n, d)`` where ``ok (B, Sq, n)``,
    in float32 (GQA by broadcasting each KV head over its group); a row with no key: zeros and ``-inf``."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, sq, d)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)[:, :, None]) * scale  # (B, Hkv, G, Sq, n)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~ok[:, None, None], -torch.inf)
    lse = torch.logsumexp(scores, -1)  # (B, Hkv, G, Sq)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(probs, v.float()[:, :, None])  # (B, Hkv, G, Sq, d)
    return out.reshape(b, hq, sq, d), lse.reshape(b, hq, sq)
