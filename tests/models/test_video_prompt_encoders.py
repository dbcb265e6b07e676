"""The pipeline prompt encoder on tiny CogVideoX / Wan / Latte pipelines with their own random T5 (the video
adapters' ``prompt_embeddings``), and the sampling loop against the stock diffusers video pipelines."""

from __future__ import annotations

import pytest
import torch

from compressdit.io.sources import load_source
from compressdit.models import ADAPTERS, adapter_for
from compressdit.models.prompt_encoders import PipelinePromptEncoder, prompt_encoder_for
from compressdit.models.sampling import initial_latents, sample
from tests.tiny_pipelines import T5_WIDTH

torch.set_num_threads(1)

# family -> tokens per prompt as each stock pipeline's __call__ has encode_prompt return them
LENGTHS = {"cogvideox": 226, "wan": 512, "latte": 120}
# family -> __call__ arguments matching the tiny pipelines' latents (tests/tiny_pipelines.py)
CALL = {"cogvideox": dict(height=16, width=16, num_frames=9), "wan": dict(height=16, width=16, num_frames=3),
        "latte": dict(height=64, width=64, video_length=2)}


@pytest.mark.parametrize("family", ["cogvideox", "wan", "latte"])
def test_pipeline_encoder_embeds_what_the_transformer_receives(family, text_pipeline_dir, tmp_path):
    encoder = prompt_encoder_for(ADAPTERS.get(family), text_pipeline_dir(family), cache_dir=tmp_path)
    assert isinstance(encoder, PipelinePromptEncoder)
    cat, null = encoder.resolve(["a cat", ""])
    for e in (cat, null):
        assert e.tokens.shape == (LENGTHS[family], T5_WIDTH) and e.mask.shape == (LENGTHS[family],)
        assert e.pooled is None and torch.isfinite(e.tokens).all()
    if family == "cogvideox":  # T5 runs unmasked over all 226 padded tokens; the transformer sees every one
        assert cat.mask.all() and null.mask.all() and cat.tokens[-1].abs().sum() > 0
    else:  # tokenizer mask: [CLS] a cat [SEP] vs [CLS] [SEP]
        assert cat.mask.sum() == 4 and null.mask.sum() == 2
        assert cat.tokens[4:].abs().sum() == 0 and cat.tokens[:4].abs().sum(-1).gt(0).all()
        # Wan zeroes "" past its length too; Latte passes its negative "" embeddings unmasked
        assert (null.tokens[2:].abs().sum() == 0) == (family == "wan")


@pytest.mark.parametrize("family", ["cogvideox", "wan", "latte"])
def test_sample_through_the_pipeline_encoder_equals_the_stock_video_pipeline(family, text_pipeline_dir):
    """Same prompts, noise and steps, classifier-free guidance against "": our loop with the pipeline's own
    encode_prompt reproduces the stock pipeline's latents (Latte: a batch of two prompts, the masked path)."""
    from diffusers import DiffusionPipeline

    folder = text_pipeline_dir(family)
    source = load_source(str(folder))
    adapter = adapter_for(source.transformer)
    prompts = ["a cat", "a red dog"]
    x = initial_latents(adapter, source.transformer, len(prompts), seed=0)
    ours = sample(adapter, source.transformer, prompts, source.scheduler, steps=2, guidance=5.0, latents=x,
                  prompt_encoder=source.prompt_encoder)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompts, num_inference_steps=2, guidance_scale=5.0, latents=x, output_type="latent",
                 **CALL[family]).frames
    assert torch.isfinite(ours).all() and ours.shape == x.shape == stock.shape
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, x) and not torch.allclose(ours[0], ours[1])
