#!/usr/bin/env python3
"""GPU attention for every shape a generation loop makes: Sq new queries over T cached tokens.

Sq = 1 is decode, 2-16 speculative decoding and assisted generation, 64-2048 chunked prefill or
the next chat turn, "whole" a prompt (Sq = T); "padded" rows left-pad the batch's sequences by
unequal amounts (what generate() makes of unequal prompts). 32 q / 8 KV heads, d = 128, f16
queries; the queries are the last Sq tokens (causal from the bottom right).

Per shape, in one run on the same data:
- SDPA on an fp16 cache with the same masking: flash (is_causal / CausalBias lower right; no
  padding mask possible) and cuDNN (is_causal, else an explicit mask), "best" the faster;
- per K / V format pair ("q4_0" for q4_0 / q4_0; by default each format with itself and the mixed
  pairs calibrated policies choose, bench_attention.MIXED): the op's tensor-core kernels, pinned:
  "ms" the templated kernel (8 rows a block),
  "flash" the flash kernel (64 rows a block, several queries only); dequantize + SDPA
  (turbokv's prefill shortcut; "deq" its two dequantize calls alone), and "auto" (what
  turbokv.attention chooses: the shortcut for Sq >= PREFILL_SDPA_MIN_QUERIES, else the op's
  own choice) against best;
- "limit": the time to read the packed cache once at the read bandwidth of a large torch.sum
  measured in the run (memory-bound shapes cannot beat it).
Times are the mean of back-to-back calls (best of three bursts) cycling over cache copies
larger than the L2; shapes under 64 queries are captured in CUDA graphs (as compiled decoding
runs them), longer ones run eagerly (the shortcut syncs once to read the lengths).
Usage: python benchmarks/bench_prefill.py [--batches 1,4,8] [--contexts 4096,32768,131072]
       [--queries 1,2,4,8,16,64,256,512,2048,whole] [--formats f16,q8_0,q8_0/turbo4,...]
"""

from __future__ import annotations

import argparse
import datetime

import torch
from bench_attention import MIXED, copies_for, read_bandwidth, warm_calls
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

import turbokv
from turbokv.core import ops
from turbokv.core.rotation import auto_rotation

HQ, HKV, D = 32, 8, 128
# Work per shape (B x Sq x T, a causal whole prompt counted at half): larger shapes are skipped.
MAX_WORK = 1 << 32
# The templated kernel is timed up to this much work only (beyond, auto never takes it); the flash
# kernel (64 rows a block) up to the second.
MAX_FUSED_WORK = 1 << 29
MAX_FLASH_WORK = 1 << 31


def time_ms(fn, n: int, graph: bool) -> float:
    """Mean ms per call over back-to-back calls cycling over n inputs, best of three bursts
    sized to about 50 ms of work each; graph: each input's call captured in a CUDA graph."""
    calls = warm_calls(fn, n, graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    calls[0]()
    end.record()
    end.synchronize()
    iters = max(3, min(200, int(50 / max(start.elapsed_time(end), 1e-3))))
    best = float("inf")
    for _ in range(3):
        start.record()
        for i in range(iters):
            calls[i % n]()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def sdpa_baselines(q, ks, vs, starts, padded, n, graph) -> dict[str, float]:
    """ms of flash and cuDNN on the fp16 caches (nan where the backend refuses the shape)."""
    sq, T = q.shape[2], ks[0].shape[2]
    out = {}
    if padded or sq not in (1, T):
        # Bottom-right causal mask with each sequence's padding: (B, 1, Sq, T) booleans.
        j = torch.arange(T, device="cuda")
        qpos = T - sq + torch.arange(sq, device="cuda")
        mask = (j[None, None, None, :] <= qpos[None, None, :, None]) & (j >= starts[:, None, None, None])
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        if padded:
            if name == "flash":
                out[name] = float("nan")
                continue
            kw = {"attn_mask": mask}
        elif sq == 1:
            kw = {}
        elif sq == T:
            kw = {"is_causal": True}
        else:
            kw = {"attn_mask": causal_lower_right(sq, T) if name == "flash" else mask}

        def call(i, kw=kw):
            return torch.nn.functional.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True, **kw)

        try:
            with sdpa_kernel(backend):
                out[name] = time_ms(call, n, graph)
        except RuntimeError:
            out[name] = float("nan")
    if padded:  # what transformers runs with a padding mask: SDPA's own choice of backend
        out["masked"] = time_ms(
            lambda i: torch.nn.functional.scaled_dot_product_attention(
                q, ks[i], vs[i], attn_mask=mask, enable_gqa=True
            ),
            n,
            graph,
        )
    return out


