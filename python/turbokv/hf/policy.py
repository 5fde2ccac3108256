"""Cache policies: per layer and side a format and rotation, plus per-head key offsets.

A policy is what ``turbokv calibrate`` writes and ``TurboCache.from_policy`` reads: a JSON
file (human-readable: formats, rotations, bits, how it was calibrated) and, when key offsets
are kept, a safetensors file beside it holding them (``k_offsets``: ``(layers, kv_heads,
head_dim)`` float32; a layer without an offset has zeros there and ``"k_offset": false``).

Key offsets are exact shifts: softmax ignores a per-query constant, so storing ``k - m``
instead of ``k`` leaves every attention score's softmax unchanged (``q·(k - m) = q·k - q·m``)
while the quantizer no longer has to cover the keys' common component ``m``. They are not
exact under logit softcapping (tanh is not shift-invariant): a policy with offsets is refused
for such a config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from turbokv.core import formats

VERSION = 1
ROTATE_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class LayerPolicy:
    """One attention layer: K and V format and rotation, and whether its keys are shifted."""

    k: str
    v: str
    rotate_k: str = "auto"
    rotate_v: str = "auto"
    k_offset: bool = False


@dataclass
class Policy:
    """Per-layer formats for one model shape; ``k_offsets``: ``(layers, kv_heads, head_dim)`` or None.

    ``layers[i]`` is None for a layer that holds no attention K/V (a hybrid model's linear-attention
    or conv layers). ``info`` records how the policy was made (bits, budget, calibration text, ...).
    """

    model_type: str | None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layers: list[LayerPolicy | None]
    k_offsets: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    # Exact token windows (turbokv.hf.exact_tokens), every attention layer: the first and the last tokens in f16.
    sink_tokens: int = 0
    recent_tokens: int = 0

    def bits_per_value(self, tokens: int | None = None) -> float:
        """Mean stored bits per K/V value over the attention layers; with ``tokens``, counted at that
        length: the offsets' storage (one fp16 vector per layer and KV head) spread over it, and the
        exact windows' tokens at 16 bits on top of the packed rows (the packed buffer keeps a row for
        every position: turbokv.hf.exact_tokens)."""
        attn = [lp for lp in self.layers if lp is not None]
        bits = sum(
            formats.bits_per_value(lp.k, self.head_dim) + formats.bits_per_value(lp.v, self.head_dim) for lp in attn
        )
        if tokens:
            bits += 2 * 16.0 * min(tokens, self.sink_tokens + self.recent_tokens) / tokens * len(attn)
            bits += sum(16.0 / tokens for lp in attn if lp.k_offset)
        return bits / (2 * len(attn))

    def save(self, path: str | Path) -> None:
        """Write ``path`` (JSON) and, with offsets, ``path`` with suffix ``.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        offsets = None
        if self.k_offsets is not None and any(lp is not None and lp.k_offset for lp in self.layers):
            offsets = path.with_suffix(".safetensors")
            save_file({"k_offsets": self.k_offsets.float().contiguous()}, str(offsets))
        payload = {
            "turbokv_policy": VERSION,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "offsets_file": offsets.name if offsets else None,
            # The packed formats alone; info["bits_per_value"] counts offsets and windows at info["counted_at_tokens"].
            "packed_bits_per_value": round(self.bits_per_value(), 4),
            "layers": [None if lp is None else asdict(lp) for lp in self.layers],
            "sink_tokens": self.sink_tokens,
            "recent_tokens": self.recent_tokens,
            "info": self.info,
        }
        path.write_text(json.dumps(payload, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file (and its offsets file); ``ValueError`` naming the file and the field
        for anything malformed: formats, rotations, windows, the offsets' shape and finiteness."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"policy: got {path}, expected an existing policy JSON file")
        try:
            return cls._parse(path)
        except ValueError as e:
            raise ValueError(str(e).replace("policy:", f"policy {path}:", 1)) from e

    @classmethod
    def _parse(cls, path: Path) -> Policy:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"policy: not a JSON file ({e})") from e
        if not isinstance(raw, dict) or raw.get("turbokv_policy") != VERSION:
            got = raw.get("turbokv_policy") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"policy: turbokv_policy got {got!r}, expected {VERSION}")
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            if isinstance(raw.get(key), bool) or not isinstance(raw.get(key), int) or raw[key] < 1:
                raise ValueError(f"policy: {key} got {raw.get(key)!r}, expected a positive int")
        layers = raw.get("layers")
        if not isinstance(layers, list) or len(layers) != raw["num_layers"]:
            n = len(layers) if isinstance(layers, list) else layers
            raise ValueError(f"policy: layers got {n!r} entries, expected num_layers={raw['num_layers']}")
        parsed = [None if entry is None else _layer(i, entry) for i, entry in enumerate(layers)]
        if all(lp is None for lp in parsed):
            raise ValueError("policy: layers has no attention layer (every entry is null)")
        want = (raw["num_layers"], raw["num_kv_heads"], raw["head_dim"])
        offsets = _load_offsets(path, raw.get("offsets_file"), want) if raw.get("offsets_file") is not None else None
        if offsets is None and any(lp is not None and lp.k_offset for lp in parsed):
            raise ValueError("policy: layers ask for k_offset but offsets_file is missing")
        for key in ("sink_tokens", "recent_tokens"):  # absent in policies written before exact windows: 0
            value = raw.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WINDOW:
                raise ValueError(f"policy: {key} got {value!r}, expected an int in [0, {MAX_WINDOW}]")
        info = raw.get("info") or {}
        if not isinstance(info, dict):
            raise ValueError(f"policy: info got {type(info).__name__}, expected an object")
        return cls(
            raw.get("model_type"),
            raw["num_layers"],
            raw["num_kv_heads"],
            raw["head_dim"],
            parsed,
            offsets,
            info,
            raw.get("sink_tokens", 0),
            raw.get("recent_tokens", 0),
        )


