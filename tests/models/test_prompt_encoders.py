"""Prompt encoders (compressdit.models.prompt_encoders) on tiny PixArt-alpha / SD3 / FLUX pipelines with their own
random T5 / CLIP text encoders, and the sampling loop against the stock diffusers pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressdit.errors import ConfigError, UnsupportedModelError
from compressdit.io.sources import load_source
from compressdit.models import ADAPTERS, adapter_for
from compressdit.models.flux import pack_latents, unpack_latents
from compressdit.models.prompt_encoders import (PROMPT_ENCODERS, EmbeddingsFilePromptEncoder, MiniLMPromptEncoder,
                                                PipelinePromptEncoder, prompt_encoder_for, resolve_prompts,
                                                save_prompt_embeddings)
from compressdit.models.sampling import initial_latents, sample
from compressdit.models.text_conditions import TextEmbedding, embed_prompts, minilm_embeddings, synthetic_text
from tests.tiny_pipelines import CLIP_WIDTH, T5_WIDTH

torch.set_num_threads(1)

# family -> (tokens per prompt, token width, pooled width) as each stock pipeline's encode_prompt returns them
SHAPES = {"pixart": (120, T5_WIDTH, None), "sd3": (77 + 256, T5_WIDTH, 2 * CLIP_WIDTH),
          "flux": (512, T5_WIDTH, CLIP_WIDTH)}


def test_registry_names_the_three_kinds():
    assert list(PROMPT_ENCODERS) == ["embeddings", "minilm", "pipeline"]


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_pipeline_encoder_shapes_and_disk_cache(family, text_pipeline_dir, tmp_path):
    folder = text_pipeline_dir(family)
    adapter = ADAPTERS.get(family)
    encoder = prompt_encoder_for(adapter, folder, cache_dir=tmp_path)
    assert isinstance(encoder, PipelinePromptEncoder) and encoder._pipeline is None  # loaded on first use only
    seq, width, pooled = SHAPES[family]
    out = encoder.resolve(["a cat", 7, "", "a cat"])
    assert out[1] == 7 and out[0] is out[3] and encoder.encoded == 2
    for e in (out[0], out[2]):
        assert e.tokens.shape == (seq, width) and e.mask.shape == (seq,) and e.tokens.device.type == "cpu"
        assert (e.pooled is None) == (pooled is None) and (pooled is None or e.pooled.shape == (pooled,))
    assert not torch.equal(out[0].tokens, out[2].tokens)
    if family == "pixart":  # T5 attention mask: [CLS] a cat [SEP] vs [CLS] [SEP]
        assert out[0].mask.sum() == 4 and out[2].mask.sum() == 2
    assert len(list((tmp_path / "prompt-embeddings").rglob("*.safetensors"))) == 2
    again = prompt_encoder_for(adapter, folder, cache_dir=tmp_path)
    second = again.resolve(["", "a cat"])
    assert again.encoded == 0 and again.from_cache == 2 and again._pipeline is None  # cache hit: nothing loaded
    assert torch.equal(second[1].tokens, out[0].tokens) and torch.equal(second[0].mask, out[2].mask)
    assert again.key == encoder.key


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_sample_through_the_pipeline_encoder_equals_the_stock_pipeline(family, guidance, text_pipeline_dir):
    """Same prompts, noise and steps: our loop (the pipeline's own encode_prompt, "" through it for classifier-free
    guidance, its scheduler, FLUX's dynamic shifting mu) reproduces the stock pipeline's latents."""
    from diffusers import DiffusionPipeline

    folder = text_pipeline_dir(family)
    source = load_source(str(folder))
    adapter = adapter_for(source.transformer)
    prompts = ["a cat", "a dog"]
    x = initial_latents(adapter, source.transformer, len(prompts), seed=0)
    ours = sample(adapter, source.transformer, prompts, source.scheduler, steps=3, guidance=guidance, latents=x,
                  prompt_encoder=source.prompt_encoder)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    if family == "flux":  # FLUX: distilled guidance is always on; CFG is FluxPipeline's "true CFG" against ""
        extra.update(true_cfg_scale=guidance, negative_prompt="" if guidance != 1.0 else None)
    else:
        extra.update(guidance_scale=guidance)
    stock = pipe(prompts, num_inference_steps=3, height=64, width=64,
                 latents=pack_latents(x) if family == "flux" else x, output_type="latent", **extra).images
    if family == "flux":
        stock = unpack_latents(stock, 8, 8)
    assert torch.isfinite(ours).all() and ours.shape == x.shape
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, x) and not torch.allclose(ours[0], ours[1])


@pytest.mark.parametrize("tokens", [16, 256, 1024, 4096])
def test_flux_dynamic_shifting_mu_is_fluxpipelines(tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)
    side = int(2 * tokens ** 0.5)  # latents of side x side are (side/2)^2 packed tokens
    ours = FlowMatchEulerDiscreteScheduler(**config)
    ADAPTERS.get("flux").set_timesteps(None, ours, 4, torch.zeros(1, 4, side, side), "cpu")
    stock = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)  # as FluxPipeline.__call__ computes it
    stock.set_timesteps(4, device="cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    torch.testing.assert_close(ours.sigmas, stock.sigmas)
    if tokens == 4096:
        assert mu == pytest.approx(1.15)


def test_schedulers_without_dynamic_shifting_keep_their_spacing():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours, stock = FlowMatchEulerDiscreteScheduler(shift=1.0), FlowMatchEulerDiscreteScheduler(shift=1.0)
    ADAPTERS.get("flux").set_timesteps(None, ours, 5, torch.zeros(1, 4, 8, 8), "cpu")
    stock.set_timesteps(5, device="cpu")
    assert torch.equal(ours.sigmas, stock.sigmas)


def test_embeddings_file_round_trip_and_missing_prompts(tmp_path):
    embeddings = synthetic_text(2, 5, 48, 40, seed=1)
    path = save_prompt_embeddings(tmp_path / "e.safetensors", ["a cat", ""], embeddings)
    encoder = EmbeddingsFilePromptEncoder(path)
    out = encoder.resolve(["", 3, "a cat"])
    assert out[1] == 3 and torch.equal(out[0].tokens, embeddings[1].tokens)
    assert torch.equal(out[2].pooled, embeddings[0].pooled) and torch.equal(out[2].mask, embeddings[0].mask)
    with pytest.raises(ConfigError, match="prompt 'a dog' is not in .*e.safetensors.*empty prompt"):
        encoder.resolve(["a dog"])
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"tokens": torch.zeros(1, 2, 3)}, str(bad))
    with pytest.raises(ConfigError, match="not a prompt-embeddings file"):
        EmbeddingsFilePromptEncoder(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read"):
        EmbeddingsFilePromptEncoder(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="does not exist"):
        EmbeddingsFilePromptEncoder(tmp_path / "nope.safetensors")


def test_minilm_encoder_matches_what_adapters_embed():
    prompts = ["a photo of a bag", "", "a sneaker"]
    via_adapter = embed_prompts(prompts, 384, 384)
    via_encoder = MiniLMPromptEncoder().resolve(prompts)
    for a, b in zip(via_adapter, via_encoder):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert minilm_embeddings(["x"], pooled=False)[0].pooled is None
    assert resolve_prompts(prompts, None) == prompts  # no encoder: strings go on to the adapter


def test_width_errors_name_both_flags():
    with pytest.raises(UnsupportedModelError, match=r"width 48 .*384-d.*--text-encoder.*--embeddings"):
        embed_prompts(["a cat"], 48)
    wrong = synthetic_text(1, 5, 32, 16)
    with pytest.raises(UnsupportedModelError, match=r"32-d tokens and 16-d pooled .* takes 48-d tokens and 40-d"):
        embed_prompts(wrong, 48, 40)
    assert embed_prompts(synthetic_text(1, 5, 48, 40), 48, 40)[0].tokens.shape == (5, 48)


def test_encoder_choice_and_flag_errors(text_pipeline_dir, tmp_path, dit_model_dir):
    sd3 = ADAPTERS.get("sd3")
    folder = text_pipeline_dir("sd3")
    path = save_prompt_embeddings(tmp_path / "e.safetensors", [""], synthetic_text(1, 3, 32, 32))
    assert isinstance(prompt_encoder_for(sd3, folder, embeddings=path), EmbeddingsFilePromptEncoder)
    chosen = prompt_encoder_for(sd3, tmp_path, text_encoder=folder)
    assert isinstance(chosen, PipelinePromptEncoder) and chosen.folder == folder
    assert prompt_encoder_for(sd3, folder / "transformer") is None  # a bare folder brings none
    with pytest.raises(ConfigError, match="not both"):
        prompt_encoder_for(sd3, folder, text_encoder=folder, embeddings=path)
    with pytest.raises(ConfigError, match="--text-encoder: .* is not a diffusers pipeline folder with text encoders"):
        prompt_encoder_for(sd3, folder, text_encoder=folder / "transformer")
    with pytest.raises(ConfigError, match="--embeddings: DiTTransformer2DModel is class-conditioned"):
        prompt_encoder_for(ADAPTERS.get("dit"), dit_model_dir, embeddings=path)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"][1] == "T5EncoderModel"


def test_text_embedding_passthrough_is_unchanged():
    e = TextEmbedding(torch.ones(2, 48), torch.ones(2, dtype=torch.long))
    assert embed_prompts([e], 48)[0] is e
