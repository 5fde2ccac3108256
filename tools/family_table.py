"""Print the table of model families in docs/models.md: what tests/test_families.py runs, run again here.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/family_table.py [model_type ...]

Builds every causal-LM family of the installed transformers small (tests/family_configs.py, the
test's own list and check) and prints one markdown row per family, in order, as each finishes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import family_configs  # noqa: E402

HEADER = "| family (model_type) | outcome with f16 + rotation TurboCache vs DynamicCache + SDPA |\n|---|---|"


def row(family: family_configs.Family, outcome: family_configs.Outcome) -> str:
    names = family.model_type + (f" (also {', '.join(family.aliases)})" if family.aliases else "")
    text = family_configs.describe(outcome)
    if outcome.kind == "wrong" and family.model_type in family_configs.NOT_COMPARABLE:
        text = "not comparable: " + family_configs.NOT_COMPARABLE[family.model_type]
    text = text.replace("|", "\\|")
    return f"| {names} | {text} |"


def main(names: list[str]) -> None:
    chosen = [f for f in family_configs.families() if not names or f.model_type in names]
    print(HEADER, flush=True)
    for family in chosen:
        print(row(family, family_configs.run(family)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
