"""KL-divergence statistics: exact on hand-made distributions."""

from __future__ import annotations

import math

import pytest
import torch

from turbokv.quality.metrics import summarize, token_stats


def test_identical_distributions_give_zero(gen):
    logp = torch.log_softmax(torch.randn(50, 30, generator=gen), -1)
    targets = torch.randint(0, 30, (50,), generator=gen)
    s = summarize([token_stats(logp, logp, targets)])
    assert s.kld_mean == 0.0 and s.kld_max == 0.0 and s.same_top == 1.0 and s.rms_dp == 0.0
    assert s.ppl == pytest.approx(s.ppl_ref)


def test_known_values():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    test = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    targets = torch.tensor([1, 0])
    st = token_stats(ref, test, targets)
    kld0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert st["kld"][0].item() == pytest.approx(kld0) and st["kld"][1].item() == pytest.approx(0.0, abs=1e-12)
    assert st["dp"].tolist() == pytest.approx([0.25, 0.0])
    s = summarize([st])
    assert s.ppl == pytest.approx(math.exp(-(math.log(0.75) + math.log(0.9)) / 2))
    assert s.same_top == 0.5  # token 0 tie-breaks to index 0 in ref, 1 in test
    assert s.kld_mean == pytest.approx(kld0 / 2)
    assert s.kld_stderr == pytest.approx(torch.tensor([kld0, 0.0]).std().item() / math.sqrt(2))
