"""Every causal-LM family of the installed transformers, built small, and what TurboCache does with it.

One source of truth for tests/test_families.py and tools/family_table.py (docs/models.md's table):
:func:`families` enumerates ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (one entry per model class),
:func:`build` makes a tiny random-weight model of one, and :func:`run` generates greedily with
DynamicCache + SDPA and with an f16 + rotation TurboCache, unpatched and under ``turbokv.patch``,
and says what happened (:class:`Outcome`). ``EXPECTED`` names the families docs/models.md
talks about with the outcome they must keep.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import turbokv
from turbokv.hf.attention import cache_kwargs, turbokv_attention

LAYERS = 4
VOCAB = 256
MAX_NEW = 8
# Tiny sizes, set on a config where it has the field (directly or through its attribute_map).
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=128,
    # the decoders of encoder-decoder families (BART, Marian, ...)
    decoder_layers=LAYERS,
    decoder_attention_heads=4,
    decoder_ffn_dim=128,
    encoder_layers=1,
    encoder_attention_heads=4,
    encoder_ffn_dim=128,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rotary_dim=8,  # CodeGen, GPT-J: rotate part of each head
    sliding_window=6,  # shorter than the prompts: the window is exercised
    # peaked logits: greedy decoding is not decided by the rounding of f16 storage
    initializer_range=0.3,
    pad_token_id=0,
    is_decoder=True,  # BERT-like models are causal LMs only as decoders
    bos_token_id=None,
    eos_token_id=None,
    tie_word_embeddings=False,
    # mixture of experts: every expert chosen, so that rounding cannot flip the routing
    num_experts=2,
    num_local_experts=2,
    n_routed_experts=2,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    # linear attention (Gated DeltaNet and relatives), state-space layers
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    mamba_n_heads=4,
    mamba_d_head=32,  # mamba_n_heads * mamba_d_head = mamba_expand (2) * hidden_size
    mamba_d_state=16,
    mamba_n_groups=1,
    mamba_d_ssm=128,
    # multi-head latent attention (DeepSeek-V2/V3 and relatives)
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    # KV sharing (Gemma 3n)
    num_kv_shared_layers=2,
    # Gemma 3n's per-layer inputs and AltUp
    hidden_size_per_layer_input=16,
    vocab_size_per_layer_input=VOCAB,
    # chunked attention (Llama 4)
    attention_chunk_size=6,
)
# Sub-configs other than the text model's (vision / audio towers): as small as they go.
TOWER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, depth=1)


# Families no lossy cache can match (docs/models.md says so; tests/test_families.py keeps them as strict
# xfails and checks them otherwise): model type -> why.
NOT_COMPARABLE = {
    "hrm_text": "float16 K/V alone changes this random model's tokens: its 8 recurrent passes grow a 3e-3 "
    "rounding to the logits' range (an f16 TurboCache without rotation equals a DynamicCache holding "
    "f16-rounded K/V, bit for bit)",
}


@dataclass(frozen=True)
class Family:
    """One model class of the causal-LM mapping; ``aliases``: the other model types mapped to it."""

    model_type: str
    class_name: str
    aliases: tuple[str, ...] = ()


def families() -> list[Family]:
    """The causal-LM mapping of the installed transformers, one entry per model class, sorted."""
    by_class: dict[str, list[str]] = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        by_class.setdefault(class_name, []).append(model_type)
    out = []
    for class_name, types in by_class.items():
        # the type whose config the class is built from names the family (exaone -> llama)
        cls = getattr(transformers, class_name, None)
        own = getattr(getattr(cls, "config_class", None), "model_type", None)
        types = sorted(types, key=lambda t: (t != own and t.replace("_text", "") != own, t))
        out.append(Family(types[0], class_name, tuple(types[1:])))
    return sorted(out, key=lambda f: f.model_type)


def _layer_types(default: list[str], n: int) -> list[str]:
    """``n`` layer types cycling through the kinds of the default pattern, so each kind is there, in
    both halves where it can be (KV-shared layers, the last ones, need a producer of their kind)."""
    kinds = list(dict.fromkeys(default))
    if not any("attention" in k or k == "hybrid" for k in kinds) or kinds == ["linear_attention"]:
        kinds.append("full_attention")  # defaults of all-state hybrids (Granite 4, Bamba): add attention
    return [kinds[i % len(kinds)] for i in range(n)]


def _has(config, name: str) -> bool:
    """``hasattr`` for configs whose per-layer attributes (Gemma 4) raise on global access."""
    try:
        return hasattr(config, name)
    except Exception:
        return name in config.to_dict()


def _small_kwargs(cls) -> dict:
    default = cls()
    kw = {k: v for k, v in SMALL.items() if _has(default, k)}
    if getattr(default, "kv_lora_rank", None):  # MLA: the head dim is the rope part's, one latent for all heads
        kw.pop("head_dim", None)
        kw.pop("num_key_value_heads", None)
    types = getattr(default, "layer_types", None)
    field = getattr(cls, "attribute_map", {}).get("layer_types", "layer_types")
    settable = not isinstance(getattr(cls, field, None), property)
    if settable and isinstance(types, (list, tuple)) and types:
        kw["layer_types"] = _layer_types(list(types), LAYERS)
    return kw


def small_config(family: Family):
    """The family's config with :data:`SMALL` sizes (sub-configs: text as SMALL, towers as TOWER)."""
    config_class = getattr(transformers, family.class_name).config_class
    sub_configs = getattr(config_class, "sub_configs", None) or {}
    kw = {}
    for name, sub in sub_configs.items():
        sub_cls = sub if isinstance(sub, type) else type(sub)
        if name == "text_config" or "decoder" in name:
            kw[name] = sub_cls(**_small_kwargs(sub_cls))
        elif isinstance(sub, type) and hasattr(sub_cls(), "hidden_size"):
            kw[name] = sub_cls(**{k: v for k, v in TOWER.items() if hasattr(sub_cls(), k)})
    return config_class(**_small_kwargs(config_class), **kw)


