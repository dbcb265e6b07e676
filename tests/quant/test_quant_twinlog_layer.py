"""Twin-log layers: rotations preserve the function, packed storage, specs, stock diffusers save -> reload."""

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
from compressdit.quant.layers import QuantState
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import quantize_layers, quantized_modules
from compressdit.quant.twinlog import twinlog_dequantize
from compressdit.quant.twinlog_layer import INPUT_ROTATIONS, TwinLogLinear
from tests.conftest import tiny_dit


def _linear_and_absmax(width=128, out=48):
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, out)
    with torch.no_grad():
        linear.weight.mul_(1 + torch.rand(out, 1) * 10)  # uneven rows
    absmax = torch.rand(width) + 0.5
    absmax[[3, 70]] *= 30
    return linear, absmax


def _spec(**kw):
    return LinearQuantSpec.from_dict({"format": "twinlog", "w_bits": 4, **kw}, "spec")


@pytest.mark.parametrize("rotation", sorted(INPUT_ROTATIONS))
@pytest.mark.parametrize("balance", [None, 0.5])
def test_rotated_layer_preserves_the_function_before_quantization(rotation, balance):
    """Balancing + rotation folded into the weight, applied to the input: the float layer's output, exactly."""
    linear, absmax = _linear_and_absmax()
    layer = TwinLogLinear.from_linear(linear, _spec(rotation=rotation, balance=balance), absmax)
    x = torch.randn(4, 9, 128) * absmax
    scale = layer.smooth_scale if balance is not None else torch.ones(128)
    folded = layer.rotate(linear.weight.detach() * scale)
    expected = linear(x)
    assert torch.allclose(torch.nn.functional.linear(layer.transform_input(x), folded, linear.bias), expected,
                          atol=1e-4, rtol=1e-4)
    # and the layer decodes back to the float weight's neighbourhood in the original input space
    rel = (layer.effective_weight() - linear.weight).norm() / linear.weight.norm()
    assert rel < 0.15


@pytest.mark.usefixtures("fp32_kernels")
def test_forward_is_the_decoded_weight_on_the_transformed_quantized_input():
    linear, absmax = _linear_and_absmax()
    layer = TwinLogLinear.from_linear(linear, _spec(rotation="duquant", a_bits=8), absmax)
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), layer.reference_forward(x))
    no_act = TwinLogLinear.from_linear(linear, _spec(rotation="duquant"), absmax)
    assert torch.allclose(no_act(x), torch.nn.functional.linear(x, no_act.effective_weight(), linear.bias),
                          atol=1e-4)
    stored = twinlog_dequantize(no_act.codes(), no_act.weight_scale, no_act.weight_zero, no_act.weight_eta)
    assert torch.equal(no_act.dequantized_weight(), stored)


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("rotation", sorted(INPUT_ROTATIONS))
def test_cpu_kernel_decodes_once_and_matches_the_reference(rotation):
    """``cpu-twinlog-dense``: the decoded weight is prepacked (the reference decodes the log2 codes per call);
    outputs equal the reference's on 4-bit per-group activations (up to fp32 rounding: DuQuant's C pass rotates by the
    greedy steps, the reference by their dense blocks); a new load of the codes is picked up."""
    linear, absmax = _linear_and_absmax()
    spec = _spec(rotation=rotation, balance=0.5, a_bits=4, a_granularity="per_group", a_group_size=16)
    layer = TwinLogLinear.from_linear(linear, spec, absmax)
    x = torch.randn(2, 9, 128) * absmax
    with torch.no_grad():
        assert layer.kernel_name == "cpu-twinlog-dense"
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        layer.weight_scale.mul_(2)  # in place, as load_state_dict does: the prepacked weight is rebuilt
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    out = layer(x)  # a gradient to the input: the kernel's output, the reference's gradient
    torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, weights)[0],
                       torch.autograd.grad(layer.reference_forward(x), x, weights)[0])


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("width", [128, 1152])
def test_duquant_layers_rotate_their_rows_in_one_c_pass(width):
    """DuQuant's rotation on CPU in the C pass (its greedy steps; ``cpu-twinlog-dense`` and, above 2^18 weights on
    CPUs without bf16 GEMMs, ``cpu-decoded-fp32``): the reference's output up to fp32 rounding; a bf16 model's rows
    widened once and rotated in fp32 (the reference rotates in bf16 arithmetic) within bf16 rounding of the fp32
    reference of the same rows. Without the pass (no C library) the numbers are the reference's own."""
    from compressdit.quant import cpu_native
    from compressdit.quant.kernel_registry import cache_of

    linear, absmax = _linear_and_absmax(width, 240)
    spec = _spec(rotation="duquant", balance=0.5, a_bits=4, a_granularity="per_group", a_group_size=16)
    layer = TwinLogLinear.from_linear(linear, spec, absmax * 4)
    x = torch.randn(2, 9, width) * absmax
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
        if cpu_native.native_library() is None:
            assert torch.equal(out, reference)
            return
        assert layer.rotation_steps().counts.max() >= 1 and cache_of(layer).buffers["rotated_rows"] is not None
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
        half = layer(x.bfloat16())
        assert half.dtype == torch.bfloat16
        wide = layer.reference_forward(x.bfloat16().float())
        torch.testing.assert_close(half.float(), wide, rtol=2e-2, atol=2e-2 * float(wide.abs().max()))


