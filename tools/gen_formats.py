#!/usr/bin/env python3
"""Compute the turbo codebooks and write them where Python and C++ read them.

Outputs, both generated from the registry in ``python/turbokv/core/formats.py``:

* the block between the GENERATED markers of ``python/turbokv/core/formats.py``;
* ``cpp/include/turbokv/formats_generated.h``.

The codebook is the Lloyd-Max quantizer of one coordinate x of a uniformly
random unit vector in R^g. Its density is exactly
``f(x) = (1 - x^2)^a / B(1/2, a + 1)`` on [-1, 1] with ``a = (g - 3) / 2``;
cell mass and first/second moments have closed forms through the regularised
incomplete beta function, so each Lloyd iteration is exact and we iterate
until the centroids stop moving (other implementations shipped a 4-bit table
that was only the initialisation, and a 100-iteration one that had not
converged).

Usage: ``python tools/gen_formats.py`` (write) or ``--check`` (exit 1 when
the files on disk differ from what would be generated; the float64 literals of
formats.py may differ in their last digits between scipy releases, see
``same_up_to_solver_noise``).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
from scipy.special import beta as beta_fn
from scipy.special import betainc
from scipy.stats import norm

ROOT = Path(__file__).resolve().parent.parent
FORMATS_PY = ROOT / "python" / "turbokv" / "core" / "formats.py"
HEADER = ROOT / "cpp" / "include" / "turbokv" / "formats_generated.h"
BEGIN = "# --- BEGIN GENERATED (tools/gen_formats.py) ---"
END = "# --- END GENERATED ---"


def load_registry():
    spec = importlib.util.spec_from_file_location("_turbokv_formats", FORMATS_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


class BetaCoordinate:
    """Moments of one coordinate of a uniform unit vector in R^g over [lo, hi], 0 <= lo."""

    def __init__(self, g: int):
        self.a = (g - 3) / 2.0
        self.z = beta_fn(0.5, self.a + 1)

    def mass(self, lo, hi):
        return 0.5 * (betainc(0.5, self.a + 1, hi**2) - betainc(0.5, self.a + 1, lo**2))

    def first(self, lo, hi):
        p = self.a + 1
        return ((1 - lo**2) ** p - (1 - hi**2) ** p) / (2 * p * self.z)

    def second(self, lo, hi):
        c = 0.5 * beta_fn(1.5, self.a + 1) / self.z
        return c * (betainc(1.5, self.a + 1, hi**2) - betainc(1.5, self.a + 1, lo**2))


def lloyd_max(g: int, bits: int, tol: float = 1e-15, max_iter: int = 200_000):
    """Positive half of the converged codebook and its per-vector MSE (mse * g)."""
    dist = BetaCoordinate(g)
    half = 2 ** (bits - 1)
    # Start from Gaussian quantiles of N(0, 1/g): close, so convergence is quick.
    probs = 0.5 + 0.5 * (np.arange(half) + 0.5) / half
    c = norm.ppf(probs) / np.sqrt(g)
    for _ in range(max_iter):
        edges = np.concatenate([[0.0], (c[:-1] + c[1:]) / 2, [1.0]])
        new = dist.first(edges[:-1], edges[1:]) / dist.mass(edges[:-1], edges[1:])
        step = np.max(np.abs(new - c))
        c = new
        if step < tol:
            break
    else:
        raise RuntimeError(f"Lloyd-Max did not converge for g={g} bits={bits}")
    edges = np.concatenate([[0.0], (c[:-1] + c[1:]) / 2, [1.0]])
    lo, hi = edges[:-1], edges[1:]
    per_coord = 2 * np.sum(dist.second(lo, hi) - 2 * c * dist.first(lo, hi) + c**2 * dist.mass(lo, hi))
    return c, float(per_coord * g)


def codebooks(registry):
    bits = sorted({f.bits for f in registry.FORMATS.values() if f.family == "turbo"})
    out = {}
    for g in registry.TURBO_GROUPS:
        for b in bits:
            pos, mse_g = lloyd_max(g, b)
            full = np.concatenate([-pos[::-1], pos])
            mids = ((full[:-1] + full[1:]) / 2).astype(np.float32)
            out[(g, b)] = (full, mids, mse_g)
    return out


def f32(x: float) -> float:
    return float(np.float32(x))


def python_block(books) -> str:
    lines = [BEGIN]
    lines.append("# Lloyd-Max centroids (ascending, symmetric) for one coordinate of a uniformly")
    lines.append("# random unit vector in R^g (exact Beta marginal), keyed by (g, bits).")
    lines.append("CODEBOOKS: dict[tuple[int, int], tuple[float, ...]] = {")
    for (g, b), (full, _, _) in books.items():
        lines.append(f"    ({g}, {b}): (")
        lines += [f"        {float(v)!r}," for v in full]
        lines.append("    ),")
    lines.append("}")
    lines.append("# Decision thresholds between neighbouring centroids, as float32 values.")
    lines.append("MIDPOINTS: dict[tuple[int, int], tuple[float, ...]] = {")
    for (g, b), (_, mids, _) in books.items():
        lines.append(f"    ({g}, {b}): (")
        lines += [f"        {float(v)!r}," for v in mids]
        lines.append("    ),")
    lines.append("}")
    lines.append("# Theoretical per-vector MSE of a unit vector (mse * g), no norm correction.")
    lines.append("MSE_G: dict[tuple[int, int], float] = {")
    lines += [f"    ({g}, {b}): {mse!r}," for (g, b), (_, _, mse) in books.items()]
    lines.append("}")
    lines.append(END)
    return "\n".join(lines)


def render_formats_py(books) -> str:
    text = FORMATS_PY.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + python_block(books) + tail


def render_header(registry, books) -> str:
    fam = {"float": "Family::kFloat", "block": "Family::kBlock", "turbo": "Family::kTurbo"}
    out = [
        "// Generated by tools/gen_formats.py from python/turbokv/core/formats.py. Do not edit.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace turbokv {",
        "",
        "enum class Family : int { kFloat = 0, kBlock = 1, kTurbo = 2 };",
        "",
        "struct FormatInfo {",
        "  const char* name;",
        "  int id;",
        "  Family family;",
        "  int bits;",
        "  int block;        // values per block (0: turbo, group set by head dim)",
        "  int block_bytes;  // bytes per block (0: turbo, see group_bytes)",
        "  bool has_min;",
        "};",
        "",
        f"inline constexpr int kNumFormats = {len(registry.FORMATS)};",
        "inline constexpr FormatInfo kFormats[kNumFormats] = {",
    ]
    for f in sorted(registry.FORMATS.values(), key=lambda f: f.id):
        has_min = "true" if f.has_min else "false"
        out.append(f'    {{"{f.name}", {f.id}, {fam[f.family]}, {f.bits}, {f.block}, {f.block_bytes}, {has_min}}},')
    out += ["};", ""]
    for f in sorted(registry.FORMATS.values(), key=lambda f: f.id):
        out.append(f"inline constexpr int kFmt_{f.name} = {f.id};")
    out.append("")
    for (g, b), (full, mids, _) in books.items():
        vals = ", ".join(f"{f32(v):.9e}f" for v in full)
        out.append(f"inline constexpr float kCodebook_g{g}_b{b}[{len(full)}] = {{{vals}}};")
        vals = ", ".join(f"{float(v):.9e}f" for v in mids)
        out.append(f"inline constexpr float kMidpoints_g{g}_b{b}[{len(mids)}] = {{{vals}}};")
    out += [
        "",
        "// Centroids and thresholds of a turbo codebook; nullptr when (g, bits) has none.",
        "inline const float* codebook(int g, int bits) {",
    ]
    for g, b in books:
        out.append(f"  if (g == {g} && bits == {b}) return kCodebook_g{g}_b{b};")
    out += ["  return nullptr;", "}", "", "inline const float* midpoints(int g, int bits) {"]
    for g, b in books:
        out.append(f"  if (g == {g} && bits == {b}) return kMidpoints_g{g}_b{b};")
    out += ["  return nullptr;", "}", "", "}  // namespace turbokv", ""]
    return "\n".join(out)


# A float literal as formats.py holds it (the repr of a Python float: 0.0565..., 1e-05).
FLOAT = re.compile(r"-?\d+(?:\.\d+(?:e[-+]?\d+)?|e[-+]?\d+)")


def same_up_to_solver_noise(old: str, new: str, rel: float = 1e-12) -> bool:
    """True when old and new differ at most in the last digits of their float64 literals.

    The Lloyd-Max fixed point is only as exact as scipy's incomplete beta function (~1e-14):
    scipy releases move the 14th-16th digits of the float64 centroids and MSEs. The header's
    float32 values, which the kernels and the reference use, must stay byte-identical (a
    rounding flip there is a real change); this tolerance covers the float64 text alone.
    """
    if FLOAT.sub("#", old) != FLOAT.sub("#", new):
        return False
    a, b = [float(x) for x in FLOAT.findall(old)], [float(x) for x in FLOAT.findall(new)]
    return all(abs(x - y) <= rel * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def is_current(path: Path, text: str) -> bool:
    if not path.exists():
        return False
    on_disk = path.read_text()
    return on_disk == text or (path == FORMATS_PY and same_up_to_solver_noise(on_disk, text))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = ap.parse_args(argv)
    registry = load_registry()
    books = codebooks(registry)
    outputs = {FORMATS_PY: render_formats_py(books), HEADER: render_header(registry, books)}
    stale = [p for p, text in outputs.items() if not is_current(p, text)]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run tools/gen_formats.py)")
        return 1 if stale else 0
    for p in stale:
        p.write_text(outputs[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
