"""Tests for compressdit.quant.twinlog: sign-split log codes, exact dequantization, the clipping/eta search."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.primitives import int_range, quantize_weight_rtn
from compressdit.quant.twinlog import twinlog_dequantize, twinlog_encode, twinlog_quantize


def _weight(rows=24, cols=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05 * (1 + 10 * torch.rand(rows, 1, generator=gen))
    w[:, :2] *= 6  # long tails
    return w


def test_dequantize_by_hand():
    codes = torch.tensor([[0, 1, -1, -2, 3]], dtype=torch.int8)
    delta, low, eta = torch.tensor([[0.5, 1.0]]), torch.tensor([[-3.0, -2.0]]), torch.tensor([[0.1]])
    expected = torch.tensor([[2 ** -3.0 - 0.1, 2 ** -2.5 - 0.1, -(2 ** -2.0 - 0.1), -(2 ** -1.0 - 0.1),
                              2 ** -1.5 - 0.1]])
    assert torch.allclose(twinlog_dequantize(codes, delta, low, eta), expected, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_are_sign_split_and_in_range(bits):
    w = _weight()
    q = twinlog_quantize(w, bits)
    qmin, qmax = int_range(bits)
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert torch.equal(q.codes < 0, w < 0)  # the sign bit is the weight's sign
    assert torch.equal(torch.sign(q.dequantized()), torch.sign(w).masked_fill(w == 0, 1))
    assert q.delta.shape == q.low.shape == (w.shape[0], 2) and q.eta.shape == (w.shape[0], 1)
    assert (q.eta > 0).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_dequantization_is_exactly_what_the_search_scored(bits):
    """The stored codes + parameters decode bit-exactly, and re-encoding the decoded weight gives the same codes."""
    w = _weight()
    q = twinlog_quantize(w, bits)
    decoded = twinlog_dequantize(q.codes, q.delta, q.low, q.eta)
    assert torch.equal(decoded, q.dequantized())
    again = twinlog_encode(decoded, bits, q.eta, torch.exp2(q.low) - q.eta, torch.exp2(q.low + q.delta *
                                                                                      (2 ** (bits - 1) - 1)) - q.eta)
    assert torch.equal(again.codes, q.codes)


def test_levels_are_log_spaced():
    w = _weight(rows=1, cols=512)
    q = twinlog_quantize(w, 4)
    positive = torch.unique(q.dequantized()[w >= 0]) + q.eta[0]
    ratios = positive[1:] / positive[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, float(2 ** q.delta[0, 0])), rtol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_beats_round_to_nearest_on_long_tailed_weights(bits):
    w = _weight(rows=32, cols=256)
    tlq = (w - twinlog_quantize(w, bits).dequantized()).pow(2).mean()
    rtn = (w - quantize_weight_rtn(w, bits).dequantized()).pow(2).mean()
    assert tlq < 0.5 * rtn


def test_output_error_search_uses_the_calibration_inputs():
    w = _weight(rows=32, cols=128)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=gen)
    x[:, 7] *= 20  # one input channel dominates the output error
    h = 2 * x.T @ x / x.shape[0]

    def output_error(q):
        return float(((w - q.dequantized()) @ h * (w - q.dequantized())).sum())

    by_output, by_weight = twinlog_quantize(w, 3, h), twinlog_quantize(w, 3)
    assert output_error(by_output) < output_error(by_weight)
    # and the output search is no worse than any single fixed choice it considered, row by row
    fixed = twinlog_quantize(w, 3, h, eta_grid=(0.05,), percentile_grid=(1.0,))
    row = lambda q: (((w - q.dequantized()) @ h) * (w - q.dequantized())).sum(1)  # noqa: E731
    assert (row(by_output) <= row(fixed) + 1e-9).all()


def test_bad_grids_raise():
    with pytest.raises(ValueError, match="percentiles"):
        twinlog_quantize(_weight(), 4, percentile_grid=(1.5,))
    with pytest.raises(ValueError, match="bits"):
        twinlog_quantize(_weight(), 1)
