#!/usr/bin/env python3
"""CPU benchmark: quantize throughput per format, and decode attention over an 8k-token cache.

Prints two tables. Attention: 1 query, 32 q heads, 8 KV heads, d = 128, against
torch SDPA over an f32 cache of the same tokens, the dequantize-then-SDPA path,
and a plain copy of the packed bytes. Times are medians of repeated runs.
Usage: python benchmarks/bench_cpu.py [--tokens 8192] [--reps 20]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import turbokv
from turbokv import formats
from turbokv.rotation import auto_rotation
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(
        f"turbokv bench_cpu, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    quantize_table(args.reps)
    attention_table(args.tokens, args.reps)


if __name__ == "__main__":
    main()
