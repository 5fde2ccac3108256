"""Calibration: per layer and side formats under a bits budget, from measured sensitivity (KVTuner-style).

``calibrate(model, ids, bits)`` on calibration text (never the evaluation text):

1. one f16 forward captures every attention layer's post-RoPE K/V: the key offsets are their
   mean per KV head (exact shifts, see turbokv.hf.policy), and the per-format quantization error of
   each layer and side is measured on them;
2. sensitivity: the model's KL divergence from its f16-cache output when ONE layer/side is
   quantized (the rest f16). ``measure="all"`` runs that for every candidate format;
   ``measure="probe"`` (the default, ~6x cheaper) runs it for one probe format and scales it to the
   others by that layer/side's own quantization-error ratio (KLD grows with the error energy);
3. a knapsack over row bytes picks one format per layer and side with the least summed
   predicted KLD whose mean bits per value (scales and offsets at ``tokens`` included) fit ``bits``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from turbokv.core import formats, ops
from turbokv.core.rotation import auto_rotation
from turbokv.hf.policy import LayerPolicy, Policy

DEFAULT_FORMATS = ("turbo2", "turbo3", "turbo4", "q4_0", "q5_0", "q8_0")
PROBE = "turbo3"


def calibration_text() -> str:
    """English prose that ships with every CPython: the Python reference topics of pydoc (not Wikipedia)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _cache_kwargs(model, cache) -> dict:
    from turbokv.hf.attention import cache_kwargs

    return cache_kwargs(model, cache)


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, cache, patched: bool = False) -> torch.Tensor:
    """``(B, T, vocab)`` log-probabilities of ``ids`` ``(B, T)`` run through ``cache``: unpatched
    (dequantized K/V, any model), or patched (the fused path: each query's own exact window)."""
    from turbokv.hf.attention import patch

    with patch(model) if patched else contextlib.nullcontext():
        logits = model(ids.to(model.device), **_cache_kwargs(model, cache)).logits
    return torch.log_softmax(logits.float(), dim=-1)


def _patchable(model) -> bool:
    """Whether turbokv.patch accepts ``model`` (its refusals name what it does not support)."""
    from turbokv.hf.attention import patch

    try:
        with patch(model):
            return True
    except (NotImplementedError, ValueError, TypeError):
        return False


def _kld(ref: torch.Tensor, test: torch.Tensor) -> float:
    return (ref.exp() * (ref - test)).sum(-1).clamp_min(0).mean().item()


