"""The CogVideoX, Wan and Latte adapters on tiny random video transformers: roles, layouts, prediction, sampling
(calibrated recipes: test_video_compression.py)."""

from __future__ import annotations

import functools
import re
import types

import pytest
import torch
from torch import nn

from compressdit.models import ADAPTERS, adapter_for
from compressdit.models.base import ROLES
from compressdit.models.cogvideox import rotary_embedding
from compressdit.models.sampling import sample
from compressdit.models.text_conditions import synthetic_text
from compressdit.quant.layers import QuantizedLinear

TEXT_DIM = 48  # not MiniLM's 384: prompts would need the model's own text encoder
TEXT_SEQ = 6


def _random(model, scale: float = 0.05):
    """Non-zero weights everywhere with uneven per-row scales (no zero-initialised gate hides a layer)."""
    with torch.no_grad():
        for p in model.parameters():
            rows = 1 + torch.rand(p.shape[0], *[1] * (p.dim() - 1)) * 3 if p.dim() else 1.0
            p.copy_(torch.randn_like(p) * scale * rows)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _model(variant: str) -> nn.Module:
    """``cogvideox`` (1.0 with rotary embeddings, as 5b), ``cogvideox-sincos`` (as 2b), ``cogvideox-1.5``
    (temporal patches, ``ofs``), ``wan`` (text-to-video), ``wan-i2v`` (image tokens in cross-attention),
    ``latte`` (separate temporal blocks, learned variance)."""
    from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if variant == "latte":
        return _random(LatteTransformer3DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=64, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            caption_channels=TEXT_DIM, video_length=3))
    if variant.startswith("cogvideox"):
        v15 = variant == "cogvideox-1.5"
        model = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
            patch_size_t=2 if v15 else None, ofs_embed_dim=32 if v15 else None, temporal_compression_ratio=4,
            max_text_seq_length=TEXT_SEQ, use_rotary_positional_embeddings=variant != "cogvideox-sincos")
    else:
        image = variant == "wan-i2v"
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                      in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=128,
                                      num_layers=2, rope_max_seq_len=32, image_dim=24 if image else None,
                                      added_kv_proj_dim=24 if image else None)
    return _random(model)


def _adapter(family: str):
    """The registered adapter with seeded synthetic null conditions instead of the "" prompt."""
    adapter = ADAPTERS.get(family)

    class SyntheticNull(type(adapter)):
        def null_conditions(self, count):
            return synthetic_text(count, TEXT_SEQ, TEXT_DIM, seed=99)

    return SyntheticNull()


def _matching_roles(adapter, name: str) -> list[str]:
    return [role for role, patterns in adapter.roles.items() if any(re.fullmatch(p, name) for p in patterns)]


# roles ------------------------------------------------------------------------------------------------------

