"""Tests for the model adapters (compressdit.models.dit / pixart / sd3 / flux) on tiny random diffusers models."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from torch import nn

from compressdit.errors import UnsupportedModelError
from compressdit.models import ADAPTERS, adapter_for
from compressdit.models.base import ROLES
from compressdit.models.flux import FluxAdapter, latent_image_ids, pack_latents, unpack_latents
from compressdit.models.sampling import sample
from compressdit.models.text_conditions import TextEmbedding, synthetic_text
from compressdit.moe.dense2moe import Dense2MoEConfig, layout_for, replace_ffn
from compressdit.moe.layers import MoEFeedForward

torch.set_num_threads(1)

FAMILIES = ("dit", "pixart", "sd3", "flux")
TEXT_SEQ = 5
TEXT_DIM = 48  # not MiniLM's 384: prompts would need a matching text encoder
POOLED_DIM = 40


@functools.lru_cache(maxsize=None)
def _model(family: str) -> nn.Module:
    """A tiny random model of ``family`` (hidden size 64, PixArt 96), built once per test session."""
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           SD3Transformer2DModel)

    torch.manual_seed(0)
    if family == "dit":
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2)
    elif family in ("pixart", "pixart-ac"):
        # "pixart-ac" takes resolution / aspect-ratio conditions (as the 1024 px PixArt-alpha checkpoints do);
        # their embeddings are a third of the hidden size each, so it must divide by 3 (96 here)
        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=48, in_channels=4,
                                         out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                         cross_attention_dim=96, caption_channels=TEXT_DIM,
                                         use_additional_conditions=family == "pixart-ac")
    elif family == "sd3":
        # block 0 is an SD3.5 dual-attention block (attn2); the last block is context_pre_only
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                      attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                      caption_projection_dim=64, pooled_projection_dim=POOLED_DIM,
                                      pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    elif family == "flux":
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
                                       pooled_projection_dim=POOLED_DIM, guidance_embeds=True,
                                       axes_dims_rope=(4, 6, 6))
    else:
        raise KeyError(family)
    return model.eval()


def _conditions(family: str, count: int, seed: int = 0) -> list:
    family = family.split("-")[0]
    if family == "dit":
        return [(7 * i + seed) % 1000 for i in range(count)]
    pooled = POOLED_DIM if family in ("sd3", "flux") else None
    return synthetic_text(count, TEXT_SEQ, TEXT_DIM, pooled, seed=seed)


def _sampling_adapter(family: str):
    """The registered adapter; text families get synthetic null conditions instead of the "" prompt,
    which would need a MiniLM-width (384-d) text encoder."""
    adapter = ADAPTERS.get(family.split("-")[0])
    if adapter.condition_kind == "class":
        return adapter

    class SyntheticNull(type(adapter)):
        def null_conditions(self, count):
            return _conditions(family, count, seed=99)

    return SyntheticNull()


def _matching_roles(adapter, name: str) -> list[str]:
    return [role for role, patterns in adapter.roles.items() if any(re.fullmatch(p, name) for p in patterns)]


# (a) adapter lookup ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_for_finds_the_family(family: str) -> None:
    adapter = adapter_for(_model(family))
    assert adapter is ADAPTERS.get(family)
    assert adapter.family == family
    assert adapter.model_class_name == type(_model(family)).__name__


def test_adapter_for_accepts_subclasses() -> None:
    from diffusers import DiTTransformer2DModel

    class MyDiT(DiTTransformer2DModel):
        pass

    model = MyDiT(num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=1, sample_size=4,
                  patch_size=2, num_embeds_ada_norm=10)
    assert adapter_for(model) is ADAPTERS.get("dit")


@pytest.mark.parametrize("model", [nn.Linear(2, 2), nn.Sequential(nn.Conv2d(4, 4, 1))])
def test_adapter_for_rejects_unsupported_models_naming_supported_classes(model: nn.Module) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(model)
    message = str(info.value)
    assert type(model).__name__ in message
    for name in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                 "FluxTransformer2DModel"):
        assert name in message


# (b) layer roles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_has_exactly_one_role(family: str) -> None:
    adapter = ADAPTERS.get(family)
    assert set(adapter.roles) <= set(ROLES)
    linears = adapter.linear_layers(_model(family))
    assert linears
    ambiguous = {name: roles for name in linears if len(roles := _matching_roles(adapter, name)) != 1}
    assert ambiguous == {}  # empty list: unassigned; several: patterns of different roles overlap
    assert all(adapter.role_of(name) is not None for name in linears)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_role_pattern_matches_a_module(family: str) -> None:
    """Catches typos: each pattern names something in a model that uses every feature of the family."""
    adapter = ADAPTERS.get(family)
    model = copy.deepcopy(_model(family))  # _model is cached: other tests use it dense
    names = [name for name, _ in model.named_modules()]
    for name, ffn in adapter.feed_forwards(model).items():  # the experts' patterns name the Dense2MoE layers
        replace_ffn(model, name, ffn, MoEFeedForward(layout_for(ffn, Dense2MoEConfig(experts=1, top_k=1), name)))
    names += [name for name, _ in model.named_modules()]
    dead = [p for patterns in adapter.roles.values() for p in patterns if not any(re.fullmatch(p, n) for n in names)]
    assert dead == []


EXPECTED_ROLES = {
    "dit": {
        "transformer_blocks.0.attn1.to_k": "attn_qkv",
        "transformer_blocks.1.attn1.to_out.0": "attn_out",
        "transformer_blocks.0.ff.net.0.proj": "ffn_up",
        "transformer_blocks.1.ff.net.2": "ffn_down",
        "transformer_blocks.0.norm1.linear": "adaln",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": "embedder",
        "proj_out_1": "head",
        "proj_out_2": "head",
        "proj_out": None,
        "proj_out_10": None,
        "transformer_blocks.0.attn1.to_q.lora": None,
        "transformer_blocks.0.attn1.to_out.1": None,
    },
    "pixart": {
        "transformer_blocks.0.attn1.to_v": "attn_qkv",
        "transformer_blocks.0.attn2.to_q": "cross_q",
        "transformer_blocks.1.attn2.to_k": "cross_kv",
        "transformer_blocks.1.attn2.to_out.0": "cross_out",
        "adaln_single.linear": "adaln",
        "adaln_single.emb.timestep_embedder.linear_2": "embedder",
        "caption_projection.linear_1": "embedder",
        "proj_out": "head",
        "proj_out_1": None,
    },
    "sd3": {
        "transformer_blocks.0.attn.to_q": "attn_qkv",
        "transformer_blocks.0.attn2.to_v": "attn_qkv",
        "transformer_blocks.0.attn.to_out.0": "attn_out",
        "transformer_blocks.0.attn2.to_out.0": "attn_out",
        "transformer_blocks.0.attn.add_q_proj": "context",
        "transformer_blocks.1.attn.add_v_proj": "context",
        "transformer_blocks.0.attn.to_add_out": "context",
        "transformer_blocks.0.ff_context.net.0.proj": "context",
        "transformer_blocks.0.ff_context.net.2": "context",
        "transformer_blocks.1.norm1_context.linear": "context",
        "transformer_blocks.0.ff.net.0.proj": "ffn_up",
        "transformer_blocks.1.ff.net.2": "ffn_down",
        "transformer_blocks.0.norm1.linear": "adaln",
        "time_text_embed.text_embedder.linear_1": "embedder",
        "time_text_embed.timestep_embedder.linear_2": "embedder",
        "context_embedder": "embedder",
        "norm_out.linear": "head",
        "proj_out": "head",
        "proj_out_1": None,
        "transformer_blocks.0.attn.to_add_out_extra": None,
    },
    "flux": {
        "transformer_blocks.0.attn.to_k": "attn_qkv",
        "transformer_blocks.0.attn.to_out.0": "attn_out",
        "transformer_blocks.0.attn.add_k_proj": "context",
        "transformer_blocks.0.attn.to_add_out": "context",
        "transformer_blocks.0.ff_context.net.2": "context",
        "transformer_blocks.0.norm1_context.linear": "context",
        "transformer_blocks.0.ff.net.0.proj": "ffn_up",
        "transformer_blocks.0.ff.net.2": "ffn_down",
        "transformer_blocks.0.norm1.linear": "adaln",
        "single_transformer_blocks.1.attn.to_q": "attn_qkv",
        "single_transformer_blocks.0.proj_mlp": "ffn_up",
        "single_transformer_blocks.0.proj_out": "ffn_down",
        "single_transformer_blocks.1.norm.linear": "adaln",
        "time_text_embed.guidance_embedder.linear_1": "embedder",
        "context_embedder": "embedder",
        "x_embedder": "embedder",
        "norm_out.linear": "head",
        "proj_out": "head",
        "proj_out_1": None,
        "single_transformer_blocks.0.attn.to_out.0": None,
    },
}


@pytest.mark.parametrize("family", FAMILIES)
def test_named_layers_have_the_expected_roles(family: str) -> None:
    adapter = ADAPTERS.get(family)
    present = {name for name, _ in _model(family).named_modules()}
    for name, role in EXPECTED_ROLES[family].items():
        assert role is None or name in present, name
        assert adapter.role_of(name) == role, name


def test_keep_full_precision_covers_embedders_and_head() -> None:
    for family in FAMILIES:
        assert set(ADAPTERS.get(family).keep_full_precision) >= {"embedder", "head"}


# (c) blocks and latent shapes ------------------------------------------------------------------------------


EXPECTED_BLOCKS = {
    "dit": ["transformer_blocks.0", "transformer_blocks.1"],
    "pixart": ["transformer_blocks.0", "transformer_blocks.1"],
    "sd3": ["transformer_blocks.0", "transformer_blocks.1"],
    "flux": ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_in_execution_order(family: str) -> None:
    model = _model(family)
    blocks = ADAPTERS.get(family).blocks(model)
    assert [name for name, _ in blocks] == EXPECTED_BLOCKS[family]
    modules = dict(model.named_modules())
    assert all(block is modules[name] for name, block in blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_shape(family: str) -> None:
    assert ADAPTERS.get(family).latent_shape(_model(family)) == (4, 8, 8)


def test_flux_latent_size_is_configurable() -> None:
    adapter = FluxAdapter()
    adapter.latent_size = 6
    assert adapter.latent_shape(_model("flux")) == (4, 6, 6)
    assert ADAPTERS.get("flux").latent_size == 8


# conditioning ----------------------------------------------------------------------------------------------


def test_null_conditions() -> None:
    assert ADAPTERS.get("dit").null_conditions(2) == [1000, 1000]
    for family in ("pixart", "sd3", "flux"):
        assert ADAPTERS.get(family).null_conditions(3) == ["", "", ""]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_encode_passes_tokens_and_pooled(family: str) -> None:
    conditions = _conditions(family, 2)
    cond = ADAPTERS.get(family).encode(_model(family), conditions)
    assert torch.equal(cond.tensors["encoder_hidden_states"], torch.stack([c.tokens for c in conditions]))
    assert torch.equal(cond.tensors["pooled_projections"], torch.stack([c.pooled for c in conditions]))
    assert len(cond) == 2


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_encode_needs_pooled_embeddings(family: str) -> None:
    no_pooled = [TextEmbedding(torch.zeros(TEXT_SEQ, TEXT_DIM), torch.ones(TEXT_SEQ, dtype=torch.long))]
    with pytest.raises(ValueError, match="pooled"):
        ADAPTERS.get(family).encode(_model(family), no_pooled)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_prompts_need_a_matching_text_encoder_width(family: str) -> None:
    with pytest.raises(UnsupportedModelError, match="384"):
        ADAPTERS.get(family).encode(_model(family), [""])


# (d) sampling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dit", "pixart", "pixart-ac", "sd3",
                                    "flux"])
def test_sample_is_finite_shaped_and_seeded(family: str) -> None:
    adapter = _sampling_adapter(family)
    model = _model(family)
    conditions = _conditions(family, 2)
    scheduler = adapter.scheduler(model)
    seen = []

    def record(i, t, latents_in, prediction):
        seen.append((i, float(t), prediction.shape))

    first = sample(adapter, model, conditions, scheduler, steps=2, guidance=2.0, seed=3, on_step=record)
    again = sample(adapter, model, conditions, scheduler, steps=2, guidance=2.0, seed=3)
    other = sample(adapter, model, conditions, scheduler, steps=2, guidance=2.0, seed=4)
    assert first.shape == (2, *adapter.latent_shape(model))
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert [(i, shape) for i, _, shape in seen] == [(0, first.shape), (1, first.shape)]
    if adapter.prediction == "flow":
        assert seen[0][1] == pytest.approx(1000.0)  # flow-matching timesteps are sigma * 1000


def test_flow_families_use_flow_matching() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    for family in ("sd3", "flux"):
        adapter = ADAPTERS.get(family)
        assert adapter.prediction == "flow"
        assert isinstance(adapter.scheduler(_model(family)), FlowMatchEulerDiscreteScheduler)


# predict against direct model calls ------------------------------------------------------------------------


def test_sd3_predict_passes_unscaled_timesteps() -> None:
    adapter, model = ADAPTERS.get("sd3"), _model("sd3")
    conditions = _conditions("sd3", 2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([750.0])
    with torch.no_grad():
        out = adapter.predict(model, latents, t, adapter.encode(model, conditions))
        expected = model(hidden_states=latents, timestep=torch.tensor([750.0, 750.0]),
                         encoder_hidden_states=torch.stack([c.tokens for c in conditions]),
                         pooled_projections=torch.stack([c.pooled for c in conditions])).sample
    assert torch.equal(out, expected)


def _reference_pack(latents: torch.Tensor) -> torch.Tensor:
    """Packing written out element by element: token (i, j) holds channels ``c * 4 + 2 * di + dj``."""
    b, c, h, w = latents.shape
    out = torch.empty(b, (h // 2) * (w // 2), c * 4)
    for i in range(h // 2):
        for j in range(w // 2):
            for ch in range(c):
                for di in range(2):
                    for dj in range(2):
                        out[:, i * (w // 2) + j, ch * 4 + 2 * di + dj] = latents[:, ch, 2 * i + di, 2 * j + dj]
    return out


@pytest.mark.parametrize("height, width", [(4, 4), (4, 6)])
def test_flux_pack_unpack_round_trip(height: int, width: int) -> None:
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert torch.equal(packed, _reference_pack(x))
    assert torch.equal(unpack_latents(packed, height, width), x)
    ids = latent_image_ids(height // 2, width // 2)
    assert ids.shape == ((height // 2) * (width // 2), 3)
    assert torch.equal(ids[width // 2 + 1], torch.tensor([0.0, 1.0, 1.0]))  # row 1, column 1
    assert torch.equal(ids[:, 0], torch.zeros(len(ids)))


def test_flux_pack_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 5, 4))


def test_flux_predict_matches_a_manual_packed_call() -> None:
    adapter, model = ADAPTERS.get("flux"), _model("flux")
    conditions = _conditions("flux", 2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([750.0])
    with torch.no_grad():
        out = adapter.predict(model, latents, t, adapter.encode(model, conditions))
        tokens = model(hidden_states=_reference_pack(latents), timestep=torch.tensor([0.75, 0.75]),
                       guidance=torch.tensor([3.5, 3.5]),
                       encoder_hidden_states=torch.stack([c.tokens for c in conditions]),
                       pooled_projections=torch.stack([c.pooled for c in conditions]),
                       txt_ids=torch.zeros(TEXT_SEQ, 3), img_ids=latent_image_ids(4, 4)).sample
    assert out.shape == latents.shape
    assert torch.allclose(out, unpack_latents(tokens, 8, 8), atol=1e-6)
    assert torch.allclose(pack_latents(out), tokens, atol=1e-6)


def test_flux_embedded_guidance_reaches_the_model() -> None:
    model = _model("flux")
    cond = ADAPTERS.get("flux").encode(model, _conditions("flux", 1))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    low = FluxAdapter()
    low.embedded_guidance = 1.0
    with torch.no_grad():
        default = ADAPTERS.get("flux").predict(model, latents, torch.tensor([500.0]), cond)
        changed = low.predict(model, latents, torch.tensor([500.0]), cond)
    assert not torch.allclose(default, changed)
