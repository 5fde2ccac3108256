#!/usr/bin/env python3
"""A batch-1 generation from a 128k-token prompt with a turbo3 TurboCache (GPU).

Llama-3-8B-shaped model, random bf16 weights. The prompt's prefill runs through the
patched model (whole-prompt prefill: dequantize + flash SDPA), then greedy decoding on
the packed cache with the fused kernel. Checks: every score finite, the cache holds
prompt + new tokens, and the first new token's logits against a bf16 DynamicCache run
of the same prompt (cosine similarity, same argmax). Prints times and memory.
Usage: python benchmarks/long_context.py [--tokens 131072] [--new 32] [--layers 32]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import transformers
from bench_generate import build

import turbokv
from turbokv.hf.attention import cache_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    model = build(args.layers)
    print(f"turbokv long_context, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda", generator=g)
    kw = dict(max_new_tokens=args.new, do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch.cuda.reset_peak_memory_stats()
    cache = turbokv.TurboCache(model.config, k="turbo3", v="turbo3")
    with torch.no_grad(), turbokv.patch(model):
        t0 = time.perf_counter()
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        cache.crop(args.tokens - 1)  # again from the same prompt: its last token and the new ones decode
        res = model.generate(out[:, : args.tokens], **cache_kwargs(model, cache), **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    scores = torch.stack(res.scores)
    finite = bool(torch.isfinite(scores).all())
    print(f"prompt {args.tokens} tokens, {args.layers} layers: prefill + 1 token {t1 - t0:.1f} s")
    decode_s = t2 - t1
    print(f"{args.new} new tokens in {decode_s:.2f} s ({args.new / decode_s:.1f} tok/s incl. generate() overhead)")
    print(f"all scores finite: {finite}; cache: {cache}")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    first = res.scores[0].float()
    del cache, res, out
    torch.cuda.empty_cache()
    with torch.no_grad():
        ref = (
            model.generate(
                ids,
                **cache_kwargs(model, transformers.DynamicCache(config=model.config)),
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            .scores[0]
            .float()
        )
    cos = torch.nn.functional.cosine_similarity(first, ref).item()
    print(f"first new token vs bf16 DynamicCache: cosine {cos:.4f}, same argmax {bool(first.argmax() == ref.argmax())}")
    assert finite and scores.shape[0] == args.new, "long-context generation failed"


if __name__ == "__main__":
    main()