ALL_FEATURES = {"cogvideox": "cogvideox-1.5", "wan": "wan-i2v", "latte": "latte"}
TEMPORAL = {"cogvideox": False, "wan": False, "latte": True}  # separate temporal attention
EXPECTED_ROLES = {
    "cogvideox": {
        "transformer_blocks.0.attn1.to_q": "attn_qkv", "transformer_blocks.1.attn1.to_out.0": "attn_out",
        "transformer_blocks.0.ff.net.0.proj": "ffn_up", "transformer_blocks.0.ff.net.2": "ffn_down",
        "transformer_blocks.0.norm1.linear": "adaln", "transformer_blocks.1.norm2.linear": "adaln",
        "patch_embed.text_proj": "embedder", "patch_embed.proj": "embedder", "time_embedding.linear_1": "embedder",
        "ofs_embedding.linear_2": "embedder", "norm_out.linear": "head", "proj_out": "head"},
    "wan": {
        "blocks.0.attn1.to_k": "attn_qkv", "blocks.0.attn1.to_out.0": "attn_out", "blocks.1.attn2.to_q": "cross_q",
        "blocks.0.attn2.to_v": "cross_kv", "blocks.0.attn2.add_k_proj": "cross_kv",
        "blocks.0.attn2.to_out.0": "cross_out", "blocks.0.ffn.net.0.proj": "ffn_up", "blocks.1.ffn.net.2": "ffn_down",
        "condition_embedder.time_proj": "adaln", "condition_embedder.time_embedder.linear_1": "embedder",
        "condition_embedder.text_embedder.linear_2": "embedder",
        "condition_embedder.image_embedder.ff.net.0.proj": "embedder", "proj_out": "head"},
    "latte": {
        "transformer_blocks.0.attn1.to_q": "attn_qkv", "transformer_blocks.1.attn1.to_out.0": "attn_out",
        "transformer_blocks.0.attn2.to_q": "cross_q", "transformer_blocks.0.attn2.to_k": "cross_kv",
        "transformer_blocks.0.attn2.to_out.0": "cross_out", "transformer_blocks.0.ff.net.0.proj": "ffn_up",
        "temporal_transformer_blocks.0.attn1.to_q": "temporal", "temporal_transformer_blocks.1.attn1.to_v": "temporal",
        "temporal_transformer_blocks.0.attn1.to_out.0": "temporal",
        "temporal_transformer_blocks.0.ff.net.2": "ffn_down", "adaln_single.linear": "adaln",
        "adaln_single.emb.timestep_embedder.linear_1": "embedder", "caption_projection.linear_2": "embedder",
        "proj_out": "head"},
}


@pytest.mark.parametrize("family", ["cogvideox", "wan", "latte"])
def test_every_linear_has_exactly_one_role_and_every_pattern_matches(family: str) -> None:
    adapter, model = ADAPTERS.get(family), _model(ALL_FEATURES[family])
    assert adapter_for(model) is adapter
    assert set(adapter.roles) <= set(ROLES) and ("temporal" in adapter.roles) == TEMPORAL[family]
    linears = adapter.linear_layers(model)
    assert {n: r for n in linears if len(r := _matching_roles(adapter, n)) != 1} == {}
    names = [n for n, _ in model.named_modules()]
    assert [p for ps in adapter.roles.values() for p in ps if not any(re.fullmatch(p, n) for n in names)] == []
    for name, role in EXPECTED_ROLES[family].items():
        assert name in linears and adapter.role_of(name) == role, name


def test_wan_keep_in_fp32_linears_are_never_quantized_by_role() -> None:
    adapter, model = ADAPTERS.get("wan"), _model("wan-i2v")
    keep = model._keep_in_fp32_modules
    kept = [n for n in adapter.linear_layers(model) if any(k in n.split(".") for k in keep)]
    assert kept and all(adapter.role_of(n) in adapter.keep_full_precision for n in kept)


# layouts, conditioning, prediction ----------------------------------------------------------------------------

def test_latent_layouts() -> None:
    assert ADAPTERS.get("cogvideox").latent_shape(_model("cogvideox")) == (2, 4, 8, 8)  # [F, C, H, W]
    assert ADAPTERS.get("cogvideox").latent_shape(_model("cogvideox-1.5")) == (2, 4, 8, 8)
    assert ADAPTERS.get("wan").latent_shape(_model("wan")) == (4, 2, 8, 8)  # [C, F, H, W]
    assert ADAPTERS.get("latte").latent_shape(_model("latte")) == (4, 3, 8, 8)  # [C, F, H, W]
    assert ADAPTERS.get("cogvideox").frame_axis == 1 and ADAPTERS.get("wan").frame_axis == 2
    assert ADAPTERS.get("latte").frame_axis == 2


def test_latte_blocks_alternate_spatial_and_temporal() -> None:
    assert [n for n, _ in ADAPTERS.get("latte").blocks(_model("latte"))] == [
        "transformer_blocks.0", "temporal_transformer_blocks.0", "transformer_blocks.1",
        "temporal_transformer_blocks.1"]
    assert ADAPTERS.get("latte").block_stacks == ()  # zipped stacks: no depth pruning


