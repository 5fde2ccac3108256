#!/usr/bin/env python3
"""One decode-attention call per format, for profilers (ncu): B = 1, 32/8 heads, d = 128.

Usage: ncu --clock-control none -k regex:decode python benchmarks/profile_decode.py [tokens] [formats]
A format written as name:norot runs without the rotations (same bytes, no prologue/epilogue).
"""

from __future__ import annotations

import sys

import torch

import turbokv
from turbokv.core.rotation import auto_rotation

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["f16", "turbo3"]
q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
lengths = torch.tensor([tokens], device="cuda")
for spec in names:
    name, _, opt = spec.partition(":")
    kr, vr = auto_rotation(name, 128, "k"), auto_rotation(name, 128, "v")
    k = torch.randn(1, 8, tokens, 128, device="cuda", dtype=torch.float16)
    kc, vc = turbokv.quantize(k, name, kr, check_finite=False), turbokv.quantize(k, name, vr, check_finite=False)
    for _ in range(2):
        rot = {} if opt == "norot" else {"k_rot": kr, "v_rot": vr}
        turbokv.attention(q, kc, vc, lengths, k_format=name, v_format=name, **rot)
torch.cuda.synchronize()
