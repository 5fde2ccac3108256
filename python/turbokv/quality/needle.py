"""Passkey retrieval (a needle in a haystack) with each cache against the f16 cache.

A five-digit pass key is hidden at a depth (0 = the start, 1 = the end) of a context of repeated
filler sentences and asked for at the end, the test of Mohtashami & Jaggi (2023) that long-context
work reports as a heatmap of depth x context length. Each trial is one forward pass over the prompt
and its answer through the cache under test (attention reads the quantized cache, as generation
does); the needle counts as found when every answer token is the model's top token, which is what
greedy decoding would write. The answer's log-likelihood is reported beside it: it moves before
the top token does.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import turbokv
from turbokv.hf.attention import cache_kwargs
from turbokv.quality.runner import CacheSpec, make_cache

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it later.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class Prompt:
    """One trial's token ids ``(n,)``: the prompt, then the answer's ``answer`` tokens at the end."""

    ids: torch.Tensor
    answer: int
    key: int


def make_prompt(tokenizer, length: int, depth: float, key: int) -> Prompt:
    """About ``length`` tokens (never more): intro, filler with the needle at ``depth`` of it, question, answer."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    intro, filler = encode(INTRO), encode(FILLER)
    needle, question, answer = encode(NEEDLE.format(key=key)), encode(QUESTION), encode(ANSWER.format(key=key))
    fixed = len(intro) + len(needle) + len(question) + len(answer)
    units = (length - fixed) // len(filler)
    if units < 1:
        raise ValueError(f"length: got {length}, expected at least {fixed + len(filler)} tokens for a needle prompt")
    at = round(depth * units)  # the needle goes between filler sentences
    ids = intro + filler * at + needle + filler * (units - at) + question + answer
    return Prompt(torch.tensor(ids), len(answer), key)


@torch.no_grad()
def score(model, prompt: Prompt, spec: CacheSpec) -> tuple[bool, float]:
    """(found: every answer token is the top token, the answer's log-likelihood) under ``spec``'s cache."""
    cache = make_cache(model, spec)
    ids = prompt.ids[None].to(model.device)
    # Only the answer's positions are scored: the head over the whole context (49k-token
    # vocabularies at 8k tokens: gigabytes of logits) is skipped where the model allows.
    keep = (
        {"logits_to_keep": prompt.answer + 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )
    with turbokv.patch(model):
        logits = model(ids, **cache_kwargs(model, cache), **keep).logits[0, -prompt.answer - 1 : -1].float()
    target = ids[0, -prompt.answer :]
    logp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
    return bool((logits.argmax(-1) == target).all()), logp


def run(
    model,
    tokenizer,
    specs: list[CacheSpec],
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """One row per (cache, length, depth): needles found of ``trials`` (the same keys for every cache)
    and the answers' mean log-likelihood."""
    rng = random.Random(seed)
    cells = [(n, dep, [rng.randrange(10000, 100000) for _ in range(trials)]) for n in lengths for dep in depths]
    rows = []
    work = tqdm(total=len(cells) * trials * len(specs), desc="needle", disable=not progress)
    for n, dep, keys in cells:
        prompts = [make_prompt(tokenizer, n, dep, key) for key in keys]
        for spec in specs:
            scores = [score(model, p, spec) for p in prompts]
            work.update(len(prompts))
            rows.append(
                {
                    "cache": spec.label,
                    "length": n,
                    "tokens": int(prompts[0].ids.numel()),
                    "depth": dep,
                    "found": sum(found for found, _ in scores),
                    "trials": trials,
                    "answer_logprob": sum(lp for _, lp in scores) / trials,
                }
            )
    work.close()
    return rows


def table(rows: list[dict]) -> str:
    """Per cache: found / trials for each length (rows) and depth (columns), then the cache's total."""
    out = []
    depths = sorted({r["depth"] for r in rows})
    for cache in dict.fromkeys(r["cache"] for r in rows):
        mine = [r for r in rows if r["cache"] == cache]
        found, total = sum(r["found"] for r in mine), sum(r["trials"] for r in mine)
        out.append(f"{cache}: {found}/{total} found")
        out.append("  length " + " ".join(f"{f'{100 * d:.0f}%':>6}" for d in depths) + "  mean answer log-likelihood")
        for n in sorted({r["length"] for r in mine}):
            line = [r for r in mine if r["length"] == n]
            cells = " ".join(f"{r['found']:>3}/{r['trials']:<2}" for r in sorted(line, key=lambda r: r["depth"]))
            mean = sum(r["answer_logprob"] for r in line) / len(line)
            out.append(f"  {n:>6} {cells}  {mean:9.4f}")
    return "\n".join(out)


def heatmap(rows: list[dict], path: Path) -> None:
    """One panel per cache: the share of needles found, depth (x) by context length (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    caches = list(dict.fromkeys(r["cache"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(caches), figsize=(3.2 * len(caches) + 1, 3.2), squeeze=False)
    for ax, cache in zip(axes[0], caches, strict=True):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for r in rows:
            if r["cache"] == cache:
                grid[lengths.index(r["length"]), depths.index(r["depth"])] = r["found"] / r["trials"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_title(cache, fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
    axes[0][0].set_ylabel("context tokens", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="found")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