@pytest.mark.parametrize("variant", ["cogvideox", "cogvideox-1.5"])
def test_cogvideox_rotary_embedding_is_the_pipelines(variant: str) -> None:
    from diffusers import CogVideoXPipeline

    model = _model(variant)
    fake_pipe = types.SimpleNamespace(transformer=model, vae_scale_factor_spatial=8)
    for frames, size in [(2, 8), (3, 4)]:  # 1.5 slices a grid of at most sample_height x sample_width
        expected = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, size * 8, size * 8, frames,
                                                                           torch.device("cpu"))
        for ours, theirs in zip(rotary_embedding(model, frames, size, size), expected, strict=True):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("variant", ["cogvideox", "cogvideox-sincos", "cogvideox-1.5", "wan", "latte"])
def test_synthetic_conditioning_and_predict_match_a_direct_call(variant: str) -> None:
    family = variant.split("-")[0]
    adapter, model = ADAPTERS.get(family), _model(variant)
    cond = adapter.synthetic_conditioning(model, 2, seed=3)
    tokens = cond.tensors["encoder_hidden_states"]
    assert tokens.shape == (2, TEXT_SEQ if family == "cogvideox" else adapter.synthetic_tokens, TEXT_DIM)
    latents = torch.randn(2, *adapter.latent_shape(model), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700])
    with torch.no_grad():
        out = adapter.predict(model, latents, t, cond)
        kwargs = {}
        if family == "cogvideox" and model.config.use_rotary_positional_embeddings:
            kwargs["image_rotary_emb"] = rotary_embedding(model, 2, 8, 8)
        if model.config.get("ofs_embed_dim"):
            kwargs["ofs"] = torch.tensor([2.0, 2.0])
        direct = model(hidden_states=latents, encoder_hidden_states=tokens, timestep=torch.tensor([700, 700]),
                       **kwargs).sample
    assert out.shape == latents.shape and torch.equal(out, direct[:, : latents.shape[1]])


def test_wan_zeroes_text_tokens_past_the_prompt_length() -> None:
    from compressdit.models.text_conditions import TextEmbedding

    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    cond = ADAPTERS.get("wan").encode(_model("wan"), [TextEmbedding(torch.ones(TEXT_SEQ, TEXT_DIM), mask)])
    assert torch.equal(cond.tensors["encoder_hidden_states"][0].sum(-1), mask.float() * TEXT_DIM)


@pytest.mark.parametrize("family", ["cogvideox", "wan", "latte"])
def test_sampling_uses_the_pipelines_scheduler_and_is_seeded(family: str) -> None:
    from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, UniPCMultistepScheduler

    adapter, model = _adapter(family), _model(family)
    scheduler = adapter.scheduler(model)
    if family == "cogvideox":
        assert isinstance(scheduler, CogVideoXDDIMScheduler) and adapter.prediction == "v"
        assert scheduler.config.prediction_type == "v_prediction"
    elif family == "latte":
        assert isinstance(scheduler, DDIMScheduler) and adapter.prediction == "epsilon"
    else:
        assert isinstance(scheduler, UniPCMultistepScheduler) and adapter.prediction == "flow"
        assert scheduler.config.prediction_type == "flow_prediction" and scheduler.config.use_flow_sigmas
    conditions = synthetic_text(2, TEXT_SEQ, TEXT_DIM, seed=1)
    first = sample(adapter, model, conditions, scheduler, steps=2, guidance=3.0, seed=5)
    again = sample(adapter, model, conditions, scheduler, steps=2, guidance=3.0, seed=5)
    other = sample(adapter, model, conditions, scheduler, steps=2, guidance=3.0, seed=6)
    assert first.shape == (2, *adapter.latent_shape(model)) and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.allclose(first, other)
