"""Shared test fixtures: seeded generators and device selection."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import turbokv

BASE_SEED = int(os.environ.get("TURBOKV_TEST_SEED", "0"))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id (and TURBOKV_TEST_SEED), so each test draws fresh data."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) & 0x7FFFFFFF
    g = torch.Generator().manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return g


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
