"""The generic adapter on tiny configs of diffusers families without a compressdit adapter.

For each family: roles by name, blocks, and RTN W8A8 / weight-only W4 through ``run_recipe`` (Python API) ->
save -> stock ``from_pretrained`` reload -> outputs equal to the in-memory model on inputs built here.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from compressdit.errors import UnsupportedModelError
from compressdit.models import adapter_for
from compressdit.models.generic import GenericAdapter
from compressdit.quant.layers import QuantizedLinear
from tests.models import tiny_families

FAMILIES = sorted(tiny_families.FAMILIES)


@functools.lru_cache(maxsize=None)
def _built(name: str):
    return tiny_families.FAMILIES[name]()


@functools.lru_cache(maxsize=None)
def _folder(name: str, root: str) -> str:
    path = f"{root}/{name}"
    _built(name)[0].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("generic"))


EXPECTED_ROLES = {
    "Lumina2Transformer2DModel": {
        "x_embedder": "embedder", "time_caption_embed.caption_embedder.1": "embedder",
        "noise_refiner.0.attn.to_q": "attn_qkv", "layers.0.attn.to_out.0": "attn_out",
        "layers.0.feed_forward.linear_1": "ffn_up", "layers.0.feed_forward.linear_3": "ffn_up",
        "layers.0.feed_forward.linear_2": None, "layers.0.norm1.linear": "adaln",
        "context_refiner.0.attn.to_k": "context", "norm_out.linear_2": "head"},
    "AuraFlowTransformer2DModel": {
        "pos_embed.proj": "embedder", "context_embedder": "embedder", "time_step_proj.linear_1": "embedder",
        "joint_transformer_blocks.0.attn.add_q_proj": "context", "joint_transformer_blocks.0.attn.to_add_out": "context",
        "joint_transformer_blocks.0.ff_context.linear_1": "context",
        "joint_transformer_blocks.0.norm1_context.linear": "context",
        "joint_transformer_blocks.0.ff.linear_1": "ffn_up", "joint_transformer_blocks.0.ff.out_projection": "ffn_down",
        "single_transformer_blocks.0.attn.to_v": "attn_qkv", "single_transformer_blocks.0.norm1.linear": "adaln",
        "norm_out.linear": "head", "proj_out": "head"},
    "ChromaTransformer2DModel": {
        "x_embedder": "embedder", "context_embedder": "embedder", "transformer_blocks.0.attn.to_q": "attn_qkv",
        "transformer_blocks.0.ff.net.0.proj": "ffn_up", "transformer_blocks.0.ff.net.2": "ffn_down",
        "single_transformer_blocks.0.proj_mlp": "ffn_up", "single_transformer_blocks.0.proj_out": "ffn_down",
        "distilled_guidance_layer.in_proj": "embedder", "proj_out": "head"},
    "CogView4Transformer2DModel": {
        "patch_embed.text_proj": "embedder", "time_condition_embed.condition_embedder.linear_1": "embedder",
        "transformer_blocks.0.attn1.to_k": "attn_qkv", "transformer_blocks.1.attn1.to_out.0": "attn_out",
        "transformer_blocks.0.norm1.linear": "adaln", "norm_out.linear": "head", "proj_out": "head"},
    "MochiTransformer3DModel": {
        "time_embed.pooler.to_q": "embedder", "time_embed.caption_proj": "embedder",
        "transformer_blocks.0.attn1.add_k_proj": "context", "transformer_blocks.0.ff_context.net.2": "context",
        "transformer_blocks.0.attn1.to_out.0": "attn_out", "transformer_blocks.1.ff.net.0.proj": "ffn_up",
        "norm_out.linear": "head"},
    "SanaTransformer2DModel": {
        "time_embed.linear": "embedder", "caption_projection.linear_1": "embedder",
        "transformer_blocks.0.attn1.to_q": "attn_qkv", "transformer_blocks.0.attn2.to_q": "cross_q",
        "transformer_blocks.0.attn2.to_v": "cross_kv", "transformer_blocks.0.attn2.to_out.0": "cross_out",
        "proj_out": "head"},
    "QwenImageTransformer2DModel": {  # input projections outside the blocks: float, as the family adapters keep theirs
        "img_in": "embedder", "txt_in": "embedder", "time_text_embed.timestep_embedder.linear_1": "embedder",
        "transformer_blocks.0.img_mod.1": "adaln", "transformer_blocks.0.attn.to_q": "attn_qkv",
        "transformer_blocks.0.attn.add_k_proj": "context", "transformer_blocks.0.txt_mlp.net.0.proj": "context",
        "transformer_blocks.0.txt_mod.1": "context", "transformer_blocks.0.img_mlp.net.0.proj": "ffn_up",
        "transformer_blocks.0.img_mlp.net.2": "ffn_down", "norm_out.linear": "head", "proj_out": "head"},
    "LTXVideoTransformer3DModel": {
        "proj_in": "embedder", "caption_projection.linear_1": "embedder", "time_embed.linear": "embedder",
        "transformer_blocks.0.attn1.to_q": "attn_qkv", "transformer_blocks.0.ff.net.2": "ffn_down",
        "proj_out": "head"},
}
EXPECTED_BLOCK_LISTS = {
    "Lumina2Transformer2DModel": ("noise_refiner", "context_refiner", "layers"),
    "AuraFlowTransformer2DModel": ("joint_transformer_blocks", "single_transformer_blocks"),
    "ChromaTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "CogView4Transformer2DModel": ("transformer_blocks",),
    "MochiTransformer3DModel": ("transformer_blocks",),
    "SanaTransformer2DModel": ("transformer_blocks",),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "LTXVideoTransformer3DModel": ("transformer_blocks",),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_generic_roles_and_blocks(name: str) -> None:
    model, _ = _built(name)
    adapter = adapter_for(model)
    assert isinstance(adapter, GenericAdapter) and adapter.model_class_name == name
    linears = adapter.linear_layers(model)
    for layer, role in EXPECTED_ROLES[name].items():
        assert layer in linears, layer
        assert adapter.role_of(layer) == role, layer
    assert adapter.block_lists == EXPECTED_BLOCK_LISTS[name]
    assert [n for n, _ in adapter.blocks(model)] == [f"{a}.{i}" for a in EXPECTED_BLOCK_LISTS[name]
                                                     for i in range(len(getattr(model, a)))]
    # every block-level Linear is quantized by the recipes (no role or a role other than embedder / head)
    in_blocks = [n for n in linears if n.split(".")[0] in adapter.block_lists]
    assert in_blocks and all(adapter.role_of(n) not in adapter.keep_full_precision for n in in_blocks)


def test_generic_layers_outside_the_blocks_are_embedders_or_heads() -> None:
    """Every Linear outside the block lists is an embedder or a head (recipes keep both float), whatever its name:
    Z-Image's head sits in a ``ModuleDict`` defined before its blocks (``all_final_layer.2-1.linear``: a head by its
    name), its patch embedder in another (``all_x_embedder.2-1``)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=1,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64,
                                     axes_dims=[8, 12, 12], axes_lens=[64, 64, 64])
    adapter = adapter_for(model)
    assert adapter.block_lists == ("noise_refiner", "context_refiner", "layers")
    roles = {name: adapter.role_of(name) for name in adapter.linear_layers(model)}
    assert roles["all_x_embedder.2-1"] == roles["cap_embedder.1"] == roles["t_embedder.mlp.0"] == "embedder"
    assert roles["all_final_layer.2-1.linear"] == roles["all_final_layer.2-1.adaLN_modulation.1"] == "head"
    assert all(role in adapter.keep_full_precision for name, role in roles.items()
               if name.split(".")[0] not in adapter.block_lists)
    assert roles["layers.0.attention.to_q"] == "attn_qkv"
    for name in FAMILIES:  # the same on every family here
        model = _built(name)[0]
        adapter = adapter_for(model)
        assert all(adapter.role_of(n) in adapter.keep_full_precision for n in adapter.linear_layers(model)
                   if n.split(".")[0] not in adapter.block_lists), name


