"""TurboCache.save / TurboCache.load (turbokv.hf.cache_file): prompt caching across processes.

Generation continued from a loaded cache gives the tokens of continuing the cache that was saved;
a file that is not a cache, damaged, edited, newer or written for another model is refused by name.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cuda_ready, device_params
from hf_models import COMMON, build, transformers
from safetensors import safe_open
from safetensors.torch import save_file

import turbokv
from turbokv.hf.attention import cache_kwargs, turbokv_attention
from turbokv.hf.cache_file import FORMAT_VERSION, HEADER_HASH, CacheFileError, header_sha256

MAX_NEW = 10
PREFIX, SUFFIX = 16, 4  # the saved prompt, then the new turn that continues it
FORMATS = [("f16", "f16"), ("q4_0", "turbo3")]


def make_cache(model, k, v, max_cache_len=None):
    return turbokv.TurboCache(model.config, k=k, v=v, rotate_k="on", rotate_v="on", max_cache_len=max_cache_len)


def inputs(gen, batch=3, device="cpu"):
    """A left-padded prompt of PREFIX tokens and SUFFIX more: (ids, mask) of the prefix and of the whole."""
    ids = torch.randint(1, 96, (batch, PREFIX + SUFFIX), generator=gen)
    mask = torch.ones_like(ids)
    for b, pad in enumerate([0, 3, 6][:batch]):
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    return ids.to(device), mask.to(device)


def prefill(model, ids, mask, cache):
    with torch.no_grad():
        model(ids[:, :PREFIX], attention_mask=mask[:, :PREFIX], **cache_kwargs(model, cache))
    return cache


def greedy(model, ids, mask, cache, **kw):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **cache_kwargs(model, cache),
        **kw,
    )


def assert_same_generation(out, ref, exact: bool):
    """Same tokens; logits bit-equal (same device: the same bytes through the same kernels) or close
    (another device: tokens generated after the load are quantized by that device's kernels)."""
    assert torch.equal(out.sequences.cpu(), ref.sequences.cpu())
    for a, b in zip(out.scores, ref.scores, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=5e-2 * b.abs().max().item())


# ---------------------------------------------------------------- continuing from a loaded cache


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("patched", [False, True])
def test_continue_from_loaded_cache_equals_never_saving(device, static, patched, gen, tmp_path):
    """Prefill, save, and continue two ways: on the cache that was saved, and on the loaded one."""
    model = build("llama64").to(device)
    ids, mask = inputs(gen, device=device)
    cap = 64 if static else None
    with turbokv.patch(model) if patched else contextlib.nullcontext():
        for k, v in FORMATS:
            cache = prefill(model, ids, mask, make_cache(model, k, v, cap))
            path = tmp_path / f"{k}-{v}.safetensors"
            cache.save(path)
            ref = greedy(model, ids, mask, cache, disable_compile=True)
            loaded = turbokv.TurboCache.load(path, model.config, device=device)
            assert loaded.get_max_length() == (cap or -1)
            assert [(lay.k_spec, lay.v_spec) for lay in loaded.layers] == [
                (lay.k_spec, lay.v_spec) for lay in cache.layers
            ]
            out = greedy(model, ids, mask, loaded, disable_compile=True)
            assert_same_generation(out, ref, exact=True)
            assert int(loaded.get_seq_length()) == PREFIX + SUFFIX + MAX_NEW - 1


def test_load_in_another_process(gen, tmp_path):
    """The file alone carries the cache: a fresh interpreter (the same model rebuilt from its seed)
    loads it and generates the tokens this process generates on the cache it saved."""
    model = build("llama64")
    ids, mask = inputs(gen)
    cache = prefill(model, ids, mask, make_cache(model, "q4_0", "turbo3"))
    cache.save(tmp_path / "prompt.safetensors")
    save_file({"ids": ids, "mask": mask}, tmp_path / "inputs.safetensors")
    ref = greedy(model, ids, mask, cache)
    code = f"""
import json, sys, torch, turbokv
from safetensors.torch import load_file
sys.path.insert(0, {str(Path(__file__).parent)!r})
from hf_models import build
model = build("llama64")
t = load_file({str(tmp_path / "inputs.safetensors")!r})
cache = turbokv.TurboCache.load({str(tmp_path / "prompt.safetensors")!r}, model.config)
with turbokv.patch(model):
    out = model.generate(t["ids"], attention_mask=t["mask"], max_new_tokens={MAX_NEW}, do_sample=False,
                         **turbokv.hf.attention.cache_kwargs(model, cache))
print(json.dumps(out.tolist()))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == ref.sequences.tolist()


@pytest.mark.parametrize("family", ["qwen3_5", "lfm2"])
@pytest.mark.parametrize("static", [False, True])
def test_hybrid_state_layers_are_saved(family, static, gen, tmp_path):
    """Linear-attention / conv layers (transformers' own cache layers) are saved with their states."""
    model = build(family)
    ids, mask = inputs(gen)
    with turbokv.patch(model):
        cache = prefill(model, ids, mask, make_cache(model, "q4_0", "turbo3", 64 if static else None))
        cache.save(tmp_path / "c.safetensors")
        loaded = turbokv.TurboCache.load(tmp_path / "c.safetensors", model.config)
        for old, new in zip(cache.layers, loaded.layers, strict=True):
            assert type(old) is type(new)
            if not isinstance(old, turbokv.TurboLayer):
                for s in range(old.number_of_states):
                    for states in ("conv_states", "recurrent_states"):
                        a, b = getattr(old, states)[s], getattr(new, states)[s]
                        assert (a is None) == (b is None), (states, s)
                        assert a is None or torch.equal(a, b), (states, s)
        ref = greedy(model, ids, mask, cache, disable_compile=True)
        out = greedy(model, ids, mask, loaded, disable_compile=True)
    assert_same_generation(out, ref, exact=True)


def test_hybrid_layers_are_refused_by_save(gen, tmp_path):
    """A hybrid layer (attention K/V and a mamba state in one layer: Falcon-H1) has no entry in the file
    format yet: save refuses it by name rather than write a file that would lose the state."""
    model = build("falcon_h1")  # head dim 16: f16 storage
    ids, mask = inputs(gen)
    cache = prefill(model, ids, mask, make_cache(model, "f16", "f16", None))
    with pytest.raises(NotImplementedError, match=r"layers \[0, 1, 2, 3\] are hybrid"):
        cache.save(tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_load_with_another_capacity(gen, tmp_path):
    """A dynamic file loads as a static cache of max_cache_len tokens, a static one into a larger
    capacity; a capacity below the saved tokens is refused."""
    model = build("llama64")
    ids, mask = inputs(gen)
    with turbokv.patch(model):
        for cap in (None, 40):
            cache = prefill(model, ids, mask, make_cache(model, "q4_0", "turbo3", cap))
            cache.save(tmp_path / "c.safetensors")
            ref = greedy(model, ids, mask, cache, disable_compile=True)
            loaded = turbokv.TurboCache.load(tmp_path / "c.safetensors", model.config, max_cache_len=64)
            assert loaded.is_compileable and loaded.get_max_length() == 64
            assert loaded.layers[0].k_packed.shape[2] == 64
            assert_same_generation(greedy(model, ids, mask, loaded, disable_compile=True), ref, exact=True)
    with pytest.raises(ValueError, match=f"max_cache_len: got 10, expected an int >= the {PREFIX} tokens saved"):
        turbokv.TurboCache.load(tmp_path / "c.safetensors", model.config, max_cache_len=10)


def test_file_holds_the_valid_tokens_and_the_header(gen, tmp_path):
    """The packed K/V up to the token count (not a static cache's slack), and the header's fields."""
    model = build("qwen3")  # a sliding-window layer
    ids, mask = inputs(gen)
    cache = prefill(model, ids, mask, turbokv.TurboCache(model.config, k="q8_0", v="turbo4", max_cache_len=64))
    cache.save(tmp_path / "c.safetensors")
    with safe_open(tmp_path / "c.safetensors", framework="pt") as f:
        meta = f.metadata()
        header = json.loads(meta["turbokv.header"])
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    # No key offsets or windows: written as version 1, which earlier turbokv versions read.
    assert meta["turbokv.format"] == "turbokv-cache" and meta["turbokv.format_version"] == "1"
    assert meta["turbokv.version"] == turbokv.__version__
    assert header["model_type"] == "qwen3" and header["max_cache_len"] == 64
    assert [e["type"] for e in header["layers"]] == ["full_attention", "sliding_attention", "full_attention"]
    for i, (entry, layer) in enumerate(zip(header["layers"], cache.layers, strict=True)):
        assert (entry["k_format"], entry["v_format"], entry["dtype"]) == ("q8_0", "turbo4", "float32")
        assert entry["k_rotation"] == {"group": layer.k_rot.group, "seed": layer.k_rot.seed}
        assert (entry["batch"], entry["kv_heads"], entry["head_dim"], entry["length"]) == (3, 1, 64, PREFIX)
        assert entry["sliding_window"] == (8 if i == 1 else None)
        assert shapes[f"layers.{i}.k"] == (3, 1, PREFIX, turbokv.core.formats.row_bytes("q8_0", 64))
        assert len(entry["tensors"][f"layers.{i}.v"]["sha256"]) == 64


# ---------------------------------------------------------------- files that are refused


@pytest.fixture
def saved(gen, tmp_path):
    """(model, path) of a llama64 cache (q4_0 / turbo3) of PREFIX tokens."""
    model = build("llama64")
    ids, mask = inputs(gen)
    path = tmp_path / "c.safetensors"
    prefill(model, ids, mask, make_cache(model, "q4_0", "turbo3")).save(path)
    return model, path


def rewrite(path, edit_metadata, rehash=True):
    """Write the file again with ``edit_metadata(metadata)``: a consistent safetensors file, as an editor
    writes; ``rehash``: one who also recomputes the header's hash (so that the checks behind it run)."""
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    edit_metadata(meta)
    if rehash:
        meta[HEADER_HASH] = header_sha256(meta)
    save_file(tensors, path, metadata=meta)


def edit_header(path, edit):
    def change(meta):
        header = json.loads(meta["turbokv.header"])
        edit(header)
        meta["turbokv.header"] = json.dumps(header)

    rewrite(path, change)


@pytest.mark.parametrize("keep", [0.5, 0.99, 12])
def test_truncated_file_is_refused(saved, keep):
    model, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CacheFileError, match="not a readable safetensors file .*truncated"):
        turbokv.TurboCache.load(path, model.config)


def test_flipped_byte_is_refused(saved):
    model, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # in the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match=r"tensor 'layers\.\d\.[kv]': got sha256 .* expected the header's"):
        turbokv.TurboCache.load(path, model.config)


def test_edited_header_is_refused(saved):
    model, path = saved

    def longer(header):
        header["layers"][1]["length"] += 1

    edit_header(path, longer)
    with pytest.raises(
        CacheFileError,
        match=rf"tensor 'layers\.1\.k': got shape \[3, 2, {PREFIX}, 36\], expected .* \[3, 2, {PREFIX + 1}, 36\]",
    ):
        turbokv.TurboCache.load(path, model.config)
    edit_header(path, lambda h: h["layers"][1].update(length="many"))
    with pytest.raises(CacheFileError, match=r"layers\[1\]\.length: got 'many', expected a int"):
        turbokv.TurboCache.load(path, model.config)
    rewrite(path, lambda meta: meta.update({"turbokv.header": "{not json"}))
    with pytest.raises(CacheFileError, match="turbokv.header: not JSON"):
        turbokv.TurboCache.load(path, model.config)


def test_header_edit_without_its_hash_is_refused(saved):
    """One digit of a rotation seed changed in the header (the bytes would decode with the wrong
    rotation) is refused by the header's hash before anything is built."""
    model, path = saved

    def seed_digit(meta):
        header = json.loads(meta["turbokv.header"])
        header["layers"][0]["k_rotation"]["seed"] += 1
        meta["turbokv.header"] = json.dumps(header)

    rewrite(path, seed_digit, rehash=False)
    with pytest.raises(CacheFileError, match=r"turbokv.header_sha256: got .* the hash of the header as stored"):
        turbokv.TurboCache.load(path, model.config)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(CacheFileError, match="not a file; expected a cache file"):
        turbokv.TurboCache.load(tmp_path, build("llama64").config)


def contents(path):
    """What a cache file says, as comparable values: its metadata but the writer's version (informative)
    and each tensor's bytes. (The byte order of safetensors' metadata is not fixed from save to save.)"""
    with safe_open(path, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "turbokv.version"}
        return meta, {name: f.get_tensor(name).numpy().tobytes() for name in f.keys()}


def test_every_flipped_byte_is_refused_or_harmless(gen, tmp_path):
    """Each byte of a small saved file flipped in turn (the safetensors header, the metadata with the
    turbokv header, the data): a CacheFileError naming the file, or a cache identical to the saved one
    (saved again, the same bytes), never a different cache."""
    model = build("llama64")
    ids, mask = inputs(gen, batch=1)
    path = tmp_path / "c.safetensors"
    with torch.no_grad():
        cache = make_cache(model, "q4_0", "turbo3")
        model(ids[:, :3], attention_mask=mask[:, :3], **cache_kwargs(model, cache))
    cache.save(path)
    data, want = path.read_bytes(), contents(path)
    bad, again = tmp_path / "bad.safetensors", tmp_path / "again.safetensors"
    outcomes = {"refused": 0, "identical": 0}
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x21
        bad.write_bytes(bytes(flipped))
        try:
            loaded = turbokv.TurboCache.load(bad, model.config)
        except CacheFileError as e:
            assert str(bad) in str(e)
            outcomes["refused"] += 1
            continue
        loaded.save(again)
        assert contents(again) == want, f"byte {i} flipped: a different cache loaded"
        outcomes["identical"] += 1
    assert outcomes["refused"] > 0.9 * len(data), outcomes


def test_edited_tensor_list_is_refused(saved):
    model, path = saved
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    tensors["layers.0.k"] = tensors["layers.0.k"][:, :, :-1].contiguous()  # one token fewer, header unchanged
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CacheFileError, match=r"tensor 'layers\.0\.k': got shape .* expected the header's"):
        turbokv.TurboCache.load(path, model.config)
    del tensors["layers.0.k"]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CacheFileError, match=r"tensors: got .* expected the header's .*'layers\.0\.k'"):
        turbokv.TurboCache.load(path, model.config)


