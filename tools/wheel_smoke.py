"""Smoke test of an installed turbokv wheel, run by tools/wheel_smoke.sh from outside the repository.

Checks that the package imported is the installed one, that its native kernels are registered
and give the reference's bytes, that attention agrees with the reference, and that a tiny random
Llama generates with a TurboCache, patched: with f16 storage the tokens equal transformers' own
cache's, and turbo3 runs to the end.
"""

from __future__ import annotations

import sys

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import turbokv
from turbokv.core import reference
from turbokv.core.rotation import auto_rotation
from turbokv.hf.attention import cache_kwargs


def main() -> None:
    where = turbokv.__file__
    assert "site-packages" in where, f"turbokv imported from {where}, not from the installed wheel"
    assert turbokv.native_loaded("cpu"), "the native CPU kernels are not registered"
    print(f"turbokv from {where}; cpu kernel copy {turbokv.ops._C.cpu_isa()}; cuda archs {turbokv.ops._C.CUDA_ARCHS!r}")
    # The main job's calibrated policies ship as package data (JSON + safetensors offsets).
    from turbokv.demo import DEFAULT_POLICIES
    from turbokv.hf.policy import Policy

    for spec in DEFAULT_POLICIES:
        assert "site-packages" in spec.policy, spec.policy
        assert Policy.load(spec.policy).recent_tokens > 0, spec.policy

    g = torch.Generator().manual_seed(0)
    d = 128
    x = torch.randn(4, 16, d, generator=g)
    for fmt in ("q8_0", "q4_0", "turbo3"):
        rot = auto_rotation(fmt, d, "k")
        packed = turbokv.quantize(x, fmt, rot)
        assert torch.equal(packed, reference.quantize(x, fmt, rot.group, rot.seed)), f"{fmt}: bytes differ"
        back = turbokv.dequantize(packed, fmt, d, rot)
        rel = ((back - x).norm() / x.norm()).item()
        assert rel < 0.25, f"{fmt}: relative round-trip error {rel:.3f}"

    kr, vr = auto_rotation("turbo3", d, "k"), auto_rotation("turbo3", d, "v")
    k, v = torch.randn(2, 1, 2, 50, d, generator=g)
    kc, vc = turbokv.quantize(k, "turbo3", kr), turbokv.quantize(v, "turbo3", vr)
    q = torch.randn(1, 8, 1, d, generator=g)
    lengths = torch.tensor([50])
    out = turbokv.attention(q, kc, vc, lengths, k_format="turbo3", v_format="turbo3", k_rot=kr, v_rot=vr)
    ref = reference.attention(
        q, kc, vc, lengths, None, "turbo3", kr.group, kr.seed, "turbo3", vr.group, vr.seed, d**-0.5, True, 0, 0.0
    )
    assert (out - ref).abs().max().item() < 1e-4, "attention differs from the reference"

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    gen = dict(max_new_tokens=10, do_sample=False, min_new_tokens=10)
    with torch.no_grad():
        plain = model.generate(ids, **cache_kwargs(model, DynamicCache()), **gen)
        with turbokv.patch(model):
            f16 = model.generate(ids, **cache_kwargs(model, turbokv.TurboCache(cfg, k="f16", v="f16")), **gen)
            cache = turbokv.TurboCache(cfg, k="turbo3", v="turbo3")
            t3 = model.generate(ids, **cache_kwargs(model, cache), **gen)
    assert torch.equal(f16, plain), "f16 TurboCache tokens differ from DynamicCache's"
    assert t3.shape == plain.shape, f"turbo3 generated {t3.shape}, expected {plain.shape}"
    print(f"generate: f16 cache equals DynamicCache; turbo3 cache {cache}")
    print("wheel smoke test: ok")


if __name__ == "__main__":
    sys.exit(main())
