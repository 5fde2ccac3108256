"""The CLI's usage errors: each bad argument or input file is one line on stderr naming the flag
and the value, exit code 2, no traceback, and nothing is measured first."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "empty.txt").write_text("  \n")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "text.txt").write_text("Some text to evaluate on.\n" * 20)
    (d / "policy.json").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    return d


CASES = [
    (["eval", "--text", "{d}/missing.txt"], "--text: got {d}/missing.txt, expected an existing text file"),
    (["eval", "--text", "{d}/empty.txt"], "an empty file"),
    (["eval", "--text", "{d}/binary.txt"], "expected a UTF-8 text file"),
    (["eval", "--text", "{d}/text.txt", "--ctx", "1"], "--ctx: got 1, expected at least 2"),
    (["eval", "--k", "q4_0", "--v", "q9_9"], "--v: got 'q9_9', expected formats from"),
    (["eval", "--policy", "{d}/nope.json"], "--policy: got {d}/nope.json"),
    (["eval", "--policy", "{d}/policy.json"], "not a JSON file"),
    (["eval", "--json", "{d}/no/such/folder/out.json"], "does not exist"),
    (["eval", "--model", "{d}/no-model"], "--model: got {d}/no-model"),
    (["eval", "--recent-tokens", "-1"], "--recent-tokens: got -1, expected at least 0"),
    (["calibrate", "--bits", "4.5x"], "--bits: got '4.5x', expected numbers"),
    (["calibrate", "--bits", "nan"], "--bits: got 'nan', expected a finite number"),
    (["calibrate", "--bits", "3.5", "--tokens", "-512"], "--tokens: got -512, expected at least 1"),
    (["calibrate", "--bits", "3.5", "--tokens", "0"], "--tokens: got 0, expected at least 1"),
    (["calibrate", "--bits", "3.5", "--tokens", "16"], "--sink-tokens + --recent-tokens: got 17"),
    (["calibrate", "--bits", "3.5", "--formats", "turbo3,turbo9"], "--formats: got 'turbo9'"),
    (["calibrate", "--bits", "3.5", "--out", "{d}/no/such/p.json"], "does not exist"),
    (["sweep", "--k", "q4_0,q9"], "--k: got 'q9'"),
    (["sweep", "--rotate", "on,sideways"], "--rotate: got 'sideways'"),
    (["sweep", "--out", "{d}/text.txt"], "which is a file; expected a folder"),
    (["demo", "--tokens", "0"], "--tokens: got 0, expected at least 1"),
    (["needle", "--lengths", "1024,abc"], "--lengths: got 'abc', expected context lengths of at least 64"),
    (["needle", "--depths", "0,1.5"], "--depths: got '1.5', expected numbers in [0, 1]"),
    (["needle", "--trials", "0"], "--trials: got 0, expected at least 1"),
    (["needle", "--caches", "q4_0/q9"], "--caches: got 'q9'"),
    (["needle", "--caches", "{d}/none.json"], "--caches: got {d}/none.json, expected a policy file"),
    (["demo", "--device", "tpu"], "--device: got 'tpu', expected cpu, cuda or cuda:N"),
    (["eval", "--device", "cuda:9"], "--device: got 'cuda:9', but this machine has"),
    (["calibrate", "--bits", "3.5", "--device", "meta"], "--device: got 'meta', expected cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_usage_error_is_one_line(files, argv, message):
    argv = [a.format(d=files) for a in argv]
    out = subprocess.run(
        [sys.executable, "-m", "turbokv.cli", *argv], capture_output=True, text=True, timeout=120, check=False
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"turbokv {argv[0]}: error: ")
    assert message.format(d=files) in lines[0]


def test_ctx_beyond_the_models_positions_warns(capsys):
    """Chunks longer than the model's positions are measured (the user may mean it) with a warning."""
    from types import SimpleNamespace

    from turbokv.cli import _check_positions

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    _check_positions(model, 8192)
    assert capsys.readouterr().err == ""
    _check_positions(model, 8193)
    assert "warning: --ctx 8193 exceeds the model's 8192 positions" in capsys.readouterr().err
