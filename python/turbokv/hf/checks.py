"""What ``turbokv.patch`` checks before it routes a model's attention to the packed cache.

The fused path hands an attention module the layer's *packed* K/V (uint8 buffers) from
``cache.update`` and runs ``turbokv.attention`` in place of transformers' attention function.
That is right only for a module that (1) passes those K/V untouched to transformers' attention
interface (``ALL_ATTENTION_FUNCTIONS``) and reads them nowhere else, (2) is causal, and
(3) asks the interface for nothing turbokv does not implement. Checked here, by capability
rather than by model family:

* at ``patch()`` time, :func:`patch_refusal` reads the config (encoder-decoder, MLA) and each
  attention module (``is_causal``, and the source of its ``forward``: what it does with the K/V
  ``cache.update`` returns, and the keyword arguments it gives the interface);
* at call time, :func:`check_call_kwargs` looks at the keyword arguments transformers passes
  through to the attention function (an unknown one may change the math: it is refused by name).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

# Keyword arguments of the interface call that turbokv's attention implements.
IMPLEMENTED = frozenset({"dropout", "scaling", "sliding_window", "softcap", "s_aux"})
# Passed through to every attention function, with no effect on attention over the cache.
HARMLESS = frozenset(
    {
        "position_ids",  # positions are already in the rotated K
        "cache_position",
        "use_cache",
        "output_attentions",  # SDPA returns no weights either
        "output_hidden_states",
        "output_router_logits",
        "num_items_in_batch",
        "return_dict",
        "layer_idx",
        "seq_idx",
        "labels",  # multimodal wrappers (Gemma 4) pass the loss labels through to every layer
    }
)
# Harmless at these values only: what they mean otherwise.
ONLY_AT = {
    "is_causal": ((True, None), "non-causal attention"),
    "encoder_hidden_states": ((None,), "cross-attention"),
    "cu_seq_lens_q": ((None,), "packed (padding-free) sequences"),
    "cu_seq_lens_k": ((None,), "packed (padding-free) sequences"),
    "max_length_q": ((None,), "packed (padding-free) sequences"),
    "max_length_k": ((None,), "packed (padding-free) sequences"),
}
# Known keyword arguments turbokv does not implement, and the feature each one is.
FEATURES = {
    "sinks": "attention sinks",
    "attention_chunk_size": "chunked attention",
    "position_bias": "a position bias added to the scores",
    "indices": "sparse attention over selected tokens",
    "block_indices": "block-sparse attention",
}
INTERFACE = "ALL_ATTENTION_FUNCTIONS"
NO_INTERFACE = f"does not call transformers' attention interface ({INTERFACE})"


def feature(kwarg: str) -> str:
    """``"attention sinks (s_aux)"``: the feature a keyword argument stands for, named with it."""
    return f"{FEATURES[kwarg]} ({kwarg})" if kwarg in FEATURES else f"the keyword argument {kwarg!r}"


def check_call_kwargs(module, kwargs: dict) -> None:
    """Refuse, by name, a keyword argument of an attention call that turbokv's attention cannot honour.

    ``kwargs``: what the attention function received beyond its own parameters. Called once per
    layer and step: a few dict lookups.
    """
    for name, value in kwargs.items():
        if name in ONLY_AT:
            allowed, what = ONLY_AT[name]
            if not any(value is a for a in allowed):
                raise NotImplementedError(
                    f"{name}: got {_short(value)} from {type(module).__name__}, expected one of {allowed}: "
                    f"turbokv attention does not implement {what}"
                )
        elif name not in HARMLESS:
            raise NotImplementedError(
                f"{name}: got {_short(value)} from {type(module).__name__}: turbokv attention does not implement "
                f"{feature(name)}; use TurboCache without turbokv.patch for this model"
            )


def _short(value) -> str:
    shape = getattr(value, "shape", None)
    return f"a tensor of shape {tuple(shape)}" if shape is not None else repr(value)


# ---------------------------------------------------------------------- patch time


def config_refusal(config) -> str | None:
    """What a text config asks for that the fused path cannot do (None: nothing)."""
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model (cross-attention over the encoder's K/V)"
    if getattr(config, "kv_lora_rank", None):
        return "multi-head latent attention (MLA, kv_lora_rank): K and V of different widths"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention (add_cross_attention)"
    return None


def module_refusal(module) -> str | None:
    """What attention ``module`` does that the fused path cannot (None: nothing); the reason names it."""
    name = type(module).__name__
    if getattr(module, "is_causal", True) is False:
        return f"{name} is not causal (is_causal=False)"
    problem = forward_refusal(type(module))
    return f"{name}.forward {problem}" if problem else None


def calls_interface(module) -> bool:
    """Whether ``module``'s forward calls transformers' attention interface (a hybrid layer's attention
    module does; the mamba mixer beside it, which takes the cache too, does not)."""
    return forward_refusal(type(module)) != NO_INTERFACE


@functools.cache
def forward_refusal(cls: type) -> str | None:
    """How ``cls.forward`` fails to hand the K/V of ``cache.update`` untouched to the attention interface.

    Read from its source: every ``k, v = <cache>.update(...)`` must be followed by uses of ``k``
    and ``v`` only as direct arguments of the attention interface (a function taken from
    ``ALL_ATTENTION_FUNCTIONS``), whose explicit keyword arguments turbokv implements. Anything
    else (a ``repeat`` of K, a projection of V, a chunked V, K's shape) reads the packed
    buffers as if they were K/V. None: no problem found.
    """
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError) as e:
        return f"cannot be checked ({type(e).__name__}: its source is not available)"
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    interfaces = _interface_names(tree)
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id in interfaces)
            or (isinstance(node.func, ast.Subscript) and _mentions(node.func, INTERFACE))
        )
    ]
    if not calls:
        return NO_INTERFACE
    updates = [_update_targets(node) for node in ast.walk(tree) if isinstance(node, ast.Assign)]
    updates = [u for u in updates if u]
    if not updates:
        return "takes no K/V from cache.update(...) to pass to the attention interface"
    # The pre-hook binds the cache layer of module.layer_idx, or of the call's layer_idx argument for a
    # module shared by several layers (Zamba); HRM reuses a module for several slots it computes itself.
    takes_layer = "layer_idx" in inspect.signature(cls.forward).parameters
    own = {"self.layer_idx", "layer_idx"} if takes_layer else {"self.layer_idx"}
    for node in ast.walk(tree):
        slot = _update_slot(node)
        if slot is not None and ast.unparse(slot) not in own:
            return f"updates cache layer {ast.unparse(slot)}, not its own {' or '.join(sorted(own))}"
    for call in calls:
        for kw in call.keywords:
            if kw.arg is not None and kw.arg not in IMPLEMENTED | HARMLESS | set(ONLY_AT) | {"attention_mask"}:
                return f"passes {feature(kw.arg)} to the attention interface"
    for line, names in updates:
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load)):
                continue
            if node.lineno <= line:
                continue
            if not (_interface_argument(node, parents, calls) or _passed_on(node, parents, names)):
                return (
                    f"uses the cached {node.id} other than as an argument of the attention interface "
                    f"({ast.get_source_segment(source, parents.get(node, node)).splitlines()[0].rstrip('(')})"
                )
    return None


def _interface_argument(node: ast.Name, parents: dict, calls: list) -> bool:
    """``node`` is a positional argument of an attention interface call."""
    parent = parents.get(node)
    return parent in calls and node in parent.args


def _passed_on(node: ast.Name, parents: dict, names: set[str]) -> bool:
    """``node`` is in ``x[...] = k, v``: the pair stored unchanged for a layer that shares it (Gemma 3n)."""
    pair, store = parents.get(node), parents.get(parents.get(node))
    return (
        isinstance(pair, ast.Tuple)
        and {getattr(e, "id", None) for e in pair.elts} == names
        and isinstance(store, ast.Assign)
        and store.value is pair
        and all(isinstance(t, ast.Subscript) for t in store.targets)
    )


def _mentions(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _interface_names(tree: ast.AST) -> set[str]:
    """Names assigned a function taken from ALL_ATTENTION_FUNCTIONS (``attention_interface = ...``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if _mentions(node.value, INTERFACE):
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _update_slot(node: ast.AST) -> ast.AST | None:
    """The layer index argument of a ``<cache>.update(k, v, layer_idx, ...)`` call (None: not such a call)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"):
        return None
    if len(node.args) >= 3:
        return node.args[2]
    return next((kw.value for kw in node.keywords if kw.arg == "layer_idx"), None)


def _update_targets(node: ast.Assign) -> tuple[int, set[str]] | None:
    """``(line, {k, v})`` of ``k, v = <cache>.update(...)``; None for any other assignment."""
    call = node.value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "update"):
        return None
    if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Tuple):
        return None
    names = {t.id for t in node.targets[0].elts if isinstance(t, ast.Name)}
    return (node.end_lineno, names) if len(names) == 2 else None
