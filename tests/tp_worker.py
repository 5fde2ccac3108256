"""One rank of the tensor-parallel test (tests/test_devices.py), run under torchrun.

Loads the model saved at ``argv[1]`` with transformers' tensor parallelism (``tp_plan="auto"``: each
rank holds its share of the attention heads, so its cache holds its own KV heads), generates greedily
``argv[4]`` tokens from the prompts ``argv[3]`` (JSON, 0 = left padding) with DynamicCache and with an f16 + rotation
TurboCache, unpatched and patched, and has rank 0 write the tokens and each rank's cached KV head
count as JSON to ``argv[2]``.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist
import transformers

import turbokv
from turbokv.hf.attention import cache_kwargs


def main(model_dir: str, out_path: str, prompts: str, max_new_tokens: str) -> None:
    with warnings.catch_warnings():  # tp_plan= moves to DistributedConfig after 5.17; both take it
        warnings.simplefilter("ignore", FutureWarning)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    model.eval()
    ids = torch.tensor(json.loads(prompts))
    mask = (ids != 0).long()

    def tokens(cache) -> list:
        kw = cache_kwargs(model, cache)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=int(max_new_tokens), do_sample=False, **kw)
        return out.tolist()

    def turbo_cache():
        return turbokv.TurboCache(model.config, k="f16", v="f16", rotate_k="on", rotate_v="on")

    result = {"dynamic": tokens(transformers.DynamicCache(config=model.config))}
    result["turbo_unpatched"] = tokens(turbo_cache())
    calls = turbokv.hf.attention.turbokv_attention.calls
    with turbokv.patch(model):
        cache = turbo_cache()
        result["turbo_patched"] = tokens(cache)
    result["fused_calls"] = turbokv.hf.attention.turbokv_attention.calls - calls
    heads = [layer.k_packed.shape[1] for layer in cache.turbo_layers]
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, heads)
    result["kv_heads_per_rank"] = per_rank
    result["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
