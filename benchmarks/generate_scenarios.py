"""bench_generate's end-to-end scenarios, each timed through ``model.generate()``.

* padded:   a left-padded batch of unequal prompts, greedy ``--new-tokens``;
* turn:     a second chat turn: ``NEW`` tokens appended to a cache filled with ``CACHED`` random
            tokens, then ``--new-tokens`` decode steps;
* assisted: ``generate(assistant_model=draft)``, batch 1. The draft is a truncated copy of the
            model (its first ``--draft-layers`` layers, sharing its embeddings, final norm and
            lm_head), drafting a fixed ``--draft-tokens`` a round (no confidence cut-off), so the
            model verifies draft + 1 queries every round; it stops at the first round that reaches
            ``--new-tokens`` (a few more tokens may come: tok/s counts them). With random weights
            every layer rewrites the residual stream and a truncated copy almost never agrees with
            the whole model (0 % of drafts accepted), so the writes (o_proj, down_proj) of the
            layers past the draft's are scaled down, by a factor bisected until the draft's greedy
            token equals the model's on ``--draft-agreement`` of the positions of a random sequence
            (teacher-forced). The accepted-token rate printed is then measured in the run: it sets
            how many verification rounds the timed tokens take, and says nothing about a trained
            draft model.

Each row is one cache: a warm-up call on the same inputs with fewer new tokens (compilation,
CUDA-graph capture, kernel selection: three decode steps or draft rounds at least for a compiled
row), then a timed call on a fresh cache (a static one is reset: same buffers). A logits processor
records when each new token's logits are ready: the first marks the end of the prefill, the rest
the decode steps. The compiled graphs are counted around the timed call, and a row that compiled
anything there says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import transformers

import turbokv
from turbokv.hf.attention import cache_kwargs

PAD = 0


class Bench(Protocol):
    """What the scenarios take from bench_generate.Bench."""

    model: transformers.PreTrainedModel
    device: torch.device
    cuda: bool

    def sync(self) -> None: ...
    def reset_peak(self) -> None: ...
    def peak_gib(self) -> float: ...
    def make_cache(self, name: str, capacity: int) -> tuple[transformers.Cache, bool, bool]: ...
    def fill(self, cache: transformers.Cache, batch: int, ctx: int) -> None: ...


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--padded", default="8x1024-8192", help="padded: B x SHORTEST-LONGEST prompt tokens")
    ap.add_argument("--turn", default="16384+512", help="turn: CACHED+NEW tokens")
    ap.add_argument("--assisted", type=int, default=4096, help="assisted: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="generated tokens in each scenario")
    ap.add_argument("--draft-layers", type=int, default=2, help="assisted: the draft's layers (the model's first)")
    ap.add_argument("--draft-tokens", type=int, default=8, help="assisted: draft tokens a round")
    ap.add_argument(
        "--draft-agreement", type=float, default=0.7, help="assisted: calibrated draft agreement (0: no scaling)"
    )


class StepClock(transformers.LogitsProcessor):
    """Called by generate() once per new token, when its logits are ready: records the time."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.times = sync, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.sync()
        self.times.append(time.perf_counter())
        return scores


class CropLog:
    """Wraps ``cache.crop``: assisted generation calls it once a round with minus the rejected draft tokens.

    ``rounds``: (tokens before, argument, tokens after) per call.
    """

    def __init__(self, cache: transformers.Cache):
        self.cache, self.inner, self.rounds = cache, cache.crop, []
        cache.crop = self

    @classmethod
    def on(cls, cache: transformers.Cache) -> CropLog:
        """The log installed on ``cache`` (emptied), or a new one."""
        log = cache.__dict__.get("crop")
        if isinstance(log, cls):
            log.rounds.clear()
            return log
        return cls(cache)

    def __call__(self, tokens_to_remove: int) -> None:
        before = int(self.cache.get_seq_length())
        self.inner(tokens_to_remove)
        self.rounds.append((before, tokens_to_remove, int(self.cache.get_seq_length())))


