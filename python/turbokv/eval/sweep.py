"""K format x V format x rotation sweeps: a CSV and heatmaps of mean KLD and PPL ratio."""

from __future__ import annotations

import csv
from pathlib import Path

from turbokv import formats
from turbokv.eval.runner import CacheSpec, Reference, evaluate

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
    head_dim = getattr(model.config, "head_dim", model.config.hidden_size // model.config.num_attention_heads)
    rows = []
    for rot in rotations:
        for k in k_formats:
            for v in v_formats:
                s = evaluate(model, chunks, CacheSpec(k, v, rot, rot), ref, progress)
                kb, vb = formats.bits_per_value(k, head_dim), formats.bits_per_value(v, head_dim)
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
    return rows


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
