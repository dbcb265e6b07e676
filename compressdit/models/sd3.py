"""``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5, MMDiT): joint image + context streams, flow matching.

Each joint block runs one attention over the concatenated image and text tokens. The image stream owns
``attn.to_q/k/v`` and ``attn.to_out.0``; the text ("context") stream owns ``attn.add_*_proj``,
``attn.to_add_out``, ``ff_context`` and ``norm1_context``. SD3.5 blocks listed in
``config.dual_attention_layers`` add a second image-only self-attention ``attn2`` whose layers share the
image-stream roles. The last block is ``context_pre_only``: it has no ``to_add_out`` and no ``ff_context``,
returns ``(None, hidden_states)`` and is built from its position (``i == num_layers - 1``), so depth pruning
keeps it. A block returns ``(encoder_hidden_states, hidden_states)``: text stream first.

The model predicts the flow velocity; the pipeline passes the scheduler's timesteps (``sigma * 1000``)
unscaled as ``timestep``, and so does :meth:`SD3Adapter.predict`.
"""

from __future__ import annotations

import torch

from compressdit.models.base import ADAPTERS, BlockStack, Conditioning, ModelAdapter, OriginalTensor
from compressdit.models.text_conditions import TextEmbedding, embed_prompts, stack

_BLOCK = r"transformer_blocks\.\d+"
_EXPERT = r"\.(?:experts\.\d+|shared)"  # MoE experts of the FFNs (Dense2MoE)


def pooled_text(model_name: str, conditions, dim: int, pooled_dim: int) -> dict:
    """Stacked ``tokens``/``mask``/``pooled`` for models that need a pooled text vector (SD3, Flux)."""
    embeds = embed_prompts(conditions, dim, pooled_dim)
    if any(e.pooled is None for e in embeds):
        raise ValueError(f"{model_name} needs pooled text embeddings: give every TextEmbedding a "
                         f"pooled vector of width {pooled_dim}")
    return stack(embeds)


def original_linear(layout: dict, original: str, *sources: str, swap_halves: bool = False) -> None:
    """Add the ``.weight`` and ``.bias`` of an original linear built from the diffusers linears ``sources``."""
    for suffix in ("weight", "bias"):
        layout[f"{original}.{suffix}"] = OriginalTensor(tuple(f"{s}.{suffix}" for s in sources), swap_halves)


