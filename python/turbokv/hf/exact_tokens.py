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

Storage: the packed buffer keeps slot = position, but only positions ``[s, length - w)`` are
written (a token is quantized, from its exact copy, when it leaves the recent window); the exact
tokens are stored as f16 (bf16 for a bf16 model) rows. Keys are stored after the layer's key offset, in every store,
so all scores share one shift.
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
    """The exact stores of one layer: ``sink`` tokens ``[0, min(s, length))`` and the ``recent`` store.

    Between calls the recent store holds positions ``[r0, length)`` with ``r0 = min(max(s, length
    - w), length)`` (empty for ``w = 0``): the next update quantizes the ones that leave the
    window. During one forward the layer's attention reads ``pending``: the exact rows of
    ``[max(s, P - w + 1), length)`` for queries ``[P, length)``.
    """

    def __init__(self, sink: int, recent: int, dtype: torch.dtype):
        self.sink, self.recent = sink, recent
        self.dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        self.format = exact_format(dtype)
        self.sink_k: torch.Tensor | None = None  # (B, Hkv, <= s, d)
        self.sink_v: torch.Tensor | None = None
        self.recent_k: torch.Tensor | None = None  # (B, Hkv, length - r0, d)
        self.recent_v: torch.Tensor | None = None
        self.r0 = 0
        self.pending: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # ------------------------------------------------------------------ storage

    def _recent_start(self, length: int) -> int:
        return min(max(self.sink, length - self.recent), length) if self.recent else length

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Take new ``(B, Hkv, S, d)`` K/V at positions ``[start, start + S)``; return the rows that
        enter the packed cache now and the position of the first: ``(k_rows, v_rows, position)``."""
        s, w = self.sink, self.recent
        n = k.shape[2]
        end = start + n
        k, v = k.to(self.dtype), v.to(self.dtype)
        if start < s:  # sink positions among the new tokens
            take = min(s, end) - start
            self.sink_k = k[:, :, :take] if self.sink_k is None else torch.cat([self.sink_k, k[:, :, :take]], 2)
            self.sink_v = v[:, :, :take] if self.sink_v is None else torch.cat([self.sink_v, v[:, :, :take]], 2)
        if self.recent_k is not None and self.recent_k.shape[2]:
            all_k, all_v = torch.cat([self.recent_k, k], 2), torch.cat([self.recent_v, v], 2)  # [r0, end)
        else:
            all_k, all_v, self.r0 = k, v, start
        r0 = self.r0
        # Entering the packed cache: [max(s, start - w), end - w), every position the window left.
        a, e = max(s, start - w), end - w
        pack = (
            (all_k[:, :, a - r0 : e - r0], all_v[:, :, a - r0 : e - r0], a) if e > a else (k[:, :, :0], v[:, :, :0], a)
        )
        if w:
            first = min(max(s, start - w + 1), end)  # the earliest recent key of these queries
            self.pending = (all_k[:, :, first - r0 :], all_v[:, :, first - r0 :], first)
        else:
            self.pending = None
        keep = self._recent_start(end)
        self.recent_k, self.recent_v = all_k[:, :, keep - r0 :].clone(), all_v[:, :, keep - r0 :].clone()
        self.r0 = keep
        return pack

    def crop(self, length: int, refill: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], before: int) -> None:
        """Keep positions ``< length`` of the ``before`` held; ``refill(a, b)`` gives the packed cache's
        dequantized K/V of ``[a, b)`` (no offset added) where the recent store no longer reaches back."""
        self.pending = None
        if self.sink_k is not None:
            self.sink_k, self.sink_v = self.sink_k[:, :, :length], self.sink_v[:, :, :length]
        if self.recent_k is None:
            return
        keep = self._recent_start(length)
        if keep < self.r0:  # deeper than the window: the dropped tokens' neighbours come from the packed cache
            upto = min(self.r0, length)  # only what the window keeps is read back
            k, v = (x.to(self.dtype) for x in refill(keep, upto))
            if upto == self.r0:
                k, v = torch.cat([k, self.recent_k], 2), torch.cat([v, self.recent_v], 2)
            self.recent_k, self.recent_v, self.r0 = k, v, keep
        self.recent_k = self.recent_k[:, :, keep - self.r0 : length - self.r0]
        self.recent_v = self.recent_v[:, :, keep - self.r0 : length - self.r0]
        self.r0 = keep

    def map_batch(self, fn) -> None:
        """Apply a batch edit (index select, repeat, device move) to every stored tensor."""
        self.pending = None
        for name in ("sink_k", "sink_v", "recent_k", "recent_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Hkv, length, d)`` dequantized K/V with the exact positions written over."""
        k, v = k.clone(), v.clone()
        if self.sink_k is not None:
            n = self.sink_k.shape[2]
            k[:, :, :n], v[:, :, :n] = self.sink_k, self.sink_v
        if self.recent_k is not None and self.recent_k.shape[2]:
            n = self.recent_k.shape[2]
            k[:, :, self.r0 : self.r0 + n], v[:, :, self.r0 : self.r0 + n] = self.recent_k, self.recent_v
        return k, v

    def tokens(self, length: int) -> int:
        """Exact tokens held at ``length`` (the sink and the recent window)."""
        return min(self.sink, length) + (length - self._recent_start(length))

    # ------------------------------------------------------------------ attention

    def attention(
        self,
        query: torch.Tensor,
        packed: tuple[torch.Tensor, torch.Tensor],
        length: int,
        starts: torch.Tensor | None,
        *,
        k_format: str,
        v_format: str,
        k_rot: Rotation,
        v_rot: Rotation,
        scale: float | None,
        window: int = 0,
        softcap: float = 0.0,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the last ``Sq`` tokens' ``query (B, Hq, Sq, d)``: packed middle, exact sink and
        recent tokens, merged by log-sum-exp. ``starts``: left padding ``(B,)`` or None; ``window``:
        the layer's sliding window (0: none); ``sinks``: transformers' per-head sink logits."""
        b, _, sq, d = query.shape
        s, w = self.sink, self.recent
        first = length - sq  # position of query 0
        scale = d**-0.5 if scale is None else scale
        pad = torch.zeros(b, dtype=torch.int64, device=query.device) if starts is None else starts.long()
        common = dict(scale=scale, softcap=softcap, return_lse=True)
        parts = []
        # Packed keys [max(pad, s), p - w]: the op's causal mask with every query moved w positions back.
        lo = max(0, w - first)
        if sq > lo and length - w > s and (window == 0 or window > w):
            n = length - w
            st = pad.clamp(min=s).clamp(max=n)
            out = ops.attention(
                query[:, :, lo:],
                *packed,
                torch.full((b,), n, dtype=torch.int64, device=query.device),
                st,
                k_format=k_format,
                v_format=v_format,
                k_rot=k_rot,
                v_rot=v_rot,
                window=window - w if window else 0,
                **common,
            )
            parts.append(_padded(*out, lo))
        if sq == 1 and self.sink_k is not None and self.sink_k.shape[2]:
            # Decoding: one op call over the sink and recent rows side by side (the query sees
            # every row of both except its padding and what the layer's window drops: a cut from
            # the low end, which starts expresses).
            parts.append(self._exact_decode(query, length, pad, window, common))
        else:
            parts += self._exact_parts(query, length, pad, scale, window, softcap, common)
        if not parts:
            return query.new_zeros(query.shape)
        return ops.merge_attention(parts, sinks).to(query.dtype)

    def _exact_parts(self, query, length, pad, scale, window, softcap, common) -> list:
        """The recent and the sink ``(out, lse)`` parts of any number of queries, each with its masks."""
        b, _, sq, _ = query.shape
        s, w = self.sink, self.recent
        first = length - sq
        parts = []
        # Recent keys [max(s, p - w + 1), p]: the pending exact rows, with the op's window of w.
        if w and self.pending is not None:
            rk, rv, r0 = self.pending
            lo = max(0, r0 - first)
            n = length - r0
            if sq > lo and n > 0:
                out = ops.attention(
                    query[:, :, lo:],
                    _rows(rk),
                    _rows(rv),
                    torch.full((b,), n, dtype=torch.int64, device=query.device),
                    (pad - r0).clamp(0, n),
                    k_format=self.format,
                    v_format=self.format,
                    window=min(w, window) if window else w,
                    **common,
                )
                parts.append(_padded(*out, lo))
        # Sink keys [0, s): few, so plain matmuls, with the causal, padding and window masks.
        if s and self.sink_k is not None and self.sink_k.shape[2]:
            parts.append(_sink_part(query, self.sink_k, self.sink_v, first, pad, scale, window, softcap))
        return parts

    def _exact_decode(self, query, length, pad, window, common) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of the one query at ``length - 1`` over the sink and pending recent rows.

        Slots ``[0, n_s)`` hold positions ``[0, n_s)``, slots ``[n_s, n_s + n_r)`` positions
        ``[r0, length)``; the lowest visible position ``max(pad, p - window + 1)`` maps to the
        first slot at or after it, and the op's causal mask at the last slot sees the rest.
        """
        ks, vs = self.sink_k[:, :, :length], self.sink_v[:, :, :length]  # a query inside the sink sees up to itself
        n_s = ks.shape[2]
        if self.pending is not None:
            # The query's own w positions: the pending rows start earlier when it is the last of a
            # run inside a longer forward (a chunked layer's prompt), and may go on past it.
            rk, rv, r0 = self.pending
            e = max(0, length - r0)
            a = min(max(0, length - self.recent - r0), e)
            ks, vs, r0 = torch.cat([ks, rk[:, :, a:e]], 2), torch.cat([vs, rv[:, :, a:e]], 2), r0 + a
        else:
            r0 = length
        n = ks.shape[2]
        low = pad if not window else pad.clamp(min=length - window)
        starts = torch.where(low < n_s, low, n_s + (low - r0).clamp(0, n - n_s))
        lengths = torch.full_like(pad, n)
        return ops.attention(
            query, _rows(ks), _rows(vs), lengths, starts, k_format=self.format, v_format=self.format, **common
        )


def _padded(out: torch.Tensor, lse: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A part's ``(out, lse)`` of queries ``[lo, Sq)`` as all ``Sq`` rows: rows ``[0, lo)`` saw none of its keys."""
    if lo == 0:
        return out, lse
    out = torch.cat([out.new_zeros(*out.shape[:2], lo, out.shape[3]), out], 2)
    return out, torch.cat([lse.new_full((*lse.shape[:2], lo), -torch.inf), lse], 2)


def _sink_part(q, k, v, first, pad, scale, window, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q (B, Hq, Sq, d)`` over the ``n`` sink keys ``k, v (B, Hkv, n, d)``."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    vf = v.float().repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (B, Hq, Sq, n)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    j = torch.arange(k.shape[2], device=q.device)
    p = first + torch.arange(q.shape[2], device=q.device)
    ok = (j[None, :] <= p[:, None])[None] & (j[None, None, :] >= pad[:, None, None])  # (B, Sq, n)
    if window:
        ok = ok & (p[:, None] - j[None, :] < window)[None]
    scores = scores.masked_fill(~ok[:, None], -torch.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.matmul(probs, vf), lse


class StaticExactTokens(ExactTokens):
    """The exact stores of a static (compileable) layer: fixed buffers, positions in device tensors.

    ``sink_k / sink_v (B, Hkv, s, d)`` hold positions ``[0, s)`` (written as they arrive);
    ``recent_k / recent_v (B, Hkv, w, d)`` are a shift register whose slot ``i`` holds position
    ``length - w + i`` (slots before position ``s`` or 0 are stale and never read). Every token is
    also packed when it arrives (the layer does it): the packed rows of exact positions are never
    read while those positions are exact, and they are the same bytes the dynamic store writes
    when a token leaves its window (both pack the exact copy). A decode step (one new token)
    updates the stores and attends with no host sync and fixed shapes, so ``generate()`` compiles
    it into CUDA graphs; a forward of several tokens (a prompt) reads the token count once.
    """

    def __init__(self, sink: int, recent: int, dtype: torch.dtype, like: torch.Tensor):
        super().__init__(sink, recent, dtype)
        b, h, _, d = like.shape
        new = lambda n: torch.zeros(b, h, n, d, dtype=self.dtype, device=like.device)  # noqa: E731
        self.sink_k, self.sink_v = new(sink), new(sink)
        self.recent_k, self.recent_v = new(recent), new(recent)
        # During one forward: the recent rows before it and the new ones, and the forward's first
        # position (a 0-dim device tensor): rows from position `start - w`.
        self.pending_static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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
        self.pending = self.pending_static = None

    def append_static(self, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store new ``(B, Hkv, S, d)`` K/V at positions ``[length, length + S)`` (``length``: a 0-dim
        device tensor, before this update); returns them in the exact format, which the layer packs."""
        s, w, n = self.sink, self.recent, k.shape[2]
        k, v = k.to(self.dtype), v.to(self.dtype)
        if s:  # sink slot j takes new token j - length where that is one of them
            j = torch.arange(s, device=k.device) - length
            take = ((j >= 0) & (j < n))[None, None, :, None]
            idx = j.clamp(0, n - 1)
            self.sink_k.copy_(torch.where(take, k.index_select(2, idx), self.sink_k))
            self.sink_v.copy_(torch.where(take, v.index_select(2, idx), self.sink_v))
        all_k, all_v = torch.cat([self.recent_k, k], 2), torch.cat([self.recent_v, v], 2)
        self.pending_static = (all_k, all_v, length.clone())
        if w:
            self.recent_k.copy_(all_k[:, :, n:])
            self.recent_v.copy_(all_v[:, :, n:])
        return k, v

    def crop(self, length: int, refill: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], before: int) -> None:
        """Keep positions ``< length`` of the ``before`` held: the recent slots move back; positions the
        shift register no longer holds come back from the packed cache (their quantized values), as
        the dynamic store does."""
        self.pending = self.pending_static = None
        w = self.recent
        if not w or length >= before:
            return
        old = before - w  # the position of slot 0 now
        new = length - w  # and after the crop
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
        self.pending = self.pending_static = None
        for name in ("sink_k", "sink_v", "recent_k", "recent_v"):
            t, new = getattr(self, name), fn(getattr(self, name))
            if new.shape == t.shape and new.device == t.device:
                t.copy_(new)  # keep the static addresses
            else:
                setattr(self, name, new)

    def fill(self, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """All ``max_cache_len`` dequantized slots ``(B, Hkv, T, d)`` with the exact positions written over."""
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

    def attention(self, query, packed, length, starts, **kw) -> torch.Tensor:
        """As :meth:`ExactTokens.attention`; ``length``: the layer's token count as a 0-dim device
        tensor. One query (decode): no host sync; several: the count is read once."""
        if self.pending_static is not None and self.pending_static[0].shape[2] == self.recent + 1:
            return self._decode(query, packed, length, starts, **kw)  # one new token: a decode step
        n = int(length)
        self._dynamic_view(n, query.shape[2])
        try:
            return super().attention(query, packed, n, starts, **kw)
        finally:
            self.sink_k, self.sink_v = self._sink_buffers
            self.pending = None

    def _dynamic_view(self, length: int, new: int) -> None:
        """Point the dynamic store's fields at these buffers for ``new`` queries ending at ``length``."""
        s, w = self.sink, self.recent
        self._sink_buffers = self.sink_k, self.sink_v
        self.sink_k, self.sink_v = self.sink_k[:, :, : min(s, length)], self.sink_v[:, :, : min(s, length)]
        self.pending = None
        if w and self.pending_static is not None:
            all_k, all_v, start = self.pending_static
            base = int(start) - w  # the position of row 0
            first = min(max(s, length - new - w + 1), length)
            self.pending = (all_k[:, :, first - base :], all_v[:, :, first - base :], first)

    def _decode(
        self,
        query,
        packed,
        length,
        starts,
        *,
        k_format,
        v_format,
        k_rot,
        v_rot,
        scale,
        window=0,
        softcap=0.0,
        sinks=None,
    ) -> torch.Tensor:
        """One query per sequence at position ``p = length - 1``: packed keys ``[max(pad, s), p - w]`` by the
        op, the sink and recent rows by a few fixed-shape tensor ops, merged by log-sum-exp."""
        b, hq, _, d = query.shape
        s, w = self.sink, self.recent
        scale = d**-0.5 if scale is None else scale
        p = torch.as_tensor(length, device=query.device).reshape(1).expand(b) - 1  # query positions (B,)
        pad = torch.zeros_like(p) if starts is None else starts.to(p)
        low = torch.maximum(pad, torch.full_like(pad, s))
        if window:
            low = torch.maximum(low, p - window + 1)
        end = p - w + 1  # packed keys [low, end)
        n = end.clamp(min=1)
        first = torch.where(low < end, low, n)
        common = dict(scale=scale, softcap=softcap, return_lse=True)
        part = ops.attention(
            query, *packed, n, first, k_format=k_format, v_format=v_format, k_rot=k_rot, v_rot=v_rot, **common
        )
        all_k, all_v, _ = self.pending_static  # positions p - w .. p
        keys = torch.cat([self.sink_k, all_k], 2)
        values = torch.cat([self.sink_v, all_v], 2)
        pos = torch.cat(
            [torch.arange(s, device=p.device).expand(b, s), p[:, None] - w + torch.arange(w + 1, device=p.device)], 1
        )  # (B, s + w + 1)
        ok = (pos <= p[:, None]) & (pos >= pad[:, None])
        ok &= torch.cat([torch.ones(s, dtype=torch.bool, device=p.device), torch.arange(w + 1, device=p.device) > 0])
        ok &= (pos >= s) | (torch.arange(s + w + 1, device=p.device) < s)
        if window:
            ok &= p[:, None] - pos < window
        exact = _masked_attention(query, keys, values, ok, scale, softcap)
        return ops.merge_attention([part, exact], sinks).to(query.dtype)


def _masked_attention(q, k, v, ok, scale, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one query a sequence ``q (B, Hq, 1, d)`` over keys ``k, v (B, Hkv, n, d)`` where
    ``ok (B, n)``; a row with no key: zeros and ``-inf``."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # (B, Hkv, G, n)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~ok[:, None, None, :], -torch.inf)
    lse = torch.logsumexp(scores, -1)  # (B, Hkv, G)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(probs, v.float())  # (B, Hkv, G, d)
    return out.reshape(b, hq, 1, d), lse.reshape(b, hq, 1)
