"""FP8 format: spec checks, E4M3 layer vs the float layer, recipe, checkpoint through stock diffusers, compile."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors import safe_open

from compressdit.errors import ConfigError
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.models import adapter_for
from compressdit.quant.formats import FORMATS
from compressdit.quant.kernel_registry import set_kernel
from compressdit.quant.fp8_layer import FP8Linear
from compressdit.quant.gpu_reference import fp8_linear_reference
from compressdit.quant.layers import QuantState
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import quantize_layers, quantized_modules, resolve_plan
from compressdit.recipe import load_recipe
from tests.conftest import tiny_dit

FP8 = {"format": "fp8", "w_bits": 8, "a_bits": 8}


def _layer(a_bits=8, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(1 + torch.rand(40, 1) * 10)  # uneven rows: per-channel scales matter
    return linear, FP8Linear.from_linear(linear, LinearQuantSpec(format="fp8", w_bits=8, a_bits=a_bits))


def test_fp8_weights_are_e4m3_per_output_channel_with_fp32_scales():
    linear, layer = _layer()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (40, 96)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (40, 1)
    assert torch.equal(layer.weight.float().abs().amax(1), torch.full((40,), 448.0))
    error = (layer.effective_weight() - linear.weight).abs()
    assert (error <= linear.weight.abs() * 2 ** -4 + layer.weight_scale * 2 ** -9).all()
    assert layer.weight.numel() == 40 * 96 and "fp8 W8A8" in repr(layer)


@pytest.mark.parametrize("a_bits", [8, None])
def test_forward_is_the_reference_and_close_to_the_float_layer(a_bits):
    linear, layer = _layer(a_bits)
    set_kernel(layer, "cpu-fp8-dense")  # the reference's numbers (cpu-fp8-bf16 rounds its output to bf16)
    x = torch.randn(3, 7, 96) * torch.linspace(0.1, 4, 96)
    with torch.no_grad():
        out, truth = layer(x), linear(x)
    if a_bits == 8:
        torch.testing.assert_close(out, fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias))
    else:
        torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.effective_weight(), layer.bias))
    assert (out - truth).norm() / truth.norm() < (0.05 if a_bits else 0.03)


@pytest.mark.parametrize("bad, message", [
    ({"w_bits": 4}, "w_bits"), ({"a_bits": 4}, "a_bits"), ({"group_size": 32}, "group_size"),
    ({"w_symmetric": False}, "w_symmetric"), ({"balance": 0.5}, "balance"), ({"rotation": "hadamard"}, "rotation"),
    ({"a_granularity": "static"}, "a_granularity"), ({"vector_dim": 4}, "vq"), ({"w_range": "mse"}, "mse"),
])
def test_bad_fp8_specs_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        LinearQuantSpec.from_dict({**FP8, **bad}, "rules[0].spec")


def test_fp8_recipe_keeps_embedder_and_head_in_full_precision():
    model = tiny_dit()
    stage = load_recipe("fp8").stages[0]
    assert stage.name == "quantize" and stage.config.method == "rtn"
    rules = stage.config.options.rules
    plan = resolve_plan(model, adapter_for(model), rules)
    quantize_layers(model, plan)
    quantized = quantized_modules(model)
    assert quantized and all(isinstance(m, FP8Linear) for m in quantized.values())
    adapter = adapter_for(model)
    assert all(adapter.role_of(name) not in ("embedder", "head") for name in quantized)
    assert any(adapter.role_of(name) in ("embedder", "head") for name in plan)


def _dit_inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([1, 7])}


def _fp8_dit():
    model = tiny_dit()
    plan = {name: LinearQuantSpec.from_dict(dict(FP8), name) for name in adapter_for(model).linear_layers(model)
            if adapter_for(model).role_of(name) not in ("embedder", "head")}
    quantize_layers(model, plan)
    attach_quantizer(model, plan)
    return model, plan


def test_fp8_checkpoint_reloads_bit_identically_through_stock_from_pretrained(tmp_path):
    model, plan = _fp8_dit()
    with torch.no_grad():
        expected = model(**_dit_inputs(), return_dict=False)[0]
    model.save_pretrained(tmp_path)
    name = next(iter(plan))
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(f"{name}.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice(f"{name}.weight_scale").get_dtype() == "F32"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["modules"][name]["format"] == "fp8"
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert set(quantized_modules(loaded)) == set(plan)
    layer = quantized_modules(loaded)[name]
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert torch.equal(loaded(**_dit_inputs(), return_dict=False)[0], expected)
    assert loaded.num_parameters() == tiny_dit().num_parameters()
    half = DiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    layer = quantized_modules(half)[name]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert isinstance(layer.weight_scale, QuantState)  # a parameter: accelerate offloads it with its weight
    with pytest.raises(ValueError, match="dtype"):  # as for QuantLinear: a quantized model refuses casts
        half.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32


def test_format_registry_builds_empty_fp8_modules_on_meta():
    with torch.device("meta"):
        linear = torch.nn.Linear(64, 32)
    empty = FORMATS.get("fp8").empty(linear, LinearQuantSpec(**FP8))
    assert isinstance(empty, FP8Linear) and empty.weight.is_meta and empty.weight.dtype == torch.float8_e4m3fn


def test_compiled_fp8_layers_equal_eager_on_cpu():
    _, layer = _layer()
    model = torch.nn.Sequential(layer, torch.nn.GELU())
    x = torch.randn(4, 96)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