@dataclass
class Row:
    """One cache's timings in a scenario (NaN where not measured), and what its timed call returned."""

    prefill_ms: float = math.nan
    step_ms: float = math.nan
    total_s: float = math.nan
    peak_gib: float = math.nan
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    result: object = None


def graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def measure(
    bench: Bench,
    name: str,
    capacity: int,
    prepare: Callable[[transformers.Cache], None],
    call: Callable[[transformers.Cache, int, StepClock], object],
    warm_tokens: int,
    new_tokens: int,
) -> Row:
    """Warm up with ``warm_tokens`` new tokens, then time ``new_tokens``; a failure is reported in the row."""
    row, t_case, cache = Row(), time.perf_counter(), None
    bench.reset_peak()
    try:
        cache, compiled, fused = bench.make_cache(name, capacity)
        if compiled:
            torch._dynamo.reset()  # each cache compiles afresh (no recompile limit, no stale guards)
        with turbokv.patch(bench.model) if fused else contextlib.nullcontext():
            prepare(cache)
            call(cache, warm_tokens, StepClock(bench.sync))
            if cache.is_compileable:
                cache.reset()  # the same buffers, which the captured CUDA graphs read
            else:
                cache = bench.make_cache(name, capacity)[0]
            prepare(cache)
            graphs, clock = graph_count(), StepClock(bench.sync)
            bench.sync()
            t0 = time.perf_counter()
            row.result = call(cache, new_tokens, clock)
            bench.sync()
            row.total_s = time.perf_counter() - t0
        row.prefill_ms = (clock.times[0] - t0) * 1e3 if clock.times else math.nan
        if len(clock.times) > 1:
            row.step_ms = (clock.times[-1] - clock.times[0]) * 1e3 / (len(clock.times) - 1)
        row.peak_gib = bench.peak_gib()
        if compiled is False and "compiled" in name:
            row.notes.append("eager on cpu")
        if graph_count() > graphs:
            row.notes.append(f"compiled {graph_count() - graphs} graph(s) while timed")
        if isinstance(cache, turbokv.TurboCache) and cache.f16_nbytes():
            row.notes.append(f"KV {cache.nbytes() / cache.f16_nbytes():.3f}x f16")
    except torch.OutOfMemoryError:
        row.notes.append("out of memory")
    except Exception as e:  # noqa: BLE001 - a cache that cannot run a scenario is a result, not a crash
        row.notes.append(f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
    finally:
        cache = None
        bench.reset_peak()
    row.wall_s = time.perf_counter() - t_case
    return row


def greedy(n: int) -> dict:
    """Exactly n greedy tokens (random weights emit EOS too)."""
    return {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "pad_token_id": PAD}


def random_ids(batch: int, length: int, model, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g).to(device)


def _fmt(x: float, spec: str) -> str:
    """``x`` in ``spec`` (width.precision f), or '-' in the same width for NaN."""
    return format("-", ">" + spec.split(".")[0]) if math.isnan(x) else format(x, spec)


def print_steps_header() -> None:
    print(
        f"{'cache':<34} {'prefill ms':>10} {'ms/step':>8} {'tok/s':>8} {'e2e tok/s':>9} {'peak GiB':>8} {'wall s':>6}"
    )


def print_steps_row(name: str, row: Row, batch: int, new_tokens: int) -> None:
    tok_s = batch * 1e3 / row.step_ms if row.step_ms == row.step_ms else math.nan
    e2e = batch * new_tokens / row.total_s if row.total_s == row.total_s else math.nan
    print(
        f"{name:<34} {_fmt(row.prefill_ms, '10.1f')} {_fmt(row.step_ms, '8.2f')} {_fmt(tok_s, '8.1f')} "
        f"{_fmt(e2e, '9.1f')} {_fmt(row.peak_gib, '8.1f')} {row.wall_s:>6.0f}  {'; '.join(row.notes)}",
        flush=True,
    )


def padded(bench: Bench, args, names: list[str]) -> None:
    batch, span = args.padded.split("x")
    batch, (shortest, longest) = int(batch), (int(x) for x in span.split("-"))
    lengths = torch.linspace(shortest, longest, batch).round().long()
    ids = random_ids(batch, longest, bench.model, bench.device)
    mask = (torch.arange(longest)[None] >= (longest - lengths)[:, None]).to(bench.device)
    ids = ids.masked_fill(~mask, PAD)
    print(f"padded: B = {batch}, prompts of {', '.join(map(str, lengths.tolist()))} tokens, left-padded to {longest}; ")
    print(f"        {args.new_tokens} greedy tokens; tok/s = B / step, e2e = B x new tokens / whole generate()")
    print_steps_header()

    def call(cache, n, clock):
        kw = cache_kwargs(bench.model, cache)
        lp = transformers.LogitsProcessorList([clock])
        return bench.model.generate(input_ids=ids, attention_mask=mask.long(), logits_processor=lp, **kw, **greedy(n))

    for name in names:
        row = measure(bench, name, longest + args.new_tokens + 8, lambda c: None, call, 4, args.new_tokens)
        print_steps_row(name, row, batch, args.new_tokens)


def turn(bench: Bench, args, names: list[str]) -> None:
    cached, new = (int(x) for x in args.turn.split("+"))
    ids = random_ids(1, cached + new, bench.model, bench.device)
    print(f"turn: {new} new tokens appended to a cache of {cached} random tokens (B = 1), then {args.new_tokens}")
    print("      greedy tokens; prefill = the new tokens' forward over the cache")
    print_steps_header()

    def call(cache, n, clock):
        kw = cache_kwargs(bench.model, cache)
        lp = transformers.LogitsProcessorList([clock])
        return bench.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=lp, **kw, **greedy(n)
        )

    for name in names:
        row = measure(
            bench,
            name,
            cached + new + args.new_tokens + 8,
            lambda c: bench.fill(c, 1, cached),
            call,
            4,
            args.new_tokens,
        )
        print_steps_row(name, row, 1, args.new_tokens)


