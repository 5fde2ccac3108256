#!/usr/bin/env python3
"""Generation speed and memory of a Llama-3-8B-shaped model with each cache, in one run.

Random bf16 weights (32 q / 8 KV heads, d 128; ``--hidden`` scales the heads at d 128). Scenarios
(``--scenarios``; default padded,turn,assisted):

* padded:   generate() on a left-padded batch of unequal prompts (``--padded B xSHORTEST-LONGEST``):
            prefill time, ms per decode step, tokens/s;
* turn:     a second chat turn (``--turn CACHED+NEW``): the new tokens' prefill over a filled cache,
            then the decode steps;
* assisted: generate(assistant_model=...) with a truncated copy of the model as the draft: tokens/s
            and the accepted-token rate;
* decode:   caches filled with random K/V through their own ``update`` (the prefill is not
            measured), then ``--steps`` greedy decode steps timed end to end for each ``--shapes``
            batch x context, and from the bytes per token of each cache the largest batch x context
            that fits in the GPU beside the weights.

The generate() scenarios (generate_scenarios.py) use 16 layers, decode 32, unless ``--layers``.
Caches, each in the same run (``--only`` picks by substring):

* DynamicCache, eager (SDPA)              * StaticCache, compiled (CUDA graphs)
* TurboCache, patched, eager              * TurboCache static, patched, compiled
* TurboCache, unpatched (dequantize + SDPA every step; decode only)
* with ``--windows``: each format with 1 sink + 16 recent exact tokens, eager and static compiled,
  and the shipped policies' layouts (``--policies``, default the two of the default model: their
  per-layer K / V format pairs, cycled over this model's layers, and their exact tokens; the key
  offsets, calibrated for another model, are left out), static compiled
* transformers' QuantizedCache, int4, eager (it is not compileable), with the quanto and the HQQ
  backends where optimum-quanto / hqq are installed (the GPU machine needs their wheels carried);
  the output says why a backend did not run.

Nothing is compiled on the CPU (generate() compiles on CUDA only): the "compiled" rows run eager there.
Usage: python benchmarks/bench_generate.py [--scenarios padded,turn,assisted,decode] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import platform
import time
from pathlib import Path

import torch
import transformers

import turbokv
from turbokv.demo import DEFAULT_POLICIES
from turbokv.hf.attention import cache_kwargs
from turbokv.hf.policy import Policy

FORMATS = ("q4_0", "turbo4", "turbo3")
SCENARIOS = ("padded", "turn", "assisted", "decode")
PEERS = ("quanto", "hqq")  # transformers' QuantizedCache backends


def build(layers: int, hidden: int, device: torch.device) -> transformers.PreTrainedModel:
    """Llama-3-8B's shape at hidden 4096; another hidden keeps d = 128 and 4 query heads per KV head."""
    heads = max(1, hidden // 128)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=128,
        num_hidden_layers=layers,
        vocab_size=128256,
        max_position_embeddings=262144,
        rope_theta=500000.0,
    )
    with device:
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


WINDOWS = (1, 16)  # the exact token windows of the "+windows" rows (sink, recent), as turbokv calibrate's default


