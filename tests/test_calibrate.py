"""Calibrated policies: the policy file, TurboCache.from_policy, exact key shifts, and calibrate itself.

Tiny random-weight models (tests/hf_models.py), CPU.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is needed for the cache tests")
import hf_models  # noqa: E402

import turbokv  # noqa: E402
from turbokv.core import formats
from turbokv.hf.attention import cache_kwargs  # noqa: E402
from turbokv.hf.cache import TurboCache  # noqa: E402
from turbokv.hf.policy import LayerPolicy, Policy  # noqa: E402
from turbokv.quality import calibrate  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return hf_models.llama().eval()


def _policy(config, k="f16", v="f16", offsets=None) -> Policy:
    n, heads, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    layers = [LayerPolicy(k, v, k_offset=offsets is not None) for _ in range(n)]
    return Policy(config.model_type, n, heads, d, layers, offsets)


def test_policy_round_trip(tmp_path, llama):
    offsets = torch.randn(3, 2, 64)
    p = _policy(llama.config, "q4_0", "turbo3", offsets)
    p.layers[1] = LayerPolicy("q8_0", "turbo4", rotate_k="off", k_offset=True)
    p.info = {"budget_bits": 4.0}
    p.save(tmp_path / "p.json")
    assert (tmp_path / "p.safetensors").exists()
    q = Policy.load(tmp_path / "p.json")
    assert q.layers == p.layers and q.info == p.info and q.model_type == "llama"
    assert torch.equal(q.k_offsets, offsets)
    cache = TurboCache.from_policy(llama.config, tmp_path / "p.json")
    got = [(lay.k_spec.format, lay.v_spec.format, lay.k_spec.rotate) for lay in cache.layers]
    assert got == [("q4_0", "turbo3", "auto"), ("q8_0", "turbo4", "off"), ("q4_0", "turbo3", "auto")]
    assert torch.equal(cache.layers[2].k_offset, offsets[2])


def test_policy_bits_count_offsets():
    p = Policy("llama", 2, 1, 64, [LayerPolicy("q4_0", "turbo3", k_offset=True), LayerPolicy("q8_0", "q8_0")])
    plain = (4.5 + 3.25 + 8.5 + 8.5) / 4
    assert p.bits_per_value() == pytest.approx(plain)
    assert p.bits_per_value(tokens=512) == pytest.approx(plain + 16 / 512 / 4)  # one layer's K offset


@pytest.mark.parametrize(
    "name, tokens, budget",
    [("smollm2-135m-3.5", 512, 3.5), ("smollm2-135m-4.5", 512, 4.5), ("smollm2-135m-8k-4.0", 8192, 4.0)],
)
def test_shipped_policies_fit_the_default_model(name, tokens, budget):
    """Each shipped policy builds a cache for SmolLM2-135M's shape (30 layers, 3 KV heads of 64) and
    stores at most its budget at the context length it was calibrated for; the long-context one
    keeps more recent tokens exact, which costs bits at short contexts."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, intermediate_size=1536
    )
    path = Path(turbokv.__file__).parent / "hf" / "policies" / f"{name}.json"
    policy = Policy.load(path)
    assert policy.bits_per_value(tokens) <= budget
    cache = TurboCache.from_policy(config, path)
    assert len(cache.layers) == 30 and cache.layers[0].recent_tokens == policy.recent_tokens
    if tokens > 512:
        assert policy.recent_tokens > 16 and policy.bits_per_value(512) > budget


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.update(num_layers=4), "layers got 3 entries"),
        (lambda raw: raw.update(turbokv_policy=99), "turbokv_policy got 99"),
        (lambda raw: raw["layers"][0].update(k="q3_x"), r"layers\[0\]\.k got 'q3_x'"),
        (lambda raw: raw["layers"][2].update(rotate_v="maybe"), r"layers\[2\]\.rotate_v got 'maybe'"),
        (lambda raw: raw["layers"][1].update(k_offset=True), "offsets_file is missing"),
        (lambda raw: raw.update(head_dim=32), "head_dim got 32, expected the config's 64"),
        (lambda raw: raw.update(model_type="qwen3"), "model_type got 'qwen3'"),
    ],
)
def test_from_policy_errors(tmp_path, llama, edit, message):
    _policy(llama.config, "q4_0", "q4_0").save(tmp_path / "p.json")
    raw = json.loads((tmp_path / "p.json").read_text())
    edit(raw)
    (tmp_path / "p.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        TurboCache.from_policy(llama.config, tmp_path / "p.json")


def test_from_policy_missing_files(tmp_path, llama):
    with pytest.raises(FileNotFoundError, match="expected an existing policy"):
        TurboCache.from_policy(llama.config, tmp_path / "none.json")
    _policy(llama.config, offsets=torch.zeros(3, 2, 64)).save(tmp_path / "p.json")
    (tmp_path / "p.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="offsets_file"):
        TurboCache.from_policy(llama.config, tmp_path / "p.json")


def test_offsets_refused_with_softcapping(tmp_path):
    model = hf_models.gemma3()
    cfg = model.config
    p = Policy(cfg.model_type, 3, 1, 256, [LayerPolicy("q8_0", "q8_0", k_offset=True)] * 3, torch.zeros(3, 1, 256))
    p.save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="softcapping"):
        TurboCache.from_policy(cfg, tmp_path / "p.json")


def _cache(config, path, k, offsets, max_cache_len=None):
    _policy(config, k, k, offsets).save(path)
    return TurboCache.from_policy(config, path, max_cache_len=max_cache_len)


@torch.no_grad()
def test_key_shift_is_exact_in_fused_attention(tmp_path, llama):
    """f16 storage: shifted keys give the same tokens as unshifted ones, fused and dequantized; a large
    shift with q8_0 storage stays within quantization error of the unshifted q8_0 cache."""
    ids = torch.randint(1, 96, (1, 12))
    offsets = 3.0 * torch.randn(3, 2, 64)
    run = {}
    for name, k, off, fused, static in [
        ("f16", "f16", None, True, None),
        ("f16 shifted", "f16", offsets, True, None),
        ("f16 shifted, static", "f16", offsets, True, 32),
        ("f16 shifted, dequantized", "f16", offsets, False, None),
    ]:
        cache = _cache(llama.config, tmp_path / f"{len(run)}.json", k, off, static)
        kw = dict(max_new_tokens=10, do_sample=False, **cache_kwargs(llama, cache))
        if fused:
            with turbokv.patch(llama):
                run[name] = llama.generate(ids, **kw)
        else:
            run[name] = llama.generate(ids, **kw)
    assert torch.equal(run["f16"], run["f16 shifted"])
    assert torch.equal(run["f16"], run["f16 shifted, static"])
    assert torch.equal(run["f16"], run["f16 shifted, dequantized"])

    def logits(k, off):
        cache = _cache(llama.config, tmp_path / "l.json", k, off)
        with turbokv.patch(llama):
            return llama(ids, **cache_kwargs(llama, cache)).logits

    exact = logits("f16", None)
    plain, shifted = logits("q8_0", None), logits("q8_0", offsets)
    assert (shifted - exact).abs().max() < 10 * (plain - exact).abs().max() + 1e-3


def test_knapsack_is_optimal():
    """choose() against brute force on a small table."""
    torch.manual_seed(1)
    fmts = ("turbo2", "turbo3", "q4_0", "q8_0")
    table = {
        (i, s): {f: float(torch.rand(())) / formats.bits_per_value(f, 64) for f in fmts} for i in range(3) for s in "kv"
    }
    for bits in (2.5, 3.5, 5.0):
        chosen, total = calibrate.choose(table, 64, bits)
        best = min(
            sum(table[s][f] for s, f in zip(sorted(table), combo, strict=True))
            for combo in itertools.product(fmts, repeat=len(table))
            if sum(formats.bits_per_value(f, 64) for f in combo) / len(table) <= bits
        )
        assert total == pytest.approx(best)
        assert sum(formats.bits_per_value(f, 64) for f in chosen.values()) / len(table) <= bits
    with pytest.raises(ValueError, match="expected at least 2.250"):
        calibrate.choose(table, 64, 2.0)


def test_calibrate_tiny_model(tmp_path, llama):
    torch.manual_seed(0)
    ids = torch.randint(1, 96, (1, 32))
    measured = calibrate.measure_sensitivity(llama, ids, ("turbo2", "turbo4", "q8_0"))
    assert set(measured["table"]) == {(i, s) for i in range(3) for s in "kv"}
    for row in measured["table"].values():  # more bits, less predicted damage
        assert row["turbo2"] > row["turbo4"] > row["q8_0"] >= 0
    low, high = (calibrate.policy_for(measured, b, tokens=32) for b in (3.0, 6.0))
    assert low.bits_per_value(32) <= 3.0 and high.bits_per_value(32) <= 6.0
    assert high.info["predicted_kld"] < low.info["predicted_kld"]
    offsets = torch.stack([measured["k_offsets"][i] for i in range(3)])
    assert torch.allclose(low.k_offsets, offsets)
    low.save(tmp_path / "low.json")
    cache = TurboCache.from_policy(llama.config, tmp_path / "low.json")
    with turbokv.patch(llama):
        llama(ids, **cache_kwargs(llama, cache))
    assert cache.get_seq_length() == 32


def test_pareto_plot(tmp_path):
    from turbokv.quality.sweep import pareto

    pareto([(4.5, 0.042, "q4_0/q4_0 on"), (3.5, 0.07, "policy p-3.5.json"), (16.0, 0.0, "f16")], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_with_exact_windows(tmp_path, llama):
    """Measured with the windows a policy keeps (the fused path: each query's own recent keys exact),
    the windows' bits taken out of the budget, and the policy's cache built with them."""
    torch.manual_seed(0)
    ids = torch.randint(1, 96, (1, 32))
    calls = turbokv.hf.attention.turbokv_attention.calls
    policy = calibrate.calibrate(
        llama, ids, 5.0, ("turbo2", "turbo4", "q8_0"), tokens=32, sink_tokens=1, recent_tokens=4
    )
    assert turbokv.hf.attention.turbokv_attention.calls > calls, "the sensitivities must run the fused (windowed) path"
    assert policy.info["measured_with_windows"] == [1, 4]
    assert (policy.sink_tokens, policy.recent_tokens) == (1, 4)
    # 5 of the 32 tokens at 16 bits (on top of their packed rows) and the offsets leave 5.0 - 2.5 - 0.25
    # = 2.25 bits for the packed rows: every slot at turbo2 (2.25), nothing more.
    assert policy.bits_per_value(32) <= 5.0
    assert policy.bits_per_value() == pytest.approx(2.25)
    policy.save(tmp_path / "w.json")
    cache = TurboCache.from_policy(llama.config, tmp_path / "w.json")
    assert all((lay.sink_tokens, lay.recent_tokens) == (1, 4) for lay in cache.turbo_layers)
    with pytest.raises(ValueError, match="bits: got 2.5, expected at least 5.000.*with 5 exact tokens of 32"):
        calibrate.policy_for(
            calibrate.measure_sensitivity(llama, ids, ("turbo2",)), 2.5, 32, sink_tokens=1, recent_tokens=4
        )


def _offsets_policy(tmp_path, llama, offsets=None):
    offsets = torch.randn(3, 2, 64) if offsets is None else offsets
    _policy(llama.config, "q4_0", "turbo3", offsets).save(tmp_path / "p.json")
    return tmp_path / "p.json"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256))), "not a JSON file"),
        (lambda p: p.with_suffix(".safetensors").write_bytes(b"junk" * 40), "is not a safetensors file"),
        (lambda p: p.with_suffix(".safetensors").write_bytes(b""), "is not a safetensors file"),
        (
            lambda p: _save_tensors(p.with_suffix(".safetensors"), {"offsets": torch.zeros(3, 2, 64)}),
            r"holds \['offsets'\], expected \['k_offsets'\]",
        ),
        (
            lambda p: _save_tensors(p.with_suffix(".safetensors"), {"k_offsets": torch.zeros(3, 2, 32)}),
            r"expected floats of shape \(3, 2, 64\)",
        ),
        (lambda p: _edit(p, offsets_file="../p.safetensors"), "offsets_file got '../p.safetensors'"),
        (lambda p: _edit(p, info=[1, 2]), "info got list"),
        (lambda p: _edit(p, layers=[None, None, None]), "no attention layer"),
        (lambda p: _edit(p, sink_tokens=True), "sink_tokens got True"),
    ],
)
def test_policy_files_are_checked_on_load(tmp_path, llama, corrupt, message):
    """A corrupt policy or offsets file is a ValueError naming the policy file and the field."""
    path = _offsets_policy(tmp_path, llama)
    corrupt(path)
    with pytest.raises(ValueError, match=message) as err:
        Policy.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_key_offsets_are_refused(tmp_path, llama, value):
    offsets = torch.randn(3, 2, 64)
    offsets[1, 0, 5] = value
    path = _offsets_policy(tmp_path, llama, offsets)
    with pytest.raises(ValueError, match="k_offsets in .* has non-finite values"):
        TurboCache.from_policy(llama.config, path)