# Exact window sizes a policy may ask for: far above any useful size, far below what would not fit.
MAX_WINDOW = 1 << 20


def _load_offsets(path: Path, name, shape: tuple[int, int, int]) -> torch.Tensor:
    """The ``k_offsets`` tensor of the safetensors file ``name`` beside ``path``, checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"policy: offsets_file got {name!r}, expected the name of a file beside the policy")
    file = path.parent / name
    if not file.is_file():
        raise FileNotFoundError(f"policy {path}: offsets_file got {file}, which does not exist (keep it beside it)")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"policy: offsets_file {file} is not a safetensors file ({e})") from e
    if set(tensors) != {"k_offsets"}:
        raise ValueError(f"policy: offsets_file {file} holds {sorted(tensors)}, expected ['k_offsets']")
    offsets = tensors["k_offsets"]
    if tuple(offsets.shape) != shape or not offsets.is_floating_point():
        raise ValueError(
            f"policy: k_offsets in {file} got {offsets.dtype} {tuple(offsets.shape)}, expected floats of shape {shape}"
        )
    if not torch.isfinite(offsets).all():
        raise ValueError(f"policy: k_offsets in {file} has non-finite values, expected finite key offsets")
    return offsets.float()


def _layer(i: int, entry) -> LayerPolicy:
    if not isinstance(entry, dict):
        raise ValueError(f"policy: layers[{i}] got {entry!r}, expected an object with k, v formats")
    unknown = set(entry) - {"k", "v", "rotate_k", "rotate_v", "k_offset"}
    if unknown:
        raise ValueError(f"policy: layers[{i}] got unknown keys {sorted(unknown)}")
    for side in ("k", "v"):
        if entry.get(side) not in formats.FORMATS:
            raise ValueError(
                f"policy: layers[{i}].{side} got {entry.get(side)!r}, expected one of {sorted(formats.FORMATS)}"
            )
    for side in ("rotate_k", "rotate_v"):
        if entry.get(side, "auto") not in ROTATE_CHOICES:
            raise ValueError(f"policy: layers[{i}].{side} got {entry.get(side)!r}, expected one of {ROTATE_CHOICES}")
    if not isinstance(entry.get("k_offset", False), bool):
        raise ValueError(f"policy: layers[{i}].k_offset got {entry.get('k_offset')!r}, expected true or false")
    return LayerPolicy(**entry)


def check_against(policy: Policy, config) -> None:
    """Raise ``ValueError`` naming what differs between ``policy`` and a model ``config``."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for what, got, want in (
        ("num_layers", policy.num_layers, n),
        ("num_kv_heads", policy.num_kv_heads, heads),
        ("head_dim", policy.head_dim, head_dim),
    ):
        if got != want:
            raise ValueError(f"policy: {what} got {got}, expected the config's {want}; calibrate for this model")
    mt = getattr(config, "model_type", None)
    if policy.model_type is not None and mt is not None and policy.model_type != mt:
        raise ValueError(f"policy: model_type got {policy.model_type!r}, expected the config's {mt!r}")
    if getattr(config, "attn_logit_softcapping", None) and any(lp is not None and lp.k_offset for lp in policy.layers):
        raise ValueError(
            "policy: k_offset is not exact with attention logit softcapping (config.attn_logit_softcapping); "
            "calibrate with --no-offsets for this model"
        )
