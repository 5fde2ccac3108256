"""The evaluation's cached f16 reference is keyed by what determines it and never trusted blindly:
another model in the same folder, another chunking of the same tokens, or a corrupt file all give
a freshly computed reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is needed for the evaluation")
import hf_models  # noqa: E402

from turbokv.quality import runner  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "CACHE_DIR", tmp_path)
    return tmp_path


def test_reference_key_covers_weights_and_chunking(cache_dir):
    model = hf_models.build("llama64")
    tokens = torch.randint(1, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = runner.Reference(model, tokens, "same/path")
    assert runner.Reference(model, tokens.reshape(2, 32), "same/path").path != ref.path  # same token bytes
    assert runner.Reference(model.to(torch.bfloat16), tokens, "same/path").path != ref.path
    other = hf_models.build("llama64", seed=1)  # another model saved to the same folder
    assert runner.Reference(other, tokens, "same/path").path != ref.path
    assert runner.Reference(hf_models.build("llama64"), tokens, "same/path").path == ref.path


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(p.read_bytes()[:-100]),
        lambda p: p.write_bytes(b"\x00" * 64),
        lambda p: p.write_bytes(p.read_bytes()[:200] + bytes(len(p.read_bytes()) - 200)),
        lambda p: p.write_bytes(p.read_bytes()[:-10] + bytes(10)),
    ],
    ids=["truncated", "junk", "zeroed", "last-bytes"],
)
def test_corrupt_reference_is_recomputed(cache_dir, corrupt):
    model = hf_models.build("llama64")
    tokens = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = runner.Reference(model, tokens, "m")
    ref.ensure(progress=False)
    want = [ref.get(i) for i in range(2)]
    corrupt(ref.path)
    again = runner.Reference(model, tokens, "m")
    again.ensure(progress=False)
    for i in range(2):
        assert torch.equal(again.get(i), want[i])
