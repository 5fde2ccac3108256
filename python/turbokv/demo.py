"""The main job: generate with the real default model under f16 and compressed caches, and compare.

For each cache: bytes and ratio to f16, decode tokens/s, and — teacher-forcing the f16
run's tokens through the compressed cache — mean KLD and same-top-token rate against the
f16 run, plus the first line of generated text.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import turbokv
from turbokv.hf.attention import cache_kwargs
from turbokv.quality import model as model_mod
from turbokv.quality.metrics import summarize, token_stats
from turbokv.quality.runner import CacheSpec, make_cache

PROMPT = (
    "The history of the printing press begins in the fifteenth century. Johannes Gutenberg, a goldsmith "
    "from Mainz, combined movable metal type, oil-based ink and a wooden screw press. Within fifty years"
)
CACHES = [CacheSpec("f16", "f16", "off", "off"), CacheSpec("turbo3", "turbo3"), CacheSpec("q4_0", "q4_0", "on", "on")]
# The recommended settings for the default model at about 3.5 and 4.5 bits per value: policies from
# `turbokv calibrate --bits 3.5,4.5` (per-layer formats, key offsets, 1 sink + 16 recent tokens exact),
# calibrated on Python's pydoc text; another model needs its own (docs/evaluation.md: calibrating your own model).
POLICIES = Path(__file__).parent / "hf" / "policies"
DEFAULT_POLICIES = [CacheSpec("policy", "policy", policy=str(POLICIES / f"smollm2-135m-{b}.json")) for b in (3.5, 4.5)]


@torch.no_grad()
def generate(model, ids, spec: CacheSpec, new_tokens: int):
    cache = make_cache(model, spec)
    with turbokv.patch(model):
        t0 = time.perf_counter()
        out = model.generate(
            ids, **cache_kwargs(model, cache), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
        )
        dt = time.perf_counter() - t0
    return out, cache, dt


@torch.no_grad()
def logprobs_on(model, seq, spec: CacheSpec, start: int) -> torch.Tensor:
    cache = make_cache(model, spec)
    with turbokv.patch(model):
        logits = model(seq, **cache_kwargs(model, cache)).logits[0]
    return torch.log_softmax(logits[start - 1 : -1].float(), -1)


def main(
    new_tokens: int = 200, model_path: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = model_mod.load(model_path, dtype, device)
    print(f"model: {model_mod.describe(model)} on {device}, {dtype} (loaded in {time.perf_counter() - t0:.0f} s)")
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(model.device)
    start = ids.shape[1]
    runs = {}
    caches = CACHES + (DEFAULT_POLICIES if model_path is None else [])
    for spec in caches:
        out, cache, dt = generate(model, ids, spec, new_tokens)
        runs[spec] = (out, cache, dt)
    ref_seq = runs[CACHES[0]][0]
    ref_logp = logprobs_on(model, ref_seq, CACHES[0], start)
    w = max(len(spec.label) for spec in caches)  # the label column fits the longest label
    print(
        f"\n{'cache':<{w}} {'KV bytes':>10} {'vs f16':>7} {'bits K/V':>11} {'tok/s':>7} {'mean KLD':>9} {'same top':>9}"
    )
    texts = []
    for spec, (out, cache, dt) in runs.items():
        test = logprobs_on(model, ref_seq, spec, start)
        s = summarize([token_stats(ref_logp, test, ref_seq[0, start:])])
        ratio = cache.nbytes() / cache.f16_nbytes()
        kb, vb = cache.bits_per_value()
        print(
            f"{spec.label:<{w}} {cache.nbytes():>10} {ratio:>6.3f}x {kb:>5.2f}/{vb:<5.2f} {new_tokens / dt:>7.1f} "
            f"{s.kld_mean:>9.5f} {100 * s.same_top:>8.1f}%"
        )
        texts.append((spec.label, tok.decode(out[0, start:], skip_special_tokens=True)))
    print("\nprompt: " + PROMPT)
    for label, text in texts:
        line = " ".join(text.split())[:160]
        print(f"\n[{label}]\n  {line} ...")
