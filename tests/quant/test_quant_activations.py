"""Activations below 8 bits: per-token / per-group int and minifloat fake quantization, specs, W4A4 reload."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from compressdit.errors import ConfigError
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.models import adapter_for
from compressdit.quant.activations import quantize_input
from compressdit.quant.layers import QuantLinear
from compressdit.quant.primitives import fake_quantize_activation
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import quantize_layers, quantized_modules
from tests.conftest import tiny_dit


def _spec(**kw) -> LinearQuantSpec:
    return LinearQuantSpec.from_dict({"w_bits": 4, "group_size": 32, **kw}, "spec")


def test_per_group_int4_scales_each_group_by_its_own_absmax():
    x = torch.tensor([[7.0, 3.5, -1.0, 0.5, 0.7, -0.35, 0.1, 0.2]])
    out = quantize_input(x, _spec(a_bits=4, a_granularity="per_group", a_group_size=4))
    # group 1: scale 7/7 = 1 -> [7, 4 (3.5 ties to even), -1, 0 (0.5 ties to even)]; group 2: scale 0.1
    torch.testing.assert_close(out, torch.tensor([[7.0, 4.0, -1.0, 0.0, 0.7, -0.4, 0.1, 0.2]]))


def test_per_group_e2m1_maps_each_group_absmax_on_six():
    x = torch.tensor([[6.0, 2.6, -0.2, 1.0, 0.3, 0.13, -0.06, 0.01]])
    out = quantize_input(x, _spec(a_bits=4, a_format="e2m1", a_granularity="per_group", a_group_size=4))
    # group 1: scale 1 -> [6, 3, -0 (0.2 < 0.25), 1]; group 2: scale 0.05 -> [6, 2.6 -> 3, -1.2 -> -1, 0.2 -> 0]
    torch.testing.assert_close(out, torch.tensor([[6.0, 3.0, -0.0, 1.0, 0.3, 0.15, -0.05, 0.0]]))


def test_per_token_int_path_is_the_historical_one_bit_for_bit():
    x = torch.randn(3, 5, 64)
    for granularity in ("per_token", "per_tensor"):
        spec = _spec(a_bits=6, a_granularity=granularity)
        assert torch.equal(quantize_input(x, spec), fake_quantize_activation(x, 6, granularity))


@pytest.mark.parametrize("a_format, a_bits, bound", [("int", 4, 0.12), ("e2m1", 4, 0.12), ("int", 6, 0.03),
                                                     ("e2m3", 6, 0.05), ("e3m2", 6, 0.05)])
@pytest.mark.parametrize("granularity, group", [("per_token", None), ("per_group", 16), ("per_group", 64)])
def test_error_shrinks_with_bits_and_groups(a_format, a_bits, bound, granularity, group):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, generator=gen) * torch.linspace(0.2, 3, 128)
    out = quantize_input(x, _spec(a_bits=a_bits, a_format=a_format, a_granularity=granularity, a_group_size=group))
    error = ((out - x).norm() / x.norm()).item()
    assert 0 < error < bound * (1.5 if granularity == "per_token" else 1)


def test_rounding_is_straight_through_and_keeps_the_dtype():
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    out = quantize_input(x, _spec(a_bits=4, a_format="e2m1", a_granularity="per_group", a_group_size=16))
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bad, message", [
    ({"a_bits": 4, "a_format": "fp4"}, "unknown activation format 'fp4'"),
    ({"a_bits": 6, "a_format": "e2m1"}, "has 4 bits"),
    ({"a_bits": 4, "a_granularity": "per_group"}, "needs a_group_size"),
    ({"a_bits": 4, "a_group_size": 32}, "only used with a_granularity per_group"),
    ({"a_bits": 4, "a_granularity": "per_group", "a_group_size": 0}, "must be positive"),
    ({"a_bits": 4, "a_format": "e2m1", "a_granularity": "static"}, "integer-only"),
    ({"a_bits": 4, "a_format": "nvfp4"}, "blocks of 16"),
    ({"a_bits": 4, "a_format": "mxfp4", "a_granularity": "per_group", "a_group_size": 16}, "32 for a_format"),
    ({"a_format": "e2m1"}, "set a_bits"),
    ({"w_bits": 8, "group_size": None, "a_bits": 8, "a_format": "e4m3"}, "int W8A8"),
    ({"format": "fp8", "w_bits": 8, "group_size": None, "a_bits": 8, "a_format": "e4m3"}, "fp8"),
])
def test_bad_activation_specs_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        _spec(**bad)
    assert "\n" not in str(info.value)


def test_activation_group_must_divide_the_layer_width():
    model = tiny_dit()
    plan = {"transformer_blocks.0.ff.net.2": _spec(a_bits=4, a_granularity="per_group", a_group_size=96)}
    with pytest.raises(ConfigError, match="not divisible by a_group_size 96"):
        quantize_layers(model, plan)


def layer_bits(plan) -> int:
    return next(iter(plan.values())).w_bits


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([1, 7])}


@pytest.mark.parametrize("act", [{"a_format": "int"}, {"a_format": "e2m1"}, {"a_format": "int", "w_bits": 3}])
def test_w4a4_and_w3a4_checkpoints_reload_through_stock_from_pretrained_and_run(tmp_path, act):
    model, float_model = tiny_dit(), tiny_dit()
    adapter = adapter_for(model)
    plan = {n: _spec(a_bits=4, a_granularity="per_group", a_group_size=32, **act)
            for n in adapter.linear_layers(model) if adapter.role_of(n) not in ("embedder", "head")}
    quantize_layers(model, plan)
    attach_quantizer(model, plan)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
        reference = float_model(**_inputs(), return_dict=False)[0]
    assert 0 < ((expected - reference).norm() / reference.norm()).item() < (0.5 if layer_bits(plan) == 4 else 0.8)
    model.save_pretrained(tmp_path)
    import compressdit  # noqa: F401  registers the quantizer, as a user would
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    layer = quantized_modules(loaded)["transformer_blocks.0.attn1.to_q"]
    assert isinstance(layer, QuantLinear) and layer.spec.a_group_size == 32 and layer.spec.a_format == act["a_format"]
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(), return_dict=False)[0], expected)
