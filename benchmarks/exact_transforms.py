#!/usr/bin/env python3
"""Exact transforms of the cached keys and values (issue 19), measured on the real TurboCache.

Each transform changes what the cache stores but not what attention computes when nothing is
quantized (the f16 rows below check it: mean KLD 0), so any change in KLD is the quantizer's:
- "mean": the mean post-RoPE key per layer and KV head (from the calibration text) subtracted
  from every key (turbokv's k_offset: softmax ignores the constant q . m);
- "scale": on top of "mean", keys stored as (k - m) / s and scores taken with queries times s
  (here: the dequantized keys times s, the same scores), s per layer, KV head and channel
  balancing E[(k - m)^2] against E[q^2] on the calibration text: s = (E[(k - m)^2] / E[q^2])^alpha,
  rms 1 (queries before RoPE, each RoPE pair averaged);
- "first": the first token's key (and value) as the offsets of its sequence, which stores that
  token (the attention sink) as zeros, exactly; a value offset is added back after attention
  (the weights sum to 1).
The model attends over the cache's dequantized K/V (transformers' attention, turbokv.patch off).
Prints mean KLD against the f16 cache over the second halves of WikiText-2 test chunks.
Usage: python benchmarks/exact_transforms.py [--chunks 8] [--formats q4_0,turbo3] [--alphas 0.25,-0.1]
"""

from __future__ import annotations

import argparse

import torch

import turbokv
from turbokv.quality import model as eval_model
from turbokv.quality.calibrate import _cache_kwargs, calibration_text, capture
from turbokv.quality.runner import default_text_path, make_chunks


def key_scales(model, ids: torch.Tensor, captured, alpha: float) -> dict[int, torch.Tensor]:
    """``{layer: (Hkv, d)}`` channel scales from the captured keys and the queries of ``ids``."""
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = captured[next(iter(captured))][0].shape[-1]
    queries = {}

    def tap(i):
        return lambda module, args, out: queries.__setitem__(i, out.detach().float().reshape(-1, hq, d))

    hooks = [layer.self_attn.q_proj.register_forward_hook(tap(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    scales = {}
    for i, (k, _) in captured.items():
        a = (k - k.mean(dim=(0, 2))[None, :, None, :]).pow(2).mean(dim=(0, 2))
        b = queries[i].pow(2).mean(0).reshape(hkv, hq // hkv, d).mean(1)
        b = (b[:, : d // 2] + b[:, d // 2 :]).repeat(1, 2) / 2
        s = (a / b.clamp_min(1e-12)) ** alpha
        scales[i] = s / s.pow(2).mean(-1, keepdim=True).sqrt()
    return scales


def transform(cache, k_mode: str, v_first: bool, means, scales=None) -> None:
    """Wrap each layer's update / dequantized with the offsets (and scales) of ``k_mode``."""
    for i, layer in enumerate(cache.layers):
        update, dequantized, state = layer.update, layer.dequantized, {}

        def new_update(k, v, *args, _update=update, _i=i, _state=state, **kw):
            if not _state:
                _state["k"] = k[:, :, :1].clone() if k_mode == "first" else means[_i][None, :, None, :].to(k.dtype)
                _state["v"] = v[:, :, :1].clone() if v_first else torch.zeros_like(v[:, :, :1])
                _state["s"] = (
                    torch.ones_like(_state["k"]) if scales is None else scales[_i][None, :, None, :].to(k.dtype)
                )
            return _update((k - _state["k"]) / _state["s"], v - _state["v"], *args, **kw)

        def new_dequantized(_dequantized=dequantized, _state=state):
            k, v = _dequantized()
            return k * _state["s"] + _state["k"], v + _state["v"]

        layer.update = new_update
        layer.dequantized = new_dequantized


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--formats", default="q4_0,turbo3")
    ap.add_argument("--alphas", default="0.25,-0.1")
    args = ap.parse_args()
    model, tok = eval_model.load()
    cfg = model.config
    calib = tok(calibration_text(), return_tensors="pt").input_ids[:, :1024]
    captured = capture(model, calib)
    means = {i: k.mean(dim=(0, 2)) for i, (k, _) in captured.items()}
    alphas = [float(a) for a in args.alphas.split(",")]
    scales = {a: key_scales(model, calib, captured, a) for a in alphas}
    chunks = make_chunks(tok, default_text_path().read_text(), 512, args.chunks)

    @torch.no_grad()
    def logprobs(chunk, cache):
        logits = model(chunk[None], **_cache_kwargs(model, cache)).logits[0]
        return torch.log_softmax(logits[chunk.numel() // 2 - 1 : -1].float(), -1)

    refs = [logprobs(c, turbokv.TurboCache(cfg, k="f16", v="f16")) for c in chunks]
    # (K format, V quantized too, key offset, value offset = first token, key scale alpha); f16: the
    # transforms alone, which must give KLD 0.
    settings = [("f16", True, "mean", False, alphas[0]), ("f16", True, "first", True, None)]
    for fmt in args.formats.split(","):
        settings += [(fmt, False, "mean", False, None)] + [(fmt, False, "mean", False, a) for a in alphas]
        settings += [
            (fmt, True, "mean", False, None),
            (fmt, True, "first", False, None),
            (fmt, True, "first", True, None),
        ]
    print(f"turbokv exact_transforms: {len(chunks)} chunks x 512 of WikiText-2 test, second halves scored\n")
    print(f"{'K':<7} {'V':<7} {'key offset':<10} {'V offset':<8} {'key scale':<12} {'mean KLD':>9}")
    for fmt, both, k_mode, v_first, alpha in settings:
        kl = []
        for chunk, ref in zip(chunks, refs, strict=True):
            cache = turbokv.TurboCache(cfg, k=fmt, v=fmt if both else "f16")
            transform(cache, k_mode, v_first, means, None if alpha is None else scales[alpha])
            test = logprobs(chunk, cache)
            kl.append((ref.exp() * (ref - test)).sum(-1).clamp_min(0).mean().item())
        scale = "-" if alpha is None else f"alpha {alpha:g}"
        v_off = "first" if v_first else "-"
        print(f"{fmt:<7} {fmt if both else 'f16':<7} {k_mode:<10} {v_off:<8} {scale:<12} {sum(kl) / len(kl):>9.5f}")


if __name__ == "__main__":
    main()