class StopAt(transformers.StoppingCriteria):
    """Stops once the sequences hold ``length`` tokens. (generate()'s own length limit would shorten the last
    drafts, and each new draft length is a new shape for the compiled verification step.)"""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[1] >= self.length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def draft_model(model: transformers.PreTrainedModel, layers: int, tokens: int) -> transformers.PreTrainedModel:
    """The model's first ``layers`` layers (copied: patching the model must not patch the draft) on its
    embeddings, final norm and lm_head (shared); drafts ``tokens`` a round."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = layers
    with model.device:
        draft = type(model)(cfg).to(model.dtype).eval()
    draft.model.embed_tokens, draft.model.norm, draft.lm_head = (
        model.model.embed_tokens,
        model.model.norm,
        model.lm_head,
    )
    for mine, theirs in zip(draft.model.layers, model.model.layers, strict=False):
        mine.load_state_dict(theirs.state_dict())
    gc = draft.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = (
        tokens,
        "constant",
        0.0,
    )
    return draft


def calibrate(model: transformers.PreTrainedModel, draft: transformers.PreTrainedModel, target: float) -> tuple:
    """Scale the residual writes of the model's layers past the draft's until the draft's greedy token
    equals the model's on about ``target`` of 256 random positions. Returns (scale, agreement)."""
    ids = random_ids(1, 256, model, model.device)
    deep = model.model.layers[draft.config.num_hidden_layers :]
    current = 1.0

    def agreement(scale: float) -> float:
        nonlocal current
        for layer in deep:
            layer.self_attn.o_proj.weight.mul_(scale / current)
            layer.mlp.down_proj.weight.mul_(scale / current)
        current = scale
        return (model(ids, use_cache=False).logits.argmax(-1) == want).float().mean().item()

    with torch.no_grad():
        want = draft(ids, use_cache=False).logits.argmax(-1)
        lo, hi = math.log(1e-3), 0.0  # agreement falls as the scale grows
        for _ in range(10):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if agreement(math.exp(mid)) >= target else (lo, mid)
        return math.exp(lo), agreement(math.exp(lo))


