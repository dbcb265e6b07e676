"""The flux / sd3 adapters' original checkpoint layouts (BFL FLUX.1, SAI MMDiT) are the exact inverse of diffusers'
single-file converters: every diffusers tensor is placed once, and the converter maps each row back to where it
came from (fused qkv, FLUX's linear1 = q, k, v, mlp; swapped final adaLN halves)."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                 convert_sd3_transformer_checkpoint_to_diffusers)

from compressdit.errors import UnsupportedModelError
from compressdit.models import ADAPTERS, adapter_for


def _row_ids(model) -> dict[str, torch.Tensor]:
    """Each tensor of the model's state dict as its dim-0 rows, numbered across the whole model."""
    ids, start = {}, 0
    for name, tensor in model.state_dict().items():
        rows = tensor.shape[0] if tensor.dim() else 1
        ids[name] = torch.arange(start, start + rows, dtype=torch.float64)
        start += rows
    return ids


def _check_inverse(model, converter):
    adapter = adapter_for(model)
    layout = adapter.original_layout(model.config)
    ids = _row_ids(model)
    sources = [s for tensor in layout.values() for s in tensor.sources]
    assert sorted(sources) == sorted(ids)  # every diffusers tensor exactly once
    original = {}
    for name, tensor in layout.items():
        rows = torch.cat([ids[s] for s in tensor.sources])
        if tensor.swap_halves:
            first, second = rows.chunk(2)
            rows = torch.cat([second, first])
        original[name] = rows
    back = converter(original, config=model.config)
    assert set(back) == set(ids)
    for name, rows in ids.items():
        assert torch.equal(back[name], rows), name


def test_flux1_layout_inverts_diffusers_converter():
    with init_empty_weights():  # FLUX.1's width (the converter assumes 3072), two blocks of each kind
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=3, guidance_embeds=True)
    adapter = adapter_for(model)
    assert adapter.original_arch == "flux" and adapter.diffusers_reads_original(model.config)
    assert adapter.original_geometry_issue(model.config) is None
    _check_inverse(model, convert_flux_transformer_checkpoint_to_diffusers)
    assert "double_blocks.1.img_attn.qkv.weight" in adapter.original_layout(model.config)


@pytest.mark.parametrize("dual,qk_norm", [((), None), ((0, 1), "rms_norm")])
def test_sd3_layout_inverts_diffusers_converter(dual, qk_norm):
    with init_empty_weights():
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
                                      dual_attention_layers=dual, qk_norm=qk_norm)
    _check_inverse(model, convert_sd3_transformer_checkpoint_to_diffusers)
    assert "head dim 16" in adapter_for(model).original_geometry_issue(model.config)


def test_small_flux_is_not_read_back_by_diffusers():
    config = {"num_attention_heads": 4, "attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}
    adapter = ADAPTERS.get("flux")
    assert not adapter.diffusers_reads_original(config)
    assert "3072" in adapter.original_geometry_issue(config)


def test_families_without_an_original_layout_say_so():
    adapter = ADAPTERS.get("pixart")
    assert adapter.original_arch is None
    with pytest.raises(UnsupportedModelError, match="no original"):
        adapter.original_layout({})