class Bench:
    """The model under test on its device, and the caches it is measured with."""

    def __init__(self, model: transformers.PreTrainedModel, device: torch.device):
        self.model, self.device = model, device
        self.cuda = device.type == "cuda"
        self.policies: dict[str, str] = {}  # name -> policy file, for the "policy NAME" rows

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")

    def make_cache(self, name: str, capacity: int) -> tuple[transformers.Cache, bool, bool]:
        """(cache, compiled, fused) for the row ``name``; static caches hold ``capacity`` tokens.

        compiled: the decode step is compiled (CUDA only); fused: the model runs patched.
        """
        cfg = self.model.config
        fmt = name.split()[1]
        if name == "DynamicCache eager":
            return transformers.DynamicCache(config=cfg), False, False
        if name.startswith("QuantizedCache"):
            return transformers.QuantizedCache(backend=fmt, config=cfg, nbits=4), False, False
        if name == "StaticCache compiled":
            return transformers.StaticCache(config=cfg, max_cache_len=capacity), self.cuda, False
        if name.startswith("policy"):
            policy = Policy.load(self.policies[fmt])
            pairs = [(lp.k, lp.v) for lp in policy.layers if lp is not None]
            overrides = {i: pairs[i % len(pairs)] for i in range(cfg.num_hidden_layers)}
            windows = dict(sink_tokens=policy.sink_tokens, recent_tokens=policy.recent_tokens)
            cache = turbokv.TurboCache(cfg, overrides=overrides, max_cache_len=capacity, **windows)
            return cache, self.cuda, True
        if "+windows" in name:
            sink, recent = WINDOWS
            static = dict(max_cache_len=capacity) if name.endswith("static compiled") else {}
            cache = turbokv.TurboCache(cfg, k=fmt, v=fmt, sink_tokens=sink, recent_tokens=recent, **static)
            return cache, self.cuda and bool(static), True
        if name.endswith("patched eager"):
            return turbokv.TurboCache(cfg, k=fmt, v=fmt), False, True
        if name.endswith("static compiled"):
            return turbokv.TurboCache(cfg, k=fmt, v=fmt, max_cache_len=capacity), self.cuda, True
        if name.endswith("unpatched"):  # dequantize + SDPA
            return turbokv.TurboCache(cfg, k=fmt, v=fmt), False, False
        raise ValueError(f"name: got {name!r}, expected a row name of this benchmark")

    def fill(self, cache: transformers.Cache, batch: int, ctx: int) -> None:
        """Put ctx random tokens of K/V into every layer through the cache's own update."""
        cfg = self.model.config
        g = torch.Generator(device=self.device).manual_seed(0)
        for i in range(cfg.num_hidden_layers):
            for c0 in range(0, ctx, 8192):
                shape = (batch, cfg.num_key_value_heads, min(8192, ctx - c0), cfg.head_dim)
                k = torch.randn(shape, device=self.device, dtype=self.model.dtype, generator=g)
                if isinstance(cache, turbokv.TurboCache):  # update returns the packed buffers: no dequantized copy
                    cache.bind_fused(i, cfg.num_hidden_layers)
                cache.update(k, torch.randn_like(k), i)
        if isinstance(cache, turbokv.TurboCache):
            cache.end_forward()  # as a patched prefill's end does: its exact rows are not held after it
        self.sync()


def kv_note(cache: transformers.Cache) -> str:
    """The packed size against fp16 for a TurboCache holding tokens, else ''."""
    if not isinstance(cache, turbokv.TurboCache) or not cache.f16_nbytes():
        return ""
    return f"KV {cache.nbytes() / cache.f16_nbytes():.3f}x f16"


def cache_names(
    fmts: list[str], peers: list[str], unpatched: bool, only: str, windows: bool = False, policies: tuple = ()
) -> list[str]:
    """Row names in run order; ``only``: comma-separated substrings, a row runs if its name has one;
    ``windows``: also each format with the exact token windows (WINDOWS: sink + recent tokens) and
    each of ``policies`` (names) static compiled."""
    names = ["DynamicCache eager", "StaticCache compiled"] + [f"QuantizedCache {b} int4 eager" for b in peers]
    for f in fmts:
        names += [f"turbo {f} patched eager", f"turbo {f} static compiled"] + [f"turbo {f} unpatched"] * unpatched
        names += [f"turbo {f} +windows patched eager", f"turbo {f} +windows static compiled"] * windows
    names += [f"policy {p} static compiled" for p in policies] * windows
    return [n for n in names if not only or any(k in n for k in only.split(","))]