def build(family: Family, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight model of ``family``, fp32 on CPU, in eval mode, with SDPA where it has it."""
    config = small_config(family)
    torch.manual_seed(seed)
    model = getattr(transformers, family.class_name)(config).eval()
    with contextlib.suppress(ValueError, ImportError):
        model.set_attn_implementation("sdpa")
    return model


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of two prompts (10 and 7 tokens), ``(2, 10)`` ids and mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@dataclass(frozen=True)
class Outcome:
    """What one family did.

    ``kind``: "equal" (token-equal to DynamicCache, unpatched and patched), "patch refused" (token-equal
    unpatched; ``patch()`` or the patched forward refused), "refused" (TurboCache refused the model),
    "not built" (the family does not build or generate small: not tested), or a failure: "wrong"
    (different tokens), "error" (an exception that is not turbokv's deliberate refusal).
    ``detail``: the refusal or failure message, or the exception.
    """

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return self.kind + (f": {self.detail}" if self.detail else "")


def describe(outcome: Outcome) -> str:
    """The words of docs/models.md for an outcome."""
    reason = outcome.detail.split(": ", 1)[-1]  # without the exception's class
    reason = reason.split(" fused: ", 1)[-1].split("; use TurboCache without patch()")[0]
    return {
        "equal": "token-equal, unpatched and patched",
        "patch refused": f"token-equal unpatched; `patch()` refuses: {reason}",
        "refused": f"TurboCache refuses: {reason}",
        "not built": f"not tested: does not build or generate small ({outcome.detail})",
    }.get(outcome.kind, f"FAILS: {outcome}")


class _Refused(Exception):
    pass


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _turbokv_refusal(e: BaseException) -> bool:
    """A ValueError / NotImplementedError raised by turbokv itself (its deliberate refusal)."""
    if not isinstance(e, (ValueError, NotImplementedError)):
        return False
    frames = traceback.extract_tb(e.__traceback__)
    package = str(Path(turbokv.__file__).parent)
    return bool(frames) and frames[-1].filename.startswith(package)


@dataclass
class _Greedy:
    tokens: torch.Tensor  # (B, MAX_NEW)
    scores: torch.Tensor  # (MAX_NEW, B, vocab): the logits each token was chosen from


def _generate(model, ids, mask, cache) -> _Greedy:
    with contextlib.redirect_stderr(io.StringIO()):  # generation-config warnings of random models
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **cache_kwargs(model, cache),
        )
    return _Greedy(out.sequences[:, ids.shape[1] :], torch.stack(out.scores).float())


def differs(out: _Greedy, ref: _Greedy) -> str | None:
    """Why ``out`` is not ``ref``'s greedy decoding up to f16 rounding (None: it is).

    Tokens must be equal, and the logits they come from within 5 % of the logits' range
    (f16 storage of K/V moves them a few %; a wrong mask or rotation, by their whole range). A
    sequence may leave the reference at a near tie: where the two tokens' reference logits are
    closer than that tolerance, and only from there on (random weights give such ties).
    """
    for b in range(ref.tokens.shape[0]):
        for step in range(ref.tokens.shape[1]):
            got, want = out.scores[step, b], ref.scores[step, b]
            tol = 5e-2 * want.abs().max().item()
            if (got - want).abs().max().item() > tol:
                return f"row {b} step {step}: logits differ by {(got - want).abs().max().item():.3g} > {tol:.3g}"
            t, r = out.tokens[b, step].item(), ref.tokens[b, step].item()
            if t != r:
                margin = (want[r] - want[t]).item()
                if margin > tol:
                    return f"row {b} step {step}: token {t} != {r} (reference margin {margin:.3g} > {tol:.3g})"
                break  # a near tie: the sequences part here
    return None


def _turbo_tokens(model, ids, mask) -> _Greedy:
    try:
        cache = turbokv.TurboCache.for_config(model.config, k="f16", v="f16", rotate_k="on", rotate_v="on")
        return _generate(model, ids, mask, cache)
    except Exception as e:
        if _turbokv_refusal(e):
            raise _Refused(_first_line(e)) from e
        raise


def _reference_cache(model):
    """DynamicCache, or the cache class of its own that a family's model takes (MiniMax)."""
    if model.config.get_text_config().model_type == "minimax":
        from transformers.models.minimax.modeling_minimax import MiniMaxCache

        return MiniMaxCache()
    return transformers.DynamicCache(config=model.config)


def run(family: Family) -> Outcome:
    """Build ``family`` small and compare greedy tokens: DynamicCache + SDPA vs f16 + rotation TurboCache."""
    try:
        model = build(family)
        ids, mask = prompts()
        ref = _generate(model, ids, mask, _reference_cache(model))
    except Exception as e:
        return Outcome("not built", _first_line(e))
    try:
        plain = _turbo_tokens(model, ids, mask)
    except _Refused as e:
        return Outcome("refused", str(e))
    except Exception as e:
        return Outcome("error", "unpatched: " + _first_line(e))
    if why := differs(plain, ref):
        return Outcome("wrong", f"unpatched: {why}")
    calls = turbokv_attention.calls
    try:
        with turbokv.patch(model):
            fused = _turbo_tokens(model, ids, mask)
    except _Refused as e:
        return Outcome("patch refused", str(e))
    except Exception as e:
        if _turbokv_refusal(e):
            return Outcome("patch refused", _first_line(e))
        return Outcome("error", "patched: " + _first_line(e))
    if turbokv_attention.calls == calls:
        return Outcome("error", "patched: turbokv's fused attention never ran")
    if why := differs(fused, ref):
        return Outcome("wrong", f"patched: {why}")
    return Outcome("equal")