def acceptance(rounds: list[tuple[int, int, int]], prompt: int) -> tuple[int, int, int]:
    """(drafted, accepted, rounds where crop left the wrong length) from a CropLog.

    A round forwards the last round's bonus token and the new draft, then crops the rejected tail.
    """
    drafted = accepted = wrong = 0
    after_last = None
    for before, remove, after in rounds:
        n = before - prompt if after_last is None else before - after_last - 1
        drafted, accepted = drafted + n, accepted + n + remove
        wrong += after != before + remove
        after_last = after
    return drafted, accepted, wrong


def assisted(bench: Bench, args, names: list[str]) -> None:
    prompt, layers = args.assisted, bench.model.config.num_hidden_layers
    draft_layers = min(args.draft_layers, layers - 1) or 1
    draft = draft_model(bench.model, draft_layers, args.draft_tokens)
    ids = random_ids(1, prompt, bench.model, bench.device)
    print(f"assisted: B = 1, prompt {prompt} tokens, >= {args.new_tokens} greedy tokens; draft = the first")
    print(f"          {draft_layers} of {layers} layers, {args.draft_tokens} tokens a round; ", end="")
    if args.draft_agreement > 0:
        scale, agree = calibrate(bench.model, draft, args.draft_agreement)
        print(f"the later layers' writes scaled by {scale:.3g} (greedy")
        print(f"          agreement {100 * agree:.0f}% on random tokens; the model stays scaled after this scenario)")
    else:
        print("no scaling (random weights: see generate_scenarios.py)")
    print(
        f"{'cache':<34} {'total ms':>9} {'tok/s':>8} {'rounds':>6} {'drafted':>7} {'accepted':>8} {'tok/round':>9} "
        f"{'peak GiB':>8} {'wall s':>6}"
    )

    headroom = 2 * args.draft_tokens + 2  # past the stop: every round drafts the full draft length

    def call(cache, n, clock):
        log = CropLog.on(cache)
        kw = cache_kwargs(bench.model, cache)
        kw |= {"stopping_criteria": transformers.StoppingCriteriaList([StopAt(prompt + n)]), **greedy(n + headroom)}
        out = bench.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), assistant_model=draft, **kw)
        return out.shape[1] - prompt, list(log.rounds)

    for name in names:
        if name.startswith("QuantizedCache"):
            print(
                f"{name:<34} not run: QuantizedCache cannot crop (is_croppable False), which assisted generation needs"
            )
            continue
        # Three rounds at least for a compiled row (compilation, CUDA-graph capture, replay), two for the others.
        warm = 3 * (args.draft_tokens + 1) if bench.cuda and "compiled" in name else args.draft_tokens + 2
        capacity = prompt + args.new_tokens + headroom + 8
        row = measure(bench, name, capacity, lambda c: None, call, warm, args.new_tokens)
        cols = ["-"] * 5
        if row.result is not None:
            generated, rounds = row.result
            drafted, accepted, wrong = acceptance(rounds, prompt)
            rate = f"{100 * accepted / drafted:.0f}%" if drafted else "-"
            cols = [f"{generated / row.total_s:.1f}", str(len(rounds)), str(drafted), rate]
            cols.append(f"{generated / len(rounds):.2f}" if rounds else "-")
            if wrong:
                row.notes.insert(0, f"crop left a wrong length in {wrong} round(s): the output is not to be trusted")
            if generated != accepted + len(rounds):
                row.notes.insert(0, f"{generated} tokens generated, {accepted + len(rounds)} counted")
        print(
            f"{name:<34} {_fmt(row.total_s * 1e3, '9.0f')} {cols[0]:>8} {cols[1]:>6} {cols[2]:>7} {cols[3]:>8} "
            f"{cols[4]:>9} {_fmt(row.peak_gib, '8.1f')} {row.wall_s:>6.0f}  {'; '.join(row.notes)}",
            flush=True,
        )


def run(scenario: str, bench: Bench, args, names: list[str]) -> None:
    {"padded": padded, "turn": turn, "assisted": assisted}[scenario](bench, args, names)
