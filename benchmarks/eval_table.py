#!/usr/bin/env python3
"""The quality tables (benchmarks/results/quality_*.md): the default model on WikiText-2, a row per cache setting.

Rows: f16; q8_0, q5_0, q4_1, q4_0 with and without rotation; turbo4, turbo3, turbo2;
q8_0-K with turbo4-V and turbo3-V. Prints a markdown table (rows are flushed as they
finish) with bits per value, compression ratio, PPL, mean KLD and same-top rate.
Rows for calibrated policies (``--policy FILE``, repeatable) count their bits honestly: per-layer
formats and the key offsets' storage at the evaluated length. ``--plot FILE`` draws the Pareto plot.
``--short``: only the rows behind the targets (q4_0 rotated, turbo4, turbo3, q8_0-K / turbo-V), for long
contexts. ``--device`` / ``--dtype`` as the CLI's.
Usage: python benchmarks/eval_table.py [--ctx 512] [--chunks 40] [--out table.md] [--policy P.json] [--plot p.png]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from turbokv.quality import model as model_mod
from turbokv.quality.runner import CacheSpec, Reference, default_text_path, evaluate, make_chunks
from turbokv.quality.sweep import pareto

# The rows behind the targets come first (q4_0 with/without rotation, turbo4, turbo3).
ROWS = [CacheSpec("f16", "f16", "off", "off"), CacheSpec("q8_0", "q8_0", "off", "off"), CacheSpec("q8_0", "q8_0")]
ROWS += [CacheSpec("q4_0", "q4_0", "off", "off"), CacheSpec("q4_0", "q4_0")]
ROWS += [CacheSpec(f, f) for f in ("turbo4", "turbo3", "turbo2")]
ROWS += [CacheSpec("q8_0", "turbo4"), CacheSpec("q8_0", "turbo3")]
SHORT = [ROWS[0], ROWS[4], ROWS[5], ROWS[6], ROWS[8], ROWS[9]]
for _f in ("q5_0", "q4_1"):
    ROWS += [CacheSpec(_f, _f, "off", "off"), CacheSpec(_f, _f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--out", default=None, help="also append the table to this file")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N rows (already measured)")
    ap.add_argument("--policy", action="append", default=[], help="also a row for this policy file (repeatable)")
    ap.add_argument("--only-policies", action="store_true", help="no fixed-format rows")
    ap.add_argument("--plot", default=None, help="write the Pareto plot (bits per value vs mean KLD) here")
    ap.add_argument("--short", action="store_true", help="only the rows behind the targets (long contexts)")
    ap.add_argument("--device", default=model_mod.default_device())
    ap.add_argument("--dtype", choices=sorted(model_mod.DTYPES), default="f32")
    args = ap.parse_args()
    model, tok = model_mod.load(None, model_mod.DTYPES[args.dtype], args.device)
    chunks = make_chunks(tok, default_text_path().read_text(), args.ctx, args.chunks)
    ref = Reference(model, chunks, "default")
    lines = [
        f"{model_mod.describe(model)} on {model.device} ({model.dtype}); WikiText-2 test, {len(chunks)} chunks "
        f"x {args.ctx} tokens (second halves scored); {datetime.date.today()}; bits per value counted at {args.ctx}",
        "",
        "| K | V | rotation | bits/value K+V | vs f16 | PPL | mean KLD | same top |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out = Path(args.out) if args.out else None
    for line in lines:
        print(line, flush=True)
    if out:
        out.write_text("\n".join(lines) + "\n")
    rows = [] if args.only_policies else (SHORT if args.short else ROWS)[args.skip :]
    rows = rows + [CacheSpec("policy", "policy", policy=p) for p in args.policy]
    points = []
    for spec in rows:
        s = evaluate(model, chunks, spec, ref, progress=False)
        bpv = s.bits  # as stored at this length: formats, offsets, windows
        k, v = (Path(spec.policy).name,) * 2 if spec.policy else (spec.k, spec.v)
        points.append((bpv, s.kld_mean, f"policy {k}" if spec.policy else f"{k}/{v} {spec.rotate_k}"))
        row = (
            f"| {k} | {v} | {spec.rotate_k} | {bpv:.3f} | {16 / bpv:.2f}x | {s.ppl:.4f} | "
            f"{s.kld_mean:.5f} ± {s.kld_stderr:.5f} | {100 * s.same_top:.2f} % |"
        )
        print(row, flush=True)
        if out:
            with out.open("a") as f:
                f.write(row + "\n")
    if args.plot:
        pareto(points, Path(args.plot), f"{model_mod.describe(model)}, {len(chunks)} x {args.ctx} tokens")


if __name__ == "__main__":
    main()