def shape_rows(B, T, sq, padded, fmts, read_gbs):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, sq, D, device="cuda", dtype=torch.float16, generator=g)
    lengths = torch.full((B,), T, device="cuda", dtype=torch.int64)
    starts = torch.tensor([b * T // (2 * B) if padded else 0 for b in range(B)], device="cuda")
    n = copies_for(B * HKV * T * D * 4)
    ks = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(n)]
    vs = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(n)]
    graph = sq < ops.PREFILL_SDPA_MIN_QUERIES
    base = sdpa_baselines(q, ks, vs, starts, padded, n, graph)
    best = min(v for v in base.values() if v == v)
    spans = list(zip(starts.tolist(), lengths.tolist(), strict=True))
    rows = [(name, ms, None) for name, ms in base.items()]
    for kf, vf in fmts:
        kr, vr = auto_rotation(kf, D, "k"), auto_rotation(vf, D, "v")
        kc = [turbokv.quantize(k, kf, kr, check_finite=False) for k in ks]
        vc = [turbokv.quantize(v, vf, vr, check_finite=False) for v in vs]
        nbytes = kc[0].numel() + vc[0].numel()
        kw = dict(k_format=kf, v_format=vf, k_rot=kr, v_rot=vr)

        def fused(i, kc=kc, vc=vc, kw=kw):
            return turbokv.attention(q, kc[i], vc[i], lengths, starts if padded else None, **kw)

        def deq(i, kc=kc, vc=vc, kf=kf, vf=vf, kr=kr, vr=vr):
            return ops._dequantized_sdpa(q, kc[i], vc[i], spans, ((kf, kr), (vf, vr)), D**-0.5, True)

        def deq_only(i, kc=kc, vc=vc, kf=kf, vf=vf, kr=kr, vr=vr):  # the shortcut's two dequantize calls alone
            turbokv.dequantize(kc[i], kf, D, kr, dtype=q.dtype)
            return turbokv.dequantize(vc[i], vf, D, vr, dtype=q.dtype)

        fused_ms = {}
        for kernel, limit in (("templated", MAX_FUSED_WORK), ("flash", MAX_FLASH_WORK), ("auto", MAX_FLASH_WORK)):
            fused_ms[kernel] = float("nan")
            if B * sq * T <= limit and (kernel != "flash" or sq > 1):
                with turbokv.core.ops.pinned_kernels(attention=kernel):
                    try:
                        fused_ms[kernel] = time_ms(fused, n, graph)
                    except RuntimeError as e:  # a pinned kernel not built for this pair: nan
                        if "cannot run this call" not in str(e):
                            raise
        timed = sq >= 16 or (kf, vf) == ("q4_0", "q4_0")
        t_deq = time_ms(deq, n, graph=False) if timed else float("nan")
        t_deq_only = time_ms(deq_only, n, graph=True) if timed else float("nan")
        t_auto = t_deq if sq >= ops.PREFILL_SDPA_MIN_QUERIES else fused_ms["auto"]
        extra = (fused_ms["flash"], t_deq, t_deq_only, t_auto, nbytes / read_gbs / 1e6, best)
        rows.append((kf if kf == vf else f"{kf}/{vf}", fused_ms["templated"], extra))
        del kc, vc
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--queries", default="1,2,4,8,16,64,256,512,2048,whole")
    ap.add_argument(
        "--formats",
        default=",".join(["f16", "q8_0", "q4_0", "turbo4", "turbo3"] + [f"{k}/{v}" for k, v in MIXED if k != v]),
        help="K / V formats, comma-separated: F (F for K and V) or K/V",
    )
    ap.add_argument("--padding", default="no,yes")
    args = ap.parse_args()
    fmts = [tuple(f.split("/")) if "/" in f else (f, f) for f in args.formats.split(",")]
    read_gbs = read_bandwidth()
    print(f"turbokv bench_prefill, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"read bandwidth (torch.sum of 4 GiB): {read_gbs:.0f} GB/s; Hq {HQ}, Hkv {HKV}, d {D}, f16 queries")
    print(f"auto: the fused kernel below {ops.PREFILL_SDPA_MIN_QUERIES} queries, dequantize + SDPA from there\n")
    print(
        f"{'B':>2} {'T':>7} {'Sq':>6} {'pad':>3} {'path':<13} {'ms':>9} {'flash':>9} {'deq+SDPA':>9} {'deq':>8}"
        f" {'auto':>9}"
        f" {'limit':>8} {'auto vs best':>12} {'flash vs best':>13}"
    )
    for b in (int(x) for x in args.batches.split(",")):
        for t in (int(x) for x in args.contexts.split(",")):
            for qs in args.queries.split(","):
                sq = t if qs == "whole" else int(qs)
                for padded in (p == "yes" for p in args.padding.split(",")):
                    if sq > t or (padded and b == 1) or b * sq * t / (2 if sq == t else 1) > MAX_WORK:
                        continue
                    for name, ms, extra in shape_rows(b, t, sq, padded, fmts, read_gbs):
                        head = f"{b:>2} {t:>7} {qs:>6} {'yes' if padded else 'no':>3} {name:<13} {ms:>9.4f}"
                        if extra is None:
                            print(head)
                        else:
                            flash, deq, deq_only, auto, limit, best = extra
                            print(
                                f"{head} {flash:>9.4f} {deq:>9.4f} {deq_only:>8.4f} {auto:>9.4f} {limit:>8.4f}"
                                f" {best / auto:>11.2f}x"
                                f" {best / flash:>12.2f}x"
                            )
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