def peer_status(bench: Bench, backends: list[str]) -> dict[str, str]:
    """For each QuantizedCache backend: '' if it runs here, else why not; prints what was found."""
    status = {}
    for backend in backends:
        try:
            transformers.QuantizedCache(backend=backend, config=bench.model.config, nbits=4)
        except (ImportError, ValueError) as e:  # the package is missing, or too old for this transformers
            status[backend] = f"not run: {str(e).strip()}"
            continue
        status[backend] = ""
        dist = "optimum-quanto" if backend == "quanto" else "hqq"
        print(f"QuantizedCache {backend}: {dist} {importlib.metadata.version(dist)}", end="")
        if backend == "quanto":
            # Its unpack op is a C++ / CUDA extension JIT-built (ninja, c++ / nvcc) on first use: built here,
            # so the build is neither timed nor mistaken for a slow step.
            kind = "cuda" if bench.cuda else "cpp"
            t0 = time.perf_counter()
            try:
                _ = importlib.import_module(f"optimum.quanto.library.extensions.{kind}").ext.lib
            except Exception as e:  # noqa: BLE001 - any build failure means the backend cannot run here
                status[backend] = f"not run: its {kind} extension failed to JIT-build: {type(e).__name__}: {e}"
                print(f", {status[backend]}")
                continue
            print(f", {kind} extension JIT-built or loaded in {time.perf_counter() - t0:.0f} s")
        else:
            from hqq.core import quantize as hqq_quantize

            aten = getattr(hqq_quantize, "hqq_aten_is_available", False)
            print(f", dequantize in {'hqq_aten' if aten else 'PyTorch (hqq_aten extension not installed)'}")
    for backend, why in status.items():
        if why:
            print(f"QuantizedCache {backend}: {why}")
    return status


# ---------------------------------------------------------------------- decode scenario


