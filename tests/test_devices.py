"""TurboCache on models spread over several devices, the ways users spread them.

* ``device_map`` (accelerate): each TurboLayer lives on its layer's device; one process, some layers on
  the CPU and some on the GPU (``@pytest.mark.cuda``).
* transformers tensor parallelism (``tp_plan="auto"`` under torchrun): each rank caches its own KV heads;
  two ranks on the CPU (gloo), compared with one process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import cuda_ready
from hf_models import build, transformers

import turbokv
from turbokv.hf.attention import cache_kwargs, turbokv_attention

MAX_NEW = 12
HERE = pathlib.Path(__file__).parent


def prompts() -> torch.Tensor:
    """A left-padded batch of two (0 is padding)."""
    ids = torch.randint(1, 96, (2, 14), generator=torch.Generator().manual_seed(5))
    ids[0, :3] = 0
    return ids


def greedy(model, cache, ids) -> torch.Tensor:
    mask = (ids != 0).long()
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, **cache_kwargs(model, cache))
    return model.generate(ids.to(model.device), attention_mask=mask.to(model.device), **kw).cpu()


def f16_cache(model) -> turbokv.TurboCache:
    return turbokv.TurboCache(model.config, k="f16", v="f16", rotate_k="on", rotate_v="on")


# ---------------------------------------------------------------------- device_map


@pytest.mark.cuda
def test_evaluation_on_cuda_measures_what_the_cpu_does(tmp_path, monkeypatch):
    """The evaluation (turbokv eval's runner) on the GPU runs the fused CUDA kernels and measures the
    KLD the CPU measures, within their error bars; the bits per value are the same."""
    ok, why = cuda_ready()
    if not ok:
        pytest.skip(why)
    from turbokv.quality import runner

    monkeypatch.setattr(runner, "CACHE_DIR", tmp_path)
    model = build("llama128")
    chunks = torch.randint(1, 96, (4, 256), generator=torch.Generator().manual_seed(3))
    spec = runner.CacheSpec("q4_0", "turbo3", sink_tokens=1, recent_tokens=16)
    got = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        got[device] = runner.evaluate(model, chunks, spec, runner.Reference(model, chunks, "tiny"), progress=False)
    cpu, gpu = got["cpu"], got["cuda"]
    assert (gpu.k_bits, gpu.v_bits) == (cpu.k_bits, cpu.v_bits)
    assert gpu.kld_mean > 1e-4 and cpu.kld_mean > 1e-4  # the formats are visible
    assert abs(gpu.kld_mean - cpu.kld_mean) <= 2 * (gpu.kld_stderr + cpu.kld_stderr)
    assert len(list(tmp_path.glob("reference/*.safetensors"))) == 2  # one reference per device


@pytest.mark.cuda
@pytest.mark.parametrize("patched", [False, True])
def test_device_map_split_cpu_cuda(patched):
    """Layers 0-1 on the CPU, layer 2 and the head on cuda:0: each TurboLayer on its layer's device, the same
    tokens as the single-device run."""
    ok, why = cuda_ready()
    if not ok:
        pytest.skip(why)
    accelerate = pytest.importorskip("accelerate", reason="device_map needs accelerate")
    model = build("llama64")
    ref = greedy(model, transformers.DynamicCache(config=model.config), prompts())
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": 0,
        "model.norm": 0,
        "lm_head": 0,
    }
    # As from_pretrained(device_map=...) dispatches, but with main_device="cpu" so that the CPU layers run on
    # the CPU (from_pretrained would offload them: weights moved to the GPU for each call).
    split = accelerate.dispatch_model(
        model, device_map, main_device="cpu", skip_keys=list(model._skip_keys_device_placement or [])
    )
    split.eval().set_attn_implementation("sdpa")
    cache = f16_cache(split)
    calls = turbokv_attention.calls
    if patched:
        with turbokv.patch(split):
            out = greedy(split, cache, prompts())
        assert turbokv_attention.calls - calls == 3 * MAX_NEW
    else:
        out = greedy(split, cache, prompts())
    assert [layer.k_packed.device.type for layer in cache.turbo_layers] == ["cpu", "cpu", "cuda"]
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------- tensor parallelism


def _tp_unavailable() -> str | None:
    if not torch.distributed.is_available():
        return "this torch is built without torch.distributed"
    if not torch.distributed.is_gloo_available():
        return "this torch is built without the gloo backend"
    return None


def test_tensor_parallel_two_ranks_gloo(tmp_path):
    """``tp_plan="auto"`` on two CPU ranks (gloo): each rank caches one of the two KV heads, and DynamicCache,
    TurboCache and patched TurboCache give the tokens of one process."""
    why = _tp_unavailable()
    if why:
        pytest.skip(why)
    model = build("llama64")  # 2 KV heads, 4 query heads: one KV head a rank
    ids = prompts()
    expected = greedy(model, transformers.DynamicCache(config=model.config), ids).tolist()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "tokens.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(HERE / "tp_worker.py"), str(tmp_path / "model"), str(out), json.dumps(ids.tolist()), str(MAX_NEW)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["kv_heads_per_rank"] == [[1, 1, 1], [1, 1, 1]]  # each rank's share of the 2 KV heads
    assert result["fused_calls"] == 3 * MAX_NEW
    for name in ("dynamic", "turbo_unpatched", "turbo_patched"):
        assert result[name] == expected, f"{name}: tensor-parallel tokens differ from one process"
