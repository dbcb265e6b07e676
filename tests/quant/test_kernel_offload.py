"""Layers offloaded by accelerate (device_map with disk) keep no prepacked kernel buffers between calls."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from compressdit.quant.kernel_registry import cache_of
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantized_modules
from tests.conftest import tiny_flux
from tests.io.test_diffusers_quantizer import _quantize


def test_offloaded_layers_drop_their_prepacked_buffers_after_each_call(tmp_path):
    """Otherwise a model offloaded to disk ends a forward holding every layer's prepacked weights in memory."""
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None),
             LayerRule("re:.*", LinearQuantSpec(w_bits=8, a_bits=8))]
    _quantize(tiny_flux(2, 2, 4, 64, 64), rules).save_pretrained(tmp_path / "flux")
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=gen), encoder_hidden_states=torch.randn(2, 5, 64),
                  pooled_projections=torch.randn(2, 64), timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(5, 3), guidance=torch.ones(2), return_dict=False)
    with torch.no_grad():
        expected = FluxTransformer2DModel.from_pretrained(tmp_path / "flux")(**inputs)[0]
        model = FluxTransformer2DModel.from_pretrained(tmp_path / "flux", device_map="auto",
                                                       max_memory={"cpu": 300_000}, offload_folder=tmp_path / "off")
        for _ in range(2):
            assert torch.equal(model(**inputs)[0], expected)
    offloaded = {n: m for n, m in quantized_modules(model).items() if m.weight.is_meta}
    assert offloaded and not any(cache_of(m).buffers for m in offloaded.values())
    assert {cache_of(m).name for m in quantized_modules(model).values()} == {None}
