"""The LoRA loaders' view of packed weights, registered by ``import compressdit`` (io/diffusers_lora.py)."""

from __future__ import annotations

from diffusers.loaders import lora_pipeline
from torch import nn

from compressdit.io.diffusers_lora import register_lora_support
from compressdit.quant.layers import PackedParameter
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule
from tests.conftest import tiny_flux
from tests.io.test_diffusers_quantizer import _quantize

SHAPE = lora_pipeline.FluxLoraLoaderMixin._calculate_module_shape


def test_registration_is_idempotent_and_keeps_diffusers_own_code_underneath():
    register_lora_support()
    register_lora_support()
    wrapper = lora_pipeline.FluxLoraLoaderMixin._calculate_module_shape
    original = wrapper.__compressdit_original__
    assert not hasattr(original, "__compressdit_original__")  # one wrapper, not a stack of them
    assert lora_pipeline._maybe_dequantize_weight_for_expanded_lora.__compressdit_original__.__module__ == \
        lora_pipeline.__name__


def test_packed_weights_report_their_logical_shape_to_the_loader_only():
    model = _quantize(tiny_flux(1, 1, 4, 64, 64), [LayerRule("re:.*to_q", LinearQuantSpec(w_bits=4, group_size=32)),
                                                   LayerRule("re:.*", None)])
    packed, plain = model.transformer_blocks[0].attn.to_q, model.transformer_blocks[0].attn.to_k
    assert isinstance(packed.weight, PackedParameter) and packed.weight.shape == (64, 32)  # two codes a byte
    assert tuple(SHAPE(model=model, base_module=packed)) == (64, 64)
    assert tuple(SHAPE(model=model, base_weight_param_name="transformer_blocks.0.attn.to_q.weight")) == (64, 64)
    assert tuple(SHAPE(model=model, base_module=plain)) == (64, 64) == plain.weight.shape
    assert packed.weight.shape == (64, 32)  # outside the loader's check: the stored codes, as always


def test_a_float_layer_widened_by_a_control_lora_keeps_diffusers_path():
    layer = nn.Linear(8, 4)
    weight = lora_pipeline._maybe_dequantize_weight_for_expanded_lora(layer, layer)
    assert weight.data_ptr() == layer.weight.data_ptr()  # diffusers' own answer for a float layer: its weight
