#!/usr/bin/env python3
"""Every CUDA attention kernel once per format family, head dim and mask, on small shapes: the
program that tools/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck). Each call is
checked against the reference too, so a kernel that reads or races its way to a wrong answer
fails here even where the sanitizer says nothing. Exits 1 on a wrong or non-finite output."""

from __future__ import annotations

import math
import sys

import torch

from turbokv.core import ops, reference
from turbokv.core.rotation import auto_rotation

KERNELS = ("templated", "flash", "mma", "simt", "tiled")
# (K, V) pairs: each family on each side, mixed and uniform.
PAIRS = (("q4_0", "turbo3"), ("turbo4", "q8_0"), ("q5_0", "turbo2"), ("f16", "f16"), ("q5_1", "q4_1"), ("bf16", "q4_0"))
MASKS = ({}, {"window": 7}, {"softcap": 20.0}, {"causal": False}, {"starts": True})


def run_one(kernel: str, kf: str, vf: str, d: int, sq: int, mask: dict, gen: torch.Generator) -> str:
    kr, vr = auto_rotation(kf, d, "k"), auto_rotation(vf, d, "v")
    B, hq, hkv, T = 2, 8, 2, 77
    k = torch.randn(B, hkv, T, d, generator=gen)
    v = torch.randn(B, hkv, T, d, generator=gen)
    kc, vc = reference.quantize(k, kf, kr.group, kr.seed), reference.quantize(v, vf, vr.group, vr.seed)
    q = torch.randn(B, hq, sq, d, generator=gen).half()
    lengths = torch.tensor([T, 40])
    starts = torch.tensor([0, 3]) if mask.get("starts") else None
    args = (q, kc, vc, lengths, starts, kf, kr.group, kr.seed, vf, vr.group, vr.seed, 1.0 / math.sqrt(d))
    args += (mask.get("causal", True), mask.get("window", 0), mask.get("softcap", 0.0))
    dev = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        with ops.pinned_kernels(attention=kernel):
            out = torch.ops.turbokv.attention(*dev)
    except RuntimeError as e:
        if "cannot run this call" in str(e) or "is built for" in str(e):
            return "not built"
        raise
    torch.cuda.synchronize()
    ref = reference.attention(*args, compute_dtype=torch.float32)
    err = (out.cpu().float() - ref.float()).abs().max().item()
    if not out.isfinite().all() or err > 0.05:
        return f"WRONG (max error {err:.3g})"
    return "ok"


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    counts: dict[str, int] = {}
    bad = 0
    for kernel in KERNELS:
        for kf, vf in PAIRS:
            for d in (64, 96, 128, 256):
                for sq in (1, 5):
                    # every mask on one pair, the plain causal call on the others
                    for mask in MASKS if (kf, vf) == PAIRS[0] else MASKS[:1]:
                        result = run_one(kernel, kf, vf, d, sq, mask, gen)
                        counts[result] = counts.get(result, 0) + 1
                        if result.startswith("WRONG"):
                            bad += 1
                            print(f"{kernel} {kf}/{vf} d={d} sq={sq} {mask}: {result}", flush=True)
    print("sanitize_attention:", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
