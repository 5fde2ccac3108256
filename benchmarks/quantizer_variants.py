#!/usr/bin/env python3
"""TurboQuant's two extra tools for keys, tried at equal bits: the QJL residual and outlier channels.

Both change only how a key row is quantized, so they are measured by fake quantization: each key
is quantized and dequantized (in float32) as it enters the cache, the values stay exact, and the
model attends over the result with transformers' own attention (turbokv.patch off). The score is
the mean KL divergence against the f16 cache over the second half of each WikiText-2 test chunk.
Bits per value count every stored bit at head dim d (scales and norms at 16 bits).

Key quantizers, per row of d values (post-RoPE keys, as the cache stores them):
- ``turboB``: turbokv's format (Hadamard rotation with seeded signs, one norm per row, the
  B-bit Lloyd-Max codebook), through ``turbokv.reference``: B + 16 / d bits.
- ``qjlB``: TurboQuant_prod, the unbiased inner-product quantizer: ``turbo(B-1)`` plus one bit per
  value of the residual r projected by a seeded Gaussian S (d x d), and ||r|| at 16 bits;
  k^ = k_mse + sqrt(pi / 2) / d * ||r|| * S^T sign(S r), so E[q . k^] = q . k_mse + q . r.
  B + 32 / d bits.
- ``outB``: outlier channels at one bit more: per layer and KV head, the c channels with the
  largest mean square on the calibration text get B + 1 bits and the others B, each set turned by
  its own seeded random rotation and quantized with the Lloyd-Max codebook of its size (from
  tools/gen_formats.py, the generator of turbokv's codebooks) and its own norm:
  B + c / d + 32 / d bits. ``out`` with c = 0 (``rot``) is turboB with a dense rotation, a check.
- ``mixB`` and ``bestB``: the equal-bits baselines for ``outB``, whole layers at one bit more:
  turbo(B+1) keys in as many layers as cost what the outlier channels cost, the others turboB;
  ``mixB`` takes the first layers, ``bestB`` those whose keys at turboB cost the most KLD alone on
  the calibration text (the ranking a per-layer calibration such as ``turbokv calibrate`` makes).

Usage: python benchmarks/quantizer_variants.py [--ctx 8192] [--chunks 2] [--bits 2,3] [--outliers 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch

import turbokv
from turbokv.core import reference
from turbokv.quality import model as eval_model
from turbokv.quality.calibrate import _cache_kwargs, calibration_text, capture
from turbokv.quality.runner import default_text_path, make_chunks

SEED = 1234
ROOT = Path(__file__).resolve().parent.parent


def _gen_formats():
    spec = importlib.util.spec_from_file_location("gen_formats", ROOT / "tools" / "gen_formats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_BOOKS: dict[tuple[int, int], torch.Tensor] = {}


def codebook(g: int, bits: int) -> torch.Tensor:
    """The ``2**bits`` Lloyd-Max centroids of one coordinate of a uniform unit vector in R^g."""
    if (g, bits) not in _BOOKS:
        pos, _ = _gen_formats().lloyd_max(g, bits)
        _BOOKS[(g, bits)] = torch.tensor([*(-pos[::-1]), *pos], dtype=torch.float32)
    return _BOOKS[(g, bits)]


def rotation(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal ``(n, n)`` matrix (QR of a Gaussian, signs fixed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def norm_codebook(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows ``(..., g)`` of rotated values through one f16 norm and the g-dim codebook (turbo's rule:
    nearest centroid of x / ||x||, scale so that the row keeps its norm)."""
    g = x.shape[-1]
    cb = codebook(g, bits)
    n = x.norm(dim=-1, keepdim=True)
    idx = ((x / n.clamp_min(1e-30))[..., None] - cb).abs().argmin(-1)
    c = cb[idx]
    scale = (n / c.norm(dim=-1, keepdim=True).clamp_min(1e-30)).half().float()
    return c * scale


def turbo(x: torch.Tensor, bits: int) -> torch.Tensor:
    d = x.shape[-1]
    fmt = f"turbo{bits}"
    packed = reference.quantize(x, fmt, d, SEED)
    return reference.dequantize(packed, fmt, d, d, SEED)


def qjl(x: torch.Tensor, bits: int, layer: int) -> torch.Tensor:
    d = x.shape[-1]
    base = turbo(x, bits - 1)
    r = x - base
    s = torch.randn(d, d, generator=torch.Generator().manual_seed(SEED + layer))
    gamma = r.norm(dim=-1, keepdim=True).half().float()
    return base + math.sqrt(math.pi / 2) / d * gamma * (torch.sign(r @ s.T) @ s)


