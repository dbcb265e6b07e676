"""``FluxTransformer2DModel`` (FLUX.1): double-stream MMDiT blocks, then single-stream blocks; flow matching.

Flux sees latents as packed 2x2 patches: ``[B, C, H, W]`` becomes ``[B, (H/2)(W/2), 4C]`` tokens with
positions ``img_ids`` ``[(H/2)(W/2), 3]`` and all-zero ``txt_ids`` ``[seq, 3]`` for the text tokens
(``FluxPipeline._pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``). The adapter keeps
the contract's ``[B, C, H, W]`` latents with ``C = config.in_channels // 4`` and packs inside
:meth:`FluxAdapter.predict`.

Layer roles: double-stream blocks split into an image stream (``attn.to_q/k/v``, ``attn.to_out.0``,
``ff``, ``norm1``) and a text stream (``context``). A single-stream block has one attention over text +
image tokens (``attn.to_q/k/v``, no output projection), a parallel MLP input ``proj_mlp`` (``ffn_up``) and
``proj_out`` (``ffn_down``), which projects the concatenated attention and MLP outputs back to the
hidden size, so it also plays the part of the attention output projection. After Dense2MoE the MLP is a
mixture of experts in ``proj_mlp`` and ``proj_out.proj`` projects the attention output alone (``attn_out``).

Both block kinds take ``hidden_states`` (image) and ``encoder_hidden_states`` (text) and return
``(encoder_hidden_states, hidden_states)``: text stream first. A single-stream block concatenates text + image
tokens inside and splits them again before returning.
"""

from __future__ import annotations

import re

import torch

from compressdit.models.base import (ADAPTERS, BlockStack, Conditioning, ModelAdapter, OriginalTensor, ParallelMLP,
                                     dynamic_shift)
from compressdit.models.sd3 import original_linear as linear, pooled_text
from compressdit.models.text_conditions import TextEmbedding