def test_newer_format_version_is_refused(saved):
    model, path = saved
    rewrite(path, lambda meta: meta.update({"turbokv.format_version": str(FORMAT_VERSION + 1)}))
    with pytest.raises(
        CacheFileError, match=rf"format_version: got {FORMAT_VERSION + 1} .* expected <= {FORMAT_VERSION}"
    ):
        turbokv.TurboCache.load(path, model.config)


def test_plain_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, path, metadata={"format": "pt"})
    with pytest.raises(CacheFileError, match="not a turbokv cache: metadata 'turbokv.format' is None"):
        turbokv.TurboCache.load(path, build("llama64").config)
    path.write_bytes(b"plain text, not safetensors")
    with pytest.raises(CacheFileError, match="not a readable safetensors file"):
        turbokv.TurboCache.load(path, build("llama64").config)


def llama_config(**changes):
    kw = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, **COMMON)
    kw.update(changes)
    return transformers.LlamaConfig(**kw)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_hidden_layers=4), "layer count: got 3 in the file, expected the config's num_hidden_layers=4"),
        (dict(head_dim=32), r"layers\[0\]\.head_dim: got 64 in the file, expected the config's 32"),
        (dict(num_key_value_heads=1), r"layers\[0\]\.kv_heads: got 2 in the file, expected the config's 1"),
    ],
)
def test_another_models_config_is_refused(saved, changes, message):
    model, path = saved
    assert turbokv.TurboCache.load(path, llama_config()).get_seq_length() == PREFIX  # the same shape loads
    with pytest.raises(CacheFileError, match=message):
        turbokv.TurboCache.load(path, llama_config(**changes))


