"""Chunked evaluation of a compressed cache against the f16 cache, and sweeps over formats.

Like ``llama-perplexity --kl-divergence``: the text is cut into chunks of ``ctx`` tokens;
each chunk runs through the model once with the cache under test (attention reads the
quantized cache, as generation would: ``turbokv.patch`` + ``TurboCache``); the second half
of each chunk is scored. Reference log-probabilities come from the same model with an f16
cache, computed once and stored as safetensors (fp16) for reuse.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import turbokv
from turbokv.hf.attention import cache_kwargs
from turbokv.quality.metrics import Summary, summarize, token_stats
from turbokv.quality.model import CACHE_DIR

WIKITEXT = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"


def default_text_path() -> Path:
    """$TURBOKV_TEXT, else WikiText-2 test from the shared folder beside the project (or the working directory)."""
    if os.environ.get("TURBOKV_TEXT"):
        return Path(os.environ["TURBOKV_TEXT"])
    repo = Path(__file__).resolve().parents[3]
    for base in (Path.cwd().parent, Path.cwd(), repo.parent, repo):
        if (base / WIKITEXT).exists():
            return base / WIKITEXT
    raise FileNotFoundError(f"text: no {WIKITEXT} beside the project; pass --text FILE")


@dataclass(frozen=True)
class CacheSpec:
    """The cache under test: formats and rotation policy per side."""

    k: str
    v: str
    rotate_k: str = "auto"
    rotate_v: str = "auto"
    policy: str | None = None  # a policy file (turbokv calibrate): its per-layer formats replace k / v
    sink_tokens: int = 0  # exact token windows (turbokv.hf.exact_tokens); a policy file carries its own
    recent_tokens: int = 0

    @property
    def label(self) -> str:
        if self.policy:
            return f"policy {Path(self.policy).name}"
        rot = self.rotate_k if self.rotate_k == self.rotate_v else f"{self.rotate_k}/{self.rotate_v}"
        windows = f", {self.sink_tokens} + {self.recent_tokens} exact" if self.sink_tokens or self.recent_tokens else ""
        return f"K {self.k} / V {self.v} (rotation {rot}{windows})"


F16 = CacheSpec("f16", "f16", "off", "off")


def make_chunks(tokenizer, text: str, ctx: int, n_chunks: int) -> torch.Tensor:
    """``(n, ctx)`` token ids: consecutive chunks from the start of the text."""
    return chunk_ids(tokenizer(text, return_tensors="pt").input_ids[0], ctx, n_chunks)


def chunk_ids(ids: torch.Tensor, ctx: int, n_chunks: int) -> torch.Tensor:
    """``(n, ctx)`` consecutive chunks from the start of the token ids ``ids (T,)``; ``n_chunks <= 0``:
    as many as they hold."""
    available = ids.numel() // ctx
    if available == 0:
        raise ValueError(f"text: got {ids.numel()} tokens, expected at least ctx = {ctx}")
    n = available if n_chunks <= 0 else min(n_chunks, available)
    return ids[: n * ctx].reshape(n, ctx)


def spread_chunks(ids: torch.Tensor, ctx: int, n_chunks: int) -> torch.Tensor:
    """``(n, ctx)`` chunks of the token ids ``ids (T,)`` spread evenly over them, the first at the start
    and the last at the end (``n = min(n_chunks, T // ctx)``): a sample of the whole text, not of its
    first pages."""
    available = ids.numel() // ctx
    if available == 0:
        raise ValueError(f"text: got {ids.numel()} tokens, expected at least ctx = {ctx}")
    n = min(n_chunks, available)
    at = [round(i * (available - 1) / max(n - 1, 1)) for i in range(n)]
    return ids[: available * ctx].reshape(available, ctx)[at]


def make_cache(model, spec: CacheSpec) -> turbokv.TurboCache:
    """An empty TurboCache for ``model`` as ``spec`` describes it (its policy file, or formats and windows)."""
    if spec.policy:
        return turbokv.TurboCache.from_policy(model.config, spec.policy)
    return turbokv.TurboCache.for_config(
        model.config,
        k=spec.k,
        v=spec.v,
        rotate_k=spec.rotate_k,
        rotate_v=spec.rotate_v,
        sink_tokens=spec.sink_tokens,
        recent_tokens=spec.recent_tokens,
    )


@torch.no_grad()
def scored_logprobs(model, chunk: torch.Tensor, spec: CacheSpec) -> tuple[torch.Tensor, turbokv.TurboCache]:
    """Log-probabilities ``(ctx - ctx//2, vocab)`` predicting the second half of ``chunk``, and the
    cache that held the chunk."""
    cache = make_cache(model, spec)
    with turbokv.patch(model):
        logits = model(chunk[None].to(model.device), **cache_kwargs(model, cache)).logits[0]
    first = chunk.numel() // 2
    return torch.log_softmax(logits[first - 1 : -1].float(), dim=-1).cpu(), cache


class Reference:
    """f16-cache log-probabilities per chunk, stored once in a safetensors file.

    The file is keyed by everything that determines it: the chunks (their shape, so ``--ctx`` and
    ``--chunks`` over the same tokens differ, and their tokens), the model's weights (a hash of every
    parameter and buffer), its dtype and device type, and ``model_id``. A file that does not read back
    whole (a chunk missing, a wrong shape, bytes that do not match their hash, another key) is computed
    again, not trusted.
    """

    VERSION = 2

    def __init__(self, model, chunks: torch.Tensor, model_id: str):
        h = hashlib.sha256(f"turbokv-reference-{self.VERSION}|{model_id}|{tuple(chunks.shape)}".encode())
        h.update(chunks.numpy().tobytes())
        h.update(model_fingerprint(model).encode())
        self.key = h.hexdigest()
        self.path = CACHE_DIR / "reference" / f"{self.key[:16]}.safetensors"
        self.model, self.chunks = model, chunks

    def _valid(self) -> bool:
        scored = self.chunks.shape[1] - self.chunks.shape[1] // 2
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key or len(list(f.keys())) != len(self.chunks):
                    return False
                tensors = [f.get_tensor(f"chunk_{i}") for i in range(len(self.chunks))]
        except Exception:  # any unreadable file: computed again
            return False
        if any(t.dim() != 2 or t.shape[0] != scored for t in tensors):
            return False
        return meta.get("data") == _digest(tensors)

    def ensure(self, progress: bool = True) -> None:
        if self.path.exists() and self._valid():
            return
        tensors = {}
        for i in tqdm(range(len(self.chunks)), desc="f16 reference", disable=not progress):
            tensors[f"chunk_{i}"] = scored_logprobs(self.model, self.chunks[i], F16)[0].half()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.path), metadata={"key": self.key, "data": _digest(list(tensors.values()))})

    def get(self, i: int) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(f"chunk_{i}").float()


def _digest(tensors: list[torch.Tensor]) -> str:
    """A hash of the tensors' bytes, in order: a flipped bit anywhere in the data changes it."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """A hash of the model's parameters and buffers (names, shapes, dtypes, bytes) and device type."""
    h = hashlib.sha256()
    seen = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{t.device.type}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate(model, chunks: torch.Tensor, spec: CacheSpec, ref: Reference, progress: bool = True) -> Summary:
    """Statistics of ``spec``'s cache against the f16 cache over ``chunks``, with its bits per value
    at the chunks' length."""
    ref.ensure(progress)
    first = chunks.shape[1] // 2
    stats, bits = [], (math.nan, math.nan)
    for i in tqdm(range(len(chunks)), desc=spec.label, disable=not progress):
        test, cache = scored_logprobs(model, chunks[i], spec)
        bits = cache.bits_per_value()  # the same for every chunk: one length
        stats.append(token_stats(ref.get(i), test, chunks[i, first:]))
    return replace(summarize(stats), k_bits=bits[0], v_bits=bits[1])
