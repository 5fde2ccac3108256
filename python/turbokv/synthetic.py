"""Real-looking synthetic K/V: the outlier structure of post-RoPE keys, for demos and benchmarks.

Keys of real models carry a few channels with magnitudes 10-50x the rest,
constant in sign across tokens, and RoPE rotates channel pairs by
position-dependent angles; values are closer to Gaussian with mild outliers.
"""

from __future__ import annotations

import math

import torch


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Apply rotary position embedding (half-split pairs) over the token dim of ``(B, H, T, d)``."""
    t, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def kv(
    batch: int, heads: int, tokens: int, head_dim: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)``, each ``(batch, heads, tokens, head_dim)`` float32."""
    g = generator
    k = torch.randn(batch, heads, tokens, head_dim, generator=g)
    # A few outlier channels per head, large and of fixed sign (the bias that RoPE then spins).
    n_out = max(2, head_dim // 32)
    for h in range(heads):
        ch = torch.randperm(head_dim, generator=g)[:n_out]
        mag = 10 + 30 * torch.rand(n_out, generator=g)
        k[:, h, :, ch] = k[:, h, :, ch] * 2 + mag
    k = rope(k)
    v = torch.randn(batch, heads, tokens, head_dim, generator=g) * (1 + torch.rand(head_dim, generator=g))
    v[..., 0] *= 6  # a mild value outlier
    return k, v


def queries(batch: int, heads: int, n: int, head_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Queries ``(batch, heads, n, head_dim)`` scaled so attention is neither flat nor one-hot."""
    return torch.randn(batch, heads, n, head_dim, generator=generator) / math.sqrt(head_dim) * 2
