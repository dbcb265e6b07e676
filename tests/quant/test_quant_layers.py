"""Tests for compressdit.quant.layers: QuantLinear holds packed integer weights and computes the reference matmul."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressdit.quant.formats import FORMATS
from compressdit.quant.layers import PackedParameter, QuantLinear, QuantState, logical_weight_shapes
from compressdit.quant.primitives import dequantize_weight, fake_quantize_activation, int_range, quantize_weight_rtn
from compressdit.quant.spec import LinearQuantSpec

IN, OUT = 64, 24


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():  # uneven per-row magnitudes
        linear.weight.mul_(torch.logspace(-1, 1, OUT).unsqueeze(1))
        if bias:
            linear.bias.normal_()
    return linear


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(seed)) * 2


SPECS = {
    "w8a8-token": LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_token"),
    "w4g16-asym-a16": LinearQuantSpec(w_bits=4, group_size=16, w_symmetric=False),
    "w2g32-a8-tensor": LinearQuantSpec(w_bits=2, a_bits=8, group_size=32, a_granularity="per_tensor"),
    "w3-a6": LinearQuantSpec(w_bits=3, a_bits=6),
    "w6-asym": LinearQuantSpec(w_bits=6, w_symmetric=False),
}


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("name", list(SPECS))
def test_from_linear_output_equals_linear_with_dequantized_weight(name):
    spec = SPECS[name]
    linear = _linear()
    q = QuantLinear.from_linear(linear, spec)
    x = _x()
    ref_q = quantize_weight_rtn(linear.weight, spec.w_bits, spec.group_size, spec.w_symmetric)
    w_deq = dequantize_weight(ref_q.codes, ref_q.scale, ref_q.zero)
    assert torch.equal(q.dequantized_weight(), w_deq)
    assert torch.equal(q.codes(), ref_q.codes)
    x_in = x if spec.a_bits is None else fake_quantize_activation(x, spec.a_bits, spec.a_granularity)
    expected = F.linear(x_in, w_deq, linear.bias)
    with torch.no_grad():
        out = q(x)
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-6)
    # and it is a real quantization: not the float layer's output
    with torch.no_grad():
        assert not torch.allclose(out, linear(x), atol=1e-4)
    if spec.a_bits is not None:  # activations are quantized too, not only weights
        assert not torch.allclose(out, F.linear(x, w_deq, linear.bias), atol=1e-6)


@pytest.mark.parametrize("bits,shape,dtype", [
    (8, (OUT, IN), torch.int8),
    (6, (OUT, IN), torch.int8),
    (5, (OUT, IN), torch.int8),
    (4, (OUT, IN // 2), torch.uint8),
    (3, (OUT, IN // 2), torch.uint8),
    (2, (OUT, IN // 4), torch.uint8),
])
def test_weights_are_stored_packed_not_as_fake_quantized_floats(bits, shape, dtype):
    linear = _linear()
    q = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=bits, group_size=16))
    assert isinstance(q.weight, PackedParameter)
    assert q.weight.dtype == dtype and tuple(q.weight.shape) == shape
    assert not q.weight.requires_grad
    assert q.weight_scale.dtype == torch.float32 and tuple(q.weight_scale.shape) == (OUT, IN // 16)
    assert q.weight_zero is None and q.input_scale is None
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias, linear.bias)
    # a frozen parameter (accelerate offloads it with the weight) that counts no model weights
    assert isinstance(q.weight_scale, QuantState) and not q.weight_scale.requires_grad
    assert "weight_scale" in dict(q.named_parameters()) and q.weight_scale.numel() == 0
    assert q.weight_scale.nelement() == OUT * IN // 16
    state = q.state_dict()
    assert set(state) == {"weight", "weight_scale", "bias"}
    assert state["weight"].dtype == dtype
    qmin, qmax = int_range(bits)
    codes = q.codes()
    assert codes.shape == (OUT, IN) and int(codes.min()) >= qmin and int(codes.max()) <= qmax


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_numel_of_packed_weight_counts_logical_weights(bits):
    linear = _linear()
    q = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=bits))
    assert q.weight.numel() == OUT * IN
    assert q.weight.nelement() * q.weight.element_size() == OUT * IN * (8 if bits == 8 else 4 if bits == 4 else 2) // 8
    assert sum(p.numel() for p in q.parameters()) == sum(p.numel() for p in linear.parameters())


@pytest.mark.usefixtures("fp32_kernels")
def test_asymmetric_and_static_layers_carry_zero_points_and_input_scales():
    linear = _linear()
    spec = LinearQuantSpec(w_bits=4, a_bits=8, group_size=32, w_symmetric=False, a_granularity="static")
    with pytest.raises(ValueError, match="calibration"):
        QuantLinear.from_linear(linear, spec)
    absmax = torch.linspace(0.5, 3.0, IN)
    q = QuantLinear.from_linear(linear, spec, input_absmax=absmax)
    assert q.weight_zero.shape == (OUT, 2) and q.weight_zero.dtype == torch.float32
    assert float(q.input_scale) == pytest.approx(3.0 / 127)
    assert set(q.state_dict()) == {"weight", "weight_scale", "weight_zero", "input_scale", "bias"}
    x = _x() * 0.5
    expected = F.linear(fake_quantize_activation(x, 8, "static", q.input_scale), q.dequantized_weight(), linear.bias)
    with torch.no_grad():
        assert torch.allclose(q(x), expected, atol=1e-6)


@pytest.mark.usefixtures("fp32_kernels")
def test_to_float_linear_holds_the_dequantized_weight():
    linear = _linear()
    q = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=4, group_size=16))
    back = q.to_float_linear()
    assert type(back) is nn.Linear
    assert back.weight.dtype == torch.float32 and torch.equal(back.weight, q.dequantized_weight())
    assert torch.equal(back.bias, linear.bias)
    with torch.no_grad():
        assert torch.allclose(back(_x()), q(_x()), atol=1e-6)
    half = q.to_float_linear(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16
    no_bias = QuantLinear.from_linear(_linear(bias=False), LinearQuantSpec(w_bits=8)).to_float_linear()
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float32


def test_deepcopy_keeps_packed_storage_and_is_independent():
    model = nn.Sequential(QuantLinear.from_linear(_linear(), LinearQuantSpec(w_bits=4, a_bits=8, group_size=16)))
    clone = copy.deepcopy(model)
    q, c = model[0], clone[0]
    assert isinstance(c, QuantLinear) and isinstance(c.weight, PackedParameter)
    assert c.weight.logical_numel == q.weight.logical_numel == q.in_features * q.out_features
    assert c.weight.numel() == OUT * IN and c.weight.dtype == torch.uint8
    assert c.weight.data_ptr() != q.weight.data_ptr()
    assert c.spec == q.spec
    with torch.no_grad():
        assert torch.equal(c(_x()), q(_x()))
        c.weight.data.zero_()
        c.weight_scale.mul_(2)
    assert q.weight.data.any() and not torch.equal(c.weight_scale, q.weight_scale)


def test_packed_weights_report_their_logical_shape_only_inside_the_scope():
    q = QuantLinear.from_linear(_linear(), LinearQuantSpec(w_bits=4, group_size=16))
    expected = q(_x())
    clone, pickled = copy.deepcopy(q.weight), pickle.loads(pickle.dumps(q.weight))
    assert q.weight.shape == (OUT, IN // 2)
    with pytest.raises(KeyError), logical_weight_shapes():
        for weight in (q.weight, clone, pickled):
            assert weight.shape == (OUT, IN) and weight.size() == (OUT, IN // 2)
        assert q.state_dict()["weight"].shape == (OUT, IN // 2)  # saved as stored
        with torch.no_grad():
            assert torch.equal(q(_x()), expected)
        raise KeyError  # the scope ends with its exception too
    assert q.weight.shape == clone.shape == (OUT, IN // 2)


def test_compute_dtype_is_the_bias_dtype_else_float32():  # peft casts a LoRA on the layer to it
    assert QuantLinear.from_linear(_linear().to(torch.bfloat16), LinearQuantSpec(w_bits=4)).compute_dtype \
        == torch.bfloat16
    assert QuantLinear.from_linear(_linear(bias=False), LinearQuantSpec(w_bits=4)).compute_dtype == torch.float32


def test_backward_reaches_inputs_but_not_frozen_codes():
    q = QuantLinear.from_linear(_linear(), LinearQuantSpec(w_bits=4, a_bits=8, group_size=16))
    x = _x().requires_grad_()
    grad_out = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(3))
    q(x).backward(grad_out)
    assert torch.allclose(x.grad, grad_out @ q.dequantized_weight(), atol=1e-5)  # straight-through activations
    assert q.weight.grad is None


def test_bfloat16_inputs_run_in_bfloat16():
    q = QuantLinear.from_linear(_linear(), LinearQuantSpec(w_bits=8, a_bits=8))
    with torch.no_grad():
        out = q(_x().to(torch.bfloat16))
        ref = q(_x())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.15, rtol=0.05)


def test_format_registry_builds_empty_and_quantized_modules():
    fmt = FORMATS.get("int")
    linear = _linear()
    empty = fmt.empty(linear, LinearQuantSpec(w_bits=2))
    assert isinstance(empty, QuantLinear) and empty.weight.shape == (OUT, IN // 4)
    with pytest.raises(KeyError, match="unknown format 'fp4'"):
        FORMATS.get("fp4")
    with pytest.raises(ValueError, match="not divisible by group_size 48"):
        QuantLinear(IN, OUT, True, LinearQuantSpec(w_bits=8, group_size=48))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_offset_nibbles_are_the_int4_kernels_layout_and_alias_the_stored_weight_at_4_bits(bits):
    """What the int4 kernels' dequantize path reads (codes + 8, even column low): at 4 bits the stored packing is that
    layout, so the kernels keep no second copy of the weight (0.5 bytes per weight less at run time)."""
    from compressdit.quant.gpu_reference import dequantize_nibbles, pack_nibbles

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 16), LinearQuantSpec(w_bits=bits, group_size=32))
    nibbles = layer.offset_nibbles()
    assert torch.equal(nibbles, pack_nibbles(layer.codes()))
    assert (nibbles.data_ptr() == layer.weight.data_ptr()) == (bits == 4)
    decoded = dequantize_nibbles(nibbles, layer.weight_scale, None, 32).float()  # bf16 arithmetic
    torch.testing.assert_close(decoded, layer.dequantized_weight(), rtol=1e-2, atol=1e-2)
