"""``LatteTransformer3DModel`` (Latte): spatial blocks and *separate temporal blocks*, alternating.

Latents are ``[B, C, F, H, W]`` (``LattePipeline``'s layout); ``latent_shape`` is
``(in_channels, video_length, sample_size, sample_size)`` from the config.

Each layer pairs a spatial block (``transformer_blocks.N``: self-attention within a frame, cross-attention on
the text, MLP) with a temporal block (``temporal_transformer_blocks.N``: self-attention across the frames of
each patch position, MLP). The temporal blocks' attention layers get the ``temporal`` role, so ViDiT-Q-MP
scores them by temporal fidelity (frame-to-frame differences of the final latents); their MLPs share the
spatial blocks' ``ffn_*`` roles. Both block kinds are adaLN-single: the modulation comes from the shared
``adaln_single.linear`` (``adaln``) plus each block's ``scale_shift_table``. T5 text embeddings
(``caption_channels`` wide) enter through ``caption_projection``.

Sampling follows ``LattePipeline``: epsilon prediction with a learned variance (the model's second half of
channels, dropped), DDIM over linear betas 1e-4..0.02, integer timesteps, temporal attention enabled.
"""

from __future__ import annotations

from compressdit.models.base import ADAPTERS, Conditioning, ModelAdapter
from compressdit.models.text_conditions import TextEmbedding, embed_prompts, stack

_SPATIAL = r"transformer_blocks\.\d+"
_TEMPORAL = r"temporal_transformer_blocks\.\d+"
_ANY = r"(?:temporal_)?transformer_blocks\.\d+"


class LatteAdapter(ModelAdapter):
    family = "latte"
    model_class_name = "LatteTransformer3DModel"
    condition_kind = "text"
    text_width_key = "caption_channels"
    frame_axis = 2
    block_patterns = (_SPATIAL, _TEMPORAL)
    # none for pruning: the model zips spatial and temporal blocks (one ``num_layers``), so removing blocks of one
    # stack would silently drop their partners; depth / width pruning of Latte is not supported
    block_stacks = ()
    roles = {
        "temporal": (_TEMPORAL + r"\.attn1\.(?:to_[qkv]|to_out\.0)",),
        "attn_qkv": (_SPATIAL + r"\.attn1\.to_[qkv]",),
        "attn_out": (_SPATIAL + r"\.attn1\.to_out\.0",),
        "cross_q": (_SPATIAL + r"\.attn2\.to_q",),
        "cross_kv": (_SPATIAL + r"\.attn2\.to_[kv]",),
        "cross_out": (_SPATIAL + r"\.attn2\.to_out\.0",),
        "ffn_up": (_ANY + r"\.ff\.net\.0\.proj",),
        "ffn_down": (_ANY + r"\.ff\.net\.2",),
        "adaln": (r"adaln_single\.linear",),
        "embedder": (r"adaln_single\.emb\..*", r"caption_projection\..*", r"pos_embed\..*"),
        "head": (r"proj_out",),
    }

    def blocks(self, model):
        """Spatial block N, then temporal block N (execution order)."""
        pairs = zip(model.transformer_blocks, model.temporal_transformer_blocks)
        return [item for i, (spatial, temporal) in enumerate(pairs)
                for item in ((f"transformer_blocks.{i}", spatial), (f"temporal_transformer_blocks.{i}", temporal))]

    def latent_shape(self, model):
        config = model.config
        return config.in_channels, config.video_length, config.sample_size, config.sample_size

    def encode(self, model, conditions):
        embeds = stack(embed_prompts(conditions, model.config.caption_channels))
        return Conditioning({"encoder_hidden_states": embeds["tokens"]})  # LattePipeline passes no mask

    def null_conditions(self, count):
        return [""] * count

    def prompt_embeddings(self, pipeline, prompts, device):
        """``LattePipeline.encode_prompt`` as ``__call__`` runs it on a batch of prompts (``mask_feature``): T5's
        120 tokens zeroed past each prompt's attention mask; the null prompt ``""`` stays unmasked, as the pipeline
        passes its negative embeddings. (A single-prompt stock call instead truncates both to that prompt's length:
        a batch-size-dependent shape this per-prompt encoder does not reproduce.)"""
        tokens, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, mask_feature=False,
                                           device=device)
        mask = pipeline.tokenizer(pipeline._text_preprocessing(prompts, clean_caption=False), padding="max_length",
                                  max_length=tokens.shape[1], truncation=True, return_attention_mask=True,
                                  add_special_tokens=True, return_tensors="pt").attention_mask.to(tokens.device)
        return [TextEmbedding(t if p == "" else t * m[:, None].to(t.dtype), m)
                for p, t, m in zip(prompts, tokens, mask)]

    def predict(self, model, latents, timestep, cond):
        out = model(hidden_states=latents, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                    timestep=timestep.expand(len(latents)), enable_temporal_attentions=True).sample
        return out[:, : latents.shape[1]]  # drop the learned variance

    def scheduler(self, model):
        """DDIM over Latte's training betas (linear 1e-4..0.02), epsilon prediction."""
        from diffusers import DDIMScheduler

        return DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)


ADAPTERS.add("latte", LatteAdapter())
