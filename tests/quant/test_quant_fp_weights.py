"""Minifloat weights with per-channel / per-group fp32 scales (compressdit.quant.fp_weights): hand values."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant import fp_weights
from compressdit.quant.fp_weights import (dequantize_weight_fp, fp_scales, grid_neighbours, quantize_weight_fp)
from compressdit.quant.minifloat import MINIFLOATS

# (format, scaled weights, expected values, expected codes): ties to even, saturation at the format's maximum
HAND = {
    "e2m1": ([0.3, -0.75, 1.25, 2.6, -3.5, 5.0, 6.0, 7.0],
             [0.5, -1.0, 1.0, 3.0, -4.0, 4.0, 6.0, 6.0],
             [0b0001, 0b1010, 0b0010, 0b0101, 0b1110, 0b0110, 0b0111, 0b0111]),
    "e3m0": ([0.1, 0.2, -0.3, 1.4, 1.5, 3.0, -9.0, 20.0],
             [0.0, 0.25, -0.25, 1.0, 2.0, 4.0, -8.0, 16.0],
             [0b0000, 0b0001, 0b1001, 0b0011, 0b0100, 0b0101, 0b1110, 0b0111]),
    "e1m2": ([0.2, 0.3, -0.8, 1.6, 2.2, 2.75, -3.4, 9.0],
             [0.0, 0.5, -1.0, 1.5, 2.0, 3.0, -3.5, 3.5],
             [0b0000, 0b0001, 0b1010, 0b0011, 0b0100, 0b0110, 0b1111, 0b0111]),
}


@pytest.mark.parametrize("fmt", sorted(HAND))
def test_codec_round_trip_against_hand_values(fmt):
    element = MINIFLOATS.get(fmt)
    raw, values, codes = (torch.tensor(v) for v in HAND[fmt])
    q = quantize_weight_fp(raw[None], element, scale=torch.ones(1, 1))
    assert q.codes.dtype == torch.uint8
    assert q.codes[0].tolist() == codes.tolist()
    assert q.dequantized()[0].tolist() == values.tolist()
    assert torch.equal(dequantize_weight_fp(q.codes, q.scale, element), q.dequantized())


@pytest.mark.parametrize("fmt", sorted(HAND))
def test_group_absmax_lands_on_the_format_maximum(fmt):
    element = MINIFLOATS.get(fmt)
    weight = torch.tensor([[0.1, -2.0, 0.5, 1.0], [3.0, 0.0, 0.0, -0.25]])
    per_channel = quantize_weight_fp(weight, element)
    assert per_channel.scale.shape == (2, 1)
    torch.testing.assert_close(per_channel.scale[:, 0], torch.tensor([2.0, 3.0]) / element.max_value)
    grouped = quantize_weight_fp(weight, element, group_size=2)
    assert grouped.scale.shape == (2, 2)
    torch.testing.assert_close(grouped.scale, torch.tensor([[2.0, 1.0], [3.0, 0.25]]) / element.max_value)
    assert grouped.dequantized()[0, 1].item() == -2.0 and grouped.dequantized()[1, 0].item() == 3.0


def test_mse_range_is_never_worse_than_minmax_and_better_on_outliers():
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    weight[:, 0] *= 12  # one outlier per row stretches the min/max range
    element = MINIFLOATS.get("e2m1")
    error = {r: (quantize_weight_fp(weight, element, 64, r).dequantized() - weight).square().sum(1)
             for r in ("minmax", "mse")}
    assert (error["mse"] <= error["minmax"] + 1e-6).all()
    assert error["mse"].sum() < 0.97 * error["minmax"].sum()
    assert (fp_scales(weight, element, 64, "mse") <= fp_scales(weight, element, 64) + 1e-9).all()


def test_grid_neighbours_bracket_each_scaled_weight():
    element = MINIFLOATS.get("e2m1")
    lower, upper = grid_neighbours(torch.tensor([0.2, 1.0, -2.4, 5.0, 7.0, -9.0]), element)
    assert lower.tolist() == [0.0, 1.0, -3.0, 4.0, 6.0, -6.0]
    assert upper.tolist() == [0.5, 1.0, -2.0, 6.0, 6.0, -6.0]


def test_bad_inputs_are_clear_errors():
    element = MINIFLOATS.get("e2m1")
    with pytest.raises(ValueError, match="not divisible by group_size 64"):
        quantize_weight_fp(torch.randn(4, 96), element, 64)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight_fp(torch.tensor([[float("nan"), 1.0]]), element)


@pytest.mark.parametrize("fmt, group_size", [("e2m1", 16), ("e3m0", None), ("e1m2", 16)])
def test_sliced_mse_scales_equal_the_whole_weight_search(monkeypatch, fmt, group_size):
    """Slices of groups (a ragged last one included) choose bit-identical scales, ties (zero, constant and
    on-grid groups, where candidates give equal errors) included."""
    element = MINIFLOATS.get(fmt)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 48, generator=gen) * torch.logspace(-2, 1, 12).unsqueeze(1)
    weight[1, :16] = 0.0
    weight[2, 16:32] = 0.3
    weight[3] = element.round(torch.randn(48, generator=gen) * 2)
    grouped = weight.reshape(12, -1, group_size or 48)
    top = grouped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / element.max_value
    reference, best_err = top, torch.full_like(top, float("inf"))
    for shrink in fp_weights.MSE_SHRINKS:  # the search as first written: the whole weight per candidate
        scale = top * shrink
        err = (element.round(grouped / scale) * scale - grouped).square().sum(-1, keepdim=True)
        better = err < best_err
        reference, best_err = torch.where(better, scale, reference), torch.where(better, err, best_err)
    monkeypatch.setattr(fp_weights, "MSE_CHUNK", 5 * 16)  # 5 groups of 16 a slice, the last one ragged
    assert torch.equal(fp_scales(weight, element, group_size, "mse"), reference[..., 0])