def outliers(x: torch.Tensor, bits: int, channels: torch.Tensor, layer: int) -> torch.Tensor:
    """``x (B, Hkv, S, d)``; ``channels (Hkv, c)``: each head's outlier channels."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    for h in range(x.shape[1]):
        hi = channels[h]
        lo = torch.tensor([i for i in range(d) if i not in set(hi.tolist())], dtype=torch.long)
        for part, b, salt in ((hi, bits + 1, 1), (lo, bits, 2)):
            if part.numel() == 0:
                continue
            rot = rotation(part.numel(), SEED + 97 * layer + 13 * h + salt)
            y = x[:, h, :, part] @ rot.T
            out[:, h, :, part] = norm_codebook(y, b) @ rot
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--bits", default="2,3", help="the base bits B, comma-separated")
    ap.add_argument("--outliers", type=int, default=16, help="outlier channels per KV head")
    ap.add_argument("--only", default="", help="comma-separated variant names (turbo3, qjl4, out3, mix3, rot3, ...)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = eval_model.load()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    calib = tok(calibration_text(), return_tensors="pt").input_ids[:, :2048]
    captured = capture(model, calib)
    d = captured[next(iter(captured))][0].shape[-1]
    top = {i: k.pow(2).mean(dim=(0, 2)).topk(args.outliers, dim=-1).indices for i, (k, _) in captured.items()}
    none = {i: t[:, :0] for i, t in top.items()}

    @torch.no_grad()
    def logprobs(chunk, quantizer=None, layers=None):
        """Log-probabilities of the second half of ``chunk`` with ``quantizer(k, layer)`` applied to
        the keys of ``layers`` (default: every layer) as they enter an f16 cache."""
        cache = turbokv.TurboCache.for_config(cfg, k="f16", v="f16", rotate_k="off", rotate_v="off")
        for i, layer in enumerate(cache.layers):
            if quantizer is None or (layers is not None and i not in layers):
                continue
            update = layer.update

            def wrapped(k, v, *a, _update=update, _i=i, **kw):
                return _update(quantizer(k.float(), _i).to(k.dtype), v, *a, **kw)

            layer.update = wrapped
        logits = model(chunk[None], **_cache_kwargs(model, cache)).logits[0]
        return torch.log_softmax(logits[chunk.numel() // 2 - 1 : -1].float(), -1)

    def kld(ref, test) -> torch.Tensor:
        return (ref.exp() * (ref - test)).sum(-1).clamp_min(0)

    calib_ref = logprobs(calib[0])

    def ranked(b: int) -> list[int]:
        """Layers by the KLD their keys at turboB cost alone on the calibration text, most first."""
        cost = [kld(calib_ref, logprobs(calib[0], lambda k, i: turbo(k, b), {j})).mean() for j in range(n_layers)]
        return sorted(range(n_layers), key=lambda j: -cost[j])

    chunks = make_chunks(tok, default_text_path().read_text(), args.ctx, args.chunks)

    variants = {}  # name -> (bits per value of K, quantizer(k, layer))
    for b in (int(x) for x in args.bits.split(",")):
        # Layers at B + 1 bits that cost what the outlier channels and their second norm cost.
        n_hi = round(n_layers * (args.outliers + 16) / d)
        variants[f"turbo{b}"] = (b + 16 / d, lambda k, i, b=b: turbo(k, b))
        variants[f"turbo{b + 1}"] = (b + 1 + 16 / d, lambda k, i, b=b: turbo(k, b + 1))
        variants[f"rot{b}"] = (b + 16 / d, lambda k, i, b=b: outliers(k, b, none[i], i))
        variants[f"qjl{b + 1}"] = (b + 1 + 32 / d, lambda k, i, b=b: qjl(k, b + 1, i))
        variants[f"out{b}"] = (b + args.outliers / d + 32 / d, lambda k, i, b=b: outliers(k, b, top[i], i))
        variants[f"mix{b}"] = (
            b + n_hi / n_layers + 16 / d,
            lambda k, i, b=b, n_hi=n_hi: turbo(k, b + 1 if i < n_hi else b),
        )
        if not args.only or f"best{b}" in args.only.split(","):
            hi = set(ranked(b)[:n_hi])
            variants[f"best{b}"] = (
                b + n_hi / n_layers + 16 / d,
                lambda k, i, b=b, hi=hi: turbo(k, b + 1 if i in hi else b),
            )
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}

    refs = [logprobs(c) for c in chunks]
    print(
        f"turbokv quantizer_variants: {len(chunks)} chunks x {args.ctx} of WikiText-2 test, second halves "
        f"scored; keys quantized, values exact; head dim {d}, {args.outliers} outlier channels per KV head\n"
    )
    print(f"{'keys':<8} {'bits/value K':>12} {'mean KLD':>9} {'± (se)':>8} {'s':>5}")
    for name, (bits, quantizer) in variants.items():
        t0 = time.time()
        kl = []
        for chunk, ref in zip(chunks, refs, strict=True):
            kl.extend(kld(ref, logprobs(chunk, quantizer)).tolist())
        kl = torch.tensor(kl)
        se = kl.std() / math.sqrt(kl.numel())
        print(f"{name:<8} {bits:>12.3f} {kl.mean():>9.5f} {se:>8.5f} {time.time() - t0:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
