"""Tests for compressdit.quant.duquant: the outlier-aware rotation against dense matrices."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.duquant import (DEFAULT_STEPS, OutlierRotationCodes, block_rotate, duquant_block,
                                       fit_outlier_rotation, greedy_rotation, greedy_steps, rotation_from_steps,
                                       sylvester_hadamard, zigzag_permutation)


def _absmax(width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(width, generator=gen) + 0.5
    a[torch.randperm(width, generator=gen)[:3]] *= 40  # salient channel outliers
    return a


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_sylvester_hadamard_is_orthonormal_with_a_constant_first_row(n):
    h = sylvester_hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)
    assert torch.allclose(h[0], torch.full((n,), n ** -0.5))


def test_greedy_rotation_is_orthogonal_and_lowers_the_peak():
    v = _absmax(32)
    r = greedy_rotation(v)
    assert torch.allclose(r @ r.T, torch.eye(32), atol=1e-5)
    assert float((v @ r).abs().max()) < 0.5 * float(v.max())
    flat = torch.ones(16)  # nothing to spread: the identity
    assert torch.equal(greedy_rotation(flat), torch.eye(16))


def test_zigzag_deals_channels_by_magnitude():
    magnitude = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0])
    perm = zigzag_permutation(magnitude, 4)  # 2 blocks: ranks 0,3,4,7 -> block 0; 1,2,5,6 -> block 1
    assert sorted(perm.tolist()) == list(range(8))
    assert perm.tolist() == [0, 6, 7, 1, 2, 4, 5, 3]
    blocks = magnitude[perm].reshape(2, 4)
    assert blocks[0].tolist() == [9.0, 6.0, 4.0, 1.0] and blocks[1].tolist() == [8.0, 7.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="does not divide"):
        zigzag_permutation(magnitude, 3)


@pytest.mark.parametrize("width", [64, 256, 384])
def test_outlier_rotation_matches_its_dense_orthogonal_matrix(width):
    rotation = fit_outlier_rotation(_absmax(width), block=128).rotation()
    t = rotation.dense().double()
    assert torch.allclose(t @ t.T, torch.eye(width, dtype=torch.float64), atol=1e-5)
    x = torch.randn(5, 3, width, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(rotation.apply(x), x @ t.float(), atol=1e-5)
    assert torch.allclose(rotation.invert(rotation.apply(x)), x, atol=1e-5)
    w = torch.randn(7, width)
    assert torch.allclose(rotation.apply(x) @ rotation.apply(w).T, x @ w.T, atol=1e-4)  # folded into weights


def test_outlier_rotation_flattens_the_calibrated_absmax():
    a = _absmax(256)
    rotation = fit_outlier_rotation(a, block=128).rotation()
    assert float(rotation.apply(a).abs().max()) < 0.25 * float(a.max())


def test_block_rotate_is_block_diagonal_matmul():
    blocks = torch.randn(3, 4, 4)
    x = torch.randn(2, 12)
    assert torch.allclose(block_rotate(x, blocks), x @ torch.block_diag(*blocks), atol=1e-6)
    assert duquant_block(1152) == 128 and duquant_block(96) == 32 and duquant_block(6) == 2


def test_step_codes_rebuild_the_greedy_rotation_bit_for_bit():
    v = _absmax(64, seed=3)
    codes = greedy_steps(v)
    taken = int((codes >= 0).sum())
    assert codes.dtype == torch.int16 and codes.shape == (DEFAULT_STEPS,) and taken > 0
    assert (codes[taken:] == -1).all()
    r = rotation_from_steps(codes, 64)
    assert torch.equal(r, rotation_from_steps(codes.clone(), 64))  # deterministic
    assert torch.allclose(r @ r.T, torch.eye(64), atol=1e-5)
    assert float((v @ r).abs().max()) < 0.5 * float(v.max())
    # every step was kept because it lowered the peak: replaying fewer steps leaves a higher one
    fewer = codes.clone()
    fewer[taken - 1] = -1
    assert float((v @ rotation_from_steps(fewer, 64)).abs().max()) > float((v @ r).abs().max())


def test_fitted_rotation_is_stored_compactly():
    codes = fit_outlier_rotation(_absmax(384), block=128)
    assert codes.first.shape == codes.second.shape == (3, DEFAULT_STEPS) and codes.first.dtype == torch.int16
    assert codes.perm.dtype == torch.int16 and sorted(codes.perm.tolist()) == list(range(384))
    stored = sum(t.numel() * t.element_size() for t in (codes.first, codes.perm, codes.second))
    dense = 2 * 384 * 128 * 4 + 384 * 8  # two fp32 block-diagonal matrices + an int64 permutation
    assert stored * 20 < dense


@pytest.mark.parametrize("width", [128, 1152, 96, 8])
def test_the_steps_are_the_dense_rotation_up_to_rounding(width):
    """``RotationSteps`` (the C pass's form): every block's steps of the codes in order, and ``x @ T`` within fp32
    rounding of the dense blocks' product; blocks that took no step (here every other one of ``R2``) only permuted."""
    codes = fit_outlier_rotation(_absmax(width), block=128)
    second = codes.second.clone()
    second[::2] = -1  # no step: those blocks of R2 are the identity
    codes = OutlierRotationCodes(codes.first, codes.perm, second)
    steps = codes.steps()
    taken = [int((row >= 0).sum()) for table in (codes.first, codes.second) for row in table]
    assert steps.counts.tolist() == taken and steps.tops.shape[0] == steps.signs.shape[0] == sum(taken)
    assert steps.block == duquant_block(width) and set(steps.signs.unique().tolist()) <= {-1.0, 1.0}
    x = torch.randn(5, 3, width, generator=torch.Generator().manual_seed(1)) * _absmax(width)
    dense = codes.rotation().apply(x)
    torch.testing.assert_close(steps.apply(x), dense, rtol=1e-5, atol=1e-5 * float(dense.abs().max()))
    nothing = OutlierRotationCodes(torch.full_like(codes.first, -1), codes.perm, torch.full_like(codes.second, -1))
    assert torch.equal(nothing.steps().apply(x), x[..., codes.perm.long()])  # T = P
