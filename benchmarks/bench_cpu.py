#!/usr/bin/env python3
"""CPU benchmark: quantize throughput per format, decode attention over an 8k-token cache, and
attention for every shape a generation loop makes.

Prints three tables. Decode: 1 query, 32 q heads, 8 KV heads, d = 128, against torch SDPA over
an f32 cache of the same tokens, the dequantize-then-SDPA path, and a plain copy of the packed
bytes. Shapes: Sq new queries (the last Sq tokens, causal from the bottom right) over a
--shape-tokens cache: Sq = 2-16 as assisted generation makes, 64-512 a chunked prompt or the
next chat turn, a whole prompt, and a batch of 4 left-padded prompts (a padding mask for SDPA);
each format's op against SDPA on the f32 cache with the same masking and against dequantize +
the same SDPA call. Times are medians of repeated runs.
Usage: python benchmarks/bench_cpu.py [--tokens 8192] [--reps 20] [--shape-tokens 2048]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import turbokv
from turbokv.core import formats
from turbokv.core.rotation import auto_rotation
from turbokv.synthetic import kv, queries


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def quantize_table(reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    k, _ = kv(1, 8, 8192, 128, g)
    x = k.half()
    mb = x.numel() * x.element_size() / 1e6
    print(f"\nquantize (rotate + encode) of {x.shape[2]} tokens x {x.shape[1]} heads x d 128, fp16 input ({mb:.1f} MB)")
    print(f"{'format':<8} {'ms':>8} {'MB/s in':>9} {'MB out':>8}")
    for name in formats.FORMATS:
        rot = auto_rotation(name, 128, "k")
        ms = median_ms(lambda n=name, r=rot: turbokv.quantize(x, n, r, check_finite=False), reps)
        out_mb = formats.row_bytes(name, 128) * x.numel() / 128 / 1e6
        print(f"{name:<8} {ms:>8.2f} {mb / ms * 1e3:>9.0f} {out_mb:>8.2f}")


def attention_table(tokens: int, reps: int) -> None:
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, d = 1, 32, 8, 128
    k, v = kv(B, Hkv, tokens, d, g)
    q = queries(B, Hq, 1, d, g)
    lengths = torch.tensor([tokens])
    rows = []
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    base = median_ms(sdpa, reps)
    rows.append(("SDPA f32 cache", k.numel() * 8, base))
    kh, vh = k.half(), v.half()
    qh = q.half()
    sdpa16 = lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)  # noqa: E731
    rows.append(("SDPA f16 cache", k.numel() * 4, median_ms(sdpa16, reps)))
    for name in ("f16", "q8_0", "q4_0", "turbo4", "turbo3", "turbo2"):
        kr, vr = auto_rotation(name, d, "k"), auto_rotation(name, d, "v")
        kc, vc = turbokv.quantize(k, name, kr), turbokv.quantize(v, name, vr)
        nbytes = kc.numel() + vc.numel()

        def fused(kc=kc, vc=vc, name=name, kr=kr, vr=vr):
            return turbokv.attention(q, kc, vc, lengths, k_format=name, v_format=name, k_rot=kr, v_rot=vr)

        rows.append((f"turbokv {name}", nbytes, median_ms(fused, reps)))
        if name in ("q4_0", "turbo3"):

            def deq_sdpa(kc=kc, vc=vc, name=name, kr=kr, vr=vr):
                kk = turbokv.dequantize(kc, name, d, kr)
                vv = turbokv.dequantize(vc, name, d, vr)
                return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

            rows.append((f"dequant+SDPA {name}", nbytes, median_ms(deq_sdpa, reps)))
            both = torch.cat([kc.flatten(), vc.flatten()])
            dst = torch.empty_like(both)
            rows.append((f"copy {name} bytes", nbytes, median_ms(lambda b=both, o=dst: o.copy_(b), reps)))
    threads = torch.get_num_threads()
    print(f"\ndecode attention: 1 query, {Hq} q heads / {Hkv} KV heads, d {d}, {tokens} tokens, {threads} threads")
    print(f"{'path':<22} {'MB read':>8} {'ms':>8} {'GB/s':>7} {'vs SDPA f32':>12}")
    for label, nbytes, ms in rows:
        print(f"{label:<22} {nbytes / 1e6:>8.2f} {ms:>8.3f} {nbytes / ms / 1e6:>7.2f} {base / ms:>11.2f}x")


def shape_row(B: int, sq: int, t: int, padded: bool, reps: int, g: torch.Generator, names: tuple[str, ...]) -> str:
    """One row of shapes_table: Sq queries of B sequences over t cached tokens."""
    Hq, Hkv, d = 32, 8, 128
    k, v = kv(B, Hkv, t, d, g)
    q = queries(B, Hq, sq, d, g)
    lengths = torch.full((B,), t)
    # Left padding: sequence b's first b * t / 8 slots hold no token.
    starts = torch.tensor([b * t // 8 for b in range(B)]) if padded else None
    j = torch.arange(t)
    mask = j <= (t - sq + torch.arange(sq))[:, None]  # (Sq, T): causal from the bottom right
    if padded:
        mask = (mask & (j >= starts[:, None, None]))[:, None]  # (B, 1, Sq, T)

    def sdpa(kk, vv):
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=True)

    base = median_ms(lambda: sdpa(k, v), reps)
    cells = []
    for name in names:
        kr, vr = auto_rotation(name, d, "k"), auto_rotation(name, d, "v")
        kc, vc = turbokv.quantize(k, name, kr), turbokv.quantize(v, name, vr)

        def fused(kc=kc, vc=vc, name=name, kr=kr, vr=vr):
            return turbokv.attention(q, kc, vc, lengths, starts, k_format=name, v_format=name, k_rot=kr, v_rot=vr)

        def deq(kc=kc, vc=vc, name=name, kr=kr, vr=vr):
            return sdpa(turbokv.dequantize(kc, name, d, kr), turbokv.dequantize(vc, name, d, vr))

        for fn in (fused, deq):
            ms = median_ms(fn, reps)
            cells.append(f"{ms:>8.2f} {base / ms:>4.2f}x")
    return f"{B:>2} {sq:>5} {base:>9.2f} " + " ".join(f"{c:>14}" for c in cells)


def shapes_table(tokens: int, reps: int) -> None:
    g = torch.Generator().manual_seed(2)
    names = ("f16", "q8_0", "q4_0", "turbo4", "turbo3")
    threads = torch.get_num_threads()
    print(f"\nattention by shape: 32 q heads / 8 KV heads, d 128, {tokens} cached tokens, {threads} threads")
    print("ms (x: SDPA f32 time / this); deq: dequantize to f32 + the same SDPA call")
    print(f"{'B':>2} {'Sq':>5} {'SDPA f32':>9} " + " ".join(f"{n + ' op':>14} {n + ' deq':>14}" for n in names))
    for sq in (1, 2, 8, 16, 64, 512, tokens):
        print(shape_row(1, sq, tokens, False, reps, g, names), flush=True)
    # A batch of 4 left-padded prompts, each a whole prompt of tokens / 4.
    print(shape_row(4, tokens // 4, tokens // 4, True, reps, g, names), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shape-tokens", type=int, default=2048)
    ap.add_argument("--shape-reps", type=int, default=5)
    args = ap.parse_args()
    print(
        f"turbokv bench_cpu, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    quantize_table(args.reps)
    attention_table(args.tokens, args.reps)
    shapes_table(args.shape_tokens, args.shape_reps)


if __name__ == "__main__":
    main()