def test_duquant_without_calibration_is_a_clear_error():
    linear, _ = _linear_and_absmax()
    with pytest.raises(ValueError, match="calibrate"):
        TwinLogLinear.from_linear(linear, _spec(rotation="duquant"))


@pytest.mark.parametrize("bad,message", [
    ({"format": "twinlog", "w_bits": 4, "group_size": 64}, "unset group_size"),
    ({"format": "twinlog", "w_bits": 8}, "2-4 bits"),
    ({"format": "twinlog", "w_bits": 4, "low_rank": 8}, "low_rank"),
    ({"format": "twinlog", "w_bits": 4, "rounding": "gptq"}, "rounding"),
    ({"format": "int", "w_bits": 4, "rotation": "duquant"}, "format 'int' supports rotation none / hadamard"),
    ({"format": "twinlog", "w_bits": 4, "rotation": "spin"}, "rotation"),
])
def test_bad_specs_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        LinearQuantSpec.from_dict(bad, "rules[0].spec")
    assert "\n" not in str(info.value)


_ITEM = {"U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4}


def _nbytes(tensor_slice) -> int:
    return _ITEM[tensor_slice.get_dtype()] * int(torch.tensor(tensor_slice.get_shape()).prod())


@pytest.mark.parametrize("rotation", ["duquant", "hadamard"])
def test_stored_bytes_per_weight_are_the_codes_plus_small_row_and_rotation_state(rotation):
    linear, absmax = _linear_and_absmax(width=512, out=256)
    layer = TwinLogLinear.from_linear(linear, _spec(rotation=rotation, balance=0.5, a_bits=4), absmax * 4)
    stored = sum(getattr(layer, t).nelement() * getattr(layer, t).element_size() for t in layer.quantized_tensors)
    per_weight = stored / (512 * 256)
    assert 0.5 < per_weight < 0.62  # 4-bit codes 0.5 + row params 0.04 + balancing 0.016 + rotation <= 0.04


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([1, 7])}


@pytest.mark.parametrize("w_bits", [3, 4])
def test_checkpoint_reloads_bit_identically_through_stock_from_pretrained(tmp_path, w_bits):
    model = tiny_dit()
    adapter = adapter_for(model)
    names = [n for n in adapter.linear_layers(model) if adapter.role_of(n) not in ("embedder", "head")]
    rotations = ["duquant", "hadamard", "none"]
    plan = {n: _spec(w_bits=w_bits, a_bits=4, a_granularity="per_group", a_group_size=16, balance=0.5,
                     rotation=rotations[i % 3]) for i, n in enumerate(names)}
    absmax = {n: torch.rand(model.get_submodule(n).in_features) + 0.1 for n in names}
    quantize_layers(model, plan, absmax)
    attach_quantizer(model, plan)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    model.save_pretrained(tmp_path)
    name = "transformer_blocks.0.ff.net.2"  # 256 -> 64
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(f"{name}.weight").get_dtype() == "U8"
        assert f.get_slice(f"{name}.weight").get_shape() == [64, 128]
        for tensor, shape in (("weight_scale", [64, 2]), ("weight_zero", [64, 2]), ("weight_eta", [64, 1])):
            assert f.get_slice(f"{name}.{tensor}").get_dtype() == "F32"
            assert f.get_slice(f"{name}.{tensor}").get_shape() == shape
        for layer_name, layer in quantized_modules(model).items():  # a rotation stores less than the codes
            rotation = sum(_nbytes(f.get_slice(f"{layer_name}.{t}")) for t in layer.rotation_names)
            assert rotation < _nbytes(f.get_slice(f"{layer_name}.weight")), (layer_name, layer.spec.rotation)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["modules"][name]["format"] == "twinlog"
    import compressdit  # noqa: F401  registers the quantizer, as a user would
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert set(quantized_modules(loaded)) == set(plan)
    assert {m.spec.rotation for m in quantized_modules(loaded).values()} == set(rotations)
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(), return_dict=False)[0], expected)
    assert loaded.num_parameters() == tiny_dit().num_parameters()
    half = DiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    for layer_name, layer in quantized_modules(half).items():
        assert isinstance(layer.weight_scale, QuantState) and layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.effective_weight(), quantized_modules(loaded)[layer_name].effective_weight())
    with torch.no_grad():
        out = half(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _inputs().items()},
                   return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_format_registry_builds_empty_modules_on_meta():
    with torch.device("meta"):
        linear = torch.nn.Linear(64, 32)
    for rotation in INPUT_ROTATIONS:
        empty = FORMATS.get("twinlog").empty(linear, _spec(rotation=rotation))
        assert isinstance(empty, TwinLogLinear) and empty.weight.is_meta
