"""``CogVideoXTransformer3DModel`` (CogVideoX 1.0 / 1.5, text-to-video): expert blocks over text + video tokens.

Latents are ``[B, F, C, H, W]`` (frames before channels, as ``CogVideoXPipeline`` keeps them); ``latent_shape``
is ``(F, C, H, W)`` from the config: ``F = (sample_frames - 1) // temporal_compression_ratio + 1`` (padded to a
multiple of ``patch_size_t`` for 1.5), ``H, W = sample_height, sample_width``.

A block runs *one full 3D attention* over the concatenated text and video tokens (``attn1``: no separate
temporal or spatial attention, so no ``temporal`` role); text tokens share ``to_q/k/v`` and ``to_out`` with
video tokens. ``norm1`` / ``norm2`` (``CogVideoXLayerNormZero``) produce the adaLN modulation of both streams.
Text embeddings (T5, ``text_embed_dim`` wide) enter through ``patch_embed.text_proj``; with sin-cos or learned
position embeddings the text must be exactly ``max_text_seq_length`` tokens (the pipeline pads to 226).

Sampling follows ``CogVideoXPipeline``: v-prediction with ``CogVideoXDDIMScheduler`` (trailing spacing, zero
terminal SNR, SNR shift 3.0 as CogVideoX-2b ships), integer timesteps, and 3D rotary embeddings computed
outside the model (``_prepare_rotary_positional_embeddings``) when ``use_rotary_positional_embeddings``.
Image-to-video checkpoints (image latents concatenated in channels, ``ofs``) are not covered beyond ``ofs``.
The class keeps no module in fp32 (no ``_keep_in_fp32_modules``).
"""

from __future__ import annotations

import torch

from compressdit.models.base import ADAPTERS, BlockStack, Conditioning, ModelAdapter, call_default
from compressdit.models.text_conditions import TextEmbedding, embed_prompts, stack

_BLOCK = r"transformer_blocks\.\d+"
OFS = 2.0  # CogVideoXImageToVideoPipeline's ofs for 1.5 checkpoints with an ofs embedding


def rotary_embedding(model, frames: int, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``CogVideoXPipeline._prepare_rotary_positional_embeddings`` for latents of ``frames x height x width``."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    config = model.config
    p, p_t = config.patch_size, config.patch_size_t
    grid = (height // p, width // p)
    base_width, base_height = config.sample_width // p, config.sample_height // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid(grid, base_width, base_height)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                       temporal_size=frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_height, base_width), device=device)


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    model_class_name = "CogVideoXTransformer3DModel"
    condition_kind = "text"
    prediction = "v"
    text_width_key = "text_embed_dim"
    text_length_key = "max_text_seq_length"
    frame_axis = 1
    block_patterns = (_BLOCK,)
    block_stacks = (BlockStack("transformer_blocks", "num_layers", returns=("hidden_states", "encoder_hidden_states")),)
    roles = {
        "attn_qkv": (_BLOCK + r"\.attn1\.to_[qkv]",),
        "attn_out": (_BLOCK + r"\.attn1\.to_out\.0",),
        "ffn_up": (_BLOCK + r"\.ff\.net\.0\.proj",),
        "ffn_down": (_BLOCK + r"\.ff\.net\.2",),
        "adaln": (_BLOCK + r"\.norm[12]\.linear",),
        "embedder": (r"patch_embed\..*", r"time_embedding\..*", r"ofs_embedding\..*"),
        "head": (r"norm_out\.linear", r"proj_out"),
    }

    def latent_shape(self, model):
        config = model.config
        frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
        if config.patch_size_t:
            frames += -frames % config.patch_size_t
        return frames, config.in_channels, config.sample_height, config.sample_width

    def encode(self, model, conditions):
        embeds = stack(embed_prompts(conditions, model.config.text_embed_dim))
        return Conditioning({"encoder_hidden_states": embeds["tokens"]})  # no text mask, as in CogVideoXPipeline

    def null_conditions(self, count):
        return [""] * count

    def prompt_embeddings(self, pipeline, prompts, device):
        """``CogVideoXPipeline.encode_prompt`` with ``__call__``'s ``max_sequence_length`` (226): T5 run without an
        attention mask over the padded tokens, all of which the transformer attends to (mask of ones)."""
        length = call_default(pipeline, "max_sequence_length")
        tokens, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length,
                                           device=device)
        return [TextEmbedding(t, torch.ones(len(t), dtype=torch.long, device=t.device)) for t in tokens]

    def predict(self, model, latents, timestep, cond):
        batch, frames, channels, height, width = latents.shape
        rotary = None
        if model.config.use_rotary_positional_embeddings:
            rotary = rotary_embedding(model, frames, height, width, latents.device)
        ofs = latents.new_full((batch,), OFS) if model.config.ofs_embed_dim else None
        out = model(hidden_states=latents, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                    timestep=timestep.expand(batch), ofs=ofs, image_rotary_emb=rotary).sample
        return out[:, :frames]

    def scheduler(self, model):
        """``CogVideoXDDIMScheduler`` as CogVideoX-2b ships it (v-prediction, trailing, zero terminal SNR)."""
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing")


ADAPTERS.add("cogvideox", CogVideoXAdapter())
