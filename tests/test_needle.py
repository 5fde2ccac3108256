"""The passkey retrieval test (turbokv needle): its prompts, its scoring and its outputs, on a tiny
random model with a character tokenizer (the real model's run is in test_eval_cli.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hf_models import build

from turbokv.quality import needle
from turbokv.quality.runner import F16, CacheSpec


class CharTokenizer:
    """One token per character: printable ASCII as ids 1..95, a newline as 95 (the model's vocabulary is 96)."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return SimpleNamespace(input_ids=[95 if c == "\n" else ord(c) - 31 for c in text])

    def decode(self, ids) -> str:
        return "".join("\n" if i == 95 else chr(i + 31) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("length", [400, 1000])
def test_prompt_holds_the_needle_at_its_depth(depth, length):
    tok = CharTokenizer()
    p = needle.make_prompt(tok, length, depth, 12345)
    text = tok.decode(p.ids.tolist())
    assert length - len(needle.FILLER) < p.ids.numel() <= length
    assert text.startswith(needle.INTRO) and text.endswith(needle.QUESTION + " 12345")
    assert p.answer == len(" 12345") and text.count("12345") == 3
    at = text.index(needle.NEEDLE.format(key=12345))
    span = len(text) - len(needle.INTRO) - len(needle.NEEDLE.format(key=12345)) - len(needle.QUESTION) - p.answer
    assert abs((at - len(needle.INTRO)) / span - depth) <= len(needle.FILLER) / span  # a sentence at most


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="length: got 100, expected at least"):
        needle.make_prompt(CharTokenizer(), 100, 0.5, 12345)


def test_run_scores_every_cell_with_the_same_keys(tmp_path):
    """Rows per cache, length and depth; the f16 cache's score is its own forward's (found when the
    answer is the top token), a quantized cache differs in log-likelihood, and the outputs write."""
    model = build("llama64")
    tok = CharTokenizer()
    specs = [F16, CacheSpec("turbo2", "turbo2")]
    rows = needle.run(model, tok, specs, [400, 500], [0.0, 1.0], trials=2, progress=False)
    assert len(rows) == 2 * 2 * 2
    assert {(r["cache"], r["length"], r["depth"]) for r in rows} == {
        (s.label, n, d) for s in specs for n in (400, 500) for d in (0.0, 1.0)
    }
    assert all(0 <= r["found"] <= r["trials"] == 2 and r["answer_logprob"] < 0 for r in rows)
    f16 = [r for r in rows if r["cache"] == F16.label]
    turbo = [r for r in rows if r["cache"] != F16.label]
    assert any(a["answer_logprob"] != b["answer_logprob"] for a, b in zip(f16, turbo, strict=True))
    again = needle.run(model, tok, [F16], [400, 500], [0.0, 1.0], trials=2, progress=False)
    assert again == f16  # same seed, same keys, same scores

    # The score is the model's own: the answer's tokens ranked first by a plain forward pass.
    p = needle.make_prompt(tok, 400, 0.0, 54321)
    with torch.no_grad():
        logits = model(p.ids[None]).logits[0, -p.answer - 1 : -1]
    found, logp = needle.score(model, p, F16)
    top2 = logits.float().topk(2, -1).values
    if bool((top2[:, 0] - top2[:, 1] > 1e-2).all()):  # no near tie that f16 storage of K/V could flip
        assert found == bool((logits.argmax(-1) == p.ids[-p.answer :]).all())
    want = torch.log_softmax(logits.float(), -1).gather(-1, p.ids[-p.answer :, None]).sum().item()
    assert logp == pytest.approx(want, rel=5e-3)  # K and V stored in f16 by the f16 cache

    text = needle.table(rows)
    assert text.count(" found") == 2 and "   400 " in text and "100%" in text
    needle.heatmap(rows, tmp_path / "n.png")
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(rows)  # what the CLI writes