def sd3_original_layout(config) -> dict[str, OriginalTensor]:
    """SAI's MMDiT checkpoint names (``joint_blocks``; what ComfyUI loads and diffusers'
    ``convert_sd3_transformer_checkpoint_to_diffusers`` reads back at any width)."""
    layout = {"pos_embed": OriginalTensor(("pos_embed.pos_embed",))}
    for suffix in ("weight", "bias"):
        layout[f"x_embedder.proj.{suffix}"] = OriginalTensor((f"pos_embed.proj.{suffix}",))
    for original, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        original_linear(layout, f"{original}.mlp.0", f"time_text_embed.{ours}.linear_1")
        original_linear(layout, f"{original}.mlp.2", f"time_text_embed.{ours}.linear_2")
    original_linear(layout, "context_embedder", "context_embedder")
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        x, c, ours = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        attentions = [(f"{x}.attn", f"{ours}.attn", "", f"{ours}.attn.to_out.0")]
        if i in (config.get("dual_attention_layers") or ()):
            attentions.append((f"{x}.attn2", f"{ours}.attn2", "", f"{ours}.attn2.to_out.0"))
        attentions.append((f"{c}.attn", f"{ours}.attn", "added_", None if i == last else f"{ours}.attn.to_add_out"))
        for original, attn, added, out in attentions:
            projections = [f"{attn}.to_{q}" for q in "qkv"] if not added else [f"{attn}.add_{q}_proj" for q in "qkv"]
            original_linear(layout, f"{original}.qkv", *projections)
            if out is not None:
                original_linear(layout, f"{original}.proj", out)
            if config.get("qk_norm"):
                for q in "qk":
                    layout[f"{original}.ln_{q}.weight"] = OriginalTensor((f"{attn}.norm_{added}{q}.weight",))
        original_linear(layout, f"{x}.adaLN_modulation.1", f"{ours}.norm1.linear")
        original_linear(layout, f"{c}.adaLN_modulation.1", f"{ours}.norm1_context.linear", swap_halves=i == last)
        streams = [(x, "ff")] if i == last else [(x, "ff"), (c, "ff_context")]
        for original, ff in streams:
            original_linear(layout, f"{original}.mlp.fc1", f"{ours}.{ff}.net.0.proj")
            original_linear(layout, f"{original}.mlp.fc2", f"{ours}.{ff}.net.2")
    original_linear(layout, "final_layer.linear", "proj_out")
    original_linear(layout, "final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves=True)
    return layout


class SD3Adapter(ModelAdapter):
    family = "sd3"
    model_class_name = "SD3Transformer2DModel"
    condition_kind = "text"
    text_width_key = "joint_attention_dim"
    pooled_width_key = "pooled_projection_dim"
    prediction = "flow"
    original_arch = "sd3"
    block_patterns = (_BLOCK,)
    ffn_modules = (_BLOCK + r"\.ff", _BLOCK + r"\.ff_context")
    block_stacks = (BlockStack("transformer_blocks", "num_layers", keep_last=True,
                               returns=("encoder_hidden_states", "hidden_states"),
                               index_keys=("dual_attention_layers",)),)
    roles = {
        "attn_qkv": (_BLOCK + r"\.attn2?\.to_[qkv]",),
        "attn_out": (_BLOCK + r"\.attn2?\.to_out\.0",),
        "context": (_BLOCK + r"\.attn\.add_[qkv]_proj", _BLOCK + r"\.attn\.to_add_out",
                    _BLOCK + r"\.ff_context\.net\.(?:0\.proj|2)", _BLOCK + r"\.ff_context" + _EXPERT + r"\.(?:up|down)",
                    _BLOCK + r"\.norm1_context\.linear"),
        "ffn_up": (_BLOCK + r"\.ff\.net\.0\.proj", _BLOCK + r"\.ff" + _EXPERT + r"\.up"),
        "ffn_down": (_BLOCK + r"\.ff\.net\.2", _BLOCK + r"\.ff" + _EXPERT + r"\.down"),
        "adaln": (_BLOCK + r"\.norm1\.linear",),
        "embedder": (r"time_text_embed\..*", r"context_embedder", r"pos_embed\..*"),
        "head": (r"norm_out\.linear", r"proj_out"),
    }

    def original_layout(self, config):
        return sd3_original_layout(config)

    def original_geometry_issue(self, config):
        """ComfyUI infers SD3's heads as width / 64 (diffusers' converter reads any geometry)."""
        if config["attention_head_dim"] != 64:
            return (f"attention head dim {config['attention_head_dim']}, but ComfyUI's SD3 loader assumes 64 "
                    "(diffusers' converter reads it)")
        return None

    def encode(self, model, conditions):
        embeds = pooled_text("SD3", conditions, model.config.joint_attention_dim, model.config.pooled_projection_dim)
        # SD3 has no text attention mask: padded tokens are attended to, as in StableDiffusion3Pipeline.
        return Conditioning({"encoder_hidden_states": embeds["tokens"], "pooled_projections": embeds["pooled"]})

    def null_conditions(self, count):
        return [""] * count

    def prompt_embeddings(self, pipeline, prompts, device):
        """``StableDiffusion3Pipeline.encode_prompt``: CLIP-L + CLIP-G tokens (padded) followed by T5 tokens, and
        the two CLIP projections concatenated as pooled vector; every prompt slot gets the same prompt."""
        tokens, _, pooled, _ = pipeline.encode_prompt(prompts, None, None, device=device,
                                                      do_classifier_free_guidance=False)
        return [TextEmbedding(t, t.new_ones(len(t), dtype=torch.long), p) for t, p in zip(tokens, pooled)]

    def predict(self, model, latents, timestep, cond):
        out = model(hidden_states=latents, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                    pooled_projections=cond.tensors["pooled_projections"],
                    timestep=timestep.expand(len(latents))).sample
        return out[:, : latents.shape[1]]

    def scheduler(self, model):
        """Plain flow-matching Euler (shift 1.0). SD3 checkpoints ship their own (shift 3.0), used when present."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler()


ADAPTERS.add("sd3", SD3Adapter())
