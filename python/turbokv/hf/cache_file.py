"""Saving a TurboCache to disk and loading it back: prompt caching across processes.

A long system prompt or document is prefilled once, its cache saved, and any later process loads
it and continues generating (the same model, the same prompt prefix), as llama.cpp's state files.

The file is safetensors (tensors and string metadata, no pickle). Its metadata holds:

* ``turbokv.format``: ``"turbokv-cache"`` (what marks a cache file);
* ``turbokv.format_version``: the layout version, an integer (:data:`FORMAT_VERSION`);
* ``turbokv.version``: the writer's turbokv version (informative);
* ``turbokv.header``: JSON ``{"model_type", "max_cache_len", "layers": [...]}``; each layer entry
  has its ``type`` (the config's layer type) and ``tensors``: ``{name: {"shape", "dtype", "sha256"}}``.
  An attention layer adds its K/V formats, rotate policies and rotations (group, seed), head dim,
  batch size, KV heads, token count (``length``), the model's dtype, sliding window and attention
  chunk size; a linear-attention / conv layer (transformers' own cache layer, kept by TurboCache)
  adds its token count and, per state slot, which states it holds, its conv kernel size and
  whether it has seen a previous step; a KV-shared layer (it reads an earlier layer's cache) only
  names that layer (``kv_source``).

Tensors: ``layers.{i}.k`` / ``layers.{i}.v``, the packed ``(B, Hkv, length, row_bytes)`` uint8 K/V
(the valid tokens, not the capacity slack); ``layers.{i}.conv.{s}`` / ``layers.{i}.recurrent.{s}``,
a state layer's states as transformers holds them. Version 2 adds, where an attention layer has
them: ``layers.{i}.k_offset`` (its key offset, ``(Hkv, d)`` float32) and the exact token windows
(turbokv.hf.exact_tokens; entry fields ``sink_tokens``, ``recent_tokens``, ``recent_start``):
``layers.{i}.sink_k`` / ``sink_v`` / ``recent_k`` / ``recent_v``, ``(B, Hkv, n, d)`` f16 / bf16. A
file without them is written as version 1, which earlier turbokv versions read.

``turbokv.header_sha256`` is the sha256 of the format, its version and the header (which holds every
tensor's sha256): one check covers the header and the data together (files written before it have
none). Loading checks, each failure naming the field, the value seen and the one expected: the file
is a turbokv cache of a version this code reads, the header matches its hash, every tensor's bytes
match the header's sha256 and
its shape the header's (a truncated, corrupted or edited file), and the header matches the model
config (model type, layer count, layer types, KV heads, head dim, sliding window, chunk size,
KV-sharing sources). Formats and rotations come from the file; they are checked only against what
the caller asks for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import turbokv
from turbokv.core import formats, ops
from turbokv.core.rotation import Rotation
from turbokv.hf.layer import HYBRID_LAYER_TYPES, STATE_LAYER_TYPES, SideSpec, TurboLayer

if TYPE_CHECKING:  # annotations only: cache.py imports this module
    from turbokv.hf.cache import TurboCache

FORMAT_NAME = "turbokv-cache"
# 2: an attention layer may hold a key offset (a calibrated policy) and exact token windows.
FORMAT_VERSION = 2
# Version 2's per-layer tensors: the key offset (Hkv, d) float32 and the exact windows' rows
# (B, Hkv, n, d) in their f16 / bf16 dtype.
WINDOW_TENSORS = ("sink_k", "sink_v", "recent_k", "recent_v")
EXTENDED_TENSORS = ("k_offset", *WINDOW_TENSORS)
# The model dtypes a TurboLayer can hold (what its update accepts).
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# The hash of what decides how the bytes decode: the format, its version and the header (formats,
# rotations and seeds, offsets, windows, shapes, lengths, and every tensor's sha256), so one check
# covers the header and the data together. Files written before it have none and load as before.
HEADER_HASH = "turbokv.header_sha256"


def header_sha256(meta: dict[str, str]) -> str:
    """The integrity hash of a cache file's metadata (see HEADER_HASH)."""
    text = "\n".join(str(meta.get(key)) for key in ("turbokv.format", "turbokv.format_version", "turbokv.header"))
    return hashlib.sha256(text.encode()).hexdigest()