_DOUBLE = r"transformer_blocks\.\d+"
_SINGLE = r"single_transformer_blocks\.\d+"
_EXPERT = r"\.(?:experts\.\d+|shared)"  # MoE experts of the FFNs (Dense2MoE)
_JOINT = ("encoder_hidden_states", "hidden_states")  # what both block kinds return, in this order


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]`` (2x2 patches, channel-major inside a patch)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need an even height and width, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Token positions ``[height * width, 3]``: ``(0, row, col)`` for a packed ``height`` x ``width`` grid."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def flux_original_layout(config) -> dict[str, OriginalTensor]:
    """BFL's FLUX.1 checkpoint names (what ComfyUI loads; diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
    reads them back for FLUX.1's 3072 width, which it assumes)."""
    layout: dict[str, OriginalTensor] = {}
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if config.get("guidance_embeds"):
        embedders["guidance_in"] = "guidance_embedder"
    for original, ours in embedders.items():
        linear(layout, f"{original}.in_layer", f"time_text_embed.{ours}.linear_1")
        linear(layout, f"{original}.out_layer", f"time_text_embed.{ours}.linear_2")
    linear(layout, "txt_in", "context_embedder")
    linear(layout, "img_in", "x_embedder")
    for i in range(config["num_layers"]):
        block, ours = f"double_blocks.{i}", f"transformer_blocks.{i}"
        linear(layout, f"{block}.img_mod.lin", f"{ours}.norm1.linear")
        linear(layout, f"{block}.txt_mod.lin", f"{ours}.norm1_context.linear")
        linear(layout, f"{block}.img_attn.qkv", *(f"{ours}.attn.to_{x}" for x in "qkv"))
        linear(layout, f"{block}.txt_attn.qkv", *(f"{ours}.attn.add_{x}_proj" for x in "qkv"))
        linear(layout, f"{block}.img_attn.proj", f"{ours}.attn.to_out.0")
        linear(layout, f"{block}.txt_attn.proj", f"{ours}.attn.to_add_out")
        for stream, added in (("img", ""), ("txt", "added_")):
            for which in ("query", "key"):
                layout[f"{block}.{stream}_attn.norm.{which}_norm.scale"] = OriginalTensor(
                    (f"{ours}.attn.norm_{added}{which[0]}.weight",))
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            linear(layout, f"{block}.{stream}_mlp.0", f"{ours}.{ff}.net.0.proj")
            linear(layout, f"{block}.{stream}_mlp.2", f"{ours}.{ff}.net.2")
    for i in range(config["num_single_layers"]):
        block, ours = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(layout, f"{block}.modulation.lin", f"{ours}.norm.linear")
        linear(layout, f"{block}.linear1", *(f"{ours}.attn.to_{x}" for x in "qkv"), f"{ours}.proj_mlp")
        linear(layout, f"{block}.linear2", f"{ours}.proj_out")
        for which in ("query", "key"):
            layout[f"{block}.norm.{which}_norm.scale"] = OriginalTensor((f"{ours}.attn.norm_{which[0]}.weight",))
    linear(layout, "final_layer.linear", "proj_out")
    linear(layout, "final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves=True)
    return layout


class FluxAdapter(ModelAdapter):
    family = "flux"
    model_class_name = "FluxTransformer2DModel"
    condition_kind = "text"
    text_width_key = "joint_attention_dim"
    pooled_width_key = "pooled_projection_dim"
    prediction = "flow"
    block_patterns = (_DOUBLE, _SINGLE)
    block_stacks = (BlockStack("transformer_blocks", "num_layers", returns=_JOINT),
                    BlockStack("single_transformer_blocks", "num_single_layers", returns=_JOINT))
    roles = {
        "attn_qkv": (_DOUBLE + r"\.attn\.to_[qkv]", _SINGLE + r"\.attn\.to_[qkv]"),
        "attn_out": (_DOUBLE + r"\.attn\.to_out\.0", _SINGLE + r"\.proj_out\.proj"),  # the latter: after Dense2MoE
        "context": (_DOUBLE + r"\.attn\.add_[qkv]_proj", _DOUBLE + r"\.attn\.to_add_out",
                    _DOUBLE + r"\.ff_context\.net\.(?:0\.proj|2)",
                    _DOUBLE + r"\.ff_context" + _EXPERT + r"\.(?:up|down)", _DOUBLE + r"\.norm1_context\.linear"),
        "ffn_up": (_DOUBLE + r"\.ff\.net\.0\.proj", _SINGLE + r"\.proj_mlp", _DOUBLE + r"\.ff" + _EXPERT + r"\.up",
                   _SINGLE + r"\.proj_mlp" + _EXPERT + r"\.up"),
        "ffn_down": (_DOUBLE + r"\.ff\.net\.2", _SINGLE + r"\.proj_out", _DOUBLE + r"\.ff" + _EXPERT + r"\.down",
                     _SINGLE + r"\.proj_mlp" + _EXPERT + r"\.down"),
        "adaln": (_DOUBLE + r"\.norm1\.linear", _SINGLE + r"\.norm\.linear"),
        "embedder": (r"time_text_embed\..*", r"context_embedder", r"x_embedder", r"pos_embed(?:\..*)?"),
        "head": (r"norm_out\.linear", r"proj_out"),
    }
    original_arch = "flux"
    ffn_modules = (_DOUBLE + r"\.ff", _DOUBLE + r"\.ff_context")
    # single blocks: proj_out(cat([attn, act_mlp(proj_mlp(x))])); Dense2MoE makes proj_mlp the MoE (ending in its
    # down projection), act_mlp an identity and proj_out a TailSum that keeps the attention columns
    parallel_mlps = (ParallelMLP(_SINGLE, "proj_mlp", "act_mlp", "proj_out"),)
    # Flux configs carry no sample_size: latents are ``latent_size`` square unless the config has one.
    # Set it on the registered instance (``ADAPTERS.get("flux").latent_size = 128`` for 1024 px images).
    latent_size: int = 8
    # Guidance-distilled checkpoints (``config.guidance_embeds``) take the guidance scale as an input;
    # FluxPipeline passes its ``guidance_scale`` (default 3.5). Classifier-free guidance in
    # ``sampling.sample`` is separate from this (FluxPipeline's ``true_cfg_scale``).
    embedded_guidance: float = 3.5

    def original_layout(self, config):
        return flux_original_layout(config)

    def diffusers_reads_original(self, config):
        return config["num_attention_heads"] * config["attention_head_dim"] == 3072

    def original_geometry_issue(self, config):
        """diffusers' converter splits ``linear1`` at FLUX.1's width 3072; ComfyUI fixes RoPE axes (16, 56, 56)."""
        width = config["num_attention_heads"] * config["attention_head_dim"]
        if width != 3072 or tuple(config["axes_dims_rope"]) != (16, 56, 56):
            return (f"width {width} and RoPE axes {tuple(config['axes_dims_rope'])}, but the FLUX loaders of the "
                    "original names assume FLUX.1's 3072 and (16, 56, 56)")
        return None

    def blocks(self, model):
        """Double-stream blocks, then single-stream blocks (execution order)."""
        named = list(model.named_modules())
        return [(name, m) for pattern in self.block_patterns for name, m in named if re.fullmatch(pattern, name)]

    def latent_shape(self, model):
        size = model.config.get("sample_size") or self.latent_size
        return model.config.in_channels // 4, size, size

    def encode(self, model, conditions):
        embeds = pooled_text("Flux", conditions, model.config.joint_attention_dim, model.config.pooled_projection_dim)
        return Conditioning({"encoder_hidden_states": embeds["tokens"], "pooled_projections": embeds["pooled"]})

    def null_conditions(self, count):
        return [""] * count

    def prompt_embeddings(self, pipeline, prompts, device):
        """``FluxPipeline.encode_prompt``: T5 tokens (no mask: FluxPipeline attends to padding) and CLIP's pooled
        output; both prompt slots get the same prompt."""
        tokens, pooled, _ = pipeline.encode_prompt(prompts, device=device)
        return [TextEmbedding(t, t.new_ones(len(t), dtype=torch.long), p) for t, p in zip(tokens, pooled)]

    def image_tokens(self, model, latents):
        """Packed 2x2 patches: a ``[B, C, H, W]`` latent is ``(H/2)(W/2)`` tokens."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def set_timesteps(self, model, scheduler, steps, latents, device):
        """As FluxPipeline: with ``use_dynamic_shifting``, sigmas ``linspace(1, 1/steps)`` (none with
        ``use_flow_sigmas``) shifted by ``mu`` from the image token count. Otherwise the scheduler's own spacing
        (the reference model flux-fmnist is sampled so)."""
        if not scheduler.config.get("use_dynamic_shifting"):
            return super().set_timesteps(model, scheduler, steps, latents, device)
        import numpy as np

        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas,
                                mu=dynamic_shift(scheduler, self.image_tokens(model, latents)))

    def predict(self, model, latents, timestep, cond):
        batch, channels, height, width = latents.shape
        tokens = cond.tensors["encoder_hidden_states"]
        guidance = None
        if model.config.get("guidance_embeds"):
            guidance = torch.full((batch,), self.embedded_guidance, device=latents.device, dtype=torch.float32)
        out = model(hidden_states=pack_latents(latents), encoder_hidden_states=tokens,
                    pooled_projections=cond.tensors["pooled_projections"],
                    timestep=timestep.expand(batch).to(latents.dtype) / 1000, guidance=guidance,
                    img_ids=latent_image_ids(height // 2, width // 2, latents.device, latents.dtype),
                    txt_ids=tokens.new_zeros(tokens.shape[1], 3)).sample
        return unpack_latents(out, height, width)[:, :channels]

    def scheduler(self, model):
        """Flow-matching Euler with a fixed shift of 1.0 (linear sigmas), meant for small latents.

        FLUX.1 checkpoints ship a scheduler with ``use_dynamic_shifting``: FluxPipeline derives ``mu`` from
        the image token count (shift ``exp(mu)``, about 1.65 at 256 tokens up to 3.2 at 4096) and passes it
        to ``set_timesteps``; :meth:`set_timesteps` does the same when a pipeline folder brings such a scheduler.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=1.0)


ADAPTERS.add("flux", FluxAdapter())
