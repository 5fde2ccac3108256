"""Draw the README's two charts from the current result tables in benchmarks/results/.

    .venv/bin/python tools/readme_charts.py

docs/speed.png: decode attention against the faster of SDPA's flash and cuDNN backends on the
fp16 cache, per K / V format pair (attention_decode_pairs.md). docs/quality.png: bits per value
against mean KLD on WikiText-2 for each cache setting, one series per context length
(quality_*.md, as benchmarks/eval_table.py writes them).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(1, 131072, "1 x 128k tokens"), (8, 32768, "8 x 32k tokens")]


def decode_speedups(path: Path) -> dict[tuple[int, int], dict[str, float]]:
    """``{(batch, context): {pair: x SDPA}}`` from bench_attention's printed table in ``path``."""
    row = re.compile(r"^\s*(\d+)\s+(\d+)\s+turbokv (\S+)\s+[\d.]+\s+[\d.]+\s+\d+\s+[\d.]+%\s+([\d.]+)x")
    out: dict[tuple[int, int], dict[str, float]] = {}
    for line in path.read_text().splitlines():
        m = row.match(line)
        if m:
            out.setdefault((int(m[1]), int(m[2])), {})[m[3]] = float(m[4])
    return out


def quality_rows(path: Path) -> list[tuple[str, float, float]]:
    """``(label, bits per value, mean KLD)`` of each row of eval_table.py's markdown table in ``path``."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not re.fullmatch(r"[\d.]+", cells[3]) or cells[0] == "f16":
            continue
        k, v, rot = cells[0], cells[1], cells[2]
        if k.endswith(".json"):
            label = "policy " + k.removesuffix(".json").rsplit("-", 1)[-1]
        else:
            label = (k if k == v else f"{k}/{v}") + (" no rot" if rot == "off" else "")
        rows.append((label, float(cells[3]), float(cells[6].split()[0])))
    return rows


def speed_chart(out: Path) -> None:
    data = decode_speedups(RESULTS / "attention_decode_pairs.md")
    pairs = sorted(data[SHAPES[0][:2]], key=lambda p: -data[SHAPES[0][:2]][p])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.4
    for i, (b, t, label) in enumerate(SHAPES):
        xs = [j + (i - 0.5) * width for j in range(len(pairs))]
        ax.bar(xs, [data[(b, t)].get(p, 0) for p in pairs], width, label=label)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.text(len(pairs) - 0.5, 1.02, "SDPA on the fp16 cache", ha="right", va="bottom", fontsize=7)
    ax.set_xticks(range(len(pairs)), pairs, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("decode speed vs best SDPA")
    ax.set_title("Decode attention on the packed cache, H200 (K / V formats; 32 q / 8 KV heads, d 128)", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def quality_chart(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    points: dict[str, list[tuple[float, float]]] = {}  # each setting at each length, shortest first
    for path in sorted(RESULTS.glob("quality_*.md"), key=lambda p: int(re.sub(r"\D", "", p.stem))):
        rows = quality_rows(path)
        tokens = int(re.sub(r"\D", "", path.stem))
        ax.scatter([r[1] for r in rows], [r[2] for r in rows], label=f"{tokens} tokens", s=18, zorder=3)
        for label, bits, kld in rows:
            points.setdefault(label, []).append((bits, kld))
    for label, xy in points.items():
        ax.plot([p[0] for p in xy], [p[1] for p in xy], color="gray", lw=0.6, zorder=2)
        ends = [xy[0]] if abs(xy[0][0] - xy[-1][0]) < 0.05 else [xy[0], xy[-1]]  # name the shortest and longest
        for bits, kld in ends:
            ax.annotate(label, (bits, kld), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per K/V value (at the context length)")
    ax.set_ylabel("mean KLD against the f16 cache")
    ax.set_title("SmolLM2-135M on WikiText-2: lower left is better", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    speed_chart(ROOT / "docs" / "speed.png")
    quality_chart(ROOT / "docs" / "quality.png")
    print("wrote docs/speed.png and docs/quality.png")
