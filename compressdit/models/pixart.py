"""``PixArtTransformer2DModel`` (PixArt-alpha/sigma): adaLN-single, cross-attention on text tokens."""

from __future__ import annotations

from compressdit.models.base import ADAPTERS, BlockStack, Conditioning, ModelAdapter
from compressdit.models.text_conditions import TextEmbedding, embed_prompts, stack

_BLOCK = r"transformer_blocks\.\d+"
_EXPERT = r"\.(?:experts\.\d+|shared)"  # MoE experts of the FFNs (Dense2MoE)


class PixArtAdapter(ModelAdapter):
    family = "pixart"
    model_class_name = "PixArtTransformer2DModel"
    condition_kind = "text"
    text_width_key = "caption_channels"
    block_patterns = (_BLOCK,)
    ffn_modules = (_BLOCK + r"\.ff",)
    block_stacks = (BlockStack("transformer_blocks", "num_layers"),)
    roles = {
        "attn_qkv": (_BLOCK + r"\.attn1\.to_[qkv]",),
        "attn_out": (_BLOCK + r"\.attn1\.to_out\.0",),
        "cross_q": (_BLOCK + r"\.attn2\.to_q",),
        "cross_kv": (_BLOCK + r"\.attn2\.to_[kv]",),
        "cross_out": (_BLOCK + r"\.attn2\.to_out\.0",),
        "ffn_up": (_BLOCK + r"\.ff\.net\.0\.proj", _BLOCK + r"\.ff" + _EXPERT + r"\.up"),
        "ffn_down": (_BLOCK + r"\.ff\.net\.2", _BLOCK + r"\.ff" + _EXPERT + r"\.down"),
        "adaln": (r"adaln_single\.linear",),
        "embedder": (r"adaln_single\.emb\..*", r"caption_projection\..*", r"pos_embed\..*"),
        "head": (r"proj_out",),
    }

    def encode(self, model, conditions):
        embeds = stack(embed_prompts(conditions, model.config.caption_channels))
        return Conditioning({"encoder_hidden_states": embeds["tokens"], "encoder_attention_mask": embeds["mask"]})

    def null_conditions(self, count):
        return [""] * count

    def prompt_embeddings(self, pipeline, prompts, device):
        """PixArt-alpha/sigma ``encode_prompt``: T5 tokens with their attention mask (no pooled vector)."""
        tokens, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
        return [TextEmbedding(t, m) for t, m in zip(tokens, mask)]

    def predict(self, model, latents, timestep, cond):
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):
            size = latents.shape[-1] * 8
            added = {"resolution": latents.new_tensor([[size, size]]).expand(len(latents), 2),
                     "aspect_ratio": latents.new_ones(len(latents), 1)}
        out = model(latents, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                    encoder_attention_mask=cond.tensors["encoder_attention_mask"],
                    timestep=timestep.expand(len(latents)), added_cond_kwargs=added).sample
        return out[:, : latents.shape[1]]


ADAPTERS.add("pixart", PixArtAdapter())
