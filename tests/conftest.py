"""Shared test fixtures: seeded generators and device selection."""

from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch

import turbokv

BASE_SEED = int(os.environ.get("TURBOKV_TEST_SEED", "0"))

# Under pytest-xdist, each worker gets its share of the cores for torch's CPU threads: the CUDA
# tests' references run on the CPU, and every worker using all the cores slowed them several-fold.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id (and TURBOKV_TEST_SEED), so each test draws fresh data."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) & 0x7FFFFFFF
    g = torch.Generator().manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return g


@pytest.fixture
def pin_kernels():
    """``pin_kernels(attention="templated", smem_limit=...)`` pins kernels (turbokv.core.ops.pinned_kernels)
    from that call to the end of the test; each call adds to the last; the test's end restores them."""
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(turbokv.core.ops.pinned_kernels(**fields))


def cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device on this machine"
    if not turbokv.native_loaded("cuda"):
        return False, "turbokv was built without its CUDA kernels"
    return True, ""


def device_params():
    """['cpu'] plus 'cuda' (marked, skipped with a printed reason when unavailable)."""
    ok, why = cuda_ready()
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not ok, reason=why)])]


# ---- test tiers, shards and a result log for runs on a lent GPU (tools/gpu_check.sh) ----------
#
# smoke: every test function's instances that cover each entry of each of its parametrize lists
#   at least once (a greedy cover, computed per function and device), so `-m "cuda and smoke"`
#   touches every kernel, format, head dim and mask type of the CUDA tests once, in minutes.
# --shard i/n: the tests whose node id hashes to i mod n (crc32: stable across runs and
#   machines), so a full tier splits into runs that each fit one call to the GPU machine.
# --results-log PATH: one line per result, appended and flushed as each test ends (failures
#   with their message), so a run cut off by a time limit still names what failed.


def pytest_addoption(parser):
    group = parser.getgroup("turbokv")
    group.addoption("--shard", default=None, help="i/n: run only the tests of shard i (0-based) of n")
    group.addoption("--results-log", default=None, help="append one line per test result to this file")


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the tier that covers each parameter value of each test once")
    config.addinivalue_line("markers", "pairwise: a case of a pairwise grid (helpers.pairwise)")
    path = config.getoption("--results-log")
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(ResultsLog(path), "turbokv-results-log")


def _cover_key(item) -> tuple:
    return (item.path, item.originalname, "cuda" in item.keywords)


def _param_values(item) -> set[tuple[str, str]]:
    spec = getattr(item, "callspec", None)
    if spec is None:
        return set()
    # The id of each parametrize list's entry (a row of several arguments counts as one case);
    # a pairwise grid (helpers.pairwise) is covered value by value, not row by row.
    ids = getattr(spec, "_idlist", None)
    if ids is not None and item.get_closest_marker("pairwise") is None:
        return set(enumerate(ids))
    return {(name, repr(value)) for name, value in spec.params.items()}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(_cover_key(item), []).append(item)
    for group in groups.values():
        wanted = set().union(*(_param_values(i) for i in group))
        chosen = [group[0]]
        wanted -= _param_values(group[0])
        while wanted:
            best = max(group, key=lambda i: len(_param_values(i) & wanted))
            chosen.append(best)
            wanted -= _param_values(best)
        for item in chosen:
            item.add_marker(pytest.mark.smoke)
    shard = config.getoption("--shard")
    if shard:
        try:
            index, count = (int(x) for x in shard.split("/"))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            raise pytest.UsageError(f"--shard: got {shard!r}, expected i/n with 0 <= i < n") from None
        keep = [i for i in items if zlib.crc32(i.nodeid.encode()) % count == index]
        config.hook.pytest_deselected(items=[i for i in items if zlib.crc32(i.nodeid.encode()) % count != index])
        items[:] = keep


class ResultsLog:
    """Appends a line per result to a file as each test ends (on the controlling process only:
    pytest-xdist's workers send their reports to it)."""

    def __init__(self, path: str):
        self.path = path

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and report.outcome == "passed":
            return
        line = f"{report.outcome.upper()} {report.nodeid} [{report.when} {report.duration:.1f}s]"
        if report.failed:
            text = str(report.longrepr).strip().splitlines()
            errors = [t for t in text if t.startswith("E ")][:8]
            line += "\n    " + "\n    ".join(errors or text[-4:])
        elif report.skipped and isinstance(report.longrepr, tuple):
            line += f" {report.longrepr[2]}"
        self._write(line)

    def pytest_collectreport(self, report):
        # A module skipped or broken at import (a missing package, a compiler) is one result too.
        if report.outcome == "passed":
            return
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr).strip()[-300:]
        self._write(f"{report.outcome.upper()} {report.nodeid} [collect] {why}")

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")
