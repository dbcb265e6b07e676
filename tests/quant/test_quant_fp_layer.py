"""Minifloat-weight layers (formats e2m1 / e3m0 / e1m2): packed storage, forward, specs, diffusers reload."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors import safe_open

from compressdit.errors import ConfigError
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.models import adapter_for
from compressdit.quant.activations import quantize_input
from compressdit.quant.formats import FORMATS
from compressdit.quant.fp_layer import FP_WEIGHT_FORMATS, MinifloatLinear
from compressdit.quant.fp_weights import quantize_weight_fp
from compressdit.quant.layers import QuantState
from compressdit.quant.minifloat import MINIFLOATS, unpack_nibbles
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import quantize_layers, quantized_modules
from tests.conftest import tiny_dit


def _spec(fmt: str, **extra) -> LinearQuantSpec:
    return LinearQuantSpec.from_dict({"format": fmt, "w_bits": 4, **extra}, "spec")


def _layer(fmt: str, **extra):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.mul_(1 + torch.rand(40, 1) * 10)  # uneven rows
    return linear, FORMATS.get(fmt).quantize(linear, _spec(fmt, **extra), None)


@pytest.mark.parametrize("fmt", FP_WEIGHT_FORMATS)
@pytest.mark.parametrize("group_size", [None, 32])
def test_layer_stores_packed_nibbles_and_fp32_scales(fmt, group_size):
    linear, layer = _layer(fmt, group_size=group_size)
    assert isinstance(layer, MinifloatLinear)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (40, 48) and layer.weight.numel() == 40 * 96
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (40, 96 // (group_size or 96))
    q = quantize_weight_fp(linear.weight, MINIFLOATS.get(fmt), group_size)
    assert torch.equal(unpack_nibbles(layer.weight.data), q.codes)
    assert torch.equal(layer.weight.data & 0x0F, q.codes[:, 0::2])
    assert torch.equal(layer.effective_weight(), q.dequantized())
    assert f"{fmt} W4A16" in repr(layer)


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("fmt, a_format, a_bits", [("e2m1", "e4m3", 8), ("e3m0", "e3m2", 6), ("e1m2", "e2m3", 6)])
def test_forward_is_the_dequantize_reference_with_per_token_fp_activations(fmt, a_format, a_bits):
    linear, layer = _layer(fmt, group_size=32, a_bits=a_bits, a_format=a_format)
    x = torch.randn(3, 7, 96) * torch.linspace(0.1, 4, 96)
    with torch.no_grad():
        out, truth = layer(x), linear(x)
        x_q = quantize_input(x, layer.spec)
        torch.testing.assert_close(out, torch.nn.functional.linear(x_q, layer.effective_weight(), layer.bias))
    assert not torch.equal(x_q, x)
    assert 0 < ((out - truth).norm() / truth.norm()).item() < 0.2
    assert layer.kernel_name == "cpu-decoded-dense"  # the decoded weight prepacked (tests/quant/test_quant_cpu_dense.py)


@pytest.mark.parametrize("bad, message", [
    ({"format": "e2m1", "w_bits": 8}, "set w_bits: 4"),
    ({"format": "e3m0", "w_bits": 4, "rotation": "hadamard"}, "unset rotation"),
    ({"format": "e1m2", "w_bits": 4, "w_symmetric": False}, "w_symmetric"),
    ({"format": "e2m1", "w_bits": 4, "rounding": "rtn", "act_order": True}, "act_order: only applies to rounding"),
    ({"format": "int", "w_bits": 4, "rounding": "adaround"}, "supports rounding rtn / gptq, not 'adaround'"),
    ({"format": "e2m1", "w_bits": 4, "a_bits": 8, "a_format": "e3m2"}, "a_format 'e3m2' has 6 bits"),
    ({"format": "e2m1", "w_bits": 4, "a_bits": 8, "a_granularity": "static"}, "static"),
    ({"format": "e2m1", "w_bits": 4, "codebook_size": 16}, "vq"),
    ({"format": "e4m0", "w_bits": 4}, "unknown format 'e4m0'"),
])
def test_bad_fp_specs_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        LinearQuantSpec.from_dict(bad, "rules[0].spec")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", FP_WEIGHT_FORMATS)
def test_gptq_rounding_builds_the_layer_from_the_input_hessian(fmt):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    x = torch.randn(256, 64, generator=gen) @ torch.randn(64, 64, generator=gen) / 8
    hessian = 2 * x.T @ x / len(x)
    spec = LinearQuantSpec(format=fmt, w_bits=4, group_size=32, rounding="gptq")
    layer = MinifloatLinear.from_linear(linear, spec, hessian=hessian)
    rtn = MinifloatLinear.from_linear(linear, LinearQuantSpec(format=fmt, w_bits=4, group_size=32))
    error = {k: (x @ (m.effective_weight() - linear.weight).T).norm().item() for k, m in (("gptq", layer),
                                                                                         ("rtn", rtn))}
    assert error["gptq"] < error["rtn"] and layer.weight.dtype == torch.uint8
    with pytest.raises(ValueError, match="needs the layer's input Hessian"):
        MinifloatLinear.from_linear(linear, spec)


def test_a_layer_that_does_not_fit_is_a_config_error():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(40, 8)
    with pytest.raises(ConfigError, match="proj: in_features 40 is not divisible by group_size 32"):
        quantize_layers(model, {"proj": _spec("e2m1", group_size=32)})
    model.proj = torch.nn.Linear(41, 8)
    with pytest.raises(ConfigError, match="in_features 41 is odd"):
        quantize_layers(model, {"proj": _spec("e2m1")})


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([1, 7])}


def test_mixed_fp_formats_reload_bit_identically_through_stock_from_pretrained(tmp_path):
    model = tiny_dit()
    adapter = adapter_for(model)
    formats = {"ffn_up": "e3m0", "ffn_down": "e1m2"}
    plan = {n: _spec(formats.get(adapter.role_of(n), "e2m1"), group_size=32, a_bits=8, a_format="e4m3")
            for n in adapter.linear_layers(model) if adapter.role_of(n) not in ("embedder", "head")}
    quantize_layers(model, plan)
    attach_quantizer(model, plan)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    model.save_pretrained(tmp_path)
    name = "transformer_blocks.0.ff.net.0.proj"  # 64 -> 256
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(f"{name}.weight").get_dtype() == "U8"
        assert f.get_slice(f"{name}.weight").get_shape() == [256, 32]
        assert f.get_slice(f"{name}.weight_scale").get_dtype() == "F32"
        assert f.get_slice(f"{name}.weight_scale").get_shape() == [256, 2]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["modules"][name]["format"] == "e3m0"
    import compressdit  # noqa: F401  registers the quantizer, as a user would
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert {n: m.spec.format for n, m in quantized_modules(loaded).items()} == {n: s.format for n, s in plan.items()}
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(), return_dict=False)[0], expected)
    assert loaded.num_parameters() == tiny_dit().num_parameters()
    half = DiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    layer = quantized_modules(half)[name]
    assert isinstance(layer.weight_scale, QuantState) and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.effective_weight(), quantized_modules(loaded)[name].effective_weight())
