"""NVFP4 / MXFP4 / MXFP8 primitives against hand-computed blocks, round trips, and torchao's emulation."""

from __future__ import annotations

import importlib

import pytest
import torch

from compressdit.quant.mx_primitives import (E2M1, E4M3, mx_dequantize, mx_fake_quantize, mx_quantize,
                                             nvfp4_dequantize, nvfp4_fake_quantize, nvfp4_quantize)

# One 16-value block with amax 3 (= 6 * 0.5), and a second block whose E4M3 scale rounds down (179.2 -> 176).
BLOCK1 = [3.0, -1.5, 0.75, 0.125, 0.375, 2.5, -0.05, 1.0, 2.0, -3.0, 0.0, 0.5, 1.75, 1.25, -0.625, 0.25]
# x / 0.5 = 6, -3, 1.5, 0.25 (tie -> 0), 0.75 (tie -> 1), 5 (tie -> 4), -0.1 (-> -0), 2, 4, -6, 0, 1,
#           3.5 (tie -> 4), 2.5 (tie -> 2), -1.25 (tie -> -1), 0.5
CODES1 = [7, 13, 3, 0, 2, 6, 8, 4, 6, 15, 0, 2, 6, 4, 10, 1]
BLOCK2 = [1.2, 0.3, -0.6] + [0.0] * 13


def test_nvfp4_hand_computed_blocks():
    codes, block_scale, tensor_scale = nvfp4_quantize(torch.tensor([BLOCK1 + BLOCK2]))
    assert tensor_scale.item() == pytest.approx(3.0 / (6 * 448))
    assert block_scale.dtype == torch.float8_e4m3fn
    # block 1: e4m3(3 / (6 * s_T)) = 448; block 2: e4m3(1.2 * 448 / 3 = 179.2) = 176 (ulp 16 at 128..256)
    assert block_scale.float().tolist() == [[448.0, 176.0]]
    assert codes[0, :16].tolist() == CODES1
    # block 2 step = 176 * s_T = 0.19643: 1.2 -> 6.11 saturates to 6; 0.3 -> 1.53 -> 1.5; -0.6 -> -3.05 -> -3
    assert codes[0, 16:19].tolist() == [7, 3, 13] and codes[0, 19:].tolist() == [0] * 13
    values = nvfp4_dequantize(codes, block_scale, tensor_scale)
    step = 176 * 3.0 / 2688
    expected = [6 * 0.5, -3 * 0.5, 1.5 * 0.5, 0, 0.5, 2.0, -0.0, 1.0, 2.0, -3.0, 0, 0.5, 2.0, 1.0, -0.5, 0.25]
    torch.testing.assert_close(values[0], torch.tensor(expected + [6 * step, 1.5 * step, -3 * step] + [0.0] * 13))


def test_mx_hand_computed_blocks():
    block = torch.zeros(3, 32)
    block[0, :4] = torch.tensor([3.0, -1.0, 0.2, 0.9])   # amax 3: 2^ceil(log2(3 / 6)) = 0.5 -> byte 126
    block[1, :2] = torch.tensor([7.0, -0.6])              # amax 7: 2^ceil(log2(7 / 6)) = 2 -> byte 128
    codes, scale = mx_quantize(block, E2M1)               # block 3 all zero: 2^-127 -> byte 0
    assert scale.tolist() == [[126], [128], [0]]
    assert codes[0, :4].tolist() == [7, 12, 1, 4]       # 6, -2, 0.4 -> 0.5, 1.8 -> 2
    assert codes[1, :2].tolist() == [6, 9]              # 3.5 ties to 4; -0.3 -> -0.5
    assert codes[2].tolist() == [0] * 32
    torch.testing.assert_close(mx_dequantize(codes, scale, E2M1)[:2, :4],
                               torch.tensor([[3.0, -1.0, 0.25, 1.0], [8.0, -1.0, 0.0, 0.0]]))
    fp8 = torch.zeros(1, 32)
    fp8[0, :2] = torch.tensor([448.0 * 4, 3.0])            # amax / 448 = 4 exactly: scale 4 -> byte 129
    codes, scale = mx_quantize(fp8, E4M3)
    assert scale.tolist() == [[129]] and codes[0, :2].tolist() == [0x7E, E4M3.encode(torch.tensor(0.75)).item()]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_round_trip_is_idempotent_and_close(fmt):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=gen) * (1 + torch.rand(24, 1, generator=gen) * 10)
    if fmt == "nvfp4":
        quantize, dequantize = nvfp4_quantize, lambda c, s, t: nvfp4_dequantize(c, s, t)
    else:
        element = E2M1 if fmt == "mxfp4" else E4M3
        quantize = lambda x: (*mx_quantize(x, element), None)  # noqa: E731
        dequantize = lambda c, s, t: mx_dequantize(c, s, element)  # noqa: E731
    codes, scale, tensor_scale = quantize(w)
    values = dequantize(codes, scale, tensor_scale)
    again = quantize(values) if fmt != "nvfp4" else nvfp4_quantize(values, tensor_scale)
    # quantized values are fixed points (the scales may differ: MX's ceil rule can pick a smaller one next time)
    assert torch.equal(dequantize(*again), values)
    error = ((values - w).norm() / w.norm()).item()
    assert error < (0.03 if fmt == "mxfp8" else 0.15)


def test_fake_quantization_equals_quantize_then_dequantize():
    x = torch.randn(5, 64) * torch.linspace(0.1, 5, 64)
    torch.testing.assert_close(nvfp4_fake_quantize(x), nvfp4_dequantize(*nvfp4_quantize(x)))
    for element in (E2M1, E4M3):
        torch.testing.assert_close(mx_fake_quantize(x, element), mx_dequantize(*mx_quantize(x, element), element))


def test_matches_torchao_emulation_bit_for_bit():
    nvfp4 = importlib.import_module("torchao.prototype.mx_formats.nvfp4_tensor")  # torchao: the test extra
    mx = importlib.import_module("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=gen) * torch.rand(32, 1, generator=gen) * 3
    scale = nvfp4.per_tensor_amax_to_scale(w.abs().amax())
    theirs = nvfp4.NVFP4Tensor.to_nvfp4(w, per_tensor_scale=scale).dequantize(torch.float32)
    assert torch.equal(nvfp4_dequantize(*nvfp4_quantize(w)), theirs)
    for element, dtype in ((E2M1, torch.float4_e2m1fn_x2), (E4M3, torch.float8_e4m3fn)):
        theirs = mx.MXTensor.to_mx(w, dtype, 32, scaling_mode=ScaleCalculationMode.RCEIL)
        codes, scale = mx_quantize(w, element)
        assert torch.equal(theirs.scale.view(torch.uint8).reshape(scale.shape), scale)
        assert torch.equal(theirs.dequantize(torch.float32), mx_dequantize(codes, scale, element))


def test_quantize_refuses_non_finite_weights_and_ragged_blocks():
    with pytest.raises(ValueError, match="NaN"):
        nvfp4_quantize(torch.full((1, 16), float("inf")))
    with pytest.raises(ValueError, match="not divisible by the block size 32"):
        mx_quantize(torch.zeros(2, 48), E2M1)