@torch.no_grad()
def capture(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``(B, Hkv, T, d)`` float32 K and V of every attention layer for ``ids`` ``(B, T)``."""
    from turbokv.hf.cache import TurboCache

    cache = TurboCache.for_config(model.config, k="f16", v="f16", rotate_k="off", rotate_v="off")
    captured = {}
    layers = cache.layers

    class _Tap:  # records what each attention layer appends (its update's arguments)
        def __init__(self, i, layer):
            self.i, self.layer, self.update = i, layer, layer.update

        def __call__(self, k, v, *a, **kw):
            captured[self.i] = (k.float().cpu(), v.float().cpu())
            return self.update(k, v, *a, **kw)

    for i, layer in enumerate(layers):
        if hasattr(layer, "k_spec"):
            layer.update = _Tap(i, layer)
    model(ids.to(model.device), **_cache_kwargs(model, cache))
    return captured


def _error(x: torch.Tensor, fmt: str, side: str) -> float:
    """Squared error of quantizing rows ``x`` with ``fmt`` and its auto rotation."""
    d = x.shape[-1]
    rot = auto_rotation(fmt, d, side)
    y = ops.dequantize(ops.quantize(x, fmt, rot), fmt, d, rot, dtype=torch.float32)
    return (y - x).pow(2).sum().item()


def sensitivity(
    model,
    ids: torch.Tensor,
    fmts: Sequence[str],
    k_offsets: dict[int, torch.Tensor] | None,
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]],
    measure: str = "probe",
    progress: bool = False,
    windows: tuple[int, int] = (0, 0),
) -> dict[tuple[int, str], dict[str, float]]:
    """Predicted KLD ``{(layer, "k"|"v"): {format: kld}}`` when only that layer/side is quantized.

    ``windows``: (sink, recent) exact tokens the policy will keep; with them (and a model patch()
    accepts) each measurement runs the fused path, so a query's own recent keys are exact as in use.
    """
    from tqdm import tqdm

    from turbokv.hf.cache import TurboCache

    if measure not in ("probe", "all"):
        raise ValueError(f"measure: got {measure!r}, expected 'probe' or 'all'")
    sink, recent = windows
    patched = bool(sink or recent) and _patchable(model)
    kw = dict(sink_tokens=sink, recent_tokens=recent) if patched else {}
    ref = _logprobs(model, ids, TurboCache.for_config(model.config, k="f16", v="f16"), patched)
    probe = PROBE if PROBE in fmts else fmts[0]
    run = list(fmts) if measure == "all" else [probe]
    table = {}
    slots = [(i, side) for i in sorted(captured) for side in ("k", "v")]
    for i, side in tqdm(slots, desc="sensitivity", disable=not progress):
        row = {}
        for f in run:
            pair = (f, "f16") if side == "k" else ("f16", f)
            cache = TurboCache.for_config(model.config, k="f16", v="f16", overrides={i: pair}, **kw)
            if side == "k" and k_offsets is not None:
                cache.layers[i].set_k_offset(k_offsets[i])
            row[f] = _kld(ref, _logprobs(model, ids, cache, patched))
        if measure == "probe":
            x = captured[i][0] if side == "k" else captured[i][1]
            if side == "k" and k_offsets is not None:
                x = x - k_offsets[i][None, :, None, :]
            errors = {f: _error(x, f, side) for f in fmts}
            base = max(errors[probe], 1e-30)
            row = {f: row[probe] * errors[f] / base for f in fmts}
        table[(i, side)] = row
    return table


def choose(
    table: dict[tuple[int, str], dict[str, float]], head_dim: int, bits: float, overhead_bits: float = 0.0
) -> tuple[dict[tuple[int, str], str], float]:
    """Formats per slot with the least summed predicted KLD whose mean bits per value, plus
    ``overhead_bits``, is at most ``bits``. Costs in row bytes (integers): an exact knapsack."""
    slots = sorted(table)
    budget = int((bits - overhead_bits) * head_dim / 8 * len(slots) + 1e-9)
    cheapest = sum(min(formats.row_bytes(f, head_dim) for f in table[s]) for s in slots)
    if budget < cheapest:
        lowest = 8 * cheapest / (head_dim * len(slots)) + overhead_bits
        raise ValueError(f"bits: got {bits}, expected at least {lowest:.3f} (every slot at its cheapest format)")
    inf = float("inf")
    best = [0.0] + [inf] * budget
    choices = []
    for s in slots:
        nxt, pick = [inf] * (budget + 1), [None] * (budget + 1)
        for f, kld in table[s].items():
            cost = formats.row_bytes(f, head_dim)
            for b in range(budget + 1 - cost):
                if best[b] + kld < nxt[b + cost]:
                    nxt[b + cost], pick[b + cost] = best[b] + kld, (f, b)
        best = nxt
        choices.append(pick)
    b = min(range(budget + 1), key=best.__getitem__)
    total = best[b]
    chosen = {}
    for s, pick in zip(reversed(slots), reversed(choices), strict=True):
        chosen[s], b = pick[b]
    return chosen, total


def check_args(
    bits: float | None = None,
    tokens: int | None = None,
    fmts: Sequence[str] | None = None,
    sink_tokens: int = 0,
    recent_tokens: int = 0,
    measure: str = "probe",
) -> None:
    """``ValueError`` naming the argument for what no calibration can use (checked before any forward
    pass): bits a positive finite number, tokens a positive int, formats known and at least one,
    windows ints >= 0 that leave packed tokens at ``tokens``."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int | float) or not 0 < bits < 64):
        raise ValueError(f"bits: got {bits!r}, expected a number of bits per value in (0, 64)")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens: got {tokens!r}, expected a positive int (the context length bits are counted at)")
    if fmts is not None:
        if isinstance(fmts, str) or not list(fmts):
            names = sorted(formats.FORMATS)
            raise ValueError(f"formats: got {fmts!r}, expected a non-empty list of names from {names}")
        for f in fmts:
            if f not in formats.FORMATS:
                raise ValueError(f"formats: got {f!r}, expected names from {sorted(formats.FORMATS)}")
    for name, n in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: got {n!r}, expected an int >= 0")
    if tokens is not None and sink_tokens + recent_tokens >= tokens:
        raise ValueError(
            f"sink_tokens + recent_tokens: got {sink_tokens + recent_tokens}, expected fewer than tokens={tokens}"
        )
    if measure not in ("probe", "all"):
        raise ValueError(f"measure: got {measure!r}, expected 'probe' or 'all'")


def measure_sensitivity(
    model,
    ids: torch.Tensor,
    fmts: Sequence[str] = DEFAULT_FORMATS,
    offsets: bool = True,
    measure: str = "probe",
    progress: bool = False,
    windows: tuple[int, int] = (0, 0),
) -> dict:
    """Everything a policy is chosen from: key offsets (or None) and the sensitivity table, for ``ids``
    ``(B, T)``; ``windows``: the (sink, recent) exact tokens the policies will keep (see :func:`sensitivity`)."""
    check_args(fmts=fmts, sink_tokens=windows[0], recent_tokens=windows[1], measure=measure)
    config = _text_config(model.config)
    offsets = offsets and not getattr(config, "attn_logit_softcapping", None)  # a key shift is not exact there
    captured = capture(model, ids)
    some = next(iter(captured.values()))[0]
    k_offsets = {i: k.mean(dim=(0, 2)) for i, (k, _) in captured.items()} if offsets else None
    return {
        "config": config,
        "layers": sorted(captured),
        "heads": some.shape[1],
        "head_dim": some.shape[3],
        "k_offsets": k_offsets,
        "table": sensitivity(model, ids, fmts, k_offsets, captured, measure, progress, windows),
        "windows": windows,
        "info": {
            "measure": measure,
            "formats": list(fmts),
            "calibration_tokens": int(ids.numel()),
            "measured_with_windows": list(windows),
        },
    }


def policy_for(
    measured: dict,
    bits: float,
    tokens: int = 512,
    info: dict | None = None,
    sink_tokens: int = 0,
    recent_tokens: int = 0,
) -> Policy:
    """The policy at ``bits`` mean bits per value, counted at ``tokens`` tokens: the offsets' storage
    and the exact windows (``sink_tokens`` + ``recent_tokens`` at 16 bits, on top of the packed rows)
    included; the packed formats get what is left."""
    check_args(bits, tokens, sink_tokens=sink_tokens, recent_tokens=recent_tokens)
    config, head_dim, k_offsets = measured["config"], measured["head_dim"], measured["k_offsets"]
    offsets = k_offsets is not None
    overhead = (16.0 / tokens) / 2 if offsets else 0.0  # one fp16 vector per KV head and layer, K side only
    exact = (sink_tokens + recent_tokens) / tokens
    extra = overhead + 16.0 * exact
    try:
        chosen, predicted = choose(measured["table"], head_dim, bits, extra)
    except ValueError as e:
        raise ValueError(f"{e}, with {sink_tokens + recent_tokens} exact tokens of {tokens}") from e
    n = config.num_hidden_layers
    layers: list[LayerPolicy | None] = [None] * n
    for i in measured["layers"]:
        layers[i] = LayerPolicy(chosen[(i, "k")], chosen[(i, "v")], k_offset=offsets)
    stacked = None
    if offsets:
        stacked = torch.zeros(n, measured["heads"], head_dim)
        for i, m in k_offsets.items():
            stacked[i] = m
    policy = Policy(getattr(config, "model_type", None), n, measured["heads"], head_dim, layers, stacked)
    policy.sink_tokens, policy.recent_tokens = sink_tokens, recent_tokens
    policy.info = {
        "budget_bits": bits,
        "bits_per_value": round(policy.bits_per_value(tokens), 4),
        "counted_at_tokens": tokens,
        "predicted_kld": predicted,
        **measured["info"],
        **(info or {}),
    }
    return policy


def calibrate(
    model,
    ids: torch.Tensor,
    bits: float,
    fmts: Sequence[str] = DEFAULT_FORMATS,
    offsets: bool = True,
    tokens: int = 512,
    measure: str = "probe",
    progress: bool = False,
    info: dict | None = None,
    sink_tokens: int = 1,
    recent_tokens: int = 16,
) -> Policy:
    """A policy for ``model`` at ``bits`` mean bits per value, from calibration ``ids`` ``(B, T)``:
    :func:`measure_sensitivity` then :func:`policy_for`, both with the exact windows asked for (as
    ``turbokv calibrate``: 1 sink + 16 recent tokens; 0, 0 for a policy a static cache can take)."""
    check_args(bits, tokens, fmts, sink_tokens, recent_tokens, measure)
    windows = (sink_tokens, recent_tokens)
    measured = measure_sensitivity(model, ids, fmts, offsets, measure, progress, windows)
    return policy_for(measured, bits, tokens, info, sink_tokens, recent_tokens)
