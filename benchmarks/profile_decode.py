#!/usr/bin/env python3
"""One decode-attention call per format, for profilers (ncu): B = 1, 32/8 heads, d = 128.

Usage: ncu --clock-control none -k regex:decode_kernel python benchmarks/profile_decode.py [tokens] [formats]
"""

from __future__ import annotations

import sys

import torch

import turbokv
from turbokv.rotation import auto_rotation

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["f16", "turbo3"]
q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
lengths = torch.tensor([tokens], device="cuda")
for name in names:
    kr, vr = auto_rotation(name, 128, "k"), auto_rotation(name, 128, "v")
    k = torch.randn(1, 8, tokens, 128, device="cuda", dtype=torch.float16)
    kc, vc = turbokv.quantize(k, name, kr, check_finite=False), turbokv.quantize(k, name, vr, check_finite=False)
    for _ in range(2):
        turbokv.attention(q, kc, vc, lengths, k_format=name, v_format=name, k_rot=kr, v_rot=vr)
torch.cuda.synchronize()
