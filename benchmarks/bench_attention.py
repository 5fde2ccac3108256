#!/usr/bin/env python3
"""GPU decode-attention benchmark: turbokv over packed caches vs fp16 SDPA, in one run.

For B = 1 and 16, 32 q heads / 8 KV heads, d = 128, prints the time of one decode
step per path, the bytes each path reads, the achieved bandwidth and its fraction
of the device-to-device copy bandwidth measured in the same run. Each path rotates
among several cache copies whose total exceeds the L2, so times are HBM times.
Every path is captured in a CUDA graph and replayed (what compiled decoding runs:
no launch gaps, no host checks); "eager call" rows time the plain op call instead.
Two times per row: `ms`, one call timed alone (it includes the ~10-17 us host latency of
launching a graph replay onto an idle GPU), and `ms b2b`, the mean over back-to-back
calls (the GPU time per step of a decode loop whose host runs ahead).
Rows: each format with itself, then mixed K / V pairs (MIXED) as calibrated policies use them.
Usage: python benchmarks/bench_attention.py [--contexts 4096,16384,65536,131072] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import datetime
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend

import turbokv
from turbokv.core import formats
from turbokv.core.rotation import auto_rotation

HQ, HKV, D = 32, 8, 128
FORMATS = ("f16", "q8_0", "q4_0", "turbo4", "turbo3", "turbo2")
# K / V pairs that calibrated policies and asymmetric settings choose (the shipped policies mix
# q5_0 / turbo K with turbo V; q8_0 K with turbo V is the seeds' setting).
MIXED = (
    ("q8_0", "turbo4"),
    ("q8_0", "turbo3"),
    ("q8_0", "q4_0"),
    ("q4_0", "turbo3"),
    ("turbo4", "turbo3"),
    ("turbo3", "turbo2"),
    ("turbo4", "q4_0"),
    ("q5_0", "turbo3"),
    ("q5_0", "q5_0"),
)


class Timing(NamedTuple):
    """ms per call: `single` times each call alone (events around one call, so the host's
    launch latency of a graph replay is in it); `steady` is the mean over back-to-back calls
    (the host ahead of the GPU, as in a decode loop: GPU time per step)."""

    single: float
    steady: float


def warm_calls(fn, n_bufs: int, graph: bool) -> list:
    """fn(i) for each of n_bufs inputs as zero-argument calls, after warm-up calls; graph: each
    captured once in a CUDA graph, the calls its replays."""
    for i in range(3):
        fn(i % n_bufs)
    torch.cuda.synchronize()
    if not graph:
        return [lambda i=i: fn(i) for i in range(n_bufs)]
    graphs = []
    for i in range(n_bufs):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    return [g.replay for g in graphs]


def bench_ms(fn, n_bufs: int, iters: int = 50, graph: bool = True) -> Timing:
    """Median of `iters` single timed calls (CUDA events), and the best mean of 5 bursts of
    `iters` back-to-back calls, cycling over n_bufs inputs.

    graph: capture fn(i) once per input in a CUDA graph and time the replays.
    """
    calls = warm_calls(fn, n_bufs, graph)
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % n_bufs]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    steady = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            calls[i % n_bufs]()
        end.record()
        end.synchronize()
        steady = min(steady, start.elapsed_time(end) / iters)
    return Timing(times[len(times) // 2], steady)


def copies_for(nbytes: int) -> int:
    return max(1, min(8, -(-200_000_000 // max(nbytes, 1))))


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read plus written."""
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    ms = bench_ms(lambda i: dst.copy_(src), 1, 20, graph=False)
    return 2 * n / ms.single / 1e6


def read_bandwidth() -> float:
    """GB/s of a large torch.sum: the read bandwidth a memory-bound attention call can reach."""
    x = torch.ones(1 << 31, dtype=torch.float16, device="cuda")
    ms = bench_ms(lambda i: x.sum(), 1, 10, graph=False)
    return x.numel() * 2 / ms.single / 1e6


