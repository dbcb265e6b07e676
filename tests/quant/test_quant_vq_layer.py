"""Tests for VQLinear (compressdit.quant.vq_layer), the ``vq`` format's spec checks and its checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file
from torch import nn

from compressdit.errors import ConfigError
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.models import adapter_for
from compressdit.quant.formats import FORMATS, clamp_codebook
from compressdit.quant.layers import PackedParameter
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, check_plan_fits, quantize_layers, quantized_modules, resolve_plan
from compressdit.quant.vq_layer import VQLinear
from tests.conftest import tiny_dit

IN, OUT = 64, 48


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=bias)


def _spec(**kw) -> LinearQuantSpec:
    return LinearQuantSpec.from_dict({"format": "vq", **kw}, "spec")


def test_w_bits_2_and_3_default_to_the_paper_settings():
    two, three = _spec(w_bits=2), _spec(w_bits=3)
    assert (two.vector_dim, two.codebook_size, two.bits_per_weight) == (4, 256, 2.0)
    assert (three.vector_dim, three.codebook_size, three.bits_per_weight) == (2, 64, 3.0)
    assert _spec(w_bits=2, vector_dim=8, codebook_size=256).bits_per_weight == 1.0
    assert two.label == "vq W2 d4 k256"


@pytest.mark.parametrize("bad, message", [
    ({"w_bits": 4}, "needs vector_dim and codebook_size"),
    ({"w_bits": 4, "vector_dim": 4}, "needs vector_dim and codebook_size"),
    ({"w_bits": 2, "vector_dim": 4, "codebook_size": 100}, "power of two"),
    ({"w_bits": 2, "vector_dim": 4, "codebook_size": 512}, "power of two"),
    ({"w_bits": 2, "vector_dim": 0, "codebook_size": 16}, "out of range"),
    ({"w_bits": 2, "a_bits": 8}, "weight-only"),
    ({"w_bits": 2, "group_size": 64}, "weight-only"),
])
def test_bad_vq_specs_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        _spec(**bad)


def test_int_format_refuses_vq_keys():
    for key, value in (("vector_dim", 4), ("row_scale", True)):
        with pytest.raises(ConfigError, match="belong to format 'vq'"):
            LinearQuantSpec.from_dict({"w_bits": 4, key: value}, "spec")


@pytest.mark.usefixtures("fp32_kernels")
def test_row_scale_lets_rows_of_different_magnitude_share_a_codebook():
    linear = _linear()
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, OUT)[:, None])  # rows three decades apart
    plain = VQLinear.from_linear(linear, _spec(w_bits=3))
    scaled = VQLinear.from_linear(linear, _spec(w_bits=3, row_scale=True))
    assert plain.row_scale is None and "row_scale" not in plain.state_dict()
    assert scaled.row_scale.dtype == torch.float16 and scaled.row_scale.shape == (OUT,)
    assert _spec(w_bits=3, row_scale=True).label.endswith("+row-scale")

    def row_error(module):  # mean relative error per row: small rows count as much as large ones
        diff = (module.effective_weight() - linear.weight.detach()).pow(2).sum(1)
        return float((diff / linear.weight.detach().pow(2).sum(1)).mean())

    assert row_error(scaled) < 0.5 * row_error(plain)
    x = torch.randn(2, 5, IN)
    assert torch.allclose(scaled(x), F.linear(x, scaled.effective_weight(), linear.bias), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="row_scale must be given"):
        scaled.load_codes(scaled.codes(), scaled.codebook)


def test_from_linear_stores_packed_codes_and_an_fp16_codebook():
    linear = _linear()
    spec = _spec(w_bits=2, codebook_size=32)
    module = VQLinear.from_linear(linear, spec)
    assert isinstance(module.weight, PackedParameter) and module.weight.dtype == torch.uint8
    assert module.weight.shape == (OUT, IN // 4 * 5 // 8)  # 5-bit codes, packed
    assert module.weight.numel() == OUT * IN  # logical count, as diffusers' num_parameters expects
    assert module.codebook.shape == (32, 4) and module.codebook.dtype == torch.float16
    decoded = module.codebook.float()[module.codes()].reshape(OUT, IN)
    assert torch.equal(module.effective_weight(), decoded)
    rel = (decoded - linear.weight).pow(2).sum() / linear.weight.pow(2).sum()
    assert rel < 0.5  # a fitted codebook, not noise


@pytest.mark.usefixtures("fp32_kernels")
def test_forward_is_the_linear_of_the_decoded_weight():
    linear = _linear()
    module = VQLinear.from_linear(linear, _spec(w_bits=3))
    x = torch.randn(2, 5, IN)
    expected = F.linear(x, module.effective_weight(), linear.bias)
    assert torch.allclose(module(x), expected, atol=1e-5)
    assert module(x.bfloat16()).dtype == torch.bfloat16
    float_linear = module.to_float_linear()
    assert torch.allclose(float_linear(x), expected, atol=1e-5)


def test_more_codewords_fit_the_weight_better():
    linear = _linear(bias=False)
    errors = [float((VQLinear.from_linear(linear, _spec(w_bits=2, codebook_size=k)).effective_weight()
                     - linear.weight.detach()).pow(2).mean()) for k in (4, 32, 256)]
    assert errors[0] > errors[1] > errors[2]


def test_deepcopy_is_independent_and_keeps_the_logical_size():
    module = VQLinear.from_linear(_linear(), _spec(w_bits=2))
    clone = copy.deepcopy(module)
    assert clone.weight.numel() == OUT * IN and clone.weight.data_ptr() != module.weight.data_ptr()
    assert torch.equal(clone.effective_weight(), module.effective_weight())


def test_fit_checks_name_the_layer():
    model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ConfigError, match="0: in_features 6 is not divisible by vector_dim 4"):
        check_plan_fits(model, {"0": _spec(w_bits=2)})
    with pytest.raises(ConfigError, match="do not fill whole bytes"):
        check_plan_fits(nn.Sequential(nn.Linear(2, 64)), {"0": _spec(w_bits=3)})
    with pytest.raises(ConfigError, match="fewer than codebook_size"):
        check_plan_fits(nn.Sequential(nn.Linear(8, 8)), {"0": _spec(w_bits=2)})


def test_clamp_codebook_caps_k_at_a_quarter_of_the_subvectors():
    spec = _spec(w_bits=2)
    assert clamp_codebook(spec, nn.Linear(64, 64)).codebook_size == 256  # 1024 sub-vectors
    assert clamp_codebook(spec, nn.Linear(16, 32)).codebook_size == 32   # 128 sub-vectors
    assert clamp_codebook(spec, nn.Linear(64, 64)) is spec


def test_format_registry_builds_empty_vq_modules():
    empty = FORMATS.get("vq").empty(_linear(), _spec(w_bits=2))
    assert isinstance(empty, VQLinear) and empty.weight.shape == (OUT, IN // 4)


def _dit_inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([1, 7])}


@pytest.mark.parametrize("row_scale", [False, True])
def test_vq_checkpoint_reloads_bit_identically_through_stock_from_pretrained(tmp_path, row_scale):
    model = tiny_dit()
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None),
             LayerRule("re:.*", _spec(w_bits=2, row_scale=row_scale)), ]
    plan = {n: clamp_codebook(s, model.get_submodule(n)) if s else None
            for n, s in resolve_plan(model, adapter_for(model), rules).items()}
    quantize_layers(model, plan)
    specs = {n: s for n, s in plan.items() if s is not None}
    attach_quantizer(model, specs)
    with torch.no_grad():
        expected = model(**_dit_inputs(), return_dict=False)[0]
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    name = next(iter(specs))
    assert tensors[f"{name}.weight"].dtype == torch.uint8 and tensors[f"{name}.codebook"].dtype == torch.float16
    assert (f"{name}.row_scale" in tensors) == row_scale
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert set(quantized_modules(loaded)) == set(specs)
    assert all(isinstance(m, VQLinear) for m in quantized_modules(loaded).values())
    with torch.no_grad():
        assert torch.equal(loaded(**_dit_inputs(), return_dict=False)[0], expected)
    assert loaded.num_parameters() == tiny_dit().num_parameters()
    half = DiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert quantized_modules(half)[name].codebook.dtype == torch.float16


def test_gradients_flow_to_inputs_and_bias_through_a_frozen_vq_layer():
    """Adapters and distillation train around frozen quantized layers: the op needs a backward."""
    module = VQLinear.from_linear(_linear(), _spec(w_bits=2))
    module.bias.requires_grad_(True)
    x = torch.randn(3, 4, IN, requires_grad=True)
    module(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = module.bias.detach().clone().requires_grad_(True)
    F.linear(x_ref, module.effective_weight(), bias_ref).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert torch.allclose(module.bias.grad, bias_ref.grad, atol=1e-4)
