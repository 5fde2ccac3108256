"""Hadamard rotation: sign PRNG, orthonormality, inverse, direction, dense agreement."""

from __future__ import annotations

import pytest
import torch
from conftest import cuda_ready, device_params

import turbokv
from turbokv.core import reference
from turbokv.core.rotation import K_SEED, V_SEED, hadamard_matrix, rotation_matrix, signs, splitmix64_at

GROUPS = [16, 32, 64, 128, 256, 512]
# s1 then s2 of a 16-group for K_SEED: a pinned regression vector for every implementation.
GOLDEN_K_SEED_SIGNS = "++-+-+---+++---+-++--++++--+++--"


def test_splitmix64_golden():
    """Our stream is standard splitmix64: its published first outputs for seed 0."""
    assert [splitmix64_at(0, i) for i in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert splitmix64_at(1234567, 0) == 0x599ED017FB08FC85


def test_sign_vector_golden():
    """First 16 signs of s1 for K_SEED, pinned so C++, CUDA and Python can never drift apart silently."""
    s1, s2 = signs(K_SEED, 16)
    got = "".join("+" if v > 0 else "-" for v in torch.cat([s1, s2]).tolist())
    expected = "".join("-" if splitmix64_at(K_SEED, i) >> 63 else "+" for i in range(32))
    assert got == expected
    assert got == GOLDEN_K_SEED_SIGNS


@pytest.mark.parametrize("n", GROUPS)
def test_hadamard_matrix_orthonormal(n):
    h = hadamard_matrix(n) / n**0.5
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", GROUPS)
@pytest.mark.parametrize("seed", [None, K_SEED, V_SEED])
def test_signed_rotation_is_orthogonal(n, seed):
    r = rotation_matrix(n, seed)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation_matrix(n, seed, inverse=True), r.T, rtol=0, atol=0)


@pytest.mark.parametrize("n", GROUPS)
@pytest.mark.parametrize("seed", [None, K_SEED])
@pytest.mark.parametrize("inverse", [False, True])
def test_native_hadamard_equals_dense_matrix(n, seed, inverse, gen):
    """The C++ op applies exactly R (or R^T) as defined by the explicit dense matrix."""
    x = torch.randn(5, 3 * n, generator=gen, dtype=torch.float64)  # three blocks: block-diagonal
    y = turbokv.hadamard(x, n, seed, inverse)
    r = rotation_matrix(n, seed, inverse)
    expected = (x.reshape(5, 3, n) @ r.T).reshape(5, 3 * n)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("n", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_hadamard_matches_reference_bitwise(device, n, dtype, gen):
    x = torch.randn(7, 2 * n, generator=gen).to(dtype)
    for inverse in (False, True):
        for seed in (None, K_SEED):
            got = turbokv.hadamard(x.to(device), n, seed, inverse).cpu()
            assert torch.equal(got, reference.hadamard(x, n, seed, inverse)), (inverse, seed)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [16, 128, 512])
def test_cuda_hadamard_many_chunks_and_views(n, gen):
    """More chunks than one wave of warps, a tail chunk, a misaligned view: equal to the CPU op."""
    ok, why = cuda_ready()
    if not ok:
        pytest.skip(why)
    x = torch.randn(40001 * 16 // n + 1, n, generator=gen, dtype=torch.float16)
    xc = x.cuda()
    for src in (xc, xc[1:]):  # a view starting 2n bytes in
        assert torch.equal(turbokv.hadamard(src, n, K_SEED).cpu(), turbokv.hadamard(src.cpu(), n, K_SEED))
    odd = torch.randn(3 * n + 1, generator=gen, dtype=torch.float16).cuda()[1:]  # 2 bytes off: copied first
    assert torch.equal(turbokv.hadamard(odd, n, K_SEED).cpu(), turbokv.hadamard(odd.cpu(), n, K_SEED))
    assert torch.equal(
        turbokv.hadamard(x.double().cuda(), n, V_SEED, True).cpu(), turbokv.hadamard(x.double(), n, V_SEED, True)
    )


@pytest.mark.parametrize("n", GROUPS)
def test_inverse_is_exact(n, gen):
    x = torch.randn(9, n, generator=gen, dtype=torch.float64)
    for seed in (None, K_SEED):
        back = turbokv.hadamard(turbokv.hadamard(x, n, seed, False), n, seed, True)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    y32 = turbokv.hadamard(turbokv.hadamard(x.float(), n, K_SEED, False), n, K_SEED, True)
    torch.testing.assert_close(y32.double(), x, rtol=0, atol=1e-5)


def test_unseeded_hadamard_is_self_inverse(gen):
    x = torch.randn(4, 128, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(turbokv.hadamard(turbokv.hadamard(x, 128), 128), x, rtol=0, atol=1e-12)


def test_rotation_preserves_dot_products(gen):
    q, k = torch.randn(2, 64, 128, generator=gen, dtype=torch.float64)
    rq, rk = turbokv.hadamard(q, 128, K_SEED), turbokv.hadamard(k, 128, K_SEED)
    torch.testing.assert_close((rq * rk).sum(-1), (q * k).sum(-1), rtol=1e-12, atol=1e-12)


def test_signs_spread_a_structured_outlier():
    """Signs before H matter: a one-hot channel outlier becomes flat (max/rms = 1) after rotation."""
    x = torch.zeros(1, 128, dtype=torch.float64)
    x[0, 5] = 100.0
    y = turbokv.hadamard(x, 128, K_SEED)
    assert y.abs().max() / y.pow(2).mean().sqrt() == pytest.approx(1.0)
