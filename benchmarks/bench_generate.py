#!/usr/bin/env python3
"""Decode-step speed and memory of a Llama-3-8B-shaped model with each cache, in one run (GPU).

Random bf16 weights (32 layers, 32 q / 8 KV heads, d 128). For each batch x context the
caches are filled with random K/V straight through their own ``update`` (the prompt's
prefill is not what is measured), then ``--steps`` greedy decode steps are timed
end to end (wall clock, host included) with:

* DynamicCache, eager (SDPA)              * StaticCache, compiled (CUDA graphs)
* TurboCache, patched, eager              * TurboCache static, patched, compiled
* TurboCache, unpatched (dequantize + SDPA every step)

and peak memory. Then, from the bytes per token of each cache, the largest
batch x context that fits in the GPU next to the weights. transformers' QuantizedCache
(quanto backend, int4, eager: it is not compileable) runs when optimum-quanto is installed
(the GPU machine needs its wheel carried; reported as not run otherwise).
Usage: python benchmarks/bench_generate.py [--shapes 1x4096,8x16384] [--layers 32]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import time

import torch
import transformers

import turbokv
from turbokv.hf import cache_kwargs

FORMATS = ("q4_0", "turbo4", "turbo3")


def build(layers: int) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=layers,
        vocab_size=128256,
        max_position_embeddings=262144,
        rope_theta=500000.0,
    )
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def fill(cache, model, batch: int, ctx: int) -> None:
    """Put ctx random tokens of K/V into every layer through the cache's own update."""
    cfg = model.config
    g = torch.Generator(device="cuda").manual_seed(0)
    for i in range(cfg.num_hidden_layers):
        for c0 in range(0, ctx, 8192):
            n = min(8192, ctx - c0)
            k = torch.randn(batch, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            if isinstance(cache, turbokv.TurboCache):  # update returns the packed buffers: no dequantized copy
                cache.bind_fused(i, cfg.num_hidden_layers)
            cache.update(k, torch.randn_like(k), i)
    torch.cuda.synchronize()


def decode(model, cache, batch: int, ctx: int, steps: int, compiled: bool) -> float:
    """ms per greedy decode step (wall clock), after warm-up steps (compilation, graph capture)."""
    if compiled:
        torch._dynamo.reset()  # each cache compiles afresh (no recompile limit, no stale guards)
    fwd = model.get_compiled_call(transformers.CompileConfig(fullgraph=True)) if compiled else model.__call__
    ids = torch.ones(batch, 1, dtype=torch.long, device="cuda")
    warm = 3 if compiled else 1
    pos = ctx
    with torch.no_grad():
        for n, timed in ((warm, False), (steps, True)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                position_ids = torch.full((batch, 1), pos, dtype=torch.long, device="cuda")
                out = fwd(input_ids=ids, position_ids=position_ids, **cache_kwargs(model, cache), use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
                pos += 1
            torch.cuda.synchronize()
            if timed:
                return (time.perf_counter() - t0) * 1e3 / steps
    raise AssertionError("unreachable")


def case(model, name: str, batch: int, ctx: int, steps: int) -> tuple[float, float, str]:
    """(ms per step, peak GiB, note) for one cache setting; OOM is reported, not raised."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg, cap = model.config, ctx + steps + 8
    fmt = name.split()[1] if name.startswith("turbo") else None
    try:
        if name == "DynamicCache eager":
            cache, compiled, fused = transformers.DynamicCache(config=cfg), False, False
        elif name == "QuantizedCache quanto int4 eager":
            cache, compiled, fused = transformers.QuantizedCache(backend="quanto", config=cfg, nbits=4), False, False
        elif name == "StaticCache compiled":
            cache, compiled, fused = transformers.StaticCache(config=cfg, max_cache_len=cap), True, False
        elif name.endswith("patched eager"):
            cache, compiled, fused = turbokv.TurboCache(cfg, k=fmt, v=fmt), False, True
        elif name.endswith("static compiled"):
            cache, compiled, fused = turbokv.TurboCache(cfg, k=fmt, v=fmt, max_cache_len=cap), True, True
        else:  # unpatched: dequantize + SDPA
            cache, compiled, fused = turbokv.TurboCache(cfg, k=fmt, v=fmt), False, False
        fill(cache, model, batch, ctx)
        if fused:
            turbokv.patch(model)
        try:
            ms = decode(model, cache, batch, ctx, steps, compiled)
        finally:
            turbokv.unpatch(model)
        note = ""
        if isinstance(cache, turbokv.TurboCache):
            note = f"KV {cache.nbytes() / cache.f16_nbytes():.3f}x f16"
        return ms, torch.cuda.max_memory_allocated() / 2**30, note
    except torch.OutOfMemoryError:
        return float("nan"), float("nan"), "out of memory"
    finally:
        cache = None
        torch.cuda.empty_cache()


def kv_bytes_per_token(cfg, name: str) -> float:
    rows = cfg.num_hidden_layers * cfg.num_key_value_heads
    if "Cache" in name and not name.startswith("turbo"):
        return rows * 128 * 2 * 2
    fmt = name.split()[1]
    return rows * 2 * turbokv.formats.row_bytes(fmt, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x4096,8x16384")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--skip-unpatched", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the caches whose name has one")
    args = ap.parse_args()
    model = build(args.layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(0).total_memory
    print(
        f"turbokv bench_generate, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(f"Llama-3-8B-shaped, {args.layers} layers, random bf16 weights {weights / 2**30:.1f} GiB\n")
    fmts = args.formats.split(",")
    quanto = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
    names = ["DynamicCache eager", "StaticCache compiled"]
    if quanto:
        names.append("QuantizedCache quanto int4 eager")
    for f in fmts:
        names += [f"turbo {f} patched eager", f"turbo {f} static compiled"]
        if not args.skip_unpatched:
            names.append(f"turbo {f} unpatched")
    if args.only:
        names = [n for n in names if any(k in n for k in args.only.split(","))]
    print(f"{'B':>3} {'ctx':>6} {'cache':<30} {'ms/step':>8} {'tok/s':>8} {'peak GiB':>9}  note")
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        for name in names:
            ms, peak, note = case(model, name, b, t, args.steps)
            print(f"{b:>3} {t:>6} {name:<30} {ms:>8.2f} {b * 1e3 / ms:>8.1f} {peak:>9.1f}  {note}", flush=True)
        print()
    print(f"QuantizedCache: {'quanto backend, int4' if quanto else 'not run: optimum-quanto is not installed'}")
    free = total - weights - 4 * 2**30  # 4 GiB for activations and workspace at decode
    print(f"\ncapacity beside the weights ({free / 2**30:.0f} of {total / 2**30:.0f} GiB, 4 GiB for activations):")
    for name in ["DynamicCache"] + [f"turbo {f}" for f in fmts]:
        per = kv_bytes_per_token(model.config, name)
        print(f"  {name:<14} {per / 1024:>7.1f} KiB/token  {free / per / 1e3:>8.0f}k tokens (batch x context)")


if __name__ == "__main__":
    main()
