#!/usr/bin/env python3
"""GPU benchmark of the other kernels, each next to its baseline in one run.

* hadamard on a 1 GB fp16 tensor (group 128, seeded) vs a device-to-device copy;
* cache_append of 64k tokens x 8 KV heads (fp16 in, packed out) per format;
* prefill attention (4096 causal queries, 32/8 heads, d 128) over a packed cache vs fp16 SDPA.
Bandwidth counts bytes read plus written.
"""

from __future__ import annotations

import datetime

import torch

import turbokv
from turbokv.core.rotation import auto_rotation


def ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def hadamard_table() -> float:
    """Prints copy and hadamard on 1 GiB of fp16; returns the copy bandwidth (GB/s)."""
    n = 1 << 29  # 512M fp16 values = 1 GiB
    x = torch.randn(n // 128, 128, device="cuda", dtype=torch.float16)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * 2
    t_copy = ms(lambda: y.copy_(x))
    t_had = ms(lambda: turbokv.hadamard(x, 128, 7))
    print(f"{'kernel':<34} {'ms':>8} {'GB/s':>7} {'% copy':>7}")
    copy_gbs = nbytes / t_copy / 1e6
    print(f"{'copy 1 GiB fp16':<34} {t_copy:>8.3f} {copy_gbs:>7.0f} {100.0:>6.1f}%")
    gbs = nbytes / t_had / 1e6
    print(f"{'hadamard 1 GiB fp16, group 128':<34} {t_had:>8.3f} {gbs:>7.0f} {100 * gbs / copy_gbs:>6.1f}%")
    return copy_gbs


def main() -> None:
    print(
        f"turbokv bench_kernels, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}\n"
    )
    copy_gbs = hadamard_table()
    B, H, S, d = 1, 8, 65536, 128
    k = torch.randn(B, H, S, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    pos = torch.arange(S, device="cuda")[None]
    for name in ("f16", "q8_0", "q4_0", "turbo4", "turbo3", "turbo2"):
        kr, vr = auto_rotation(name, d, "k"), auto_rotation(name, d, "v")
        rb = turbokv.core.formats.row_bytes(name, d)
        kc = torch.empty(B, H, S, rb, device="cuda", dtype=torch.uint8)
        vc = torch.empty_like(kc)

        def append(kc=kc, vc=vc, name=name, kr=kr, vr=vr):
            turbokv.cache_append(kc, vc, k, v, pos, name, name, kr, vr)

        t = ms(append)
        # The op checks positions on the host first (a sync); a CUDA graph replays the kernel alone,
        # as a compiled decode step does.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            append()
        tg = ms(graph.replay)
        nb = 2 * k.numel() * 2 + 2 * kc.numel()
        gbs, gbs_g = nb / t / 1e6, nb / tg / 1e6
        print(
            f"{'cache_append 64k x 8 heads ' + name:<34} {t:>8.3f} {gbs:>7.0f} {100 * gbs / copy_gbs:>6.1f}%"
            f"   in a graph: {tg:.3f} ms {100 * gbs_g / copy_gbs:.1f}%"
        )
    print()
    Hq = 32
    for Sq in (4096, 16384):
        q = torch.randn(1, Hq, Sq, d, device="cuda", dtype=torch.float16)
        kk, vv = k[:, :, :Sq].contiguous(), v[:, :, :Sq].contiguous()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            t_sdpa = ms(
                lambda q=q, kk=kk, vv=vv: torch.nn.functional.scaled_dot_product_attention(
                    q, kk, vv, is_causal=True, enable_gqa=True
                )
            )
        print(f"{f'prefill {Sq} causal, SDPA fp16':<40} {t_sdpa:>8.3f}")
        lengths = torch.tensor([Sq], device="cuda")
        for name in ("f16", "q4_0", "turbo3"):
            kr, vr = auto_rotation(name, d, "k"), auto_rotation(name, d, "v")
            kc, vc = turbokv.quantize(kk, name, kr), turbokv.quantize(vv, name, vr)

            def run(q=q, kc=kc, vc=vc, name=name, kr=kr, vr=vr, lengths=lengths):
                return turbokv.attention(q, kc, vc, lengths, k_format=name, v_format=name, k_rot=kr, v_rot=vr)

            t = ms(run)
            print(f"{f'prefill {Sq} causal, turbokv {name}':<40} {t:>8.3f}   {t_sdpa / t:.2f}x SDPA")
            if Sq == 4096 and name == "turbo3":  # the op's own tiled kernel (chunked prefill, padding, softcap)
                with turbokv.core.ops.pinned_kernels(attention="tiled"):
                    t = ms(run)
                print(f"{f'prefill {Sq} causal, tiled kernel {name}':<40} {t:>8.3f}   {t_sdpa / t:.2f}x SDPA")


if __name__ == "__main__":
    main()
