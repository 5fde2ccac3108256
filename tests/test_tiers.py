"""The test tiers of conftest.py: the smoke tier covers every entry of every parametrize list of
every test function, and the shards split the suite into disjoint parts that add up to it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
SAMPLE = str(HERE / "test_multi_query.py")  # parametrised CUDA and CPU tests, rows of several arguments


class Collected:
    """Records the collected items' ids and, per test function, the ids of its parametrize entries."""

    def __init__(self):
        self.ids: list[str] = []
        self.entries: dict[tuple[str, bool], set] = {}

    def pytest_collection_finish(self, session):
        for item in session.items:
            self.ids.append(item.nodeid)
            key = (item.originalname, "cuda" in item.keywords)
            spec = item.callspec
            if item.get_closest_marker("pairwise"):  # covered value by value
                values = {(name, repr(v)) for name, v in spec.params.items()}
            else:
                values = set(enumerate(spec._idlist))
            self.entries.setdefault(key, set()).update(values)


def collect(*args: str) -> Collected:
    rec = Collected()
    assert pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args, SAMPLE], plugins=[rec]) == 0
    return rec


def test_smoke_covers_every_parametrize_entry():
    full, smoke = collect(), collect("-m", "smoke")
    assert 0 < len(smoke.ids) < len(full.ids) / 3
    assert smoke.entries == full.entries


def test_pairwise_cases_meet_every_pair_of_values():
    from itertools import combinations

    from helpers import pairwise

    lists = {"a": [1, 2, 3, 4, 5], "b": ["x", "y", "z", "w"], "c": range(6), "d": [True, False]}
    names, rows = pairwise(**lists)
    assert names == "a,b,c,d"
    cases = [row.values for row in rows]
    assert 30 <= len(cases) < 5 * 4 * 6 * 2 / 4
    for (i, xs), (j, ys) in combinations(enumerate(lists.values()), 2):
        assert {(c[i], c[j]) for c in cases} == {(x, y) for x in xs for y in ys}
    assert all(row.marks[0].name == "pairwise" for row in rows)
    assert len({row.id for row in rows}) == len(rows)


def test_shards_partition_the_suite():
    full = collect()
    shards = [collect("--shard", f"{i}/3").ids for i in range(3)]
    assert all(shards)
    assert sorted(sum(shards, [])) == sorted(full.ids)


def test_bad_shard_is_a_usage_error():
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "--shard", "3/3", SAMPLE]
    out = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False)
    assert out.returncode == 4 and "--shard: got '3/3', expected i/n with 0 <= i < n" in out.stderr
