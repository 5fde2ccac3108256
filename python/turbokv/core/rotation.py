"""Hadamard rotations with seeded random signs.

A rotation is ``(group n, seed or None)``. With a seed,
``R = diag(s2) @ H_n / sqrt(n) @ diag(s1)``; without, ``R = H_n / sqrt(n)``
(symmetric and self-inverse). The inverse swaps the sign diagonals:
``R^-1 = diag(s1) @ H_n / sqrt(n) @ diag(s2)``. Rows longer than ``n`` are
rotated block-diagonally, block by block.

Sign ``i`` of a seed is the top bit of ``splitmix64`` output ``i`` (0-based)
started at ``seed``: ``mix(seed + (i + 1) * 0x9E3779B97F4A7C15)``; ``s1`` is
outputs ``0..n-1``, ``s2`` outputs ``n..2n-1``. ``cpp/include/turbokv/signs.h``
computes the same numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from turbokv.core.formats import ROTATION_GROUPS

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MAX_SEED = (1 << 63) - 1  # seeds travel through int64 op arguments

# Default seeds for the two sides of a cache (any value in [0, 2**63) works).
K_SEED = 0x4B5F524F54415445  # "K_ROTATE"
V_SEED = 0x565F524F54415445  # "V_ROTATE"


def splitmix64_at(seed: int, i: int) -> int:
    """Output ``i`` (0-based) of splitmix64 started at ``seed``."""
    z = (seed + (i + 1) * GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=64)
def _signs(seed: int, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    bits = [splitmix64_at(seed, i) >> 63 for i in range(2 * n)]
    vals = tuple(-1.0 if b else 1.0 for b in bits)
    return vals[:n], vals[n:]


def signs(seed: int, n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The sign diagonals ``(s1, s2)`` of a seeded rotation of group ``n``, each shape (n,)."""
    check_rotation(n, seed)
    s1, s2 = _signs(seed, n)
    return torch.tensor(s1, dtype=dtype), torch.tensor(s2, dtype=dtype)


def check_rotation(group: int, seed: int | None, dim: int | None = None, name: str = "rot_group") -> None:
    """Raise ``ValueError`` for a rotation group/seed the ops do not support."""
    if group not in ROTATION_GROUPS:
        raise ValueError(f"{name}: got {group}, expected one of {ROTATION_GROUPS}")
    if dim is not None and dim % group != 0:
        raise ValueError(f"{name}: got {group}, expected a divisor of the row length {dim}")
    if seed is not None and not (0 <= seed <= MAX_SEED):
        raise ValueError(f"rot_seed: got {seed}, expected an integer in [0, 2**63)")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix H_n, shape (n, n)."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(n: int, seed: int | None, inverse: bool = False, dtype=torch.float64) -> torch.Tensor:
    """Dense R (or R^-1), shape (n, n), such that ``rotate(x) == x @ R.T``."""
    r = hadamard_matrix(n, dtype) / math.sqrt(n)
    if seed is None:
        return r
    s1, s2 = signs(seed, n, dtype)
    if inverse:
        s1, s2 = s2, s1
    return s2[:, None] * r * s1[None, :]


@dataclass(frozen=True)
class Rotation:
    """One side's rotation: a group of 16..512 values and an optional sign seed.

    ``group == 0`` means no rotation.
    """

    group: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.group != 0:
            check_rotation(self.group, self.seed)

    @property
    def enabled(self) -> bool:
        return self.group != 0


def auto_rotation(fmt: str, head_dim: int, side: str) -> Rotation:
    """The ``auto`` policy of design.md section 4 for one side ("k" or "v").

    Turbo formats rotate their own group; other quantized formats rotate K in
    blocks of the largest power of two dividing d (<= 512) and V in blocks of 64
    (llama.cpp's attn-rot choice); f16/bf16 are not rotated.
    """
    from turbokv.core import formats

    f = formats.get(fmt)
    if side not in ("k", "v"):
        raise ValueError(f"side: got {side!r}, expected 'k' or 'v'")
    seed = K_SEED if side == "k" else V_SEED
    if f.family == "float":
        return Rotation()
    dp = formats.padded_dim(f, head_dim)
    if f.family == "turbo":
        return Rotation(formats.turbo_group(dp), seed)
    if side == "v" and dp % 64 == 0:
        return Rotation(64, seed)
    group = max(g for g in ROTATION_GROUPS if dp % g == 0)
    return Rotation(group, seed)
