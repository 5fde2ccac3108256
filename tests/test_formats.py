"""The format registry and the generated codebooks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turbokv.core import formats, reference
from turbokv.core.rotation import K_SEED

ROOT = Path(__file__).resolve().parent.parent


def test_generated_files_are_current():
    """Regenerating the codebooks reproduces formats.py and the C++ header exactly."""
    pytest.importorskip("scipy", reason="the codebook generator needs scipy")
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_formats.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_generated_check_tolerates_only_solver_noise():
    """The check lets float64 literals move in their last digits (scipy releases), nothing more."""
    pytest.importorskip("scipy", reason="the codebook generator needs scipy")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_formats
    finally:
        sys.path.pop(0)
    old = "    (64, 2): (\n        -0.18749684942035127,\n        0.056514868764109216,\n"
    assert gen_formats.same_up_to_solver_noise(old, old.replace("35127", "3511").replace("09216", "09244"))
    assert not gen_formats.same_up_to_solver_noise(old, old.replace("0.1874968494", "0.1874968495"))
    assert not gen_formats.same_up_to_solver_noise(old, old.replace("(64, 2)", "(64, 3)"))
    assert not gen_formats.same_up_to_solver_noise(old, old + "        1.0,\n")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("turbo2", 34),
        ("turbo3", 50),
        ("turbo4", 66),
        ("q8_0", 136),
        ("q5_1", 96),
        ("q5_0", 88),
        ("q4_1", 80),
        ("q4_0", 72),
        ("f16", 256),
        ("bf16", 256),
    ],
)
def test_row_bytes_at_128(name, expected):
    assert formats.row_bytes(name, 128) == expected


def test_turbo_groups_and_padding():
    assert formats.turbo_group(128) == 128 and formats.turbo_group(64) == 64
    assert formats.padded_dim("turbo3", 96) == 128 and formats.row_bytes("turbo3", 96) == 50  # one 128-group
    assert formats.padded_dim("turbo3", 80) == 128
    assert formats.row_bytes("turbo4", 256) == 2 * 66
    assert formats.bits_per_value("turbo3", 128) == pytest.approx(3.125)
    assert formats.bits_per_value("q4_0", 128) == pytest.approx(4.5)


# Reference points from shared/docs/field-notes.md (exact Beta marginal), positive half.
FIELD_NOTES = {
    (128, 2): ([0.039992, 0.133042], 0.116000),
    (128, 3): ([0.021604, 0.066586, 0.118140, 0.188397], 0.033966),
    (128, 4): ([0.011302, 0.034152, 0.057772, 0.082828, 0.110288, 0.141805, 0.180836, 0.237664], 0.009315),
    (64, 2): ([0.056515, 0.187497], 0.114526),
    (64, 3): ([0.030469, 0.093832, 0.166168, 0.263914], 0.033391),
    (64, 4): ([0.015919, 0.048090, 0.081312, 0.116487, 0.154926, 0.198856, 0.252914, 0.330796], 0.009132),
}


@pytest.mark.parametrize("key", sorted(FIELD_NOTES))
def test_codebooks_match_field_notes(key):
    centroids, mse_g = FIELD_NOTES[key]
    cb = formats.CODEBOOKS[key]
    half = len(cb) // 2
    assert cb[:half] == tuple(-c for c in reversed(cb[half:])), "codebook must be symmetric"
    assert list(cb[half:]) == pytest.approx(centroids, abs=5e-7)  # the notes' 6 digits
    assert formats.MSE_G[key] == pytest.approx(mse_g, abs=5e-7)
    mids = formats.MIDPOINTS[key]
    assert all(cb[i] < mids[i] < cb[i + 1] for i in range(len(mids)))


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_empirical_mse_matches_theory(g, bits, gen):
    """Quantising rotated Gaussian rows (unit vectors) hits the codebook's MSE within 0.5 %."""
    n = 40000
    x = torch.randn(n, g, generator=gen, dtype=torch.float64)
    u = reference.rotate(x / x.norm(dim=-1, keepdim=True), g, K_SEED)
    cb = torch.tensor(formats.CODEBOOKS[(g, bits)], dtype=torch.float64)
    mids = torch.tensor(formats.MIDPOINTS[(g, bits)], dtype=torch.float64)
    c = cb[torch.searchsorted(mids, u.contiguous())]
    mse_g = ((u - c) ** 2).sum(-1).mean().item()
    assert mse_g == pytest.approx(formats.MSE_G[(g, bits)], rel=0.005)


# Per-vector MSE with norm correction, simulated in field-notes.md (g = 128, 200k vectors).
NORM_CORRECTED = {"turbo2": 0.1189, "turbo3": 0.03382, "turbo4": 0.009182}


@pytest.mark.parametrize("name", sorted(NORM_CORRECTED))
def test_op_mse_with_norm_correction(name, gen):
    """The native op's round trip on random unit vectors matches the field notes' simulation within 1 %."""
    import turbokv

    x = torch.randn(60000, 128, generator=gen)
    x = x / x.norm(dim=-1, keepdim=True)
    y = turbokv.dequantize(
        turbokv.quantize(x, name, turbokv.core.rotation.Rotation(128, K_SEED)),
        name,
        128,
        turbokv.core.rotation.Rotation(128, K_SEED),
    )
    mse = ((y.double() - x.double()) ** 2).sum(-1).mean().item()
    assert mse == pytest.approx(NORM_CORRECTED[name], rel=0.01)


def test_unknown_format_names_the_choices():
    with pytest.raises(ValueError, match="format: got 'q3_k'.*expected one of"):
        formats.get("q3_k")
