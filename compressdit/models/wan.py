"""``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video): self-attention, cross-attention on text, ``ffn``.

Latents are ``[B, C, F, H, W]`` (``WanPipeline``'s layout); the config has no sample size, so ``latent_shape``
is ``(C, latent_frames, latent_size, latent_size)`` with the adapter's ``latent_frames`` / ``latent_size``
(set them on the registered instance: 21 frames x 60 x 104 for 81 frames at 480x832).

A block runs *one full 3D self-attention* over all video tokens (``attn1``: no separate temporal or spatial
attention, so no ``temporal`` role), cross-attention on the text tokens (``attn2``; image-to-video
checkpoints add ``add_k_proj`` / ``add_v_proj`` for CLIP image tokens, both ``cross_kv``) and a GELU MLP
``ffn``. The adaLN modulation of every block comes from one shared projection ``condition_embedder.time_proj``
(``adaln``) plus each block's learned ``scale_shift_table``. The class keeps ``rope``, ``time_embedder``,
``scale_shift_table`` and ``norm1/2/3`` in fp32 (``_keep_in_fp32_modules``); the only Linears among them are
under ``time_embedder`` (role ``embedder``, never quantized), and diffusers loads them in fp32 whatever
``torch_dtype`` a user asks for.

Sampling follows ``WanPipeline``: flow matching (``prediction = "flow"``) with ``UniPCMultistepScheduler``
(``flow_prediction``, flow sigmas, ``flow_shift`` 3.0 as the 480p checkpoints ship), scheduler timesteps passed
unscaled. Text embeddings (UMT5, ``text_dim`` wide) are zeroed past each prompt's length, as the pipeline does.
"""

from __future__ import annotations

from compressdit.models.base import ADAPTERS, BlockStack, Conditioning, ModelAdapter, call_default
from compressdit.models.text_conditions import TextEmbedding, embed_prompts, stack

_BLOCK = r"blocks\.\d+"


class WanAdapter(ModelAdapter):
    family = "wan"
    model_class_name = "WanTransformer3DModel"
    condition_kind = "text"
    prediction = "flow"
    text_width_key = "text_dim"
    frame_axis = 2
    block_patterns = (_BLOCK,)
    block_stacks = (BlockStack("blocks", "num_layers"),)
    roles = {
        "attn_qkv": (_BLOCK + r"\.attn1\.to_[qkv]",),
        "attn_out": (_BLOCK + r"\.attn1\.to_out\.0",),
        "cross_q": (_BLOCK + r"\.attn2\.to_q",),
        "cross_kv": (_BLOCK + r"\.attn2\.to_[kv]", _BLOCK + r"\.attn2\.add_[kv]_proj"),
        "cross_out": (_BLOCK + r"\.attn2\.to_out\.0",),
        "ffn_up": (_BLOCK + r"\.ffn\.net\.0\.proj",),
        "ffn_down": (_BLOCK + r"\.ffn\.net\.2",),
        "adaln": (r"condition_embedder\.time_proj",),
        "embedder": (r"condition_embedder\.(?:time_embedder|text_embedder|image_embedder)\..*",),
        "head": (r"proj_out",),
    }
    latent_frames: int = 2
    latent_size: int = 8

    def latent_shape(self, model):
        return model.config.in_channels, self.latent_frames, self.latent_size, self.latent_size

    def encode(self, model, conditions):
        embeds = stack(embed_prompts(conditions, model.config.text_dim))
        return Conditioning({"encoder_hidden_states": embeds["tokens"] * embeds["mask"][..., None]})

    def null_conditions(self, count):
        return [""] * count

    def prompt_embeddings(self, pipeline, prompts, device):
        """``WanPipeline.encode_prompt`` with ``__call__``'s ``max_sequence_length`` (512, not ``encode_prompt``'s
        226): UMT5 tokens zeroed past each prompt's length; the mask is its tokenizer's attention mask."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        length = call_default(pipeline, "max_sequence_length")
        tokens, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length,
                                           device=device)
        mask = pipeline.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=length,
                                  truncation=True, add_special_tokens=True, return_attention_mask=True,
                                  return_tensors="pt").attention_mask
        return [TextEmbedding(t, m.to(t.device)) for t, m in zip(tokens, mask)]

    def predict(self, model, latents, timestep, cond):
        out = model(hidden_states=latents, timestep=timestep.expand(len(latents)),
                    encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample
        return out[:, : latents.shape[1]]

    def scheduler(self, model):
        """``UniPCMultistepScheduler`` with flow sigmas, as Wan 2.1 480p ships it (``flow_shift`` 3.0)."""
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       num_train_timesteps=1000, flow_shift=3.0)


ADAPTERS.add("wan", WanAdapter())