def decode(bench: Bench, cache, batch: int, ctx: int, steps: int, compiled: bool) -> float:
    """ms per greedy decode step (wall clock), after warm-up steps (compilation, graph capture)."""
    model = bench.model
    if compiled:
        torch._dynamo.reset()  # each cache compiles afresh (no recompile limit, no stale guards)
    fwd = model.get_compiled_call(transformers.CompileConfig(fullgraph=True)) if compiled else model.__call__
    ids = torch.ones(batch, 1, dtype=torch.long, device=bench.device)
    warm = 3 if compiled else 1
    pos = ctx
    with torch.no_grad():
        for n, timed in ((warm, False), (steps, True)):
            bench.sync()
            t0 = time.perf_counter()
            for _ in range(n):
                position_ids = torch.full((batch, 1), pos, dtype=torch.long, device=bench.device)
                out = fwd(input_ids=ids, position_ids=position_ids, **cache_kwargs(model, cache), use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
                pos += 1
            bench.sync()
            if timed:
                return (time.perf_counter() - t0) * 1e3 / steps
    raise AssertionError("unreachable")


def case(bench: Bench, name: str, batch: int, ctx: int, steps: int) -> tuple[float, float, str]:
    """(ms per step, peak GiB, note) for one cache setting; OOM is reported, not raised."""
    bench.reset_peak()
    cache = None
    try:
        cache, compiled, fused = bench.make_cache(name, ctx + steps + 8)
        bench.fill(cache, batch, ctx)
        if fused:
            turbokv.patch(bench.model)
        try:
            ms = decode(bench, cache, batch, ctx, steps, compiled)
        finally:
            turbokv.unpatch(bench.model)
        return ms, bench.peak_gib(), kv_note(cache)
    except torch.OutOfMemoryError:
        return float("nan"), float("nan"), "out of memory"
    finally:
        cache = None
        bench.reset_peak()


def kv_bytes_per_token(cfg, name: str) -> float:
    rows = cfg.num_hidden_layers * cfg.num_key_value_heads
    if not name.startswith("turbo"):
        return rows * cfg.head_dim * 2 * 2
    return rows * 2 * turbokv.core.formats.row_bytes(name.split()[1], cfg.head_dim)


def run_decode(bench: Bench, args, fmts: list[str], peers: list[str]) -> None:
    cfg = bench.model.config
    names = cache_names(fmts, peers, not args.skip_unpatched, args.only, args.windows, tuple(bench.policies))
    print(f"decode: caches filled with random K/V, {args.steps} greedy steps timed, {cfg.num_hidden_layers} layers")
    print(f"{'B':>3} {'ctx':>6} {'cache':<42} {'ms/step':>8} {'tok/s':>8} {'peak GiB':>9}  note")
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        for name in names:
            ms, peak, note = case(bench, name, b, t, args.steps)
            if "compiled" in name and not bench.cuda:
                note = "; ".join(filter(None, ["eager on cpu", note]))
            peak = f"{peak:>9.1f}" if bench.cuda else f"{'-':>9}"
            print(f"{b:>3} {t:>6} {name:<42} {ms:>8.2f} {b * 1e3 / ms:>8.1f} {peak}  {note}", flush=True)
        print()
    if not bench.cuda:
        return
    weights = sum(p.numel() * p.element_size() for p in bench.model.parameters())
    total = torch.cuda.get_device_properties(0).total_memory
    free = total - weights - 4 * 2**30  # 4 GiB for activations and workspace at decode
    print(f"capacity beside the weights ({free / 2**30:.0f} of {total / 2**30:.0f} GiB, 4 GiB for activations):")
    for name in ["DynamicCache"] + [f"turbo {f}" for f in fmts]:
        per = kv_bytes_per_token(cfg, name)
        print(f"  {name:<14} {per / 1024:>7.1f} KiB/token  {free / per / 1e3:>8.0f}k tokens (batch x context)")


def main() -> None:
    import generate_scenarios  # beside this file; it takes a Bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="padded,turn,assisted", help=f"comma-separated, of {','.join(SCENARIOS)}")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--layers", type=int, default=None, help="default: 16 for the generate() scenarios, 32 for decode")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the caches whose name has one")
    ap.add_argument("--shapes", default="1x4096,8x16384", help="decode: batch x context, comma-separated")
    ap.add_argument("--steps", type=int, default=16, help="decode: timed steps")
    ap.add_argument("--skip-unpatched", action="store_true", help="decode: leave out the unpatched TurboCache rows")
    ap.add_argument(
        "--windows", action="store_true", help="also rows with exact token windows (1 sink + 16 recent) and policies"
    )
    ap.add_argument(
        "--policies",
        default=",".join(spec.policy for spec in DEFAULT_POLICIES),
        help="policy files whose layouts --windows also runs (comma-separated)",
    )
    generate_scenarios.add_arguments(ap)
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        ap.error(f"--scenarios: got {sorted(unknown)}, expected some of {SCENARIOS}")
    device = torch.device(args.device)
    fmts = args.formats.split(",")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"
    print(
        f"turbokv bench_generate, {datetime.date.today()}, {where}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    generate = [s for s in scenarios if s != "decode"]
    phases = [("generate", generate, 16)] * bool(generate) + [("decode", ["decode"], 32)] * ("decode" in scenarios)
    for phase, which, layers in phases:
        t0 = time.perf_counter()
        bench = Bench(build(args.layers or layers, args.hidden, device), device)
        bench.policies = {Path(p).stem: p for p in args.policies.split(",") if p}
        weights = sum(p.numel() * p.element_size() for p in bench.model.parameters())
        print(f"\nLlama-3-8B-shaped, {bench.model.config.num_hidden_layers} layers, hidden {args.hidden}, ", end="")
        print(f"random bf16 weights {weights / 2**30:.1f} GiB")
        # Only the backends that --only keeps are looked at (quanto's extension build takes a while on CUDA).
        status = peer_status(bench, [b for b in PEERS if cache_names([], [b], False, args.only)])
        peers = [b for b, why in status.items() if not why]
        if phase == "decode":
            run_decode(bench, args, fmts, peers)
        else:
            for scenario in which:
                print()
                names = cache_names(fmts, peers, False, args.only, args.windows)
                generate_scenarios.run(scenario, bench, args, names)
        print(f"({phase} scenarios: {time.perf_counter() - t0:.0f} s)")
        bench = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
