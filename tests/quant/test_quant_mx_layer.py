"""NVFP4 / MXFP4 / MXFP8 layers: packed storage, reference forward, specs, stock diffusers save -> reload."""

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
from compressdit.quant.layers import QuantState
from compressdit.quant.minifloat import unpack_nibbles
from compressdit.quant.mx_layer import BlockFPLinear
from compressdit.quant.mx_primitives import nvfp4_quantize
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import quantize_layers, quantized_modules
from tests.conftest import tiny_dit

SPECS = {
    "nvfp4": {"format": "nvfp4", "w_bits": 4, "a_bits": 4, "a_format": "nvfp4", "a_granularity": "per_group"},
    "mxfp4": {"format": "mxfp4", "w_bits": 4, "a_bits": 4, "a_format": "mxfp4", "a_granularity": "per_group"},
    "mxfp8": {"format": "mxfp8", "w_bits": 8, "a_bits": 8, "a_format": "mxfp8", "a_granularity": "per_group"},
}
STORAGE = {"nvfp4": ("U8", "F8_E4M3", 2, 16), "mxfp4": ("U8", "U8", 2, 32), "mxfp8": ("F8_E4M3", "U8", 1, 32)}


def _layer(fmt: str, a_bits=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.mul_(1 + torch.rand(40, 1) * 10)  # uneven rows
    spec = dict(SPECS[fmt]) if a_bits else {"format": fmt, "w_bits": SPECS[fmt]["w_bits"]}
    return linear, FORMATS.get(fmt).quantize(linear, LinearQuantSpec.from_dict(spec, "spec"), None)


def test_nvfp4_layer_stores_modelopt_layout():
    linear, layer = _layer("nvfp4")
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (40, 48) and layer.weight.numel() == 40 * 96
    assert layer.weight_scale.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (40, 6)
    assert layer.weight_scale_2.dtype == torch.float32 and layer.weight_scale_2.dim() == 0
    codes, block_scale, tensor_scale = nvfp4_quantize(linear.weight)
    packed = layer.weight.data
    assert torch.equal(packed & 0x0F, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])
    assert torch.equal(unpack_nibbles(packed), codes)
    assert torch.equal(layer.weight_scale.view(torch.uint8), block_scale.view(torch.uint8))
    assert layer.weight_scale_2.item() == tensor_scale.item()
    assert "nvfp4 W4A4-nvfp4 ag16 g16" in repr(layer)


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("fmt", sorted(SPECS))
@pytest.mark.parametrize("a_bits", [True, False])
def test_forward_is_the_dequantize_reference_and_close_to_float(fmt, a_bits):
    linear, layer = _layer(fmt, a_bits)
    x = torch.randn(3, 7, 96) * torch.linspace(0.1, 4, 96)
    with torch.no_grad():
        out, truth = layer(x), linear(x)
        x_q = quantize_input(x, layer.spec) if a_bits else x
        torch.testing.assert_close(out, torch.nn.functional.linear(x_q, layer.effective_weight(), layer.bias))
    bound = {"mxfp8": 0.05, "nvfp4": 0.2, "mxfp4": 0.25}[fmt] * (1 if a_bits else 0.75)
    assert 0 < ((out - truth).norm() / truth.norm()).item() < bound
    assert layer.kernel_name == "cpu-decoded-dense"  # the decoded weight prepacked (tests/quant/test_quant_cpu_dense.py)