def run(batch: int, tokens: int, copy_gbs: float, uniform_only: bool, extra: bool) -> list[tuple]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.float16, generator=g)
    lengths = torch.full((batch,), tokens, device="cuda", dtype=torch.int64)
    rows = []
    kv_bytes = batch * HKV * tokens * D * 2 * 2
    n = copies_for(kv_bytes)
    ks = [torch.randn(batch, HKV, tokens, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(n)]
    vs = [torch.randn(batch, HKV, tokens, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(n)]

    def sdpa(i):
        return torch.nn.functional.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)

    # The baseline is the faster of SDPA's flash and cuDNN backends, both printed.
    backends = {}
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        try:
            with torch.nn.attention.sdpa_kernel(backend):
                backends[label] = bench_ms(sdpa, n)
        except RuntimeError as e:  # the backend refuses the shape
            print(f"SDPA {label}: {str(e).splitlines()[0]}")
    base = min(backends.values(), key=lambda t: t.steady)
    for label, t in backends.items():
        rows.append((f"SDPA fp16 ({label})", kv_bytes, t))
    settings = [(f, f) for f in FORMATS] + ([] if uniform_only else list(MIXED))
    for kf, vf in settings:
        name = kf if kf == vf else f"{kf}/{vf}"
        kr, vr = auto_rotation(kf, D, "k"), auto_rotation(vf, D, "v")
        kc = [turbokv.quantize(k, kf, kr, check_finite=False) for k in ks]
        vc = [turbokv.quantize(v, vf, vr, check_finite=False) for v in vs]
        nbytes = kc[0].numel() + vc[0].numel()

        def fused(i, kc=kc, vc=vc, kf=kf, vf=vf, kr=kr, vr=vr):
            return turbokv.attention(q, kc[i], vc[i], lengths, k_format=kf, v_format=vf, k_rot=kr, v_rot=vr)

        rows.append((f"turbokv {name}", nbytes, bench_ms(fused, n)))
        if kf != vf or not extra:
            del kc, vc
            continue
        if name == "turbo3":

            def norot(i, kc=kc, vc=vc, name=name):
                return turbokv.attention(q, kc[i], vc[i], lengths, k_format=name, v_format=name)

            rows.append(("turbokv turbo3 no-rot", nbytes, bench_ms(norot, n)))
            rows.append(("turbokv turbo3 eager call", nbytes, bench_ms(fused, n, graph=False)))
        if name in ("turbo3", "q4_0", "f16"):
            # The generic kernels, pinned (head dims and formats the specialised one is not built for).
            for kernel in ("mma", "simt"):
                with turbokv.core.ops.pinned_kernels(attention=kernel):
                    rows.append((f"turbokv {name} {kernel} kernel", nbytes, bench_ms(fused, n)))
        if name == "q4_0":

            def deq(i, kc=kc, vc=vc, name=name, kr=kr, vr=vr):
                k = turbokv.dequantize(kc[i], name, D, kr, dtype=torch.float16)
                v = turbokv.dequantize(vc[i], name, D, vr, dtype=torch.float16)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            rows.append(("dequant+SDPA q4_0", nbytes, bench_ms(deq, n)))
        del kc, vc
    return [(batch, tokens, label, nb, ms, base, copy_gbs) for label, nb, ms in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384,65536,131072")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--uniform-only", action="store_true", help="only K format == V format")
    ap.add_argument("--no-extra", action="store_true", help="no pinned-kernel, no-rotation, eager or dequant rows")
    ap.add_argument(
        "--decode-values", type=int, default=0, help="pin the SIMT decode kernel's values per lane (4, 8, 16)"
    )
    args = ap.parse_args()
    with turbokv.core.ops.pinned_kernels(decode_values=args.decode_values):
        report(args)


def report(args: argparse.Namespace) -> None:
    copy_gbs = copy_bandwidth()
    print(
        f"turbokv bench_attention, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write); torch.sum reads {read_bandwidth():.0f} GB/s")
    print("vs SDPA: against the faster of SDPA's flash and cuDNN backends (per column)\n")
    print(
        f"{'B':>3} {'ctx':>7} {'path':<24} {'MB read':>9} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'vs SDPA':>8}"
        f" | {'ms b2b':>8} {'% copy':>7} {'vs SDPA':>8}"
    )
    for b in (int(x) for x in args.batches.split(",")):
        for t in (int(x) for x in args.contexts.split(",")):
            if b * t > 16 * 32768:
                continue
            for batch, tokens, label, nb, ms, base, cg in run(b, t, copy_gbs, args.uniform_only, not args.no_extra):
                gbs, gbs_b2b = nb / ms.single / 1e6, nb / ms.steady / 1e6
                print(
                    f"{batch:>3} {tokens:>7} {label:<24} {nb / 1e6:>9.1f} {ms.single:>8.4f} {gbs:>7.0f} "
                    f"{100 * gbs / cg:>6.1f}% {base.single / ms.single:>7.2f}x"
                    f" | {ms.steady:>8.4f} {100 * gbs_b2b / cg:>6.1f}% {base.steady / ms.steady:>7.2f}x"
                )
            torch.cuda.empty_cache()
    print(
        f"\nbytes per (token, KV head) row, K+V at d={D}: "
        + ", ".join(f"{f} {formats.row_bytes(f, D) * 2}" for f in FORMATS)
    )


if __name__ == "__main__":
    main()