def test_another_models_layer_types_are_refused(gen, tmp_path):
    model = build("qwen3")
    ids, mask = inputs(gen)
    prefill(model, ids, mask, make_cache(model, "q4_0", "q4_0")).save(tmp_path / "c.safetensors")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.layer_types = ["full_attention"] * 3
    with pytest.raises(CacheFileError, match=r"layers\[1\]\.type: got 'sliding_attention' in the file, expected"):
        turbokv.TurboCache.load(tmp_path / "c.safetensors", config)
    config.model_type = "mistral"
    with pytest.raises(CacheFileError, match="model_type: got 'qwen3' in the file, expected the config's 'mistral'"):
        turbokv.TurboCache.load(tmp_path / "c.safetensors", config)


def test_asked_formats_and_rotations_are_checked(saved):
    """The file defines the formats; those the caller names (TurboCache's arguments) must match."""
    model, path = saved
    cache = turbokv.TurboCache.load(path, model.config, k="q4_0", v="turbo3", rotate_k="on", rotate_v="on")
    assert cache.layers[2].v_spec.format == "turbo3"
    with pytest.raises(CacheFileError, match=r"layers\[0\]\.k_format: got 'q4_0' in the file, expected 'q8_0'"):
        turbokv.TurboCache.load(path, model.config, k="q8_0", v="turbo3")
    with pytest.raises(
        CacheFileError, match=r"layers\[2\]\.k_format: got 'q4_0' in the file, expected 'q8_0' \(.*keep_last=1\)"
    ):
        turbokv.TurboCache.load(path, model.config, k="q4_0", v="turbo3", keep_last=1)
    with pytest.raises(CacheFileError, match=r"layers\[0\]\.k_rotation: got \{'group': 64, .* expected \{'group': 0"):
        turbokv.TurboCache.load(path, model.config, k="q4_0", v="turbo3", rotate_k="off")