@pytest.mark.parametrize("bad, message", [
    ({"format": "nvfp4", "w_bits": 8}, "set w_bits: 4"),
    ({"format": "mxfp8", "w_bits": 4}, "set w_bits: 8"),
    ({"format": "nvfp4", "w_bits": 4, "group_size": 32}, "set group_size: 16"),
    ({"format": "mxfp4", "w_bits": 4, "group_size": 16}, "set group_size: 32"),
    ({"format": "nvfp4", "w_bits": 4, "rotation": "hadamard"}, "rotation"),
    ({"format": "nvfp4", "w_bits": 4, "low_rank": 0}, "low_rank"),
    ({"format": "mxfp4", "w_bits": 4, "w_range": "mse"}, "mse"),
    ({"format": "mxfp4", "w_bits": 4, "a_bits": 8, "a_granularity": "static"}, "static"),
    ({"format": "nvfp4", "w_bits": 4, "vector_dim": 4}, "vq"),
    ({"format": "nvfp5", "w_bits": 4}, "unknown format 'nvfp5'"),
])
def test_bad_block_specs_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        LinearQuantSpec.from_dict(bad, "rules[0].spec")
    assert "\n" not in str(info.value)


def test_a_layer_narrower_than_a_block_is_a_config_error():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(40, 8)
    spec = LinearQuantSpec.from_dict({"format": "mxfp4", "w_bits": 4}, "spec")
    with pytest.raises(ConfigError, match="proj: in_features 40 is not divisible by the mxfp4 block of 32"):
        quantize_layers(model, {"proj": spec})


def test_format_registry_builds_empty_modules_on_meta():
    with torch.device("meta"):
        linear = torch.nn.Linear(64, 32)
    for fmt, spec in SPECS.items():
        empty = FORMATS.get(fmt).empty(linear, LinearQuantSpec.from_dict(dict(spec), "spec"))
        assert isinstance(empty, BlockFPLinear) and empty.weight.is_meta


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([1, 7])}


@pytest.mark.parametrize("fmt", sorted(SPECS))
def test_checkpoint_reloads_bit_identically_through_stock_from_pretrained(tmp_path, fmt):
    model = tiny_dit()
    adapter = adapter_for(model)
    plan = {n: LinearQuantSpec.from_dict(dict(SPECS[fmt]), n) for n in adapter.linear_layers(model)
            if adapter.role_of(n) not in ("embedder", "head")}
    quantize_layers(model, plan)
    attach_quantizer(model, plan)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    model.save_pretrained(tmp_path)
    name = "transformer_blocks.0.ff.net.2"  # 256 -> 64
    weight_dtype, scale_dtype, per_byte, block = STORAGE[fmt]
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(f"{name}.weight").get_dtype() == weight_dtype
        assert f.get_slice(f"{name}.weight").get_shape() == [64, 256 // per_byte]
        assert f.get_slice(f"{name}.weight_scale").get_dtype() == scale_dtype
        assert f.get_slice(f"{name}.weight_scale").get_shape() == [64, 256 // block]
        assert (f"{name}.weight_scale_2" in f.keys()) == (fmt == "nvfp4")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["modules"][name]["format"] == fmt
    import compressdit  # noqa: F401  registers the quantizer, as a user would
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert set(quantized_modules(loaded)) == set(plan)
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(), return_dict=False)[0], expected)
    assert loaded.num_parameters() == tiny_dit().num_parameters()
    half = DiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    layer = quantized_modules(half)[name]
    assert layer.weight_scale.dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
    assert isinstance(layer.weight_scale, QuantState) and layer.bias.dtype == torch.bfloat16
    if fmt == "nvfp4":
        assert layer.weight_scale_2.dtype == torch.float32
    assert torch.equal(layer.effective_weight(), quantized_modules(loaded)[name].effective_weight())
    with torch.no_grad():
        out = half(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _inputs().items()},
                   return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


SVDQUANT = {**SPECS["nvfp4"], "balance": 0.5, "low_rank": 8}


def _outlier_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    channel = torch.ones(96)
    channel[[5, 40, 77]] = 30.0  # a few outlier input channels, as DiT activations have
    x = torch.randn(64, 96, generator=gen) * channel
    return x, x.abs().amax(0)


