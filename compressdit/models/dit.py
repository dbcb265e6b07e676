"""``DiTTransformer2DModel`` (DiT-XL/2 family): class-conditional, adaLN-Zero, epsilon prediction.

Every block carries its own timestep + class embedder (``norm1.emb``) and the output head reads the first
block's (``transformer_blocks[0].norm1.emb``). The original DiT shares one embedder, so converted checkpoints
should hold equal copies; models trained in diffusers (the zoo's ``dit-fmnist``) have distinct ones, and there
removing block 0 also changes the head's conditioning (``compressdit.prune.depth.skip_blocks`` mirrors that).
"""

from __future__ import annotations

import torch

from compressdit.models.base import ADAPTERS, BlockStack, Conditioning, ModelAdapter

NULL_CLASS = 1000  # DiTPipeline's null label for classifier-free guidance

_BLOCK = r"transformer_blocks\.\d+"
_EXPERT = r"\.ff\.(?:experts\.\d+|shared)"  # MoE experts replacing the FFN (Dense2MoE)


class DiTAdapter(ModelAdapter):
    family = "dit"
    model_class_name = "DiTTransformer2DModel"
    condition_kind = "class"
    block_patterns = (_BLOCK,)
    block_stacks = (BlockStack("transformer_blocks", "num_layers", first_block_reads=("norm1.emb",)),)
    roles = {
        "attn_qkv": (_BLOCK + r"\.attn1\.to_[qkv]",),
        "attn_out": (_BLOCK + r"\.attn1\.to_out\.0",),
        "ffn_up": (_BLOCK + r"\.ff\.net\.0\.proj", _BLOCK + _EXPERT + r"\.up"),
        "ffn_down": (_BLOCK + r"\.ff\.net\.2", _BLOCK + _EXPERT + r"\.down"),
        "adaln": (_BLOCK + r"\.norm1\.linear",),
        "embedder": (_BLOCK + r"\.norm1\.emb\..*", r"pos_embed\..*"),
        "head": (r"proj_out_1", r"proj_out_2"),
    }
    ffn_modules = (_BLOCK + r"\.ff",)

    def encode(self, model, conditions):
        return Conditioning({"class_labels": torch.as_tensor(conditions, dtype=torch.long)})

    def null_conditions(self, count):
        return [NULL_CLASS] * count

    def predict(self, model, latents, timestep, cond):
        out = model(latents, timestep=timestep.expand(len(latents)), class_labels=cond.tensors["class_labels"]).sample
        return out[:, : latents.shape[1]]  # drop learned sigma when the model predicts it


ADAPTERS.add("dit", DiTAdapter())
