"""Tiny pipelines of families without a compressdit adapter (sampled through their own ``__call__``), built offline.

Text encoders are random-weight ``transformers`` models from small configs (Qwen2.5-VL, Gemma2, GLM, BERT + T5,
...) with a vocabulary of 30522, the size of the BERT WordPiece tokenizer every tokenizer slot holds
(``tests.tiny_pipelines.tokenizer``; diffusers does not type-check tokenizers). Each builder's docstring says how
to call it: 64 px or less, and the ``call`` keywords its tiny size needs.
"""

from __future__ import annotations

from tests.tiny_pipelines import T5_WIDTH, _seeded, t5, tokenizer, vae, wan_vae

VOCAB = 30522  # the BERT WordPiece tokenizer's


def qwenimage_pipeline(seed: int = 0):
    """Qwen-Image (Qwen2.5-VL text encoder; true CFG through ``true_cfg_scale`` + ``negative_prompt``): 64 px,
    16-channel latents of 8x8 packed 2x2."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12)), seed)
    vae = _seeded(lambda: AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, False, False],
        latents_mean=[0.0] * 16, latents_std=[1.0] * 16), 3)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": VOCAB, "bos_token_id": 101, "eos_token_id": 102,
                     "rope_scaling": {"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 64},
        hidden_size=64, vocab_size=VOCAB, vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 2,
        vision_token_id=VOCAB - 1, image_token_id=VOCAB - 4, video_token_id=VOCAB - 5)
    text_encoder = _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config), 1)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer(512), transformer=transformer)


def _gemma2(width: int = 64, seed: int = 1):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                          attn_implementation="eager", pad_token_id=0)
    return _seeded(lambda: Gemma2Model(config), seed)


def _dc_vae(seed: int = 3):
    """A deep-compression autoencoder that shrinks 2x (Sana's real one shrinks 32x)."""
    from diffusers import AutoencoderDC

    return _seeded(lambda: AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407), seed)


def _sana_transformer(seed: int, guidance: bool):
    from diffusers import SanaTransformer2DModel

    return _seeded(lambda: SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=64,
        sample_size=16, patch_size=2, guidance_embeds=guidance, qk_norm="rms_norm_across_heads" if guidance else None),
        seed)


def sana_pipeline(seed: int = 0):
    """Sana (Gemma2): call with a ``size`` (resolution binning is then off; its bins start at 256 px); 32 px makes
    16x16 latents, 8x8 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    return SanaPipeline(tokenizer=tokenizer(300), text_encoder=_gemma2(), vae=_dc_vae(),
                        transformer=_sana_transformer(seed, guidance=False),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def sana_sprint_pipeline(seed: int = 0):
    """Sana-Sprint (Gemma2, guidance embedded, SCM scheduler; one or two steps): as :func:`sana_pipeline`."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    return SanaSprintPipeline(tokenizer=tokenizer(300), text_encoder=_gemma2(), vae=_dc_vae(),
                              transformer=_sana_transformer(seed, guidance=True), scheduler=SCMScheduler())


def lumina2_pipeline(seed: int = 0):
    """Lumina-Image 2.0 (Gemma2): 64 px, 8x8 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    transformer = _seeded(lambda: Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=32, axes_dim_rope=(8, 12, 12), axes_lens=(300, 64, 64),
        cap_feat_dim=64), seed)
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=vae(shift_factor=0.0), text_encoder=_gemma2(), tokenizer=tokenizer(256))


def cogview4_pipeline(seed: int = 0):
    """CogView4 (GLM): 64 px, 8x8 latents."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    transformer = _seeded(lambda: CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        text_embed_dim=64, time_embed_dim=64, condition_dim=16, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(16, 16)), seed)
    config = GlmConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=32, pad_token_id=0)
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    return CogView4Pipeline(tokenizer=tokenizer(128), text_encoder=_seeded(lambda: GlmModel(config), 1),
                            vae=vae(), transformer=transformer, scheduler=scheduler)


def hunyuandit_pipeline(seed: int = 0):
    """HunyuanDiT (BERT + T5; the transformer takes its timestep by position): 64 px with resolution binning off
    (its bins start at 768 px), 8x8 latents."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    transformer = _seeded(lambda: HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, patch_size=2, sample_size=8, hidden_size=64,
        num_layers=2, cross_attention_dim=32, cross_attention_dim_t5=T5_WIDTH, pooled_projection_dim=16,
        text_len=77, text_len_t5=256), seed)  # the lengths its pipeline pads to
    bert = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=77)
    return HunyuanDiTPipeline(vae=vae(), text_encoder=_seeded(lambda: BertModel(bert), 1),
                              tokenizer=tokenizer(77), transformer=transformer,
                              scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.03, clip_sample=False),
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                              text_encoder_2=t5(5), tokenizer_2=tokenizer(256))



def mochi_pipeline(seed: int = 0):
    """Mochi (T5): call with 32 px, ``num_frames=7`` (2 latent frames of 4x4) and ``max_sequence_length=16``."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    transformer = _seeded(lambda: MochiTransformer3DModel(
        patch_size=2, num_attention_heads=3, attention_head_dim=32, num_layers=2, pooled_projection_dim=96,
        in_channels=12, text_embed_dim=T5_WIDTH, time_embed_dim=32, max_sequence_length=16), seed)
    vae = _seeded(lambda: AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1)), 3)
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5(),
                         tokenizer=tokenizer(256), transformer=transformer)


