"""Tests for compressdit.quant.rotation: block Hadamard transforms, random signs and channel-balancing scales."""

from __future__ import annotations

import math

import pytest
import torch

from compressdit.quant.rotation import balancing_scale, fwht, hadamard_block, random_signs, rotate

BLOCKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _sylvester(n: int) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix H_n, built by the recursion [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("block", BLOCKS)
def test_fwht_is_orthonormal(block):
    eye = torch.eye(block, dtype=torch.float64)
    h = fwht(eye, block)  # rows of I transformed: the matrix of the transform itself
    assert torch.allclose(h @ h.T, eye, atol=1e-12)
    assert torch.allclose(h.T @ h, eye, atol=1e-12)
    # entries are all +-1/sqrt(block): a Hadamard matrix, not just any orthogonal one
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(block)), atol=1e-12)


@pytest.mark.parametrize("block", BLOCKS)
def test_fwht_matches_explicit_sylvester_hadamard(block):
    h = _sylvester(block) / math.sqrt(block)
    x = torch.randn(3, 5, block, generator=torch.Generator().manual_seed(block), dtype=torch.float64)
    assert torch.allclose(fwht(x, block), x @ h, atol=1e-10)


def test_fwht_acts_blockwise_on_wider_inputs():
    width, block = 96, 32
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = torch.block_diag(*[_sylvester(block) / math.sqrt(block)] * (width // block))
    assert torch.allclose(fwht(x, block), x @ h, atol=1e-10)
    # the block size matters: smaller blocks are a different transform
    assert not torch.allclose(fwht(x, block), fwht(x, block // 2))


def test_fwht_keeps_dtype_and_shape():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    y = fwht(x, 8)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("width,block", [(1152, 128), (3072, 1024), (96, 32), (64, 64), (6, 2),
                                         (1, 1), (3, 1), (7, 1), (1155, 1)])
def test_hadamard_block_is_largest_power_of_two_divisor(width, block):
    assert hadamard_block(width) == block
    assert width % block == 0 and block & (block - 1) == 0
    assert width % (2 * block) != 0  # the largest such power of two


@pytest.mark.parametrize("width", [0, -4])
def test_hadamard_block_rejects_non_positive_widths(width):
    with pytest.raises(ValueError, match="positive"):
        hadamard_block(width)


@pytest.mark.parametrize("block", [3, 12, 8, 0, -4])
def test_fwht_rejects_bad_blocks(block):
    x = torch.zeros(2, 12)  # 3 and 12 are not powers of two, 8 does not divide 12, 0 and -4 are no sizes
    with pytest.raises(ValueError, match="power of two"):
        fwht(x, block)


def test_random_signs_are_seeded_int8_plus_minus_one():
    a, b = random_signs(256, seed=5), random_signs(256, seed=5)
    assert a.dtype == torch.int8 and a.shape == (256,)
    assert torch.equal(a, b)
    assert set(a.tolist()) == {-1, 1}
    assert not torch.equal(a, random_signs(256, seed=6))
    # unaffected by the global RNG
    torch.manual_seed(123)
    c = random_signs(256, seed=5)
    torch.manual_seed(456)
    assert torch.equal(c, random_signs(256, seed=5)) and torch.equal(c, a)


@pytest.mark.parametrize("width", [64, 96, 1152])
def test_rotate_preserves_norms_and_inner_products(width):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(7, width, generator=gen, dtype=torch.float64)
    w = torch.randn(5, width, generator=gen, dtype=torch.float64)
    signs = random_signs(width, seed=1)
    xr, wr = rotate(x, signs), rotate(w, signs)
    assert not torch.allclose(xr, x)  # a real change of basis
    assert torch.allclose(xr.norm(dim=-1), x.norm(dim=-1), atol=1e-10)
    assert torch.allclose(xr @ wr.T, x @ w.T, atol=1e-10)  # (xR)(WR)^T == xW^T


def test_rotate_applies_signs_before_the_hadamard():
    width = 16
    signs = random_signs(width, seed=2)
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = _sylvester(width) / math.sqrt(width)
    expected = x @ torch.diag(signs.double()) @ h
    assert torch.allclose(rotate(x, signs), expected, atol=1e-12)


def test_balancing_scale_hand_computed():
    act = torch.tensor([4.0, 1.0, 9.0, 16.0])
    weight = torch.tensor([[1.0, -4.0, 0.5, 0.25],
                           [-0.5, 2.0, -1.0, -1.0]])  # column maxima |W|: 1, 4, 1, 1
    # s_j = a_j^0.5 / w_j^0.5
    assert torch.allclose(balancing_scale(act, weight, 0.5), torch.tensor([2.0, 0.5, 3.0, 4.0]))
    # migration 0.25: s_j = a_j^0.25 / w_j^0.75
    expected = act.pow(0.25) / torch.tensor([1.0, 4.0, 1.0, 1.0]).pow(0.75)
    assert torch.allclose(balancing_scale(act, weight, 0.25), expected)
    assert balancing_scale(act, weight, 0.5).dtype == torch.float32


def test_balancing_scale_guards_zero_channels():
    act = torch.tensor([0.0, 2.0])
    weight = torch.tensor([[0.0, 1.0]])
    s = balancing_scale(act, weight, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()


def _outlier_layer(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 16, generator=gen) * torch.logspace(-1, 1, 16)
    x = torch.randn(32, 16, generator=gen) * torch.logspace(1, -1, 16)
    return x, weight


def test_migration_zero_flattens_the_balanced_weight():
    x, weight = _outlier_layer()
    s = balancing_scale(x.abs().amax(0), weight, 0.0)
    col_max = (weight * s).abs().amax(0)
    assert torch.allclose(col_max, torch.ones_like(col_max), rtol=1e-5)
    assert weight.abs().amax(0).max() / weight.abs().amax(0).min() > 10  # it was far from flat before


def test_migration_one_flattens_the_balanced_activations():
    x, weight = _outlier_layer()
    s = balancing_scale(x.abs().amax(0), weight, 1.0)
    act_max = (x / s).abs().amax(0)
    assert torch.allclose(act_max, torch.ones_like(act_max), rtol=1e-5)
    assert x.abs().amax(0).max() / x.abs().amax(0).min() > 10


@pytest.mark.parametrize("migration", [-0.1, 1.5])
def test_out_of_range_migration_raises(migration):
    x, weight = _outlier_layer()
    with pytest.raises(ValueError, match="migration"):
        balancing_scale(x.abs().amax(0), weight, migration)