class CacheFileError(ValueError):
    """A cache file that cannot be loaded for this model: the message names the file, the field,
    the value seen and the value expected."""


# ---------------------------------------------------------------------- save


def save(cache: TurboCache, path: str | os.PathLike) -> None:
    """Write ``cache`` (a TurboCache, every layer initialized, e.g. after a prefill) to ``path``.

    The file is written next to ``path`` and renamed into place, so a reader never sees half a file.
    """
    hybrid = [i for i, kind in enumerate(cache.layer_types) if kind in HYBRID_LAYER_TYPES]
    if hybrid:
        raise NotImplementedError(
            f"cache: layers {hybrid} are hybrid (attention K/V and a recurrent state in one layer: Falcon-H1, "
            "Zamba), which this file format does not store yet"
        )
    attention_length = next((lay.length for lay in cache.turbo_layers if lay.is_initialized), 0)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, kind, layer in _model_layers(cache):
        if layer is None:
            entry, named = {"type": kind, "length": 0, "kv_source": cache.kv_sources[i]}, {}
        elif isinstance(layer, TurboLayer):
            entry, named = _turbo_entry(i, kind, layer)
        else:
            entry, named = _state_entry(i, kind, layer, attention_length)
        entry["tensors"] = {name: _describe(t) for name, t in named.items()}
        tensors.update(named)
        layers.append(entry)
    turbo = cache.turbo_layers
    header = {
        "model_type": cache.model_type,
        "max_cache_len": turbo[0].max_cache_len,
        "layers": layers,
    }
    # Version 2 only where a layer holds what version 1 has no field for: older readers load the rest.
    extended = any(name.rsplit(".", 1)[-1] in EXTENDED_TENSORS for name in tensors)
    metadata = {
        "turbokv.format": FORMAT_NAME,
        "turbokv.format_version": str(FORMAT_VERSION if extended else 1),
        "turbokv.version": turbokv.__version__,
        "turbokv.header": json.dumps(header),
    }
    metadata[HEADER_HASH] = header_sha256(metadata)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _model_layers(cache: TurboCache) -> list[tuple[int, str, Any]]:
    """``(index, layer type, cache layer)`` for each model layer; the layer is None for a KV-shared layer
    (it reads an earlier layer's cache; transformers holds a placeholder for it, or nothing)."""
    shared = getattr(cache, "kv_sources", {})
    return [(i, kind, None if i in shared else cache.layers[i]) for i, kind in enumerate(cache.layer_types)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _describe(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "sha256": _sha256(t)}


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _rotation_dict(rot: Rotation) -> dict[str, int | None]:
    return {"group": rot.group, "seed": rot.seed}


def _turbo_entry(i: int, kind: str, layer: TurboLayer) -> tuple[dict, dict[str, torch.Tensor]]:
    if not layer.is_initialized:
        raise ValueError(f"cache: layer {i} holds no tokens (never updated); save a cache after the prompt's forward")
    n = layer.length
    b, h = layer.k_packed.shape[:2]
    entry = {
        "type": kind,
        "k_format": layer.k_spec.format,
        "v_format": layer.v_spec.format,
        "k_rotate": layer.k_spec.rotate,
        "v_rotate": layer.v_spec.rotate,
        "k_rotation": _rotation_dict(layer.k_rot),
        "v_rotation": _rotation_dict(layer.v_rot),
        "head_dim": layer.head_dim,
        "batch": b,
        "kv_heads": h,
        "length": n,
        "dtype": _dtype_name(layer.dtype),
        "sliding_window": layer.sliding_window,
        "chunk_size": getattr(layer, "chunk_size", None),
    }
    named = {f"layers.{i}.k": _host(layer.k_packed[:, :, :n]), f"layers.{i}.v": _host(layer.v_packed[:, :, :n])}
    if layer.k_offset is not None:
        named[f"layers.{i}.k_offset"] = _host(layer.k_offset)
    if layer.exact is not None:
        w = layer.exact
        rows, r0 = w.saved(n)
        entry.update(sink_tokens=w.sink, recent_tokens=w.recent, recent_start=r0)
        named.update({f"layers.{i}.{name}": _host(t) for name, t in rows.items() if t.shape[2]})
    return entry, named


def _state_entry(i: int, kind: str, layer, attention_length: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A linear-attention / conv layer: transformers' LinearAttentionLayer, its states as they are."""
    if getattr(layer, "record_past", False):
        raise ValueError(
            f"cache: layer {i} ({kind}) records past states for assisted generation's rollback; "
            "save a cache filled by a plain forward or generate()"
        )
    states, named = [], {}
    for s in range(layer.number_of_states):
        conv, rec = layer.is_conv_states_initialized[s], layer.is_recurrent_states_initialized[s]
        states.append(
            {
                "conv": conv,
                "recurrent": rec,
                "conv_kernel_size": layer.conv_kernel_size[s],
                "has_previous": layer.has_previous_state[s],
            }
        )
        if conv:
            named[f"layers.{i}.conv.{s}"] = _host(layer.conv_states[s])
        if rec:
            named[f"layers.{i}.recurrent.{s}"] = _host(layer.recurrent_states[s])
    if not named:
        raise ValueError(f"cache: layer {i} ({kind}) holds no state (never updated); save a cache after a forward")
    # transformers >= 5.24 counts tokens in the state layer too; older ones only in attention layers.
    counter = getattr(layer, "cumulative_length_linear", None)
    length = int(counter) if counter is not None else attention_length
    return {"type": kind, "length": length, "states": states}, named


# ---------------------------------------------------------------------- load


def load(
    path: str | os.PathLike,
    config,
    build: Callable[..., TurboCache],
    device: str | torch.device = "cpu",
    max_cache_len: int | None = None,
    **expected,
) -> TurboCache:
    """A TurboCache holding what ``path`` holds, for a model of ``config``, on ``device``.

    ``build(config, **kwargs)`` makes the empty cache (``TurboCache.for_config``).

    ``max_cache_len``: None keeps the saved capacity (static if the saved cache was static);
    an int gives a static cache of that many tokens (at least the saved token count).
    ``expected``: TurboCache constructor arguments (``k``, ``v``, ``rotate_k``, ``overrides``, ...);
    when given, the file's formats and rotations must be those of ``TurboCache(config, **expected)``
    (its defaults fill the arguments not named). Raises :class:`CacheFileError` (a ValueError)
    naming what does not match.
    """
    path = os.fspath(path)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    device = torch.device(device)
    header, tensors = _read(path)
    layers = header["layers"]
    longest = max(entry["length"] for entry in layers)
    if max_cache_len is None:
        cap = header["max_cache_len"]
        if cap is not None and cap < longest:
            raise _fail(path, f"header.max_cache_len: got {cap}, expected >= the {longest} saved tokens (edited?)")
    else:
        cap = max_cache_len
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < longest:
            raise ValueError(f"max_cache_len: got {cap!r}, expected an int >= the {longest} tokens saved in {path}")
    cache = build(config, max_cache_len=cap)
    _check_model(path, header, config, cache)
    if expected:
        _check_expected(path, layers, build(config, **expected), expected)
    for i, _, layer in _model_layers(cache):
        if isinstance(layer, TurboLayer):
            _restore_turbo(path, i, layers[i], layer, tensors, device)
        elif layer is not None:
            _restore_state(i, layers[i], layer, tensors, device)
    return cache


def _fail(path: str, what: str) -> CacheFileError:
    return CacheFileError(f"{path}: {what}")


def _read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked header and the checked tensors (on the CPU)."""
    if not os.path.isfile(path):
        raise _fail(path, "not a file; expected a cache file written by TurboCache.save")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("turbokv.format") != FORMAT_NAME:
                raise _fail(
                    path,
                    f"not a turbokv cache: metadata 'turbokv.format' is {meta.get('turbokv.format')!r}, expected "
                    f"{FORMAT_NAME!r} (a file written by TurboCache.save)",
                )
            if HEADER_HASH in meta and meta[HEADER_HASH] != header_sha256(meta):
                raise _fail(
                    path,
                    f"{HEADER_HASH}: got {meta[HEADER_HASH]!r}, expected {header_sha256(meta)!r}, the hash of the "
                    "header as stored (an edited or damaged header)",
                )
            header = _parse_header(path, meta)
            listed = {name: spec for entry in header["layers"] for name, spec in entry["tensors"].items()}
            if names != set(listed):
                raise _fail(
                    path,
                    f"tensors: got {sorted(names)}, expected the header's {sorted(listed)} (an edited file)",
                )
            tensors = {name: f.get_tensor(name) for name in sorted(names)}
    except (SafetensorError, OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"not a readable safetensors file ({e}); a truncated or damaged file?") from e
    for name, spec in listed.items():
        _check_tensor(path, name, tensors[name], spec)
    return header, tensors


def _parse_header(path: str, meta: dict[str, str]) -> dict:
    version = meta.get("turbokv.format_version", "")
    if not version.isdigit():
        raise _fail(path, f"turbokv.format_version: got {version!r}, expected an integer")
    if int(version) > FORMAT_VERSION:
        raise _fail(
            path,
            f"turbokv.format_version: got {version} (written by turbokv {meta.get('turbokv.version')}), expected "
            f"<= {FORMAT_VERSION}, what turbokv {turbokv.__version__} reads; upgrade turbokv to load it",
        )
    try:
        header = json.loads(meta.get("turbokv.header", ""))
    except json.JSONDecodeError as e:
        raise _fail(path, f"turbokv.header: not JSON ({e})") from e
    _field(path, header, "model_type", str, "header", optional=True)
    _field(path, header, "max_cache_len", int, "header", optional=True)
    layers = _field(path, header, "layers", list, "header")
    if not layers:
        raise _fail(path, "header.layers: got an empty list, expected one entry per model layer")
    for i, entry in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where}: got {entry!r}, expected a JSON object")
        kind = _field(path, entry, "type", str, where)
        _field(path, entry, "length", int, where)
        for name, spec in _field(path, entry, "tensors", dict, where).items():
            if not isinstance(spec, dict):
                raise _fail(path, f"{where}.tensors[{name!r}]: got {spec!r}, expected a JSON object")
            _field(path, spec, "shape", list, f"{where}.tensors[{name!r}]")
            _field(path, spec, "dtype", str, f"{where}.tensors[{name!r}]")
            _field(path, spec, "sha256", str, f"{where}.tensors[{name!r}]")
        if _field(path, entry, "kv_source", int, where, optional=True) is not None:
            continue
        if kind in STATE_LAYER_TYPES:
            for s, state in enumerate(_field(path, entry, "states", list, where)):
                for key, typ in (("conv", bool), ("recurrent", bool), ("has_previous", bool)):
                    _field(path, state, key, typ, f"{where}.states[{s}]")
                _field(path, state, "conv_kernel_size", int, f"{where}.states[{s}]", optional=True)
            continue
        for key in ("k_format", "v_format", "k_rotate", "v_rotate", "dtype"):
            _field(path, entry, key, str, where)
        for key in ("head_dim", "batch", "kv_heads"):
            _field(path, entry, key, int, where)
        _field(path, entry, "sliding_window", int, where, optional=True)
        for key in ("sink_tokens", "recent_tokens", "recent_start"):
            if (_field(path, entry, key, int, where, optional=True) or 0) < 0:
                raise _fail(path, f"{where}.{key}: got {entry[key]}, expected >= 0")
        _field(path, entry, "chunk_size", int, where, optional=True)
        for key in ("k_rotation", "v_rotation"):
            rot = _field(path, entry, key, dict, where)
            _field(path, rot, "group", int, f"{where}.{key}")
            _field(path, rot, "seed", int, f"{where}.{key}", optional=True)
    return header


def _field(path: str, obj: dict, key: str, typ: type, where: str, optional: bool = False):
    """``obj[key]``, of type ``typ`` (or None when ``optional``); a CacheFileError naming it otherwise."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None and optional:
        return None
    # bool is an int in Python: an int field must not be a bool, a bool field must be one.
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise _fail(path, f"{where}.{key}: got {value!r}, expected a {typ.__name__}")
    return value


def _check_tensor(path: str, name: str, t: torch.Tensor, spec: dict) -> None:
    seen = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    for key, got in seen.items():
        if got != spec[key]:
            raise _fail(path, f"tensor {name!r}: got {key} {got}, expected the header's {spec[key]} (an edited file)")
    digest = _sha256(t)
    if digest != spec["sha256"]:
        raise _fail(
            path,
            f"tensor {name!r}: got sha256 {digest}, expected the header's {spec['sha256']} "
            "(the file was modified or corrupted)",
        )


def _config_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_model(path: str, header: dict, config, cache: TurboCache) -> None:
    """The file was written for a model of this config's shape."""
    layers = header["layers"]
    saved_type, model_type = header.get("model_type"), getattr(config, "model_type", None)
    if saved_type and model_type and saved_type != model_type:
        raise _fail(path, f"model_type: got {saved_type!r} in the file, expected the config's {model_type!r}")
    if len(layers) != len(cache.layer_types):
        n = len(cache.layer_types)
        raise _fail(path, f"layer count: got {len(layers)} in the file, expected the config's num_hidden_layers={n}")
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = _config_head_dim(config)
    sources = getattr(cache, "kv_sources", {})
    for i, kind, layer in _model_layers(cache):
        entry = layers[i]
        if entry["type"] != kind:
            raise _fail(path, f"layers[{i}].type: got {entry['type']!r} in the file, expected the config's {kind!r}")
        if entry.get("kv_source") != sources.get(i):
            raise _fail(
                path,
                f"layers[{i}].kv_source (the layer whose K/V it reads): got {entry.get('kv_source')} in the file, "
                f"expected the config's {sources.get(i)}",
            )
        if layer is None:
            _check_names(path, i, entry, [])
            continue
        if not isinstance(layer, TurboLayer):
            if len(entry["states"]) != layer.number_of_states:
                raise _fail(
                    path,
                    f"layers[{i}].states: got {len(entry['states'])} state slots in the file, expected the "
                    f"config's {layer.number_of_states}",
                )
            names = [f"layers.{i}.{what}.{s}" for s, st in enumerate(entry["states"]) for what in _held(st)]
            _check_names(path, i, entry, names)
            continue
        _check_names(path, i, entry, [f"layers.{i}.k", f"layers.{i}.v", *_extended_names(i, entry)])
        shape = (
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("sliding_window", layer.sliding_window),
            ("chunk_size", getattr(layer, "chunk_size", None)),
        )
        for what, want in shape:
            if entry.get(what) != want:
                raise _fail(path, f"layers[{i}].{what}: got {entry[what]} in the file, expected the config's {want}")
        for side in ("k", "v"):
            fmt = entry[f"{side}_format"]
            if fmt not in formats.FORMATS:
                raise _fail(path, f"layers[{i}].{side}_format: got {fmt!r}, expected one of {sorted(formats.FORMATS)}")
        if entry["dtype"] not in DTYPES:
            raise _fail(path, f"layers[{i}].dtype: got {entry['dtype']!r}, expected one of {sorted(DTYPES)}")
        rb = {side: formats.row_bytes(entry[f"{side}_format"], head_dim) for side in ("k", "v")}
        for side in ("k", "v"):
            want = [entry["batch"], kv_heads, entry["length"], rb[side]]
            got = entry["tensors"].get(f"layers.{i}.{side}", {}).get("shape")
            if got != want:
                raise _fail(
                    path,
                    f"tensor 'layers.{i}.{side}': got shape {got}, expected (batch, kv_heads, length, row bytes) "
                    f"{want} from the header's layer entry (an edited file)",
                )


def _extended_names(i: int, entry: dict) -> list[str]:
    """Version 2's tensors of an attention layer entry: those of its key offset and exact windows."""
    names = [f"layers.{i}.k_offset"] if f"layers.{i}.k_offset" in entry["tensors"] else []
    if entry.get("sink_tokens") or entry.get("recent_tokens"):
        names += [f"layers.{i}.{name}" for name in WINDOW_TENSORS if f"layers.{i}.{name}" in entry["tensors"]]
    return names


def _held(state: dict) -> list[str]:
    return [what for what in ("conv", "recurrent") if state[what]]


def _check_names(path: str, i: int, entry: dict, names: list[str]) -> None:
    if sorted(entry["tensors"]) != sorted(names):
        raise _fail(path, f"layers[{i}].tensors: got {sorted(entry['tensors'])}, expected {sorted(names)}")


def _check_expected(path: str, layers: list[dict], want: TurboCache, expected: dict) -> None:
    """The file's formats and rotations are those of ``want`` (TurboCache(config, **expected))."""
    asked = ", ".join(f"{k}={v!r}" for k, v in expected.items())
    for i, _, layer in _model_layers(want):
        if not isinstance(layer, TurboLayer):
            continue
        entry = layers[i]
        for name in ("sink_tokens", "recent_tokens"):
            # A window size named by the caller must be the file's: the saved tokens outside the
            # windows are already quantized, so a load cannot widen or narrow a window.
            got, want_n = entry.get(name) or 0, getattr(layer, name)
            if name in expected and got != want_n:
                raise _fail(path, f"layers[{i}].{name}: got {got} in the file, expected {want_n} ({asked})")
        for side, spec in (("k", layer.k_spec), ("v", layer.v_spec)):
            got_fmt = entry[f"{side}_format"]
            if got_fmt != spec.format:
                raise _fail(
                    path, f"layers[{i}].{side}_format: got {got_fmt!r} in the file, expected {spec.format!r} ({asked})"
                )
            got_rot = _rotation(path, i, side, entry)
            want_rot = spec.rotation(entry["head_dim"], side)
            if got_rot != want_rot:
                raise _fail(
                    path,
                    f"layers[{i}].{side}_rotation: got {_rotation_dict(got_rot)} in the file, expected "
                    f"{_rotation_dict(want_rot)} ({asked})",
                )


def _rotation(path: str, i: int, side: str, entry: dict) -> Rotation:
    rot = entry[f"{side}_rotation"]
    try:
        return Rotation(rot["group"], rot["seed"])
    except ValueError as e:
        raise _fail(path, f"layers[{i}].{side}_rotation: {e}") from e


def _restore_turbo(path: str, i: int, entry: dict, layer: TurboLayer, tensors: dict, device: torch.device) -> None:
    b, h, n, d = entry["batch"], entry["kv_heads"], entry["length"], entry["head_dim"]
    k_rot, v_rot = _rotation(path, i, "k", entry), _rotation(path, i, "v", entry)
    try:
        layer.k_spec = SideSpec(entry["k_format"], entry["k_rotate"])
        layer.v_spec = SideSpec(entry["v_format"], entry["v_rotate"])
    except ValueError as e:
        raise _fail(path, f"layers[{i}]: {e}") from e
    # The layer sizes and allocates itself from the shape of a first update: an expanded scalar
    # gives that shape without allocating (B, Hkv, n, d) values.
    like = torch.empty((), dtype=DTYPES[entry["dtype"]], device=device).expand(b, h, n, d)
    layer.sink_tokens, layer.recent_tokens = entry.get("sink_tokens") or 0, entry.get("recent_tokens") or 0
    layer.lazy_initialization(like, like)
    # The data was rotated as the file says (a later turbokv may pick other auto rotations).
    layer.k_rot, layer.v_rot = k_rot, v_rot
    layer.k_packed[:, :, :n].copy_(tensors[f"layers.{i}.k"])
    layer.v_packed[:, :, :n].copy_(tensors[f"layers.{i}.v"])
    offset = tensors.get(f"layers.{i}.k_offset")
    if offset is not None:
        if tuple(offset.shape) != (h, d):
            raise _fail(path, f"tensor 'layers.{i}.k_offset': got shape {list(offset.shape)}, expected {[h, d]}")
        layer.set_k_offset(offset.to(device))
    if layer.exact is not None:
        _restore_windows(path, i, entry, layer, tensors, device)
    layer.length = n


def _restore_windows(path: str, i: int, entry: dict, layer, tensors: dict, device: torch.device) -> None:
    """The exact windows' rows, checked against the entry: the sink holds min(s, length) tokens, the
    recent store the positions [recent_start, length), each (batch, kv_heads, n, head_dim) in the
    store's dtype. The recent rows are packed again at their positions: they are read from the packed
    cache once they leave the window (files written before every token was packed on arrival lack them)."""
    w = layer.exact
    b, h, n, d = entry["batch"], entry["kv_heads"], entry["length"], entry["head_dim"]
    start = entry.get("recent_start") or 0
    if start != w._recent_start(n):
        raise _fail(path, f"layers[{i}].recent_start: got {start}, expected {w._recent_start(n)} for {n} tokens")
    counts = {"sink": min(w.sink, n), "recent": n - start}
    rows = {}
    for name in WINDOW_TENSORS:
        t = tensors.get(f"layers.{i}.{name}")
        want = [b, h, counts[name.split("_")[0]], d]
        if t is None and want[2] == 0:
            rows[name] = torch.empty(want, dtype=w.dtype, device=device)
            continue
        if t is None or list(t.shape) != want or t.dtype != w.dtype:
            got = None if t is None else (list(t.shape), t.dtype)
            raise _fail(path, f"tensor 'layers.{i}.{name}': got {got}, expected shape {want} of dtype {w.dtype}")
        rows[name] = t.to(device)
    w.restore(n, rows)
    if counts["recent"]:
        positions = torch.arange(start, n, device=device).expand(b, -1)
        ops.cache_append(
            layer.k_packed,
            layer.v_packed,
            rows["recent_k"],
            rows["recent_v"],
            positions,
            layer.k_spec.format,
            layer.v_spec.format,
            layer.k_rot,
            layer.v_rot,
        )


def _restore_state(i: int, entry: dict, layer, tensors: dict, device: torch.device) -> None:
    """Fill transformers' LinearAttentionLayer through its own lazy initialization (its static addresses)."""
    for s, state in enumerate(entry["states"]):
        if state["conv"]:
            t = tensors[f"layers.{i}.conv.{s}"].to(device)
            layer.lazy_initialization(conv_states=t, state_idx=s, conv_kernel_size=state["conv_kernel_size"])
            layer.conv_states[s].copy_(t)
        if state["recurrent"]:
            t = tensors[f"layers.{i}.recurrent.{s}"].to(device)
            layer.lazy_initialization(recurrent_states=t, state_idx=s)
            layer.recurrent_states[s].copy_(t)
        layer.has_previous_state[s] = state["has_previous"]
    counter = getattr(layer, "cumulative_length_linear", None)
    if counter is not None:
        counter.fill_(entry["length"])