def test_the_calibration_free_recipes_named_in_errors_are_the_data_free_ones() -> None:
    from compressdit.models.generic import CALIBRATION_FREE
    from compressdit.recipe import data_free_recipes

    assert sorted(CALIBRATION_FREE.split(", ")) == sorted(data_free_recipes())


def _recipe(recipe_name: str):
    from compressdit.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    recipe.stages = [s for s in recipe.stages if s.name != "evaluate"]  # what --no-eval does
    return recipe


@pytest.mark.parametrize("recipe_name", ["rtn-w8a8", "rtn-w4a16", "rtn-w4a4", "nvfp4"])
@pytest.mark.parametrize("name", FAMILIES)
def test_generic_quantize_save_stock_reload_equal_outputs(name: str, recipe_name: str, root, tmp_path) -> None:
    import diffusers

    from compressdit.pipeline import run_recipe

    _, inputs = _built(name)
    state = run_recipe(_recipe(recipe_name), _folder(name, root), tmp_path / "out", quiet=True)
    assert state.quant_specs
    assert any("tensors equal" in note for note in state.notes)  # the reload check compared tensor by tensor
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressdit"
    reloaded = getattr(diffusers, name).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ours, theirs = state.model(**inputs).sample, reloaded(**inputs).sample
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, theirs)
    quantized = {n for n, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(state.quant_specs)
    adapter = adapter_for(_built(name)[0])
    for layer, module in reloaded.named_modules():
        if isinstance(module, nn.Linear) and adapter.role_of(layer) in ("embedder", "head"):
            assert layer not in quantized and module.weight.dtype == torch.float32, layer
        if isinstance(module, (nn.LayerNorm, nn.Embedding, nn.Conv2d, nn.Conv3d)):
            assert all(p.dtype == torch.float32 for p in module.parameters()), layer


def test_generic_calibrated_recipe_fails_with_one_line_naming_what_works(root, tmp_path) -> None:
    from compressdit.pipeline import run_recipe

    with pytest.raises(UnsupportedModelError) as info:
        run_recipe(_recipe("w8a8"), _folder("CogView4Transformer2DModel", root), tmp_path / "out", quiet=True)
    message = str(info.value)
    assert "\n" not in message and "CogView4Transformer2DModel" in message and "rtn-w8a8" in message
    assert not (tmp_path / "out").exists()


def test_generic_rejects_what_cannot_work() -> None:
    from diffusers import UNet2DModel

    class NoLinear(tiny_families.cogview4()[0].__class__):  # a diffusers transformer subclass ...
        pass

    model = NoLinear(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=32,
                     num_attention_heads=2, text_embed_dim=64, time_embed_dim=64, condition_dim=16,
                     pos_embed_max_size=16, sample_size=8, rope_axes_dim=(16, 16))
    for name, module in list(model.named_modules()):  # ... stripped of its Linears
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    with pytest.raises(UnsupportedModelError, match="no nn.Linear layers"):
        adapter_for(model)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(UnsupportedModelError, match="UNet2DModel.*not a diffusers transformer"):
        adapter_for(unet)


def test_reload_check_compares_tensor_by_tensor_and_names_a_difference(root, tmp_path) -> None:
    from compressdit.errors import CheckpointError
    from compressdit.pipeline import _reload_check, run_recipe

    state = run_recipe(_recipe("rtn-w8a8"), _folder("CogView4Transformer2DModel", root), tmp_path / "out", quiet=True)
    assert "tensors equal" in _reload_check(state, tmp_path / "out")
    with torch.no_grad():
        state.model.proj_out.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match=r"proj_out\.weight"):
        _reload_check(state, tmp_path / "out")
