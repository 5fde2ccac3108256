"""K format x V format x rotation sweeps: a CSV and heatmaps of mean KLD and PPL ratio."""

from __future__ import annotations

import csv
from pathlib import Path

from turbokv.quality.runner import CacheSpec, Reference, evaluate

COLUMNS = [
    "k",
    "v",
    "rotate",
    "k_bpv",
    "v_bpv",
    "ratio_vs_f16",
    "ppl",
    "ppl_ref",
    "kld_mean",
    "kld_stderr",
    "kld_p99",
    "same_top",
    "rms_dp",
    "tokens",
]


def run(model, chunks, ref: Reference, k_formats, v_formats, rotations, out_dir: Path, progress=True) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rot in rotations:
        for k in k_formats:
            for v in v_formats:
                s = evaluate(model, chunks, CacheSpec(k, v, rot, rot), ref, progress)
                kb, vb = s.k_bits, s.v_bits
                rows.append(
                    {
                        "k": k,
                        "v": v,
                        "rotate": rot,
                        "k_bpv": round(kb, 4),
                        "v_bpv": round(vb, 4),
                        "ratio_vs_f16": round(32 / (kb + vb), 3),
                        "ppl": s.ppl,
                        "ppl_ref": s.ppl_ref,
                        "kld_mean": s.kld_mean,
                        "kld_stderr": s.kld_stderr,
                        "kld_p99": s.kld_p99,
                        "same_top": s.same_top,
                        "rms_dp": s.rms_dp,
                        "tokens": s.tokens,
                    }
                )
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    heatmaps(rows, k_formats, v_formats, rotations, out_dir)
    points = [((r["k_bpv"] + r["v_bpv"]) / 2, r["kld_mean"], f"{r['k']}/{r['v']} {r['rotate']}") for r in rows]
    pareto(points, out_dir / "pareto.png")
    return rows


def pareto(points: list[tuple[float, float, str]], path: Path, title: str = "bits per value vs mean KLD") -> None:
    """Scatter of ``(bits per value, mean KLD, label)`` points, KLD on a log scale, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in points if p[1] > 0]
    fig, ax = plt.subplots(figsize=(7, 5))
    for bpv, kld, label in points:
        ax.scatter(bpv, kld, s=18, color="tab:red" if label.startswith("policy") else "tab:blue")
        ax.annotate(label, (bpv, kld), fontsize=6, xytext=(3, 2), textcoords="offset points")
    front, best = [], float("inf")
    for bpv, kld, _ in sorted(points):
        if kld < best:
            front.append((bpv, kld))
            best = kld
    if front:
        ax.plot(*zip(*front, strict=True), color="gray", lw=0.8, ls="--", label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per value (K and V, scales and offsets counted)")
    ax.set_ylabel("mean KLD vs f16 cache")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def heatmaps(rows, k_formats, v_formats, rotations, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for metric, title in (("kld_mean", "mean KLD vs f16 cache"), ("ppl_ratio", "PPL / PPL(f16 cache)")):
        fig, axes = plt.subplots(1, len(rotations), figsize=(4.5 * len(rotations), 4), squeeze=False)
        for ax, rot in zip(axes[0], rotations, strict=True):
            grid = np.full((len(k_formats), len(v_formats)), np.nan)
            for r in rows:
                if r["rotate"] == rot:
                    val = r["ppl"] / r["ppl_ref"] if metric == "ppl_ratio" else r[metric]
                    grid[k_formats.index(r["k"]), v_formats.index(r["v"])] = val
            im = ax.imshow(grid, cmap="viridis_r" if metric == "kld_mean" else "magma_r")
            ax.set_xticks(range(len(v_formats)), v_formats, rotation=45)
            ax.set_yticks(range(len(k_formats)), k_formats)
            ax.set_xlabel("V format")
            ax.set_ylabel("K format")
            ax.set_title(f"{title}\nrotation {rot}")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=7, color="w")
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        fig.savefig(out_dir / f"heatmap_{metric}.png", dpi=120)
        plt.close(fig)