@pytest.mark.usefixtures("fp32_kernels")
def test_svdquant_on_nvfp4_balances_splits_a_branch_and_beats_plain_nvfp4():
    linear, plain = _layer("nvfp4")
    x, absmax = _outlier_inputs()
    layer = FORMATS.get("nvfp4").quantize(linear, LinearQuantSpec.from_dict(dict(SVDQUANT), "spec"), absmax)
    assert layer.smooth_scale.shape == (96,) and layer.low_rank_down.shape == (8, 96)
    assert layer.low_rank_up.shape == (40, 8) and layer.weight.dtype == torch.uint8
    with torch.no_grad():
        out, truth = layer(x), linear(x)
        balanced = x / layer.smooth_scale
        by_hand = torch.nn.functional.linear(quantize_input(balanced, layer.spec), layer.dequantized_weight(),
                                             layer.bias) + balanced @ layer.low_rank_down.t() @ layer.low_rank_up.t()
        # up to summation order (the kernel may run the branch inside the main GEMM; inputs reach 30 here): one
        # activation code off by a step would differ by ~1e-2
        torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-4)
        # the stored pieces rebuild the original weight's input space
        folded = (layer.dequantized_weight() + layer.low_rank_up @ layer.low_rank_down) / layer.smooth_scale
        torch.testing.assert_close(layer.effective_weight(), folded)
        error, plain_error = [((o - truth).norm() / truth.norm()).item() for o in (out, plain(x))]
    assert error < 0.7 * plain_error, (error, plain_error)


def test_svdquant_nvfp4_needs_statistics_and_a_rank_that_fits():
    linear, _ = _layer("nvfp4")
    with pytest.raises(ValueError, match="calibration statistics"):
        FORMATS.get("nvfp4").quantize(linear, LinearQuantSpec.from_dict(dict(SVDQUANT), "spec"), None)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(32, 8)
    spec = LinearQuantSpec.from_dict({**SVDQUANT, "low_rank": 16}, "spec")
    with pytest.raises(ConfigError, match="proj: low_rank 16 is larger than the layer"):
        quantize_layers(model, {"proj": spec}, {"proj": torch.ones(32)})


def test_svdquant_nvfp4_checkpoint_reloads_bit_identically(tmp_path):
    model = tiny_dit()
    adapter = adapter_for(model)
    plan = {n: LinearQuantSpec.from_dict(dict(SVDQUANT), n) for n in adapter.linear_layers(model)
            if adapter.role_of(n) not in ("embedder", "head")}
    absmax = {n: torch.rand(model.get_submodule(n).in_features) * 5 + 0.1 for n in plan}
    quantize_layers(model, plan, absmax)
    attach_quantizer(model, plan)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    model.save_pretrained(tmp_path)
    name = "transformer_blocks.0.ff.net.2"
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(f"{name}.smooth_scale").get_shape() == [256]
        assert f.get_slice(f"{name}.low_rank_down").get_shape() == [8, 256]
        assert f.get_slice(f"{name}.weight").get_dtype() == "U8"
    import compressdit  # noqa: F401  registers the quantizer, as a user would
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(), return_dict=False)[0], expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", sorted(SPECS))
def test_cuda_runs_the_same_dequantize_reference(fmt):
    _, layer = _layer(fmt)
    x = torch.randn(5, 96)
    with torch.no_grad():
        expected = layer(x)
        out = layer.to("cuda")(x.cuda())
    assert layer.kernel_name == "reference"
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e-39, "spread"])
def test_nvfp4_round_trip_in_one_pass_is_the_codecs(scale):
    """SVDQuant's refinement rounds the NVFP4 residual through ``BlockCodec.round_trip``: the C grid pass where the
    library runs, bit for bit the codec's quantize + dequantize (subnormal and 60-decade weights, zero blocks)."""
    from compressdit.quant.mx_layer import BLOCK_CODECS

    codec = BLOCK_CODECS.get("nvfp4")
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=gen)
    w = w * (torch.logspace(-30, 30, 256) if scale == "spread" else scale)
    w[5, :16] = 0.0
    assert torch.equal(codec.round_trip(w), codec.dequantize(*codec.quantize(w)))
    w[7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        codec.round_trip(w)
