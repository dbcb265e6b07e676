"""The INT8 GEMM path computes what the dequantize-then-matmul reference computes."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.kernels import int8_gemm_supported, int8_linear, quantize_activation_int8
from compressdit.quant.layers import QuantLinear
from compressdit.quant.spec import LinearQuantSpec


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_linear_matches_the_reference_path(granularity):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40)
    layer = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8, a_bits=8, a_granularity=granularity))
    x = torch.randn(3, 11, 64) * torch.linspace(0.1, 5, 64)
    reference = layer(x)  # CPU: fake-quantized activations, dequantized weight
    fast = int8_linear(x, layer.weight.data, layer.weight_scale, layer.bias, granularity)
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_int8_activation_codes_round_trip_within_half_a_step():
    x = torch.randn(20, 32)
    codes, scale = quantize_activation_int8(x, "per_token")
    assert codes.dtype == torch.int8 and scale.shape == (20, 1)
    assert ((codes.float() * scale - x).abs() <= scale / 2 + 1e-6).all()
    assert (codes.abs().amax(-1) == 127).all()


def test_int8_gemm_support_rules():
    assert int8_gemm_supported(torch.zeros(17, 64), 64, 40)
    assert not int8_gemm_supported(torch.zeros(16, 64), 64, 40)
    assert not int8_gemm_supported(torch.zeros(32, 60), 60, 40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantlinear_uses_the_int8_gemm_on_cuda():
    linear = torch.nn.Linear(256, 128).cuda()
    layer = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8, a_bits=8)).cuda()
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    assert layer.uses_int8_gemm(x)
    out = layer(x)
    reference = torch.nn.functional.linear(x.float(), layer.dequantized_weight(), layer.bias.float())
    assert (out.float() - reference).norm() / reference.norm() < 0.02