def allegro_pipeline(seed: int = 0):
    """Allegro (T5; its VAE decodes only tiled, ``vae.enable_tiling()``): call with 32 px, ``num_frames=5``
    (2 latent frames of 4x4) and ``max_sequence_length=16``."""
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

    transformer = _seeded(lambda: AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=48, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=96, sample_width=4, sample_height=4, sample_frames=2, caption_channels=T5_WIDTH), seed)
    vae = _seeded(lambda: AutoencoderKLAllegro(
        in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4), 3)
    return AllegroPipeline(tokenizer=tokenizer(512), text_encoder=t5(), vae=vae, transformer=transformer,
                           scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))


def skyreels_v2_pipeline(seed: int = 0):
    """SkyReels-V2 (UMT5, Wan's VAE): 3 frames of 16 px (2 latent frames of 8x8), as :func:`wan_pipeline`."""
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    transformer = _seeded(lambda: SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=T5_WIDTH, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32), seed)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SkyReelsV2Pipeline(tokenizer=tokenizer(512), text_encoder=t5(umt5=True), transformer=transformer,
                              vae=wan_vae(), scheduler=scheduler)


def hidream_pipeline(seed: int = 0):
    """HiDream-I1 (two CLIPs, T5 and Llama; mixture-of-experts feed-forwards). Its pipeline scales any requested
    size to 128 x 128 latents of that aspect ratio (1024 px with this 8x VAE): 64x64 tokens, whatever ``size``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_pipelines import CLIP_WIDTH, clip

    transformer = _seeded(lambda: HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, caption_channels=[T5_WIDTH, 32], text_emb_dim=2 * CLIP_WIDTH, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(8, 12, 12), max_resolution=(16, 16), llama_layers=(0, 1)), seed)
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=101,
                        eos_token_id=102)
    llama_tokenizer = tokenizer(128)
    llama_tokenizer.eos_token = "[SEP]"  # the pipeline pads with Llama's end-of-text token
    return HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(shift_factor=0.0),
        text_encoder=clip(2, projection=True, positions=128), tokenizer=tokenizer(128),
        text_encoder_2=clip(4, projection=True, positions=128), tokenizer_2=tokenizer(128), text_encoder_3=t5(5),
        tokenizer_3=tokenizer(128), text_encoder_4=_seeded(lambda: LlamaForCausalLM(llama), 6),
        tokenizer_4=llama_tokenizer, transformer=transformer)


def easyanimate_pipeline(seed: int = 0):
    """EasyAnimate V5.1 (Qwen2-VL text encoder, MagVit VAE): call with 32 px, ``num_frames=5`` (2 latent frames of
    4x4) and ``max_sequence_length=32``."""
    from diffusers import (AutoencoderKLMagvit, EasyAnimatePipeline, EasyAnimateTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    transformer = _seeded(lambda: EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=64, num_layers=2, mmdit_layers=2, sample_width=4, sample_height=4, patch_size=2), seed)
    vae = _seeded(lambda: AutoencoderKLMagvit(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3, layers_per_block=1,
        norm_num_groups=8, spatial_group_norm=False), 3)
    config = Qwen2VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": VOCAB, "bos_token_id": 101, "eos_token_id": 102,
                     "rope_scaling": {"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 64, "num_heads": 2},
        vocab_size=VOCAB, vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 2, vision_token_id=VOCAB - 1,
        image_token_id=VOCAB - 4, video_token_id=VOCAB - 5)
    chat = tokenizer(64)
    chat.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endfor %}")
    return EasyAnimatePipeline(vae=vae, text_encoder=_seeded(lambda: Qwen2VLForConditionalGeneration(config), 1),
                               tokenizer=chat, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())


def hunyuanvideo_pipeline(seed: int = 0):
    """HunyuanVideo (Llama + CLIP; true CFG through ``true_cfg_scale`` + ``negative_prompt``, ``guidance_scale``
    feeds its guidance embedding): call with 32 px, ``num_frames=5`` (2 latent frames of 4x4) and
    ``max_sequence_length=16``."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel

    from tests.tiny_pipelines import CLIP_WIDTH, clip

    transformer = _seeded(lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=64, pooled_projection_dim=CLIP_WIDTH, rope_axes_dim=(8, 12, 12)), seed)
    vae = _seeded(lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False), 3)
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=101,
                        eos_token_id=102)
    return HunyuanVideoPipeline(text_encoder=_seeded(lambda: LlamaModel(llama), 1), tokenizer=tokenizer(512),
                                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=clip(2), tokenizer_2=tokenizer(77))


BUILDERS = {"qwenimage": qwenimage_pipeline, "sana": sana_pipeline, "sana-sprint": sana_sprint_pipeline,
            "lumina2": lumina2_pipeline, "cogview4": cogview4_pipeline, "hunyuandit": hunyuandit_pipeline,
            "mochi": mochi_pipeline, "allegro": allegro_pipeline, "skyreels-v2": skyreels_v2_pipeline,
            "hidream": hidream_pipeline, "easyanimate": easyanimate_pipeline,
            "hunyuanvideo": hunyuanvideo_pipeline}

#: ``size`` and ``call`` of the calibrate / evaluate stages each tiny pipeline is sampled with
CALLS = {"sana": (32, {}), "sana-sprint": (32, {}), "mochi": (32, {"num_frames": 7, "max_sequence_length": 16}),
         "allegro": (32, {"num_frames": 5, "max_sequence_length": 16}), "skyreels-v2": (16, {"num_frames": 3}),
         "easyanimate": (32, {"num_frames": 5}), "hunyuanvideo": (32, {"num_frames": 5, "max_sequence_length": 16})}