def test_policy_path_that_is_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected an existing policy JSON file"):
        Policy.load(tmp_path)


def _save_tensors(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _edit(path, **changes):
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=4.5, tokens=-512), "tokens: got -512, expected a positive int"),
        (dict(bits=4.5, tokens=0), "tokens: got 0, expected a positive int"),
        (dict(bits=float("nan")), "bits: got nan"),
        (dict(bits=float("inf")), "bits: got inf"),
        (dict(bits=-1.0), "bits: got -1.0"),
        (dict(bits=4.5, fmts=[]), r"formats: got \[\], expected a non-empty list"),
        (dict(bits=4.5, fmts="turbo3"), "formats: got 'turbo3', expected a non-empty list"),
        (dict(bits=4.5, sink_tokens=-1), "sink_tokens: got -1"),
        (dict(bits=4.5, tokens=16, recent_tokens=16), "sink_tokens \\+ recent_tokens: got 17"),
        (dict(bits=4.5, measure="some"), "measure: got 'some'"),
    ],
)
def test_calibration_arguments_are_checked_first(kwargs, message):
    """Impossible arguments are refused by name before any forward pass (the model is never used)."""
    with pytest.raises(ValueError, match=message):
        calibrate.calibrate(None, torch.zeros(1, 8, dtype=torch.long), **kwargs)
    if "fmts" not in kwargs and "measure" not in kwargs:
        with pytest.raises(ValueError, match=message):
            calibrate.policy_for(
                {},
                kwargs["bits"],
                kwargs.get("tokens", 512),
                None,
                kwargs.get("sink_tokens", 1),
                kwargs.get("recent_tokens", 16),
            )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama):
    """The tiny model saved as an HF folder with a word-level tokenizer of its 96 ids (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(calibrate.calibration_text().split()))[:95]
    core = Tokenizer(models.WordLevel(vocab={w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    d = tmp_path_factory.mktemp("tiny-model")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(d)
    llama.save_pretrained(d)
    return d


def test_calibrate_cli_predicts_each_policy_on_held_out_chunks(tmp_path, model_dir, capsys):
    """`turbokv calibrate` predicts each policy's KLD on chunks of the text after the calibration chunks
    (held out from them), prints it and records it in the policy's info with its size."""
    from turbokv.cli import main

    out = tmp_path / "p.json"
    argv = ["calibrate", "--model", str(model_dir), "--bits", "3,4", "--ctx", "64", "--chunks", "1"]
    assert main([*argv, "--predict-chunks", "2", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for bits in ("3", "4"):
        info = Policy.load(tmp_path / f"p-{bits}.json").info
        assert info["calibration_kld_chunks"] == 2 and info["calibration_kld_tokens"] == 512  # --tokens
        assert info["calibration_kld"] > 0 and info["calibration_kld_stderr"] >= 0
        assert f"predicted KLD {info['calibration_kld']:.5f} ± {info['calibration_kld_stderr']:.5f}" in printed
    assert printed.count("on 2 chunks of 512 tokens spread over the calibration text") == 2


def test_prediction_chunks_are_spread_over_the_text_after_the_calibration_chunks():
    """The chunks a policy is predicted on: disjoint from the calibration chunks, the first and the last
    of the rest among them, evenly apart; as many as the rest holds when it holds fewer."""
    from types import SimpleNamespace

    from turbokv.cli import _prediction_chunks

    tokens = torch.arange(1000)
    args = SimpleNamespace(chunks=2, ctx=50, tokens=100, predict_chunks=3)
    got = _prediction_chunks(tokens, args)  # 900 tokens after the calibration ones: 9 chunks of 100
    assert got.shape == (3, 100)
    assert got[:, 0].tolist() == [100, 500, 900]  # chunks 0, 4 and 8 of the rest
    assert int(got.min()) >= 100  # nothing of the calibration chunks [0, 100)
    args.predict_chunks = 20
    assert _prediction_chunks(tokens, args).shape == (9, 100)


def test_calibrate_cli_predicts_at_the_length_bits_are_counted_at(tmp_path, model_dir, capsys):
    """With --tokens longer than --ctx, each policy's KLD is predicted in chunks of --tokens (the length
    its windows and bits are for) where the text holds them, else of --ctx, else on the calibration
    chunks, saying so."""
    from turbokv.cli import main

    out = tmp_path / "p.json"
    argv = ["calibrate", "--model", str(model_dir), "--bits", "4", "--ctx", "64", "--chunks", "1", "--tokens", "256"]
    argv += ["--predict-chunks", "1", "--recent-tokens", "4", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    info = Policy.load(out).info
    assert info["calibration_kld_tokens"] == 256 and info["calibration_kld_chunks"] == 1
    assert "1 chunk of 256 tokens spread over the calibration text" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text(" ".join(calibrate.calibration_text().split()[:300]))  # 300 tokens: 4 chunks of 64
    assert main([*argv, "--text", str(short)]) == 0
    assert "the policies' KLD is predicted in chunks of --ctx 64" in capsys.readouterr().out
    assert Policy.load(out).info["calibration_kld_tokens"] == 64
    shorter = tmp_path / "shorter.txt"
    shorter.write_text(" ".join(calibrate.calibration_text().split()[:100]))  # 100 tokens: 1 chunk of 64
    assert main([*argv, "--text", str(shorter)]) == 0
    assert "predicted on the calibration chunks" in capsys.readouterr().out
    assert Policy.load(out).info["calibration_kld_chunks"] == 1