def test_empty_cache_is_not_saved(tmp_path):
    model = build("llama64")
    with pytest.raises(ValueError, match="cache: layer 0 holds no tokens"):
        make_cache(model, "q4_0", "q4_0").save(tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


# ---------------------------------------------------------------- across devices (GPU machine)

CUDA_OK, CUDA_WHY = cuda_ready()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason=CUDA_WHY)
@pytest.mark.parametrize("src, dst", [("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("static", [False, True])
def test_save_on_one_device_load_on_another(src, dst, static, gen, tmp_path):
    """A cache saved from one device continues on the other: the same tokens as continuing it where it
    was made, logits within a quantization step (the new tokens are quantized by the other device)."""
    model = build("llama64").to(src)
    ids, mask = inputs(gen, device=src)
    with turbokv.patch(model):
        cache = prefill(model, ids, mask, make_cache(model, "q4_0", "turbo3", 64 if static else None))
        cache.save(tmp_path / "c.safetensors")
        ref = greedy(model, ids, mask, cache, disable_compile=True)
        model.to(dst)
        loaded = turbokv.TurboCache.load(tmp_path / "c.safetensors", model.config, device=dst)
        assert loaded.layers[0].k_packed.device.type == dst
        torch.testing.assert_close(
            loaded.layers[0].k_packed[:, :, :PREFIX].cpu(), cache.layers[0].k_packed[:, :, :PREFIX].cpu()
        )
        out = greedy(model, ids.to(dst), mask.to(dst), loaded, disable_compile=True)
    assert_same_generation(out, ref, exact=False)


@pytest.mark.parametrize("device", device_params())
def test_loaded_static_cache_compiles(device, gen, tmp_path):
    """generate() compiles the decode step on a loaded static cache (its buffers are static addresses)
    and gives the tokens of the eager decode on the same file."""
    from test_hf import compile_config

    torch._dynamo.reset()
    model = build("llama64").to(device)
    ids, mask = inputs(gen, device=device)
    with turbokv.patch(model):
        prefill(model, ids, mask, make_cache(model, "q4_0", "turbo3", 64)).save(tmp_path / "c.safetensors")
        eager_cache = turbokv.TurboCache.load(tmp_path / "c.safetensors", model.config, device)
        eager = greedy(model, ids, mask, eager_cache, disable_compile=True)
        calls = turbokv_attention.calls
        compiled_cache = turbokv.TurboCache.load(tmp_path / "c.safetensors", model.config, device)
        compiled = greedy(model, ids, mask, compiled_cache, compile_config=compile_config(device))
        # Eager calls: the new turn's prefill only (the compiled decode steps do not run the Python function).
        assert turbokv_attention.calls - calls == model.config.num_hidden_layers
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())


@pytest.mark.parametrize("patched", [False, True])
def test_policy_cache_with_offsets_and_windows_round_trips(patched, gen, tmp_path):
    """A cache as a calibrated policy builds it (key offsets, 2 sink + 5 recent tokens exact) continues
    from its file as it continues unsaved; the file is version 2 and its window fields are checked."""
    model = build("llama64")
    ids, mask = inputs(gen)
    offsets = torch.randn(model.config.num_hidden_layers, 2, 64, generator=gen)

    def fresh(max_cache_len=None):
        kw = dict(k="q4_0", v="turbo3", sink_tokens=2, recent_tokens=5, max_cache_len=max_cache_len)
        cache = turbokv.TurboCache(model.config, **kw)
        for layer, m in zip(cache.turbo_layers, offsets, strict=True):
            layer.set_k_offset(m)
        return cache

    path = tmp_path / "c.safetensors"
    with turbokv.patch(model) if patched else contextlib.nullcontext():
        cache = prefill(model, ids, mask, fresh())
        cache.save(path)
        ref = greedy(model, ids, mask, cache)
        loaded = turbokv.TurboCache.load(path, model.config)
        pairs = zip(loaded.turbo_layers, cache.turbo_layers, strict=True)
        assert all(torch.equal(a.k_offset, b.k_offset) for a, b in pairs)
        assert all((lay.sink_tokens, lay.recent_tokens) == (2, 5) for lay in loaded.turbo_layers)
        assert_same_generation(greedy(model, ids, mask, loaded), ref, exact=True)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["turbokv.format_version"] == "2" == str(FORMAT_VERSION)
    asked = dict(k="q4_0", v="turbo3", rotate_k="on", rotate_v="on")
    loaded = turbokv.TurboCache.load(path, model.config, sink_tokens=2, recent_tokens=5, **asked)
    assert all((lay.sink_tokens, lay.recent_tokens) == (2, 5) for lay in loaded.turbo_layers)
    with pytest.raises(CacheFileError, match=r"layers\[0\]\.recent_tokens: got 5 in the file, expected 16"):
        turbokv.TurboCache.load(path, model.config, sink_tokens=2, recent_tokens=16, **asked)
    with pytest.raises(CacheFileError, match=r"layers\[0\]\.sink_tokens: got 2 in the file, expected 0"):
        turbokv.TurboCache.load(path, model.config, sink_tokens=0, **asked)
    # Into a static cache, and a static cache's own file: the same continuation.
    with turbokv.patch(model) if patched else contextlib.nullcontext():
        static = turbokv.TurboCache.load(path, model.config, max_cache_len=64)
        assert static.is_compileable and all(lay.exact is not None for lay in static.turbo_layers)
        assert_same_generation(greedy(model, ids, mask, static), ref, exact=False)
        static_path = tmp_path / "static.safetensors"
        prefill(model, ids, mask, fresh(64)).save(static_path)
        again = turbokv.TurboCache.load(static_path, model.config)
        assert again.is_compileable
        assert_same_generation(greedy(model, ids, mask, again), ref, exact=False)

    edit_header(path, lambda header: header["layers"][1].update(recent_start=10))
    with pytest.raises(CacheFileError, match=r"layers\[1\].recent_start: got 10, expected 11"):
        turbokv.TurboCache.load(path, model.config)
