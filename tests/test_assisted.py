"""Assisted generation (a draft model proposes tokens, the main model verifies them) on a TurboCache.

Each round crops the rejected draft tokens with ``crop(-n)``; a round that accepts every draft
token calls ``crop(0)``, which must keep the cache.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import build, transformers

import turbokv
from turbokv.hf.attention import cache_kwargs


def test_crop_zero_keeps_every_token(gen):
    model = build("llama64")
    cache = turbokv.TurboCache(model.config, k="q4_0", v="q4_0")
    model(torch.randint(1, 96, (1, 10), generator=gen), past_key_values=cache)
    cache.crop(0)
    assert cache.get_seq_length() == 10
    cache.crop(-3)
    assert cache.get_seq_length() == 7


def truncated_draft(model):
    """The main model's first layer as the draft: the same vocabulary, and it agrees often enough."""
    draft = build("llama64")
    draft.load_state_dict(model.state_dict())
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return draft


@pytest.mark.parametrize("patched", [False, True])
def test_assisted_generation_equals_greedy(patched, gen):
    model = build("llama64")
    draft = truncated_draft(model)
    ids = torch.randint(1, 96, (1, 12), generator=gen)
    crops = []

    def cache():
        c = turbokv.TurboCache(model.config, k="f16", v="f16", rotate_k="on", rotate_v="on")
        crop = c.crop
        c.crop = lambda n: (crops.append(n), crop(n))[1]
        return c

    kw = dict(max_new_tokens=40, do_sample=False)
    with turbokv.patch(model) if patched else _nothing():
        plain = model.generate(ids, **cache_kwargs(model, cache()), **kw)
        crops.clear()
        assisted = model.generate(
            ids, **cache_kwargs(model, cache()), assistant_model=draft, num_assistant_tokens=4, **kw
        )
    ref = model.generate(ids, **cache_kwargs(model, transformers.DynamicCache(config=model.config)), **kw)
    assert torch.equal(plain, ref)
    assert torch.equal(assisted, ref)
    assert 0 in crops, "no round accepted every draft token (crop(0)): the test did not exercise it"
    assert crops, "assisted generation never cropped the cache: the test did not exercise verification"


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
